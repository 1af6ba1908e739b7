namespace Ddpm.Diffusion;

/// <summary>The learning-rate schedule: warm-up, then constant or a cosine decay.</summary>
public sealed partial class Trainer
{
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
        if (Options.LrDecay == TrainSettings.Cosine)
        {
            long span = Math.Max(1, TotalSteps - 1 - Options.Warmup);
            double progress = Math.Clamp((double)(step - Options.Warmup) / span, 0, 1);
            lr *= CosineFloor + (1 - CosineFloor) * 0.5 * (1 + Math.Cos(Math.PI * progress));
        }
        return (float)lr;
    }
}
