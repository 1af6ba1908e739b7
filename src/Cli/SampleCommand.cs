using System.CommandLine;
using System.Globalization;
using Ddpm.Diffusion;
using Ddpm.Nn;

namespace Ddpm.Cli;

/// <summary><c>ddpm sample</c>: digits from a checkpoint (EMA weights when it has them): a PNG grid,
/// the digits as an MNIST-format IDX file, and the reverse process as an animated GIF.</summary>
public static class SampleCommand
{
    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "a model.safetensors written by train (or the PyTorch peer's weights)", DefaultValueFactory = _ => Path.Combine("runs", "latest", TrainCommand.CheckpointFile) };
        var n = new Option<int>("--n") { Description = "how many digits (1..10000); with --digit all, how many of each digit (one grid row per digit)", DefaultValueFactory = _ => 64 }.Within(1, 10_000);
        var digit = new Option<string?>("--digit") { Description = "class-conditional checkpoints: the digit to draw, 0..9, or all (a 10-row grid, one row per digit); without it a conditional model samples unguided" };
        digit.AcceptOnlyFromAmong([.. Enumerable.Range(0, 10).Select(d => d.ToString(CultureInfo.InvariantCulture)), "all"]);
        var guidance = new Option<double?>("--guidance") { Description = "classifier-free guidance weight w with --digit (default 3.0): eps = eps(none) + w·(eps(digit) - eps(none))" }.Within(0.0, 100.0);
        var sampler = new Option<string>("--sampler") { Description = "ddpm (ancestral, T steps) | ddim (S steps) | dpm++ (DPM-Solver++(2M), S steps)", DefaultValueFactory = _ => "ddpm" };
        sampler.AcceptOnlyFromAmong("ddpm", "ddim", "dpm++");
        var variance = new Option<string?>("--variance") { Description = "ddpm's sigma²: large (beta_t, the seed's, default) | small (posterior)" };
        variance.AcceptOnlyFromAmong("large", "small");
        var steps = new Option<int?>("--steps") { Description = "steps S of ddim (default 50) or dpm++ (default 20); ddpm always takes the run's T" }.Within(1, NoiseScheduleLimits.MaxT);
        var eta = new Option<double?>("--eta") { Description = "ddim's eta in [0, 1]: 0 deterministic (default), 1 as ddpm" }.Within(0.0, 1.0);
        var recipe = RecipeOption("every sampler's step");
        var seed = new Option<ulong>("--seed") { Description = "noise seed: the same seed gives the same digits", DefaultValueFactory = _ => 0UL };
        var noEma = new Option<bool>("--no-ema") { Description = "use the raw weights even when the checkpoint has EMA weights" };
        var device = Program.DeviceOption();
        var output = new Option<string?>("--out") { Description = "folder for samples.png, samples-idx3-ubyte, reverse.gif (default: beside the checkpoint, in sample/)" };
        var command = new Command("sample", "Generate digits from a checkpoint.") { checkpoint, n, digit, guidance, sampler, variance, steps, eta, recipe, seed, noEma, device, output };
        command.SetAction(p => Program.Guard(() => Run(p.GetValue(checkpoint)!, p.GetValue(n), p.GetValue(digit), p.GetValue(guidance), p.GetValue(sampler)!, p.GetValue(variance), p.GetValue(steps),
            p.GetValue(eta), p.GetValue(recipe)!, p.GetValue(seed), p.GetValue(noEma), p.GetValue(device)!, p.GetValue(output))));
        return command;
    }

    /// <summary>--recipe: clipped (the x0 estimate clipped to [-1, 1], the default) | seed (the seed's unclipped step).</summary>
    internal static Option<string> RecipeOption(string what)
    {
        var recipe = new Option<string>("--recipe")
        {
            Description = $"{what}: clipped (x0 estimate clipped to [-1, 1], then the posterior mean; default) | seed (the seed's unclipped step)",
            DefaultValueFactory = _ => "clipped",
        };
        recipe.AcceptOnlyFromAmong("clipped", "seed");
        return recipe;
    }

    private static int Run(string checkpoint, int n, string? digit, double? guidance, string samplerName, string? variance, int? steps, double? eta, string recipe, ulong seed, bool noEma, string deviceName, string? outDir)
    {
        bool ddpm = samplerName == "ddpm", ddim = samplerName == "ddim", dpm = samplerName == "dpm++";
        if (ddpm && (steps is not null || eta is not null))
        {
            throw new UsageException($"{(steps is not null ? "--steps" : "--eta")} applies to --sampler ddim or dpm++ only (ddpm always takes the run's T steps)");
        }
        if (dpm && eta is not null)
        {
            throw new UsageException("--eta applies to --sampler ddim only (dpm++ is deterministic)");
        }
        if (!ddpm && variance is not null)
        {
            throw new UsageException($"--variance applies to --sampler ddpm only ({(ddim ? "ddim's noise is set by --eta" : "dpm++ adds no noise")})");
        }
        if (guidance is not null && digit is null)
        {
            throw new UsageException("--guidance applies with --digit only (without it a conditional model samples unguided)");
        }
        if (digit == "all" && n > 1000)
        {
            throw new UsageException($"--n {n}: with --digit all it counts each digit, so at most 1000 (10000 digits in all)");
        }
        if (Directory.Exists(checkpoint))
        {
            throw new UsageException($"--checkpoint {checkpoint}: is a folder; pass its {TrainCommand.CheckpointFile}");
        }
        if (!File.Exists(checkpoint))
        {
            throw new ArgumentException($"checkpoint {checkpoint} does not exist (train one with 'ddpm train')");
        }
        // The whole file is validated (names, shapes against the preset it claims, finite values, metadata) before anything is built.
        var info = Checkpoint.Inspect(checkpoint);
        if (digit is not null && info.Classes == 0)
        {
            throw new UsageException($"--digit {digit}: {checkpoint} holds an unconditional model (train one with --classes 10)");
        }
        var meta = info.Metadata;
        string scheduleName = meta.GetValueOrDefault("schedule", "linear");
        int T = meta.TryGetValue("T", out var t) ? int.Parse(t, CultureInfo.InvariantCulture) : 300;
        if (ddim && steps > T)
        {
            throw new UsageException($"--steps {steps}: the run has T = {T} diffusion steps, so ddim takes at most {T}");
        }
        // dpm++ moves between S + 1 distinct timesteps of 0..T-1.
        if (dpm && (steps ?? Math.Min(20, T - 1)) > T - 1)
        {
            throw new UsageException($"--steps {steps}: the run has T = {T} diffusion steps, so dpm++ takes at most {T - 1}");
        }
        var schedule = NoiseSchedule.ByName(scheduleName, T);
        var kind = ddim ? SamplerKind.Ddim : dpm ? SamplerKind.DpmSolver2M : variance == "small" ? SamplerKind.DdpmSmall : SamplerKind.DdpmLarge;
        bool clip = recipe != "seed";
        var plan = Sampler.Plan(schedule, kind, steps ?? (dpm ? Math.Min(20, T - 1) : 50), eta ?? 0, clip);
        outDir ??= Path.Combine(Path.GetDirectoryName(Path.GetFullPath(checkpoint))!, "sample");
        Program.RequireWritableFolder("--out", outDir);

        using var device = Program.OpenDevice(deviceName);
        var model = new UNet(info.Channels, device, classes: info.Classes);
        bool useEma = !noEma && info.HasEma;
        using (var ema = useEma ? new Ema(model.Parameters, 0.5f) : null)
        {
            Checkpoint.Load(info, model, ema: ema);
            ema?.CopyToModel();
        }
        // --digit all: n of each digit, digit d in grid row d.
        int total = digit == "all" ? 10 * n : n, columns = digit == "all" ? n : 0;
        float w = (float)(guidance ?? 3.0);
        float[]? labels = digit switch
        {
            null => null,
            "all" => [.. Enumerable.Range(0, total).Select(i => (float)(i / n))],
            _ => [.. Enumerable.Repeat(float.Parse(digit, CultureInfo.InvariantCulture), n)],
        };
        string conditioning = info.Classes == 0 ? "" : digit is null ? "unguided (no label), " : $"digit {digit} with guidance {w.ToString(CultureInfo.InvariantCulture)}, ";
        Console.Error.WriteLine($"sampling {total} digits: {info.Preset} {(info.Classes > 0 ? "conditional " : "")}model, {conditioning} {(useEma ? "EMA" : "raw")} weights, " +
            $"{kind switch { SamplerKind.Ddim => $"ddim {plan.Count} steps eta {eta ?? 0}", SamplerKind.DpmSolver2M => $"dpm++ (2M) {plan.Count} steps", _ => $"ddpm ({variance ?? "large"} variance) {plan.Count} steps" }}, " +
            $"{(clip ? "clipped" : "the seed's unclipped")} recipe, {scheduleName} schedule, seed {seed}");

        var frames = new List<float[]>();
        int every = Math.Max(1, plan.Count / 30);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var digits = Sampler.Run(model, total, plan, seed, labels, w, (i, x) =>
        {
            if (i % every == 0 || i == plan.Count - 1)
            {
                frames.Add(x.ToArray());
            }
        });
        Console.Error.WriteLine($"{plan.Count} steps in {clock.Elapsed.TotalSeconds:F1} s");
        var png = Path.Combine(outDir, "samples.png");
        var idx = Path.Combine(outDir, "samples-idx3-ubyte");
        var gif = Path.Combine(outDir, "reverse.gif");
        Images.SaveGrid(png, digits, total, columns);
        Images.SaveIdx(idx, digits, total);
        Images.SaveAnimation(gif, frames, total, columns);
        Console.Error.WriteLine($"wrote {png}, {idx}, {gif}");
        return 0;
    }
}
