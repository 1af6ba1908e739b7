using System.Buffers.Binary;
using Ddpm.Nn;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Gif;
using SixLabors.ImageSharp.PixelFormats;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>The shape of one image: channels (1 or 3) and side.</summary>
public readonly record struct ImageShape(int Channels, int Side)
{
    /// <summary>MNIST's: 1 x 28 x 28.</summary>
    public static readonly ImageShape Mnist = new(1, 28);

    /// <summary>Floats (or bytes) of one image.</summary>
    public int Length => Channels * Side * Side;
}

/// <summary>What the CLI writes for people and other tools: image grids (PNG, grey or colour), the reverse process
/// as an animated GIF (ImageSharp: SkiaSharp has no GIF encoder), the loss curve (ScottPlot),
/// and images as an IDX file (MNIST's format). Every file is written atomically (<see cref="Durable.WriteAtomically"/>): a signal
/// or crash mid-write leaves the previous file whole, never a truncated one.</summary>
public static class Images
{
    private const int Gap = 2;

    /// <summary>Pixel value of a sample: clamp to [-1, 1], then round((x + 1)·127.5), as the spec.</summary>
    public static byte ToByte(float x) => (byte)Math.Round((Math.Clamp(float.IsNaN(x) ? -1f : x, -1f, 1f) + 1f) * 127.5f);

    /// <summary>n images [n·C·S·S] (<paramref name="shape"/>, MNIST's 1 x 28 x 28 by default) as a grid of tiles on black,
    /// scaled ×<paramref name="scale"/>: square-ish, or <paramref name="columns"/> a row when given (one row per class for a
    /// conditional model). Grayscale images give a grayscale picture, RGB ones a colour one.</summary>
    public static Image<Rgba32> Grid(float[] digits, int n, int scale = 2, int columns = 0, ImageShape? shape = null)
    {
        int cols = columns > 0 ? columns : (int)Math.Ceiling(Math.Sqrt(n)), rows = (n + cols - 1) / cols;
        return Tiles(digits, shape ?? ImageShape.Mnist, rows, cols, scale, (r, c) => r * cols + c < n ? r * cols + c : -1, (_, colour, _) => colour,
            new Rgba32(0, 0, 0));
    }

    /// <summary>
    /// Digits laid out by rows: row r holds the digits <paramref name="rows"/>[r] (indices into
    /// <paramref name="digits"/> [·784], at most <paramref name="columns"/> of them; the rest of the row stays black);
    /// tiles whose index <paramref name="marked"/> holds get a red frame over their outermost pixels.
    /// </summary>
    public static Image<Rgba32> RowGrid(float[] digits, IReadOnlyList<IReadOnlyList<int>> rows, int columns, Func<int, bool> marked, int scale = 2,
        ImageShape? shape = null)
    {
        var red = new Rgba32(230, 40, 40);
        return Tiles(digits, shape ?? ImageShape.Mnist, rows.Count, columns, scale, (r, c) => c < rows[r].Count ? rows[r][c] : -1,
            (k, colour, edge) => edge && marked(k) ? red : colour, new Rgba32(0, 0, 0));
    }

    /// <summary>Writes <see cref="RowGrid"/> as a PNG.</summary>
    public static void SaveRowGrid(string path, float[] digits, IReadOnlyList<IReadOnlyList<int>> rows, int columns, Func<int, bool> marked,
        ImageShape? shape = null)
    {
        using var image = RowGrid(digits, rows, columns, marked, shape: shape);
        Durable.WriteAtomically(path, s => image.SaveAsPng(s));
    }

