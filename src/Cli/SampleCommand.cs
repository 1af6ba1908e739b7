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
        var checkpoint = new Option<string>("--checkpoint") { Description = "a model.safetensors written by train", DefaultValueFactory = _ => Path.Combine("runs", "latest", TrainCommand.CheckpointFile) };
        var n = new Option<int>("--n") { Description = "how many digits", DefaultValueFactory = _ => 64 };
        var sampler = new Option<string>("--sampler") { Description = "ddpm (ancestral, T steps) | ddim (S steps)", DefaultValueFactory = _ => "ddpm" };
        sampler.AcceptOnlyFromAmong("ddpm", "ddim");
        var variance = new Option<string>("--variance") { Description = "ddpm's sigma²: large (beta_t, the seed's) | small (posterior)", DefaultValueFactory = _ => "large" };
        variance.AcceptOnlyFromAmong("large", "small");
        var steps = new Option<int>("--steps") { Description = "ddim steps S (ddpm always takes T)", DefaultValueFactory = _ => 50 };
        var eta = new Option<double>("--eta") { Description = "ddim's eta: 0 deterministic, 1 as ddpm", DefaultValueFactory = _ => 0.0 };
        var seed = new Option<ulong>("--seed") { Description = "noise seed: the same seed gives the same digits", DefaultValueFactory = _ => 0UL };
        var noEma = new Option<bool>("--no-ema") { Description = "use the raw weights even when the checkpoint has EMA weights" };
        var device = Program.DeviceOption();
        var output = new Option<string?>("--out") { Description = "folder for samples.png, samples-idx3-ubyte, reverse.gif (default: beside the checkpoint, in sample/)" };
        var command = new Command("sample", "Generate digits from a checkpoint.") { checkpoint, n, sampler, variance, steps, eta, seed, noEma, device, output };
        command.SetAction(p => Program.Guard(() => Run(p.GetValue(checkpoint)!, p.GetValue(n), p.GetValue(sampler)!, p.GetValue(variance)!,
            p.GetValue(steps), p.GetValue(eta), p.GetValue(seed), p.GetValue(noEma), p.GetValue(device)!, p.GetValue(output))));
        return command;
    }

    private static int Run(string checkpoint, int n, string samplerName, string variance, int steps, double eta, ulong seed, bool noEma, string deviceName, string? outDir)
    {
        if (n is < 1 or > 10_000)
        {
            throw new ArgumentException($"--n {n} must be between 1 and 10000");
        }
        if (!File.Exists(checkpoint))
        {
            throw new ArgumentException($"checkpoint {checkpoint} does not exist (train one with 'ddpm train')");
        }
        var file = SafeTensors.Read(checkpoint);
        int ch = Checkpoint.ChannelsOf(file);
        var meta = file.Metadata;
        string scheduleName = meta.GetValueOrDefault("schedule", "linear");
        int T = int.TryParse(meta.GetValueOrDefault("T", "300"), NumberStyles.None, CultureInfo.InvariantCulture, out int parsed) ? parsed : 300;
        var schedule = NoiseSchedule.ByName(scheduleName, T);
        var kind = samplerName == "ddim" ? SamplerKind.Ddim : variance == "small" ? SamplerKind.DdpmSmall : SamplerKind.DdpmLarge;
        var plan = Sampler.Plan(schedule, kind, steps, eta);

        using var device = Program.OpenDevice(deviceName);
        var model = new UNet(ch, device);
        bool useEma = !noEma && Checkpoint.HasEma(file);
        using (var ema = useEma ? new Ema(model.Parameters, 0.5f) : null)
        {
            Checkpoint.Load(checkpoint, model, ema: ema);
            ema?.CopyToModel();
        }
        outDir ??= Path.Combine(Path.GetDirectoryName(Path.GetFullPath(checkpoint))!, "sample");
        Directory.CreateDirectory(outDir);
        Console.Error.WriteLine($"sampling {n} digits: {Presets.NameOf(ch) ?? $"ch={ch}"} model, {(useEma ? "EMA" : "raw")} weights, " +
            $"{(kind == SamplerKind.Ddim ? $"ddim {plan.Count} steps eta {eta}" : $"ddpm ({variance} variance) {plan.Count} steps")}, {scheduleName} schedule, seed {seed}");

        var frames = new List<float[]>();
        int every = Math.Max(1, plan.Count / 30);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var digits = Sampler.Run(model, n, plan, seed, (i, x) =>
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
        Images.SaveGrid(png, digits, n);
        Images.SaveIdx(idx, digits, n);
        Images.SaveAnimation(gif, frames, n);
        Console.Error.WriteLine($"wrote {png}, {idx}, {gif}");
        return 0;
    }
}
