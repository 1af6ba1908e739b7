using TileLauncher = System.Action<ILGPU.Runtime.AcceleratorStream, ILGPU.KernelConfig, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<int>, ILGPU.ArrayView<Ddpm.Kernels.Tap>, Ddpm.Kernels.TileArgs>;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using ILGPU;
using Xunit.Abstractions;
using static Ddpm.Tests.GpuTiledConvTests;

namespace Ddpm.Tests;

/// <summary>
/// The tensor-core kernels (src/Kernels/Gpu/TensorCoreGemm.cs) without a GPU: on the warp-32 simulator their mma runs as
/// the managed emulation of the PTX ISA's fragment table, and their TF32 rounding as integer arithmetic, so the kernel's
/// own fragment mapping is checked against the ISA's. Small integers are TF32 values and their sums are exact, so with
/// them every mode must match the CPU bit for bit; real values show the rounding.
/// </summary>
[Collection(GpuLikeCollection.Name)]
public sealed class TensorCoreTests(GpuLikeFixture fixture, ITestOutputHelper output)
{
    [Fact]
    public void Tf32RoundingIsToNearestWithTiesAwayFromZero()
    {
        float ulp = MathF.Pow(2, -10);
        Assert.Equal(1f + ulp, Tf32.RoundBits(1f + 0.75f * ulp));        // above the half: up
        Assert.Equal(1f, Tf32.RoundBits(1f + 0.25f * ulp));              // below: down
        Assert.Equal(1f + ulp, Tf32.RoundBits(1f + 0.5f * ulp));         // a tie: away from zero (not to even: 1 is even)
        Assert.Equal(-(1f + ulp), Tf32.RoundBits(-(1f + 0.5f * ulp)));
        Assert.Equal(2f, Tf32.RoundBits(2f - 0.25f * ulp));              // the carry into the exponent
        Assert.Equal(float.PositiveInfinity, Tf32.RoundBits(float.PositiveInfinity));
        Assert.True(float.IsNaN(Tf32.RoundBits(float.NaN)));
        Assert.True(float.IsNaN(Tf32.RoundBits(BitConverter.Int32BitsToSingle(0x7FFF_FFFF)))); // CUDA's NaN stays NaN
        // Against the definition, in double: the nearest multiple of the value's TF32 unit, ties away from zero.
        var rng = new Random(3);
        for (int i = 0; i < 100_000; i++)
        {
            float x = (float)((rng.NextDouble() * 2 - 1) * Math.Pow(2, rng.Next(-60, 60)));
            double unit = Math.Pow(2, Math.ILogB(x) - 10);
            double want = Math.Round(x / unit, MidpointRounding.AwayFromZero) * unit;
            Assert.True(Tf32.RoundBits(x) == (float)want, $"{x:R}: got {Tf32.RoundBits(x):R}, want {want:R}");
        }
    }

