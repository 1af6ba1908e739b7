using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>An exponential moving average of the weights: e = decay·e + (1 - decay)·p after each step.</summary>
public sealed class Ema : IDisposable
{
    private readonly IReadOnlyList<Parameter> _parameters;
    private readonly ParameterSet? _flat;
    private readonly Tensor? _weightsFlat; // over a flat set: every average in one buffer, Weights its views

    /// <summary>Starts as a copy of the current weights.</summary>
    public Ema(IReadOnlyList<Parameter> parameters, float decay)
    {
        if (decay is < 0 or >= 1)
        {
            throw new ArgumentException($"ema decay {decay} must be in [0, 1)");
        }
        _parameters = parameters;
        Decay = decay;
        if (parameters is ParameterSet { IsFlat: true } flat)
        {
            _flat = flat;
            _weightsFlat = flat.Values.EmptyLike();
            _weightsFlat.CopyFrom(flat.Values);
            Weights = Enumerable.Range(0, flat.Count).Select(i => _weightsFlat.Slice(flat.OffsetOf(i), flat[i].Shape)).ToArray();
            return;
        }
        Weights = parameters.Select(p =>
        {
            var t = p.Value.EmptyLike();
            t.CopyFrom(p.Value);
            return t;
        }).ToArray();
    }

    /// <summary>The set decay per step (with a warm-up, its cap: see <see cref="EmaSchedule"/>).</summary>
    public float Decay { get; }

    /// <summary>The averaged weights, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> Weights { get; }

    /// <summary>e = decay·e + (1 - decay)·p for every parameter, now (the per-parameter reference of
    /// <see cref="QueueUpdate(Tensor, float)"/>, which training uses; internal: the tests compare the two).</summary>
    internal void Update()
    {
        if (_flat is not null)
        {
            Optim.Ema(_weightsFlat!, _flat.Values!, Decay);
            return;
        }
        for (int i = 0; i < _parameters.Count; i++)
        {
            Optim.Ema(Weights[i], _parameters[i].Value, Decay);
        }
    }

    /// <summary>The update of a step queued by <see cref="Adam.QueueStep"/>: skipped on the device with it (<paramref name="state"/> is <see cref="Adam.State"/>).</summary>
    public void QueueUpdate(Tensor state) => QueueUpdate(state, Decay);

    /// <summary>The update of a queued step at the decay <paramref name="decay"/> that this step takes (an <see cref="EmaSchedule"/>'s
    /// warm-up: the decay is a function of the step, passed to the launch, so nothing waits for the device).</summary>
    public void QueueUpdate(Tensor state, float decay)
    {
        if (decay is < 0 or >= 1)
        {
            throw new ArgumentOutOfRangeException(nameof(decay), decay, "an ema decay is in [0, 1)");
        }
        if (_flat is not null)
        {
            Optim.Ema(_weightsFlat!, _flat.Values!, decay, state);
            return;
        }
        for (int i = 0; i < _parameters.Count; i++)
        {
            Optim.Ema(Weights[i], _parameters[i].Value, decay, state);
        }
    }

    /// <summary>Copies the averaged weights into the model's parameters (for sampling).</summary>
    public void CopyToModel()
    {
        if (_flat is not null)
        {
            _flat.Values!.CopyFrom(_weightsFlat!);
            return;
        }
        for (int i = 0; i < _parameters.Count; i++)
        {
            _parameters[i].Value.CopyFrom(Weights[i]);
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        foreach (var t in Weights)
        {
            t.Dispose();
        }
        _weightsFlat?.Dispose();
    }
}
