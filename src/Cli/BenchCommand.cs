using System.CommandLine;
using System.CommandLine.Invocation;
using System.Diagnostics;
using System.Text.Json;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Cli;

/// <summary>
/// <c>ddpm bench</c>: times training steps (forward, backward, Adam) and denoising steps (one
/// no-grad forward) on synthetic data, as `torch_unet.py bench` does, and prints one JSON line
/// with the peer's keys ("torch" holds the engine's name and runtime). "peak_mem_mib" is the device
/// pool's peak of live tensor bytes over the run (model, optimizer state, activations, scratch), the
/// measure of the peer's torch.cuda.max_memory_allocated; on the CPU backend the convolutions'
/// per-thread scratch lives outside the pool and is not counted.
/// </summary>
public static class BenchCommand
{
    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var preset = new Option<string>("--preset") { Description = "tiny | small | base", DefaultValueFactory = _ => "base" };
        preset.AcceptOnlyFromAmong(Presets.Names);
        var batch = new Option<int>("--batch") { Description = "images per step", DefaultValueFactory = _ => 64 }.Within(1, TrainOptions.MaxBatch);
        var steps = new Option<int>("--steps") { Description = "timed steps of each kind (after 2 warm-up steps)", DefaultValueFactory = _ => 5 }.Within(1, 100_000);
        var device = Program.DeviceOption();
        var math = Program.MathOption();
        var profile = new Option<bool>("--profile") { Description = "also time every op kind (forward and backward) and each convolution pass by shape, over as many extra train and denoising steps; tables on stderr" };
        var side = new Option<int>("--image-size") { Description = "side of the synthetic images (a multiple of 4; default 28, MNIST's)", DefaultValueFactory = _ => 28 }.Within(4, ImageFolder.MaxSize);
        var channels = new Option<int>("--channels") { Description = "channels of the synthetic images: 1 or 3 (default 1)", DefaultValueFactory = _ => 1 };
        channels.AcceptOnlyFromAmong("1", "3");
        var simd = new Option<string?>("--simd") { Description = "instruction level of the CPU kernels: avx512 | avx2 | 128 | scalar (default: DDPM_SIMD, else the widest this processor has)" };
        simd.AcceptOnlyFromAmong("avx512", "avx2", "128", "scalar");
        var allReduce = new Option<bool>("--allreduce") { Description = "instead, time the MPI ranks' gradient sum for each preset's gradient (--steps sums each; run under mpiexec -n N): a table on rank 0's stdout" };
        var command = new Command("bench", "Time training and denoising steps; print one JSON line.") { preset, batch, steps, device, math, side, channels, profile, simd, allReduce };
        command.Options.Add(PeakOption(device));
        command.SetAction(p => Program.Guard(() => p.GetValue(allReduce) ? AllReduceBench.Run(p.GetValue(steps)) : Run(p.GetValue(preset)!, p.GetValue(batch), p.GetValue(steps), Program.ChosenDevice(p, device, math), p.GetValue(profile), p.GetValue(simd),
            p.GetValue(side), p.GetValue(channels))));
        return command;
    }

    /// <summary>Trains <paramref name="steps"/> steps as `train` does: queued, read back every <see cref="Trainer.ReadEvery"/> steps and at the end.</summary>
    private static void Train(Trainer trainer, int steps)
    {
        for (int i = 0; i < steps; i++)
        {
            trainer.QueueStep();
            if (trainer.Pending == Trainer.ReadEvery)
            {
                trainer.ReadBack();
            }
        }
        trainer.ReadBack();
    }

    /// <summary>
    /// Counts, over <paramref name="steps"/> train steps, the kernel launches (by op family), memsets, device copies and
    /// asynchronous uploads per step, and the host synchronisations made while queueing steps (between read-backs: the
    /// target is 0) and per read-back. Tables on stderr.
    /// </summary>
    private static void CountStep(IlgpuDevice device, Trainer trainer, int steps)
    {
        var kernels = IlgpuKernels.For(device);
        var byKernel = kernels.Launches.Select(k => k.Launches).ToArray();
        CounterSnapshot queueing = default, reading = default;
        int readBacks = 0;
        for (int i = 0; i < steps; i++)
        {
            var before = device.Counters.Snapshot();
            trainer.QueueStep();
            var queued = device.Counters.Snapshot();
            queueing += queued - before;
            if (trainer.Pending == Trainer.ReadEvery || i == steps - 1)
            {
                trainer.ReadBack();
                reading += device.Counters.Snapshot() - queued;
                readBacks++;
            }
        }
        double per(long n) => (double)n / steps;
        Console.Error.WriteLine($"train step counts on {device.Name} ({steps} steps, {readBacks} read-backs, one every {Trainer.ReadEvery} steps):");
        Console.Error.WriteLine($"  per step: {per(queueing.Launches):F1} kernel launches, {per(queueing.Memsets):F1} memsets, {per(queueing.Copies):F1} device copies, " +
            $"{per(queueing.AsyncUploads):F1} async uploads, {per(queueing.Synchronizations):F1} host synchronisations while queueing");
        Console.Error.WriteLine($"  per read-back: {(double)reading.Synchronizations / readBacks:F1} host synchronisations, {(double)reading.Memsets / readBacks:F1} memsets, {(double)reading.Launches / readBacks:F1} launches");
        Console.Error.WriteLine("  launches per step by op family:");
        var launches = kernels.Launches;
        foreach (var family in launches.Select((k, i) => (k.Family, Count: k.Launches - (i < byKernel.Length ? byKernel[i] : 0)))
            .GroupBy(f => f.Family).Select(g => (Family: g.Key, Count: g.Sum(f => f.Count))).Where(f => f.Count > 0).OrderByDescending(f => f.Count))
        {
            Console.Error.WriteLine($"    {family.Family,-16} {per(family.Count),7:F1}");
        }
        Console.Error.WriteLine("  launches per step by kernel:");
        foreach (var (name, count) in launches.Select((k, i) => (k.Name, Count: k.Launches - (i < byKernel.Length ? byKernel[i] : 0)))
            .Where(k => k.Count > 0).OrderByDescending(k => k.Count))
        {
            Console.Error.WriteLine($"    {name,-40} {per(count),7:F1}");
        }
    }

    private static int Run(string preset, int batch, int steps, DeviceChoice deviceName, bool profile, string? simd, int side = 28, int channels = 1)
    {
        if (ImageFolder.SizeProblem(side) is { } sizeProblem)
        {
            throw new UsageException($"--image-size {sizeProblem}");
        }
        if (batch < 1 || steps < 1)
        {
            throw new ArgumentException("--batch and --steps must be at least 1");
        }
        if (simd is not null)
        {
            // A level the processor lacks is an error, not a silent clamp: the figures would be labelled wrongly.
            var level = CpuSimd.Parse(simd)!.Value;
            if (!CpuSimd.Supports(level))
            {
                throw new UsageException($"--simd {simd}: this processor offers up to {CpuSimd.Name(CpuSimd.Max)}");
            }
            deviceName = deviceName with { Simd = level };
        }
        using var device = Program.Open(deviceName, out _);
        MemoryEstimate.Require($"--preset {preset} --batch {batch}", MemoryEstimate.TrainBytes(Presets.Channels(preset), batch, side), device);
        device.ResetPeak();
        // Synthetic images (uniform pixels), as the peer's bench uses uniform x0.
        var rng = new Random(0);
        var pixels = new byte[2 * batch * channels * side * side];
        rng.NextBytes(pixels);
        var data = new ImageSet(pixels, new byte[2 * batch], 2 * batch, channels, side);
        using var trainer = new Trainer(device, new TrainOptions { Preset = preset, Batch = batch, Epochs = 1_000_000, Lr = 2e-4f }, data);
        for (int i = 0; i < 2; i++)
        {
            trainer.TrainStep();
        }
        device.Synchronize();
        var clock = Stopwatch.StartNew();
        Train(trainer, steps);
        device.Synchronize();
        double trainMs = clock.Elapsed.TotalMilliseconds / steps;
        if (profile && device is IlgpuDevice gpu)
        {
            // Without the op profile, which synchronises around every op: what a step queues and how often the host waits.
            CountStep(gpu, trainer, steps);
        }
        if (profile)
        {
            // A separate pass: profiling synchronises around every op, so it must not touch the timed figures.
            var trainProfile = new OpProfile { ByShape = true };
            trainer.Profile = trainProfile;
            for (int i = 0; i < steps; i++)
            {
                trainer.TrainStep();
            }
            Console.Error.WriteLine($"train step profile ({steps} steps, ms in all):");
            foreach (var line in trainProfile.Report())
            {
                Console.Error.WriteLine($"  {line}");
            }
            trainer.Profile = null;
        }

        using var x = Tensor.Empty(device, batch, channels, side, side);
        using var t = Tensor.Empty(device, batch);
        RandomFill.Normal(x, 1, 0);
        Elementwise.Fill(t, 10);
        using var tape = Tape.NoGrad(device);
        void Denoise()
        {
            trainer.Model.Forward(tape, tape.Constant(x), tape.Constant(t));
            device.Synchronize();
            tape.Reset();
        }
        Denoise();
        clock.Restart();
        for (int i = 0; i < steps; i++)
        {
            Denoise();
        }
        double denoiseMs = clock.Elapsed.TotalMilliseconds / steps;
        if (profile)
        {
            // The denoising step alone (a no-grad forward), after its timed figure, as for training.
            var denoiseProfile = new OpProfile { ByShape = true };
            tape.Profile = denoiseProfile;
            for (int i = 0; i < steps; i++)
            {
                Denoise();
            }
            Console.Error.WriteLine($"denoising step profile ({steps} steps, ms in all):");
            foreach (var line in denoiseProfile.Report())
            {
                Console.Error.WriteLine($"  {line}");
            }
            tape.Profile = null;
        }
        Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["torch"] = $"ddpm-cs (.NET {Environment.Version}, {(device is CpuDevice cpu ? cpu.SimdName : "ILGPU")})",
            ["device"] = DeviceCatalog.KindName(device.Kind),
            ["threads"] = device.Kind == DeviceKind.Cpu ? CpuThreads.Count : 0,
            ["math"] = (device is IlgpuDevice ilgpu ? IlgpuKernels.For(ilgpu).EffectivePrecision : MathPrecision.Fp32).Name(),
            ["preset"] = preset,
            ["image"] = $"{channels}x{side}x{side}",
            ["params"] = trainer.Model.ParameterCount,
            ["batch"] = batch,
            ["train_step_ms"] = Math.Round(trainMs, 2),
            ["denoise_step_ms"] = Math.Round(denoiseMs, 2),
            ["peak_mem_mib"] = Math.Round(device.Stats.PeakLiveBytes / (1024.0 * 1024.0), 1),
        }));
        return 0;
    }

    /// <summary>
    /// <c>bench --peak</c>: the ILGPU device's own fp32 FMA rate, the ceiling the kernels' GFLOP/s are
    /// read against (scripts/gpu-check.sh). An option with its own action, so the bench's steps do not run.
    /// </summary>
    private static Option<bool> PeakOption(Option<string> device) => new("--peak")
    {
        Description = "instead of the steps: measure the ILGPU device's fp32 peak with an FMA loop; print one JSON line (GFLOP/s)",
        Action = new PeakAction(device),
    };

    private sealed class PeakAction(Option<string> device) : SynchronousCommandLineAction
    {
        public override int Invoke(ParseResult parseResult) => Program.Guard(() => RunPeak(Program.ChosenDevice(parseResult, device)));
    }

    /// <summary>FMAs per thread per loop trip: 8 independent chains (enough to cover the FMA pipeline's
    /// latency) unrolled 4 times, so the loop's own instructions are a few percent of the issue slots.</summary>
    public const int PeakFmasPerIteration = 32;

    private static int RunPeak(DeviceChoice deviceName)
    {
        using var device = Program.Open(deviceName, out _);
        if (device is not IlgpuDevice gpu)
        {
            throw new UsageException("--peak measures an ILGPU device: pass --device cuda, opencl or ilgpu-cpu");
        }
        var acc = gpu.Accelerator;
        var kernel = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, int>(PeakKernel);
        // Every thread the device can hold at once, four times over, so no multiprocessor idles in a wave's tail.
        int threads = (int)Math.Clamp(4L * acc.MaxNumThreads, 1024, 1 << 22);
        using var output = acc.Allocate1D<float>(threads);
        double Launch(int iterations)
        {
            var clock = Stopwatch.StartNew();
            kernel(threads, output.View, iterations);
            acc.Synchronize();
            return clock.Elapsed.TotalMilliseconds;
        }
        Launch(1); // compile and first launch
        // Grow the loop until one launch takes 100 ms (launch overhead under 0.1%), then keep the best of three.
        int trips = 16;
        double ms = Launch(trips);
        while (ms < 100 && trips < 1 << 24)
        {
            trips = (int)Math.Min(1 << 24, trips * Math.Clamp(120 / Math.Max(ms, 0.01), 2, 64));
            ms = Launch(trips);
        }
        ms = Math.Min(ms, Math.Min(Launch(trips), Launch(trips)));
        // 2 FLOP per FMA.
        double gflops = 2.0 * PeakFmasPerIteration * trips * threads / (ms * 1e6);
        Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["device"] = DeviceCatalog.KindName(device.Kind),
            ["gpu"] = acc.Name,
            ["peak_gflops"] = Math.Round(gflops, gflops < 100 ? 4 : 1),
            ["threads"] = threads,
            ["iterations"] = trips,
            ["ms"] = Math.Round(ms, 2),
        }));
        return 0;
    }

    /// <summary>Each thread runs 8 independent chains a = a·m + c, <paramref name="iterations"/> × 4 FMAs each;
    /// m slightly below 1 keeps the values finite, and the sum is stored so nothing is optimised away.
    /// ILGPU emits mul.f32 and add.f32 without a rounding mode, which ptxas contracts into one FFMA by
    /// default (MathF.FusedMultiplyAdd would become a software call in ILGPU 1.5.3).</summary>
    internal static void PeakKernel(Index1D i, ArrayView<float> output, int iterations)
    {
        float m = 0.9999f, c = 1e-4f;
        float a0 = i * 1e-9f, a1 = a0 + 0.1f, a2 = a0 + 0.2f, a3 = a0 + 0.3f, a4 = a0 + 0.4f, a5 = a0 + 0.5f, a6 = a0 + 0.6f, a7 = a0 + 0.7f;
        for (int k = 0; k < iterations; k++)
        {
            // Written out 4 times: ILGPU 1.5.3 does not unroll loops itself.
            a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
            a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
            a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
            a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
        }
        output[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    }
}
