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
// Micro-kernel choice (measured on the 2.5 GHz Cascade Lake target, one core):
//   * AVX-512: MR x NR = 8 x 48. 24 zmm accumulators + 3 B vectors + 1 broadcast = 28 of the 32 registers; each k step
//     issues 3 vector loads + 8 broadcasts for 24 FMAs, so it is FMA-bound (~145 GFLOP/s with data in L1, ~58 of the
//     64 flop/cycle peak). 8x32, 12x32, 14x32 and 6x64 reach the same in-cache speed; 8x48 wins on the real shapes
//     because 8 divides every channel count (32..2304: no row edges ever) and 48 fits the image widths: n = 576, 1152,
//     2304 are exact, 784 = 16x48 + 16, 196 = 4x48 + 4, 49 = 48 + 1. Column edges are split over 8x32 / 8x16 / 8x4 /
//     8x1 kernels instead of computing a zero-padded 8x48 tile (n = 49 runs ~17% faster than with 8x32 tiles).
//   * AVX2 fallback: 6 x 16 with ymm (12 accumulators + 2 B + 1 broadcast = 15 of 16 registers), the classic choice.
//   * Otherwise a 4 x 4 scalar kernel, so the code is correct everywhere.
//   The AVX-512 path is selected with Avx512F.IsSupported rather than Vector512.IsHardwareAccelerated: .NET reports
//   the latter as false on Skylake-X/Cascade Lake (frequency-licence heuristic), yet there the 512-bit kernel is
//   ~1.75x faster than the 256-bit one.
// Block sizes: KC = 128 keeps the B micro-panel (128 x 48 x 4 B = 24 KiB) resident in the 32 KiB L1 while the A
// panels stream past it (96..192 measured within 3%; 8x32 with KC = 192 was ~10% slower than with 128). MC = 1024
// bounds the packed A block at 512 KiB, half the 1 MiB L2. k is split into equal multiples of 16 (the transposing
// packers work in 16-step slices) rather than KC-sized blocks plus a runt.
//
// Threading: packing buffers are per thread ([ThreadStatic], 64-byte aligned native memory, grown on demand and freed
// when the thread dies), so concurrent calls from many threads with parallel=false are safe and allocation-free.
// parallel=true splits C into one column (or row) stripe per core: the caller computes one, dedicated background
// helper threads the others, and the caller takes over any stripe whose helper has not started by the time it is done
// (so a busy core costs nothing). No allocation per call. If another parallel call already owns the helpers, the call
// simply runs serially on the calling thread.

using System;
using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Threading;

namespace Ddpm.Kernels;

