// The three convolution passes as implicit GEMMs on the tiled core (TiledGemm.cs: 64 x 128 tiles, 128 threads,
// 8 x 8 register tiles, K step 16). Letters as in ConvShape: x [N, C, H, W], w [K, C, R, S], y [N, K, P, Q];
// RS = R·S, PQ = P·Q, HW = H·W.
//   forward:         y[n, k, pq]  = Σ_{crs} w[k, crs] · col(x[n])[crs, pq] + b[k] (+ e[n, k]) (+ residual)
//                    M = K, Cols = N·PQ, Kd = C·RS; the bias, the time-embedding channel bias and the residual in the
//                    epilogue. K is split (AcrossSplits) where the output tiles alone would leave the chip short of a
//                    wave (the 7x7 layers at the base preset), finished as the weight gradient's is.
//   input gradient:  dx[n, c, hw] (+)= Σ_{k, rs} w[k, c, rs] · dy[n, k, p, q] for the (p, q) tap (r, s) of (h, w) reads
//                    M = C, Cols = N·HW, Kd = K·RS; at stride 2 three in four B entries are structural zeros (a
//                    phase split as on the CPU path would skip them: a next step, see docs/gpu.md).
//   weight gradient: dw[k, crs] += Σ_{n, pq} dy[n, k, pq] · col(x[n])[crs, pq], and db[k] += Σ_{n, pq} dy[n, k, pq]
//                    M = K, Cols = C·RS, Kd = N·PQ: a long K and a small output, so K is split (grid depth) into
//                    partials [splits, K, C·RS]; the last group of each tile to finish sums them in split order in the
//                    same launch and adds them to dw (TiledGemm.FinishSplits): reruns are bit-identical. The bias gradient is the row sums
//                    of A = dy, taken by the first column tile's groups on the way through shared memory.
// B (x or dy) is gathered through taps (ITileOperands.Tapped): a pixel's base and mask of in-bounds taps, a tap's
// offset and bits, so an element is an add, a mask test and a load; IndexB says the same the plain way (the simulator's
// small-group path, and the test that holds the two together). Decoding divides by runtime sizes through FastDiv.
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>Convolution forward as a tiled implicit GEMM: A = w [K, C·R·S], B = col(x) [C·R·S, N·P·Q];
/// e0 = b [K], e1 = channel bias [N, K] (when <see cref="TileArgs.HasChannelBias"/>), e2 = a residual shaped as y (when
/// <see cref="TileArgs.HasResidual"/>: a ResBlock's skip path, added on the way out).</summary>
public struct ConvForwardTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => false;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Kd);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd) => new(kd);

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather row, Gather k) => row.Base + k.Base;

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => ConvTaps.OutputPixel(t, col);

    /// <inheritdoc/>
    public static Gather KOfB(TileArgs t, int kd) => ConvTaps.Tap(t, kd);

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather pixel, Gather tap) => ConvTaps.Input(t, pixel, tap);

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => false;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <inheritdoc/>
    public static int ChannelStride(TileArgs t) => 0;

    /// <inheritdoc/>
    public static bool RowSummed => false;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => PixelOfB(t, kd);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => 0;

    /// <summary>Output pixel col's window: <see cref="ConvTaps.Window"/>.</summary>
    public static TapPixel PixelOfB(TileArgs t, int col) => ConvTaps.Window(t, col);

    /// <summary>kd = (c, r, s): <see cref="ConvTaps.InputTap"/>.</summary>
    public static Tap TapOfB(TileArgs t, int kd) => ConvTaps.InputTap(t, kd);

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> y, ArrayView<float> b, ArrayView<float> e, ArrayView<float> residual, int m, int col,
        float acc)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(col), j = col - n * pq, i = (n * g.K + m) * pq + j;
        float v = acc + b[m];
        if (t.HasChannelBias != 0)
        {
            v += e[n * g.K + m];
        }
        if (t.HasResidual != 0)
        {
            v += residual[i];
        }
        y[i] = v;
    }
}

/// <summary>
/// The forward with K steps of one tap (<see cref="ITileOperands.TapSteps"/>; C a multiple of 16): kd = tap·C + c, A = w
/// permuted to [K][R·S][C] (<see cref="TiledConv.PermuteWeightsKernel"/>), B = col(x) in the same order; the rest is
/// <see cref="ConvForwardTile"/>'s.
/// </summary>
public struct ConvForwardTapTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => false;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Kd);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd) => new(kd);

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather row, Gather k) => row.Base + k.Base;

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => ConvTaps.OutputPixel(t, col);

    /// <inheritdoc/>
    public static Gather KOfB(TileArgs t, int kd) => ConvTaps.Tap(t, ConvTaps.ChannelMajor(t, kd));

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather pixel, Gather tap) => ConvTaps.Input(t, pixel, tap);

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => true;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <summary>x's channels are H·W apart.</summary>
    public static int ChannelStride(TileArgs t) => t.Conv.H * t.Conv.W;

    /// <inheritdoc/>
    public static bool RowSummed => false;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => PixelOfB(t, kd);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => 0;

    /// <inheritdoc/>
    public static TapPixel PixelOfB(TileArgs t, int col) => ConvTaps.Window(t, col);

    /// <inheritdoc/>
    public static Tap TapOfB(TileArgs t, int kd) => ConvTaps.InputTap(t, ConvTaps.ChannelMajor(t, kd));

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> y, ArrayView<float> b, ArrayView<float> e, ArrayView<float> residual, int m, int col,
        float acc) => ConvForwardTile.Store(t, y, b, e, residual, m, col, acc);
}

