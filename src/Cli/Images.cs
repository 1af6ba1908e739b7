using System.Buffers.Binary;
using Ddpm.Nn;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Gif;
using SixLabors.ImageSharp.PixelFormats;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>What the CLI writes for people and other tools: digit grids (PNG), the reverse process
/// as an animated GIF (ImageSharp: SkiaSharp has no GIF encoder), the loss curve (ScottPlot),
/// and digits as an MNIST-format IDX file. Every file is written atomically (<see cref="Durable.WriteAtomically"/>): a signal
/// or crash mid-write leaves the previous file whole, never a truncated one.</summary>
public static class Images
{
    private const int Side = 28, Gap = 2;

    /// <summary>Pixel value of a sample: clamp to [-1, 1], then round((x + 1)·127.5), as the spec.</summary>
    public static byte ToByte(float x) => (byte)Math.Round((Math.Clamp(float.IsNaN(x) ? -1f : x, -1f, 1f) + 1f) * 127.5f);

    /// <summary>n digits [n·784] as a grid of 28×28 tiles on black, scaled ×<paramref name="scale"/>: square-ish, or
    /// <paramref name="columns"/> a row when given (one row per class for a conditional model).</summary>
    public static Image<L8> Grid(float[] digits, int n, int scale = 2, int columns = 0)
    {
        int cols = columns > 0 ? columns : (int)Math.Ceiling(Math.Sqrt(n)), rows = (n + cols - 1) / cols;
        return Tiles(digits, rows, cols, scale, (r, c) => r * cols + c < n ? r * cols + c : -1, (_, v, _) => new L8(v), new L8(0));
    }

    /// <summary>
    /// Digits laid out by rows: row r holds the digits <paramref name="rows"/>[r] (indices into
    /// <paramref name="digits"/> [·784], at most <paramref name="columns"/> of them; the rest of the row stays black);
    /// tiles whose index <paramref name="marked"/> holds get a red frame over their outermost pixels.
    /// </summary>
    public static Image<Rgba32> RowGrid(float[] digits, IReadOnlyList<IReadOnlyList<int>> rows, int columns, Func<int, bool> marked, int scale = 2)
    {
        var red = new Rgba32(230, 40, 40);
        return Tiles(digits, rows.Count, columns, scale, (r, c) => c < rows[r].Count ? rows[r][c] : -1,
            (k, v, edge) => edge && marked(k) ? red : new Rgba32(v, v, v), new Rgba32(0, 0, 0));
    }

    /// <summary>Writes <see cref="RowGrid"/> as a PNG.</summary>
    public static void SaveRowGrid(string path, float[] digits, IReadOnlyList<IReadOnlyList<int>> rows, int columns, Func<int, bool> marked)
    {
        using var image = RowGrid(digits, rows, columns, marked);
        Durable.WriteAtomically(path, s => image.SaveAsPng(s));
    }

    // rows × cols tiles of 28×28 with Gap pixels around, scaled ×scale: tile (r, c) shows digit digitAt(r, c) (none
    // when -1), each pixel coloured by pixel(digit, byte value, on the tile's outermost ring).
    private static Image<TPixel> Tiles<TPixel>(float[] digits, int rows, int cols, int scale, Func<int, int, int> digitAt,
        Func<int, byte, bool, TPixel> pixel, TPixel background) where TPixel : unmanaged, IPixel<TPixel>
    {
        int w = (cols * (Side + Gap) + Gap) * scale, h = (rows * (Side + Gap) + Gap) * scale;
        var image = new Image<TPixel>(w, h, background);
        image.ProcessPixelRows(pixels =>
        {
            for (int y = 0; y < h; y++)
            {
                var row = pixels.GetRowSpan(y);
                int gy = y / scale, r = gy / (Side + Gap), py = gy % (Side + Gap) - Gap;
                for (int x = 0; x < w; x++)
                {
                    int gx = x / scale, c = gx / (Side + Gap), px = gx % (Side + Gap) - Gap;
                    if (py < 0 || px < 0 || r >= rows || c >= cols)
                    {
                        continue;
                    }
                    int k = digitAt(r, c);
                    if (k >= 0)
                    {
                        bool edge = py == 0 || px == 0 || py == Side - 1 || px == Side - 1;
                        row[x] = pixel(k, ToByte(digits[k * Side * Side + py * Side + px]), edge);
                    }
                }
            }
        });
        return image;
    }

    /// <summary>Writes the grid as a PNG.</summary>
    public static void SaveGrid(string path, float[] digits, int n, int columns = 0)
    {
        using var image = Grid(digits, n, columns: columns);
        Durable.WriteAtomically(path, s => image.SaveAsPng(s));
    }

    /// <summary>Writes frames (each n digits) as a looping GIF; the last frame holds for two seconds.</summary>
    public static void SaveAnimation(string path, IReadOnlyList<float[]> frames, int n, int columns = 0)
    {
        using var first = Grid(frames[0], n, columns: columns);
        using var animation = first.CloneAs<Rgba32>();
        var meta = animation.Metadata.GetGifMetadata();
        meta.RepeatCount = 0;
        animation.Frames.RootFrame.Metadata.GetGifMetadata().FrameDelay = 8;
        for (int i = 1; i < frames.Count; i++)
        {
            using var grid = Grid(frames[i], n, columns: columns);
            using var frame = grid.CloneAs<Rgba32>();
            var added = animation.Frames.AddFrame(frame.Frames.RootFrame);
            added.Metadata.GetGifMetadata().FrameDelay = i == frames.Count - 1 ? 200 : 8;
        }
        Durable.WriteAtomically(path, s => animation.SaveAsGif(s));
    }

    /// <summary>Digits as an IDX3 file of unsigned bytes (magic 0x00000803, n × 28 × 28), as MNIST's own files.</summary>
    public static void SaveIdx(string path, float[] digits, int n)
    {
        var bytes = new byte[16 + n * Side * Side];
        BinaryPrimitives.WriteInt32BigEndian(bytes, 0x00000803);
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4), n);
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(8), Side);
        BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(12), Side);
        for (int i = 0; i < n * Side * Side; i++)
        {
            bytes[16 + i] = ToByte(digits[i]);
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
