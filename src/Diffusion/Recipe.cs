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
    public static Recipe Seed { get; } = new("seed", "tiny", 3, 1e-3f, 0, "constant", "linear", 0f, 0f, 0f, false);

    /// <summary>The default recipe.</summary>
    public static Recipe Default { get; } = new("default", "tiny", 12, 1e-3f, 500, "cosine", "cosine", 0.9995f, 2f / 3, 0f, true);

    /// <summary>The recipe called <paramref name="name"/>.</summary>
    public static Recipe Named(string name) =>
        name == Default.Name ? Default : name == Seed.Name ? Seed : throw new UsageException($"--recipe: '{name}' is not {Default.Name} or {Seed.Name}");

    /// <summary>The recipe's values in a few words, for the help text.</summary>
    public string Summary => string.Create(CultureInfo.InvariantCulture,
        $"{CpuPreset} on the CPU, {Epochs} epochs, lr {Lr}{(Warmup > 0 ? $" after {Warmup} warm-up steps" : "")}{(LrDecay == "cosine" ? " decayed by a cosine" : "")}, {Schedule} schedule{(MinSnr > 0 ? $" with min-SNR-{MinSnr} timesteps" : "")}, {(Ema > 0 ? $"EMA {Ema}{(EmaWarmup > 0 ? $" after a warm-up (power {EmaWarmup:0.###})" : "")}" : "no EMA")}, {(ClippedSampling ? "clipped" : "unclipped")} sampling");
}
