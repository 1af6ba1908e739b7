using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using Ddpm.Cli;
using Ddpm.Nn;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>
/// Fault injection on real <c>ddpm train</c> child processes (the CLI built beside the tests, run as
/// <c>dotnet ddpm.dll</c>): SIGKILL at random moments, many of them inside a checkpoint save widened by
/// DDPM_TEST_SAVE_DELAY_MS, must never leave an invalid or older checkpoint, and the chain of resumed runs must
/// end bit for bit where one uninterrupted run ends; SIGTERM, SIGHUP and SIGINT save and exit 128 + n; a second
/// signal during a save is absorbed; a second writer on the same folder is refused while the first lives and takes
/// the lock over once it is SIGKILLed. Serial: the children need the cores, and their timing matters.
/// </summary>
/// <remarks>
/// Runs pass --grid 0 (no final sample grid, which would cost 40-80 s on two cores whatever the run's size), so
/// a finished run exits 0 with its "done:" line right after its final save. DDPM_FAULT_KILLS sets the SIGKILLs of the
/// chain (default <see cref="DefaultKills"/>, sized for about 30 s of the whole class in CI). Log lines start with
/// "fault-injection:" so scripts/reliability-long.sh can pick them out.
/// </remarks>
[Collection(FaultInjectionCollection.Name)]
public sealed class FaultInjectionTests : IDisposable
{
    /// <summary>SIGKILLs of the chain in CI, at least: the chain goes on until <see cref="MinKillsInsideSaves"/> of them landed inside a save.</summary>
    public const int DefaultKills = 10;

    /// <summary>Kills that must land between "save begin" and "save end", whatever DDPM_FAULT_KILLS says.</summary>
    public const int MinKillsInsideSaves = 10;

    /// <summary>The widened save window of the chain, ms: half after the header, half before the rename.</summary>
    private const int SaveDelayMs = 60;

    private const int ImageCount = 32, Batch = 4;
    private const string SaveBegin = "test-hook: save begin", SaveEnd = "test-hook: save end";
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(120);

    private readonly ITestOutputHelper _log;
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-fault").FullName;
    private readonly string _data;

