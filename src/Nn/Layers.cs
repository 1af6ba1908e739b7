using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// Creates a model's parameters in order, on one device, initialised as PyTorch's defaults:
/// conv and linear weights and biases uniform in ±1/sqrt(fan_in) (kaiming_uniform with a = √5
/// reduces to that bound), GroupNorm weight 1 and bias 0. Parameter k draws from the Philox
/// stream of the seed at offset k·2³², so the same seed gives the same model on every backend.
/// </summary>
public sealed class ParameterFactory(Device device, ulong seed)
{
    private readonly List<Parameter> _parameters = [];

    /// <summary>Every parameter made so far, in creation order.</summary>
    public IReadOnlyList<Parameter> Parameters => _parameters;

    /// <summary>The device parameters are made on.</summary>
    public Device Device { get; } = device;

    /// <summary>A parameter uniform in ±<paramref name="bound"/>.</summary>
    public Parameter Uniform(string name, float bound, params int[] shape)
    {
        int n = shape.Aggregate(1, (a, b) => a * b);
        var host = new float[n];
        ulong offset = (ulong)_parameters.Count << 32;
        for (int i = 0; i < n; i++)
        {
            host[i] = (2f * Philox.Uniform(seed, offset + (ulong)i) - 1f) * bound;
        }
        return Add(name, host, shape);
    }

    /// <summary>A parameter drawn from N(0, 1) (torch.nn.Embedding's initialisation), by Box-Muller on the same Philox stream.</summary>
    public Parameter Normal(string name, params int[] shape)
    {
        int n = shape.Aggregate(1, (a, b) => a * b);
        var host = new float[n];
        ulong offset = (ulong)_parameters.Count << 32;
        for (int i = 0; i < n; i++)
        {
            host[i] = Philox.Normal(seed, offset + (ulong)i);
        }
        return Add(name, host, shape);
    }

    /// <summary>A parameter filled with <paramref name="value"/>.</summary>
    public Parameter Constant(string name, float value, params int[] shape)
    {
        var host = new float[shape.Aggregate(1, (a, b) => a * b)];
        Array.Fill(host, value);
        return Add(name, host, shape);
    }

    /// <summary>
    /// Every parameter made, as one <see cref="ParameterSet"/>: on both backends the values are moved into one flat
    /// buffer (each parameter a view of it, in creation order) and the gradients are views of one flat buffer of zeros,
    /// so zeroing, the non-finite check, clipping, Adam and EMA are one pass each over the whole model: one launch each
    /// on an ILGPU device, one parallel loop each on the CPU (the CPU kernels index from a view's own first element).
    /// </summary>
    public ParameterSet Gather() => new(_parameters, flat: true);

    private Parameter Add(string name, float[] host, int[] shape)
    {
        var p = new Parameter(name, Tensor.FromHost(Device, host, shape));
        _parameters.Add(p);
        return p;
    }
}

/// <summary>
/// A model's parameters in order, with where each starts in the sequence of all their elements (the flat order
/// the non-finite flag names elements in). When <see cref="IsFlat"/>, <see cref="Values"/> and <see cref="Grads"/>
/// are one buffer each and every parameter's value and gradient is a view of them.
/// </summary>
public sealed class ParameterSet : IReadOnlyList<Parameter>, IDisposable
{
    private readonly Parameter[] _parameters;
    private readonly int[] _offsets; // [count + 1]

    internal ParameterSet(IReadOnlyList<Parameter> parameters, bool flat)
    {
        _parameters = [.. parameters];
        _offsets = new int[_parameters.Length + 1];
        long total = 0;
        for (int i = 0; i < _parameters.Length; i++)
        {
            _offsets[i] = (int)total;
            total += _parameters[i].Length;
            if (total > int.MaxValue)
            {
                throw new ArgumentException($"a model of more than 2^31 parameters ({total}+)");
            }
        }
        _offsets[^1] = (int)total;
        if (!flat || _parameters.Length == 0)
        {
            return;
        }
        var device = _parameters[0].Value.Device;
        Values = Tensor.Empty(device, (int)total);
        Grads = Tensor.Zeros(device, (int)total);
        for (int i = 0; i < _parameters.Length; i++)
        {
            var p = _parameters[i];
            p.Value.MoveInto(Values, _offsets[i]);
            p.Grad?.Dispose();
            p.Grad = Grads.Slice(_offsets[i], p.Shape);
        }
    }

    /// <summary>True when the values and gradients are views of one flat buffer each.</summary>
    [System.Diagnostics.CodeAnalysis.MemberNotNullWhen(true, nameof(Values), nameof(Grads))]
    public bool IsFlat => Values is not null;

    /// <summary>Every parameter's value, in order, as one buffer (null unless <see cref="IsFlat"/>).</summary>
    public Tensor? Values { get; }

    /// <summary>Every parameter's gradient, in order, as one buffer (null unless <see cref="IsFlat"/>).</summary>
    public Tensor? Grads { get; }

    /// <summary>Total number of values.</summary>
    public int Length => _offsets[^1];

    /// <summary>Where parameter <paramref name="i"/> starts in the flat order.</summary>
    public int OffsetOf(int i) => _offsets[i];

    /// <summary>The index of the parameter holding element <paramref name="element"/> of the flat order.</summary>
    public int IndexOfElement(int element)
    {
        int i = Array.BinarySearch(_offsets, element);
        // An exact hit may be the start of a run of empty parameters: the one that holds it is the last of them.
        if (i >= 0)
        {
            while (i + 1 < _parameters.Length && _offsets[i + 1] == element)
            {
                i++;
            }
            return i;
        }
        return ~i - 1;
    }

    /// <inheritdoc/>
    public Parameter this[int index] => _parameters[index];

    /// <inheritdoc/>
    public int Count => _parameters.Length;

    /// <inheritdoc/>
    public IEnumerator<Parameter> GetEnumerator() => ((IEnumerable<Parameter>)_parameters).GetEnumerator();

    System.Collections.IEnumerator System.Collections.IEnumerable.GetEnumerator() => GetEnumerator();

    /// <summary>Sets every gradient to zero: one memset over the flat buffer, or one per parameter.</summary>
    public void ZeroGrad()
    {
        if (Grads is not null)
        {
            Grads.Zero();
            return;
        }
        for (int i = 0; i < _parameters.Length; i++)
        {
            _parameters[i].ZeroGrad();
        }
    }

    /// <summary>Frees the values and gradients (the flat buffers, or each parameter's own).</summary>
    public void Dispose()
    {
        foreach (var p in _parameters)
        {
            p.Value.Dispose();
            p.Grad?.Dispose();
        }
        Values?.Dispose();
        Grads?.Dispose();
    }
}

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
