using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Ddpm.Nn;

/// <summary>
/// Files that survive a crash or a power cut. A rename is atomic but lives in the directory's
/// metadata: until the directory itself is flushed (fsync of the folder, POSIX), a power cut can
/// bring back the old name or lose the new one, even when the file's data was flushed. Temp files
/// carry the writer's pid (".model.safetensors.1234.tmp") so a later run can tell a crash's leftover
/// from a live writer's work in progress.
/// </summary>
public static class Durable
{
    /// <summary>
    /// Renames <paramref name="temp"/> over <paramref name="path"/> (atomic on one volume), then flushes the folder
    /// so the rename itself is on disk. The caller flushes the temp file's data first (<c>FileStream.Flush(true)</c>).
    /// </summary>
    public static void ReplaceFile(string temp, string path)
    {
        File.Move(temp, path, overwrite: true);
        FsyncDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
    }

    /// <summary>
    /// Flushes a folder's entries (names, renames, deletions) to disk: open(dir, O_RDONLY), fsync, close,
    /// through libc resolved by name for this call only (no DllImport resolver is registered anywhere).
    /// Best effort where it cannot be done: a no-op on Windows (NTFS journals renames), where libc does
    /// not load, and where the file system says a folder cannot be synced (EINVAL, ENOTSUP). Any other
    /// failure to open or flush is an <see cref="IOException"/> naming the folder.
    /// </summary>
    public static void FsyncDirectory(string dir)
    {
        var libc = LibC.Instance;
        if (libc is null)
        {
            return;
        }
        libc.FsyncDirectory(Path.GetFullPath(dir));
    }

    /// <summary>
    /// Deletes the files in <paramref name="folder"/> matching <paramref name="pattern"/> (a glob of '*' and '?',
    /// e.g. ".model.safetensors.*.tmp") that a dead process left behind: the pid is the dot-separated segment
    /// just before the last extension (".tmp", ".part"), leading digits of it. A file whose pid is a live process,
    /// or that carries no pid, is kept, unless <paramref name="allPidsStale"/> is set (the caller holds the folder's
    /// run lock, so no other process can be writing there). Returns how many files it removed.
    /// </summary>
    public static int RemoveStaleTemps(string folder, string pattern, bool allPidsStale = false)
    {
        if (!Directory.Exists(folder))
        {
            return 0;
        }
        var options = new EnumerationOptions
        {
            AttributesToSkip = 0, // the temps are dot files, hidden on Unix
            MatchType = MatchType.Simple,
            RecurseSubdirectories = false,
            IgnoreInaccessible = true,
        };
        int removed = 0;
        foreach (var file in Directory.EnumerateFiles(folder, pattern, options))
        {
            if (!allPidsStale)
            {
                int? pid = PidOfTemp(Path.GetFileName(file));
                if (pid is null || IsProcessAlive(pid.Value))
                {
                    continue;
                }
            }
            try
            {
                File.Delete(file);
                removed++;
            }
            catch (IOException)
            {
                // Gone already, or held open elsewhere (Windows): not ours to fight over.
            }
            catch (UnauthorizedAccessException)
            {
            }
        }
        return removed;
    }

    /// <summary>
    /// The pid a temp file name carries: the dot-separated segment before the last extension,
    /// ".x.safetensors.1234.tmp" gives 1234; leading digits only ("1234-a" gives 1234); null when there are none.
    /// </summary>
    public static int? PidOfTemp(string fileName)
    {
        int last = fileName.LastIndexOf('.');
        if (last <= 0)
        {
            return null;
        }
        int prev = fileName.LastIndexOf('.', last - 1);
        var segment = fileName.AsSpan(prev + 1, last - prev - 1);
        int digits = 0;
        while (digits < segment.Length && char.IsAsciiDigit(segment[digits]))
        {
            digits++;
        }
        if (digits == 0 || !int.TryParse(segment[..digits], out int pid) || pid <= 0)
        {
            return null;
        }
        return pid;
    }

    /// <summary>
    /// Whether <paramref name="pid"/> is a running process on this machine. A process we may not inspect
    /// counts as alive: the answer is only ever used to decide what is safe to delete.
    /// </summary>
    public static bool IsProcessAlive(int pid)
    {
        if (pid <= 0)
        {
            return false;
        }
        if (pid == Environment.ProcessId)
        {
            return true;
        }
        try
        {
            using var process = Process.GetProcessById(pid);
            return !process.HasExited;
        }
        catch (ArgumentException)
        {
            return false; // no such process
        }
        catch (InvalidOperationException)
        {
            return false; // exited between the lookup and the question
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or NotSupportedException or UnauthorizedAccessException)
        {
            return true;
        }
    }

    /// <summary>open, fsync and close from the C library, looked up by name once; null where there is none to load.</summary>
    private sealed unsafe class LibC
    {
        private const int EINTR = 4;
        private const int EINVAL = 22;

        private readonly delegate* unmanaged<byte*, int, int> _open;
        private readonly delegate* unmanaged<int, int> _fsync;
        private readonly delegate* unmanaged<int, int> _close;
        private readonly int _openFlags;
        private readonly int _enotsup;

        private LibC(nint handle, int openFlags, int enotsup)
        {
            _open = (delegate* unmanaged<byte*, int, int>)NativeLibrary.GetExport(handle, "open");
            _fsync = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(handle, "fsync");
            _close = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(handle, "close");
            _openFlags = openFlags;
            _enotsup = enotsup;
        }

        /// <summary>The process's C library, or null on Windows and wherever it does not load.</summary>
        public static LibC? Instance { get; } = Load();

        private static LibC? Load()
        {
            // O_RDONLY is 0 everywhere; O_CLOEXEC keeps the descriptor out of child processes started meanwhile.
            (string name, int cloexec, int enotsup) = OperatingSystem.IsLinux() ? ("libc.so.6", 0x80000, 95)
                : OperatingSystem.IsMacOS() ? ("libSystem.dylib", 0x1000000, 45)
                : (string.Empty, 0, 0);
            if (name.Length == 0 || !NativeLibrary.TryLoad(name, out nint handle))
            {
                return null;
            }
            try
            {
                return new LibC(handle, cloexec, enotsup);
            }
            catch (EntryPointNotFoundException)
            {
                return null;
            }
        }

        public void FsyncDirectory(string dir)
        {
            // The path as a NUL-terminated UTF-8 string, as the kernel takes it.
            var bytes = new byte[System.Text.Encoding.UTF8.GetMaxByteCount(dir.Length) + 1];
            System.Text.Encoding.UTF8.GetBytes(dir, bytes);
            int fd;
            fixed (byte* p = bytes)
            {
                do
                {
                    fd = _open(p, _openFlags);
                }
                while (fd < 0 && Marshal.GetLastSystemError() == EINTR);
            }
            if (fd < 0)
            {
                throw Failure("open", dir, Marshal.GetLastSystemError());
            }
            int rc = _fsync(fd);
            int errno = rc < 0 ? Marshal.GetLastSystemError() : 0;
            _close(fd);
            if (rc < 0 && errno != EINVAL && errno != _enotsup)
            {
                throw Failure("fsync", dir, errno);
            }
        }

        private static IOException Failure(string call, string dir, int errno) =>
            new($"{call} of folder {dir} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
    }
}
