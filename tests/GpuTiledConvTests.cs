using Ddpm.Kernels;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>
/// The tiled implicit-GEMM convolutions and matmul (src/Kernels/Gpu) and their simple twins against the managed CPU
/// backend, on the warp-32 (groups of 256) and warp-4 (groups of 64, four passes a tile) simulators. Shapes are ragged
/// (no dimension a multiple of a tile) and tiny: the simulator runs an OS thread per GPU thread. Inputs are small
/// integers, so every sum is exact in float32 whatever the order: results must match the CPU bit for bit. Outputs
/// start as NaN, so an element the kernel forgets shows; a rerun must reproduce the first run bit for bit.
/// </summary>
[Collection(GpuLikeCollection.Name)]
public sealed class GpuTiledConvTests(GpuLikeFixture fixture, ITestOutputHelper output)
{
    // A guard against a deadlocked barrier, not a speed test: generous, because other work on a loaded machine can
    // slow the simulator's hundreds of OS threads many times over.
    private static readonly TimeSpan Limit = TimeSpan.FromSeconds(180);

    /// <summary>Conv geometries: n, c, k, h, w, r (= s), stride, pad. Ragged 7x7 and 5x6, stride 2, 1x1 (pointwise and strided), one
    /// output channel, one input channel.</summary>
    public static TheoryData<int, int, int, int, int, int, int, int, int> Shapes()
    {
        var data = new TheoryData<int, int, int, int, int, int, int, int, int>();
        foreach (int warp in new[] { 32, 4 })
        {
            data.Add(warp, 2, 3, 5, 7, 7, 3, 1, 1);
            data.Add(warp, 2, 3, 5, 5, 6, 3, 2, 1);
            data.Add(warp, 2, 3, 5, 7, 7, 1, 1, 0);
            data.Add(warp, 1, 4, 3, 5, 6, 1, 2, 0);
            data.Add(warp, 2, 5, 1, 5, 7, 3, 1, 1); // one output channel: conv_out's forward and weight gradient (TiledConv.SingleChannel, NarrowWeight)
            data.Add(warp, 1, 1, 4, 5, 6, 3, 2, 1); // one input channel, stride 2: a narrow weight gradient (TiledConv.NarrowWeight)
            data.Add(warp, 2, 3, 1, 5, 7, 1, 1, 0); // one output channel, 1x1: the narrow kernel with one tap of its nine
            data.Add(warp, 2, 16, 32, 5, 6, 3, 1, 1); // 16 input, 32 output channels: the forward and the input gradient in K steps of one tap (TiledConv.ByTaps)
            data.Add(warp, 1, 32, 16, 5, 7, 3, 2, 1); // the same at stride 2
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Shapes))]
    public void ConvPassesMatchCpu(int warp, int n, int c, int k, int h, int w, int r, int stride, int pad) => WithTimeout(() =>
    {
        var device = fixture[warp];
        var g = new ConvShape(n, c, h, w, k, r, r, stride, pad);
        var rng = new Random(n * 1000 + c * 100 + h * 10 + stride);
        int[] xs = [n, c, h, w], ws = [k, c, r, r], ys = [n, k, g.P, g.Q];
        var x = (Ints(rng, n * c * h * w), xs);
        var wt = (Ints(rng, k * c * r * r), ws);
        var b = (Ints(rng, k), new[] { k });
        var e = (Ints(rng, n * k), new[] { n, k });
        var dy = (Ints(rng, n * k * g.P * g.Q), ys);
        var residual = (Ints(rng, n * k * g.P * g.Q), ys);
        var db = (Ints(rng, k), new[] { k });
        float[] dx0 = Ints(rng, x.Item1.Length), dw0 = Ints(rng, wt.Item1.Length);

        // The forward with every epilogue term (bias, channel bias, residual); the weight gradient with the bias gradient
        // it carries (the row sums of dy: its output is dw's values, then db's).
        Func<Device, float[]> forward = d => Run(d, [x, wt, b, e, residual], NaNs(n * k * g.P * g.Q), ys,
            (t, y) => Conv2d.Forward(t[0], t[1], t[2], y, stride, pad, t[3], t[4]));
        Func<Device, float[]> inputAdd = d => Run(d, [dy, wt], dx0, xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, stride, pad, accumulate: true));
        Func<Device, float[]> inputSet = d => Run(d, [dy, wt], NaNs(dx0.Length), xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, stride, pad, accumulate: false));
        Func<Device, float[]> weight = d => Run(d, [dy, x, db], dw0, ws, (t, dw) => Conv2d.BackwardWeight(t[0], t[1], dw, stride, pad, t[2]), alsoInput: 2);

        var cpu = CpuDevice.Instance;
        float[] yRef = forward(cpu), dxRef = inputAdd(cpu), dxSetRef = inputSet(cpu), dwRef = weight(cpu);
        var kernels = IlgpuKernels.For(device);
        foreach (bool simple in SimpleModes(warp))
        {
            kernels.Simple = simple;
            try
            {
                // The rerun check is for the tiled kernels; the simple twins run once (they keep the simulator busy longest).
                string tag = $"warp {warp}, {(simple ? "simple" : "tiled")}";
                Check(tag + " forward", yRef, () => forward(device), rerun: !simple);
                Check(tag + " input gradient +=", dxRef, () => inputAdd(device), rerun: !simple);
                Check(tag + " input gradient =", dxSetRef, () => inputSet(device), rerun: !simple);
                Check(tag + " weight gradient", dwRef, () => weight(device), rerun: !simple);
            }
            finally
            {
                kernels.Simple = false;
            }
        }

        // Split-K: the tiny shapes get one split from the automatic rule, so force three (uneven: the last is short).
        // The last group of each tile adds the splits' partials (and the bias's row sums) in the same launch.
        Check($"warp {warp}, weight and bias gradient, 3 splits", dwRef, () => Run(device, [dy, x, db], dw0, ws,
            (t, dw) => TiledConv.BackwardWeight(kernels, g, t[0].View, t[1].View, dw.View, t[2].View, splits: 3), alsoInput: 2), rerun: false);
    });

    [Theory]
    [InlineData(32, false, false)]
    [InlineData(32, true, false)]
    [InlineData(32, false, true)]
    [InlineData(4, true, true)]
    [InlineData(4, false, false)]
    public void MatmulMatchesCpu(int warp, bool transA, bool transB) => WithTimeout(() =>
    {
        // c [m, n] (+)= op(a)·op(b), 67 columns: two column tiles, the second ragged.
        const int m = 5, n = 67, kk = 9;
        var device = fixture[warp];
        var rng = new Random(warp + (transA ? 2 : 0) + (transB ? 1 : 0));
        var a = (Ints(rng, m * kk), transA ? new[] { kk, m } : new[] { m, kk });
        var b = (Ints(rng, kk * n), transB ? new[] { n, kk } : new[] { kk, n });
        float[] c0 = Ints(rng, m * n);
        var kernels = IlgpuKernels.For(device);
        foreach (bool accumulate in new[] { true, false })
        {
            float[] start = accumulate ? c0 : NaNs(m * n);
            Func<Device, float[]> matmul = d => Run(d, [a, b], start, [m, n], (t, cc) => Linear.Matmul(t[0], transA, t[1], transB, cc, accumulate));
            float[] expected = matmul(CpuDevice.Instance);
            foreach (bool simple in SimpleModes(warp))
            {
                kernels.Simple = simple;
                try
                {
                    Check($"warp {warp}, {(simple ? "simple" : "tiled")} matmul{(transA ? " aT" : "")}{(transB ? " bT" : "")} {(accumulate ? "+=" : "=")}", expected,
                        () => matmul(device), rerun: !simple);
                }
                finally
                {
                    kernels.Simple = false;
                }
            }
        }
    });

    [Theory]
    [InlineData(32)]
    [InlineData(4)]
    public void LinearBiasRidesInTheProduct(int warp) => WithTimeout(() =>
    {
        // y = x·wᵀ + b with the bias in the epilogue; dw += dyᵀ·x with db += Σ_n dy as the row sums of dyᵀ. 67 outputs and
        // 70 inputs: dw is 2 x 2 tiles, the second of each ragged; the row sums come from the first column tile's groups only.
        const int batch = 5, inputs = 70, outputs = 67;
        var device = fixture[warp];
        var rng = new Random(11 + warp);
        var x = (Ints(rng, batch * inputs), new[] { batch, inputs });
        var w = (Ints(rng, outputs * inputs), new[] { outputs, inputs });
        var b = (Ints(rng, outputs), new[] { outputs });
        var dy = (Ints(rng, batch * outputs), new[] { batch, outputs });
        float[] dw0 = Ints(rng, outputs * inputs);
        Func<Device, float[]> forward = d => Run(d, [x, w, b], NaNs(batch * outputs), [batch, outputs], (t, y) => Linear.Forward(t[0], t[1], t[2], y));
        Func<Device, float[]> weight = d => Run(d, [dy, x, b], dw0, [outputs, inputs], (t, dw) => Linear.BackwardWeight(t[0], t[1], dw, t[2]), alsoInput: 2);
        var kernels = IlgpuKernels.For(device);
        foreach (bool simple in SimpleModes(warp))
        {
            kernels.Simple = simple;
            try
            {
                string tag = $"warp {warp}, {(simple ? "simple" : "tiled")}";
                Check(tag + " linear forward", forward(CpuDevice.Instance), () => forward(device), rerun: !simple);
                Check(tag + " linear weight and bias gradient", weight(CpuDevice.Instance), () => weight(device), rerun: !simple);
            }
            finally
            {
                kernels.Simple = false;
            }
        }
    });

    [Theory]
    [InlineData(32)]
    [InlineData(4)]
    public void SplitKOverManyTilesIsFinishedByEachTilesLastGroup(int warp) => WithTimeout(() =>
    {
        // dw [70, 8·3·3 = 72]: 2 x 2 output tiles, both ragged, each finished by the last of its 3 split groups (its own
        // arrival counter), with the bias's row sums from the first column's tiles; then every counter is back at zero.
        var g = new ConvShape(2, 8, 5, 5, 70, 3, 3, 1, 1);
        var kernels = IlgpuKernels.For(fixture[warp]);
        var (expected, tiled) = WeightGradientCase(kernels, g, 13 + warp);
        Check($"warp {warp}, 2 x 2 tiles, 3 splits", expected, () => tiled(3), rerun: true);
        var counters = new int[IlgpuKernels.CounterSlots];
        ILGPU.Runtime.ArrayViewExtensions.CopyToCPU(kernels.GridCounters, kernels.Stream, counters);
        kernels.Stream.Synchronize();
        Assert.True(counters.All(c => c == 0), $"arrival counters left non-zero: {string.Join(", ", counters.Select((c, i) => (c, i)).Where(p => p.c != 0).Take(5))}");
    });

    /// <summary>The weight gradient with tap-major columns (ConvWeightTapTile, C a multiple of 64): each half of a thread's
    /// columns is one tap's 8 channels. 64 channels of 3 x 3 are 576 columns, four and a half tiles (the last tile's second
    /// half absent), over 2 row tiles of K = 70; whole and in 3 splits with the bias's row sums, at stride 1 and 2, bit for
    /// bit against the CPU. The op runs in strict fp32 only: in TF32 the channel-major op takes it.</summary>
    [Theory]
    [InlineData(32, 1)]
    [InlineData(4, 1)]
    [InlineData(32, 2)]
    [InlineData(4, 2)]
    public void WeightGradientWithTapMajorColumnsMatchesCpu(int warp, int stride) => WithTimeout(() =>
    {
        var g = new ConvShape(2, 64, 5, 6, 70, 3, 3, stride, 1);
        Assert.True(TiledConv.ByTapColumns(g.C));
        var kernels = IlgpuKernels.For(fixture[warp]);
        Assert.True(kernels.Conv2d.TiledWeightByTap.Runs);
        var (expected, tiled) = WeightGradientCase(kernels, g, 41 + warp + stride);
        foreach (int splits in new[] { 1, 3 })
        {
            Check($"warp {warp}, stride {stride}, {splits} split(s)", expected, () => tiled(splits), rerun: splits > 1);
        }
        kernels.Precision = MathPrecision.Tf32;
        try
        {
            // The warp-32 simulator has the tensor-core path (emulated), the warp-4 one computes in fp32 whatever the mode.
            Assert.Equal(kernels.TensorCores ? MathPrecision.Tf32 : MathPrecision.Fp32, kernels.EffectivePrecision);
            Assert.Equal(!kernels.TensorCores, kernels.Conv2d.TiledWeightByTap.Runs);
        }
        finally
        {
            kernels.Precision = MathPrecision.Fp32;
        }
    });

    [Theory]
    [InlineData(32, 8, 70)]
    [InlineData(4, 8, 70)]
    [InlineData(32, 16, 80)]
    [InlineData(4, 16, 80)]
    public void SplitKForwardAndInputGradientAreFinishedThroughTheirEpilogues(int warp, int c, int k) => WithTimeout(() =>
    {
        // The forward (bias, channel bias and residual in the epilogue) over 2 row tiles of K = 70, C·R·S = 72 cut in
        // 3 splits (32, 32, 8); the input gradient, written and added, K·R·S = 630 cut in 3 (224, 224, 182). The last
        // group of each tile adds the partials in split order and writes the sum through the op's own Store. With C = 16
        // and K = 80 both passes take K steps of one tap (TiledConv.ByTaps): C·R·S = 144 in 3 splits of 48, K·R·S = 720 in
        // 3 of 240.
        var g = new ConvShape(2, c, 5, 5, k, 3, 3, 1, 1);
        var device = fixture[warp];
        var rng = new Random(31 + warp + c);
        int[] xs = [g.N, g.C, g.H, g.W], ws = [g.K, g.C, g.R, g.S], ys = [g.N, g.K, g.P, g.Q];
        var x = (Ints(rng, g.N * g.C * g.H * g.W), xs);
        var wt = (Ints(rng, g.K * g.Crs), ws);
        var b = (Ints(rng, g.K), new[] { g.K });
        var e = (Ints(rng, g.N * g.K), new[] { g.N, g.K });
        var residual = (Ints(rng, g.N * g.K * g.Pq), ys);
        var dy = (Ints(rng, g.N * g.K * g.Pq), ys);
        float[] dx0 = Ints(rng, x.Item1.Length);
        var cpu = CpuDevice.Instance;
        float[] yRef = Run(cpu, [x, wt, b, e, residual], NaNs(g.N * g.K * g.Pq), ys, (t, y) => Conv2d.Forward(t[0], t[1], t[2], y, 1, 1, t[3], t[4]));
        float[] dxAddRef = Run(cpu, [dy, wt], dx0, xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, 1, 1, accumulate: true));
        float[] dxSetRef = Run(cpu, [dy, wt], NaNs(dx0.Length), xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, 1, 1, accumulate: false));
        var kernels = IlgpuKernels.For(device);
        Check($"warp {warp}, forward, 3 splits", yRef, () => Run(device, [x, wt, b, e, residual], NaNs(yRef.Length), ys,
            (t, y) => TiledConv.Forward(kernels, g, t[0].View, t[1].View, t[2].View, y.View, t[3].View, t[4].View, splits: 3)), rerun: true);
        Check($"warp {warp}, input gradient +=, 3 splits", dxAddRef, () => Run(device, [dy, wt], dx0, xs,
            (t, dx) => TiledConv.BackwardInput(kernels, g, t[0].View, t[1].View, dx.View, accumulate: true, splits: 3)), rerun: true);
        Check($"warp {warp}, input gradient =, 3 splits", dxSetRef, () => Run(device, [dy, wt], NaNs(dx0.Length), xs,
            (t, dx) => TiledConv.BackwardInput(kernels, g, t[0].View, t[1].View, dx.View, accumulate: false, splits: 3)), rerun: false);
        var counters = new int[IlgpuKernels.CounterSlots];
        ILGPU.Runtime.ArrayViewExtensions.CopyToCPU(kernels.GridCounters, kernels.Stream, counters);
        kernels.Stream.Synchronize();
        Assert.True(counters.All(c => c == 0), "arrival counters left non-zero");
    });

    [Fact]
    public void AcrossSplitsFillAWaveWhereTheTilesAloneDoNot()
    {
        // Base preset at batch 128. 7x7, 256 -> 256: 4 x 49 = 196 tiles, two splits of C·R·S = 2,304 make 392 groups.
        var deep = new ConvShape(128, 256, 7, 7, 256, 3, 3, 1, 1);
        Assert.Equal(2, TiledConv.ForwardSplits(deep));
        Assert.Equal(2, TiledConv.InputSplits(deep));
        // 7x7, 128 -> 256: the input gradient's 2 x 49 = 98 tiles, four splits of K·R·S = 2,304.
        Assert.Equal(4, TiledConv.InputSplits(new ConvShape(128, 128, 7, 7, 256, 3, 3, 1, 1)));
        // 28x28, 64 -> 64: 784 tiles fill two waves by themselves.
        Assert.Equal(1, TiledConv.ForwardSplits(new ConvShape(128, 64, 28, 28, 64, 3, 3, 1, 1)));
        // 7x7 1x1, 128 -> 256: 196 tiles, but 128 of K is under a split's 256.
        Assert.Equal(1, TiledConv.ForwardSplits(new ConvShape(128, 128, 7, 7, 256, 1, 1, 1, 0)));
        // The check case "conv2d 3x3 split-K forward and input gradient" (ddpm check, SelfCheck): three splits in both.
        var checkCase = new ConvShape(1, 96, 4, 5, 90, 3, 3, 1, 1);
        Assert.Equal(3, TiledConv.ForwardSplits(checkCase));
        Assert.Equal(3, TiledConv.InputSplits(checkCase));
        // Never more groups than one wave of TargetGroups, never a split under 16 K steps.
        foreach (var (m, cols, kd) in new (long, long, long)[] { (1, 1, 1 << 20), (64, 128, 4096), (300, 5000, 100_000), (7, 9, 255) })
        {
            int splits = TiledConv.AcrossSplits(m, cols, kd);
            long tiles = (m + TiledGemm.TM - 1) / TiledGemm.TM * ((cols + TiledGemm.TN - 1) / TiledGemm.TN);
            Assert.True(splits == 1 || (tiles * splits <= TiledConv.TargetGroups && kd / splits >= 16 * TiledGemm.TK), $"{(m, cols, kd)}: {splits} splits");
        }
    }

    [Fact]
    public void NarrowWeightGradientsSplitTheirPixelsOverAWave()
    {
        // Base preset at batch 128: conv_out (64 -> 1) and conv_in (1 -> 64), 64 pairs of 100,352 pixels: 16 splits each,
        // 1,024 groups of 256 threads.
        var convOut = new ConvShape(128, 64, 28, 28, 1, 3, 3, 1, 1);
        var convIn = new ConvShape(128, 1, 28, 28, 64, 3, 3, 1, 1);
        Assert.True(TiledConv.NarrowWeight(convOut) && TiledConv.NarrowWeight(convIn));
        Assert.Equal(16, TiledConv.NarrowSplits(convOut));
        Assert.Equal(16, TiledConv.NarrowSplits(convIn));
        // Two channels each way, or a kernel over 3 x 3, take the tiled kernel.
        Assert.False(TiledConv.NarrowWeight(new ConvShape(128, 2, 28, 28, 64, 3, 3, 1, 1)));
        Assert.False(TiledConv.NarrowWeight(new ConvShape(1, 1, 28, 28, 4, 5, 5, 1, 2)));
        // The check case "conv2d 3x3 k=1, pixels split": 4,800 pixels, two splits.
        Assert.Equal(2, TiledConv.NarrowSplits(new ConvShape(3, 2, 40, 40, 1, 3, 3, 1, 1)));
        // Small images: one split.
        Assert.Equal(1, TiledConv.NarrowSplits(new ConvShape(2, 5, 7, 9, 1, 3, 3, 1, 1)));
    }

    [Fact]
    public void SplitKWeightGradientIsBitIdenticalOnRerunWithRealValuedInputs() => WithTimeout(() =>
    {
        // Integer inputs sum exactly in any order, so they cannot show an order that changes between runs. Random
        // reals can: the split partials must be summed in the same fixed order every run. 98 = 2·7·7 rows of K in
        // 3 splits of 48, 48 and 2.
        var g = new ConvShape(2, 3, 7, 7, 5, 3, 3, 1, 1);
        var rng = new Random(7);
        var dy = (Reals(rng, g.N * g.K * g.Pq), new[] { g.N, g.K, g.P, g.Q });
        var x = (Reals(rng, g.N * g.C * g.H * g.W), new[] { g.N, g.C, g.H, g.W });
        int[] ws = [g.K, g.C, g.R, g.S];
        float[] dw0 = Reals(rng, g.K * g.Crs);
        var db = (Reals(rng, g.K), new[] { g.K });
        float[] expected = Run(CpuDevice.Instance, [dy, x, db], dw0, ws, (t, dw) => Conv2d.BackwardWeight(t[0], t[1], dw, g.Stride, g.Pad, t[2]), alsoInput: 2);
        var kernels = IlgpuKernels.For(fixture.Warp32);
        float[] first = Run(fixture.Warp32, [dy, x, db], dw0, ws,
            (t, dw) => TiledConv.BackwardWeight(kernels, g, t[0].View, t[1].View, dw.View, t[2].View, splits: 3), alsoInput: 2);
        float[] second = Run(fixture.Warp32, [dy, x, db], dw0, ws,
            (t, dw) => TiledConv.BackwardWeight(kernels, g, t[0].View, t[1].View, dw.View, t[2].View, splits: 3), alsoInput: 2);
        Assert.True(first.AsSpan().SequenceEqual(second), "split-K weight gradient: a rerun differs");
        // Sums of 98 products of values in [-1, 1]: float32 rounding in two summation orders differs by well under 1e-4.
        var bad = Enumerable.Range(0, expected.Length).Where(i => !(Math.Abs(first[i] - expected[i]) <= 1e-4f + 1e-4f * Math.Abs(expected[i]))).Take(5)
            .Select(i => $"[{i}] expected {expected[i]}, got {first[i]}").ToList();
        Assert.True(bad.Count == 0, string.Join("; ", bad));
    });

    [Fact]
    public void FastDivMatchesIntegerDivision()
    {
        // Every divisor a gather meets is small, but the proof covers 1 <= d < 2^31 and 0 <= x < 2^31: check the
        // edges (multiples and their neighbours, the top of the range) for many divisors, and random pairs.
        var rng = new Random(5);
        var divisors = Enumerable.Range(1, 1100).Concat([4095, 4096, 4097, 100_352, 1 << 20, (1 << 30) + 1, int.MaxValue]).ToList();
        foreach (int d in divisors)
        {
            var f = new FastDiv(d);
            foreach (long baseX in new long[] { 0, d, 2L * d, 7L * d, 1000L * d, int.MaxValue - (long)d, int.MaxValue })
            {
                for (long x = Math.Max(0, baseX - 2); x <= Math.Min(int.MaxValue, baseX + 2); x++)
                {
                    Assert.True(f.Div((int)x) == (int)(x / d), $"{x} / {d}: got {f.Div((int)x)}");
                }
            }
            for (int i = 0; i < 200; i++)
            {
                int x = rng.Next(int.MaxValue);
                Assert.True(f.Div(x) == x / d, $"{x} / {d}: got {f.Div(x)}");
            }
        }
    }

    /// <summary>The GPU kernel gathers a convolution's B through taps (a pixel's base and mask, a tap's delta and bits): for every
    /// column and kd of every op, on ragged, strided, padded, pointwise and 5x5 shapes, that must read where IndexB does
    /// and nothing where IndexB says -1 (padding, and at stride 2 the taps of the wrong phase); 15 x 15, the widest the bits
    /// hold, included.</summary>
    [Fact]
    public void TapsReadWhereIndexBDoes()
    {
        foreach (var g in new[] { new ConvShape(2, 3, 7, 7, 5, 3, 3, 1, 1), new ConvShape(2, 3, 5, 6, 5, 3, 3, 2, 1), new ConvShape(2, 3, 7, 7, 5, 1, 1, 1, 0),
                     new ConvShape(1, 4, 5, 6, 3, 1, 1, 2, 0), new ConvShape(3, 2, 4, 4, 2, 5, 5, 1, 2), new ConvShape(1, 2, 9, 8, 3, 3, 3, 2, 1),
                     new ConvShape(1, 2, 6, 7, 2, 4, 2, 3, 2), new ConvShape(1, 1, 3, 3, 1, 3, 3, 1, 4),
                     new ConvShape(1, 1, 16, 16, 1, 15, 15, 1, 7), new ConvShape(1, 2, 15, 17, 2, 15, 3, 2, 7) })
        {
            Agree<ConvForwardTile>(new TileArgs(g.K, g.N * g.Pq, g.Crs, 0, false, false, g, default), alongK: false);
            Agree<ConvInputTile>(new TileArgs(g.C, g.N * g.H * g.W, g.K * g.R * g.S, 0, false, false, g, default), alongK: false);
            Agree<ConvWeightTile>(new TileArgs(g.K, g.Crs, g.N * g.Pq, 0, true, false, g, default), alongK: true);
            // The weight gradient's tap-major columns decode col as tap·C + c: the same gathers in another order.
            Agree<ConvWeightTapTile>(new TileArgs(g.K, g.Crs, g.N * g.Pq, 0, true, false, g, default), alongK: true);
            // The K steps of one tap decode kd as tap·channels + channel: the same gathers in another order.
            Agree<ConvForwardTapTile>(new TileArgs(g.K, g.N * g.Pq, g.Crs, 0, false, false, g, default), alongK: false);
            Agree<ConvInputTapTile>(new TileArgs(g.C, g.N * g.H * g.W, g.K * g.R * g.S, 0, false, false, g, default), alongK: false);
        }

        static void Agree<TOp>(TileArgs t, bool alongK) where TOp : struct, ITileOperands
        {
            Assert.True(TOp.Tapped);
            Assert.Equal(alongK, TOp.BAlongK(t));
            int reads = 0;
            for (int col = 0; col < t.Cols; col++)
            {
                for (int kd = 0; kd < t.Kd; kd++)
                {
                    var (pixel, tap) = alongK ? (TOp.PixelOfB(t, kd), TOp.TapOfB(t, col)) : (TOp.PixelOfB(t, col), TOp.TapOfB(t, kd));
                    int want = TOp.IndexB(t, TOp.ColumnOfB(t, col), TOp.KOfB(t, kd));
                    int got = Taps.Reads(pixel, tap) ? pixel.Base + tap.Delta : -1;
                    Assert.True(want == got, $"{typeof(TOp).Name} ({t.Conv.R}x{t.Conv.S}, stride {t.Conv.Stride}, pad {t.Conv.Pad}) col {col}, kd {kd}: taps read {got}, IndexB says {want}");
                    // A GPU indexes from the pixel by the delta as an unsigned 32-bit offset (TiledGemm's PixelView).
                    Assert.True(tap.Delta >= 0, $"{typeof(TOp).Name} ({t.Conv.R}x{t.Conv.S}, stride {t.Conv.Stride}, pad {t.Conv.Pad}): a tap's delta is {tap.Delta}");
                    reads += got >= 0 ? 1 : 0;
                    Assert.False(Taps.Reads(pixel, new Tap(0, Taps.Nowhere)), "the tap past K read a pixel");
                    Assert.False(Taps.Reads(default, tap), "a tap read the pixel past the last column");
                }
            }
            Assert.True(reads > 0, $"{typeof(TOp).Name}: no tap read anything");
        }
    }

    /// <summary>A held model's weights (Conv2d.HoldWeights, as UNet.HoldConvWeights does a training step: one launch for all,
    /// TiledConv.PermuteWeightsKernel) are each weight's two permutations where its passes take K steps of one tap ([K][R·S][C]
    /// for the forward, [C][R·S][K] for the input gradient) and nothing elsewhere (one output channel: the forward's own
    /// kernel; channels not a multiple of 16); the hold ends when disposed, or at the optimizer's next write.</summary>
    [Theory]
    [InlineData(32)]
    [InlineData(4)]
    public void HeldWeightsAreEachWeightsPermutations(int warp) => WithTimeout(() =>
    {
        var device = fixture[warp];
        int[][] shapes = [[32, 16, 3, 3], [16, 32, 3, 3], [1, 16, 3, 3], [16, 1, 3, 3], [24, 16, 1, 1], [16, 16, 5, 3], [5, 3, 3, 3]];
        int total = 3 + shapes.Sum(s => s[0] * s[1] * s[2] * s[3]);
        using var flat = Tensor.FromHost(device, [.. Enumerable.Range(0, total).Select(i => (float)i)], total);
        var weights = new List<Tensor>();
        int at = 3; // the weights start anywhere in the parameters' storage
        foreach (var s in shapes)
        {
            weights.Add(flat.Slice(at, s));
            at += s[0] * s[1] * s[2] * s[3];
        }
        var k = IlgpuKernels.For(device);
        using (Conv2d.HoldWeights(weights))
        {
            Assert.NotNull(k.Held);
            foreach (var w in weights)
            {
                int kk = w.Shape[0], c = w.Shape[1], rs = w.Shape[2] * w.Shape[3];
                float[] src = w.ToArray();
                var forward = k.Held!.Forward(w);
                var input = k.Held.Input(w);
                Assert.Equal(kk > 1 && TiledConv.ByTaps(c), forward.HasValue);
                Assert.Equal(TiledConv.ByTaps(kk), input.HasValue);
                float[] f = new float[w.Length], d = new float[w.Length];
                if (forward is { } fv)
                {
                    ILGPU.Runtime.ArrayViewExtensions.CopyToCPU(fv, k.Stream, f);
                }
                if (input is { } iv)
                {
                    ILGPU.Runtime.ArrayViewExtensions.CopyToCPU(iv, k.Stream, d);
                }
                k.Stream.Synchronize();
                for (int o = 0; o < kk; o++)
                {
                    for (int ci = 0; ci < c; ci++)
                    {
                        for (int tap = 0; tap < rs; tap++)
                        {
                            float v = src[(o * c + ci) * rs + tap];
                            Assert.True(forward is null || f[(o * rs + tap) * c + ci] == v, $"[{kk}, {c}, {rs}] forward copy at ({o}, {ci}, {tap})");
                            Assert.True(input is null || d[(ci * rs + tap) * kk + o] == v, $"[{kk}, {c}, {rs}] input-gradient copy at ({o}, {ci}, {tap})");
                        }
                    }
                }
            }
        }
        Assert.Null(k.Held);
        // A hold left open ends at the optimizer's next write of parameters, so no later convolution reads old copies.
        var open = Conv2d.HoldWeights(weights);
        Assert.NotNull(k.Held);
        using (var g = Tensor.FromHost(device, new float[16], 16))
        using (var m = Tensor.FromHost(device, new float[16], 16))
        using (var v = Tensor.FromHost(device, new float[16], 16))
        {
            Optim.Adam(flat.Slice(0, 16), g, m, v, lr: 0.1f, beta1: 0.9f, beta2: 0.999f, eps: 1e-8f, step: 1);
        }
        Assert.Null(k.Held);
        open.Dispose();
        Assert.Null(k.Held);
    });

    /// <summary>What the GPU kernel's K steps of one tap take for granted (TiledGemm's PixelView.Channels): where the pass's
    /// channels are a multiple of 16, every K step's 16 kd are one tap, kd j of the step reads the step's first tap moved by
    /// j·ChannelStride with the same bits, and a kd is (tap, channel) in w's own order where KOfB says; and the host takes
    /// that path exactly there (TiledConv.ByTaps).</summary>
    [Fact]
    public void EachKStepOfOneTapIsOneTapOfSixteenChannelsAStrideApart()
    {
        foreach (var g in new[] { new ConvShape(1, 16, 5, 6, 32, 3, 3, 1, 1), new ConvShape(2, 32, 7, 7, 16, 3, 3, 2, 1), new ConvShape(1, 16, 4, 5, 48, 1, 1, 1, 0),
                     new ConvShape(1, 16, 9, 8, 16, 5, 5, 1, 2), new ConvShape(1, 32, 6, 7, 32, 4, 2, 3, 2) })
        {
            Assert.True(TiledConv.ByTaps(g.C) && TiledConv.ByTaps(g.K));
            Steps<ConvForwardTapTile>(new TileArgs(g.K, g.N * g.Pq, g.Crs, 0, false, false, g, default), g.H * g.W, g.C);
            Steps<ConvInputTapTile>(new TileArgs(g.C, g.N * g.H * g.W, g.K * g.R * g.S, 0, false, false, g, default), g.P * g.Q, g.K);
        }
        Assert.False(TiledConv.ByTaps(3));
        Assert.False(TiledConv.ByTaps(24));

        static void Steps<TOp>(TileArgs t, int stride, int channels) where TOp : struct, ITileOperands
        {
            Assert.True(TOp.TapSteps);
            Assert.Equal(stride, TOp.ChannelStride(t));
            Assert.Equal(0, t.Kd % TiledGemm.TK);
            for (int k0 = 0; k0 < t.Kd; k0 += TiledGemm.TK)
            {
                var first = TOp.TapOfB(t, k0);
                for (int j = 0; j < TiledGemm.TK; j++)
                {
                    var tap = TOp.TapOfB(t, k0 + j);
                    Assert.True(tap.Bits == first.Bits && tap.Delta == first.Delta + j * stride,
                        $"{typeof(TOp).Name} ({t.Conv.R}x{t.Conv.S}): kd {k0 + j} is not the step's tap at channel {j}");
                }
            }
        }
    }

    /// <summary>The GPU kernel indexes a thread's eight rows of A from the first by one stride (TiledGemm's Rows8): every op's
    /// row base must be affine in the row, and IndexA must add it.</summary>
    [Fact]
    public void RowsOfAAreOneStrideApart()
    {
        var g = new ConvShape(2, 3, 7, 9, 5, 3, 3, 2, 1);
        Check<ConvForwardTile>(new TileArgs(g.K, g.N * g.Pq, g.Crs, 0, false, false, g, default));
        Check<ConvInputTile>(new TileArgs(g.C, g.N * g.H * g.W, g.K * g.R * g.S, 0, false, false, g, default));
        Check<ConvWeightTile>(new TileArgs(g.K, g.Crs, g.N * g.Pq, 0, true, false, g, default));
        foreach (var (aRow, aCol) in new[] { (11, 1), (1, 13) })
        {
            var mat = new MatmulShape(13, 7, 11, aRow, aCol, 7, 1, false);
            Check<MatmulTile>(new TileArgs(13, 7, 11, 0, false, false, default, mat));
        }

        static void Check<TOp>(TileArgs t) where TOp : struct, ITileOperands
        {
            int first = TOp.RowOfA(t, 0).Base, stride = TOp.RowOfA(t, 1).Base - first;
            for (int m = 0; m < t.M + 64; m++)
            {
                Assert.Equal(first + m * stride, TOp.RowOfA(t, m).Base);
                for (int kd = 0; kd < t.Kd; kd += 3)
                {
                    var k = TOp.KOfA(t, kd);
                    Assert.Equal(TOp.IndexA(t, TOp.RowOfA(t, m), k) - TOp.IndexA(t, default, k), TOp.RowOfA(t, m).Base);
                }
            }
        }
    }

    /// <summary>The GPU kernel stores a thread's staged elements e, e + 128, … from its first slot, SlotStep apart: that must be
    /// where Slot puts each of them (the layout the bank-conflict test walks), for both tiles, along and across K.</summary>
    [Fact]
    public void StagedElementsStoreSlotStepApart()
    {
        // One thread a column of the tile: the column taps' fill (one a thread) and the across-K B's columns rely on it.
        Assert.Equal(TiledGemm.TN, TiledGemm.Threads);
        foreach (bool alongK in new[] { false, true })
        {
            foreach (var (lines, stride) in new[] { (TiledGemm.TM, TiledGemm.AStride), (TiledGemm.TN, TiledGemm.BStride) })
            {
                int step = TiledGemm.SlotStep(alongK, lines, stride), elements = TiledGemm.TK * lines / TiledGemm.Threads;
                for (int tid = 0; tid < TiledGemm.Threads; tid++)
                {
                    for (int j = 0; j < elements; j++)
                    {
                        Assert.Equal(TiledGemm.Slot(alongK, tid + j * TiledGemm.Threads, lines, stride), TiledGemm.Slot(alongK, tid, lines, stride) + j * step);
                    }
                }
            }
        }
    }

    /// <summary>A kernel wider than the taps' bits (16 x 16) runs the simple twins, and gives the CPU's results; the tiled
    /// entry points refuse it rather than read wrong.</summary>
    [Fact]
    public void KernelsOverFifteenRunTheSimpleTwins() => WithTimeout(() =>
    {
        var device = fixture[32];
        var g = new ConvShape(1, 2, 17, 16, 2, 16, 15, 1, 0);
        Assert.False(TiledConv.Takes(g));
        Assert.True(TiledConv.Takes(new ConvShape(1, 1, 15, 15, 1, 15, 15, 1, 0)));
        var rng = new Random(16);
        int[] xs = [g.N, g.C, g.H, g.W], ws = [g.K, g.C, g.R, g.S], ys = [g.N, g.K, g.P, g.Q];
        var x = (Ints(rng, g.N * g.C * g.H * g.W), xs);
        var wt = (Ints(rng, g.K * g.C * g.R * g.S), ws);
        var b = (Ints(rng, g.K), new[] { g.K });
        var dy = (Ints(rng, g.N * g.K * g.P * g.Q), ys);
        Func<Device, float[]> forward = d => Run(d, [x, wt, b], NaNs(g.N * g.K * g.Pq), ys, (t, y) => Conv2d.Forward(t[0], t[1], t[2], y, 1, 0));
        Func<Device, float[]> input = d => Run(d, [dy, wt], NaNs(x.Item1.Length), xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, 1, 0, accumulate: false));
        Func<Device, float[]> weight = d => Run(d, [dy, x], new float[wt.Item1.Length], ws, (t, dw) => Conv2d.BackwardWeight(t[0], t[1], dw, 1, 0));
        Check("16x16 forward", forward(CpuDevice.Instance), () => forward(device), rerun: false);
        Check("16x16 input gradient", input(CpuDevice.Instance), () => input(device), rerun: false);
        Check("16x16 weight gradient", weight(CpuDevice.Instance), () => weight(device), rerun: false);
        var kernels = IlgpuKernels.For(device);
        Assert.Throws<ArgumentException>(() => TiledConv.Forward(kernels, g, default, default, default, default, null));
    });

    [Fact]
    public void WeightSplitsDependOnTheShapeAndFillTheChip()
    {
        // Base preset at batch 128: 64 -> 64 channels, 3x3, 28x28. Tiles 1 x 5 (64 x 128), K = N·P·Q = 100,352: one wave of
        // at most 396 groups (132 SMs x 3).
        var g = new ConvShape(128, 64, 28, 28, 64, 3, 3, 1, 1);
        int splits = TiledConv.WeightSplits(g);
        Assert.Equal(396, TiledConv.TargetGroups);
        Assert.InRange(splits * 5, 360, 396);
        // The check case "conv2d 3x3 split-K, 2 row tiles" (ddpm check, SelfCheck): three splits, two row tiles.
        var split = new ConvShape(6, 2, 16, 16, 65, 3, 3, 1, 1);
        Assert.True(TiledConv.WeightSplits(split) >= 3 && split.N * split.Pq >= 1024 && split.K > TiledGemm.TM);
        // A tiny shape: one split (K too short to cut).
        Assert.Equal(1, TiledConv.WeightSplits(new ConvShape(2, 3, 7, 7, 5, 3, 3, 1, 1)));
    }

    /// <summary>Tiled kernels on both simulators; the simple twins (implicitly grouped: ILGPU picks their group, they
    /// use no warp or group primitive) on the warp-4 one only, where their launches cost the fewest simulator threads.</summary>
    private static bool[] SimpleModes(int warp) => warp == 4 ? [false, true] : [false];

    /// <summary>Runs <paramref name="run"/> (twice with <paramref name="rerun"/>); each result must equal
    /// <paramref name="expected"/> bit for bit.</summary>
    private void Check(string what, float[] expected, Func<float[]> run, bool rerun)
    {
        float[] first = run();
        AssertSame(what, expected, first);
        if (rerun)
        {
            Assert.True(first.AsSpan().SequenceEqual(run()), $"{what}: a rerun differs");
        }
        output.WriteLine($"{what}: {expected.Length} values match");
    }

    internal static void AssertSame(string what, float[] expected, float[] actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        var bad = Enumerable.Range(0, expected.Length)
            .Where(i => BitConverter.SingleToInt32Bits(expected[i]) != BitConverter.SingleToInt32Bits(actual[i]))
            .Take(5).Select(i => $"[{i}] expected {expected[i]}, got {actual[i]}").ToList();
        Assert.True(bad.Count == 0, $"{what}: {string.Join("; ", bad)}");
    }

    /// <summary>A weight gradient of <paramref name="g"/> with the bias's row sums, on random integers added to random dw and
    /// db: the CPU backend's result, and a function that runs <c>TiledConv.BackwardWeight</c> in a given number of splits on
    /// the kernels' device.</summary>
    private static (float[] Expected, Func<int, float[]> Tiled) WeightGradientCase(IlgpuKernels kernels, ConvShape g, int seed)
    {
        var rng = new Random(seed);
        var dy = (Ints(rng, g.N * g.K * g.Pq), new[] { g.N, g.K, g.P, g.Q });
        var x = (Ints(rng, g.N * g.C * g.H * g.W), new[] { g.N, g.C, g.H, g.W });
        var db = (Ints(rng, g.K), new[] { g.K });
        int[] ws = [g.K, g.C, g.R, g.S];
        float[] dw0 = Ints(rng, g.K * g.Crs);
        float[] expected = Run(CpuDevice.Instance, [dy, x, db], dw0, ws, (t, dw) => Conv2d.BackwardWeight(t[0], t[1], dw, g.Stride, g.Pad, t[2]), alsoInput: 2);
        return (expected, splits => Run(kernels.Device, [dy, x, db], dw0, ws,
            (t, dw) => TiledConv.BackwardWeight(kernels, g, t[0].View, t[1].View, dw.View, t[2].View, splits: splits), alsoInput: 2));
    }

    /// <summary>Uploads the inputs and <paramref name="start"/> as the output [<paramref name="outShape"/>] to
    /// <paramref name="device"/>, runs <paramref name="op"/>, and returns the output (followed by input
    /// <paramref name="alsoInput"/>'s values when the op also adds into that one).</summary>
    internal static float[] Run(Device device, (float[] Data, int[] Shape)[] inputs, float[] start, int[] outShape, Action<Tensor[], Tensor> op,
        int alsoInput = -1)
    {
        var tensors = inputs.Select(i => Tensor.FromHost(device, i.Data, i.Shape)).ToArray();
        using var outTensor = Tensor.FromHost(device, start, outShape);
        try
        {
            op(tensors, outTensor);
            return alsoInput < 0 ? outTensor.ToArray() : [.. outTensor.ToArray(), .. tensors[alsoInput].ToArray()];
        }
        finally
        {
            foreach (var t in tensors)
            {
                t.Dispose();
            }
        }
    }

    internal static float[] Ints(Random rng, int count) => Enumerable.Range(0, count).Select(_ => (float)rng.Next(-3, 4)).ToArray();

    internal static float[] Reals(Random rng, int count) => Enumerable.Range(0, count).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();

    internal static float[] NaNs(int count) => Enumerable.Repeat(float.NaN, count).ToArray();

    /// <summary>A grouped kernel with a divergent barrier deadlocks the simulator: fail instead of hanging.</summary>
    internal static void WithTimeout(Action body)
    {
        var task = Task.Run(body);
        Assert.True(task.Wait(Limit), $"timed out after {Limit.TotalSeconds} s (a deadlocked barrier?)");
    }
}
