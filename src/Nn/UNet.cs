using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// The model spec's U-Net, UNet(ch): S×S → S/2 → S/4 and back (MNIST: 28, 14, 7), channels (ch, 2ch, 4ch), one
/// ResBlock per level, GroupNorm with 8 groups, SiLU everywhere, time embedding ch → 4ch → 4ch.
/// Input x [N, C, S, S] (C = <see cref="ImageChannels"/>: 1 or 3; S a multiple of 4) and timesteps t [N] (integers as
/// floats); output the predicted noise [N, C, S, S]. Only conv_in and conv_out depend on C, nothing on S. Parameter names and shapes are the PyTorch peer's. The class-conditional variant
/// (classes = 10) adds label_emb.weight [classes + 1, 4ch] after time_lin2 and takes labels [N]
/// (0..classes-1, and classes itself for "no label", as classifier-free guidance needs).
/// </summary>
public sealed class UNet
{
    /// <summary>GroupNorm groups, as the spec.</summary>
    public const int Groups = 8;

    private readonly LinearLayer _timeLin1, _timeLin2;
    private readonly Conv2dLayer _convIn, _down0, _down1, _up1, _up0, _convOut;
    private readonly ResBlock _enc0, _enc1, _mid0, _mid1, _dec1, _dec0;
    private readonly GroupNormLayer _normOut;
    private readonly Parameter? _labelEmb;

    /// <summary>Builds the network on <paramref name="device"/> with PyTorch's default initialisation drawn from
    /// <paramref name="seed"/>; <paramref name="classes"/> &gt; 0 makes it class-conditional; <paramref name="imageChannels"/>
    /// is the images' channel count (1: grayscale, 3: RGB).</summary>
    public UNet(int ch, Device device, ulong seed = 0, int classes = 0, int imageChannels = 1)
    {
        if (imageChannels is not (1 or 3))
        {
            throw new ArgumentException($"unet: image channels {imageChannels} must be 1 (grayscale) or 3 (RGB)");
        }
        if (classes < 0)
        {
            throw new ArgumentException($"unet: classes {classes} must be 0 (unconditional) or positive");
        }
        if (ch < Groups || ch % Groups != 0)
        {
            throw new ArgumentException($"unet: ch {ch} must be a multiple of {Groups} (GroupNorm groups)");
        }
        Channels = ch;
        var f = new ParameterFactory(device, seed);
        int tdim = 4 * ch;
        _timeLin1 = new LinearLayer(f, "time_lin1", ch, tdim);
        _timeLin2 = new LinearLayer(f, "time_lin2", tdim, tdim);
        // The peer's order: label_emb follows time_lin2 (it is made there in its __init__).
        _labelEmb = classes > 0 ? f.Normal("label_emb.weight", classes + 1, tdim) : null;
        Classes = classes;
        ImageChannels = imageChannels;
        _convIn = new Conv2dLayer(f, "conv_in", imageChannels, ch, 3);
        _enc0 = new ResBlock(f, "enc0", ch, ch, tdim, Groups);
        _down0 = new Conv2dLayer(f, "down0.conv", ch, ch, 3, stride: 2, pad: 1);
        _enc1 = new ResBlock(f, "enc1", ch, 2 * ch, tdim, Groups);
        _down1 = new Conv2dLayer(f, "down1.conv", 2 * ch, 2 * ch, 3, stride: 2, pad: 1);
        _mid0 = new ResBlock(f, "mid0", 2 * ch, 4 * ch, tdim, Groups);
        _mid1 = new ResBlock(f, "mid1", 4 * ch, 4 * ch, tdim, Groups);
        _up1 = new Conv2dLayer(f, "up1.conv", 4 * ch, 4 * ch, 3);
        _dec1 = new ResBlock(f, "dec1", 6 * ch, 2 * ch, tdim, Groups);
        _up0 = new Conv2dLayer(f, "up0.conv", 2 * ch, 2 * ch, 3);
        _dec0 = new ResBlock(f, "dec0", 3 * ch, ch, tdim, Groups);
        _normOut = new GroupNormLayer(f, "norm_out", Groups, ch);
        _convOut = new Conv2dLayer(f, "conv_out", ch, imageChannels, 3);
        Parameters = f.Gather();
        Device = device;
    }

    /// <summary>The base width ch.</summary>
    public int Channels { get; }

