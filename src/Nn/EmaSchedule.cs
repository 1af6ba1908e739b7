namespace Ddpm.Nn;

/// <summary>
/// The decay an <see cref="Ema"/> takes at each step: <see cref="Decay"/> from the first step (the classic form), or
/// with a warm-up of power <see cref="Power"/> (ema-pytorch's <c>inv_gamma</c> 1, diffusers' <c>use_ema_warmup</c>):
/// the k-th update of the average (k = 0 first) takes min(Decay, 1 - (1 + k)^-Power). The first update then copies the
/// weights (decay 0), and the average stays a few times k^Power steps long until that reaches the set decay, so a short
/// run's average is made of trained weights, not of the random initial ones. A pure function of the step, so a resumed
/// run takes the same decays as an uninterrupted one.
/// </summary>
/// <param name="Decay">The set decay, in [0, 1): the warm-up's cap (0: no average).</param>
/// <param name="Power">The warm-up's power, in [0, 1] (0: no warm-up, <see cref="Decay"/> from the first step).</param>
/// <param name="Start">The run's step at which the average started (0, or the step at which <c>--ema</c> was switched on
/// mid-run); the warm-up counts from there.</param>
public readonly record struct EmaSchedule(float Decay, float Power, long Start = 0)
{
    /// <summary>The largest warm-up power accepted (1: a plain running mean until the cap).</summary>
    public const float MaxPower = 1f;

    /// <summary>Above this share of the averaged weights still the start's, the average is "mostly the initial weights".</summary>
    public const double MostlyInitial = 0.5;

    /// <summary>The decay of the update made by the run's step <paramref name="step"/> (0-based).</summary>
    public float At(long step)
    {
        if (Power <= 0)
        {
            return Decay;
        }
        long k = Math.Max(0, step - Start);
        double warm = 1 - Math.Pow(1 + (double)k, -Power);
        return (float)Math.Min(Decay, warm);
    }

    /// <summary>
    /// The share of the averaged weights that is still the weights the average started from, after the run's first
    /// <paramref name="steps"/> steps: the product of the decays of the updates made (a skipped step makes none, so
    /// <paramref name="skipped"/> of them are taken out, counted as the latest, which errs toward the larger share). 1 before any update.
    /// </summary>
    public double InitialShare(long steps, long skipped = 0)
    {
        long updates = Math.Max(0, steps - Start - Math.Max(0, skipped));
        if (Power <= 0)
        {
            return Math.Pow(Decay, updates);
        }
        // With a warm-up the first update copies the weights (decay 0): nothing of the start is left.
        return updates > 0 ? 0 : 1;
    }
}
