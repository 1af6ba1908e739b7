using Ddpm.Cli;

namespace Ddpm.Tests;

/// <summary>One training run per folder: the lock file, its refusal message, stale takeover, and its race.</summary>
public sealed class RunLockTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-lock").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string LockPath => Path.Combine(_dir, RunLock.FileName);

    private void WriteLock(int pid, string host, DateTime started) =>
        File.WriteAllText(LockPath, RunLock.Describe(pid, host, started, "ddpm train --out elsewhere"));

    [Fact]
    public void AcquireWritesHolderAndDisposeReleases()
    {
        var folder = Path.Combine(_dir, "runs", "latest"); // created on the way
        using (var held = RunLock.Acquire(folder))
        {
            var text = File.ReadAllText(Path.Combine(folder, RunLock.FileName));
            Assert.Contains($"pid={Environment.ProcessId}\n", text);
            Assert.Contains($"host={Environment.MachineName}\n", text);
            Assert.Matches(@"started=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", text);
            Assert.Contains("command=", text);
            Assert.Equal(Path.Combine(Path.GetFullPath(folder), RunLock.FileName), held.Path);
        }
        Assert.False(File.Exists(Path.Combine(folder, RunLock.FileName)));
        Assert.Empty(Directory.GetFiles(folder)); // no temp left behind

        using var again = RunLock.Acquire(folder);
    }

    [Fact]
    public void SecondAcquireWhileHeldNamesOurPid()
    {
        using var held = RunLock.Acquire(_dir);
        var e = Assert.Throws<RunLockedException>(() => RunLock.Acquire(_dir));

        Assert.Equal(Environment.ProcessId, e.Pid);
        Assert.Contains($"(pid {Environment.ProcessId}, since ", e.Message);
        // The holder here is the test host, whose command line names no ddpm command.
        Assert.StartsWith($"--out {_dir}: another ddpm process", e.Message);
        Assert.EndsWith("wait for it to finish or pass another --out", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.IsAssignableFrom<IOException>(e);
        Assert.True(File.Exists(LockPath)); // the refusal leaves the holder's lock alone
    }

    [Fact]
    public void DeadPidLockIsTakenOverAndLogged()
    {
        int dead = DurableTests.DeadPid();
        WriteLock(dead, Environment.MachineName, DateTime.UtcNow);
        var log = new List<string>();

        using var held = RunLock.Acquire(_dir, log.Add);

        Assert.Equal([$"removed a stale lock of pid {dead}"], log);
        Assert.Contains($"pid={Environment.ProcessId}\n", File.ReadAllText(LockPath));
        Assert.Equal([LockPath, LockPath + ".takeover"], Directory.GetFiles(_dir).Order());
    }

    [Theory]
    [InlineData("")]
    [InlineData("pid=")]
    [InlineData("garbage\0\0\0")]
    [InlineData("pid=-3\nhost=x\n")]
    public void UnreadableLockIsTakenOver(string content)
    {
        File.WriteAllText(LockPath, content);
        var log = new List<string>();

        using var held = RunLock.Acquire(_dir, log.Add);

        Assert.Single(log, l => l.StartsWith("removed a stale lock", StringComparison.Ordinal));
        Assert.Contains($"pid={Environment.ProcessId}\n", File.ReadAllText(LockPath));
    }

    [Fact]
    public void InvalidUtf8LockIsTakenOver()
    {
        File.WriteAllBytes(LockPath, [0xff, 0xfe, 0x70, 0x69, 0x64]);
        using var held = RunLock.Acquire(_dir);
        Assert.Contains($"pid={Environment.ProcessId}\n", File.ReadAllText(LockPath));
    }

    [Fact]
    public void LockOfAnotherLiveProcessIsRefusedUntilItExits()
    {
        if (OperatingSystem.IsWindows())
        {
            return; // needs 'sleep'
        }
        using var other = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("sleep", "30") { UseShellExecute = false })!;
        try
        {
            WriteLock(other.Id, Environment.MachineName, DateTime.UtcNow);
            var e = Assert.Throws<RunLockedException>(() => RunLock.Acquire(_dir));
            Assert.Equal(other.Id, e.Pid);
        }
        finally
        {
            other.Kill(); // SIGKILL: the lock stays behind, stale by pid
            other.WaitForExit();
        }
        var log = new List<string>();
        using var held = RunLock.Acquire(_dir, log.Add);
        Assert.Equal([$"removed a stale lock of pid {other.Id}"], log);
    }

    [Fact]
    public void LockFromAnotherHostIsRefusedEvenWithADeadPid()
    {
        int dead = DurableTests.DeadPid();
        WriteLock(dead, "some-other-host", new DateTime(2026, 11, 30, 7, 0, 0, DateTimeKind.Utc));

        var e = Assert.Throws<RunLockedException>(() => RunLock.Acquire(_dir));

        Assert.Equal($"--out {_dir}: another ddpm train (pid {dead} on some-other-host, since 2026-11-30T07:00:00Z) is using this folder; wait for it to finish or pass another --out", e.Message);
        Assert.Equal("some-other-host", e.Host);
        Assert.Equal("2026-11-30T07:00:00Z", e.Since);
    }

    [Fact]
    public void LivePidThatStartedAfterTheLockIsAReusedPid()
    {
        // Our own pid, but a lock written long before this process started: the pid was reused after a crash.
        WriteLock(Environment.ProcessId, Environment.MachineName, new DateTime(2000, 1, 1, 0, 0, 0, DateTimeKind.Utc));
        var log = new List<string>();

        using var held = RunLock.Acquire(_dir, log.Add);

        Assert.Equal([$"removed a stale lock of pid {Environment.ProcessId}"], log);
    }

    [Fact]
    public void LivePidLockWithoutHostOrTimeIsRefused()
    {
        File.WriteAllText(LockPath, $"pid={Environment.ProcessId}\n");
        var e = Assert.Throws<RunLockedException>(() => RunLock.Acquire(_dir));
        Assert.Contains("since an unknown time", e.Message);
    }

    [Fact]
    public void DisposeLeavesALockThatIsNoLongerOurs()
    {
        var held = RunLock.Acquire(_dir);
        // Someone else's lock now stands in the folder (ours was removed by hand and another run started).
        var theirs = RunLock.Describe(Environment.ProcessId + 1, "other", DateTime.UtcNow, "ddpm train");
        File.WriteAllText(LockPath, theirs);

        held.Dispose();

        Assert.Equal(theirs, File.ReadAllText(LockPath));
    }

    [Fact]
    public void DisposeTwiceAndAfterTheFileVanishedIsQuiet()
    {
        var held = RunLock.Acquire(_dir);
        File.Delete(LockPath);
        held.Dispose();
        held.Dispose();
        Assert.False(File.Exists(LockPath));
    }

    [Fact]
    public void LeftoverTempsOfDeadCreatorsAreRemovedOnAcquire()
    {
        int dead = DurableTests.DeadPid();
        var deadTemp = $"{LockPath}.ddpm-{dead}-0123abcd.tmp";
        var deadAside = $"{LockPath}.ddpm-{dead}-0123abcd.stale";
        var liveTemp = $"{LockPath}.ddpm-{Environment.ProcessId}-0123abcd.tmp";
        File.WriteAllText(deadTemp, "half");
        File.WriteAllText(deadAside, "old");
        File.WriteAllText(liveTemp, "in progress");

        using var held = RunLock.Acquire(_dir);

        Assert.False(File.Exists(deadTemp));
        Assert.False(File.Exists(deadAside));
        Assert.True(File.Exists(liveTemp));
    }

    [Fact]
    public void ConcurrentTakeoverOfOneStaleLockHasExactlyOneWinner()
    {
        int dead = DurableTests.DeadPid();
        const int Threads = 8;
        for (int round = 0; round < 25; round++)
        {
            WriteLock(dead, Environment.MachineName, DateTime.UtcNow);
            var logs = new System.Collections.Concurrent.ConcurrentBag<string>();
            var winners = new System.Collections.Concurrent.ConcurrentBag<RunLock>();
            var refused = new System.Collections.Concurrent.ConcurrentBag<RunLockedException>();
            var other = new System.Collections.Concurrent.ConcurrentBag<Exception>();
            using var start = new Barrier(Threads);
            var threads = Enumerable.Range(0, Threads).Select(_ => new Thread(() =>
            {
                start.SignalAndWait();
                try
                {
                    winners.Add(RunLock.Acquire(_dir, logs.Add));
                }
                catch (RunLockedException e)
                {
                    refused.Add(e);
                }
                catch (Exception e)
                {
                    other.Add(e);
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());

            Assert.Empty(other);
            Assert.True(winners.Count == 1, $"round {round}: {winners.Count} winners, {refused.Count} refused, logs: {string.Join(" / ", logs)}");
            var winner = Assert.Single(winners);
            Assert.Equal(Threads - 1, refused.Count);
            Assert.All(refused, e => Assert.Equal(Environment.ProcessId, e.Pid));
            Assert.Single(logs); // the stale lock was removed once
            Assert.Contains($"pid={Environment.ProcessId}\n", File.ReadAllText(winner.Path));
            winner.Dispose();
            Assert.False(File.Exists(LockPath));
        }
    }
}
