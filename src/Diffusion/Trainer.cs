using System.Globalization;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>What a training run is: the recipe's knobs. Defaults are the seed's recipe.</summary>
public sealed record TrainOptions
{
    /// <summary>tiny, small or base.</summary>
    public string Preset { get; init; } = "base";

    /// <summary>Passes over the 60,000 training digits.</summary>
    public int Epochs { get; init; } = 3;

    /// <summary>Stop after this many steps in all (0: no limit).</summary>
    public long MaxSteps { get; init; }

    /// <summary>Digits per step.</summary>
    public int Batch { get; init; } = 64;

    /// <summary>Adam's learning rate.</summary>
    public float Lr { get; init; } = 1e-3f;

    /// <summary>linear or cosine.</summary>
    public string Schedule { get; init; } = "linear";

    /// <summary>Diffusion steps T.</summary>
    public int DiffusionSteps { get; init; } = 300;

    /// <summary>EMA decay of the weights (0: no EMA).</summary>
    public float EmaDecay { get; init; }

    /// <summary>Gradient-norm clipping (0: none).</summary>
    public float Clip { get; init; }

    /// <summary>Seed of the weights, the shuffling, the timesteps and the noise.</summary>
    public ulong Seed { get; init; }

    /// <summary>The options as checkpoint metadata.</summary>
    public Dictionary<string, string> ToMetadata() => new()
    {
        ["preset"] = Preset,
        ["epochs"] = Epochs.ToString(CultureInfo.InvariantCulture),
        ["max_steps"] = MaxSteps.ToString(CultureInfo.InvariantCulture),
        ["batch"] = Batch.ToString(CultureInfo.InvariantCulture),
        ["lr"] = Lr.ToString("R", CultureInfo.InvariantCulture),
        ["schedule"] = Schedule,
        ["T"] = DiffusionSteps.ToString(CultureInfo.InvariantCulture),
        ["ema"] = EmaDecay.ToString("R", CultureInfo.InvariantCulture),
        ["clip"] = Clip.ToString("R", CultureInfo.InvariantCulture),
        ["seed"] = Seed.ToString(CultureInfo.InvariantCulture),
    };

    /// <summary>Options read back from checkpoint metadata; a missing or malformed key is an error naming it.</summary>
    public static TrainOptions FromMetadata(IReadOnlyDictionary<string, string> m, string label)
    {
        string Get(string key) => m.TryGetValue(key, out var v) ? v : throw new CheckpointException($"{label}: metadata lacks '{key}' (not a training checkpoint?)");
        T Parse<T>(string key) where T : IParsable<T> =>
            T.TryParse(Get(key), CultureInfo.InvariantCulture, out var v) ? v : throw new CheckpointException($"{label}: metadata '{key}' = '{Get(key)}' is malformed");
        return new TrainOptions
        {
            Preset = Get("preset"),
            Epochs = Parse<int>("epochs"),
            MaxSteps = Parse<long>("max_steps"),
            Batch = Parse<int>("batch"),
            Lr = Parse<float>("lr"),
            Schedule = Get("schedule"),
            DiffusionSteps = Parse<int>("T"),
            EmaDecay = Parse<float>("ema"),
            Clip = Parse<float>("clip"),
            Seed = Parse<ulong>("seed"),
        };
    }
}

/// <summary>Training loss became NaN or infinite: the message names the step.</summary>
public sealed class TrainingDivergedException(string message) : Exception(message);

/// <summary>
/// DDPM training (Ho et al. 2020, algorithm 1) on MNIST: per step, a batch of digits x0 from the
/// epoch's shuffle, t uniform in 0..T-1, eps ~ N(0, I), x_t = sqrt(ābar_t)·x0 + sqrt(1-ābar_t)·eps,
/// loss = mean((eps - eps_theta(x_t, t))²), then backward, optional clipping, Adam, optional EMA.
/// Every random draw is a pure function of (seed, step): the shuffle of epoch e, the timesteps and
/// noise of step s. So a run resumed from a checkpoint at step s continues exactly as the
/// uninterrupted run would have.
/// </summary>
public sealed class Trainer : IDisposable
{
    private const ulong ShuffleStream = 1, TimestepStream = 2, NoiseStream = 3;
    private readonly MnistSet _data;
    private readonly Tensor _x0, _eps, _xt, _ca, _cb, _t;
    private readonly float[] _hostBatch, _hostCa, _hostCb, _hostT, _hostLoss = new float[1];
    private readonly Tape _tape;
    private int[] _order = [];
    private int _orderEpoch = -1;

