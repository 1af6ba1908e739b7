using System.Globalization;
using System.Text;
using Ddpm.Nn;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>
/// Another live process holds a run folder's lock. An <see cref="IOException"/>, so <see cref="Program.Guard"/>
/// prints its one-line message and exits with <see cref="ExitCodes.Failure"/>.
/// </summary>
public sealed class RunLockedException(string folder, int pid, string host, string since, bool otherHost, string flag = "--out", string command = "train")
    : IOException($"{flag} {folder}: another ddpm {command} (pid {pid}{(otherHost ? $" on {host}" : "")}, since {since}) is using this folder; wait for it to finish or pass another {flag}")
{
    /// <summary>The folder as the caller named it.</summary>
    public string Folder { get; } = folder;

    /// <summary>The holder's process id.</summary>
    public int Pid { get; } = pid;

    /// <summary>The holder's host name.</summary>
    public string Host { get; } = host;

    /// <summary>When the holder took the lock, UTC, ISO 8601 ("2026-11-30T07:00:00Z"); "an unknown time" if not recorded.</summary>
    public string Since { get; } = since;
}

/// <summary>
/// One training run per folder: the file <c>&lt;folder&gt;/.ddpm.lock</c> names the holder (pid, host, start time,
/// command line, one <c>key=value</c> per line) for the whole run and is deleted on exit. The file appears whole
/// and only if absent (written to a temp file, flushed, then hard-linked to the name, which fails if the name
/// exists: <see cref="Durable.TryPublishNew"/>), so a reader never sees half a lock. A lock is stale, and taken
/// over, if it cannot be parsed, or its pid is not a live process on this host (a crash, a SIGKILL), or that
/// process started after the lock was written (the pid was reused). A lock from another host is always live,
/// since its pid cannot be checked from here. Taking over is serialised by an OS file lock on
/// <c>.ddpm.lock.takeover</c> (flock on Unix, a share mode on Windows; the kernel releases it if its holder dies,
/// so it never goes stale itself; the empty file stays, since deleting it while another process has it open would
/// let two hold it), and the stale lock is removed only if it still holds the very bytes judged stale, so two
/// processes that find the same stale lock cannot both win.
/// </summary>
public sealed class RunLock : IDisposable
{
    /// <summary>The lock file's name inside the run folder.</summary>
    public const string FileName = ".ddpm.lock";

    /// <summary>Rounds of create / inspect / take over before giving up on a folder that keeps changing.</summary>
    private const int MaxAttempts = 200;

    /// <summary>A lock file is one line (pid, host, start time, command line): anything larger is not one of ours.</summary>
    private const int MaxLockBytes = 64 * 1024;

    private readonly byte[] _content;
    private int _disposed;

    private RunLock(string path, byte[] content)
    {
        Path = path;
        _content = content;
    }

    /// <summary>Full path of the lock file held.</summary>
    public string Path { get; }

    /// <summary>
    /// Takes the lock of <paramref name="folder"/> (created if missing) for this process, or throws
    /// <see cref="RunLockedException"/> if a live process holds it. A stale lock is removed and reported through
    /// <paramref name="log"/> ("removed a stale lock of pid N").
    /// </summary>
    public static RunLock Acquire(string folder, Action<string>? log = null, string flag = "--out")
    {
        Directory.CreateDirectory(folder);
        string path = System.IO.Path.Combine(System.IO.Path.GetFullPath(folder), FileName);
        byte[] content = Encoding.UTF8.GetBytes(Describe(Environment.ProcessId, Environment.MachineName, DateTime.UtcNow, CommandLine()));
        for (int attempt = 0; attempt < MaxAttempts; attempt++)
        {
            if (TryCreate(path, content))
            {
                // Leftovers of processes killed while creating or taking over a lock; live ones' are kept.
                string dir = System.IO.Path.GetDirectoryName(path)!;
                Durable.RemoveStaleTemps(dir, FileName + ".*.tmp");
                Durable.RemoveStaleTemps(dir, FileName + ".*.stale");
                return new RunLock(path, content);
            }
            byte[]? seen = TryReadAll(path);
            if (seen is null)
            {
                continue; // released between our create and our read: create again
            }
            var holder = Holder.Parse(seen);
            if (holder.IsLive)
            {
                throw new RunLockedException(folder, holder.Pid, holder.Host ?? Environment.MachineName, holder.Since ?? "an unknown time", holder.IsOtherHost, flag, holder.Command);
            }
            switch (TryRemoveStale(path, seen))
            {
                case Takeover.Removed:
                    log?.Invoke(holder.Pid > 0 ? $"removed a stale lock of pid {holder.Pid}" : $"removed a stale lock that could not be read ({path})");
                    break;
                case Takeover.Busy:
                    Thread.Sleep(Random.Shared.Next(1, 10)); // another process is taking over: let it finish
                    break;
            }
        }
        throw new IOException($"{flag} {folder}: could not create the lock file {path} in {MaxAttempts} attempts");
    }