/// <summary>Convolution input gradient as a tiled implicit GEMM: A(c, (k, rs)) = w[k, c, rs], B((k, rs), (n, hw)) =
/// dy at the output position whose tap (r, s) reads (h, w), or 0.</summary>
public struct ConvInputTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => false;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Conv.R * t.Conv.S);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd)
    {
        var g = t.Conv;
        int rs = g.R * g.S, k = t.Div.Rs.Div(kd);
        return new(k * g.C * rs + (kd - k * rs));
    }

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather channel, Gather k) => channel.Base + k.Base;

    /// <summary>Input pixel col = (n, h, w): the image's offset in dy, and (h + pad, w + pad).</summary>
    public static Gather ColumnOfB(TileArgs t, int col)
    {
        var g = t.Conv;
        int hw = g.H * g.W, n = t.Div.Hw.Div(col), j = col - n * hw, h = t.Div.W.Div(j);
        return new(n * g.K * g.P * g.Q, h + g.Pad, j - h * g.W + g.Pad);
    }

    /// <summary>kd = (k, r, s): output channel k's offset in an image of dy, and the tap (r, s).</summary>
    public static Gather KOfB(TileArgs t, int kd)
    {
        var g = t.Conv;
        int rs = g.R * g.S, k = t.Div.Rs.Div(kd), tap = kd - k * rs, r = t.Div.S.Div(tap);
        return new(k * g.P * g.Q, r, tap - r * g.S);
    }

    /// <summary>dy[n, k, p, q] where (p, q)·stride + (r, s) = (h, w) + pad, -1 where no output pixel reads (h, w) through
    /// tap (r, s).</summary>
    public static int IndexB(TileArgs t, Gather pixel, Gather tap)
    {
        var g = t.Conv;
        // FastDiv takes no negative numbers: a negative ph or pw divides 0 and fails the test below.
        int ph = pixel.Y - tap.Y, pw = pixel.X - tap.X;
        int p = t.Div.Stride.Div(Math.Max(ph, 0)), q = t.Div.Stride.Div(Math.Max(pw, 0));
        bool reads = (ph >= 0) & (pw >= 0) & (p * g.Stride == ph) & (q * g.Stride == pw) & (p < g.P) & (q < g.Q);
        return reads ? pixel.Base + tap.Base + p * g.Q + q : -1;
    }

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => false;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <inheritdoc/>
    public static int ChannelStride(TileArgs t) => 0;

    /// <inheritdoc/>
    public static bool RowSummed => false;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => PixelOfB(t, kd);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => 0;

    /// <summary>Input pixel col = (n, h, w): base dy[n, 0, ⌊(h + pad) / stride⌋, ⌊(w + pad) / stride⌋] less
    /// <see cref="Reach"/>; the taps (r, s) that read it are those whose (h + pad - r, w + pad - s) is a multiple of the
    /// stride inside [0, P·stride) x [0, Q·stride).</summary>
    public static TapPixel PixelOfB(TileArgs t, int col)
    {
        var g = t.Conv;
        int hw = g.H * g.W, n = t.Div.Hw.Div(col), j = col - n * hw, h = t.Div.W.Div(j), hp = h + g.Pad, wp = j - h * g.W + g.Pad;
        return new(n * g.K * g.P * g.Q + t.Div.Stride.Div(hp) * g.Q + t.Div.Stride.Div(wp) - Reach(t),
            Taps.Mask(Reached(t, hp, g.R, g.P), Reached(t, wp, g.S, g.Q)));
    }

    /// <summary>kd = (k, r, s): dy's channel k, less (⌊r / stride⌋, ⌊s / stride⌋), plus <see cref="Reach"/>: for a tap
    /// whose stride phase matches the pixel's, (h + pad - r) / stride = ⌊(h + pad) / stride⌋ - ⌊r / stride⌋.</summary>
    public static Tap TapOfB(TileArgs t, int kd)
    {
        var g = t.Conv;
        int rs = g.R * g.S, k = t.Div.Rs.Div(kd), tap = kd - k * rs, r = t.Div.S.Div(tap), s = tap - r * g.S;
        return new(k * g.P * g.Q - t.Div.Stride.Div(r) * g.Q - t.Div.Stride.Div(s) + Reach(t), Taps.Bits(r, s));
    }

    /// <summary>⌊(R - 1) / stride⌋·Q + ⌊(S - 1) / stride⌋, the most a tap reaches back from its pixel: taken from every pixel's
    /// base and added to every tap's delta, so that no delta is negative (<see cref="ITileOperands.TapOfB"/>).</summary>
    private static int Reach(TileArgs t)
    {
        var g = t.Conv;
        return t.Div.Stride.Div(g.R - 1) * g.Q + t.Div.Stride.Div(g.S - 1);
    }

    /// <summary>The taps 0 .. size - 1 that reach padded coordinate <paramref name="padded"/> from an output coordinate
    /// in [0, outputs): padded - tap a non-negative multiple of the stride, below outputs·stride. A loop, once a launch.</summary>
    private static int Reached(TileArgs t, int padded, int size, int outputs)
    {
        int bits = 0;
        for (int tap = 0; tap < size; tap++)
        {
            int d = padded - tap, o = t.Div.Stride.Div(Math.Max(d, 0));
            bits |= (d >= 0) & (o * t.Conv.Stride == d) & (o < outputs) ? 1 << tap : 0;
        }
        return bits;
    }

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> dx, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int m, int col,
        float acc)
    {
        var g = t.Conv;
        int hw = g.H * g.W, n = t.Div.Hw.Div(col), i = (n * g.C + m) * hw + (col - n * hw);
        dx[i] = t.Accumulate != 0 ? dx[i] + acc : acc;
    }
}