    // rows × cols tiles of S×S with Gap pixels around, scaled ×scale: tile (r, c) shows image digitAt(r, c) (none when -1),
    // each pixel its colour (grey for one channel; channel planes R, G, B for three), passed through pixel(image, colour,
    // on the tile's outermost ring).
    private static Image<Rgba32> Tiles(float[] images, ImageShape shape, int rows, int cols, int scale, Func<int, int, int> digitAt,
        Func<int, Rgba32, bool, Rgba32> pixel, Rgba32 background)
    {
        int side = shape.Side, plane = side * side, length = shape.Length;
        int w = (cols * (side + Gap) + Gap) * scale, h = (rows * (side + Gap) + Gap) * scale;
        var image = new Image<Rgba32>(w, h, background);
        image.ProcessPixelRows(pixels =>
        {
            for (int y = 0; y < h; y++)
            {
                var row = pixels.GetRowSpan(y);
                int gy = y / scale, r = gy / (side + Gap), py = gy % (side + Gap) - Gap;
                for (int x = 0; x < w; x++)
                {
                    int gx = x / scale, c = gx / (side + Gap), px = gx % (side + Gap) - Gap;
                    if (py < 0 || px < 0 || r >= rows || c >= cols)
                    {
                        continue;
                    }
                    int k = digitAt(r, c);
                    if (k >= 0)
                    {
                        bool edge = py == 0 || px == 0 || py == side - 1 || px == side - 1;
                        long at = (long)k * length + py * side + px;
                        byte red = ToByte(images[at]);
                        var colour = shape.Channels == 1 ? new Rgba32(red, red, red) : new Rgba32(red, ToByte(images[at + plane]), ToByte(images[at + 2 * plane]));
                        row[x] = pixel(k, colour, edge);
                    }
                }
            }
        });
        return image;
    }

    /// <summary>Writes the grid as a PNG (grayscale for one-channel images).</summary>
    public static void SaveGrid(string path, float[] digits, int n, int columns = 0, ImageShape? shape = null)
    {
        using var image = Grid(digits, n, columns: columns, shape: shape);
        if ((shape ?? ImageShape.Mnist).Channels == 1)
        {
            using var grey = image.CloneAs<L8>();
            Durable.WriteAtomically(path, s => grey.SaveAsPng(s));
            return;
        }
        Durable.WriteAtomically(path, s => image.SaveAsPng(s));
    }

    /// <summary>Writes frames (each n images) as a looping GIF; the last frame holds for two seconds.</summary>
    public static void SaveAnimation(string path, IReadOnlyList<float[]> frames, int n, int columns = 0, ImageShape? shape = null)
    {
        using var animation = Grid(frames[0], n, columns: columns, shape: shape);
        var meta = animation.Metadata.GetGifMetadata();
        meta.RepeatCount = 0;
        animation.Frames.RootFrame.Metadata.GetGifMetadata().FrameDelay = 8;
        for (int i = 1; i < frames.Count; i++)
        {
            using var frame = Grid(frames[i], n, columns: columns, shape: shape);
            var added = animation.Frames.AddFrame(frame.Frames.RootFrame);
            added.Metadata.GetGifMetadata().FrameDelay = i == frames.Count - 1 ? 200 : 8;
        }
        Durable.WriteAtomically(path, s => animation.SaveAsGif(s));
    }

    /// <summary>Image <paramref name="index"/> of <paramref name="images"/> [n·C·S·S] as a PNG of S x S pixels, grey or colour.</summary>
    public static void SaveOne(string path, float[] images, int index, ImageShape shape)
    {
        int side = shape.Side, plane = side * side;
        long at = (long)index * shape.Length;
        if (shape.Channels == 1)
        {
            using var grey = new Image<L8>(side, side);
            for (int y = 0; y < side; y++)
            {
                for (int x = 0; x < side; x++)
                {
                    grey[x, y] = new L8(ToByte(images[at + y * side + x]));
                }
            }
            Durable.WriteAtomically(path, s => grey.SaveAsPng(s));
            return;
        }
        using var colour = new Image<Rgb24>(side, side);
        for (int y = 0; y < side; y++)
        {
            for (int x = 0; x < side; x++)
            {
                long p = at + y * side + x;
                colour[x, y] = new Rgb24(ToByte(images[p]), ToByte(images[p + plane]), ToByte(images[p + 2 * plane]));
            }
        }
        Durable.WriteAtomically(path, s => colour.SaveAsPng(s));
    }

