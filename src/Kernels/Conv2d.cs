using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>Geometry of a 2-D convolution: x [N, C, H, W] * w [K, C, R, S] (+ b [K]) → y [N, K, P, Q],
/// P = (H + 2·Pad - R) / Stride + 1, Q likewise. Blittable, so kernels take it as an argument.</summary>
public readonly struct ConvShape
{
    /// <summary>Batch, input channels, input height and width, output channels, kernel height and width.</summary>
    public readonly int N, C, H, W, K, R, S;

    /// <summary>Stride and zero padding (the same in both directions).</summary>
    public readonly int Stride, Pad;

    /// <summary>Output height and width.</summary>
    public readonly int P, Q;

    /// <summary>Builds the geometry and checks that the output is not empty.</summary>
    public ConvShape(int n, int c, int h, int w, int k, int r, int s, int stride, int pad)
    {
        if (stride < 1 || pad < 0 || r < 1 || s < 1)
        {
            throw new ArgumentException($"conv2d: bad geometry (kernel {r}x{s}, stride {stride}, pad {pad})");
        }
        (N, C, H, W, K, R, S, Stride, Pad) = (n, c, h, w, k, r, s, stride, pad);
        P = (h + 2 * pad - r) / stride + 1;
        Q = (w + 2 * pad - s) / stride + 1;
        if (P < 1 || Q < 1)
        {
            throw new ArgumentException($"conv2d: a {r}x{s} kernel does not fit a {h}x{w} input with pad {pad}");
        }
    }

    /// <summary>Rows of the lowered (im2col) matrix: C·R·S.</summary>
    public int Crs => C * R * S;

    /// <summary>Columns of the lowered matrix: P·Q.</summary>
    public int Pq => P * Q;

    /// <summary>Multiply-adds ×2 of the forward pass (each gradient costs the same).</summary>
    public double Flops => 2.0 * N * K * Crs * Pq;

    /// <summary>True when the lowering is the identity (1×1, stride 1, no padding).</summary>
    public bool IsPointwise => R == 1 && S == 1 && Stride == 1 && Pad == 0;

    /// <summary>The geometry implied by an input and a weight tensor.</summary>
    public static ConvShape Of(Tensor x, Tensor w, int stride, int pad)
    {
        Check.Rank("conv2d", "x", x, 4);
        Check.Rank("conv2d", "w", w, 4);
        if (w.Dim(1) != x.Dim(1))
        {
            throw new ArgumentException($"conv2d: weight {w.ShapeText} expects {w.Dim(1)} input channels, x is {x.ShapeText}");
        }
        return new ConvShape(x.Dim(0), x.Dim(1), x.Dim(2), x.Dim(3), w.Dim(0), w.Dim(2), w.Dim(3), stride, pad);
    }
}

/// <summary>How the managed CPU backend lowers a convolution to matrix products.</summary>
public enum ConvLowering
{
    /// <summary>Per shape and pass, the lowering that measured faster (the default).</summary>
    Auto,

    /// <summary>im2col into a [C·R·S, P·Q] matrix (col2im after the input gradient's product), then the packed GEMM.</summary>
    Explicit,

    /// <summary>Implicit GEMM: the GEMM packs its operand straight from a padded copy of each image. The input
    /// gradients it does not cover (stride above 4, padding at least the kernel size) stay explicit.</summary>
    Implicit,
}

