using System.Globalization;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>What <c>train --resume</c> does with a setting given on its command line.</summary>
public enum OnResume
{
    /// <summary>It cannot change mid-run: a different value is refused, naming the flag.</summary>
    Fixed,

    /// <summary>It may change: the run goes on with the new value from the resumed step, and the change is recorded.</summary>
    MayChange,
}

/// <summary>
/// One setting of a training run, declared once (<see cref="TrainSettings.All"/>): its flag, its checkpoint key, its
/// help, its value in each recipe, its range or choices, and what <c>--resume</c> does with it. The command line (the
/// option, its help with every recipe's value, its range), the validation of <see cref="TrainOptions"/>, the checkpoint
/// metadata (written and read back), the resume rules and the banner come from this one declaration; the README's train
/// usage and the help are held to it by tests.
/// </summary>
public abstract class TrainSetting
{
    /// <summary>The command-line flag, "--epochs"; null for a setting no flag sets (T).</summary>
    public string? Flag { get; init; }

    /// <summary>The checkpoint metadata key.</summary>
    public required string Key { get; init; }

    /// <summary>What it does, for the help (the defaults and the resume rule are added from the declaration).</summary>
    public required string Help { get; init; }

    /// <summary>What --resume does with a new value.</summary>
    public OnResume Resume { get; init; } = OnResume.Fixed;

    /// <summary>The value a checkpoint from before the setting existed had (its text), or null when the key is required.</summary>
    public string? Legacy { get; init; }

    /// <summary>The value a GPU takes whatever the recipe (the preset: base); the recipe's is then the CPU backend's.</summary>
    public string? OnGpu { get; init; }

    /// <summary>The values a string setting takes, in help order (null: any in range).</summary>
    public string[]? Choices { get; init; }

    /// <summary>The name the banner and the error messages use: the flag without its dashes, else the key.</summary>
    public string Name => Flag?.TrimStart('-') ?? Key;

    /// <summary>The value's type (int, long, ulong, float, bool or string).</summary>
    public abstract Type ValueType { get; }

    /// <summary>The value in <paramref name="o"/> as the metadata writes it (round-trip, invariant culture).</summary>
    public abstract string Text(TrainOptions o);

    /// <summary>The value in <paramref name="o"/> as a person reads it (the banner, the help).</summary>
    public abstract string Display(TrainOptions o);

    /// <summary><paramref name="o"/> with the value parsed from <paramref name="text"/>, or null when the text is not one.</summary>
    public abstract TrainOptions? Parse(TrainOptions o, string text);

    /// <summary><paramref name="o"/> with <paramref name="value"/> (of <see cref="ValueType"/>) set.</summary>
    public abstract TrainOptions With(TrainOptions o, object value);

    /// <summary>Why the value in <paramref name="o"/> cannot be used, or null.</summary>
    public abstract string? Problem(TrainOptions o);

    /// <summary>Its default under <paramref name="recipe"/>, as a person reads it.</summary>
    public abstract string DefaultText(Recipe recipe);

    /// <summary><paramref name="o"/> with this setting at its default under <paramref name="recipe"/>.</summary>
    public abstract TrainOptions WithDefault(TrainOptions o, Recipe recipe);

    /// <summary>The help line: what it does, its default in each recipe (one value when they agree), and the resume rule.</summary>
    public string HelpText(IReadOnlyList<Recipe> recipes)
    {
        var values = recipes.Select(DefaultText).ToList();
        string defaults = values.Distinct().Count() == 1 ? $"default {values[0]}" : $"default: the recipe's ({string.Join(", ", recipes.Select((r, i) => $"{r.Name} {values[i]}"))})";
        if (OnGpu is not null)
        {
            defaults = $"default: {OnGpu} on a GPU; on the CPU backend {defaults}";
        }
        string choices = Choices is null ? "" : $"{string.Join(" | ", Choices)}: ";
        return $"{choices}{Help} ({defaults}){(Resume == OnResume.MayChange ? "; may change on --resume" : "; cannot change on --resume")}";
    }
}

/// <summary>A setting whose value is a <typeparamref name="T"/>.</summary>
public sealed class TrainSetting<T> : TrainSetting where T : notnull
{
    /// <summary>Reads the value.</summary>
    public required Func<TrainOptions, T> Get { get; init; }

    /// <summary>Sets the value.</summary>
    public required Func<TrainOptions, T, TrainOptions> Set { get; init; }

    /// <summary>Its default in a recipe (a constant for a setting no recipe changes).</summary>
    public required Func<Recipe, T> ByRecipe { get; init; }

    /// <summary>The range a number takes (inclusive), for the command line and the validation; null: any.</summary>
    public (T Min, T Max)? Range { get; init; }