    /// <summary>A fresh run: weights from the seed, Adam and EMA at their start.</summary>
    public Trainer(Device device, TrainOptions options, MnistSet data)
    {
        if (options.Batch < 1 || options.Batch > data.Count)
        {
            throw new ArgumentException($"batch {options.Batch} must be between 1 and {data.Count}");
        }
        if (options.Epochs < 1 || options.MaxSteps < 0)
        {
            throw new ArgumentException($"epochs ({options.Epochs}) must be at least 1 and max steps ({options.MaxSteps}) not negative");
        }
        if (!(options.Lr > 0) || float.IsInfinity(options.Lr))
        {
            throw new ArgumentException($"learning rate {options.Lr} must be positive");
        }
        if (options.Clip < 0)
        {
            throw new ArgumentException($"clip {options.Clip} must not be negative");
        }
        Options = options;
        _data = data;
        Device = device;
        Schedule = NoiseSchedule.ByName(options.Schedule, options.DiffusionSteps);
        Model = new UNet(Presets.Channels(options.Preset), device, options.Seed);
        Adam = new Adam(Model.Parameters, options.Lr);
        Ema = options.EmaDecay > 0 ? new Ema(Model.Parameters, options.EmaDecay) : null;
        int b = options.Batch;
        _x0 = Tensor.Empty(device, b, 1, 28, 28);
        _eps = Tensor.Empty(device, b, 1, 28, 28);
        _xt = Tensor.Empty(device, b, 1, 28, 28);
        _ca = Tensor.Empty(device, b);
        _cb = Tensor.Empty(device, b);
        _t = Tensor.Empty(device, b);
        _tape = new Tape(device);
        _hostBatch = new float[b * MnistSet.Pixels];
        (_hostCa, _hostCb, _hostT) = (new float[b], new float[b], new float[b]);
    }

    /// <summary>The run's options.</summary>
    public TrainOptions Options { get; }

    /// <summary>Where the model trains.</summary>
    public Device Device { get; }

    /// <summary>The noise schedule.</summary>
    public NoiseSchedule Schedule { get; }

    /// <summary>The network.</summary>
    public UNet Model { get; }

    /// <summary>The optimiser.</summary>
    public Adam Adam { get; }

    /// <summary>The weight average, when the run keeps one.</summary>
    public Ema? Ema { get; }

    /// <summary>Steps done so far.</summary>
    public long Step { get; private set; }

    /// <summary>Full batches per epoch (the last partial batch is dropped).</summary>
    public int StepsPerEpoch => _data.Count / Options.Batch;

    /// <summary>The epoch the next step belongs to (0-based).</summary>
    public int Epoch => (int)(Step / StepsPerEpoch);

    /// <summary>Steps the run makes in all: its epochs, capped by max steps.</summary>
    public long TotalSteps => Options.MaxSteps > 0 ? Math.Min(Options.MaxSteps, (long)Options.Epochs * StepsPerEpoch) : (long)Options.Epochs * StepsPerEpoch;

    /// <summary>True when every step of the run is done.</summary>
    public bool Finished => Step >= TotalSteps;

    /// <summary>The global gradient norm of the last step (before clipping), when clipping is on.</summary>
    public float LastGradNorm { get; private set; } = float.NaN;

