using System.Globalization;
using System.Text.RegularExpressions;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>
/// The run folders under runs/: <c>train</c> without <c>--out</c> starts a new numbered one (runs/run1, runs/run2, …: one
/// more than the highest there, as YOLO's runs/train/expN) and points runs/latest at it (a symbolic link, where the file
/// system makes one); <c>sample</c>, <c>eval</c> and <c>train --resume</c> without a folder take the newest run that
/// holds a checkpoint. A runs/latest that is a real folder (a run from before numbered runs) is left as it is, and is
/// the newest run when no numbered one holds a checkpoint.
/// </summary>
public static partial class RunFolders
{
    /// <summary>The folder the runs live in, relative to the working directory.</summary>
    public const string Root = "runs";

    /// <summary>A run folder's name before its number, and the link to the newest.</summary>
    public const string Prefix = "run", Latest = "latest";

    [GeneratedRegex(@"^run([1-9][0-9]{0,8})$")]
    private static partial Regex Numbered();

    /// <summary>The numbered runs under <paramref name="root"/>, by number.</summary>
    public static IReadOnlyList<(int Number, string Path)> All(string root = Root)
    {
        if (!Directory.Exists(root))
        {
            return [];
        }
        return [.. Directory.EnumerateDirectories(root)
            .Select(d => (Match: Numbered().Match(Path.GetFileName(d)), Path: d))
            .Where(d => d.Match.Success && !IsLink(d.Path))
            .Select(d => (int.Parse(d.Match.Groups[1].Value, CultureInfo.InvariantCulture), d.Path))
            .OrderBy(d => d.Item1)];
    }

    /// <summary>Makes the next run folder (one more than the highest number under <paramref name="root"/>) and points
    /// runs/latest at it; returns its path. Two processes starting at once get two folders: the name is claimed by a
    /// rename, which fails when another took it first.</summary>
    public static string Create(string root = Root)
    {
        Directory.CreateDirectory(root);
        int next = All(root).Select(r => r.Number).DefaultIfEmpty(0).Max() + 1;
        for (int attempt = 0; ; attempt++, next++)
        {
            string target = Path.Combine(root, Prefix + next.ToString(CultureInfo.InvariantCulture));
            if (Directory.Exists(target) || File.Exists(target))
            {
                continue;
            }
            string claim = Path.Combine(root, $".{Prefix}{next}.{Durable.TempMark}{Environment.ProcessId}.claim");
            Directory.CreateDirectory(claim);
            try
            {
                Directory.Move(claim, target);
            }
            catch (IOException) when (attempt < 100)
            {
                Directory.Delete(claim);
                continue;
            }
            PointLatest(root, target);
            return target;
        }
    }

    /// <summary>The newest run holding <paramref name="checkpointFile"/>: the highest-numbered one, else a runs/latest that is a
    /// real folder; null when there is none.</summary>
    public static string? Newest(string checkpointFile, string root = Root)
    {
        var numbered = All(root).Reverse().FirstOrDefault(r => File.Exists(Path.Combine(r.Path, checkpointFile)));
        if (numbered.Path is not null)
        {
            return numbered.Path;
        }
        string latest = Path.Combine(root, Latest);
        return Directory.Exists(latest) && File.Exists(Path.Combine(latest, checkpointFile)) ? latest : null;
    }

    /// <summary>Points runs/latest at <paramref name="run"/> (a relative symbolic link, replaced by a rename so a reader never
    /// sees it missing). Leaves a runs/latest that is a real folder alone, and does nothing where links cannot be made.</summary>
    public static void PointLatest(string root, string run)
    {
        string latest = Path.Combine(root, Latest);
        if (Directory.Exists(latest) && !IsLink(latest))
        {
            return;
        }
        string temp = Path.Combine(root, $".{Latest}.{Durable.TempMark}{Environment.ProcessId}.link");
        try
        {
            File.Delete(temp);
            File.CreateSymbolicLink(temp, Path.GetFileName(run));
            Replace(temp, latest);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or PlatformNotSupportedException)
        {
            // No links here (a file system or a Windows account without them): the numbered folders still say which is newest.
            try
            {
                File.Delete(temp);
            }
            catch (IOException)
            {
            }
        }
    }

    private static bool IsLink(string path) => new DirectoryInfo(path).LinkTarget is not null;

    /// <summary>Renames the link <paramref name="from"/> over <paramref name="to"/> in one step: rename(2) on Unix (.NET's
    /// File.Move follows a link to a folder and refuses it); on Windows the old link goes first.</summary>
    private static void Replace(string from, string to)
    {
        if (OperatingSystem.IsWindows())
        {
            if (Path.Exists(to))
            {
                Directory.Delete(to);
            }
            Directory.Move(from, to);
            return;
        }
        if (rename(from, to) != 0)
        {
            throw new IOException($"rename {from} {to}: error {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int rename(string oldPath, string newPath);
}
