// Tiled GEMM core for the ILGPU backend: every convolution pass and the linear layer are one product
//   C[M, Cols] = A[M, Kd] · B[Kd, Cols]
// whose operands are gathered on the fly (implicit GEMM: the im2col matrix never exists) by a small op struct
// (ITileOperands), and whose epilogue (bias, time-embedding bias, +=, split-K partials) is that struct's Store.
//
// Tiles (compile-time constants below, chosen for an sm_80/sm_90 SM at fp32):
//   - one group computes a TM x TN = 64 x 64 tile of C;
//   - 256 "register tiles" of 4 x 4 outputs each, held in 16 scalar locals c00..c33 (never an array: an array indexed
//     in a loop lands in PTX .local memory); a thread's tile is strided: rows rm + 16·i, cols cn + 16·j, so a warp
//     reads 16 consecutive shared floats per operand (no bank conflicts) and stores 16 consecutive outputs;
//   - the K dimension advances TK = 16 at a time through two shared arrays, aS [TK][TM] and bS [TK][TN]
//     (2 · 16 · 64 · 4 B = 8 KB a group), filled cooperatively with bounds-checked loads (zeros past M, Cols and the
//     end of this group's K range), so ragged shapes need no padding;
//   - grid (ceil(Cols / TN), ceil(M / TM), splits): Grid.IdxZ picks a K range of KChunk (split-K).
// Group size: 256 threads on a GPU (one register tile each). The kernel runs with any power-of-two group G ≤ 256:
// the group then computes its 256 register tiles in 256 / G passes, reloading the shared tiles each pass. That is
// how it runs on ILGPU's CPU simulators (groups of 16 or 64), and costs nothing at G = 256 (one pass).
// At G = 256 a second code path prefetches the next K step into registers while computing the current one
// (software pipelining: global latency hides behind the multiply-adds); G < 256 runs the plain loop.
// Every barrier is reached by every thread of the group the same number of times (the loop bounds depend only on
// the grid and the group size, the prefetch condition only on the K range), so no barrier is divergent.
//
// Two fusions ride on the core, so a layer's backward needs no separate reduction launches:
//   - row sums (TileArgs.RowSums): the groups of the first column tile also add up the rows of A as they pass through
//     shared memory (Σ_kd A(m, kd), in K-step order) into e1[m]: the bias gradient of a convolution (A = dy) and of a
//     linear layer (A = dyᵀ) from the weight gradient's own pass;
//   - split-K finished in the same launch: each group writes its partial tile, then counts its arrival on the tile's
//     counter (TiledReduce.ArriveLast: a device-wide fence and an atomic add); the group that arrives last adds the
//     tile's partials over the splits in split order, 0, 1, …, into e0. The sum's order is fixed whichever group
//     finishes last, so reruns stay bit-identical.

// The launcher of every tiled GEMM (stream, config, a, b, out, three epilogue views, the grid's arrival counters,
// args): one name for the project, used by Conv2d and Linear as well.
global using TileLauncher = System.Action<ILGPU.Runtime.AcceleratorStream, ILGPU.KernelConfig, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>,
    ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<int>, Ddpm.Kernels.TileArgs>;

using System.Runtime.CompilerServices;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Division by a divisor fixed at launch, as a multiply and a shift (Granlund and Montgomery): with l = ⌈log₂ d⌉,
/// s = 31 + l and m = ⌈2^s / d⌉ (which fits in 32 bits), ⌊x·m / 2^s⌋ = ⌊x / d⌋ for every 0 ≤ x &lt; 2^31, because
/// x·(m - 2^s/d) / 2^s &lt; 2^-l ≤ 1/d never carries the fraction of x/d over an integer. On a GPU an integer division
/// by a runtime value is a ~20-instruction sequence; this is a wide multiply and a shift. The gathers divide every
/// loaded index by the image and kernel sizes, so this matters (docs/gpu.md).
/// </summary>
public readonly struct FastDiv
{
    /// <summary>The divisor, the multiplier m, and the shift s.</summary>
    public readonly int Divisor;

    /// <summary>m = ⌈2^s / d⌉.</summary>
    public readonly uint Mul;

    /// <summary>s = 31 + ⌈log₂ d⌉.</summary>
    public readonly int Shift;

    /// <summary>Prepares division by <paramref name="divisor"/> (at least 1).</summary>
    public FastDiv(int divisor)
    {
        if (divisor < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(divisor), divisor, "divisor must be positive");
        }
        int l = 0;
        while ((1L << l) < divisor)
        {
            l++;
        }
        Divisor = divisor;
        Shift = 31 + l;
        Mul = (uint)(((1UL << Shift) + (ulong)divisor - 1) / (ulong)divisor);
    }

    /// <summary>⌊x / d⌋ for 0 ≤ x &lt; 2^31.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public int Div(int x) => (int)(((ulong)(uint)x * Mul) >> Shift);
}

