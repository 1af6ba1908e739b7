namespace Ddpm.Diffusion;

/// <summary>
/// The forward process's noise schedule, computed in double and read as float:
/// beta_t for t = 0..T-1, alpha_t = 1 - beta_t, ābar_t = Π_{s≤t} alpha_s.
///  - linear (the seed's): beta from 1e-4 to 0.02, T = 300, as torch.linspace.
///  - cosine (Nichol and Dhariwal 2021): ābar(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2),
///    s = 0.008, beta_t = 1 - ābar(t+1)/ābar(t) clipped to at most 0.999.
/// </summary>
public sealed class NoiseSchedule
{
    /// <summary>The schedules' names (the --schedule values and the checkpoint's "schedule").</summary>
    public const string LinearName = "linear", CosineName = "cosine";

    private NoiseSchedule(string name, double[] betas)
    {
        Name = name;
        Betas = betas;
        Alphas = betas.Select(b => 1.0 - b).ToArray();
        AlphaBars = new double[betas.Length];
        double product = 1;
        for (int t = 0; t < betas.Length; t++)
        {
            product *= Alphas[t];
            AlphaBars[t] = product;
        }
    }

    /// <summary>"linear" or "cosine".</summary>
    public string Name { get; }

    /// <summary>Number of diffusion steps T.</summary>
    public int T => Betas.Length;

    /// <summary>beta_t.</summary>
    public double[] Betas { get; }

    /// <summary>alpha_t = 1 - beta_t.</summary>
    public double[] Alphas { get; }

    /// <summary>ābar_t = Π_{s≤t} alpha_s.</summary>
    public double[] AlphaBars { get; }

    /// <summary>ābar_{t-1}, with ābar_{-1} = 1.</summary>
    public double AlphaBarPrevious(int t) => t == 0 ? 1.0 : AlphaBars[t - 1];

    /// <summary>The seed's schedule: T steps, beta linear from <paramref name="start"/> to <paramref name="end"/>.</summary>
    public static NoiseSchedule Linear(int steps = 300, double start = 1e-4, double end = 0.02)
    {
        CheckSteps(steps);
        var betas = new double[steps];
        for (int t = 0; t < steps; t++)
        {
            betas[t] = steps == 1 ? start : start + (end - start) * t / (steps - 1);
        }
        return new NoiseSchedule(LinearName, betas);
    }

    /// <summary>The cosine schedule of improved DDPM, offset s = 0.008, betas capped at 0.999.</summary>
    public static NoiseSchedule Cosine(int steps = 300, double s = 0.008)
    {
        CheckSteps(steps);
        double F(double t) => Math.Pow(Math.Cos((t / steps + s) / (1 + s) * Math.PI / 2), 2);
        var betas = new double[steps];
        for (int t = 0; t < steps; t++)
        {
            betas[t] = Math.Min(1 - F(t + 1) / F(t), 0.999);
        }
        return new NoiseSchedule(CosineName, betas);
    }

    /// <summary>The schedule called <paramref name="name"/> ("linear" or "cosine").</summary>
    public static NoiseSchedule ByName(string name, int steps = 300) => name switch
    {
        LinearName => Linear(steps),
        CosineName => Cosine(steps),
        _ => throw new ArgumentException($"unknown schedule '{name}': expected linear or cosine"),
    };

    private static void CheckSteps(int steps)
    {
        if (steps < 1)
        {
            throw new ArgumentException($"a schedule needs at least one step, not {steps}");
        }
    }
}