/// <summary>
/// The input gradient with K steps of one tap (<see cref="ITileOperands.TapSteps"/>; K a multiple of 16): kd = tap·K + k,
/// A = w permuted to [C][R·S][K] (<see cref="TiledConv.PermuteWeightsKernel"/>), B = dy gathered in the
/// same order; the rest is <see cref="ConvInputTile"/>'s.
/// </summary>
public struct ConvInputTapTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => false;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Kd);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd) => new(kd);

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather row, Gather k) => row.Base + k.Base;

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => ConvInputTile.ColumnOfB(t, col);

    /// <inheritdoc/>
    public static Gather KOfB(TileArgs t, int kd) => ConvInputTile.KOfB(t, ChannelMajor(t, kd));

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather pixel, Gather tap) => ConvInputTile.IndexB(t, pixel, tap);

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => true;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <summary>dy's channels are P·Q apart.</summary>
    public static int ChannelStride(TileArgs t) => t.Conv.P * t.Conv.Q;

    /// <inheritdoc/>
    public static bool RowSummed => false;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => PixelOfB(t, kd);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => 0;

    /// <inheritdoc/>
    public static TapPixel PixelOfB(TileArgs t, int col) => ConvInputTile.PixelOfB(t, col);

    /// <inheritdoc/>
    public static Tap TapOfB(TileArgs t, int kd) => ConvInputTile.TapOfB(t, ChannelMajor(t, kd));

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> dx, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int m, int col,
        float acc) => ConvInputTile.Store(t, dx, e0, e1, e2, m, col, acc);

    /// <summary>kd = tap·K + k as <see cref="ConvInputTile"/>'s order, k·R·S + tap.</summary>
    private static int ChannelMajor(TileArgs t, int kd)
    {
        int tap = t.Div.K.Div(kd);
        return (kd - tap * t.Conv.K) * t.Conv.R * t.Conv.S + tap;
    }
}

/// <summary>Convolution weight gradient as a tiled implicit GEMM: A(k, (n, pq)) = dy[n, k, pq], B((n, pq), crs) =
/// col(x[n])[crs, pq], added into dw [K, C·R·S] (with splits, by the last group of each tile, in split order). With
/// <see cref="TileArgs.RowSums"/> the bias gradient Σ dy goes to e1 = db.</summary>
public struct ConvWeightTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => new(m * t.Conv.P * t.Conv.Q);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(kd);
        return new(n * g.K * pq + (kd - n * pq));
    }

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather channel, Gather k) => channel.Base + k.Base;

    /// <summary>Column crs = (c, r, s): channel c's offset in an image of x, and (r - pad, s - pad).</summary>
    public static Gather ColumnOfB(TileArgs t, int col)
    {
        var g = t.Conv;
        var tap = ConvTaps.Tap(t, col);
        return new(tap.Base, tap.Y - g.Pad, tap.X - g.Pad);
    }

    /// <summary>kd = (n, p, q): image n's offset in x, and (p·stride, q·stride).</summary>
    public static Gather KOfB(TileArgs t, int kd)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(kd), j = kd - n * pq, p = t.Div.Q.Div(j);
        return new(n * g.C * g.H * g.W, p * g.Stride, (j - p * g.Q) * g.Stride);
    }

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather tap, Gather pixel) => ConvTaps.Input(t, pixel, tap);

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => false;

    /// <inheritdoc/>
    public static bool TapColumns => false;

    /// <inheritdoc/>
    public static int ChannelStride(TileArgs t) => 0;

    /// <inheritdoc/>
    public static bool RowSummed => true;

    /// <summary>kd = (n, p, q): (p, q)'s window from the table of the first image's (<see cref="ConvTaps.Window"/>), moved to
    /// image n.</summary>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(kd);
        var window = pixels[kd - n * pq];
        return new(n * g.C * g.H * g.W + window.Delta, window.Bits);
    }

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => t.Conv.P * t.Conv.Q;

    /// <summary>kd = (n, p, q), an output pixel: its window (<see cref="ConvTaps.Window"/>).</summary>
    public static TapPixel PixelOfB(TileArgs t, int kd) => ConvTaps.Window(t, kd);

    /// <summary>Column crs = (c, r, s): <see cref="ConvTaps.InputTap"/>.</summary>
    public static Tap TapOfB(TileArgs t, int col) => ConvTaps.InputTap(t, col);

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int m, int col,
        float acc)
    {
        int i = m * t.Cols + col;
        c[i] = t.Accumulate != 0 ? c[i] + acc : acc;
    }
}

/// <summary>
/// The weight gradient with its columns tap-major (<see cref="ITileOperands.TapColumns"/>; C a multiple of 64): column
/// tap·C + c, so each half of a thread's 16 columns along K (line + 8·j, j &lt; 8, and the 64 after) is one tap's 8
/// channels, 8 apart: one tap test a half and loads chained by 8·H·W (docs/gpu.md, "The weight gradient in K steps of a
/// tap's channels"). dw is written in its own order, [K][C][R·S], by the epilogue; the rest is <see cref="ConvWeightTile"/>'s.
/// </summary>
public struct ConvWeightTapTile : ITileOperands
{
    /// <inheritdoc/>
    public static bool AAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static bool BAlongK(TileArgs t) => true;

    /// <inheritdoc/>
    public static Gather RowOfA(TileArgs t, int m) => ConvWeightTile.RowOfA(t, m);

    /// <inheritdoc/>
    public static Gather KOfA(TileArgs t, int kd) => ConvWeightTile.KOfA(t, kd);

    /// <inheritdoc/>
    public static int IndexA(TileArgs t, Gather channel, Gather k) => ConvWeightTile.IndexA(t, channel, k);

