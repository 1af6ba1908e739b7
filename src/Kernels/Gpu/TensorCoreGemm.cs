// The tiled GEMM on tensor cores: the same kernel as the FFMA core (TiledGemm.cs: the gathers, the 64 x 128 output tile,
// the double-buffered shared tiles and their stores, the row sums and the split-K finish), with the register tile's
// multiply-adds done by mma.sync.aligned.m16n8k8 with TF32 operands and fp32 accumulators (inline PTX through
// CudaAsm.EmitRef; ILGPU writes .target sm_80, which has it).
//
// Warps: the group's four warps each compute a 32 x 64 piece of the tile (warp w: rows 32·(w mod 2), columns
// 64·(w / 2)), as 2 x 8 mma tiles of 16 x 8, 64 fp32 accumulators a thread: the FFMA core's register budget.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32): lane = 4·g + i (g = groupID, i = threadID_in_group)
//   A (16 x 8, row): a0 (g, i), a1 (g + 8, i), a2 (g, i + 4), a3 (g + 8, i + 4)
//   B (8 x 8, col):  b0 (i, g), b1 (i + 4, g)
//   C (16 x 8):      c0 (g, 2i), c1 (g, 2i + 1), c2 (g + 8, 2i), c3 (g + 8, 2i + 1)
// The shared tiles are as large as the FFMA core's but laid out for the fragments (TiledGemm.PairSlotA, PairSlotB; the
// staging stores write them so): kk in pairs, then 16-byte groups of two rows (columns) by the pair's two kk, so that a
// thread's fragments are whole 128-bit loads, in the mma's register order, without bank conflicts (SharedBankTests):
//   k:       mma k = i is shared kk = kb + 2i, mma k = i + 4 is kk = kb + 2i + 1 (any bijection works if A and B agree);
//   A rows:  row g of mma tile t is the warp's row 2g + 16t, row g + 8 is 2g + 16t + 1: one LDS.128 is a0, a1, a2, a3;
//   B cols:  column g of n-tile j is the warp's column 2·(g + 8·⌊j/2⌋) + j mod 2: one LDS.128 is b0, b1 of two n-tiles.
// Two LDS.128 of A and four of B a k8 step; a quarter-warp's loads fall on 16-byte groups 2i + g (mod 8): eight
// different ones, one wavefront each. With the FFMA core's [kk][row] tiles a fragment came from two loads, and ptxas
// spent ~144 moves a K step putting registers in order.
//
// Modes (MathPrecision): TF32 rounds each operand to TF32 (to nearest, ties away from zero, 10 mantissa bits: what
// cvt.rna.tf32.f32 does) and multiplies once; 3xTF32 splits each operand x into hi = rna(x) and lo = rna(x - hi) and adds
// lo·hi, hi·lo, then hi·hi (the small terms first), dropping lo·lo (below 2^-22 of the product): fp32 accuracy. The
// rounding is half of the operand's TF32 unit added to its magnitude (Tf32.HalfUlp: a LOP3 and an FFMA, where cvt.rna is
// four instructions on sm_90); the tensor core reads the top 19 bits of its operand registers and so finishes it, as
// CUTLASS's conversions count on (Tf32.Read).
//
// On ILGPU's CPU simulator the same kernel runs a managed emulation: the mma from the PTX ISA's fragment table above,
// each operand read as the tensor core reads it, each lane fetching the elements it needs from the lanes that hold them.
// So a warp-32 simulator runs the kernel's own fragment mapping and rounding against the ISA's: a mapping or rounding bug
// fails the kernel tests without a GPU. A simulator loads the mode's emulated twin (EmulatedMath), whose compile leaves
// the mma path out from the start; the kernel itself also emulates wherever CudaAsm.IsSupported is false.
using System.Runtime.CompilerServices;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime.Cuda;

namespace Ddpm.Kernels;

/// <summary>A thread's part of the output tile: the multiply-adds of a K step from the shared tiles, and the epilogue.</summary>
internal interface ITileAccumulator
{
    /// <summary>An operand element as the staging stores it in shared memory (TF32 readies its rounding there, once per
    /// element a group, instead of once per fragment that reads it).</summary>
    static abstract float Stage(float x);

    /// <summary>The value the products take of an element <see cref="Stage"/> stored (TF32: the rounded value the tensor core
    /// reads): the fused row sums add A's tile through it, so the bias gradient sums what the weight gradient multiplies.</summary>
    static abstract float AsRead(float staged);

    /// <summary>Where element e of the A tile (<see cref="TiledGemm.Element"/>: its kk and row) sits in a buffer, in floats:
    /// the layout this accumulator's loads read.</summary>
    static abstract int SlotA(bool alongK, int e);

    /// <summary>Where element e of the B tile (its kk and column) sits in a buffer.</summary>
    static abstract int SlotB(bool alongK, int e);

    /// <summary>SlotA(e + 128·j) - SlotA(e) for a thread's element e = tid (and for e = tid + 128·8 on B): a constant once j
    /// and <paramref name="alongK"/> are, so the staged stores need no addressing of their own.</summary>
    static abstract int OffsetA(bool alongK, int j);

    /// <summary>SlotB(e + 128·j) - SlotB(e), as <see cref="OffsetA"/>.</summary>
    static abstract int OffsetB(bool alongK, int j);

    /// <summary>Where A's kk, row r sits (the fused row sums read a row along kk).</summary>
    static abstract int RowSumSlot(int kk, int r);

    /// <summary>Thread <paramref name="tid"/>'s first 128-bit load of a buffer of the A tile, in Float4s from the buffer's start:
    /// computed once a launch (ptxas recomputed it from tid every K step, ~15 instructions, when Step did).</summary>
    static abstract int FirstReadA(int tid);

    /// <summary>Thread <paramref name="tid"/>'s first 128-bit load of a buffer of the B tile, as <see cref="FirstReadA"/>.</summary>
    static abstract int FirstReadB(int tid);

