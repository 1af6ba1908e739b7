using System.Buffers.Binary;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Gif;
using SixLabors.ImageSharp.PixelFormats;

namespace Ddpm.Cli;

/// <summary>What the CLI writes for people and other tools: digit grids (PNG), the reverse process
/// as an animated GIF (ImageSharp: SkiaSharp has no GIF encoder), the loss curve (ScottPlot),
/// and digits as an MNIST-format IDX file.</summary>
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
        int w = (cols * (Side + Gap) + Gap) * scale, h = (rows * (Side + Gap) + Gap) * scale;
        var image = new Image<L8>(w, h, new L8(0));
        image.ProcessPixelRows(pixels =>
        {
            for (int y = 0; y < h; y++)
            {
                var row = pixels.GetRowSpan(y);
                int gy = y / scale, r = gy / (Side + Gap), py = gy % (Side + Gap) - Gap;
                for (int x = 0; x < w; x++)
                {
                    int gx = x / scale, c = gx / (Side + Gap), px = gx % (Side + Gap) - Gap;
                    int k = r * cols + c;
                    if (py >= 0 && px >= 0 && k < n)
                    {
                        row[x] = new L8(ToByte(digits[k * Side * Side + py * Side + px]));
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
        image.SaveAsPng(path);
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
        animation.SaveAsGif(path);
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
        File.WriteAllBytes(path, bytes);
    }

    /// <summary>The loss curve: every step's loss, faint, and a moving average over <paramref name="window"/> steps.</summary>
    public static void SaveLossPlot(string path, IReadOnlyList<(long Step, double Loss)> points, int window = 50)
    {
        var plot = new ScottPlot.Plot();
        if (points.Count > 0)
        {
            double[] xs = points.Select(p => (double)p.Step).ToArray();
            double[] ys = points.Select(p => p.Loss).ToArray();
            var raw = plot.Add.ScatterLine(xs, ys);
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
            var avg = plot.Add.ScatterLine(xs, smooth);
            avg.LineWidth = 2;
            avg.Color = ScottPlot.Colors.OrangeRed;
            avg.LegendText = $"mean of {window}";
            plot.ShowLegend(ScottPlot.Alignment.UpperRight);
        }
        plot.Title("training loss");
        plot.XLabel("step");
        plot.YLabel("MSE of predicted noise");
        plot.SavePng(path, 800, 450);
    }
}
