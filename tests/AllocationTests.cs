using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>Tests that need the CPU backend's helper threads to themselves: while another test holds them, a parallel
/// call runs inline (slower, though it allocates nothing), and a test that counts or stops the helpers would see
/// another test's.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class QuietCollection
{
    public const string Name = "quiet";
}

/// <summary>The training step's hot path allocates nothing after the first step: no tensor memory from the system
/// (the pool serves every buffer) and no managed objects (the tape recycles its records, values and handles, the kernels
/// pass state to static lambdas).</summary>
[Collection(QuietCollection.Name)]
public sealed class AllocationTests
{
    [Fact]
    public void TrainingStepAllocatesNothingAfterTheFirst()
    {
        using var device = new CpuDevice();
        var pixels = new byte[24 * ImageSet.MnistPixels];
        new Random(4).NextBytes(pixels);
        // 24 digits in batches of 8: the measured steps cross an epoch boundary (a new shuffle).
        using var trainer = new Trainer(device, new TrainOptions { Preset = "tiny", Batch = 8, Epochs = 100, Clip = 1f }, new ImageSet(pixels, new byte[24], 24));
        trainer.TrainStep();
        trainer.TrainStep();
        long systemAllocations = device.Stats.SystemAllocations;
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 5; i++)
        {
            trainer.TrainStep();
        }
        long bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(0, bytes);
        Assert.Equal(systemAllocations, device.Stats.SystemAllocations);
    }

    /// <summary>The classifier's training step (softmax cross-entropy on the tape, shifted images, Adam) allocates no
    /// managed memory and rents no new device memory after its first steps, as the diffusion step.</summary>
    [Fact]
    public void ClassifierTrainingStepAllocatesNothingAfterTheFirst()
    {
        using var device = new CpuDevice();
        var pixels = new byte[32 * 64];
        new Random(4).NextBytes(pixels);
        var data = new LabeledImages(pixels, [.. Enumerable.Range(0, 32).Select(i => (byte)(i % 3))], 32, 8);
        using var model = new Classifier(device, seed: 1, width: 4, classes: 3, side: 8);
        using var trainer = new ClassifierTrainer(model, batch: 8, seed: 2, maxShift: 1);
        int[] order = [.. Enumerable.Range(0, 32)];
        trainer.Step(data, order, 0);
        trainer.Step(data, order, 8);
        long systemAllocations = device.Stats.SystemAllocations;
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 5; i++)
        {
            trainer.Step(data, order, 8 * (i % 4));
        }
        long bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(0, bytes);
        Assert.Equal(systemAllocations, device.Stats.SystemAllocations);
    }

    /// <summary>A tape reset and used again computes what a new tape does, bit for bit (its recycled Var and Tensor
    /// objects carry nothing over).</summary>
    [Fact]
    public void ResetTapeMatchesANewTape()
    {
        using var device = new CpuDevice();
        var model = new UNet(16, device, seed: 5);
        using var x = Tensor.Empty(device, 2, 1, 28, 28);
        using var target = Tensor.Empty(device, 2, 1, 28, 28);
        using var t = Tensor.FromHost(device, [7f, 420f], 2);
        RandomFill.Normal(x, 1, 0);
        RandomFill.Normal(target, 2, 0);

        float[][] Gradients(Tape tape)
        {
            model.ZeroGrad();
            var loss = tape.MseLoss(model.Forward(tape, tape.Constant(x), tape.Constant(t)), tape.Constant(target));
            tape.Backward(loss);
            var grads = model.Parameters.Select(p => p.Grad!.ToArray()).ToArray();
            tape.Reset();
            return grads;
        }

        float[][] fresh;
        using (var tape = new Tape(device))
        {
            fresh = Gradients(tape);
        }
        using var reused = new Tape(device);
        Gradients(reused);
        var again = Gradients(reused);
        for (int i = 0; i < fresh.Length; i++)
        {
            Assert.Equal(fresh[i], again[i]);
        }
    }
}