    /// <summary>One training step; returns its loss. Throws <see cref="TrainingDivergedException"/> on NaN.</summary>
    public float TrainStep()
    {
        int b = Options.Batch, epoch = Epoch, j = (int)(Step % StepsPerEpoch);
        var prepare = Tape.Profile?.Time("batch (data, noise, x_t)", Device) ?? default;
        var order = Order(epoch);
        for (int n = 0; n < b; n++)
        {
            _data.CopyImage(order[j * b + n], _hostBatch.AsSpan(n * MnistSet.Pixels, MnistSet.Pixels));
            int t = (int)Math.Min(Schedule.T - 1, (long)(Philox.Uniform(Philox.Key(Options.Seed, TimestepStream), (ulong)(Step * b + n)) * Schedule.T));
            _hostT[n] = t;
            _hostCa[n] = (float)Math.Sqrt(Schedule.AlphaBars[t]);
            _hostCb[n] = (float)Math.Sqrt(1 - Schedule.AlphaBars[t]);
        }
        _x0.CopyFrom(_hostBatch);
        _t.CopyFrom(_hostT);
        _ca.CopyFrom(_hostCa);
        _cb.CopyFrom(_hostCb);
        RandomFill.Normal(_eps, Philox.Key(Options.Seed, NoiseStream), (ulong)Step * (ulong)_eps.Length);
        Elementwise.Combine(_x0, _ca, _eps, _cb, _xt);
        Model.ZeroGrad();
        prepare.Dispose();

        // One tape for the whole run, reset after each step: its intermediates go back to the pool, and the next step
        // reuses its bookkeeping objects, so a step allocates no managed memory.
        float loss;
        try
        {
            var pred = Model.Forward(_tape, _tape.Constant(_xt), _tape.Constant(_t));
            var l = _tape.MseLoss(pred, _tape.Constant(_eps));
            l.Value.CopyTo(_hostLoss);
            loss = _hostLoss[0];
            if (!float.IsFinite(loss))
            {
                throw new TrainingDivergedException($"loss is {loss} at step {Step} (epoch {epoch + 1}); try a lower --lr or --clip 1");
            }
            _tape.Backward(l);
        }
        finally
        {
            _tape.Reset();
        }
        using var update = Tape.Profile?.Time("clip, adam, ema", Device) ?? default;
        if (Options.Clip > 0)
        {
            LastGradNorm = Adam.ClipGradNorm(Options.Clip);
        }
        Adam.Update();
        Ema?.Update();
        Step++;
        return loss;
    }

    /// <summary>The epoch's permutation of the training digits (Fisher-Yates on the shuffle stream).</summary>
    private int[] Order(int epoch)
    {
        if (_orderEpoch == epoch)
        {
            return _order;
        }
        if (_order.Length != _data.Count)
        {
            _order = new int[_data.Count];
        }
        var order = _order;
        for (int i = 0; i < order.Length; i++)
        {
            order[i] = i;
        }
        ulong key = Philox.Key(Options.Seed, ShuffleStream), start = (ulong)epoch * (ulong)_data.Count;
        for (int i = order.Length - 1; i > 0; i--)
        {
            int k = (int)(Philox.Bits(key, start + (ulong)i) % (uint)(i + 1));
            (order[i], order[k]) = (order[k], order[i]);
        }
        _orderEpoch = epoch;
        return order;
    }

    /// <summary>Writes model, Adam, EMA and the run's options and position, atomically.</summary>
    public void Save(string path)
    {
        var meta = Options.ToMetadata();
        meta["step"] = Step.ToString(CultureInfo.InvariantCulture);
        meta["epoch"] = Epoch.ToString(CultureInfo.InvariantCulture);
        Checkpoint.Save(path, Model, Adam, Ema, meta);
    }

    /// <summary>
    /// Continues the run saved in <paramref name="path"/>: its options (but the epochs and the step
    /// cap, which <paramref name="extend"/> may raise), its weights, Adam and EMA, and its step.
    /// </summary>
    public static Trainer Resume(Device device, string path, MnistSet data, Func<TrainOptions, TrainOptions>? extend = null)
    {
        var file = SafeTensors.Read(path);
        var options = TrainOptions.FromMetadata(file.Metadata, path);
        options = extend?.Invoke(options) ?? options;
        if (!long.TryParse(file.Metadata.GetValueOrDefault("step"), NumberStyles.None, CultureInfo.InvariantCulture, out long step))
        {
            throw new CheckpointException($"{path}: metadata lacks a valid 'step'");
        }
        var trainer = new Trainer(device, options, data);
        try
        {
            Checkpoint.Load(path, trainer.Model, trainer.Adam, trainer.Ema);
            trainer.Step = step;
            return trainer;
        }
        catch
        {
            trainer.Dispose();
            throw;
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _tape.Dispose();
        foreach (var t in new[] { _x0, _eps, _xt, _ca, _cb, _t })
        {
            t.Dispose();
        }
        Adam.Dispose();
        Ema?.Dispose();
        foreach (var p in Model.Parameters)
        {
            p.Value.Dispose();
            p.Grad?.Dispose();
        }
    }
}