    /// <summary>Adds the products of the 16 kk of a buffer of the shared tiles, from views at this thread's first loads in it
    /// (<see cref="FirstReadA"/>, <see cref="FirstReadB"/>): every load is then a view's base plus a constant.</summary>
    void Step(ArrayView<Float4> aRow, ArrayView<Float4> bRow);

    /// <summary>A loaded in fours (<see cref="ITileOperands.TapSteps"/>): thread <paramref name="tid"/>'s first row of the A tile;
    /// its two rows are that and <see cref="FoursRowStep"/> on, each at kd 4·<see cref="FoursQuad"/> .. + 3 of the K step.</summary>
    static abstract int FoursRow(int tid);

    /// <summary>The second of a thread's two rows of A loaded in fours, less its first.</summary>
    static abstract int FoursRowStep { get; }

    /// <summary>Which four kd of a K step thread <paramref name="tid"/> loads of its two rows of A (0 .. 3).</summary>
    static abstract int FoursQuad(int tid);

    /// <summary>Where thread <paramref name="tid"/>'s first element of A loaded in fours goes in a buffer (floats), computed once a
    /// launch; <see cref="StoreFours"/> takes it plus the buffer's offset.</summary>
    static abstract int FoursSlot(int tid);

    /// <summary>Stores a thread's 8 elements of A loaded in fours (V0 .. V3: its first row's four kd, V4 .. V7: its second's)
    /// from float <paramref name="slot"/> on (<see cref="FoursSlot"/> plus the buffer's offset), in this accumulator's layout.</summary>
    static abstract void StoreFours(ArrayView<float> aS, ArrayView<Float4> aS4, int slot, Floats8 v);

    /// <summary>Writes this thread's outputs through <typeparamref name="TOp"/>'s epilogue; the tile's corner is (m0, col0).</summary>
    void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials, int split,
        int m0, int col0, int tid) where TOp : struct, ITileOperands;
}

/// <summary>An operand on its way to a tensor core: its TF32 high part and (3xTF32) its TF32 low part.</summary>
public readonly struct Tf32Pair(float hi, float lo)
{
    /// <summary>Registers from which the tensor core reads rna(x) and (3xTF32) rna(x - rna(x)) (<see cref="Tf32.Read"/>).</summary>
    public readonly float Hi = hi, Lo = lo;
}

/// <summary>Four fp32 accumulators of an m16n8 tile (c0..c3 of the fragment table).</summary>
public struct Frag4
{
    /// <summary>c0, c1, c2, c3.</summary>
    public float C0, C1, C2, C3;
}

/// <summary>How a mode feeds the tensor cores: the operand split and the products it adds.</summary>
public interface ITensorMath
{
    /// <summary>An operand element as stored in the shared tile (readied there for the tensor core's rounding, or kept whole
    /// for a later split).</summary>
    static abstract float Stage(float x);

    /// <summary>The value the products take of a stored element (<see cref="ITileAccumulator.AsRead"/>).</summary>
    static abstract float AsRead(float staged);

    /// <summary>The operand's TF32 part(s).</summary>
    static abstract Tf32Pair Split(float x);

    /// <summary>c += A·B for one m16n8k8 tile, from the fragments' parts, on tensor cores.</summary>
    static abstract void Mma(ref Frag4 c, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3, Tf32Pair b0, Tf32Pair b1);

    /// <summary>The same products emulated (<see cref="Tf32.Product{TRead}"/>) from the fragments the warp posted: A's high part at
    /// slot <paramref name="a"/> (low: + <see cref="Tf32.LowA"/>), B's at <paramref name="b"/> (low: + <see cref="Tf32.LowB"/>).</summary>
    static abstract void Emulated(ref Frag4 c, ArrayView<float> posted, int a, int b);

    /// <summary>True: the kernel issues mma.sync where ILGPU compiles it for CUDA (and emulates elsewhere); false: it always
    /// emulates (<see cref="EmulatedMath{TMath}"/>, what a simulator loads), so that its compile carries no PTX: ILGPU resolves
    /// <see cref="CudaAsm.IsSupported"/> only after its general optimizations, which then worked through both paths.</summary>
    static abstract bool OnTensorCores { get; }

    /// <summary>True: a K step's two k8 steps are written out (TF32: the loop cost ~80 moves of the accumulators a K step);
    /// false: a loop of two trips (3xTF32: its split fragments take twice the registers, and written out the matmul
    /// spilled).</summary>
    static abstract bool WrittenOut { get; }
}

/// <summary>TF32: one product of rounded operands.</summary>
public struct Tf32Math : ITensorMath
{
    /// <inheritdoc/>
    public static bool OnTensorCores => true;

    /// <inheritdoc/>
    public static bool WrittenOut => true;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Stage(float x) => Tf32.HalfUlp(x);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float AsRead(float staged) => Tf32.Read(staged);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Tf32Pair Split(float x) => new(x, 0f); // readied when staged (Tf32.HalfUlp)

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Mma(ref Frag4 c, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3, Tf32Pair b0, Tf32Pair b1) =>
        Tf32.Mma(ref c, a0.Hi, a1.Hi, a2.Hi, a3.Hi, b0.Hi, b1.Hi);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Emulated(ref Frag4 c, ArrayView<float> posted, int a, int b) => Tf32.Product<TruncatingRead>(ref c, posted, a, b);
}

/// <summary>3xTF32: lo·hi + hi·lo + hi·hi, fp32-accurate.</summary>
public struct Tf32x3Math : ITensorMath
{
    /// <inheritdoc/>
    public static bool OnTensorCores => true;

