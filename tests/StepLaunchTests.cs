using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>
/// The training step on ILGPU's CPU accelerator, queued without host synchronisation: its loss against the managed
/// CPU backend, the counts of launches, memsets and waits per step (counters, not timings), and a non-finite step
/// that the device skips and the read-back reports.
/// </summary>
[Collection(IlgpuCollection.Name)]
public sealed class StepLaunchTests(IlgpuFixture gpu, ITestOutputHelper output)
{
    /// <summary>The target for a train step of any preset (every preset has the same layers): under 150.</summary>
    private const int LaunchTarget = 150;

    private static ImageSet Synthetic(int count)
    {
        var rng = new Random(5);
        var pixels = new byte[count * ImageSet.MnistPixels];
        rng.NextBytes(pixels);
        return new ImageSet(pixels, new byte[count], count);
    }

    private static float[] Poisoned(float[] values)
    {
        var copy = (float[])values.Clone();
        copy[0] = float.NaN;
        return copy;
    }

    private static TrainOptions Tiny => new() { Preset = "tiny", Batch = 1, EmaDecay = 0.9f, Clip = 0.5f, Seed = 3 };

    /// <summary>
    /// Three queued steps on ILGPU, the second made non-finite (a NaN planted in a bias, removed behind it on the stream),
    /// against the same three steps on the managed CPU backend: no host synchronisation while queueing, under 150
    /// launches a step, the skipped step reported at the read-back and changing nothing on either device, and the
    /// losses, gradient norm, weights and EMA of the two backends agreeing. (One trainer a backend: each ILGPU step
    /// costs the simulator seconds.)
    /// </summary>
    [Fact]
    public void AQueuedIlgpuStepWaitsForNothingSkipsANonFiniteStepAndLosesWhatTheCpuLoses()
    {
        var data = Synthetic(4);
        using var cpu = new Trainer(CpuDevice.Instance, Tiny, data);
        using var trainer = new Trainer(gpu.Device, Tiny, data);
        Assert.True(trainer.Model.Parameters.IsFlat);
        var kernels = IlgpuKernels.For(gpu.Device);
        var counters = gpu.Device.Counters;
        var steps = new List<CounterSnapshot>();
        var optim = new List<long>();
        var bias = trainer.Model["conv_out.bias"];
        var cpuBias = cpu.Model["conv_out.bias"];
        float[] good = [];
        for (int i = 0; i < 3; i++)
        {
            if (i == 1)
            {
                // The bias as the first step left it (read between the steps, outside the counted queueing), one NaN in it.
                good = bias.Value.ToArray();
                bias.Value.CopyFrom(Poisoned(good));
            }
            long optimBefore = kernels.Launches.Where(k => k.Family == nameof(Optim)).Sum(k => k.Launches);
            var before = counters.Snapshot();
            trainer.QueueStep();
            steps.Add(counters.Snapshot() - before);
            optim.Add(kernels.Launches.Where(k => k.Family == nameof(Optim)).Sum(k => k.Launches) - optimBefore);
            if (i == 1)
            {
                bias.Value.CopyFrom(good); // queued behind the step: the next one is finite
            }
        }
        var beforeRead = counters.Snapshot();
        var results = trainer.ReadBack();
        var read = counters.Snapshot() - beforeRead;
        var want = new float[3];
        for (int i = 0; i < 3; i++)
        {
            float[] before = cpuBias.Value.ToArray();
            if (i == 1)
            {
                cpuBias.Value.CopyFrom(Poisoned(before));
            }
            want[i] = cpu.TrainStep();
            if (i == 1)
            {
                cpuBias.Value.CopyFrom(before);
            }
        }

        foreach (var s in steps)
        {
            output.WriteLine($"step: {s.Launches} launches, {s.Memsets} memsets, {s.Copies} copies, {s.AsyncUploads} async uploads, {s.Synchronizations} synchronisations");
            Assert.Equal(0, s.Synchronizations);
            Assert.Equal(4, s.AsyncUploads); // x0, t, and the two noising coefficients (no labels)
            // docs/gpu.md's count: 142 launches, +1 EMA and +2 clipping (both on here).
            Assert.True(s.Launches < LaunchTarget, $"{s.Launches} launches a step, the target is under {LaunchTarget}");
        }
        // The optimizer's share is a handful of launches whatever the parameter count (86 here): flag, prepare, Adam, EMA.
        Assert.Equal([4, 4, 4], optim);
        Assert.Equal(1, read.Synchronizations);
        Assert.Equal(0, read.Launches);
        Assert.Equal(3, results.Count);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(i + 1, results[i].Step);
        }
        Assert.Null(results[0].Skip);
        Assert.NotNull(results[1].Skip);
        Assert.Contains("step 1", results[1].Skip);
        Assert.Contains("not finite", results[1].Skip);
        Assert.True(float.IsNaN(results[1].Loss));
        Assert.Null(results[2].Skip);
        Assert.Null(trainer.LastSkip);
        Assert.Equal(1, trainer.Skipped);
        Assert.Equal(1, cpu.Skipped);
        foreach (int i in new[] { 0, 2 })
        {
            Assert.True(Math.Abs(results[i].Loss - want[i]) <= 1e-4f * want[i], $"step {i}: ilgpu loss {results[i].Loss}, cpu {want[i]}");
        }
        Assert.Equal(2, trainer.Adam.Step);
        Assert.Equal(2, cpu.Adam.Step);
        Assert.Equal(cpu.LastGradNorm, trainer.LastGradNorm, 1e-4 * cpu.LastGradNorm);
        // Adam's first steps move each weight by up to lr, and a gradient near zero (|g| ~ eps = 1e-8) can round to either
        // sign on the two backends: so the weights are compared as a whole, against how far the two steps moved them.
        using var fresh = new Trainer(CpuDevice.Instance, Tiny, data);
        var w0 = fresh.Model.Parameters.SelectMany(p => p.Value.ToArray()).ToArray();
        var wp = cpu.Model.Parameters.SelectMany(p => p.Value.ToArray()).ToArray();
        var gp = trainer.Model.Parameters.Values!.ToArray();
        var we = cpu.Ema!.Weights.SelectMany(w => w.ToArray()).ToArray();
        var ge = trainer.Ema!.Weights.SelectMany(w => w.ToArray()).ToArray();
        static double Distance(float[] a, float[] b) => Math.Sqrt(a.Zip(b, (x, y) => (double)(x - y) * (x - y)).Sum());
        double moved = Distance(wp, w0);
        output.WriteLine($"weights moved {moved:G4}; ilgpu from cpu {Distance(gp, wp):G4}; ema from cpu {Distance(ge, we):G4}");
        Assert.True(gp.All(float.IsFinite), "the skipped step left non-finite weights");
        Assert.True(moved > 0.1, $"the two steps moved the weights by only {moved}");
        Assert.True(Distance(gp, wp) < 0.01 * moved, $"ilgpu weights are {Distance(gp, wp)} from the cpu's, the steps moved them {moved}");
        Assert.True(Distance(ge, we) < 0.01 * Distance(we, w0), $"ilgpu ema is {Distance(ge, we)} from the cpu's");
    }
}
