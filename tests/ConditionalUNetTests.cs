using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>The class-conditional U-Net (label_emb [11, 4ch], label 10 = none): the peer's parameter layout,
/// the label reaching the output, the embedding's gradient, checkpoints and exact resume.</summary>
public sealed class ConditionalUNetTests
{
    private static readonly CpuDevice D = CpuDevice.Instance;

    [Fact]
    public void ParameterCountAndOrderMatchThePeer()
    {
        var model = new UNet(16, D, classes: 10);
        // torch_unet.py params --preset tiny --classes 10.
        Assert.Equal(280_113, model.ParameterCount);
        var names = model.Parameters.Select(p => p.Name).ToArray();
        // The peer's order: label_emb.weight right after time_lin2, before conv_in.
        Assert.Equal(["time_lin1.weight", "time_lin1.bias", "time_lin2.weight", "time_lin2.bias", "label_emb.weight", "conv_in.weight"], names[..6]);
        Assert.Equal([11, 64], model["label_emb.weight"].Shape);
        // N(0, 1): mean near 0 and variance near 1 over 704 draws.
        var e = model["label_emb.weight"].Value.ToArray();
        Assert.InRange(e.Average(), -0.15, 0.15);
        Assert.InRange(e.Average(v => (double)v * v), 0.8, 1.2);
        Assert.Equal(279_409, new UNet(16, D).ParameterCount);
    }

    [Fact]
    public void TheLabelChangesTheOutput()
    {
        var model = new UNet(16, D, seed: 4, classes: 10);
        var x = new float[2 * 784];
        for (int i = 0; i < x.Length; i++)
        {
            x[i] = MathF.Sin(i * 0.37f);
        }
        float[] Eps(float label)
        {
            using var tape = Tape.NoGrad(D);
            using var xs = Tensor.FromHost(D, x, 2, 1, 28, 28);
            using var t = Tensor.FromHost(D, [5f, 200f], 2);
            using var y = Tensor.FromHost(D, [label, label], 2);
            var result = model.Forward(tape, tape.Constant(xs), tape.Constant(t), tape.Constant(y)).Value.ToArray();
            tape.Reset();
            return result;
        }
        var three = Eps(3);
        Assert.NotEqual(three, Eps(7));
        Assert.NotEqual(three, Eps(10));
        Assert.Equal(three, Eps(3));
        Assert.Throws<ArgumentException>(() =>
        {
            using var tape = Tape.NoGrad(D);
            using var xs = Tensor.FromHost(D, x, 2, 1, 28, 28);
            using var t = Tensor.FromHost(D, [5f, 200f], 2);
            model.Forward(tape, tape.Constant(xs), tape.Constant(t));
        });
    }

    /// <summary>The embedding's gradient by finite differences (the OpCatalog case, on the CPU backend) and, end to end,
    /// only the rows of the labels used get a gradient, each the sum over its batch entries.</summary>
    [Fact]
    public void EmbeddingGradient()
    {
        var result = Checker.GradCheck(OpCatalog.Get("label embedding (one-hot x table)"), D);
        Assert.True(result.Pass, result.ToString());

        using var table = Tensor.FromHost(D, [.. Enumerable.Range(0, 33).Select(i => i * 0.1f)], 11, 3);
        var p = new Parameter("label_emb.weight", table);
        p.ZeroGrad();
        using var tape = new Tape(D);
        using var labels = Tensor.FromHost(D, [2f, 10f, 2f], 3);
        var y = tape.Embedding(tape.Constant(labels), p);
        // Exactly the table's rows 2, 10, 2 (a one-hot product adds only zeros to them).
        var rows = table.ToArray();
        Assert.Equal([.. rows[6..9], .. rows[30..33], .. rows[6..9]], y.Value.ToArray());
        using var target = Tensor.FromHost(D, new float[9], 3, 3);
        tape.Backward(tape.MseLoss(y, tape.Constant(target)));
        var g = p.Grad!.ToArray();
        for (int row = 0; row < 11; row++)
        {
            for (int c = 0; c < 3; c++)
            {
                // d mean(y²)/dy = 2y/9; row 2 is used twice.
                float want = row == 2 ? 2 * 2 * (0.6f + 0.1f * c) / 9 : row == 10 ? 2 * (3.0f + 0.1f * c) / 9 : 0f;
                Assert.Equal(want, g[row * 3 + c], 5);
            }
        }
        p.Grad!.Dispose();
        tape.Reset();
    }

