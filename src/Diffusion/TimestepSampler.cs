namespace Ddpm.Diffusion;

/// <summary>
/// How training draws a timestep from a uniform u in [0, 1): uniformly over 0..T-1 (Ho et al.), or, with min-SNR-γ
/// (Hang et al. 2023), with probability proportional to the eps-prediction weight w_t = min(SNR_t, γ) / SNR_t, where
/// SNR_t = ābar_t / (1 - ābar_t). Drawing t with probability w_t / Σw and taking the plain mean squared error is the
/// weighted loss Σ_t w_t·L_t up to the constant factor T / Σw (which Adam does not see), with no weights in the loss
/// kernel: timesteps whose weight is small (the nearly clean ones, where SNR is far above γ) are simply drawn less
/// often. The metrics' loss is then the mean error at the drawn timesteps, not comparable with a uniform run's.
/// </summary>
public sealed class TimestepSampler
{
    private readonly double[]? _cdf; // null: uniform

    /// <summary>Uniform when <paramref name="minSnrGamma"/> is 0, else min-SNR-γ importance.</summary>
    public TimestepSampler(NoiseSchedule schedule, float minSnrGamma)
    {
        T = schedule.T;
        Gamma = minSnrGamma;
        if (minSnrGamma <= 0)
        {
            return;
        }
        _cdf = new double[T];
        double total = 0;
        for (int t = 0; t < T; t++)
        {
            total += Weight(schedule.AlphaBars[t], minSnrGamma);
            _cdf[t] = total;
        }
        for (int t = 0; t < T; t++)
        {
            _cdf[t] /= total;
        }
        _cdf[T - 1] = 1.0;
    }

    /// <summary>Diffusion steps.</summary>
    public int T { get; }

    /// <summary>γ (0: uniform).</summary>
    public float Gamma { get; }

    /// <summary>The eps-prediction weight of a timestep whose ābar is <paramref name="alphaBar"/>: min(SNR, γ)/SNR.</summary>
    public static double Weight(double alphaBar, double gamma)
    {
        double snr = alphaBar / Math.Max(1 - alphaBar, double.Epsilon);
        return snr <= gamma ? 1.0 : gamma / snr;
    }

    /// <summary>The probability that a draw gives <paramref name="t"/>.</summary>
    public double Probability(int t) => _cdf is null ? 1.0 / T : _cdf[t] - (t == 0 ? 0 : _cdf[t - 1]);

    /// <summary>The timestep for the uniform <paramref name="u"/> in [0, 1) (a pure function: a resumed run draws the same).</summary>
    public int At(float u)
    {
        if (_cdf is null)
        {
            // Bit for bit the draw of runs from before min-SNR: u·T in single precision, truncated.
            return (int)Math.Min(T - 1, (long)(u * T));
        }
        int index = Array.BinarySearch(_cdf, (double)u);
        // Not found: the complement of the first entry larger than u; found (u equals an entry): the next step.
        int t = index >= 0 ? index + 1 : ~index;
        return Math.Min(t, T - 1);
    }
}