/// <summary>
/// 2-D convolution with bias, forward and the three gradients. Shapes (letters as in
/// <see cref="ConvShape"/>): x [N, C, H, W], w [K, C, R, S], b [K], y [N, K, P, Q].
/// Versions:
///  - CPU naive: direct loops, the reference for the fast path and the benchmark baseline.
///  - CPU fast, explicit: per image, im2col into a [C·R·S, P·Q] matrix and a packed SIMD GEMM
///    (<see cref="Gemm"/>); forward y = W·col, input gradient col2im(Wᵀ·dy), weight gradient
///    dW += dy·colᵀ with a private dW per worker, summed at the end. Images go to the cores.
///  - CPU fast, implicit (<see cref="ConvGemm"/>): the same products with the GEMM packing its
///    operand straight from a padded copy of the image, the bias added on the way out; the input
///    gradient as convolutions of dy with the flipped kernel, one per stride phase. Chosen per shape
///    and pass (<see cref="CpuConvPaths.Lowering"/>): implicit except for pointwise convolutions.
///  - ILGPU v1 (the simple twins, <see cref="IlgpuKernels.Simple"/>): one thread per output element (forward, input
///    gradient, weight gradient, bias).
///  - ILGPU v2 (the default): tiled implicit GEMM, 64x64 output tiles, 256 threads with 4x4 register tiles, K step 16
///    in shared memory; bias and channel bias in the epilogue, split-K weight gradient with a fixed-order reduction
///    (<see cref="TiledConv"/>, <see cref="TiledGemm"/>).
/// Backward ops add into their gradient buffers.
/// </summary>
public static unsafe class Conv2d
{
    /// <summary>
    /// Holds <paramref name="weights"/> (a model's parameters; the convolution weights among them count) permuted for the
    /// GPU passes in K steps of one tap until the result is disposed: one launch now instead of one a pass
    /// (docs/gpu.md, "K steps of one tap"). For a span in which the weights do not change: a training step's forwards and
    /// backwards, a sampling run. Nothing on the CPU backend, with the simple kernels, or while another hold is open.
    /// </summary>
    public static IDisposable HoldWeights(IReadOnlyList<Tensor> weights)
    {
        if (weights.Count == 0 || !weights[0].Device.IsIlgpu)
        {
            return NoHold.Instance;
        }
        var k = IlgpuKernels.For(weights[0]);
        return k.Simple || k.Held is not null || !k.Conv2d.TiledForwardByTap.Runs ? NoHold.Instance : k.HeldLayout(weights).Hold();
    }

    private sealed class NoHold : IDisposable
    {
        public static readonly NoHold Instance = new();

        public void Dispose()
        {
        }
    }

