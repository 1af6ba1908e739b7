// Tiled GEMM core for the ILGPU backend: every convolution pass and the linear layer are one product
//   C[M, Cols] = A[M, Kd] · B[Kd, Cols]
// whose operands are gathered on the fly (implicit GEMM: the im2col matrix never exists) by a small op struct
// (ITileOperands), and whose epilogue (bias, time-embedding bias, residual, +=) is that struct's Store.
//
// Tiles (compile-time constants below, chosen for an sm_80/sm_90 SM at fp32):
//   - one group computes a TM x TN = 64 x 128 tile of C, 128 threads, an 8 x 8 register tile each (64 scalar fields:
//     an array indexed in a loop would land in PTX .local memory), read from shared memory as 128-bit loads;
//   - the K dimension advances TK = 16 at a time through two pairs of shared tiles aS [TK][TM + 4] and bS [TK][TN + 4]
//     (double buffering: one barrier a K step), filled cooperatively with predicated loads (zeros past M, Cols and the
//     end of this group's K range), so ragged shapes need no padding;
//   - a convolution's B is gathered through taps (a pixel's base and mask, a tap's offset and bits: the Tap structs
//     below, docs/gpu.md "Taps"): across K the taps of a K step come from a table the host builds once a geometry,
//     along K the tile's column taps sit in shared memory;
//   - grid (ceil(Cols / TN), ceil(M / TM), splits): Grid.IdxZ picks a K range of KChunk (split-K).
// Group size: 128 threads on a GPU (Kernel: launch bounds, software pipelining). A device with smaller groups (ILGPU's
// simulators) runs KernelInPasses: the tile's 128 register tiles kept in shared memory, 128 / G a thread, one shared
// buffer loaded once a K step, the plain IndexA / IndexB gathers (the definitions the taps are tested against).
// Every barrier is reached by every thread of the group the same number of times (the loop bounds depend only on
// the grid and the group size; the GPU path fetches the next K step every trip and stores it unless it was the last),
// so no barrier is divergent.
//
// Two fusions ride on the core, so a layer's backward needs no separate reduction launches:
//   - row sums (TileArgs.RowSums): the groups of the first column tile also add up the rows of A as they pass through
//     shared memory (Σ_kd A(m, kd), in K-step order) into e1[m]: the bias gradient of a convolution (A = dy) and of a
//     linear layer (A = dyᵀ) from the weight gradient's own pass;
//   - split-K finished in the same launch: each group writes its partial tile to the partials buffer, then counts its
//     arrival on the tile's counter (TiledReduce.ArriveLast: a device-wide fence and an atomic add); the group that
//     arrives last adds the tile's partials over the splits in split order, 0, 1, …, and writes the sums through the
//     op's own epilogue (Store). The sum's order is fixed whichever group finishes last, so reruns stay bit-identical.
//     The weight gradient splits its long K; the forward and input gradient split theirs where the tiles alone would
//     leave the chip short of a wave (TiledConv.AcrossSplits).

// The launcher of every tiled GEMM (stream, config, a, b, out, three epilogue views, the split-K partials, the grid's arrival counters, the
// tap table of a tapped across-K B, args): one name for the project, used by Conv2d and Linear as well.
global using TileLauncher = System.Action<ILGPU.Runtime.AcceleratorStream, ILGPU.KernelConfig, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>,
    ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<int>,
    ILGPU.ArrayView<Ddpm.Kernels.Tap>, Ddpm.Kernels.TileArgs>;

using System.Runtime.CompilerServices;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

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
    /// <summary>By P·Q, Q, R·S, S, H·W, W, the stride, and the input and output channels.</summary>
    public readonly FastDiv Pq = new(g.P * g.Q), Q = new(g.Q), Rs = new(g.R * g.S), S = new(g.S), Hw = new(g.H * g.W), W = new(g.W), Stride = new(g.Stride),
        C = new(g.C), K = new(g.K);
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
/// One tap of a convolution's gathered operand (<see cref="ITileOperands.Tapped"/>): the offset it adds to a pixel's base,
/// and its bits, 1 &lt;&lt; r | 1 &lt;&lt; (16 + s) (<see cref="Taps.Bits"/>). A tap reads a pixel when its bits lie inside the pixel's
/// mask: one LOP3 a gathered element, where the bounds test of (h, w) took a dozen instructions.
/// </summary>
public readonly struct Tap(int delta, int bits)
{
    /// <summary>The offset added to the pixel's base.</summary>
    public readonly int Delta = delta;

    /// <summary>1 &lt;&lt; r | 1 &lt;&lt; (16 + s); <see cref="Taps.Nowhere"/> for a tap that reads nothing (past the end of K).</summary>
    public readonly int Bits = bits;
}

/// <summary>A pixel of a tapped operand: its base offset, and the taps that read it as a mask, rows r in bits 0 .. 14 and
/// columns s in bits 16 .. 30 (<see cref="Taps.Mask"/>). Mask 0: no tap reads it (a column past the end).</summary>
public readonly struct TapPixel(int @base, int mask)
{
    /// <summary>The offset a tap's delta is added to.</summary>
    public readonly int Base = @base;

    /// <summary>The rows and columns of taps that read inside the tensor.</summary>
    public readonly int Mask = mask;
}

/// <summary>Two neighbouring taps of a table, 16 bytes: one 128-bit load.</summary>
public struct TapPair
{
    /// <summary>Taps kd and kd + 1 (kd even).</summary>
    public Tap First, Second;
}

/// <summary>The bit arithmetic of taps and pixels (<see cref="Tap"/>, <see cref="TapPixel"/>).</summary>
public static class Taps
{
    /// <summary>The largest kernel height and width the tapped gathers take (a row or column index fits in 4 bits, bit 15
    /// stays free for <see cref="Nowhere"/>). Larger kernels run the simple twins.</summary>
    public const int MaxKernel = 15;

    /// <summary>The bits of a tap that reads nothing: bit 15 is never in a mask.</summary>
    public const int Nowhere = 1 << 15;

    /// <summary>The bits of tap (r, s).</summary>
    public static int Bits(int r, int s) => 1 << r | 1 << (16 + s);

    /// <summary>A pixel's mask from its rows' and columns' bit ranges.</summary>
    public static int Mask(int rows, int columns) => rows | columns << 16;

    /// <summary>Bits lo .. hi - 1 (0 &lt;= lo, hi &lt;= <see cref="MaxKernel"/>); none when hi &lt;= lo.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int Range(int lo, int hi) => hi > lo ? (1 << hi) - (1 << lo) : 0;

    /// <summary>The taps 0 .. size - 1 whose coordinate first + tap lies in [0, extent): a window's rows or columns inside the image.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int Inside(int first, int size, int extent) => Range(Math.Min(Math.Max(-first, 0), size), Math.Max(Math.Min(size, extent - first), 0));

    /// <summary>True when <paramref name="tap"/> reads <paramref name="pixel"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool Reads(TapPixel pixel, Tap tap) => (tap.Bits & ~pixel.Mask) == 0;
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

    /// <summary>The part of A(m, ·)'s addressing that depends on m alone (any m, even past M: it is not loaded then). Its
    /// Base is affine in m (a row stride): the GPU kernel indexes a thread's rows from the first by the stride.</summary>
    static abstract Gather RowOfA(TileArgs t, int m);

    /// <summary>The part of A(·, kd)'s addressing that depends on kd alone (0 ≤ kd &lt; Kd). It must also take any kd below
    /// Kd + 2·TK without reading memory: the GPU kernel fetches a K step ahead, also past the last, and drops those.</summary>
    static abstract Gather KOfA(TileArgs t, int kd);

    /// <summary>Where A(m, kd) is in a, from <paramref name="row"/> = <see cref="RowOfA"/>(m) and <paramref name="k"/> =
    /// <see cref="KOfA"/>(kd), with 0 ≤ m &lt; M and 0 ≤ kd &lt; Kd: an index, not a load, so the kernel's one load an
    /// element is a predicated LDG. A has no structural zeros: never negative. The row's Base plus a part of kd alone.</summary>
    static abstract int IndexA(TileArgs t, Gather row, Gather k);