    /// <inheritdoc/>
    public static bool WrittenOut => false;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Stage(float x) => x;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float AsRead(float staged) => staged;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Tf32Pair Split(float x)
    {
        // Both parts as the tensor core takes them (Tf32.HalfUlp): it reads rna(x) of hi, and of lo the rounding of x less
        // that (exact in fp32: the two are within 2^-11 of each other).
        float hi = Tf32.HalfUlp(x);
        return new(hi, Tf32.HalfUlp(x - Tf32.Read(hi)));
    }

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Mma(ref Frag4 c, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3, Tf32Pair b0, Tf32Pair b1)
    {
        Tf32.Mma(ref c, a0.Lo, a1.Lo, a2.Lo, a3.Lo, b0.Hi, b1.Hi);
        Tf32.Mma(ref c, a0.Hi, a1.Hi, a2.Hi, a3.Hi, b0.Lo, b1.Lo);
        Tf32.Mma(ref c, a0.Hi, a1.Hi, a2.Hi, a3.Hi, b0.Hi, b1.Hi);
    }

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Emulated(ref Frag4 c, ArrayView<float> posted, int a, int b)
    {
        Tf32.Product<TruncatingRead>(ref c, posted, a + Tf32.LowA, b);
        Tf32.Product<TruncatingRead>(ref c, posted, a, b + Tf32.LowB);
        Tf32.Product<TruncatingRead>(ref c, posted, a, b);
    }
}

/// <summary><typeparamref name="TMath"/>'s mode, emulated on every accelerator: the kernel a simulator loads
/// (<see cref="TiledGemm.LoadTensor{TOp, TMath, TLayout}"/>). Its compile leaves out the mma path from the start, and its
/// products are a call (<see cref="Emulated"/>), which is what made it cheaper to compile (leaving out the mma path alone
/// measured no change); the CUDA kernel is <typeparamref name="TMath"/>'s own.</summary>
public struct EmulatedMath<TMath> : ITensorMath where TMath : struct, ITensorMath
{
    /// <inheritdoc/>
    public static bool OnTensorCores
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => false;
    }

    /// <inheritdoc/>
    public static bool WrittenOut => TMath.WrittenOut;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Stage(float x) => TMath.Stage(x);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float AsRead(float staged) => TMath.AsRead(staged);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Tf32Pair Split(float x) => TMath.Split(x);

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Mma(ref Frag4 c, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3, Tf32Pair b0, Tf32Pair b1) =>
        TMath.Mma(ref c, a0, a1, a2, a3, b0, b1);

    /// <inheritdoc/>
    /// <remarks>A call, not inlined: the k8 step's 16 products are then one function the simulator's compile works through
    /// once (a 3xTF32 kernel compiled in 1.4 s instead of 2.2-2.7 s). The accumulators pass by reference, which on CUDA
    /// would put them in local memory; this type never runs there.</remarks>
    [MethodImpl(MethodImplOptions.NoInlining)]
    public static void Emulated(ref Frag4 c, ArrayView<float> posted, int a, int b) => TMath.Emulated(ref c, posted, a, b);
}

/// <summary>
/// Which of a thread's loaded A elements are its fragment registers a0..a3 of the warp's two m16 tiles. The kernel's
/// mapping is <see cref="PtxLayout"/>; a test plants a wrong one to show the emulation catches it.
/// </summary>
public interface IFragmentLayout
{
    /// <summary>From the thread's two 128-bit loads of A (<see cref="TiledGemm.MmaReadA"/>: tile 0's rows g, g + 8 at
    /// k = i and i + 4 in <paramref name="tile0"/>, tile 1's in <paramref name="tile1"/>): tile 0's a0..a3 and tile 1's.</summary>
    static abstract void A(Float4 tile0, Float4 tile1, out float t0a0, out float t0a1, out float t0a2, out float t0a3, out float t1a0, out float t1a1,
        out float t1a2, out float t1a3);
}

/// <summary>The PTX ISA's layout under the kernel's shared layout (<see cref="TiledGemm.PairSlotA"/>: a load is a0..a3 in order).</summary>
public struct PtxLayout : IFragmentLayout
{
    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void A(Float4 tile0, Float4 tile1, out float t0a0, out float t0a1, out float t0a2, out float t0a3, out float t1a0, out float t1a1,
        out float t1a2, out float t1a3)
    {
        (t0a0, t0a1, t0a2, t0a3) = (tile0.X, tile0.Y, tile0.Z, tile0.W);
        (t1a0, t1a1, t1a2, t1a3) = (tile1.X, tile1.Y, tile1.Z, tile1.W);
    }
}

/// <summary>How the emulation's tensor core reads a .tf32 operand register (a test plants one that rounds).</summary>
public interface IOperandRead
{
    /// <summary>The value the product takes of the register's bits.</summary>
    static abstract float Read(float operand);
}

/// <summary>What sm_80 and sm_90 tensor cores do, and CUTLASS counts on: the low 13 bits dropped (<see cref="Tf32.Read"/>).</summary>
public struct TruncatingRead : IOperandRead
{
    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Read(float operand) => Tf32.Read(operand);
}

/// <summary>TF32 rounding and the m16n8k8 product, on a GPU's tensor cores or emulated on a simulator.</summary>
public static class Tf32
{
    /// <summary>Mantissa bits TF32 keeps (of fp32's 23).</summary>
    public const int MantissaBits = 10;

    /// <summary>The bits a tensor core keeps of a .tf32 operand: it ignores the low 13 (PTX leaves them undefined; CUTLASS's
    /// conversions leave them set).</summary>
    public const uint Kept = 0xFFFF_E000u;

    /// <summary>
    /// <paramref name="x"/> made ready for a tensor core, which reads the top 19 bits: half of TF32's unit in x's binade
    /// added to its magnitude, x + (x with its mantissa cleared)·2^-11, so that what the mma reads (<see cref="Read"/>) is
    /// cvt.rna.tf32.f32 of x: to nearest, ties away from zero (<see cref="RoundBits"/>), for every normal x, zero and
    /// infinity, and a NaN stays NaN (it adds an infinity, which also quiets a NaN whose payload lies only in the dropped
    /// bits). Two instructions, a LOP3 and an FFMA, with no predicate, where
    /// cvt.rna is four on sm_90 (CUTLASS's round_half_ulp_truncate is the same add on the bits, with a test for
    /// infinities). The add is exact in fp32 except at the top of a binade, where its rounding stays below the
    /// bits the mma reads. Subnormals (whose cleared value is zero) are truncated, not rounded: an error below 2^-136.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float HalfUlp(float x) => x + Interop.IntAsFloat(Interop.FloatAsInt(x) & 0xFF80_0000u) * (1f / 2048f);

