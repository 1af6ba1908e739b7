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

    /// <summary>Steps of linear learning-rate warm-up from 0 to <see cref="Lr"/> (0: none).</summary>
    public int Warmup { get; init; }

    /// <summary>After the warm-up: constant (the seed's) or cosine (half a cosine from <see cref="Lr"/> down to
    /// <see cref="Trainer.CosineFloor"/> of it at the run's last step).</summary>
    public string LrDecay { get; init; } = "constant";

    /// <summary>linear or cosine.</summary>
    public string Schedule { get; init; } = "linear";

    /// <summary>Diffusion steps T.</summary>
    public int DiffusionSteps { get; init; } = 300;

    /// <summary>EMA decay of the weights (0: no EMA); with <see cref="EmaWarmup"/> the cap of a warm-up.</summary>
    public float EmaDecay { get; init; }

    /// <summary>Power of the EMA's warm-up (0: none, <see cref="EmaDecay"/> from the first step): the k-th update of the
    /// average takes min(EmaDecay, 1 - (1 + k)^-EmaWarmup) (see <see cref="EmaSchedule"/>).</summary>
    public float EmaWarmup { get; init; }

    /// <summary>Gradient-norm clipping (0: none).</summary>
    public float Clip { get; init; }

    /// <summary>Min-SNR-γ weighting (Hang et al. 2023; 0: none, every timestep alike): timestep t counts with weight
    /// min(SNR_t, γ)/SNR_t, the eps-prediction form, drawn by importance (see <see cref="TimestepSampler"/>).</summary>
    public float MinSnr { get; init; }

    /// <summary>Seed of the weights, the shuffling, the timesteps and the noise.</summary>
    public ulong Seed { get; init; }

    /// <summary>0 for the unconditional model, 10 for the class-conditional one (trained on the digits' labels,
    /// each dropped to "no label" with probability <see cref="Trainer.LabelDropProbability"/>).</summary>
    public int Classes { get; init; }

    /// <summary>
    /// What is wrong with these options, as (metadata key, flag, problem) triples; empty when they
    /// make a valid run. The one place the ranges live: the command line reports a problem by its
    /// flag, a checkpoint's metadata by its key.
    /// </summary>
    public IEnumerable<(string Key, string Flag, string Problem)> Problems()
    {
        if (Presets.NameOf(Presets.ChannelsOrZero(Preset)) is null)
        {
            yield return ("preset", "--preset", $"'{Preset}' is not tiny, small or base");
        }
        if (Epochs is < 1 or > 1_000_000)
        {
            yield return ("epochs", "--epochs", $"{Epochs} must be in 1..1000000");
        }
        if (MaxSteps < 0)
        {
            yield return ("max_steps", "--max-steps", $"{MaxSteps} must not be negative");
        }
        if (Batch is < 1 or > MaxBatch)
        {
            yield return ("batch", "--batch", $"{Batch} must be in 1..{MaxBatch}");
        }
        if (!(Lr > 0) || !float.IsFinite(Lr))
        {
            yield return ("lr", "--lr", $"{Lr.ToString(CultureInfo.InvariantCulture)} must be a positive finite number");
        }
        if (Warmup is < 0 or > 10_000_000)
        {
            yield return ("warmup", "--warmup", $"{Warmup} must be in 0..10000000 steps");
        }
        if (LrDecay is not ("constant" or "cosine"))
        {
            yield return ("lr_decay", "--lr-decay", $"'{LrDecay}' is not constant or cosine");
        }
        if (Schedule is not ("linear" or "cosine"))
        {
            yield return ("schedule", "--schedule", $"'{Schedule}' is not linear or cosine");
        }
        if (DiffusionSteps is < 2 or > NoiseScheduleLimits.MaxT)
        {
            yield return ("T", "T", $"{DiffusionSteps} must be in 2..{NoiseScheduleLimits.MaxT}");
        }
        if (!(EmaDecay >= 0 && EmaDecay < 1))
        {
            yield return ("ema", "--ema", $"{EmaDecay.ToString(CultureInfo.InvariantCulture)} must be in [0, 1) (0: off)");
        }
        if (!(EmaWarmup >= 0 && EmaWarmup <= EmaSchedule.MaxPower))
        {
            yield return (EmaWarmupKey, "--ema-warmup", $"{EmaWarmup.ToString(CultureInfo.InvariantCulture)} must be in [0, {EmaSchedule.MaxPower.ToString(CultureInfo.InvariantCulture)}] (0: off)");
        }
        if (Classes is not (0 or Checkpoint.ConditionalClasses))
        {
            yield return (Checkpoint.ClassesKey, "--classes", $"{Classes} must be 0 (unconditional) or {Checkpoint.ConditionalClasses}");
        }
        if (!(MinSnr >= 0) || !(MinSnr <= 1000))
        {
            yield return (MinSnrKey, "--min-snr", $"{MinSnr.ToString(CultureInfo.InvariantCulture)} must be in [0, 1000] (0: off)");
        }
        if (!(Clip >= 0) || !float.IsFinite(Clip))
        {
            yield return ("clip", "--clip", $"{Clip.ToString(CultureInfo.InvariantCulture)} must be a finite number, 0 or more (0: off)");
        }
    }

    /// <summary>The metadata keys of the EMA's warm-up power and of the step the average started at (both absent in runs from before
    /// the warm-up: no warm-up, an average from step 0).</summary>
    public const string EmaWarmupKey = "ema_warmup", EmaStartKey = "ema_start";

    /// <summary>The metadata key of <see cref="MinSnr"/> (absent in runs from before it: 0, uniform timesteps).</summary>
    public const string MinSnrKey = "min_snr";

    /// <summary>The metadata key of <see cref="Recipe"/> (absent in runs from before it).</summary>
    public const string RecipeKey = "recipe";

    /// <summary>The recipe the run's defaults came from (<see cref="Diffusion.Recipe"/>'s name); its sampling is what the run's
    /// grid and, unless told otherwise, <c>sample</c> and <c>eval</c> use. Null when not recorded.</summary>
    public string? Recipe { get; init; }

    /// <summary>The largest batch a run may take (a step's activations grow with it; 4096 is far past any recipe).</summary>
    public const int MaxBatch = 4096;

    /// <summary>The options as checkpoint metadata.</summary>
    public Dictionary<string, string> ToMetadata() => new Dictionary<string, string>()
    {
        ["preset"] = Preset,
        ["epochs"] = Epochs.ToString(CultureInfo.InvariantCulture),
        ["max_steps"] = MaxSteps.ToString(CultureInfo.InvariantCulture),
        ["batch"] = Batch.ToString(CultureInfo.InvariantCulture),
        ["lr"] = Lr.ToString("R", CultureInfo.InvariantCulture),
        ["warmup"] = Warmup.ToString(CultureInfo.InvariantCulture),
        ["lr_decay"] = LrDecay,
        ["schedule"] = Schedule,
        ["T"] = DiffusionSteps.ToString(CultureInfo.InvariantCulture),
        ["ema"] = EmaDecay.ToString("R", CultureInfo.InvariantCulture),
        [EmaWarmupKey] = EmaWarmup.ToString("R", CultureInfo.InvariantCulture),
        [MinSnrKey] = MinSnr.ToString("R", CultureInfo.InvariantCulture),
        ["clip"] = Clip.ToString("R", CultureInfo.InvariantCulture),
        ["seed"] = Seed.ToString(CultureInfo.InvariantCulture),
        [Checkpoint.ClassesKey] = Classes.ToString(CultureInfo.InvariantCulture),
    }.With(RecipeKey, Recipe);

    /// <summary>Options read back from checkpoint metadata; a missing or malformed key is an error naming it.</summary>
    public static TrainOptions FromMetadata(IReadOnlyDictionary<string, string> m, string label)
    {
        string Get(string key) => m.TryGetValue(key, out var v) ? v : throw new CheckpointException($"{label}: metadata lacks '{key}' (not a training checkpoint?)");
        T Parse<T>(string key) where T : IParsable<T> =>
            T.TryParse(Get(key), CultureInfo.InvariantCulture, out var v) ? v : throw new CheckpointException($"{label}: metadata '{key}' = '{Get(key)}' is malformed");
        var options = new TrainOptions
        {
            Preset = Get("preset"),
            Epochs = Parse<int>("epochs"),
            MaxSteps = Parse<long>("max_steps"),
            Batch = Parse<int>("batch"),
            Lr = Parse<float>("lr"),
            // Runs from before learning-rate schedules existed have neither key: constant, no warm-up.
            Warmup = m.ContainsKey("warmup") ? Parse<int>("warmup") : 0,
            LrDecay = m.TryGetValue("lr_decay", out var decay) ? decay : "constant",
            Schedule = Get("schedule"),
            DiffusionSteps = Parse<int>("T"),
            EmaDecay = Parse<float>("ema"),
            // Runs from before the warm-up have no key: their average took the set decay from the first step.
            EmaWarmup = m.ContainsKey(EmaWarmupKey) ? Parse<float>(EmaWarmupKey) : 0f,
            MinSnr = m.ContainsKey(MinSnrKey) ? Parse<float>(MinSnrKey) : 0f,
            Clip = Parse<float>("clip"),
            Seed = Parse<ulong>("seed"),
            // Runs from before conditioning existed have no key: they are unconditional.
            Classes = m.ContainsKey(Checkpoint.ClassesKey) ? Parse<int>(Checkpoint.ClassesKey) : 0,
            Recipe = m.GetValueOrDefault(RecipeKey),
        };
        if (options.Recipe is { } recipe && !Diffusion.Recipe.Names.Contains(recipe))
        {
            throw new CheckpointException($"{label}: metadata '{RecipeKey}' = '{recipe}' is not a recipe ({string.Join(", ", Diffusion.Recipe.Names)})");
        }
        foreach (var (key, _, problem) in options.Problems())
        {
            throw new CheckpointException($"{label}: metadata '{key}' = '{Get(key)}': {problem}");
        }
        return options;
    }
}

