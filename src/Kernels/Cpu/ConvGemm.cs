// Implicit-GEMM convolution for the managed CPU backend.
//
// Why: the U-Net's convolutions have few channels (16..256) on small images (28x28 .. 7x7). Lowered explicitly, a 3x3
// convolution writes an im2col matrix [C·R·S, P·Q] nine times the size of the input and the GEMM's packing reads it
// back; with K = 16 output channels the GEMM itself is ~20 µs per image while that round trip moves ~1 MB. Here the
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
// gradient). Wh = Q + (S - 1) / st, so 3x3 pad 1 wastes 2/28 of the work at 28x28, 2/14 at 14x14, 2/7 at 7x7.
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
// Every per-image loop here is marked AggressiveOptimization, like the GEMM's: helpers left to tiered compilation were
// measured running as unoptimised tier-0 code (vector operations as calls) for seconds, and 2-3x slower while they did.
// Per-image work runs on one core (images are spread over the cores); scratch is per thread and kept, so the steady
// state allocates no memory beyond the parallel loop itself.

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

/// <summary>Implicit-GEMM convolution: the GEMM packs its operands straight from a padded copy of each image.</summary>
internal static unsafe class ConvGemm
{
    /// <summary>
    /// True when the input gradient can run as convolutions of dy: stride at most <see cref="MaxStride"/> and padding
    /// that leaves no row or column of dy unread (pad &lt; kernel size, which every sensible convolution has).
    /// </summary>
    public static bool SupportsBackwardInput(ConvShape g)
    {
        if (g.Stride > MaxStride) return false;
        InputFrame(g.R, g.Stride, g.Pad, g.H, g.P, out int top, out _);
        InputFrame(g.S, g.Stride, g.Pad, g.W, g.Q, out int left, out _);
        return top >= 0 && left >= 0;
    }

    /// <summary>The input gradient splits into Stride² phase convolutions; their descriptors live on the stack.</summary>
    private const int MaxStride = 4;