    /// <summary>What a tensor core reads of an operand register: its bits with the low 13 cleared (a NaN whose payload lies
    /// only there reads as infinity; arithmetic NaNs, CUDA's 0x7FFFFFFF and .NET's 0xFFC00000, stay NaN).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Read(float operand) => Interop.IntAsFloat(Interop.FloatAsInt(operand) & Kept);

    /// <summary>The definition of cvt.rna.tf32.f32, as integer arithmetic on the bits: add half of the dropped unit to the
    /// magnitude, then clear the dropped bits (a carry into the exponent is the correct rounding up; the sign is untouched,
    /// so ties go away from zero); infinities and NaN unchanged. The kernels leave the clearing to the tensor core
    /// (<see cref="HalfUlp"/>, <see cref="Read"/>); the tests hold the two to this.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float RoundBits(float x)
    {
        uint bits = Interop.FloatAsInt(x);
        if ((bits & 0x7F80_0000u) == 0x7F80_0000u)
        {
            return x;
        }
        return Interop.IntAsFloat((bits + 0x1000u) & Kept);
    }

    /// <summary>c += A·B for the warp's m16n8k8 tile on tensor cores, this lane holding a0..a3, b0, b1 (staged: the tensor core reads their top 19 bits) and
    /// c0..c3: one mma.sync. Only under <see cref="CudaAsm.IsSupported"/>; a simulator emulates a whole k8 step instead
    /// (<see cref="Product"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Mma(ref Frag4 c, float a0, float a1, float a2, float a3, float b0, float b1)
    {
        var d0 = new Ref<float> { Value = c.C0 };
        var d1 = new Ref<float> { Value = c.C1 };
        var d2 = new Ref<float> { Value = c.C2 };
        var d3 = new Ref<float> { Value = c.C3 };
        // The operands as .b32 registers (their bits: mma's A and B are untyped 32-bit; the low 13 are not read).
        Input<uint> x0 = Interop.FloatAsInt(a0), x1 = Interop.FloatAsInt(a1), x2 = Interop.FloatAsInt(a2), x3 = Interop.FloatAsInt(a3);
        Input<uint> y0 = Interop.FloatAsInt(b0), y1 = Interop.FloatAsInt(b1);
        CudaAsm.EmitRef("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};",
            ref d0, ref d1, ref d2, ref d3, ref x0, ref x1, ref x2, ref x3, ref y0, ref y1);
        (c.C0, c.C1, c.C2, c.C3) = (d0.Value, d1.Value, d2.Value, d3.Value);
    }

    /// <summary>Slots a lane posts in the emulation: tile t's a0..a3 at 4t (high parts) and <see cref="LowA"/> + 4t (low);
    /// n-tile j's b0, b1 at <see cref="FirstB"/> + 2j (high) and + <see cref="LowB"/> (low).</summary>
    public const int Slots = 48, LowA = 8, FirstB = 16, LowB = 16;

    /// <summary>Floats of dynamic shared memory a simulator's launch gives the emulation: <see cref="Slots"/> for every
    /// thread of the group. A GPU's launch asks for none (the emulation is not compiled there).</summary>
    public const int EmulationFloats = TiledGemm.Threads * Slots;

    /// <summary>This warp's slice of the dynamic shared memory. Taken once a k8 step (on ILGPU's CPU accelerator each
    /// GetDynamic call site is a buffer of its own).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static ArrayView<float> Slice() => SharedMemory.GetDynamic<float>().SubView(Warp.WarpIdx * 32 * Slots, 32 * Slots);

    /// <summary>
    /// One emulated mma as the PTX ISA defines it, for a warp of 32 on a simulator: lane 4g + i holds A(g, i), A(g + 8, i),
    /// A(g, i + 4), A(g + 8, i + 4), B(i, g), B(i + 4, g) and accumulates C(g, 2i), C(g, 2i + 1), C(g + 8, 2i),
    /// C(g + 8, 2i + 1). The warp posted its fragments (A's at slot <paramref name="a"/>, B's at <paramref name="b"/>); each
    /// lane reads the elements of its rows and columns from the slots of the lanes holding them (what a shuffle a value
    /// would do, without a barrier each), as <typeparamref name="TRead"/> says a tensor core reads an operand register. The
    /// products of TF32 values are exact in fp32; the sum runs in k order.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Product<TRead>(ref Frag4 c, ArrayView<float> posted, int a, int b) where TRead : struct, IOperandRead
    {
        int lane = Warp.LaneIdx, g = lane >> 2, i = lane & 3;
        for (int k = 0; k < 8; k++)
        {
            int upper = k >> 2, holder = k & 3;
            // Each operand as the tensor core reads it (TruncatingRead: the top 19 bits).
            float ag = TRead.Read(posted[Slots * (4 * g + holder) + a + 2 * upper]);        // A(g, k): a0 (k < 4) or a2 of lane 4g + (k mod 4)
            float ag8 = TRead.Read(posted[Slots * (4 * g + holder) + a + 2 * upper + 1]);   // A(g + 8, k): a1 or a3
            float bc = TRead.Read(posted[Slots * (4 * (2 * i) + holder) + b + upper]);      // B(k, 2i): b0 or b1 of lane 4·(2i) + (k mod 4)
            float bc1 = TRead.Read(posted[Slots * (4 * (2 * i + 1) + holder) + b + upper]); // B(k, 2i + 1)
            c.C0 += ag * bc;
            c.C1 += ag * bc1;
            c.C2 += ag8 * bc;
            c.C3 += ag8 * bc1;
        }
    }
}

