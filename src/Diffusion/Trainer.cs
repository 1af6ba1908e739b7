using System.Globalization;
using Ddpm.Diffusion.Parallel;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>
/// DDPM training (Ho et al. 2020, algorithm 1) on MNIST: per step, a batch of digits x0 from the
/// epoch's shuffle, t uniform in 0..T-1, eps ~ N(0, I), x_t = sqrt(ābar_t)·x0 + sqrt(1-ābar_t)·eps,
/// loss = mean((eps - eps_theta(x_t, t))²), then backward, optional clipping, Adam, optional EMA.
/// Every random draw is a pure function of (seed, step): the shuffle of epoch e, the timesteps and
/// noise of step s. So a run resumed from a checkpoint at step s continues exactly as the
/// uninterrupted run would have.
/// </summary>
public sealed partial class Trainer : IDisposable
{
    private const ulong ShuffleStream = 1, TimestepStream = 2, NoiseStream = 3, LabelDropStream = 4, FlipStream = 5;

    /// <summary>The chance that a conditional run trains a digit as "no label" (classifier-free guidance's dropout).</summary>
    public const float LabelDropProbability = 0.1f;

    private readonly ImageSet _data;
    private readonly Tensor _x0, _eps, _xt, _ca, _cb, _t, _labels;
    // The queued steps' records [ReadEvery, 4] (loss, non-finite flag, Σg², skipped; see Optim) with each slot's views,
    // their host copy, and per slot the page-locked batch the device copies from (x0, t, labels, ca, cb).
    private readonly Tensor _records;
    private readonly Tensor[] _recordOf, _lossOf, _flagOf;
    private readonly float[] _hostRecords;
    private readonly HostBuffer[][][] _staged; // [slot][local micro-batch][x0, t, labels, ca, cb]
    // Over several micro-batches: in one process their gradient and loss folded on the device (null for one); under MPI the
    // host's copy of each micro-batch's gradient, loss and stop flag, and the ranks' sum.
    private readonly Tensor? _gradFold, _lossFold;
    private readonly HostBuffer? _hostVector;
    private readonly GradientSum? _sum;
    private readonly float[] _oneLoss = new float[1];
    private readonly List<StepResult> _results;
    private int _pending;
    private float _appliedLr;
    private readonly List<string> _changes = [];
    private readonly Tape _tape;

    /// <summary>A fresh run: weights from the seed, Adam and EMA at their start; with <paramref name="mpi"/>, this rank's share
    /// of a run over <see cref="Mpi.Size"/> ranks (<see cref="TrainOptions.Ranks"/> must say as many).</summary>
    public Trainer(Device device, TrainOptions options, ImageSet data, Mpi? mpi = null)
    {
        foreach (var (_, flag, problem) in options.Problems())
        {
            throw new UsageException($"{flag} {problem}");
        }
        if (options.Ranks != (mpi?.Size ?? 1))
        {
            throw new ArgumentException($"the options say {options.Ranks} ranks, the run has {mpi?.Size ?? 1}");
        }
        if (options.SplitProblem() is { } split)
        {
            throw new UsageException(split);
        }
        if (options.Batch > data.Count)
        {
            throw new UsageException($"--batch {options.Batch} is more than the {data.Count} training images");
        }
        if (options.Classes > 0 && data.Labels.Length < data.Count)
        {
            throw new UsageException($"--classes {options.Classes} needs a label for every training image; the data set has {data.Labels.Length} for {data.Count}");
        }
        if (options.Classes > 0 && options.Classes != data.ClassNames.Count)
        {
            throw new UsageException(data.ClassNames.Count < 2
                ? $"--classes {options.Classes}: the data has no labels (a folder labels its images by subfolder: at least 2 of them)"
                : $"--classes {options.Classes}: the data has {data.ClassNames.Count} classes ({Classes(data.ClassNames)}); pass --classes {data.ClassNames.Count}");
        }
        Options = options;
        _data = data;
        Device = device;
        Schedule = NoiseSchedule.ByName(options.Schedule, options.DiffusionSteps);
        Timesteps = new TimestepSampler(Schedule, options.MinSnr);
        Model = new UNet(Presets.Channels(options.Preset), device, options.Seed, options.Classes, data.Channels) { ImageSize = data.Size };
        Adam = new Adam(Model.Parameters, options.Lr);
        _appliedLr = options.Lr;
        Ema = options.EmaDecay > 0 ? new Ema(Model.Parameters, options.EmaDecay) : null;
        Mpi = mpi;
        int b = options.MicroBatch;
        int c = data.Channels, side = data.Size;
        _x0 = Tensor.Empty(device, b, c, side, side);
        _eps = Tensor.Empty(device, b, c, side, side);
        _xt = Tensor.Empty(device, b, c, side, side);
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
        _staged = [.. Enumerable.Range(0, w).Select(_ => Enumerable.Range(0, options.Accumulate)
            .Select(_ => new[] { b * data.ImageBytes, b, b, b, b }.Select(device.AllocateHost).ToArray()).ToArray())];
        _results = new List<StepResult>(w);
        int parameters = Model.Parameters.Grads!.Length;
        if (mpi is not null)
        {
            _hostVector = device.AllocateHost(parameters + VectorTail);
            _sum = new GradientSum(mpi, parameters + VectorTail);
        }
        else if (options.Accumulate > 1)
        {
            _gradFold = Tensor.Empty(device, parameters);
            _lossFold = Tensor.Empty(device, 1);
        }
    }

