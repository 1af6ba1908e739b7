// Batched explicit lowering for the managed CPU backend's small convolution outputs.
//
// Why: at 7x7 (and for the stride-2 convolutions) one image's product has 49..196 columns; the implicit path's wide
// grid makes that 63 (7 rows of 9), one full 48-column panel and a narrow, slow edge, and the weight gradient's
// reduction is only 63 long. Lowering G images side by side, col [C·R·S, G·P·Q] with G·P·Q ≈ 500-800, gives the GEMM
// full panels and the dot-product tiles a long reduction; im2col's 9x copy is cheap at these sizes (each lowered
// element then meets K output channels).
//   forward:          out [K, G·PQ] = W [K, CRS] · col                     y[n] = out's columns of image n + b
//   weight gradient:  dW [K, CRS] += dy_G [K, G·PQ] · colᵀ                 dy_G: the group's dy rows side by side
//   input gradient:   stride 1 only: the forward of dy with the flipped, transposed kernel and padding R - 1 - pad.

using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

internal static unsafe partial class ConvGemm
{
    /// <summary>Lowered columns a group aims for: the forward and input gradient fill ten 48-column panels, the weight
    /// gradient's dot tiles get a reduction as long as a 28x28 image's.</summary>
    private const int BatchedColumns = 480, BatchedReduction = 800;

    /// <summary>Images per group for about <paramref name="columns"/> lowered columns.</summary>
    private static int GroupOf(ConvShape g, int columns) => Math.Clamp((columns + g.Pq - 1) / g.Pq, 1, Math.Max(1, g.N / Cpu.Threads));

    /// <summary>True when the batched input gradient applies: stride 1, padding below the kernel size.</summary>
    public static bool SupportsBatchedInput(ConvShape g) => g.Stride == 1 && g.Pad < g.R && g.Pad < g.S;

    /// <summary>y[n] = W·col(x[n]) + b, G images per GEMM, groups spread over the cores.</summary>
    public static void ForwardBatched(ConvShape g, float* x, float* w, float* b, float* y) =>
        LoweredProduct(g, x, w, g.K, y, b, accumulate: false);

    /// <summary>dx[n] (+)= the transposed convolution of dy[n] as a batched forward of dy with the flipped kernel.</summary>
    public static void BackwardInputBatched(ConvShape g, float* dy, float* w, float* dx, bool accumulate)
    {
        if (!SupportsBatchedInput(g)) throw new ArgumentException("conv2d: the batched input gradient needs stride 1 and pad < kernel size");
        // dx = conv(dy, wf) with wf[c, k, r, s] = w[k, c, R-1-r, S-1-s], stride 1, padding R-1-pad: a [N, K, P, Q] -> [N, C, H, W] convolution.
        var t = new ConvShape(g.N, g.K, g.P, g.Q, g.C, g.R, g.S, 1, g.R - 1 - g.Pad);
        float* wf = Workspace.Current.Weights((long)g.C * g.K * g.R * g.S);
        for (int k = 0; k < g.K; k++)
            for (int c = 0; c < g.C; c++)
                for (int r = 0; r < g.R; r++)
                    for (int s = 0; s < g.S; s++)
                        wf[((c * g.K + k) * g.R + r) * g.S + s] = w[((k * g.C + c) * g.R + (g.R - 1 - r)) * g.S + (g.S - 1 - s)];
        LoweredProduct(t, dy, wf, g.C, dx, null, accumulate);
    }

