using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// Adam (torch.optim.Adam, no weight decay) over a model's parameters, with its first and second
/// moments on the parameters' device. <see cref="Update"/> takes one bias-corrected step;
/// <see cref="QueueStep"/> takes one that the device may skip, without the host waiting for it. Over a flat
/// <see cref="ParameterSet"/> the moments are flat too (M and V hold views) and a step is one launch.
/// </summary>
public sealed class Adam : IDisposable
{
    private readonly IReadOnlyList<Parameter> _parameters;
    private readonly ParameterSet? _flat; // set when the parameters are views of one buffer
    private readonly Tensor? _mFlat, _vFlat;
    private readonly Tensor? _normTotal, _normPart; // [1] each, for clipping
    private readonly Tensor? _state, _stateStep; // [Optim.StateLength] for QueueStep, and its t
    private readonly int[] _offsets = [];
    private int _step;
    private bool _stepChanged = true;

    /// <summary>Moments start at zero; the spec's defaults are β1 0.9, β2 0.999, eps 1e-8.</summary>
    public Adam(IReadOnlyList<Parameter> parameters, float lr = 1e-3f, float beta1 = 0.9f, float beta2 = 0.999f, float eps = 1e-8f)
    {
        _parameters = parameters;
        LearningRate = lr;
        (Beta1, Beta2, Eps) = (beta1, beta2, eps);
        if (parameters is ParameterSet { IsFlat: true } flat)
        {
            _flat = flat;
            _mFlat = Tensor.Zeros(flat.Values.Device, flat.Length);
            _vFlat = Tensor.Zeros(flat.Values.Device, flat.Length);
            M = Enumerable.Range(0, flat.Count).Select(i => _mFlat.Slice(flat.OffsetOf(i), flat[i].Shape)).ToArray();
            V = Enumerable.Range(0, flat.Count).Select(i => _vFlat.Slice(flat.OffsetOf(i), flat[i].Shape)).ToArray();
        }
        else
        {
            M = parameters.Select(p => p.Value.ZerosLike()).ToArray();
            V = parameters.Select(p => p.Value.ZerosLike()).ToArray();
        }
        if (parameters.Count > 0)
        {
            var device = parameters[0].Value.Device;
            _normTotal = Tensor.Empty(device, 1);
            _normPart = Tensor.Empty(device, 1);
            _state = Tensor.Zeros(device, Optim.StateLength);
            _stateStep = _state.Slice(0, 1);
            _offsets = new int[parameters.Count];
            for (int i = 1; i < parameters.Count; i++)
            {
                _offsets[i] = _offsets[i - 1] + parameters[i - 1].Length;
            }
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

    /// <summary>Steps taken so far (the t of the bias correction is Step after an update). Steps queued by
    /// <see cref="QueueStep"/> count once their owner reads them back and reports them with <see cref="Applied"/>.</summary>
    public int Step
    {
        get => _step;
        set
        {
            _step = value;
            _stepChanged = true; // the device's copy of t is set again before the next queued step
        }
    }

    /// <summary>The device-side state of the queued steps: t, the bias corrections, the clip scale, skip (see <see cref="Optim.PrepareStep"/>).
    /// The EMA of a queued step reads its skip flag.</summary>
    public Tensor State => _state ?? throw new InvalidOperationException("adam over no parameters has no state");

    /// <summary>Counts <paramref name="steps"/> steps that <see cref="QueueStep"/> queued and the device applied (not skipped),
    /// once they were read back; the device counted them already.</summary>
    public void Applied(int steps) => _step += steps;

    /// <summary>
    /// Queues one step that the host does not wait for: flags a non-finite gradient into <paramref name="flag"/> (a [1] view of
    /// <paramref name="record"/>[1], zero before), clips to <paramref name="clip"/> when it is above 0 (the norm reduced on the
    /// device), then on the device skips the step when record[0] (the loss) or a gradient is not finite, and otherwise
    /// takes the Adam step with t counted on the device. <paramref name="record"/> [<see cref="Optim.RecordLength"/>] gets
    /// Σg² and whether the step was skipped. Over a flat set: flag, norm (2), prepare, Adam: five launches at most.
    /// </summary>
    public void QueueStep(Tensor record, Tensor flag, float clip)
    {
        if (_state is null || _stateStep is null || _normTotal is null || _normPart is null)
        {
            return;
        }
        if (_stepChanged)
        {
            Elementwise.Fill(_stateStep, _step);
            _stepChanged = false;
        }
        if (_flat is not null)
        {
            Optim.FlagNonFinite(_flat.Grads!, flag, 0);
            if (clip > 0)
            {
                Reduce.SumSquares(_flat.Grads!, _normTotal);
            }
        }
        else
        {
            for (int i = 0; i < _parameters.Count; i++)
            {
                if (_parameters[i].Grad is { } g)
                {
                    Optim.FlagNonFinite(g, flag, _offsets[i]);
                }
            }
            if (clip > 0)
            {
                SumSquares(_normTotal, _normPart);
            }
        }
        Optim.PrepareStep(_state, record, clip > 0 ? _normTotal : null, clip, Beta1, Beta2);
        var settings = new Optim.AdamSettings(LearningRate, Beta1, Beta2, Eps);
        if (_flat is not null)
        {
            Optim.Adam(_flat.Values!, _flat.Grads!, _mFlat!, _vFlat!, settings, _state);
            return;
        }
        for (int i = 0; i < _parameters.Count; i++)
        {
            if (_parameters[i].Grad is { } g)
            {
                Optim.Adam(_parameters[i].Value, g, M[i], V[i], settings, _state);
            }
        }
    }

    // total = Σ_p Σ g², one parameter at a time in order (the order ClipGradNorm always summed in).
    private void SumSquares(Tensor total, Tensor part)
    {
        total.Zero();
        for (int i = 0; i < _parameters.Count; i++)
        {
            if (_parameters[i].Grad is { } g)
            {
                Reduce.SumSquares(g, part);
                Elementwise.Accumulate(total, part);
            }
        }
    }

    /// <summary>First moments, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> M { get; }

    /// <summary>Second moments, one per parameter, in parameter order.</summary>
    public IReadOnlyList<Tensor> V { get; }

    /// <summary>One Adam step on every parameter that has a gradient.</summary>
    public void Update()
    {
        Step++;
        if (_flat is not null)
        {
            Optim.Adam(_flat.Values!, _flat.Grads!, _mFlat!, _vFlat!, LearningRate, Beta1, Beta2, Eps, Step);
            return;
        }
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
    /// Returns the norm before clipping (one device read). The reference of <see cref="QueueStep"/>'s clipping, which
    /// training uses; internal: the tests compare the two.
    /// </summary>
    internal float ClipGradNorm(float maxNorm)
    {
        var parameters = _parameters;
        if (_normTotal is not { } total || _normPart is not { } part)
        {
            return 0;
        }
        SumSquares(total, part);
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
        _mFlat?.Dispose();
        _vFlat?.Dispose();
        _normTotal?.Dispose();
        _normPart?.Dispose();
        _state?.Dispose();
    }
}
