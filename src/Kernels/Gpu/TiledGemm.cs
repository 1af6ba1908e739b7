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
// Every barrier is reached by every thread of the group the same number of times (the loop bounds depend only on
// the grid and the group size), so no barrier is divergent.
using System.Runtime.CompilerServices;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;
using TileLauncher = System.Action<ILGPU.Runtime.AcceleratorStream, ILGPU.KernelConfig, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>,
    ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, Ddpm.Kernels.TileArgs>;

namespace Ddpm.Kernels;

/// <summary>
/// Division by a divisor fixed at launch, as a multiply and a shift (Granlund and Montgomery): with l = ⌈log₂ d⌉,
/// s = 31 + l and m = ⌈2^s / d⌉ (which fits in 32 bits), ⌊x·m / 2^s⌋ = ⌊x / d⌋ for every 0 ≤ x &lt; 2^31, because
/// x·(m - 2^s/d) / 2^s &lt; 2^-l ≤ 1/d never carries the fraction of x/d over an integer. On a GPU an integer division
/// by a runtime value is a ~20-instruction sequence; this is a wide multiply and a shift. The gathers divide every
/// loaded index by the image and kernel sizes, so this matters (docs/gpu-conv.md).
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

    /// <summary>Number of K splits (grid depth); above 1 the product goes to a partials buffer [splits, M, Cols].</summary>
    public readonly int Splits;

    /// <summary>The convolution's geometry (convolution ops).</summary>
    public readonly ConvShape Conv;

    /// <summary>The convolution's divisors (convolution ops).</summary>
    public readonly ConvDivisors Div;

    /// <summary>The strided matrix geometry (matmul).</summary>
    public readonly MatmulShape Mat;

    /// <summary>Builds the arguments; <paramref name="kChunk"/> 0 means one split over all of <paramref name="kd"/>.</summary>
    public TileArgs(int m, int cols, int kd, int kChunk, bool accumulate, bool channelBias, ConvShape conv, MatmulShape mat)
    {
        (M, Cols, Kd, Conv, Mat) = (m, cols, kd, conv, mat);
        Div = conv.Stride > 0 ? new ConvDivisors(conv) : default;
        KChunk = kChunk > 0 ? kChunk : RoundUp(Math.Max(kd, 1), TiledGemm.TK);
        Splits = (Math.Max(kd, 1) + KChunk - 1) / KChunk;
        Accumulate = accumulate ? 1 : 0;
        HasChannelBias = channelBias ? 1 : 0;
    }

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
    /// K split that computed it. e0 and e1 are the op's extra operands (bias, channel bias).</summary>
    static abstract void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, int split, int m, int col, float acc);
}

/// <summary>The tiled, explicitly grouped GEMM kernel and its launch geometry (see the file header for the tiling).</summary>
public static class TiledGemm
{
    /// <summary>Output tile rows, columns, and K step (shared-memory depth).</summary>
    public const int TM = 64, TN = 64, TK = 16;

    /// <summary>Register tiles per output tile (16 x 16 of 4 x 4 outputs): the group size on a GPU.</summary>
    public const int Threads = TM / 4 * (TN / 4);

