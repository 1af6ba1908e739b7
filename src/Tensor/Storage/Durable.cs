using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Ddpm.Storage;

/// <summary>
/// Files that survive a crash or a power cut. A rename is atomic but lives in the directory's
/// metadata: until the directory itself is flushed (fsync of the folder, POSIX), a power cut can
/// bring back the old name or lose the new one, even when the file's data was flushed. Temp files
/// carry the program's mark and the writer's pid (".model.safetensors.ddpm-1234-9f3a0c1e.tmp", see
/// <see cref="TempPath"/>), so a later run can tell a crash's leftover from a live writer's work in progress,
/// and never takes a user's own ".NAME.tmp" for one of its own.
/// </summary>
public static class Durable
{
    /// <summary>
    /// Writes <paramref name="path"/> so that a crash leaves the old file or the new one, never a mix:
    /// <paramref name="write"/> fills a temp file beside it (<see cref="TempPath"/>), which is flushed to disk and renamed over the
    /// file (<see cref="ReplaceFile"/>); on any failure the temporary file is deleted and the old file stands. A folder
    /// where the file should be is an <see cref="IOException"/> naming it, before anything is written.
    /// </summary>
    public static void WriteAtomically(string path, Action<FileStream> write, int bufferSize = 1 << 16)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        if (Directory.Exists(path))
        {
            throw new IOException($"{path}: is a folder, where a file is to be written");
        }
        Directory.CreateDirectory(dir);
        var temp = TempPath(path);
        try
        {
            using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            ReplaceFile(temp, path);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    /// <summary>
    /// Reads a whole small file by its recorded size and never past it: null when there is no such file; empty, without
    /// opening it, when its size is 0 (an empty file, or not a regular file at all: a FIFO or a device such as /dev/zero
    /// reports 0, and opening or reading it would block or never end). A folder, or a size above
    /// <paramref name="maxBytes"/>, is an <see cref="IOException"/> naming the file; so is a file that shrinks while read.
    /// </summary>
    public static byte[]? ReadBounded(string path, long maxBytes)
    {
        if (Directory.Exists(path))
        {
            throw new IOException($"{path}: is a folder, where a file was expected");
        }
        var info = new FileInfo(path);
        if (!info.Exists)
        {
            return null;
        }
        long size = info.Length;
        if (size == 0)
        {
            return [];
        }
        if (size > maxBytes)
        {
            throw new IOException($"{path}: {size} bytes, more than such a file ever holds ({maxBytes} at most)");
        }
        var bytes = new byte[size];
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, 1);
            int read = 0;
            while (read < bytes.Length)
            {
                int n = stream.Read(bytes, read, bytes.Length - read);
                if (n == 0)
                {
                    throw new IOException($"{path}: ends at byte {read}, before its recorded size of {size} bytes");
                }
                read += n;
            }
        }
        catch (FileNotFoundException)
        {
            return null; // removed between the look and the open
        }
        catch (DirectoryNotFoundException)
        {
            return null;
        }
        return bytes;
    }

    /// <summary>The mark of the program's temp files: the segment before their extension starts with it, then the pid.</summary>
    public const string TempMark = "ddpm-";

    /// <summary>
    /// A temp name beside <paramref name="path"/> that only this process uses and that is recognisably the program's:
    /// ".NAME.ddpm-PID-RANDOM.EXT" (EXT "tmp" unless given). <see cref="RemoveStaleTemps"/> and <see cref="PidOfTemp"/> know it.
    /// </summary>
    public static string TempPath(string path, string extension = "tmp")
    {
        var full = Path.GetFullPath(path);
        string random = Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(4));
        return Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{TempMark}{Environment.ProcessId}-{random}.{extension}");
    }

    /// <summary>The glob of the program's temp files of one extension (".*.ddpm-*.tmp"), and only those.</summary>
    public static string TempPattern(string extension = "tmp") => $".*.{TempMark}*.{extension}";

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
    /// Gives the fully written file <paramref name="temp"/> the name <paramref name="path"/> only if no file has that
    /// name, atomically: link(2) then removal of the temp on Unix, MoveFileEx without REPLACE_EXISTING on Windows.
    /// Returns false, the temp left in place, if the name is taken. Two writers racing for one name never both
    /// succeed, and a reader never sees the file half written. (File.Move without overwrite is not this: on Unix it
    /// checks that the name is free, then renames, and a racing writer's file is replaced.) Where the file system
    /// has no hard links, the name is claimed with O_EXCL and the bytes copied in: still one winner, but a reader
    /// may briefly see it short.
    /// </summary>
    public static bool TryPublishNew(string temp, string path)
    {
        var libc = LibC.Instance;
        if (libc is null)
        {
            try
            {
                File.Move(temp, path, overwrite: false); // Windows: one atomic call
                return true;
            }
            catch (IOException e) when (e is not FileNotFoundException and not DirectoryNotFoundException && File.Exists(path))
            {
                return false;
            }
        }
        int errno = libc.Link(Path.GetFullPath(temp), Path.GetFullPath(path));
        if (errno == 0)
        {
            File.Delete(temp);
            return true;
        }
        if (errno == LibC.EEXIST)
        {
            return false;
        }
        if (!libc.IsNoHardLinks(errno))
        {
            throw new IOException($"link of {temp} to {path} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
        try
        {
            using var target = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None);
            using (var source = new FileStream(temp, FileMode.Open, FileAccess.Read))
            {
                source.CopyTo(target);
            }
            target.Flush(flushToDisk: true);
        }
        catch (IOException) when (File.Exists(path) && File.Exists(temp))
        {
            return false;
        }
        File.Delete(temp);
        return true;
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
    /// e.g. <see cref="TempPattern"/>) that a dead process left behind: the pid is read by <see cref="PidOfTemp"/>. A file
    /// that does not carry the program's mark and a pid is never touched, whatever the pattern; one whose pid is a live
    /// process is kept, unless <paramref name="allPidsStale"/> is set (the caller holds the folder's run lock, so no other
    /// process can be writing there). Returns how many files it removed.
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
            int? pid = PidOfTemp(Path.GetFileName(file));
            if (pid is null || (!allPidsStale && IsProcessAlive(pid.Value)))
            {
                continue;
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
    /// The pid a temp file name of the program carries: the dot-separated segment before the last extension starts with
    /// <see cref="TempMark"/> and then the pid's digits (".x.safetensors.ddpm-1234-9f3a0c1e.tmp" gives 1234); null for any
    /// other name (".thesis.docx.tmp", ".x.1234.tmp": not the program's).
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
        if (!segment.StartsWith(TempMark, StringComparison.Ordinal))
        {
            return null;
        }
        segment = segment[TempMark.Length..];
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

    /// <summary>open, fsync, close and link from the C library, looked up by name once; null where there is none to load.</summary>
    private sealed unsafe class LibC
    {
        public const int EEXIST = 17; // these few numbers are the same on Linux and macOS
        private const int EPERM = 1;
        private const int EINTR = 4;
        private const int EINVAL = 22;
        private const int EMLINK = 31;

        private readonly delegate* unmanaged<byte*, int, int> _open;
        private readonly delegate* unmanaged<int, int> _fsync;
        private readonly delegate* unmanaged<int, int> _close;
        private readonly delegate* unmanaged<byte*, byte*, int> _link;
        private readonly int _openFlags;
        private readonly int _enotsup;

        private LibC(nint handle, int openFlags, int enotsup)
        {
            _open = (delegate* unmanaged<byte*, int, int>)NativeLibrary.GetExport(handle, "open");
            _fsync = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(handle, "fsync");
            _close = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(handle, "close");
            _link = (delegate* unmanaged<byte*, byte*, int>)NativeLibrary.GetExport(handle, "link");
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

        /// <summary>link(2): 0, or the errno it failed with.</summary>
        public int Link(string existing, string created)
        {
            var from = CString(existing);
            var to = CString(created);
            int rc;
            fixed (byte* f = from, t = to)
            {
                do
                {
                    rc = _link(f, t);
                }
                while (rc < 0 && Marshal.GetLastSystemError() == EINTR);
            }
            return rc == 0 ? 0 : Marshal.GetLastSystemError();
        }

        /// <summary>Whether link failed because the file system has no hard links (FAT, some FUSE and SMB mounts).</summary>
        public bool IsNoHardLinks(int errno) => errno == EPERM || errno == _enotsup || errno == EMLINK;

        public void FsyncDirectory(string dir)
        {
            var bytes = CString(dir);
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

        /// <summary>A NUL-terminated UTF-8 string, as the kernel takes a path.</summary>
        private static byte[] CString(string path)
        {
            var bytes = new byte[System.Text.Encoding.UTF8.GetByteCount(path) + 1];
            System.Text.Encoding.UTF8.GetBytes(path, bytes);
            return bytes;
        }

        private static IOException Failure(string call, string dir, int errno) =>
            new($"{call} of folder {dir} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
    }
}
