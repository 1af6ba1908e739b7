using Ddpm.Diffusion;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Png;
using SixLabors.ImageSharp.PixelFormats;

namespace Ddpm.Tests;

/// <summary>
/// Folders of images as training data (ImageFolder, Datasets, Cifar10), on folders the tests draw themselves: coloured
/// squares in class subfolders, and every kind of bad input the reader must answer in one line without losing anything.
/// Serial: the decode hook is process-wide.
/// </summary>
[Collection(ImageFolderCollection.Name)]
public sealed class ImageFolderTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-folder").FullName;
    private readonly List<string> _log = [];

    private string Root => Path.Combine(_dir, "images");

    private string Cache => Path.Combine(_dir, "cache");

    public void Dispose()
    {
        ImageFolder.BeforeDecode = null;
        Directory.Delete(_dir, recursive: true);
    }

    /// <summary>A square of <paramref name="colour"/> at a random place on dark grey, <paramref name="w"/> x <paramref name="h"/>.</summary>
    internal static void Square(string path, Rgb24 colour, int w = 20, int h = 20, int seed = 0)
    {
        var rng = new Random(seed);
        int x0 = rng.Next(w / 2), y0 = rng.Next(h / 2);
        using var image = new Image<Rgb24>(w, h, new Rgb24(20, 20, 20));
        for (int y = y0; y < y0 + h / 2; y++)
        {
            for (int x = x0; x < x0 + w / 2; x++)
            {
                image[x, y] = colour;
            }
        }
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        image.SaveAsPng(path);
    }

    /// <summary>Draws <paramref name="perClass"/> squares in each of red/, green/ and blue/.</summary>
    internal static void Draw(string root, int perClass, int side = 20)
    {
        foreach (var (name, colour) in new[] { ("red", new Rgb24(220, 30, 30)), ("green", new Rgb24(30, 200, 40)), ("blue", new Rgb24(40, 60, 220)) })
        {
            for (int i = 0; i < perClass; i++)
            {
                Square(Path.Combine(root, name, $"{i}.png"), colour, side, side, seed: i);
            }
        }
    }

    private ImageSet Load(FolderOptions? options = null) => ImageFolder.Load(Root, options ?? new FolderOptions(16), _log.Add, Cache);

    [Fact]
    public void ALabelledFolderLoadsIsCachedAndDecodedAgainWhenAFileChanges()
    {
        Draw(Root, 4);
        var set = Load();
        Assert.Equal((12, 3, 16), (set.Count, set.Channels, set.Size));
        Assert.Equal(new[] { "blue", "green", "red" }, set.ClassNames);
        Assert.Equal(new byte[] { 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2 }, set.Labels);
        Assert.Equal(Datasets.Kind.Images, Datasets.Of(Root));
        // The square's colour survives the resize: a red image's red plane is bright somewhere, its green plane not.
        int plane = 16 * 16;
        var red = set.Images.AsSpan(8 * 3 * plane, 3 * plane);
        Assert.True(red[..plane].ToArray().Max() > 200 && red[plane..(2 * plane)].ToArray().Max() < 60);

        _log.Clear();
        var again = Load();
        Assert.Contains(_log, l => l.Contains("from the cache"));
        Assert.Empty(again.Images); // read from the cache: mapped, not copied
        Assert.Equal(set.Pixels.ToArray(), again.Pixels.ToArray());
        var first = new float[again.ImageBytes];
        var second = new float[set.ImageBytes];
        again.CopyImage(5, first);
        set.CopyImage(5, second);
        Assert.Equal(second, first);
        Assert.Equal(set.Hash, again.Hash);

        // A damaged cache (cut short) is said once and decoded again, then rewritten.
        var cacheFile = Directory.GetFiles(Cache, "*.bin").Single();
        File.WriteAllBytes(cacheFile, File.ReadAllBytes(cacheFile)[..100]);
        _log.Clear();
        Assert.Equal(set.Pixels.ToArray(), Load().Pixels.ToArray());
        Assert.Contains(_log, l => l.Contains("ignored the damaged cache"));

        // Another size is another cache; a changed file is too.
        _log.Clear();
        Assert.Equal(8, Load(new FolderOptions(8)).Size);
        Assert.DoesNotContain(_log, l => l.Contains("from the cache"));
        File.SetLastWriteTimeUtc(Path.Combine(Root, "red", "0.png"), DateTime.UtcNow.AddMinutes(-5));
        _log.Clear();
        Load();
        Assert.DoesNotContain(_log, l => l.Contains("from the cache"));
    }

    [Fact]
    public void GreyImagesGiveOneChannelUnlessThreeAreAskedFor()
    {
        for (int i = 0; i < 6; i++)
        {
            Square(Path.Combine(Root, $"{i}.png"), new Rgb24(200, 200, 200), 16, 16, i);
        }
        var grey = Load(new FolderOptions());
        Assert.Equal((1, 16), (grey.Channels, grey.Size)); // the images' own size: all 16x16
        Assert.Empty(grey.ClassNames); // files at the top: unlabelled
        Assert.Equal(3, Load(new FolderOptions(Channels: 3)).Channels);
    }

    [Fact]
    public void AFolderWithoutImagesIsRefusedInOneLine()
    {
        Directory.CreateDirectory(Root);
        File.WriteAllText(Path.Combine(Root, "notes.txt"), "no pictures here");
        var e = Assert.Throws<DataException>(() => Load());
        Assert.Contains("no images", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void BadFilesAreSkippedNamedAndRefusedAboveOnePercent()
    {
        Draw(Root, 70); // 210 images
        File.WriteAllBytes(Path.Combine(Root, "red", "garbage.png"), [.. Enumerable.Range(0, 300).Select(i => (byte)(i * 7))]);
        var good = File.ReadAllBytes(Path.Combine(Root, "green", "0.png"));
        File.WriteAllBytes(Path.Combine(Root, "green", "truncated.png"), good[..(good.Length / 2)]);
        var set = Load();
        Assert.Equal(210, set.Count);
        Assert.Contains(_log, l => l.Contains("garbage.png"));
        Assert.Contains(_log, l => l.Contains("truncated.png"));

        // 3 bad of 213 is over 1%.
        File.WriteAllBytes(Path.Combine(Root, "blue", "empty.png"), []);
        var e = Assert.Throws<DataException>(() => Load(new FolderOptions(12)));
        Assert.Contains("3 of 213 image files cannot be used", e.Message);
        Assert.Contains("more than 1%", e.Message);
    }

    [Fact]
    public void ADecompressionBombIsSkippedOnItsHeader()
    {
        Draw(Root, 40);
        // A PNG whose header claims 60,000 x 60,000 pixels (3.6 gigapixels): skipped on the header, never decoded.
        File.WriteAllBytes(Path.Combine(Root, "red", "bomb.png"), Bomb(60_000, 60_000));
        long before = Environment.WorkingSet;
        var set = Load();
        Assert.Equal(120, set.Count);
        Assert.Contains(_log, l => l.Contains("bomb.png") && l.Contains("over the limit") && l.Contains("not decoded"));
        // Decoding it would take at least 3.6 GB. The growth, not the level: the process's working set also holds what the
        // tests running beside this one allocate (it was 2.9 GiB before the load once, with the simulators' tests alongside).
        long grown = Environment.WorkingSet - before;
        Assert.True(grown < 1L << 30, $"working set grew {grown >> 20} MiB while loading (from {before >> 20} MiB)");
    }

    [Fact]
    public void ASymbolicLinkLoopIsCut()
    {
        Draw(Root, 3);
        Directory.CreateSymbolicLink(Path.Combine(Root, "red", "again"), Root);
        var set = Load();
        Assert.Equal(9, set.Count);
        Assert.Contains(_log, l => l.Contains("reached before"));
    }

    [Fact]
    public void SixteenBitPaletteAndTransparentImagesAreRead()
    {
        Directory.CreateDirectory(Root);
        using (var deep = new Image<Rgb48>(16, 16, new Rgb48(65535, 0, 0)))
        {
            deep.SaveAsPng(Path.Combine(Root, "deep.png"), new PngEncoder { BitDepth = PngBitDepth.Bit16, ColorType = PngColorType.Rgb });
        }
        using (var palette = new Image<Rgb24>(16, 16, new Rgb24(0, 0, 255)))
        {
            palette.SaveAsPng(Path.Combine(Root, "palette.png"), new PngEncoder { ColorType = PngColorType.Palette });
        }
        using (var clear = new Image<Rgba32>(16, 16, new Rgba32(255, 255, 255, 0)))
        {
            clear.SaveAsPng(Path.Combine(Root, "clear.png"));
        }
        var set = Load();
        Assert.Equal((3, 3), (set.Count, set.Channels));
        int plane = 16 * 16;
        // Ordinal order: clear, deep, palette. Transparent white is black on black; 16-bit red is red; the palette's blue is blue.
        Assert.Equal(0, set.Images[0]);
        Assert.Equal((255, 0), (set.Images[3 * plane], set.Images[3 * plane + plane]));
        Assert.Equal(255, set.Images[2 * 3 * plane + 2 * plane]);
        Assert.Single(_log, l => l.Contains("composited on black"));
    }

    [Fact]
    public void MixedSizesAreCountedAndNeedASide()
    {
        Square(Path.Combine(Root, "wide.png"), new Rgb24(200, 0, 0), 30, 20);
        Square(Path.Combine(Root, "tall.png"), new Rgb24(0, 200, 0), 20, 40);
        Square(Path.Combine(Root, "square.png"), new Rgb24(0, 0, 200), 24, 24);
        var e = Assert.Throws<UsageException>(() => Load(new FolderOptions()));
        Assert.Contains("pass --image-size S", e.Message);
        var set = Load(new FolderOptions(12));
        Assert.Equal(3, set.Count);
        Assert.Contains(_log, l => l.Contains("3 image sizes") && l.Contains("aspect ratios 0.5 to 1.5"));
        Assert.Contains("the nearest: 28 or 32", Assert.Throws<UsageException>(() => Load(new FolderOptions(30))).Message);
    }

    [Fact]
    public void AFileThatChangesWhileTheImagesAreReadIsSkipped()
    {
        Draw(Root, 40);
        string victim = Path.Combine(Root, "blue", "3.png");
        ImageFolder.BeforeDecode = path =>
        {
            if (path == victim)
            {
                File.AppendAllText(path, "more bytes");
            }
        };
        var set = Load();
        Assert.Equal(119, set.Count);
        Assert.Contains(_log, l => l.Contains("3.png") && l.Contains("changed while the images were read"));
    }

    [Fact]
    public void Cifar10BatchesAreRead()
    {
        Directory.CreateDirectory(Root);
        var rng = new Random(1);
        var batch = new byte[20 * Cifar10.RecordBytes];
        rng.NextBytes(batch);
        for (int r = 0; r < 20; r++)
        {
            batch[r * Cifar10.RecordBytes] = (byte)(r % 10);
        }
        File.WriteAllBytes(Path.Combine(Root, "data_batch_1.bin"), batch);
        File.WriteAllLines(Path.Combine(Root, "batches.meta.txt"), ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]);
        Assert.Equal(Datasets.Kind.Cifar10, Datasets.Of(Root));
        var set = Datasets.LoadTraining(Root, new FolderOptions(), _log.Add, Cache);
        Assert.Equal((20, 3, 32), (set.Count, set.Channels, set.Size));
        Assert.Equal("truck", set.ClassNames[9]);
        Assert.Equal(batch[Cifar10.RecordBytes + 1], set.Images[3 * 32 * 32]);
        File.WriteAllBytes(Path.Combine(Root, "data_batch_2.bin"), batch[..100]);
        Assert.Contains("not a whole number of CIFAR-10 records", Assert.Throws<DataException>(() => Datasets.LoadTraining(Root, new FolderOptions(), _log.Add, Cache)).Message);
    }

    [Fact]
    public void ScoringHoldsOutEveryTenthImageAndAColourClassifierRoundTrips()
    {
        Draw(Root, 10);
        var (train, test) = Datasets.LoadForScoring(Root, new FolderOptions(16), _log.Add, Cache);
        Assert.Equal((27, 3), (train.Count, test.Count));
        Assert.Equal(new byte[] { 0, 1, 2 }, test.Labels); // images 9, 19 and 29: one of each class
        Assert.Equal(train.ClassNames, test.ClassNames);

        string file = Path.Combine(_dir, "classifier.safetensors");
        using var classifier = new Ddpm.Diffusion.Classifier(Tensors.CpuDevice.Instance, seed: 1, width: 4, classes: 3, side: 16, channels: 3);
        classifier.Save(file);
        using var back = Ddpm.Diffusion.Classifier.Load(file, Tensors.CpuDevice.Instance);
        Assert.Equal((3, 16, 3), (back.Channels, back.Side, back.Classes));
        var images = LabeledImages.From(test);
        Assert.Equal(classifier.Predict(images).Probabilities, back.Predict(images).Probabilities);
        Assert.Throws<ArgumentException>(() => back.Predict(LabeledImages.From(train) with { Channels = 1, Images = new byte[27 * 16 * 16] }));
    }

    [Fact]
    public async Task AClassWithoutAReadableImageIsDroppedAndOddFilesAreSkippedUnopened()
    {
        Draw(Root, 110, side: 8); // 330 good, so three bad are under 1%
        Directory.CreateDirectory(Path.Combine(Root, "birds"));
        File.WriteAllText(Path.Combine(Root, "birds", "0.png"), "<html>not found</html>");
        // A 2,000 x 1 strip: resized to a side of 16 its long side would be 32,000 pixels; skipped on its header.
        using (var strip = new Image<Rgb24>(2000, 1, new Rgb24(200, 0, 0)))
        {
            strip.SaveAsPng(Path.Combine(Root, "red", "strip.png"));
        }
        // A FIFO named like an image: never opened (opening it would wait for a writer for ever).
        string fifo = Path.Combine(Root, "green", "pipe.png");
        System.Diagnostics.Process.Start("mkfifo", fifo)!.WaitForExit();
        var set = await Task.Run(() => Load()).WaitAsync(TimeSpan.FromSeconds(60)); // a hang fails as a timeout
        Assert.Equal(330, set.Count);
        Assert.Equal(new[] { "blue", "green", "red" }, set.ClassNames);
        Assert.Equal(2, set.Labels.Max());
        Assert.Contains(_log, l => l.Contains("birds: no readable image, so not a class"));
        Assert.Contains(_log, l => l.Contains("strip.png") && l.Contains("too long and thin"));
        Assert.Contains(_log, l => l.Contains("pipe.png") && l.Contains("empty"));
    }

    /// <summary>CRC-32 (ISO 3309, PNG's chunk checksum).</summary>
    private static uint Crc32(byte[] bytes)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in bytes)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++)
            {
                crc = (crc & 1) != 0 ? 0xEDB88320 ^ (crc >> 1) : crc >> 1;
            }
        }
        return ~crc;
    }

    /// <summary>A PNG signature and an IHDR claiming <paramref name="w"/> x <paramref name="h"/> 8-bit grey pixels, then a
    /// few bytes of IDAT and IEND: what a decompression bomb's header looks like.</summary>
    private static byte[] Bomb(int w, int h)
    {
        static byte[] Chunk(string type, byte[] data)
        {
            var t = System.Text.Encoding.ASCII.GetBytes(type);
            var length = new byte[4];
            var crc = new byte[4];
            System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(length, data.Length);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(crc, Crc32([.. t, .. data]));
            return [.. length, .. t, .. data, .. crc];
        }
        var ihdr = new byte[13];
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(ihdr, w);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), h);
        ihdr[8] = 8;
        return [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, .. Chunk("IHDR", ihdr), .. Chunk("IDAT", [0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]), .. Chunk("IEND", [])];
    }
}

[CollectionDefinition(Name)]
public sealed class ImageFolderCollection
{
    public const string Name = "image folders";
}