    /// <inheritdoc/>
    public static Gather ColumnOfB(TileArgs t, int col) => ConvWeightTile.ColumnOfB(t, ConvTaps.ChannelMajor(t, col));

    /// <inheritdoc/>
    public static Gather KOfB(TileArgs t, int kd) => ConvWeightTile.KOfB(t, kd);

    /// <inheritdoc/>
    public static int IndexB(TileArgs t, Gather tap, Gather pixel) => ConvWeightTile.IndexB(t, tap, pixel);

    /// <inheritdoc/>
    public static bool Tapped => true;

    /// <inheritdoc/>
    public static bool TapSteps => false;

    /// <inheritdoc/>
    public static bool TapColumns => true;

    /// <summary>x's channels are H·W apart.</summary>
    public static int ChannelStride(TileArgs t) => t.Conv.H * t.Conv.W;

    /// <inheritdoc/>
    public static bool RowSummed => true;

    /// <inheritdoc/>
    public static TapPixel PixelOfBFromTable(TileArgs t, int kd, ArrayView<Tap> pixels) => ConvWeightTile.PixelOfBFromTable(t, kd, pixels);

    /// <inheritdoc/>
    public static int PixelsPerImage(TileArgs t) => ConvWeightTile.PixelsPerImage(t);

    /// <inheritdoc/>
    public static TapPixel PixelOfB(TileArgs t, int kd) => ConvWeightTile.PixelOfB(t, kd);

    /// <summary>Column tap·C + c: <see cref="ConvTaps.InputTap"/> of (c, tap).</summary>
    public static Tap TapOfB(TileArgs t, int col) => ConvTaps.InputTap(t, ConvTaps.ChannelMajor(t, col));

    /// <inheritdoc/>
    public static void Store(TileArgs t, ArrayView<float> c, ArrayView<float> e0, ArrayView<float> e1, ArrayView<float> e2, int m, int col,
        float acc) => ConvWeightTile.Store(t, c, e0, e1, e2, m, ConvTaps.ChannelMajor(t, col), acc);
}

/// <summary>Index arithmetic the convolution gathers share.</summary>
internal static class ConvTaps
{
    /// <summary>Index tap·C + c (the forward's kd in K steps of one tap, the weight gradient's tap-major column) as w's own
    /// order over (c, r, s), c·R·S + tap.</summary>
    public static int ChannelMajor(TileArgs t, int i)
    {
        int tap = t.Div.C.Div(i);
        return (i - tap * t.Conv.C) * t.Conv.R * t.Conv.S + tap;
    }

    /// <summary>Output pixel col = (n, p, q) of a convolution: the image's offset in x, and the top-left input pixel of
    /// its window, (p·stride - pad, q·stride - pad).</summary>
    public static Gather OutputPixel(TileArgs t, int col)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(col), j = col - n * pq, p = t.Div.Q.Div(j);
        return new(n * g.C * g.H * g.W, p * g.Stride - g.Pad, (j - p * g.Q) * g.Stride - g.Pad);
    }

    /// <summary>Tap crs = (c, r, s): channel c's offset in an image of x, and (r, s).</summary>
    public static Gather Tap(TileArgs t, int crs)
    {
        var g = t.Conv;
        int rs = g.R * g.S, c = t.Div.Rs.Div(crs), tap = crs - c * rs, r = t.Div.S.Div(tap);
        return new(c * g.H * g.W, r, tap - r * g.S);
    }

    /// <summary>Output pixel i = (n, p, q)'s window in x: base x[n, 0, p·stride - pad, q·stride - pad] (negative in the
    /// padding: only a tap inside adds to it), and the taps (r, s) whose row and column fall inside the image.</summary>
    public static TapPixel Window(TileArgs t, int i)
    {
        var g = t.Conv;
        int pq = g.P * g.Q, n = t.Div.Pq.Div(i), j = i - n * pq, p = t.Div.Q.Div(j);
        int y0 = p * g.Stride - g.Pad, x0 = (j - p * g.Q) * g.Stride - g.Pad;
        return new(n * g.C * g.H * g.W + y0 * g.W + x0, Taps.Mask(Taps.Inside(y0, g.R, g.H), Taps.Inside(x0, g.S, g.W)));
    }

    /// <summary>Tap crs = (c, r, s) of a window in x: c·H·W + r·W + s.</summary>
    public static Tap InputTap(TileArgs t, int crs)
    {
        var g = t.Conv;
        int rs = g.R * g.S, c = t.Div.Rs.Div(crs), tap = crs - c * rs, r = t.Div.S.Div(tap), s = tap - r * g.S;
        return new(c * g.H * g.W + r * g.W + s, Taps.Bits(r, s));
    }

    /// <summary>The index of x[n, c, h, w] at (h, w) = the window's corner + the tap: the sum of a pixel part (the image's
    /// offset and the corner, <see cref="OutputPixel"/>) and a tap part (the channel's offset and (r, s), <see cref="Tap"/>);
    /// -1 in the padding.</summary>
    public static int Input(TileArgs t, Gather pixel, Gather tap)
    {
        var g = t.Conv;
        int h = pixel.Y + tap.Y, w = pixel.X + tap.X;
        return ((uint)h < (uint)g.H) & ((uint)w < (uint)g.W) ? pixel.Base + tap.Base + h * g.W + w : -1;
    }
}

/// <summary>Host side of the tiled convolutions: argument set-up, split choice, launches.</summary>
internal static class TiledConv
{
    /// <summary>Output groups the weight gradient aims for: one wave of an H100 SXM's 132 SMs at the GPU kernel's launch
    /// bounds (<see cref="TiledGemm.MinGroupsPerSm"/> groups an SM), over the tiles and splits. A constant, not the
    /// device's count: the split is a function of the shape alone, so every device sums in one order (docs/gpu.md: the
    /// cost on a 114-SM H100 PCIe).</summary>
    public const int TargetGroups = 132 * TiledGemm.MinGroupsPerSm;