public static partial class TiledGemm
{
    /// <summary>
    /// The tiled product on tensor cores (the file header): <see cref="Kernel{TOp}"/> with its multiply-adds as
    /// m16n8k8 TF32 mma in <typeparamref name="TMath"/>'s mode. Groups of exactly <see cref="Threads"/> in warps of 32.
    /// </summary>
    internal static void TensorKernel<TOp, TMath, TLayout>(ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, ArrayView<float> e0,
        ArrayView<float> e1, ArrayView<float> e2, ArrayView<float> partials, ArrayView<int> counters, ArrayView<Tap> taps, TileArgs t)
        where TOp : struct, ITileOperands where TMath : struct, ITensorMath where TLayout : struct, IFragmentLayout
    {
        var aS4 = SharedMemory.Allocate<Float4>(2 * ATile / 4);
        var bS4 = SharedMemory.Allocate<Float4>(2 * BTile / 4);
        var rowS = SharedMemory.Allocate<float>(TM);
        var columnTaps = SharedMemory.Allocate<Tap>(TN);
        var firstReads = SharedMemory.Allocate<int>(2 * Threads);
        var last = SharedMemory.Allocate<int>(1);
        bool rowSums = BeginRowSums<TOp>(t, rowS);
        Pipelined<TOp, TensorTile<TMath, TLayout>>(a, b, c, e0, e1, e2, partials, taps, t, aS4, bS4, rowS, columnTaps, firstReads, rowSums);
        Finish<TOp>(c, e0, e1, e2, partials, counters, t, rowS, rowSums, last);
    }

    /// <summary>Loads the tensor-core kernel of one op in one mode (once per accelerator and mode): on CUDA
    /// <typeparamref name="TMath"/>'s, elsewhere its emulated twin (<see cref="EmulatedMath{TMath}"/>).</summary>
    internal static TileLauncher LoadTensor<TOp, TMath, TLayout>(IlgpuKernels k)
        where TOp : struct, ITileOperands where TMath : struct, ITensorMath where TLayout : struct, IFragmentLayout
    {
        if (k.Accelerator.AcceleratorType == ILGPU.Runtime.AcceleratorType.Cuda)
        {
            return k.Grouped<TileLauncher>(TensorKernel<TOp, TMath, TLayout>, Specialization);
        }
        var launcher = k.Grouped<TileLauncher>(TensorKernel<TOp, EmulatedMath<TMath>, TLayout>, Specialization);
        // The emulation posts each lane's operands in dynamic shared memory.
        var emulation = SharedMemoryConfig.RequestDynamic<float>(Tf32.EmulationFloats);
        return (stream, config, a, b, c, e0, e1, e2, partials, counters, taps, t) =>
            launcher(stream, new KernelConfig(config.GridDim, config.GroupDim, emulation), a, b, c, e0, e1, e2, partials, counters, taps, t);
    }

    // The tensor-core kernel's shared tiles hold kk in pairs: row p of a tile is kk = 2p and 2p + 1, and A's rows (B's
    // columns) go in pairs of 16-byte groups, so that one 128-bit load is a lane's whole fragment (A: a0..a3 of an m16
    // tile; B: b0, b1 of two n-tiles), in the registers' order: the mma takes them where the load put them (with the FFMA
    // core's [kk][row] tiles ptxas moved ~144 values a K step into place). The tiles are as large as the FFMA core's.

    /// <summary>Floats between two kk pairs of the A tile: 64 rows x 2, and 8 of padding (136 ≡ 8 mod 32 banks: a warp's
    /// along-K stores, 4 pairs of kk by 4 rows, fall in 32 different banks).</summary>
    public const int PairAStride = 2 * TM + 8;

    /// <summary>Floats between two kk pairs of the B tile: 128 columns x 2, and 8 of padding (264 ≡ 8 mod 32).</summary>
    public const int PairBStride = 2 * TN + 8;

    /// <summary>A(kk, r) in the tensor-core layout: pair kk / 2, the 16-byte group of rows r, r + 1 (r even), then
    /// (r, even kk), (r + 1, even), (r, odd), (r + 1, odd): an m16 tile's a0, a1, a2, a3 when rows r, r + 1 are its
    /// rows g, g + 8 (<see cref="MmaRow"/>) and the two kk its k = i, i + 4.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int PairSlotA(int kk, int r) => (kk >> 1) * PairAStride + 4 * (r >> 1) + 2 * (kk & 1) + (r & 1);

    /// <summary>B(kk, c) in the tensor-core layout: pair kk / 2, the 16-byte group of columns c, c + 1 (c even), then
    /// (c, even kk), (c, odd), (c + 1, even), (c + 1, odd): b0, b1 of the two n-tiles whose column g is c and c + 1
    /// (<see cref="MmaColumn"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int PairSlotB(int kk, int c) => (kk >> 1) * PairBStride + 4 * (c >> 1) + 2 * (c & 1) + (kk & 1);

    /// <summary>PairSlotA of a thread's element e + 128·j less that of e: along K 8 rows on (4 row pairs: 16 floats), across
    /// K 2 kk on (one pair).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int PairOffsetA(bool alongK, int j) => alongK ? 16 * j : PairAStride * j;

    /// <summary>PairSlotB of e + 128·j less that of e: along K 8 columns on (16 floats); across K j kk on from an even kk
    /// (e = tid or tid + 128·8): pair ⌊j / 2⌋, the odd word when j is odd.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int PairOffsetB(bool alongK, int j) => alongK ? 16 * j : PairBStride * (j >> 1) + (j & 1);

    /// <summary>The warp's row (0 .. 31) of row g (h = 0) or g + 8 (h = 1) of mma tile t: 2g + 16t + h (rows g, g + 8 of a
    /// tile are a pair of the layout).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int MmaRow(int g, int t, int h) => 2 * g + 16 * t + h;

    /// <summary>The warp's column (0 .. 63) of column n (0 .. 7) of n-tile j: 2·(n + 8·⌊j / 2⌋) + j mod 2 (n-tiles 2q and
    /// 2q + 1 share a column pair).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int MmaColumn(int n, int j) => 2 * (n + 8 * (j >> 1)) + (j & 1);

