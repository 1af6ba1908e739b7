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

    /// <summary>The part of A(·, kd)'s addressing that depends on kd alone (0 ≤ kd &lt; Kd).</summary>
    static abstract Gather KOfA(TileArgs t, int kd);

    /// <summary>Where A(m, kd) is in a, from <paramref name="row"/> = <see cref="RowOfA"/>(m) and <paramref name="k"/> =
    /// <see cref="KOfA"/>(kd), with 0 ≤ m &lt; M and 0 ≤ kd &lt; Kd: an index, not a load, so the kernel's one load an
    /// element is a predicated LDG; -1 for a structural zero.</summary>
    static abstract int IndexA(TileArgs t, Gather row, Gather k);

    /// <summary>The part of B(·, col)'s addressing that depends on col alone (any col, even past Cols).</summary>
    static abstract Gather ColumnOfB(TileArgs t, int col);

    /// <summary>The part of B(kd, ·)'s addressing that depends on kd alone.</summary>
    static abstract Gather KOfB(TileArgs t, int kd);

    /// <summary><see cref="KOfB"/>(kd + 1) from <paramref name="k"/> = <see cref="KOfB"/>(kd): a few adds and selects where
    /// KOfB divides (the GPU kernel walks each thread's 16 consecutive kd of an across-K B this way).</summary>
    static abstract Gather NextKOfB(TileArgs t, Gather k);

    /// <summary>Where B(kd, col) is in b, from <see cref="ColumnOfB"/>(col) and <see cref="KOfB"/>(kd); -1 for a structural
    /// zero (a padding tap).</summary>
    static abstract int IndexB(TileArgs t, Gather column, Gather k);

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

/// <summary>Eight floats in registers (a thread's staged tile elements): fields, never an array, so they stay in registers.</summary>
internal struct Floats8
{
    public float V0, V1, V2, V3, V4, V5, V6, V7;
}

/// <summary>The tiled, explicitly grouped GEMM kernel and its launch geometry (see the file header for the tiling).</summary>
public static partial class TiledGemm
{
    /// <summary>Output tile rows and columns, and the K step (shared-memory depth).</summary>
    public const int TM = 64, TN = 128, TK = 16;

    /// <summary>A thread's register tile: 8 rows by 8 columns (two runs of four, half a tile apart).</summary>
    public const int RowsPerThread = 8, ColsPerThread = 8;

    /// <summary>Register tiles per output tile (8 x 16 of 8 x 8 outputs): the group size on a GPU.</summary>
    public const int Threads = TM / RowsPerThread * (TN / ColsPerThread);

    /// <summary>
    /// Row strides of the shared tiles aS [TK][AStride] and bS [TK][BStride]: four floats of padding a row. A row stays a
    /// whole number of 16-byte groups (the register tile's 128-bit loads), and a warp's stores along K (8 kk by 4 rows,
    /// <see cref="Element"/>) fall in banks (4·kk + row) mod 32 (both strides are 4 mod 32): 32 different ones.
    /// </summary>
    public const int AStride = TM + 4, BStride = TN + 4;

    /// <summary>Floats of one shared A tile and one B tile; the GPU kernel keeps two of each (double buffering).</summary>
    public const int ATile = TK * AStride, BTile = TK * BStride;

    /// <summary>Shared memory the GPU kernel's group declares: two A and two B tiles, the row sums and the last-group flag.</summary>
    public const int SharedBytes = (2 * ATile + 2 * BTile + TM) * sizeof(float) + sizeof(int);

    /// <summary>The launch bounds' groups an SM: with 128 threads, 65,536 / (128 · 3) = 170, so ptxas keeps a thread
    /// within 168 registers (64 accumulators, 24 staged elements, 16 operands and the addressing).</summary>
    public const int MinGroupsPerSm = 3;

    /// <summary>The launch bounds of the GPU kernel (.maxntid 128, .minnctapersm 3 in the PTX).</summary>
    public static KernelSpecialization Specialization => new(Threads, MinGroupsPerSm);

    /// <summary>The group size to launch with on <paramref name="accelerator"/>: 128, or the largest power of two
    /// the device allows (a simulator), which then runs the tile in 128 / G passes.</summary>
    public static int GroupSize(Accelerator accelerator)
    {
        int g = Threads;
        while (g > accelerator.MaxNumThreadsPerGroup && g > 1)
        {
            g /= 2;
        }
        return g;
    }