    /// <summary>The K range one split of the weight gradient covers at least: 16 K steps, so the partials' write and read
    /// stay small beside the product (512 FLOP an output for its 8 bytes, as the forward's splits). At 32 the layers with
    /// few output tiles (the 1x1 and stride-2 ones at base) filled 48-245 of a wave's 396 groups: 16 takes 0.08 ms off the
    /// fp32 train step by the compiler-derived prediction, 0.03 off 3xTF32's, and leaves TF32's as it was.</summary>
    private const int MinChunk = 16 * TiledGemm.TK;

    /// <summary>The K range one split of the forward or the input gradient covers at least: 16 K steps, 512 FLOP an output
    /// for the 8 bytes its partial is written and read in, so a split stays compute-bound on an H100 (25 FLOP a byte of
    /// HBM at fp32's peak, 74 at TF32's).</summary>
    private const int MinAcrossChunk = 16 * TiledGemm.TK;

    /// <summary>Cap on the partials buffer (floats): 8 M = 32 MB.</summary>
    private const long MaxPartials = 8L << 20;

    /// <summary>True when the tiled kernels take <paramref name="g"/>: kernels up to <see cref="Taps.MaxKernel"/> wide and high
    /// (a tap's row and column are bits of a mask); larger ones run the simple twins.</summary>
    public static bool Takes(ConvShape g) => g.R <= Taps.MaxKernel && g.S <= Taps.MaxKernel;

    /// <summary>Refuses a geometry the tiled kernels do not take: its taps' bits would collide and read wrong.</summary>
    private static void Require(ConvShape g)
    {
        if (!Takes(g))
        {
            throw new ArgumentException($"tiled conv2d: a {g.R}x{g.S} kernel is over {Taps.MaxKernel}x{Taps.MaxKernel}; the simple kernels take it");
        }
    }

    /// <summary>
    /// The split count of a forward or input-gradient product (M x Cols output, Kd long): 1 where its output tiles fill a
    /// wave of <see cref="TargetGroups"/> by themselves; else as many as fill the wave, each at least
    /// <see cref="MinAcrossChunk"/> long, the partials at most <see cref="MaxPartials"/>. A function of the shape only, so
    /// every device sums in the same order.
    /// </summary>
    public static int AcrossSplits(long m, long cols, long kd)
    {
        long tiles = (m + TiledGemm.TM - 1) / TiledGemm.TM * ((cols + TiledGemm.TN - 1) / TiledGemm.TN);
        long splits = Math.Min(TargetGroups / Math.Max(tiles, 1), Math.Max(1, kd / MinAcrossChunk));
        splits = Math.Min(splits, Math.Max(1, MaxPartials / Math.Max(m * cols, 1)));
        return (int)Math.Max(1, splits);
    }

    /// <summary>The forward's split count (<see cref="AcrossSplits"/>).</summary>
    public static int ForwardSplits(ConvShape g) => AcrossSplits(g.K, (long)g.N * g.Pq, g.Crs);

    /// <summary>The input gradient's split count (<see cref="AcrossSplits"/>).</summary>
    public static int InputSplits(ConvShape g) => AcrossSplits(g.C, (long)g.N * g.H * g.W, (long)g.K * g.R * g.S);

    /// <summary>The K range of each of <paramref name="splits"/> splits of <paramref name="kd"/>: a whole number of K steps.</summary>
    private static int Chunk(int kd, int splits) => TileArgs.RoundUp((Math.Max(kd, 1) + splits - 1) / splits, TiledGemm.TK);

    /// <summary>y = conv(x, w) + b (+ e[n, k]) (+ residual), K split <paramref name="splits"/> ways (0: <see cref="ForwardSplits"/>).
    /// One output channel (<see cref="SingleChannel"/>, the model's last convolution) runs <see cref="SingleChannelForwardKernel"/>
    /// unless <paramref name="tiled"/>.</summary>
    public static void Forward(IlgpuKernels k, ConvShape g, ArrayView<float> x, ArrayView<float> w, ArrayView<float> b, ArrayView<float> y,
        ArrayView<float>? channelBias, ArrayView<float>? residual = null, int splits = 0, bool tiled = false, ArrayView<float>? held = null)
    {
        Require(g);
        if (SingleChannel(g) && !tiled)
        {
            var whole = new TileArgs(g.K, g.N * g.Pq, g.Crs, 0, accumulate: false, channelBias is not null, g, default, residual: residual is not null);
            if (whole.Cols > 0)
            {
                k.Conv2d.SingleChannelForward(k.Stream, whole.Cols, x, w, b, channelBias ?? b, residual ?? b, y, k.TapTable<ConvForwardTile>(whole), whole);
            }
            return;
        }
        int chunk = Chunk(g.Crs, splits > 0 ? splits : ForwardSplits(g));
        var t = new TileArgs(g.K, g.N * g.Pq, g.Crs, chunk, accumulate: false, channelBias is not null, g, default, residual: residual is not null);
        if (!ByTaps(g.C) || !k.Conv2d.TiledForwardByTap.Runs)
        {
            TiledGemm.Launch<ConvForwardTile>(k, k.Conv2d.TiledForward.For(), t, w, x, y, b, channelBias ?? b, residual ?? b);
            return;
        }
        // w [K][C][R·S] as [K][R·S][C]: kd = tap·C + c; held (HeldConvWeights) or permuted here (freed once queued, as the
        // partials are).
        using var permuted = HeldOrPermuted(k, g, w, held, input: false, out var a);
        TiledGemm.Launch<ConvForwardTapTile>(k, k.Conv2d.TiledForwardByTap.For(), t, a, x, y, b, channelBias ?? b, residual ?? b);
    }