    /// <summary>A further check (null: the range or the choices only); returns why a value cannot be used.</summary>
    public Func<T, string?>? Check { get; init; }

    /// <summary>What the value means, when a number alone says too little ("0: off").</summary>
    public string? Zero { get; init; }

    /// <inheritdoc/>
    public override Type ValueType => typeof(T);

    /// <inheritdoc/>
    public override string Text(TrainOptions o) => Format(Get(o), roundTrip: true);

    /// <inheritdoc/>
    public override string Display(TrainOptions o) => Format(Get(o), roundTrip: false);

    /// <inheritdoc/>
    public override string DefaultText(Recipe recipe) => Format(ByRecipe(recipe), roundTrip: false);

    /// <inheritdoc/>
    public override TrainOptions With(TrainOptions o, object value) => Set(o, (T)value);

    /// <inheritdoc/>
    public override TrainOptions WithDefault(TrainOptions o, Recipe recipe) => Set(o, ByRecipe(recipe));

    /// <inheritdoc/>
    public override TrainOptions? Parse(TrainOptions o, string text)
    {
        object? value = typeof(T) == typeof(string) ? text
            : typeof(T) == typeof(int) ? (int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out int i) ? i : null)
            : typeof(T) == typeof(long) ? (long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out long l) ? l : null)
            : typeof(T) == typeof(ulong) ? (ulong.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out ulong u) ? u : null)
            : typeof(T) == typeof(float) ? (float.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out float f) ? f : null)
            : typeof(T) == typeof(bool) ? (bool.TryParse(text, out bool b) ? b : null)
            : throw new NotSupportedException(typeof(T).Name);
        return value is null ? null : Set(o, (T)value);
    }

    /// <inheritdoc/>
    public override string? Problem(TrainOptions o)
    {
        T value = Get(o);
        if (Choices is not null && !Choices.Contains(value as string))
        {
            return $"'{value}' is not {string.Join(", ", Choices[..^1])} or {Choices[^1]}";
        }
        if (Check?.Invoke(value) is { } problem)
        {
            return problem;
        }
        if (value is float f && !float.IsFinite(f))
        {
            return $"{Format(value, true)} must be a finite number";
        }
        if (Range is var (min, max) && (Comparer<T>.Default.Compare(value, min) < 0 || Comparer<T>.Default.Compare(value, max) > 0))
        {
            return $"{Format(value, true)} must be in {Format(min, true)}..{Format(max, true)}{(Zero is null ? "" : $" ({Zero})")}";
        }
        return null;
    }

    private static string Format(T value, bool roundTrip) => value switch
    {
        bool b => roundTrip ? (b ? "true" : "false") : (b ? "on" : "off"),
        float f => roundTrip ? f.ToString("R", CultureInfo.InvariantCulture) : Numbers.Human(f),
        IFormattable n => n.ToString(null, CultureInfo.InvariantCulture),
        _ => value.ToString() ?? "",
    };
}

/// <summary>Every setting of a training run, declared once, in the order the help, the banner and the metadata list them.</summary>
public static class TrainSettings
{
    /// <summary>The learning-rate decays (<see cref="TrainOptions.LrDecay"/>).</summary>
    public const string Constant = "constant", Cosine = "cosine";

    /// <summary>The preset: tiny, small or base (the recipe's on the CPU backend, base on a GPU: see <see cref="Recipe.CpuPreset"/>).</summary>
    public static readonly TrainSetting<string> Preset = new()
    {
        Flag = "--preset", Key = "preset", Choices = Presets.Names, OnGpu = "base",
        Help = "the model's size",
        Get = o => o.Preset, Set = (o, v) => o with { Preset = v }, ByRecipe = r => r.CpuPreset,
    };

    /// <summary>Passes over the training digits.</summary>
    public static readonly TrainSetting<int> Epochs = new()
    {
        Flag = "--epochs", Key = "epochs", Help = "passes over the training digits", Resume = OnResume.MayChange,
        Get = o => o.Epochs, Set = (o, v) => o with { Epochs = v }, ByRecipe = r => r.Epochs, Range = (1, 1_000_000),
    };

    /// <summary>A cap on the run's steps (0: none).</summary>
    public static readonly TrainSetting<long> MaxSteps = new()
    {
        Flag = "--max-steps", Key = "max_steps", Help = "stop after this many steps in all (0: no limit)", Resume = OnResume.MayChange,
        Get = o => o.MaxSteps, Set = (o, v) => o with { MaxSteps = v }, ByRecipe = _ => 0L, Range = (0, long.MaxValue / 2), Zero = "0: no limit",
    };

    /// <summary>Digits per step.</summary>
    public static readonly TrainSetting<int> Batch = new()
    {
        Flag = "--batch", Key = "batch", Help = "digits per step",
        Get = o => o.Batch, Set = (o, v) => o with { Batch = v }, ByRecipe = _ => 64, Range = (1, TrainOptions.MaxBatch),
    };

