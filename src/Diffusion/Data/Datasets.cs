namespace Ddpm.Diffusion;

/// <summary>
/// What <c>--data</c> names, read as a training set: MNIST-format IDX files (MNIST, Fashion-MNIST; MNIST is fetched into an
/// empty or missing folder, as always), CIFAR-10's binary batches (data_batch_1.bin .. data_batch_5.bin), or a folder of
/// images (<see cref="ImageFolder"/>).
/// </summary>
public static class Datasets
{
    /// <summary>The kinds of data a folder holds.</summary>
    public enum Kind
    {
        /// <summary>MNIST-format IDX files, or an empty or missing folder (where MNIST is fetched).</summary>
        Idx,

        /// <summary>CIFAR-10's binary batches.</summary>
        Cifar10,

        /// <summary>Image files.</summary>
        Images,
    }

    /// <summary>What <paramref name="folder"/> holds: IDX training files win, then CIFAR-10 batches, then images; a folder
    /// with none of them and nothing else (or none at all) is where MNIST goes.</summary>
    public static Kind Of(string folder)
    {
        if (!Directory.Exists(folder) || Mnist.Files.Any(f => File.Exists(Path.Combine(folder, f.Name)) || File.Exists(Path.Combine(folder, f.Name + ".gz"))))
        {
            return Kind.Idx;
        }
        if (Cifar10.Batches(folder).Length > 0)
        {
            return Kind.Cifar10;
        }
        if (ImageFolder.HasImages(folder))
        {
            return Kind.Images;
        }
        // An empty folder is MNIST's cache to fill; anything else is named by the image reader's "no images" line.
        return Directory.EnumerateFileSystemEntries(folder).Any() ? Kind.Images : Kind.Idx;
    }

    /// <summary>The training set in <paramref name="folder"/>; <paramref name="options"/> (a side, a channel count) apply to a
    /// folder of images, and to the others only where they say what the data is anyway.</summary>
    public static ImageSet LoadTraining(string folder, FolderOptions options, Action<string> log, string? cacheFolder = null,
        IProgress<(int Done, int Total)>? progress = null)
    {
        var kind = Of(folder);
        var set = kind switch
        {
            Kind.Images => ImageFolder.Load(folder, options, log, cacheFolder, progress),
            Kind.Cifar10 => Cifar10.Load(folder, log),
            _ => Mnist.LoadTraining(folder, log),
        };
        if (kind != Kind.Images && ((options.Size is { } s && s != set.Size) || (options.Channels is { } c && c != set.Channels)))
        {
            throw new UsageException($"--image-size and --channels resize a folder of images; {folder} holds {(kind == Kind.Cifar10 ? "CIFAR-10 batches" : "IDX files")} of {set.Channels}x{set.Size}x{set.Size} images");
        }
        return set;
    }

    /// <summary>One image in <see cref="HeldOut"/> is held out as the scoring test set: the one at index 9 mod 10.</summary>
    public const int HeldOut = 10;

    /// <summary>
    /// The labelled training and test sets <c>eval</c> scores with: MNIST-format IDX files' train and t10k files; CIFAR-10's
    /// training batches and its test_batch.bin (else every tenth image held out); a folder of images with every tenth
    /// image (index 9 mod 10, in file order) held out. Images are read at <paramref name="options"/>' side and channels
    /// (the model's). An unlabelled folder is refused in one line.
    /// </summary>
    public static (ImageSet Train, ImageSet Test) LoadForScoring(string folder, FolderOptions options, Action<string> log, string? cacheFolder = null)
    {
        var kind = Of(folder);
        if (kind == Kind.Idx)
        {
            return (Mnist.LoadTraining(folder, log), Mnist.LoadTest(folder, log));
        }
        var all = kind == Kind.Cifar10 ? Cifar10.Load(folder, log) : ImageFolder.Load(folder, options, log, cacheFolder);
        if (all.ClassNames.Count < 2)
        {
            throw new DataException($"{folder}: unlabelled images (no class subfolders): eval's classifier learns the data's classes, so it needs two or more");
        }
        if (kind == Kind.Cifar10 && Cifar10.TestBatch(folder) is { } test)
        {
            return (all, Cifar10.Read([test], log, all.ClassNames));
        }
        return Split(all);
    }

