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
/// How one product gathers its operands and writes its result. Static abstract members, so each op compiles into
/// its own kernel with the gathers inlined (ILGPU's StaticAbstractInterfaceMembers pattern).
/// </summary>
public interface ITileOperands
{
    /// <summary>True when A(m, kd) and A(m, kd + 1) are neighbours in memory: the tile load then walks kd fastest
    /// (coalesced on a GPU); otherwise it walks m fastest.</summary>
    static abstract bool AAlongK(TileArgs t);

    /// <summary>True when B(kd, col) and B(kd + 1, col) are neighbours in memory (else cols are).</summary>
    static abstract bool BAlongK(TileArgs t);

    /// <summary>A(m, kd), with 0 ≤ m &lt; M and 0 ≤ kd &lt; Kd.</summary>
    static abstract float LoadA(TileArgs t, ArrayView<float> a, int m, int kd);

    /// <summary>B(kd, col), with 0 ≤ kd &lt; Kd and 0 ≤ col &lt; Cols (zero for a padding tap).</summary>
    static abstract float LoadB(TileArgs t, ArrayView<float> b, int kd, int col);

    /// <summary>Writes C(m, col) = <paramref name="acc"/> through the op's epilogue; <paramref name="split"/> is the
    /// K split that computed it. e0, e1 and e2 are the op's extra operands (bias, channel bias, residual).</summary>
    static abstract void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int col, float acc);
}

/// <summary>The tiled, explicitly grouped GEMM kernel and its launch geometry (see the file header for the tiling).</summary>
public static class TiledGemm
{
    /// <summary>Output tile rows, columns, and K step (shared-memory depth).</summary>
    public const int TM = 64, TN = 64, TK = 16;

    /// <summary>Register tiles per output tile (16 x 16 of 4 x 4 outputs): the group size on a GPU.</summary>
    public const int Threads = TM / 4 * (TN / 4);

    /// <summary>
    /// Row strides of the shared tiles aS [TK][AStride] and bS [TK][BStride]: two floats of padding a row, so a warp's
    /// stores along K (lane → kk = lane % 16, row = r0 + lane / 16) fall in 32 different banks ((2·kk + row) mod 32), where
    /// a stride of 64 put all 16 kk of a row in one bank (16-way conflicts). Reads along a row stay consecutive words.
    /// </summary>
    public const int AStride = TM + 2, BStride = TN + 2;