    /// <summary>Adam's peak learning rate.</summary>
    public static readonly TrainSetting<float> Lr = new()
    {
        Flag = "--lr", Key = "lr", Help = "Adam's learning rate", Resume = OnResume.MayChange,
        Get = o => o.Lr, Set = (o, v) => o with { Lr = v }, ByRecipe = r => r.Lr, Range = (float.Epsilon, float.MaxValue),
        Check = v => v > 0 && float.IsFinite(v) ? null : $"{v.ToString("R", CultureInfo.InvariantCulture)} must be a positive finite number",
    };

    /// <summary>Steps of linear learning-rate warm-up.</summary>
    public static readonly TrainSetting<int> Warmup = new()
    {
        Flag = "--warmup", Key = "warmup", Help = "steps of linear learning-rate warm-up", Resume = OnResume.MayChange, Legacy = "0",
        Get = o => o.Warmup, Set = (o, v) => o with { Warmup = v }, ByRecipe = r => r.Warmup, Range = (0, 10_000_000),
    };

    /// <summary>After the warm-up: constant, or a cosine decay to a tenth of the rate at the last step.</summary>
    public static readonly TrainSetting<string> LrDecay = new()
    {
        Flag = "--lr-decay", Key = "lr_decay", Choices = [Constant, Cosine], Resume = OnResume.MayChange, Legacy = Constant,
        Help = "the learning rate after the warm-up (cosine: to a tenth of --lr at the last step)",
        Get = o => o.LrDecay, Set = (o, v) => o with { LrDecay = v }, ByRecipe = r => r.LrDecay,
    };

    /// <summary>The noise schedule.</summary>
    public static readonly TrainSetting<string> Schedule = new()
    {
        Flag = "--schedule", Key = "schedule", Choices = [NoiseSchedule.LinearName, NoiseSchedule.CosineName], Help = "the noise schedule",
        Get = o => o.Schedule, Set = (o, v) => o with { Schedule = v }, ByRecipe = r => r.Schedule,
    };

    /// <summary>Diffusion steps T (no flag: the spec's 300).</summary>
    public static readonly TrainSetting<int> DiffusionSteps = new()
    {
        Key = "T", Help = "diffusion steps",
        Get = o => o.DiffusionSteps, Set = (o, v) => o with { DiffusionSteps = v }, ByRecipe = _ => 300, Range = (2, NoiseScheduleLimits.MaxT),
    };

    /// <summary>The EMA decay of the weights (0: off).</summary>
    public static readonly TrainSetting<float> Ema = new()
    {
        Flag = "--ema", Key = "ema", Help = "EMA decay of the weights, e.g. 0.999 (0: off)", Resume = OnResume.MayChange,
        Get = o => o.EmaDecay, Set = (o, v) => o with { EmaDecay = v }, ByRecipe = r => r.Ema, Range = (0f, 0.99999994f), Zero = "0: off",
    };

    /// <summary>The power of the EMA's warm-up (0: none).</summary>
    public static readonly TrainSetting<float> EmaWarmup = new()
    {
        Flag = "--ema-warmup", Key = TrainOptions.EmaWarmupKey, Resume = OnResume.MayChange, Legacy = "0",
        Help = "power P of the EMA's warm-up: update k (from 0) of the average takes decay min(--ema, 1 - (1 + k)^-P), so a short run averages trained weights (0: --ema from the first step)",
        Get = o => o.EmaWarmup, Set = (o, v) => o with { EmaWarmup = v }, ByRecipe = r => r.EmaWarmup, Range = (0f, EmaSchedule.MaxPower), Zero = "0: off",
    };

    /// <summary>Min-SNR-γ of the timestep draw (0: uniform).</summary>
    public static readonly TrainSetting<float> MinSnr = new()
    {
        Flag = "--min-snr", Key = TrainOptions.MinSnrKey, Resume = OnResume.MayChange, Legacy = "0",
        Help = "min-SNR-γ weighting (Hang et al. 2023) with this γ, e.g. 5: timestep t counts min(SNR_t, γ)/SNR_t, drawn by importance (0: every timestep alike)",
        Get = o => o.MinSnr, Set = (o, v) => o with { MinSnr = v }, ByRecipe = r => r.MinSnr, Range = (0f, 1000f), Zero = "0: off",
    };

    /// <summary>Gradient-norm clipping (0: none).</summary>
    public static readonly TrainSetting<float> Clip = new()
    {
        Flag = "--clip", Key = "clip", Help = "clip the gradient norm to this (0: off)", Resume = OnResume.MayChange,
        Get = o => o.Clip, Set = (o, v) => o with { Clip = v }, ByRecipe = _ => 0f, Range = (0f, float.MaxValue), Zero = "0: off",
    };