    /// <summary>True when a convolution pass whose K runs over <paramref name="channels"/> (the forward's C, the input
    /// gradient's K) and the taps takes K steps of one tap (<see cref="ConvForwardTapTile"/>, <see cref="ConvInputTapTile"/>):
    /// a whole number of K steps of channels (in strict fp32 and TF32; 3xTF32 keeps the channel-major ops).</summary>
    public static bool ByTaps(int channels) => channels % TiledGemm.TK == 0;

    /// <summary>The A operand of a pass in K steps of one tap (<paramref name="a"/>): the <paramref name="held"/> copy, or
    /// else w permuted now into a scratch tensor, returned for the caller to free once the product is queued (the
    /// forward's [K][R·S][C], or with <paramref name="input"/> the input gradient's [C][R·S][K]): <see cref="PermuteWeightsKernel"/>
    /// with a table of one segment, the same permutation a hold makes of every weight at once.</summary>
    private static Tensor? HeldOrPermuted(IlgpuKernels k, ConvShape g, ArrayView<float> w, ArrayView<float>? held, bool input, out ArrayView<float> a)
    {
        if (held is { } copy)
        {
            a = copy;
            return null;
        }
        var permuted = k.Scratch(g.K * g.Crs);
        a = permuted.View;
        if ((long)g.K * g.Crs > 0)
        {
            var segment = k.SegmentTable([0, 0, g.K, g.C, g.R * g.S, input ? -1 : 0, input ? 0 : -1]);
            k.Conv2d.PermuteWeights(k.Stream, g.K * g.Crs, w, segment, 1, a, a);
        }
        return permuted;
    }

    /// <summary>
    /// The weights' permutation for the K steps of one tap: every held weight in one launch (<see cref="HeldConvWeights"/>),
    /// or one weight at its call (<see cref="HeldOrPermuted"/>). Element i of the launch is in the segment whose first
    /// element is the last at or below i, found by bisection (6 table loads at base, not up to 40), in a table of
    /// <see cref="HeldConvWeights.SegmentInts"/> ints a weight (first, offset in src, K, C, R·S, forward copy, input-gradient
    /// copy); w[k][c][tap] there is written to the
    /// forward's copy at (k·R·S + tap)·C + c and the input gradient's at (c·R·S + tap)·K + k (where each is held).
    /// </summary>
    internal static void PermuteWeightsKernel(Index1D i, ArrayView<float> src, ArrayView<int> table, int segments, ArrayView<float> forward,
        ArrayView<float> input)
    {
        int s = 0, hi = segments - 1; // a binary search: the last segment whose first element is at or below i
        while (s < hi)
        {
            int mid = (s + hi + 1) >> 1;
            if (table[mid * HeldConvWeights.SegmentInts] <= i)
            {
                s = mid;
            }
            else
            {
                hi = mid - 1;
            }
        }
        int at = s * HeldConvWeights.SegmentInts, local = i - table[at];
        int k = table[at + 2], c = table[at + 3], rs = table[at + 4], toForward = table[at + 5], toInput = table[at + 6];
        int crs = c * rs, kk = local / crs, rest = local - kk * crs, ci = rest / rs, tap = rest - ci * rs;
        float v = src[table[at + 1] + local];
        if (toForward >= 0)
        {
            forward[toForward + (kk * rs + tap) * c + ci] = v;
        }
        if (toInput >= 0)
        {
            input[toInput + (ci * rs + tap) * k + kk] = v;
        }
    }

    /// <summary>True for a forward with one output channel: a 64-row tile would compute 63 rows of nothing (docs/gpu.md,
    /// "conv_out"), so it runs one thread an output pixel instead.</summary>
    public static bool SingleChannel(ConvShape g) => g.K == 1;

    /// <summary>
    /// The forward of a convolution with one output channel (conv_out: 64 channels to the predicted noise), in strict fp32
    /// whatever the math mode: thread i computes output pixel i = (n, p, q) through the forward's own gathers, its window's
    /// view (<see cref="TiledGemm.PixelView"/>) and the host's tap table (one broadcast load a tap, shared by the warp, as is
    /// the weight), and writes it through <see cref="ConvForwardTile.Store"/>'s epilogue. Summed in kd order.
    /// </summary>
    internal static void SingleChannelForwardKernel(Index1D i, ArrayView<float> x, ArrayView<float> w, ArrayView<float> b, ArrayView<float> e,
        ArrayView<float> residual, ArrayView<float> y, ArrayView<Tap> taps, TileArgs t)
    {
        var at = new TiledGemm.PixelView(x, ConvTaps.Window(t, i));
        float acc = 0;
        for (int kd = 0; kd < t.Kd; kd++)
        {
            acc += w[kd] * at.Tapped(taps[kd]);
        }
        ConvForwardTile.Store(t, y, b, e, residual, 0, i, acc);
    }

    /// <summary>dx (+)= conv_transpose(dy, w); with <paramref name="accumulate"/> false dx is only written. K split
    /// <paramref name="splits"/> ways (0: <see cref="InputSplits"/>).</summary>
    public static void BackwardInput(IlgpuKernels k, ConvShape g, ArrayView<float> dy, ArrayView<float> w, ArrayView<float> dx, bool accumulate,
        int splits = 0, ArrayView<float>? held = null)
    {
        Require(g);
        int kd = g.K * g.R * g.S, chunk = Chunk(kd, splits > 0 ? splits : InputSplits(g));
        var t = new TileArgs(g.C, g.N * g.H * g.W, kd, chunk, accumulate, false, g, default);
        if (!ByTaps(g.K) || !k.Conv2d.TiledInputByTap.Runs)
        {
            TiledGemm.Launch<ConvInputTile>(k, k.Conv2d.TiledInput.For(), t, w, dy, dx, dx, dx, dx);
            return;
        }
        // w [K][C·R·S] as [C·R·S][K] = [C][R·S][K]: kd = tap·K + k; held or permuted here.
        using var permuted = HeldOrPermuted(k, g, w, held, input: true, out var a);
        TiledGemm.Launch<ConvInputTapTile>(k, k.Conv2d.TiledInputByTap.For(), t, a, dy, dx, dx, dx, dx);
    }

