// Implicit-GEMM convolution for the managed CPU backend.
//
// Why: the U-Net's convolutions have few channels (16..256) on small images (28x28 .. 7x7). Lowered explicitly, a 3x3
// convolution writes an im2col matrix [C·R·S, P·Q] nine times the size of the input and the GEMM's packing reads it
// back; with K = 16 output channels the GEMM itself is short beside that round trip of ~1 MB (docs/perf.md). Here the
// GEMM packs its micro-panels straight from one zero-padded copy of the image, so the lowered matrix never exists.
//
// How: the image x [C, H, W] is copied once into "planes": zero-padded by (padH, padW) and, for stride st > 1, split
// into st·st phase planes, each Hh x Wh (Hh = ceil((H + 2·padH) / st), Wh likewise):
//   planes[((c·st + a)·st + b)·Hh·Wh + i·Wh + j] = xpad[c, i·st + a, j·st + b]
// Then every row of the lowered matrix is one contiguous run of the planes, with output columns on a "wide" grid of
// Wh columns per output row:
//   col(p = (c, r, s), j' = y·Wh + x) = planes[off(p) + j'],   off(c, r, s) = plane(c, r % st, s % st) + (r / st)·Wh + s / st
// which equals x[c, y·st - padH + r, x·st - padW + s] (or the padding zero) for x < Q. The wide columns x in [Q, Wh)
// read neighbouring values: they are computed and dropped (forward, input gradient) or meet zeros in dy (weight
// gradient). Wh = Q + (S - 1) / st would waste 2/28 of a 3x3 pad-1 layer's work at 28x28, 2/14 at 14x14, 2/7 at
// 7x7; at stride 1 the right padding is shared with the next row's left padding (Planes), so Wh = Q + 1 and the waste
// is 1/29 .. 1/8. The forward pass over 7x7 maps gathers dense columns instead (ForwardDense).
//   forward:          ywide[K, P·Wh] = W[K, C·R·S] · col                  y = ywide (wide columns dropped) + b
//   weight gradient:  dW[K, C·R·S] += dywide[K, P·Wh] · colᵀ              dywide = dy with zeros in the wide columns
//   input gradient:   the transposed convolution, split by output phase. The inputs (st·u + a - pad, st·v + b - pad)
//                     receive exactly the kernel taps (a + st·i, b + st·j), so each of the st² phases (a, b) is a
//                     stride-1 convolution of dy (in a zero frame) with the flipped sub-kernel
//                     W_ab[c, (k, t, t')] = W[k, c, a + st·(Ra-1-t), b + st·(Sb-1-t')]   (Ra, Sb: the phase's taps):
//                     dxwide[C, U·Wh] = W_ab[C, K·Ra·Sb] · col(dy)        dx (every st-th element) += dxwide
//                     For stride 1 that is one convolution with the whole flipped kernel and padding R-1-pad.
// The copies in and out are each about the size of the input or output, against 2 x 9x the input for im2col, and
// the input gradient needs no col2im scatter (9 adds per input element).
// Every per-image loop here is marked AggressiveOptimization, like the GEMM's: helpers left to tiered compilation ran
// as unoptimised tier-0 code (vector operations as calls) for seconds, and far slower while they did (docs/perf.md).
// Per-image work runs on one core (images are spread over the cores); scratch is the thread's slots of its Arena
// (Arena.cs), kept, so the steady state allocates nothing.
//
// The class is split over three files: this one holds the shared parts (the planes, the names of its scratch slots, the
// wide-column copies) and the forward pass; ConvGemmInputGradient.cs the input gradient, ConvGemmWeightGradient.cs
// the weight gradient.

using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

