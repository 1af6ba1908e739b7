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
