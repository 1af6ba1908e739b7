using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// GroupNorm (+SiLU) on the ILGPU backend as explicitly grouped kernels: one group of T threads
/// (256 on CUDA) per (image, group), reductions in shared memory along a fixed tree, so reruns are
/// bit-identical (no atomics). Shapes as <see cref="GroupNorm"/>: x, y, dy, dx [N, C, H, W]; gamma,
/// beta [C]; mean, rstd [N, G]; each group holds M = (C/G)·H·W contiguous elements.
///   forward (one launch):  sum → mean, Σ(x - mean)² → rstd, then y = (silu of) gamma·xhat + beta;
///                          x is read three times, the second and third mostly from cache.
///   backward (one launch), per (n, g): per-channel Σ du and Σ du·xhat (the group's channels in rounds, a segment of
///     L lanes per channel, segmented tree), written to two [N, C] tables; the group's Σ g and Σ g·xhat (g = du·gamma)
///     from them in channel order; then dx (+)= rstd·(g - mean(g) - xhat·mean(g·xhat)). The last group to finish
///     (TiledReduce.ArriveLast) adds the tables down the batch, n = 0, 1, … in order: dgamma[c] += Σ_n table1[n, c],
///     dbeta[c] += Σ_n table0[n, c], so the parameter gradients need no second launch and stay bit-identical on rerun.
/// The simple twins (one thread per (n, g), per element, per channel) stay in GroupNorm.cs.
/// </summary>
internal static class TiledNorm
{
    private const int T = TiledReduce.MaxThreads;

    /// <summary>Fewest lanes per channel segment in backward's sums: 8 consecutive floats are one 32-byte sector.</summary>
    public const int MinLanes = 8;

    /// <summary>y = groupnorm(x)·gamma + beta (silu of it when s.Silu), mean and rstd [N, G]: one group per (n, g).</summary>
    public static void Forward(IlgpuKernels k, ArrayView<float> x, ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> y,
        ArrayView<float> mean, ArrayView<float> rstd, GroupNorm.GroupShape s, float eps)
    {
        int threads = TiledReduce.Threads(k.Accelerator, s.GroupSize);
        k.GroupNorm.TiledForward(k.Stream, new KernelConfig(s.N * s.G, threads), x, gamma, beta, mean, rstd, y, s, eps);
    }

    /// <summary>dx (+)= ∂L/∂x, dgamma += Σ du·xhat, dbeta += Σ du, from the saved mean and rstd: one launch.</summary>
    public static void Backward(IlgpuKernels k, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> dx, ArrayView<float> dgamma, ArrayView<float> dbeta, GroupNorm.GroupShape s, bool accumulate)
    {
        int threads = TiledReduce.Threads(k.Accelerator, s.GroupSize), lanes = Lanes(s.ChannelsPerGroup, threads);
        using var tables = k.Scratch(2 * s.N * s.C);
        k.GroupNorm.TiledBackward(k.Stream, new KernelConfig(s.N * s.G, threads), dy, x, mean, rstd, gamma, beta, dx, tables.View, dgamma, dbeta,
            k.GridCounters, s, lanes, accumulate ? 1 : 0);
    }

    /// <summary>Lanes per channel segment in backward's sums: the group's T threads split into as many segments as the
    /// group has channels (a power of two, at most T / <see cref="MinLanes"/>), each segment's lanes striding over H·W.</summary>
    public static int Lanes(int channelsPerGroup, int threads)
    {
        int segments = 1;
        while (segments < channelsPerGroup && segments * 2 * MinLanes <= threads)
        {
            segments *= 2;
        }
        return Math.Max(1, threads / segments);
    }

    // Group ng over [N·G].
    internal static void ForwardKernel(ArrayView<float> x, ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> y, GroupNorm.GroupShape s, float eps)
    {
        var sh = SharedMemory.Allocate<float>(T);
        int ng = Grid.IdxX, t = Group.IdxX, threads = Group.DimX;
        int start = ng * s.GroupSize, c0 = ng % s.G * s.ChannelsPerGroup;
        float sum = 0;
        for (int j = t; j < s.GroupSize; j += threads)
        {
            sum += x[start + j];
        }
        float m = TiledReduce.GroupSum(sh, sum) / s.GroupSize;
        // Two passes (mean, then squared deviations) as the CPU and the simple twin: no cancellation when |mean| ≫ std.
        float sq = 0;
        for (int j = t; j < s.GroupSize; j += threads)
        {
            float d = x[start + j] - m;
            sq += d * d;
        }
        float r = 1f / MathF.Sqrt(TiledReduce.GroupSum(sh, sq) / s.GroupSize + eps);
        if (t == 0)
        {
            mean[ng] = m;
            rstd[ng] = r;
        }
        // Each element is read and written by one thread after every read of the passes above: y may alias x.
        for (int j = t; j < s.GroupSize; j += threads)
        {
            int c = c0 + j / s.Hw;
            float u = (x[start + j] - m) * r * gamma[c] + beta[c];
            y[start + j] = s.Silu != 0 ? Silu.Apply(u) : u;
        }
    }

