using System.Buffers.Binary;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Ddpm.Storage;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;

namespace Ddpm.Diffusion;

/// <summary>How a folder of images becomes a training set: the side to resize to (null: the images' own, when square and
/// the same for all) and the channels (null: 1 when every image is grey, else 3).</summary>
public sealed record FolderOptions(int? Size = null, int? Channels = null);

/// <summary>
/// A folder of images as a training set (what users of lucidrains' Trainer and diffusers' train_unconditional pass): every
/// file ImageSharp decodes (PNG, JPEG, BMP, GIF, WebP, TIFF, TGA, PBM), searched recursively (symbolic links followed once:
/// a loop is cut), labelled by its first-level subfolder as torchvision's ImageFolder does when there are two or more of
/// them. Each image is resized with a Lanczos filter so its shorter side is the size, then centre-cropped; images with
/// alpha are composited on black. Decoded once into a cache of bytes (~/.cache/ddpm/images/KEY.bin, keyed by the files'
/// names, sizes and times and the size and channels asked for), which later runs map into memory (MappedBytes) in seconds.
/// </summary>
public static class ImageFolder
{
    /// <summary>File name extensions taken as images (the formats ImageSharp 2 decodes).</summary>
    public static readonly string[] Extensions = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".tga", ".pbm", ".ppm", ".pgm"];

    /// <summary>The most pixels an image's header may claim; larger ones are skipped unread (a decompression bomb: a small
    /// file that decodes to gigabytes). 40 megapixels, 160 MB decoded.</summary>
    public const long MaxPixels = 40_000_000;

    /// <summary>The share of unreadable files a run accepts (each skipped with a warning); above it the run is refused.</summary>
    public const double MaxBadShare = 0.01;

    /// <summary>The largest side a run may ask for (a checkpoint's bound).</summary>
    public const int MaxSize = 512;

    private const string CacheMagic = "ddpm-images-v1";

    /// <summary>Called with each file's path just before it is decoded: a fault-injection point for the tests (a file that
    /// changes while the images are read). Null in normal use.</summary>
    internal static Action<string>? BeforeDecode { get; set; }

    /// <summary>The default cache folder: $XDG_CACHE_HOME/ddpm/images, else ~/.cache/ddpm/images (beside MNIST's).</summary>
    public static string DefaultCache => Path.Combine(Path.GetDirectoryName(Path.GetFullPath(Mnist.DefaultFolder))!, "images");

    /// <summary>True when <paramref name="folder"/> holds at least one file with an image extension (recursively): stops at
    /// the first (symbolic links to folders are not followed here; <see cref="Load"/> follows them).</summary>
    public static bool HasImages(string folder) => Directory.Exists(folder) &&
        Directory.EnumerateFiles(folder, "*", new EnumerationOptions { RecurseSubdirectories = true, IgnoreInaccessible = true })
            .Any(f => Extensions.Contains(Path.GetExtension(f).ToLowerInvariant()));

    /// <summary>Why <paramref name="size"/> cannot be the side, naming the nearest that can, or null when it can.</summary>
    public static string? SizeProblem(int size)
    {
        if (size >= 4 && size <= MaxSize && size % 4 == 0)
        {
            return null;
        }
        int below = Math.Clamp(size / 4 * 4, 4, MaxSize), above = Math.Clamp(below + 4, 4, MaxSize);
        string nearest = below == above || size < 4 ? $"{Math.Max(below, 4)}" : size > MaxSize ? $"{MaxSize}" : $"{below} or {above}";
        return $"{size} is not a side the U-Net takes (a multiple of 4, for its two downsamplings, from 4 to {MaxSize}); the nearest: {nearest}";
    }

    /// <summary>
    /// The training set in <paramref name="folder"/>: read from the cache when its key matches, else decoded (reporting to
    /// <paramref name="progress"/>, a progress bar, or without one with progress lines on <paramref name="log"/>) and cached. Bad input is a <see cref="DataException"/> with one line saying what.
    /// </summary>
    public static ImageSet Load(string folder, FolderOptions options, Action<string> log, string? cacheFolder = null, IProgress<(int Done, int Total)>? progress = null)
    {
        if (options.Size is { } asked && SizeProblem(asked) is { } sizeProblem)
        {
            throw new UsageException($"--image-size {sizeProblem}");
        }
        if (options.Channels is { } c && c is not (1 or 3))
        {
            throw new UsageException($"--channels {c}: 1 (grayscale) or 3 (RGB)");
        }
        var files = Files(folder, log);
        if (files.Count == 0)
        {
            int others = Directory.EnumerateFiles(folder, "*", new EnumerationOptions { RecurseSubdirectories = true, IgnoreInaccessible = true }).Take(1_000_000).Count();
            throw new DataException($"{folder}: no images ({string.Join(", ", Extensions.Select(e => e[1..].ToUpperInvariant()).Distinct())}) among its {others} files");
        }
        var (classes, labelOf) = Classes(folder, files);
        string key = CacheKey(folder, files, options);
        cacheFolder ??= DefaultCache;
        string cacheFile = Path.Combine(cacheFolder, key + ".bin");
        if (TryReadCache(cacheFile, log) is { } cached)
        {
            log($"data: {cached.Count:N0} images {cached.Channels}x{cached.Size}x{cached.Size} from the cache {cacheFile}");
            return cached;
        }
        var set = Decode(folder, files, classes, labelOf, options, log, progress);
        try
        {
            Directory.CreateDirectory(cacheFolder);
            Durable.WriteAtomically(cacheFile, s => WriteCache(s, set));
            log($"data: cached in {cacheFile}; later runs read it instead of the images");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log($"data: could not cache the decoded images in {cacheFile} ({e.Message.ReplaceLineEndings(" ")}); the next run decodes them again");
        }
        return set;
    }

    /// <summary>A file found: its path, its path under the folder (the cache key and the label use it), size and time.</summary>
    private sealed record Found(string Path, string Relative, long Length, long Ticks);

    /// <summary>Every image file under <paramref name="folder"/>, in ordinal order of its relative path; symbolic links to
    /// folders are followed once each (a folder reached again, a loop, is skipped and said once).</summary>
    private static List<Found> Files(string folder, Action<string> log)
    {
        var found = new List<Found>();
        var visited = new HashSet<string>(StringComparer.Ordinal);
        bool loopSaid = false;
        var root = Path.GetFullPath(folder);
        var pending = new Stack<(string Dir, string Relative)>();
        pending.Push((root, ""));
        while (pending.Count > 0)
        {
            var (dir, relative) = pending.Pop();
            string real = RealPath(dir);
            if (!visited.Add(real))
            {
                if (!loopSaid)
                {
                    log($"data: {dir} was reached before (a symbolic link loop or a second link to it): skipped");
                    loopSaid = true;
                }
                continue;
            }
            IEnumerable<FileSystemInfo> entries;
            try
            {
                entries = new DirectoryInfo(dir).EnumerateFileSystemInfos().ToList();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                log($"data: cannot list {dir} ({e.Message.ReplaceLineEndings(" ")}): skipped");
                continue;
            }
            foreach (var entry in entries)
            {
                string rel = relative.Length == 0 ? entry.Name : relative + "/" + entry.Name;
                if (entry is DirectoryInfo)
                {
                    pending.Push((entry.FullName, rel));
                }
                else if (entry is FileInfo file && Extensions.Contains(file.Extension.ToLowerInvariant()))
                {
                    try
                    {
                        var target = file.LinkTarget is null ? file : new FileInfo(file.FullName);
                        found.Add(new Found(file.FullName, rel, target.Length, target.LastWriteTimeUtc.Ticks));
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                        log($"data: cannot read {file.FullName} ({e.Message.ReplaceLineEndings(" ")}): skipped");
                    }
                }
            }
        }
        found.Sort((a, b) => string.CompareOrdinal(a.Relative, b.Relative));
        return found;
    }

    /// <summary>The folder's canonical path, through any symbolic links on the way.</summary>
    private static string RealPath(string dir)
    {
        try
        {
            var info = new DirectoryInfo(dir);
            var target = info.LinkTarget is null ? null : info.ResolveLinkTarget(returnFinalTarget: true);
            string path = target?.FullName ?? info.FullName;
            // Links higher up the path: resolve each component's parent in turn.
            var parent = Directory.GetParent(path);
            return parent is null ? path : Path.Combine(RealPath(parent.FullName), Path.GetFileName(path));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return Path.GetFullPath(dir);
        }
    }

    /// <summary>Labels from the first-level subfolders when every image is in one and there are two or more (their names,
    /// in ordinal order); else none.</summary>
    private static (string[] Classes, int[] LabelOf) Classes(string folder, List<Found> files)
    {
        var top = files.Select(f => f.Relative.Contains('/') ? f.Relative[..f.Relative.IndexOf('/')] : null).ToArray();
        if (top.Any(t => t is null))
        {
            return ([], new int[files.Count]);
        }
        string[] names = [.. top.Select(t => t!).Distinct().Order(StringComparer.Ordinal)];
        if (names.Length < 2)
        {
            return ([], new int[files.Count]);
        }
        var index = names.Select((n, i) => (n, i)).ToDictionary(p => p.n, p => p.i);
        return (names, [.. top.Select(t => index[t!])]);
    }

    private static string CacheKey(string folder, List<Found> files, FolderOptions options)
    {
        var text = new StringBuilder(CacheMagic).Append('\n')
            .Append(Path.GetFullPath(folder)).Append('\n')
            .Append(options.Size?.ToString(CultureInfo.InvariantCulture) ?? "own").Append(' ')
            .Append(options.Channels?.ToString(CultureInfo.InvariantCulture) ?? "auto").Append('\n');
        foreach (var f in files)
        {
            text.Append(f.Relative).Append('\t').Append(f.Length).Append('\t').Append(f.Ticks).Append('\n');
        }
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString())))[..32];
    }

    /// <summary>Decodes every file: the header checked against <see cref="MaxPixels"/> first, then decoded, resized and
    /// cropped to the side, composited on black; unreadable, oversized and changed files skipped with a warning each.</summary>
    private static ImageSet Decode(string folder, List<Found> files, string[] classes, int[] labelOf, FolderOptions options, Action<string> log,
        IProgress<(int Done, int Total)>? progress)
    {
        // The first frame only of an animated GIF or a multi-page TIFF.
        var decoder = Configuration.Default.Clone();
        decoder.ImageFormatsManager.SetDecoder(SixLabors.ImageSharp.Formats.Gif.GifFormat.Instance,
            new SixLabors.ImageSharp.Formats.Gif.GifDecoder { DecodingMode = SixLabors.ImageSharp.Metadata.FrameDecodingMode.First });
        // A multi-page TIFF's pages past the first are never decoded (each could claim as many pixels as the first).
        decoder.ImageFormatsManager.SetDecoder(SixLabors.ImageSharp.Formats.Tiff.TiffFormat.Instance,
            new SixLabors.ImageSharp.Formats.Tiff.TiffDecoder { DecodingMode = SixLabors.ImageSharp.Metadata.FrameDecodingMode.First });
        // The side: asked for, or the images' own when they all share one square size that the U-Net takes.
        var sizes = new Dictionary<(int W, int H), int>();
        var bad = new List<string>();
        var readable = new List<int>();
        foreach (var (f, i) in files.Select((f, i) => (f, i)))
        {
            try
            {
                if (f.Length == 0)
                {
                    // Also what a FIFO or a device reports: never opened, so never waited on.
                    bad.Add($"{f.Path}: empty (or not a regular file)");
                    continue;
                }
                IImageInfo? info;
                using (var stream = File.OpenRead(f.Path))
                {
                    info = Image.Identify(decoder, stream);
                }
                if (HeaderProblem(info, options.Size) is { } problem)
                {
                    bad.Add($"{f.Path}: {problem}");
                    continue;
                }
                sizes[(info!.Width, info.Height)] = sizes.GetValueOrDefault((info.Width, info.Height)) + 1;
                readable.Add(i);
            }
            catch (Exception e) when (Unreadable(e))
            {
                bad.Add($"{f.Path}: {e.Message.ReplaceLineEndings(" ")}");
            }
        }
        // What can be refused from the headers is refused before minutes of decoding.
        RefuseBad(folder, files.Count, readable.Count, bad);
        if (classes.Length > 255)
        {
            throw new DataException($"{folder}: {classes.Length} subfolders (classes); at most 255 are supported");
        }
        int size = options.Size ?? OwnSize(folder, sizes);
        if (sizes.Count > 1)
        {
            double least = sizes.Keys.Min(s => (double)s.W / s.H), most = sizes.Keys.Max(s => (double)s.W / s.H);
            log($"data: {sizes.Count} image sizes ({string.Join(", ", sizes.OrderByDescending(p => p.Value).Take(3).Select(p => $"{p.Key.W}x{p.Key.H}: {p.Value}"))}{(sizes.Count > 3 ? ", …" : "")}), " +
                $"aspect ratios {least:0.##} to {most:0.##}: each resized so its shorter side is {size}, then centre-cropped");
        }
        long decodedBytes = (long)readable.Count * 3 * size * size;
        if (decodedBytes > Array.MaxLength)
        {
            throw new DataException($"{folder}: {readable.Count:N0} images at 3x{size}x{size} are {decodedBytes / 1e9:F1} GB decoded, more than one array holds (2.1 GB); pass a smaller --image-size, or a part of the folder");
        }
        int plane = size * size;
        var rgb = new byte[(long)readable.Count * 3 * plane];
        var labels = new List<byte>(readable.Count);
        var buffer = new Rgba32[plane];
        int kept = 0;
        bool alphaSaid = false, allGrey = true;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var lastReport = TimeSpan.Zero;
        foreach (int i in readable)
        {
            var f = files[i];
            try
            {
                BeforeDecode?.Invoke(f.Path);
                using var stream = File.OpenRead(f.Path);
                // The header again, from the stream about to be decoded: a file replaced since the first look is checked too.
                if (HeaderProblem(Image.Identify(decoder, stream), size) is { } problem)
                {
                    bad.Add($"{f.Path}: {problem}");
                    continue;
                }
                stream.Position = 0;
                using var image = Image.Load<Rgba32>(decoder, stream);
                image.Mutate(x => x.Resize(new ResizeOptions { Size = new Size(size, size), Mode = ResizeMode.Crop, Sampler = KnownResamplers.Lanczos3 }));
                var now = new FileInfo(f.Path);
                if (now.Length != f.Length || now.LastWriteTimeUtc.Ticks != f.Ticks)
                {
                    bad.Add($"{f.Path}: changed while the images were read");
                    continue;
                }
                bool alpha = false;
                var target = rgb.AsSpan((int)((long)kept * 3 * plane), 3 * plane);
                image.CopyPixelDataTo(buffer);
                for (int k = 0; k < plane; k++)
                {
                    var p = buffer[k];
                    if (p.A != 255)
                    {
                        alpha = true;
                        p = new Rgba32((byte)((p.R * p.A + 127) / 255), (byte)((p.G * p.A + 127) / 255), (byte)((p.B * p.A + 127) / 255), 255);
                    }
                    allGrey &= p.R == p.G && p.G == p.B;
                    target[k] = p.R;
                    target[plane + k] = p.G;
                    target[2 * plane + k] = p.B;
                }
                if (alpha && !alphaSaid)
                {
                    log($"data: {f.Path} and perhaps others have transparent pixels: composited on black");
                    alphaSaid = true;
                }
                labels.Add((byte)Math.Min(labelOf[i], 255));
                kept++;
            }
            catch (Exception e) when (Unreadable(e))
            {
                bad.Add($"{f.Path}: {e.Message.ReplaceLineEndings(" ")}");
            }
            progress?.Report((kept + bad.Count, files.Count));
            if (progress is null && clock.Elapsed - lastReport > TimeSpan.FromSeconds(2))
            {
                lastReport = clock.Elapsed;
                log($"data: decoding {folder}: {kept + bad.Count:N0} of {files.Count:N0} images ({100.0 * (kept + bad.Count) / files.Count:0}%)");
            }
        }
        foreach (var b in bad.Take(5))
        {
            log($"data: skipped {b}");
        }
        if (bad.Count > 5)
        {
            log($"data: skipped {bad.Count - 5} more unreadable files");
        }
        RefuseBad(folder, files.Count, kept, bad);
        // A class whose every image was skipped is dropped (its label would never be seen), the others renumbered.
        var seen = labels.Distinct().Order().ToArray();
        if (classes.Length > 0 && seen.Length < classes.Length)
        {
            var empty = classes.Where((_, c) => !seen.Contains((byte)c)).ToArray();
            log($"data: {string.Join(", ", empty.Take(5))}{(empty.Length > 5 ? ", …" : "")}: no readable image, so not a class");
            var renumber = seen.Select((old, now) => (old, now)).ToDictionary(p => p.old, p => (byte)p.now);
            labels = [.. labels.Select(l => renumber[l])];
            classes = [.. seen.Select(c => classes[c])];
            if (classes.Length < 2)
            {
                classes = [];
                labels = [.. labels.Select(_ => (byte)0)];
            }
        }
        int channels = options.Channels ?? (allGrey ? 1 : 3);
        var pixels = channels == 3 ? rgb.AsSpan(0, (int)((long)kept * 3 * plane)).ToArray() : Grey(rgb, kept, plane);
        log($"data: {kept:N0} images from {folder}, {channels}x{size}x{size}{(classes.Length > 0 ? $", {classes.Length} classes by subfolder ({string.Join(", ", classes.Take(5))}{(classes.Length > 5 ? ", …" : "")})" : ", unlabelled")} " +
            $"({clock.Elapsed.TotalSeconds:F1} s)");
        return new ImageSet(pixels, [.. labels], kept, channels, size) { ClassNames = classes };
    }

    /// <summary>Why an image with header <paramref name="info"/> is not decoded (resized to <paramref name="size"/> when known), or null.</summary>
    private static string? HeaderProblem(IImageInfo? info, int? size)
    {
        if (info is null)
        {
            return "not an image ImageSharp decodes";
        }
        if ((long)info.Width * info.Height > MaxPixels)
        {
            return $"its header claims {info.Width}x{info.Height} pixels, over the limit of {MaxPixels:N0} (not decoded)";
        }
        // Resizing so the shorter side is the size makes the longer one size·long/short wide before the crop: bounded.
        if (size is { } s && (double)Math.Max(info.Width, info.Height) / Math.Max(1, Math.Min(info.Width, info.Height)) * s > MaxResizedSide)
        {
            return $"{info.Width}x{info.Height}: too long and thin to resize (its long side would be over {MaxResizedSide:N0} pixels; not decoded)";
        }
        return null;
    }

    /// <summary>The longest side an image may have after its shorter side is resized to the asked side (before the crop).</summary>
    public const int MaxResizedSide = 16_384;

    /// <summary>The exceptions that mean a file cannot be used as an image (skipped, counted), not a fault of the program.</summary>
    private static bool Unreadable(Exception e) => e is UnknownImageFormatException or InvalidImageContentException or NotSupportedException or IOException
        or UnauthorizedAccessException or ImageFormatException or ImageProcessingException or SixLabors.ImageSharp.Memory.InvalidMemoryOperationException;

    /// <summary>Refuses a folder with no usable image, or more than <see cref="MaxBadShare"/> unusable ones, naming the first.</summary>
    private static void RefuseBad(string folder, int files, int usable, List<string> bad)
    {
        if (usable == 0)
        {
            throw new DataException($"{folder}: none of its {files} image files can be used{(bad.Count > 0 ? $" (first: {bad[0]})" : "")}");
        }
        if (bad.Count > MaxBadShare * files)
        {
            throw new DataException($"{folder}: {bad.Count} of {files} image files cannot be used (first: {bad[0]}): more than {MaxBadShare * 100:0.#}%, so the run is refused");
        }
    }

    /// <summary>The first channel of each image (all three are equal when every image is grey; else ITU-R 601 luma).</summary>
    private static byte[] Grey(byte[] rgb, int count, int plane)
    {
        var grey = new byte[(long)count * plane];
        for (long n = 0; n < count; n++)
        {
            long from = n * 3 * plane;
            for (int i = 0; i < plane; i++)
            {
                grey[n * plane + i] = (byte)Math.Round(0.299 * rgb[from + i] + 0.587 * rgb[from + plane + i] + 0.114 * rgb[from + 2 * plane + i]);
            }
        }
        return grey;
    }

    private static int OwnSize(string folder, Dictionary<(int W, int H), int> sizes)
    {
        if (sizes.Count == 1 && sizes.Keys.First() is var (w, h) && w == h && SizeProblem(w) is null)
        {
            return w;
        }
        string seen = string.Join(", ", sizes.OrderByDescending(p => p.Value).Take(3).Select(p => $"{p.Key.W}x{p.Key.H}"));
        throw new UsageException($"--image-size: the images in {folder} are {seen}{(sizes.Count > 3 ? ", …" : "")}, not one square size the U-Net takes; pass --image-size S (a multiple of 4, e.g. 32 or 64)");
    }

    // The cache: magic, then a JSON header line (count, channels, size, class names), then the labels, then the pixels.
    private static void WriteCache(Stream s, ImageSet set)
    {
        var header = JsonSerializer.SerializeToUtf8Bytes(new CacheHeader(set.Count, set.Channels, set.Size, [.. set.ClassNames]));
        s.Write(Encoding.ASCII.GetBytes(CacheMagic + "\n"));
        Span<byte> length = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(length, header.Length);
        s.Write(length);
        s.Write(header);
        s.Write(set.Labels);
        s.Write(set.Pixels.Span);
    }

    private sealed record CacheHeader(int Count, int Channels, int Size, string[] Classes);

    private static ImageSet? TryReadCache(string file, Action<string> log)
    {
        if (!File.Exists(file))
        {
            return null;
        }
        try
        {
            using var s = File.OpenRead(file);
            var magic = new byte[CacheMagic.Length + 1];
            s.ReadExactly(magic);
            if (Encoding.ASCII.GetString(magic) != CacheMagic + "\n")
            {
                throw new InvalidDataException("not an image cache");
            }
            var length = new byte[4];
            s.ReadExactly(length);
            int headerLength = BinaryPrimitives.ReadInt32LittleEndian(length);
            if (headerLength is < 2 or > 1 << 20)
            {
                throw new InvalidDataException("bad header length");
            }
            var headerBytes = new byte[headerLength];
            s.ReadExactly(headerBytes);
            var h = JsonSerializer.Deserialize<CacheHeader>(headerBytes) ?? throw new InvalidDataException("empty header");
            long expected = (long)h.Count * h.Channels * h.Size * h.Size;
            if (h.Count < 1 || h.Channels is not (1 or 3) || SizeProblem(h.Size) is not null || h.Classes is null || s.Length - s.Position != h.Count + expected || expected > int.MaxValue)
            {
                throw new InvalidDataException("header and length disagree");
            }
            var labels = new byte[h.Count];
            s.ReadExactly(labels);
            if (labels.Any(l => l >= Math.Max(1, h.Classes.Length)))
            {
                throw new InvalidDataException("a label past the classes");
            }
            // The pixels stay in the file: mapped, paged in as the batches read them.
            var mapped = new MappedBytes(file, s.Position, (int)expected);
            return new ImageSet([], labels, h.Count, h.Channels, h.Size) { ClassNames = h.Classes, Pixels = mapped.Memory };
        }
        catch (Exception e) when (e is IOException or InvalidDataException or JsonException or UnauthorizedAccessException)
        {
            log($"data: ignored the damaged cache {file} ({e.Message.ReplaceLineEndings(" ")}); decoding the images again");
            return null;
        }
    }
}