    /// <summary>The IDX file's name for images of <paramref name="shape"/>: samples-idx3-ubyte (n × S × S, MNIST's own
    /// layout) for one channel, samples-idx4-ubyte (n × C × S × S) for more.</summary>
    public static string IdxName(ImageShape shape) => shape.Channels == 1 ? "samples-idx3-ubyte" : "samples-idx4-ubyte";

    /// <summary>Images as an IDX file of unsigned bytes: magic 0x00000803 and n × S × S for one channel (as MNIST's own
    /// files), 0x00000804 and n × C × S × S for more.</summary>
    public static void SaveIdx(string path, float[] digits, int n, ImageShape? shape = null)
    {
        var sh = shape ?? ImageShape.Mnist;
        int dims = sh.Channels == 1 ? 3 : 4, header = 4 + 4 * dims;
        long length = (long)n * sh.Length;
        var bytes = new byte[header + length];
        BinaryPrimitives.WriteInt32BigEndian(bytes, 0x00000800 | dims);
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4), n);
        int at = 8;
        if (dims == 4)
        {
            BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(at), sh.Channels);
            at += 4;
        }
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(at), sh.Side);
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(at + 4), sh.Side);
        for (long i = 0; i < length; i++)
        {
            bytes[header + i] = ToByte(digits[i]);
        }
        Durable.WriteAtomically(path, s => s.Write(bytes));
    }

    /// <summary>The loss curve: every step's loss, faint, and a moving average over <paramref name="window"/> steps.</summary>
    public static void SaveLossPlot(string path, IReadOnlyList<(long Step, double Loss)> points, int window = 50)
    {
        // A log-scale loss axis: the first hundred steps fall from ~1 to ~0.05 and a linear axis flattens everything after.
        // ScottPlot draws log10 of the values, with ticks at the decades labelled as the values they stand for.
        static double Log(double v) => Math.Log10(Math.Max(v, 1e-12));
        var plot = new ScottPlot.Plot();
        if (points.Count > 0)
        {
            double[] xs = points.Select(p => (double)p.Step).ToArray();
            double[] ys = points.Select(p => p.Loss).ToArray();
            var raw = plot.Add.ScatterLine(xs, ys.Select(Log).ToArray());
            raw.LineWidth = 1;
            raw.Color = ScottPlot.Colors.SteelBlue.WithAlpha(0.35);
            raw.LegendText = "loss";
            var smooth = new double[ys.Length];
            double sum = 0;
            for (int i = 0; i < ys.Length; i++)
            {
                sum += ys[i] - (i >= window ? ys[i - window] : 0);
                smooth[i] = sum / Math.Min(i + 1, window);
            }
            var avg = plot.Add.ScatterLine(xs, smooth.Select(Log).ToArray());
            avg.LineWidth = 2;
            avg.Color = ScottPlot.Colors.OrangeRed;
            avg.LegendText = $"mean of {window}";
            plot.ShowLegend(ScottPlot.Alignment.UpperRight);
        }
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
        {
            MinorTickGenerator = new ScottPlot.TickGenerators.LogMinorTickGenerator(),
            IntegerTicksOnly = true,
            LabelFormatter = y => Ddpm.Diffusion.Numbers.Human(Math.Pow(10, y)),
        };
        plot.Grid.MajorLineColor = ScottPlot.Colors.Black.WithOpacity(0.15);
        plot.Grid.MinorLineColor = ScottPlot.Colors.Black.WithOpacity(0.05);
        plot.Grid.MinorLineWidth = 1;
        plot.Title("training loss");
        plot.XLabel("step");
        plot.YLabel("MSE of predicted noise (log scale)");
        byte[] png = plot.GetImageBytes(800, 450, ScottPlot.ImageFormat.Png);
        Durable.WriteAtomically(path, s => s.Write(png));
    }
}
