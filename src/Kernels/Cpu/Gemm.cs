// Packed, cache-blocked SGEMM for the managed CPU backend.
//
// C[m,n] (=|+=) A[m,k] · B[k,n], where A and B are read through arbitrary (row, col) strides, so transposed operands
// (W^T for input gradients, col^T for weight gradients, B^T for linear layers) cost nothing extra: the packing
// routines absorb the layout, and every product runs through the same micro-kernel.
//
// Blocking (loop order, outermost first):
//   ic  : rows of A/C in blocks of up to MC          (A block MC x KC packed once, stays in L2)
//   pc  : the k dimension in blocks of up to KC      (C is re-read/re-written once per k block)
//   jr  : columns in NR-wide micro-panels            (each B micro-panel KC x NR is packed right before use, stays in L1)
//   ir  : rows in MR-high micro-panels               (the micro-kernel: an MR x NR tile of C held in registers)
// There is no separate NC (L3) level: the matrices here are small (m <= ~1k), so packing B one micro-panel at a time
// means every B element is read from memory exactly once per A block and then reused mc/MR times straight from L1.
//
// B sources: the driver is generic over where its B micro-panels come from (IBSource, a struct type argument, so each
// source gets its own specialised copy of the driver). Besides strided matrices, the implicit-GEMM convolution
// (ConvGemm) multiplies lowered matrices that exist only as offsets into a padded image: rows that are contiguous runs
// starting anywhere (MultiplyRowOffsets) or columns that are (MultiplyColumnOffsets). Packing from those costs the same
// as packing a strided matrix, and saves writing and re-reading the 9x larger im2col matrix.
//
// B in place: whole panels of a source whose rows are contiguous (a row-major B, or the rows of a convolution's lowered
// matrix in its padded image) are multiplied where they lie (OffsetWalk, StridedWalk) instead of being packed first. The
// micro-kernel's loads are then unaligned, but the packing pass costs more: it is a copy of all of B for every block of
// A, and a pointwise convolution's B rows (image planes hundreds of floats apart) are slow to gather (docs/perf.md).
// Edge panels are still packed, zero-padded, for the edge kernels.
//
// Block sizes: KC = 128 keeps the B micro-panel (128 x 48 x 4 B = 24 KiB) resident in the 32 KiB L1 while the A
// panels stream past it (the KC values tried: docs/perf.md). MC = 1024 bounds the packed A block at 512 KiB, half the
// 1 MiB L2. k is split into equal multiples of 16 (the transposing
// packers work in 16-step slices) rather than KC-sized blocks plus a runt.
//
// The rest of the class lives beside this file: GemmPacking.cs (the A and B packers, the B sources),
// GemmKernels.cs (the micro-kernels and why they have their shapes), GemmSplit.cs (parallel=true: stripes on the
// backend's helper threads). Packing buffers are slots of the calling thread's Arena.

using System.Runtime.CompilerServices;

namespace Ddpm.Kernels;

/// <summary>Single-precision GEMM on the managed CPU backend: C = A·B (+ C when accumulating), any strides.</summary>
public static unsafe partial class Gemm
{
    internal const int KC = 128;
    private const int MC = 1024;
    /// <summary>Below this a product is over before a woken helper pays for its wake-up (the crossover: docs/perf.md).</summary>
    private const double MinParallelFlops = 1.5e6;