    /// <summary>The part of B(·, col)'s addressing that depends on col alone (any col, even past Cols).</summary>
    static abstract Gather ColumnOfB(TileArgs t, int col);

    /// <summary>The part of B(kd, ·)'s addressing that depends on kd alone (as <see cref="KOfA"/>, any kd below Kd + 2·TK).</summary>
    static abstract Gather KOfB(TileArgs t, int kd);

    /// <summary>Where B(kd, col) is in b, from <see cref="ColumnOfB"/>(col) and <see cref="KOfB"/>(kd); -1 for a structural
    /// zero (a padding tap).</summary>
    static abstract int IndexB(TileArgs t, Gather column, Gather k);

    /// <summary>
    /// True for a convolution's B: B(kd, col) = b[pixel.Base + tap.Delta] where the tap reads the pixel (<see cref="Taps.Reads"/>),
    /// else 0. Across K the pixel is the column's (<see cref="PixelOfB"/>(col), once a launch) and the tap kd's (a table
    /// the host fills from <see cref="TapOfB"/>, read once a step); along K the pixel is kd's (once a step) and the tap the
    /// column's (a table in shared memory, filled once a launch). The GPU kernel gathers B so; <see cref="IndexB"/> says the
    /// same, and a test holds that they agree.
    /// </summary>
    static abstract bool Tapped { get; }

    /// <summary>True for an op whose launches may ask for the row sums of A (<see cref="TileArgs.RowSums"/>: the weight
    /// gradients' bias gradients); the others compile without them (their registers and their loop's adds).</summary>
    static abstract bool RowSummed { get; }

    /// <summary>The pixel part of B's gather (a tapped op): across K for column <paramref name="i"/>, along K for kd.</summary>
    static abstract TapPixel PixelOfB(TileArgs t, int i);

