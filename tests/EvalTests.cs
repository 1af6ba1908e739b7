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

    [Fact]
    public void MissingSamplesFileIsNamed()
    {
        string path = Path.Combine(_dir, "nothing-idx3-ubyte");
        OneLine(CliTests.Run("eval", "--samples", path, "--classifier", Path.Combine(_dir, "c.safetensors")), ExitCodes.Failure, "nothing-idx3-ubyte");
    }

    [Fact]
    public void SamplesOfAnotherSizeAreRefused() =>
        OneLine(CliTests.Run("eval", "--samples", Idx(3, 7), "--classifier", Path.Combine(_dir, "c.safetensors")), ExitCodes.Failure, "expected at least 2 of 28x28");

    [Fact]
    public void ABrokenClassifierIsRefusedNotRetrained()
    {
        string classifier = Path.Combine(_dir, "classifier.safetensors");
        File.WriteAllBytes(classifier, new byte[64]);
        OneLine(CliTests.Run("eval", "--samples", Idx(4, 28), "--classifier", classifier, "--device", "cpu"), ExitCodes.Failure, "classifier.safetensors");
        Assert.Equal(64, new FileInfo(classifier).Length);
    }
}
