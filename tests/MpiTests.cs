using System.Diagnostics;
using Ddpm.Diffusion.Parallel;
using Ddpm.Nn;

namespace Ddpm.Tests;

/// <summary>
/// Data-parallel training under real MPI launchers (MPICH's mpiexec, Open MPI's mpirun; .ci/run installs both): two ranks
/// give the weights of <c>--accumulate 2</c> bit for bit, a resumed run continues exactly, one rank is the plain run, and a
/// killed rank, a rank without its data, a stop signal and a missing library each end the job in one line with the last
/// checkpoint intact. Each run is the tiny model on 16x16 images for a few steps, in processes of their own.
/// </summary>
[Collection(ImageFolderCollection.Name)]
public sealed class MpiTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-mpi").FullName;
    private readonly string _images;

    public MpiTests()
    {
        _images = Path.Combine(_dir, "shapes");
        ImageFolderTests.Draw(_images, 8);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string[] Train(string run, int steps, params string[] more) =>
        ["train", "--data", _images, "--image-size", "16", "--preset", "tiny", "--batch", "8", "--max-steps", $"{steps}", "--grid", "0",
            "--out", Path.Combine(_dir, run), "--device", "cpu", "--seed", "3", .. more];

    private Dictionary<string, float[]> Weights(string run)
    {
        var file = SafeTensors.Read(Path.Combine(_dir, run, "model.safetensors"));
        return file.Entries.Keys.ToDictionary(name => name, name => file.ReadFloats(name, file.Entries[name].Shape));
    }

    private static void AssertSameBits(Dictionary<string, float[]> expected, Dictionary<string, float[]> actual, string what)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        var differing = expected.Keys.Where(name => !expected[name].AsSpan().SequenceEqual(actual[name])).ToList();
        Assert.True(differing.Count == 0, $"{what}: {differing.Count} tensors differ: {string.Join(", ", differing.Take(8))}");
    }

    /// <summary>Two ranks under each launcher give the weights, Adam and EMA of one process with --accumulate 2, bit for bit;
    /// a 2-rank run stopped at step 2 and resumed (rank 0 reads the checkpoint and sends it) ends where the straight run does.</summary>
    /// <remarks>MPICH's case runs 2 micro-batches on each rank against --accumulate 4: four vectors, whose order of summing
    /// shows (two would add in either order).</remarks>
    [MpiTheory]
    [InlineData("openmpi", 1)]
    [InlineData("mpich", 2)]
    public async Task TwoRanksGiveTheBitsOfAccumulateAndResumeExactly(string mpi, int perRank)
    {
        var single = await Launch.Run(null, 0, Train("accumulate", 3, "--accumulate", $"{2 * perRank}"));
        Assert.True(single.Code == 0, single.Output);
        var ranks = await Launch.Run(mpi, 2, Train("ranks", 3, "--accumulate", $"{perRank}"));
        Assert.True(ranks.Code == 0, ranks.Output);
        AssertSameBits(Weights("accumulate"), Weights("ranks"), $"2 {mpi} ranks of {perRank} micro-batches against --accumulate {2 * perRank}");
        Assert.Equal(Losses("accumulate"), Losses("ranks"));

        var first = await Launch.Run(mpi, 2, Train("resumed", 2, "--accumulate", $"{perRank}"));
        Assert.True(first.Code == 0, first.Output);
        var rest = await Launch.Run(mpi, 2, ["train", "--resume", "--out", Path.Combine(_dir, "resumed"), "--data", _images, "--image-size", "16",
            "--max-steps", "3", "--grid", "0", "--device", "cpu"]);
        Assert.True(rest.Code == 0, rest.Output);
        AssertSameBits(Weights("ranks"), Weights("resumed"), "resumed at step 2 against the straight run");
    }

    /// <summary>--accumulate 2 draws what the whole batch draws (images, timesteps, noise), so its first loss, taken before any
    /// update, is the whole batch's up to rounding; --accumulate 1 is the plain step.</summary>
    [Fact]
    public async Task MicroBatchesDrawTheWholeBatch()
    {
        var whole = await Launch.Run(null, 0, Train("whole", 1));
        var halves = await Launch.Run(null, 0, Train("halves", 1, "--accumulate", "2"));
        Assert.True(whole.Code == 0 && halves.Code == 0, whole.Output + halves.Output);
        double a = double.Parse(Losses("whole")[0], System.Globalization.CultureInfo.InvariantCulture);
        double b = double.Parse(Losses("halves")[0], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(Math.Abs(a - b) <= 1e-5 * a, $"the whole batch's loss {a}, its two halves' {b}");
    }

    /// <summary>On a GPU the gradient goes through page-locked host memory to the ranks' sum and back: two ranks on ILGPU's CPU
    /// accelerator give --accumulate 2's bits there too.</summary>
    [MpiFact]
    public async Task GpuRanksGiveTheBitsOfAccumulateTwo()
    {
        string[] Gpu(string run, params string[] more) =>
            ["train", "--data", _images, "--image-size", "8", "--preset", "tiny", "--batch", "2", "--max-steps", "1", "--grid", "0",
                "--out", Path.Combine(_dir, run), "--device", "ilgpu-cpu", .. more];
        var single = await Launch.Run(null, 0, Gpu("gpu-accumulate", "--accumulate", "2"));
        Assert.True(single.Code == 0, single.Output);
        var ranks = await Launch.Run("mpich", 2, Gpu("gpu-ranks"));
        Assert.True(ranks.Code == 0, ranks.Output);
        AssertSameBits(Weights("gpu-accumulate"), Weights("gpu-ranks"), "2 ranks on ilgpu-cpu against --accumulate 2");
    }

    /// <summary>The loss column of a run's metrics: every rank's micro-batch losses, summed in the fixed order.</summary>
    private string[] Losses(string run) =>
        [.. File.ReadAllLines(Path.Combine(_dir, run, "metrics.jsonl")).Select(line => System.Text.Json.JsonDocument.Parse(line).RootElement.GetProperty("loss").GetRawText())];

    /// <summary>One rank is the plain run bit for bit; a run resumed without the launcher records the change of rank count.</summary>
    [MpiFact]
    public async Task OneRankIsThePlainRunAndAChangeOfRanksIsRecorded()
    {
        var plain = await Launch.Run(null, 0, Train("plain", 2));
        Assert.True(plain.Code == 0, plain.Output);
        var one = await Launch.Run("mpich", 1, Train("one", 2));
        Assert.True(one.Code == 0, one.Output);
        AssertSameBits(Weights("plain"), Weights("one"), "mpiexec -n 1 against the plain run");

        var two = await Launch.Run("mpich", 2, Train("two", 1));
        Assert.True(two.Code == 0, two.Output);
        var resumed = await Launch.Run(null, 0, ["train", "--resume", "--out", Path.Combine(_dir, "two"), "--data", _images, "--image-size", "16",
            "--max-steps", "2", "--grid", "0", "--device", "cpu"]);
        Assert.True(resumed.Code == 0, resumed.Output);
        Assert.Contains("ranks 2 -> 1", resumed.Output);
        var meta = Checkpoint.Inspect(Path.Combine(_dir, "two", "model.safetensors")).Metadata;
        Assert.Contains("step 1: ranks 2 -> 1", meta["changes"]);
        Assert.Equal("1", meta["ranks"]);
    }

    /// <summary>A rank killed mid-run (SIGKILL) ends the whole job within seconds, non-zero; the checkpoint saved before it is
    /// intact and resumes. Then SIGTERM to the launcher: every rank stops at one step boundary and rank 0 saves once; and
    /// SIGTERM to rank 1 alone stops both through the sum, exit 143.</summary>
    [MpiFact]
    public async Task AKilledRankEndsTheJobAndAStopSignalSavesOnce()
    {
        string run = Path.Combine(_dir, "killed");
        var job = Launch.Start("mpich", 2, Train("killed", 100000, "--save-every", "2", "--epochs", "10000"));
        string checkpoint = Path.Combine(run, "model.safetensors");
        await Launch.Until(() => File.Exists(checkpoint), job, "a first checkpoint");
        int victim = await Launch.RankPid(job, 1);
        Process.GetProcessById(victim).Kill();
        var clock = Stopwatch.StartNew();
        var killed = await Launch.Finish(job, TimeSpan.FromSeconds(30));
        Assert.True(killed.Code != 0, killed.Output);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"the job took {clock.Elapsed} to end");
        // The launcher's report names the process; the start's line maps it to rank 1.
        Assert.Contains($"1 {Environment.MachineName}:{victim}", killed.Output);
        var info = Checkpoint.Inspect(checkpoint);
        long step = long.Parse(info.Metadata[Checkpoint.StepKey], System.Globalization.CultureInfo.InvariantCulture);

        var stopped = Launch.Start("mpich", 2, ["train", "--resume", "--out", run, "--data", _images, "--image-size", "16", "--max-steps", "100000",
            "--save-every", "100000", "--grid", "0", "--device", "cpu"]);
        await Launch.Until(() => stopped.Output.Contains("resuming at step"), stopped, "the resumed run's banner");
        await Task.Delay(1500);
        Launch.Signal(stopped.Process.Id, 15);
        var result = await Launch.Finish(stopped, TimeSpan.FromSeconds(30));
        // The ranks exit 143 as one process does; the launcher's own status after a signal is its own (MPICH's is 143 or 0
        // as its proxies race the ranks), so the test holds what the ranks do: one save, at a later step than the resume.
        Assert.True(result.Output.Split('\n').Count(line => line.Contains("stopped by SIGTERM at step", StringComparison.Ordinal)) == 1, $"exit {result.Code}: {result.Output}");
        long end = long.Parse(Checkpoint.Inspect(checkpoint).Metadata[Checkpoint.StepKey], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(end > step, $"resumed at {step}, saved at {end}");

        // SIGTERM to rank 1 alone: the stop reaches rank 0 through the step's sum; both stop after that step, rank 0 saves.
        var one = Launch.Start("mpich", 2, ["train", "--resume", "--out", run, "--data", _images, "--image-size", "16", "--max-steps", "100000",
            "--save-every", "100000", "--grid", "0", "--device", "cpu"]);
        await Launch.Until(() => one.Output.Contains("resuming at step"), one, "the resumed run's banner");
        await Task.Delay(1500);
        Launch.Signal(await Launch.RankPid(one, 1), 15);
        var agreed = await Launch.Finish(one, TimeSpan.FromSeconds(30));
        Assert.True(agreed.Code == 143, $"exit {agreed.Code}: {agreed.Output}");
        Assert.Contains("another rank was asked to: saved", agreed.Output);
        Assert.True(long.Parse(Checkpoint.Inspect(checkpoint).Metadata[Checkpoint.StepKey], System.Globalization.CultureInfo.InvariantCulture) > end);
    }

    /// <summary>A run that diverges stops every rank with exit 3 at the same step: the non-finite sum reaches all of them, and
    /// every rank reads its steps back at rank 0's save points (here every 3 steps), so none waits in a sum the others left.</summary>
    [MpiFact]
    public async Task ADivergedRunStopsEveryRank()
    {
        var result = await Launch.Finish(Launch.Start("mpich", 2, Train("diverged", 60, "--lr", "1e30", "--warmup", "0", "--save-every", "3")), TimeSpan.FromSeconds(60));
        Assert.True(result.Code == Ddpm.Cli.ExitCodes.Diverged, $"exit {result.Code}: {result.Output}");
        Assert.Contains("training diverged: 5 steps in a row", result.Output);
    }

    /// <summary>A rank whose data folder is bad stops every rank before training, rank 0 naming it; a rank on another
    /// instruction set is refused by the ranks' comparison.</summary>
    [MpiFact]
    public async Task ARankThatCannotStartStopsEveryRankInOneLine()
    {
        string bad = Path.Combine(_dir, "bad");
        Directory.CreateDirectory(bad);
        File.WriteAllText(Path.Combine(bad, "train-images-idx3-ubyte"), "junk");
        string[] good = Train("nodata", 2);
        string[] other = [.. good.Select((a, i) => i > 0 && good[i - 1] == "--data" ? bad : a)];
        var result = await Launch.Run("mpich", 0, ["-n", "1", .. Launch.Program, .. good, ":", "-n", "1", .. Launch.Program, .. other]);
        Assert.Equal(1, result.Code);
        Assert.Contains("ddpm: rank 1 of 2: ", result.Output);
        Assert.Contains("train-images-idx3-ubyte", result.Output);

        var simd = await Launch.Run("mpich", 0, ["-n", "1", .. Launch.Program, .. Train("simd", 2), ":", "-n", "1", "-env", "DDPM_SIMD", "scalar", .. Launch.Program, .. Train("simd", 2)]);
        Assert.Equal(1, simd.Code);
        Assert.Contains("rank 1 of 2 differs from rank 0 in its backend", simd.Output);
    }

    /// <summary>Started as if by a launcher whose library is not there: one line naming what was tried, no training.</summary>
    [Fact]
    public async Task ALauncherWithoutItsLibraryIsOneLine()
    {
        var result = await Launch.Run(null, 0, Train("nolib", 2), new() { ["PMI_SIZE"] = "2", ["PMI_RANK"] = "0", [Mpi.LibraryVariable] = "/nonexistent/libmpich.so.12" });
        Assert.Equal(1, result.Code);
        var lines = result.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines);
        Assert.Contains($"{Mpi.LibraryVariable}=/nonexistent/libmpich.so.12 does not load", lines[0]);
        Assert.False(Directory.Exists(Path.Combine(_dir, "nolib")));
    }

    /// <summary>--accumulate needs a batch it divides; so do ranks.</summary>
    [Fact]
    public async Task ABatchThatDoesNotCutIsRefused()
    {
        var result = await Launch.Run(null, 0, Train("cut", 1, "--accumulate", "3"));
        Assert.Equal(2, result.Code);
        Assert.Contains("--batch 8 does not cut into 3 equal micro-batches", result.Output);
    }

    /// <summary>The launchers found on this machine: MPICH's and Open MPI's, by their Debian names.</summary>
    internal static class Launch
    {
        public static readonly string[] Program = [Path.Combine(AppContext.BaseDirectory, "ddpm")];

        public static string? Find(string mpi) => (mpi == "mpich" ? new[] { "mpiexec.mpich", "mpiexec.hydra" } : ["mpirun.openmpi"])
            .Select(name => Environment.GetEnvironmentVariable("PATH")!.Split(':').Select(d => Path.Combine(d, name)).FirstOrDefault(File.Exists))
            .FirstOrDefault(p => p is not null);

        public sealed record Job(Process Process, System.Text.StringBuilder Buffer)
        {
            public string Output
            {
                get
                {
                    lock (Buffer)
                    {
                        return Buffer.ToString();
                    }
                }
            }
        }

        /// <summary>Starts ddpm: alone (<paramref name="mpi"/> null), or under a launcher with <paramref name="ranks"/> ranks (0: the
        /// arguments say them, MPMD style).</summary>
        public static Job Start(string? mpi, int ranks, string[] args, Dictionary<string, string>? env = null)
        {
            var start = new ProcessStartInfo(mpi is null ? Program[0] : Find(mpi)!) { RedirectStandardOutput = true, RedirectStandardError = true };
            if (mpi is not null && ranks > 0)
            {
                start.ArgumentList.Add("-n");
                start.ArgumentList.Add($"{ranks}");
                start.ArgumentList.Add(Program[0]);
            }
            foreach (var a in args)
            {
                start.ArgumentList.Add(a);
            }
            start.Environment["DDPM_SELF_CHECK"] = "off";
            start.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
            start.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
            // Open MPI's defaults for a laptop: no oversubscription refusal on a 2-core machine, no network probing.
            start.Environment["OMPI_MCA_rmaps_base_oversubscribe"] = "1";
            start.Environment["OMPI_MCA_btl"] = "self,vader";
            foreach (var (k, v) in env ?? [])
            {
                start.Environment[k] = v;
            }
            var buffer = new System.Text.StringBuilder();
            var process = new Process { StartInfo = start };
            process.OutputDataReceived += (_, e) => { lock (buffer) { buffer.AppendLine(e.Data); } };
            process.ErrorDataReceived += (_, e) => { lock (buffer) { buffer.AppendLine(e.Data); } };
            process.Start();
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
            return new Job(process, buffer);
        }

        public static async Task<(int Code, string Output)> Run(string? mpi, int ranks, string[] args, Dictionary<string, string>? env = null) =>
            await Finish(Start(mpi, ranks, args, env), TimeSpan.FromMinutes(3));

        public static async Task<(int Code, string Output)> Finish(Job job, TimeSpan limit)
        {
            try
            {
                await job.Process.WaitForExitAsync().WaitAsync(limit);
            }
            catch (TimeoutException)
            {
                job.Process.Kill(entireProcessTree: true);
                throw new TimeoutException($"the job did not end in {limit}: {job.Output}");
            }
            job.Process.WaitForExit(); // the output's last lines
            return (job.Process.ExitCode, job.Output);
        }

        public static async Task Until(Func<bool> condition, Job job, string what)
        {
            var clock = Stopwatch.StartNew();
            while (!condition())
            {
                if (job.Process.HasExited || clock.Elapsed > TimeSpan.FromMinutes(2))
                {
                    throw new InvalidOperationException($"no {what}: {job.Output}");
                }
                await Task.Delay(100);
            }
        }

        /// <summary>The pid of rank <paramref name="rank"/>'s ddpm process (by the launcher's PMI_RANK or OMPI_COMM_WORLD_RANK).</summary>
        public static async Task<int> RankPid(Job job, int rank)
        {
            for (int attempt = 0; attempt < 100; attempt++)
            {
                foreach (var dir in Directory.EnumerateDirectories("/proc"))
                {
                    if (!int.TryParse(Path.GetFileName(dir), out int pid) || pid == job.Process.Id)
                    {
                        continue;
                    }
                    try
                    {
                        var cmdline = File.ReadAllText(Path.Combine(dir, "cmdline"));
                        var environ = File.ReadAllText(Path.Combine(dir, "environ")).Split('\0');
                        if (cmdline.StartsWith(Program[0] + "\0", StringComparison.Ordinal) && cmdline.Contains("--max-steps\0" + "100000", StringComparison.Ordinal)
                            && (environ.Contains($"PMI_RANK={rank}") || environ.Contains($"OMPI_COMM_WORLD_RANK={rank}")))
                        {
                            return pid;
                        }
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                    }
                }
                await Task.Delay(100);
            }
            throw new InvalidOperationException($"no rank {rank}: {job.Output}");
        }

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        private static extern int kill(int pid, int signal);

        public static void Signal(int pid, int signal) => Assert.Equal(0, kill(pid, signal));
    }
}

