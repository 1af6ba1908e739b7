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
    public int Epochs { get; init; } = TrainSettings.Epochs.ByRecipe(Diffusion.Recipe.Seed);

    /// <summary>Stop after this many steps in all (0: no limit).</summary>
    public long MaxSteps { get; init; }

    /// <summary>Digits per step.</summary>
    public int Batch { get; init; } = TrainSettings.Batch.ByRecipe(Diffusion.Recipe.Seed);

    /// <summary>Adam's learning rate.</summary>
    public float Lr { get; init; } = TrainSettings.Lr.ByRecipe(Diffusion.Recipe.Seed);

    /// <summary>Steps of linear learning-rate warm-up from 0 to <see cref="Lr"/> (0: none).</summary>
    public int Warmup { get; init; }

    /// <summary>After the warm-up: constant (the seed's) or cosine (half a cosine from <see cref="Lr"/> down to
    /// <see cref="Trainer.CosineFloor"/> of it at the run's last step).</summary>
    public string LrDecay { get; init; } = TrainSettings.LrDecay.ByRecipe(Diffusion.Recipe.Seed);

    /// <summary>linear or cosine.</summary>
    public string Schedule { get; init; } = TrainSettings.Schedule.ByRecipe(Diffusion.Recipe.Seed);

    /// <summary>Diffusion steps T.</summary>
    public int DiffusionSteps { get; init; } = TrainSettings.DiffusionSteps.ByRecipe(Diffusion.Recipe.Seed);

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

    /// <summary>Random horizontal flips of the training images (each a function of the seed, the step and the image).</summary>
    public bool Flip { get; init; }

    /// <summary>How a GPU computes the convolutions and linear layers (<see cref="MathPrecision"/>'s name: fp32, tf32 or
    /// 3xtf32); the CPU backend computes fp32 whatever it says.</summary>
    public string Math { get; init; } = MathPrecisions.Default.Name();

    /// <summary>Micro-batches a batch is cut into on each rank (see <see cref="MicroBatch"/>).</summary>
    public int Accumulate { get; init; } = 1;

    /// <summary>MPI ranks sharing each batch (1: one process).</summary>
    public int Ranks { get; init; } = 1;

    /// <summary>Images in one micro-batch: the batch over every rank's micro-batches (Batch / (Accumulate · Ranks)).</summary>
    public int MicroBatch => Batch / (Accumulate * Ranks);

    /// <summary>Why the batch does not cut into <see cref="Accumulate"/> · <see cref="Ranks"/> equal micro-batches, or null.</summary>
    /// <param name="resuming">A resumed run keeps its batch: the advice is then a rank count and --accumulate that divide it.</param>
    public string? SplitProblem(bool resuming = false) =>
        Batch % (Accumulate * Ranks) == 0 ? null
        : $"--batch {Batch} does not cut into {Accumulate * Ranks} equal micro-batches ({(Ranks > 1 ? $"{Ranks} ranks x " : "")}--accumulate {Accumulate}): " +
            (resuming ? $"the run's batch stays {Batch}; run a number of ranks and an --accumulate whose product divides it" : $"pass a batch that is a multiple of {Accumulate * Ranks}");

    /// <summary>
    /// What is wrong with these options, as (metadata key, flag, problem) triples; empty when they
    /// make a valid run. The one place the ranges live: the command line reports a problem by its
    /// flag, a checkpoint's metadata by its key.
    /// </summary>
    public IEnumerable<(string Key, string Flag, string Problem)> Problems() =>
        TrainSettings.All.Select(setting => (setting.Key, setting.Flag ?? setting.Key, Problem: setting.Problem(this)!)).Where(p => p.Problem is not null);

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
    public Dictionary<string, string> ToMetadata() =>
        TrainSettings.All.ToDictionary(setting => setting.Key, setting => setting.Text(this)).With(RecipeKey, Recipe);

    /// <summary>Options read back from checkpoint metadata; a missing or malformed key is an error naming it.</summary>
    public static TrainOptions FromMetadata(IReadOnlyDictionary<string, string> m, string label)
    {
        var options = new TrainOptions { Recipe = m.GetValueOrDefault(RecipeKey) };
        foreach (var setting in TrainSettings.All)
        {
            // A key a run from before the setting lacks takes the value such runs had (Legacy); others are required.
            string text = m.TryGetValue(setting.Key, out var v) ? v
                : setting.Legacy ?? throw new CheckpointException($"{label}: metadata lacks '{setting.Key}' (not a training checkpoint?)");
            options = setting.Parse(options, text) ?? throw new CheckpointException($"{label}: metadata '{setting.Key}' = '{text}' is malformed");
        }
        foreach (var (key, _, problem) in options.Problems())
        {
            throw new CheckpointException($"{label}: metadata '{key}' = '{m.GetValueOrDefault(key)}': {problem}");
        }
        if (options.Recipe is { } recipe && !Diffusion.Recipe.Names.Contains(recipe))
        {
            throw new CheckpointException($"{label}: metadata '{RecipeKey}' = '{recipe}' is not a recipe ({string.Join(", ", Diffusion.Recipe.Names)})");
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
