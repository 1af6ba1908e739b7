using System.CommandLine;
using System.Globalization;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary><c>ddpm sample</c>: digits from a checkpoint (EMA weights when it has them): a PNG grid,
/// the digits as an MNIST-format IDX file, and the reverse process as an animated GIF.</summary>
public static class SampleCommand
{
    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var checkpoint = new Option<string?>("--checkpoint")
        {
            Description = $"a {TrainCommand.CheckpointFile} written by train (or the PyTorch peer's weights); default: the newest run's, under {RunFolders.Root}/",
        }.IsPath();
        var n = new Option<int>("--n") { Description = "how many digits (1..10000); with --digit all, how many of each digit (one grid row per digit)", DefaultValueFactory = _ => 64 }.Within(1, 10_000);
        var flags = new SamplerFlags("class-conditional checkpoints: the digit to draw, 0..9, or all (a 10-row grid, one row per digit); without it a conditional model samples unguided", withNone: false);
        var device = Program.DeviceOption();
        var math = Program.MathOption();
        var output = new Option<string?>("--out") { Description = "folder for samples.png, samples-idx3-ubyte (idx4 for RGB), reverse.gif (default: beside the checkpoint, in sample/)" }.IsPath();
        var pngs = new Option<bool>("--png-files") { Description = $"also write every sample as a PNG of its own, {PngFolder}/000000.png, 000001.png, … (at the model's size)" };
        var command = new Command("sample", "Generate digits from a checkpoint.") { checkpoint, n };
        flags.AddTo(command);
        command.Add(device);
        command.Add(math);
        command.Add(output);
        command.Add(pngs);
        command.SetAction(p => Program.Guard(() => Run(p.GetValue(checkpoint), p.GetValue(n), flags.Read(p), Program.ChosenDevice(p, device, math), p.GetValue(output), p.GetValue(pngs))));
        return command;
    }


    /// <summary>The newest run's checkpoint (<see cref="RunFolders.Newest"/>), or one line saying there is none.</summary>
    internal static string NewestCheckpoint() =>
        RunFolders.Newest(TrainCommand.CheckpointFile) is { } run
            ? Path.Combine(run, TrainCommand.CheckpointFile)
            : throw new ArgumentException($"no run under {RunFolders.Root}/ holds a {TrainCommand.CheckpointFile}: train one with 'ddpm train', or pass --checkpoint FILE");

    /// <summary>The most digits samples.png shows (with --digit all, the most a row), and reverse.gif likewise.</summary>
    public const int GridCap = 1024, GridRowCap = 100, GifCap = 100, GifRowCap = 10;

    /// <summary>The samples a capped picture shows: the first <paramref name="cap"/>, or with rows of <paramref name="perRow"/>
    /// (--digit all) the first <paramref name="rowCap"/> of each row.</summary>
    internal static int[] Shown(int total, int perRow, int rowCap, int cap) => perRow == 0
        ? [.. Enumerable.Range(0, Math.Min(total, cap))]
        : [.. Enumerable.Range(0, total / perRow).SelectMany(r => Enumerable.Range(r * perRow, Math.Min(perRow, rowCap)))];

    private static float[] Select(float[] digits, int[] samples, int pixels)
    {
        var chosen = new float[(long)samples.Length * pixels];
        for (int i = 0; i < samples.Length; i++)
        {
            Array.Copy(digits, (long)samples[i] * pixels, chosen, (long)i * pixels, pixels);
        }
        return chosen;
    }

    /// <summary>--recipe: the recipe whose sampling to use (the names train takes; default: the one the checkpoint records).</summary>
    internal static Option<string?> RecipeOption(string what)
    {
        var recipe = new Option<string?>("--recipe")
        {
            Description = $"{what}: the recipe's sampling, by the names train takes: " +
                string.Join(" | ", Recipe.All.Select(r => $"{r.Name} ({(r.ClippedSampling ? "x0 estimate clipped to [-1, 1], then the posterior mean" : "the seed's unclipped step")})")) +
                $" (default: the recipe the checkpoint records; {Recipe.Default.Name} for one that records none)",
        };
        recipe.AcceptOnlyFromAmong(Recipe.Names);
        return recipe;
    }

    /// <summary>The folder (in --out) of --png-files' files.</summary>
    public const string PngFolder = "samples";

    private static int Run(string? checkpointGiven, int n, SamplerSettings settings, DeviceChoice deviceName, string? outDir, bool pngFiles = false)
    {
        settings.CheckFlags(guidanceNeedsDigit: true);
        string checkpoint = checkpointGiven ?? NewestCheckpoint();
        var plan = settings.Plan(checkpoint);
        settings = plan.Settings;
        int classes = Math.Max(plan.Info.Classes, 1);
        if (settings.Digit == "all" && (long)n * classes > 10_000)
        {
            throw new UsageException($"--n {n}: with --digit all or --class all it counts each of the {classes} classes, so at most {10_000 / classes} (10000 images in all)");
        }
        if (plan.Info.Classes > 0)
        {
            Console.Error.WriteLine($"classes: {SamplerSettings.Names(plan.Info.ClassNames)}");
        }
        outDir ??= Path.Combine(Path.GetDirectoryName(Path.GetFullPath(checkpoint))!, "sample");
        Program.RequireWritableFolder("--out", outDir);
        using var outLock = Program.LockRun(outDir); // one writer: a second sample into the folder is refused, not mixed in
        var shape = new ImageShape(plan.Info.ImageChannels, plan.Info.ImageSize);
        int pixels = shape.Length;
        Program.RequireFileSlots("--out", outDir, "samples.png", Images.IdxName(shape), "reverse.gif");

        using var device = Program.OpenDevice(deviceName);
        MemoryEstimate.RequireSampling(settings.MemoryMiB, device);
        // --digit all (--class all): n of each class, class c in grid row c.
        int total = settings.Digit == "all" ? classes * n : n;
        if (plan.EmaNote is { } note)
        {
            Console.Error.WriteLine(note);
        }
        Console.Error.WriteLine(plan.Describe(total) + (plan.Batch < total ? $", in batches of {plan.Batch} (--memory {plan.Settings.MemoryMiB} MiB)" : ""));
        // The grid and the GIF show the first digits (with --digit all, the first of each row): their size is capped, the
        // IDX file holds every digit.
        int perRow = settings.Digit == "all" ? n : 0;
        var inGrid = Shown(total, perRow, GridRowCap, GridCap);
        var inGif = Shown(total, perRow, GifRowCap, GifCap);
        var slotOf = new Dictionary<int, int>(inGif.Select((sample, slot) => KeyValuePair.Create(sample, slot)));
        var frames = new List<float[]>();
        int every = Math.Max(1, plan.Steps.Count / 30);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var digits = plan.Run(device, total, (i, first, x) =>
        {
            if (i % every != 0 && i != plan.Steps.Count - 1)
            {
                return;
            }
            int frame = i / every + (i % every == 0 ? 0 : 1);
            while (frames.Count <= frame)
            {
                frames.Add(new float[inGif.Length * pixels]);
            }
            // Only the shown digits are copied from the device, a digit at a time (a batch may hold none of them).
            int count = x.Length / pixels;
            for (int k = 0; k < count; k++)
            {
                if (slotOf.TryGetValue(first + k, out int slot))
                {
                    using var digit = x.Slice(k * pixels, pixels);
                    digit.CopyTo(frames[frame].AsSpan(slot * pixels, pixels));
                }
            }
        });
        Console.Error.WriteLine($"{plan.Steps.Count} steps in {clock.Elapsed.TotalSeconds:F1} s");
        var png = Path.Combine(outDir, "samples.png");
        var idx = Path.Combine(outDir, Images.IdxName(shape));
        var gif = Path.Combine(outDir, "reverse.gif");
        Images.SaveGrid(png, Select(digits, inGrid, pixels), inGrid.Length, perRow == 0 ? 0 : Math.Min(perRow, GridRowCap), shape);
        Images.SaveIdx(idx, digits, total, shape);
        Images.SaveAnimation(gif, frames, inGif.Length, perRow == 0 ? 0 : Math.Min(perRow, GifRowCap), shape);
        Console.Error.WriteLine($"wrote {png}{(inGrid.Length < total ? $" (the first {inGrid.Length})" : "")}, {idx}, {gif}{(inGif.Length < total ? $" (the first {inGif.Length})" : "")}");
        if (pngFiles)
        {
            string folder = Path.Combine(outDir, PngFolder);
            Directory.CreateDirectory(folder);
            for (int i = 0; i < total; i++)
            {
                Images.SaveOne(Path.Combine(folder, $"{i:D6}.png"), digits, i, shape);
            }
            Console.Error.WriteLine($"wrote {total} PNG files into {folder}");
        }
        return 0;
    }
}

/// <summary>The sampler flags that <c>sample</c> and <c>eval</c> share: --digit, --guidance, --sampler, --variance,
/// --steps, --eta, --recipe, --seed, --no-ema.</summary>
internal sealed class SamplerFlags
{
    private readonly Option<string?> _digit;
    private readonly Option<double?> _guidance;
    private readonly Option<string> _sampler;
    private readonly Option<string?> _variance;
    private readonly Option<int?> _steps;
    private readonly Option<double?> _eta;
    private readonly Option<string?> _recipe;
    private readonly Option<ulong> _seed;
    private readonly Option<bool> _noEma;
    private readonly Option<int> _memory;
    private readonly Option<string?> _class;

    /// <summary>The flags, --digit described by <paramref name="digitDescription"/> and taking "none" too when <paramref name="withNone"/>.</summary>
    public SamplerFlags(string digitDescription, bool withNone)
    {
        _digit = new Option<string?>("--digit") { Description = digitDescription };
        _digit.AcceptOnlyFromAmong([.. Enumerable.Range(0, 10).Select(d => d.ToString(CultureInfo.InvariantCulture)), "all", .. withNone ? new[] { "none" } : []]);
        _class = new Option<string?>("--class")
        {
            Description = "class-conditional checkpoints of a labelled folder (or CIFAR-10): the class to draw by name (the checkpoint's names; sample prints them), or all (a grid row per class)",
        };
        _guidance = new Option<double?>("--guidance") { Description = $"classifier-free guidance weight w with --digit (default {SamplerSettings.DefaultGuidance.ToString("0.0##", CultureInfo.InvariantCulture)}): eps = eps(none) + w·(eps(digit) - eps(none))" }.Within(0.0, 100.0);
        _sampler = new Option<string>("--sampler") { Description = "ddpm (ancestral, T steps) | ddim (S steps) | dpm++ (DPM-Solver++(2M), S steps)", DefaultValueFactory = _ => "ddpm" };
        _sampler.AcceptOnlyFromAmong("ddpm", "ddim", "dpm++");
        _variance = new Option<string?>("--variance") { Description = "ddpm's sigma²: large (beta_t, the seed's, default) | small (posterior)" };
        _variance.AcceptOnlyFromAmong("large", "small");
        _steps = new Option<int?>("--steps") { Description = "steps S of ddim (default 50) or dpm++ (default 20); ddpm always takes the run's T" }.Within(1, NoiseScheduleLimits.MaxT);
        _eta = new Option<double?>("--eta") { Description = "ddim's or dpm++'s eta in [0, 1]: 0 deterministic (ddim's default), 1 as ddpm (ddim) or the SDE solver (dpm++'s default)" }.Within(0.0, 1.0);
        _recipe = SampleCommand.RecipeOption("every sampler's step");
        _seed = new Option<ulong>("--seed") { Description = "noise seed: the same seed gives the same digits", DefaultValueFactory = _ => 0UL };
        _noEma = new Option<bool>("--no-ema") { Description = "use the raw weights even when the checkpoint has EMA weights" };
        _memory = new Option<int>("--memory")
        {
            Description = $"MiB of memory for one batch of samples (default {SamplingPlan.DefaultMemoryMiB}): the digits are drawn in batches that fit, each with its own noise, so --n costs time, not memory, and the digits do not depend on it",
            DefaultValueFactory = _ => SamplingPlan.DefaultMemoryMiB,
        }.Within(16, 1 << 20);
    }

    private Option[] All => [_digit, _class, _guidance, _sampler, _variance, _steps, _eta, _recipe, _seed, _noEma, _memory];

    /// <summary>Adds every flag to <paramref name="command"/>.</summary>
    public void AddTo(Command command)
    {
        foreach (var option in All)
        {
            command.Add(option);
        }
    }

    /// <summary>The flags' values.</summary>
    public SamplerSettings Read(ParseResult p) => new(p.GetValue(_sampler)!, p.GetValue(_variance), p.GetValue(_steps), p.GetValue(_eta),
        p.GetValue(_recipe), p.GetValue(_seed), p.GetValue(_noEma), p.GetValue(_digit), p.GetValue(_guidance), p.GetValue(_memory), p.GetValue(_class));

    /// <summary>The first flag given on the command line (not left at its default), or null.</summary>
    public string? FirstGiven(ParseResult p) => All.FirstOrDefault(o => p.GetResult(o) is { Implicit: false })?.Name;
}

/// <summary>What the sampler flags asked for; <see cref="Plan"/> checks them against a checkpoint.</summary>
internal sealed record SamplerSettings(string Sampler, string? Variance, int? Steps, double? Eta, string? Recipe, ulong Seed, bool NoEma, string? Digit, double? Guidance,
    int MemoryMiB = SamplingPlan.DefaultMemoryMiB, string? Class = null)
{
    /// <summary>The guidance weight w when --digit is given without --guidance.</summary>
    public const double DefaultGuidance = 3.0;

    /// <summary>eta when --eta is not given: ddim deterministic (0), dpm++ its SDE form (1: at 20 steps it scores
    /// within a few percent of 300-step DDPM, the deterministic solver about twice DDPM's Fréchet distance; docs/quality.md).</summary>
    public static double DefaultEta(string sampler) => sampler == "dpm++" ? 1.0 : 0.0;

    /// <summary>Refuses flags that do not go together, before any file is read.</summary>
    public void CheckFlags(bool guidanceNeedsDigit)
    {
        bool ddpm = Sampler == "ddpm", ddim = Sampler == "ddim", dpm = Sampler == "dpm++";
        if (ddpm && (Steps is not null || Eta is not null))
        {
            throw new UsageException($"{(Steps is not null ? "--steps" : "--eta")} applies to --sampler ddim or dpm++ only (ddpm always takes the run's T steps)");
        }
        if (!ddpm && Variance is not null)
        {
            throw new UsageException($"--variance applies to --sampler ddpm only ({(ddim ? "ddim's noise is set by --eta" : "dpm++'s noise is set by --eta")})");
        }
        if (Digit is not null && Class is not null)
        {
            throw new UsageException("--digit and --class both pick the class to draw: pass one");
        }
        if (Guidance is not null && (Digit == "none" || (guidanceNeedsDigit && Digit is null && Class is null)))
        {
            throw new UsageException("--guidance applies with --digit or --class only (without it a conditional model samples unguided)");
        }
    }

    /// <summary>Up to ten class names, then how many more.</summary>
    internal static string Names(IReadOnlyList<string> names) => string.Join(", ", names.Take(10)) + (names.Count > 10 ? $", … ({names.Count} in all)" : "");

    /// <summary>
    /// Validates <paramref name="checkpoint"/> whole (names, shapes against the preset it claims, finite values,
    /// metadata) and these settings against it, and computes the sampler's steps from the run's schedule and T.
    /// </summary>
    public SamplingPlan Plan(string checkpoint)
    {
        if (Directory.Exists(checkpoint))
        {
            throw new UsageException($"--checkpoint {checkpoint}: is a folder; pass its {TrainCommand.CheckpointFile}");
        }
        if (!File.Exists(checkpoint))
        {
            throw new ArgumentException($"checkpoint {checkpoint} does not exist (train one with 'ddpm train')");
        }
        var info = Checkpoint.Inspect(checkpoint);
        if ((Digit is not null || Class is not null || Guidance is not null) && info.Classes == 0)
        {
            throw new UsageException($"{(Digit is not null ? $"--digit {Digit}" : Class is not null ? $"--class {Class}" : "--guidance")}: {checkpoint} holds an unconditional model (train one with --classes N)");
        }
        if (Digit is not null && Digit != "none" && info.Classes != Checkpoint.ConditionalClasses)
        {
            throw new UsageException($"--digit {Digit}: {checkpoint} holds a {info.Classes}-class model ({Names(info.ClassNames)}); pick one with --class NAME or --class all");
        }
        // --class: from here the class is its label (or all of them), as a digit's is.
        var settings = this;
        if (Class is not null)
        {
            int index = Class == "all" ? 0 : info.ClassNames.ToList().IndexOf(Class);
            if (index < 0)
            {
                throw new UsageException($"--class {Class}: {checkpoint}'s classes are {Names(info.ClassNames)} (or all)");
            }
            settings = this with { Class = null, Digit = Class == "all" ? "all" : index.ToString(CultureInfo.InvariantCulture) };
        }
        var meta = info.Metadata;
        string scheduleName = meta.GetValueOrDefault("schedule", "linear");
        int T = meta.TryGetValue("T", out var t) ? int.Parse(t, CultureInfo.InvariantCulture) : 300;
        bool ddim = Sampler == "ddim", dpm = Sampler == "dpm++";
        if (ddim && Steps > T)
        {
            throw new UsageException($"--steps {Steps}: the run has T = {T} diffusion steps, so ddim takes at most {T}");
        }
        // dpm++ moves between S + 1 distinct timesteps of 0..T-1.
        if (dpm && (Steps ?? Math.Min(20, T - 1)) > T - 1)
        {
            throw new UsageException($"--steps {Steps}: the run has T = {T} diffusion steps, so dpm++ takes at most {T - 1}");
        }
        var schedule = NoiseSchedule.ByName(scheduleName, T);
        var kind = ddim ? SamplerKind.Ddim : dpm ? SamplerKind.DpmSolver2M : Variance == "small" ? SamplerKind.DdpmSmall : SamplerKind.DdpmLarge;
        // --recipe, else the recipe the run recorded, else the default's sampling (runs from before the key).
        var recipe = Ddpm.Diffusion.Recipe.Named(Recipe ?? meta.GetValueOrDefault(TrainOptions.RecipeKey) ?? Ddpm.Diffusion.Recipe.Default.Name);
        var steps = Diffusion.Sampler.Plan(schedule, kind, Steps ?? (dpm ? Math.Min(20, T - 1) : 50), Eta ?? DefaultEta(Sampler), clip: recipe.ClippedSampling);
        return new SamplingPlan(info, settings, scheduleName, T, kind, steps, recipe);
    }
}

/// <summary>A checkpoint and the sampler to run on it, checked against each other.</summary>
internal sealed record SamplingPlan(CheckpointInfo Info, SamplerSettings Settings, string ScheduleName, int T, SamplerKind Kind, IReadOnlyList<ReverseStep> Steps,
    Recipe Recipe)
{
    /// <summary>True when the recipe samples with the x0 estimate clipped to [-1, 1] (all but the seed's).</summary>
    public bool Clip => Recipe.ClippedSampling;

    /// <summary>True when the EMA weights are sampled: the checkpoint has them, --no-ema is not given, and they are not still
    /// mostly the weights the average started from (<see cref="EmaNote"/> says so then).</summary>
    public bool UseEma => !Settings.NoEma && Info.HasEma && !(EmaInitialShare > EmaSchedule.MostlyInitial);

    /// <summary>The share of the checkpoint's EMA weights that is still the average's starting weights (null when unknown).</summary>
    public double? EmaInitialShare => Info.HasEma ? Trainer.EmaInitialShare(Info.Metadata) : null;

    /// <summary>One line when the EMA weights are passed over for being mostly the initial ones; null otherwise.</summary>
    public string? EmaNote => !Settings.NoEma && Info.HasEma && !UseEma ? EmaFallback(EmaInitialShare!.Value, Info.Metadata.GetValueOrDefault(Checkpoint.StepKey, "?")) : null;

    /// <summary>The line said when an average is passed over: its share of starting weights and what to do.</summary>
    public static string EmaFallback(double share, string step) => string.Create(CultureInfo.InvariantCulture,
        $"note: the EMA weights are still {share * 100:F0}% the initial ones after {step} steps (an average without warm-up), so the raw weights are sampled; train with --ema-warmup for an average that is ready early");

    /// <summary>ddim's or dpm++'s eta, the flag's or the sampler's default.</summary>
    public double Eta => Settings.Eta ?? SamplerSettings.DefaultEta(Settings.Sampler);

    /// <summary>The guidance weight w (used with a digit only).</summary>
    public float Guidance => (float)(Settings.Guidance ?? SamplerSettings.DefaultGuidance);

    /// <summary>ddpm's variance (large or small), null for the other samplers.</summary>
    public string? Variance => Kind switch { SamplerKind.DdpmLarge => "large", SamplerKind.DdpmSmall => "small", _ => null };

    /// <summary>
    /// The digit asked for each of <paramref name="total"/> samples: null without --digit (an unconditional model, or a
    /// conditional one unguided); with --digit all, total/10 of each digit in order (digit d in grid row d).
    /// </summary>
    public float[]? Labels(int total) => Settings.Digit switch
    {
        null or "none" => null,
        "all" => [.. Enumerable.Range(0, total).Select(i => (float)(i / (total / Info.Classes)))],
        var d => [.. Enumerable.Repeat(float.Parse(d, CultureInfo.InvariantCulture), total)],
    };

    /// <summary>One line: the model, the conditioning, the weights, the sampler, the recipe, the schedule and the seed.</summary>
    public string Describe(int total)
    {
        string Asked() => Settings.Digit == "all" ? (Info.ClassNames[0] == "0" ? "digit all" : "every class in turn")
            : Info.ClassNames[0] == "0" ? $"digit {Settings.Digit}" : $"class {Info.ClassNames[int.Parse(Settings.Digit!, CultureInfo.InvariantCulture)]}";
        string conditioning = Info.Classes == 0 ? "" : Labels(total) is null ? "unguided (no label), " : $"{Asked()} with guidance {Guidance.ToString(CultureInfo.InvariantCulture)}, ";
        string sampler = Kind switch
        {
            SamplerKind.Ddim => $"ddim {Steps.Count} steps eta {Eta.ToString(CultureInfo.InvariantCulture)}",
            SamplerKind.DpmSolver2M => $"dpm++ (2M) {Steps.Count} steps eta {Eta.ToString(CultureInfo.InvariantCulture)}{(Eta > 0 ? " (SDE)" : "")}",
            _ => $"ddpm ({Variance} variance) {Steps.Count} steps",
        };
        string what = Info.ImageChannels == 1 && Info.ImageSize == Checkpoint.DefaultImageSize ? "digits" : $"{Info.ImageChannels}x{Info.ImageSize}x{Info.ImageSize} images";
        return $"sampling {total} {what}: {Info.Preset} {(Info.Classes > 0 ? "conditional " : "")}model, {conditioning}{(UseEma ? "EMA" : "raw")} weights, " +
            $"{sampler}, the {Recipe.Name} recipe's {(Clip ? "clipped" : "unclipped")} step, {ScheduleName} schedule, seed {Settings.Seed}";
    }

    /// <summary>The default of --memory: MiB for one batch of samples. 1,000 tiny digits (eval's default) fit one batch, so
    /// they are the digits of one call bit for bit; a process stays under 2 GB at any --n (measured: docs/reliability.md).</summary>
    public const int DefaultMemoryMiB = 1700;

    /// <summary>Float maps of 28×28 at the model's width <paramref name="channels"/> that one sample's denoising step keeps live
    /// (the U-Net's skips, concatenations and norms at three resolutions, the CPU convolutions' lowered rows): the process's
    /// growth per sample measured 32.3 maps at tiny (16) and 35.4 at base (64), so 33 + channels/16, a map above each.</summary>
    public static int MapsPerSample(int channels) => 33 + channels / 16;

    /// <summary>Bytes one sample takes in a batch: its activations in one step, the sampler's own buffers and the result.</summary>
    public long BytesPerSample => ((long)MapsPerSample(Info.Channels) * Info.Channels + 12 * Info.ImageChannels) * Info.ImageSize * Info.ImageSize * sizeof(float);

    /// <summary>Samples a batch holds within --memory (at least one).</summary>
    public int Batch => (int)Math.Clamp((long)Settings.MemoryMiB * (1 << 20) / BytesPerSample, 1, int.MaxValue);

    /// <summary>Loads the weights onto <paramref name="device"/> and draws <paramref name="total"/> digits [total·784] in
    /// [-1, 1] (unclamped), in batches of <see cref="Batch"/> (the digits do not depend on it); <paramref name="onStep"/> sees
    /// each step's (step, first sample of the batch, x of the batch). The weights are released afterwards.</summary>
    public float[] Run(Device device, int total, Action<int, int, Tensor>? onStep = null)
    {
        var model = new UNet(Info.Channels, device, classes: Info.Classes, imageChannels: Info.ImageChannels) { ImageSize = Info.ImageSize };
        try
        {
            using (var ema = UseEma ? new Ema(model.Parameters, 0.5f) : null)
            {
                Checkpoint.Load(Info, model, ema: ema);
                ema?.CopyToModel();
            }
            return Sampler.RunBatched(model, total, Batch, Steps, Settings.Seed, Labels(total), Guidance, onStep);
        }
        finally
        {
            foreach (var p in model.Parameters)
            {
                p.Value.Dispose();
                p.Grad?.Dispose();
            }
        }
    }
}
