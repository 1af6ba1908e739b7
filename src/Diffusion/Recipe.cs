using System.Globalization;

namespace Ddpm.Diffusion;

/// <summary>
/// A named set of training defaults: what <c>train</c> does for every flag left out. The seed's
/// recipe is the one the project started from (and the PyTorch peer's samples were made with);
/// the default was chosen by measurement with <c>ddpm eval</c> (docs/quality.md has the search).
/// </summary>
/// <param name="Name">The <c>--recipe</c> value.</param>
/// <param name="CpuPreset">The preset on the CPU backend (a GPU takes base).</param>
/// <param name="Epochs">Passes over the training digits.</param>
/// <param name="Lr">Adam's peak learning rate.</param>
/// <param name="Warmup">Steps of linear warm-up.</param>
/// <param name="LrDecay">constant or cosine.</param>
/// <param name="Schedule">The noise schedule.</param>
/// <param name="Ema">EMA decay of the weights (0: off).</param>
/// <param name="EmaWarmup">Power of the EMA's warm-up (0: none; see <see cref="Ddpm.Nn.EmaSchedule"/>).</param>
/// <param name="MinSnr">Min-SNR-γ of the timestep draw (0: uniform; see <see cref="TimestepSampler"/>).</param>
/// <param name="ClippedSampling">Whether the run's grid samples with the x0 estimate clipped to [-1, 1].</param>
public sealed record Recipe(string Name, string CpuPreset, int Epochs, float Lr, int Warmup, string LrDecay, string Schedule, float Ema, float EmaWarmup, float MinSnr, bool ClippedSampling)
{
    /// <summary>The seed's recipe: tiny on the CPU, 3 epochs, Adam 1e-3 constant, linear schedule, no EMA, unclipped sampling.</summary>
    public static Recipe Seed { get; } = new("seed", "tiny", 3, 1e-3f, 0, TrainSettings.Constant, NoiseSchedule.LinearName, 0f, 0f, 0f, false);

    /// <summary>The default recipe.</summary>
    public static Recipe Default { get; } = new("default", "tiny", 12, 1e-3f, 500, TrainSettings.Cosine, NoiseSchedule.CosineName, 0.9995f, 2f / 3, 5f, true);

    /// <summary>A first look in about two minutes on two cores: one epoch at twice the learning rate after a short warm-up,
    /// min-SNR-5 timesteps, an EMA with a quick warm-up (docs/quality.md has the screen that chose it).</summary>
    public static Recipe Quick { get; } = new("quick", "tiny", 1, 2e-3f, 100, TrainSettings.Cosine, NoiseSchedule.CosineName, 0.999f, 0.5f, 5f, true);

    /// <summary>Every recipe, the default first.</summary>
    public static IReadOnlyList<Recipe> All { get; } = [Default, Quick, Seed];

    /// <summary>The recipe names, for the command line.</summary>
    public static string[] Names => [.. All.Select(r => r.Name)];

    /// <summary>The recipe called <paramref name="name"/>.</summary>
    public static Recipe Named(string name) =>
        All.FirstOrDefault(r => r.Name == name) ?? throw new UsageException($"--recipe: '{name}' is not {string.Join(", ", Names[..^1])} or {Names[^1]}");

    /// <summary>The recipe's values in a few words, for the help text.</summary>
    public string Summary => string.Create(CultureInfo.InvariantCulture,
        $"{CpuPreset} on the CPU, {Epochs} epoch{(Epochs == 1 ? "" : "s")}, lr {Lr}{(Warmup > 0 ? $" after {Warmup} warm-up steps" : "")}{(LrDecay == TrainSettings.Cosine ? " decayed by a cosine" : "")}, {Schedule} schedule{(MinSnr > 0 ? $" with min-SNR-{MinSnr} timesteps" : "")}, {(Ema > 0 ? $"EMA {Ema}{(EmaWarmup > 0 ? $" after a warm-up (power {EmaWarmup:0.###})" : "")}" : "no EMA")}, {(ClippedSampling ? "clipped" : "unclipped")} sampling");
}