/// <summary>The divisors a convolution's gathers use, prepared once per launch.</summary>
public readonly struct ConvDivisors(ConvShape g)
{
    /// <summary>By P·Q, Q, R·S, S, H·W, W and the stride.</summary>
    public readonly FastDiv Pq = new(g.P * g.Q), Q = new(g.Q), Rs = new(g.R * g.S), S = new(g.S), Hw = new(g.H * g.W), W = new(g.W), Stride = new(g.Stride);
}

/// <summary>Arguments of one tiled product: the GEMM sizes, the op's own geometry, and epilogue flags. Blittable.</summary>
public readonly struct TileArgs
{
    /// <summary>Rows of C, columns of C, inner dimension, and the inner range one split covers (a multiple of 16).</summary>
    public readonly int M, Cols, Kd, KChunk;

    /// <summary>1: C += result (or, with splits, the op's own accumulate rule); 0: C = result. 1: channel bias present.</summary>
    public readonly int Accumulate, HasChannelBias;

    /// <summary>1: the epilogue adds e0[col] (a linear layer's bias); 1: it adds e2 at the output's own index (a residual).</summary>
    public readonly int HasBias, HasResidual;

    /// <summary>1: e1[m] += Σ_kd A(m, kd) (the row sums of A: a bias gradient), computed by the first column tile's groups.</summary>
    public readonly int RowSums;

    /// <summary>Number of K splits (grid depth); above 1 the product goes to a partials buffer [splits, M, Cols].</summary>
    public readonly int Splits;

    /// <summary>The convolution's geometry (convolution ops).</summary>
    public readonly ConvShape Conv;

    /// <summary>The convolution's divisors (convolution ops).</summary>
    public readonly ConvDivisors Div;

    /// <summary>The strided matrix geometry (matmul).</summary>
    public readonly MatmulShape Mat;

    /// <summary>Builds the arguments; <paramref name="kChunk"/> 0 means one split over all of <paramref name="kd"/>.</summary>
    public TileArgs(int m, int cols, int kd, int kChunk, bool accumulate, bool channelBias, ConvShape conv, MatmulShape mat,
        bool rowSums = false, bool bias = false, bool residual = false)
    {
        (M, Cols, Kd, Conv, Mat) = (m, cols, kd, conv, mat);
        Div = conv.Stride > 0 ? new ConvDivisors(conv) : default;
        KChunk = kChunk > 0 ? kChunk : RoundUp(Math.Max(kd, 1), TiledGemm.TK);
        Splits = (Math.Max(kd, 1) + KChunk - 1) / KChunk;
        Accumulate = accumulate ? 1 : 0;
        HasChannelBias = channelBias ? 1 : 0;
        RowSums = rowSums ? 1 : 0;
        HasBias = bias ? 1 : 0;
        HasResidual = residual ? 1 : 0;
    }

    /// <summary>Floats of the partials buffer a split product writes: the tiles, then (with row sums) [splits, M] row sums.</summary>
    public long PartialsLength => (long)Splits * M * Cols + (RowSums != 0 ? (long)Splits * M : 0);

    internal static int RoundUp(int x, int multiple) => (x + multiple - 1) / multiple * multiple;
}

/// <summary>
/// The part of a gather that depends only on an operand's row (A) or column (B): computed once per thread before the
/// K loop, so the loop's index arithmetic is only the part that depends on kd. Its meaning is the op's own (a base
/// offset and two coordinates, e.g. an image's offset and the top-left input pixel of an output pixel's window).
/// </summary>
public readonly struct Gather(int @base, int y = 0, int x = 0)
{
    /// <summary>A base offset into the operand.</summary>
    public readonly int Base = @base;

    /// <summary>Two coordinates the op's load adds its kd-dependent taps to.</summary>
    public readonly int Y = y, X = x;
}

/// <summary>
/// How one product gathers its operands and writes its result. Static abstract members, so each op compiles into
/// its own kernel with the gathers inlined (ILGPU's StaticAbstractInterfaceMembers pattern). A load is split in two:
/// the row's (or column's) part, hoisted out of the K loop, and the kd part.
/// </summary>
public interface ITileOperands
{
    /// <summary>True when A(m, kd) and A(m, kd + 1) are neighbours in memory: the tile load then walks kd fastest
    /// (coalesced on a GPU); otherwise it walks m fastest.</summary>
    static abstract bool AAlongK(TileArgs t);