    [Fact]
    public void WhatTheTensorCoreReadsOfAStagedOperandIsItsRounding()
    {
        // The kernels stage x + its half unit (Tf32.HalfUlp, a LOP3 and an FFMA) and leave clearing the low 13 bits to the
        // tensor core (Tf32.Read): that must be cvt.rna's rounding (RoundBits) of every normal value, zero and infinity.
        static uint Bits(float x) => BitConverter.SingleToUInt32Bits(x);
        static void Same(float x)
        {
            float got = Tf32.Read(Tf32.HalfUlp(x)), want = Tf32.RoundBits(x);
            Assert.True(Bits(got) == Bits(want), $"{x:R} (0x{Bits(x):X8}): reads 0x{Bits(got):X8}, rna is 0x{Bits(want):X8}");
        }
        float ulp = MathF.Pow(2, -10);
        foreach (float x in new[] { 0f, -0f, 1f, -1f, 1f + 0.5f * ulp, -(1f + 0.5f * ulp), 1f + 0.25f * ulp, 2f - 0.25f * ulp, BitConverter.UInt32BitsToSingle(0x3FFF_F000),
            BitConverter.UInt32BitsToSingle(0x3FFF_FFFF), BitConverter.UInt32BitsToSingle(0x3FFF_F001), float.MaxValue, -float.MaxValue,
            BitConverter.UInt32BitsToSingle(0x7F7F_EFFF), float.PositiveInfinity, float.NegativeInfinity, BitConverter.UInt32BitsToSingle(0x0080_0000), 1e-30f })
        {
            Same(x);
        }
        // Every mantissa ending at the top of a binade (where the staged add rounds) and 200,000 values of all sizes.
        for (uint low = 0; low < 0x2000; low++)
        {
            Same(BitConverter.UInt32BitsToSingle(0x3F7F_E000 | low));
            Same(BitConverter.UInt32BitsToSingle(0xC07F_E000 | low));
        }
        var rng = new Random(5);
        for (int i = 0; i < 200_000; i++)
        {
            uint bits = (uint)rng.NextInt64(0, 1L << 32);
            float x = BitConverter.UInt32BitsToSingle(bits);
            if (float.IsNormal(x) || float.IsInfinity(x))
            {
                Same(x);
            }
        }
        // NaN stays NaN, CUDA's (0x7FFFFFFF) and .NET's (0xFFC00000) among them, and one whose payload lies only in the bits
        // the tensor core drops (the staging adds an infinity to it, which quiets it); a subnormal is truncated, not rounded.
        foreach (uint nan in new[] { 0x7FFF_FFFFu, 0xFFFF_FFFFu, 0xFFC0_0000u, 0x7FC0_0000u, 0x7F80_1000u, 0x7F80_0001u, 0xFF80_0001u })
        {
            Assert.True(float.IsNaN(Tf32.Read(Tf32.HalfUlp(BitConverter.UInt32BitsToSingle(nan)))), $"NaN 0x{nan:X8}");
        }
        float sub = BitConverter.UInt32BitsToSingle(0x0000_1FFF);
        Assert.Equal(0f, Tf32.Read(Tf32.HalfUlp(sub)));
        // 3xTF32's parts: the tensor core reads rna(x) of hi and rna(x - rna(x)) of lo.
        for (int i = 0; i < 20_000; i++)
        {
            float x = (float)((rng.NextDouble() * 2 - 1) * Math.Pow(2, rng.Next(-60, 60)));
            var p = Tf32x3Math.Split(x);
            float hi = Tf32.RoundBits(x);
            Assert.Equal(Bits(hi), Bits(Tf32.Read(p.Hi)));
            Assert.Equal(Bits(Tf32.RoundBits(x - hi)), Bits(Tf32.Read(p.Lo)));
        }
    }

    public static TheoryData<string> Modes() => [nameof(Tf32Math), nameof(Tf32x3Math)];

    /// <summary>Each mode with the ragged shape (3 input, 5 output channels), and TF32 with one whose forward and input gradient
    /// take K steps of one tap (16 input, 32 output channels: TiledConv.ByTaps, A loaded in fours; 3xTF32 has no such
    /// kernels).</summary>
    public static TheoryData<string, int, int> ModesAndChannels() => new()
    {
        { nameof(Tf32Math), 3, 5 }, { nameof(Tf32x3Math), 3, 5 }, { nameof(Tf32Math), 16, 32 },
    };

