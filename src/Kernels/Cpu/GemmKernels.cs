// The micro-kernels of the managed CPU backend's GEMM (the driver and its overview: Gemm.cs): each computes one
// MR x NR tile of C in registers from a packed A panel and a packed B panel.
//
// Micro-kernel choice (the figures behind it: docs/perf.md):
//   * AVX-512: MR x NR = 8 x 48. 24 zmm accumulators + 3 B vectors + 1 broadcast = 28 of the 32 registers; each k step
//     issues 3 vector loads + 8 broadcasts for 24 FMAs, so it is FMA-bound. 8x32, 12x32, 14x32 and 6x64 are as fast
//     in cache; 8x48 wins on the real shapes because 8 divides every channel count (32..2304: no row edges ever) and
//     48 fits the image widths: n = 576, 1152, 2304 are exact, 784 = 16x48 + 16, 196 = 4x48 + 4, 49 = 48 + 1. Column
//     edges are split over 8x32 / 8x16 / 8x4 / 8x1 kernels instead of computing a zero-padded 8x48 tile, which would
//     waste most of a thin edge's work.
//   * AVX2: MR x NR = 4 x 24 with ymm (12 accumulators + 3 B + 1 broadcast = all 16 registers); each k step issues
//     3 vector loads + 4 broadcasts for 12 FMAs. The classic 6 x 16 has the same 12 accumulators but 6 never divides
//     the channel counts (16..256), so every product had a row edge: 12.5% wasted work at 16 and 32 channels, and a
//     tile computed into scratch and copied. 4 divides them all, and 24 fits the wide image rows: 28x28's 812 rounded
//     up to 816 = 34x24 by the convolutions, 14x14's 210 to 216 = 9x24, 7x7's 56 = 2x24 + 8 (edges in 16- and 8-wide
//     pieces, see RunEdge).
//   * Row edges (a one-channel output: the U-Net's last convolution) run a one-row kernel per row on every wide level,
//     instead of the full tile with all but one row thrown away.
//   * 128-bit (ARM64 NEON, x86 without AVX2): 6 x 8 on the cross-platform Vector128 API, 12 accumulators + 2 B + 1
//     broadcast = 15 of the 16 registers SSE has (ARM64 has 32, so it fits there with room). MultiplyAddEstimate is
//     a fused multiply-add where the processor has one (NEON fmla, FMA3) and a multiply and an add where it does not:
//     Vector128.FusedMultiplyAdd would fall back to a per-lane software FMA on SSE-only processors.
//   * Otherwise a 4 x 4 scalar kernel, the reference and the last fallback, so the code is correct everywhere.
//   Which one runs follows CpuSimd.Level (Isa), so every kernel can be tested on one wide machine; Gemm.LastKernel
//   records the choice.
//   The AVX-512 path is gated on Avx512F.IsSupported (in Isa.Avx512, with the level) rather than Vector512.IsHardwareAccelerated: .NET reports
//   the latter as false on Skylake-X/Cascade Lake (frequency-licence heuristic), yet there the 512-bit kernel is the
//   faster one (docs/perf.md).

using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

public static unsafe partial class Gemm
{
    // ---------------------------------------------------------------------------------------------------------------
    // Micro-kernels. Static abstract members on struct type arguments make every driver instantiation a specialised
    // copy with MR/NR as JIT-time constants and direct (inlinable) kernel calls.
    // ---------------------------------------------------------------------------------------------------------------

    /// <summary>A micro-kernel's walk over the rows of B: where the current step's NR floats start, and the move to the
    /// next step. A struct type argument, so each kind of B gets its own compiled kernel and the walk stays in registers.</summary>
    private interface IBWalk
    {
        float* Row { get; }

        void Next();
    }

    /// <summary>B rows ld floats apart: a packed panel (ld = NR) or a row-major matrix read in place.</summary>
    private struct StridedWalk(float* b, int ld) : IBWalk
    {
        private float* _row = b;
        private readonly long _ld = ld;

