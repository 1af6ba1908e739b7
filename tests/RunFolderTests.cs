using System.Diagnostics;
using Ddpm.Cli;

namespace Ddpm.Tests;

/// <summary>Numbered run folders: a new one each <c>train</c> without --out, runs/latest at the newest, and sample, eval and
/// --resume finding the newest run.</summary>
public sealed class RunFolderTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-runs").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Root => Path.Combine(_dir, RunFolders.Root);

    [Fact]
    public void EachNewRunTakesTheNextNumberAndLatestFollows()
    {
        string first = RunFolders.Create(Root), second = RunFolders.Create(Root);
        Assert.Equal(["run1", "run2"], new[] { first, second }.Select(Path.GetFileName));
        Assert.Equal("run2", new DirectoryInfo(Path.Combine(Root, RunFolders.Latest)).LinkTarget);
        // A gap is not refilled: one more than the highest.
        Directory.Delete(first);
        Assert.Equal("run3", Path.GetFileName(RunFolders.Create(Root)));
        // No temporary claim or link is left behind.
        Assert.DoesNotContain(Directory.EnumerateFileSystemEntries(Root), e => Path.GetFileName(e).StartsWith('.'));
    }

    [Fact]
    public void TheNewestRunIsTheHighestNumberHoldingACheckpoint()
    {
        Assert.Null(RunFolders.Newest(TrainCommand.CheckpointFile, Root));
        string first = RunFolders.Create(Root);
        RunFolders.Create(Root); // started, no checkpoint yet
        File.WriteAllBytes(Path.Combine(first, TrainCommand.CheckpointFile), [1]);
        Assert.Equal(first, RunFolders.Newest(TrainCommand.CheckpointFile, Root));
    }

    [Fact]
    public void ARealLatestFolderFromBeforeNumberedRunsIsKeptAndFound()
    {
        string old = Path.Combine(Root, RunFolders.Latest);
        Directory.CreateDirectory(old);
        File.WriteAllBytes(Path.Combine(old, TrainCommand.CheckpointFile), [1]);
        Assert.Equal(old, RunFolders.Newest(TrainCommand.CheckpointFile, Root));
        string run = RunFolders.Create(Root);
        Assert.True(File.Exists(Path.Combine(old, TrainCommand.CheckpointFile)), "the old run was touched");
        Assert.Null(new DirectoryInfo(old).LinkTarget);
        File.WriteAllBytes(Path.Combine(run, TrainCommand.CheckpointFile), [1]);
        Assert.Equal(run, RunFolders.Newest(TrainCommand.CheckpointFile, Root));
    }

    /// <summary>The README's main command, run twice, gives two runs (as a newcomer runs it: a process in a folder, no
    /// --out), and sample without --checkpoint takes the newest.</summary>
    [Fact]
    public void TrainTwiceWithoutOutGivesTwoRuns()
    {
        string data = Path.Combine(_dir, "data");
        FaultInjectionTests.WriteShapes(data, 8);
        string[] train = ["train", "--preset", "tiny", "--device", "cpu", "--data", data, "--batch", "4", "--max-steps", "1", "--grid", "0"];
        for (int i = 1; i <= 2; i++)
        {
            // The first under the seed's recipe: the checkpoint records it, and sampling follows it.
            var (code, err) = Ddpm(i == 1 ? [.. train, "--recipe", "seed"] : train);
            Assert.True(code == 0, err);
            Assert.Contains($"run folder: {Path.Combine(RunFolders.Root, $"run{i}")}", err);
            Assert.True(File.Exists(Path.Combine(Root, $"run{i}", TrainCommand.CheckpointFile)), err);
        }
        Assert.Equal("run2", new DirectoryInfo(Path.Combine(Root, RunFolders.Latest)).LinkTarget);
        Assert.Equal("seed", global::Ddpm.Nn.Checkpoint.Inspect(Path.Combine(Root, "run1", TrainCommand.CheckpointFile)).Metadata["recipe"]);
        Assert.Equal("default", global::Ddpm.Nn.Checkpoint.Inspect(Path.Combine(Root, "run2", TrainCommand.CheckpointFile)).Metadata["recipe"]);
        var (sampleCode, sampleErr) = Ddpm(["sample", "--n", "1", "--sampler", "ddim", "--steps", "2", "--device", "cpu"]);
        Assert.True(sampleCode == 0, sampleErr);
        Assert.True(File.Exists(Path.Combine(Root, "run2", "sample", "samples.png")), sampleErr);
        Assert.Contains("the default recipe's clipped step", sampleErr);
        var (seedCode, seedErr) = Ddpm(["sample", "--checkpoint", Path.Combine(Root, "run1", TrainCommand.CheckpointFile), "--n", "1", "--sampler", "ddim", "--steps", "2", "--device", "cpu"]);
        Assert.True(seedCode == 0, seedErr);
        Assert.Contains("the seed recipe's unclipped step", seedErr);
        // --resume without --out continues the newest run, which keeps its recipe.
        var (resumeCode, resumeErr) = Ddpm(["train", "--resume", "--device", "cpu", "--data", data, "--max-steps", "2", "--grid", "0"]);
        Assert.True(resumeCode == 0, resumeErr);
        Assert.Contains("resuming at step 1", resumeErr);
        Assert.Equal("2", global::Ddpm.Nn.Checkpoint.Inspect(Path.Combine(Root, "run2", TrainCommand.CheckpointFile)).Metadata["step"]);
        // A start that fails before writing (damaged data) leaves no numbered folder behind.
        string bad = Path.Combine(_dir, "bad");
        Directory.CreateDirectory(bad);
        File.WriteAllBytes(Path.Combine(bad, "train-images-idx3-ubyte"), [0, 0, 8, 3, 0, 0]);
        File.WriteAllBytes(Path.Combine(bad, "train-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0]);
        var (badCode, badErr) = Ddpm(["train", "--device", "cpu", "--data", bad, "--batch", "4", "--max-steps", "1", "--preset", "tiny"]);
        Assert.True(badCode != 0, badErr);
        Assert.False(Directory.Exists(Path.Combine(Root, "run3")), badErr);
    }

    private (int Code, string Err) Ddpm(string[] args) => RunDdpm(args);

    private (int Code, string Err) RunDdpm(string[] args)
    {
        var info = new ProcessStartInfo(DdpmChild.Dotnet) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false, WorkingDirectory = _dir };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "ddpm.dll"));
        foreach (var a in args)
        {
            info.ArgumentList.Add(a);
        }
        using var p = Process.Start(info)!;
        var err = p.StandardError.ReadToEndAsync();
        p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(TimeSpan.FromSeconds(120)), "ddpm did not finish");
        return (p.ExitCode, err.Result);
    }
}
