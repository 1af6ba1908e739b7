using BenchmarkDotNet.Attributes;
using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Benchmarks;

/// <summary>
/// The reference case of the engine issue: 3×3 convolution, N=32, 64→64 channels, 28×28, pad 1.
/// FLOPs = 2·N·K·C·R·S·P·Q = 2·32·64·64·9·784 ≈ 1.85 GFLOP for the forward and for each gradient.
/// Naive: direct loops (<see cref="Conv2d.ForwardNaive"/>); fast: im2col + packed SIMD GEMM on all cores.
/// </summary>
public class ConvBenchmarks : ConvOperands
{
    private const double Flops = 2.0 * 32 * 64 * 64 * 9 * 784;
    private static readonly ConvShape G = new(32, 64, 28, 28, 64, 3, 3, 1, 1);

    [GlobalSetup]
    public void Setup() => Allocate(G);

    [Benchmark, Flops(Flops)]
    public void ForwardNaive() => Conv2d.ForwardNaive(G, _hx, _hw, _hb, _hy);

    [Benchmark, Flops(Flops)]
    public void ForwardFast() => Conv2d.Forward(_x, _w, _b, _y, 1, 1);

    [Benchmark, Flops(Flops)]
    public void BackwardInputNaive() => Conv2d.BackwardInputNaive(G, _hdy, _hw, _hdx);

    [Benchmark, Flops(Flops)]
    public void BackwardInputFast() => Conv2d.BackwardInput(_dy, _w, _dx, 1, 1);

    [Benchmark, Flops(Flops)]
    public void BackwardWeightNaive() => Conv2d.BackwardWeightNaive(G, _hdy, _hx, _hdw);

    [Benchmark, Flops(Flops)]
    public void BackwardWeightFast() => Conv2d.BackwardWeight(_dy, _x, _dw, 1, 1);
}

/// <summary>
/// The U-Net's convolutions at batch 64 (3×3 pad 1 unless named 1×1; "s2" = the stride-2 down convolutions), each pass,
/// with the per-shape choice of <see cref="Conv2d"/> (Auto) against the explicit im2col lowering.
/// Shape "C-K-H": C input channels, K output channels, H×H input.
/// Run: dotnet run -c Release --project benchmarks -- --filter '*UNetConvolutionBenchmarks*'
/// </summary>
public class UNetConvolutionBenchmarks : ConvOperands
{
    private ConvShape _g;
    private int _stride, _pad;

    [Params("16-16-28", "48-16-28", "16-16-28s2", "16-32-14", "32-32-14s2", "32-64-7", "64-64-7", "96-32-14", "64-64-14", "32-32-28",
        "64-64-28", "1-16-28", "16-1-28", "48-16-28-1x1")]
    public string Shape { get; set; } = "";

    [Params(ConvLowering.Auto, ConvLowering.Explicit)]
    public ConvLowering Lowering { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        string[] parts = Shape.Replace("s2", "").Split('-');
        int c = int.Parse(parts[0]), k = int.Parse(parts[1]), h = int.Parse(parts[2]), r = parts.Length > 3 ? 1 : 3;
        _stride = Shape.EndsWith("s2") ? 2 : 1;
        _pad = r / 2;
        _g = new ConvShape(64, c, h, h, k, r, r, _stride, _pad);
        Allocate(_g);
    }

    [Benchmark]
    public void Forward()
    {
        Conv2d.Forward(_x, _w, _b, _y, _stride, _pad, paths: new CpuConvPaths(Lowering));
    }

    [Benchmark]
    public void BackwardInput()
    {
        Conv2d.BackwardInput(_dy, _w, _dx, _stride, _pad, paths: new CpuConvPaths(Lowering));
    }

    [Benchmark]
    public void BackwardWeight()
    {
        Conv2d.BackwardWeight(_dy, _x, _dw, _stride, _pad, paths: new CpuConvPaths(Lowering));
    }
}

/// <summary>
/// The tiny preset's most frequent convolution, 3×3, N=64, 16→16 channels, 28×28, pad 1: naive loops against the fast
/// path, and the fast weight gradient's two kernels (dot-product tiles, chosen here, against the packed GEMM).
/// FLOPs = 2·N·K·C·R·S·P·Q = 2·64·16·16·9·784 ≈ 0.231 GFLOP for the forward and for each gradient.
/// </summary>
public class SmallConvBenchmarks : ConvOperands
{
    private const double Flops = 2.0 * 64 * 16 * 16 * 9 * 784;
    private static readonly ConvShape G = new(64, 16, 28, 28, 16, 3, 3, 1, 1);

    [GlobalSetup]
    public void Setup() => Allocate(G);

    [Benchmark, Flops(Flops)]
    public void ForwardNaive() => Conv2d.ForwardNaive(G, _hx, _hw, _hb, _hy);

    [Benchmark, Flops(Flops)]
    public void ForwardFast() => Conv2d.Forward(_x, _w, _b, _y, 1, 1);

    [Benchmark, Flops(Flops)]
    public void BackwardInputNaive() => Conv2d.BackwardInputNaive(G, _hdy, _hw, _hdx);

    [Benchmark, Flops(Flops)]
    public void BackwardInputFast() => Conv2d.BackwardInput(_dy, _w, _dx, 1, 1, accumulate: false);

    [Benchmark, Flops(Flops)]
    public void BackwardWeightNaive() => Conv2d.BackwardWeightNaive(G, _hdy, _hx, _hdw);

    [Benchmark, Flops(Flops)]
    public void BackwardWeightFastDot()
    {
        Conv2d.BackwardWeight(_dy, _x, _dw, 1, 1, paths: new CpuConvPaths(DotWeightGradient: true));
    }

    [Benchmark, Flops(Flops)]
    public void BackwardWeightFastGemm()
    {
        Conv2d.BackwardWeight(_dy, _x, _dw, 1, 1, paths: new CpuConvPaths(DotWeightGradient: false));
    }
}

/// <summary>The operands of one convolution case, on the CPU backend and as host arrays for the naive versions: x, w, b
/// and dy seeded normals, y and the gradients ready to be written (dx, dw zeroed).</summary>
public abstract class ConvOperands
{
    protected Tensor _x = null!, _w = null!, _b = null!, _y = null!, _dy = null!, _dx = null!, _dw = null!;
    protected float[] _hx = null!, _hw = null!, _hb = null!, _hy = null!, _hdy = null!, _hdx = null!, _hdw = null!;

    protected void Allocate(ConvShape g)
    {
        var d = CpuDevice.Instance;
        _x = Tensor.Empty(d, g.N, g.C, g.H, g.W);
        _w = Tensor.Empty(d, g.K, g.C, g.R, g.S);
        _b = Tensor.Empty(d, g.K);
        _y = Tensor.Empty(d, g.N, g.K, g.P, g.Q);
        _dy = Tensor.Empty(d, g.N, g.K, g.P, g.Q);
        _dx = Tensor.Zeros(d, g.N, g.C, g.H, g.W);
        _dw = Tensor.Zeros(d, g.K, g.C, g.R, g.S);
        foreach (var (t, i) in new[] { (_x, 1UL), (_w, 2UL), (_b, 3UL), (_dy, 4UL) })
        {
            RandomFill.Normal(t, i, 0);
        }
        (_hx, _hw, _hb, _hdy) = (_x.ToArray(), _w.ToArray(), _b.ToArray(), _dy.ToArray());
        (_hy, _hdx, _hdw) = (new float[_y.Length], new float[_dx.Length], new float[_dw.Length]);
    }
}