    /// <summary>Shared memory one group declares: aS and bS, the row sums and the last-group flag.</summary>
    public const int SharedBytes = (TK * AStride + TK * BStride + TM) * sizeof(float) + sizeof(int);

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
    /// epilogue. a, b: the operands TOp reads; c: the output (or partials); e0, e1, e2: epilogue extras; with splits, e0
    /// receives the finished sum and e1 the finished row sums; counters: one arrival counter per output tile, zero
    /// between launches.
    /// </summary>
    internal static void Kernel<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<int> counters, TileArgs t) where TOp : struct, ITileOperands
    {
        var aS = SharedMemory.Allocate<float>(TK * AStride); // [TK][AStride]: TM used a row
        var bS = SharedMemory.Allocate<float>(TK * BStride); // [TK][BStride]
        var rowS = SharedMemory.Allocate<float>(TM);    // this tile's row sums of A, when asked
        var last = SharedMemory.Allocate<int>(1);
        int split = Grid.IdxZ, tid = Group.IdxX, groupSize = Group.DimX, m0 = Grid.IdxY * TM;
        int kBegin = split * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        // Row r of the tile's sums belongs to thread r mod G for the whole launch, so the sums need no barrier of their own.
        bool rowSums = t.RowSums != 0 && Grid.IdxX == 0;
        if (rowSums)
        {
            for (int r = tid; r < TM; r += groupSize)
            {
                rowS[r] = 0;
            }
        }
        if (groupSize == Threads)
        {
            Pipelined<TOp>(a, b, c, e0, e1, e2, t, aS, bS, rowS, rowSums, kBegin, kEnd);
        }
        else
        {
            InPasses<TOp>(a, b, c, e0, e1, e2, t, aS, bS, rowS, rowSums, kBegin, kEnd);
        }
        if (rowSums)
        {
            for (int r = tid; r < TM; r += groupSize)
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

    /// <summary>rowS[r] += Σ_kk aS[kk][r] for the rows r this thread owns (r ≡ tid mod G): the row sums of A, a K step at a time.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddRowSums(ArrayView<float> aS, ArrayView<float> rowS)
    {
        for (int r = Group.IdxX; r < TM; r += Group.DimX)
        {
            float sum = 0;
            for (int kk = 0; kk < TK; kk++)
            {
                sum += aS[ReadA(kk, r, 0)];
            }
            rowS[r] += sum;
        }
    }

    /// <summary>
    /// The GPU path (a group of 256, one register tile a thread): each thread owns 4 elements of each shared tile and
    /// fetches the next K step's into registers (pa0..pa3, pb0..pb3) before computing on the current one, so the
    /// global loads' latency hides behind the 256 multiply-adds of the step instead of stalling at the barrier.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Pipelined<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, TileArgs t, ArrayView<float> aS, ArrayView<float> bS, ArrayView<float> rowS, bool rowSums, int kBegin, int kEnd)
        where TOp : struct, ITileOperands
    {
        int tid = Group.IdxX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        var acc = default(Tile4x4);
        int k0 = kBegin;
        float pa0 = FetchA<TOp>(t, a, m0, k0, kEnd, aAlongK, tid), pa1 = FetchA<TOp>(t, a, m0, k0, kEnd, aAlongK, tid + Threads);
        float pa2 = FetchA<TOp>(t, a, m0, k0, kEnd, aAlongK, tid + 2 * Threads), pa3 = FetchA<TOp>(t, a, m0, k0, kEnd, aAlongK, tid + 3 * Threads);
        float pb0 = FetchB<TOp>(t, b, col0, k0, kEnd, bAlongK, tid), pb1 = FetchB<TOp>(t, b, col0, k0, kEnd, bAlongK, tid + Threads);
        float pb2 = FetchB<TOp>(t, b, col0, k0, kEnd, bAlongK, tid + 2 * Threads), pb3 = FetchB<TOp>(t, b, col0, k0, kEnd, bAlongK, tid + 3 * Threads);
        for (; k0 < kEnd; k0 += TK)
        {
            aS[SlotA(aAlongK, tid)] = pa0;
            aS[SlotA(aAlongK, tid + Threads)] = pa1;
            aS[SlotA(aAlongK, tid + 2 * Threads)] = pa2;
            aS[SlotA(aAlongK, tid + 3 * Threads)] = pa3;
            bS[SlotB(bAlongK, tid)] = pb0;
            bS[SlotB(bAlongK, tid + Threads)] = pb1;
            bS[SlotB(bAlongK, tid + 2 * Threads)] = pb2;
            bS[SlotB(bAlongK, tid + 3 * Threads)] = pb3;
            Group.Barrier();
            int next = k0 + TK;
            if (next < kEnd)
            {
                pa0 = FetchA<TOp>(t, a, m0, next, kEnd, aAlongK, tid);
                pa1 = FetchA<TOp>(t, a, m0, next, kEnd, aAlongK, tid + Threads);
                pa2 = FetchA<TOp>(t, a, m0, next, kEnd, aAlongK, tid + 2 * Threads);
                pa3 = FetchA<TOp>(t, a, m0, next, kEnd, aAlongK, tid + 3 * Threads);
                pb0 = FetchB<TOp>(t, b, col0, next, kEnd, bAlongK, tid);
                pb1 = FetchB<TOp>(t, b, col0, next, kEnd, bAlongK, tid + Threads);
                pb2 = FetchB<TOp>(t, b, col0, next, kEnd, bAlongK, tid + 2 * Threads);
                pb3 = FetchB<TOp>(t, b, col0, next, kEnd, bAlongK, tid + 3 * Threads);
            }
            acc.Step(aS, bS, tid / 16, tid % 16);
            if (rowSums)
            {
                AddRowSums(aS, rowS);
            }
            Group.Barrier();
        }
        acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0 + tid / 16, col0 + tid % 16);
    }

    /// <summary>
    /// Any power-of-two group G below 256 (the simulators): the group computes the tile's 256 register tiles in
    /// 256 / G passes, each pass a full sweep over K with cooperative, strided tile loads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void InPasses<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, TileArgs t, ArrayView<float> aS, ArrayView<float> bS, ArrayView<float> rowS, bool rowSums, int kBegin, int kEnd)
        where TOp : struct, ITileOperands
    {
        int tid = Group.IdxX, groupSize = Group.DimX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        int passes = Threads / groupSize;
        for (int pass = 0; pass < passes; pass++)
        {
            int sub = pass * groupSize + tid; // which register tile: rows rm + 16·i, cols cn + 16·j
            var acc = default(Tile4x4);
            for (int k0 = kBegin; k0 < kEnd; k0 += TK)
            {
                for (int e = tid; e < TK * TM; e += groupSize)
                {
                    aS[SlotA(aAlongK, e)] = FetchA<TOp>(t, a, m0, k0, kEnd, aAlongK, e);
                }
                for (int e = tid; e < TK * TN; e += groupSize)
                {
                    bS[SlotB(bAlongK, e)] = FetchB<TOp>(t, b, col0, k0, kEnd, bAlongK, e);
                }
                Group.Barrier();
                acc.Step(aS, bS, sub / 16, sub % 16);
                if (rowSums && pass == 0)
                {
                    AddRowSums(aS, rowS);
                }
                Group.Barrier();
            }
            acc.Emit<TOp>(t, c, e0, e1, e2, Grid.IdxZ, m0 + sub / 16, col0 + sub % 16);
        }
    }

    // The shared tiles' addressing, as plain functions the kernel calls and the bank-conflict test walks a warp through.
    // Element e (0..1023) of a shared tile: along K, kk = e % 16 runs fastest (neighbouring threads read neighbouring
    // kd); otherwise the row (A) or column (B) index runs fastest. Both tiles are stored [kk][row or column], rows
    // AStride and BStride apart.

    /// <summary>Where element <paramref name="e"/> of the A tile is stored.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int SlotA(bool alongK, int e) => alongK ? (e % TK) * AStride + e / TK : (e / TM) * AStride + e % TM;

    /// <summary>Where element <paramref name="e"/> of the B tile is stored.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int SlotB(bool alongK, int e) => alongK ? (e % TK) * BStride + e / TK : (e / TN) * BStride + e % TN;

    /// <summary>Where aS[kk][rm + 16·i] is (a register tile's rows are rm + 16·i).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadA(int kk, int rm, int i) => kk * AStride + rm + 16 * i;

    /// <summary>Where bS[kk][cn + 16·j] is.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int ReadB(int kk, int cn, int j) => kk * BStride + cn + 16 * j;

    /// <summary>A(m0 + row, k0 + kk) for element e of the A tile, 0 past M or past this split's K range.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float FetchA<TOp>(TileArgs t, ArrayView<float> a, int m0, int k0, int kEnd, bool alongK, int e) where TOp : struct, ITileOperands
    {
        int m = m0 + (alongK ? e / TK : e % TM), kd = k0 + (alongK ? e % TK : e / TM);
        return m < t.M && kd < kEnd ? TOp.LoadA(t, a, m, kd) : 0f;
    }

    /// <summary>B(k0 + kk, col0 + column) for element e of the B tile, 0 past Cols or past this split's K range.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float FetchB<TOp>(TileArgs t, ArrayView<float> b, int col0, int k0, int kEnd, bool alongK, int e) where TOp : struct, ITileOperands
    {
        int col = col0 + (alongK ? e / TK : e % TN), kd = k0 + (alongK ? e % TK : e / TN);
        return col < t.Cols && kd < kEnd ? TOp.LoadB(t, b, kd, col) : 0f;
    }

    /// <summary>A thread's 4 x 4 register tile: rows rm + 16·i, columns cn + 16·j, as 16 scalar fields (a struct
    /// local, so ILGPU keeps each in a register; the PTX test checks that nothing lands in .local).</summary>
    private struct Tile4x4
    {
        private float _c00, _c01, _c02, _c03, _c10, _c11, _c12, _c13, _c20, _c21, _c22, _c23, _c30, _c31, _c32, _c33;

        /// <summary>C += aS[:, rows]ᵀ · bS[:, cols] over the TK rows of the shared tiles.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<float> aS, ArrayView<float> bS, int rm, int cn)
        {
            for (int kk = 0; kk < TK; kk++)
            {
                int ao = ReadA(kk, rm, 0), bo = ReadB(kk, cn, 0);
                float a0 = aS[ao], a1 = aS[ao + 16], a2 = aS[ao + 32], a3 = aS[ao + 48];
                float b0 = bS[bo], b1 = bS[bo + 16], b2 = bS[bo + 32], b3 = bS[bo + 48];
                _c00 += a0 * b0; _c01 += a0 * b1; _c02 += a0 * b2; _c03 += a0 * b3;
                _c10 += a1 * b0; _c11 += a1 * b1; _c12 += a1 * b2; _c13 += a1 * b3;
                _c20 += a2 * b0; _c21 += a2 * b1; _c22 += a2 * b2; _c23 += a2 * b3;
                _c30 += a3 * b0; _c31 += a3 * b1; _c32 += a3 * b2; _c33 += a3 * b3;
            }
        }

        /// <summary>Writes the tile through <typeparamref name="TOp"/>'s epilogue, rows r0 + 16·i, columns q0 + 16·j.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int r0,
            int q0) where TOp : struct, ITileOperands
        {
            Put<TOp>(t, c, e0, e1, e2, split, r0, q0, _c00, _c01, _c02, _c03);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 16, q0, _c10, _c11, _c12, _c13);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 32, q0, _c20, _c21, _c22, _c23);
            Put<TOp>(t, c, e0, e1, e2, split, r0 + 48, q0, _c30, _c31, _c32, _c33);
        }
    }

    /// <summary>One row of a register tile through the epilogue, bounds-checked (cols q0 + 16·j).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int q0,
        float v0, float v1, float v2, float v3) where TOp : struct, ITileOperands
    {
        if (m >= t.M)
        {
            return;
        }
        if (q0 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0, v0);
        if (q0 + 16 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 16, v1);
        if (q0 + 32 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 32, v2);
        if (q0 + 48 < t.Cols) TOp.Store(t, c, e0, e1, e2, split, m, q0 + 48, v3);
    }

    /// <summary>Loads <see cref="Kernel{TOp}"/> for one op as an explicitly grouped kernel (once per accelerator).</summary>
    internal static TileLauncher Load<TOp>(IlgpuKernels k) where TOp : struct, ITileOperands => k.Grouped<TileLauncher>(Kernel<TOp>);

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
    public static float LoadA(TileArgs t, ArrayView<float> a, int m, int kd) => a[m * t.Mat.ARow + kd * t.Mat.ACol];

    /// <inheritdoc/>
    public static float LoadB(TileArgs t, ArrayView<float> b, int kd, int col) => b[kd * t.Mat.BRow + col * t.Mat.BCol];

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> bias, ArrayView<float> e1, ArrayView<float> e2, int split, int m, int col,
        float acc)
    {
        int i = m * t.Cols + col;
        float v = t.HasBias != 0 ? acc + bias[col] : acc;
        c[i] = t.Accumulate != 0 ? c[i] + v : v;
    }
}
