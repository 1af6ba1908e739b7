using System.Globalization;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>One training step as read back: its number (1-based, as <see cref="Trainer.Step"/> after it), its loss, why the
/// optimizer skipped it (null when it did not), the gradient norm before clipping and Adam's learning rate as of that step
/// (a skipped step keeps the previous step's; the norm is NaN without clipping).</summary>
public readonly record struct StepResult(long Step, float Loss, string? Skip, float GradNorm, float Lr);

/// <summary>Reading queued steps back: losses, skips, learning rates, one synchronisation a round.</summary>
public sealed partial class Trainer
{
    /// <summary>The steps the last <see cref="ReadBack"/> read, in order: also when it threw <see cref="TrainingDivergedException"/>
    /// (then up to and including the step that ended the run), so a caller can still record them.</summary>
    public IReadOnlyList<StepResult> LastRead => _results;

    /// <summary>
    /// Reads the queued steps' losses and skip flags in one device read and returns them in order (the list is reused by
    /// the next call). A skipped step gets its reason, also in <see cref="LastSkip"/>, and counts in <see cref="Skipped"/>;
    /// <see cref="MaxConsecutiveSkips"/> in a row throw <see cref="TrainingDivergedException"/>.
    /// </summary>
    public IReadOnlyList<StepResult> ReadBack()
    {
        _results.Clear();
        if (_pending == 0)
        {
            return _results;
        }
        int count = _pending, applied = 0;
        _pending = 0;
        _records.CopyTo(_hostRecords);
        _records.Zero(); // the flags start at zero for the next steps (queued, no wait)
        long first = Step - count;
        try
        {
            for (int k = 0; k < count; k++)
            {
                var r = _hostRecords.AsSpan(k * Optim.RecordLength, Optim.RecordLength);
                float loss = r[0];
                long step = first + k;
                if (r[3] != 0)
                {
                    int bad = Optim.FirstFlagged(r[1]);
                    LastSkip = $"step {step} (epoch {step / StepsPerEpoch + 1}): " +
                        (bad >= 0 ? $"the gradient of '{Model.Parameters[Model.Parameters.IndexOfElement(bad)].Name}' is not finite (loss {loss.ToString(CultureInfo.InvariantCulture)})" : $"the loss is {loss.ToString(CultureInfo.InvariantCulture)}") +
                        "; the optimizer skipped the step";
                    Skipped++;
                    _results.Add(new StepResult(step + 1, loss, LastSkip, LastGradNorm, _appliedLr));
                    if (++_consecutiveSkips >= MaxConsecutiveSkips)
                    {
                        throw new TrainingDivergedException(
                            $"training diverged: {_consecutiveSkips} steps in a row were not finite, the last at {LastSkip}; try --resume with a lower --lr, or --clip 1");
                    }
                    continue;
                }
                _consecutiveSkips = 0;
                LastSkip = null;
                applied++;
                _appliedLr = LearningRateAt(step);
                if (Options.Clip > 0)
                {
                    LastGradNorm = MathF.Sqrt(r[2]);
                }
                _results.Add(new StepResult(step + 1, loss, null, LastGradNorm, _appliedLr));
            }
        }
        finally
        {
            Adam.Applied(applied);
            Adam.LearningRate = _appliedLr; // as after the last step the optimizer took (a skipped step leaves it)
        }
        return _results;
    }
}
