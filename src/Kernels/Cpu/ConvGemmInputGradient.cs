// The input gradient of the implicit-GEMM convolution (the layout and the plan: ConvGemm.cs): the transposed
// convolution as Stride² stride-1 convolutions of dy, one per output phase, each with its flipped sub-kernel.

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Ddpm.Kernels;

internal static unsafe partial class ConvGemm
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

    /// <summary>
    /// dx[n] += the transposed convolution of dy[n], as Stride² stride-1 convolutions (see the header comment and
    /// <see cref="SupportsBackwardInput"/>).
    /// </summary>
    public static void BackwardInput(ConvShape g, float* dy, float* w, float* dx, bool accumulate = true, CpuConvPaths paths = default)
    {
        if (!SupportsBackwardInput(g)) throw new ArgumentException("conv2d: the implicit input gradient needs stride <= 4 and pad < kernel size");
        int st = g.Stride;
        InputFrame(g.R, st, g.Pad, g.H, g.P, out int top, out int frameH);
        InputFrame(g.S, st, g.Pad, g.W, g.Q, out int left, out int frameW);
        // dy [K, P, Q] at (top, left) in a zero frame [K, frameH, frameW]; every phase reads windows of it.
        // At stride 1 its one phase writes g.W columns a row; the strided phases' windows keep the whole frame.
        var pl = new Planes(g.K, g.P, g.Q, 1, top, left, frameH, frameW, g.Stride == 1 ? g.W : int.MaxValue);
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
                wideMax = Math.Max(wideMax, ((long)ph.Rows * pl.Wh + 7) & ~7L);
                phases[count++] = ph;
            }
        }
        var pointers = ((nint)dy, (nint)dx, (nint)off, (nint)packed, (nint)phases);
        Cpu.Items(g.N, (g, pl, pointers, count, wideMax, accumulate, paths.PackEveryPanel), static (state, n) =>
        {
            var (g, pl, (dyp, dxp, offp, packedp, phasesp), count, wideMax, accumulate, packB) = state;
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
                // Columns rounded up to whole 8-float vectors, as in the forward pass (ConvGemm.Forward).
                int kk = g.K * ph.Taps, wide = (ph.Rows * pl.Wh + 7) & ~7;
                // dxwide [C, rows·Wh] = W_ab [C, K·taps] · col(dy) [K·taps, rows·Wh]
                Gemm.MultiplyRowOffsets(g.C, wide, kk, null, kk, 1, planes, off + ph.First, dxw, wide, accumulate: false, packedA: packed + ph.Packed, packB: packB);
                ph.Scatter(g, dxw, pl.Wh, wide, dx + n * xs, accumulate: !write);
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

        /// <summary>dx[c, st·u + A - pad, st·v + B - pad] += wide[c·channelStride + (u - ULo)·ldw + v - VLo] over this
        /// phase's outputs (= instead of += for the single phase of stride 1 when not accumulating).</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public readonly void Scatter(ConvShape g, float* wide, int ldw, int channelStride, float* dx, bool accumulate)
        {
            int st = g.Stride, h0 = st * ULo + A - g.Pad, w0 = st * VLo + B - g.Pad;
            if (st == 1)
            {
                DropWideColumns(wide, ldw, g.C, g.H, g.W, dx, null, accumulate, channelStride);
                return;
            }
            if (!accumulate) throw new InvalidOperationException("strided phases add onto a cleared image");
            for (int c = 0; c < g.C; c++)
            {
                for (int i = 0; i < Rows; i++)
                {
                    float* src = wide + (long)c * channelStride + (long)i * ldw;
                    float* dst = dx + ((long)c * g.H + h0 + st * i) * g.W + w0;
                    for (int j = 0; j < Cols; j++) dst[st * j] += src[j];
                }
            }
        }
    }
}
