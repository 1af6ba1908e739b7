using System.Buffers.Binary;
using System.IO.Compression;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>Schedules against float64 formulas, sampler arithmetic, IDX parsing and its errors, and
/// exact resume.</summary>
public sealed class DiffusionTests
{
    [Fact]
    public void LinearScheduleMatchesTheSeed()
    {
        var s = NoiseSchedule.Linear();
        Assert.Equal(300, s.T);
        Assert.Equal(1e-4, s.Betas[0], 15);
        Assert.Equal(0.02, s.Betas[299], 15);
        Assert.Equal(1e-4 + (0.02 - 1e-4) * 150 / 299, s.Betas[150], 15);
        double product = 1;
        for (int t = 0; t < 300; t++)
        {
            product *= 1 - (1e-4 + (0.02 - 1e-4) * t / 299);
            Assert.Equal(product, s.AlphaBars[t], 12);
        }
        // ābar at the end, as torch.cumprod(1 - torch.linspace(1e-4, 0.02, 300, dtype=float64)) gives.
        Assert.Equal(0.04805842894429399, s.AlphaBars[299], 13);
    }

    [Fact]
    public void CosineScheduleMatchesImprovedDdpm()
    {
        var s = NoiseSchedule.Cosine(300);
        static double F(double t) => Math.Pow(Math.Cos((t / 300 + 0.008) / 1.008 * Math.PI / 2), 2);
        for (int t = 0; t < 299; t++)
        {
            // Unclipped steps: ābar_t = f(t + 1)/f(0) exactly.
            Assert.Equal(F(t + 1) / F(0), s.AlphaBars[t], 10);
        }
        Assert.All(s.Betas, b => Assert.InRange(b, 0, 0.999));
        Assert.Throws<ArgumentException>(() => NoiseSchedule.ByName("sqrt"));
    }

    [Fact]
    public void DdpmStepsFollowTheSpec()
    {
        var s = NoiseSchedule.Linear();
        var large = Sampler.Ddpm(s, fixedSmall: false, clip: false);
        var small = Sampler.Ddpm(s, fixedSmall: true, clip: false);
        Assert.Equal(300, large.Count);
        Assert.Equal(299, large[0].T);
        Assert.Equal(0, large[^1].T);
        Assert.Equal(0, large[^1].Sigma);
        int t = 123;
        var step = large[299 - t];
        double beta = s.Betas[t], abar = s.AlphaBars[t], alpha = 1 - beta;
        Assert.Equal(1 / Math.Sqrt(alpha), step.C1, 12);
        Assert.Equal(-beta / Math.Sqrt(1 - abar) / Math.Sqrt(alpha), step.C2, 12);
        Assert.Equal(Math.Sqrt(beta), step.Sigma, 12);
        Assert.Equal(Math.Sqrt(beta * (1 - s.AlphaBars[t - 1]) / (1 - abar)), small[299 - t].Sigma, 12);
    }

    /// <summary>
    /// Given the exact noise of a known x0 (an oracle model), deterministic DDIM lands on x0 for
    /// any number of steps: each step maps sqrt(ā_t)·x0 + sqrt(1-ā_t)·eps to the same form at
    /// ā_prev. The whole reverse loop runs on the device, so this checks the arithmetic end to end.
    /// </summary>
    [Theory]
    [InlineData(10)]
    [InlineData(300)]
    public void DdimWithAnOracleRecoversX0(int steps)
    {
        var s = NoiseSchedule.Linear();
        var plan = Sampler.Ddim(s, steps, eta: 0, clip: false);
        var d = CpuDevice.Instance;
        var rng = new Random(1);
        var x0 = Enumerable.Range(0, 2 * 16).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        var result = Sampler.Run(d, 2, plan, seed: 5, predictNoise: (x, t, eps) =>
        {
            // eps = (x_t - sqrt(ā_t)·x0)/sqrt(1-ā_t): the noise that makes x_t from x0.
            var xt = x.ToArray();
            double a = s.AlphaBars[t];
            eps.CopyFrom(xt.Select((v, i) => (float)((v - Math.Sqrt(a) * x0[i]) / Math.Sqrt(1 - a))).ToArray());
        }, height: 4, width: 4);
        for (int i = 0; i < x0.Length; i++)
        {
            Assert.Equal(x0[i], result[i], 3e-3f);
        }
    }

    [Fact]
    public void DdimStepsAreEvenlySpacedAndEtaOneIsStochastic()
    {
        var s = NoiseSchedule.Linear();
        var plan = Sampler.Ddim(s, 4, eta: 0);
        Assert.Equal([299, 199, 100, 0], plan.Select(p => p.T));
        Assert.All(plan, p => Assert.Equal(0, p.Sigma));
        var noisy = Sampler.Ddim(s, 4, eta: 1);
        Assert.True(noisy[0].Sigma > 0);
        Assert.Equal(0, noisy[^1].Sigma, 12);
        Assert.Throws<ArgumentException>(() => Sampler.Ddim(s, 301, 0));
    }