    /// <summary>The Float4 index, in a buffer, of lane (g, i)'s A fragment of mma tile <paramref name="t"/> in the k8 step at
    /// kk = <paramref name="kb"/>: pair kb / 2 + i, rows 32·wm + 2g + 16t and + 1. A quarter-warp's eight loads fall on
    /// 16-byte groups 34i + g ≡ 2i + g (mod 8): all different.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int MmaReadA(int kb, int t, int warp, int lane) =>
        ((kb >> 1) + (lane & 3)) * (PairAStride / 4) + 16 * (warp & 1) + (lane >> 2) + 8 * t;

    /// <summary>The Float4 index of lane (g, i)'s B fragments of n-tiles 2q and 2q + 1 (<paramref name="q"/> = 0 .. 3): pair
    /// kb / 2 + i, columns 64·wn + 2·(g + 8q) and + 1; groups 66i + g ≡ 2i + g (mod 8).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int MmaReadB(int kb, int q, int warp, int lane) =>
        ((kb >> 1) + (lane & 3)) * (PairBStride / 4) + 32 * (warp >> 1) + (lane >> 2) + 8 * q;

    /// <summary>The row pair p (rows 2p, 2p + 1) of thread <paramref name="tid"/>'s A elements loaded in fours, in the
    /// tensor-core layout: lane bits 1, 2 and 4, then the warp.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int FoursPair(int tid) => (tid >> 1 & 3) | (tid >> 2 & 4) | (tid >> 5) << 3;

    /// <summary>The four kd q (kd 4q .. 4q + 3) of thread <paramref name="tid"/>'s A elements loaded in fours, in the tensor-core
    /// layout: lane bits 0 and 3.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int FoursQuadOf(int tid) => (tid & 1) | (tid >> 2 & 2);

    /// <summary>The Float4 index, in a buffer, of thread <paramref name="tid"/>'s first 16-byte group of A loaded in fours
    /// (pair 2q, rows 2p and 2p + 1); its second is <see cref="PairAStride"/> / 4 on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int FoursGroup(int tid) => 2 * FoursQuadOf(tid) * (PairAStride / 4) + FoursPair(tid);

    /// <summary>A thread's 2 x 8 mma tiles of the warp's 32 x 64 piece: 64 fp32 accumulators, as fields (registers).</summary>
    private struct TensorTile<TMath, TLayout> : ITileAccumulator where TMath : struct, ITensorMath where TLayout : struct, IFragmentLayout
    {
        private Frag4 _00, _01, _02, _03, _04, _05, _06, _07, _10, _11, _12, _13, _14, _15, _16, _17;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static float Stage(float x) => TMath.Stage(x);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static float AsRead(float staged) => TMath.AsRead(staged);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int SlotA(bool alongK, int e)
        {
            var (kk, r) = Element(alongK, e, TM);
            return PairSlotA(kk, r);
        }

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int SlotB(bool alongK, int e)
        {
            var (kk, c) = Element(alongK, e, TN);
            return PairSlotB(kk, c);
        }

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int OffsetA(bool alongK, int j) => PairOffsetA(alongK, j);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int OffsetB(bool alongK, int j) => PairOffsetB(alongK, j);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int RowSumSlot(int kk, int r) => PairSlotA(kk, r);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FirstReadA(int tid) => MmaReadA(0, 0, tid >> 5, tid & 31);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FirstReadB(int tid) => MmaReadB(0, 0, tid >> 5, tid & 31);

        /// <summary>Rows 2p and 2p + 1, kd 4q .. 4q + 3: the two 16-byte groups of pairs 2q and 2q + 1 at rows 2p, 2p + 1
        /// (<see cref="PairSlotA"/>), so a thread's elements are two 128-bit stores. Lane bits 0 and 3 are q, bits 1, 2 and 4
        /// and the warp are p: a quarter-warp's eight stores fall on groups 68q + p ≡ 4q + p (mod 8), all different
        /// (<see cref="FoursPair"/>, <see cref="FoursQuadOf"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursRow(int tid) => 2 * FoursPair(tid);

        /// <inheritdoc/>
        public static int FoursRowStep => 1;

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursQuad(int tid) => FoursQuadOf(tid);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static int FoursSlot(int tid) => 4 * FoursGroup(tid);

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void StoreFours(ArrayView<float> aS, ArrayView<Float4> aS4, int slot, Floats8 v)
        {
            var at = aS4.SubView(slot >> 2);
            at[0] = new Float4 { X = v.V0, Y = v.V4, Z = v.V1, W = v.V5 };
            at[PairAStride / 4] = new Float4 { X = v.V2, Y = v.V6, Z = v.V3, W = v.V7 };
        }

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ArrayView<Float4> aRow, ArrayView<Float4> bRow)
        {
            if (TMath.WrittenOut)
            {
                // The two k8 steps written out: as a loop, ptxas moved the 64 accumulators into the mma's register quads
                // and back around it (~80 moves a K step) and recomputed the views each trip.
                K8(aRow, bRow);
                K8(aRow.SubView(PairsPerK8 * (PairAStride / 4)), bRow.SubView(PairsPerK8 * (PairBStride / 4)));
            }
            else
            {
                for (int pair = 0; pair < TK / 2; pair += PairsPerK8)
                {
                    K8(aRow.SubView(pair * (PairAStride / 4)), bRow.SubView(pair * (PairBStride / 4)));
                }
            }
        }

        /// <summary>kk pairs a k8 step spans.</summary>
        private const int PairsPerK8 = 4;