    /// <summary>Shared memory one group declares: aS and bS.</summary>
    public const int SharedBytes = (TK * TM + TK * TN) * sizeof(float);

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
    /// epilogue. a, b: the operands TOp reads; c: the output (or partials); e0, e1: epilogue extras.
    /// </summary>
    internal static void Kernel<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, TileArgs t)
        where TOp : struct, ITileOperands
    {
        var aS = SharedMemory.Allocate<float>(TK * TM); // [TK][TM]
        var bS = SharedMemory.Allocate<float>(TK * TN); // [TK][TN]
        int tid = Group.IdxX, groupSize = Group.DimX;
        int col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM, split = Grid.IdxZ;
        int kBegin = split * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        int passes = Threads / groupSize;
        for (int pass = 0; pass < passes; pass++)
        {
            int sub = pass * groupSize + tid; // which register tile: rows rm + 16·i, cols cn + 16·j
            int rm = sub / 16, cn = sub % 16;
            float c00 = 0, c01 = 0, c02 = 0, c03 = 0;
            float c10 = 0, c11 = 0, c12 = 0, c13 = 0;
            float c20 = 0, c21 = 0, c22 = 0, c23 = 0;
            float c30 = 0, c31 = 0, c32 = 0, c33 = 0;
            for (int k0 = kBegin; k0 < kEnd; k0 += TK)
            {
                for (int e = tid; e < TK * TM; e += groupSize)
                {
                    int mm = aAlongK ? e / TK : e % TM, kk = aAlongK ? e % TK : e / TM;
                    int m = m0 + mm, kd = k0 + kk;
                    aS[kk * TM + mm] = m < t.M && kd < kEnd ? TOp.LoadA(t, a, m, kd) : 0f;
                }
                for (int e = tid; e < TK * TN; e += groupSize)
                {
                    int nn = bAlongK ? e / TK : e % TN, kk = bAlongK ? e % TK : e / TN;
                    int col = col0 + nn, kd = k0 + kk;
                    bS[kk * TN + nn] = col < t.Cols && kd < kEnd ? TOp.LoadB(t, b, kd, col) : 0f;
                }
                Group.Barrier();
                for (int kk = 0; kk < TK; kk++)
                {
                    int ao = kk * TM + rm, bo = kk * TN + cn;
                    float a0 = aS[ao], a1 = aS[ao + 16], a2 = aS[ao + 32], a3 = aS[ao + 48];
                    float b0 = bS[bo], b1 = bS[bo + 16], b2 = bS[bo + 32], b3 = bS[bo + 48];
                    c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                    c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
                    c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
                    c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
                }
                Group.Barrier();
            }
            int r0 = m0 + rm, q0 = col0 + cn;
            Put<TOp>(t, c, e0, e1, split, r0, q0, c00, c01, c02, c03);
            Put<TOp>(t, c, e0, e1, split, r0 + 16, q0, c10, c11, c12, c13);
            Put<TOp>(t, c, e0, e1, split, r0 + 32, q0, c20, c21, c22, c23);
            Put<TOp>(t, c, e0, e1, split, r0 + 48, q0, c30, c31, c32, c33);
        }
    }

    /// <summary>One row of a register tile through the epilogue, bounds-checked (cols q0 + 16·j).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, int split, int m, int q0,
        float v0, float v1, float v2, float v3) where TOp : struct, ITileOperands
    {
        if (m >= t.M)
        {
            return;
        }
        if (q0 < t.Cols) TOp.Store(t, c, e0, e1, split, m, q0, v0);
        if (q0 + 16 < t.Cols) TOp.Store(t, c, e0, e1, split, m, q0 + 16, v1);
        if (q0 + 32 < t.Cols) TOp.Store(t, c, e0, e1, split, m, q0 + 32, v2);
        if (q0 + 48 < t.Cols) TOp.Store(t, c, e0, e1, split, m, q0 + 48, v3);
    }

    /// <summary>Loads <see cref="Kernel{TOp}"/> for one op as an explicitly grouped kernel (once per accelerator).</summary>
    internal static TileLauncher Load<TOp>(IlgpuKernels k) where TOp : struct, ITileOperands => k.Grouped<TileLauncher>(Kernel<TOp>);

    /// <summary>Queues one product on <paramref name="k"/>'s stream.</summary>
    internal static void Launch(IlgpuKernels k, TileLauncher kernel, TileArgs t, ArrayView<float> a, ArrayView<float> b, ArrayView<float> c,
        ArrayView<float> e0, ArrayView<float> e1) =>
        kernel(k.Stream, Config(t, GroupSize(k.Accelerator)), a, b, c, e0, e1, t);

    /// <summary>dst[i] (+)= Σ_s partials[s·len + i] for s = 0, 1, …, splits - 1 in that order: the split-K reduction,
    /// deterministic because each output sums its splits in a fixed order (no atomics). i over dst [len].</summary>
    internal static void ReduceSplitsKernel(Index1D i, ArrayView<float> partials, ArrayView<float> dst, int len, int splits, int accumulate)
    {
        float acc = 0;
        for (int s = 0; s < splits; s++)
        {
            acc += partials[s * len + i];
        }
        dst[i] = accumulate != 0 ? dst[i] + acc : acc;
    }
}

/// <summary>C (=|+=) op(A)·op(B) for <see cref="Linear.Matmul"/>: A(i, p) = a[i·ARow + p·ACol], B(p, j) = b[p·BRow + j·BCol],
/// c [M, N] row-major.</summary>
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
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, int split, int m, int col, float acc)
    {
        int i = m * t.Cols + col;
        c[i] = t.Accumulate != 0 ? c[i] + acc : acc;
    }
}