    /// <summary>Floats after the gradient in the vector ranks sum: the micro-batch's loss, and 1 when its rank was asked to stop.</summary>
    private const int VectorTail = 2;

    /// <summary>The MPI ranks this run trains on with, or null for one process.</summary>
    public Mpi? Mpi { get; }

    /// <summary>Whether a rank was asked to stop (SIGTERM, Ctrl-C) before the last step's sum: every rank learns it from the
    /// same sum, so all stop after the same step. Always false in one process (the caller's own signal is the stop there).</summary>
    public bool StopAgreed { get; private set; }

    /// <summary>Asked by each step under MPI: whether this rank was told to stop (the caller's signal handler).</summary>
    public Func<bool>? StopRequested { get; set; }

    /// <summary>The checkpoint's key of the training set's hash (<see cref="ImageSet.Hash"/>); absent in runs from before it,
    /// which resume on any data of their size and record it from then on.</summary>
    public const string DataHashKey = ImageSet.HashKey;

    /// <summary>Whether step <paramref name="step"/> flips image <paramref name="image"/> (with --flip): one bit of the
    /// flip stream at (step, image), so a resumed run flips as the straight one does.</summary>
    internal bool Flips(long step, int image) =>
        (Philox.Bits(Philox.Key(Options.Seed, FlipStream), (ulong)step * (ulong)_data.Count + (ulong)image) & 1) != 0;

    /// <summary>The training images (their shape and class names: the model's and the checkpoint's).</summary>
    public ImageSet Data => _data;

    private static string Classes(IReadOnlyList<string> names) =>
        string.Join(", ", names.Take(5)) + (names.Count > 5 ? $", … {names.Count - 5} more" : "");

    /// <summary>Steps <see cref="QueueStep"/> may queue before <see cref="ReadBack"/> must read them (the device keeps one record each).</summary>
    public const int ReadEvery = 10;

    /// <summary>Steps queued and not read back yet.</summary>
    public int Pending => _pending;