    /// <summary>True when B(kd, col) and B(kd + 1, col) are neighbours in memory (else cols are).</summary>
    static abstract bool BAlongK(TileArgs t);

    /// <summary>The part of A(m, ·)'s addressing that depends on m alone (any m, even past M: it is not loaded then).</summary>
    static abstract Gather RowOfA(TileArgs t, int m);

    /// <summary>A(m, kd) for the row <paramref name="row"/> = <see cref="RowOfA"/>(m), with 0 ≤ m &lt; M and 0 ≤ kd &lt; Kd.</summary>
    static abstract float LoadA(TileArgs t, ArrayView<float> a, Gather row, int kd);

    /// <summary>The part of B(·, col)'s addressing that depends on col alone (any col, even past Cols).</summary>
    static abstract Gather ColumnOfB(TileArgs t, int col);

    /// <summary>B(kd, col) for <paramref name="column"/> = <see cref="ColumnOfB"/>(col), with 0 ≤ kd &lt; Kd and
    /// 0 ≤ col &lt; Cols (zero for a padding tap).</summary>
    static abstract float LoadB(TileArgs t, ArrayView<float> b, Gather column, int kd);

    /// <summary>Writes C(m, col) = <paramref name="acc"/> through the op's epilogue; <paramref name="split"/> is the
    /// K split that computed it. e0, e1 and e2 are the op's extra operands (bias, channel bias, residual).</summary>
    static abstract void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int col, float acc);
}

/// <summary>Four floats, 16 bytes: a 128-bit shared-memory load (ld.shared.v4.f32, LDS.128) when the address is known
/// to be 16-byte aligned.</summary>
public struct Float4
{
    /// <summary>The four values, in memory order.</summary>
    public float X, Y, Z, W;
}

/// <summary>The tiled, explicitly grouped GEMM kernel and its launch geometry (see the file header for the tiling).</summary>
public static class TiledGemm
{
    /// <summary>Output tile rows, columns, and K step (shared-memory depth).</summary>
    public const int TM = 64, TN = 64, TK = 16;

    /// <summary>Register tiles per output tile (16 x 16 of 4 x 4 outputs): the group size on a GPU.</summary>
    public const int Threads = TM / 4 * (TN / 4);

    /// <summary>
    /// Row strides of the shared tiles aS [TK][AStride] and bS [TK][BStride]: four floats of padding a row. A row stays a
    /// whole number of 16-byte groups (the register tile's 128-bit loads), and a warp's stores along K (8 kk by 4 rows,
    /// <see cref="Element"/>) fall in banks (4·kk + row) mod 32: 32 different ones.
    /// </summary>
    public const int AStride = TM + 4, BStride = TN + 4;

    /// <summary>Floats of one shared A tile and one B tile; the GPU path keeps two of each (double buffering).</summary>
    public const int ATile = TK * AStride, BTile = TK * BStride;

    /// <summary>Shared memory one group declares: two A and two B tiles, the row sums and the last-group flag.</summary>
    public const int SharedBytes = (2 * ATile + 2 * BTile + TM) * sizeof(float) + sizeof(int);

    /// <summary>The register budget the launch bounds give ptxas: 256 threads and at least two groups an SM, so
    /// 65,536 / 512 = 128 registers a thread.</summary>
    public const int MinGroupsPerSm = 2;

    /// <summary>The launch bounds of the kernel on a GPU (.maxntid 256, .minnctapersm 2 in the PTX).</summary>
    public static KernelSpecialization Specialization => new(Threads, MinGroupsPerSm);

    /// <summary>The group size to launch with on <paramref name="accelerator"/>: 256, or the largest power of two
    /// the device allows (a simulator), which then runs the tile in 256 / G passes.</summary>
    public static int GroupSize(Accelerator accelerator)
    {
        int g = Threads;
        while (g > accelerator.MaxNumThreadsPerGroup && g > 1)
        {
            g /= 2;
        }
        return g;
    }

    /// <summary>The launch configuration of a product: one group per 64 x 64 output tile and K split.</summary>
    public static KernelConfig Config(TileArgs t, int groupSize) =>
        new(new Index3D((t.Cols + TN - 1) / TN, (t.M + TM - 1) / TM, t.Splits), new Index3D(groupSize, 1, 1));

