using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>2-D convolution with bias (torch.nn.Conv2d): weight [out, in, k, k], bias [out].</summary>
public sealed class Conv2dLayer
{
    /// <summary>Makes "name.weight" and "name.bias".</summary>
    public Conv2dLayer(ParameterFactory f, string name, int cin, int cout, int kernel, int stride = 1, int pad = -1)
    {
        Stride = stride;
        Pad = pad < 0 ? kernel / 2 : pad;
        float bound = 1f / MathF.Sqrt(cin * kernel * kernel);
        Weight = f.Uniform($"{name}.weight", bound, cout, cin, kernel, kernel);
        Bias = f.Uniform($"{name}.bias", bound, cout);
    }

    /// <summary>[out, in, k, k].</summary>
    public Parameter Weight { get; }

    /// <summary>[out].</summary>
    public Parameter Bias { get; }

    /// <summary>Stride of the convolution.</summary>
    public int Stride { get; }

    /// <summary>Zero padding on each side.</summary>
    public int Pad { get; }

    /// <summary>y = conv(x) + bias, and + e[n, k] per image when <paramref name="channelBias"/> e [N, out] is given.</summary>
    public Var Forward(Tape g, Var x, Var? channelBias = null, Var? residual = null) => g.Conv2d(x, Weight, Bias, Stride, Pad, channelBias, residual);
}

/// <summary>Fully connected layer (torch.nn.Linear): weight [out, in], bias [out].</summary>
public sealed class LinearLayer(ParameterFactory f, string name, int inputs, int outputs)
{
    /// <summary>[out, in].</summary>
    public Parameter Weight { get; } = f.Uniform($"{name}.weight", 1f / MathF.Sqrt(inputs), outputs, inputs);

    /// <summary>[out].</summary>
    public Parameter Bias { get; } = f.Uniform($"{name}.bias", 1f / MathF.Sqrt(inputs), outputs);

    /// <summary>y = x·Wᵀ + b.</summary>
    public Var Forward(Tape g, Var x) => g.Linear(x, Weight, Bias);
}

/// <summary>Group normalisation with affine weight and bias (torch.nn.GroupNorm).</summary>
public sealed class GroupNormLayer(ParameterFactory f, string name, int groups, int channels, float eps = 1e-5f)
{
    /// <summary>[C], initialised to 1.</summary>
    public Parameter Weight { get; } = f.Constant($"{name}.weight", 1f, channels);

    /// <summary>[C], initialised to 0.</summary>
    public Parameter Bias { get; } = f.Constant($"{name}.bias", 0f, channels);

    /// <summary>y = groupnorm(x)·weight + bias.</summary>
    public Var Forward(Tape g, Var x) => g.GroupNorm(x, Weight, Bias, groups, eps);

    /// <summary>y = silu(groupnorm(x)·weight + bias), fused.</summary>
    public Var ForwardSilu(Tape g, Var x) => g.GroupNormSilu(x, Weight, Bias, groups, eps);
}

/// <summary>
/// The spec's ResBlock(cin, cout) with time embedding:
/// h = conv1(silu(norm1(x))); h += temb(silu(t_emb)) over H×W; h = conv2(silu(norm2(h)));
/// out = h + (skip(x) if cin ≠ cout else x), skip a 1×1 convolution.
/// </summary>
public sealed class ResBlock
{
    private readonly GroupNormLayer _norm1, _norm2;
    private readonly Conv2dLayer _conv1, _conv2;
    private readonly Conv2dLayer? _skip;
    private readonly LinearLayer _temb;

    /// <summary>Makes name.norm1, name.conv1, name.temb, name.norm2, name.conv2 and, when cin ≠ cout, name.skip.</summary>
    public ResBlock(ParameterFactory f, string name, int cin, int cout, int tdim, int groups)
    {
        _norm1 = new GroupNormLayer(f, $"{name}.norm1", groups, cin);
        _conv1 = new Conv2dLayer(f, $"{name}.conv1", cin, cout, 3);
        _temb = new LinearLayer(f, $"{name}.temb", tdim, cout);
        _norm2 = new GroupNormLayer(f, $"{name}.norm2", groups, cout);
        _conv2 = new Conv2dLayer(f, $"{name}.conv2", cout, cout, 3);
        _skip = cin != cout ? new Conv2dLayer(f, $"{name}.skip", cin, cout, 1) : null;
    }

    /// <summary>The block on x [N, cin, H, W] with <paramref name="siluTemb"/> = silu(t_emb) [N, tdim]
    /// (computed once by the U-Net for all blocks; its gradient adds up over them).</summary>
    public Var Forward(Tape g, Var x, Var siluTemb)
    {
        // The time embedding is added in conv1's epilogue, the skip path in conv2's (on the tiled ILGPU path: one pass
        // over h and one launch fewer each than separate adds).
        var h = _conv1.Forward(g, _norm1.ForwardSilu(g, x), _temb.Forward(g, siluTemb));
        var skip = _skip is null ? x : _skip.Forward(g, x);
        return _conv2.Forward(g, _norm2.ForwardSilu(g, h), residual: skip);
    }
}