    /// <summary>The launch configuration of a product: one group per 64 x 128 output tile and K split.</summary>
    public static KernelConfig Config(TileArgs t, int groupSize) =>
        new(new Index3D((t.Cols + TN - 1) / TN, (t.M + TM - 1) / TM, t.Splits), new Index3D(groupSize, 1, 1));

    /// <summary>
    /// C[M, Cols] = A[M, Kd] · B[Kd, Cols] over this group's K range, through <typeparamref name="TOp"/>'s gathers and
    /// epilogue, on a GPU: groups of exactly <see cref="Threads"/>, one register tile a thread (<see cref="Pipelined{TOp, TAcc}"/>).
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
        Pipelined<TOp, Tile8x8>(a, b, c, e0, e1, e2, t, aS4, bS4, rowS, rowSums);
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
    /// The GPU path (a group of 128, one 8 x 8 register tile a thread). Each thread stages 8 elements of the A tile and 16
    /// of the B tile a K step, loaded as index = f(row or column part, kd part) (<see cref="ITileOperands"/>):
    ///   - an operand stored across K (its row or column runs fastest) gives each thread one row (A: tid mod 64) or column
    ///     (B: tid) for the whole launch: that part is computed once, before the loop; the kd part at each element;
    ///   - one stored along K (kd runs fastest: coalesced) gives each thread one kk for all its elements (the 8 x 4 warp
    ///     layout of <see cref="Element"/>): the kd part is computed once a step; the rows of A (8, line + 8·j) once,
    ///     before the loop; the columns of B (16: too many registers to keep) at each element.
    /// The shared tiles are double-buffered: step s computes on buffer s mod 2 while the next step's elements, fetched
    /// into registers before the multiply-adds (their latency hides behind them), are stored into the other buffer; one
    /// barrier a step. Safe: a buffer is written one step after the barrier that ended its last reads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Pipelined<TOp, TAcc>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, TileArgs t, ArrayView<Float4> aS4, ArrayView<Float4> bS4, ArrayView<float> rowS, bool rowSums)
        where TOp : struct, ITileOperands where TAcc : struct, ITileAccumulator
    {
        int tid = Group.IdxX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        int kBegin = Grid.IdxZ * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        var aS = aS4.Cast<float>();
        var bS = bS4.Cast<float>();
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        var fetch = new Fetcher<TOp>(t, a, b, tid, m0, col0, kEnd);
        var acc = default(TAcc);
        int k0 = kBegin, buffer = 0;
        var staged = fetch.Step(k0);
        StoreA(aS, 0, aAlongK, tid, Stage<TAcc>(staged.A));
        StoreB(bS, 0, bAlongK, tid, 0, Stage<TAcc>(staged.B0));
        StoreB(bS, 0, bAlongK, tid, 8, Stage<TAcc>(staged.B1));
        Group.Barrier();
        for (; k0 < kEnd; k0 += TK)
        {
            int next = k0 + TK;
            bool more = next < kEnd;
            if (more)
            {
                staged = fetch.Step(next);
            }
            acc.Step(aS4, bS4, buffer, tid);
            if (rowSums)
            {
                AddRowSums(aS, buffer * ATile, rowS);
            }
            if (more)
            {
                StoreA(aS, (1 - buffer) * ATile, aAlongK, tid, Stage<TAcc>(staged.A));
                StoreB(bS, (1 - buffer) * BTile, bAlongK, tid, 0, Stage<TAcc>(staged.B0));
                StoreB(bS, (1 - buffer) * BTile, bAlongK, tid, 8, Stage<TAcc>(staged.B1));
            }
            Group.Barrier();
            buffer = 1 - buffer;
        }
        acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0, col0, tid);
    }

    /// <summary>A thread's 24 staged elements of one K step (8 of A, 16 of B), in registers.</summary>
    private readonly struct Staged(Floats8 a, Floats8 b0, Floats8 b1)
    {
        public readonly Floats8 A = a, B0 = b0, B1 = b1;
    }

    /// <summary>Eight staged elements of B and the kd part after them (an across-K B steps it element by element).</summary>
    private readonly struct StagedB(Floats8 values, Gather next)
    {
        public readonly Floats8 Values = values;
        public readonly Gather Next = next;
    }

    /// <summary>
    /// What a thread fetches a K step, with every part of the addressing that is fixed for the launch computed once:
    /// across K its one row of A (tid mod 64) and column of B (tid); along K its kk in each tile and its 8 rows of A.
    /// </summary>
    private readonly struct Fetcher<TOp> where TOp : struct, ITileOperands
    {
        private readonly TileArgs T;
        private readonly ArrayView<float> _a, _b;
        private readonly bool _aAlongK, _bAlongK, _okB;
        private readonly Gather _rowA, _columnB;
        private readonly Rows8<TOp> _rowsA;
        private readonly int _kkA, _kkB, _tid, _col0, _kEnd;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Fetcher(TileArgs t, ArrayView<float> a, ArrayView<float> b, int tid, int m0, int col0, int kEnd)
        {
            (T, _a, _b, _tid, _col0, _kEnd) = (t, a, b, tid, col0, kEnd);
            _aAlongK = TOp.AAlongK(t);
            _bAlongK = TOp.BAlongK(t);
            _rowA = TOp.RowOfA(t, m0 + tid % TM);
            _columnB = TOp.ColumnOfB(t, col0 + tid);
            _okB = col0 + tid < t.Cols;
            _kkA = Element(true, tid, TM).Kk;
            _kkB = Element(true, tid, TN).Kk;
            _rowsA = _aAlongK ? new Rows8<TOp>(t, m0, Element(true, tid, TM).Line) : default;
        }

        /// <summary>The elements of the K step at <paramref name="k0"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Staged Step(int k0)
        {
            var kA = TOp.KOfA(T, k0 + _kkA);
            var a = new Floats8
            {
                V0 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G0, (_rowsA.Ok >> 0 & 1) != 0, kA, k0, _kEnd, _tid + 0 * Threads),
                V1 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G1, (_rowsA.Ok >> 1 & 1) != 0, kA, k0, _kEnd, _tid + 1 * Threads),
                V2 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G2, (_rowsA.Ok >> 2 & 1) != 0, kA, k0, _kEnd, _tid + 2 * Threads),
                V3 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G3, (_rowsA.Ok >> 3 & 1) != 0, kA, k0, _kEnd, _tid + 3 * Threads),
                V4 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G4, (_rowsA.Ok >> 4 & 1) != 0, kA, k0, _kEnd, _tid + 4 * Threads),
                V5 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G5, (_rowsA.Ok >> 5 & 1) != 0, kA, k0, _kEnd, _tid + 5 * Threads),
                V6 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G6, (_rowsA.Ok >> 6 & 1) != 0, kA, k0, _kEnd, _tid + 6 * Threads),
                V7 = FetchA<TOp>(T, _a, _aAlongK, _rowA, _rowsA.G7, (_rowsA.Ok >> 7 & 1) != 0, kA, k0, _kEnd, _tid + 7 * Threads),
            };
            var b0 = EightOfB(TOp.KOfB(T, k0 + (_bAlongK ? _kkB : 0)), k0, 0);
            var b1 = EightOfB(b0.Next, k0, 8);
            return new Staged(a, b0.Values, b1.Values);
        }

        /// <summary>B elements tid + 128·(first + j), j &lt; 8, from the kd part <paramref name="k"/> of the first.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private StagedB EightOfB(Gather k, int k0, int first)
        {
            var b = default(Floats8);
            b.V0 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 0) * Threads, first + 0);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V1 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 1) * Threads, first + 1);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V2 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 2) * Threads, first + 2);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V3 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 3) * Threads, first + 3);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V4 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 4) * Threads, first + 4);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V5 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 5) * Threads, first + 5);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V6 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 6) * Threads, first + 6);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            b.V7 = FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, k, _col0, k0, _kEnd, _tid + (first + 7) * Threads, first + 7);
            k = _bAlongK ? k : TOp.NextKOfB(T, k);
            return new StagedB(b, k);
        }
    }

    /// <summary>A thread's eight rows of A along K (rows m0 + line + 8·j): their row parts, and which exist (bit j).</summary>
    private readonly struct Rows8<TOp> where TOp : struct, ITileOperands
    {
        public readonly Gather G0, G1, G2, G3, G4, G5, G6, G7;
        public readonly int Ok;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Rows8(TileArgs t, int m0, int line)
        {
            G0 = TOp.RowOfA(t, m0 + line + 0);
            G1 = TOp.RowOfA(t, m0 + line + 8);
            G2 = TOp.RowOfA(t, m0 + line + 16);
            G3 = TOp.RowOfA(t, m0 + line + 24);
            G4 = TOp.RowOfA(t, m0 + line + 32);
            G5 = TOp.RowOfA(t, m0 + line + 40);
            G6 = TOp.RowOfA(t, m0 + line + 48);
            G7 = TOp.RowOfA(t, m0 + line + 56);
            int left = t.M - (m0 + line); // rows line + 8·j exist while 8·j < left
            Ok = (left > 0 ? 1 : 0) | (left > 8 ? 2 : 0) | (left > 16 ? 4 : 0) | (left > 24 ? 8 : 0) | (left > 32 ? 16 : 0) | (left > 40 ? 32 : 0)
                | (left > 48 ? 64 : 0) | (left > 56 ? 128 : 0);
        }
    }

    /// <summary>Element <paramref name="e"/> of the A tile, kd in [k0, k0 + 16): 0 past M, past this split's K range, or
    /// where the op's index is -1. Across K the row is <paramref name="rowAcross"/> (this thread's, hoisted); along K it is
    /// <paramref name="rowAlong"/> (<paramref name="rowOk"/>: it exists) and the kd part <paramref name="kAlong"/> (this
    /// thread's kk, computed once a step).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float FetchA<TOp>(TileArgs t, ArrayView<float> a, bool alongK, Gather rowAcross, Gather rowAlong, bool rowOk, Gather kAlong, int k0,
        int kEnd, int e) where TOp : struct, ITileOperands
    {
        var (kk, line) = Element(alongK, e, TM);
        int kd = k0 + kk;
        bool ok = (alongK ? rowOk : Grid.IdxY * TM + line < t.M) & kd < kEnd;
        int i = ok ? TOp.IndexA(t, alongK ? rowAlong : rowAcross, alongK ? kAlong : TOp.KOfA(t, kd)) : -1;
        return i >= 0 ? a[i] : 0f;
    }

    /// <summary>Element <paramref name="e"/> of the B tile, with the kd part <paramref name="k"/> (along K: this thread's kk,
    /// computed once a step; across K: element j's kd = k0 + j, stepped from the previous element's by
    /// <see cref="ITileOperands.NextKOfB"/>). Across K the column is this thread's (<paramref name="columnAcross"/>,
    /// <paramref name="columnOk"/>: it exists); along K it is computed here.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float FetchB<TOp>(TileArgs t, ArrayView<float> b, bool alongK, Gather columnAcross, bool columnOk, Gather k, int col0, int k0,
        int kEnd, int e, int j) where TOp : struct, ITileOperands
    {
        // Across K, element e = tid + 128·j has kk = j (tid < 128): passed as j, so the compiler need not shift tid.
        var (kk, line) = Element(alongK, e, TN);
        int kd = k0 + (alongK ? kk : j), col = col0 + line;
        bool ok = (alongK ? col < t.Cols : columnOk) & kd < kEnd;
        int i = ok ? TOp.IndexB(t, alongK ? TOp.ColumnOfB(t, col) : columnAcross, k) : -1;
        return i >= 0 ? b[i] : 0f;
    }

    /// <summary>Stores a thread's 8 staged A elements (tid + 128·j) into the buffer at float offset <paramref name="buffer"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreA(ArrayView<float> aS, int buffer, bool alongK, int tid, Floats8 v) => Store8(aS, buffer, alongK, tid, TM, AStride, v);

    /// <summary>Eight staged elements as the accumulator stores them in shared memory (<see cref="ITileAccumulator.Stage"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Floats8 Stage<TAcc>(Floats8 v) where TAcc : struct, ITileAccumulator => new()
    {
        V0 = TAcc.Stage(v.V0), V1 = TAcc.Stage(v.V1), V2 = TAcc.Stage(v.V2), V3 = TAcc.Stage(v.V3),
        V4 = TAcc.Stage(v.V4), V5 = TAcc.Stage(v.V5), V6 = TAcc.Stage(v.V6), V7 = TAcc.Stage(v.V7),
    };

    /// <summary>Stores 8 staged B elements, tid + 128·(first + j), into the buffer at float offset <paramref name="buffer"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreB(ArrayView<float> bS, int buffer, bool alongK, int tid, int first, Floats8 v) =>
        Store8(bS, buffer, alongK, tid + first * Threads, TN, BStride, v);

    /// <summary>Elements e, e + 128, …, e + 7·128 of a tile of <paramref name="lines"/> lines (rows AStride or BStride =
    /// <paramref name="stride"/> floats apart) stored where <see cref="Element"/> puts them.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store8(ArrayView<float> s, int buffer, bool alongK, int e, int lines, int stride, Floats8 v)
    {
        s[buffer + Slot(alongK, e, lines, stride)] = v.V0;
        s[buffer + Slot(alongK, e + Threads, lines, stride)] = v.V1;
        s[buffer + Slot(alongK, e + 2 * Threads, lines, stride)] = v.V2;
        s[buffer + Slot(alongK, e + 3 * Threads, lines, stride)] = v.V3;
        s[buffer + Slot(alongK, e + 4 * Threads, lines, stride)] = v.V4;
        s[buffer + Slot(alongK, e + 5 * Threads, lines, stride)] = v.V5;
        s[buffer + Slot(alongK, e + 6 * Threads, lines, stride)] = v.V6;
        s[buffer + Slot(alongK, e + 7 * Threads, lines, stride)] = v.V7;
    }

    /// <summary>
    /// Any power-of-two group G below 128 (the simulators): the group computes the tile's 128 register tiles in
    /// 128 / G passes, each pass a full sweep over K with cooperative, strided tile loads into one buffer.
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
        int passes = Threads / groupSize, across = TN / ColsPerThread;
        for (int pass = 0; pass < passes; pass++)
        {
            int sub = pass * groupSize + tid; // which register tile: rows 8·(sub / 16) + i, cols 4·(sub % 16) + j and 64 + …
            var acc = default(Tile8x8);
            for (int k0 = kBegin; k0 < kEnd; k0 += TK)
            {
                for (int e = tid; e < TK * TM; e += groupSize)
                {
                    var (kk, row) = Element(aAlongK, e, TM);
                    int m = m0 + row, kd = k0 + kk;
                    int i = m < t.M && kd < kEnd ? TOp.IndexA(t, TOp.RowOfA(t, m), TOp.KOfA(t, kd)) : -1;
                    aS[kk * AStride + row] = i >= 0 ? a[i] : 0f;
                }
                for (int e = tid; e < TK * TN; e += groupSize)
                {
                    var (kk, column) = Element(bAlongK, e, TN);
                    int col = col0 + column, kd = k0 + kk;
                    int i = col < t.Cols && kd < kEnd ? TOp.IndexB(t, TOp.ColumnOfB(t, col), TOp.KOfB(t, kd)) : -1;
                    bS[kk * BStride + column] = i >= 0 ? b[i] : 0f;
                }
                Group.Barrier();
                acc.Step(aS4, bS4, 0, sub / across, sub % across);
                if (rowSums && pass == 0)
                {
                    AddRowSums(aS, 0, rowS);
                }
                Group.Barrier();
            }
            acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0 + RowsPerThread * (sub / across), col0 + 4 * (sub % across));
        }
    }

    // The shared tiles' addressing, as plain functions the kernel calls and the bank-conflict test walks a warp through.
    // Both tiles are stored [kk][row or column], rows AStride and BStride floats apart; the GPU kernel's second buffer
    // starts ATile (BTile) floats in, a multiple of 32 words, so it has the first one's banks.

    /// <summary>
    /// Element e of a shared tile of <paramref name="lines"/> rows (A: 64) or columns (B: 128) by 16 kk: its kk and its
    /// row or column. Along K, neighbouring threads read neighbouring kd (coalesced): a warp covers 8 kk of 4 lines
    /// (32-byte runs of each line, a sector apiece) and stores them to banks (4·kk + line) mod 32, all different. Across
    /// K the line runs fastest, 32 in a row.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static (int Kk, int Line) Element(bool alongK, int e, int lines) =>
        alongK ? ((e & 7) | (e >> 2 & 8), (e >> 3 & 3) | (e >> 4 & ~3)) : ((int)((uint)e / (uint)lines), e & (lines - 1));

    /// <summary>Where element <paramref name="e"/> of the A tile is stored (float index in a buffer).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int SlotA(bool alongK, int e) => Slot(alongK, e, TM, AStride);

    /// <summary>Where element <paramref name="e"/> of the B tile is stored.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int SlotB(bool alongK, int e) => Slot(alongK, e, TN, BStride);

    /// <summary>Where element <paramref name="e"/> of a tile of <paramref name="lines"/> lines, rows <paramref name="stride"/>
    /// floats apart, is stored: kk·stride + line.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Slot(bool alongK, int e, int lines, int stride)
    {
        var (kk, line) = Element(alongK, e, lines);
        return kk * stride + line;
    }

    /// <summary>The 16-byte group (Float4 index in a buffer) holding aS[kk][8·ty .. 8·ty + 3]; the register tile's rows
    /// 4 .. 7 are the next group.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadA(int kk, int ty) => kk * (AStride / 4) + 2 * ty;

    /// <summary>The 16-byte group holding bS[kk][4·tx .. 4·tx + 3]; the register tile's other four columns are
    /// <c>TN / 8</c> groups (64 columns) on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadB(int kk, int tx) => kk * (BStride / 4) + tx;

    /// <summary>Where aS[kk][r] is (the row sums' reads, one row a thread).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int RowSumSlot(int kk, int r) => kk * AStride + r;

    /// <summary>A thread's 8 x 8 register tile: rows 8·ty + i, columns 4·tx + j and 64 + 4·tx + j, as 64 scalar fields (a
    /// struct local, so ILGPU keeps each in a register; the compiler table checks that nothing lands in local memory).</summary>
    private struct Tile8x8 : ITileAccumulator
    {
        private float _c00, _c01, _c02, _c03, _c04, _c05, _c06, _c07, _c10, _c11, _c12, _c13, _c14, _c15, _c16, _c17, _c20, _c21, _c22, _c23, _c24, _c25, _c26, _c27, _c30, _c31, _c32, _c33, _c34, _c35, _c36, _c37, _c40, _c41, _c42, _c43, _c44, _c45, _c46, _c47, _c50, _c51, _c52, _c53, _c54, _c55, _c56, _c57, _c60, _c61, _c62, _c63, _c64, _c65, _c66, _c67, _c70, _c71, _c72, _c73, _c74, _c75, _c76, _c77;

        /// <summary>C += aS[:, rows]ᵀ · bS[:, cols] over the 16 kk of the shared tiles in buffer <paramref name="buffer"/>:
        /// four 128-bit loads and 64 multiply-adds a kk, two kk a trip. A loop, not written out: ILGPU places the loads of a
        /// straight line all before the first multiply-add (256 live floats for 16 kk), and ptxas then spills (measured: 1 KB
        /// of stack).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<Float4> aS4, ArrayView<Float4> bS4, int buffer, int ty, int tx)
        {
            // A view a trip, at this thread's first group of the trip's kk: every load is then the view's base plus a
            // constant, which ptxas folds into the LDS (indices recomputed from kk cost 26 instructions a trip). Each view
            // starts inside the buffer (a view past its end is an error on ILGPU's CPU accelerator).
            var aRow = aS4.SubView(buffer * (ATile / 4) + ReadA(0, ty));
            var bRow = bS4.SubView(buffer * (BTile / 4) + ReadB(0, tx));
            for (int kk = 0; kk < TK; kk += 2)
            {
                var ak = aRow.SubView(kk * (AStride / 4));
                var bk = bRow.SubView(kk * (BStride / 4));
                Mac(ak[0], ak[1], bk[0], bk[TN / 8]);
                Mac(ak[AStride / 4], ak[AStride / 4 + 1], bk[BStride / 4], bk[BStride / 4 + TN / 8]);
            }
        }

        /// <inheritdoc/>
        public static float Stage(float x) => x;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<Float4> aS4, ArrayView<Float4> bS4, int buffer, int tid) =>
            Step(aS4, bS4, buffer, tid / (TN / ColsPerThread), tid % (TN / ColsPerThread));

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int m0,
            int col0, int tid) where TOp : struct, ITileOperands =>
            Emit<TOp>(t, c, e0, e1, e2, split, m0 + RowsPerThread * (tid / (TN / ColsPerThread)), col0 + 4 * (tid % (TN / ColsPerThread)));

        /// <summary>The outer product of the register tile's eight rows of A (a0, a1) and eight columns of B (b0, b1), added in.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private void Mac(Float4 a0, Float4 a1, Float4 b0, Float4 b1)
        {
            _c00 += a0.X * b0.X; _c01 += a0.X * b0.Y; _c02 += a0.X * b0.Z; _c03 += a0.X * b0.W; _c04 += a0.X * b1.X; _c05 += a0.X * b1.Y; _c06 += a0.X * b1.Z; _c07 += a0.X * b1.W;
            _c10 += a0.Y * b0.X; _c11 += a0.Y * b0.Y; _c12 += a0.Y * b0.Z; _c13 += a0.Y * b0.W; _c14 += a0.Y * b1.X; _c15 += a0.Y * b1.Y; _c16 += a0.Y * b1.Z; _c17 += a0.Y * b1.W;
            _c20 += a0.Z * b0.X; _c21 += a0.Z * b0.Y; _c22 += a0.Z * b0.Z; _c23 += a0.Z * b0.W; _c24 += a0.Z * b1.X; _c25 += a0.Z * b1.Y; _c26 += a0.Z * b1.Z; _c27 += a0.Z * b1.W;
            _c30 += a0.W * b0.X; _c31 += a0.W * b0.Y; _c32 += a0.W * b0.Z; _c33 += a0.W * b0.W; _c34 += a0.W * b1.X; _c35 += a0.W * b1.Y; _c36 += a0.W * b1.Z; _c37 += a0.W * b1.W;
            _c40 += a1.X * b0.X; _c41 += a1.X * b0.Y; _c42 += a1.X * b0.Z; _c43 += a1.X * b0.W; _c44 += a1.X * b1.X; _c45 += a1.X * b1.Y; _c46 += a1.X * b1.Z; _c47 += a1.X * b1.W;
            _c50 += a1.Y * b0.X; _c51 += a1.Y * b0.Y; _c52 += a1.Y * b0.Z; _c53 += a1.Y * b0.W; _c54 += a1.Y * b1.X; _c55 += a1.Y * b1.Y; _c56 += a1.Y * b1.Z; _c57 += a1.Y * b1.W;
            _c60 += a1.Z * b0.X; _c61 += a1.Z * b0.Y; _c62 += a1.Z * b0.Z; _c63 += a1.Z * b0.W; _c64 += a1.Z * b1.X; _c65 += a1.Z * b1.Y; _c66 += a1.Z * b1.Z; _c67 += a1.Z * b1.W;
            _c70 += a1.W * b0.X; _c71 += a1.W * b0.Y; _c72 += a1.W * b0.Z; _c73 += a1.W * b0.W; _c74 += a1.W * b1.X; _c75 += a1.W * b1.Y; _c76 += a1.W * b1.Z; _c77 += a1.W * b1.W;
        }

        /// <summary>Writes the tile through <typeparamref name="TOp"/>'s epilogue: rows r0 + i, columns q0 + j and q0 + 64 + j.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int r0,
            int q0) where TOp : struct, ITileOperands
        {
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 0, q0, _c00, _c01, _c02, _c03);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 0, q0 + TN / 2, _c04, _c05, _c06, _c07);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 1, q0, _c10, _c11, _c12, _c13);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 1, q0 + TN / 2, _c14, _c15, _c16, _c17);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 2, q0, _c20, _c21, _c22, _c23);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 2, q0 + TN / 2, _c24, _c25, _c26, _c27);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 3, q0, _c30, _c31, _c32, _c33);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 3, q0 + TN / 2, _c34, _c35, _c36, _c37);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 4, q0, _c40, _c41, _c42, _c43);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 4, q0 + TN / 2, _c44, _c45, _c46, _c47);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 5, q0, _c50, _c51, _c52, _c53);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 5, q0 + TN / 2, _c54, _c55, _c56, _c57);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 6, q0, _c60, _c61, _c62, _c63);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 6, q0 + TN / 2, _c64, _c65, _c66, _c67);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 7, q0, _c70, _c71, _c72, _c73);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 7, q0 + TN / 2, _c74, _c75, _c76, _c77);
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
    public static Gather KOfA(TileArgs t, int kd) => new(kd * t.Mat.ACol);

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather row, Gather k) => row.Base + k.Base;

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => new(col * t.Mat.BCol);

    /// <inheritdoc/>
    public static Gather KOfB(TileArgs t, int kd) => new(kd * t.Mat.BRow);

    /// <inheritdoc/>
    public static Gather NextKOfB(TileArgs t, Gather k) => new(k.Base + t.Mat.BRow);

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather column, Gather k) => column.Base + k.Base;

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> bias, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int col,
        float acc)
    {
        int i = m * t.Cols + col;
        float v = t.HasBias != 0 ? acc + bias[col] : acc;
        c[i] = t.Accumulate != 0 ? c[i] + v : v;
    }
}