        /// <summary>One k8 step from the views at its first loads (pair kb / 2): 2 + 4 128-bit loads, 16 mma.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private void K8(ArrayView<Float4> ak, ArrayView<Float4> bk)
        {
            // Tile 0's and tile 1's A fragments; B's of n-tiles 0, 1 | 2, 3 | 4, 5 | 6, 7 (bQ0 .. bQ3): a 128-bit load each.
            Float4 aT0 = ak[0], aT1 = ak[8];
            Float4 bQ0 = bk[0], bQ1 = bk[8], bQ2 = bk[16], bQ3 = bk[24];
            TLayout.A(aT0, aT1, out float p0, out float p1, out float p2, out float p3, out float q0, out float q1, out float q2, out float q3);
            Tf32Pair a00 = TMath.Split(p0), a01 = TMath.Split(p1), a02 = TMath.Split(p2), a03 = TMath.Split(p3);
            Tf32Pair a10 = TMath.Split(q0), a11 = TMath.Split(q1), a12 = TMath.Split(q2), a13 = TMath.Split(q3);
            Tf32Pair b00 = TMath.Split(bQ0.X), b10 = TMath.Split(bQ0.Y), b01 = TMath.Split(bQ0.Z), b11 = TMath.Split(bQ0.W);
            Tf32Pair b02 = TMath.Split(bQ1.X), b12 = TMath.Split(bQ1.Y), b03 = TMath.Split(bQ1.Z), b13 = TMath.Split(bQ1.W);
            Tf32Pair b04 = TMath.Split(bQ2.X), b14 = TMath.Split(bQ2.Y), b05 = TMath.Split(bQ2.Z), b15 = TMath.Split(bQ2.W);
            Tf32Pair b06 = TMath.Split(bQ3.X), b16 = TMath.Split(bQ3.Y), b07 = TMath.Split(bQ3.Z), b17 = TMath.Split(bQ3.W);
            if (TMath.OnTensorCores && CudaAsm.IsSupported)
            {
                Tile(ref _00, ref _10, a00, a01, a02, a03, a10, a11, a12, a13, b00, b10);
                Tile(ref _01, ref _11, a00, a01, a02, a03, a10, a11, a12, a13, b01, b11);
                Tile(ref _02, ref _12, a00, a01, a02, a03, a10, a11, a12, a13, b02, b12);
                Tile(ref _03, ref _13, a00, a01, a02, a03, a10, a11, a12, a13, b03, b13);
                Tile(ref _04, ref _14, a00, a01, a02, a03, a10, a11, a12, a13, b04, b14);
                Tile(ref _05, ref _15, a00, a01, a02, a03, a10, a11, a12, a13, b05, b15);
                Tile(ref _06, ref _16, a00, a01, a02, a03, a10, a11, a12, a13, b06, b16);
                Tile(ref _07, ref _17, a00, a01, a02, a03, a10, a11, a12, a13, b07, b17);
            }
            else
            {
                // The simulator: the warp posts every fragment of the k8 step once, then each mma is emulated from the
                // posted fragments by the ISA's table (Tf32.Product), in the GPU path's order.
                var posted = Tf32.Slice();
                int at = Tf32.Slots * (Group.IdxX & 31);
                PostA(posted, at, 0, a00, a01, a02, a03);
                PostA(posted, at, 4, a10, a11, a12, a13);
                PostB(posted, at, 0, b00, b10); PostB(posted, at, 1, b01, b11); PostB(posted, at, 2, b02, b12); PostB(posted, at, 3, b03, b13);
                PostB(posted, at, 4, b04, b14); PostB(posted, at, 5, b05, b15); PostB(posted, at, 6, b06, b16); PostB(posted, at, 7, b07, b17);
                Warp.Barrier();
                TMath.Emulated(ref _00, posted, 0, Tf32.FirstB + 0); TMath.Emulated(ref _10, posted, 4, Tf32.FirstB + 0);
                TMath.Emulated(ref _01, posted, 0, Tf32.FirstB + 2); TMath.Emulated(ref _11, posted, 4, Tf32.FirstB + 2);
                TMath.Emulated(ref _02, posted, 0, Tf32.FirstB + 4); TMath.Emulated(ref _12, posted, 4, Tf32.FirstB + 4);
                TMath.Emulated(ref _03, posted, 0, Tf32.FirstB + 6); TMath.Emulated(ref _13, posted, 4, Tf32.FirstB + 6);
                TMath.Emulated(ref _04, posted, 0, Tf32.FirstB + 8); TMath.Emulated(ref _14, posted, 4, Tf32.FirstB + 8);
                TMath.Emulated(ref _05, posted, 0, Tf32.FirstB + 10); TMath.Emulated(ref _15, posted, 4, Tf32.FirstB + 10);
                TMath.Emulated(ref _06, posted, 0, Tf32.FirstB + 12); TMath.Emulated(ref _16, posted, 4, Tf32.FirstB + 12);
                TMath.Emulated(ref _07, posted, 0, Tf32.FirstB + 14); TMath.Emulated(ref _17, posted, 4, Tf32.FirstB + 14);
                Warp.Barrier();
            }
        }

        /// <summary>Posts an m16 tile's a0..a3 (high parts at <paramref name="slot"/>, low at + <see cref="Tf32.LowA"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void PostA(ArrayView<float> posted, int at, int slot, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3)
        {
            posted[at + slot + 0] = a0.Hi; posted[at + slot + 1] = a1.Hi; posted[at + slot + 2] = a2.Hi; posted[at + slot + 3] = a3.Hi;
            posted[at + Tf32.LowA + slot + 0] = a0.Lo; posted[at + Tf32.LowA + slot + 1] = a1.Lo;
            posted[at + Tf32.LowA + slot + 2] = a2.Lo; posted[at + Tf32.LowA + slot + 3] = a3.Lo;
        }

        /// <summary>Posts n-tile j's b0, b1 (high parts at FirstB + 2j, low at + <see cref="Tf32.LowB"/>).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void PostB(ArrayView<float> posted, int at, int j, Tf32Pair b0, Tf32Pair b1)
        {
            posted[at + Tf32.FirstB + 2 * j] = b0.Hi; posted[at + Tf32.FirstB + 2 * j + 1] = b1.Hi;
            posted[at + Tf32.FirstB + Tf32.LowB + 2 * j] = b0.Lo; posted[at + Tf32.FirstB + Tf32.LowB + 2 * j + 1] = b1.Lo;
        }