        public readonly float* Row
        {
            [MethodImpl(MethodImplOptions.AggressiveInlining)]
            get => _row;
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Next() => _row += _ld;
    }

    /// <summary>B rows at b + off[p]: the lowered rows of an implicit convolution in its padded image, read in place.</summary>
    private struct OffsetWalk(float* b, int* off) : IBWalk
    {
        private readonly float* _b = b;
        private int* _off = off;

        public readonly float* Row
        {
            [MethodImpl(MethodImplOptions.AggressiveInlining)]
            get => _b + *_off;
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Next() => _off++;
    }

    private interface IMicroKernel
    {
        static abstract int MR { get; }
        static abstract int NR { get; }

        /// <summary>The kernel's type name, for <see cref="LastKernel"/>.</summary>
        static abstract string Name { get; }

        /// <summary>
        /// C[0..MR, 0..NR) (=|+=) Apanel·Bpanel over kc steps. a: packed A panel (MR floats per step); b: the walk over
        /// B's rows of NR floats (<see cref="StridedWalk"/>: a packed panel or a row-major B; <see cref="OffsetWalk"/>:
        /// the rows of an implicit convolution's lowered matrix in its padded image, read where they lie).
        /// </summary>
        static abstract void Run<TW>(int kc, float* a, TW b, float* c, int ldc, bool accumulate) where TW : struct, IBWalk;

        /// <summary>
        /// One row of a full panel: dst[0..NR) = row r of the packed A panel (pass a + r; steps MR floats apart) times
        /// B's rows. Row edges run it once per row.
        /// </summary>
        static abstract void RunRow<TW>(int kc, float* a, TW b, float* dst) where TW : struct, IBWalk;

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
        public static string Name => nameof(Avx512Kernel);

        /// <summary>The 8x48 kernel: 24 zmm accumulators + 3 B vectors + 1 broadcast = 28 of the 32 registers.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run<TW>(int kc, float* a, TW b, float* c, int ldc, bool accumulate) where TW : struct, IBWalk
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
                float* bp = b.Row;
                Vector512<float> b0 = Vector512.Load(bp), b1 = Vector512.Load(bp + 16), b2 = Vector512.Load(bp + 32);
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
                b.Next();
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