/// <summary>A fact that needs MPICH's and Open MPI's launchers: skipped, saying so, where they are not installed (.ci/run
/// installs them).</summary>
public sealed class MpiFactAttribute : FactAttribute
{
    public MpiFactAttribute()
    {
        if (MpiTests.Launch.Find("mpich") is null || MpiTests.Launch.Find("openmpi") is null)
        {
            Skip = "MPI launchers not installed (apt-get install mpich openmpi-bin; .ci/run does)";
        }
    }
}

/// <summary>The theory twin of <see cref="MpiFactAttribute"/>.</summary>
public sealed class MpiTheoryAttribute : TheoryAttribute
{
    public MpiTheoryAttribute()
    {
        if (MpiTests.Launch.Find("mpich") is null || MpiTests.Launch.Find("openmpi") is null)
        {
            Skip = "MPI launchers not installed (apt-get install mpich openmpi-bin; .ci/run does)";
        }
    }
}

/// <summary>The ranks' fold on the host against the device's, and what a non-finite micro-batch does to the sum.</summary>
public sealed class GradientFoldTests
{
    /// <summary>GradientSum.Fold (the ranks' sum, on the host) gives the bits of Elementwise.Accumulate then Scale (one
    /// process's --accumulate, on the device), for 1 to 5 vectors (3 and 5: scales that do not round exactly).</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(5)]
    public void TheHostFoldIsTheDevicesBitForBit(int count)
    {
        const int n = 1037; // not a multiple of any vector width
        var random = new Random(count);
        var vectors = Enumerable.Range(0, count * n).Select(_ => (float)(random.NextDouble() * 2 - 1) * MathF.Pow(10, random.Next(-3, 3))).ToArray();
        var host = new float[n];
        GradientSum.Fold(vectors, count, host);

        var d = Ddpm.Tensors.CpuDevice.Instance;
        using var fold = Ddpm.Tensors.Tensor.FromHost(d, vectors[..n], n);
        for (int j = 1; j < count; j++)
        {
            using var v = Ddpm.Tensors.Tensor.FromHost(d, vectors[(j * n)..((j + 1) * n)], n);
            Ddpm.Kernels.Elementwise.Accumulate(fold, v);
        }
        using var result = Ddpm.Tensors.Tensor.Empty(d, n);
        if (count > 1)
        {
            Ddpm.Kernels.Elementwise.Scale(fold, 1f / count, result);
        }
        else
        {
            result.CopyFrom(fold);
        }
        Assert.Equal(result.ToArray(), host);
        // And the order is the micro-batches' (a sum in another order differs somewhere for three or more).
        if (count >= 3)
        {
            var reversed = new float[count * n];
            for (int j = 0; j < count; j++)
            {
                Array.Copy(vectors, (count - 1 - j) * n, reversed, j * n, n);
            }
            var other = new float[n];
            GradientSum.Fold(reversed, count, other);
            Assert.NotEqual(host, other);
        }
    }

    /// <summary>A micro-batch whose loss is not finite makes the step's sum not finite, so the step is skipped as a whole
    /// batch's would be (under MPI every rank gets that sum and skips it).</summary>
    [Fact]
    public void ANonFiniteMicroBatchSkipsTheStep()
    {
        using var trainer = new Ddpm.Diffusion.Trainer(Ddpm.Tensors.CpuDevice.Instance,
            new Ddpm.Diffusion.TrainOptions { Preset = "tiny", Batch = 4, Accumulate = 2, Seed = 1 }, ReliabilityTests.Synthetic(8));
        trainer.TrainStep();
        var bias = trainer.Model["conv_out.bias"];
        var poisoned = bias.Value.ToArray();
        poisoned[0] = float.NaN;
        bias.Value.CopyFrom(poisoned);
        Assert.True(float.IsNaN(trainer.TrainStep()));
        Assert.Equal(1, trainer.Skipped);
        Assert.Equal(1, trainer.Adam.Step);
    }
}