        /// <summary>Both m16 tiles of one n-tile: c0 += A0·B, c1 += A1·B.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Tile(ref Frag4 c0, ref Frag4 c1, Tf32Pair a00, Tf32Pair a01, Tf32Pair a02, Tf32Pair a03, Tf32Pair a10, Tf32Pair a11,
            Tf32Pair a12, Tf32Pair a13, Tf32Pair b0, Tf32Pair b1)
        {
            TMath.Mma(ref c0, a00, a01, a02, a03, b0, b1);
            TMath.Mma(ref c1, a10, a11, a12, a13, b0, b1);
        }

        /// <inheritdoc/>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public readonly void Emit<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2,
            ArrayView<float> partials, int split, int m0, int col0, int tid) where TOp : struct, ITileOperands
        {
            int warp = tid >> 5, lane = tid & 31, g = lane >> 2, i = lane & 3;
            int r0 = m0 + 32 * (warp & 1), q0 = col0 + 64 * (warp >> 1);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 0, _00); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 0, _10);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 1, _01); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 1, _11);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 2, _02); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 2, _12);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 3, _03); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 3, _13);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 4, _04); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 4, _14);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 5, _05); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 5, _15);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 6, _06); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 6, _16);
            Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 0, 7, _07); Out<TOp>(t, c, e0, e1, e2, partials, split, r0, q0, g, i, 1, 7, _17);
        }

        /// <summary>One mma tile's four accumulators (tile <paramref name="tm"/>, n-tile <paramref name="j"/>) through the epilogue.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Out<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2,
            ArrayView<float> partials, int split, int r0, int q0, int g, int i, int tm, int j, Frag4 f) where TOp : struct, ITileOperands
        {
            int m = r0 + MmaRow(g, tm, 0), m8 = r0 + MmaRow(g, tm, 1);
            int col = q0 + MmaColumn(2 * i, j), col1 = q0 + MmaColumn(2 * i + 1, j);
            One<TOp>(t, c, e0, e1, e2, partials, split, m, col, f.C0);
            One<TOp>(t, c, e0, e1, e2, partials, split, m, col1, f.C1);
            One<TOp>(t, c, e0, e1, e2, partials, split, m8, col, f.C2);
            One<TOp>(t, c, e0, e1, e2, partials, split, m8, col1, f.C3);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void One<TOp>(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2,
            ArrayView<float> partials, int split, int m, int col, float v) where TOp : struct, ITileOperands
        {
            if (m < t.M && col < t.Cols)
            {
                TiledGemm.Out<TOp>(t, c, e0, e1, e2, partials, split, m, col, v);
            }
        }
    }
}

/// <summary>
/// One op's tiled kernels: the FFMA core, loaded with the kernel set, and its tensor-core twins (TF32, 3xTF32), loaded at
/// their first use so that a run in fp32 never compiles them. <see cref="For"/> picks by the set's math mode.
/// </summary>
internal sealed class TiledKernels<TOp> where TOp : struct, ITileOperands
{
    private readonly IlgpuKernels _k;
    private readonly bool _matmul;
    private TileLauncher? _fp32, _tf32, _tf32x3;

    /// <summary>Loads the FFMA kernel (with <paramref name="lazy"/>, at its first use: the K steps of one tap, which a run
    /// whose channels are not multiples of 16 never takes) and notes the tensor-core ones; <paramref name="matmul"/>: a
    /// linear layer's product (tensor cores in 3xTF32 only, as PyTorch keeps matmuls in fp32 by default), else a
    /// convolution's; without <paramref name="tf32"/> or <paramref name="tf32x3"/> the op has no kernel in that mode
    /// (<see cref="Runs"/>).</summary>
    public TiledKernels(IlgpuKernels k, bool matmul, bool lazy = false, bool tf32x3 = true, bool tf32 = true)
    {
        (_k, _matmul, _tf32x3Kernel, _tf32Kernel) = (k, matmul, tf32x3, tf32);
        if (lazy)
        {
            k.Declare(TiledGemm.Kernel<TOp>, TiledGemm.Specialization);
        }
        else
        {
            _fp32 = TiledGemm.Load<TOp>(k);
        }
        // The kernels For can return: a matmul's TF32 twin never runs (tf32 keeps linear layers in fp32), so it is not listed.
        if (!matmul && tf32)
        {
            k.Declare(TiledGemm.TensorKernel<TOp, Tf32Math, PtxLayout>, TiledGemm.Specialization);
        }
        if (tf32x3)
        {
            k.Declare(TiledGemm.TensorKernel<TOp, Tf32x3Math, PtxLayout>, TiledGemm.Specialization);
        }
    }

    private readonly bool _tf32x3Kernel, _tf32Kernel;

    /// <summary>False in a mode this op has no kernel for (3xTF32 for the K steps of one tap, the tensor-core modes for the
    /// weight gradient's tap-major columns), whose caller then takes the channel-major op.</summary>
    public bool Runs => Mode switch
    {
        MathPrecision.Tf32x3 => _tf32x3Kernel,
        MathPrecision.Tf32 => _tf32Kernel,
        _ => true,
    };

    /// <summary>The FFMA core.</summary>
    public TileLauncher Fp32 => _fp32 ??= TiledGemm.Load<TOp>(_k);

    /// <summary>The kernel the set's <see cref="IlgpuKernels.EffectivePrecision"/> asks for.</summary>
    public TileLauncher For() => Mode switch
    {
        MathPrecision.Tf32 when _tf32Kernel => _tf32 ??= TiledGemm.LoadTensor<TOp, Tf32Math, PtxLayout>(_k),
        MathPrecision.Tf32 => throw new InvalidOperationException($"{typeof(TOp).Name} has no TF32 kernel"),
        MathPrecision.Tf32x3 when _tf32x3Kernel => _tf32x3 ??= TiledGemm.LoadTensor<TOp, Tf32x3Math, PtxLayout>(_k),
        MathPrecision.Tf32x3 => throw new InvalidOperationException($"{typeof(TOp).Name} has no 3xTF32 kernel"),
        _ => Fp32,
    };

    /// <summary>The mode this op's product runs in now.</summary>
    public MathPrecision Mode => _k.EffectivePrecision switch
    {
        MathPrecision.Tf32 when _matmul => MathPrecision.Fp32,
        var mode => mode,
    };
}