    [Fact]
    public void CheckpointRoundTripAndRefusals()
    {
        var dir = Directory.CreateTempSubdirectory("ddpm-cond").FullName;
        try
        {
            var path = Path.Combine(dir, "c.safetensors");
            var model = new UNet(16, D, seed: 2, classes: 10);
            Checkpoint.Save(path, model);
            var info = Checkpoint.Inspect(path);
            Assert.Equal(10, info.Classes);
            Assert.Equal("10", info.Metadata[Checkpoint.ClassesKey]);
            var back = new UNet(16, D, seed: 9, classes: 10);
            Checkpoint.Load(path, back);
            Assert.Equal(model["label_emb.weight"].Value.ToArray(), back["label_emb.weight"].Value.ToArray());
            Assert.Equal(model["conv_out.weight"].Value.ToArray(), back["conv_out.weight"].Value.ToArray());
            // An unconditional model does not load it, nor the reverse.
            Assert.Contains("10-class conditional", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, new UNet(16, D))).Message);
            var plain = Path.Combine(dir, "u.safetensors");
            Checkpoint.Save(plain, new UNet(16, D));
            Assert.Equal(0, Checkpoint.Inspect(plain).Classes);
            Assert.Throws<CheckpointException>(() => Checkpoint.Load(plain, new UNet(16, D, classes: 10)));

            var tensors = model.Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())).ToList();
            string Refusal(List<(string, int[], float[])> ts, Dictionary<string, string>? meta = null)
            {
                var bad = Path.Combine(dir, "bad.safetensors");
                SafeTensors.Write(bad, ts, meta ?? []);
                return Assert.Throws<CheckpointException>(() => Checkpoint.Inspect(bad)).Message;
            }
            // A wrong label_emb shape.
            var wrong = tensors.Select(t => t.Name == "label_emb.weight" ? (t.Name, new[] { 11, 32 }, new float[352]) : t).ToList();
            Assert.Contains("'label_emb.weight' is 11x32, expected 11x64", Refusal(wrong));
            // One class (label_emb [2, 64]) is no conditional model: the class count comes from the shape, 2..1000.
            var one = tensors.Select(t => t.Name == "label_emb.weight" ? (t.Name, new[] { 2, 64 }, new float[128]) : t).ToList();
            Assert.Contains("not [classes + 1, 4ch] for 2..1000 classes", Refusal(one));
            // Metadata that claims another class count than the tensors.
            Assert.Contains("'classes'", Refusal(tensors, new() { [Checkpoint.ClassesKey] = "0" }));
            Assert.Contains("'classes'", Refusal(tensors.Where(t => t.Name != "label_emb.weight").ToList(), new() { [Checkpoint.ClassesKey] = "10" }));
            // A partial conditional checkpoint: Adam state without label_emb's moments.
            var partial = tensors.Concat(tensors.Where(t => t.Name != "label_emb.weight").SelectMany(t => new[] { ($"adam.m.{t.Name}", t.Shape, t.Item3), ($"adam.v.{t.Name}", t.Shape, new float[t.Item3.Length]) })).ToList();
            Assert.Contains("adam.m.label_emb.weight", Refusal(partial, new() { [Checkpoint.AdamStepKey] = "1" }));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>As DiffusionTests.ResumeContinuesExactly, with classes: the label dropout is a function of (seed, step).</summary>
    [Fact]
    public void ConditionalResumeContinuesExactly()
    {
        var pixels = new byte[40 * ImageSet.MnistPixels];
        new Random(2).NextBytes(pixels);
        var data = new ImageSet(pixels, [.. Enumerable.Range(0, 40).Select(i => (byte)(i % 10))], 40);
        var options = new TrainOptions { Preset = "tiny", Batch = 8, Epochs = 2, Seed = 3, Classes = 10 };
        using var straight = new Trainer(D, options, data);
        var want = Enumerable.Range(0, 6).Select(_ => straight.TrainStep()).ToArray();
        var dir = Directory.CreateTempSubdirectory("ddpm-cond-resume").FullName;
        try
        {
            var path = Path.Combine(dir, "model.safetensors");
            var got = new List<float>();
            using (var first = new Trainer(D, options, data))
            {
                for (int i = 0; i < 3; i++)
                {
                    got.Add(first.TrainStep());
                }
                first.Save(path);
            }
            using var resumed = Trainer.Resume(D, path, data);
            Assert.Equal(10, resumed.Options.Classes);
            for (int i = 0; i < 3; i++)
            {
                got.Add(resumed.TrainStep());
            }
            Assert.Equal(want, got);
            Assert.Equal(straight.Model["label_emb.weight"].Value.ToArray(), resumed.Model["label_emb.weight"].Value.ToArray());
            // The embedding trained: it moved from its initial value.
            Assert.NotEqual(new UNet(16, D, options.Seed, 10)["label_emb.weight"].Value.ToArray(), resumed.Model["label_emb.weight"].Value.ToArray());
            Assert.Contains("--classes cannot change", Assert.Throws<UsageException>(() => Trainer.Resume(D, path, data, o => o with { Classes = 0 })).Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