    [Theory]
    [MemberData(nameof(ModesAndChannels))]
    public void ConvolutionsOnTensorCoresMatchCpuExactlyOnIntegers(string mode, int c, int k) => WithTimeout(() =>
    {
        // Ragged: 5 x 7 images, 5 output channels, 3 input channels; the weight gradient in 3 splits with the bias's row sums,
        // the forward in 2 (C·R·S = 27: two K steps) and the input gradient in 3 (K·R·S = 45). With 16 and 32 channels the
        // forward (C·R·S = 144) and the input gradient (K·R·S = 288) run in K steps of one tap, in 3 splits too.
        var g = new ConvShape(2, c, 5, 7, k, 3, 3, 1, 1);
        var device = fixture.Warp32;
        var kernels = IlgpuKernels.For(device);
        var rng = new Random(17);
        int[] xs = [g.N, g.C, g.H, g.W], ws = [g.K, g.C, g.R, g.S], ys = [g.N, g.K, g.P, g.Q];
        var x = (Ints(rng, g.N * g.C * g.H * g.W), xs);
        var w = (Ints(rng, g.K * g.Crs), ws);
        var b = (Ints(rng, g.K), new[] { g.K });
        var dy = (Ints(rng, g.N * g.K * g.Pq), ys);
        float[] dx0 = Ints(rng, x.Item1.Length), dw0 = Ints(rng, w.Item1.Length);
        var db = (Ints(rng, g.K), new[] { g.K });
        Func<Device, float[]> forward = d => Run(d, [x, w, b], NaNs(g.N * g.K * g.Pq), ys, (t, y) => Conv2d.Forward(t[0], t[1], t[2], y, 1, 1));
        Func<Device, float[]> input = d => Run(d, [dy, w], dx0, xs, (t, dx) => Conv2d.BackwardInput(t[0], t[1], dx, 1, 1, accumulate: true));
        Func<Device, float[]> weight = d => Run(d, [dy, x, db], dw0, ws, (t, dwt) => Conv2d.BackwardWeight(t[0], t[1], dwt, 1, 1, t[2]), alsoInput: 2);
        Func<Device, float[]> split = d => Run(d, [dy, x, db], dw0, ws, (t, dwt) =>
        {
            if (d is IlgpuDevice)
            {
                TiledConv.BackwardWeight(kernels, g, t[0].View, t[1].View, dwt.View, t[2].View, splits: 3);
            }
            else
            {
                Conv2d.BackwardWeight(t[0], t[1], dwt, 1, 1, t[2]);
            }
        }, alsoInput: 2);
        Func<Device, float[]> forwardSplit = d => Run(d, [x, w, b], NaNs(g.N * g.K * g.Pq), ys, (t, y) =>
        {
            if (d is IlgpuDevice)
            {
                TiledConv.Forward(kernels, g, t[0].View, t[1].View, t[2].View, y.View, null, splits: 3);
            }
            else
            {
                Conv2d.Forward(t[0], t[1], t[2], y, 1, 1);
            }
        });
        Func<Device, float[]> inputSplit = d => Run(d, [dy, w], dx0, xs, (t, dx) =>
        {
            if (d is IlgpuDevice)
            {
                TiledConv.BackwardInput(kernels, g, t[0].View, t[1].View, dx.View, accumulate: true, splits: 3);
            }
            else
            {
                Conv2d.BackwardInput(t[0], t[1], dx, 1, 1, accumulate: true);
            }
        });
        var cpu = CpuDevice.Instance;
        float[] yRef = forward(cpu), dxRef = input(cpu), dwRef = weight(cpu), splitRef = split(cpu);
        kernels.Precision = Parse(mode);
        try
        {
            Assert.Equal(Parse(mode), kernels.Conv2d.TiledForward.Mode);
            AssertSame($"{mode} forward", yRef, forward(device));
            AssertSame($"{mode} input gradient", dxRef, input(device));
            AssertSame($"{mode} weight and bias gradient", dwRef, weight(device));
            AssertSame($"{mode} weight gradient in 3 splits", splitRef, split(device));
            AssertSame($"{mode} forward in 2 splits", yRef, forwardSplit(device));
            AssertSame($"{mode} input gradient in 3 splits", dxRef, inputSplit(device));
        }
        finally
        {
            kernels.Precision = MathPrecision.Fp32;
        }
        output.WriteLine($"{mode}, {c} > {k} channels: forward, input and weight gradients, whole and split, match the CPU bit for bit");
    });

    [Theory]
    [InlineData(false, false)]
    [InlineData(true, true)]
    public void MatmulsOnTensorCoresMatchCpuExactlyOnIntegers(bool transA, bool transB) => WithTimeout(() =>
    {
        // Two row tiles and two column tiles, the second of each ragged: every warp's rows and columns of the 64 x 128 tile.
        const int m = 70, n = 131, kd = 19;
        var rng = new Random(23);
        var a = Ints(rng, m * kd);
        var b = Ints(rng, kd * n);
        foreach (var load in TensorLaunchers())
        {
            var expected = Matmul(CpuDevice.Instance, null, a, b, m, n, kd, transA, transB);
            AssertSame($"{load.Name} matmul{(transA ? " aT" : "")}{(transB ? " bT" : "")}", expected, Matmul(fixture.Warp32, load.Load, a, b, m, n, kd, transA, transB));
        }
    });