    /// <summary>The split count of the weight gradient: a function of the shape only, so every device sums in the same order.</summary>
    public static int WeightSplits(ConvShape g)
    {
        int kd = g.N * g.Pq;
        long tiles = (long)((g.K + TiledGemm.TM - 1) / TiledGemm.TM) * ((g.Crs + TiledGemm.TN - 1) / TiledGemm.TN);
        // At most one wave of TargetGroups: a 10% overshoot would cost a second, nearly empty wave.
        long splits = Math.Min(TargetGroups / tiles, Math.Max(1, kd / MinChunk));
        splits = Math.Min(splits, Math.Max(1, MaxPartials / ((long)g.K * g.Crs)));
        return (int)Math.Max(1, splits);
    }

    /// <summary>dw += Σ_n dy[n] ⋆ x[n] and, when <paramref name="db"/> is given, db += Σ dy over every axis but the
    /// channel: one launch, K split <paramref name="splits"/> ways (0: <see cref="WeightSplits"/>). A narrow one
    /// (<see cref="NarrowWeight"/>: one input or one output channel) runs <see cref="NarrowWeightKernel"/> unless
    /// <paramref name="tiled"/>, its pixels split <paramref name="splits"/> ways (0: <see cref="NarrowSplits"/>).</summary>
    public static void BackwardWeight(IlgpuKernels k, ConvShape g, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> dw,
        ArrayView<float>? db = null, int splits = 0, bool tiled = false)
    {
        Require(g);
        int kd = g.N * g.Pq;
        int threads = TiledReduce.Threads(k.Accelerator);
        if (NarrowWeight(g) && !tiled && threads >= NarrowSums)
        {
            if (kd == 0 || g.Crs == 0)
            {
                return;
            }
            var narrow = new TileArgs(g.K * g.C, g.Crs, kd, Chunk(kd, splits > 0 ? splits : NarrowSplits(g)), accumulate: true, false, g, default,
                rowSums: db is not null);
            using var partials = k.Scratch(narrow.Splits > 1 ? narrow.Splits * narrow.M * NarrowSums : 1);
            k.Conv2d.NarrowWeight(k.Stream, new KernelConfig(new Index3D(narrow.M, narrow.Splits, 1), new Index3D(threads, 1, 1)), dy, x, dw, db ?? dw,
                partials.View, k.GridCounters, narrow);
            return;
        }
        if (splits <= 0)
        {
            splits = WeightSplits(g);
        }
        var t = new TileArgs(g.K, g.Crs, kd, Chunk(kd, splits), accumulate: true, false, g, default, rowSums: db is not null);
        if (ByTapColumns(g.C) && k.Conv2d.TiledWeightByTap.Runs)
        {
            TiledGemm.Launch<ConvWeightTapTile>(k, k.Conv2d.TiledWeightByTap.For(), t, dy, x, dw, dw, db ?? dw, dw);
            return;
        }
        TiledGemm.Launch<ConvWeightTile>(k, k.Conv2d.TiledWeight.For(), t, dy, x, dw, dw, db ?? dw, dw);
    }

    /// <summary>True when the weight gradient takes tap-major columns (<see cref="ConvWeightTapTile"/>): C a multiple of 64, so
    /// each half of a thread's columns (64 of a 128-column tile) is one tap's channels.</summary>
    public static bool ByTapColumns(int channels) => channels % (TiledGemm.TN / 2) == 0;

    /// <summary>Taps a thread of <see cref="NarrowWeightKernel"/> sums: a kernel of at most 9 taps (R·S ≤ 9: 3 x 3, 1 x 9, …).</summary>
    public const int NarrowTaps = 9;

    /// <summary>The values a group of <see cref="NarrowWeightKernel"/> adds: its taps' products and Σ dy.</summary>
    public const int NarrowSums = NarrowTaps + 1;

    /// <summary>Groups the narrow weight gradient aims for: one wave of an H100 SXM's 132 SMs at 8 groups of 256 threads an
    /// SM. A constant, so the split is a function of the shape alone.</summary>
    public const int NarrowTargetGroups = 132 * 8;

    /// <summary>The pixels one split of the narrow weight gradient covers at least: 8 a thread of a 256-thread group.</summary>
    private const int MinNarrowChunk = 8 * TiledReduce.MaxThreads;

    /// <summary>True for a weight gradient with one input or one output channel (and at least one of each) and a kernel of at
    /// most <see cref="NarrowTaps"/> taps (conv_in's 1 → 64, conv_out's 64 → 1): a 64 x 128 tile would hold 9 useful columns of
    /// 128 or 1 useful row of 64 (docs/gpu.md, "conv_out"), so each (k, c) pair gets groups of its own instead.</summary>
    public static bool NarrowWeight(ConvShape g) =>
        (g.K == 1 || g.C == 1) && g.K > 0 && g.C > 0 && g.R * g.S <= NarrowTaps && (long)g.K * g.C <= IlgpuKernels.CounterSlots;

