using Ddpm.Cli;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>
/// The pieces of <c>ddpm eval</c> on synthetic data (CI has no MNIST and never trains the real classifier): the
/// Fréchet distance and the class KL on known values, and a tiny stand-in classifier that learns a 2-class set and
/// survives a save/load round trip. The softmax cross-entropy's gradient is checked by the OpCatalog case.
/// </summary>
public sealed class EvalTests
{
    private static float[] Normal(int n, int seed)
    {
        var rng = new Random(seed);
        var v = new float[n];
        for (int i = 0; i < n; i++)
        {
            v[i] = (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));
        }
        return v;
    }

    [Fact]
    public void FrechetOfASetAgainstItselfIsZero()
    {
        var a = Normal(300 * 6, 1);
        Assert.InRange(SampleScores.FrechetDistance(a, 300, a, 300, 6), 0, 1e-8);
    }

    [Fact]
    public void FrechetOfAShiftedSetIsTheSquaredShift()
    {
        // Same covariance, means apart by 1 in each of 6 dimensions: FD = ‖Δμ‖² = 6 exactly (the trace terms cancel).
        const int n = 300, d = 6;
        var a = Normal(n * d, 2);
        var b = a.Select(v => v + 1f).ToArray();
        Assert.Equal(6.0, SampleScores.FrechetDistance(a, n, b, n, d), 4);
    }

    [Fact]
    public void FrechetInOneDimensionIsMeanAndDeviationGap()
    {
        // d = 1: FD = (μa - μb)² + (σa - σb)², which checks the square-root term: b = 3a + 2 gives σb = 3σa.
        const int n = 500;
        var a = Normal(n, 3);
        var b = a.Select(v => 3 * v + 2).ToArray();
        double mean = a.Average(v => (double)v);
        double sd = Math.Sqrt(a.Sum(v => (v - mean) * (v - mean)) / (n - 1));
        double expected = Math.Pow(2 * mean + 2, 2) + Math.Pow(2 * sd, 2);
        Assert.Equal(expected, SampleScores.FrechetDistance(a, n, b, n, 1), 3);
    }

    [Fact]
    public void KlOfAUniformHistogramIsZeroAndOfOneClassIsLogK()
    {
        Assert.Equal(0.0, SampleScores.KlToUniform([100, 100, 100, 100, 100, 100, 100, 100, 100, 100]), 12);
        Assert.Equal(Math.Log(10), SampleScores.KlToUniform([0, 0, 0, 1000, 0, 0, 0, 0, 0, 0]), 12);
        Assert.True(SampleScores.KlToUniform([90, 110, 100, 100, 100, 100, 100, 100, 100, 100]) > 0);
    }

    [Fact]
    public void ScoresCountConfidenceAndHistogram()
    {
        // Three digits, two classes: confidences 0.95, 0.6, 0.99; classes 0, 1, 0.
        float[] probs = [0.95f, 0.05f, 0.4f, 0.6f, 0.99f, 0.01f];
        float[] features = [0, 1, 1, 0, 2, 2];
        var s = SampleScores.Of(probs, features, 3, 2, features, 3);
        Assert.Equal((0.95 + 0.6 + 0.99) / 3, s.MeanConfidence, 5);
        Assert.Equal(2.0 / 3, s.ConfidentShare, 12);
        Assert.Equal([2, 1], s.Histogram);
        Assert.InRange(s.Frechet, 0, 1e-8);
    }

    [Fact]
    public void AskedShareCountsTheAskedClassOverallAndPerClass()
    {
        // Four samples, three classes: asked 0, 0, 2, 2; classified 0, 1, 2, 2.
        float[] probs = [0.8f, 0.1f, 0.1f, 0.2f, 0.7f, 0.1f, 0.1f, 0.1f, 0.8f, 0.3f, 0.3f, 0.4f];
        var (overall, byClass) = SampleScores.AskedShare(probs, [0, 0, 2, 2], 3);
        Assert.Equal(0.75, overall, 12);
        Assert.Equal([0, 2], byClass.Keys);
        Assert.Equal(0.5, byClass[0], 12);
        Assert.Equal(1.0, byClass[2], 12);
        Assert.Throws<ArgumentException>(() => SampleScores.AskedShare(probs, [0, 0, 2], 3));
    }

    [Fact]
    public void ByClassRowsHoldTheFirstOfEachClassConfidentFirst()
    {
        // Classes of samples 0..6: 1 (unsure), 1, 0, 1, 1 (unsure), 1, 2 (unsure); at most 3 a row.
        float[] probs =
        [
            0.3f, 0.5f, 0.2f, 0f, 0.95f, 0.05f, 0.99f, 0f, 0.01f, 0f, 0.92f, 0.08f,
            0.2f, 0.6f, 0.2f, 0f, 1f, 0f, 0.1f, 0.1f, 0.8f,
        ];
        var rows = EvalReport.ByClass(probs, 7, 3, perRow: 3);
        Assert.Equal([2], rows[0]);
        // The first three of class 1 are 0, 1, 3; sample 0 is unsure, so last.
        Assert.Equal([1, 3, 0], rows[1]);
        Assert.Equal([6], rows[2]);
        Assert.True(EvalReport.Unsure(probs, 6, 3));
        Assert.False(EvalReport.Unsure(probs, 2, 3));
    }

    /// <summary>8×8 images: class 0 bright on the left half, class 1 on the right, with pixel noise.</summary>
    private static LabeledImages Halves(int count, int seed)
    {
        var rng = new Random(seed);
        var images = new byte[count * 64];
        var labels = new byte[count];
        for (int i = 0; i < count; i++)
        {
            labels[i] = (byte)(i % 2);
            for (int p = 0; p < 64; p++)
            {
                bool bright = (p % 8 < 4) == (labels[i] == 0);
                images[i * 64 + p] = (byte)Math.Clamp((bright ? 160 : 60) + rng.Next(-60, 61), 0, 255);
            }
        }
        return new LabeledImages(images, labels, count, 8);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    public void TinyClassifierLearnsTwoClassesAndSurvivesSaveAndLoad(int maxShift)
    {
        var device = CpuDevice.Instance;
        var train = Halves(256, 5);
        var test = Halves(64, 6);
        using var model = new Classifier(device, seed: 1, width: 4, classes: 2, side: 8);
        List<double> losses;
        using (var trainer = new ClassifierTrainer(model, batch: 16, lr: 3e-3f, seed: 2, maxShift: maxShift))
        {
            losses = trainer.Train(train, epochs: 3);
        }
        Assert.True(losses[^1] < losses[0] * 0.5, $"loss did not fall: {string.Join(", ", losses)}");
        double accuracy = model.Accuracy(test);
        Assert.True(accuracy >= 0.95, $"accuracy {accuracy}");

        string path = Path.Combine(Path.GetTempPath(), $"ddpm-clf-{Guid.NewGuid():N}.safetensors");
        try
        {
            model.Save(path);
            using var loaded = Classifier.Load(path, device);
            Assert.Equal(model.Predict(test).Probabilities, loaded.Predict(test).Probabilities);

            // A non-finite weight is refused by name.
            var weights = model.Parameters.Select(p => (p.Name, p.Shape, Data: p.Value.ToArray())).ToList();
            weights[2].Data[0] = float.NaN;
            SafeTensors.Write(path, weights, new Dictionary<string, string>
            {
                [Classifier.FormatKey] = Classifier.FormatValue, ["width"] = "4", ["classes"] = "2", ["side"] = "8",
            });
            var e = Assert.Throws<CheckpointException>(() => Classifier.Load(path, device));
            Assert.Contains(weights[2].Name, e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }
}

/// <summary><c>ddpm eval</c>'s refusals, all before any classifier is trained or MNIST is read (CI has neither).
/// Serial with the other CLI tests: they swap the process's console writers.</summary>
[Collection(CliCollection.Name)]
public sealed class EvalCliTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-eval").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static void OneLine((int Code, string Err, string Out) r, int code, string contains)
    {
        Assert.Equal(code, r.Code);
        Assert.Single(r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries), l => l.StartsWith("ddpm: ", StringComparison.Ordinal));
        Assert.Contains(contains, r.Err);
        Assert.Equal("", r.Out);
    }

    private string Idx(int count, int side)
    {
        var bytes = new byte[16 + count * side * side];
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes, 0x00000803);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4), count);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(8), side);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(12), side);
        string path = Path.Combine(_dir, $"s{count}x{side}-idx3-ubyte");
        File.WriteAllBytes(path, bytes);
        return path;
    }

    /// <summary>
    /// A stand-in for MNIST (CI has none) and for the cached classifier: 30 random training and 30 random test
    /// "digits", labelled 0..9 in turn, and an untrained 28×28 classifier of width 2 with 10 classes (the figures are
    /// meaningless; the plumbing, the JSON and the report are what is checked).
    /// </summary>
    private (string Data, string Classifier) StandIns()
    {
        string data = Path.Combine(_dir, "mnist");
        Directory.CreateDirectory(data);
        var rng = new Random(4);
        foreach (var (images, labels) in new[] { ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte") })
        {
            var pixels = new byte[30 * 784];
            rng.NextBytes(pixels);
            File.WriteAllBytes(Path.Combine(data, images), [.. Header(0x803, 30, 28, 28), .. pixels]);
            File.WriteAllBytes(Path.Combine(data, labels), [.. Header(0x801, 30), .. Enumerable.Range(0, 30).Select(i => (byte)(i % 10))]);
        }
        string classifier = Path.Combine(_dir, "stand-in.safetensors");
        using (var model = new Classifier(CpuDevice.Instance, seed: 1, width: 2, classes: 10, side: 28))
        {
            model.Save(classifier);
        }
        return (data, classifier);
    }

    private static byte[] Header(int magic, params int[] dims)
    {
        var bytes = new byte[4 + 4 * dims.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes, magic);
        for (int i = 0; i < dims.Length; i++)
        {
            System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4 + 4 * i), dims[i]);
        }
        return bytes;
    }

    private static System.Text.Json.JsonElement Json((int Code, string Err, string Out) r)
    {
        Assert.True(r.Code == 0, r.Err);
        var lines = r.Out.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines);
        return System.Text.Json.JsonDocument.Parse(lines[0]).RootElement;
    }

    [Fact]
    public void EvalOfAConditionalCheckpointSamplesEveryDigitAndWritesTheReport()
    {
        var (data, classifier) = StandIns();
        string run = Path.Combine(_dir, "run");
        Directory.CreateDirectory(run);
        string checkpoint = Path.Combine(run, "model.safetensors");
        var unet = new UNet(16, CpuDevice.Instance, seed: 1, classes: 10);
        using (var ema = new Ema(unet.Parameters, 0.9f))
        {
            Checkpoint.Save(checkpoint, unet, ema: ema);
        }
        var r = CliTests.Run("eval", "--samples", checkpoint, "--n", "20", "--sampler", "ddim", "--steps", "2", "--classifier", classifier, "--data", data, "--device", "cpu");
        var json = Json(r);
        Assert.Contains("digit all with guidance 3", r.Err);
        Assert.Equal("ddim", json.GetProperty("sampler").GetString());
        Assert.Equal(2, json.GetProperty("steps").GetInt32());
        Assert.Equal(0, json.GetProperty("eta").GetDouble());
        Assert.Equal(System.Text.Json.JsonValueKind.Null, json.GetProperty("variance").ValueKind);
        Assert.Equal(0UL, json.GetProperty("seed").GetUInt64());
        Assert.Equal(3.0, json.GetProperty("guidance").GetDouble());
        Assert.Equal("all", json.GetProperty("digit").GetString());
        Assert.Equal("ema", json.GetProperty("weights").GetString());
        Assert.True(json.GetProperty("sampling_seconds").GetDouble() >= 0);
        Assert.Equal(20, json.GetProperty("samples").GetProperty("n").GetInt32());
        Assert.Equal(20, json.GetProperty("samples").GetProperty("histogram").EnumerateArray().Sum(h => h.GetInt32()));
        Assert.Equal(30, json.GetProperty("real_floor").GetProperty("n").GetInt32());
        var asked = json.GetProperty("asked_share");
        Assert.InRange(asked.GetProperty("overall").GetDouble(), 0, 1);
        Assert.Equal(Enumerable.Range(0, 10).Select(d => d.ToString()), asked.GetProperty("by_digit").EnumerateObject().Select(p => p.Name));
        Assert.Equal(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(classifier))), json.GetProperty("classifier_sha256").GetString());

        // The default report folder names the sampler, its steps and the settings away from their defaults.
        string report = Path.Combine(run, "eval-ddim-2-n20");
        Assert.Equal(report, json.GetProperty("report").GetString());
        string written = Path.Combine(report, "samples-idx3-ubyte");
        Assert.Equal(written, json.GetProperty("samples_file").GetString());
        Assert.Equal(20, Mnist.ReadIdx(written).Count);
        string md = File.ReadAllText(Path.Combine(report, EvalReport.MarkdownFile));
        Assert.Contains("ddpm eval --samples", md);
        Assert.Contains(json.GetProperty("classifier_sha256").GetString()!, md);
        Assert.Contains("| Fréchet distance", md);
        Assert.Contains("real floor", md);
        Assert.Contains("| classified as asked |", md);
        Assert.Contains("ddim, 2 steps, eta 0", md);
        using (var grid = SixLabors.ImageSharp.Image.Load(Path.Combine(report, EvalReport.GridFile)))
        {
            // 10 rows (one per class) of 16 tiles of 28 pixels with 2-pixel gaps, scaled ×2.
            Assert.Equal((16 * 30 + 2) * 2, grid.Width);
            Assert.Equal((10 * 30 + 2) * 2, grid.Height);
        }

        // The written digits scored as an IDX file give the same figures.
        // Its report goes beside it by default, in eval-NAME (the file's name without -idx3-ubyte).
        var again = Json(CliTests.Run("eval", "--samples", written, "--classifier", classifier, "--data", data, "--device", "cpu"));
        Assert.Equal(json.GetProperty("samples").GetRawText(), again.GetProperty("samples").GetRawText());
        Assert.False(again.TryGetProperty("sampler", out _));
        Assert.Equal(Path.Combine(report, "eval-samples"), again.GetProperty("report").GetString());
        Assert.True(File.Exists(Path.Combine(report, "eval-samples", EvalReport.MarkdownFile)));

        // One digit, another guidance: the asked share has that digit alone.
        var sevenRun = CliTests.Run("eval", "--samples", run, "--n", "3", "--digit", "7", "--guidance", "1.5", "--sampler", "dpm++", "--steps", "2",
            "--report", "none", "--classifier", classifier, "--data", data, "--device", "cpu");
        var seven = Json(sevenRun);
        Assert.Contains("\"sampler\":\"dpm++\"", sevenRun.Out);
        Assert.Equal(["7"], seven.GetProperty("asked_share").GetProperty("by_digit").EnumerateObject().Select(p => p.Name));
        Assert.Equal(1.5, seven.GetProperty("guidance").GetDouble());
        Assert.Equal(System.Text.Json.JsonValueKind.Null, seven.GetProperty("report").ValueKind);
        Assert.False(Directory.Exists(Path.Combine(run, "eval-dpm++-2-digit7-w1.5-n3")));
    }

    [Fact]
    public void EvalOfARunFolderWithAnUnconditionalModel()
    {
        var (data, classifier) = StandIns();
        string run = Path.Combine(_dir, "plain");
        Directory.CreateDirectory(run);
        Checkpoint.Save(Path.Combine(run, "model.safetensors"), new UNet(16, CpuDevice.Instance, seed: 2));
        var json = Json(CliTests.Run("eval", "--samples", run, "--n", "4", "--sampler", "ddim", "--steps", "2", "--seed", "3",
            "--classifier", classifier, "--data", data, "--device", "cpu"));
        Assert.Equal(System.Text.Json.JsonValueKind.Null, json.GetProperty("asked_share").ValueKind);
        Assert.Equal(System.Text.Json.JsonValueKind.Null, json.GetProperty("guidance").ValueKind);
        Assert.Equal(3UL, json.GetProperty("seed").GetUInt64());
        Assert.Equal("raw", json.GetProperty("weights").GetString());
        Assert.True(File.Exists(Path.Combine(run, "eval-ddim-2-seed3-n4", EvalReport.GridFile)));
        Assert.Equal(4, json.GetProperty("samples").GetProperty("n").GetInt32());
    }

    /// <summary>
    /// A checkpoint whose EMA weights are still mostly the random initial ones (an average without warm-up, a few steps in)
    /// is sampled from its raw weights, said in one line and reported as <c>weights: raw</c>; with the warm-up the same run's
    /// average is used; <c>--no-ema</c> always takes the raw weights.
    /// </summary>
    [Theory]
    [InlineData(0f, false, "raw", true)]
    [InlineData(2f / 3, false, "ema", false)]
    [InlineData(2f / 3, true, "raw", false)]
    public void AnAverageStillMostlyInitialIsPassedOverForTheRawWeights(float warmup, bool noEma, string weights, bool note)
    {
        var (data, classifier) = StandIns();
        string run = Path.Combine(_dir, $"run-{warmup}-{noEma}");
        Directory.CreateDirectory(run);
        using (var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = 2, EmaDecay = 0.9995f, EmaWarmup = warmup, Seed = 1 }, Mnist.LoadTraining(data)))
        {
            trainer.TrainStep();
            trainer.TrainStep();
            trainer.Save(Path.Combine(run, "model.safetensors"));
        }
        var r = CliTests.Run(["eval", "--samples", run, "--n", "2", "--sampler", "ddim", "--steps", "2", "--report", "none",
            "--classifier", classifier, "--data", data, "--device", "cpu", .. noEma ? new[] { "--no-ema" } : []]);
        Assert.Equal(weights, Json(r).GetProperty("weights").GetString());
        Assert.Equal(note, r.Err.Contains("the EMA weights are still 100% the initial ones after 2 steps", StringComparison.Ordinal));
        Assert.Contains($"{(weights == "ema" ? "EMA" : "raw")} weights", r.Err);
    }

    [Fact]
    public void EvalRefusesSamplerFlagsThatDoNotApply()
    {
        string classifier = Path.Combine(_dir, "c.safetensors");
        OneLine(CliTests.Run("eval", "--samples", Idx(4, 28), "--sampler", "ddim", "--classifier", classifier), ExitCodes.Usage, "--sampler applies when --samples is a checkpoint");
        OneLine(CliTests.Run("eval", "--samples", Idx(4, 28), "--n", "10", "--classifier", classifier), ExitCodes.Usage, "--n applies when --samples is a checkpoint");
        OneLine(CliTests.Run("eval", "--report", _dir, "--classifier", classifier), ExitCodes.Usage, "--report needs --samples");
        OneLine(CliTests.Run("eval", "--samples", _dir, "--classifier", classifier), ExitCodes.Failure, "a folder without model.safetensors");
        string plain = Path.Combine(_dir, "plain.safetensors");
        Checkpoint.Save(plain, new UNet(16, CpuDevice.Instance, seed: 1));
        OneLine(CliTests.Run("eval", "--samples", plain, "--digit", "3", "--classifier", classifier), ExitCodes.Usage, "unconditional");
        OneLine(CliTests.Run("eval", "--samples", plain, "--guidance", "2", "--classifier", classifier), ExitCodes.Usage, "unconditional");
        OneLine(CliTests.Run("eval", "--samples", plain, "--steps", "5", "--classifier", classifier), ExitCodes.Usage, "--steps applies to --sampler ddim or dpm++ only");
        string conditional = Path.Combine(_dir, "cond.safetensors");
        Checkpoint.Save(conditional, new UNet(16, CpuDevice.Instance, seed: 1, classes: 10));
        OneLine(CliTests.Run("eval", "--samples", conditional, "--n", "15", "--classifier", classifier), ExitCodes.Usage, "multiple of the 10 classes");
        OneLine(CliTests.Run("eval", "--samples", conditional, "--digit", "none", "--guidance", "2", "--classifier", classifier), ExitCodes.Usage, "--guidance applies with --digit or --class only");
    }

    [Fact]
    public void MissingSamplesFileIsNamed()
    {
        string path = Path.Combine(_dir, "nothing-idx3-ubyte");
        OneLine(CliTests.Run("eval", "--samples", path, "--classifier", Path.Combine(_dir, "c.safetensors")), ExitCodes.Failure, "nothing-idx3-ubyte");
    }

    [Fact]
    public void SamplesOfAnotherSizeAreRefused() =>
        OneLine(CliTests.Run("eval", "--samples", Idx(3, 7), "--classifier", Path.Combine(_dir, "c.safetensors")), ExitCodes.Failure, "expected at least 2 square images");

    [Fact]
    public void ABrokenClassifierIsRefusedNotRetrained()
    {
        string classifier = Path.Combine(_dir, "classifier.safetensors");
        File.WriteAllBytes(classifier, new byte[64]);
        OneLine(CliTests.Run("eval", "--samples", Idx(4, 28), "--classifier", classifier, "--device", "cpu"), ExitCodes.Failure, "classifier.safetensors");
        Assert.Equal(64, new FileInfo(classifier).Length);
    }
}
