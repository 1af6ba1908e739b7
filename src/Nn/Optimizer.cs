using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// Adam (torch.optim.Adam, no weight decay) over a model's parameters, with its first and second
/// moments on the parameters' device. <see cref="Update"/> takes one bias-corrected step.
/// </summary>
public sealed class Adam : IDisposable
{
    private readonly IReadOnlyList<Parameter> _parameters;
    private readonly Tensor? _normTotal, _normPart; // [1] each, for ClipGradNorm

    /// <summary>Moments start at zero; the spec's defaults are β1 0.9, β2 0.999, eps 1e-8.</summary>
    public Adam(IReadOnlyList<Parameter> parameters, float lr = 1e-3f, float beta1 = 0.9f, float beta2 = 0.999f, float eps = 1e-8f)
    {
        _parameters = parameters;
        LearningRate = lr;
        (Beta1, Beta2, Eps) = (beta1, beta2, eps);
        M = parameters.Select(p => p.Value.ZerosLike()).ToArray();
        V = parameters.Select(p => p.Value.ZerosLike()).ToArray();
        if (parameters.Count > 0)
        {
            _normTotal = Tensor.Empty(parameters[0].Value.Device, 1);
            _normPart = Tensor.Empty(parameters[0].Value.Device, 1);
        }
    }

    /// <summary>Step size.</summary>
    public float LearningRate { get; set; }

    /// <summary>Moment decay rates and the denominator's epsilon.</summary>
    public float Beta1 { get; }

    /// <inheritdoc cref="Beta1"/>
    public float Beta2 { get; }

    /// <inheritdoc cref="Beta1"/>
    public float Eps { get; }

    /// <summary>Steps taken so far (the t of the bias correction is Step after an update).</summary>
    public int Step { get; set; }

    /// <summary>First moments, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> M { get; }

    /// <summary>Second moments, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> V { get; }

    /// <summary>One Adam step on every parameter that has a gradient.</summary>
    public void Update()
    {
        Step++;
        for (int i = 0; i < _parameters.Count; i++)
        {
            if (_parameters[i].Grad is { } g)
            {
                Optim.Adam(_parameters[i].Value, g, M[i], V[i], LearningRate, Beta1, Beta2, Eps, Step);
            }
        }
    }

    /// <summary>
    /// Clips the global gradient norm as torch.nn.utils.clip_grad_norm_: with
    /// norm = sqrt(Σ_p Σ g²), gradients are scaled by maxNorm / (norm + 1e-6) when that is below 1.
    /// Returns the norm before clipping (one device read).
    /// </summary>
    public float ClipGradNorm(float maxNorm)
    {
        var parameters = _parameters;
        if (_normTotal is not { } total || _normPart is not { } part)
        {
            return 0;
        }
        total.Zero();
        for (int i = 0; i < parameters.Count; i++)
        {
            if (parameters[i].Grad is { } g)
            {
                Reduce.SumSquares(g, part);
                Elementwise.Accumulate(total, part);
            }
        }
        Span<float> host = stackalloc float[1];
        total.CopyTo(host);
        float norm = MathF.Sqrt(host[0]);
        float scale = maxNorm / (norm + 1e-6f);
        if (scale < 1f)
        {
            for (int i = 0; i < parameters.Count; i++)
            {
                if (parameters[i].Grad is { } g)
                {
                    Elementwise.Scale(g, scale, g);
                }
            }
        }
        return norm;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        foreach (var t in M.Concat(V))
        {
            t.Dispose();
        }
        _normTotal?.Dispose();
        _normPart?.Dispose();
    }
}

/// <summary>An exponential moving average of the weights: e = decay·e + (1 - decay)·p after each step.</summary>
public sealed class Ema : IDisposable
{
    private readonly IReadOnlyList<Parameter> _parameters;

    /// <summary>Starts as a copy of the current weights.</summary>
    public Ema(IReadOnlyList<Parameter> parameters, float decay)
    {
        if (decay is < 0 or >= 1)
        {
            throw new ArgumentException($"ema decay {decay} must be in [0, 1)");
        }
        _parameters = parameters;
        Decay = decay;
        Weights = parameters.Select(p =>
        {
            var t = p.Value.EmptyLike();
            t.CopyFrom(p.Value);
            return t;
        }).ToArray();
    }

    /// <summary>The decay per step.</summary>
    public float Decay { get; }

    /// <summary>The averaged weights, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> Weights { get; }

    /// <summary>e = decay·e + (1 - decay)·p for every parameter.</summary>
    public void Update()
    {
        for (int i = 0; i < _parameters.Count; i++)
        {
            Optim.Ema(Weights[i], _parameters[i].Value, Decay);
        }
    }

    /// <summary>Copies the averaged weights into the model's parameters (for sampling).</summary>
    public void CopyToModel()
    {
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
    }
}