    /// <summary>Deletes the lock file if it is still ours (it holds exactly what we wrote: our pid, host and start time).</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        byte[]? now = TryReadAll(Path);
        if (now is not null && now.AsSpan().SequenceEqual(_content))
        {
            try
            {
                File.Delete(Path);
            }
            catch (IOException)
            {
                // Nothing useful to do at exit; the next run finds our pid dead and takes over.
            }
        }
    }

    /// <summary>The lock file's text: "pid=N", "host=NAME", "started=yyyy-MM-ddTHH:mm:ssZ" and "command=..." lines.</summary>
    public static string Describe(int pid, string host, DateTime startedUtc, string commandLine) =>
        $"pid={pid}\nhost={host}\nstarted={startedUtc.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture)}\ncommand={commandLine}\n";

    private static string CommandLine()
    {
        var args = Environment.GetCommandLineArgs();
        var text = string.Join(' ', args.Select(a => a.Contains(' ') ? $"\"{a}\"" : a)).ReplaceLineEndings(" ");
        return text.Length <= 1000 ? text : text[..1000] + " ..."; // a lock stays far below MaxLockBytes
    }

    /// <summary>
    /// Creates the lock whole, or returns false if one exists. The temp file carries the program's mark and our pid
    /// (".ddpm.lock.ddpm-PID-GUID.tmp"), so a crash's leftover is recognisable and removed by a later <see cref="Acquire"/>.
    /// </summary>
    private static bool TryCreate(string path, byte[] content)
    {
        string temp = $"{path}.{Durable.TempMark}{Environment.ProcessId}-{Guid.NewGuid():N}.tmp";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                stream.Write(content);
                stream.Flush(flushToDisk: true);
            }
            if (!Durable.TryPublishNew(temp, path))
            {
                return false;
            }
            Durable.FsyncDirectory(System.IO.Path.GetDirectoryName(path)!);
            return true;
        }
        finally
        {
            File.Delete(temp); // no-op once moved
        }
    }

    /// <summary>What became of one attempt to remove a stale lock.</summary>
    private enum Takeover
    {
        /// <summary>We deleted the stale lock.</summary>
        Removed,

        /// <summary>The lock is no longer the one judged stale (gone or replaced): look again.</summary>
        Changed,

        /// <summary>Another process is taking over right now: wait a moment and look again.</summary>
        Busy,
    }

    /// <summary>
    /// Under the takeover lock, deletes the lock file if it still holds <paramref name="stale"/>. Only takers delete
    /// a lock that is not their own and they hold the takeover lock to do it; creators cannot replace an existing
    /// file; so what was compared is what gets deleted.
    /// </summary>
    private static Takeover TryRemoveStale(string path, byte[] stale)
    {
        FileStream guard;
        try
        {
            guard = new FileStream(path + ".takeover", FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException)
        {
            return Takeover.Busy;
        }
        using (guard)
        {
            byte[]? now = TryReadAll(path);
            if (now is null || !now.AsSpan().SequenceEqual(stale))
            {
                return Takeover.Changed;
            }
            // Renamed aside and checked again before deleting: should the file system ignore the takeover lock
            // (some network mounts do) and another taker have replaced the file meanwhile, it goes back.
            string aside = $"{path}.{Durable.TempMark}{Environment.ProcessId}-{Guid.NewGuid():N}.stale";
            try
            {
                File.Move(path, aside, overwrite: false);
            }
            catch (FileNotFoundException)
            {
                return Takeover.Changed;
            }
            byte[]? taken = TryReadAll(aside);
            if (taken is not null && !taken.AsSpan().SequenceEqual(stale))
            {
                // Back under its name, unless a creator took the empty name meanwhile (then its owner has lost it).
                Durable.TryPublishNew(aside, path);
                File.Delete(aside);
                return Takeover.Changed;
            }
            File.Delete(aside);
            return Takeover.Removed;
        }
    }

    private static byte[]? TryReadAll(string path)
    {
        try
        {
            // Bounded: a FIFO or /dev/zero put in the lock's place reads as empty (unreadable, so stale) without being
            // opened, and a lock is a line, never megabytes. ReadWrite|Delete sharing: never blocked by, and never
            // blocking, a holder that keeps the file open.
            return Durable.ReadBounded(path, MaxLockBytes);
        }
        catch (IOException) when (!Directory.Exists(path))
        {
            return []; // oversized or shrinking: not a lock this program wrote; unreadable, so stale
        }
    }

    /// <summary>What a lock file says about its holder, and whether that holder may still be running.</summary>
    private readonly record struct Holder(int Pid, string? Host, string? Since, DateTime? StartedUtc, string? CommandLine = null)
    {
        /// <summary>The holder's ddpm command (train, sample, eval) as its command line shows it; "process" when it does not.</summary>
        public string Command => CommandLine?.Split(' ').FirstOrDefault(w => w is "train" or "sample" or "eval") ?? "process";

        /// <summary>Written on another machine: its pid means nothing here, so it is presumed live.</summary>
        public bool IsOtherHost => Host is not null && !string.Equals(Host, Environment.MachineName, StringComparison.OrdinalIgnoreCase);

        /// <summary>
        /// Live if it came from another host, or its pid runs here and that process did not start after the lock was
        /// written (a later start means the pid was reused by an unrelated process after a crash).
        /// </summary>
        public bool IsLive
        {
            get
            {
                if (Pid <= 0)
                {
                    return false; // empty or garbage: a crash mid-write or a damaged file
                }
                if (IsOtherHost)
                {
                    return true;
                }
                if (!Durable.IsProcessAlive(Pid))
                {
                    return false;
                }
                return !(StartedUtc is { } started && ProcessStartUtc(Pid) is { } processStart && processStart > started.AddSeconds(5));
            }
        }

        public static Holder Parse(byte[] bytes)
        {
            int pid = 0;
            string? host = null, since = null, command = null;
            DateTime? started = null;
            string text;
            try
            {
                text = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes);
            }
            catch (DecoderFallbackException)
            {
                return default;
            }
            foreach (var line in text.Split('\n'))
            {
                int eq = line.IndexOf('=');
                if (eq <= 0)
                {
                    continue;
                }
                var value = line[(eq + 1)..].Trim();
                switch (line[..eq].Trim())
                {
                    case "pid":
                        _ = int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out pid);
                        break;
                    case "host":
                        host = value;
                        break;
                    case "command":
                        command = value;
                        break;
                    case "started":
                        since = value;
                        if (DateTime.TryParse(value, CultureInfo.InvariantCulture, DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal, out var t))
                        {
                            started = t;
                        }
                        break;
                }
            }
            return new Holder(pid, host, since, started, command);
        }

        private static DateTime? ProcessStartUtc(int pid)
        {
            try
            {
                using var process = System.Diagnostics.Process.GetProcessById(pid);
                return process.StartTime.ToUniversalTime();
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException or NotSupportedException or System.ComponentModel.Win32Exception or UnauthorizedAccessException)
            {
                return null;
            }
        }
    }
}
