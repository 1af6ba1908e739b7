using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using System.Text.Encodings.Web;
using System.Text.Json;
using Ddpm.Diffusion;

namespace Ddpm.Cli;

/// <summary>
/// <c>ddpm eval</c>: scores generated digits with the engine's own MNIST classifier (trained once and cached, see
/// <see cref="ClassifierCache"/>): the classifier's test accuracy, then for the samples and for the real-data floor
/// (the first 1,000 MNIST training digits) the mean top-class confidence, the share above 0.9, the class histogram
/// and its KL divergence to uniform, and the Fréchet distance of the penultimate features against the MNIST test set.
/// The samples are an IDX file, or a checkpoint (or run folder) that eval samples from itself with <c>sample</c>'s
/// flags; for a class-conditional checkpoint also the share classified as the digit asked for. One JSON line on
/// stdout, a report folder (report.md, by-class.png, and the sampled digits as an IDX file), progress on stderr.
/// </summary>
public static class EvalCommand
{
    /// <summary>Real training digits scored as the floor.</summary>
    public const int FloorCount = 1000;

    /// <summary>Digits sampled from a checkpoint unless --n says otherwise.</summary>
    public const int DefaultCount = 1000;

    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var samples = new Option<string?>("--samples")
        {
            Description = "what to score: an IDX file of images (as sample writes samples-idx3-ubyte or -idx4-ubyte, raw or gzipped), or a checkpoint " +
                $"(*.safetensors) or run folder (holding {TrainCommand.CheckpointFile}) to sample --n digits from with the sampler flags below; " +
                $"default: the newest run under {RunFolders.Root}/, and with none there only the classifier and the real-data floor are scored",
        }.IsPath();
        var n = new Option<int>("--n") { Description = $"checkpoints: digits to sample (default {DefaultCount}; with --digit all, a multiple of 10, a tenth of them each digit)", DefaultValueFactory = _ => DefaultCount }.Within(2, 10_000);
        var flags = new SamplerFlags("class-conditional checkpoints: all (default: n/10 of each digit), one digit 0..9, or none (unguided)", withNone: true);
        var report = new Option<string?>("--report")
        {
            Description = "folder for report.md (scores beside the real-data floor, sampler, seed, classifier sha256), by-class.png (samples in rows by predicted class, " +
                "unsure ones last and framed red) and, for a checkpoint, samples-idx3-ubyte; default: for a checkpoint eval-SAMPLER-STEPS[-settings] beside it, " +
                "for an IDX file eval-NAME beside it; none: no report (a checkpoint's digits are then not kept)",
        }.IsPath();
        var classifier = new Option<string?>("--classifier") { Description = "the classifier file (default: the cache of --data's classifier, ~/.cache/ddpm/classifier-HASH.safetensors, trained there on first use)" }.IsPath();
        var train = new Option<bool>("--train-classifier") { Description = $"train the classifier anew ({ClassifierCache.Epochs} epochs on MNIST, minutes on a CPU) and overwrite the cached one" };
        var data = new Option<string>("--data")
        {
            Description = "the data set the classifier learns and the real-data floor comes from: MNIST-format IDX files, train and t10k " +
                "(MNIST, fetched there if missing; Fashion-MNIST), CIFAR-10's batches, or a folder of images in class subfolders (every tenth image held out " +
                "for the test set; read at the model's size); the classifier is cached by the training set's hash",
            DefaultValueFactory = _ => Mnist.DefaultFolder,
        }.IsPath();
        var device = Program.DeviceOption();
        var math = Program.MathOption();
        var command = new Command("eval", "Score generated digits (an IDX file, or sampled from a checkpoint) with the engine's MNIST classifier: confidence, class balance, Fréchet distance.")
        {
            samples, n,
        };
        flags.AddTo(command);
        foreach (var option in new Option[] { report, classifier, train, data, device, math })
        {
            command.Add(option);
        }
        command.SetAction(p => Program.Guard(() =>
        {
            // Without --samples: the newest run, when there is one.
            var request = new Request(p.GetValue(samples) ?? RunFolders.Newest(TrainCommand.CheckpointFile), p.GetValue(n), p.GetResult(n) is { Implicit: false }, flags.Read(p), flags.FirstGiven(p), p.GetValue(report),
                p.GetValue(classifier), p.GetValue(train), p.GetValue(data)!, Program.ChosenDevice(p, device, math),
                "ddpm " + string.Join(' ', p.Tokens.Select(t => Quote(t.Value))));
            return Run(request);
        }));
        return command;
    }

    private sealed record Request(string? Samples, int N, bool NGiven, SamplerSettings Settings, string? SamplerFlagGiven, string? Report,
        string? Classifier, bool Retrain, string Data, DeviceChoice Device, string CommandLine);

    /// <summary>Refuses a --classifier that cannot be one before any work: a folder, or (when it is to be trained and saved) a
    /// file in a folder that cannot be written. (An empty path is the parser's: <see cref="Program.IsPath"/>.)</summary>
    private static void CheckClassifierPath(string? path, bool retrain)
    {
        if (path is null)
        {
            return; // the cache, or an empty path, which the parser refused
        }
        if (Directory.Exists(path))
        {
            throw new UsageException($"--classifier {path}: is a folder; pass a classifier file (.safetensors)");
        }
        if (retrain || !File.Exists(path))
        {
            Program.RequireWritableFolder("--classifier", Path.GetDirectoryName(Path.GetFullPath(path))!);
        }
    }

    private static string Quote(string arg) => arg.Length > 0 && arg.All(c => char.IsLetterOrDigit(c) || "-_./+=:,@".Contains(c)) ? arg : $"'{arg.Replace("'", "'\\''")}'";

    private static int Run(Request q)
    {
        Program.RequireFolder("--data", q.Data);
        // Everything a user can get wrong is checked before minutes of sampling or training could be wasted on it.
        string? checkpoint = null;
        if (q.Samples is not null && Directory.Exists(q.Samples))
        {
            checkpoint = Path.Combine(q.Samples, TrainCommand.CheckpointFile);
            if (!File.Exists(checkpoint))
            {
                throw new ArgumentException($"--samples {q.Samples}: a folder without {TrainCommand.CheckpointFile} (pass a run folder, a checkpoint or an IDX file)");
            }
        }
        else if (q.Samples is not null && q.Samples.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            checkpoint = q.Samples;
        }
        if (checkpoint is null && (q.SamplerFlagGiven is not null || q.NGiven))
        {
            throw new UsageException($"{q.SamplerFlagGiven ?? "--n"} applies when --samples is a checkpoint or a run folder (an IDX file is scored as it is)");
        }
        if (q.Samples is null && q.Report is not (null or "none"))
        {
            throw new UsageException("--report needs --samples (without samples only the classifier and the floor are scored, to stdout)");
        }

        LabeledImages? idxSamples = null;
        SamplingPlan? plan = null;
        // The images' shape: the samples file's, or the model's; null (without samples): the data's own.
        ImageShape? shape = null;
        bool noReport = q.Report == "none";
        string? reportDir = noReport ? null : q.Report;
        if (checkpoint is null && q.Samples is not null)
        {
            var idx = Mnist.ReadIdx(q.Samples);
            if (idx.ItemShape.Length is not (2 or 3))
            {
                throw new DataException($"--samples {q.Samples}: an IDX file of {(idx.ItemShape.Length == 0 ? "labels (one number an item)" : $"{idx.ItemShape.Length + 1}-dimensional items")}, not of images: pass the samples-idx3-ubyte (or -idx4-ubyte) that 'ddpm sample' writes");
            }
            var item = idx.ItemShape.Length == 2 ? new ImageShape(1, idx.ItemShape[0]) : new ImageShape(idx.ItemShape[0], idx.ItemShape[1]);
            if (idx.ItemShape[^1] != idx.ItemShape[^2] || item.Channels is not (1 or 3) || ImageFolder.SizeProblem(item.Side) is not null || idx.Count < 2)
            {
                throw new DataException($"{q.Samples}: holds {idx.Count} items of {string.Join("x", idx.ItemShape)}, expected at least 2 square images (1 or 3 channels, a side that is a multiple of 4)");
            }
            shape = item;
            idxSamples = new LabeledImages(idx.Values, new byte[idx.Count], idx.Count, item.Side, item.Channels);
            reportDir ??= noReport ? null : Path.Combine(Path.GetDirectoryName(Path.GetFullPath(q.Samples))!, "eval-" + Stem(Path.GetFileName(q.Samples)));
        }
        else if (checkpoint is not null)
        {
            q.Settings.CheckFlags(guidanceNeedsDigit: false);
            plan = q.Settings.Plan(checkpoint);
            shape = new ImageShape(plan.Info.ImageChannels, plan.Info.ImageSize);
            // A conditional model is asked for every digit in turn unless --digit says otherwise; "none" is unguided.
            // plan.Settings: --class NAME is resolved into its label there.
            string? digit = plan.Info.Classes == 0 ? null : plan.Settings.Digit ?? "all";
            plan = plan with { Settings = plan.Settings with { Digit = digit == "none" ? null : digit } };
            if (plan.Settings.Digit == "all" && q.N % plan.Info.Classes != 0)
            {
                throw new UsageException($"--n {q.N}: with --digit all (the default for a conditional model) it must be a multiple of the {plan.Info.Classes} classes, as many of each");
            }
            reportDir ??= noReport ? null : Path.Combine(Path.GetDirectoryName(Path.GetFullPath(checkpoint))!, FolderName(plan, q.N));
        }
        if (reportDir is not null)
        {
            Program.RequireFileSlots("--report", reportDir, EvalReport.MarkdownFile, EvalReport.GridFile, Images.IdxName(shape ?? ImageShape.Mnist));
            // A default folder that cannot be written (samples in a read-only reference folder) is named with the way out.
            try
            {
                Program.RequireWritableFolder("--report", reportDir);
            }
            catch (UsageException e) when (q.Report is null)
            {
                throw new UsageException($"{e.Message}; pass --report DIR, or --report none");
            }
        }

        // One writer a report folder: a second eval into it is refused before anything is written.
        using var reportLock = reportDir is null ? null : Program.LockRun(reportDir, "--report");
        CheckClassifierPath(q.Classifier, q.Retrain);

        using var dev = Program.OpenDevice(q.Device);
        MemoryEstimate.RequireSampling(q.Settings.MemoryMiB, dev);
        var clock = Stopwatch.StartNew();
        void Log(string message) => Console.Error.WriteLine(message);
        var (trainSet, testSet) = Datasets.LoadForScoring(q.Data, new FolderOptions(shape?.Side, shape?.Channels), Log);
        if (shape is { } s && (s.Channels != trainSet.Channels || s.Side != trainSet.Size))
        {
            throw new UsageException($"--data {q.Data}: {trainSet.Channels}x{trainSet.Size}x{trainSet.Size} images, the samples are {s.Channels}x{s.Side}x{s.Side}: score them against the data they came from");
        }
        if (plan is not null && plan.Info.Classes > 0 && plan.Info.Classes != trainSet.ClassNames.Count)
        {
            throw new UsageException($"--data {q.Data}: {trainSet.ClassNames.Count} classes, the model has {plan.Info.Classes}: score it against the data it learned");
        }
        shape ??= new ImageShape(trainSet.Channels, trainSet.Size);
        string classifierPath = q.Classifier ?? ClassifierCache.PathFor(trainSet.Hash);
        using var model = ClassifierCache.LoadOrTrain(dev, classifierPath, trainSet, testSet, q.Retrain, log: Log);
        var test = LabeledImages.From(testSet);
        var training = LabeledImages.From(trainSet);
        var floor = training.Take(Math.Min(FloorCount, training.Count));

        double samplingSeconds = 0;
        string? written = null;
        if (plan is not null)
        {
            if (plan.EmaNote is { } note)
            {
                Log(note);
            }
            Log(plan.Describe(q.N));
            var sampling = Stopwatch.StartNew();
            var digits = plan.Run(dev, q.N);
            samplingSeconds = sampling.Elapsed.TotalSeconds;
            Log($"{plan.Steps.Count} steps in {samplingSeconds:F1} s");
            if (reportDir is not null)
            {
                written = Path.Combine(reportDir, Images.IdxName(shape.Value));
                Images.SaveIdx(written, digits, q.N, shape);
            }
            // Scored as written (bytes), so `eval --samples` of the written file gives the same figures.
            idxSamples = new LabeledImages([.. digits.Select(Images.ToByte)], new byte[q.N], q.N, shape.Value.Side, shape.Value.Channels);
        }

        var (testProbs, testFeatures) = model.Predict(test);
        int right = 0;
        for (int i = 0; i < test.Count; i++)
        {
            if (Classifier.ArgMax(testProbs.AsSpan(i * model.Classes, model.Classes)) == test.Labels[i])
            {
                right++;
            }
        }
        double accuracy = (double)right / test.Count;
        SampleScores Score(float[] probs, float[] features, int count) => SampleScores.Of(probs, features, count, model.Classes, testFeatures, test.Count);
        var (floorProbs, floorFeatures) = model.Predict(floor);
        var floorScores = Score(floorProbs, floorFeatures, floor.Count);
        string sha = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(classifierPath)));

        var result = new Dictionary<string, object?>
        {
            ["classifier"] = Path.GetFullPath(classifierPath),
            ["classifier_sha256"] = sha,
            ["classifier_test_accuracy"] = Math.Round(accuracy, 6),
        };
        if (idxSamples is { } set)
        {
            var (probs, features) = model.Predict(set);
            var scores = Score(probs, features, set.Count);
            (double Overall, SortedDictionary<int, double> ByClass)? asked = null;
            if (plan?.Labels(q.N) is { } labels)
            {
                asked = SampleScores.AskedShare(probs, [.. labels.Select(l => (int)l)], model.Classes);
            }
            var sampling = plan is null ? [] : Sampling(plan, q.N, samplingSeconds);
            result["samples_file"] = written is not null || plan is null ? Path.GetFullPath(written ?? q.Samples!) : null;
            if (plan is not null)
            {
                result["checkpoint"] = Path.GetFullPath(checkpoint!);
                result["sampler"] = plan.Settings.Sampler;
                result["steps"] = plan.Steps.Count;
                result["variance"] = plan.Variance;
                result["eta"] = plan.Kind is SamplerKind.Ddim or SamplerKind.DpmSolver2M ? plan.Eta : null;
                result["recipe"] = plan.Recipe.Name;
                result["seed"] = plan.Settings.Seed;
                result["weights"] = plan.UseEma ? "ema" : "raw";
                result["schedule"] = plan.ScheduleName;
                result["T"] = plan.T;
                result["digit"] = plan.Settings.Digit;
                result["guidance"] = plan.Settings.Digit is null ? null : Math.Round((double)plan.Guidance, 4);
                result["sampling_seconds"] = Math.Round(samplingSeconds, 1);
                result["asked_share"] = asked is { } a ? new Dictionary<string, object>
                {
                    ["overall"] = Math.Round(a.Overall, 4),
                    ["by_digit"] = a.ByClass.ToDictionary(e => e.Key.ToString(CultureInfo.InvariantCulture), e => (object)Math.Round(e.Value, 4)),
                } : null;
            }
            result["samples"] = Json(scores);
            result["report"] = reportDir is null ? null : Path.GetFullPath(reportDir);
            var findings = new EvalFindings
            {
                Command = q.CommandLine,
                Source = plan is null ? $"IDX file {q.Samples}" : $"checkpoint {checkpoint}",
                Sampling = sampling,
                ClassifierPath = Path.GetFullPath(classifierPath),
                ClassifierSha256 = sha,
                ClassifierAccuracy = accuracy,
                Samples = scores,
                Floor = floorScores,
                Asked = asked,
                Digits = [.. set.Images.Select(p => p / 127.5f - 1f)],
                Probabilities = probs,
                Classes = model.Classes,
                Shape = shape.Value,
            };
            if (reportDir is not null)
            {
                EvalReport.Write(reportDir, findings);
            }
        }
        else
        {
            result["samples_file"] = null;
            result["samples"] = null;
        }
        result["real_floor"] = Json(floorScores);
        bool mnist = Path.GetFullPath(q.Data).TrimEnd('/') == Path.GetFullPath(Mnist.DefaultFolder).TrimEnd('/');
        result["reference"] = mnist ? $"MNIST test set ({test.Count} digits)" : $"the test set of {q.Data} ({test.Count} images)";
        result["seconds"] = Math.Round(clock.Elapsed.TotalSeconds, 1);
        // Relaxed escaping: "dpm++" and paths stay readable (the default escapes + and every non-ASCII letter).
        Console.WriteLine(JsonSerializer.Serialize(result, new JsonSerializerOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
        return 0;
    }

    // The IDX file's name without .gz and -idx3-ubyte (or .idx): samples-idx3-ubyte.gz → samples.
    private static string Stem(string name)
    {
        foreach (var suffix in new[] { ".gz", "-idx3-ubyte", ".idx3-ubyte", ".idx" })
        {
            if (name.EndsWith(suffix, StringComparison.OrdinalIgnoreCase) && name.Length > suffix.Length)
            {
                name = name[..^suffix.Length];
            }
        }
        return name;
    }

    /// <summary>
    /// The default report folder for a checkpoint: eval-SAMPLER-STEPS, then each setting away from its default
    /// (-small, -eta E, -seedrecipe, -raw, -seed S, -digit D or -unguided, -w W, -n N), so runs of other settings do not
    /// overwrite each other.
    /// </summary>
    private static string FolderName(SamplingPlan plan, int n)
    {
        var s = plan.Settings;
        string I(double v) => v.ToString(CultureInfo.InvariantCulture);
        var name = $"eval-{s.Sampler}-{plan.Steps.Count}";
        name += plan.Kind == SamplerKind.DdpmSmall ? "-small" : "";
        name += plan.Kind is SamplerKind.Ddim or SamplerKind.DpmSolver2M && plan.Eta != SamplerSettings.DefaultEta(s.Sampler) ? $"-eta{I(plan.Eta)}" : "";
        name += plan.Clip ? "" : "-seedrecipe";
        name += plan.Info.HasEma && !plan.UseEma ? "-raw" : "";
        name += s.Seed != 0 ? $"-seed{s.Seed}" : "";
        if (plan.Info.Classes > 0)
        {
            name += s.Digit switch { "all" => "", null => "-unguided", var d => $"-digit{d}" };
            name += s.Digit is not null && plan.Guidance != SamplerSettings.DefaultGuidance ? $"-w{I(plan.Guidance)}" : "";
        }
        name += n != DefaultCount ? $"-n{n}" : "";
        return name;
    }

    private static List<(string, string)> Sampling(SamplingPlan plan, int n, double seconds)
    {
        var s = plan.Settings;
        var rows = new List<(string, string)>
        {
            ("model", $"{plan.Info.Preset}{(plan.Info.Classes > 0 ? " class-conditional" : "")}, {(plan.UseEma ? "EMA" : "raw")} weights, {plan.ScheduleName} schedule, T = {plan.T}"),
            ("sampler", plan.Kind switch
            {
                SamplerKind.Ddim => $"ddim, {plan.Steps.Count} steps, eta {plan.Eta.ToString(CultureInfo.InvariantCulture)}",
                SamplerKind.DpmSolver2M => $"dpm++ (2M), {plan.Steps.Count} steps, eta {plan.Eta.ToString(CultureInfo.InvariantCulture)}",
                _ => $"ddpm, {plan.Steps.Count} steps, {plan.Variance} variance",
            }),
            ("recipe", $"{plan.Recipe.Name}: {(plan.Clip ? "x0 estimate clipped to [-1, 1]" : "unclipped")}"),
            ("seed", s.Seed.ToString(CultureInfo.InvariantCulture)),
            ("digits", n.ToString(CultureInfo.InvariantCulture)),
        };
        if (plan.Info.Classes > 0)
        {
            rows.Add(("conditioning", s.Digit switch
            {
                null => "unguided (no label)",
                "all" => $"every digit, {n / 10} each, guidance {plan.Guidance.ToString(CultureInfo.InvariantCulture)}",
                var d => $"digit {d}, guidance {plan.Guidance.ToString(CultureInfo.InvariantCulture)}",
            }));
        }
        rows.Add(("sampling time", $"{seconds:F1} s"));
        return rows;
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
