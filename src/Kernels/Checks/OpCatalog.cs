using Ddpm.Tensors;

namespace Ddpm.Kernels.Checks;

/// <summary>
/// Every op of the engine as a check case, on odd shapes that are multiples of no tile
/// (N=3, C=5, H=7, W=9, a size of 1 somewhere). Together the cases launch every ILGPU kernel
/// the engine loads.
/// </summary>
public static class OpCatalog
{
    /// <summary>All cases: the ones with a backward are gradient-checked too.</summary>
    public static IReadOnlyList<OpCase> All { get; } = Build();

    /// <summary>The cases that have a backward.</summary>
    public static IEnumerable<OpCase> Differentiable => All.Where(c => c.Backward is not null);

    /// <summary>The case called <paramref name="name"/>.</summary>
    public static OpCase Get(string name) => All.First(c => c.Name == name);

    private static List<OpCase> Build() =>
    [
        Conv("conv2d 3x3 s1 p1", n: 3, c: 5, h: 7, w: 9, k: 4, r: 3, s: 3, stride: 1, pad: 1),
        Conv("conv2d 3x3 s2 p1", n: 3, c: 5, h: 7, w: 9, k: 6, r: 3, s: 3, stride: 2, pad: 1),
        Conv("conv2d 1x1", n: 3, c: 5, h: 7, w: 9, k: 4, r: 1, s: 1, stride: 1, pad: 0),
        Conv("conv2d 3x3 c=1", n: 2, c: 1, h: 7, w: 9, k: 5, r: 3, s: 3, stride: 1, pad: 1), // conv_in's narrow weight gradient
        Conv("conv2d 3x3 k=1", n: 2, c: 5, h: 7, w: 9, k: 1, r: 3, s: 3, stride: 1, pad: 1), // conv_out's one-channel forward and narrow weight gradient
        // The narrow weight gradient over more pixels than one split takes (N·P·Q = 4,800: two splits by the automatic
        // rule, added in order by each pair's last group).
        Conv("conv2d 3x3 k=1, pixels split", n: 3, c: 2, h: 40, w: 40, k: 1, r: 3, s: 3, stride: 1, pad: 1),
        Conv("conv2d 5x3 s2 p2", n: 1, c: 2, h: 8, w: 5, k: 3, r: 5, s: 3, stride: 2, pad: 2),
        // What training runs and the small cases do not: the weight gradient split over K (N·P·Q = 1,536: six splits of
        // 256 by the automatic rule, finished by each tile's last group) and two row tiles (K = 65 > 64) in every pass.
        Conv("conv2d 3x3 split-K, 2 row tiles", n: 6, c: 2, h: 16, w: 16, k: 65, r: 3, s: 3, stride: 1, pad: 1),
        // The forward and the input gradient split over K where their tiles alone would not fill the chip (the base preset's
        // 7x7 layers): two tiles each, C·R·S = 864 and K·R·S = 810, three splits each by the automatic rule, finished through
        // the op's epilogue by each tile's last group.
        Conv("conv2d 3x3 split-K forward and input gradient", n: 1, c: 96, h: 4, w: 5, k: 90, r: 3, s: 3, stride: 1, pad: 1),
        // The forward and the input gradient in K steps of one tap (C and K multiples of 16: TiledConv.ByTaps; the case above
        // takes them for its forward only), their weights permuted at the call.
        Conv("conv2d 3x3 in K steps of one tap", n: 1, c: 16, h: 4, w: 5, k: 16, r: 3, s: 3, stride: 1, pad: 1),
        // The weight gradient with tap-major columns (C a multiple of 64: TiledConv.ByTapColumns, strict fp32), every tiled
        // weight gradient of the base preset: 576 columns, the last tile's second half absent.
        Conv("conv2d 3x3 weight gradient by tap-major columns", n: 1, c: 64, h: 4, w: 5, k: 8, r: 3, s: 3, stride: 1, pad: 1),
        ConvOnTf32Values(),
        ConvChannelBias("conv2d 3x3 + channel bias", n: 3, c: 5, h: 7, w: 9, k: 4),
        ConvChannelBias("conv2d 1x1 + channel bias", n: 3, c: 5, h: 7, w: 9, k: 4, r: 1),
        ConvResidual("conv2d 3x3 + residual", n: 2, c: 3, h: 6, w: 5, k: 4),
        GroupNormCase("groupnorm C6 G3", n: 3, c: 6, h: 7, w: 9, groups: 3),
        GroupNormCase("groupnorm C5 G5", n: 3, c: 5, h: 7, w: 9, groups: 5),
        GroupNormCase("groupnorm C5 G1 1x1", n: 3, c: 5, h: 1, w: 1, groups: 1),
        GroupNormCase("groupnorm+silu C6 G3", n: 3, c: 6, h: 7, w: 9, groups: 3, silu: true),
        GroupNormCase("groupnorm+silu C8 G2 W=13", n: 2, c: 8, h: 3, w: 13, groups: 2, silu: true),
        new OpCase
        {
            // The default tolerance holds with CUDA's fast exp (ex2.approx.f32, at most 2 + 1.173·|x|
            // ulp, so ≤ 8.3e-7 relative for |x| ≤ 5): σ inherits that relative error, silu too, and
            // silu' = σ(1 + x(1 - σ)) moves by ≤ (1 + |x|)·8.3e-7 ≤ 5e-6, times |dy| ≤ 4: 2e-5 < 1e-4.
            // GroupNorm+SiLU and softmax cross-entropy (exp, and lg2.approx for the log) stay as far inside.
            Name = "silu",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(x[0].Shape), y => Silu.Forward(x[0], y))],
            Backward = (s, x, y, dy, dx) => Silu.Backward(dy, x[0], dx[0]!),
        },
        new OpCase
        {
            Name = "upsample nearest 2x",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(3, 5, 14, 18), y => Upsample.Forward(x[0], y))],
            Backward = (s, x, y, dy, dx) => Upsample.Backward(dy, dx[0]!),
        },
        new OpCase
        {
            Name = "linear",
            ProductTerms = 7,
            Inputs = [new("x", [3, 7]), new("w", [5, 7]), new("b", [5])],
            Forward = (s, x) => [Run(s.Output(3, 5), y => Linear.Forward(x[0], x[1], x[2], y))],
            Backward = (s, x, y, dy, d) =>
            {
                Linear.BackwardInput(dy, x[1], d[0]!);
                Linear.BackwardWeight(dy, x[0], d[1]!, d[2]!); // the bias gradient rides in the weight gradient, as in the model
            },
        },
        new OpCase
        {
            Name = "linear bias gradient alone",
            ProductTerms = 7,
            Inputs = [new("x", [3, 7]), new("w", [5, 7]), new("b", [5])],
            Forward = (s, x) => [Run(s.Output(3, 5), y => Linear.Forward(x[0], x[1], x[2], y))],
            Backward = (s, x, y, dy, d) =>
            {
                Linear.BackwardInput(dy, x[1], d[0]!);
                Linear.BackwardWeight(dy, x[0], d[1]!);
                Linear.BackwardBias(dy, d[2]!);
            },
        },
        new OpCase
        {
            Name = "matmul AT.BT accumulate",
            ProductTerms = 7,
            Inputs = [new("a", [7, 3]), new("b", [5, 7]), new("c", [3, 5])],
            Forward = (s, x) =>
            {
                Linear.Matmul(x[0], true, x[1], true, x[2], accumulate: true);
                return [x[2]];
            },
        },
        new OpCase
        {
            Name = "concat channels",
            Inputs = [new("a", [3, 2, 7, 9]), new("b", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(3, 7, 7, 9), y => Concat.Forward(x[0], x[1], y))],
            Backward = (s, x, y, dy, d) => Concat.Backward(dy, d[0]!, d[1]!),
        },
        new OpCase
        {
            Name = "add",
            Inputs = [new("a", [3, 5, 7, 9]), new("b", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(x[0].Shape), y => Elementwise.Add(x[0], x[1], y))],
            Backward = (s, x, y, dy, d) =>
            {
                Elementwise.Accumulate(d[0]!, dy);
                Elementwise.Accumulate(d[1]!, dy);
            },
        },
        new OpCase
        {
            Name = "scale",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(x[0].Shape), y => Elementwise.Scale(x[0], -0.7f, y))],
            Backward = (s, x, y, dy, d) => Elementwise.Accumulate(d[0]!, dy, -0.7f),
        },
        new OpCase
        {
            Name = "add channels (time embedding)",
            Inputs = [new("x", [3, 5, 7, 9]), new("e", [3, 5])],
            Forward = (s, x) => [Run(s.Output(x[0].Shape), y => Elementwise.AddChannels(x[0], x[1], y))],
            Backward = (s, x, y, dy, d) =>
            {
                Elementwise.Accumulate(d[0]!, dy);
                Elementwise.AddChannelsBackward(dy, d[1]!);
            },
        },
        new OpCase
        {
            Name = "combine (per-sample axpby)",
            Inputs = [new("a", [3, 1, 7, 9]), new("ca", [3]), new("b", [3, 1, 7, 9]), new("cb", [3])],
            Forward = (s, x) => [Run(s.Output(3, 1, 7, 9), y => Elementwise.Combine(x[0], x[1], x[2], x[3], y))],
        },
        new OpCase
        {
            // Normal inputs put about a third of the elements outside [-0.8, 1.1], so both bounds clip.
            Name = "clamp",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(x[0].Shape), y => Elementwise.Clamp(x[0], -0.8f, 1.1f, y))],
            KernelAtol = 0,
            KernelRtol = 0,
        },
        new OpCase
        {
            Name = "mse loss",
            Inputs = [new("pred", [3, 1, 7, 9]), new("target", [3, 1, 7, 9], Differentiable: false)],
            Forward = (s, x) => [Run(s.Output(1), y => Reduce.Mse(x[0], x[1], y))],
            Backward = (s, x, y, dy, d) => Reduce.MseBackward(dy, x[0], x[1], d[0]!),
            // The step's curvature error of a quadratic is exactly zero; the loss is a mean, so small.
            GradAtol = 1e-4,
        },
        new OpCase
        {
            // K = 11 with labels 0..9: the last class is never a label, so a one-hot shifted by one class shows.
            Name = "softmax cross-entropy",
            Inputs = [new("logits", [7, 11]), new("labels", [7], InputFill.Digits, Differentiable: false)],
            Forward = (s, x) => [Run(s.Output(1), y => Reduce.SoftmaxCrossEntropy(x[0], x[1], y))],
            Backward = (s, x, y, dy, d) => Reduce.SoftmaxCrossEntropyBackward(dy, x[0], x[1], d[0]!),
        },
        new OpCase
        {
            Name = "sum",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(1), y => Reduce.Sum(x[0], y))],
            Backward = (s, x, y, dy, d) => Reduce.SumBackward(dy, d[0]!, 1f),
        },
        new OpCase
        {
            Name = "mean",
            // Few elements, so the gradient 1/n is large enough for a broken one to show.
            Inputs = [new("x", [3, 5])],
            Forward = (s, x) => [Run(s.Output(1), y => Reduce.Mean(x[0], y))],
            Backward = (s, x, y, dy, d) => Reduce.SumBackward(dy, d[0]!, 1f / x[0].Length),
            GradAtol = 1e-4,
        },
        new OpCase
        {
            Name = "sum of squares",
            Inputs = [new("x", [3, 5, 7, 9])],
            Forward = (s, x) => [Run(s.Output(1), y => Reduce.SumSquares(x[0], y))],
        },
        new OpCase
        {
            Name = "flag non-finite",
            Inputs = [new("x", [3, 5, 7, 9]), new("y", [3, 5, 7])],
            Forward = (s, x) =>
            {
                var flag = s.Output(1);
                Elementwise.Fill(flag, Reduce.NoneFlagged);
                Reduce.FlagNonFinite(x[0], flag, 4); // finite: stays
                Elementwise.Scale(x[1], float.PositiveInfinity, x[1]); // ±inf everywhere
                Reduce.FlagNonFinite(x[1], flag, 2);
                Reduce.FlagNonFinite(x[1], flag, 3); // a later, higher id does not overwrite
                return [flag];
            },
        },
        new OpCase
        {
            Name = "sinusoidal time embedding",
            Inputs = [new("t", [5], InputFill.Timesteps)],
            Forward = (s, x) => [Run(s.Output(5, 18), y => TimeEmbedding.Forward(x[0], y))],
            // On CUDA MathF.Exp compiles to a multiply by log2(e) and ex2.approx.f32 (CUDA's __expf:
            // at most 2 + floor(1.173·|x|) ulp), sin/cos to sin/cos.approx.f32 (abs error 2^-21.41 on
            // [-π, π], which the kernel's Cody-Waite reduction keeps them on). The frequency's error
            // scales with the argument t·f: |Δ| ≤ t·f·(3 + 1.173·|x|)·2^-23 + ulp(t·f) + 1e-6 for
            // f = e^x, x = -ln(1e4)·j/9; the worst over t ≤ 299, j ≤ 8 is 6.0e-5 (t = 299, j = 1), so
            // 1e-4. The managed backends agree to ~1e-6; a wrong frequency or a swapped sin/cos is O(1).
            KernelAtol = 1e-4,
        },
        new OpCase
        {
            Name = "label embedding (one-hot x table)",
            // Seven labels over eleven rows: some rows are hit twice, some never (their gradient stays zero).
            Inputs = [new("labels", [7], InputFill.Labels, Differentiable: false), new("table", [11, 6])],
            Forward = (s, x) =>
            {
                var h = Run(s.Output(7, 11), h => Embedding.OneHot(x[0], h));
                return [Run(s.Output(7, 6), y => Embedding.Forward(h, x[1], y)), h];
            },
            Backward = (s, x, y, dy, d) => Embedding.Backward(y[1], dy, d[1]!),
        },
        new OpCase
        {
            Name = "adam step",
            Inputs = [new("p", [3, 5, 7]), new("g", [3, 5, 7]), new("m", [3, 5, 7]), new("v", [3, 5, 7], InputFill.Positive)],
            Forward = (s, x) =>
            {
                Optim.Adam(x[0], x[1], x[2], x[3], lr: 1e-3f, beta1: 0.9f, beta2: 0.999f, eps: 1e-8f, step: 3);
                return [x[0], x[2], x[3]];
            },
        },
        new OpCase
        {
            Name = "ema",
            Inputs = [new("e", [3, 5, 7]), new("p", [3, 5, 7])],
            Forward = (s, x) =>
            {
                Optim.Ema(x[0], x[1], 0.999f);
                return [x[0]];
            },
        },
        new OpCase
        {
            Name = "random uniform",
            Inputs = [],
            Forward = (s, x) => [Run(s.Output(3, 5, 7, 9), y => RandomFill.Uniform(y, seed: 42, offset: 1000))],
            // The same integer arithmetic on every backend: equal bit for bit.
            KernelAtol = 0,
            KernelRtol = 0,
        },
        new OpCase
        {
            Name = "random normal",
            Inputs = [],
            Forward = (s, x) => [Run(s.Output(3, 5, 7, 9), y => RandomFill.Normal(y, seed: 42, offset: 1001))],
            // Box-Muller y = r·cos(θ), r = sqrt(-2 ln u1), θ in [-π, π). On CUDA ln is lg2.approx.f32
            // (__logf: abs error 2^-21.41 = 3.6e-7 for u1 in [0.5, 2]) and cos/sin are cos/sin.approx
            // (abs 3.6e-7 on [-π, π]): |Δy| ≤ 3.6e-7/r + 3.6e-7·r. Near u1 = 1 r is small and the first
            // term grows; this stream's smallest r is 0.021, so the bound is 1.5e-5 (computed over its
            // 945 elements): atol 3e-5. The integer bits behind u1, u2 are equal bit for bit ("random uniform").
            KernelAtol = 3e-5,
            KernelRtol = 1e-5,
        },
        new OpCase
        {
            Name = "fill",
            Inputs = [],
            Forward = (s, x) => [Run(s.Output(3, 5), y => Elementwise.Fill(y, 2.5f))],
            KernelAtol = 0,
            KernelRtol = 0,
        },
    ];

    /// <summary>The longest sum a convolution's three passes take: C·R·S (forward), K·R·S (input gradient), N·P·Q (weight).</summary>
    private static int ConvTerms(ConvShape g) => Math.Max(g.Crs, Math.Max(g.K * g.R * g.S, g.N * g.Pq));

    private static Tensor Run(Tensor output, Action<Tensor> op)
    {
        op(output);
        return output;
    }

    private static OpCase Conv(string name, int n, int c, int h, int w, int k, int r, int s, int stride, int pad)
    {
        var g = new ConvShape(n, c, h, w, k, r, s, stride, pad);
        return new OpCase
        {
            Name = name,
            ProductTerms = ConvTerms(g),
            Inputs = [new("x", [n, c, h, w]), new("w", [k, c, r, s]), new("b", [k])],
            Forward = (sc, x) => [Run(sc.Output(n, k, g.P, g.Q), y => Conv2d.Forward(x[0], x[1], x[2], y, stride, pad))],
            Backward = (sc, x, y, dy, d) =>
            {
                Conv2d.BackwardInput(dy, x[1], d[0]!, stride, pad);
                // The bias gradient rides in the weight gradient's pass, as in the model; the standalone bias gradient
                // (a frozen weight) has its own case.
                Conv2d.BackwardWeight(dy, x[0], d[1]!, stride, pad, d[2]!);
            },
        };
    }

    /// <summary>
    /// A convolution's forward on TF32 values (<see cref="InputFill.Tf32Exact"/>), checked at fp32's tolerance in every math
    /// mode (no <see cref="OpCase.ProductTerms"/>): the tensor-core kernels stage an operand as x plus half its TF32 unit and
    /// count on the tensor core to drop the low 13 bits (Tf32.HalfUlp, docs/gpu.md). If a GPU's tensor core rounded them
    /// instead, every operand here would be a unit off and the self-check would drop the tensor-core mode, naming this case.
    /// </summary>
    private static OpCase ConvOnTf32Values()
    {
        const int n = 2, c = 3, h = 5, w = 6, k = 5;
        return new OpCase
        {
            Name = "conv2d 3x3 on TF32 values",
            // Sums of 27 products below 4 in another order, or truncated by a tensor core's accumulator, stay within 1e-4; a
            // tensor core that rounded the staged operands would miss by ~1e-2 (TensorCoreTests).
            KernelAtol = 1e-3,
            Inputs = [new("x", [n, c, h, w], InputFill.Tf32Exact), new("w", [k, c, 3, 3], InputFill.Tf32Exact), new("b", [k], InputFill.Tf32Exact)],
            Forward = (sc, x) => [Run(sc.Output(n, k, h, w), y => Conv2d.Forward(x[0], x[1], x[2], y, 1, 1))],
        };
    }

    /// <summary>y = conv(x, w) + b + residual (a ResBlock's skip path, folded into its second convolution): dresidual = dy.
    /// The weight and bias gradients as separate calls (the path of a frozen weight).</summary>
    private static OpCase ConvResidual(string name, int n, int c, int h, int w, int k)
    {
        return new OpCase
        {
            Name = name,
            ProductTerms = ConvTerms(new ConvShape(n, c, h, w, k, 3, 3, 1, 1)),
            Inputs = [new("x", [n, c, h, w]), new("w", [k, c, 3, 3]), new("b", [k]), new("residual", [n, k, h, w])],
            Forward = (sc, x) => [Run(sc.Output(n, k, h, w), y => Conv2d.Forward(x[0], x[1], x[2], y, 1, 1, residual: x[3]))],
            Backward = (sc, x, y, dy, d) =>
            {
                Conv2d.BackwardInput(dy, x[1], d[0]!, 1, 1);
                Conv2d.BackwardWeight(dy, x[0], d[1]!, 1, 1);
                Conv2d.BackwardBias(dy, d[2]!);
                Elementwise.Accumulate(d[3]!, dy);
            },
        };
    }

    /// <summary>y = conv(x, w) + b + e[n, k] (the ResBlock's time embedding folded into its first convolution).</summary>
    private static OpCase ConvChannelBias(string name, int n, int c, int h, int w, int k, int r = 3)
    {
        int pad = r / 2;
        return new OpCase
        {
            Name = name,
            ProductTerms = ConvTerms(new ConvShape(n, c, h, w, k, r, r, 1, pad)),
            Inputs = [new("x", [n, c, h, w]), new("w", [k, c, r, r]), new("b", [k]), new("e", [n, k])],
            Forward = (sc, x) => [Run(sc.Output(n, k, h, w), y => Conv2d.Forward(x[0], x[1], x[2], y, 1, pad, channelBias: x[3]))],
            Backward = (sc, x, y, dy, d) =>
            {
                Conv2d.BackwardInput(dy, x[1], d[0]!, 1, pad);
                Conv2d.BackwardWeight(dy, x[0], d[1]!, 1, pad, d[2]!);
                Elementwise.AddChannelsBackward(dy, d[3]!);
            },
        };
    }

    private static OpCase GroupNormCase(string name, int n, int c, int h, int w, int groups, bool silu = false) => new()
    {
        Name = name,
        Inputs = [new("x", [n, c, h, w]), new("gamma", [c], InputFill.Positive), new("beta", [c])],
        Forward = (s, x) =>
        {
            var y = s.Output(n, c, h, w);
            var mean = s.Output(n, groups);
            var rstd = s.Output(n, groups);
            GroupNorm.Forward(x[0], x[1], x[2], groups, 1e-5f, y, mean, rstd, silu);
            return [y, mean, rstd];
        },
        Backward = (s, x, y, dy, d) => GroupNorm.Backward(dy, x[0], y[1], y[2], x[1], x[2], groups, d[0]!, d[1]!, d[2]!, silu),
        // A 1×1 group of one channel normalises a single value: y = beta whatever x, and the
        // variance is ~eps, so x's derivative is tiny but its curvature huge; groups here hold ≥ 5.
    };
}