    /// <summary>A tapped B along K: kd's pixel (<see cref="PixelOfB"/>) from <paramref name="pixels"/>, the host's table of one
    /// image's pixels (<see cref="IlgpuKernels.TapTable{TOp}"/>: PixelOfB of kd = 0 .. <see cref="PixelsPerImage"/> - 1, its
    /// base and mask held as a tap's delta and bits), with the image's offset added: a load and a multiply-add a K step,
    /// where decoding the pixel took ~50 instructions. Ops without a tapped B along K return PixelOfB.</summary>
    static abstract TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels);

    /// <summary>The pixels of one image along K, the length of <see cref="PixelOfBFromTable"/>'s table; 0 for an op without a
    /// tapped B along K.</summary>
    static abstract int PixelsPerImage(TileArgs t);

    /// <summary>The tap part of B's gather (a tapped op): across K for kd <paramref name="j"/>, along K for column j. Its
    /// Delta is never negative (a GPU offsets the pixel's view by it as an unsigned 32-bit index); a pixel's Base may be.</summary>
    static abstract Tap TapOfB(TileArgs t, int j);

    /// <summary>
    /// True for a tapped B across K whose K steps are each one tap (kd = tap·channels + channel, the channels a multiple of
    /// <see cref="TiledGemm.TK"/>): a step's 16 elements of a column are its pixel shifted by the tap of the step's first kd,
    /// channel j at j·<see cref="ChannelStride"/> on, so the GPU kernel reads one table entry and tests one tap a step
    /// (docs/gpu.md, "K steps of one tap"). Such an op's A is row-major with rows a multiple of 4 long and 16-byte
    /// aligned: a thread loads its 8 A elements as two 128-bit loads.
    /// </summary>
    static abstract bool TapSteps { get; }

    /// <summary>
    /// True for a tapped B along K whose columns are tap-major (column tap·C + c, C a multiple of 64: the weight gradient's
    /// <see cref="ConvWeightTapTile"/>): each half of a thread's 16 columns (line + 8·j, j &lt; 8, and the 64 after) is one
    /// tap's channels, <see cref="ChannelStride"/>·8 apart, so the GPU kernel tests one tap a half and chains the loads,
    /// where the columns' taps came from shared memory one an element.
    /// </summary>
    static abstract bool TapColumns { get; }

    /// <summary>With <see cref="TapSteps"/> or <see cref="TapColumns"/>: the offset between two channels of a pixel in b (0
    /// for other ops).</summary>
    static abstract int ChannelStride(TileArgs t);

    /// <summary>Writes C(m, col) = <paramref name="acc"/>, the whole sum over K, through the op's epilogue. e0, e1 and e2 are
    /// the op's extra operands (bias, channel bias, residual). With splits the kernel writes each split's partial sum to
    /// the partials buffer itself and calls this once with the finished sum.</summary>
    static abstract void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int m, int col, float acc);
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

    /// <summary>kk the FFMA core's multiply-add loop does a trip (written out four times in its body): four 128-bit shared
    /// loads and 64 FFMA each. Four, not two: the loop's addressing and branch are then 13-17 instructions in ~287, not 19
    /// in 147; not sixteen: ILGPU places a straight line's loads before its first multiply-add, and 256 live operands spill.</summary>
    public const int KkPerTrip = 4;

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

    /// <summary>Shared memory the GPU kernel's group declares: two A and two B tiles, the row sums, the column taps and the
    /// last-group flag.</summary>
    public const int SharedBytes = (2 * ATile + 2 * BTile + TM) * sizeof(float) + TN * 2 * sizeof(int) + sizeof(int);

    /// <summary>Shared memory <see cref="KernelInPasses{TOp}"/> declares a group: one A and one B tile, the row sums, the
    /// last-group flag and the 128 register tiles (45,828 B). A device with groups under 128 and less shared memory a group
    /// cannot run the tiled kernels (none is known: OpenCL GPUs allow groups of 256 or more).</summary>
    public const int InPassesSharedBytes = (ATile + BTile + TM + 1) * sizeof(float) + Threads * RowsPerThread * ColsPerThread * sizeof(float);

    /// <summary>The launch bounds' groups an SM: with 128 threads, 65,536 / (128 · 3) = 170, so ptxas keeps a thread
    /// within 168 registers (64 accumulators, 24 staged elements, 16 operands and the addressing).</summary>
    public const int MinGroupsPerSm = 3;

    /// <summary>The launch bounds of the GPU kernel (.maxntid 128, .minnctapersm 3 in the PTX).</summary>
    public static KernelSpecialization Specialization => new(Threads, MinGroupsPerSm);

    /// <summary>The group size to launch with on <paramref name="accelerator"/>: 128, or the largest power of two
    /// the device allows (a simulator), whose threads then take 128 / G register tiles each.</summary>
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
    /// a, b: the operands TOp reads; c: the output; e0, e1, e2: epilogue extras (with row sums, e1 receives them); partials: the split products, [splits, M, Cols] then [splits, M] row sums (unread with one
    /// split); counters: one arrival counter per output tile, zero between launches.
    /// </summary>
    internal static void Kernel<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<float> partials, ArrayView<int> counters, ArrayView<Tap> taps, TileArgs t) where TOp : struct, ITileOperands
    {
        // Allocated as 16-byte groups, so ILGPU knows the 128-bit loads are aligned; the stores see them as floats.
        var aS4 = SharedMemory.Allocate<Float4>(2 * ATile / 4); // two [TK][AStride] buffers
        var bS4 = SharedMemory.Allocate<Float4>(2 * BTile / 4);
        var rowS = SharedMemory.Allocate<float>(TM);    // this tile's row sums of A, when asked
        var columnTaps = SharedMemory.Allocate<Tap>(TN); // a tapped along-K B's taps of this tile's columns
        var firstReads = SharedMemory.Allocate<int>(2 * Threads); // each thread's first loads of the tiles (FirstReadSlot)
        var last = SharedMemory.Allocate<int>(1);
        bool rowSums = BeginRowSums<TOp>(t, rowS);
        Pipelined<TOp, Tile8x8>(a, b, c, e0, e1, e2, partials, taps, t, aS4, bS4, rowS, columnTaps, firstReads, rowSums);
        Finish<TOp>(c, e0, e1, e2, partials, counters, t, rowS, rowSums, last);
    }

    /// <summary>
    /// The same product for a device whose groups are smaller than <see cref="Threads"/> (ILGPU's simulators: any power
    /// of two G &lt; 128): each thread computes 128 / G of the tile's register tiles, kept in shared memory (<see cref="InPasses{TOp}"/>).
    /// </summary>
    internal static void KernelInPasses<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<float> partials, ArrayView<int> counters, ArrayView<Tap> taps, TileArgs t) where TOp : struct, ITileOperands
    {
        var aS4 = SharedMemory.Allocate<Float4>(ATile / 4);
        var bS4 = SharedMemory.Allocate<Float4>(BTile / 4);
        var rowS = SharedMemory.Allocate<float>(TM);
        var last = SharedMemory.Allocate<int>(1);
        var accs = SharedMemory.Allocate<Tile8x8>(Threads);
        bool rowSums = BeginRowSums<TOp>(t, rowS);
        InPasses<TOp>(a, b, c, e0, e1, e2, partials, t, aS4, bS4, rowS, rowSums, accs);
        Finish<TOp>(c, e0, e1, e2, partials, counters, t, rowS, rowSums, last);
    }

    /// <summary>Zeroes this tile's row sums when it takes them (the first column tile's groups, with
    /// <see cref="TileArgs.RowSums"/>). Row r belongs to thread r mod G for the whole launch, so the sums need no barrier
    /// of their own.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool BeginRowSums<TOp>(TileArgs t, ArrayView<float> rowS) where TOp : struct, ITileOperands
    {
        bool rowSums = TOp.RowSummed && t.RowSums != 0 && Grid.IdxX == 0;
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
    internal static void Finish<TOp>(ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials,
        ArrayView<int> counters, TileArgs t, ArrayView<float> rowS, bool rowSums, ArrayView<int> last) where TOp : struct, ITileOperands
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
                        partials[(long)t.Splits * t.M * t.Cols + (long)split * t.M + m] = rowS[r];
                    }
                }
            }
        }
        if (t.Splits > 1)
        {
            FinishSplits<TOp>(c, e0, e1, e2, partials, counters, last, t);
        }
    }

    /// <summary>
    /// After a split group has written its partial tile (and row sums): the last of the tile's groups to arrive adds the
    /// partials over the splits, in split order, and writes each sum through the op's epilogue (and adds the row sums into
    /// e1). Every thread of the group calls it.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FinishSplits<TOp>(ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials,
        ArrayView<int> counters, ArrayView<int> last, TileArgs t) where TOp : struct, ITileOperands
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
                TOp.Store(t, c, e0, e1, e2, m, col, sum);
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

    /// <summary>rowS[r] += Σ_kk aS[kk][r] for the rows r this thread owns (r ≡ tid mod G), from the A buffer at float offset
    /// <paramref name="buffer"/>: on a GPU once, over the sums of each kk the threads kept in registers; in
    /// <see cref="InPasses{TOp}"/> (a small group) a K step at a time, through <see cref="ITileAccumulator.AsRead"/> (<paramref name="asRead"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddRowSums<TAcc>(ArrayView<float> aS, int buffer, ArrayView<float> rowS, bool asRead = true) where TAcc : struct, ITileAccumulator
    {
        for (int r = Group.IdxX; r < TM; r += Group.DimX)
        {
            float sum = 0;
            for (int kk = 0; kk < TK; kk++)
            {
                float v = aS[buffer + TAcc.RowSumSlot(kk, r)];
                sum += asRead ? TAcc.AsRead(v) : v;
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
    ///     before the loop; the columns of B (16: too many registers to keep) at each element, or for a tapped B (the
    ///     weight gradient) from the column taps the group put in shared memory once;
    ///   - a tapped B across K (forward, input gradient) keeps its column's pixel and reads the step's taps from the table.
    /// The shared tiles are double-buffered: step s computes on buffer s mod 2 while the next step's elements, fetched
    /// into registers before the multiply-adds (their latency hides behind them), are stored into the other buffer; one
    /// barrier a step. Safe: a buffer is written one step after the barrier that ended its last reads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Pipelined<TOp, TAcc>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<float> partials, ArrayView<Tap> taps, TileArgs t, ArrayView<Float4> aS4, ArrayView<Float4> bS4, ArrayView<float> rowS,
        ArrayView<Tap> columnTaps, ArrayView<int> firstReads, bool rowSums)
        where TOp : struct, ITileOperands where TAcc : struct, ITileAccumulator
    {
        int tid = Group.IdxX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        int kBegin = Grid.IdxZ * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        var aS = aS4.Cast<float>();
        var bS = bS4.Cast<float>();
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        if (TOp.Tapped && bAlongK && !TOp.TapColumns)
        {
            // The taps of this tile's columns, once a launch (a uniform branch: every thread reaches the barrier).
            int col = col0 + tid;
            columnTaps[tid] = col < t.Cols ? TOp.TapOfB(t, col) : new Tap(0, Taps.Nowhere);
            Group.Barrier();
        }
        var fetch = new Fetcher<TOp>(t, a, b, taps, columnTaps, tid, m0, col0, kEnd, TAcc.FoursRow(tid), TAcc.FoursRowStep, TAcc.FoursQuad(tid));
        var acc = default(TAcc);
        int k0 = kBegin, buffer = 0;
        // This thread's first fragment or register-tile loads, kept in shared memory: held in registers, ptxas recomputed
        // them from tid every K step (~15 instructions of the tensor-core kernels' step); a shared load is one.
        firstReads[FirstReadSlot(0, tid)] = TAcc.FirstReadA(tid);
        firstReads[FirstReadSlot(1, tid)] = TAcc.FirstReadB(tid);
        var first = fetch.Step(k0);
        // Where this thread's elements go: its first element's slot, computed once, then constant offsets (TAcc.OffsetA/B).
        int slotA = TOp.TapSteps ? TAcc.FoursSlot(tid) : TAcc.SlotA(aAlongK, tid), slotB = TAcc.SlotB(bAlongK, tid), slotB8 = slotB + TAcc.OffsetB(bAlongK, 8);
        var firstA = Stage<TAcc>(first.A);
        // The row sums, in registers: each of this thread's 8 A elements has one (kk, row) of the tile in every K step, so
        // sums[j] adds A(row, k0 + kk) over the steps as the thread stages it; the tile's kk are added after the loop.
        var sums = TOp.RowSummed ? AsRead<TAcc>(firstA) : default;
        StoreA<TOp, TAcc>(aS, aS4, 0, slotA, aAlongK, firstA);
        Store8<TAcc>(bS, slotB, false, bAlongK, Stage<TAcc>(first.B0));
        Store8<TAcc>(bS, slotB8, false, bAlongK, Stage<TAcc>(first.B1));
        Group.Barrier();
        for (; k0 < kEnd; k0 += TK)
        {
            int next = k0 + TK;
            bool more = next < kEnd;
            // Fetched whatever `more` says (past the K range every load is predicated off, and a tap table has a K step of
            // padding): values defined inside the loop, where a conditional fetch made them loop-carried and ptxas moved
            // ~26 of them a K step.
            var staged = fetch.Step(next);
            acc.Step(aS4.SubView(buffer * (ATile / 4) + firstReads[FirstReadSlot(0, tid)]),
                bS4.SubView(buffer * (BTile / 4) + firstReads[FirstReadSlot(1, tid)]));
            if (more)
            {
                var stagedA = Stage<TAcc>(staged.A);
                if (TOp.RowSummed)
                {
                    // Every group of a row-summed op adds (8 adds, no branch); only the first column tile's use them.
                    sums = Add(sums, AsRead<TAcc>(stagedA));
                }
                StoreA<TOp, TAcc>(aS, aS4, (1 - buffer) * ATile, slotA, aAlongK, stagedA);
                Store8<TAcc>(bS, (1 - buffer) * BTile + slotB, false, bAlongK, Stage<TAcc>(staged.B0));
                Store8<TAcc>(bS, (1 - buffer) * BTile + slotB8, false, bAlongK, Stage<TAcc>(staged.B1));
            }
            Group.Barrier();
            buffer = 1 - buffer;
        }
        if (rowSums)
        {
            // Every read of the tiles ended at the loop's last barrier: the sums take A's slots in buffer 0, and row r's
            // thread adds its 16 kk in order (a uniform branch: the whole group takes it).
            Store8<TAcc>(aS, slotA, true, aAlongK, sums);
            Group.Barrier();
            AddRowSums<TAcc>(aS, 0, rowS, asRead: false);
        }
        acc.Emit<TOp>(t, c, e0, e1, e2, partials, Grid.IdxZ, m0, col0, tid);
    }

    /// <summary>The entry of an across-K tap table (<see cref="IlgpuKernels.TapTable{TOp}"/>) whose bits are all zero, after the
    /// K step of padding: its first float is a 0 a K step of one tap loads, stride 0, where its tap misses the pixel
    /// (<see cref="PixelView.Channels"/>), so that its 16 loads need no predicate and no zeroing moves.</summary>
    internal static int ZeroTap(TileArgs t) => TileArgs.RoundUp(Math.Max(t.Kd, 1), TK) + TK;

    /// <summary>Where thread <paramref name="tid"/> keeps its first load of the A tile (<paramref name="operand"/> 0) or of the
    /// B tile (1): the addressing the bank-conflict test walks.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int FirstReadSlot(int operand, int tid) => operand * Threads + tid;

    /// <summary>The values the products take of 8 staged elements (<see cref="ITileAccumulator.AsRead"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Floats8 AsRead<TAcc>(Floats8 v) where TAcc : struct, ITileAccumulator => new()
    {
        V0 = TAcc.AsRead(v.V0), V1 = TAcc.AsRead(v.V1), V2 = TAcc.AsRead(v.V2), V3 = TAcc.AsRead(v.V3),
        V4 = TAcc.AsRead(v.V4), V5 = TAcc.AsRead(v.V5), V6 = TAcc.AsRead(v.V6), V7 = TAcc.AsRead(v.V7),
    };

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Floats8 Add(Floats8 x, Floats8 y) => new()
    {
        V0 = x.V0 + y.V0, V1 = x.V1 + y.V1, V2 = x.V2 + y.V2, V3 = x.V3 + y.V3,
        V4 = x.V4 + y.V4, V5 = x.V5 + y.V5, V6 = x.V6 + y.V6, V7 = x.V7 + y.V7,
    };

    /// <summary>A thread's 24 staged elements of one K step (8 of A, 16 of B), in registers.</summary>
    private readonly struct Staged(Floats8 a, Floats8 b0, Floats8 b1)
    {
        public readonly Floats8 A = a, B0 = b0, B1 = b1;
    }

    /// <summary>
    /// What a thread fetches a K step, with every part of the addressing that is fixed for the launch computed once:
    /// across K its one row of A (tid mod 64) and column of B (tid: for a tapped B, its pixel); along K its kk in each
    /// tile, its 8 rows of A and the first of its 16 columns of B (line, line + 8, …).
    /// </summary>
    private readonly struct Fetcher<TOp> where TOp : struct, ITileOperands
    {
        private readonly TileArgs T;
        private readonly ArrayView<float> _a, _b;
        private readonly ArrayView<Tap> _taps, _columnTaps;
        private readonly bool _aAlongK, _bAlongK, _okB;
        private readonly Gather _rowA, _columnB;
        private readonly PixelView _bAt;
        private readonly Rows8<TOp> _rowsA;
        private readonly int _kkA, _kkB, _lineB, _tid, _col0, _kEnd;

        // A loaded in fours (TOp.TapSteps): the thread's first row as 16-byte groups, its second row's offset in groups,
        // its four kd, and which of its rows exist.
        private readonly ArrayView<Float4> _a4;
        private readonly int _a4Step, _quad, _channelStride;
        private readonly bool _row0, _row1;
        private readonly ArrayView<float> _zero;

        // Tap-major columns along K (TOp.TapColumns): the tap of each half of this thread's columns.
        private readonly Tap _tap0, _tap1;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Fetcher(TileArgs t, ArrayView<float> a, ArrayView<float> b, ArrayView<Tap> taps, ArrayView<Tap> columnTaps, int tid, int m0, int col0,
            int kEnd, int foursRow, int foursRowStep, int foursQuad)
        {
            (T, _a, _b, _taps, _columnTaps, _tid, _col0, _kEnd) = (t, a, b, taps, columnTaps, tid, col0, kEnd);
            _aAlongK = TOp.AAlongK(t);
            _bAlongK = TOp.BAlongK(t);
            _rowA = TOp.RowOfA(t, m0 + tid % TM);
            _okB = col0 + tid < t.Cols;
            _columnB = TOp.Tapped ? default : TOp.ColumnOfB(t, col0 + tid);
            _bAt = new PixelView(b, TOp.Tapped && !_bAlongK && _okB ? TOp.PixelOfB(t, col0 + tid) : default);
            _kkA = Element(true, tid, TM).Kk;
            _kkB = Element(true, tid, TN).Kk;
            _lineB = Element(true, tid, TN).Line;
            _rowsA = _aAlongK && !TOp.TapSteps ? new Rows8<TOp>(t, a, m0, Element(true, tid, TM).Line) : default;
            if (TOp.TapColumns)
            {
                // Each half of this thread's columns (line + 8·j and the 64 after) is one tap's channels; a half past the last
                // column reads nothing (C is a multiple of 64: a half is whole or absent). The table's zero follows its pixels.
                int first = col0 + _lineB;
                _tap0 = first < t.Cols ? TOp.TapOfB(t, first) : new Tap(0, Taps.Nowhere);
                _tap1 = first + 64 < t.Cols ? TOp.TapOfB(t, first + 64) : new Tap(0, Taps.Nowhere);
                _channelStride = TOp.ChannelStride(t);
                _zero = taps.Cast<float>().SubView(2 * TOp.PixelsPerImage(t), 1);
            }
            if (TOp.TapSteps)
            {
                // Rows of Kd floats, Kd a multiple of 16, from a 16-byte aligned start (TiledConv's permuted weights).
                int row = m0 + foursRow, groups = t.Kd >> 2;
                _row0 = row < t.M;
                _row1 = row + foursRowStep < t.M;
                _a4 = _row0 ? a.Cast<Float4>().SubView(row * groups) : a.Cast<Float4>();
                _a4Step = foursRowStep * groups;
                _quad = foursQuad;
                _channelStride = TOp.ChannelStride(t);
                _zero = taps.Cast<float>().SubView(2 * ZeroTap(t), 1);
            }
        }

        /// <summary>The elements of the K step at <paramref name="k0"/>.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Staged Step(int k0)
        {
            var a = TOp.TapSteps ? EightOfAInFours(k0) : _aAlongK ? EightOfAAlongK(k0) : EightOfAAcrossK(k0);
            if (TOp.TapSteps)
            {
                // The step's one tap (the table's entry at its first kd), its 16 channels ChannelStride apart.
                _bAt.Channels(_taps[k0], _channelStride, _zero, out var b0, out var b1);
                return new Staged(a, b0, b1);
            }
            if (TOp.Tapped)
            {
                if (_bAlongK)
                {
                    // kd = k0 + kk's pixel, once a step for both halves (no tap reads it past the K range).
                    int kd = k0 + _kkB;
                    var at = new PixelView(_b, kd < _kEnd ? TOp.PixelOfBFromTable(T, kd, _taps) : default);
                    if (TOp.TapColumns)
                    {
                        // Each half one tap of 8 channels, 8 channel strides apart.
                        return new Staged(a, at.Channels8(_tap0, 8 * _channelStride, _zero), at.Channels8(_tap1, 8 * _channelStride, _zero));
                    }
                    return new Staged(a, EightTappedAlongK(at, 0), EightTappedAlongK(at, 8));
                }
                // The step's 16 taps, two a 128-bit load from one address (k0 is even and not negative, and the table's
                // buffer starts 256-byte aligned): computed once for both halves, the loads at constant offsets.
                var entries = _taps.Cast<TapPair>().SubView(k0 >> 1, TK / 2);
                return new Staged(a, EightTappedAcrossK(entries, 0), EightTappedAcrossK(entries, 4));
            }
            return new Staged(a, EightOfB(k0, 0), EightOfB(k0, 8));
        }

        /// <summary>A along K: this thread's kk, rows line + 8·j (their parts hoisted); the kd part once a step.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightOfAAlongK(int k0)
        {
            int kd = k0 + _kkA, ok = kd < _kEnd ? _rowsA.Ok : 0;
            var k = TOp.KOfA(T, kd);
            if (CudaAsm.IsSupported)
            {
                // Each row's element is the last one's plus the rows' stride (the views chained: one wide add an element,
                // where j·stride + k was an integer multiply-add and a wide one). A simulator's views assert against a
                // view past the end, which a row past M would be: there the rows are indexed the plain way.
                long s = _rowsA.Stride;
                var r0 = _rowsA.At.SubView(TOp.IndexA(T, default, k));
                var r1 = r0.SubView(s); var r2 = r1.SubView(s); var r3 = r2.SubView(s); var r4 = r3.SubView(s);
                var r5 = r4.SubView(s); var r6 = r5.SubView(s); var r7 = r6.SubView(s);
                return new Floats8
                {
                    V0 = (ok & 1) != 0 ? r0[0] : 0f, V1 = (ok & 2) != 0 ? r1[0] : 0f, V2 = (ok & 4) != 0 ? r2[0] : 0f, V3 = (ok & 8) != 0 ? r3[0] : 0f,
                    V4 = (ok & 16) != 0 ? r4[0] : 0f, V5 = (ok & 32) != 0 ? r5[0] : 0f, V6 = (ok & 64) != 0 ? r6[0] : 0f, V7 = (ok & 128) != 0 ? r7[0] : 0f,
                };
            }
            return new Floats8
            {
                V0 = (ok & 1) != 0 ? _rowsA.At[TOp.IndexA(T, default, k)] : 0f,
                V1 = (ok & 2) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(1 * _rowsA.Stride), k)] : 0f,
                V2 = (ok & 4) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(2 * _rowsA.Stride), k)] : 0f,
                V3 = (ok & 8) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(3 * _rowsA.Stride), k)] : 0f,
                V4 = (ok & 16) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(4 * _rowsA.Stride), k)] : 0f,
                V5 = (ok & 32) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(5 * _rowsA.Stride), k)] : 0f,
                V6 = (ok & 64) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(6 * _rowsA.Stride), k)] : 0f,
                V7 = (ok & 128) != 0 ? _rowsA.At[TOp.IndexA(T, new Gather(7 * _rowsA.Stride), k)] : 0f,
            };
        }

        /// <summary>A in fours (<see cref="ITileOperands.TapSteps"/>): this thread's two rows at kd k0 + 4·quad .. + 3, a 128-bit
        /// load each (V0 .. V3 the first row's, V4 .. V7 the second's), zero past M or the K range (whole groups: Kd and the
        /// split chunks are multiples of 16).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightOfAInFours(int k0)
        {
            int group = (k0 >> 2) + _quad;
            bool inK = k0 < _kEnd;
            Float4 r0 = inK & _row0 ? _a4[group] : default, r1 = inK & _row1 ? _a4[group + _a4Step] : default;
            return new Floats8 { V0 = r0.X, V1 = r0.Y, V2 = r0.Z, V3 = r0.W, V4 = r1.X, V5 = r1.Y, V6 = r1.Z, V7 = r1.W };
        }

        /// <summary>A across K: this thread's row (hoisted), kk = tid / 64 + 2·j.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightOfAAcrossK(int k0)
        {
            int kd = k0 + _tid / TM;
            bool ok = Grid.IdxY * TM + _tid % TM < T.M;
            return new Floats8
            {
                V0 = AcrossA(kd + 0, ok), V1 = AcrossA(kd + 2, ok), V2 = AcrossA(kd + 4, ok), V3 = AcrossA(kd + 6, ok),
                V4 = AcrossA(kd + 8, ok), V5 = AcrossA(kd + 10, ok), V6 = AcrossA(kd + 12, ok), V7 = AcrossA(kd + 14, ok),
            };
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private float AcrossA(int kd, bool rowOk) => rowOk & kd < _kEnd ? _a[TOp.IndexA(T, _rowA, TOp.KOfA(T, kd))] : 0f;

        /// <summary>A tapped B across K: this thread's pixel (hoisted), the taps of kd = k0 + 2·pair + j from the host's
        /// table, a step's <paramref name="entries"/> (every lane of a warp reads the same entry: one broadcast load). The
        /// table reads nothing past Kd.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightTappedAcrossK(ArrayView<TapPair> entries, int pair)
        {
            TapPair t01 = entries[pair], t23 = entries[pair + 1], t45 = entries[pair + 2], t67 = entries[pair + 3];
            return new Floats8
            {
                V0 = _bAt.Tapped(t01.First), V1 = _bAt.Tapped(t01.Second), V2 = _bAt.Tapped(t23.First), V3 = _bAt.Tapped(t23.Second),
                V4 = _bAt.Tapped(t45.First), V5 = _bAt.Tapped(t45.Second), V6 = _bAt.Tapped(t67.First), V7 = _bAt.Tapped(t67.Second),
            };
        }

        /// <summary>A tapped B along K: the step's pixel (<paramref name="at"/>), the taps of columns line + 8·(first + j) from the
        /// group's shared table.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightTappedAlongK(PixelView at, int first)
        {
            var taps = _columnTaps.SubView(_lineB + 8 * first);
            return new Floats8
            {
                V0 = at.Tapped(taps[0]), V1 = at.Tapped(taps[8]), V2 = at.Tapped(taps[16]), V3 = at.Tapped(taps[24]),
                V4 = at.Tapped(taps[32]), V5 = at.Tapped(taps[40]), V6 = at.Tapped(taps[48]), V7 = at.Tapped(taps[56]),
            };
        }

        /// <summary>An untapped B (a matmul's): elements tid + 128·(first + j), j &lt; 8. Along K they share this thread's kd
        /// part (once a step); across K element j's kd is k0 + first + j.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 EightOfB(int k0, int first)
        {
            var along = _bAlongK ? TOp.KOfB(T, k0 + _kkB) : default;
            return new Floats8
            {
                V0 = UntappedB(along, k0, first + 0), V1 = UntappedB(along, k0, first + 1), V2 = UntappedB(along, k0, first + 2),
                V3 = UntappedB(along, k0, first + 3), V4 = UntappedB(along, k0, first + 4), V5 = UntappedB(along, k0, first + 5),
                V6 = UntappedB(along, k0, first + 6), V7 = UntappedB(along, k0, first + 7),
            };
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private float UntappedB(Gather along, int k0, int j) =>
            FetchB<TOp>(T, _b, _bAlongK, _columnB, _okB, _bAlongK ? along : TOp.KOfB(T, k0 + j), _col0, k0, _kEnd, _tid + j * Threads, j);
    }

    /// <summary>
    /// A tapped operand seen from one pixel: <see cref="Tapped"/> is b[pixel.Base + tap.Delta] where the tap reads the pixel,
    /// else 0. On a GPU the view starts at the pixel, so an element is one wide multiply-add of the delta onto a pointer
    /// ptxas keeps in two registers; b[base + delta] reloaded b's base from the constant bank and added, two instructions
    /// more an element (docs/gpu.md). ILGPU offsets a view by an int as unsigned (mul.wide.u32): a delta is never negative
    /// (<see cref="ITileOperands.TapOfB"/>), and the pixel's base, which may be (forward and weight gradient: a window over
    /// the first image's top or left padding; input gradient: the first image's first rows, shifted back by the taps'
    /// reach), goes in as a long that is no plain conversion of an int (<see cref="Signed"/>), once a launch or a step.
    /// A simulator's views assert against a negative offset: there the same address is taken as b[base + delta].
    /// </summary>
    internal readonly struct PixelView
    {
        private readonly ArrayView<float> _at;
        private readonly TapPixel _pixel;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public PixelView(ArrayView<float> b, TapPixel pixel) => (_at, _pixel) = (CudaAsm.IsSupported ? b.SubView(Signed(pixel.Base)) : b, pixel);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float Tapped(Tap tap) => Taps.Reads(_pixel, tap) ? _at[CudaAsm.IsSupported ? tap.Delta : _pixel.Base + tap.Delta] : 0f;

        /// <summary>The 16 elements of a K step of one tap (<see cref="ITileOperands.TapSteps"/>): channels 0 .. 15 of the step at
        /// the pixel shifted by <paramref name="tap"/>, <paramref name="stride"/> apart; all zero where the tap misses the pixel.
        /// On a GPU each element's address is the last one's plus the stride (the views chained: one wide add and a load an
        /// element, where j·stride was recomputed in 32 bits a step).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Channels(Tap tap, int stride, ArrayView<float> zero, out Floats8 first, out Floats8 second)
        {
            bool reads = Taps.Reads(_pixel, tap);
            if (CudaAsm.IsSupported)
            {
                // Where the tap misses, all 16 loads read the table's zero (stride 0): no predicates, no zeroing moves.
                long s = reads ? stride : 0;
                first = Chained(reads ? _at.SubView(tap.Delta) : zero, s, out var last);
                second = Chained(last.SubView(s), s, out _);
                return;
            }
            int at = _pixel.Base + tap.Delta;
            first = Strided(reads, at, stride);
            second = Strided(reads, at + 8 * stride, stride);
        }

        /// <summary>The 8 elements of a half of tap-major columns along K (<see cref="ITileOperands.TapColumns"/>): channels 0 .. 7
        /// of <paramref name="tap"/> at the pixel, <paramref name="stride"/> apart; all zero where the tap misses the pixel. On a
        /// GPU the loads are chained as <see cref="Channels"/>'s, reading the table's zero (stride 0) where the tap misses.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Floats8 Channels8(Tap tap, int stride, ArrayView<float> zero)
        {
            bool reads = Taps.Reads(_pixel, tap);
            if (CudaAsm.IsSupported)
            {
                return Chained(reads ? _at.SubView(tap.Delta) : zero, reads ? stride : 0, out _);
            }
            return Strided(reads, _pixel.Base + tap.Delta, stride);
        }

        /// <summary>A GPU's 8 loads from <paramref name="v0"/> on, each view the last one's plus <paramref name="s"/> (one wide
        /// add and a load an element); <paramref name="v7"/> is the last view.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static Floats8 Chained(ArrayView<float> v0, long s, out ArrayView<float> v7)
        {
            var v1 = v0.SubView(s); var v2 = v1.SubView(s); var v3 = v2.SubView(s); var v4 = v3.SubView(s);
            var v5 = v4.SubView(s); var v6 = v5.SubView(s);
            v7 = v6.SubView(s);
            return new Floats8 { V0 = v0[0], V1 = v1[0], V2 = v2[0], V3 = v3[0], V4 = v4[0], V5 = v5[0], V6 = v6[0], V7 = v7[0] };
        }

        /// <summary>A simulator's 8 elements b[at + j·stride], j &lt; 8 (<see cref="Channel"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private Floats8 Strided(bool reads, int at, int stride) => new()
        {
            V0 = Channel(reads, at, 0, stride), V1 = Channel(reads, at, 1, stride), V2 = Channel(reads, at, 2, stride), V3 = Channel(reads, at, 3, stride),
            V4 = Channel(reads, at, 4, stride), V5 = Channel(reads, at, 5, stride), V6 = Channel(reads, at, 6, stride), V7 = Channel(reads, at, 7, stride),
        };

        /// <summary>A simulator's element j of <see cref="Channels"/>: b[at + j·stride], bounds-checked by its view.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private float Channel(bool reads, int at, int j, int stride) => reads ? _at[at + j * stride] : 0f;

        /// <summary><paramref name="x"/> sign-extended by shifts: ILGPU folds a plain (long) conversion of an int offset into an
        /// unsigned 32-bit one, which a negative base would turn into an address 16 GiB on.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static long Signed(int x) => (long)x << 32 >> 32;
    }

    /// <summary>
    /// A thread's eight rows of A along K (rows m0 + line + 8·j, j &lt; 8): A from the first row on, the rows' stride, and
    /// which rows exist (bit j). Row j's element at kd part k is At[IndexA(Gather(j·Stride), k)]: a row's base is affine in
    /// m and IndexA adds it (<see cref="ITileOperands.RowOfA"/>), so one view and one stride stand for eight row bases (8
    /// registers) that ptxas recomputed an element from each row's index and a stride it reloaded from the constant bank.
    /// </summary>
    private readonly struct Rows8<TOp> where TOp : struct, ITileOperands
    {
        public readonly ArrayView<float> At;
        public readonly int Stride, Ok;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public Rows8(TileArgs t, ArrayView<float> a, int m0, int line)
        {
            int first = TOp.RowOfA(t, m0 + line).Base;
            Stride = TOp.RowOfA(t, m0 + line + 8).Base - first;
            int left = t.M - (m0 + line); // rows line + 8·j exist while 8·j < left
            Ok = (left > 0 ? 1 : 0) | (left > 8 ? 2 : 0) | (left > 16 ? 4 : 0) | (left > 24 ? 8 : 0) | (left > 32 ? 16 : 0) | (left > 40 ? 32 : 0)
                | (left > 48 ? 64 : 0) | (left > 56 ? 128 : 0);
            At = left > 0 ? a.SubView(first) : a; // a row past M has no element in a: nothing is loaded from it
        }
    }

    /// <summary>Element <paramref name="e"/> of an untapped B tile, with the kd part <paramref name="k"/> (along K: this thread's kk,
    /// computed once a step; across K: element j's, kd = k0 + j). Across K the column is this thread's (<paramref name="columnAcross"/>,
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

    /// <summary>Eight staged elements as the accumulator stores them in shared memory (<see cref="ITileAccumulator.Stage"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Floats8 Stage<TAcc>(Floats8 v) where TAcc : struct, ITileAccumulator => new()
    {
        V0 = TAcc.Stage(v.V0), V1 = TAcc.Stage(v.V1), V2 = TAcc.Stage(v.V2), V3 = TAcc.Stage(v.V3),
        V4 = TAcc.Stage(v.V4), V5 = TAcc.Stage(v.V5), V6 = TAcc.Stage(v.V6), V7 = TAcc.Stage(v.V7),
    };

    /// <summary>A thread's 8 staged elements e, e + 128, …, e + 7·128 of the A tile (<paramref name="ofA"/>) or the B tile,
    /// stored from <paramref name="slot"/> (the buffer's offset plus the accumulator's SlotA or SlotB of e) on, at its
    /// constant offsets (<see cref="ITileAccumulator.OffsetA"/>, <see cref="ITileAccumulator.OffsetB"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store8<TAcc>(ArrayView<float> s, int slot, bool ofA, bool alongK, Floats8 v) where TAcc : struct, ITileAccumulator
    {
        var at = s.SubView(slot);
        at[0] = v.V0;
        at[Offset<TAcc>(ofA, alongK, 1)] = v.V1;
        at[Offset<TAcc>(ofA, alongK, 2)] = v.V2;
        at[Offset<TAcc>(ofA, alongK, 3)] = v.V3;
        at[Offset<TAcc>(ofA, alongK, 4)] = v.V4;
        at[Offset<TAcc>(ofA, alongK, 5)] = v.V5;
        at[Offset<TAcc>(ofA, alongK, 6)] = v.V6;
        at[Offset<TAcc>(ofA, alongK, 7)] = v.V7;
    }

    /// <summary>A thread's 8 staged elements of A into the buffer at float offset <paramref name="buffer"/>: in fours
    /// (<see cref="ITileOperands.TapSteps"/>) by the accumulator's <see cref="ITileAccumulator.StoreFours"/>, else at its
    /// first element's slot and the constant offsets.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreA<TOp, TAcc>(ArrayView<float> aS, ArrayView<Float4> aS4, int buffer, int slotA, bool alongK, Floats8 v)
        where TOp : struct, ITileOperands where TAcc : struct, ITileAccumulator
    {
        if (TOp.TapSteps)
        {
            TAcc.StoreFours(aS, aS4, buffer + slotA, v);
        }
        else
        {
            Store8<TAcc>(aS, buffer + slotA, true, alongK, v);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Offset<TAcc>(bool ofA, bool alongK, int j) where TAcc : struct, ITileAccumulator =>
        ofA ? TAcc.OffsetA(alongK, j) : TAcc.OffsetB(alongK, j);

    /// <summary>
    /// Any power-of-two group G below 128 (the simulators): the tile's 128 register tiles sit in shared memory
    /// (<paramref name="accs"/>; tile sub has rows 8·(sub / 16) + i, cols 4·(sub % 16) + j and 64 + …), thread tid
    /// owning tiles tid, tid + G, …, so each K step loads the shared operand tiles once, with the plain, strided
    /// IndexA / IndexB gathers into one buffer, and every thread adds into its 128 / G tiles between the step's two
    /// barriers. (A sweep over K a tile, as before, loaded each operand tile and waited at each barrier 128 / G times:
    /// on ILGPU's CPU accelerator, whose group threads are OS threads, most of a simulated train step went there.) Each
    /// output still sums its products in kd order, as on the GPU path.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void InPasses<TOp>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1,
        ArrayView<float> e2, ArrayView<float> partials, TileArgs t, ArrayView<Float4> aS4, ArrayView<Float4> bS4, ArrayView<float> rowS, bool rowSums,
        ArrayView<Tile8x8> accs) where TOp : struct, ITileOperands
    {
        int tid = Group.IdxX, groupSize = Group.DimX, col0 = Grid.IdxX * TN, m0 = Grid.IdxY * TM;
        int kBegin = Grid.IdxZ * t.KChunk, kEnd = Math.Min(t.Kd, kBegin + t.KChunk);
        var aS = aS4.Cast<float>();
        var bS = bS4.Cast<float>();
        bool aAlongK = TOp.AAlongK(t), bAlongK = TOp.BAlongK(t);
        int across = TN / ColsPerThread;
        for (int sub = tid; sub < Threads; sub += groupSize)
        {
            accs[sub] = default;
        }
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
            for (int sub = tid; sub < Threads; sub += groupSize)
            {
                accs[sub].Step(aS4.SubView(ReadA(0, sub / across)), bS4.SubView(ReadB(0, sub % across)));
            }
            if (rowSums)
            {
                AddRowSums<Tile8x8>(aS, 0, rowS);
            }
            Group.Barrier();
        }
        for (int sub = tid; sub < Threads; sub += groupSize)
        {
            accs[sub].Emit<TOp>(t, c, e0, e1, e2, partials, Grid.IdxZ, m0 + RowsPerThread * (sub / across), col0 + 4 * (sub % across));
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

    /// <summary>Slot(e + 128) - Slot(e) (a thread's next element, <see cref="Threads"/> on), the same for
    /// every e of the tile: along K the line moves 8 on (kk stays), across K kk moves 128 / lines on (the line stays).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int SlotStep(bool alongK, int lines, int stride) => alongK ? 8 : Threads / lines * stride;

    /// <summary>Where element <paramref name="e"/> of a tile of <paramref name="lines"/> lines, rows <paramref name="stride"/>
    /// floats apart, is stored: kk·stride + line.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int Slot(bool alongK, int e, int lines, int stride)
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

    /// <summary>Where the FFMA core's thread <paramref name="tid"/> stores its first element of A loaded in fours: aS[4q][p]
    /// (<see cref="Tile8x8.FoursRow"/>, <see cref="Tile8x8.FoursQuad"/>); the others are kk and 32 rows on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int FoursSlot(int tid) => 4 * Tile8x8.FoursQuad(tid) * AStride + Tile8x8.FoursRow(tid);

    /// <summary>Where aS[kk][r] is (the row sums' reads, one row a thread).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int RowSumSlot(int kk, int r) => kk * AStride + r;

    /// <summary>A thread's 8 x 8 register tile: rows 8·ty + i, columns 4·tx + j and 64 + 4·tx + j, as 64 scalar fields (a
    /// struct local, so ILGPU keeps each in a register; the compiler table checks that nothing lands in local memory).</summary>
    internal struct Tile8x8 : ITileAccumulator
    {
        private float _c00, _c01, _c02, _c03, _c04, _c05, _c06, _c07, _c10, _c11, _c12, _c13, _c14, _c15, _c16, _c17, _c20, _c21, _c22, _c23, _c24, _c25, _c26, _c27, _c30, _c31, _c32, _c33, _c34, _c35, _c36, _c37, _c40, _c41, _c42, _c43, _c44, _c45, _c46, _c47, _c50, _c51, _c52, _c53, _c54, _c55, _c56, _c57, _c60, _c61, _c62, _c63, _c64, _c65, _c66, _c67, _c70, _c71, _c72, _c73, _c74, _c75, _c76, _c77;

        /// <summary>C += aS[:, rows]ᵀ · bS[:, cols] over the 16 kk of a buffer of the shared tiles, from views at this thread's first loads:
        /// four 128-bit loads and 64 multiply-adds a kk, KkPerTrip kk a trip. A loop, not written out: ILGPU places the loads of a
        /// straight line all before the first multiply-add (256 live floats for 16 kk), and ptxas then spills (measured: 1 KB
        /// of stack).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<Float4> aRow, ArrayView<Float4> bRow)
        {
            // A view a trip, at this thread's first group of the trip's kk: every load is then the view's base plus a
            // constant, which ptxas folds into the LDS (indices recomputed from kk cost 26 instructions a trip). Each view
            // starts inside the buffer (a view past its end is an error on ILGPU's CPU accelerator).
            for (int kk = 0; kk < TK; kk += KkPerTrip)
            {
                var ak = aRow.SubView(kk * (AStride / 4));
                var bk = bRow.SubView(kk * (BStride / 4));
                Mac(ak[0], ak[1], bk[0], bk[TN / 8]);
                Mac(ak[AStride / 4], ak[AStride / 4 + 1], bk[BStride / 4], bk[BStride / 4 + TN / 8]);
                Mac(ak[2 * AStride / 4], ak[2 * AStride / 4 + 1], bk[2 * BStride / 4], bk[2 * BStride / 4 + TN / 8]);
                Mac(ak[3 * AStride / 4], ak[3 * AStride / 4 + 1], bk[3 * BStride / 4], bk[3 * BStride / 4 + TN / 8]);
            }
        }

        /// <inheritdoc/>
        public static float Stage(float x) => x;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static float AsRead(float staged) => staged;

        /// <inheritdoc/>
        public static int SlotA(bool alongK, int e) => TiledGemm.SlotA(alongK, e);

        /// <inheritdoc/>
        public static int SlotB(bool alongK, int e) => TiledGemm.SlotB(alongK, e);

        /// <inheritdoc/>
        public static int OffsetA(bool alongK, int j) => j * SlotStep(alongK, TM, AStride);

        /// <inheritdoc/>
        public static int OffsetB(bool alongK, int j) => j * SlotStep(alongK, TN, BStride);

        /// <inheritdoc/>
        public static int RowSumSlot(int kk, int r) => TiledGemm.RowSumSlot(kk, r);

        /// <summary>Rows p and p + 32, kd 4q .. 4q + 3, with p = lane bits 0 .. 3 and warp bit 0, q = lane bit 4 and warp
        /// bit 1: a warp's 32 stores of one element fall in banks (4·4q + p) mod 32 = (16q + p) mod 32, all different
        /// (<see cref="FoursSlot"/>), and its 128-bit loads are 16 rows of 32 bytes.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursRow(int tid) => (tid & 15) | (tid >> 1 & 16);

        /// <inheritdoc/>
        public static int FoursRowStep => 32;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursQuad(int tid) => tid >> 4 & 1 | tid >> 5 & 2;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursSlot(int tid) => TiledGemm.FoursSlot(tid);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void StoreFours(ArrayView<float> aS, ArrayView<Float4> aS4, int slot, Floats8 v)
        {
            var at = aS.SubView(slot);
            at[0] = v.V0;
            at[AStride] = v.V1;
            at[2 * AStride] = v.V2;
            at[3 * AStride] = v.V3;
            at[32] = v.V4;
            at[AStride + 32] = v.V5;
            at[2 * AStride + 32] = v.V6;
            at[3 * AStride + 32] = v.V7;
        }

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FirstReadA(int tid) => ReadA(0, tid >> 4); // tid / 16 (TN / ColsPerThread = 16), as a shift

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FirstReadB(int tid) => ReadB(0, tid & 15);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2,
            ArrayView<float> partials, int split, int m0, int col0, int tid) where TOp : struct, ITileOperands =>
            Emit<TOp>(t, c, e0, e1, e2, partials, split, m0 + RowsPerThread * (tid >> 4), col0 + 4 * (tid & 15));

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
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2,
            ArrayView<float> partials, int split, int r0, int q0) where TOp : struct, ITileOperands
        {
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 0, q0, _c00, _c01, _c02, _c03);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 0, q0 + TN / 2, _c04, _c05, _c06, _c07);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 1, q0, _c10, _c11, _c12, _c13);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 1, q0 + TN / 2, _c14, _c15, _c16, _c17);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 2, q0, _c20, _c21, _c22, _c23);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 2, q0 + TN / 2, _c24, _c25, _c26, _c27);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 3, q0, _c30, _c31, _c32, _c33);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 3, q0 + TN / 2, _c34, _c35, _c36, _c37);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 4, q0, _c40, _c41, _c42, _c43);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 4, q0 + TN / 2, _c44, _c45, _c46, _c47);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 5, q0, _c50, _c51, _c52, _c53);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 5, q0 + TN / 2, _c54, _c55, _c56, _c57);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 6, q0, _c60, _c61, _c62, _c63);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 6, q0 + TN / 2, _c64, _c65, _c66, _c67);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 7, q0, _c70, _c71, _c72, _c73);
            Put<TOp>(t, c, e0, e1, e2, partials, split, r0 + 7, q0 + TN / 2, _c74, _c75, _c76, _c77);
        }
    }

    /// <summary>One row of a register tile through the epilogue, bounds-checked (cols q0 .. q0 + 3).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials,
        int split, int m, int q0, float v0, float v1, float v2, float v3) where TOp : struct, ITileOperands
    {
        if (m >= t.M)
        {
            return;
        }
        if (q0 < t.Cols) Out<TOp>(t, c, e0, e1, e2, partials, split, m, q0, v0);
        if (q0 + 1 < t.Cols) Out<TOp>(t, c, e0, e1, e2, partials, split, m, q0 + 1, v1);
        if (q0 + 2 < t.Cols) Out<TOp>(t, c, e0, e1, e2, partials, split, m, q0 + 2, v2);
        if (q0 + 3 < t.Cols) Out<TOp>(t, c, e0, e1, e2, partials, split, m, q0 + 3, v3);
    }

    /// <summary>One output: through the op's epilogue with one split; with several, this split's partial sum to its slot of
    /// the partials, [splits, M, Cols], which the last group of the tile adds up (<see cref="FinishSplits{TOp}"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void Out<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials,
        int split, int m, int col, float acc) where TOp : struct, ITileOperands
    {
        if (t.Splits == 1)
        {
            TOp.Store(t, c, e0, e1, e2, m, col, acc);
        }
        else
        {
            partials[((long)split * t.M + m) * t.Cols + col] = acc;
        }
    }

    /// <summary>Loads one op's kernel as an explicitly grouped kernel (once per accelerator): <see cref="Kernel{TOp}"/> with
    /// its launch bounds where the device runs groups of 128, else <see cref="KernelInPasses{TOp}"/>.</summary>
    internal static TileLauncher Load<TOp>(IlgpuKernels k) where TOp : struct, ITileOperands =>
        GroupSize(k.Accelerator) == Threads ? k.Grouped<TileLauncher>(Kernel<TOp>, Specialization) : k.Grouped<TileLauncher>(KernelInPasses<TOp>);

    /// <summary>Queues one product on <paramref name="k"/>'s stream. c: the output; e0, e1, e2: the epilogue's views (a view the op
    /// does not read may be any view); with splits, a scratch buffer of <see cref="TileArgs.PartialsLength"/> floats takes
    /// the partial sums for the launch. <paramref name="kernel"/> must be <typeparamref name="TOp"/>'s (its tap table is looked up by
    /// <typeparamref name="TOp"/>).</summary>
    internal static void Launch<TOp>(IlgpuKernels k, TileLauncher kernel, TileArgs t, ArrayView<float> a, ArrayView<float> b, ArrayView<float> c,
        ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2) where TOp : struct, ITileOperands
    {
        if (t.RowSums != 0 && !TOp.RowSummed)
        {
            throw new ArgumentException($"tiled gemm: {typeof(TOp).Name} computes no row sums");
        }
        // An empty output is no work, and an empty grid is a launch error on CUDA.
        if (t.M <= 0 || t.Cols <= 0)
        {
            return;
        }
        int groupSize = GroupSize(k.Accelerator);
        if (groupSize < Threads && k.Accelerator.MaxSharedMemoryPerGroup < InPassesSharedBytes)
        {
            throw new DeviceUnsupportedException($"{k.Accelerator.Name}: groups of at most {k.Accelerator.MaxNumThreadsPerGroup} threads and " +
                $"{k.Accelerator.MaxSharedMemoryPerGroup:N0} bytes of shared memory a group; the tiled kernels need groups of {Threads} or " +
                $"{InPassesSharedBytes:N0} bytes (--gpu-kernels simple runs without them)");
        }
        var config = Config(t, groupSize);
        if (t.Splits > 1 && config.GridDim.X * config.GridDim.Y > k.GridCounters.IntLength)
        {
            throw new InvalidOperationException(
                $"tiled gemm: {config.GridDim.X * config.GridDim.Y} output tiles with {t.Splits} splits, more than the {k.GridCounters.IntLength} arrival counters");
        }
        if (t.Splits == 1)
        {
            kernel(k.Stream, config, a, b, c, e0, e1, e2, c, k.GridCounters, k.TapTable<TOp>(t), t);
            return;
        }
        // Freed once queued: the stream runs the next user of the memory after this launch.
        using var partials = k.Scratch(checked((int)t.PartialsLength));
        kernel(k.Stream, config, a, b, c, e0, e1, e2, partials.View, k.GridCounters, k.TapTable<TOp>(t), t);
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
    public static int IndexB(TileArgs t, Gather column, Gather k) => column.Base + k.Base;

    /// <inheritdoc/>
    public static bool Tapped => false;

    /// <inheritdoc/>
    public static bool RowSummed => true;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => PixelOfB(t, kd);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => 0;

    /// <inheritdoc/>
    public static TapPixel PixelOfB(TileArgs t, int i) => default;

    /// <inheritdoc/>
    public static Tap TapOfB(TileArgs t, int j) => default;

    /// <inheritdoc/>
    public static bool TapSteps => false;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <inheritdoc/>
    public static int ChannelStride(TileArgs t) => 0;

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> bias, ArrayView<float> e1, ArrayView<float> e2, int m, int col,
        float acc)
    {
        int i = m * t.Cols + col;
        float v = t.HasBias != 0 ? acc + bias[col] : acc;
        c[i] = t.Accumulate != 0 ? c[i] + v : v;
    }
}