/// <summary>Implicit-GEMM convolution: the GEMM packs its operands straight from a padded copy of each image.</summary>
internal static unsafe partial class ConvGemm
{
    /// <summary>y[n] = W·col(x[n]) + b (+ e[n, k] per output channel when e is not null) (+ r[n] when r is not null: a
    /// residual shaped as y) for every image, images spread over the cores.</summary>
    public static void Forward(ConvShape g, float* x, float* w, float* b, float* y, float* e = null, float* r = null, CpuConvPaths paths = default)
    {
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad, g.Q);
        int crs = g.Crs;
        var caller = Workspace.Current;
        int* off = caller.Offsets(crs);
        pl.Offsets(g.R, g.S, off);
        // The weights are every image's A: packed once here instead of once per image.
        float* packed = caller.PackedA(Gemm.PackedALength(g.K, crs));
        Gemm.PackA(g.K, crs, w, crs, 1, packed);
        int group = paths.WideForward ? 0 : DenseGroup(g, pl);
        if (group > 0)
        {
            ForwardDense(g, pl, x, packed, off, b, y, e, r, group);
            return;
        }
        Cpu.Items(g.N, (g, pl, (nint)x, (nint)packed, (nint)b, (nint)y, (nint)e, (nint)off, (nint)r, paths.PackEveryPanel), static (state, n) =>
        {
            var (g, pl, xp, packedp, bp, yp, ep, offp, rp, packB) = state;
            float* x = (float*)xp, packed = (float*)packedp, b = (float*)bp, y = (float*)yp, e = (float*)ep, r = (float*)rp;
            int* off = (int*)offp;
            // The GEMM's columns are rounded up to a multiple of 8 (reading at most 7 floats into the zeroed slack): then
            // no 256-bit kernel ends a row on a partial vector, which would go through a scratch tile and a scalar copy
            // (28x28's 812 wide columns become 816, 14x14's 210 become 216; 7x7's 56 stay).
            int crs = g.Crs, wide = (g.P * pl.Wh + 7) & ~7;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            var ws = Workspace.Current;
            float* planes = ws.Planes(pl.Length);
            pl.Fill(x + n * xs, planes);
            float* yw = ws.Wide((long)g.K * wide);
            // ywide [K, P·Wh] = W [K, CRS] · col [CRS, P·Wh]
            Gemm.MultiplyRowOffsets(g.K, wide, crs, null, crs, 1, planes, off, yw, wide, accumulate: false, packedA: packed, packB: packB);
            float* bn = stackalloc float[e == null ? 0 : g.K];
            DropWideColumns(yw, pl.Wh, g.K, g.P, g.Q, y + n * ys, ImageBias(g, b, e, n, bn), accumulate: false, channelStride: wide,
                residual: r == null ? null : r + n * ys);
        });
    }

    /// <summary>
    /// How many images the forward pass multiplies together with dense columns (<see cref="ForwardDense"/>), or 0 for
    /// the wide grid. Dense columns pay where the wide grid throws away much (a 7x7 map computes 56 columns for 49
    /// outputs) and there are enough output channels to carry the packing they need (the wide grid's panels are read
    /// in place); at 14x14 (216 for 196) they lose (docs/perf.md). The images go in groups whose columns fill whole
    /// 8-float vectors (7x7: 8 images, 392 columns), at most a quarter of the batch each (at least four groups to share out).
    /// A function of the shape alone, never of the core count: the group decides the GEMM's edge tiles, and so the bits.
    /// </summary>
    private static int DenseGroup(ConvShape g, Planes pl)
    {
        if (g.Stride != 1 || g.K < 64) return 0;
        int wide = (g.P * pl.Wh + 7) & ~7;
        if (wide * 100 < g.Pq * 112) return 0; // under 12% thrown away (14x14: 10%) the wide grid's in-place panels win
        int group = 1;
        while ((group * g.Pq) % 8 != 0 && group < 8) group *= 2;
        return Math.Max(1, Math.Min(group, g.N / 4));
    }

    /// <summary>
    /// The forward pass over groups of images with dense columns: y[n0..n0 + count) = W·col + b (+ e, + r) with one GEMM
    /// per group over count·P·Q columns gathered from the images' planes (<see cref="Gemm.MultiplyDenseColumns"/>).
    /// </summary>
    private static void ForwardDense(ConvShape g, Planes pl, float* x, float* packed, int* off, float* b, float* y, float* e, float* r, int group)
    {
        int items = (g.N + group - 1) / group;
        Cpu.Items(items, (g, pl, (nint)x, (nint)packed, (nint)off, (nint)b, (nint)y, (nint)e, (nint)r, group), static (state, item) =>
        {
            var (g, pl, xp, packedp, offp, bp, yp, ep, rp, group) = state;
            float* x = (float*)xp, packed = (float*)packedp, b = (float*)bp, y = (float*)yp, e = (float*)ep, r = (float*)rp;
            int* off = (int*)offp;
            int n0 = item * group, count = Math.Min(group, g.N - n0);
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq, planeLen = pl.Length;
            var ws = Workspace.Current;
            float* planes = ws.Planes(count * planeLen);
            for (int i = 0; i < count; i++) pl.Fill(x + (n0 + i) * xs, planes + i * planeLen);
            int cols = count * g.Pq, ldc = (cols + 15) & ~15;
            float* yd = ws.Wide((long)g.K * ldc);
            // yd [K, count·P·Q] = W [K, CRS] · col [CRS, count·P·Q]
            Gemm.MultiplyDenseColumns(g.K, cols, g.Crs, packed, planes, off, planeLen, pl.Wh, g.P, g.Q, yd, ldc);
            float* bn = stackalloc float[e == null ? 0 : g.K];
            for (int i = 0; i < count; i++)
            {
                // Image i's columns: each channel's P·Q outputs in one run (a single "row" of the wide copy).
                int n = n0 + i;
                DropWideColumns(yd + (long)i * g.Pq, g.Pq, g.K, 1, g.Pq, y + n * ys, ImageBias(g, b, e, n, bn), accumulate: false,
                    channelStride: ldc, residual: r == null ? null : r + n * ys);
            }
        });
    }

    /// <summary>Image n's bias per output channel: b itself, or b[k] + e[n, k] written into scratch (K floats) when there
    /// is a channel bias.</summary>
    private static float* ImageBias(ConvShape g, float* b, float* e, int n, float* scratch)
    {
        if (e == null) return b;
        for (int k = 0; k < g.K; k++) scratch[k] = b[k] + e[(long)n * g.K + k];
        return scratch;
    }

    /// <summary>
    /// out[k, y, x] (=|+=) wide[k·channelStride + y·ldw + x] (+ bias[k]) for x &lt; q: the wide GEMM result [rows, p·ldw]
    /// (rows channelStride apart; 0: p·ldw) into the dense tensor [rows, p, q], the forward's bias added on the way, and
    /// a residual shaped as the output (when not null) added to each channel while it is in cache.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DropWideColumns(float* wide, int ldw, int rows, int p, int q, float* output, float* bias, bool accumulate, long channelStride = 0,
        float* residual = null)
    {
        if (channelStride == 0) channelStride = (long)p * ldw;
        Vector512<float> tail = TailMask(q & 15);
        int qv = q & ~15;
        for (int k = 0; k < rows; k++)
        {
            float bk = bias == null ? 0f : bias[k];
            Vector512<float> bv = Vector512.Create(bk);
            for (int y = 0; y < p; y++)
            {
                float* src = wide + k * channelStride + (long)y * ldw;
                float* dst = output + ((long)k * p + y) * q;
                if (Isa.Avx512)
                {
                    int x = 0;
                    for (; x < qv; x += 16)
                    {
                        Vector512<float> v = Vector512.Load(src + x);
                        Vector512.Store(accumulate ? v + Vector512.Load(dst + x) : v + bv, dst + x);
                    }
                    if (x < q)
                    {
                        Vector512<float> v = Avx512F.MaskLoad(src + x, tail, Vector512<float>.Zero);
                        v = accumulate ? v + Avx512F.MaskLoad(dst + x, tail, Vector512<float>.Zero) : v + bv;
                        Avx512F.MaskStore(dst + x, tail, v);
                    }
                }
                else
                {
                    Simd.AddRow(src, dst, q, bk, accumulate);
                }
            }
            if (residual != null)
            {
                // The channel's p·q outputs were just written (a few KB, still in L1).
                long plane = (long)k * p * q;
                Simd.AddInPlace(new Span<float>(output + plane, p * q), new ReadOnlySpan<float>(residual + plane, p * q));
            }
        }
    }

    /// <summary>dst[0..n) = src[0..n): zmm copies and one masked tail (image rows are 7..64 floats).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyRow(float* src, float* dst, int n)
    {
        if (!Isa.Avx512)
        {
            new ReadOnlySpan<float>(src, n).CopyTo(new Span<float>(dst, n));
            return;
        }
        int x = 0;
        for (; x + 16 <= n; x += 16) Vector512.Store(Vector512.Load(src + x), dst + x);
        if (x < n)
        {
            Vector512<float> m = TailMask(n - x);
            Avx512F.MaskStore(dst + x, m, Avx512F.MaskLoad(src + x, m, Vector512<float>.Zero));
        }
    }

    /// <summary>All-ones in lanes 0..count-1 (count &lt;= 16).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> TailMask(int count) => Vector512.LessThan(Vector512<int>.Indices, Vector512.Create(count)).AsSingle();

    /// <summary>
    /// The padded, phase-split copy of one image [channels, h, w] (layout in the header comment) and the offsets of the
    /// lowered matrix's rows in it.
    /// </summary>
    private readonly struct Planes
    {
        /// <summary>Image size, stride, zeros before the first row and column; Hh x Wh: one phase plane.</summary>
        public readonly int Channels, H, W, Stride, PadH, PadW, Hh, Wh;

        /// <summary>The image padded by (padH, padW) on every side, for a product with outCols output columns per row.</summary>
        public Planes(int channels, int h, int w, int stride, int padH, int padW, int outCols)
            : this(channels, h, w, stride, padH, padW, h + 2 * padH, w + 2 * padW, outCols)
        {
        }

        /// <summary>The image placed at (padH, padW) in a zero frame of paddedH x paddedW (cropping what lies past it), for
        /// a product with outCols output columns per row (int.MaxValue: unknown, keep the whole frame).</summary>
        public Planes(int channels, int h, int w, int stride, int padH, int padW, int paddedH, int paddedW, int outCols)
        {
            (Channels, H, W, Stride, PadH, PadW) = (channels, h, w, stride, padH, padW);
            Hh = (paddedH + stride - 1) / stride;
            Wh = (paddedW + stride - 1) / stride;
            // At stride 1 the right padding need not be stored: a read past the end of a row lands in the next row's
            // left padding (or the next plane's, or the zeroed slack), zeros as well, as long as it is no wider than
            // the left one and the output's columns still fit in a row. A 3x3 pad-1 layer's wide grid then has W + 1
            // columns a row instead of W + 2: 7x7 maps compute 56 columns instead of 64, 14x14 maps 210 (216) instead
            // of 224, 28x28 maps 812 (816) instead of 840.
            int right = paddedW - padW - w;
            if (stride == 1 && right > 0 && right <= padW && outCols <= padW + w) Wh = padW + w;
        }

        private long PlaneSize => (long)Hh * Wh;

        /// <summary>Zeroed floats after the last plane: the wide columns of the last rows read up to a row past it.</summary>
        private int Slack => Wh + 64;

        /// <summary>Floats of the planes plus the zeroed slack.</summary>
        public long Length => Channels * (long)Stride * Stride * PlaneSize + Slack;

        /// <summary>The start of channel c's plane (stride 1).</summary>
        public long Plane(int c) => c * PlaneSize;

        /// <summary>off[(c·R + r)·S + s] = plane(c, r % st, s % st) + (r / st)·Wh + s / st, for a kernel R x S.</summary>
        public void Offsets(int r, int s, int* off)
        {
            int st = Stride, p = 0;
            for (int c = 0; c < Channels; c++)
                for (int i = 0; i < r; i++)
                    for (int j = 0; j < s; j++)
                        off[p++] = checked((int)(((c * st + i % st) * st + j % st) * PlaneSize + i / st * Wh + j / st));
        }

        /// <summary>Writes every float of the planes (padding and slack zeroed) from the image src [channels, H, W].</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Fill(float* src, float* dst)
        {
            int st = Stride;
            float* line = st == 1 ? null : Workspace.Current.Line(st * Wh + 32);
            for (int c = 0; c < Channels; c++)
            {
                float* planeC = dst + c * (long)st * st * PlaneSize;
                for (int hp = 0; hp < st * Hh; hp++)
                {
                    int h = hp - PadH, a = hp % st, i = hp / st;
                    float* s = src + ((long)c * H + h) * W;
                    if (st == 1)
                    {
                        float* row = planeC + (long)i * Wh;
                        if ((uint)h >= (uint)H)
                        {
                            new Span<float>(row, Wh).Clear();
                            continue;
                        }
                        int wCopy = Math.Min(W, Wh - PadW);
                        for (int j = 0; j < PadW; j++) row[j] = 0f;
                        CopyRow(s, row + PadW, wCopy);
                        for (int j = PadW + wCopy; j < Wh; j++) row[j] = 0f;
                        continue;
                    }
                    if ((uint)h >= (uint)H)
                    {
                        for (int b = 0; b < st; b++) new Span<float>(planeC + (a * st + b) * PlaneSize + (long)i * Wh, Wh).Clear();
                        continue;
                    }
                    // The padded row, then every st-th element of it into plane (a, b).
                    new Span<float>(line, PadW).Clear();
                    CopyRow(s, line + PadW, W);
                    new Span<float>(line + PadW + W, st * Wh + 32 - PadW - W).Clear();
                    float* row0 = planeC + a * st * PlaneSize + (long)i * Wh;
                    if (st == 2 && Isa.Avx512) Deinterleave(line, row0, row0 + PlaneSize, Wh);
                    else if (st == 2 && Isa.Avx2) Deinterleave256(line, row0, row0 + PlaneSize, Wh);
                    else
                        for (int b = 0; b < st; b++)
                        {
                            float* row = row0 + b * PlaneSize;
                            for (int j = 0; j < Wh; j++) row[j] = line[j * st + b];
                        }
                }
            }
            new Span<float>(dst + Length - Slack, Slack).Clear();
        }

        /// <summary>The same at 256 bits: 8 pairs an iteration, the last 0..7 one by one.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Deinterleave256(float* line, float* even, float* odd, int n)
        {
            // Within each 128-bit half, evens first: [e0 e1 e2 e3 | o0 o1 o2 o3] after the lane permute.
            Vector256<int> split = Vector256.Create(0, 2, 4, 6, 1, 3, 5, 7);
            int j = 0;
            for (; j + 8 <= n; j += 8)
            {
                Vector256<float> lo = Avx2.PermuteVar8x32(Vector256.Load(line + 2 * j), split);
                Vector256<float> hi = Avx2.PermuteVar8x32(Vector256.Load(line + 2 * j + 8), split);
                Vector256.Store(Avx.Permute2x128(lo, hi, 0x20), even + j);
                Vector256.Store(Avx.Permute2x128(lo, hi, 0x31), odd + j);
            }
            for (; j < n; j++)
            {
                even[j] = line[2 * j];
                odd[j] = line[2 * j + 1];
            }
        }

        /// <summary>even[j] = line[2j], odd[j] = line[2j + 1] for j &lt; n; line is readable up to 2·n rounded up to 32.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Deinterleave(float* line, float* even, float* odd, int n)
        {
            Vector512<int> ie = Vector512<int>.Indices * 2, io = ie + Vector512<int>.One;
            for (int j = 0; j < n; j += 16)
            {
                Vector512<float> lo = Vector512.Load(line + 2 * j), hi = Vector512.Load(line + 2 * j + 16);
                Vector512<float> e = Avx512F.PermuteVar16x32x2(lo, ie, hi), o = Avx512F.PermuteVar16x32x2(lo, io, hi);
                if (n - j >= 16)
                {
                    Vector512.Store(e, even + j);
                    Vector512.Store(o, odd + j);
                }
                else
                {
                    Vector512<float> m = TailMask(n - j);
                    Avx512F.MaskStore(even + j, m, e);
                    Avx512F.MaskStore(odd + j, m, o);
                }
            }
        }
    }

    /// <summary>The convolution's names for its slots of the calling thread's <see cref="Arena"/>.</summary>
    private readonly struct Workspace(Arena arena)
    {
        public static Workspace Current => new(Arena.Current);

        /// <summary>The padded copy of the current image.</summary>
        public float* Planes(long floats) => arena.Floats(ArenaSlot.ConvPlanes, floats);

        /// <summary>The wide GEMM result (forward, input gradient) or the wide dy (weight gradient).</summary>
        public float* Wide(long floats) => arena.Floats(ArenaSlot.ConvWide, floats);

        /// <summary>The row offsets of the lowered matrix, shared read-only by the workers of one call.</summary>
        public int* Offsets(int count) => arena.Ints(ArenaSlot.ConvOffsets, count);

        /// <summary>The flipped, transposed kernel of the input gradient, shared read-only by the workers of one call.</summary>
        public float* Weights(long floats) => arena.Floats(ArenaSlot.ConvWeights, floats);

        /// <summary>The weights packed for the GEMM (<see cref="Gemm.PackA(int, int, float*, int, int, float*)"/>), shared
        /// read-only by the workers of one call.</summary>
        public float* PackedA(long floats) => arena.Floats(ArenaSlot.ConvPackedA, floats);

        /// <summary>One padded input row, for the stride-phase split.</summary>
        public float* Line(int floats) => arena.Floats(ArenaSlot.ConvLine, floats);
    }
}