    /// <summary>The images' channels C: conv_in takes them, conv_out gives them back.</summary>
    public int ImageChannels { get; }

    /// <summary>The side S of the images the model was trained on (28: MNIST): what a sampler draws. The network takes any
    /// multiple of 4; this is the size it learned.</summary>
    public int ImageSize { get; init; } = 28;

    /// <summary>Number of classes of a class-conditional model (label <see cref="Classes"/> means none); 0 when unconditional.</summary>
    public int Classes { get; }

    /// <summary>The label that means "no label" (classifier-free guidance's unconditional branch).</summary>
    public int NullLabel => Classes;

    /// <summary>The device the parameters live on.</summary>
    public Device Device { get; }

    /// <summary>Every parameter, in creation order, named as in the spec (on an ILGPU device, views of one flat buffer).</summary>
    public ParameterSet Parameters { get; }

    /// <summary>Total number of learned values.</summary>
    public long ParameterCount => Parameters.Sum(p => (long)p.Length);

    /// <summary>The parameter called <paramref name="name"/>.</summary>
    public Parameter this[string name] => Parameters.FirstOrDefault(p => p.Name == name)
        ?? throw new KeyNotFoundException($"unet has no parameter '{name}'");

    /// <summary>eps_theta(x, t), or eps_theta(x, t, y) with <paramref name="labels"/> [N] on a class-conditional model.</summary>
    public Var Forward(Tape g, Var x, Var t, Var? labels = null)
    {
        if ((labels is null) != (_labelEmb is null))
        {
            throw new ArgumentException(_labelEmb is null
                ? "unet: labels given to an unconditional model"
                : $"unet: a class-conditional model needs labels (0..{Classes}; {Classes} = none)");
        }
        var temb = _timeLin2.Forward(g, g.Silu(_timeLin1.Forward(g, g.TimeEmbedding(t, Channels))));
        if (labels is not null)
        {
            temb = g.Add(temb, g.Embedding(labels, _labelEmb!));
        }
        var st = g.Silu(temb);
        var h = _convIn.Forward(g, x);
        var s0 = _enc0.Forward(g, h, st);
        var s1 = _enc1.Forward(g, _down0.Forward(g, s0), st);
        h = _mid1.Forward(g, _mid0.Forward(g, _down1.Forward(g, s1), st), st);
        h = _dec1.Forward(g, g.Concat(_up1.Forward(g, g.Upsample2x(h)), s1), st);
        h = _dec0.Forward(g, g.Concat(_up0.Forward(g, g.Upsample2x(h)), s0), st);
        return _convOut.Forward(g, _normOut.ForwardSilu(g, h));
    }

    /// <summary>Sets every parameter's gradient to zero (one memset when the gradients are one flat buffer).</summary>
    public void ZeroGrad() => Parameters.ZeroGrad();

    private Tensor[]? _convWeights;

    /// <summary>Holds the convolution weights permuted for the GPU's K steps of one tap until disposed (Conv2d.HoldWeights):
    /// for a span in which they do not change, a training step's forwards and backwards or a sampling run. Nothing on the
    /// CPU backend; allocates nothing after the first call.</summary>
    public IDisposable HoldConvWeights() =>
        Ddpm.Kernels.Conv2d.HoldWeights(_convWeights ??= [.. Parameters.Where(p => p.Shape.Length == 4).Select(p => p.Value)]);
}

/// <summary>The spec's presets: tiny (16), small (32), base (64), written once.</summary>
public static class Presets
{
    private static readonly (string Name, int Channels)[] Table = [("tiny", 16), ("small", 32), ("base", 64)];

    /// <summary>Preset names, smallest first.</summary>
    public static readonly string[] Names = [.. Table.Select(p => p.Name)];

    /// <summary>The base width ch of a preset.</summary>
    public static int Channels(string preset) =>
        ChannelsOrZero(preset) is > 0 and var ch ? ch : throw new ArgumentException($"unknown preset '{preset}': expected {string.Join(", ", Names[..^1])} or {Names[^1]}");

    /// <summary>The base width of a preset, or 0 for a name that is none.</summary>
    public static int ChannelsOrZero(string preset) => Table.FirstOrDefault(p => p.Name == preset).Channels;

    /// <summary>The preset whose width is <paramref name="ch"/>, or null.</summary>
    public static string? NameOf(int ch) => Table.FirstOrDefault(p => p.Channels == ch).Name;
}