/// <summary>One training step as read back: its number (1-based, as <see cref="Trainer.Step"/> after it), its loss, why the
/// optimizer skipped it (null when it did not), the gradient norm before clipping and Adam's learning rate as of that step
/// (a skipped step keeps the previous step's; the norm is NaN without clipping).</summary>
public readonly record struct StepResult(long Step, float Loss, string? Skip, float GradNorm, float Lr);

/// <summary>Small helpers for metadata dictionaries.</summary>
internal static class MetadataExtensions
{
    /// <summary>The dictionary with <paramref name="key"/> set to <paramref name="value"/> when it is not null.</summary>
    public static Dictionary<string, string> With(this Dictionary<string, string> m, string key, string? value)
    {
        if (value is not null)
        {
            m[key] = value;
        }
        return m;
    }
}

/// <summary>Settings that cannot be used: a flag's value out of its range, or a change that --resume cannot make. The message names the flag.</summary>
public sealed class UsageException(string message) : ArgumentException(message);

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
    private const ulong ShuffleStream = 1, TimestepStream = 2, NoiseStream = 3, LabelDropStream = 4;

    /// <summary>The chance that a conditional run trains a digit as "no label" (classifier-free guidance's dropout).</summary>
    public const float LabelDropProbability = 0.1f;

    private readonly MnistSet _data;
    private readonly Tensor _x0, _eps, _xt, _ca, _cb, _t, _labels;
    // The queued steps' records [ReadEvery, 4] (loss, non-finite flag, Σg², skipped; see Optim) with each slot's views,
    // their host copy, and per slot the page-locked batch the device copies from (x0, t, labels, ca, cb).
    private readonly Tensor _records;
    private readonly Tensor[] _recordOf, _lossOf, _flagOf;
    private readonly float[] _hostRecords;
    private readonly HostBuffer[][] _staged;
    private readonly List<StepResult> _results;
    private int _pending;
    private float _appliedLr;
    private readonly List<string> _changes = [];
    private readonly Tape _tape;
    private int[] _order = [];
    private int _orderEpoch = -1;

    /// <summary>A fresh run: weights from the seed, Adam and EMA at their start.</summary>
    public Trainer(Device device, TrainOptions options, MnistSet data)
    {
        foreach (var (_, flag, problem) in options.Problems())
        {
            throw new UsageException($"{flag} {problem}");
        }
        if (options.Batch > data.Count)
        {
            throw new UsageException($"--batch {options.Batch} is more than the {data.Count} training images");
        }
        if (options.Classes > 0 && data.Labels.Length < data.Count)
        {
            throw new UsageException($"--classes {options.Classes} needs a label for every training image; the data set has {data.Labels.Length} for {data.Count}");
        }
        Options = options;
        _data = data;
        Device = device;
        Schedule = NoiseSchedule.ByName(options.Schedule, options.DiffusionSteps);
        Timesteps = new TimestepSampler(Schedule, options.MinSnr);
        Model = new UNet(Presets.Channels(options.Preset), device, options.Seed, options.Classes);
        Adam = new Adam(Model.Parameters, options.Lr);
        _appliedLr = options.Lr;
        Ema = options.EmaDecay > 0 ? new Ema(Model.Parameters, options.EmaDecay) : null;
        int b = options.Batch;
        _x0 = Tensor.Empty(device, b, 1, 28, 28);
        _eps = Tensor.Empty(device, b, 1, 28, 28);
        _xt = Tensor.Empty(device, b, 1, 28, 28);
        _ca = Tensor.Empty(device, b);
        _cb = Tensor.Empty(device, b);
        _t = Tensor.Empty(device, b);
        _labels = Tensor.Empty(device, b);
        _tape = new Tape(device);
        int w = ReadEvery;
        _records = Tensor.Zeros(device, w, Optim.RecordLength);
        _recordOf = [.. Enumerable.Range(0, w).Select(k => _records.Slice(k * Optim.RecordLength, Optim.RecordLength))];
        _lossOf = [.. Enumerable.Range(0, w).Select(k => _records.Slice(k * Optim.RecordLength, 1))];
        _flagOf = [.. Enumerable.Range(0, w).Select(k => _records.Slice(k * Optim.RecordLength + 1, 1))];
        _hostRecords = new float[w * Optim.RecordLength];
        _staged = [.. Enumerable.Range(0, w).Select(_ => new[] { b * MnistSet.Pixels, b, b, b, b }.Select(device.AllocateHost).ToArray())];
        _results = new List<StepResult>(w);
    }

    /// <summary>The checkpoint's key of the training set's hash (<see cref="MnistSet.Hash"/>); absent in runs from before it,
    /// which resume on any data of their size and record it from then on.</summary>
    public const string DataHashKey = MnistSet.HashKey;

    /// <summary>Steps <see cref="QueueStep"/> may queue before <see cref="ReadBack"/> must read them (the device keeps one record each).</summary>
    public const int ReadEvery = 10;

    /// <summary>Steps queued and not read back yet.</summary>
    public int Pending => _pending;

    /// <summary>The run's options.</summary>
    public TrainOptions Options { get; }

    /// <summary>Where the model trains.</summary>
    public Device Device { get; }

    /// <summary>The noise schedule.</summary>
    public NoiseSchedule Schedule { get; }

    /// <summary>How a step's timesteps are drawn: uniform, or by min-SNR-γ importance.</summary>
    public TimestepSampler Timesteps { get; }

    /// <summary>The network.</summary>
    public UNet Model { get; }

    /// <summary>The optimiser.</summary>
    public Adam Adam { get; }

    /// <summary>The weight average, when the run keeps one.</summary>
    public Ema? Ema { get; }

    /// <summary>The step at which the average started: 0, or the step of the resume that switched EMA on.</summary>
    public long EmaStart { get; private set; }

    /// <summary>The decay each step's EMA update takes (its warm-up counted from <see cref="EmaStart"/>).</summary>
    public EmaSchedule EmaSchedule => new(Options.EmaDecay, Options.EmaWarmup, EmaStart);

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

    /// <summary>Steps the optimizer skipped because the loss or a gradient was not finite (their data was consumed).</summary>
    public long Skipped { get; private set; }

    /// <summary>Why the last step was skipped (it names the step and the first parameter whose gradient went non-finite), or null.</summary>
    public string? LastSkip { get; private set; }

    /// <summary>Skipped steps in a row after which training stops as diverged.</summary>
    public const int MaxConsecutiveSkips = 5;

    private int _consecutiveSkips;

    /// <summary>Changes made to the run's options on resume, each as "step S: key old -> new".</summary>
    public IReadOnlyList<string> Changes => _changes;

    /// <summary>
    /// One training step, read back at once; returns its loss. When the loss or any gradient is NaN or infinite the
    /// optimizer skips the step (weights, Adam and EMA unchanged, so no checkpoint ever holds such
    /// values), <see cref="LastSkip"/> says why, and the loss is returned as it was. After
    /// <see cref="MaxConsecutiveSkips"/> such steps in a row it throws
    /// <see cref="TrainingDivergedException"/>.
    /// </summary>
    public float TrainStep()
    {
        QueueStep();
        return ReadBack()[0].Loss;
    }

    /// <summary>
    /// Queues one training step on the device without waiting for it: the batch is uploaded from page-locked memory,
    /// the loss is kept on the device, and the optimizer skips a non-finite step there (see <see cref="Adam.QueueStep"/>).
    /// At most <see cref="ReadEvery"/> steps can be queued before <see cref="ReadBack"/>; <see cref="Step"/> counts them at once.
    /// </summary>
    public void QueueStep()
    {
        if (_pending == ReadEvery)
        {
            throw new InvalidOperationException($"{ReadEvery} steps are queued: read them back first");
        }
        int slot = _pending, b = Options.Batch, epoch = Epoch, j = (int)(Step % StepsPerEpoch);
        var prepare = Tape.Profile?.Time("batch (data, noise, x_t)", Device) ?? default;
        var order = Order(epoch);
        var staged = _staged[slot];
        Span<float> pixels = staged[0].Span, ts = staged[1].Span, labels = staged[2].Span, ca = staged[3].Span, cb = staged[4].Span;
        for (int n = 0; n < b; n++)
        {
            _data.CopyImage(order[j * b + n], pixels.Slice(n * MnistSet.Pixels, MnistSet.Pixels));
            int t = Timesteps.At(Philox.Uniform(Philox.Key(Options.Seed, TimestepStream), (ulong)(Step * b + n)));
            ts[n] = t;
            ca[n] = (float)Math.Sqrt(Schedule.AlphaBars[t]);
            cb[n] = (float)Math.Sqrt(1 - Schedule.AlphaBars[t]);
            if (Options.Classes > 0)
            {
                // The drop is a pure function of (seed, step, n), like the timesteps: a resumed run drops the same labels.
                bool drop = Philox.Uniform(Philox.Key(Options.Seed, LabelDropStream), (ulong)(Step * b + n)) < LabelDropProbability;
                labels[n] = drop ? Model.NullLabel : _data.Labels[order[j * b + n]];
            }
        }
        // Asynchronous: the slot's page-locked memory is not written again before the read-back has synchronised.
        _x0.CopyFromAsync(staged[0]);
        _t.CopyFromAsync(staged[1]);
        if (Options.Classes > 0)
        {
            _labels.CopyFromAsync(staged[2]);
        }
        _ca.CopyFromAsync(staged[3]);
        _cb.CopyFromAsync(staged[4]);
        RandomFill.Normal(_eps, Philox.Key(Options.Seed, NoiseStream), (ulong)Step * (ulong)_eps.Length);
        Elementwise.Combine(_x0, _ca, _eps, _cb, _xt);
        Model.ZeroGrad();
        prepare.Dispose();

        // One tape for the whole run, reset after each step: its intermediates go back to the pool, and the next step
        // reuses its bookkeeping objects, so a step allocates no managed memory.
        try
        {
            var pred = Model.Forward(_tape, _tape.Constant(_xt), _tape.Constant(_t), Options.Classes > 0 ? _tape.Constant(_labels) : null);
            var l = _tape.MseLoss(pred, _tape.Constant(_eps));
            _lossOf[slot].CopyFrom(l.Value); // stays on the device until the read-back
            _tape.Backward(l);
        }
        finally
        {
            _tape.Reset();
        }
        using (Tape.Profile?.Time("clip, adam, ema", Device) ?? default)
        {
            Adam.LearningRate = LearningRateAt(Step);
            Adam.QueueStep(_recordOf[slot], _flagOf[slot], Options.Clip);
            Ema?.QueueUpdate(Adam.State, EmaSchedule.At(Step));
        }
        _pending++;
        Step++;
    }

    /// <summary>Where a cosine decay ends, as a share of the peak learning rate.</summary>
    public const float CosineFloor = 0.1f;

    /// <summary>
    /// The learning rate of step <paramref name="step"/> (0-based): a linear warm-up over
    /// <see cref="TrainOptions.Warmup"/> steps, then <see cref="TrainOptions.Lr"/>, constant or
    /// decayed by half a cosine to <see cref="CosineFloor"/> of it at the run's last step. A pure
    /// function of the step and the options, so a resumed run follows the same curve (a changed
    /// <c>--epochs</c> or <c>--lr</c> reshapes it from there on).
    /// </summary>
    public float LearningRateAt(long step)
    {
        double lr = Options.Lr;
        if (step < Options.Warmup)
        {
            return (float)(lr * (step + 1) / Options.Warmup);
        }
        if (Options.LrDecay == "cosine")
        {
            long span = Math.Max(1, TotalSteps - 1 - Options.Warmup);
            double progress = Math.Clamp((double)(step - Options.Warmup) / span, 0, 1);
            lr *= CosineFloor + (1 - CosineFloor) * 0.5 * (1 + Math.Cos(Math.PI * progress));
        }
        return (float)lr;
    }


    /// <summary>The steps the last <see cref="ReadBack"/> read, in order: also when it threw <see cref="TrainingDivergedException"/>
    /// (then up to and including the step that ended the run), so a caller can still record them.</summary>
    public IReadOnlyList<StepResult> LastRead => _results;

    /// <summary>
    /// Reads the queued steps' losses and skip flags in one device read and returns them in order (the list is reused by
    /// the next call). A skipped step gets its reason, also in <see cref="LastSkip"/>, and counts in <see cref="Skipped"/>;
    /// <see cref="MaxConsecutiveSkips"/> in a row throw <see cref="TrainingDivergedException"/>.
    /// </summary>
    public IReadOnlyList<StepResult> ReadBack()
    {
        _results.Clear();
        if (_pending == 0)
        {
            return _results;
        }
        int count = _pending, applied = 0;
        _pending = 0;
        _records.CopyTo(_hostRecords);
        _records.Zero(); // the flags start at zero for the next steps (queued, no wait)
        long first = Step - count;
        try
        {
            for (int k = 0; k < count; k++)
            {
                var r = _hostRecords.AsSpan(k * Optim.RecordLength, Optim.RecordLength);
                float loss = r[0];
                long step = first + k;
                if (r[3] != 0)
                {
                    int bad = Optim.FirstFlagged(r[1]);
                    LastSkip = $"step {step} (epoch {step / StepsPerEpoch + 1}): " +
                        (bad >= 0 ? $"the gradient of '{Model.Parameters[Model.Parameters.IndexOfElement(bad)].Name}' is not finite (loss {loss.ToString(CultureInfo.InvariantCulture)})" : $"the loss is {loss.ToString(CultureInfo.InvariantCulture)}") +
                        "; the optimizer skipped the step";
                    Skipped++;
                    _results.Add(new StepResult(step + 1, loss, LastSkip, LastGradNorm, _appliedLr));
                    if (++_consecutiveSkips >= MaxConsecutiveSkips)
                    {
                        throw new TrainingDivergedException(
                            $"training diverged: {_consecutiveSkips} steps in a row were not finite, the last at {LastSkip}; try --resume with a lower --lr, or --clip 1");
                    }
                    continue;
                }
                _consecutiveSkips = 0;
                LastSkip = null;
                applied++;
                _appliedLr = LearningRateAt(step);
                if (Options.Clip > 0)
                {
                    LastGradNorm = MathF.Sqrt(r[2]);
                }
                _results.Add(new StepResult(step + 1, loss, null, LastGradNorm, _appliedLr));
            }
        }
        finally
        {
            Adam.Applied(applied);
            Adam.LearningRate = _appliedLr; // as after the last step the optimizer took (a skipped step leaves it)
        }
        return _results;
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
        if (_pending > 0)
        {
            throw new InvalidOperationException($"{_pending} queued steps are not read back: read them before saving (their skips count in the checkpoint)");
        }
        var meta = Options.ToMetadata();
        meta[Checkpoint.StepKey] = Step.ToString(CultureInfo.InvariantCulture);
        meta["epoch"] = Epoch.ToString(CultureInfo.InvariantCulture);
        meta["steps_per_epoch"] = StepsPerEpoch.ToString(CultureInfo.InvariantCulture);
        meta[Checkpoint.SkippedKey] = Skipped.ToString(CultureInfo.InvariantCulture);
        meta[DataHashKey] = _data.Hash;
        if (EmaStart > 0)
        {
            meta[TrainOptions.EmaStartKey] = EmaStart.ToString(CultureInfo.InvariantCulture);
        }
        if (_changes.Count > 0)
        {
            meta["changes"] = string.Join("; ", _changes);
        }
        Checkpoint.Save(path, Model, Adam, Ema, meta);
    }

    /// <summary>
    /// Continues the run saved in <paramref name="path"/>, validated whole first: its options,
    /// weights, Adam, EMA, step and skipped count. <paramref name="change"/> may change what can
    /// change mid-run (epochs, step cap, learning rate, clipping, EMA decay); each change is
    /// recorded in <see cref="Changes"/> and so in the next checkpoint's metadata. What would
    /// break the run's exactness (preset, batch, seed, classes, schedule, T) is refused, as is a data set
    /// that gives another number of steps an epoch.
    /// </summary>
    public static Trainer Resume(Device device, string path, MnistSet data, Func<TrainOptions, TrainOptions>? change = null) =>
        Resume(device, Checkpoint.Inspect(path), data, change);

    /// <inheritdoc cref="Resume(Device, string, MnistSet, Func{TrainOptions, TrainOptions}?)"/>
    /// <remarks>For a caller that validated the checkpoint already (<see cref="Checkpoint.Inspect(string)"/>): it is not read twice.</remarks>
    public static Trainer Resume(Device device, CheckpointInfo info, MnistSet data, Func<TrainOptions, TrainOptions>? change = null)
    {
        string path = info.Path;
        if (!info.HasAdam)
        {
            throw new CheckpointException($"{path}: holds weights only (no Adam state), so it can be sampled from but not resumed");
        }
        var saved = TrainOptions.FromMetadata(info.Metadata, path);
        var meta = info.Metadata;
        if (!meta.ContainsKey(Checkpoint.StepKey))
        {
            throw new CheckpointException($"{path}: metadata lacks '{Checkpoint.StepKey}'");
        }
        long step = long.Parse(meta[Checkpoint.StepKey], CultureInfo.InvariantCulture);
        long skipped = meta.TryGetValue(Checkpoint.SkippedKey, out var sk) ? long.Parse(sk, CultureInfo.InvariantCulture) : 0;
        long emaStart = EmaStartOf(meta, step, path);
        if (meta.TryGetValue("steps_per_epoch", out var pe) && long.Parse(pe, CultureInfo.InvariantCulture) != data.Count / saved.Batch)
        {
            throw new CheckpointException(
                $"{path}: the run took {pe} steps an epoch, but this training set gives {data.Count / saved.Batch} ({data.Count} images): --data holds another data set than the run's");
        }
        var options = change?.Invoke(saved) ?? saved;
        foreach (var (name, was, now) in new[]
        {
            ("--preset", saved.Preset, options.Preset), ("--batch", Text(saved.Batch), Text(options.Batch)), ("--seed", Text(saved.Seed), Text(options.Seed)),
            ("--classes", Text(saved.Classes), Text(options.Classes)),
            ("--schedule", saved.Schedule, options.Schedule), ("T", Text(saved.DiffusionSteps), Text(options.DiffusionSteps)),
        })
        {
            if (was != now)
            {
                throw new UsageException($"--resume: {name} cannot change mid-run (the run has {was}, asked for {now}); start a new run with another --out");
            }
        }
        // After the flags: a changed flag is named first, the data set then.
        if (meta.TryGetValue(DataHashKey, out var dataHash) && dataHash != data.Hash)
        {
            throw new UsageException(
                $"--resume: --data holds another data set than the run's (sha256 {data.Hash[..12]}..., the run trained on {dataHash[..Math.Min(12, dataHash.Length)]}...); pass the run's --data, or start a new run with another --out");
        }
        if (saved.EmaDecay > 0 && options.EmaDecay == 0)
        {
            throw new UsageException($"--resume: --ema 0 would drop the run's EMA weights; keep them (sample --no-ema uses the raw weights)");
        }
        var trainer = new Trainer(device, options, data);
        try
        {
            Checkpoint.Load(info, trainer.Model, trainer.Adam, trainer.Ema);
            if (trainer.Ema is { } ema && !info.HasEma)
            {
                // EMA switched on mid-run: it starts from the weights as they are now, its warm-up from this step.
                for (int i = 0; i < ema.Weights.Count; i++)
                {
                    ema.Weights[i].CopyFrom(trainer.Model.Parameters[i].Value);
                }
                emaStart = step;
            }
            trainer.EmaStart = trainer.Ema is null ? 0 : emaStart;
            trainer.Step = step;
            trainer.Skipped = skipped;
            if (meta.TryGetValue("changes", out var earlier) && earlier.Length > 0)
            {
                trainer._changes.AddRange(earlier.Split("; "));
            }
            foreach (var (key, was, now) in new[]
            {
                ("epochs", Text(saved.Epochs), Text(options.Epochs)), ("max_steps", Text(saved.MaxSteps), Text(options.MaxSteps)),
                ("lr", Text(saved.Lr), Text(options.Lr)), ("warmup", Text(saved.Warmup), Text(options.Warmup)), ("lr_decay", saved.LrDecay, options.LrDecay),
                ("clip", Text(saved.Clip), Text(options.Clip)), ("ema", Text(saved.EmaDecay), Text(options.EmaDecay)),
                (TrainOptions.EmaWarmupKey, Text(saved.EmaWarmup), Text(options.EmaWarmup)),
                (TrainOptions.MinSnrKey, Text(saved.MinSnr), Text(options.MinSnr)),
            })
            {
                if (was != now)
                {
                    trainer._changes.Add($"step {step}: {key} {was} -> {now}");
                }
            }
            return trainer;
        }
        catch
        {
            trainer.Dispose();
            throw;
        }
    }

    /// <summary>The step a checkpoint's average started at (<see cref="TrainOptions.EmaStartKey"/>; absent: 0), checked against its step.</summary>
    public static long EmaStartOf(IReadOnlyDictionary<string, string> meta, long step, string label)
    {
        if (!meta.TryGetValue(TrainOptions.EmaStartKey, out var text))
        {
            return 0;
        }
        if (!long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long start) || start > step)
        {
            throw new CheckpointException($"{label}: metadata '{TrainOptions.EmaStartKey}' = '{text}' is not a step in 0..{step}");
        }
        return start;
    }

    /// <summary>
    /// How much of a checkpoint's averaged weights is still the weights the average started from (the random initial ones
    /// for a run that kept an EMA from its start), by its EMA schedule's own arithmetic (<see cref="EmaSchedule.InitialShare"/>);
    /// null when the metadata does not say (a checkpoint without EMA weights, or not written by <see cref="Save"/>).
    /// </summary>
    public static double? EmaInitialShare(IReadOnlyDictionary<string, string> meta)
    {
        static bool Read<T>(IReadOnlyDictionary<string, string> m, string key, out T value) where T : IParsable<T>
        {
            value = default!;
            return m.TryGetValue(key, out var text) && T.TryParse(text, CultureInfo.InvariantCulture, out value!);
        }
        if (!Read(meta, "ema", out float decay) || !(decay is > 0 and < 1) || !Read(meta, Checkpoint.StepKey, out long step) || step < 0)
        {
            return null;
        }
        float power = Read(meta, TrainOptions.EmaWarmupKey, out float p) && p is >= 0 and <= EmaSchedule.MaxPower ? p : 0f;
        long skipped = Read(meta, Checkpoint.SkippedKey, out long sk) ? sk : 0;
        long start = Read(meta, TrainOptions.EmaStartKey, out long st) && st >= 0 && st <= step ? st : 0;
        return new EmaSchedule(decay, power, start).InitialShare(step, skipped);
    }

    /// <summary>The changes the last <see cref="Resume(Device, CheckpointInfo, MnistSet, Func{TrainOptions, TrainOptions}?)"/> made (those recorded at its step).</summary>
    public IEnumerable<string> ChangesAtResume => _changes.Where(c => c.StartsWith($"step {Step}:", StringComparison.Ordinal));

    private static string Text<T>(T value) where T : IFormattable => value.ToString(value is float ? "R" : null, CultureInfo.InvariantCulture);

    /// <inheritdoc/>
    public void Dispose()
    {
        _tape.Dispose();
        foreach (var t in new[] { _x0, _eps, _xt, _ca, _cb, _t, _labels, _records })
        {
            t.Dispose();
        }
        foreach (var h in _staged.SelectMany(s => s))
        {
            h.Dispose();
        }
        Adam.Dispose();
        Ema?.Dispose();
        Model.Parameters.Dispose();
    }
}