/// <summary>Single-precision GEMM on the managed CPU backend: C = A·B (+ C when accumulating), any strides.</summary>
public static unsafe class Gemm
{
    internal const int KC = 128;
    private const int MC = 1024;
    /// <summary>Below ~1 MFLOP (~10 µs) waking a helper costs as much as it saves (measured crossover ~0.5-1 MFLOP).</summary>
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
        if (Avx512F.IsSupported && Fma.IsSupported) Dispatch<Avx512Kernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
        else if (Fma.IsSupported) Dispatch<Avx2Kernel>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, parallel);
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

    private static void Dispatch<TK>(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate, bool parallel)
        where TK : struct, IMicroKernel
    {
        if (parallel && Environment.ProcessorCount > 1 && 2.0 * m * n * k >= MinParallelFlops
            && Workers.TryRun(&Serial<TK>, TK.MR, TK.NR, m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate))
            return;
        Serial<TK>(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate);
    }

    /// <summary>
    /// C[i*ldc + j] (=|+=) sum_p A(i,p)·B(p,j) with B(p,j) = b[rowOffsets[p] + j]: each row of B is a contiguous run
    /// that may start anywhere in b. This is the lowered matrix of an implicit-GEMM convolution, whose rows are
    /// shifted windows of one padded image, so B is packed straight from the image instead of from an im2col copy.
    /// Shapes: A [m,k] read as in <see cref="Multiply"/>, rowOffsets [k], C [m,n]; b[rowOffsets[p] .. + n) must be
    /// readable. Runs on the calling thread only (safe to call concurrently); allocation-free once warm.
    /// </summary>
    internal static void MultiplyRowOffsets(int m, int n, int k, float* a, int aRow, int aCol, float* b, int* rowOffsets, float* c, int ldc, bool accumulate,
        float* packedA = null)
    {
        if (Trivial(m, n, k, c, ldc, accumulate)) return;
        var src = new RowOffsetsB(b, rowOffsets);
        if (Avx512F.IsSupported && Fma.IsSupported) Serial<Avx512Kernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA);
        else if (Fma.IsSupported) Serial<Avx2Kernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA);
        else Serial<ScalarKernel, RowOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate, packedA);
    }

    /// <summary>Floats that <see cref="PackA"/> writes for an A of [m, k].</summary>
    internal static long PackedALength(int m, int k)
    {
        int mr = Avx512F.IsSupported && Fma.IsSupported ? Avx512Kernel.MR : Fma.IsSupported ? Avx2Kernel.MR : ScalarKernel.MR;
        return (long)RoundUp(m, mr) * k;
    }

    /// <summary>
    /// Packs all of A [m, k] (read as in <see cref="Multiply"/>) into dst (<see cref="PackedALength"/> floats), block by
    /// block in the order the driver reads them. A product whose A is the same for many calls (a convolution's weights,
    /// once per image) passes it as packedA and skips the per-call packing: for a 256-channel 7x7 layer that packing
    /// (2.4 MB of transposes per image) cost as much as a third of the multiply.
    /// </summary>
    internal static void PackA(int m, int k, float* a, int aRow, int aCol, float* dst)
    {
        if (Avx512F.IsSupported && Fma.IsSupported) PackAll<Avx512Kernel>(m, k, a, aRow, aCol, dst);
        else if (Fma.IsSupported) PackAll<Avx2Kernel>(m, k, a, aRow, aCol, dst);
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
        if (Avx512F.IsSupported && Fma.IsSupported) Serial<Avx512Kernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
        else if (Fma.IsSupported) Serial<Avx2Kernel, GroupedColumnOffsetsB>(m, n, k, a, aRow, aCol, src, c, ldc, accumulate);
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
    private static void Serial<TK, TB>(int m, int n, int k, float* a, int aRow, int aCol, TB b, float* c, int ldc, bool accumulate, float* packedA = null)
        where TK : struct, IMicroKernel
        where TB : struct, IBSource
    {
        int MR = TK.MR, NR = TK.NR;
        var (mcMax, kcMax) = Blocks<TK>(m, k);

        PackBuffers buf = t_buffers ??= new PackBuffers();
        float* ap = packedA != null ? null : buf.EnsureA((nuint)mcMax * (nuint)kcMax);
        float* bp = buf.EnsureB((nuint)NR * (nuint)kcMax);
        float* tile = stackalloc float[MR * NR];

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
                    b.Pack<TK>(pc, kc, jr, nr, bp);
                    float* cPanel = c + (long)ic * ldc + jr;
                    for (int ir = 0; ir < mc; ir += MR)
                    {
                        int mr = Math.Min(MR, mc - ir);
                        float* aPanel = ap + (long)ir * kc;
                        float* cTile = cPanel + (long)ir * ldc;
                        if (mr == MR && nr == NR)
                        {
                            TK.Run(kc, aPanel, bp, NR, cTile, ldc, acc);
                            continue;
                        }
                        TK.RunEdge(kc, aPanel, bp, mr, nr, cTile, ldc, acc, tile);
                    }
                }
            }
        }
    }

    private static int RoundUp(int x, int r) => (x + r - 1) / r * r;

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

    // ---------------------------------------------------------------------------------------------------------------
    // Packing
    // ---------------------------------------------------------------------------------------------------------------

    /// <summary>
    /// A block [mc x kc] into MR-row panels: panel q holds A(q*MR + r, p) at q*MR*kc + p*MR + r, rows past mc zeroed,
    /// so the kernel reads one contiguous MR-float column per k step.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackA<TK>(int mc, int kc, float* a, int aRow, int aCol, float* dst) where TK : struct, IMicroKernel
    {
        int MR = TK.MR;
        for (int i0 = 0; i0 < mc; i0 += MR)
        {
            int mr = Math.Min(MR, mc - i0);
            float* d = dst + (long)i0 * kc;
            float* s0 = a + (long)i0 * aRow;
            if (MR == 8 && mr == 8 && aCol == 1 && Avx512F.IsSupported)
            {
                // Row-major A (weights, dY): the panel is a transpose; do it 8x16 at a time in registers.
                int p0 = 0;
                for (; p0 + 16 <= kc; p0 += 16) Transpose8x16(s0 + p0, aRow, d + p0 * 8);
                for (int r = 0; r < 8; r++)
                {
                    float* s = s0 + (long)r * aRow;
                    for (int p = p0; p < kc; p++) d[p * 8 + r] = s[p];
                }
            }
            else if (MR == 8 && mr == 8 && aRow == 1 && Vector256.IsHardwareAccelerated)
            {
                // Column-major A (W^T): each panel column is already 8 contiguous floats.
                for (int p = 0; p < kc; p++) Vector256.Store(Vector256.Load(s0 + (long)p * aCol), d + p * 8);
            }
            else if (aCol == 1)
            {
                for (int r = 0; r < mr; r++)
                {
                    float* s = s0 + (long)r * aRow;
                    for (int p = 0; p < kc; p++) d[p * MR + r] = s[p];
                }
                for (int r = mr; r < MR; r++)
                    for (int p = 0; p < kc; p++) d[p * MR + r] = 0f;
            }
            else
            {
                for (int p = 0; p < kc; p++)
                {
                    float* s = s0 + (long)p * aCol;
                    float* dd = d + p * MR;
                    int r = 0;
                    for (; r < mr; r++) dd[r] = s[(long)r * aRow];
                    for (; r < MR; r++) dd[r] = 0f;
                }
            }
        }
    }

    /// <summary>One B micro-panel [kc x nr] (nr &lt;= NR) into dst[p*NR + j], columns nr..NR zeroed.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackB<TK>(int kc, int nr, float* b, int bRow, int bCol, float* dst) where TK : struct, IMicroKernel
    {
        int NR = TK.NR;
        if (bCol == 1 && nr == NR && NR % 16 == 0 && Avx512F.IsSupported)
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                for (int j = 0; j < NR; j += 16) Vector512.Store(Vector512.Load(s + j), d + j);
            }
        }
        else if (bCol == 1 && NR % 16 == 0 && Avx512F.IsSupported)
        {
            // Edge panel (n = 784 leaves 16 columns, 196 leaves 4).
            int nv = nr & ~15;
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nv; j += 16) Vector512.Store(Vector512.Load(s + j), d + j);
                for (; j < nr; j++) d[j] = s[j];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
        else if (bCol == 1 && nr == NR && NR % 8 == 0 && Vector256.IsHardwareAccelerated)
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                for (int j = 0; j < NR; j += 8) Vector256.Store(Vector256.Load(s + j), d + j);
            }
        }
        else if (bRow == 1 && NR % 16 == 0 && Avx512F.IsSupported)
        {
            // Transposed B (col^T, linear weights): 16x16 register transposes; each source column is read sequentially.
            int nFull = nr & ~15, kFull = kc & ~15;
            for (int p0 = 0; p0 < kFull; p0 += 16)
                for (int j0 = 0; j0 < nFull; j0 += 16)
                    Transpose16x16(b + (long)j0 * bCol + p0, bCol, dst + p0 * NR + j0, NR);
            for (int j = nFull; j < NR; j++)
            {
                float* s = b + (long)j * bCol;
                if (j < nr) for (int p = 0; p < kFull; p++) dst[p * NR + j] = s[p];
                else for (int p = 0; p < kFull; p++) dst[p * NR + j] = 0f;
            }
            for (int p = kFull; p < kc; p++)
            {
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nr; j++) d[j] = b[p + (long)j * bCol];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
        else
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nr; j++) d[j] = s[(long)j * bCol];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>Where the driver gets its B micro-panels from: a strided matrix, or rows/columns scattered in an image.</summary>
    private interface IBSource
    {
        /// <summary>dst[p*NR + j] = B(p0 + p, j0 + j) for p &lt; kc, j &lt; nr (nr &lt;= NR); columns nr..NR zeroed.</summary>
        void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel;
    }

    /// <summary>B(p,j) = b[p*bRow + j*bCol].</summary>
    private readonly struct StridedB(float* b, int bRow, int bCol) : IBSource
    {
        private readonly float* _b = b;
        private readonly int _bRow = bRow, _bCol = bCol;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
            => PackB<TK>(kc, nr, _b + (long)p0 * _bRow + (long)j0 * _bCol, _bRow, _bCol, dst);
    }

    /// <summary>B(p,j) = b[rowOffsets[p] + j]: each packed row is one contiguous (masked at the edge) copy.</summary>
    private readonly struct RowOffsetsB(float* b, int* rowOffsets) : IBSource
    {
        private readonly float* _b = b;
        private readonly int* _off = rowOffsets;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            int NR = TK.NR;
            int* off = _off + p0;
            float* b = _b + j0;
            if (NR == 48 && Avx512F.IsSupported)
            {
                if (nr == 48)
                {
                    for (int p = 0; p < kc; p++)
                    {
                        float* s = b + off[p];
                        float* d = dst + p * 48;
                        Vector512.Store(Vector512.Load(s), d);
                        Vector512.Store(Vector512.Load(s + 16), d + 16);
                        Vector512.Store(Vector512.Load(s + 32), d + 32);
                    }
                    return;
                }
                // Edge panel: masked loads read nothing past column nr - 1 and fill the rest with zeros.
                Vector512<int> lane = Vector512<int>.Indices, width = Vector512.Create(nr);
                Vector512<float> m0 = Vector512.LessThan(lane, width).AsSingle();
                Vector512<float> m1 = Vector512.LessThan(lane + Vector512.Create(16), width).AsSingle();
                Vector512<float> m2 = Vector512.LessThan(lane + Vector512.Create(32), width).AsSingle();
                for (int p = 0; p < kc; p++)
                {
                    float* s = b + off[p];
                    float* d = dst + p * 48;
                    Vector512.Store(Avx512F.MaskLoad(s, m0, Vector512<float>.Zero), d);
                    Vector512.Store(Avx512F.MaskLoad(s + 16, m1, Vector512<float>.Zero), d + 16);
                    Vector512.Store(Avx512F.MaskLoad(s + 32, m2, Vector512<float>.Zero), d + 32);
                }
                return;
            }
            for (int p = 0; p < kc; p++)
            {
                float* s = b + off[p];
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nr; j++) d[j] = s[j];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>B(p,j) = b[columnOffsets[j] + p]: 16x16 register transposes of 16 contiguous column runs.</summary>
    private readonly struct ColumnOffsetsB(float* b, int* columnOffsets) : IBSource
    {
        private readonly float* _b = b;
        private readonly int* _off = columnOffsets;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            int NR = TK.NR;
            int* off = _off + j0;
            float* b = _b + p0;
            int jv = 0;
            if (NR % 16 == 0 && Avx512F.IsSupported)
            {
                int kFull = kc & ~15;
                for (; jv + 16 <= nr; jv += 16)
                    for (int p = 0; p < kFull; p += 16)
                        TransposeGather16x16(b + p, off + jv, dst + p * NR + jv, NR);
                for (int p = kFull; p < kc; p++)
                {
                    float* d = dst + p * NR;
                    for (int j = 0; j < jv; j++) d[j] = b[off[j] + p];
                }
            }
            for (int p = 0; p < kc; p++)
            {
                float* d = dst + p * NR;
                int j = jv;
                for (; j < nr; j++) d[j] = b[off[j] + p];
                if (NR % 16 == 0 && Avx512F.IsSupported)
                {
                    // Narrow panels (C·R·S = 9 for a one-channel input) are mostly zero padding.
                    for (; (j & 15) != 0; j++) d[j] = 0f;
                    for (; j < NR; j += 16) Vector512.Store(Vector512<float>.Zero, d + j);
                }
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>
    /// Column offsets over groups: rows [i·kPerGroup, (i+1)·kPerGroup) of B are the column-offset matrix of the block
    /// b + i·groupStride (several images' lowered matrices stacked along the reduction). A packing slice never straddles
    /// two groups when kPerGroup is a multiple of 16.
    /// </summary>
    private readonly struct GroupedColumnOffsetsB(float* b, int* columnOffsets, long groupStride, int kPerGroup) : IBSource
    {
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            for (int p = p0; p < p0 + kc;)
            {
                int i = p / kPerGroup, end = Math.Min(p0 + kc, (i + 1) * kPerGroup);
                // Group i's B(p, j) = b[i·groupStride + off[j] + p - i·kPerGroup].
                new ColumnOffsetsB(b + i * (groupStride - kPerGroup), columnOffsets).Pack<TK>(p, end - p, j0, nr, dst + (long)(p - p0) * TK.NR);
                p = end;
            }
        }
    }

    /// <summary>dst[q*ldd + r] = src[r*lds + q] for a 16x16 block (4 shuffle stages, 64 shuffles).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose16x16(float* src, int lds, float* dst, int ldd) => Transpose16x16(new StridedRows(src, lds), dst, ldd);

    /// <summary>dst[q*ldd + r] = src[offsets[r] + q] for r, q &lt; 16: the same transpose of 16 scattered rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TransposeGather16x16(float* src, int* offsets, float* dst, int ldd) => Transpose16x16(new OffsetRows(src, offsets), dst, ldd);

    /// <summary>Where the 16 rows of a register transpose start. A struct type argument, so every use is inlined: the
    /// transpose must compile as one optimised method (16 vector arguments would exceed the JIT's inlining limit).</summary>
    private interface IRows
    {
        float* Row(int i);
    }

    private readonly struct StridedRows(float* src, int lds) : IRows
    {
        private readonly float* _src = src;
        private readonly int _lds = lds;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float* Row(int i) => _src + (long)i * _lds;
    }

    private readonly struct OffsetRows(float* src, int* offsets) : IRows
    {
        private readonly float* _src = src;
        private readonly int* _offsets = offsets;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float* Row(int i) => _src + _offsets[i];
    }

    /// <summary>dst[q*ldd + r] = rows.Row(r)[q] for r, q &lt; 16.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose16x16<TRows>(TRows rows, float* dst, int ldd) where TRows : struct, IRows
    {
        Vector512<float> r0 = Vector512.Load(rows.Row(0)), r1 = Vector512.Load(rows.Row(1)), r2 = Vector512.Load(rows.Row(2)), r3 = Vector512.Load(rows.Row(3));
        Vector512<float> r4 = Vector512.Load(rows.Row(4)), r5 = Vector512.Load(rows.Row(5)), r6 = Vector512.Load(rows.Row(6)), r7 = Vector512.Load(rows.Row(7));
        Vector512<float> r8 = Vector512.Load(rows.Row(8)), r9 = Vector512.Load(rows.Row(9)), r10 = Vector512.Load(rows.Row(10)), r11 = Vector512.Load(rows.Row(11));
        Vector512<float> r12 = Vector512.Load(rows.Row(12)), r13 = Vector512.Load(rows.Row(13)), r14 = Vector512.Load(rows.Row(14)), r15 = Vector512.Load(rows.Row(15));
        Vector512<float> t0 = Avx512F.UnpackLow(r0, r1), t1 = Avx512F.UnpackHigh(r0, r1), t2 = Avx512F.UnpackLow(r2, r3), t3 = Avx512F.UnpackHigh(r2, r3);
        Vector512<float> t4 = Avx512F.UnpackLow(r4, r5), t5 = Avx512F.UnpackHigh(r4, r5), t6 = Avx512F.UnpackLow(r6, r7), t7 = Avx512F.UnpackHigh(r6, r7);
        Vector512<float> t8 = Avx512F.UnpackLow(r8, r9), t9 = Avx512F.UnpackHigh(r8, r9), t10 = Avx512F.UnpackLow(r10, r11), t11 = Avx512F.UnpackHigh(r10, r11);
        Vector512<float> t12 = Avx512F.UnpackLow(r12, r13), t13 = Avx512F.UnpackHigh(r12, r13), t14 = Avx512F.UnpackLow(r14, r15), t15 = Avx512F.UnpackHigh(r14, r15);
        // After this stage, 128-bit lane L of u(4g+q) holds rows 4g..4g+3 of column 4L+q.
        Vector512<float> u0 = Lo64(t0, t2), u1 = Hi64(t0, t2), u2 = Lo64(t1, t3), u3 = Hi64(t1, t3);
        Vector512<float> u4 = Lo64(t4, t6), u5 = Hi64(t4, t6), u6 = Lo64(t5, t7), u7 = Hi64(t5, t7);
        Vector512<float> u8 = Lo64(t8, t10), u9 = Hi64(t8, t10), u10 = Lo64(t9, t11), u11 = Hi64(t9, t11);
        Vector512<float> u12 = Lo64(t12, t14), u13 = Hi64(t12, t14), u14 = Lo64(t13, t15), u15 = Hi64(t13, t15);
        // 0x88 picks lanes {0,2} of each source, 0xDD lanes {1,3}: two rounds assemble whole columns.
        Vector512<float> v0 = Avx512F.Shuffle4x128(u0, u4, 0x88), v1 = Avx512F.Shuffle4x128(u0, u4, 0xDD);
        Vector512<float> v2 = Avx512F.Shuffle4x128(u1, u5, 0x88), v3 = Avx512F.Shuffle4x128(u1, u5, 0xDD);
        Vector512<float> v4 = Avx512F.Shuffle4x128(u2, u6, 0x88), v5 = Avx512F.Shuffle4x128(u2, u6, 0xDD);
        Vector512<float> v6 = Avx512F.Shuffle4x128(u3, u7, 0x88), v7 = Avx512F.Shuffle4x128(u3, u7, 0xDD);
        Vector512<float> v8 = Avx512F.Shuffle4x128(u8, u12, 0x88), v9 = Avx512F.Shuffle4x128(u8, u12, 0xDD);
        Vector512<float> v10 = Avx512F.Shuffle4x128(u9, u13, 0x88), v11 = Avx512F.Shuffle4x128(u9, u13, 0xDD);
        Vector512<float> v12 = Avx512F.Shuffle4x128(u10, u14, 0x88), v13 = Avx512F.Shuffle4x128(u10, u14, 0xDD);
        Vector512<float> v14 = Avx512F.Shuffle4x128(u11, u15, 0x88), v15 = Avx512F.Shuffle4x128(u11, u15, 0xDD);
        Vector512.Store(Avx512F.Shuffle4x128(v0, v8, 0x88), dst);
        Vector512.Store(Avx512F.Shuffle4x128(v2, v10, 0x88), dst + 1L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v4, v12, 0x88), dst + 2L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v6, v14, 0x88), dst + 3L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v1, v9, 0x88), dst + 4L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v3, v11, 0x88), dst + 5L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v5, v13, 0x88), dst + 6L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v7, v15, 0x88), dst + 7L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v0, v8, 0xDD), dst + 8L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v2, v10, 0xDD), dst + 9L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v4, v12, 0xDD), dst + 10L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v6, v14, 0xDD), dst + 11L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v1, v9, 0xDD), dst + 12L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v3, v11, 0xDD), dst + 13L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v5, v13, 0xDD), dst + 14L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v7, v15, 0xDD), dst + 15L * ldd);
    }

    /// <summary>dst[p*8 + r] = src[r*lds + p] for r &lt; 8, p &lt; 16: one 16-step slice of an 8-row A panel.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose8x16(float* src, int lds, float* dst)
    {
        Vector512<float> r0 = Vector512.Load(src), r1 = Vector512.Load(src + lds), r2 = Vector512.Load(src + 2L * lds), r3 = Vector512.Load(src + 3L * lds);
        Vector512<float> r4 = Vector512.Load(src + 4L * lds), r5 = Vector512.Load(src + 5L * lds), r6 = Vector512.Load(src + 6L * lds), r7 = Vector512.Load(src + 7L * lds);
        Vector512<float> t0 = Avx512F.UnpackLow(r0, r1), t1 = Avx512F.UnpackHigh(r0, r1), t2 = Avx512F.UnpackLow(r2, r3), t3 = Avx512F.UnpackHigh(r2, r3);
        Vector512<float> t4 = Avx512F.UnpackLow(r4, r5), t5 = Avx512F.UnpackHigh(r4, r5), t6 = Avx512F.UnpackLow(r6, r7), t7 = Avx512F.UnpackHigh(r6, r7);
        // Lane L of u(q) holds rows 0..3 of column 4L+q; u(4+q) the same for rows 4..7.
        Vector512<double> u0 = Lo64(t0, t2).AsDouble(), u1 = Hi64(t0, t2).AsDouble(), u2 = Lo64(t1, t3).AsDouble(), u3 = Hi64(t1, t3).AsDouble();
        Vector512<double> u4 = Lo64(t4, t6).AsDouble(), u5 = Hi64(t4, t6).AsDouble(), u6 = Lo64(t5, t7).AsDouble(), u7 = Hi64(t5, t7).AsDouble();
        // Interleave the two row halves lane by lane: the lower 256 bits become one full column, the upper another.
        Vector512<long> lo = Vector512.Create(0L, 1, 8, 9, 2, 3, 10, 11), hi = Vector512.Create(4L, 5, 12, 13, 6, 7, 14, 15);
        StoreHalves(Avx512F.PermuteVar8x64x2(u0, lo, u4), dst + 0 * 8, dst + 4 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u0, hi, u4), dst + 8 * 8, dst + 12 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u1, lo, u5), dst + 1 * 8, dst + 5 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u1, hi, u5), dst + 9 * 8, dst + 13 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u2, lo, u6), dst + 2 * 8, dst + 6 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u2, hi, u6), dst + 10 * 8, dst + 14 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u3, lo, u7), dst + 3 * 8, dst + 7 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u3, hi, u7), dst + 11 * 8, dst + 15 * 8);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreHalves(Vector512<double> v, float* lower, float* upper)
    {
        Vector256.Store(v.GetLower().AsSingle(), lower);
        Vector256.Store(v.GetUpper().AsSingle(), upper);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Lo64(Vector512<float> x, Vector512<float> y) => Avx512F.UnpackLow(x.AsDouble(), y.AsDouble()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Hi64(Vector512<float> x, Vector512<float> y) => Avx512F.UnpackHigh(x.AsDouble(), y.AsDouble()).AsSingle();

    /// <summary>Per-thread packing buffers; the finalizer returns the native memory once the owning thread is gone.</summary>
    private sealed class PackBuffers
    {
        private float* _a, _b;
        private nuint _aCap, _bCap;

        public float* EnsureA(nuint floats) => Ensure(ref _a, ref _aCap, floats);
        public float* EnsureB(nuint floats) => Ensure(ref _b, ref _bCap, floats);

        private static float* Ensure(ref float* p, ref nuint cap, nuint floats)
        {
            if (floats > cap)
            {
                NativeMemory.AlignedFree(p);
                p = null;
                cap = 0;
                // 64-byte alignment: packed B rows are whole cache lines, so the kernel's zmm loads never split lines.
                p = (float*)NativeMemory.AlignedAlloc(floats * sizeof(float), 64);
                cap = floats;
            }
            return p;
        }

        ~PackBuffers()
        {
            NativeMemory.AlignedFree(_a);
            NativeMemory.AlignedFree(_b);
        }
    }

    [ThreadStatic] private static PackBuffers? t_buffers;

    // ---------------------------------------------------------------------------------------------------------------
    // Micro-kernels. Static abstract members on struct type arguments make every driver instantiation a specialised
    // copy with MR/NR as JIT-time constants and direct (inlinable) kernel calls.
    // ---------------------------------------------------------------------------------------------------------------

    private interface IMicroKernel
    {
        static abstract int MR { get; }
        static abstract int NR { get; }

        /// <summary>
        /// C[0..MR, 0..NR) (=|+=) Apanel·Bpanel over kc steps. a: packed A panel (MR floats per step); b: B rows of NR
        /// floats, ldb apart.
        /// </summary>
        static abstract void Run(int kc, float* a, float* b, int ldb, float* c, int ldc, bool accumulate);

        /// <summary>
        /// Edge tile: C[0..mr, 0..nr) (=|+=) the product of a packed A panel and a packed (zero-padded, ld NR) B panel,
        /// touching nothing outside that window. tile: MR x NR floats of scratch.
        /// </summary>
        static abstract void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile);
    }

    private struct Avx512Kernel : IMicroKernel
    {
        public static int MR => 8;
        public static int NR => 48;

        /// <summary>The 8x48 kernel: 24 zmm accumulators + 3 B vectors + 1 broadcast = 28 of the 32 registers.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run(int kc, float* a, float* b, int ldb, float* c, int ldc, bool accumulate)
        {
            Vector512<float> c00 = default, c01 = default, c02 = default;
            Vector512<float> c10 = default, c11 = default, c12 = default;
            Vector512<float> c20 = default, c21 = default, c22 = default;
            Vector512<float> c30 = default, c31 = default, c32 = default;
            Vector512<float> c40 = default, c41 = default, c42 = default;
            Vector512<float> c50 = default, c51 = default, c52 = default;
            Vector512<float> c60 = default, c61 = default, c62 = default;
            Vector512<float> c70 = default, c71 = default, c72 = default;
            for (; kc > 0; kc--)
            {
                Vector512<float> b0 = Vector512.Load(b), b1 = Vector512.Load(b + 16), b2 = Vector512.Load(b + 32);
                Vector512<float> a0 = Vector512.Create(a[0]);
                c00 = Avx512F.FusedMultiplyAdd(a0, b0, c00); c01 = Avx512F.FusedMultiplyAdd(a0, b1, c01); c02 = Avx512F.FusedMultiplyAdd(a0, b2, c02);
                Vector512<float> a1 = Vector512.Create(a[1]);
                c10 = Avx512F.FusedMultiplyAdd(a1, b0, c10); c11 = Avx512F.FusedMultiplyAdd(a1, b1, c11); c12 = Avx512F.FusedMultiplyAdd(a1, b2, c12);
                Vector512<float> a2 = Vector512.Create(a[2]);
                c20 = Avx512F.FusedMultiplyAdd(a2, b0, c20); c21 = Avx512F.FusedMultiplyAdd(a2, b1, c21); c22 = Avx512F.FusedMultiplyAdd(a2, b2, c22);
                Vector512<float> a3 = Vector512.Create(a[3]);
                c30 = Avx512F.FusedMultiplyAdd(a3, b0, c30); c31 = Avx512F.FusedMultiplyAdd(a3, b1, c31); c32 = Avx512F.FusedMultiplyAdd(a3, b2, c32);
                Vector512<float> a4 = Vector512.Create(a[4]);
                c40 = Avx512F.FusedMultiplyAdd(a4, b0, c40); c41 = Avx512F.FusedMultiplyAdd(a4, b1, c41); c42 = Avx512F.FusedMultiplyAdd(a4, b2, c42);
                Vector512<float> a5 = Vector512.Create(a[5]);
                c50 = Avx512F.FusedMultiplyAdd(a5, b0, c50); c51 = Avx512F.FusedMultiplyAdd(a5, b1, c51); c52 = Avx512F.FusedMultiplyAdd(a5, b2, c52);
                Vector512<float> a6 = Vector512.Create(a[6]);
                c60 = Avx512F.FusedMultiplyAdd(a6, b0, c60); c61 = Avx512F.FusedMultiplyAdd(a6, b1, c61); c62 = Avx512F.FusedMultiplyAdd(a6, b2, c62);
                Vector512<float> a7 = Vector512.Create(a[7]);
                c70 = Avx512F.FusedMultiplyAdd(a7, b0, c70); c71 = Avx512F.FusedMultiplyAdd(a7, b1, c71); c72 = Avx512F.FusedMultiplyAdd(a7, b2, c72);
                a += 8;
                b += ldb;
            }
            StoreRow3(c00, c01, c02, c, accumulate); c += ldc;
            StoreRow3(c10, c11, c12, c, accumulate); c += ldc;
            StoreRow3(c20, c21, c22, c, accumulate); c += ldc;
            StoreRow3(c30, c31, c32, c, accumulate); c += ldc;
            StoreRow3(c40, c41, c42, c, accumulate); c += ldc;
            StoreRow3(c50, c51, c52, c, accumulate); c += ldc;
            StoreRow3(c60, c61, c62, c, accumulate); c += ldc;
            StoreRow3(c70, c71, c72, c, accumulate);
        }

        /// <summary>8x32 tile of a 48-wide packed panel (edge panels of 33..36 columns).</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run32(int kc, float* a, float* b, float* c, int ldc, bool accumulate)
        {
            Vector512<float> c00 = default, c01 = default, c10 = default, c11 = default;
            Vector512<float> c20 = default, c21 = default, c30 = default, c31 = default;
            Vector512<float> c40 = default, c41 = default, c50 = default, c51 = default;
            Vector512<float> c60 = default, c61 = default, c70 = default, c71 = default;
            for (; kc > 0; kc--)
            {
                Vector512<float> b0 = Vector512.Load(b), b1 = Vector512.Load(b + 16);
                Vector512<float> a0 = Vector512.Create(a[0]);
                c00 = Avx512F.FusedMultiplyAdd(a0, b0, c00); c01 = Avx512F.FusedMultiplyAdd(a0, b1, c01);
                Vector512<float> a1 = Vector512.Create(a[1]);
                c10 = Avx512F.FusedMultiplyAdd(a1, b0, c10); c11 = Avx512F.FusedMultiplyAdd(a1, b1, c11);
                Vector512<float> a2 = Vector512.Create(a[2]);
                c20 = Avx512F.FusedMultiplyAdd(a2, b0, c20); c21 = Avx512F.FusedMultiplyAdd(a2, b1, c21);
                Vector512<float> a3 = Vector512.Create(a[3]);
                c30 = Avx512F.FusedMultiplyAdd(a3, b0, c30); c31 = Avx512F.FusedMultiplyAdd(a3, b1, c31);
                Vector512<float> a4 = Vector512.Create(a[4]);
                c40 = Avx512F.FusedMultiplyAdd(a4, b0, c40); c41 = Avx512F.FusedMultiplyAdd(a4, b1, c41);
                Vector512<float> a5 = Vector512.Create(a[5]);
                c50 = Avx512F.FusedMultiplyAdd(a5, b0, c50); c51 = Avx512F.FusedMultiplyAdd(a5, b1, c51);
                Vector512<float> a6 = Vector512.Create(a[6]);
                c60 = Avx512F.FusedMultiplyAdd(a6, b0, c60); c61 = Avx512F.FusedMultiplyAdd(a6, b1, c61);
                Vector512<float> a7 = Vector512.Create(a[7]);
                c70 = Avx512F.FusedMultiplyAdd(a7, b0, c70); c71 = Avx512F.FusedMultiplyAdd(a7, b1, c71);
                a += 8;
                b += 48;
            }
            StoreRow2(c00, c01, c, accumulate); c += ldc;
            StoreRow2(c10, c11, c, accumulate); c += ldc;
            StoreRow2(c20, c21, c, accumulate); c += ldc;
            StoreRow2(c30, c31, c, accumulate); c += ldc;
            StoreRow2(c40, c41, c, accumulate); c += ldc;
            StoreRow2(c50, c51, c, accumulate); c += ldc;
            StoreRow2(c60, c61, c, accumulate); c += ldc;
            StoreRow2(c70, c71, c, accumulate);
        }

        /// <summary>8x16 tile of a 48-wide packed panel.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run16(int kc, float* a, float* b, float* c, int ldc, bool accumulate)
        {
            Vector512<float> c00 = default, c10 = default;
            Vector512<float> c20 = default, c30 = default;
            Vector512<float> c40 = default, c50 = default;
            Vector512<float> c60 = default, c70 = default;
            for (; kc > 0; kc--)
            {
                Vector512<float> b0 = Vector512.Load(b);
                Vector512<float> a0 = Vector512.Create(a[0]);
                c00 = Avx512F.FusedMultiplyAdd(a0, b0, c00);
                Vector512<float> a1 = Vector512.Create(a[1]);
                c10 = Avx512F.FusedMultiplyAdd(a1, b0, c10);
                Vector512<float> a2 = Vector512.Create(a[2]);
                c20 = Avx512F.FusedMultiplyAdd(a2, b0, c20);
                Vector512<float> a3 = Vector512.Create(a[3]);
                c30 = Avx512F.FusedMultiplyAdd(a3, b0, c30);
                Vector512<float> a4 = Vector512.Create(a[4]);
                c40 = Avx512F.FusedMultiplyAdd(a4, b0, c40);
                Vector512<float> a5 = Vector512.Create(a[5]);
                c50 = Avx512F.FusedMultiplyAdd(a5, b0, c50);
                Vector512<float> a6 = Vector512.Create(a[6]);
                c60 = Avx512F.FusedMultiplyAdd(a6, b0, c60);
                Vector512<float> a7 = Vector512.Create(a[7]);
                c70 = Avx512F.FusedMultiplyAdd(a7, b0, c70);
                a += 8;
                b += 48;
            }
            StoreRow1(c00, c, accumulate); c += ldc;
            StoreRow1(c10, c, accumulate); c += ldc;
            StoreRow1(c20, c, accumulate); c += ldc;
            StoreRow1(c30, c, accumulate); c += ldc;
            StoreRow1(c40, c, accumulate); c += ldc;
            StoreRow1(c50, c, accumulate); c += ldc;
            StoreRow1(c60, c, accumulate); c += ldc;
            StoreRow1(c70, c, accumulate);
        }


        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow3(Vector512<float> x0, Vector512<float> x1, Vector512<float> x2, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector512.Load(c);
                x1 += Vector512.Load(c + 16);
                x2 += Vector512.Load(c + 32);
            }
            Vector512.Store(x0, c);
            Vector512.Store(x1, c + 16);
            Vector512.Store(x2, c + 32);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow2(Vector512<float> x0, Vector512<float> x1, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector512.Load(c);
                x1 += Vector512.Load(c + 16);
            }
            Vector512.Store(x0, c);
            Vector512.Store(x1, c + 16);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow1(Vector512<float> x0, float* c, bool accumulate)
        {
            if (accumulate) x0 += Vector512.Load(c);
            Vector512.Store(x0, c);
        }

        /// <summary>
        /// Column edges are split into the cheapest set of narrower kernels instead of padding to 48 (cost per k step,
        /// in cycles: 8x48 = 12, 8x32 = 8, 8x16 = 4.5, 8x4 = 2.5, 8x1 = 1), e.g. n = 784 = 16x48 + 16 and
        /// n = 49 = 48 + 1 waste nothing. Exact-width pieces write straight into C; partial rows go through the tile.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        {
            if (nr > 36)
            {
                Run(kc, a, b, 48, tile, 48, false);
                CopyTile(tile, 48, mr, nr, c, ldc, accumulate);
                return;
            }
            bool direct = mr == 8;
            float* d = direct ? c : tile;
            int ldd = direct ? ldc : 48;
            bool accd = direct && accumulate;
            int j = 0;
            if (nr >= 32) { Run32(kc, a, b, d, ldd, accd); j = 32; }
            if (nr - j >= 16) { Run16(kc, a, b + j, d + j, ldd, accd); j += 16; }
            int rem = nr - j;
            if (rem > 4)
            {
                Run16(kc, a, b + j, tile + j, 48, false);
                if (direct) CopyTile(tile + j, 48, 8, rem, c + j, ldc, accumulate);
            }
            else if (rem > 1) Run4(kc, a, b + j, rem, d + j, ldd, accd);
            else if (rem == 1) Run1(kc, a, b + j, d + j, ldd, accd);
            if (!direct) CopyTile(tile, 48, mr, nr, c, ldc, accumulate);
        }

        /// <summary>
        /// 8 x w (w &lt;= 4) tile vectorised down the 8 rows instead of across columns: a packed A step is one ymm, each
        /// B element a broadcast. Two k steps per iteration give 8 independent FMA chains to hide the FMA latency.
        /// Always reads 4 columns (the packed panel is 48 wide and zero-padded) but writes only w.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run4(int kc, float* a, float* b, int w, float* c, int ldc, bool accumulate)
        {
            Vector256<float> x0 = default, x1 = default, x2 = default, x3 = default;
            Vector256<float> y0 = default, y1 = default, y2 = default, y3 = default;
            for (; kc >= 2; kc -= 2)
            {
                Vector256<float> a0 = Vector256.Load(a), a1 = Vector256.Load(a + 8);
                x0 = Fma.MultiplyAdd(a0, Vector256.Create(b[0]), x0);
                x1 = Fma.MultiplyAdd(a0, Vector256.Create(b[1]), x1);
                x2 = Fma.MultiplyAdd(a0, Vector256.Create(b[2]), x2);
                x3 = Fma.MultiplyAdd(a0, Vector256.Create(b[3]), x3);
                y0 = Fma.MultiplyAdd(a1, Vector256.Create(b[48]), y0);
                y1 = Fma.MultiplyAdd(a1, Vector256.Create(b[49]), y1);
                y2 = Fma.MultiplyAdd(a1, Vector256.Create(b[50]), y2);
                y3 = Fma.MultiplyAdd(a1, Vector256.Create(b[51]), y3);
                a += 16;
                b += 96;
            }
            if (kc > 0)
            {
                Vector256<float> a0 = Vector256.Load(a);
                x0 = Fma.MultiplyAdd(a0, Vector256.Create(b[0]), x0);
                x1 = Fma.MultiplyAdd(a0, Vector256.Create(b[1]), x1);
                x2 = Fma.MultiplyAdd(a0, Vector256.Create(b[2]), x2);
                x3 = Fma.MultiplyAdd(a0, Vector256.Create(b[3]), x3);
            }
            float* cols = stackalloc float[32];
            Vector256.Store(x0 + y0, cols);
            Vector256.Store(x1 + y1, cols + 8);
            Vector256.Store(x2 + y2, cols + 16);
            Vector256.Store(x3 + y3, cols + 24);
            for (int j = 0; j < w; j++) StoreColumn(cols + 8 * j, c + j, ldc, accumulate);
        }

        /// <summary>8 x 1 tile (n = 49 leaves one column): four k steps per iteration for four independent chains.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run1(int kc, float* a, float* b, float* c, int ldc, bool accumulate)
        {
            Vector256<float> x0 = default, x1 = default, x2 = default, x3 = default;
            for (; kc >= 4; kc -= 4)
            {
                x0 = Fma.MultiplyAdd(Vector256.Load(a), Vector256.Create(b[0]), x0);
                x1 = Fma.MultiplyAdd(Vector256.Load(a + 8), Vector256.Create(b[48]), x1);
                x2 = Fma.MultiplyAdd(Vector256.Load(a + 16), Vector256.Create(b[96]), x2);
                x3 = Fma.MultiplyAdd(Vector256.Load(a + 24), Vector256.Create(b[144]), x3);
                a += 32;
                b += 192;
            }
            for (; kc > 0; kc--)
            {
                x0 = Fma.MultiplyAdd(Vector256.Load(a), Vector256.Create(b[0]), x0);
                a += 8;
                b += 48;
            }
            float* col = stackalloc float[8];
            Vector256.Store((x0 + x1) + (x2 + x3), col);
            StoreColumn(col, c, ldc, accumulate);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreColumn(float* col, float* c, int ldc, bool accumulate)
        {
            if (accumulate) for (int r = 0; r < 8; r++) c[(long)r * ldc] += col[r];
            else for (int r = 0; r < 8; r++) c[(long)r * ldc] = col[r];
        }
    }

    private struct Avx2Kernel : IMicroKernel
    {
        public static int MR => 6;
        public static int NR => 16;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run(int kc, float* a, float* b, int ldb, float* c, int ldc, bool accumulate)
        {
            Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default;
            Vector256<float> c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
            for (; kc > 0; kc--)
            {
                Vector256<float> b0 = Vector256.Load(b), b1 = Vector256.Load(b + 8);
                Vector256<float> a0 = Vector256.Create(a[0]);
                c00 = Fma.MultiplyAdd(a0, b0, c00); c01 = Fma.MultiplyAdd(a0, b1, c01);
                Vector256<float> a1 = Vector256.Create(a[1]);
                c10 = Fma.MultiplyAdd(a1, b0, c10); c11 = Fma.MultiplyAdd(a1, b1, c11);
                Vector256<float> a2 = Vector256.Create(a[2]);
                c20 = Fma.MultiplyAdd(a2, b0, c20); c21 = Fma.MultiplyAdd(a2, b1, c21);
                Vector256<float> a3 = Vector256.Create(a[3]);
                c30 = Fma.MultiplyAdd(a3, b0, c30); c31 = Fma.MultiplyAdd(a3, b1, c31);
                Vector256<float> a4 = Vector256.Create(a[4]);
                c40 = Fma.MultiplyAdd(a4, b0, c40); c41 = Fma.MultiplyAdd(a4, b1, c41);
                Vector256<float> a5 = Vector256.Create(a[5]);
                c50 = Fma.MultiplyAdd(a5, b0, c50); c51 = Fma.MultiplyAdd(a5, b1, c51);
                a += 6;
                b += ldb;
            }
            StoreRow(c00, c01, c, accumulate); c += ldc;
            StoreRow(c10, c11, c, accumulate); c += ldc;
            StoreRow(c20, c21, c, accumulate); c += ldc;
            StoreRow(c30, c31, c, accumulate); c += ldc;
            StoreRow(c40, c41, c, accumulate); c += ldc;
            StoreRow(c50, c51, c, accumulate);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow(Vector256<float> x0, Vector256<float> x1, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector256.Load(c);
                x1 += Vector256.Load(c + 8);
            }
            Vector256.Store(x0, c);
            Vector256.Store(x1, c + 8);
        }

        public static void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        {
            Run(kc, a, b, 16, tile, 16, false);
            CopyTile(tile, 16, mr, nr, c, ldc, accumulate);
        }
    }

    private struct ScalarKernel : IMicroKernel
    {
        public static int MR => 4;
        public static int NR => 4;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run(int kc, float* a, float* b, int ldb, float* c, int ldc, bool accumulate)
        {
            float c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
            float c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
            for (; kc > 0; kc--)
            {
                float b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
                float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
                c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
                c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
                c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
                a += 4;
                b += ldb;
            }
            StoreRow(c00, c01, c02, c03, c, accumulate); c += ldc;
            StoreRow(c10, c11, c12, c13, c, accumulate); c += ldc;
            StoreRow(c20, c21, c22, c23, c, accumulate); c += ldc;
            StoreRow(c30, c31, c32, c33, c, accumulate);
        }

        private static void StoreRow(float x0, float x1, float x2, float x3, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += c[0]; x1 += c[1]; x2 += c[2]; x3 += c[3];
            }
            c[0] = x0; c[1] = x1; c[2] = x2; c[3] = x3;
        }

        public static void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        {
            Run(kc, a, b, 4, tile, 4, false);
            CopyTile(tile, 4, mr, nr, c, ldc, accumulate);
        }
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Parallel split: dedicated helper threads instead of Parallel.For, so a parallel call allocates nothing and wakes
    // exactly the threads it needs. One job at a time; a concurrent parallel caller falls back to running serially.
    // ---------------------------------------------------------------------------------------------------------------

    private static class Workers
    {
        // Helper state machine: the caller moves Finished -> Signaled before waking a helper; the helper claims its
        // part with Signaled -> Running and ends with Running -> Finished. A caller that finishes its own part first
        // steals any part whose helper has not woken yet (Signaled -> Finished), so a descheduled helper never
        // stalls the call; the helper then finds its wake-up stale and goes back to sleep.
        private const int Signaled = 1, Running = 2, Finished = 3;

        private sealed class Helper
        {
            public readonly SemaphoreSlim Wake = new(0);
            public int State = Finished;
        }

        private static int s_busy;
        private static Helper[]? s_helpers;
        private static Exception? s_error;

        // The current job, written by the owner of s_busy before it signals the helpers.
        private static delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> s_fn;
        private static int s_m, s_n, s_k, s_aRow, s_aCol, s_bRow, s_bCol, s_ldc, s_per;
        private static float* s_a, s_b, s_c;
        private static bool s_acc, s_splitColumns;

        public static bool TryRun(delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> fn, int mr, int nr,
            int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
        {
            if (Interlocked.CompareExchange(ref s_busy, 1, 0) != 0) return false;
            try
            {
                Helper[] helpers = EnsureHelpers(Environment.ProcessorCount - 1);
                int workers = helpers.Length + 1;
                // Stripes are whole panels, so the split creates no new edge tiles. Column stripes each pack all of A
                // (small: weights) and their own part of B (large: im2col); row stripes each pack all of B. So prefer
                // columns unless rows balance clearly better (n = 196: 3 + 2 panels vs 64 + 64 rows; n = 49: 48 + 1).
                int nTiles = (n + nr - 1) / nr, mTiles = (m + mr - 1) / mr;
                int perCol = (nTiles + workers - 1) / workers * nr, perRow = (mTiles + workers - 1) / workers * mr;
                bool splitColumns = (double)Math.Min(perCol, n) / n <= 1.15 * Math.Min(perRow, m) / m;
                int per = splitColumns ? perCol : perRow;
                int parts = splitColumns ? (n + per - 1) / per : (m + per - 1) / per;
                if (parts < 2) return false;
                s_fn = fn;
                s_m = m; s_n = n; s_k = k; s_a = a; s_aRow = aRow; s_aCol = aCol; s_b = b; s_bRow = bRow; s_bCol = bCol;
                s_c = c; s_ldc = ldc; s_acc = accumulate; s_splitColumns = splitColumns; s_per = per;
                s_error = null;
                for (int t = 1; t < parts; t++)
                {
                    // Interlocked/volatile accesses order the job fields above before the helper's claim of its part.
                    Volatile.Write(ref helpers[t - 1].State, Signaled);
                    helpers[t - 1].Wake.Release();
                }
                Exception? own = null;
                try { RunPart(0); }
                catch (Exception e) { own = e; }
                for (int t = 1; t < parts; t++)
                {
                    Helper h = helpers[t - 1];
                    if (Interlocked.CompareExchange(ref h.State, Finished, Signaled) == Signaled)
                    {
                        try { RunPart(t); }
                        catch (Exception e) { own ??= e; }
                        continue;
                    }
                    // The helper is running its part (a few hundred µs at most): spin rather than block, but let
                    // other threads run if it takes longer.
                    var spin = new SpinWait();
                    while (Volatile.Read(ref h.State) != Finished) spin.SpinOnce(sleep1Threshold: -1);
                }
                if (own != null) ExceptionDispatchInfo.Throw(own);
                if (s_error is { } err) ExceptionDispatchInfo.Throw(err);
                return true;
            }
            finally
            {
                Volatile.Write(ref s_busy, 0);
            }
        }

        private static void RunPart(int t)
        {
            int o = t * s_per;
            if (s_splitColumns)
                s_fn(s_m, Math.Min(s_per, s_n - o), s_k, s_a, s_aRow, s_aCol, s_b + (long)o * s_bCol, s_bRow, s_bCol, s_c + o, s_ldc, s_acc);
            else
                s_fn(Math.Min(s_per, s_m - o), s_n, s_k, s_a + (long)o * s_aRow, s_aRow, s_aCol, s_b, s_bRow, s_bCol, s_c + (long)o * s_ldc, s_ldc, s_acc);
        }

        /// <summary>Starts the helpers on first use (the only allocations of the parallel path); called under s_busy.</summary>
        private static Helper[] EnsureHelpers(int count)
        {
            if (s_helpers != null) return s_helpers;
            var helpers = new Helper[Math.Max(count, 0)];
            for (int i = 0; i < helpers.Length; i++)
            {
                Helper h = helpers[i] = new Helper();
                int part = i + 1;
                new Thread(() => HelperLoop(h, part)) { IsBackground = true, Name = $"Gemm helper {part}" }.Start();
            }
            return s_helpers = helpers;
        }

        private static void HelperLoop(Helper h, int part)
        {
            while (true)
            {
                h.Wake.Wait();
                if (Interlocked.CompareExchange(ref h.State, Running, Signaled) != Signaled) continue; // stolen by the caller
                try { RunPart(part); }
                catch (Exception e) { s_error = e; }
                finally { Volatile.Write(ref h.State, Finished); }
            }
        }
    }
}