    /// <summary>The narrow weight gradient's pixel splits: as many as fill <see cref="NarrowTargetGroups"/> over its K·C
    /// pairs, each at least <see cref="MinNarrowChunk"/> pixels. A function of the shape only.</summary>
    public static int NarrowSplits(ConvShape g)
    {
        long pairs = (long)g.K * g.C, pixels = (long)g.N * g.Pq;
        return (int)Math.Max(1, Math.Min(NarrowTargetGroups / Math.Max(pairs, 1), pixels / MinNarrowChunk));
    }

    /// <summary>Tap j of channel c in the forward's window (<see cref="ConvTaps.InputTap"/>); one that reads nothing past R·S.</summary>
    private static Tap NarrowTap(TileArgs t, int c, int j)
    {
        int rs = t.Conv.R * t.Conv.S;
        return j < rs ? ConvTaps.InputTap(t, c * rs + j) : new Tap(0, Taps.Nowhere);
    }

    /// <summary>Where a group of <see cref="NarrowWeightKernel"/> keeps value v of its sums: a row of
    /// <see cref="TiledReduce.MaxThreads"/> each, so values v and v + 1 (v even) are one <see cref="TiledReduce.SegmentTree"/>
    /// with its second value a row on.</summary>
    private static int NarrowSlot(int v) => v * TiledReduce.MaxThreads;

    /// <summary>
    /// The weight gradient of a narrow convolution (<see cref="NarrowWeight"/>): group (pair, split) adds, for the pair
    /// (k, c) = (pair / C, pair mod C), dw[k, c, r, s] over the split's output pixels (t.KChunk of them, t.Kd in all), and Σ dy
    /// for db[k] where c = 0 and t.RowSums. Thread i walks pixels begin + i, + T, … through the forward's window of each (its
    /// view and mask, <see cref="ConvTaps.Window"/>) and its R·S taps, held in registers; the group adds its threads' sums in a
    /// shared-memory tree, and with one split it adds them into dw (and db); with more, each writes its sums to partials and
    /// the pair's last group (<see cref="TiledReduce.ArriveLast"/>) adds them in split order. Deterministic on a device.
    /// </summary>
    internal static void NarrowWeightKernel(ArrayView<float> dy, ArrayView<float> x, ArrayView<float> dw, ArrayView<float> db, ArrayView<float> partials,
        ArrayView<int> counters, TileArgs t)
    {
        var sh = SharedMemory.Allocate<float>(NarrowSums * TiledReduce.MaxThreads);
        var last = SharedMemory.Allocate<int>(1);
        var g = t.Conv;
        int pair = Grid.IdxX, split = Grid.IdxY, tid = Group.IdxX;
        int k = pair / g.C, c = pair - k * g.C, pq = g.P * g.Q;
        Tap t0 = NarrowTap(t, c, 0), t1 = NarrowTap(t, c, 1), t2 = NarrowTap(t, c, 2), t3 = NarrowTap(t, c, 3), t4 = NarrowTap(t, c, 4),
            t5 = NarrowTap(t, c, 5), t6 = NarrowTap(t, c, 6), t7 = NarrowTap(t, c, 7), t8 = NarrowTap(t, c, 8);
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0, sb = 0;
        int end = Math.Min(t.Kd, (split + 1) * t.KChunk);
        for (int i = split * t.KChunk + tid; i < end; i += Group.DimX)
        {
            var at = new TiledGemm.PixelView(x, ConvTaps.Window(t, i));
            int n = t.Div.Pq.Div(i);
            float d = dy[(n * g.K + k) * pq + (i - n * pq)];
            s0 += d * at.Tapped(t0);
            s1 += d * at.Tapped(t1);
            s2 += d * at.Tapped(t2);
            s3 += d * at.Tapped(t3);
            s4 += d * at.Tapped(t4);
            s5 += d * at.Tapped(t5);
            s6 += d * at.Tapped(t6);
            s7 += d * at.Tapped(t7);
            s8 += d * at.Tapped(t8);
            sb += d;
        }
        sh[NarrowSlot(0) + tid] = s0;
        sh[NarrowSlot(1) + tid] = s1;
        sh[NarrowSlot(2) + tid] = s2;
        sh[NarrowSlot(3) + tid] = s3;
        sh[NarrowSlot(4) + tid] = s4;
        sh[NarrowSlot(5) + tid] = s5;
        sh[NarrowSlot(6) + tid] = s6;
        sh[NarrowSlot(7) + tid] = s7;
        sh[NarrowSlot(8) + tid] = s8;
        sh[NarrowSlot(9) + tid] = sb;
        Group.Barrier();
        for (int v = 0; v < NarrowSums; v += 2)
        {
            TiledReduce.SegmentTree(sh.SubView(NarrowSlot(v)), tid, Group.DimX, two: true);
        }
        // Thread v < NarrowSums holds value v's total: the group's own with one split; with more, the pair's last group
        // adds the splits' partials in split order (Splits is uniform: the whole group takes one branch).
        bool holds = tid < NarrowSums;
        float total = holds ? sh[NarrowSlot(Math.Min(tid, NarrowSums - 1))] : 0;
        if (t.Splits > 1)
        {
            if (holds)
            {
                partials[(split * t.M + pair) * NarrowSums + tid] = total;
            }
            holds &= TiledReduce.ArriveLast(counters, pair, t.Splits, last);
            total = 0;
            for (int s = 0; holds && s < t.Splits; s++)
            {
                total += partials[(s * t.M + pair) * NarrowSums + tid];
            }
        }
        int rs = g.R * g.S;
        if (holds && tid < rs)
        {
            ConvWeightTile.Store(t, dw, dw, dw, dw, k, c * rs + tid, total);
        }
        else if (holds && tid == NarrowTaps && t.RowSums != 0 && c == 0)
        {
            db[k] += total;
        }
    }
}