    [Fact]
    public void TheCheckOnTf32ValuesCatchesATensorCoreThatRoundsWhatTheStagingAdds() => WithTimeout(() =>
    {
        // The self-check's "conv2d 3x3 on TF32 values" rests on this: on values TF32 holds exactly, with their last bit set,
        // the staged operand is a tie that a truncating tensor core reads back exactly and a rounding one a unit up. The
        // case's tolerance must pass every output of the first and fail most of the second's.
        const int m = 40, n = 24, kd = 27;
        var rng = new Random(37);
        float[] Values(int count) => Checker.MakeInputs(new OpCase
        {
            Name = "values",
            Inputs = [new("v", [count], InputFill.Tf32Exact)],
            Forward = (_, _) => [],
        }, rng.Next())[0];
        var a = Values(m * kd);
        var b = Values(kd * n);
        Assert.All(a.Concat(b), v => Assert.Equal(v, Tf32.RoundBits(v)));
        var expected = Matmul(CpuDevice.Instance, null, a, b, m, n, kd, false, false);
        var truncating = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, Tf32Math, PtxLayout>, a, b, m, n, kd, false, false);
        var rounding = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, RoundingTf32Math, PtxLayout>, a, b, m, n, kd, false, false);
        var check = OpCatalog.Get("conv2d 3x3 on TF32 values");
        Assert.True(check.ProductTerms == 0, "the check must not widen its tolerance on tensor cores");
        int Outside(float[] got) => Enumerable.Range(0, expected.Length)
            .Count(i => !(Math.Abs(got[i] - expected[i]) <= check.KernelAtol + check.KernelRtol * Math.Abs(expected[i])));
        output.WriteLine($"max |TF32 - fp32| {MaxDiff(truncating, expected):E2} (truncating), {MaxDiff(rounding, expected):E2} (rounding: " +
            $"{Outside(rounding)} of {expected.Length} outside the tolerance)");
        Assert.True(MaxDiff(truncating, expected) <= 1e-4, $"TF32 on TF32 values: {MaxDiff(truncating, expected):E2}");
        Assert.True(Outside(rounding) > expected.Length / 2, $"a rounding tensor core passes {expected.Length - Outside(rounding)} of {expected.Length} outputs");
    });

    [Fact]
    public void ABrokenFragmentMappingFails() => WithTimeout(() =>
    {
        // The same kernel with a1 and a2 swapped (row g + 8 at k i taken for row g at k i + 4): the emulation, which reads the
        // fragments as the ISA lays them out, must give other sums.
        const int m = 40, n = 24, kd = 16;
        var rng = new Random(29);
        var a = Ints(rng, m * kd);
        var b = Ints(rng, kd * n);
        var expected = Matmul(CpuDevice.Instance, null, a, b, m, n, kd, false, false);
        var broken = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, Tf32Math, SwappedLayout>, a, b, m, n, kd, false, false);
        int wrong = Enumerable.Range(0, expected.Length).Count(i => expected[i] != broken[i]);
        Assert.True(wrong > expected.Length / 4, $"a broken fragment mapping went unnoticed: {wrong} of {expected.Length} outputs differ");
        var right = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, Tf32Math, PtxLayout>, a, b, m, n, kd, false, false);
        AssertSame("the kernel's own mapping", expected, right);
    });

    [Fact]
    public void Tf32RoundsTheOperandsAnd3xTf32KeepsFp32Accuracy() => WithTimeout(() =>
    {
        // Real values: TF32 mode equals the fp32 product of the TF32-rounded operands (up to the order of the fp32 sums), and
        // is farther than that from the unrounded product; 3xTF32 equals the unrounded product to fp32's accuracy.
        const int m = 33, n = 40, kd = 48;
        var rng = new Random(31);
        var a = Reals(rng, m * kd);
        var b = Reals(rng, kd * n);
        var exact = Matmul(CpuDevice.Instance, null, a, b, m, n, kd, false, false);
        var ofRounded = Matmul(CpuDevice.Instance, null, [.. a.Select(Tf32.RoundBits)], [.. b.Select(Tf32.RoundBits)], m, n, kd, false, false);
        var tf32 = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, Tf32Math, PtxLayout>, a, b, m, n, kd, false, false);
        var tf32x3 = Matmul(fixture.Warp32, TiledGemm.LoadTensor<MatmulTile, Tf32x3Math, PtxLayout>, a, b, m, n, kd, false, false);
        double fp32 = 1e-5; // sums of 48 products in [-1, 1] in another order: a few ulps of values up to ~5
        Assert.True(MaxDiff(tf32, ofRounded) <= fp32, $"TF32 vs the product of rounded operands: {MaxDiff(tf32, ofRounded):E2}");
        Assert.True(MaxDiff(tf32, exact) > 10 * fp32, $"TF32 is as close to the unrounded product as fp32 ({MaxDiff(tf32, exact):E2}): the operands were not rounded");
        Assert.True(MaxDiff(tf32x3, exact) <= fp32, $"3xTF32 vs fp32: {MaxDiff(tf32x3, exact):E2}");
        output.WriteLine($"max |TF32 - fp32| {MaxDiff(tf32, exact):E2}, |3xTF32 - fp32| {MaxDiff(tf32x3, exact):E2}, |TF32 - fp32 of rounded| {MaxDiff(tf32, ofRounded):E2}");
    });

    [Fact]
    public void TheModeFollowsTheDeviceAndTheOp()
    {
        var k32 = IlgpuKernels.For(fixture.Warp32);
        var k4 = IlgpuKernels.For(fixture.Warp4);
        Assert.Equal(TiledGemm.Threads, IlgpuDevice.TensorCoreGroup);
        Assert.True(k32.TensorCores);
        Assert.False(k4.TensorCores); // warps of 4: the FFMA core whatever the mode
        foreach (var mode in MathPrecisions.All)
        {
            k32.Precision = k4.Precision = mode;
            try
            {
                Assert.Equal(mode, k32.Conv2d.TiledForward.Mode);
                Assert.Equal(mode == MathPrecision.Tf32x3 ? mode : MathPrecision.Fp32, k32.Linear.TiledMatmul.Mode); // PyTorch keeps matmuls fp32 by default
                Assert.Equal(MathPrecision.Fp32, k4.Conv2d.TiledForward.Mode);
                k32.Simple = true;
                Assert.Equal(MathPrecision.Fp32, k32.Conv2d.TiledForward.Mode);
            }
            finally
            {
                k32.Simple = false;
                k32.Precision = k4.Precision = MathPrecision.Fp32;
            }
        }
    }

    /// <summary>The kernel check in each tensor-core mode, with the mode's derived tolerance (Checker.ProductTolerance), on
    /// every case that runs a product: what <c>ddpm check</c> and the self-check run on a GPU.</summary>
    [Theory]
    [MemberData(nameof(Modes))]
    public void TheProductCasesPassInEachModeWithItsTolerance(string mode) => WithTimeout(() =>
    {
        var kernels = IlgpuKernels.For(fixture.Warp32);
        kernels.Precision = Parse(mode);
        try
        {
            // 3xTF32 skips the split-K case, the largest (a third of the test's time, three products an mma): its error is
            // fp32's, and the integer test above runs its split-K passes bit for bit. TF32, whose tolerance is the question,
            // runs every case.
            // With them the convolution on TF32 values, at fp32's tolerance in every mode.
            var cases = OpCatalog.All.Where(c => c.ProductTerms > 0 && (mode == nameof(Tf32Math) || c.ProductTerms < 1000)).Append(OpCatalog.Get("conv2d 3x3 on TF32 values")).ToList();
            var results = cases.Select(c => Checker.CompareDevices(c, fixture.Warp32)).ToList();
            Assert.True(results.Count >= 8, $"only {results.Count} product cases");
            foreach (var r in results)
            {
                output.WriteLine(r.ToString());
            }
            Assert.All(results, r => Assert.True(r.Pass, r.ToString()));
        }
        finally
        {
            kernels.Precision = MathPrecision.Fp32;
        }
    });

    [Fact]
    public void ASelfCheckFailureInATensorModeFallsBackToFp32() => WithTimeout(() =>
    {
        // A convolution of real values checked at fp32's tolerance (ProductTerms 0: no widening): TF32's rounding exceeds it,
        // fp32 does not. The self-check must drop TF32 with one line naming the kernel, check fp32, and go on.
        var sensitive = new OpCase
        {
            Name = "conv2d held to fp32",
            Inputs = [new("x", [2, 8, 6, 6]), new("w", [4, 8, 3, 3]), new("b", [4])],
            Forward = (sc, x) =>
            {
                var y = sc.Output(2, 4, 6, 6);
                Conv2d.Forward(x[0], x[1], x[2], y, 1, 1);
                return [y];
            },
        };
        string dir = Directory.CreateTempSubdirectory("ddpm-selfcheck-tc").FullName;
        var log = new List<string>();
        var gpu = fixture.Warp32;
        var kernels = IlgpuKernels.For(gpu);
        kernels.Precision = gpu.Precision = MathPrecision.Tf32;
        try
        {
            string cache = Path.Combine(dir, Cli.SelfCheck.FileName);
            Cli.SelfCheck.Ensure(gpu, log.Add, cache, [sensitive], force: true);
            Assert.Equal(MathPrecision.Fp32, kernels.Precision);
            Assert.Equal(MathPrecision.Fp32, gpu.Precision);
            Assert.Contains(log, l => l.Contains("fast tf32 kernel 'conv2d held to fp32' differs from the CPU backend") && l.Contains("computing in fp32 instead"));
            var verdicts = System.Text.Json.JsonSerializer.Deserialize<List<Cli.SelfCheck.Verdict>>(File.ReadAllText(cache))!;
            Assert.Equal([("fast", true), ("fast tf32", false)], verdicts.Select(v => (v.Kernels, v.Pass)).OrderBy(v => v.Kernels));
            foreach (var line in log)
            {
                output.WriteLine(line);
            }
        }
        finally
        {
            kernels.Precision = gpu.Precision = MathPrecision.Fp32;
            Directory.Delete(dir, recursive: true);
        }
    });

    /// <summary>docs/gpu.md's tolerance table is <see cref="Checker.ProductTolerance"/>'s values (to its three digits).</summary>
    [Fact]
    public void TheDocumentedTolerancesAreTheChecksOwn()
    {
        string doc = File.ReadAllText(Path.Combine(CliTests.RepoRoot(), "docs", "gpu.md"));
        var section = doc[doc.IndexOf("### Tolerances", StringComparison.Ordinal)..];
        var rows = System.Text.RegularExpressions.Regex.Matches(section, @"^\| (\d+) \| [^|]+ \| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$", System.Text.RegularExpressions.RegexOptions.Multiline);
        Assert.True(rows.Count >= 4, $"docs/gpu.md: {rows.Count} tolerance rows");
        foreach (System.Text.RegularExpressions.Match row in rows)
        {
            int terms = int.Parse(row.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            foreach (var (mode, text) in new[] { (MathPrecision.Tf32, row.Groups[2].Value), (MathPrecision.Tf32x3, row.Groups[3].Value) })
            {
                double documented = double.Parse(text, System.Globalization.CultureInfo.InvariantCulture), actual = Checker.ProductTolerance(mode, terms);
                Assert.True(Math.Abs(documented - actual) <= 0.005 * actual, $"T = {terms}, {mode.Name()}: docs/gpu.md says {text}, the check uses {actual:E3}");
            }
        }
        // And the cases' own longest sums are among the rows where the doc names them.
        Assert.Contains(OpCatalog.All, c => c.ProductTerms == 1536);
        Assert.Equal(0, Checker.ProductTolerance(MathPrecision.Fp32, 1536));
    }

    private static MathPrecision Parse(string mode) => mode == nameof(Tf32Math) ? MathPrecision.Tf32 : MathPrecision.Tf32x3;

    private static (string Name, Func<IlgpuKernels, TileLauncher> Load)[] TensorLaunchers() =>
    [
        ("TF32", TiledGemm.LoadTensor<MatmulTile, Tf32Math, PtxLayout>),
        ("3xTF32", TiledGemm.LoadTensor<MatmulTile, Tf32x3Math, PtxLayout>),
    ];

    /// <summary>c [m, n] = op(a)·op(b) on <paramref name="device"/>: through <see cref="Linear.Matmul"/> on the CPU, through
    /// the launcher <paramref name="load"/> gives on a simulator.</summary>
    private static float[] Matmul(Device device, Func<IlgpuKernels, TileLauncher>? load, float[] a, float[] b, int m, int n, int kd, bool transA, bool transB)
    {
        int[] aShape = transA ? [kd, m] : [m, kd], bShape = transB ? [n, kd] : [kd, n];
        if (load is null)
        {
            return Run(device, [(a, aShape), (b, bShape)], NaNs(m * n), [m, n], (t, c) => Linear.Matmul(t[0], transA, t[1], transB, c, false));
        }
        var kernels = IlgpuKernels.For((IlgpuDevice)device);
        // Loaded once per kernel set and kernel (each load compiles: half a second on the simulator).
        var launcher = Launchers.GetOrAdd((kernels, load.Method), _ => load(kernels));
        var s = new MatmulShape(m, n, kd, transA ? 1 : kd, transA ? m : 1, transB ? 1 : n, transB ? kd : 1, false);
        return Run(device, [(a, aShape), (b, bShape)], NaNs(m * n), [m, n], (t, c) =>
            TiledGemm.Launch<MatmulTile>(kernels, launcher, new TileArgs(m, n, kd, 0, false, false, default, s), t[0].View, t[1].View, c.View, c.View, c.View, c.View));
    }

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(IlgpuKernels, System.Reflection.MethodInfo), TileLauncher> Launchers = new();

    private static double MaxDiff(float[] x, float[] y) => x.Zip(y, (p, q) => Math.Abs((double)p - q)).Max();
}