    /// <summary>y[n] = W·col(x[n]) + b (+ e[n, k] per output channel when e is not null) for every image, images spread
    /// over the cores.</summary>
    public static void Forward(ConvShape g, float* x, float* w, float* b, float* y, float* e = null)
    {
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad);
        int crs = g.Crs;
        var caller = Workspace.Current;
        int* off = caller.Offsets(crs);
        pl.Offsets(g.R, g.S, off);
        // The weights are every image's A: packed once here instead of once per image.
        float* packed = caller.PackedA(Gemm.PackedALength(g.K, crs));
        Gemm.PackA(g.K, crs, w, crs, 1, packed);
        Cpu.Items(g.N, (g, pl, (nint)x, (nint)packed, (nint)b, (nint)y, (nint)e, (nint)off), static (state, n) =>
        {
            var (g, pl, xp, packedp, bp, yp, ep, offp) = state;
            float* x = (float*)xp, packed = (float*)packedp, b = (float*)bp, y = (float*)yp, e = (float*)ep;
            int* off = (int*)offp;
            int crs = g.Crs, wide = g.P * pl.Wh;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            var ws = Workspace.Current;
            float* planes = ws.Planes(pl.Length);
            pl.Fill(x + n * xs, planes);
            float* yw = ws.Wide((long)g.K * wide);
            // ywide [K, P·Wh] = W [K, CRS] · col [CRS, P·Wh]
            Gemm.MultiplyRowOffsets(g.K, wide, crs, null, crs, 1, planes, off, yw, wide, accumulate: false, packedA: packed);
            float* bias = b;
            if (e != null)
            {
                // This image's bias: b[k] + e[n, k].
                float* bn = stackalloc float[g.K];
                for (int k = 0; k < g.K; k++) bn[k] = b[k] + e[(long)n * g.K + k];
                bias = bn;
            }
            DropWideColumns(yw, pl.Wh, g.K, g.P, g.Q, y + n * ys, bias, accumulate: false);
        });
    }

    /// <summary>
    /// dx[n] += the transposed convolution of dy[n], as Stride² stride-1 convolutions (see the header comment and
    /// <see cref="SupportsBackwardInput"/>).
    /// </summary>
    public static void BackwardInput(ConvShape g, float* dy, float* w, float* dx, bool accumulate = true)
    {
        if (!SupportsBackwardInput(g)) throw new ArgumentException("conv2d: the implicit input gradient needs stride <= 4 and pad < kernel size");
        int st = g.Stride;
        InputFrame(g.R, st, g.Pad, g.H, g.P, out int top, out int frameH);
        InputFrame(g.S, st, g.Pad, g.W, g.Q, out int left, out int frameW);
        // dy [K, P, Q] at (top, left) in a zero frame [K, frameH, frameW]; every phase reads windows of it.
        var pl = new Planes(g.K, g.P, g.Q, 1, top, left, frameH, frameW);
        var caller = Workspace.Current;
        int* off = caller.Offsets(g.K * g.R * g.S);
        float* wts = caller.Weights((long)g.C * g.K * g.R * g.S);
        float* packed = caller.PackedA(Gemm.PackedALength(g.C, g.K * g.R * g.S));
        Phase* phases = stackalloc Phase[st * st];
        int count = 0, used = 0;
        long wideMax = 0, packedUsed = 0;
        for (int a = 0; a < st; a++)
        {
            for (int b = 0; b < st; b++)
            {
                var ph = new Phase(g, a, b, top, left, used);
                if (ph.Taps == 0 || ph.Rows <= 0 || ph.Cols <= 0) continue; // no tap of the kernel, or no output, in this phase
                ph.Prepare(g, w, pl, off + used, wts + (long)g.C * used);
                // Each phase's sub-kernel is the A of every image's product: packed once here.
                int kk = g.K * ph.Taps;
                ph.Packed = packedUsed;
                Gemm.PackA(g.C, kk, wts + (long)g.C * used, kk, 1, packed + packedUsed);
                packedUsed += Gemm.PackedALength(g.C, kk);
                used += kk;
                wideMax = Math.Max(wideMax, (long)ph.Rows * pl.Wh);
                phases[count++] = ph;
            }
        }
        var pointers = ((nint)dy, (nint)dx, (nint)off, (nint)packed, (nint)phases);
        Cpu.Items(g.N, (g, pl, pointers, count, wideMax, accumulate), static (state, n) =>
        {
            var (g, pl, (dyp, dxp, offp, packedp, phasesp), count, wideMax, accumulate) = state;
            float* dy = (float*)dyp, dx = (float*)dxp, packed = (float*)packedp;
            int* off = (int*)offp;
            Phase* phases = (Phase*)phasesp;
            int st = g.Stride;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            var ws = Workspace.Current;
            float* planes = ws.Planes(pl.Length);
            pl.Fill(dy + n * ys, planes);
            float* dxw = ws.Wide(g.C * wideMax);
            // Stride 1 has one phase that covers every input: it writes dx when not accumulating. Strided phases
            // interleave (and a phase may have no taps), so they add onto a cleared image.
            bool write = !accumulate && st == 1 && count == 1;
            if (!accumulate && !write)
            {
                new Span<float>(dx + n * xs, (int)xs).Clear();
            }
            for (int i = 0; i < count; i++)
            {
                Phase ph = phases[i];
                int kk = g.K * ph.Taps, wide = ph.Rows * pl.Wh;
                // dxwide [C, rows·Wh] = W_ab [C, K·taps] · col(dy) [K·taps, rows·Wh]
                Gemm.MultiplyRowOffsets(g.C, wide, kk, null, kk, 1, planes, off + ph.First, dxw, wide, accumulate: false, packedA: packed + ph.Packed);
                ph.Scatter(g, dxw, pl.Wh, dx + n * xs, accumulate: !write);
            }
        });
    }

    /// <summary>
    /// The zero frame around dy for the input gradient along one axis (kernel size r, input size h, output size p): dy
    /// starts at <paramref name="start"/> (negative when padding leaves leading rows of dy unread) in a frame of
    /// <paramref name="size"/>. The frame is the smallest that holds every window any phase reads.
    /// </summary>
    private static void InputFrame(int r, int st, int pad, int h, int p, out int start, out int size)
    {
        int top = (r + st - 1) / st - 1, first = int.MaxValue, last = 0;
        for (int a = 0; a < st; a++)
        {
            PhaseAxis(r, st, pad, h, a, out int taps, out int lo, out int rows);
            if (taps == 0 || rows <= 0) continue;
            // With dy at `top`, output u of this phase reads frame rows u + (top - taps + 1) + t, t < taps.
            first = Math.Min(first, lo + top - taps + 1);
            last = Math.Max(last, lo + rows - 1 + top);
        }
        if (first == int.MaxValue) first = top;
        start = top - first;
        size = Math.Max(last - first + 1, start + p);
    }

    /// <summary>
    /// One axis of phase a: the kernel taps r ≡ a (mod st), and the outputs u (input index st·u + a - pad) that exist:
    /// rows of them starting at lo.
    /// </summary>
    private static void PhaseAxis(int r, int st, int pad, int h, int a, out int taps, out int lo, out int rows)
    {
        taps = a < r ? (r - a + st - 1) / st : 0;
        lo = Math.Max(0, CeilDiv(pad - a, st));
        int hi = FloorDiv(h - 1 + pad - a, st);
        rows = hi - lo + 1;
    }

    private static int CeilDiv(int x, int d) => -FloorDiv(-x, d);

    private static int FloorDiv(int x, int d) => x >= 0 ? x / d : -((-x + d - 1) / d);

    /// <summary>
    /// Phase (a, b) of the input gradient: the inputs (st·u + a - pad, st·v + b - pad) receive exactly the kernel taps
    /// (a + st·i, b + st·j), so they are a stride-1 convolution of the framed dy with the flipped sub-kernel
    /// W_ab[c, (k, t, t')] = W[k, c, a + st·(RowTaps-1-t), b + st·(ColTaps-1-t')].
    /// </summary>
    private struct Phase
    {
        public int A, B, RowTaps, ColTaps, ULo, Rows, VLo, Cols, RowStart, ColStart, First;

        /// <summary>Where this phase's packed sub-kernel starts in the call's packed buffer.</summary>
        public long Packed;

        /// <summary>The phase's taps and outputs; dy sits at (top, left) in the frame (see <see cref="InputFrame"/>);
        /// its offsets and sub-kernel will start at index <paramref name="first"/> of the call's tables.</summary>
        public Phase(ConvShape g, int a, int b, int top, int left, int first)
        {
            (A, B, First) = (a, b, first);
            PhaseAxis(g.R, g.Stride, g.Pad, g.H, a, out RowTaps, out ULo, out Rows);
            PhaseAxis(g.S, g.Stride, g.Pad, g.W, b, out ColTaps, out VLo, out Cols);
            // The frame row (column) read by output u = ULo with tap t = 0: dy row ULo - (RowTaps - 1).
            RowStart = top + ULo - (RowTaps - 1);
            ColStart = left + VLo - (ColTaps - 1);
        }

        public readonly int Taps => RowTaps * ColTaps;

        /// <summary>Writes this phase's row offsets (K·taps) and its sub-kernel W_ab [C, K·taps].</summary>
        public readonly void Prepare(ConvShape g, float* w, Planes pl, int* off, float* wab)
        {
            int st = g.Stride, kk = g.K * Taps;
            for (int k = 0; k < g.K; k++)
            {
                for (int t = 0; t < RowTaps; t++)
                {
                    for (int u = 0; u < ColTaps; u++)
                    {
                        int p = (k * RowTaps + t) * ColTaps + u;
                        off[p] = checked((int)(pl.Plane(k) + (long)(RowStart + t) * pl.Wh + ColStart + u));
                        int r = A + st * (RowTaps - 1 - t), s = B + st * (ColTaps - 1 - u);
                        for (int c = 0; c < g.C; c++)
                        {
                            wab[(long)c * kk + p] = w[((long)(k * g.C + c) * g.R + r) * g.S + s];
                        }
                    }
                }
            }
        }

        /// <summary>dx[c, st·u + A - pad, st·v + B - pad] += wide[c, (u - ULo)·ldw + v - VLo] over this phase's outputs
        /// (= instead of += for the single phase of stride 1 when not accumulating).</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public readonly void Scatter(ConvShape g, float* wide, int ldw, float* dx, bool accumulate)
        {
            int st = g.Stride, h0 = st * ULo + A - g.Pad, w0 = st * VLo + B - g.Pad;
            if (st == 1)
            {
                DropWideColumns(wide, ldw, g.C, g.H, g.W, dx, null, accumulate);
                return;
            }
            if (!accumulate) throw new InvalidOperationException("strided phases add onto a cleared image");
            for (int c = 0; c < g.C; c++)
            {
                for (int i = 0; i < Rows; i++)
                {
                    float* src = wide + ((long)c * Rows + i) * ldw;
                    float* dst = dx + ((long)c * g.H + h0 + st * i) * g.W + w0;
                    for (int j = 0; j < Cols; j++) dst[st * j] += src[j];
                }
            }
        }
    }

    /// <summary>
    /// Which weight-gradient kernel runs: null picks by shape (<see cref="UsesDotWeightGradient"/>), true forces the
    /// dot-product tiles (where AVX-512 is), false the packed GEMM. Per thread, for tests and benchmarks.
    /// </summary>
    [ThreadStatic] internal static bool? t_dotWeightGradient;

    /// <summary>
    /// The weight gradient's GEMM has the reduction along the image (J = P·Wh, up to 840) and transposes both operands
    /// into its panels; with few output channels (K) those transposes cost as much as the products. The dot-product
    /// tiles read dy and the lowered rows as they lie, at the price of a horizontal sum per result and tile: worth it
    /// for small K on large images.
    /// </summary>
    internal static bool UsesDotWeightGradient(ConvShape g)
    {
        if (!Avx512F.IsSupported) return false;
        if (t_dotWeightGradient is { } forced) return forced;
        long j = (long)g.P * (g.Q + (g.S - 1) / g.Stride);
        return g.K <= DotSmallK || (g.K <= DotMaxK && j >= DotMinJ);
    }

    // Measured (batch 64, 2 cores, against the packed GEMM): with up to 32 output channels the dot tiles win or tie at
    // every size (16 -> 16 at 28x28: 146 against 99 GFLOP/s; 32 -> 32 at 14x14: 125 against 117); with 64 they win at
    // 28x28 (J = 840: 182 against 176) and lose below (64 -> 64 at 7x7: 91 against 103); from 128 the GEMM wins.
    // Small images go through the tiles in groups of about DotMinJ positions.
    private const int DotSmallK = 32, DotMaxK = 64, DotMinJ = 400;

    /// <summary>dW += Σ_n dy[n]·col(x[n])ᵀ, one private partial sum per worker, summed at the end.</summary>
    public static void BackwardWeight(ConvShape g, float* dy, float* x, float* dw)
    {
        if (UsesDotWeightGradient(g))
        {
            BackwardWeightDot(g, dy, x, dw);
            return;
        }
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad);
        int crs = g.Crs, wlen = g.K * crs, j = g.P * pl.Wh;
        int* off = Workspace.Current.Offsets(crs);
        pl.Offsets(g.R, g.S, off);
        int workers = Math.Min(Cpu.Threads, g.N);
        // The GEMM reads and writes all of its C (the worker's dW) once per block of its reduction. Small images go in
        // groups whose positions (each image's rounded up to whole 16-float slices, the rest zero) fill about one
        // block, so a 7x7 layer's dW is swept once per two images instead of once per image.
        int group = Math.Clamp(Gemm.KC / ((j + 15) & ~15), 1, Math.Max(1, g.N / workers));
        int ldk = group > 1 ? (j + 15) & ~15 : j;
        float* partials = Scratch.Partials(workers, wlen);
        Cpu.Items(workers, (g, pl, (nint)dy, (nint)x, (nint)off, (nint)partials, workers, group, ldk), static (state, worker) =>
        {
            var (g, pl, dyp, xp, offp, partialsp, workers, group, ldk) = state;
            float* dy = (float*)dyp, x = (float*)xp;
            int* off = (int*)offp;
            int crs = g.Crs, wlen = g.K * crs, ldd = group * ldk;
            long planeLen = pl.Length;
            float* acc = (float*)partialsp + (long)worker * wlen;
            new Span<float>(acc, wlen).Clear();
            var ws = Workspace.Current;
            float* planes = ws.Planes(group * planeLen);
            float* dyw = ws.Wide((long)g.K * ldd);
            if (ldk > g.P * pl.Wh) new Span<float>(dyw, g.K * ldd).Clear(); // the zero slice ends, never written after
            int first = (int)((long)g.N * worker / workers), last = (int)((long)g.N * (worker + 1) / workers);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0);
                StageGroup(g, pl, x, dy, n0, count, planes, dyw, imageStride: ldk, channelStride: ldd);
                // dW [K, CRS] += dywide [K, count·ldk] · colᵀ [count·ldk, CRS], image i's columns read from its planes
                Gemm.MultiplyColumnOffsets(g.K, crs, count * ldk, dyw, ldd, 1, planes, off, acc, crs, accumulate: true,
                    groupStride: planeLen, kPerGroup: ldk);
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    /// <summary>
    /// The weight gradient as dot products along the image: dW[k, p] += Σ_j dywide[k, j]·planes[off[p] + j], in tiles of
    /// 4 output channels x 6 lowered rows (24 zmm accumulators), 16 positions a step. dy is copied onto the wide grid
    /// with its rows padded to whole vectors and its channels to a multiple of 4 (zeros), and the offsets to a multiple
    /// of 6 (repeats of the last), so every tile runs the same loop; results outside [K, CRS) are dropped.
    /// </summary>
    private static void BackwardWeightDot(ConvShape g, float* dy, float* x, float* dw)
    {
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad);
        int crs = g.Crs, crs6 = (crs + 5) / 6 * 6, wlen = g.K * crs;
        int j = g.P * pl.Wh, ldd = (j + 15) & ~15;
        int* off = Workspace.Current.Offsets(crs6);
        pl.Offsets(g.R, g.S, off);
        for (int p = crs; p < crs6; p++) off[p] = off[crs - 1];
        int workers = Math.Min(Cpu.Threads, g.N);
        // Small images go in groups, so that each tile's sums run over ~DotMinJ positions before their horizontal sum.
        int group = Math.Clamp((DotMinJ + ldd - 1) / ldd, 1, Math.Max(1, g.N / workers));
        float* partials = Scratch.Partials(workers, wlen);
        Cpu.Items(workers, (g, pl, (nint)dy, (nint)x, (nint)off, (nint)partials, workers, group, ldd), static (state, worker) =>
        {
            var (g, pl, dyp, xp, offp, partialsp, workers, group, ldd) = state;
            float* dy = (float*)dyp, x = (float*)xp;
            int* off = (int*)offp;
            int crs = g.Crs, wlen = g.K * crs, k4 = (g.K + 3) & ~3;
            long planeLen = pl.Length, dyLen = (long)k4 * ldd;
            float* acc = (float*)partialsp + (long)worker * wlen;
            new Span<float>(acc, wlen).Clear();
            var ws = Workspace.Current;
            // The planes' slack (Wh + 64 floats) covers the reads of the padded row end past j.
            float* planes = ws.Planes(group * planeLen);
            float* dyw = ws.Wide(group * dyLen);
            new Span<float>(dyw, (int)(group * dyLen)).Clear();
            int first = (int)((long)g.N * worker / workers), last = (int)((long)g.N * (worker + 1) / workers);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0);
                StageGroup(g, pl, x, dy, n0, count, planes, dyw, imageStride: dyLen, channelStride: ldd);
                DotTiles(g.K, crs, ldd, dyw, dyLen, planes, planeLen, count, off, acc);
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    /// <summary>acc[k, p] += Σ_i Σ_{j &lt; ldd} dyw[i·dyStride + k·ldd + j]·planes[i·planeStride + off[p] + j] for k &lt; kk,
    /// p &lt; crs, over <paramref name="images"/> images (see <see cref="BackwardWeightDot"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotTiles(int kk, int crs, int ldd, float* dyw, long dyStride, float* planes, long planeStride, int images, int* off, float* acc)
    {
        for (int k0 = 0; k0 < kk; k0 += 4)
        {
            for (int p0 = 0; p0 < crs; p0 += 6)
            {
                Vector512<float> a00 = default, a01 = default, a02 = default, a03 = default, a04 = default, a05 = default;
                Vector512<float> a10 = default, a11 = default, a12 = default, a13 = default, a14 = default, a15 = default;
                Vector512<float> a20 = default, a21 = default, a22 = default, a23 = default, a24 = default, a25 = default;
                Vector512<float> a30 = default, a31 = default, a32 = default, a33 = default, a34 = default, a35 = default;
                for (int i = 0; i < images; i++)
                {
                    float* d0 = dyw + i * dyStride + (long)k0 * ldd, d1 = d0 + ldd, d2 = d1 + ldd, d3 = d2 + ldd;
                    float* pi = planes + i * planeStride;
                    float* c0 = pi + off[p0], c1 = pi + off[p0 + 1], c2 = pi + off[p0 + 2];
                    float* c3 = pi + off[p0 + 3], c4 = pi + off[p0 + 4], c5 = pi + off[p0 + 5];
                    for (int j = 0; j < ldd; j += 16)
                    {
                        Vector512<float> y0 = Vector512.Load(d0 + j), y1 = Vector512.Load(d1 + j), y2 = Vector512.Load(d2 + j), y3 = Vector512.Load(d3 + j);
                        Vector512<float> v = Vector512.Load(c0 + j);
                        a00 = Avx512F.FusedMultiplyAdd(y0, v, a00); a10 = Avx512F.FusedMultiplyAdd(y1, v, a10);
                        a20 = Avx512F.FusedMultiplyAdd(y2, v, a20); a30 = Avx512F.FusedMultiplyAdd(y3, v, a30);
                        v = Vector512.Load(c1 + j);
                        a01 = Avx512F.FusedMultiplyAdd(y0, v, a01); a11 = Avx512F.FusedMultiplyAdd(y1, v, a11);
                        a21 = Avx512F.FusedMultiplyAdd(y2, v, a21); a31 = Avx512F.FusedMultiplyAdd(y3, v, a31);
                        v = Vector512.Load(c2 + j);
                        a02 = Avx512F.FusedMultiplyAdd(y0, v, a02); a12 = Avx512F.FusedMultiplyAdd(y1, v, a12);
                        a22 = Avx512F.FusedMultiplyAdd(y2, v, a22); a32 = Avx512F.FusedMultiplyAdd(y3, v, a32);
                        v = Vector512.Load(c3 + j);
                        a03 = Avx512F.FusedMultiplyAdd(y0, v, a03); a13 = Avx512F.FusedMultiplyAdd(y1, v, a13);
                        a23 = Avx512F.FusedMultiplyAdd(y2, v, a23); a33 = Avx512F.FusedMultiplyAdd(y3, v, a33);
                        v = Vector512.Load(c4 + j);
                        a04 = Avx512F.FusedMultiplyAdd(y0, v, a04); a14 = Avx512F.FusedMultiplyAdd(y1, v, a14);
                        a24 = Avx512F.FusedMultiplyAdd(y2, v, a24); a34 = Avx512F.FusedMultiplyAdd(y3, v, a34);
                        v = Vector512.Load(c5 + j);
                        a05 = Avx512F.FusedMultiplyAdd(y0, v, a05); a15 = Avx512F.FusedMultiplyAdd(y1, v, a15);
                        a25 = Avx512F.FusedMultiplyAdd(y2, v, a25); a35 = Avx512F.FusedMultiplyAdd(y3, v, a35);
                    }
                }
                int np = Math.Min(6, crs - p0);
                StoreSums(acc + (long)k0 * crs + p0, np, a00, a01, a02, a03, a04, a05);
                if (k0 + 1 < kk) StoreSums(acc + (long)(k0 + 1) * crs + p0, np, a10, a11, a12, a13, a14, a15);
                if (k0 + 2 < kk) StoreSums(acc + (long)(k0 + 2) * crs + p0, np, a20, a21, a22, a23, a24, a25);
                if (k0 + 3 < kk) StoreSums(acc + (long)(k0 + 3) * crs + p0, np, a30, a31, a32, a33, a34, a35);
            }
        }
    }

    /// <summary>dst[i] += the lane sum of the i-th vector, for i &lt; count (≤ 6).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreSums(float* dst, int count, Vector512<float> v0, Vector512<float> v1, Vector512<float> v2,
        Vector512<float> v3, Vector512<float> v4, Vector512<float> v5)
    {
        // Pairwise halving: 512 -> 256 -> 128 bits for all six at once, then the last four lanes each.
        Vector256<float> h0 = v0.GetLower() + v0.GetUpper(), h1 = v1.GetLower() + v1.GetUpper(), h2 = v2.GetLower() + v2.GetUpper();
        Vector256<float> h3 = v3.GetLower() + v3.GetUpper(), h4 = v4.GetLower() + v4.GetUpper(), h5 = v5.GetLower() + v5.GetUpper();
        // hadd pairs: [h0, h1] -> lanes (h0 sums, h1 sums) per 128-bit half
        Vector256<float> s01 = Avx.HorizontalAdd(h0, h1), s23 = Avx.HorizontalAdd(h2, h3), s45 = Avx.HorizontalAdd(h4, h5);
        Vector256<float> s0123 = Avx.HorizontalAdd(s01, s23), s45x = Avx.HorizontalAdd(s45, s45);
        // s0123 lanes: [v0a v1a v2a v3a | v0b v1b v2b v3b] (a, b: the two 128-bit halves); add the halves.
        Vector128<float> r0123 = s0123.GetLower() + s0123.GetUpper();
        Vector128<float> r45 = s45x.GetLower() + s45x.GetUpper();
        if (count == 6)
        {
            Vector128.Store(Vector128.Load(dst) + r0123, dst);
            dst[4] += r45.GetElement(0);
            dst[5] += r45.GetElement(1);
            return;
        }
        for (int i = 0; i < count; i++)
        {
            dst[i] += i < 4 ? r0123.GetElement(i) : r45.GetElement(i - 4);
        }
    }

    /// <summary>
    /// out[k, y, x] (=|+=) wide[k, y·ldw + x] (+ bias[k]) for x &lt; q: the wide GEMM result [rows, p·ldw] into the
    /// dense tensor [rows, p, q], the forward's bias added on the way.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DropWideColumns(float* wide, int ldw, int rows, int p, int q, float* output, float* bias, bool accumulate)
    {
        Vector512<float> tail = TailMask(q & 15);
        int qv = q & ~15;
        for (int k = 0; k < rows; k++)
        {
            float bk = bias == null ? 0f : bias[k];
            Vector512<float> bv = Vector512.Create(bk);
            for (int y = 0; y < p; y++)
            {
                float* src = wide + ((long)k * p + y) * ldw;
                float* dst = output + ((long)k * p + y) * q;
                if (Avx512F.IsSupported)
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
                else if (accumulate)
                {
                    for (int x = 0; x < q; x++) dst[x] += src[x];
                }
                else
                {
                    for (int x = 0; x < q; x++) dst[x] = src[x] + bk;
                }
            }
        }
    }

    /// <summary>
    /// The weight gradient's operands for images n0 .. n0 + count: image i's padded planes at planes + i·pl.Length, and
    /// each channel k of its dy on the wide grid at dyw + i·imageStride + k·channelStride (P rows of Wh floats).
    /// </summary>
    private static void StageGroup(ConvShape g, Planes pl, float* x, float* dy, int n0, int count, float* planes, float* dyw, long imageStride, long channelStride)
    {
        long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
        for (int i = 0; i < count; i++)
        {
            pl.Fill(x + (n0 + i) * xs, planes + i * pl.Length);
            for (int k = 0; k < g.K; k++)
            {
                ToWideColumns(dy + (n0 + i) * ys + (long)k * g.Pq, 1, g.P, g.Q, dyw + i * imageStride + k * channelStride, pl.Wh);
            }
        }
    }

    /// <summary>wide[k, y·ldw + x] = dy[k, y, x] for x &lt; q, 0 for q ≤ x &lt; ldw: dy [rows, p, q] on the wide grid.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ToWideColumns(float* dy, int rows, int p, int q, float* wide, int ldw)
    {
        for (long row = 0; row < (long)rows * p; row++)
        {
            float* dst = wide + row * ldw;
            CopyRow(dy + row * q, dst, q);
            new Span<float>(dst + q, ldw - q).Clear();
        }
    }

    /// <summary>dst[0..n) = src[0..n): zmm copies and one masked tail (image rows are 7..64 floats).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyRow(float* src, float* dst, int n)
    {
        if (!Avx512F.IsSupported)
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

        /// <summary>The image padded by (padH, padW) on every side.</summary>
        public Planes(int channels, int h, int w, int stride, int padH, int padW)
            : this(channels, h, w, stride, padH, padW, h + 2 * padH, w + 2 * padW)
        {
        }

        /// <summary>The image placed at (padH, padW) in a zero frame of paddedH x paddedW (cropping what lies past it).</summary>
        public Planes(int channels, int h, int w, int stride, int padH, int padW, int paddedH, int paddedW)
        {
            (Channels, H, W, Stride, PadH, PadW) = (channels, h, w, stride, padH, padW);
            Hh = (paddedH + stride - 1) / stride;
            Wh = (paddedW + stride - 1) / stride;
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
                    if (st == 2 && Avx512F.IsSupported) Deinterleave(line, row0, row0 + PlaneSize, Wh);
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

    /// <summary>Per-thread scratch: 64-byte aligned native memory, grown on demand, freed when the thread is gone.</summary>
    private sealed class Workspace
    {
        [ThreadStatic] private static Workspace? t_current;

        private void* _planes, _wide, _offsets, _weights, _line, _packed;
        private nuint _planesCap, _wideCap, _offsetsCap, _weightsCap, _lineCap, _packedCap;

        public static Workspace Current => t_current ??= new Workspace();

        /// <summary>The padded copy of the current image.</summary>
        public float* Planes(long floats) => (float*)Ensure(ref _planes, ref _planesCap, (nuint)floats * sizeof(float));

        /// <summary>The wide GEMM result (forward, input gradient) or the wide dy (weight gradient).</summary>
        public float* Wide(long floats) => (float*)Ensure(ref _wide, ref _wideCap, (nuint)floats * sizeof(float));

        /// <summary>The row offsets of the lowered matrix, shared read-only by the workers of one call.</summary>
        public int* Offsets(int count) => (int*)Ensure(ref _offsets, ref _offsetsCap, (nuint)count * sizeof(int));

        /// <summary>The flipped, transposed kernel of the input gradient, shared read-only by the workers of one call.</summary>
        public float* Weights(long floats) => (float*)Ensure(ref _weights, ref _weightsCap, (nuint)floats * sizeof(float));

        /// <summary>The weights packed for the GEMM (<see cref="Gemm.PackA(int, int, float*, int, int, float*)"/>), shared
        /// read-only by the workers of one call.</summary>
        public float* PackedA(long floats) => (float*)Ensure(ref _packed, ref _packedCap, (nuint)floats * sizeof(float));

        /// <summary>One padded input row, for the stride-phase split.</summary>
        public float* Line(int floats) => (float*)Ensure(ref _line, ref _lineCap, (nuint)floats * sizeof(float));

        private static void* Ensure(ref void* p, ref nuint cap, nuint bytes)
        {
            if (bytes > cap)
            {
                NativeMemory.AlignedFree(p);
                p = null;
                cap = 0;
                p = NativeMemory.AlignedAlloc(bytes, 64);
                cap = bytes;
            }
            return p;
        }

        ~Workspace()
        {
            NativeMemory.AlignedFree(_planes);
            NativeMemory.AlignedFree(_wide);
            NativeMemory.AlignedFree(_offsets);
            NativeMemory.AlignedFree(_weights);
            NativeMemory.AlignedFree(_line);
            NativeMemory.AlignedFree(_packed);
        }
    }
}
