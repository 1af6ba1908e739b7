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