    // du: dy, or dy·silu'(u) with u = gamma·xhat + beta recomputed.
    private static float Du(float dy, float xhat, float gamma, float beta, int silu) => silu != 0 ? dy * Silu.Derivative(xhat * gamma + beta) : dy;

    // Group ng over [N·G]; tables [2, N, C] (Σ du, then Σ du·xhat) get this group's channels; the last group adds them
    // into dgamma and dbeta. counters[0] counts the groups' arrivals.
    internal static void BackwardKernel(ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd, ArrayView<float> gamma,
        ArrayView<float> beta, ArrayView<float> dx, ArrayView<float> tables, ArrayView<float> dgamma, ArrayView<float> dbeta, ArrayView<int> counters,
        GroupNorm.GroupShape s, int lanes, int accumulate)
    {
        // [0, T): Σ du per thread, then per segment; [T, 2T): Σ du·xhat; 2T, 2T+1: the group's mean(g), mean(g·xhat).
        var sh = SharedMemory.Allocate<float>(2 * T + 2);
        var last = SharedMemory.Allocate<int>(1);
        long tableLength = (long)s.N * s.C;
        var sumDu = tables.SubView(0, tableLength);
        var sumDuXhat = tables.SubView(tableLength, tableLength);
        int ng = Grid.IdxX, t = Group.IdxX, threads = Group.DimX;
        int n = ng / s.G, c0 = ng % s.G * s.ChannelsPerGroup, start = ng * s.GroupSize;
        int segments = threads / lanes, segment = t / lanes, lane = t - segment * lanes;
        float m = mean[ng], r = rstd[ng];
        // Thread 0 keeps the group's Σ g and Σ g·xhat, adding the channels in order.
        float sumG = 0, sumGx = 0;
        for (int round = 0; round < s.ChannelsPerGroup; round += segments)
        {
            int cg = round + segment;
            float a = 0, b = 0;
            if (cg < s.ChannelsPerGroup)
            {
                int c = c0 + cg, row = start + cg * s.Hw;
                float gm = gamma[c], bt = beta[c];
                for (int j = lane; j < s.Hw; j += lanes)
                {
                    float xhat = (x[row + j] - m) * r;
                    float du = Du(dy[row + j], xhat, gm, bt, s.Silu);
                    a += du;
                    b += du * xhat;
                }
            }
            sh[t] = a;
            sh[T + t] = b;
            Group.Barrier();
            // Segmented tree: lane 0 of each segment ends with its channel's sums.
            TiledReduce.SegmentTree(sh, t, lanes, two: true);
            if (lane == 0 && cg < s.ChannelsPerGroup)
            {
                sumDu[n * s.C + c0 + cg] = sh[t];
                sumDuXhat[n * s.C + c0 + cg] = sh[T + t];
            }
            if (t == 0)
            {
                for (int q = 0; q < segments && round + q < s.ChannelsPerGroup; q++)
                {
                    float gm = gamma[c0 + round + q];
                    sumG += gm * sh[q * lanes];
                    sumGx += gm * sh[T + q * lanes];
                }
            }
            // The next round overwrites sh.
            Group.Barrier();
        }
        if (t == 0)
        {
            sh[2 * T] = sumG / s.GroupSize;
            sh[2 * T + 1] = sumGx / s.GroupSize;
        }
        Group.Barrier();
        float meanG = sh[2 * T], meanGx = sh[2 * T + 1];
        for (int j = t; j < s.GroupSize; j += threads)
        {
            int c = c0 + j / s.Hw, i = start + j;
            float xhat = (x[i] - m) * r;
            float v = r * (Du(dy[i], xhat, gamma[c], beta[c], s.Silu) * gamma[c] - meanG - xhat * meanGx);
            dx[i] = accumulate != 0 ? dx[i] + v : v;
        }
        // The parameter gradients: the last group adds every channel's column of the tables (a thread a channel,
        // neighbouring threads on neighbouring channels). Four partial sums per column, rows n ≡ 0, 1, 2, 3 (mod 4), keep
        // four loads in flight instead of one; they are added in a fixed order, so the result is the same on every run.
        if (TiledReduce.ArriveLast(counters, 0, Grid.DimX, last))
        {
            for (int c = t; c < s.C; c += threads)
            {
                float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
                int i = 0;
                for (; i + 3 < s.N; i += 4)
                {
                    a0 += sumDu[i * s.C + c];
                    a1 += sumDu[(i + 1) * s.C + c];
                    a2 += sumDu[(i + 2) * s.C + c];
                    a3 += sumDu[(i + 3) * s.C + c];
                    b0 += sumDuXhat[i * s.C + c];
                    b1 += sumDuXhat[(i + 1) * s.C + c];
                    b2 += sumDuXhat[(i + 2) * s.C + c];
                    b3 += sumDuXhat[(i + 3) * s.C + c];
                }
                for (; i < s.N; i++)
                {
                    a0 += sumDu[i * s.C + c];
                    b0 += sumDuXhat[i * s.C + c];
                }
                dgamma[c] += (b0 + b1) + (b2 + b3);
                dbeta[c] += (a0 + a1) + (a2 + a3);
            }
        }
    }
}