    /// <summary>
    /// C[i*ldc + j] (=|+=) sum_p A(i,p)·B(p,j), where A(i,p) = a[i*aRow + p*aCol] and B(p,j) = b[p*bRow + j*bCol].
    /// Shapes: A [m,k], B [k,n], C [m,n]. <paramref name="accumulate"/>=false overwrites C (k = 0 then zeroes it).
    /// <paramref name="parallel"/>=true may split the work over all cores; false runs on the calling thread only and
    /// is safe to call concurrently from any number of threads. C must not alias A or B.
    /// </summary>
    public static void Multiply(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate, bool parallel)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(m);
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        ArgumentOutOfRangeException.ThrowIfNegative(k);
        if (m == 0 || n == 0) return;
        if (k == 0)
        {
            if (!accumulate)
                for (int i = 0; i < m; i++) new Span<float>(c + (long)i * ldc, n).Clear();
            return;
        }
        if (Isa.Avx512) Dispatch<Avx512Kernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
        else if (Isa.Avx2) Dispatch<Avx2Kernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
        else if (Isa.V128) Dispatch<Vector128Kernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
        else Dispatch<ScalarKernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
    }

    /// <summary>The plain triple loop with the same contract as <see cref="Multiply"/>: the reference for tests and the baseline for benchmarks.</summary>
    public static void MultiplyNaive(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
    {
        for (int i = 0; i < m; i++)
        {
            for (int j = 0; j < n; j++)
            {
                float s = 0f;
                for (int p = 0; p < k; p++) s += a[(long)i * aRow + (long)p * aCol] * b[(long)p * bRow + (long)j * bCol];
                float* dst = c + (long)i * ldc + j;
                *dst = accumulate ? *dst + s : s;
            }
        }
    }

    /// <summary>
    /// The micro-kernel of this thread's latest product ("Avx512Kernel", "Avx2Kernel", "Vector128Kernel" or
    /// "ScalarKernel"), set by the entry points on the calling thread and by the driver on every thread that runs a
    /// share, so a test can check that a level really ran its own kernel. Per thread: concurrent callers do not race.
    /// </summary>
    [ThreadStatic] internal static string? LastKernel;

    private static void Dispatch<TK>(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate, bool parallel)
        where TK : struct, IMicroKernel
    {
        LastKernel = TK.Name;
        if (parallel && Cpu.Threads > 1 && 2.0 * m * n * k >= MinParallelFlops
            && TryRunSplit(&Serial<TK>, TK.MR, TK.NR, m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate))
            return;
        Serial<TK>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate);
    }

    /// <summary>
    /// C[i*ldc + j] (=|+=) sum_p A(i,p)·B(p,j) with B(p,j) = b[rowOffsets[p] + j]: each row of B is a contiguous run
    /// that may start anywhere in b. This is the lowered matrix of an implicit-GEMM convolution, whose rows are
    /// shifted windows of one padded image, so B is packed straight from the image instead of from an im2col copy.
    /// Shapes: A [m,k] read as in <see cref="Multiply"/>, rowOffsets [k], C [m,n]; b[rowOffsets[p] .. + n) must be
    /// readable. Runs on the calling thread only (safe to call concurrently); allocation-free once warm. packB: pack
    /// every B panel though this source is read in place (so the tests cover the packing path).
    /// </summary>
    internal static void MultiplyRowOffsets(int m, int n, int k, float* a, int aRow, int aCol, float* b, int* rowOffsets, float* c, int ldc, bool accumulate,
        float* packedA = null, bool packB = false)
    {
        if (Trivial(m, n, k, c, ldc, accumulate)) return;
        var src = new RowOffsetsB(b, rowOffsets);
        if (Isa.Avx512) Serial<Avx512Kernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA, packB);
        else if (Isa.Avx2) Serial<Avx2Kernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA, packB);
        else if (Isa.V128) Serial<Vector128Kernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA, packB);
        else Serial<ScalarKernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA, packB);
    }

    /// <summary>
    /// C[i*ldc + j] (=) sum_p A(i,p)·B(p,j) with the columns of B dense output positions of several images: column
    /// j = (image t, row y, column x), t = j / (p·q), and B(p, j) = b[t·imageStride + rowOffsets[p] + y·ldRow + x]. This
    /// is the lowered matrix of a convolution over small maps taken straight from each image's padded planes (rows ldRow
    /// apart) without the wide grid's thrown-away columns. Packed panel by panel, in runs of at most q floats. Shapes: A
    /// [m, k] packed by <see cref="PackA"/>, C [m, n]. Runs on the calling thread only; allocation-free once warm.
    /// </summary>
    internal static void MultiplyDenseColumns(int m, int n, int k, float* packedA, float* b, int* rowOffsets, long imageStride, int ldRow, int p, int q,
        float* c, int ldc)
    {
        if (Trivial(m, n, k, c, ldc, accumulate: false)) return;
        var src = new DenseColumnsB(b, rowOffsets, imageStride, ldRow, p, q);
        if (Isa.Avx512) Serial<Avx512Kernel, DenseColumnsB>(m, n, k, null, k, 1, src, c, ldc, false, packedA);
        else if (Isa.Avx2) Serial<Avx2Kernel, DenseColumnsB>(m, n, k, null, k, 1, src, c, ldc, false, packedA);
        else if (Isa.V128) Serial<Vector128Kernel, DenseColumnsB>(m, n, k, null, k, 1, src, c, ldc, false, packedA);
        else Serial<ScalarKernel, DenseColumnsB>(m, n, k, null, k, 1, src, c, ldc, false, packedA);
    }

    /// <summary>Floats that <see cref="PackA"/> writes for an A of [m, k].</summary>
    internal static long PackedALength(int m, int k)
    {
        int mr = Isa.Avx512 ? Avx512Kernel.MR : Isa.Avx2 ? Avx2Kernel.MR : Isa.V128 ? Vector128Kernel.MR : ScalarKernel.MR;
        return (long)RoundUp(m, mr) * k;
    }

    /// <summary>
    /// Packs all of A [m, k] (read as in <see cref="Multiply"/>) into dst (<see cref="PackedALength"/> floats), block by
    /// block in the order the driver reads them. A product whose A is the same for many calls (a convolution's weights,
    /// once per image) passes it as packedA and skips the per-call packing: for a 256-channel 7x7 layer that packing
    /// is 2.4 MB of transposes per image, a large share of the multiply (docs/perf.md).
    /// </summary>
    internal static void PackA(int m, int k, float* a, int aRow, int aCol, float* dst)
    {
        if (Isa.Avx512) PackAll<Avx512Kernel>(m, k, a, aRow, aCol, dst);
        else if (Isa.Avx2) PackAll<Avx2Kernel>(m, k, a, aRow, aCol, dst);
        else if (Isa.V128) PackAll<Vector128Kernel>(m, k, a, aRow, aCol, dst);
        else PackAll<ScalarKernel>(m, k, a, aRow, aCol, dst);
    }

    private static void PackAll<TK>(int m, int k, float* a, int aRow, int aCol, float* dst) where TK : struct, IMicroKernel
    {
        var (mcMax, kcMax) = Blocks<TK>(m, k);
        for (int ic = 0; ic < m; ic += mcMax)
        {
            int mc = Math.Min(mcMax, m - ic);
            for (int pc = 0; pc < k; pc += kcMax)
            {
                int kc = Math.Min(kcMax, k - pc);
                PackA<TK>(mc, kc, a + (long)ic * aRow + (long)pc * aCol, aRow, aCol, dst);
                dst += (long)RoundUp(mc, TK.MR) * kc;
            }
        }
    }

    /// <summary>The driver's block sizes: equal-sized blocks avoid a thin last block that would pay the per-block C
    /// traffic for little work.</summary>
    private static (int McMax, int KcMax) Blocks<TK>(int m, int k) where TK : struct, IMicroKernel
    {
        int kBlocks = (k + KC - 1) / KC;
        int kcMax = Math.Min(k, RoundUp((k + kBlocks - 1) / kBlocks, 16));
        int mBlocks = (m + MC - 1) / MC;
        int mcMax = RoundUp((m + mBlocks - 1) / mBlocks, TK.MR);
        return (mcMax, kcMax);
    }

    /// <summary>
    /// C[i*ldc + j] (=|+=) sum_p A(i,p)·B(p,j) with B(p,j) = b[columnOffsets[j] + p]: each column of B is a contiguous
    /// run (the transposed lowered matrix of a convolution's weight gradient, packed straight from the padded image).
    /// Shapes: A [m,k] read as in <see cref="Multiply"/>, columnOffsets [n], C [m,n]; b[columnOffsets[j] .. + k) must
    /// be readable. With <paramref name="kPerGroup"/> &gt; 0, B is groups of kPerGroup rows, group i read from
    /// b + i·<paramref name="groupStride"/> (several images stacked along the reduction). Runs on the calling thread only
    /// (safe to call concurrently); allocation-free once warm.
    /// </summary>
    internal static void MultiplyColumnOffsets(int m, int n, int k, float* a, int aRow, int aCol, float* b, int* columnOffsets, float* c, int ldc, bool accumulate,
        long groupStride = 0, int kPerGroup = 0)
    {
        if (Trivial(m, n, k, c, ldc, accumulate)) return;
        // Ungrouped is one group of all k rows.
        var src = new GroupedColumnOffsetsB(b, columnOffsets, groupStride, kPerGroup > 0 ? kPerGroup : k);
        if (Isa.Avx512) Serial<Avx512Kernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
        else if (Isa.Avx2) Serial<Avx2Kernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
        else if (Isa.V128) Serial<Vector128Kernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
        else Serial<ScalarKernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
    }

    /// <summary>Checks the sizes; true when there is nothing to multiply (k = 0 then clears C unless accumulating).</summary>
    private static bool Trivial(int m, int n, int k, float* c, int ldc, bool accumulate)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(m);
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        ArgumentOutOfRangeException.ThrowIfNegative(k);
        if (m == 0 || n == 0) return true;
        if (k != 0) return false;
        if (!accumulate)
            for (int i = 0; i < m; i++) new Span<float>(c + (long)i * ldc, n).Clear();
        return true;
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Blocked driver
    // ---------------------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Serial<TK>(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
        where TK : struct, IMicroKernel
        => Serial<TK, StridedB>(m, n, k, a, aRow, aCol, new StridedB(b, bRow, bCol), c, ldc, accumulate);

    /// <summary>The blocked product on the calling thread; <typeparamref name="TB"/> packs the B micro-panels. A comes
    /// packed by <see cref="PackA(int, int, float*, int, int, float*)"/> when <paramref name="packedA"/> is not null.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Serial<TK, TB>(int m, int n, int k, float* a, int aRow, int aCol, TB b, float* c, int ldc, bool accumulate, float* packedA = null,
        bool packB = false)
        where TK : struct, IMicroKernel
        where TB : struct, IBSource
    {
        int MR = TK.MR, NR = TK.NR;
        LastKernel = TK.Name;
        var (mcMax, kcMax) = Blocks<TK>(m, k);

        Arena arena = Arena.Current;
        float* ap = packedA != null ? null : arena.Floats(ArenaSlot.GemmA, (long)mcMax * kcMax);
        // 64 floats of slack: the dense-column packer's vector copies may run past the panel's last row.
        float* bp = arena.Floats(ArenaSlot.GemmB, (long)NR * kcMax + 64);
        float* tile = stackalloc float[MR * NR];
        bool inPlace = b.InPlace && !packB;

        for (int ic = 0; ic < m; ic += mcMax)
        {
            int mc = Math.Min(mcMax, m - ic);
            for (int pc = 0; pc < k; pc += kcMax)
            {
                int kc = Math.Min(kcMax, k - pc);
                // Later k blocks always add onto the partial sums of the earlier ones.
                bool acc = accumulate || pc > 0;
                if (packedA != null)
                {
                    ap = packedA;
                    packedA += (long)RoundUp(mc, MR) * kc;
                }
                else
                {
                    PackA<TK>(mc, kc, a + (long)ic * aRow + (long)pc * aCol, aRow, aCol, ap);
                }
                for (int jr = 0; jr < n; jr += NR)
                {
                    int nr = Math.Min(NR, n - jr);
                    // Whole panels of a source with contiguous rows are read where they lie; edge panels are packed,
                    // zero-padded for the edge kernels.
                    bool packed = !(inPlace && nr == NR);
                    if (packed) b.Pack<TK>(pc, kc, jr, nr, bp);
                    float* cPanel = c + (long)ic * ldc + jr;
                    for (int ir = 0; ir < mc; ir += MR)
                    {
                        int mr = Math.Min(MR, mc - ir);
                        float* aPanel = ap + (long)ir * kc;
                        float* cTile = cPanel + (long)ir * ldc;
                        if (!packed) b.RunInPlace<TK>(pc, kc, jr, aPanel, mr, cTile, ldc, acc, tile);
                        else if (mr == MR && nr == NR) TK.Run(kc, aPanel, new StridedWalk(bp, NR), cTile, ldc, acc);
                        else TK.RunEdge(kc, aPanel, bp, mr, nr, cTile, ldc, acc, tile);
                    }
                }
            }
        }
    }

    private static int RoundUp(int x, int r) => (x + r - 1) / r * r;

    /// <summary>C[0..mr, 0..NR) (=|+=) rows 0..mr (mr &lt;= MR) of the packed A panel times a whole B panel read where it
    /// lies: the full tile, or a row edge a row at a time.</summary>
    private static void RunPanel<TK, TW>(int kc, float* a, TW b, int mr, float* c, int ldc, bool accumulate, float* tile)
        where TK : struct, IMicroKernel
        where TW : struct, IBWalk
    {
        if (mr == TK.MR) TK.Run(kc, a, b, c, ldc, accumulate);
        else RunRows<TK, TW>(kc, a, b, mr, TK.NR, c, ldc, accumulate, tile);
    }

    /// <summary>C[0..mr, 0..nr) (=|+=) rows 0..mr of the packed A panel times B's rows, one micro-kernel row per row: a
    /// row edge (mr &lt; MR), of a packed panel or of a full panel read in place.</summary>
    private static void RunRows<TK, TW>(int kc, float* a, TW b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        where TK : struct, IMicroKernel
        where TW : struct, IBWalk
    {
        for (int r = 0; r < mr; r++)
        {
            TK.RunRow(kc, a + r, b, tile);
            CopyTile(tile, TK.NR, 1, nr, c + (long)r * ldc, ldc, accumulate);
        }
    }

    /// <summary>C[0..mr, 0..nr) (=|+=) tile[0..mr, 0..nr).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void CopyTile(float* tile, int ldt, int mr, int nr, float* c, int ldc, bool accumulate)
    {
        for (int r = 0; r < mr; r++)
        {
            float* dst = c + (long)r * ldc;
            float* src = tile + (long)r * ldt;
            if (accumulate) for (int j = 0; j < nr; j++) dst[j] += src[j];
            else for (int j = 0; j < nr; j++) dst[j] = src[j];
        }
    }
}
