using System.Diagnostics;
using Ddpm.Nn;
using Ddpm.Storage;

namespace Ddpm.Tests;

/// <summary>Durable writes: rename over a file, flush of a folder, removal of temps a dead process left.</summary>
public sealed class DurableTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-durable").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>The pid of a process that has run and exited (reaped), so no process has it now, barring reuse.</summary>
    internal static int DeadPid()
    {
        using var child = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!;
        child.WaitForExit();
        Assert.False(Durable.IsProcessAlive(child.Id), $"pid {child.Id} of an exited child still looks alive");
        return child.Id;
    }

    [Fact]
    public void ReplaceFileReplacesContentAndRemovesTemp()
    {
        var path = Path.Combine(_dir, "model.safetensors");
        var temp = Path.Combine(_dir, $".model.safetensors.{Environment.ProcessId}.tmp");
        File.WriteAllText(path, "old");
        File.WriteAllText(temp, "new");

        Durable.ReplaceFile(temp, path);

        Assert.Equal("new", File.ReadAllText(path));
        Assert.False(File.Exists(temp));
    }

    [Fact]
    public void ReplaceFileCreatesTarget()
    {
        var path = Path.Combine(_dir, "fresh.bin");
        var temp = path + ".tmp";
        File.WriteAllBytes(temp, [1, 2, 3]);

        Durable.ReplaceFile(temp, path);

        Assert.Equal(new byte[] { 1, 2, 3 }, File.ReadAllBytes(path));
    }

    [Fact]
    public void TryPublishNewTakesAFreeNameOnly()
    {
        var path = Path.Combine(_dir, "name");
        var first = Path.Combine(_dir, "first.tmp");
        var second = Path.Combine(_dir, "second.tmp");
        File.WriteAllText(first, "first");
        File.WriteAllText(second, "second");

        Assert.True(Durable.TryPublishNew(first, path));
        Assert.False(Durable.TryPublishNew(second, path));

        Assert.Equal("first", File.ReadAllText(path));
        Assert.False(File.Exists(first));
        Assert.Equal("second", File.ReadAllText(second)); // a loser keeps its temp
    }

    [Fact]
    public void TryPublishNewRacingWritersHaveOneWinner()
    {
        // File.Move(overwrite: false) fails this on Linux: it checks the name is free, then renames over it.
        const int Writers = 8;
        for (int round = 0; round < 50; round++)
        {
            var path = Path.Combine(_dir, $"name{round}");
            var temps = Enumerable.Range(0, Writers).Select(i => Path.Combine(_dir, $"w{round}.{i}.tmp")).ToArray();
            for (int i = 0; i < Writers; i++)
            {
                File.WriteAllText(temps[i], $"{i}");
            }
            var won = new bool[Writers];
            using var start = new Barrier(Writers);
            var threads = Enumerable.Range(0, Writers).Select(i => new Thread(() =>
            {
                start.SignalAndWait();
                won[i] = Durable.TryPublishNew(temps[i], path);
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());

            int winner = Assert.Single(Enumerable.Range(0, Writers), i => won[i]);
            Assert.Equal($"{winner}", File.ReadAllText(path));
        }
    }

    [Fact]
    public void FsyncDirectoryOnTempFolderDoesNotThrow()
    {
        Durable.FsyncDirectory(_dir);
        Durable.FsyncDirectory(_dir + Path.DirectorySeparatorChar);
    }

    [Fact]
    public void FsyncDirectoryOfMissingFolderNamesIt()
    {
        if (OperatingSystem.IsWindows())
        {
            return; // a no-op there by design
        }
        var missing = Path.Combine(_dir, "no-such-folder");
        var e = Assert.Throws<IOException>(() => Durable.FsyncDirectory(missing));
        Assert.Contains(missing, e.Message);
    }

    [Theory]
    [InlineData(".model.safetensors.ddpm-1234-9f3a0c1e.tmp", 1234)]
    [InlineData(".model.safetensors.ddpm-1234-ab.part", 1234)]
    [InlineData("x.ddpm-77.tmp", 77)]
    [InlineData(".model.safetensors.1234.tmp", null)] // no mark: not the program's, whoever wrote it
    [InlineData(".thesis.docx.tmp", null)]
    [InlineData("x.ddpm-.tmp", null)]
    [InlineData(".model.safetensors.tmp", null)]
    [InlineData(".model.safetensors.abc.tmp", null)]
    [InlineData("noext", null)]
    [InlineData(".0.tmp", null)]
    public void PidOfTempParsesTheSegmentBeforeTheExtension(string name, int? pid) =>
        Assert.Equal(pid, Durable.PidOfTemp(name));

    [Fact]
    public void RemoveStaleTempsRemovesDeadPidsAndKeepsLiveOnes()
    {
        int dead = DeadPid();
        var deadTemp = Path.Combine(_dir, $".model.safetensors.ddpm-{dead}-00ff.tmp");
        var liveTemp = Path.Combine(_dir, $".model.safetensors.ddpm-{Environment.ProcessId}-00ff.tmp");
        var noPid = Path.Combine(_dir, ".model.safetensors.x.tmp");
        var unmarked = Path.Combine(_dir, $".model.safetensors.{dead}.tmp");
        var other = Path.Combine(_dir, $".ema.safetensors.ddpm-{dead}-00ff.tmp");
        var model = Path.Combine(_dir, "model.safetensors");
        foreach (var f in new[] { deadTemp, liveTemp, noPid, unmarked, other, model })
        {
            File.WriteAllText(f, "x");
        }

        int removed = Durable.RemoveStaleTemps(_dir, ".model.safetensors.*.tmp");

        Assert.Equal(1, removed);
        Assert.False(File.Exists(deadTemp));
        Assert.True(File.Exists(liveTemp));
        Assert.True(File.Exists(noPid));
        Assert.True(File.Exists(unmarked));
        Assert.True(File.Exists(other));
        Assert.True(File.Exists(model));
        Assert.Equal(Path.GetDirectoryName(Path.GetFullPath(model)), Path.GetDirectoryName(Durable.TempPath(model)));
        Assert.Equal(Environment.ProcessId, Durable.PidOfTemp(Path.GetFileName(Durable.TempPath(model))));
        Assert.NotEqual(Durable.TempPath(model), Durable.TempPath(model));
    }

    [Fact]
    public void RemoveStaleTempsWithAllPidsStaleRemovesEveryMatch()
    {
        var liveTemp = Path.Combine(_dir, $".model.safetensors.ddpm-{Environment.ProcessId}-00ff.tmp");
        var noPid = Path.Combine(_dir, ".model.safetensors.x.tmp");
        var users = Path.Combine(_dir, ".thesis.docx.tmp");
        var model = Path.Combine(_dir, "model.safetensors");
        foreach (var f in new[] { liveTemp, noPid, users, model })
        {
            File.WriteAllText(f, "x");
        }

        // Even with every pid taken as stale, only the program's own temps go: a user's ".NAME.tmp" stays.
        Assert.Equal(1, Durable.RemoveStaleTemps(_dir, ".*.tmp", allPidsStale: true));
        Assert.True(File.Exists(noPid));
        Assert.True(File.Exists(users));
        Assert.True(File.Exists(model));
        Assert.Equal(0, Durable.RemoveStaleTemps(Path.Combine(_dir, "missing"), "*.tmp", allPidsStale: true));
    }

    [Fact]
    public void IsProcessAliveKnowsUsAndNobody()
    {
        Assert.True(Durable.IsProcessAlive(Environment.ProcessId));
        Assert.False(Durable.IsProcessAlive(0));
        Assert.False(Durable.IsProcessAlive(-5));
    }
}