    /// <summary>The seed of the weights, the shuffle, the timesteps and the noise.</summary>
    public static readonly TrainSetting<ulong> Seed = new()
    {
        Flag = "--seed", Key = "seed", Help = "seed of the weights, shuffling, timesteps and noise",
        Get = o => o.Seed, Set = (o, v) => o with { Seed = v }, ByRecipe = _ => 0UL,
    };

    /// <summary>0: unconditional; 10: class-conditional.</summary>
    public static readonly TrainSetting<int> Classes = new()
    {
        Flag = "--classes", Key = Checkpoint.ClassesKey, Legacy = "0",
        Help = $"the data's number of labels (MNIST: 10; a folder: its subfolders) for a class-conditional model, each label dropped with probability {Trainer.LabelDropProbability.ToString(CultureInfo.InvariantCulture)} for classifier-free guidance; 0: unconditional",
        Get = o => o.Classes, Set = (o, v) => o with { Classes = v }, ByRecipe = _ => 0, Range = (0, Checkpoint.MaxClasses),
        Check = v => v is 0 or (>= 2 and <= Checkpoint.MaxClasses) ? null : $"{v} must be 0 (unconditional) or the data's number of labels, 2..{Checkpoint.MaxClasses}",
    };

    /// <summary>Random horizontal flips of the training images.</summary>
    public static readonly TrainSetting<bool> Flip = new()
    {
        Flag = "--flip", Key = "flip", Resume = OnResume.MayChange, Legacy = "false",
        Help = "flip each training image left to right with probability 1/2, drawn from the seed, the step and the image (for photos and sprites, not digits)",
        Get = o => o.Flip, Set = (o, v) => o with { Flip = v }, ByRecipe = _ => false,
    };

    /// <summary>How a GPU computes the convolutions and linear layers (tensor cores or not).</summary>
    public static readonly TrainSetting<string> Math = new()
    {
        Flag = "--math", Key = "math", Choices = MathPrecisions.Names, Resume = OnResume.MayChange, Legacy = MathPrecision.Fp32.Name(),
        Help = "how a GPU computes convolutions and linear layers: " + string.Join("; ", MathPrecisions.All.Select(m => $"{m.Name()}: {m.Describe()}")) +
            ". The CPU backend computes fp32 whatever this says",
        Get = o => o.Math, Set = (o, v) => o with { Math = v }, ByRecipe = _ => MathPrecisions.Default.Name(),
    };

    /// <summary>Micro-batches a step's batch is cut into, run one after another, their gradients summed in a fixed order.</summary>
    public static readonly TrainSetting<int> Accumulate = new()
    {
        Flag = "--accumulate", Key = "accumulate", Resume = OnResume.MayChange, Legacy = "1",
        Help = "cut each batch into K micro-batches run one after another (the memory of batch/K), their gradients summed in one fixed order: " +
            "the same weights as K MPI ranks of one micro-batch each; 1: the whole batch at once",
        Get = o => o.Accumulate, Set = (o, v) => o with { Accumulate = v }, ByRecipe = _ => 1, Range = (1, TrainOptions.MaxBatch),
    };

    /// <summary>The MPI ranks the run trains on (set by the launcher, not a flag).</summary>
    public static readonly TrainSetting<int> Ranks = new()
    {
        Key = "ranks", Resume = OnResume.MayChange, Legacy = "1",
        Help = "MPI ranks, each training its share of every batch (mpiexec -n N ddpm train)",
        Get = o => o.Ranks, Set = (o, v) => o with { Ranks = v }, ByRecipe = _ => 1, Range = (1, TrainOptions.MaxBatch),
    };

    /// <summary>Every setting, in order.</summary>
    public static IReadOnlyList<TrainSetting> All { get; } =
        [Preset, Epochs, MaxSteps, Batch, Lr, Warmup, LrDecay, Schedule, DiffusionSteps, Ema, EmaWarmup, MinSnr, Clip, Seed, Classes, Flip, Math, Accumulate, Ranks];

    /// <summary>The settings a flag sets.</summary>
    public static IEnumerable<TrainSetting> Flags => All.Where(s => s.Flag is not null);

    /// <summary>The options of a new run under <paramref name="recipe"/>, with <paramref name="preset"/> (the device's
    /// choice) in place of the recipe's CPU preset.</summary>
    public static TrainOptions Defaults(Recipe recipe, string? preset = null)
    {
        var o = new TrainOptions { Recipe = recipe.Name };
        foreach (var s in All)
        {
            o = s.WithDefault(o, recipe);
        }
        return preset is null ? o : o with { Preset = preset };
    }
}
