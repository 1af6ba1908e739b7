using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>Tests of every instruction level: ops on a CPU device at the level (<see cref="CpuDevice.At"/>), raw kernels in
/// a scope at it (<see cref="CpuSimd.Enter(SimdLevel)"/>). The level is the device's and the thread's, so these could run
/// beside others; they run alone to keep their timings out of the parallel tests' way (they are the suite's heaviest
/// CPU tests).</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class SimdLevelCollection
{
    public const string Name = "simd levels";

    /// <summary>Every level, narrowest first; a level this processor lacks is skipped by the test, visibly.</summary>
    public static readonly SimdLevel[] Levels = Enum.GetValues<SimdLevel>();

    /// <summary>Each case once per level, the level first.</summary>
    public static IEnumerable<object[]> Cross(params object[][] cases) =>
        from level in Levels from c in cases select new object[] { level }.Concat(c).ToArray();
}

/// <summary>The managed backend's fast paths (packed GEMM, implicit and im2col convolution) against their naive
/// twins, on shapes that leave remainders at every edge of the tiling, at every instruction level the processor has.</summary>
[Collection(SimdLevelCollection.Name)]
public sealed unsafe class CpuFastPathTests
{
    private static float[] Ints(Random rng, int n)
    {
        // Small integers: every product and sum is exact in float32, so fast and naive must agree exactly.
        var v = new float[n];
        for (int i = 0; i < n; i++)
        {
            v[i] = rng.Next(-3, 4);
        }
        return v;
    }

    public static IEnumerable<object[]> GemmCases => SimdLevelCollection.Cross(
        [1, 1, 1], [3, 7, 5], [17, 33, 65], [65, 129, 31], [64, 784, 576], [7, 1, 300], [5, 9, 0],
        // Edges of the 6x8, 6x16 and 4x4 tiles: rows 6k+1, columns 8k+3 / 16k+7.
        [13, 23, 19], [7, 41, 130],
        // Narrow column edges: 4 columns (one 128-bit vector) and 8 (one 256-bit vector) past 16.
        [11, 20, 9], [6, 24, 17],
        // The 4x24 AVX2 kernel's edges: 16 + 7 columns (m = 9: a 1-row edge too), 2x24 + 15 (the 7x7 maps' wide rows:
        // 8 straight into C, 7 through the tile), 24 + 16, 24 + 8; k = 20 and 33 leave the 4x8 A transposes a tail.
        [9, 47, 33], [12, 63, 20], [8, 40, 9], [4, 32, 8], [16, 70, 144]);

    [SkippableTheory]
    [MemberData(nameof(GemmCases))]
    public void GemmMatchesNaiveForEveryTransposeAndMode(SimdLevel level, int m, int n, int k)
    {
        Skip.IfNot(CpuSimd.Supports(level), $"this processor has no {level}");
        // The raw GEMM takes no device: run at the level, as an op of a device at that level would.
        using var _ = CpuSimd.Enter(level);
        var rng = new Random(m * 1000 + n * 10 + k);
        var a = Ints(rng, Math.Max(1, m * k));
        var b = Ints(rng, Math.Max(1, k * n));
        var c0 = Ints(rng, m * n);
        foreach (bool ta in new[] { false, true })
        foreach (bool tb in new[] { false, true })
        foreach (bool acc in new[] { false, true })
        foreach (bool parallel in new[] { false, true })
        {
            var want = (float[])c0.Clone();
            var got = (float[])c0.Clone();
            int aRow = ta ? 1 : k, aCol = ta ? m : 1, bRow = tb ? 1 : n, bCol = tb ? k : 1;
            fixed (float* pa = a, pb = b, pw = want, pg = got)
            {
                Gemm.MultiplyNaive(m, n, k, pa, aRow, aCol, pb, bRow, bCol, pw, n, acc);
                Gemm.Multiply(m, n, k, pa, aRow, aCol, pb, bRow, bCol, pg, n, acc, parallel);
            }
            Assert.True(want.AsSpan().SequenceEqual(got), $"m={m} n={n} k={k} ta={ta} tb={tb} acc={acc} parallel={parallel}");
        }
    }

    // Rows 7-12, implicit-GEMM edges: padded rows of 33 and 13 floats (panels of 48 end mid-row), C·R·S = 135 and 1170
    // (k blocks that are not multiples of 16), K = 1 and 9 (partial 8-row tiles), stride 3, 5x5 stride 2 on a wide
    // image. The next three, the dot-product weight gradient over groups of small images (5 a group, a partial last
    // group per worker), stride 2, K > 64. The last four, the stride-1 planes that share a row's right padding with the
    // next row's left one: 1x1 pad 1 (its outputs overrun the row, so it keeps the frame), 5x5 pad 2 and pad 1, 3x3 pad 2.
    // The last two, the forward pass with dense columns over groups of images (7x7: groups of 8 and a partial last one;
    // 5x5 in pairs, K not a multiple of 8).
    public static IEnumerable<object[]> ConvolutionCases => SimdLevelCollection.Cross(
        [3, 5, 7, 9, 4, 3, 1, 1],
        [3, 17, 13, 11, 33, 3, 1, 1],
        [3, 17, 13, 11, 33, 3, 2, 1],
        [2, 19, 14, 14, 7, 1, 1, 0],
        [1, 3, 9, 8, 5, 5, 2, 2],
        [4, 1, 28, 28, 16, 3, 1, 1],
        [3, 15, 29, 31, 9, 3, 1, 1],
        [2, 130, 7, 7, 9, 3, 1, 1],
        [2, 16, 28, 28, 1, 3, 1, 1],
        [2, 9, 10, 10, 5, 3, 3, 1],
        [2, 3, 40, 70, 5, 5, 2, 2],
        [2, 5, 6, 6, 3, 3, 1, 0],
        [11, 5, 7, 7, 9, 3, 1, 1],
        [11, 6, 14, 14, 10, 3, 2, 1],
        [9, 3, 7, 7, 70, 3, 1, 1],
        [2, 4, 9, 6, 3, 1, 1, 1],
        [2, 3, 8, 9, 4, 5, 1, 2],
        [2, 3, 8, 9, 4, 5, 1, 1],
        [2, 3, 6, 5, 4, 3, 1, 2],
        [19, 5, 7, 7, 64, 3, 1, 1],
        [5, 4, 5, 5, 72, 3, 1, 1]);