    /// <summary>The set without and with its held-out images (index 9 mod 10).</summary>
    public static (ImageSet Train, ImageSet Test) Split(ImageSet all)
    {
        int n = all.ImageBytes;
        var keep = Enumerable.Range(0, all.Count).Where(i => i % HeldOut != HeldOut - 1).ToArray();
        var held = Enumerable.Range(0, all.Count).Where(i => i % HeldOut == HeldOut - 1).ToArray();
        ImageSet Pick(int[] which)
        {
            var images = new byte[(long)which.Length * n];
            for (int k = 0; k < which.Length; k++)
            {
                all.Pixels.Span.Slice(which[k] * n, n).CopyTo(images.AsSpan(k * n, n));
            }
            return new ImageSet(images, [.. which.Select(i => all.Labels[i])], which.Length, all.Channels, all.Size) { ClassNames = all.ClassNames };
        }
        if (held.Length == 0)
        {
            throw new DataException($"{all.Count} images: too few to hold every tenth out for scoring");
        }
        return (Pick(keep), Pick(held));
    }
}

/// <summary>CIFAR-10's binary version: data_batch_N.bin files of 10,000 records, each a label byte and a 32x32 RGB image as
/// three planes (R, G, B); the class names from batches.meta.txt when it is there.</summary>
public static class Cifar10
{
    /// <summary>Bytes of one record: the label and 3 x 32 x 32 pixels.</summary>
    public const int RecordBytes = 1 + 3 * 32 * 32;

    /// <summary>The training batches in <paramref name="folder"/> (or its cifar-10-batches-bin subfolder), in name order.</summary>
    public static string[] Batches(string folder)
    {
        foreach (var dir in new[] { folder, Path.Combine(folder, "cifar-10-batches-bin") })
        {
            if (Directory.Exists(dir))
            {
                var found = Directory.GetFiles(dir, "data_batch_*.bin").Order(StringComparer.Ordinal).ToArray();
                if (found.Length > 0)
                {
                    return found;
                }
            }
        }
        return [];
    }

    /// <summary>The test batch beside the training batches, or null.</summary>
    public static string? TestBatch(string folder)
    {
        var batches = Batches(folder);
        string? test = batches.Length == 0 ? null : Path.Combine(Path.GetDirectoryName(batches[0])!, "test_batch.bin");
        return test is not null && File.Exists(test) ? test : null;
    }

    /// <summary>Reads every training batch; a file whose length is not a whole number of records is refused, naming it.</summary>
    public static ImageSet Load(string folder, Action<string> log) => Read(Batches(folder), log);

    /// <summary>Reads the batches <paramref name="batches"/> (with <paramref name="names"/>, else batches.meta.txt's).</summary>
    public static ImageSet Read(string[] batches, Action<string> log, IReadOnlyList<string>? names = null)
    {
        string folder = Path.GetDirectoryName(batches[0])!;
        long total = 0;
        foreach (var b in batches)
        {
            long length = new FileInfo(b).Length;
            if (length == 0 || length % RecordBytes != 0)
            {
                throw new DataException($"{b}: {length} bytes, not a whole number of CIFAR-10 records ({RecordBytes} bytes each)");
            }
            total += length / RecordBytes;
        }
        if (total * (RecordBytes - 1) > int.MaxValue)
        {
            throw new DataException($"{folder}: {total} CIFAR-10 records, more than one array holds");
        }
        var pixels = new byte[total * (RecordBytes - 1)];
        var labels = new byte[total];
        long n = 0;
        foreach (var b in batches)
        {
            var bytes = File.ReadAllBytes(b);
            for (int r = 0; r < bytes.Length / RecordBytes; r++, n++)
            {
                byte label = bytes[r * RecordBytes];
                if (label > 9)
                {
                    throw new DataException($"{b}: record {r} has label {label}; CIFAR-10's are 0..9");
                }
                labels[n] = label;
                Array.Copy(bytes, r * RecordBytes + 1, pixels, n * (RecordBytes - 1), RecordBytes - 1);
            }
        }
        if (names is null)
        {
            string meta = Path.Combine(folder, "batches.meta.txt");
            string[] read = File.Exists(meta) ? [.. File.ReadAllLines(meta).Select(l => l.Trim()).Where(l => l.Length > 0).Take(10)] : [];
            names = read.Length == 10 ? read : [.. Enumerable.Range(0, 10).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture))];
        }
        log($"data: {total:N0} CIFAR-10 images (3x32x32) from {batches.Length} batches in {folder}");
        return new ImageSet(pixels, labels, (int)total, 3, 32) { ClassNames = names };
    }
}
