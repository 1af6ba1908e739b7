using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;
using Spectre.Console;

namespace Ddpm.Cli;

/// <summary>
/// <c>ddpm train</c>: the seed's recipe by default; writes into --out model.safetensors (at each
/// epoch, on Ctrl-C and at the end), metrics.jsonl, loss.png and samples.png.
/// </summary>
public static class TrainCommand
{
    /// <summary>The file names a run folder holds.</summary>
    public const string CheckpointFile = "model.safetensors", MetricsFile = "metrics.jsonl", LossFile = "loss.png", SamplesFile = "samples.png";

    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var preset = new Option<string?>("--preset") { Description = "tiny | small | base (default: base on a GPU, tiny on the CPU backend)" };
        preset.AcceptOnlyFromAmong(Presets.Names);
        var epochs = new Option<int?>("--epochs") { Description = "passes over the 60,000 training digits (default 3)" };
        var maxSteps = new Option<long?>("--max-steps") { Description = "stop after this many steps in all (default: no limit)" };
        var batch = new Option<int>("--batch") { Description = "digits per step", DefaultValueFactory = _ => 64 };
        var lr = new Option<float>("--lr") { Description = "Adam learning rate", DefaultValueFactory = _ => 1e-3f };
        var schedule = new Option<string>("--schedule") { Description = "noise schedule: linear (the seed's) | cosine", DefaultValueFactory = _ => "linear" };
        schedule.AcceptOnlyFromAmong("linear", "cosine");
        var ema = new Option<float>("--ema") { Description = "EMA decay of the weights, e.g. 0.999 (0: off)", DefaultValueFactory = _ => 0f };
        var clip = new Option<float>("--clip") { Description = "clip the gradient norm to this (0: off)", DefaultValueFactory = _ => 0f };
        var seed = new Option<ulong>("--seed") { Description = "seed of the weights, shuffling, timesteps and noise", DefaultValueFactory = _ => 0UL };
        var device = Program.DeviceOption();
        var data = new Option<string>("--data") { Description = "folder of the MNIST files (fetched there if missing)", DefaultValueFactory = _ => Mnist.DefaultFolder };
        var output = new Option<string>("--out") { Description = "run folder", DefaultValueFactory = _ => Path.Combine("runs", "latest") };
        var resume = new Option<bool>("--resume") { Description = "continue the run in --out from its checkpoint, exactly" };
        var command = new Command("train", "Train the U-Net on MNIST; checkpoint, log, plot and write a sample grid.")
        {
            preset, epochs, maxSteps, batch, lr, schedule, ema, clip, seed, device, data, output, resume,
        };
        command.SetAction(p => Program.Guard(() => Run(new Settings(
            p.GetValue(preset), p.GetValue(epochs), p.GetValue(maxSteps), p.GetValue(batch), p.GetValue(lr), p.GetValue(schedule)!,
            p.GetValue(ema), p.GetValue(clip), p.GetValue(seed), p.GetValue(device)!, p.GetValue(data)!, p.GetValue(output)!, p.GetValue(resume)))));
        return command;
    }

    private sealed record Settings(string? Preset, int? Epochs, long? MaxSteps, int Batch, float Lr, string Schedule, float Ema, float Clip,
        ulong Seed, string Device, string Data, string Out, bool Resume);

    private static int Run(Settings s)
    {
        var checkpoint = Path.Combine(s.Out, CheckpointFile);
        if (s.Resume && !File.Exists(checkpoint))
        {
            throw new ArgumentException($"--resume: {checkpoint} does not exist");
        }
        if (!s.Resume && File.Exists(checkpoint))
        {
            throw new ArgumentException($"{s.Out} already holds a run; pass --resume to continue it or --out DIR for a new one");
        }
        if (s.Epochs is < 1 || s.MaxSteps is < 1)
        {
            throw new ArgumentException("--epochs and --max-steps must be at least 1");
        }
        if (s.Resume && s.Preset is not null)
        {
            int ch = Checkpoint.ChannelsOf(SafeTensors.Read(checkpoint));
            if (Presets.Channels(s.Preset) != ch)
            {
                throw new ArgumentException($"--resume: {checkpoint} holds a {Presets.NameOf(ch) ?? $"ch={ch}"} model, not {s.Preset}");
            }
        }
        using var device = Program.OpenDevice(s.Device);
        var mnist = Mnist.LoadTraining(s.Data, msg => Console.Error.WriteLine(msg));
        Directory.CreateDirectory(s.Out);

        using var trainer = s.Resume
            ? Trainer.Resume(device, checkpoint, mnist, o => o with { Epochs = s.Epochs ?? o.Epochs, MaxSteps = s.MaxSteps ?? o.MaxSteps })
            : new Trainer(device, new TrainOptions
            {
                Preset = s.Preset ?? DefaultPreset(device),
                Epochs = s.Epochs ?? 3,
                MaxSteps = s.MaxSteps ?? 0,
                Batch = s.Batch,
                Lr = s.Lr,
                Schedule = s.Schedule,
                EmaDecay = s.Ema,
                Clip = s.Clip,
                Seed = s.Seed,
            }, mnist);
        var o = trainer.Options;
        Console.Error.WriteLine(
            $"{(s.Resume ? $"resuming at step {trainer.Step}" : "training")}: preset {o.Preset} ({trainer.Model.ParameterCount:N0} parameters), " +
            $"{o.Epochs} epochs of {trainer.StepsPerEpoch} steps (batch {o.Batch}){(o.MaxSteps > 0 ? $", at most {o.MaxSteps} steps" : "")}, " +
            $"lr {o.Lr}, {o.Schedule} schedule T={o.DiffusionSteps}, ema {(o.EmaDecay > 0 ? o.EmaDecay : "off")}, clip {(o.Clip > 0 ? o.Clip : "off")}, seed {o.Seed}");
        if (s.Preset is null && !s.Resume && device.Kind == DeviceKind.Cpu)
        {
            Console.Error.WriteLine("preset: tiny, chosen for the CPU backend (pass --preset small|base for a larger model)");
        }

        var metricsPath = Path.Combine(s.Out, MetricsFile);
        var history = s.Resume ? TrimMetrics(metricsPath, trainer.Step) : NewMetrics(metricsPath);
        using var metrics = new StreamWriter(metricsPath, append: true) { AutoFlush = true };
        using var stop = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            // First Ctrl-C: finish the step, save, exit. A second one kills the process as usual.
            if (!stop.IsCancellationRequested)
            {
                e.Cancel = true;
                stop.Cancel();
            }
        };
        Console.CancelKeyPress += onCancel;
        try
        {
            Loop(trainer, history, metrics, s.Out, stop.Token);
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
        trainer.Save(checkpoint);
        Images.SaveLossPlot(Path.Combine(s.Out, LossFile), history);
        if (stop.IsCancellationRequested)
        {
            Console.Error.WriteLine($"interrupted at step {trainer.Step}: saved {checkpoint}; continue with --resume");
            return ExitCodes.Interrupted;
        }
        WriteSamples(trainer, Path.Combine(s.Out, SamplesFile));
        Console.Error.WriteLine($"done: {trainer.Step} steps; wrote {checkpoint}, {metricsPath}, {Path.Combine(s.Out, LossFile)}, {Path.Combine(s.Out, SamplesFile)}");
        return 0;
    }

    /// <summary>The preset when none is given: the seed's base on a GPU; tiny on the CPU backend, where base takes hours an epoch.</summary>
    public static string DefaultPreset(Device device) => device.Kind is DeviceKind.Cuda or DeviceKind.OpenCL ? "base" : "tiny";

    private static void Loop(Trainer trainer, List<(long Step, double Loss)> history, StreamWriter metrics, string outDir, CancellationToken stop)
    {
        var clock = Stopwatch.StartNew();
        long firstStep = trainer.Step;
        double smoothed = double.NaN;
        string checkpoint = Path.Combine(outDir, CheckpointFile);

        void OneStep(Action<string> report)
        {
            float loss = trainer.TrainStep();
            smoothed = double.IsNaN(smoothed) ? loss : 0.98 * smoothed + 0.02 * loss;
            history.Add((trainer.Step, loss));
            double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
            metrics.WriteLine(JsonSerializer.Serialize(new
            {
                step = trainer.Step,
                epoch = (trainer.Step - 1) / trainer.StepsPerEpoch + 1,
                loss,
                lr = trainer.Adam.LearningRate,
                grad_norm = float.IsNaN(trainer.LastGradNorm) ? (float?)null : trainer.LastGradNorm,
                steps_per_s = Math.Round(rate, 3),
                elapsed_s = Math.Round(clock.Elapsed.TotalSeconds, 2),
            }));
            if (trainer.Step % trainer.StepsPerEpoch == 0 && !trainer.Finished)
            {
                trainer.Save(checkpoint);
                metrics.Flush();
                Images.SaveLossPlot(Path.Combine(outDir, LossFile), history);
                report($"epoch {trainer.Step / trainer.StepsPerEpoch} done: loss {smoothed:F4}; saved {checkpoint}");
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
                    while (!trainer.Finished && !stop.IsCancellationRequested)
                    {
                        OneStep(msg => AnsiConsole.MarkupLine(Markup.Escape(msg)));
                        double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
                        task.Description = Markup.Escape($"{Status()} {rate:F2} steps/s");
                        task.Value = trainer.Step;
                    }
                });
            return;
        }
        // Plain logs (redirected output, CI): a line every 30 seconds and at each epoch.
        var lastLine = TimeSpan.Zero;
        while (!trainer.Finished && !stop.IsCancellationRequested)
        {
            OneStep(Console.Error.WriteLine);
            if (clock.Elapsed - lastLine > TimeSpan.FromSeconds(30) || trainer.Finished)
            {
                lastLine = clock.Elapsed;
                double rate = (trainer.Step - firstStep) / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
                var left = TimeSpan.FromSeconds((trainer.TotalSteps - trainer.Step) / Math.Max(rate, 1e-9));
                Console.Error.WriteLine($"{Status()} {rate:F2} steps/s, {left:hh\\:mm\\:ss} left");
            }
        }
    }

    /// <summary>Writes the seed's sample grid: 64 digits by DDPM (fixed large variance), with EMA weights when the run keeps them.</summary>
    private static void WriteSamples(Trainer trainer, string path)
    {
        Console.Error.WriteLine("sampling 64 digits for the grid");
        var model = trainer.Model;
        float[][]? saved = null;
        if (trainer.Ema is { } ema)
        {
            saved = model.Parameters.Select(p => p.Value.ToArray()).ToArray();
            ema.CopyToModel();
        }
        var digits = Sampler.Run(model, 64, Sampler.Plan(trainer.Schedule, SamplerKind.DdpmLarge), trainer.Options.Seed);
        if (saved is not null)
        {
            for (int i = 0; i < saved.Length; i++)
            {
                model.Parameters[i].Value.CopyFrom(saved[i]);
            }
        }
        Images.SaveGrid(path, digits, 64);
    }

    private static List<(long, double)> NewMetrics(string path)
    {
        File.WriteAllText(path, "");
        return [];
    }

    /// <summary>On resume, drops metric lines after the checkpoint's step (work that the resumed run redoes).</summary>
    private static List<(long, double)> TrimMetrics(string path, long step)
    {
        var kept = new List<string>();
        var history = new List<(long, double)>();
        if (File.Exists(path))
        {
            foreach (var line in File.ReadLines(path))
            {
                try
                {
                    using var doc = JsonDocument.Parse(line);
                    long s = doc.RootElement.GetProperty("step").GetInt64();
                    if (s <= step)
                    {
                        kept.Add(line);
                        history.Add((s, doc.RootElement.GetProperty("loss").GetDouble()));
                    }
                }
                catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
                {
                    // A line cut short by a crash: drop it.
                }
            }
        }
        File.WriteAllLines(path, kept);
        return history;
    }

    internal static string Invariant(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}