        /// <summary>One row of the 48-wide packed panel (row r of the 8-row A panel: pass a + r) into dst[0..48); two k
        /// steps per iteration give 6 independent FMA chains.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void RunRow<TW>(int kc, float* a, TW b, float* dst) where TW : struct, IBWalk
        {
            Vector512<float> x0 = default, x1 = default, x2 = default, y0 = default, y1 = default, y2 = default;
            for (; kc >= 2; kc -= 2)
            {
                Vector512<float> a0 = Vector512.Create(a[0]), a1 = Vector512.Create(a[8]);
                float* b0 = b.Row;
                b.Next();
                float* b1 = b.Row;
                b.Next();
                x0 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0), x0);
                x1 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0 + 16), x1);
                x2 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0 + 32), x2);
                y0 = Avx512F.FusedMultiplyAdd(a1, Vector512.Load(b1), y0);
                y1 = Avx512F.FusedMultiplyAdd(a1, Vector512.Load(b1 + 16), y1);
                y2 = Avx512F.FusedMultiplyAdd(a1, Vector512.Load(b1 + 32), y2);
                a += 16;
            }
            if (kc > 0)
            {
                Vector512<float> a0 = Vector512.Create(a[0]);
                float* b0 = b.Row;
                x0 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0), x0);
                x1 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0 + 16), x1);
                x2 = Avx512F.FusedMultiplyAdd(a0, Vector512.Load(b0 + 32), x2);
            }
            Vector512.Store(x0 + y0, dst);
            Vector512.Store(x1 + y1, dst + 16);
            Vector512.Store(x2 + y2, dst + 32);
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
            if (mr < 8)
            {
                // Row edges (only a one-channel output here): a row at a time, each an eighth of the full tile's work.
                RunRows<Avx512Kernel, StridedWalk>(kc, a, new StridedWalk(b, 48), mr, nr, c, ldc, accumulate, tile);
                return;
            }
            if (nr > 36)
            {
                Run(kc, a, new StridedWalk(b, 48), tile, 48, false);
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
        public static int MR => 4;
        public static int NR => 24;
        public static string Name => nameof(Avx2Kernel);

        /// <summary>The 4x24 kernel: 12 ymm accumulators + 3 B vectors + 1 broadcast = all 16 registers.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run<TW>(int kc, float* a, TW b, float* c, int ldc, bool accumulate) where TW : struct, IBWalk
        {
            Vector256<float> c00 = default, c01 = default, c02 = default, c10 = default, c11 = default, c12 = default;
            Vector256<float> c20 = default, c21 = default, c22 = default, c30 = default, c31 = default, c32 = default;
            for (; kc > 0; kc--)
            {
                float* bp = b.Row;
                Vector256<float> b0 = Vector256.Load(bp), b1 = Vector256.Load(bp + 8), b2 = Vector256.Load(bp + 16);
                Vector256<float> a0 = Vector256.Create(a[0]);
                c00 = Fma.MultiplyAdd(a0, b0, c00); c01 = Fma.MultiplyAdd(a0, b1, c01); c02 = Fma.MultiplyAdd(a0, b2, c02);
                Vector256<float> a1 = Vector256.Create(a[1]);
                c10 = Fma.MultiplyAdd(a1, b0, c10); c11 = Fma.MultiplyAdd(a1, b1, c11); c12 = Fma.MultiplyAdd(a1, b2, c12);
                Vector256<float> a2 = Vector256.Create(a[2]);
                c20 = Fma.MultiplyAdd(a2, b0, c20); c21 = Fma.MultiplyAdd(a2, b1, c21); c22 = Fma.MultiplyAdd(a2, b2, c22);
                Vector256<float> a3 = Vector256.Create(a[3]);
                c30 = Fma.MultiplyAdd(a3, b0, c30); c31 = Fma.MultiplyAdd(a3, b1, c31); c32 = Fma.MultiplyAdd(a3, b2, c32);
                a += 4;
                b.Next();
            }
            StoreRow3(c00, c01, c02, c, accumulate); c += ldc;
            StoreRow3(c10, c11, c12, c, accumulate); c += ldc;
            StoreRow3(c20, c21, c22, c, accumulate); c += ldc;
            StoreRow3(c30, c31, c32, c, accumulate);
        }


        /// <summary>4x16: the first 16 columns of a 24-wide packed panel, straight into C (8 accumulators: enough
        /// independent FMA chains to cover the FMA latency on two pipes).</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run16(int kc, float* a, float* b, float* c, int ldc, bool accumulate)
        {
            Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default;
            Vector256<float> c20 = default, c21 = default, c30 = default, c31 = default;
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
                a += 4;
                b += 24;
            }
            StoreRow2(c00, c01, c, accumulate); c += ldc;
            StoreRow2(c10, c11, c, accumulate); c += ldc;
            StoreRow2(c20, c21, c, accumulate); c += ldc;
            StoreRow2(c30, c31, c, accumulate);
        }

        /// <summary>4x8: the first 8 columns of a 24-wide packed panel into c (ld ldc). Two k steps per iteration give
        /// 8 independent FMA chains instead of 4.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Run8(int kc, float* a, float* b, float* c, int ldc, bool accumulate)
        {
            Vector256<float> x0 = default, x1 = default, x2 = default, x3 = default;
            Vector256<float> y0 = default, y1 = default, y2 = default, y3 = default;
            for (; kc >= 2; kc -= 2)
            {
                Vector256<float> b0 = Vector256.Load(b), b1 = Vector256.Load(b + 24);
                x0 = Fma.MultiplyAdd(Vector256.Create(a[0]), b0, x0);
                x1 = Fma.MultiplyAdd(Vector256.Create(a[1]), b0, x1);
                x2 = Fma.MultiplyAdd(Vector256.Create(a[2]), b0, x2);
                x3 = Fma.MultiplyAdd(Vector256.Create(a[3]), b0, x3);
                y0 = Fma.MultiplyAdd(Vector256.Create(a[4]), b1, y0);
                y1 = Fma.MultiplyAdd(Vector256.Create(a[5]), b1, y1);
                y2 = Fma.MultiplyAdd(Vector256.Create(a[6]), b1, y2);
                y3 = Fma.MultiplyAdd(Vector256.Create(a[7]), b1, y3);
                a += 8;
                b += 48;
            }
            if (kc > 0)
            {
                Vector256<float> b0 = Vector256.Load(b);
                x0 = Fma.MultiplyAdd(Vector256.Create(a[0]), b0, x0);
                x1 = Fma.MultiplyAdd(Vector256.Create(a[1]), b0, x1);
                x2 = Fma.MultiplyAdd(Vector256.Create(a[2]), b0, x2);
                x3 = Fma.MultiplyAdd(Vector256.Create(a[3]), b0, x3);
            }
            StoreRow1(x0 + y0, c, accumulate); c += ldc;
            StoreRow1(x1 + y1, c, accumulate); c += ldc;
            StoreRow1(x2 + y2, c, accumulate); c += ldc;
            StoreRow1(x3 + y3, c, accumulate);
        }

        /// <summary>
        /// One row of the 24-wide packed panel (row r of the 4-row A panel: pass a + r) into dst[0..24): a row edge
        /// (one output channel) costs a quarter of the full tile instead of all of it. Two k steps per iteration give
        /// 6 independent FMA chains.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void RunRow<TW>(int kc, float* a, TW b, float* dst) where TW : struct, IBWalk
        {
            Vector256<float> x0 = default, x1 = default, x2 = default, y0 = default, y1 = default, y2 = default;
            for (; kc >= 2; kc -= 2)
            {
                Vector256<float> a0 = Vector256.Create(a[0]), a1 = Vector256.Create(a[4]);
                float* b0 = b.Row;
                b.Next();
                float* b1 = b.Row;
                b.Next();
                x0 = Fma.MultiplyAdd(a0, Vector256.Load(b0), x0);
                x1 = Fma.MultiplyAdd(a0, Vector256.Load(b0 + 8), x1);
                x2 = Fma.MultiplyAdd(a0, Vector256.Load(b0 + 16), x2);
                y0 = Fma.MultiplyAdd(a1, Vector256.Load(b1), y0);
                y1 = Fma.MultiplyAdd(a1, Vector256.Load(b1 + 8), y1);
                y2 = Fma.MultiplyAdd(a1, Vector256.Load(b1 + 16), y2);
                a += 8;
            }
            if (kc > 0)
            {
                Vector256<float> a0 = Vector256.Create(a[0]);
                float* b0 = b.Row;
                x0 = Fma.MultiplyAdd(a0, Vector256.Load(b0), x0);
                x1 = Fma.MultiplyAdd(a0, Vector256.Load(b0 + 8), x1);
                x2 = Fma.MultiplyAdd(a0, Vector256.Load(b0 + 16), x2);
            }
            StoreRow3(x0 + y0, x1 + y1, x2 + y2, dst, false);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow3(Vector256<float> x0, Vector256<float> x1, Vector256<float> x2, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector256.Load(c);
                x1 += Vector256.Load(c + 8);
                x2 += Vector256.Load(c + 16);
            }
            Vector256.Store(x0, c);
            Vector256.Store(x1, c + 8);
            Vector256.Store(x2, c + 16);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow2(Vector256<float> x0, Vector256<float> x1, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector256.Load(c);
                x1 += Vector256.Load(c + 8);
            }
            Vector256.Store(x0, c);
            Vector256.Store(x1, c + 8);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow1(Vector256<float> x0, float* c, bool accumulate)
        {
            if (accumulate) x0 += Vector256.Load(c);
            Vector256.Store(x0, c);
        }

        /// <summary>
        /// Column edges with all 4 rows are split into 16- and 8-wide pieces written straight into C, and a last piece
        /// of 1..7 columns computed 8 wide into the tile (the convolutions round their column counts up to multiples
        /// of 8 so that this last piece is rare: 7x7's 56 = 2x24 + 8, 14x14's 216 = 9x24). Row edges (only where m is
        /// not a multiple of 4: a one-channel output) run one row at a time.
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        {
            if (mr < 4)
            {
                RunRows<Avx2Kernel, StridedWalk>(kc, a, new StridedWalk(b, 24), mr, nr, c, ldc, accumulate, tile);
                return;
            }
            int j = 0;
            if (nr >= 16)
            {
                Run16(kc, a, b, c, ldc, accumulate);
                j = 16;
            }
            if (nr - j >= 8)
            {
                Run8(kc, a, b + j, c + j, ldc, accumulate);
                j += 8;
            }
            if (j < nr)
            {
                Run8(kc, a, b + j, tile, 24, false);
                CopyTile(tile, 24, 4, nr - j, c + j, ldc, accumulate);
            }
        }
    }

    private struct Vector128Kernel : IMicroKernel
    {
        public static int MR => 6;
        public static int NR => 8;
        public static string Name => nameof(Vector128Kernel);

        /// <summary>The 6x8 kernel: 12 accumulators + 2 B vectors + 1 broadcast = 15 registers.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run<TW>(int kc, float* a, TW b, float* c, int ldc, bool accumulate) where TW : struct, IBWalk
        {
            Vector128<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default;
            Vector128<float> c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
            for (; kc > 0; kc--)
            {
                float* bp = b.Row;
                Vector128<float> b0 = Vector128.Load(bp), b1 = Vector128.Load(bp + 4);
                Vector128<float> a0 = Vector128.Create(a[0]);
                c00 = Vector128.MultiplyAddEstimate(a0, b0, c00); c01 = Vector128.MultiplyAddEstimate(a0, b1, c01);
                Vector128<float> a1 = Vector128.Create(a[1]);
                c10 = Vector128.MultiplyAddEstimate(a1, b0, c10); c11 = Vector128.MultiplyAddEstimate(a1, b1, c11);
                Vector128<float> a2 = Vector128.Create(a[2]);
                c20 = Vector128.MultiplyAddEstimate(a2, b0, c20); c21 = Vector128.MultiplyAddEstimate(a2, b1, c21);
                Vector128<float> a3 = Vector128.Create(a[3]);
                c30 = Vector128.MultiplyAddEstimate(a3, b0, c30); c31 = Vector128.MultiplyAddEstimate(a3, b1, c31);
                Vector128<float> a4 = Vector128.Create(a[4]);
                c40 = Vector128.MultiplyAddEstimate(a4, b0, c40); c41 = Vector128.MultiplyAddEstimate(a4, b1, c41);
                Vector128<float> a5 = Vector128.Create(a[5]);
                c50 = Vector128.MultiplyAddEstimate(a5, b0, c50); c51 = Vector128.MultiplyAddEstimate(a5, b1, c51);
                a += 6;
                b.Next();
            }
            StoreRow(c00, c01, c, accumulate); c += ldc;
            StoreRow(c10, c11, c, accumulate); c += ldc;
            StoreRow(c20, c21, c, accumulate); c += ldc;
            StoreRow(c30, c31, c, accumulate); c += ldc;
            StoreRow(c40, c41, c, accumulate); c += ldc;
            StoreRow(c50, c51, c, accumulate);
        }


        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void StoreRow(Vector128<float> x0, Vector128<float> x1, float* c, bool accumulate)
        {
            if (accumulate)
            {
                x0 += Vector128.Load(c);
                x1 += Vector128.Load(c + 4);
            }
            Vector128.Store(x0, c);
            Vector128.Store(x1, c + 4);
        }

        /// <summary>Edges go through the full tile, except row edges of up to 4 rows (6 divides no channel count, so every
        /// product ends in one: 32 = 5x6 + 2), which run a row at a time, each a sixth of the tile's work.</summary>
        public static void RunEdge(int kc, float* a, float* b, int mr, int nr, float* c, int ldc, bool accumulate, float* tile)
        {
            if (mr <= 4)
            {
                RunRows<Vector128Kernel, StridedWalk>(kc, a, new StridedWalk(b, 8), mr, nr, c, ldc, accumulate, tile);
                return;
            }
            Run(kc, a, new StridedWalk(b, 8), tile, 8, false);
            CopyTile(tile, 8, mr, nr, c, ldc, accumulate);
        }

        /// <summary>One row of the 8-wide packed panel (row r of the 6-row A panel: pass a + r) into dst[0..8); four k
        /// steps per iteration give 8 independent FMA chains.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void RunRow<TW>(int kc, float* a, TW b, float* dst) where TW : struct, IBWalk
        {
            Vector128<float> x0 = default, x1 = default, y0 = default, y1 = default;
            Vector128<float> z0 = default, z1 = default, w0 = default, w1 = default;
            for (; kc >= 4; kc -= 4)
            {
                Vector128<float> a0 = Vector128.Create(a[0]), a1 = Vector128.Create(a[6]);
                Vector128<float> a2 = Vector128.Create(a[12]), a3 = Vector128.Create(a[18]);
                float* b0 = b.Row;
                b.Next();
                float* b1 = b.Row;
                b.Next();
                float* b2 = b.Row;
                b.Next();
                float* b3 = b.Row;
                b.Next();
                x0 = Vector128.MultiplyAddEstimate(a0, Vector128.Load(b0), x0);
                x1 = Vector128.MultiplyAddEstimate(a0, Vector128.Load(b0 + 4), x1);
                y0 = Vector128.MultiplyAddEstimate(a1, Vector128.Load(b1), y0);
                y1 = Vector128.MultiplyAddEstimate(a1, Vector128.Load(b1 + 4), y1);
                z0 = Vector128.MultiplyAddEstimate(a2, Vector128.Load(b2), z0);
                z1 = Vector128.MultiplyAddEstimate(a2, Vector128.Load(b2 + 4), z1);
                w0 = Vector128.MultiplyAddEstimate(a3, Vector128.Load(b3), w0);
                w1 = Vector128.MultiplyAddEstimate(a3, Vector128.Load(b3 + 4), w1);
                a += 24;
            }
            for (; kc > 0; kc--)
            {
                Vector128<float> a0 = Vector128.Create(a[0]);
                float* b0 = b.Row;
                b.Next();
                x0 = Vector128.MultiplyAddEstimate(a0, Vector128.Load(b0), x0);
                x1 = Vector128.MultiplyAddEstimate(a0, Vector128.Load(b0 + 4), x1);
                a += 6;
            }
            Vector128.Store((x0 + y0) + (z0 + w0), dst);
            Vector128.Store((x1 + y1) + (z1 + w1), dst + 4);
        }
    }

    private struct ScalarKernel : IMicroKernel
    {
        public static int MR => 4;
        public static int NR => 4;
        public static string Name => nameof(ScalarKernel);

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public static void Run<TW>(int kc, float* a, TW b, float* c, int ldc, bool accumulate) where TW : struct, IBWalk
        {
            float c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
            float c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
            for (; kc > 0; kc--)
            {
                float* bp = b.Row;
                float b0 = bp[0], b1 = bp[1], b2 = bp[2], b3 = bp[3];
                float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
                c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
                c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
                c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
                a += 4;
                b.Next();
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
            Run(kc, a, new StridedWalk(b, 4), tile, 4, false);
            CopyTile(tile, 4, mr, nr, c, ldc, accumulate);
        }

        public static void RunRow<TW>(int kc, float* a, TW b, float* dst) where TW : struct, IBWalk
        {
            float x0 = 0, x1 = 0, x2 = 0, x3 = 0;
            for (; kc > 0; kc--)
            {
                float* bp = b.Row;
                float a0 = a[0];
                x0 += a0 * bp[0]; x1 += a0 * bp[1]; x2 += a0 * bp[2]; x3 += a0 * bp[3];
                a += 4;
                b.Next();
            }
            dst[0] = x0; dst[1] = x1; dst[2] = x2; dst[3] = x3;
        }
    }
}