    [SkippableTheory]
    [MemberData(nameof(ConvolutionCases))]
    public void ConvolutionMatchesNaive(SimdLevel level, int n, int c, int h, int w, int k, int r, int stride, int pad)
    {
        Skip.IfNot(CpuSimd.Supports(level), $"this processor has no {level}");
        var dev = CpuDevice.At(level);
        // Every lowering: the per-shape choice and both forced ones, each asked for by argument.
        foreach (var lowering in Enum.GetValues<ConvLowering>())
        {
            CheckConvolution(dev, n, c, h, w, k, r, stride, pad, new CpuConvPaths(lowering));
        }
        // The packed path for the B panels the GEMM otherwise reads in place, and the wide grid where the forward pass
        // would take dense columns.
        CheckConvolution(dev, n, c, h, w, k, r, stride, pad, new CpuConvPaths(PackEveryPanel: true, WideForward: true));
        // The implicit weight gradient's two kernels, each forced (the dot-product tiles, 512-, 256- or 128-bit, need
        // a vector level: at the scalar level the forced setting is ignored and the packed GEMM runs).
        foreach (bool dot in new[] { true, false })
        {
            CheckConvolution(dev, n, c, h, w, k, r, stride, pad, new CpuConvPaths(ConvLowering.Implicit, DotWeightGradient: dot));
        }
    }

    private static void CheckConvolution(CpuDevice dev, int n, int c, int h, int w, int k, int r, int stride, int pad, CpuConvPaths lowering)
    {
        var g = new ConvShape(n, c, h, w, k, r, r, stride, pad);
        var rng = new Random(n + c + h + w + k);
        var x = Ints(rng, n * c * h * w);
        var wt = Ints(rng, k * c * r * r);
        var b = Ints(rng, k);
        var dy = Ints(rng, n * k * g.P * g.Q);
        using var tx = Tensor.FromHost(dev, x, n, c, h, w);
        using var tw = Tensor.FromHost(dev, wt, k, c, r, r);
        using var tb = Tensor.FromHost(dev, b, k);
        using var ty = Tensor.Empty(dev, n, k, g.P, g.Q);
        using var tdy = Tensor.FromHost(dev, dy, n, k, g.P, g.Q);
        var dx0 = Ints(rng, x.Length);
        var dw0 = Ints(rng, wt.Length);
        using var tdx = Tensor.FromHost(dev, dx0, n, c, h, w);
        using var tdw = Tensor.FromHost(dev, dw0, k, c, r, r);

        Conv2d.Forward(tx, tw, tb, ty, stride, pad, paths: lowering);
        Conv2d.BackwardInput(tdy, tw, tdx, stride, pad, paths: lowering);
        Conv2d.BackwardWeight(tdy, tx, tdw, stride, pad, paths: lowering);

        var y = new float[ty.Length];
        Conv2d.ForwardNaive(g, x, wt, b, y);
        var dx = (float[])dx0.Clone();
        Conv2d.BackwardInputNaive(g, dy, wt, dx);
        var dw = (float[])dw0.Clone();
        Conv2d.BackwardWeightNaive(g, dy, x, dw);
        Assert.True(y.AsSpan().SequenceEqual(ty.ToArray()), $"forward, {lowering}");

        // The forward's epilogue terms: a bias per (image, channel) and a residual shaped as y.
        var e = Ints(rng, n * k);
        var res = Ints(rng, y.Length);
        using var te = Tensor.FromHost(dev, e, n, k);
        using var tr = Tensor.FromHost(dev, res, n, k, g.P, g.Q);
        Conv2d.Forward(tx, tw, tb, ty, stride, pad, te, tr, lowering);
        var yer = (float[])y.Clone();
        for (int i = 0; i < yer.Length; i++) yer[i] += e[i / (g.P * g.Q)] + res[i];
        Assert.True(yer.AsSpan().SequenceEqual(ty.ToArray()), $"forward with channel bias and residual, {lowering}");
        Assert.True(dx.AsSpan().SequenceEqual(tdx.ToArray()), $"input gradient, {lowering}");
        Assert.True(dw.AsSpan().SequenceEqual(tdw.ToArray()), $"weight gradient, {lowering}");

        // Overwriting (a fresh gradient buffer): the old contents, NaN here, are never read.
        using var fresh = Tensor.FromHost(dev, Enumerable.Repeat(float.NaN, x.Length).ToArray(), n, c, h, w);
        Conv2d.BackwardInput(tdy, tw, fresh, stride, pad, accumulate: false, paths: lowering);
        var dxOnly = new float[x.Length];
        Conv2d.BackwardInputNaive(g, dy, wt, dxOnly);
        Assert.True(dxOnly.AsSpan().SequenceEqual(fresh.ToArray()), $"input gradient without accumulating, {lowering}");
    }
}