    /// <summary>Where the training tape times its ops and passes (null: not profiled).</summary>
    public OpProfile? Profile
    {
        get => _tape.Profile;
        set => _tape.Profile = value;
    }

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
        int slot = _pending, batch = Options.Batch, b = Options.MicroBatch, local = Options.Accumulate, micros = local * Options.Ranks;
        int inEpoch = (int)(Step % StepsPerEpoch), imageFloats = _eps.Length / b;
        var order = Order(Epoch);
        // The weights do not change until the optimizer: the GPU's convolutions read them permuted once (UNet.HoldConvWeights).
        using (Model.HoldConvWeights())
        {
            for (int k = 0; k < local; k++)
            {
                // Micro-batch j = k·ranks + rank of the step is images [j·b, (j+1)·b) of the step's batch, with their own draws:
                // the timesteps, labels, flips and noise of those positions, so any cut of the batch draws what the whole batch does.
                int first = (k * Options.Ranks + (Mpi?.Rank ?? 0)) * b;
                var data = _tape.Profile?.Time("batch data (images, timesteps, labels)", Device) ?? default;
                var staged = _staged[slot][k];
                Span<float> pixels = staged[0].Span, ts = staged[1].Span, labels = staged[2].Span, ca = staged[3].Span, cb = staged[4].Span;
                for (int n = 0; n < b; n++)
                {
                    int image = order[inEpoch * batch + first + n];
                    long position = Step * batch + first + n;
                    _data.CopyImage(image, pixels.Slice(n * _data.ImageBytes, _data.ImageBytes), Options.Flip && Flips(Step, image));
                    int t = Timesteps.At(Philox.Uniform(Philox.Key(Options.Seed, TimestepStream), (ulong)position));
                    ts[n] = t;
                    ca[n] = (float)Math.Sqrt(Schedule.AlphaBars[t]);
                    cb[n] = (float)Math.Sqrt(1 - Schedule.AlphaBars[t]);
                    if (Options.Classes > 0)
                    {
                        // The drop is a pure function of (seed, step, n), like the timesteps: a resumed run drops the same labels.
                        bool drop = Philox.Uniform(Philox.Key(Options.Seed, LabelDropStream), (ulong)position) < LabelDropProbability;
                        labels[n] = drop ? Model.NullLabel : _data.Labels[image];
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
                data.Dispose();
                var prepare = _tape.Profile?.Time("batch noise, x_t", Device) ?? default;
                RandomFill.Normal(_eps, Philox.Key(Options.Seed, NoiseStream), ((ulong)Step * (ulong)batch + (ulong)first) * (ulong)imageFloats);
                Elementwise.Combine(_x0, _ca, _eps, _cb, _xt);
                Model.ZeroGrad();
                prepare.Dispose();

                // One tape for the whole run, reset after each step: its intermediates go back to the pool, and the next step
                // reuses its bookkeeping objects, so a step allocates no managed memory.
                try
                {
                    var pred = Model.Forward(_tape, _tape.Constant(_xt), _tape.Constant(_t), Options.Classes > 0 ? _tape.Constant(_labels) : null);
                    var l = _tape.MseLoss(pred, _tape.Constant(_eps));
                    _lossOf[slot].CopyFrom(l.Value); // stays on the device until the read-back (backward frees the loss)
                    _tape.Backward(l);
                    using var fold = _tape.Profile?.Time("gradient sum (micro-batches, ranks)", Device) ?? default;
                    Keep(k, _lossOf[slot]);
                }
                finally
                {
                    _tape.Reset();
                }
            }
        }
        if (micros > 1 || Mpi is not null)
        {
            using var sum = _tape.Profile?.Time("gradient sum (micro-batches, ranks)", Device) ?? default;
            Finish(micros, slot);
        }
        using (_tape.Profile?.Time("clip, adam, ema", Device) ?? default)
        {
            Adam.LearningRate = LearningRateAt(Step);
            Adam.QueueStep(_recordOf[slot], _flagOf[slot], Options.Clip);
            Ema?.QueueUpdate(Adam.State, EmaSchedule.At(Step));
        }
        _pending++;
        Step++;
    }

    // A micro-batch's gradient (in the model's gradients) and loss (in the step's record): as they are for a whole batch in
    // one process; folded on the device over several; under MPI copied to the host for the ranks' sum with this rank's stop flag.
    private void Keep(int k, Tensor loss)
    {
        var grads = Model.Parameters.Grads!;
        if (_sum is not null)
        {
            var vector = _hostVector!.Span;
            grads.CopyTo(vector[..grads.Length]);
            loss.CopyTo(_oneLoss);
            vector[grads.Length] = _oneLoss[0];
            vector[grads.Length + 1] = StopRequested?.Invoke() == true ? 1 : 0;
            _sum.Add(vector);
        }
        else if (_gradFold is null)
        {
            // One micro-batch: its gradient and loss are the step's.
        }
        else if (k == 0)
        {
            _gradFold.CopyFrom(grads);
            _lossFold!.CopyFrom(loss);
        }
        else
        {
            Elementwise.Accumulate(_gradFold, grads);
            Elementwise.Accumulate(_lossFold!, loss);
        }
    }

    // The step's gradient and loss from its micro-batches': (g0 + g1 + ...) / M in micro-batch order (GradientSum.Fold's
    // arithmetic, on the device in one process, on the host under MPI), into the model's gradients and the step's record.
    private void Finish(int micros, int slot)
    {
        var grads = Model.Parameters.Grads!;
        if (_sum is not null)
        {
            var vector = _hostVector!.Span;
            _sum.Finish(vector);
            grads.CopyFrom(vector[..grads.Length]);
            _lossOf[slot].CopyFrom(vector.Slice(grads.Length, 1));
            StopAgreed = vector[grads.Length + 1] > 0;
            return;
        }
        Elementwise.Scale(_gradFold!, 1f / micros, grads);
        Elementwise.Scale(_lossFold!, 1f / micros, _lossOf[slot]);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _gradFold?.Dispose();
        _lossFold?.Dispose();
        _hostVector?.Dispose();
        _tape.Dispose();
        foreach (var t in new[] { _x0, _eps, _xt, _ca, _cb, _t, _labels, _records })
        {
            t.Dispose();
        }
        foreach (var h in _staged.SelectMany(s => s).SelectMany(s => s))
        {
            h.Dispose();
        }
        Adam.Dispose();
        Ema?.Dispose();
        Model.Parameters.Dispose();
    }
}
