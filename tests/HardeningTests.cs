using System.Diagnostics;
using Ddpm.Cli;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;
using Ddpm.Storage;

namespace Ddpm.Tests;

/// <summary>
/// The newer commands held to the core's standard (issue "Every file it reads or writes, hardened"): each class of the
/// second attack as a case that failed before its fix. Files the program writes go through one atomic writer and only
/// its own temps are ever cleaned; what it reads is bounded (a FIFO or /dev/zero in a file's place neither blocks nor
/// fills memory); the folder a command writes to is locked; sampling runs in batches that do not change the digits;
/// classifier shapes come from its tensors; runs and caches know their data; every input is named when wrong.
/// Serial: the CLI cases swap the process's console writers and set environment variables.
/// </summary>
[Collection(CliCollection.Name)]
public sealed class HardeningTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-hard").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private static void OneLine((int Code, string Err, string Out) r, int code, params string[] contains)
    {
        Assert.True(r.Code == code, $"exit {r.Code}, expected {code}: {r.Err}");
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines, l => l.StartsWith("ddpm: ", StringComparison.Ordinal));
        Assert.DoesNotContain("   at ", r.Err);
        Assert.DoesNotContain("System.", r.Err);
        foreach (var c in contains)
        {
            Assert.Contains(c, r.Err);
        }
    }

    private static void RunPosix(string file, params string[] args)
    {
        using var p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardError = true, RedirectStandardOutput = true })!;
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{file} {string.Join(' ', args)}: exit {p.ExitCode} {p.StandardError.ReadToEnd()}");
    }

    /// <summary>A small trained checkpoint in its run folder (the tiny preset, 2 steps on shapes).</summary>
    private string Checkpoint(string run, int steps = 2)
    {
        Directory.CreateDirectory(run);
        var path = Path.Combine(run, TrainCommand.CheckpointFile);
        using var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = 2, Seed = 1 }, Shapes(8));
        for (int i = 0; i < steps; i++)
        {
            trainer.TrainStep();
        }
        trainer.Save(path);
        return path;
    }

    private static ImageSet Shapes(int count, int seed = 7)
    {
        var pixels = new byte[count * ImageSet.MnistPixels];
        new Random(seed).NextBytes(pixels);
        return new ImageSet(pixels, new byte[count], count);
    }

    // --- Files lost ----------------------------------------------------------------------------------------------

    /// <summary>Every file the CLI writes replaces the old one by a rename: a hard link to the old file still holds the old
    /// bytes afterwards (a write in place, truncated by a signal, would have changed them), and no temp is left.</summary>
    [Fact]
    public void EveryOutputReplacesTheOldFileWholeNeverInPlace()
    {
        if (OperatingSystem.IsWindows())
        {
            return;
        }
        var digits = new float[4 * 784];
        var writers = new (string Name, Action<string> Write)[]
        {
            ("samples.png", p => Images.SaveGrid(p, digits, 4)),
            ("samples-idx3-ubyte", p => Images.SaveIdx(p, digits, 4)),
            ("reverse.gif", p => Images.SaveAnimation(p, [digits, digits], 4)),
            ("by-class.png", p => Images.SaveRowGrid(p, digits, [[0, 1], [2, 3]], 2, _ => false)),
            ("loss.png", p => Images.SaveLossPlot(p, [(1, 1.0), (2, 0.5)])),
        };
        foreach (var (name, write) in writers)
        {
            string path = PathOf(name), link = PathOf(name + ".old");
            File.WriteAllText(path, "previous");
            RunPosix("ln", path, link);
            write(path);
            Assert.Equal("previous", File.ReadAllText(link));
            Assert.NotEqual("previous", File.ReadAllText(path));
        }
        Assert.Empty(Directory.GetFiles(_dir, ".*"));
    }

    /// <summary>A writer that fails half way leaves the old file as it was and removes its temp.</summary>
    [Fact]
    public void AFailedWriteLeavesTheOldFile()
    {
        string path = PathOf("samples.png");
        File.WriteAllText(path, "previous");
        Assert.Throws<InvalidOperationException>(() => Durable.WriteAtomically(path, s =>
        {
            s.Write(new byte[100]);
            throw new InvalidOperationException("killed mid-write");
        }));
        Assert.Equal("previous", File.ReadAllText(path));
        Assert.Single(Directory.GetFiles(_dir));
        Directory.CreateDirectory(PathOf("loss.png"));
        Assert.Contains("is a folder", Assert.Throws<IOException>(() => Images.SaveLossPlot(PathOf("loss.png"), [])).Message);
    }

    /// <summary>A second writer into a folder that another sample (here: this process) is writing is refused in one line, before
    /// anything is written; reading a checkpoint from a folder a train holds stays allowed.</summary>
    [Fact]
    public void ASecondSampleIntoOneFolderIsRefusedAndReadingARunsCheckpointIsNot()
    {
        string run = PathOf("run");
        string checkpoint = Checkpoint(run);
        string output = PathOf("out");
        using (RunLock.Acquire(output))
        {
            var r = CliTests.Run("sample", "--checkpoint", checkpoint, "--n", "1", "--sampler", "ddim", "--steps", "1", "--out", output, "--device", "cpu");
            OneLine(r, ExitCodes.Failure, $"--out {output}: another ddpm", "is using this folder");
            Assert.Equal([Path.Combine(output, RunLock.FileName)], Directory.GetFiles(output, "*", SearchOption.AllDirectories));
        }
        using (RunLock.Acquire(run))
        {
            var r = CliTests.Run("sample", "--checkpoint", checkpoint, "--n", "1", "--sampler", "ddim", "--steps", "1", "--out", output, "--device", "cpu");
            Assert.True(r.Code == 0, r.Err);
            Assert.True(File.Exists(Path.Combine(output, "samples.png")));
            Assert.False(File.Exists(Path.Combine(output, RunLock.FileName))); // released
        }
    }

    // --- Hangs and memory ----------------------------------------------------------------------------------------

    /// <summary>A FIFO, or a link to /dev/zero, where the lock should be: read as an unreadable (so stale) lock without being
    /// opened, removed with one line, and the command goes on; never a hang, never gigabytes read.</summary>
    [Theory]
    [InlineData("fifo")]
    [InlineData("zero")]
    public async Task AFifoOrDevZeroAsTheLockNeitherBlocksNorFillsMemory(string kind)
    {
        if (OperatingSystem.IsWindows())
        {
            return;
        }
        string folder = PathOf("locked");
        Directory.CreateDirectory(folder);
        string lockFile = Path.Combine(folder, RunLock.FileName);
        if (kind == "fifo")
        {
            RunPosix("mkfifo", lockFile);
        }
        else
        {
            File.CreateSymbolicLink(lockFile, "/dev/zero");
        }
        var log = new List<string>();
        using (await Task.Run(() => RunLock.Acquire(folder, log.Add)).WaitAsync(TimeSpan.FromSeconds(20)))
        {
            Assert.Contains(log, l => l.Contains("could not be read", StringComparison.Ordinal));
        }
        Assert.True(File.Exists("/dev/zero"));
    }

    /// <summary>The bounded reader: missing is null, a FIFO or device is empty without an open, too large is a named error.</summary>
    [Fact]
    public async Task TheBoundedReaderNeverOpensWhatHasNoSize()
    {
        Assert.Null(Durable.ReadBounded(PathOf("missing"), 10));
        File.WriteAllBytes(PathOf("big"), new byte[11]);
        Assert.Contains("big", Assert.Throws<IOException>(() => Durable.ReadBounded(PathOf("big"), 10)).Message);
        Assert.Equal(11, Durable.ReadBounded(PathOf("big"), 11)!.Length);
        Assert.Contains("is a folder", Assert.Throws<IOException>(() => Durable.ReadBounded(_dir, 10)).Message);
        if (!OperatingSystem.IsWindows())
        {
            RunPosix("mkfifo", PathOf("fifo"));
            Assert.Empty((await Task.Run(() => Durable.ReadBounded(PathOf("fifo"), 10)).WaitAsync(TimeSpan.FromSeconds(10)))!);
            Assert.Empty(Durable.ReadBounded("/dev/zero", 10)!);
        }
    }

    /// <summary>A classifier whose metadata claims a width its tensors do not have is refused from the tensors' shapes before
    /// anything is allocated; a width or class count past the limits is refused from the metadata alone.</summary>
    [Theory]
    [InlineData("width", "64", "metadata (width 64")]
    [InlineData("width", "4096", "width is missing or not an integer in 1..256")]
    [InlineData("classes", "4096", "classes is missing or not an integer in 2..256")]
    public void AClassifierIsCheckedByItsTensorsBeforeItIsBuilt(string key, string value, string message)
    {
        using var model = new Classifier(CpuDevice.Instance, seed: 1, width: 4, classes: 10);
        string path = PathOf("c.safetensors");
        model.Save(path, new Dictionary<string, string>());
        var file = SafeTensors.Read(path);
        var meta = new Dictionary<string, string>(file.Metadata) { [key] = value };
        meta.Remove(SafeTensors.ChecksumKey);
        SafeTensors.Write(path, [.. file.Entries.Values.OrderBy(e => e.Begin).Select(e => (e.Name, e.Shape, file.ReadFloats(e.Name)))], meta);
        long before = GC.GetTotalAllocatedBytes();
        var e = Assert.Throws<CheckpointException>(() => Classifier.Load(path, CpuDevice.Instance));
        Assert.Contains(message, e.Message);
        Assert.True(GC.GetTotalAllocatedBytes() - before < 64 << 20, "the refusal allocated the claimed model");
    }

    /// <summary>Sampling in batches draws the digits of one batch bit for bit (each sample's noise at its own place in the stream),
    /// guided or not, whatever the batch; --memory only sets the batch.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void BatchedSamplingDrawsTheSameDigits(bool guided)
    {
        var model = new UNet(16, CpuDevice.Instance, seed: 3, classes: guided ? 10 : 0);
        try
        {
            var plan = Sampler.Plan(NoiseSchedule.ByName("cosine", 40), SamplerKind.DdpmLarge);
            float[]? labels = guided ? [1, 7, 3, 0, 9] : null;
            var whole = Sampler.Run(model, 5, plan, seed: 4, labels, guidance: 2f);
            // A batch that holds them all is the unbatched call, bit for bit.
            Assert.Equal(whole, Sampler.RunBatched(model, 5, 5, plan, seed: 4, labels, guidance: 2f));
            Assert.Equal(whole, Sampler.RunBatched(model, 5, 8, plan, seed: 4, labels, guidance: 2f));
            // Smaller batches draw every sample's noise at its place, so the same digits up to the last bits that the CPU
            // kernels' batch-dependent blocking gives (a few ulps; the pixel bytes written are the same).
            foreach (int batch in new[] { 1, 2, 4 })
            {
                var batched = Sampler.RunBatched(model, 5, batch, plan, seed: 4, labels, guidance: 2f);
                Assert.Equal(whole.Length, batched.Length);
                for (int i = 0; i < whole.Length; i++)
                {
                    Assert.True(Math.Abs(whole[i] - batched[i]) <= 1e-5f, $"batch {batch}, value {i}: {whole[i]} against {batched[i]}");
                }
            }
        }
        finally
        {
            model.Parameters.Dispose();
        }
    }

    /// <summary>The batch follows from the model's width and --memory: a base model takes fewer samples a batch than tiny, and
    /// eval's 1,000 tiny digits fit one batch at the default (so they are one call's digits, bit for bit).</summary>
    [Fact]
    public void TheSamplingBatchFollowsFromTheModelAndTheBudget()
    {
        string tiny = Checkpoint(PathOf("tiny"));
        var plan = new SamplerSettings("ddpm", null, null, null, null, 0, false, null, null).Plan(tiny);
        Assert.InRange(plan.Batch * plan.BytesPerSample, (long)SamplingPlan.DefaultMemoryMiB << 19, (long)SamplingPlan.DefaultMemoryMiB << 20);
        Assert.True(plan.Batch >= 1000, $"eval's 1,000 tiny digits take {plan.Batch} a batch");
        var small = plan with { Settings = plan.Settings with { MemoryMiB = 16 } };
        Assert.True(small.Batch < plan.Batch);
        string basePath = PathOf("base.safetensors");
        var model = new UNet(64, CpuDevice.Instance, seed: 1);
        Ddpm.Nn.Checkpoint.Save(basePath, model);
        model.Parameters.Dispose();
        var basePlan = plan.Settings.Plan(basePath);
        Assert.True(basePlan.BytesPerSample > 3 * plan.BytesPerSample);
        Assert.True(basePlan.Batch < plan.Batch / 3);
        Assert.InRange(basePlan.Batch, 16, 1000); // 1,000 base digits on the CPU no longer in one batch of about 7 GB
    }

    /// <summary>A request whose estimate is more than the machine has is refused up front, in one line with the figure, before
    /// any data is read or memory taken (a base step at batch 4096 needs about 43 GiB).</summary>
    [Theory]
    [InlineData("train", "--preset", "base", "--batch", "4096", "--out")]
    [InlineData("bench", "--preset", "base", "--batch", "4096", "--steps")]
    [InlineData("sample", "--memory", "1000000", "--n", "1", "--out")]
    public void ARequestLargerThanTheMachineIsRefusedWithItsFigure(params string[] args)
    {
        long need = args.Contains("--memory") ? MemoryEstimate.BaseBytes + (1_000_000L << 20) : MemoryEstimate.TrainBytes(64, 4096);
        if (need <= MemoryEstimate.Available(CpuDevice.Instance))
        {
            return; // a machine this large takes the request
        }
        string last = args[^1] == "--steps" ? "1" : PathOf("out");
        string[] extra = args[0] == "sample" ? ["--checkpoint", Checkpoint(PathOf("run"))] : [];
        var clock = Stopwatch.StartNew();
        OneLine(CliTests.Run([.. args, last, .. extra, "--device", "cpu"]), ExitCodes.Usage, "needs about", "GiB of memory, more than the");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30));
    }

    // --- Runs and caches that know their data ----------------------------------------------------------------------

    /// <summary>--resume on another data set of the same size is refused naming --data; a checkpoint from before the hash
    /// resumes and records it from then on.</summary>
    [Fact]
    public void ResumeOnOtherDataIsRefusedAndAnOldCheckpointRecordsItsData()
    {
        string path = Checkpoint(PathOf("run"));
        Assert.Equal(Shapes(8).Hash, Ddpm.Nn.Checkpoint.Inspect(path).Metadata[Trainer.DataHashKey]);
        var e = Assert.Throws<UsageException>(() => Trainer.Resume(CpuDevice.Instance, path, Shapes(8, seed: 8)));
        Assert.Contains("--data holds another data set", e.Message);

        var file = SafeTensors.Read(path);
        var meta = new Dictionary<string, string>(file.Metadata);
        meta.Remove(Trainer.DataHashKey);
        meta.Remove(SafeTensors.ChecksumKey);
        SafeTensors.Write(path, [.. file.Entries.Values.OrderBy(x => x.Begin).Select(x => (x.Name, x.Shape, file.ReadFloats(x.Name)))], meta);
        using (var resumed = Trainer.Resume(CpuDevice.Instance, path, Shapes(8, seed: 8)))
        {
            resumed.TrainStep();
            resumed.Save(path);
        }
        Assert.Equal(Shapes(8, seed: 8).Hash, Ddpm.Nn.Checkpoint.Inspect(path).Metadata[Trainer.DataHashKey]);
        Assert.NotEqual(Shapes(8).Hash, Shapes(8, seed: 8).Hash);
        Assert.Equal(64, Shapes(8).Hash.Length);
    }

    /// <summary>A classifier trained on another data set is refused, naming both; the default cache is one file per data set.</summary>
    [Fact]
    public void AClassifierOfAnotherDataSetIsRefused()
    {
        var train = Shapes(8);
        string path = PathOf("c.safetensors");
        using (var model = new Classifier(CpuDevice.Instance, seed: 1))
        {
            model.Save(path, new Dictionary<string, string> { [ClassifierCache.DataHashKey] = Shapes(8, seed: 9).Hash });
        }
        var e = Assert.Throws<CheckpointException>(() => ClassifierCache.LoadOrTrain(CpuDevice.Instance, path, train, train, retrain: false));
        Assert.Contains("a classifier of another data set", e.Message);
        Assert.NotEqual(ClassifierCache.PathFor(train.Hash), ClassifierCache.PathFor(Shapes(8, seed: 9).Hash));
    }

    /// <summary>The self-check's cache validated like any other file: a FIFO in its place, `[null]`, a null field or junk is
    /// ignored with one line, checked again and rewritten; never an internal error or a hang.</summary>
    [Theory]
    [InlineData("[null]")]
    [InlineData("[{\"Gpu\":null}]")]
    [InlineData("{\"not\":\"a list\"}")]
    [InlineData("fifo")]
    public async Task ADamagedSelfCheckCacheIsIgnoredAndRewritten(string content)
    {
        if (OperatingSystem.IsWindows() && content == "fifo")
        {
            return;
        }
        string cache = PathOf("self-check.json");
        if (content == "fifo")
        {
            RunPosix("mkfifo", cache);
        }
        else
        {
            File.WriteAllText(cache, content);
        }
        using var device = DeviceCatalog.Open("ilgpu-cpu", out _);
        var log = new List<string>();
        await Task.Run(() => SelfCheck.Ensure(device, log.Add, cache, [Ddpm.Kernels.Checks.OpCatalog.Get("fill")], force: true)).WaitAsync(TimeSpan.FromSeconds(120));
        Assert.Contains(log, l => l.Contains("ignored the damaged cache", StringComparison.Ordinal));
        Assert.Contains(log, l => l.Contains("1 kernel checks pass", StringComparison.Ordinal));
        Assert.StartsWith("[", File.ReadAllText(cache).TrimStart());
    }

    // --- Every input named -----------------------------------------------------------------------------------------

    [Theory]
    [InlineData("DDPM_GPU_KERNELS", "weird")]
    [InlineData("DDPM_SELF_CHECK", "maybe")]
    [InlineData("DDPM_DEBUG", "yes please")]
    [InlineData("DDPM_TEST_SAVE_DELAY_MS", "-5")]
    public void AWrongEnvironmentVariableIsAUsageErrorNamingIt(string name, string value)
    {
        var before = Environment.GetEnvironmentVariable(name);
        Environment.SetEnvironmentVariable(name, value);
        try
        {
            OneLine(CliTests.Run("info"), ExitCodes.Usage, $"environment variable {name}={value}: takes");
        }
        finally
        {
            Environment.SetEnvironmentVariable(name, before);
        }
    }

    [Theory]
    [InlineData("train", "--out")]
    [InlineData("train", "--data")]
    [InlineData("sample", "--out")]
    [InlineData("sample", "--checkpoint")]
    [InlineData("eval", "--samples")]
    [InlineData("eval", "--report")]
    [InlineData("eval", "--classifier")]
    [InlineData("eval", "--data")]
    [InlineData("check", "--ptx")]
    [InlineData("check", "--sass")]
    public void AnEmptyPathIsAUsageErrorNamingTheFlag(string command, string flag) =>
        OneLine(CliTests.Run(command, flag, ""), ExitCodes.Usage, $"{flag}: an empty path");

    [Theory]
    [InlineData("train", "--seed", "-1", "--seed -1: must be a whole number, 0 or more")]
    [InlineData("sample", "--seed", "x", "--seed x: must be a whole number, 0 or more")]
    [InlineData("train", "--lr", "fast", "--lr fast: must be a number")]
    [InlineData("train", "--epochs", "2.5", "--epochs 2.5: must be a whole number")]
    public void AValueOfTheWrongKindIsSaidAsAPersonWould(string command, string flag, string value, string message)
    {
        var r = CliTests.Run(command, flag, value);
        OneLine(r, ExitCodes.Usage, message);
        Assert.DoesNotContain("Nullable", r.Err);
    }

    /// <summary>A folder where a file of the run should be is refused before training, naming it; so is one where the lock is.</summary>
    [Fact]
    public void AFolderWhereTheRunWritesAFileIsNamed()
    {
        string run = PathOf("run");
        Directory.CreateDirectory(Path.Combine(run, TrainCommand.LossFile));
        OneLine(CliTests.Run("train", "--out", run, "--device", "cpu"), ExitCodes.Usage, $"{TrainCommand.LossFile} there is a folder");
        string other = PathOf("other");
        Directory.CreateDirectory(Path.Combine(other, RunLock.FileName));
        OneLine(CliTests.Run("train", "--out", other, "--device", "cpu"), ExitCodes.Usage, "is a folder");
    }

    /// <summary>eval refuses an unusable --classifier at once (not after minutes of training) and a label file given as samples.</summary>
    [Fact]
    public void EvalNamesAnUnusableClassifierOrSamplesFileAtOnce()
    {
        var clock = Stopwatch.StartNew();
        OneLine(CliTests.Run("eval", "--classifier", _dir, "--data", PathOf("nodata")), ExitCodes.Usage, $"--classifier {_dir}: is a folder");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30));
        string labels = PathOf("train-labels-idx1-ubyte");
        File.WriteAllBytes(labels, [0, 0, 8, 1, 0, 0, 0, 2, 3, 4]);
        OneLine(CliTests.Run("eval", "--samples", labels, "--classifier", PathOf("c.safetensors"), "--report", "none"), ExitCodes.Failure, "an IDX file of labels");
    }
}