    /// <summary>out[n] (=|+=) wt [rows, CRS] · col(in[n]) (+ bias) for every image of shape <paramref name="t"/>.</summary>
    private static void LoweredProduct(ConvShape t, float* input, float* wt, int rows, float* output, float* bias, bool accumulate)
    {
        int group = GroupOf(t, BatchedColumns), ld = (group * t.Pq + 15) & ~15, crs = t.Crs;
        int groups = (t.N + group - 1) / group, workers = Math.Min(Cpu.Threads, groups);
        long ins = (long)t.C * t.H * t.W, outs = (long)rows * t.Pq;
        var pl = new Planes(t.C, t.H, t.W, t.Stride, t.Pad, t.Pad);
        int* off = Workspace.Current.Offsets(crs);
        pl.Offsets(t.R, t.S, off);
        Cpu.Items(workers, worker =>
        {
            var ws = Workspace.Current;
            float* planes = ws.Planes(pl.Length);
            float* col = ws.Lowered((long)crs * ld);
            float* prod = ws.Wide((long)rows * ld);
            int first = (int)((long)groups * worker / workers) * group, last = Math.Min(t.N, (int)((long)groups * (worker + 1) / workers) * group);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0), cols = count * t.Pq;
                for (int i = 0; i < count; i++)
                {
                    pl.Fill(input + (n0 + i) * ins, planes);
                    Lower(pl, planes, off, crs, t.P, t.Q, col + i * t.Pq, ld);
                }
                // prod [rows, cols] = wt [rows, CRS] · col [CRS, cols]
                Gemm.Multiply(rows, cols, crs, wt, crs, 1, col, ld, 1, prod, ld, accumulate: false, parallel: false);
                for (int i = 0; i < count; i++)
                {
                    DropWideColumns(prod + i * t.Pq, ld, rows, 1, t.Pq, output + (n0 + i) * outs, bias, accumulate);
                }
            }
        });
    }

    /// <summary>dW += Σ_n dy[n]·col(x[n])ᵀ with the group's lowered images side by side: dot-product tiles for up to
    /// 32 output channels, the packed GEMM above. One private partial sum per worker, summed at the end.</summary>
    public static void BackwardWeightBatched(ConvShape g, float* dy, float* x, float* dw)
    {
        int group = GroupOf(g, BatchedReduction), ld = (group * g.Pq + 15) & ~15, crs = g.Crs, crs6 = (crs + 5) / 6 * 6;
        int k4 = (g.K + 3) & ~3, wlen = g.K * crs;
        int groups = (g.N + group - 1) / group, workers = Math.Min(Cpu.Threads, groups);
        bool dot = g.K <= DotSmallK && Avx512F.IsSupported;
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad);
        int* off = Workspace.Current.Offsets(crs6 + crs);
        for (int p = 0; p < crs6; p++) off[p] = Math.Min(p, crs - 1) * ld;
        int* planeOff = off + crs6;
        pl.Offsets(g.R, g.S, planeOff);
        long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
        float* partials = Scratch.Partials(workers, wlen);
        Cpu.Items(workers, worker =>
        {
            float* acc = partials + (long)worker * wlen;
            new Span<float>(acc, wlen).Clear();
            var ws = Workspace.Current;
            // Columns past a group's images are read by the dot tiles (against zero dy): keep them finite.
            float* planes = ws.Planes(pl.Length);
            float* col = ws.Lowered((long)crs * ld);
            new Span<float>(col, crs * ld).Clear();
            float* dyg = ws.Wide((long)k4 * ld);
            new Span<float>(dyg, k4 * ld).Clear();
            int first = (int)((long)groups * worker / workers) * group, last = Math.Min(g.N, (int)((long)groups * (worker + 1) / workers) * group);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0), cols = count * g.Pq;
                for (int i = 0; i < count; i++)
                {
                    pl.Fill(x + (n0 + i) * xs, planes);
                    Lower(pl, planes, planeOff, crs, g.P, g.Q, col + i * g.Pq, ld);
                    for (int k = 0; k < g.K; k++)
                    {
                        CopyRow(dy + (n0 + i) * ys + (long)k * g.Pq, dyg + (long)k * ld + i * g.Pq, g.Pq);
                    }
                }
                if (count < group)
                {
                    for (int k = 0; k < g.K; k++) new Span<float>(dyg + (long)k * ld + cols, ld - cols).Clear();
                }
                if (dot)
                {
                    DotTiles(g.K, crs, ld, dyg, 0, col, 0, 1, off, acc);
                }
                else
                {
                    // dW [K, CRS] += dy_G [K, cols] · colᵀ [cols, CRS]
                    Gemm.Multiply(g.K, crs, cols, dyg, ld, 1, col, 1, ld, acc, crs, accumulate: true, parallel: false);
                }
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    /// <summary>col[p·ld + y·q + x] = planes[off[p] + y·Wh + x] for p &lt; crs, y &lt; rows, x &lt; q: one image's lowered
    /// matrix, dense (no wide columns), from its padded planes.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Lower(Planes pl, float* planes, int* off, int crs, int rows, int q, float* col, int ld)
    {
        for (int p = 0; p < crs; p++)
        {
            float* src = planes + off[p];
            float* dst = col + (long)p * ld;
            for (int y = 0; y < rows; y++)
            {
                CopyRow(src + y * pl.Wh, dst + y * q, q);
            }
        }
    }
}