/// <summary>A tensor core that rounds its operands' low 13 bits to nearest (ties away) instead of dropping them, planted by
/// the test: what the staging (Tf32.HalfUlp) would meet if a GPU did not truncate.</summary>
public struct RoundingRead : IOperandRead
{
    public static float Read(float operand) => Tf32.RoundBits(operand);
}

/// <summary>TF32 mode on the planted <see cref="RoundingRead"/> tensor core.</summary>
public struct RoundingTf32Math : ITensorMath
{
    public static bool OnTensorCores => Tf32Math.OnTensorCores;
    public static bool WrittenOut => Tf32Math.WrittenOut;
    public static float Stage(float x) => Tf32Math.Stage(x);
    public static float AsRead(float staged) => Tf32Math.AsRead(staged);
    public static Tf32Pair Split(float x) => Tf32Math.Split(x);
    public static void Mma(ref Frag4 c, Tf32Pair a0, Tf32Pair a1, Tf32Pair a2, Tf32Pair a3, Tf32Pair b0, Tf32Pair b1) => Tf32Math.Mma(ref c, a0, a1, a2, a3, b0, b1);
    public static void Emulated(ref Frag4 c, ArrayView<float> posted, int a, int b) => Tf32.Product<RoundingRead>(ref c, posted, a, b);
}

/// <summary>A wrong fragment mapping, planted by the test: a1 and a2 swapped.</summary>
public struct SwappedLayout : IFragmentLayout
{
    public static void A(Float4 tile0, Float4 tile1, out float t0a0, out float t0a1, out float t0a2, out float t0a3, out float t1a0, out float t1a1,
        out float t1a2, out float t1a3)
    {
        (t0a0, t0a1, t0a2, t0a3) = (tile0.X, tile0.Z, tile0.Y, tile0.W);
        (t1a0, t1a1, t1a2, t1a3) = (tile1.X, tile1.Z, tile1.Y, tile1.W);
    }
}