    private static byte[] Idx(int magicType, params int[] dims)
    {
        long n = dims.Aggregate(1L, (a, b) => a * b);
        var bytes = new byte[4 + 4 * dims.Length + n];
        bytes[2] = 0x08;
        bytes[3] = (byte)magicType;
        for (int i = 0; i < dims.Length; i++)
        {
            BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4 + 4 * i), dims[i]);
        }
        for (long i = 0; i < n; i++)
        {
            bytes[4 + 4 * dims.Length + i] = (byte)(i % 251);
        }
        return bytes;
    }

    [Fact]
    public void IdxParsesImagesAndLabels()
    {
        var images = Mnist.ParseIdx("img", Idx(3, 5, 28, 28));
        Assert.Equal(5, images.Count);
        Assert.Equal([28, 28], images.ItemShape);
        Assert.Equal(5 * 784, images.Values.Length);
        var labels = Mnist.ParseIdx("lbl", Idx(1, 7));
        Assert.Equal(7, labels.Count);
        Assert.Empty(labels.ItemShape);
    }

    [Theory]
    [InlineData("short", "too short")]
    [InlineData("magic", "bad IDX magic")]
    [InlineData("truncated", "truncated")]
    [InlineData("padded", "padded")]
    [InlineData("dims", "dimensions")]
    public void IdxErrorsNameTheFileAndTheProblem(string kind, string expected)
    {
        var good = Idx(3, 2, 28, 28);
        byte[] bytes = kind switch
        {
            "short" => good[..6],
            "magic" => [.. new byte[] { 0x1f, 0x8b, 8, 3 }, .. good[4..]],
            "truncated" => good[..^10],
            "padded" => [.. good, 0],
            "dims" => [0, 0, 8, 9, 0, 0, 0, 1],
            _ => good,
        };
        var e = Assert.Throws<DataException>(() => Mnist.ParseIdx("train-images-idx3-ubyte", bytes));
        Assert.Contains("train-images-idx3-ubyte", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void GzippedFilesAreReadAndANonMnistSetLoadsWithoutMd5()
    {
        var dir = Directory.CreateTempSubdirectory("ddpm-idx").FullName;
        try
        {
            var raw = Idx(3, 2, 28, 28);
            var gzPath = Path.Combine(dir, "train-images-idx3-ubyte.gz");
            using (var f = File.Create(gzPath))
            using (var gz = new GZipStream(f, CompressionLevel.Fastest))
            {
                gz.Write(raw);
            }
            Assert.Equal(raw[16..], Mnist.ReadIdx(gzPath).Values);
            // Structurally valid but not MNIST: md5 is checked only on fetch, so the set loads (and nothing is fetched).
            byte[] labels = [0, 0, 8, 1, 0, 0, 0, 2, 3, 7];
            File.WriteAllBytes(Path.Combine(dir, "train-labels-idx1-ubyte"), labels);
            var set = Mnist.LoadTraining(dir);
            Assert.Equal(2, set.Count);
            Assert.Equal(raw[16..], set.Images);
            Assert.Equal([3, 7], set.Labels);
            // Images where labels belong: refused, naming the file and the magic.
            File.WriteAllBytes(Path.Combine(dir, "train-labels-idx1-ubyte"), raw);
            var e = Assert.Throws<DataException>(() => Mnist.LoadTraining(dir));
            Assert.Contains("train-labels-idx1-ubyte", e.Message);
            Assert.Contains("magic", e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static ImageSet Synthetic(int count)
    {
        var pixels = new byte[count * ImageSet.MnistPixels];
        new Random(2).NextBytes(pixels);
        return new ImageSet(pixels, new byte[count], count);
    }

    /// <summary>Training 6 steps straight equals 3 steps, a checkpoint, a resume and 3 more: same
    /// losses bit for bit, same weights (every random draw is a function of the seed and the step).</summary>
    [Fact]
    public void ResumeContinuesExactly()
    {
        var d = CpuDevice.Instance;
        var data = Synthetic(40);
        var options = new TrainOptions { Preset = "tiny", Batch = 8, Epochs = 2, EmaDecay = 0.9f, Clip = 1f, Seed = 3, Warmup = 2, LrDecay = "cosine" };
        using var straight = new Trainer(d, options, data);
        var want = Enumerable.Range(0, 6).Select(_ => straight.TrainStep()).ToArray();

        var dir = Directory.CreateTempSubdirectory("ddpm-resume").FullName;
        try
        {
            var path = Path.Combine(dir, "model.safetensors");
            var got = new List<float>();
            using (var first = new Trainer(d, options, data))
            {
                for (int i = 0; i < 3; i++)
                {
                    got.Add(first.TrainStep());
                }
                first.Save(path);
            }
            using var resumed = Trainer.Resume(d, path, data);
            Assert.Equal(3, resumed.Step);
            for (int i = 0; i < 3; i++)
            {
                got.Add(resumed.TrainStep());
            }
            Assert.Equal(want, got);
            Assert.Equal(straight.Model["conv_out.weight"].Value.ToArray(), resumed.Model["conv_out.weight"].Value.ToArray());
            Assert.Equal(straight.Ema!.Weights[0].ToArray(), resumed.Ema!.Weights[0].ToArray());
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// Min-SNR-γ by importance: without γ the draw is the uniform one of every earlier run, bit for bit; with γ the
    /// probability of t is min(SNR_t, γ)/SNR_t over its sum (the timesteps noisier than SNR γ all alike and the most
    /// likely, the clean end rare), and a fine grid of uniforms lands on each t in that proportion.
    /// </summary>
    [Fact]
    public void MinSnrDrawsTimestepsInProportionToTheirWeight()
    {
        var schedule = NoiseSchedule.ByName("cosine", 300);
        var uniform = new TimestepSampler(schedule, 0);
        for (int i = 0; i < 1 << 16; i++)
        {
            float u = i / 65536f;
            Assert.Equal((int)Math.Min(299, (long)(u * 300)), uniform.At(u));
        }
        var minSnr = new TimestepSampler(schedule, 5);
        Assert.Equal(1.0, Enumerable.Range(0, 300).Sum(minSnr.Probability), 9);
        double total = Enumerable.Range(0, 300).Sum(t => TimestepSampler.Weight(schedule.AlphaBars[t], 5));
        var counts = new int[300];
        const int Grid = 1 << 22;
        for (int i = 0; i < Grid; i++)
        {
            counts[minSnr.At((i + 0.5f) / Grid)]++;
        }
        for (int t = 0; t < 300; t++)
        {
            double want = TimestepSampler.Weight(schedule.AlphaBars[t], 5) / total;
            Assert.Equal(want, minSnr.Probability(t), 9);
            Assert.InRange((double)counts[t] / Grid, want - 2e-5, want + 2e-5);
        }
        int noisy = Enumerable.Range(0, 300).First(t => schedule.AlphaBars[t] / (1 - schedule.AlphaBars[t]) <= 5);
        Assert.Equal(minSnr.Probability(299), minSnr.Probability(noisy), 12);
        Assert.True(minSnr.Probability(0) < minSnr.Probability(299) / 100, "the clean end is not rare");
        Assert.Equal(299, minSnr.At(0.99999994f));
    }

    /// <summary>Warm-up rises linearly to the peak; the cosine then falls to a tenth of it at the last step, never below.</summary>
    [Fact]
    public void LearningRateWarmsUpThenFallsByACosine()
    {
        // 40 digits at batch 8: 5 steps an epoch, 22 epochs = 110 steps, 10 of them warm-up.
        var options = new TrainOptions { Preset = "tiny", Batch = 8, Epochs = 22, Lr = 2e-3f, Warmup = 10, LrDecay = "cosine" };
        using var trainer = new Trainer(CpuDevice.Instance, options, Synthetic(40));
        Assert.Equal(110, trainer.TotalSteps);
        Assert.Equal(2e-4f, trainer.LearningRateAt(0), 1e-9f);
        Assert.Equal(2e-3f, trainer.LearningRateAt(9), 1e-9f);
        Assert.Equal(2e-3f, trainer.LearningRateAt(10), 1e-9f);
        Assert.Equal(2e-3f * Trainer.CosineFloor, trainer.LearningRateAt(109), 1e-9f);
        Assert.Equal(2e-3f * Trainer.CosineFloor, trainer.LearningRateAt(500), 1e-9f);
        Assert.Equal(2e-3f * (Trainer.CosineFloor + 1) / 2, trainer.LearningRateAt(59), 2e-5f); // about halfway down
        for (long step = 11; step < 110; step++)
        {
            Assert.True(trainer.LearningRateAt(step) < trainer.LearningRateAt(step - 1), $"not falling at step {step}");
        }
        using var constant = new Trainer(CpuDevice.Instance, options with { Warmup = 0, LrDecay = "constant" }, Synthetic(40));
        Assert.All(new long[] { 0, 50, 109 }, s => Assert.Equal(2e-3f, constant.LearningRateAt(s)));
    }

    [Fact]
    public void NaNLossStopsWithTheStep()
    {
        var options = new TrainOptions { Preset = "tiny", Batch = 4, Lr = 1e30f, Seed = 1 };
        using var trainer = new Trainer(CpuDevice.Instance, options, Synthetic(8));
        var e = Assert.Throws<TrainingDivergedException>(() =>
        {
            for (int i = 0; i < 20; i++)
            {
                trainer.TrainStep();
            }
        });
        Assert.Contains("step", e.Message);
    }
}