    public FaultInjectionTests(ITestOutputHelper log)
    {
        _log = log;
        _data = Path.Combine(_dir, "data");
        WriteShapes(_data, ImageCount);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>True once a run said it is done (exit 0 follows).</summary>
    private static bool Done(IEnumerable<string> lines) => lines.Any(l => l.StartsWith("done: ", StringComparison.Ordinal));

    private void Log(string line) => _log.WriteLine($"fault-injection: {line}");

    /// <summary>The flags of every run of a test: the tiny preset on the CPU backend, EMA on so its state is resumed too.</summary>
    private string[] TrainArgs(string output, long maxSteps, int saveEvery, bool resume)
    {
        var args = new List<string>
        {
            "train", "--preset", "tiny", "--device", "cpu", "--data", _data, "--out", output, "--batch", Batch.ToString(CultureInfo.InvariantCulture),
            "--epochs", "1000", "--max-steps", maxSteps.ToString(CultureInfo.InvariantCulture), "--save-every", saveEvery.ToString(CultureInfo.InvariantCulture),
            "--seed", "5", "--ema", "0.9", "--grid", "0",
        };
        if (resume)
        {
            args.Add("--resume");
        }
        return [.. args];
    }

    [PosixSignalsFact]
    public void SigkillAnywhereThenResumeEqualsAnUninterruptedRun()
    {
        int kills = int.TryParse(Environment.GetEnvironmentVariable("DDPM_FAULT_KILLS"), out int k) && k > 0 ? k : DefaultKills;
        // A checkpoint every step, and about one step of progress per killed run (each costs a child's start-up,
        // most of its time), so the kills spread over the whole run and the last run has a few steps left.
        long steps = Math.Max(kills, MinKillsInsideSaves) + 8;
        var clock = Stopwatch.StartNew();

        // The reference: one run, uninterrupted, with the same save delay, beside the chain (the save delays are
        // sleeps, so the two overlap well on two cores; and timing then differs between them, as it should not matter).
        string reference = Path.Combine(_dir, "reference");
        using var referenceRun = new DdpmChild(TrainArgs(reference, steps, 1, resume: false), SaveDelayMs);

        // The chain: the same command, SIGKILLed again and again, resumed each time from what it left.
        string chain = Path.Combine(_dir, "chain");
        string checkpoint = Path.Combine(chain, TrainCommand.CheckpointFile);
        var rng = new Random(20251130);
        int done = 0, inside = 0, resumes = 0, confirmed = 0, late = 0;
        long lastStep = 0;
        // From a child's start to its first save, and from one save to the next: measured on each run, these
        // bound the random moments of the kills that do not aim at a save.
        long startupMs = 1000, stepMs = 150;
        var failures = new List<string>();
        try
        {
            while (failures.Count == 0)
            {
                bool resume = File.Exists(checkpoint);
                long from = resume ? StepOf(checkpoint) : 0;
                resumes += resume ? 1 : 0;
                bool last = done >= kills && inside >= MinKillsInsideSaves;
                using var child = new DdpmChild(TrainArgs(chain, steps, 1, resume), SaveDelayMs);
                if (last)
                {
                    FinishTraining(child, chain, steps);
                    confirmed += CheckResumeLine(child, resume, from, failures) ? 1 : 0;
                    break;
                }

                // Aim at save number `save` of this run (it saves at steps from+1 .. steps, or once, at once, if the run
                // is complete): its share of the steps left over the kills left, plus one, so a kill before the rename
                // still leaves progress. Two runs in three are killed a random part of that save's window after it
                // begins; the others at a random moment from the start, though not after that save's window.
                int killsLeft = Math.Max(kills - done, MinKillsInsideSaves - inside);
                long savesLeft = Math.Max(1, steps - from);
                int save = (int)Math.Min(savesLeft, Math.Max(1, (steps - from) / (killsLeft + 1)) + 1);
                bool aimAtSave = rng.Next(3) < 2;
                int sleepMs = rng.Next(0, SaveDelayMs * 9 / 10);
                long deadlineMs = aimAtSave ? long.MaxValue : rng.NextInt64(0, startupMs + (save - 1) * stepMs + SaveDelayMs);
                if (child.WaitFor(lines => lines.Count(l => l.StartsWith(SaveBegin, StringComparison.Ordinal)) >= save || Done(lines), deadlineMs))
                {
                    Thread.Sleep(sleepMs);
                }
                if (child.HasExited && !Done(child.Lines()))
                {
                    failures.Add($"run {done + late + 1} ended before its kill (exit {child.ExitCode}): {child.Stderr()}");
                    break;
                }
                child.Kill();
                child.WaitForExit(Patience);
                var lines = child.Lines();
                var begins = child.TimedLines().Where(l => l.Line.StartsWith(SaveBegin, StringComparison.Ordinal)).Select(l => l.Ms).ToArray();
                startupMs = begins.Length > 0 ? begins[0] : startupMs;
                stepMs = begins.Length > 1 ? (begins[^1] - begins[0]) / (begins.Length - 1) : stepMs;
                confirmed += CheckResumeLine(child, resume, from, failures) ? 1 : 0;
                if (Done(lines))
                {
                    late++; // slow to react: the run saved its last step and finished; harmless, not a kill to count
                }
                else
                {
                    done++;
                    inside += Array.FindLastIndex(lines, l => l.StartsWith(SaveBegin, StringComparison.Ordinal)) > Array.FindLastIndex(lines, l => l == SaveEnd) ? 1 : 0;
                }

                // What a kill may leave: a whole lock (stale, taken over by the next run) or none; no checkpoint
                // (none was ever made), or a whole one no older than before.
                string where = $"kill {done} ({(aimAtSave ? $"in save {save} +{sleepMs} ms" : $"at {deadlineMs} ms")})";
                // A whole lock has its four lines; its pid is this child's, or an earlier one's if this one died before taking it over.
                string lockFile = Path.Combine(chain, RunLock.FileName);
                if (File.Exists(lockFile) && File.ReadAllText(lockFile) is var text && !Regex.IsMatch(text, @"\Apid=[0-9]+\nhost=.*\nstarted=.*\ncommand=.*\n\z"))
                {
                    failures.Add($"{where}: a partial lock file: \"{text}\"");
                }
                if (!File.Exists(checkpoint))
                {
                    if (lastStep > 0)
                    {
                        failures.Add($"{where}: the checkpoint of step {lastStep} is gone");
                    }
                    continue;
                }
                try
                {
                    Checkpoint.Inspect(checkpoint);
                    long step = StepOf(checkpoint);
                    if (step < lastStep)
                    {
                        failures.Add($"{where}: the checkpoint went back from step {lastStep} to {step}");
                    }
                    lastStep = step;
                }
                catch (CheckpointException e)
                {
                    failures.Add($"{where}: {e.Message}");
                }
            }
        }
        finally
        {
            Log($"chain: {steps} steps, a save after each, save delay {SaveDelayMs} ms; a child's first save begins about {startupMs} ms after its start, " +
                $"the next ones every {stepMs} ms");
            Log($"kills {done}, inside saves {inside}, resumes {resumes}, failures {failures.Count} " +
                $"(resume lines checked {confirmed}, runs that reached the samples before their kill {late}); {clock.ElapsedMilliseconds} ms");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
        Assert.True(inside >= MinKillsInsideSaves, $"only {inside} kills inside a save");
        FinishTraining(referenceRun, reference, steps);

        // The killed and resumed chain ends exactly where the uninterrupted run ends.
        AssertSameCheckpoint(Path.Combine(reference, TrainCommand.CheckpointFile), checkpoint);
        var expected = MetricLines(Path.Combine(reference, TrainCommand.MetricsFile));
        var actual = MetricLines(Path.Combine(chain, TrainCommand.MetricsFile));
        Assert.Equal(Enumerable.Range(1, (int)steps).Select(s => (long)s), expected.Select(m => m.Step));
        Assert.Equal(expected, actual);
        // Temps of killed saves are removed by the next run; the finished one leaves none.
        Assert.Empty(Directory.GetFiles(chain, $".{TrainCommand.CheckpointFile}.*.tmp"));
    }

    [PosixSignalsFact]
    public void SigtermAndSighupSaveAndExitWithTheirCodes()
    {
        // Far more steps than any child can take before its signal, even when a loaded machine starts the three children
        // unevenly (the test signals them one after another, each once its first metrics line is written); the resumed
        // run then goes on for a few more steps from where its signal stopped it.
        const long steps = 100_000;
        var signals = new (string Name, int Code)[] { ("TERM", 143), ("HUP", 129), ("INT", 130) };
        var runs = signals.Select(s => (Signal: s, Out: Path.Combine(_dir, s.Name))).ToArray();
        // All three at once: each is stopped a few steps in, long before its last step.
        var children = runs.Select(r => new DdpmChild(TrainArgs(r.Out, steps, 1, resume: false), 60)).ToArray();
        try
        {
            for (int i = 0; i < runs.Length; i++)
            {
                var (signal, output) = runs[i];
                var child = children[i];
                string metrics = Path.Combine(output, TrainCommand.MetricsFile);
                Assert.True(child.WaitFor(_ => File.Exists(metrics) && new FileInfo(metrics).Length > 0, (long)Patience.TotalMilliseconds), child.Stderr());
                child.Signal(signal.Name);
            }
            for (int i = 0; i < runs.Length; i++)
            {
                var (signal, output) = runs[i];
                var child = children[i];
                Assert.Equal(signal.Code, child.WaitForExit(Patience));
                var stopped = child.Lines().Where(l => l.StartsWith("stopped by ", StringComparison.Ordinal)).ToArray();
                Assert.True(stopped.Length == 1, child.Stderr());
                long step = StepOf(Path.Combine(output, TrainCommand.CheckpointFile));
                Assert.Equal(MetricLines(Path.Combine(output, TrainCommand.MetricsFile))[^1].Step, step);
                Assert.StartsWith($"stopped by SIG{signal.Name} at step {step}:", stopped[0]);
                Assert.True(step < steps, $"SIG{signal.Name} came after the last step");
                Log($"SIG{signal.Name}: exit {signal.Code}, checkpoint of step {step}");
            }
        }
        finally
        {
            foreach (var child in children)
            {
                child.Dispose();
            }
        }

        // The stopped run resumes where it stopped and finishes.
        string term = runs[0].Out;
        long from = StepOf(Path.Combine(term, TrainCommand.CheckpointFile)), end = from + 6;
        using var resumed = new DdpmChild(TrainArgs(term, end, 1, resume: true), 0);
        FinishTraining(resumed, term, end);
        var failures = new List<string>();
        Assert.True(CheckResumeLine(resumed, resume: true, from, failures), resumed.Stderr());
        Assert.Empty(failures);
        Assert.Equal(Enumerable.Range(1, (int)end).Select(s => (long)s), MetricLines(Path.Combine(term, TrainCommand.MetricsFile)).Select(m => m.Step));
    }

    [PosixSignalsFact]
    public void SecondSignalDuringSaveIsAbsorbed()
    {
        const int delayMs = 600;
        string output = Path.Combine(_dir, "twice");
        using var child = new DdpmChild(TrainArgs(output, 30, 1, resume: false), delayMs);
        Assert.True(child.WaitFor(lines => lines.Any(l => l.StartsWith(SaveBegin, StringComparison.Ordinal)), (long)Patience.TotalMilliseconds), child.Stderr());
        child.Signal("TERM");
        Thread.Sleep(50);
        child.Signal("TERM");
        // The first SIGTERM ends the loop after this save, and the final save follows at once: the second signal
        // came inside one of the two (each lasts delayMs) unless both had ended, which only a stalled test would see.
        Assert.True(child.Lines().Count(l => l == SaveEnd) < 2, $"the second SIGTERM came after both saves; too slow to test: {child.Stderr()}");
        // Not absorbed, it would end the process by the runtime's default action: also exit 143, but without the line.
        int code = child.WaitForExit(Patience);
        int stopped = child.Lines().Count(l => l.StartsWith("stopped by SIGTERM at step ", StringComparison.Ordinal));
        Assert.True(code == 143 && stopped == 1, $"exit {code}, {stopped} \"stopped by SIGTERM\" lines: {child.Stderr()}");
        string checkpoint = Path.Combine(output, TrainCommand.CheckpointFile);
        Checkpoint.Inspect(checkpoint);
        Assert.Equal(MetricLines(Path.Combine(output, TrainCommand.MetricsFile))[^1].Step, StepOf(checkpoint));
    }

    [PosixSignalsFact]
    public void SecondWriterIsRefusedWhileTheFirstRuns()
    {
        string output = Path.Combine(_dir, "locked");
        string checkpoint = Path.Combine(output, TrainCommand.CheckpointFile);
        using var first = new DdpmChild(TrainArgs(output, 1000, 1, resume: false), 0);
        Assert.True(first.WaitFor(_ => File.Exists(checkpoint), (long)Patience.TotalMilliseconds), first.Stderr());

        var clock = Stopwatch.StartNew();
        using (var second = new DdpmChild(TrainArgs(output, 1000, 1, resume: false), 0))
        {
            int code = second.WaitForExit(Patience);
            Assert.Equal(ExitCodes.Failure, code);
            var lines = second.Lines().Where(l => l.Length > 0).ToArray();
            Assert.True(lines.Length == 1, second.Stderr());
            Assert.Contains($"pid {first.Pid}", lines[0]);
            Log($"second writer refused in {clock.ElapsedMilliseconds} ms (exit {code}): {lines[0]}");
        }
        Assert.False(first.HasExited, first.Stderr());

        first.Kill();
        first.WaitForExit(Patience);
        long from = StepOf(checkpoint);
        using var third = new DdpmChild(TrainArgs(output, 1000, 1, resume: true), 0);
        Assert.True(third.WaitFor(lines => lines.Any(l => l.StartsWith("resuming at step ", StringComparison.Ordinal)), (long)Patience.TotalMilliseconds), third.Stderr());
        Assert.Contains($"removed a stale lock of pid {first.Pid}", third.Lines());
        Assert.Contains($"pid={third.Pid}\n", File.ReadAllText(Path.Combine(output, RunLock.FileName)));
        var failures = new List<string>();
        Assert.True(CheckResumeLine(third, resume: true, from, failures), third.Stderr());
        Assert.Empty(failures);
    }

    /// <summary>Lets a child train to its end: exit 0, "done: <paramref name="steps"/> steps", its final checkpoint saved.</summary>
    private static void FinishTraining(DdpmChild child, string output, long steps)
    {
        Assert.True(child.WaitForExit(Patience) == 0, child.Stderr());
        Assert.Contains(child.Lines(), l => l.StartsWith($"done: {steps} steps", StringComparison.Ordinal));
        Assert.Equal(steps, StepOf(Path.Combine(output, TrainCommand.CheckpointFile)));
    }

    /// <summary>If the run got as far as saying where it starts, it said the checkpoint's step (or "training" for a fresh run).</summary>
    private static bool CheckResumeLine(DdpmChild child, bool resume, long from, List<string> failures)
    {
        var line = child.Lines().FirstOrDefault(l => l.StartsWith("resuming at step ", StringComparison.Ordinal) || l.StartsWith("training: ", StringComparison.Ordinal));
        if (line is null)
        {
            return false;
        }
        string want = resume ? $"resuming at step {from}: " : "training: ";
        if (!line.StartsWith(want, StringComparison.Ordinal))
        {
            failures.Add($"expected \"{want}...\", got \"{line}\"");
        }
        return true;
    }

    private static long StepOf(string checkpoint) =>
        long.Parse(SafeTensors.Read(checkpoint).Metadata[Checkpoint.StepKey], CultureInfo.InvariantCulture);

    /// <summary>Both files hold the same tensors (weights, adam.*, ema.*) bit for bit, and the same metadata.</summary>
    private static void AssertSameCheckpoint(string expectedPath, string actualPath)
    {
        var expected = SafeTensors.Read(expectedPath);
        var actual = SafeTensors.Read(actualPath);
        Checkpoint.Inspect(actual);
        Assert.Equal(expected.Entries.Keys.Order(StringComparer.Ordinal), actual.Entries.Keys.Order(StringComparer.Ordinal));
        Assert.Contains(expected.Entries.Keys, n => n.StartsWith("adam.", StringComparison.Ordinal));
        Assert.Contains(expected.Entries.Keys, n => n.StartsWith("ema.", StringComparison.Ordinal));
        foreach (var name in expected.Entries.Keys)
        {
            var want = expected.ReadFloats(name);
            var got = actual.ReadFloats(name);
            int first = Enumerable.Range(0, want.Length).FirstOrDefault(i => BitConverter.SingleToInt32Bits(want[i]) != BitConverter.SingleToInt32Bits(got[i]), -1);
            Assert.True(first < 0, $"{name}[{first}]: {(first < 0 ? "" : $"{got[first]:R}, expected {want[first]:R}")}");
        }
        Assert.Equal(expected.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal), actual.Metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal));
    }

