using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using Ddpm.Diffusion;
using Ddpm.Diffusion.Parallel;
using Ddpm.Nn;
using Ddpm.Tensors;
using Spectre.Console;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>
/// <c>ddpm train</c>: the seed's recipe by default; writes into --out model.safetensors (at each
/// epoch, on Ctrl-C and at the end), metrics.jsonl, loss.png and samples.png.
/// </summary>
public static class TrainCommand
{
    /// <summary>The file names a run folder holds.</summary>
    public const string CheckpointFile = "model.safetensors", MetricsFile = "metrics.jsonl", LossFile = "loss.png", SamplesFile = "samples.png";

    /// <summary>Steps between checkpoints by default: about two minutes of the tiny preset on two cores, seconds on a GPU.</summary>
    public const int DefaultSaveEvery = 500;

    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        // One option a setting, from its declaration (TrainSettings): help with every recipe's value, range, choices.
        var settings = TrainSettings.Flags.Select(setting => (Setting: setting, Flag: SettingOption(setting))).ToList();
        var saveEvery = new Option<int>("--save-every") { Description = $"checkpoint every N steps as well as at each epoch's end (0: epoch ends only)", DefaultValueFactory = _ => DefaultSaveEvery }.Within(0, int.MaxValue);
        var grid = new Option<int>("--grid") { Description = "digits in the final samples.png (0: no grid)", DefaultValueFactory = _ => 64 }.Within(0, 1024);
        var recipe = new Option<string>("--recipe")
        {
            Description = $"the defaults of every flag above: {string.Join(" | ", Recipe.All.Select(r => $"{r.Name} ({r.Summary})"))}; a flag given overrides its recipe's value",
            DefaultValueFactory = _ => Recipe.Default.Name,
        };
        recipe.AcceptOnlyFromAmong(Recipe.Names);
        var device = Program.DeviceOption();
        var data = new Option<string>("--data")
        {
            Description = "the training data: a folder of images (PNG, JPEG, BMP, GIF, WebP, TIFF, …, searched recursively; two or more subfolders are classes), " +
                "CIFAR-10's binary batches, or MNIST-format IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, raw or .gz; Fashion-MNIST too). " +
                "MNIST is fetched into an empty or missing folder",
            DefaultValueFactory = _ => Mnist.DefaultFolder,
        }.IsPath();
        var imageSize = new Option<int?>("--image-size")
        {
            Description = $"a folder's images resized (shorter side to S, Lanczos) and centre-cropped to S x S; S a multiple of 4 up to {ImageFolder.MaxSize} " +
                "(default: the images' own size when they are all one square size)",
        };
        var imageChannels = new Option<int?>("--channels") { Description = "a folder's images as 1 (grayscale) or 3 (RGB) channels (default: 1 when every image is grey, else 3)" };
        imageChannels.AcceptOnlyFromAmong("1", "3");
        var output = new Option<string?>("--out")
        {
            Description = $"run folder (default: a new {RunFolders.Root}/{RunFolders.Prefix}N, one more than the highest there, with {RunFolders.Root}/{RunFolders.Latest} " +
                "pointing at it; with --resume, the newest run)",
        }.IsPath();
        var resume = new Option<bool>("--resume") { Description = "continue the run in --out (default: the newest run) from its checkpoint, exactly" };
        var command = new Command("train", "Train the U-Net on MNIST or your images; checkpoint, log, plot and write a sample grid.");
        foreach (var (_, flag) in settings)
        {
            command.Add(flag.Option);
        }
        foreach (var option in new Option[] { saveEvery, grid, recipe, device, data, imageSize, imageChannels, output, resume })
        {
            command.Add(option);
        }
        command.SetAction(p => Program.Guard(() => Run(new Settings(
            [.. settings.Where(s => p.GetResult(s.Flag.Option) is { Implicit: false }).Select(s => (s.Setting, s.Flag.Read(p) ?? throw new InvalidOperationException(s.Setting.Name)))],
            p.GetValue(saveEvery), p.GetValue(grid), p.GetValue(recipe)!, Program.ChosenDevice(p, device), p.GetValue(data)!, p.GetValue(output), p.GetValue(resume),
            new FolderOptions(p.GetValue(imageSize), p.GetValue(imageChannels))))));
        return command;
    }

    /// <summary>The command-line option of a setting: its flag, type, help (what it does, every recipe's value, the resume
    /// rule), range and choices, all from the declaration.</summary>
    internal static (Option Option, Func<ParseResult, object?> Read) SettingOption(TrainSetting setting)
    {
        string flag = setting.Flag!, help = setting.HelpText(Recipe.All);
        return setting switch
        {
            TrainSetting<int> t => Typed(Ranged(new Option<int?>(flag) { Description = help }, t.Range)),
            TrainSetting<long> t => Typed(Ranged(new Option<long?>(flag) { Description = help }, t.Range)),
            TrainSetting<float> t => Typed(Ranged(new Option<float?>(flag) { Description = help }, t.Range)),
            TrainSetting<ulong> => Typed(new Option<ulong?>(flag) { Description = help }),
            TrainSetting<bool> => Typed(new Option<bool?>(flag) { Description = help, Arity = ArgumentArity.ZeroOrOne }),
            TrainSetting<string> t => Typed(Choose(new Option<string?>(flag) { Description = help }, t.Choices)),
            _ => throw new NotSupportedException(setting.ValueType.Name),
        };

        static (Option, Func<ParseResult, object?>) Typed<T>(Option<T> option) => (option, p => p.GetValue(option));

        static Option<T?> Ranged<T>(Option<T?> option, (T Min, T Max)? range) where T : struct, System.Numerics.INumber<T> =>
            range is var (min, max) ? option.Within(min, max) : option;

        static Option<string?> Choose(Option<string?> option, string[]? choices)
        {
            if (choices is not null)
            {
                option.AcceptOnlyFromAmong(choices);
            }
            return option;
        }
    }

    /// <summary>The command line as given: the settings a flag set (with their values; the others keep the recipe's, or on
    /// --resume the run's), and the command's own options.</summary>
    private sealed record Settings(IReadOnlyList<(TrainSetting Setting, object Value)> Given, int SaveEvery, int Grid, string Recipe, DeviceChoice Device,
        string Data, string? Out, bool Resume, FolderOptions Images)
    {
        /// <summary>The value a flag gave <paramref name="setting"/>, or null.</summary>
        public T? Of<T>(TrainSetting<T> setting) where T : notnull => Given.Where(g => g.Setting == setting).Select(g => (T?)g.Value).FirstOrDefault();

        /// <summary><paramref name="o"/> with every given flag applied.</summary>
        public TrainOptions Apply(TrainOptions o) => Given.Aggregate(o, (acc, g) => g.Setting.With(acc, g.Value));
    }

    private static int Run(Settings given)
    {
        // Flags the data folder's reading checks too, checked before a run folder exists.
        if (given.Images.Size is { } side && ImageFolder.SizeProblem(side) is { } sizeProblem)
        {
            throw new UsageException($"--image-size {sizeProblem}");
        }
        // Started by mpiexec or mpirun: this process is one rank of the run. Otherwise MPI is never loaded.
        if (Mpi.Launcher() is not { } launcher)
        {
            return Run(given with { Given = [.. given.Given, (TrainSettings.Ranks, 1)] }, Ranks.Single);
        }
        using var mpi = Mpi.Start(launcher);
        // Ranks on one machine share its cores and its GPUs: each its share of the threads, its own device.
        CpuThreads.Share(mpi.LocalSize);
        IlgpuDevice.Ordinal = mpi.LocalRank;
        var stderr = Console.Error;
        if (mpi.Rank != 0)
        {
            Console.SetError(TextWriter.Null);
            Console.SetOut(TextWriter.Null);
        }
        else
        {
            Console.Error.WriteLine($"mpi: {mpi.Size} rank{(mpi.Size > 1 ? "s" : "")} ({mpi.Abi}, {mpi.Library}); {mpi.LocalSize} on this machine, {CpuThreads.Count} CPU thread{(CpuThreads.Count > 1 ? "s" : "")} each");
        }
        try
        {
            var ranks = new Ranks(mpi);
            string processes = ranks.Processes();
            Console.Error.WriteLine($"mpi ranks (host:pid): {processes}");
            return Run(given with { Given = [.. given.Given, (TrainSettings.Ranks, mpi.Size)] }, ranks);
        }
        catch (Exception e) when (e is not RankFailedException and not TrainingDivergedException && mpi.Size > 1)
        {
            // One rank alone cannot go on (a write that failed, a lost peer): said in one line, then the whole job ends
            // (MPI_Abort), so no rank waits for it in the next sum.
            Console.SetError(stderr);
            int code = Program.Report(e, $"rank {mpi.Rank} of {mpi.Size}: ");
            Console.Error.Flush();
            mpi.Abort(code);
            return code;
        }
    }

    private static int Run(Settings given, Ranks ranks)
    {
        // Without --out: the newest run to resume, or a new numbered one (removed again if the run stops before writing).
        // Only rank 0 has a run folder.
        string? outDir = given.Out, created = null;
        try
        {
            ranks.Agree(() =>
            {
                if (!ranks.Writer || outDir is not null)
                {
                    return;
                }
                if (given.Resume)
                {
                    outDir = RunFolders.Newest(CheckpointFile)
                        ?? throw new ArgumentException($"--resume: no run under {RunFolders.Root}/ holds a {CheckpointFile}; pass --out DIR");
                    return;
                }
                Program.RequireFolder("--data", given.Data);
                outDir = created = RunFolders.Create();
                Console.Error.WriteLine($"run folder: {created}");
            });
            return Run(given with { Out = outDir }, outDir, ranks);
        }
        finally
        {
            if (created is not null)
            {
                RemoveIfUnused(created);
            }
        }
    }

    /// <summary>Removes a run folder this command made when the run left nothing in it but its lock (it stopped before any
    /// file was written), so a failed start does not leave an empty numbered run behind.</summary>
    private static void RemoveIfUnused(string folder)
    {
        try
        {
            if (Directory.Exists(folder) && Directory.EnumerateFileSystemEntries(folder).All(f => Path.GetFileName(f).StartsWith('.')))
            {
                Directory.Delete(folder, recursive: true);
            }
        }
        catch (IOException)
        {
        }
    }

    private static int Run(Settings s, string? outDir, Ranks ranks)
    {
        string checkpoint = outDir is null ? CheckpointFile : Path.Combine(outDir, CheckpointFile);
        // Whether to resume decides which collectives follow: every rank must agree on it before any of them.
        ranks.RequireSame([("--resume flag", s.Resume ? "given" : "not given")]);
        RunLock? runLock = null;
        Device? device = null;
        Trainer? trainer = null;
        try
        {
            // Rank 0's run folder: locked, checked, and on --resume its checkpoint read (and validated whole) before the
            // device, the data or the run folder is touched; the other ranks get the checkpoint's bytes from rank 0.
            byte[]? saved = null;
            ranks.Agree(() =>
            {
                if (!ranks.Writer)
                {
                    return;
                }
                Program.RequireFolder("--out", outDir!);
                Program.RequireFolder("--data", s.Data);
                runLock = Program.LockRun(outDir!);
                Program.RequireFileSlots("--out", outDir!, CheckpointFile, MetricsFile, LossFile, SamplesFile);
                if (s.Resume && !File.Exists(checkpoint))
                {
                    throw new ArgumentException($"--resume: {checkpoint} does not exist");
                }
                if (!s.Resume && File.Exists(checkpoint))
                {
                    throw new ArgumentException($"--out {outDir} already holds a run; pass --resume to continue it or --out DIR for a new one");
                }
                if (s.Resume)
                {
                    saved = ranks.Size > 1 ? File.ReadAllBytes(checkpoint) : null;
                }
            });
            CheckpointInfo? resumeFrom = null;
            if (s.Resume)
            {
                var bytes = ranks.Size > 1 ? ranks.Broadcast(saved) : null;
                ranks.Agree(() => resumeFrom = bytes is null ? Checkpoint.Inspect(checkpoint)
                    : Checkpoint.Inspect(SafeTensors.Parse(ranks.Writer ? checkpoint : $"{checkpoint} (rank 0's)", bytes)));
            }
            var recipe = Recipe.Named(s.Recipe);
            ImageSet? mnist = null;
            // Each rank's device and data (its own disk, the same path).
            ranks.Agree(() =>
            {
                if (resumeFrom is not null && s.Of(TrainSettings.Preset) is { } preset && preset != resumeFrom.Preset)
                {
                    throw new UsageException($"--resume: {checkpoint} holds a {resumeFrom.Preset} model, not {preset}");
                }
                Program.RequireFolder("--data", s.Data);
                if (ranks.Writer)
                {
                    // The run is not refused: the leftovers of the program's own writers killed in this folder go (we hold
                    // its lock, so none of them is live); nothing else is touched.
                    Durable.RemoveStaleTemps(outDir!, Durable.TempPattern(), allPidsStale: true);
                }
                var planned = resumeFrom is not null ? TrainOptions.FromMetadata(resumeFrom.Metadata, checkpoint) : null;
                // The math mode the GPU opens in: the flag's, else the run's, else the default; the self-check may lower it to
                // fp32 (a tensor-core kernel that disagrees), and then the run records fp32, as if --math fp32 had been given.
                var math = MathPrecisions.Parse(s.Of(TrainSettings.Math) ?? planned?.Math) ?? MathPrecisions.Default;
                device = Program.OpenDevice(s.Device with { Math = math });
                if (device is IlgpuDevice shared && ranks.Mpi is { } mpi && mpi.LocalSize > shared.Siblings)
                {
                    Console.Error.WriteLine($"warning: {mpi.LocalSize} ranks on this machine share its {shared.Siblings} {DeviceCatalog.KindName(shared.Kind)} device{(shared.Siblings > 1 ? "s" : "")}: start one rank a GPU");
                }
                if (device is IlgpuDevice gpu && gpu.Precision != math)
                {
                    s = s with { Given = [.. s.Given.Where(g => g.Setting != TrainSettings.Math), (TrainSettings.Math, gpu.Precision.Name())] };
                }
                // The step's memory, from the preset and the micro-batch the run will have, refused before any data is read.
                // A new run: the recipe's values (the preset the device's), then every flag given; a resumed one: the run's, then the flags.
                var asked = s.Apply(planned ?? TrainSettings.Defaults(recipe, DefaultPreset(device, recipe)));
                if (asked.SplitProblem(resuming: resumeFrom is not null) is { } split)
                {
                    throw new UsageException(split);
                }
                string batch = asked.MicroBatch == asked.Batch ? $"--batch {asked.Batch}" : $"micro-batches of {asked.MicroBatch} (--batch {asked.Batch})";
                MemoryEstimate.Require($"{batch} (preset {asked.Preset})", MemoryEstimate.TrainBytes(Presets.Channels(asked.Preset), asked.MicroBatch, s.Images.Size ?? 28), device);
                mnist = LoadData(s.Data, s.Images);
                if (mnist.Size != (s.Images.Size ?? 28))
                {
                    MemoryEstimate.Require($"{batch} (preset {asked.Preset}, {mnist.Size}x{mnist.Size} images)", MemoryEstimate.TrainBytes(Presets.Channels(asked.Preset), asked.MicroBatch, mnist.Size), device);
                }
                trainer = resumeFrom is not null ? Trainer.Resume(device, resumeFrom, mnist, s.Apply, ranks.Mpi) : new Trainer(device, asked, mnist, ranks.Mpi);
            });
            if (ranks.Size > 1)
            {
                ranks.RequireSame([.. trainer!.Identity(), ("build", Program.Version), ("backend", Backend(trainer.Device))]);
            }
            return Train(s, outDir, checkpoint, trainer!, recipe, ranks);
        }
        finally
        {
            trainer?.Dispose();
            device?.Dispose();
            runLock?.Dispose();
        }
    }

    /// <summary>What computes a rank's step, as the ranks compare it: the backend, its instruction set or GPU math, its kernels.</summary>
    private static string Backend(Device device) => device switch
    {
        CpuDevice cpu => $"cpu {cpu.SimdName}",
        IlgpuDevice gpu => $"{DeviceCatalog.KindName(gpu.Kind)} {gpu.EffectivePrecision.Name()}{(gpu.SimpleKernels ? " simple kernels" : "")}",
        _ => device.Kind.ToString(),
    };

    private static int Train(Settings s, string? outDir, string checkpoint, Trainer trainer, Recipe recipe, Ranks ranks)
    {
        var o = trainer.Options;
        var mnist = trainer.Data;
        Console.Error.WriteLine($"{(s.Resume ? $"resuming at step {trainer.Step}" : "training")}: {Banner(trainer)}");
        var changes = trainer.ChangesAtResume.ToList();
        if (changes.Count > 0)
        {
            Console.Error.WriteLine($"changed on resume: {string.Join("; ", changes)}");
        }
        if (s.Of(TrainSettings.Preset) is null && !s.Resume && trainer.Device.Kind == DeviceKind.Cpu)
        {
            Console.Error.WriteLine($"preset: {o.Preset}, the {recipe.Name} recipe's choice for the CPU backend (pass --preset tiny|small|base for another)");
        }
        // A small data set at the recipe's epochs gives few steps: said once, with what to set.
        long plannedSteps = o.MaxSteps > 0 ? Math.Min(o.MaxSteps, (long)o.Epochs * trainer.StepsPerEpoch) : (long)o.Epochs * trainer.StepsPerEpoch;
        if (!s.Resume && plannedSteps < SmallRunSteps && !s.Given.Any(g => g.Setting == TrainSettings.Epochs || g.Setting == TrainSettings.MaxSteps))
        {
            long epochs = (SmallRunSteps + trainer.StepsPerEpoch - 1) / trainer.StepsPerEpoch;
            Console.Error.WriteLine($"note: {mnist.Count:N0} images at batch {o.Batch} are {trainer.StepsPerEpoch} steps an epoch, {plannedSteps} in all; " +
                $"a model learns little in so few: pass --epochs {epochs} (or --max-steps {SmallRunSteps})");
        }
        if (!ranks.Writer)
        {
            // Another rank: the same steps, nothing written.
            using var quiet = new StopSignals();
            trainer.StopRequested = () => quiet.Token.IsCancellationRequested;
            // The same save points as rank 0 (nothing saved here): they end a round of queued steps, so every rank reads its
            // steps back, and meets a divergence, at the same step.
            Loop(trainer, new RunFiles(null, checkpoint, [], StreamWriter.Null, s.SaveEvery), quiet);
            return !trainer.StopAgreed ? 0 : quiet.Received is not null ? quiet.ExitCode : ExitCodes.Terminated;
        }

        var metricsPath = Path.Combine(outDir!, MetricsFile);
        var history = s.Resume ? TrimMetrics(metricsPath, trainer.Step) : NewMetrics(metricsPath);
        using var metrics = new StreamWriter(metricsPath, append: true) { AutoFlush = true };
        if (changes.Count > 0)
        {
            metrics.WriteLine(JsonSerializer.Serialize(new { @event = "resume", step = trainer.Step, changes }, MetricsJson));
        }
        var run = new RunFiles(outDir, checkpoint, history, metrics, s.SaveEvery);
        using (var signals = new StopSignals())
        {
            trainer.StopRequested = () => signals.Token.IsCancellationRequested;
            Loop(trainer, run, signals);
            using (signals.Critical())
            {
                trainer.Save(checkpoint);
                Images.SaveLossPlot(Path.Combine(outDir!, LossFile), history);
            }
            if (signals.Received is { } signal)
            {
                Console.Error.WriteLine($"stopped by {signal} at step {trainer.Step}: saved {checkpoint}; continue with --resume");
                return signals.ExitCode;
            }
            if (trainer.StopAgreed)
            {
                Console.Error.WriteLine($"stopped at step {trainer.Step}, another rank was asked to: saved {checkpoint}; continue with --resume");
                return ExitCodes.Terminated;
            }
        }
        // The checkpoint is saved: from here a signal ends the process as usual, and nothing is lost.
        if (s.Grid > 0)
        {
            // The recipe the run records (a resumed run keeps its own), else the one asked for.
            WriteSamples(trainer, Path.Combine(outDir!, SamplesFile), s.Grid, clip: Recipe.Named(o.Recipe ?? recipe.Name).ClippedSampling);
        }
        Console.Error.WriteLine($"done: {trainer.Step} steps{(trainer.Skipped > 0 ? $" ({trainer.Skipped} skipped as not finite)" : "")}; " +
            $"wrote {checkpoint}, {metricsPath}, {Path.Combine(outDir!, LossFile)}{(s.Grid > 0 ? $", {Path.Combine(outDir!, SamplesFile)}" : "")}");
        return 0;
    }

    /// <summary>
    /// The run's settings in one line, each from its declaration (<see cref="TrainSettings"/>) as a person writes it, with
    /// what they imply: "preset tiny (279,409 parameters), epochs 12 of 937 steps, ..., lr 0.001 (cosine decay to 1e-4), ...".
    /// </summary>
    internal static string Banner(Trainer trainer)
    {
        var o = trainer.Options;
        string Part(TrainSetting setting) => setting switch
        {
            _ when setting == TrainSettings.Preset => $"preset {o.Preset} ({trainer.Model.ParameterCount:N0} parameters)",
            _ when setting == TrainSettings.Epochs => $"epochs {o.Epochs} of {trainer.StepsPerEpoch} steps",
            _ when setting == TrainSettings.LrDecay && o.LrDecay == TrainSettings.Cosine => $"lr-decay cosine (to {Numbers.Human((double)o.Lr * Trainer.CosineFloor)})",
            _ when setting == TrainSettings.Classes && o.Classes > 0 => $"classes {o.Classes} (label dropout {Numbers.Human(Trainer.LabelDropProbability)})",
            _ when setting == TrainSettings.Math => $"math {o.Math}{MathNote(trainer.Device, o.Math)}",
            _ => $"{setting.Name} {setting.Display(o)}",
        };
        return string.Join(", ", TrainSettings.All.Select(Part)) + $", recipe {o.Recipe ?? "not recorded"}";
    }

    /// <summary>Where the math mode does not hold as written: " (the CPU backend computes fp32)", " (no tensor cores on this
    /// device: fp32)"; else nothing.</summary>
    internal static string MathNote(Device device, string math) => math == MathPrecision.Fp32.Name() ? ""
        : device is not IlgpuDevice gpu ? " (GPU only: the CPU backend computes fp32)"
        : gpu.EffectivePrecision == MathPrecision.Fp32 ? " (no tensor-core path on this device: fp32)"
        : "";

    /// <summary>The training set; a folder of images decoded for the first time shows a progress bar on a terminal (progress
    /// lines otherwise).</summary>
    private static ImageSet LoadData(string folder, FolderOptions options)
    {
        if (!AnsiConsole.Profile.Capabilities.Interactive || Datasets.Of(folder) != Datasets.Kind.Images)
        {
            return Datasets.LoadTraining(folder, options, msg => Console.Error.WriteLine(msg));
        }
        ImageSet? set = null;
        AnsiConsole.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(Markup.Escape($"decoding {folder}"), autoStart: false);
                set = Datasets.LoadTraining(folder, options, msg => AnsiConsole.MarkupLine(Markup.Escape(msg)), progress: new BarProgress(task));
                if (!task.IsStarted)
                {
                    task.Description = Markup.Escape($"{folder}: from the cache");
                    task.StartTask();
                }
                task.Value = task.MaxValue;
                task.StopTask();
            });
        return set!;
    }

    /// <summary>Decoding progress onto a progress bar's task, synchronously (System.Progress would post it elsewhere).</summary>
    private sealed class BarProgress(ProgressTask task) : IProgress<(int Done, int Total)>
    {
        public void Report((int Done, int Total) value)
        {
            if (!task.IsStarted)
            {
                task.MaxValue = value.Total;
                task.StartTask();
            }
            task.Value = value.Done;
        }
    }

    /// <summary>What the training loop writes to: the run folder, its checkpoint, the loss history, the metrics stream, and how often to save.</summary>
    private sealed record RunFiles(string? Folder, string Checkpoint, List<(long Step, double Loss)> History, StreamWriter Metrics, int SaveEvery);

    /// <summary>Fewer planned steps than this, with the recipe's epochs, get a note saying how many epochs to ask for.</summary>
    public const int SmallRunSteps = 2000;

    /// <summary>The preset when none is given: the seed's base on a GPU; tiny on the CPU backend, where base takes hours an epoch.</summary>
    public static string DefaultPreset(Device device, Recipe recipe) =>
        device.Kind is DeviceKind.Cuda or DeviceKind.OpenCL ? TrainSettings.Preset.OnGpu! : TrainSettings.Preset.ByRecipe(recipe);

    private static void Loop(Trainer trainer, RunFiles run, StopSignals signals)
    {
        var clock = Stopwatch.StartNew();
        long firstStep = trainer.Step;
        double smoothed = double.NaN;
        var stop = signals.Token;
        // Under MPI every rank stops after the step whose sum says a rank was asked to: the same step on each.
        bool Stopping() => trainer.Mpi is null ? stop.IsCancellationRequested : trainer.StopAgreed;

        bool SavePoint(long step) => step % trainer.StepsPerEpoch == 0 || (run.SaveEvery > 0 && step % run.SaveEvery == 0);

        // Queues steps without waiting (up to Trainer.ReadEvery, or to the next save point, the end, or a stop), then reads
        // their losses back in one synchronisation and writes a metrics line for each: on a GPU the host never waits
        // between the steps of a round.
        void OneRound(Action<string> report)
        {
            do
            {
                trainer.QueueStep();
            }
            while (trainer.Pending < Trainer.ReadEvery && !trainer.Finished && !SavePoint(trainer.Step) && !Stopping());
            IReadOnlyList<StepResult> results;
            try
            {
                results = trainer.ReadBack();
            }
            catch (TrainingDivergedException)
            {
                // The round's steps before the one that ended the run still get their lines.
                Record(trainer.LastRead, report);
                throw;
            }
            Record(results, report);
            bool epochEnd = trainer.Step % trainer.StepsPerEpoch == 0;
            if (SavePoint(trainer.Step) && !trainer.Finished && run.Folder is not null)
            {
                using (signals.Critical())
                {
                    trainer.Save(run.Checkpoint);
                    Images.SaveLossPlot(Path.Combine(run.Folder, LossFile), run.History);
                }
                if (epochEnd)
                {
                    report($"epoch {trainer.Step / trainer.StepsPerEpoch} done: loss {smoothed:F4}; saved {run.Checkpoint}");
                }
            }
        }

        // A metrics line for each step read back, and the loss history for the plot.
        void Record(IReadOnlyList<StepResult> results, Action<string> report)
        {
            double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
            foreach (var r in results)
            {
                bool skipped = r.Skip is not null;
                if (!skipped)
                {
                    smoothed = double.IsNaN(smoothed) ? r.Loss : 0.98 * smoothed + 0.02 * r.Loss;
                    run.History.Add((r.Step, r.Loss));
                }
                else
                {
                    report($"warning: {r.Skip}");
                }
                run.Metrics.WriteLine(JsonSerializer.Serialize(new
                {
                    step = r.Step,
                    epoch = (r.Step - 1) / trainer.StepsPerEpoch + 1,
                    loss = skipped || !float.IsFinite(r.Loss) ? (float?)null : r.Loss,
                    skipped = skipped ? true : (bool?)null,
                    lr = r.Lr,
                    grad_norm = float.IsFinite(r.GradNorm) ? r.GradNorm : (float?)null,
                    steps_per_s = Math.Round(rate, 3),
                    elapsed_s = Math.Round(clock.Elapsed.TotalSeconds, 2),
                }, MetricsJson));
            }
        }

        string Status() => $"step {trainer.Step}/{trainer.TotalSteps} epoch {Math.Min(trainer.Epoch + 1, trainer.Options.Epochs)} loss {smoothed:F4}";

        if (AnsiConsole.Profile.Capabilities.Interactive)
        {
            AnsiConsole.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn(), new SpinnerColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask(Status(), maxValue: trainer.TotalSteps);
                    task.Value = trainer.Step;
                    while (!trainer.Finished && !Stopping())
                    {
                        OneRound(msg => AnsiConsole.MarkupLine(Markup.Escape(msg)));
                        double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
                        task.Description = Markup.Escape($"{Status()} {rate:F2} steps/s");
                        task.Value = trainer.Step;
                    }
                });
            return;
        }
        // Plain logs (redirected output, CI): a line every 30 seconds and at each epoch.
        var lastLine = TimeSpan.Zero;
        while (!trainer.Finished && !Stopping())
        {
            OneRound(Console.Error.WriteLine);
            if (clock.Elapsed - lastLine > TimeSpan.FromSeconds(30) || trainer.Finished)
            {
                lastLine = clock.Elapsed;
                double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
                var left = TimeSpan.FromSeconds((trainer.TotalSteps - trainer.Step) / Math.Max(rate, 1e-9));
                Console.Error.WriteLine($"{Status()} {rate:F2} steps/s, {left:hh\\:mm\\:ss} left");
            }
        }
    }

    private static readonly JsonSerializerOptions MetricsJson = new()
    {
        DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping, // "lr 0.001 -> 0.0005", not "-\u003E"
    };

    /// <summary>Writes the sample grid: 64 digits by DDPM (fixed large variance), clipped unless --recipe seed,
    /// with EMA weights when the run keeps them, unless they are still mostly the initial ones (a conditional model samples unguided, with "no label").</summary>
    private static void WriteSamples(Trainer trainer, string path, int count, bool clip)
    {
        Console.Error.WriteLine($"sampling {count} {(trainer.Model.ImageChannels == 1 && trainer.Model.ImageSize == 28 ? "digits" : "images")} for the grid ({(clip ? "clipped" : "the seed's unclipped")} ddpm)");
        var model = trainer.Model;
        float[][]? saved = null;
        double share = trainer.Ema is null ? 0 : trainer.EmaSchedule.InitialShare(trainer.Step, trainer.Skipped);
        if (trainer.Ema is not null && share > EmaSchedule.MostlyInitial)
        {
            Console.Error.WriteLine(SamplingPlan.EmaFallback(share, trainer.Step.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        }
        else if (trainer.Ema is { } ema)
        {
            saved = model.Parameters.Select(p => p.Value.ToArray()).ToArray();
            ema.CopyToModel();
        }
        var digits = Sampler.Run(model, count, Sampler.Plan(trainer.Schedule, SamplerKind.DdpmLarge, clip: clip), trainer.Options.Seed);
        if (saved is not null)
        {
            for (int i = 0; i < saved.Length; i++)
            {
                model.Parameters[i].Value.CopyFrom(saved[i]);
            }
        }
        Images.SaveGrid(path, digits, count, shape: new ImageShape(model.ImageChannels, model.ImageSize));
    }

    private static List<(long Step, double Loss)> NewMetrics(string path)
    {
        File.WriteAllText(path, "");
        return [];
    }

    /// <summary>On resume, drops metric lines after the checkpoint's step (work that the resumed run redoes), and lines that are not metrics, each with a warning.</summary>
    private static List<(long Step, double Loss)> TrimMetrics(string path, long step)
    {
        var metrics = RunMetrics.Read(path, step);
        foreach (var problem in metrics.Problems)
        {
            Console.Error.WriteLine($"warning: {problem}");
        }
        RunMetrics.Rewrite(path, metrics);
        return metrics.History;
    }
}