    /// <summary>
    /// C[M, Cols] = A[M, Kd] · B[Kd, Cols] over this group's K range, through <typeparamref name="TOp"/>'s gathers and
    /// epilogue, on a GPU: groups of exactly <see cref="Threads"/>, one register tile a thread (<see cref="Pipelined{TOp}"/>).
    /// a, b: the operands TOp reads; c: the output (or partials); e0, e1, e2: epilogue extras; with splits, e0 receives
    /// the finished sum and e1 the finished row sums; counters: one arrival counter per output tile, zero between launches.
    /// </summary>
    internal static void Kernel<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<int> counters, TileArgs t) where TOp : struct, ITileOperands
    {
        // Allocated as 16-byte groups, so ILGPU knows the 128-bit loads are aligned; the stores see them as floats.
        var aS4 = SharedMemory.Allocate<Float4>(2 * ATile / 4); // two [TK][AStride] buffers
        var bS4 = SharedMemory.Allocate<Float4>(2 * BTile / 4);
        var rowS = SharedMemory.Allocate<float>(TM);    // this tile's row sums of A, when asked
        var last = SharedMemory.Allocate<int>(1);
        bool rowSums = BeginRowSums(t, rowS);
        Pipelined<TOp>(a, b, c, e0, e1, e2, t, aS4, bS4, rowS, rowSums);
        Finish(c, e0, e1, counters, t, rowS, rowSums, last);
    }

    /// <summary>
    /// The same product for a device whose groups are smaller than <see cref="Threads"/> (ILGPU's simulators: any power
    /// of two G &lt; 256): the group computes the tile's 256 register tiles in 256 / G passes (<see cref="InPasses{TOp}"/>).
    /// </summary>
    internal static void KernelInPasses<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<int> counters, TileArgs t) where TOp : struct, ITileOperands
    {
        var aS4 = SharedMemory.Allocate<Float4>(ATile / 4);
        var bS4 = SharedMemory.Allocate<Float4>(BTile / 4);
        var rowS = SharedMemory.Allocate<float>(TM);
        var last = SharedMemory.Allocate<int>(1);
        bool rowSums = BeginRowSums(t, rowS);
        InPasses<TOp>(a, b, c, e0, e1, e2, t, aS4, bS4, rowS, rowSums);
        Finish(c, e0, e1, counters, t, rowS, rowSums, last);
    }

    /// <summary>Zeroes this tile's row sums when it takes them (the first column tile's groups, with
    /// <see cref="TileArgs.RowSums"/>). Row r belongs to thread r mod G for the whole launch, so the sums need no barrier
    /// of their own.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool BeginRowSums(TileArgs t, ArrayView<float> rowS)
    {
        bool rowSums = t.RowSums != 0 && Grid.IdxX == 0;
        if (rowSums)
        {
            for (int r = Group.IdxX; r < TM; r += Group.DimX)
            {
                rowS[r] = 0;
            }
        }
        return rowSums;
    }

    /// <summary>Adds the row sums out (into e1, or this split's slot of the partials) and, with splits, finishes the tile.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Finish(ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<int> counters, TileArgs t, ArrayView<float> rowS,
        bool rowSums, ArrayView<int> last)
    {
        int split = Grid.IdxZ, m0 = Grid.IdxY * TM;
        if (rowSums)
        {
            for (int r = Group.IdxX; r < TM; r += Group.DimX)
            {
                int m = m0 + r;
                if (m < t.M)
                {
                    if (t.Splits == 1)
                    {
                        e1[m] += rowS[r];
                    }
                    else
                    {
                        c[(long)t.Splits * t.M * t.Cols + (long)split * t.M + m] = rowS[r];
                    }
                }
            }
        }
        if (t.Splits > 1)
        {
            FinishSplits(c, e0, e1, counters, last, t);
        }
    }

    /// <summary>
    /// After a split group has written its partial tile (and row sums): the last of the tile's groups to arrive adds the
    /// partials over the splits, in split order, into e0 (and the row sums into e1). Every thread of the group calls it.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FinishSplits(ArrayView<float> partials, ArrayView<float> e0, ArrayView<float> e1, ArrayView<int> counters, ArrayView<int> last,
        TileArgs t)
    {
        int tid = Group.IdxX, groupSize = Group.DimX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        if (!TiledReduce.ArriveLast(counters, Grid.IdxY * Grid.DimX + Grid.IdxX, t.Splits, last))
        {
            return;
        }
        long len = (long)t.M * t.Cols;
        for (int e = tid; e < TM * TN; e += groupSize)
        {
            int m = m0 + e / TN, col = col0 + e % TN;
            if (m < t.M && col < t.Cols)
            {
                long i = (long)m * t.Cols + col;
                float sum = 0;
                for (int s = 0; s < t.Splits; s++)
                {
                    sum += partials[s * len + i];
                }
                e0[i] = t.Accumulate != 0 ? e0[i] + sum : sum;
            }
        }
        if (t.RowSums != 0 && Grid.IdxX == 0)
        {
            for (int r = tid; r < TM; r += groupSize)
            {
                int m = m0 + r;
                if (m < t.M)
                {
                    float sum = 0;
                    for (int s = 0; s < t.Splits; s++)
                    {
                        sum += partials[t.Splits * len + (long)s * t.M + m];
                    }
                    e1[m] += sum;
                }
            }
        }
    }

    /// <summary>rowS[r] += Σ_kk aS[kk][r] for the rows r this thread owns (r ≡ tid mod G): the row sums of A, a K step at a
    /// time, from the A buffer at float offset <paramref name="buffer"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddRowSums(ArrayView<float> aS, int buffer, ArrayView<float> rowS)
    {
        for (int r = Group.IdxX; r < TM; r += Group.DimX)
        {
            float sum = 0;
            for (int kk = 0; kk < TK; kk++)
            {
                sum += aS[buffer + RowSumSlot(kk, r)];
            }
            rowS[r] += sum;
        }
    }

    /// <summary>
    /// The GPU path (a group of 256, one register tile a thread). Each thread owns 4 elements of each shared tile, whose
    /// (kk, row or column) are fixed for the launch, so their gathers' row and column parts are computed once, before
    /// the loop. The shared tiles are double-buffered: step s computes on buffer s mod 2 while the next step's elements,
    /// fetched into registers before the multiply-adds (their latency hides behind them), are stored into the other
    /// buffer; one barrier a step. Safe: a buffer is written one step after the barrier that ended its last reads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Pipelined<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, TileArgs t, ArrayView<Float4> aS4, ArrayView<Float4> bS4, ArrayView<float> rowS, bool rowSums)
        where TOp : struct, ITileOperands
    {
        int tid = Group.IdxX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        int kBegin = Grid.IdxZ * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        var aS = aS4.Cast<float>();
        var bS = bS4.Cast<float>();
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        var fa = new Fetch4(aAlongK, tid);
        var fb = new Fetch4(bAlongK, tid);
        // The gathers' row (A) and column (B) parts, and whether that row or column exists.
        Gather ga0 = TOp.RowOfA(t, m0 + fa.Line0), ga1 = TOp.RowOfA(t, m0 + fa.Line1), ga2 = TOp.RowOfA(t, m0 + fa.Line2), ga3 = TOp.RowOfA(t, m0 + fa.Line3);
        Gather gb0 = TOp.ColumnOfB(t, col0 + fb.Line0), gb1 = TOp.ColumnOfB(t, col0 + fb.Line1);
        Gather gb2 = TOp.ColumnOfB(t, col0 + fb.Line2), gb3 = TOp.ColumnOfB(t, col0 + fb.Line3);
        bool ia0 = m0 + fa.Line0 < t.M, ia1 = m0 + fa.Line1 < t.M, ia2 = m0 + fa.Line2 < t.M, ia3 = m0 + fa.Line3 < t.M;
        bool ib0 = col0 + fb.Line0 < t.Cols, ib1 = col0 + fb.Line1 < t.Cols, ib2 = col0 + fb.Line2 < t.Cols, ib3 = col0 + fb.Line3 < t.Cols;

        var acc = default(Tile4x4);
        int k0 = kBegin, buffer = 0;
        float pa0 = ia0 && k0 + fa.Kk0 < kEnd ? TOp.LoadA(t, a, ga0, k0 + fa.Kk0) : 0f;
        float pa1 = ia1 && k0 + fa.Kk1 < kEnd ? TOp.LoadA(t, a, ga1, k0 + fa.Kk1) : 0f;
        float pa2 = ia2 && k0 + fa.Kk2 < kEnd ? TOp.LoadA(t, a, ga2, k0 + fa.Kk2) : 0f;
        float pa3 = ia3 && k0 + fa.Kk3 < kEnd ? TOp.LoadA(t, a, ga3, k0 + fa.Kk3) : 0f;
        float pb0 = ib0 && k0 + fb.Kk0 < kEnd ? TOp.LoadB(t, b, gb0, k0 + fb.Kk0) : 0f;
        float pb1 = ib1 && k0 + fb.Kk1 < kEnd ? TOp.LoadB(t, b, gb1, k0 + fb.Kk1) : 0f;
        float pb2 = ib2 && k0 + fb.Kk2 < kEnd ? TOp.LoadB(t, b, gb2, k0 + fb.Kk2) : 0f;
        float pb3 = ib3 && k0 + fb.Kk3 < kEnd ? TOp.LoadB(t, b, gb3, k0 + fb.Kk3) : 0f;
        fa.Store(aS, 0, AStride, pa0, pa1, pa2, pa3);
        fb.Store(bS, 0, BStride, pb0, pb1, pb2, pb3);
        Group.Barrier();
        for (; k0 < kEnd; k0 += TK)
        {
            int next = k0 + TK;
            bool more = next < kEnd;
            if (more)
            {
                pa0 = ia0 && next + fa.Kk0 < kEnd ? TOp.LoadA(t, a, ga0, next + fa.Kk0) : 0f;
                pa1 = ia1 && next + fa.Kk1 < kEnd ? TOp.LoadA(t, a, ga1, next + fa.Kk1) : 0f;
                pa2 = ia2 && next + fa.Kk2 < kEnd ? TOp.LoadA(t, a, ga2, next + fa.Kk2) : 0f;
                pa3 = ia3 && next + fa.Kk3 < kEnd ? TOp.LoadA(t, a, ga3, next + fa.Kk3) : 0f;
                pb0 = ib0 && next + fb.Kk0 < kEnd ? TOp.LoadB(t, b, gb0, next + fb.Kk0) : 0f;
                pb1 = ib1 && next + fb.Kk1 < kEnd ? TOp.LoadB(t, b, gb1, next + fb.Kk1) : 0f;
                pb2 = ib2 && next + fb.Kk2 < kEnd ? TOp.LoadB(t, b, gb2, next + fb.Kk2) : 0f;
                pb3 = ib3 && next + fb.Kk3 < kEnd ? TOp.LoadB(t, b, gb3, next + fb.Kk3) : 0f;
            }
            acc.Step(aS4, bS4, buffer, tid / 16, tid % 16);
            if (rowSums)
            {
                AddRowSums(aS, buffer * ATile, rowS);
            }
            if (more)
            {
                fa.Store(aS, (1 - buffer) * ATile, AStride, pa0, pa1, pa2, pa3);
                fb.Store(bS, (1 - buffer) * BTile, BStride, pb0, pb1, pb2, pb3);
            }
            Group.Barrier();
            buffer = 1 - buffer;
        }
        acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0 + 4 * (tid / 16), col0 + 4 * (tid % 16));
    }

    /// <summary>
    /// Any power-of-two group G below 256 (the simulators): the group computes the tile's 256 register tiles in
    /// 256 / G passes, each pass a full sweep over K with cooperative, strided tile loads into buffer 0.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void InPasses<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, TileArgs t, ArrayView<Float4> aS4, ArrayView<Float4> bS4, ArrayView<float> rowS, bool rowSums)
        where TOp : struct, ITileOperands
    {
        int tid = Group.IdxX, groupSize = Group.DimX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        int kBegin = Grid.IdxZ * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        var aS = aS4.Cast<float>();
        var bS = bS4.Cast<float>();
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        int passes = Threads / groupSize;
        for (int pass = 0; pass < passes; pass++)
        {
            int sub = pass * groupSize + tid; // which register tile: rows 4·(sub / 16) + i, cols 4·(sub % 16) + j
            var acc = default(Tile4x4);
            for (int k0 = kBegin; k0 < kEnd; k0 += TK)
            {
                for (int e = tid; e < TK * TM; e += groupSize)
                {
                    var (kk, row) = Element(aAlongK, e);
                    int m = m0 + row, kd = k0 + kk;
                    aS[kk * AStride + row] = m < t.M && kd < kEnd ? TOp.LoadA(t, a, TOp.RowOfA(t, m), kd) : 0f;
                }
                for (int e = tid; e < TK * TN; e += groupSize)
                {
                    var (kk, column) = Element(bAlongK, e);
                    int col = col0 + column, kd = k0 + kk;
                    bS[kk * BStride + column] = col < t.Cols && kd < kEnd ? TOp.LoadB(t, b, TOp.ColumnOfB(t, col), kd) : 0f;
                }
                Group.Barrier();
                acc.Step(aS4, bS4, 0, sub / 16, sub % 16);
                if (rowSums && pass == 0)
                {
                    AddRowSums(aS, 0, rowS);
                }
                Group.Barrier();
            }
            acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0 + 4 * (sub / 16), col0 + 4 * (sub % 16));
        }
    }

    // The shared tiles' addressing, as plain functions the kernel calls and the bank-conflict test walks a warp through.
    // Both tiles are stored [kk][row or column], rows AStride and BStride floats apart; the GPU path's second buffer
    // starts ATile (BTile) floats in, a multiple of 32 words, so it has the first one's banks.

    /// <summary>
    /// Element e (0..1023) of a shared tile: its kk and its row (A) or column (B). Along K, neighbouring threads read
    /// neighbouring kd (coalesced): a warp covers 8 kk of 4 rows (32-byte runs of each row, a sector apiece) and stores
    /// them to banks (4·kk + row) mod 32, all different. Otherwise the row or column runs fastest, 32 in a row.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static (int Kk, int Line) Element(bool alongK, int e) =>
        alongK ? (e % 8 + 8 * (e / 32 % 2), e / 8 % 4 + 4 * (e / 64)) : (e / TM, e % TM);

    /// <summary>Where element <paramref name="e"/> of the A tile is stored (float index in a buffer).</summary>
    internal static int SlotA(bool alongK, int e)
    {
        var (kk, row) = Element(alongK, e);
        return kk * AStride + row;
    }

    /// <summary>Where element <paramref name="e"/> of the B tile is stored.</summary>
    internal static int SlotB(bool alongK, int e)
    {
        var (kk, column) = Element(alongK, e);
        return kk * BStride + column;
    }

    /// <summary>The 16-byte group (Float4 index in a buffer) holding aS[kk][4·ty .. 4·ty + 3]: a register tile's four rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadA(int kk, int ty) => kk * (AStride / 4) + ty;

    /// <summary>The 16-byte group holding bS[kk][4·tx .. 4·tx + 3]: a register tile's four columns.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadB(int kk, int tx) => kk * (BStride / 4) + tx;

    /// <summary>Where aS[kk][r] is (the row sums' reads, one row a thread).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int RowSumSlot(int kk, int r) => kk * AStride + r;

    /// <summary>A thread's four elements of one shared tile in the GPU path, e = tid + 256·j: their kk and row (or
    /// column), fixed for the launch.</summary>
    private readonly struct Fetch4
    {
        public readonly int Kk0, Kk1, Kk2, Kk3, Line0, Line1, Line2, Line3;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Fetch4(bool alongK, int tid)
        {
            (Kk0, Line0) = Element(alongK, tid);
            (Kk1, Line1) = Element(alongK, tid + Threads);
            (Kk2, Line2) = Element(alongK, tid + 2 * Threads);
            (Kk3, Line3) = Element(alongK, tid + 3 * Threads);
        }

        /// <summary>Stores the four elements into the buffer at float offset <paramref name="buffer"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Store(ArrayView<float> s, int buffer, int stride, float v0, float v1, float v2, float v3)
        {
            s[buffer + Kk0 * stride + Line0] = v0;
            s[buffer + Kk1 * stride + Line1] = v1;
            s[buffer + Kk2 * stride + Line2] = v2;
            s[buffer + Kk3 * stride + Line3] = v3;
        }
    }

    /// <summary>A thread's 4 x 4 register tile: rows 4·ty + i, columns 4·tx + j, as 16 scalar fields (a struct
    /// local, so ILGPU keeps each in a register; the PTX test checks that nothing lands in .local).</summary>
    private struct Tile4x4
    {
        private float _c00, _c01, _c02, _c03, _c10, _c11, _c12, _c13, _c20, _c21, _c22, _c23, _c30, _c31, _c32, _c33;

        /// <summary>C += aS[:, rows]ᵀ · bS[:, cols] over the TK rows of the shared tiles in buffer <paramref name="buffer"/>:
        /// two 128-bit loads and 16 multiply-adds a kk, written out four kk at a time (ILGPU does not unroll loops, and
        /// the unrolled body lets ptxas fold the offsets into the loads).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<Float4> aS4, ArrayView<Float4> bS4, int buffer, int ty, int tx)
        {
            int aBase = buffer * (ATile / 4), bBase = buffer * (BTile / 4);
            for (int kk = 0; kk < TK; kk += 4)
            {
                Mac(aS4[aBase + ReadA(kk, ty)], bS4[bBase + ReadB(kk, tx)]);
                Mac(aS4[aBase + ReadA(kk + 1, ty)], bS4[bBase + ReadB(kk + 1, tx)]);
                Mac(aS4[aBase + ReadA(kk + 2, ty)], bS4[bBase + ReadB(kk + 2, tx)]);
                Mac(aS4[aBase + ReadA(kk + 3, ty)], bS4[bBase + ReadB(kk + 3, tx)]);
            }
        }

        /// <summary>The outer product of a register tile's four rows of A and four columns of B, added in.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private void Mac(Float4 a, Float4 b)
        {
            _c00 += a.X * b.X; _c01 += a.X * b.Y; _c02 += a.X * b.Z; _c03 += a.X * b.W;
            _c10 += a.Y * b.X; _c11 += a.Y * b.Y; _c12 += a.Y * b.Z; _c13 += a.Y * b.W;
            _c20 += a.Z * b.X; _c21 += a.Z * b.Y; _c22 += a.Z * b.Z; _c23 += a.Z * b.W;
            _c30 += a.W * b.X; _c31 += a.W * b.Y; _c32 += a.W * b.Z; _c33 += a.W * b.W;
        }

        /// <summary>Writes the tile through <typeparamref name="TOp"/>'s epilogue, rows r0 + i, columns q0 + j.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int r0,
            int q0) where TOp : struct, ITileOperands
        {
            Put<TOp>(t, c, e0, e1, e2, split, r0, q0, _c00, _c01, _c02, _c03);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 1, q0, _c10, _c11, _c12, _c13);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 2, q0, _c20, _c21, _c22, _c23);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 3, q0, _c30, _c31, _c32, _c33);
        }
    }

    /// <summary>One row of a register tile through the epilogue, bounds-checked (cols q0 .. q0 + 3).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int q0,
        float v0, float v1, float v2, float v3) where TOp : struct, ITileOperands
    {
        if (m >= t.M)
        {
            return;
        }
        if (q0 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0, v0);
        if (q0 + 1 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 1, v1);
        if (q0 + 2 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 2, v2);
        if (q0 + 3 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 3, v3);
    }

    /// <summary>Loads one op's kernel as an explicitly grouped kernel (once per accelerator): <see cref="Kernel{TOp}"/> with
    /// its launch bounds where the device runs groups of 256, else <see cref="KernelInPasses{TOp}"/>.</summary>
    internal static TileLauncher Load<TOp>(IlgpuKernels k) where TOp : struct, ITileOperands =>
        GroupSize(k.Accelerator) == Threads ? k.Grouped<TileLauncher>(Kernel<TOp>, Specialization) : k.Grouped<TileLauncher>(KernelInPasses<TOp>);

    /// <summary>Queues one product on <paramref name="k"/>'s stream. e0, e1, e2: the epilogue's views (with splits, c is
    /// the partials buffer of <see cref="TileArgs.PartialsLength"/> floats and e0 the output); a view the op does not
    /// read may be any view.</summary>
    internal static void Launch(IlgpuKernels k, TileLauncher kernel, TileArgs t, ArrayView<float> a, ArrayView<float> b, ArrayView<float> c,
        ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2)
    {
        // An empty output is no work, and an empty grid is a launch error on CUDA.
        if (t.M <= 0 || t.Cols <= 0)
        {
            return;
        }
        var config = Config(t, GroupSize(k.Accelerator));
        if (t.Splits > 1 && config.GridDim.X * config.GridDim.Y > k.GridCounters.IntLength)
        {
            throw new InvalidOperationException(
                $"tiled gemm: {config.GridDim.X * config.GridDim.Y} output tiles with {t.Splits} splits, more than the {k.GridCounters.IntLength} arrival counters");
        }
        kernel(k.Stream, config, a, b, c, e0, e1, e2, k.GridCounters, t);
    }
}

/// <summary>C (=|+=) op(A)·op(B) (+ bias[col], e0, when <see cref="TileArgs.HasBias"/>) for <see cref="Linear.Matmul(Tensor, bool, Tensor, bool, Tensor, bool)"/> and the linear layer:
/// A(i, p) = a[i·ARow + p·ACol], B(p, j) = b[p·BRow + j·BCol], c [M, N] row-major; with <see cref="TileArgs.RowSums"/>,
/// e1[i] += Σ_p A(i, p).</summary>
public struct MatmulTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => t.Mat.ACol == 1;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => t.Mat.BRow == 1;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Mat.ARow);

    /// <inheritdoc/>
    public static float LoadA(TileArgs t, ArrayView<float> a, Gather row, int kd) => a[row.Base + kd * t.Mat.ACol];

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => new(col * t.Mat.BCol);

    /// <inheritdoc/>
    public static float LoadB(TileArgs t, ArrayView<float> b, Gather column, int kd) => b[column.Base + kd * t.Mat.BRow];

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> bias, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int col,
        float acc)
    {
        int i = m * t.Cols + col;
        float v = t.HasBias != 0 ? acc + bias[col] : acc;
        c[i] = t.Accumulate != 0 ? c[i] + v : v;
    }
}