    /// <summary>Each step line's step, loss and gradient norm, as written (so equal text means equal floats); event lines (a
    /// resume's changed options) are passed over.</summary>
    private static List<(long Step, string Loss, string GradNorm)> MetricLines(string path)
    {
        var lines = new List<(long, string, string)>();
        foreach (var line in File.ReadAllLines(path).Where(l => l.Length > 0))
        {
            using var json = JsonDocument.Parse(line);
            var root = json.RootElement;
            if (root.TryGetProperty("event", out _))
            {
                continue; // a resume's record of changed options, not a step
            }
            lines.Add((root.GetProperty("step").GetInt64(), root.GetProperty("loss").GetRawText(),
                root.TryGetProperty("grad_norm", out var norm) ? norm.GetRawText() : "none"));
        }
        return lines;
    }

    /// <summary>
    /// A deterministic 28x28 IDX set of <paramref name="count"/> simple shapes (filled and hollow squares, discs,
    /// crosses of several sizes), labels 0..9: what <c>--data DIR</c> accepts without MNIST.
    /// </summary>
    internal static void WriteShapes(string folder, int count)
    {
        Directory.CreateDirectory(folder);
        var images = new byte[16 + count * 784];
        BinaryPrimitives.WriteInt32BigEndian(images, 0x00000803);
        BinaryPrimitives.WriteInt32BigEndian(images.AsSpan(4), count);
        BinaryPrimitives.WriteInt32BigEndian(images.AsSpan(8), 28);
        BinaryPrimitives.WriteInt32BigEndian(images.AsSpan(12), 28);
        var labels = new byte[8 + count];
        BinaryPrimitives.WriteInt32BigEndian(labels, 0x00000801);
        BinaryPrimitives.WriteInt32BigEndian(labels.AsSpan(4), count);
        for (int n = 0; n < count; n++)
        {
            int shape = n % 4, size = 4 + n % 7, cx = 11 + n % 5, cy = 12 + n % 3;
            for (int y = 0; y < 28; y++)
            {
                for (int x = 0; x < 28; x++)
                {
                    int dx = Math.Abs(x - cx), dy = Math.Abs(y - cy);
                    bool on = shape switch
                    {
                        0 => dx <= size && dy <= size,
                        1 => Math.Max(dx, dy) is var m && m <= size && m >= size - 1,
                        2 => dx * dx + dy * dy <= size * size,
                        _ => (dx <= 1 && dy <= size) || (dy <= 1 && dx <= size),
                    };
                    images[16 + n * 784 + y * 28 + x] = on ? (byte)255 : (byte)0;
                }
            }
            labels[8 + n] = (byte)(n % 10);
        }
        File.WriteAllBytes(Path.Combine(folder, "train-images-idx3-ubyte"), images);
        File.WriteAllBytes(Path.Combine(folder, "train-labels-idx1-ubyte"), labels);
    }
}