    /// <summary>y = conv(x, w) + b, and with <paramref name="channelBias"/> e [N, K] also + e[n, k] over each output
    /// image: the time embedding a ResBlock adds after its first convolution, folded into the convolution's epilogue
    /// (its gradient is <see cref="Elementwise.AddChannelsBackward"/> of dy). With <paramref name="residual"/> (shaped as
    /// y, not y itself) also + residual: a ResBlock's skip path, in the tiled kernel's epilogue (its gradient is dy). On the
    /// managed CPU backend, <c>paths</c> picks among its equivalent paths (default: per shape; see <see cref="CpuConvPaths"/>).</summary>
    public static void Forward(Tensor x, Tensor w, Tensor b, Tensor y, int stride, int pad, Tensor? channelBias = null, Tensor? residual = null,
        CpuConvPaths paths = default)
    {
        var g = ConvShape.Of(x, w, stride, pad);
        CheckOperands(g, x, w, b, y);
        if (channelBias is not null)
        {
            Check.Devices("conv2d", x, channelBias);
            Check.Shape("conv2d", "channel bias", channelBias, g.N, g.K);
        }
        if (residual is not null)
        {
            Check.Devices("conv2d", x, residual);
            Check.Shape("conv2d", "residual", residual, g.N, g.K, g.P, g.Q);
            if (ReferenceEquals(residual, y))
            {
                throw new ArgumentException("conv2d: the residual cannot be the output itself");
            }
        }
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            if (!k.Simple && TiledConv.Takes(g))
            {
                TiledConv.Forward(k, g, x.View, w.View, b.View, y.View, channelBias?.View, residual?.View, held: k.Held?.Forward(w));
                return;
            }
            k.Conv2d.Forward(k.Stream, y.Length, x.View, w.View, b.View, y.View, g);
            if (channelBias is not null)
            {
                Elementwise.AddChannels(y, channelBias, y);
            }
        }
        else
        {
            ForwardCpu(g, x.Pointer, w.Pointer, b.Pointer, y.Pointer, channelBias is null ? null : channelBias.Pointer, residual is null ? null : residual.Pointer, paths);
            return;
        }
        if (residual is not null)
        {
            // The simple twin adds it in a second pass over y (the cost of the separate add it replaces).
            Elementwise.Add(y, residual, y);
        }
    }

    /// <summary>dx += conv_transpose(dy, w): the gradient of the loss with respect to the input; with
    /// <paramref name="accumulate"/> false, dx = conv_transpose(dy, w) and dx's old contents are never read.</summary>
    public static void BackwardInput(Tensor dy, Tensor w, Tensor dx, int stride, int pad, bool accumulate = true, CpuConvPaths paths = default)
    {
        var g = ConvShape.Of(dx, w, stride, pad);
        Check.Devices("conv2d backward input", dy, w, dx);
        Check.Shape("conv2d backward input", "dy", dy, g.N, g.K, g.P, g.Q);
        using var simd = CpuSimd.Enter(dx.Device);
        if (dx.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dx);
            if (!k.Simple && TiledConv.Takes(g))
            {
                TiledConv.BackwardInput(k, g, dy.View, w.View, dx.View, accumulate, held: k.Held?.Input(w));
                return;
            }
            if (!accumulate)
            {
                dx.Zero();
            }
            k.Conv2d.BackwardInput(k.Stream, dx.Length, dy.View, w.View, dx.View, g);
            return;
        }
        BackwardInputCpu(g, dy.Pointer, w.Pointer, dx.Pointer, accumulate, paths);
    }

    /// <summary>dw += Σ_n dy[n] ⋆ x[n]: the gradient with respect to the weight; with <paramref name="db"/> also the bias's,
    /// db[k] += Σ_{n,p,q} dy[n,k,p,q] (on the tiled ILGPU path in the same launch, as the row sums of the product's A = dy).</summary>
    public static void BackwardWeight(Tensor dy, Tensor x, Tensor dw, int stride, int pad, Tensor? db = null, CpuConvPaths paths = default)
    {
        var g = ConvShape.Of(x, dw, stride, pad);
        Check.Devices("conv2d backward weight", dy, x, dw);
        Check.Shape("conv2d backward weight", "dy", dy, g.N, g.K, g.P, g.Q);
        if (db is not null)
        {
            Check.Devices("conv2d backward weight", dy, db);
            Check.Shape("conv2d backward bias", "db", db, g.K);
        }
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            if (!k.Simple && TiledConv.Takes(g))
            {
                TiledConv.BackwardWeight(k, g, dy.View, x.View, dw.View, db?.View);
                return;
            }
            k.Conv2d.BackwardWeight(k.Stream, dw.Length, dy.View, x.View, dw.View, g);
        }
        else
        {
            BackwardWeightCpu(g, dy.Pointer, x.Pointer, dw.Pointer, paths);
        }
        if (db is not null)
        {
            BackwardBias(dy, db);
        }
    }

    /// <summary>db[k] += Σ_{n,p,q} dy[n,k,p,q].</summary>
    public static void BackwardBias(Tensor dy, Tensor db)
    {
        Check.Rank("conv2d backward bias", "dy", dy, 4);
        Check.Devices("conv2d backward bias", dy, db);
        int n = dy.Dim(0), kk = dy.Dim(1), pq = dy.Dim(2) * dy.Dim(3);
        Check.Shape("conv2d backward bias", "db", db, kk);
        using var simd = CpuSimd.Enter(dy.Device);
        if (dy.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dy);
            if (!k.Simple)
            {
                // Several groups per channel, then one per channel adds their partials (TiledReduce.ChannelSums).
                TiledReduce.ChannelSums(k, dy.View, db.View, n, kk, pq);
                return;
            }
            k.Conv2d.BackwardBias(k.Stream, kk, dy.View, db.View, n, pq);
            return;
        }
        BackwardBiasCpu(dy.Pointer, db.Pointer, n, kk, pq);
    }

    /// <summary>
    /// db[k] += Σ_{n,p} dy[n, k, p] on raw CPU buffers, dy [n, kk, pq]. Channels are spread over the cores (each
    /// channel summed in the same order whatever the core count), rows summed with four vector accumulators: once
    /// the convolutions got faster this serial, latency-bound loop was a visible share of a training step (docs/perf.md).
    /// </summary>
    internal static void BackwardBiasCpu(float* dy, float* db, int n, int kk, int pq)
    {
        Cpu.For(kk, Math.Max(1, (1 << 16) / Math.Max(1, n * pq)), ((nint)dy, (nint)db, n, kk, pq), static (state, c0, c1) =>
        {
            var (dyp, dbp, n, kk, pq) = state;
            float* dy = (float*)dyp, db = (float*)dbp;
            for (int c = c0; c < c1; c++)
            {
                float s = 0;
                for (int i = 0; i < n; i++)
                {
                    s += SumRow(dy + ((long)i * kk + c) * pq, pq);
                }
                db[c] += s;
            }
        });
    }

    /// <summary>Σ row[0..len) with four independent vector accumulators.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float SumRow(float* row, int len)
    {
        int i = 0;
        float s = 0f;
        if (Isa.Avx2)
        {
            int w = Vector256<float>.Count;
            Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i + 4 * w <= len; i += 4 * w)
            {
                a0 += Vector256.Load(row + i);
                a1 += Vector256.Load(row + i + w);
                a2 += Vector256.Load(row + i + 2 * w);
                a3 += Vector256.Load(row + i + 3 * w);
            }
            for (; i + w <= len; i += w)
            {
                a0 += Vector256.Load(row + i);
            }
            s = Vector256.Sum((a0 + a1) + (a2 + a3));
        }
        else if (Isa.V128)
        {
            Vector128<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (; i + 16 <= len; i += 16)
            {
                a0 += Vector128.Load(row + i);
                a1 += Vector128.Load(row + i + 4);
                a2 += Vector128.Load(row + i + 8);
                a3 += Vector128.Load(row + i + 12);
            }
            for (; i + 4 <= len; i += 4)
            {
                a0 += Vector128.Load(row + i);
            }
            s = Vector128.Sum((a0 + a1) + (a2 + a3));
        }
        for (; i < len; i++)
        {
            s += row[i];
        }
        return s;
    }

    private static void CheckOperands(ConvShape g, Tensor x, Tensor w, Tensor b, Tensor y)
    {
        Check.Devices("conv2d", x, w, b, y);
        Check.Shape("conv2d", "b", b, g.K);
        Check.Shape("conv2d", "y", y, g.N, g.K, g.P, g.Q);
    }

    // ---------------- CPU fast: im2col + packed GEMM ----------------

    /// <summary>Forward on raw CPU buffers: per image, y[n] = W·col(x[n]) + b (+ e[n] when e is not null) (+ r[n] when r is
    /// not null: a residual shaped as y, added while the image's output is still in cache), the lowering col implicit
    /// or explicit (im2col) as <see cref="CpuConvPaths.Lowering"/> chooses.</summary>
    public static void ForwardCpu(ConvShape g, float* x, float* w, float* b, float* y, float* e = null, float* r = null, CpuConvPaths paths = default)
    {
        if (UseImplicit(g, Pass.Forward, paths.Lowering))
        {
            ConvGemm.Forward(g, x, w, b, y, e, r, paths);
            return;
        }
        bool imagesInParallel = g.N >= Cpu.Threads;
        Cpu.Items(imagesInParallel ? g.N : 1, (g, (nint)x, (nint)w, (nint)b, (nint)y, (nint)e, (nint)r, imagesInParallel), static (state, item) =>
        {
            var (g, xp, wp, bp, yp, ep, rp, imagesInParallel) = state;
            float* x = (float*)xp, w = (float*)wp, b = (float*)bp, y = (float*)yp, e = (float*)ep, r = (float*)rp;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            int first = imagesInParallel ? item : 0, last = imagesInParallel ? item + 1 : g.N;
            for (int n = first; n < last; n++)
            {
                float* col = g.IsPointwise ? x + n * xs : Arena.Current.Floats(ArenaSlot.Col, (long)g.Crs * g.Pq);
                if (!g.IsPointwise)
                {
                    Im2Col(g, x + n * xs, col);
                }
                float* yn = y + n * ys;
                Gemm.Multiply(g.K, g.Pq, g.Crs, w, g.Crs, 1, col, g.Pq, 1, yn, g.Pq, accumulate: false, parallel: !imagesInParallel);
                for (int k = 0; k < g.K; k++)
                {
                    Simd.AddScalar(new Span<float>(yn + (long)k * g.Pq, g.Pq), e == null ? b[k] : b[k] + e[(long)n * g.K + k]);
                }
                if (r != null)
                {
                    Simd.AddInPlace(new Span<float>(yn, (int)ys), new ReadOnlySpan<float>(r + n * ys, (int)ys));
                }
            }
        });
    }

    /// <summary>Input gradient on raw CPU buffers: dx[n] += col2im(Wᵀ·dy[n]), or the equivalent convolutions of dy
    /// with the flipped kernel (implicit).</summary>
    public static void BackwardInputCpu(ConvShape g, float* dy, float* w, float* dx, bool accumulate = true, CpuConvPaths paths = default)
    {
        if (UseImplicit(g, Pass.Input, paths.Lowering))
        {
            ConvGemm.BackwardInput(g, dy, w, dx, accumulate, paths);
            return;
        }
        bool imagesInParallel = g.N >= Cpu.Threads;
        Cpu.Items(imagesInParallel ? g.N : 1, (g, (nint)dy, (nint)w, (nint)dx, accumulate, imagesInParallel), static (state, item) =>
        {
            var (g, dyp, wp, dxp, accumulate, imagesInParallel) = state;
            float* dy = (float*)dyp, w = (float*)wp, dx = (float*)dxp;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            int first = imagesInParallel ? item : 0, last = imagesInParallel ? item + 1 : g.N;
            for (int n = first; n < last; n++)
            {
                if (g.IsPointwise)
                {
                    Gemm.Multiply(g.C, g.Pq, g.K, w, 1, g.C, dy + n * ys, g.Pq, 1, dx + n * xs, g.Pq, accumulate, parallel: !imagesInParallel);
                    continue;
                }
                if (!accumulate)
                {
                    new Span<float>(dx + n * xs, (int)xs).Clear();
                }
                float* col = Arena.Current.Floats(ArenaSlot.Col, (long)g.Crs * g.Pq);
                Gemm.Multiply(g.Crs, g.Pq, g.K, w, 1, g.Crs, dy + n * ys, g.Pq, 1, col, g.Pq, accumulate: false, parallel: !imagesInParallel);
                Col2ImAdd(g, col, dx + n * xs);
            }
        });
    }

    /// <summary>Weight gradient on raw CPU buffers: dW += Σ_n dy[n]·col(x[n])ᵀ, one private
    /// partial sum per worker so workers never write the same memory.</summary>
    public static void BackwardWeightCpu(ConvShape g, float* dy, float* x, float* dw, CpuConvPaths paths = default)
    {
        if (UseImplicit(g, Pass.Weight, paths.Lowering))
        {
            ConvGemm.BackwardWeight(g, dy, x, dw, paths);
            return;
        }
        int workers = Cpu.Parts(g.N); // parts of the batch: a function of N, not of the cores
        int wlen = g.K * g.Crs;
        var partials = Arena.Current.Floats(ArenaSlot.Partials, (long)workers * wlen);
        Cpu.Items(workers, (g, (nint)dy, (nint)x, (nint)partials, wlen, workers), static (state, worker) =>
        {
            var (g, dyp, xp, partialsp, wlen, workers) = state;
            float* dy = (float*)dyp, x = (float*)xp, acc = (float*)partialsp + (long)worker * wlen;
            long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
            new Span<float>(acc, wlen).Clear();
            int first = (int)((long)g.N * worker / workers), last = (int)((long)g.N * (worker + 1) / workers);
            for (int n = first; n < last; n++)
            {
                float* col = g.IsPointwise ? x + n * xs : Arena.Current.Floats(ArenaSlot.Col, (long)g.Crs * g.Pq);
                if (!g.IsPointwise)
                {
                    Im2Col(g, x + n * xs, col);
                }
                // dW [K, CRS] += dy[n] [K, PQ] · colᵀ [PQ, CRS]
                Gemm.Multiply(g.K, g.Crs, g.Pq, dy + n * ys, g.Pq, 1, col, 1, g.Pq, acc, g.Crs, accumulate: true, parallel: workers == 1);
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    private enum Pass { Forward, Input, Weight }

    /// <summary>Whether <paramref name="pass"/> of <paramref name="g"/> runs through <see cref="ConvGemm"/>.</summary>
    private static bool UseImplicit(ConvShape g, Pass pass, ConvLowering lowering)
    {
        if (pass == Pass.Input && !ConvGemm.SupportsBackwardInput(g)) return false;
        switch (lowering)
        {
            case ConvLowering.Explicit: return false;
            case ConvLowering.Implicit: return true;
        }
        // The implicit path wins every 3x3 pass of the U-Net's shapes (1..128 channels, 28x28 .. 7x7, stride 1 and 2)
        // and ties the largest (256 channels at 7x7, where its wide columns waste 2/7 of the work) (docs/perf.md).
        // Pointwise convolutions need no lowering at all, so the explicit path (a plain GEMM on the tensor) wins there.
        if (g.IsPointwise) return false;
        // The implicit path runs each image on one core, the explicit one splits a lone image's GEMM over the cores: for a
        // lone image that wins back the input gradient once the product is large (K >= 64). Decided by the shape alone (the
        // two paths sum in other orders), so the bits are the same on any number of cores; a machine with more cores than
        // images leaves some idle here.
        if (g.N < 2 && pass == Pass.Input && g.K >= 64) return false;
        return true;
    }

    /// <summary>col[(c·R + r)·S + s, p·Q + q] = x[c, p·stride - pad + r, q·stride - pad + s], zero outside.</summary>
    internal static void Im2Col(ConvShape g, float* x, float* col)
    {
        for (int c = 0; c < g.C; c++)
        {
            for (int r = 0; r < g.R; r++)
            {
                for (int s = 0; s < g.S; s++)
                {
                    float* row = col + (long)((c * g.R + r) * g.S + s) * g.Pq;
                    for (int p = 0; p < g.P; p++)
                    {
                        int h = p * g.Stride - g.Pad + r;
                        float* dst = row + p * g.Q;
                        if ((uint)h >= (uint)g.H)
                        {
                            new Span<float>(dst, g.Q).Clear();
                            continue;
                        }
                        float* src = x + ((long)c * g.H + h) * g.W;
                        if (g.Stride == 1)
                        {
                            // Contiguous run: valid q where 0 <= q - pad + s < W.
                            int q0 = Math.Max(0, g.Pad - s), q1 = Math.Min(g.Q, g.W + g.Pad - s);
                            for (int q = 0; q < q0; q++)
                            {
                                dst[q] = 0;
                            }
                            if (q1 > q0)
                            {
                                new ReadOnlySpan<float>(src + q0 - g.Pad + s, q1 - q0).CopyTo(new Span<float>(dst + q0, q1 - q0));
                            }
                            for (int q = Math.Max(q1, q0); q < g.Q; q++)
                            {
                                dst[q] = 0;
                            }
                        }
                        else
                        {
                            for (int q = 0; q < g.Q; q++)
                            {
                                int w = q * g.Stride - g.Pad + s;
                                dst[q] = (uint)w < (uint)g.W ? src[w] : 0f;
                            }
                        }
                    }
                }
            }
        }
    }

    /// <summary>The adjoint of <see cref="Im2Col"/>: x[c, h, w] += every col entry that read it.</summary>
    internal static void Col2ImAdd(ConvShape g, float* col, float* x)
    {
        for (int c = 0; c < g.C; c++)
        {
            for (int r = 0; r < g.R; r++)
            {
                for (int s = 0; s < g.S; s++)
                {
                    float* row = col + (long)((c * g.R + r) * g.S + s) * g.Pq;
                    for (int p = 0; p < g.P; p++)
                    {
                        int h = p * g.Stride - g.Pad + r;
                        if ((uint)h >= (uint)g.H)
                        {
                            continue;
                        }
                        float* dst = x + ((long)c * g.H + h) * g.W;
                        float* src = row + p * g.Q;
                        if (g.Stride == 1)
                        {
                            int q0 = Math.Max(0, g.Pad - s), q1 = Math.Min(g.Q, g.W + g.Pad - s);
                            if (q1 > q0)
                            {
                                Simd.AddInPlace(new Span<float>(dst + q0 - g.Pad + s, q1 - q0), new ReadOnlySpan<float>(src + q0, q1 - q0));
                            }
                        }
                        else
                        {
                            for (int q = 0; q < g.Q; q++)
                            {
                                int w = q * g.Stride - g.Pad + s;
                                if ((uint)w < (uint)g.W)
                                {
                                    dst[w] += src[q];
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // ---------------- CPU naive: the reference and the benchmark baseline ----------------

    /// <summary>Direct loops: y[n,k,p,q] = b[k] + Σ_{c,r,s} w[k,c,r,s]·x[n,c,p·st-pad+r,q·st-pad+s].</summary>
    public static void ForwardNaive(ConvShape g, float[] x, float[] w, float[] b, float[] y)
    {
        for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
        for (int p = 0; p < g.P; p++)
        for (int q = 0; q < g.Q; q++)
        {
            float acc = b[k];
            for (int c = 0; c < g.C; c++)
            for (int r = 0; r < g.R; r++)
            {
                int h = p * g.Stride - g.Pad + r;
                if ((uint)h >= (uint)g.H)
                {
                    continue;
                }
                for (int s = 0; s < g.S; s++)
                {
                    int ww = q * g.Stride - g.Pad + s;
                    if ((uint)ww < (uint)g.W)
                    {
                        acc += w[((k * g.C + c) * g.R + r) * g.S + s] * x[((n * g.C + c) * g.H + h) * g.W + ww];
                    }
                }
            }
            y[((n * g.K + k) * g.P + p) * g.Q + q] = acc;
        }
    }

    /// <summary>Direct loops: dx[n,c,h,w] += Σ w[k,c,r,s]·dy[n,k,p,q] over the (p,q) that read (h,w).</summary>
    public static void BackwardInputNaive(ConvShape g, float[] dy, float[] w, float[] dx)
    {
        for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
        for (int p = 0; p < g.P; p++)
        for (int q = 0; q < g.Q; q++)
        {
            float d = dy[((n * g.K + k) * g.P + p) * g.Q + q];
            for (int c = 0; c < g.C; c++)
            for (int r = 0; r < g.R; r++)
            {
                int h = p * g.Stride - g.Pad + r;
                if ((uint)h >= (uint)g.H)
                {
                    continue;
                }
                for (int s = 0; s < g.S; s++)
                {
                    int ww = q * g.Stride - g.Pad + s;
                    if ((uint)ww < (uint)g.W)
                    {
                        dx[((n * g.C + c) * g.H + h) * g.W + ww] += w[((k * g.C + c) * g.R + r) * g.S + s] * d;
                    }
                }
            }
        }
    }

    /// <summary>Direct loops: dw[k,c,r,s] += Σ_{n,p,q} dy[n,k,p,q]·x[n,c,p·st-pad+r,q·st-pad+s].</summary>
    public static void BackwardWeightNaive(ConvShape g, float[] dy, float[] x, float[] dw)
    {
        for (int n = 0; n < g.N; n++)
        for (int k = 0; k < g.K; k++)
        for (int p = 0; p < g.P; p++)
        for (int q = 0; q < g.Q; q++)
        {
            float d = dy[((n * g.K + k) * g.P + p) * g.Q + q];
            for (int c = 0; c < g.C; c++)
            for (int r = 0; r < g.R; r++)
            {
                int h = p * g.Stride - g.Pad + r;
                if ((uint)h >= (uint)g.H)
                {
                    continue;
                }
                for (int s = 0; s < g.S; s++)
                {
                    int ww = q * g.Stride - g.Pad + s;
                    if ((uint)ww < (uint)g.W)
                    {
                        dw[((k * g.C + c) * g.R + r) * g.S + s] += d * x[((n * g.C + c) * g.H + h) * g.W + ww];
                    }
                }
            }
        }
    }

    // ---------------- ILGPU v1: one thread per output element ----------------

    // i over y [N, K, P, Q]
    internal static void ForwardKernel(Index1D i, ArrayView<float> x, ArrayView<float> w, ArrayView<float> b, ArrayView<float> y, ConvShape g)
    {
        int q = i % g.Q, p = i / g.Q % g.P, k = i / g.Pq % g.K, n = i / (g.Pq * g.K);
        float acc = b[k];
        for (int c = 0; c < g.C; c++)
        {
            for (int r = 0; r < g.R; r++)
            {
                int h = p * g.Stride - g.Pad + r;
                if (h < 0 || h >= g.H)
                {
                    continue;
                }
                for (int s = 0; s < g.S; s++)
                {
                    int ww = q * g.Stride - g.Pad + s;
                    if (ww >= 0 && ww < g.W)
                    {
                        acc += w[((k * g.C + c) * g.R + r) * g.S + s] * x[((n * g.C + c) * g.H + h) * g.W + ww];
                    }
                }
            }
        }
        y[i] = acc;
    }

    // i over dx [N, C, H, W]: gathers every (k, r, s) whose output position (p, q) read this input.
    internal static void BackwardInputKernel(Index1D i, ArrayView<float> dy, ArrayView<float> w, ArrayView<float> dx, ConvShape g)
    {
        int ww = i % g.W, h = i / g.W % g.H, c = i / (g.W * g.H) % g.C, n = i / (g.W * g.H * g.C);
        float acc = 0;
        for (int r = 0; r < g.R; r++)
        {
            int ph = h + g.Pad - r;
            if (ph < 0 || ph % g.Stride != 0 || ph / g.Stride >= g.P)
            {
                continue;
            }
            int p = ph / g.Stride;
            for (int s = 0; s < g.S; s++)
            {
                int qw = ww + g.Pad - s;
                if (qw < 0 || qw % g.Stride != 0 || qw / g.Stride >= g.Q)
                {
                    continue;
                }
                int q = qw / g.Stride;
                for (int k = 0; k < g.K; k++)
                {
                    acc += w[((k * g.C + c) * g.R + r) * g.S + s] * dy[((n * g.K + k) * g.P + p) * g.Q + q];
                }
            }
        }
        dx[i] += acc;
    }

    // i over dw [K, C, R, S]: sums over the batch and the output positions.
    internal static void BackwardWeightKernel(Index1D i, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> dw, ConvShape g)
    {
        int s = i % g.S, r = i / g.S % g.R, c = i / (g.S * g.R) % g.C, k = i / (g.S * g.R * g.C);
        float acc = 0;
        for (int n = 0; n < g.N; n++)
        {
            for (int p = 0; p < g.P; p++)
            {
                int h = p * g.Stride - g.Pad + r;
                if (h < 0 || h >= g.H)
                {
                    continue;
                }
                for (int q = 0; q < g.Q; q++)
                {
                    int ww = q * g.Stride - g.Pad + s;
                    if (ww >= 0 && ww < g.W)
                    {
                        acc += dy[((n * g.K + k) * g.P + p) * g.Q + q] * x[((n * g.C + c) * g.H + h) * g.W + ww];
                    }
                }
            }
        }
        dw[i] += acc;
    }

    // k over db [K]
    internal static void BackwardBiasKernel(Index1D k, ArrayView<float> dy, ArrayView<float> db, int n, int pq)
    {
        float acc = 0;
        int kk = db.IntLength;
        for (int i = 0; i < n; i++)
        {
            int start = (i * kk + k) * pq;
            for (int j = 0; j < pq; j++)
            {
                acc += dy[start + j];
            }
        }
        db[k] += acc;
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        // The tiled twins (src/Kernels/Gpu/TiledConv.cs).
        public readonly TiledKernels<ConvForwardTile> TiledForward = new(k, matmul: false);

        public readonly TiledKernels<ConvInputTile> TiledInput = new(k, matmul: false);

        public readonly TiledKernels<ConvWeightTile> TiledWeight = new(k, matmul: false);

        /// <summary>The forward and the input gradient with K steps of one tap (<see cref="TiledConv.ByTaps"/>), in strict fp32
        /// and TF32 (FFMA and TF32: 3xTF32 meets its target with the channel-major ops, and two more tensor-core kernels would cost
        /// every compile of the kernel set).</summary>
        public readonly TiledKernels<ConvForwardTapTile> TiledForwardByTap = new(k, matmul: false, lazy: true, tf32x3: false);

        public readonly TiledKernels<ConvInputTapTile> TiledInputByTap = new(k, matmul: false, lazy: true, tf32x3: false);

        /// <summary>The weight gradient with tap-major columns (<see cref="TiledConv.ByTapColumns"/>), in strict fp32 only: in
        /// TF32 its B loads would touch 4.9 cache lines a warp load against the channel-major op's 2.2, as many line reads a K
        /// step as the step's issue clocks (docs/gpu.md).</summary>
        public readonly TiledKernels<ConvWeightTapTile> TiledWeightByTap = new(k, matmul: false, lazy: true, tf32x3: false, tf32: false);

        /// <summary>The weights' permutation for those, every held weight in one launch or one weight at its call
        /// (<see cref="TiledConv.PermuteWeightsKernel"/>).</summary>
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<int>, int, ArrayView<float>, ArrayView<float>> PermuteWeights =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<int>, int, ArrayView<float>, ArrayView<float>>>(TiledConv.PermuteWeightsKernel);

        /// <summary>The forward of a one-output-channel convolution (<see cref="TiledConv.SingleChannelForwardKernel"/>).</summary>
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>,
            ArrayView<float>, ArrayView<Tap>, TileArgs> SingleChannelForward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>,
                ArrayView<float>, ArrayView<Tap>, TileArgs>>(TiledConv.SingleChannelForwardKernel);

        /// <summary>The weight gradient of a convolution with one input or one output channel (<see cref="TiledConv.NarrowWeightKernel"/>).</summary>
        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>,
            ArrayView<int>, TileArgs> NarrowWeight =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>,
                ArrayView<int>, TileArgs>>(TiledConv.NarrowWeightKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape> Forward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape>>(ForwardKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape> BackwardInput =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape>>(BackwardInputKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape> BackwardWeight =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ConvShape>>(BackwardWeightKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int> BackwardBias =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int>>(BackwardBiasKernel);
    }
}

/// <summary>
/// Which of the managed CPU convolution's equivalent paths to take, as an argument of the op (tests and benchmarks cover
/// each; every choice computes the same sums, in a different order). The default picks per shape and pass.
/// </summary>
/// <param name="Lowering">Implicit (ConvGemm), explicit (im2col + GEMM), or per shape.</param>
/// <param name="PackEveryPanel">Pack the GEMM's B panels even from sources it would read in place.</param>
/// <param name="WideForward">Keep the forward pass on the wide grid where it would take dense columns.</param>
/// <param name="DotWeightGradient">The implicit weight gradient's kernel: the dot-product tiles (true), the packed GEMM
/// (false), or by shape (null).</param>
public readonly record struct CpuConvPaths(ConvLowering Lowering = ConvLowering.Auto, bool PackEveryPanel = false, bool WideForward = false,
    bool? DotWeightGradient = null);
