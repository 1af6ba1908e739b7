using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using Ddpm.Diffusion;

namespace Ddpm.Cli;

/// <summary>
/// <c>ddpm eval</c>: scores generated digits with the engine's own MNIST classifier (trained once and cached, see
/// <see cref="ClassifierCache"/>): the classifier's test accuracy, then for the samples and for the real-data floor
/// (the first 1,000 MNIST training digits) the mean top-class confidence, the share above 0.9, the class histogram
/// and its KL divergence to uniform, and the Fréchet distance of the penultimate features against the MNIST test set.
/// One JSON line on stdout; progress on stderr.
/// </summary>
public static class EvalCommand
{
    /// <summary>Real training digits scored as the floor.</summary>
    public const int FloorCount = 1000;

    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var samples = new Option<string?>("--samples") { Description = "an IDX file of 28x28 generated digits (as sample writes samples-idx3-ubyte); without it only the classifier and the real-data floor are scored" };
        var classifier = new Option<string>("--classifier") { Description = "the cached classifier (trained there on first use)", DefaultValueFactory = _ => ClassifierCache.DefaultPath };
        var train = new Option<bool>("--train-classifier") { Description = $"train the classifier anew ({ClassifierCache.Epochs} epochs on MNIST, minutes on a CPU) and overwrite the cached one" };
        var data = new Option<string>("--data") { Description = "MNIST folder (train and t10k IDX files; fetched there if missing)", DefaultValueFactory = _ => Mnist.DefaultFolder };
        var device = Program.DeviceOption();
        var command = new Command("eval", "Score generated digits with the engine's MNIST classifier: confidence, class balance, Fréchet distance.")
        {
            samples, classifier, train, data, device,
        };
        command.SetAction(p => Program.Guard(() => Run(p.GetValue(samples), p.GetValue(classifier)!, p.GetValue(train), p.GetValue(data)!, p.GetValue(device)!)));
        return command;
    }

    private static int Run(string? samplesPath, string classifierPath, bool retrain, string dataFolder, string deviceName)
    {
        Program.RequireFolder("--data", dataFolder);
        // Read and check the samples before minutes of training or loading could be wasted on a bad path.
        LabeledImages? samples = null;
        if (samplesPath is not null)
        {
            var idx = Mnist.ReadIdx(samplesPath);
            if (idx.ItemShape is not [Mnist.Side, Mnist.Side] || idx.Count < 2)
            {
                throw new DataException($"{samplesPath}: holds {idx.Count} items of {string.Join("x", idx.ItemShape)}, expected at least 2 of 28x28");
            }
            samples = new LabeledImages(idx.Values, new byte[idx.Count], idx.Count, Mnist.Side);
        }
        using var dev = Program.OpenDevice(deviceName);
        var clock = Stopwatch.StartNew();
        void Log(string message) => Console.Error.WriteLine(message);
        using var model = ClassifierCache.LoadOrTrain(dev, classifierPath, dataFolder, retrain, log: Log);
        var test = LabeledImages.From(Mnist.LoadTest(dataFolder, Log));
        var floor = LabeledImages.From(Mnist.LoadTraining(dataFolder, Log)).Take(FloorCount);

        var (testProbs, testFeatures) = model.Predict(test);
        int right = 0;
        for (int i = 0; i < test.Count; i++)
        {
            if (Classifier.ArgMax(testProbs.AsSpan(i * model.Classes, model.Classes)) == test.Labels[i])
            {
                right++;
            }
        }
        SampleScores Score(LabeledImages set)
        {
            var (probs, features) = model.Predict(set);
            return SampleScores.Of(probs, features, set.Count, model.Classes, testFeatures, test.Count);
        }
        var result = new Dictionary<string, object?>
        {
            ["classifier"] = Path.GetFullPath(classifierPath),
            ["classifier_test_accuracy"] = Math.Round((double)right / test.Count, 6),
            ["samples_file"] = samplesPath is null ? null : Path.GetFullPath(samplesPath),
            ["samples"] = samples is null ? null : Json(Score(samples)),
            ["real_floor"] = Json(Score(floor)),
            ["reference"] = $"MNIST test set ({test.Count} digits)",
            ["seconds"] = Math.Round(clock.Elapsed.TotalSeconds, 1),
        };
        Console.WriteLine(JsonSerializer.Serialize(result));
        return 0;
    }

    private static Dictionary<string, object> Json(SampleScores s) => new()
    {
        ["n"] = s.Count,
        ["mean_confidence"] = Math.Round(s.MeanConfidence, 4),
        ["confident_share"] = Math.Round(s.ConfidentShare, 4),
        ["histogram"] = s.Histogram,
        ["class_kl"] = Math.Round(s.ClassKl, 4),
        ["frechet"] = Math.Round(s.Frechet, 3),
    };
}