/// <summary>
/// A <c>dotnet ddpm.dll ...</c> child process: stdout drained, stderr collected line by line with the
/// milliseconds since the start, so a test can wait for a line and act on it at once.
/// </summary>
internal sealed class DdpmChild : IDisposable
{
    private readonly Process _process;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly List<(long Ms, string Line)> _lines = [];
    private readonly Thread _reader;
    private bool _eof;

    /// <summary>Starts ddpm with <paramref name="args"/>; DDPM_TEST_SAVE_DELAY_MS is <paramref name="saveDelayMs"/> (unset if 0).</summary>
    public DdpmChild(IEnumerable<string> args, int saveDelayMs)
    {
        var info = new ProcessStartInfo(Dotnet)
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            UseShellExecute = false,
        };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "ddpm.dll"));
        foreach (var arg in args)
        {
            info.ArgumentList.Add(arg);
        }
        info.Environment.Remove("DDPM_TEST_SAVE_DELAY_MS");
        if (saveDelayMs > 0)
        {
            info.Environment["DDPM_TEST_SAVE_DELAY_MS"] = saveDelayMs.ToString(CultureInfo.InvariantCulture);
        }
        _process = Process.Start(info) ?? throw new InvalidOperationException($"could not start {Dotnet}");
        Pid = _process.Id;
        _process.OutputDataReceived += (_, _) => { };
        _process.BeginOutputReadLine();
        _reader = new Thread(ReadStderr) { IsBackground = true, Name = $"stderr of {Pid}" };
        _reader.Start();
    }

    /// <summary>
    /// The muxer to run ddpm.dll with: the test host's own when it is dotnet (so the same runtime runs both),
    /// else the one the dotnet CLI names in DOTNET_HOST_PATH, else dotnet from PATH.
    /// </summary>
    public static string Dotnet { get; } =
        Environment.ProcessPath is { } host && Path.GetFileNameWithoutExtension(host) == "dotnet" ? host
        : Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } named && File.Exists(named) ? named
        : "dotnet";

    /// <summary>The child's process id (the dotnet muxer runs the app in its own process).</summary>
    public int Pid { get; }

    public bool HasExited => _process.HasExited;

    public int ExitCode => _process.ExitCode;

    /// <summary>The stderr lines so far.</summary>
    public string[] Lines()
    {
        lock (_lines)
        {
            return _lines.Select(l => l.Line).ToArray();
        }
    }

    /// <summary>The stderr lines so far with the milliseconds since the start at which each was read.</summary>
    public (long Ms, string Line)[] TimedLines()
    {
        lock (_lines)
        {
            return [.. _lines];
        }
    }

    public string Stderr() => string.Join("\n", Lines());

    /// <summary>
    /// Waits until <paramref name="condition"/> holds for the stderr lines so far (true), or stderr ends, or
    /// <paramref name="untilMs"/> ms since the start pass (false).
    /// </summary>
    public bool WaitFor(Func<IReadOnlyList<string>, bool> condition, long untilMs)
    {
        lock (_lines)
        {
            while (true)
            {
                if (condition(_lines.Select(l => l.Line).ToList()))
                {
                    return true;
                }
                long left = untilMs == long.MaxValue ? 1000 : untilMs - _clock.ElapsedMilliseconds;
                if (_eof || left <= 0)
                {
                    return false;
                }
                Monitor.Wait(_lines, (int)Math.Min(left, 50)); // also polls: a condition may look at files
                if (untilMs == long.MaxValue && _clock.Elapsed > TimeSpan.FromMinutes(10))
                {
                    return false;
                }
            }
        }
    }

    /// <summary>SIGKILL: nothing of the child runs after this.</summary>
    public void Kill()
    {
        try
        {
            _process.Kill();
        }
        catch (InvalidOperationException)
        {
            // Already exited.
        }
    }

    /// <summary>Sends a signal by name ("TERM", "HUP", "INT") with kill(1), as a user or a service manager would.</summary>
    public void Signal(string name)
    {
        string kill = File.Exists("/bin/kill") ? "/bin/kill" : "kill";
        using var sender = Process.Start(new ProcessStartInfo(kill, ["-s", name, Pid.ToString(CultureInfo.InvariantCulture)]) { UseShellExecute = false })!;
        sender.WaitForExit();
        Assert.True(sender.ExitCode == 0, $"kill -s {name} {Pid} exited {sender.ExitCode}");
    }

    /// <summary>Waits for the exit and the end of stderr; returns the exit code (128 + n when a signal n ended it).</summary>
    public int WaitForExit(TimeSpan timeout)
    {
        if (!_process.WaitForExit(timeout))
        {
            Kill();
            throw new TimeoutException($"ddpm (pid {Pid}) still running after {timeout.TotalSeconds} s: {Stderr()}");
        }
        _process.WaitForExit(); // drains the redirected stdout
        _reader.Join(timeout);
        return _process.ExitCode;
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            Kill();
            _process.WaitForExit(TimeSpan.FromSeconds(30));
        }
        _process.Dispose();
    }

    private void ReadStderr()
    {
        string? line;
        while ((line = _process.StandardError.ReadLine()) is not null)
        {
            lock (_lines)
            {
                _lines.Add((_clock.ElapsedMilliseconds, line));
                Monitor.PulseAll(_lines);
            }
        }
        lock (_lines)
        {
            _eof = true;
            Monitor.PulseAll(_lines);
        }
    }
}

/// <summary>A fact that needs POSIX signals, kill(1) and SIGKILL of a child; on Windows it is reported skipped.</summary>
public sealed class PosixSignalsFactAttribute : FactAttribute
{
    public PosixSignalsFactAttribute()
    {
        if (OperatingSystem.IsWindows())
        {
            Skip = "fault injection needs POSIX signals and kill(1); not supported on Windows";
        }
    }
}

/// <summary>Runs the fault-injection tests alone: their child processes need the cores, and their timing matters.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class FaultInjectionCollection
{
    public const string Name = "fault-injection";
}
