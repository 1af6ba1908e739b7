using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// GroupNorm (+SiLU) on the ILGPU backend as explicitly grouped kernels: one group of T threads
/// (up to 512 on CUDA) per (image, group), reductions in shared memory along a fixed tree, so reruns are
/// bit-identical (no atomics). Shapes as <see cref="GroupNorm"/>: x, y, dy, dx [N, C, H, W]; gamma,
/// beta [C]; mean, rstd [N, G]; each group holds M = (C/G)·H·W contiguous elements.
///   forward (one launch):  sum → mean, Σ(x - mean)² → rstd, then y = (silu of) gamma·xhat + beta. A group of up to
///                          512 threads holds its (image, group)'s elements in registers, 40 a thread (<see cref="Held"/>),
///                          so x is read from memory once; a larger group's slice is read three times, the second and
///                          third mostly from cache.
///   backward (one launch), per (n, g): per-channel Σ du and Σ du·xhat (the group's channels in rounds, a segment of
///     L lanes per channel, segmented tree), written to two [N, C] tables; the group's Σ g and Σ g·xhat (g = du·gamma)
///     from them in channel order; then dx (+)= rstd·(g - mean(g) - xhat·mean(g·xhat)), from the xhat and du each thread
///     kept where its group's channels fit one round at ≤ <see cref="HeldBackward"/> elements a lane (dy and x read once),
///     else from dy and x read again. Groups of up to 512 threads (<see cref="GroupThreads"/>). The last group to finish
///     (TiledReduce.ArriveLast) adds the tables down the batch, n = 0, 1, … in order: dgamma[c] += Σ_n table1[n, c],
///     dbeta[c] += Σ_n table0[n, c], so the parameter gradients need no second launch and stay bit-identical on rerun.
/// The simple twins (one thread per (n, g), per element, per channel) stay in GroupNorm.cs.
/// </summary>
internal static class TiledNorm
{
    private const int T = TiledReduce.MaxThreads;

    /// <summary>Fewest lanes per channel segment in backward's sums: 8 consecutive floats are one 32-byte sector.</summary>
    public const int MinLanes = 8;

    /// <summary>Most threads a forward or backward group takes (a power of two): with <see cref="Held"/> elements a thread,
    /// the forward reads 20,480 elements of an (image, group) once, the base preset's largest (192 channels of 28x28 in 8
    /// groups) 18,816.</summary>
    public const int GroupThreads = 512;

    /// <summary>Elements of its (image, group) a forward thread holds in registers (five runs of eight, as fields): the group
    /// reads x once where its slice has at most Held x threads elements.</summary>
    public const int Held = 40;

    /// <summary>The forward's launch bounds (.maxntid 512, .minnctapersm 2: ptxas keeps a thread within 64 registers, the
    /// 40 held elements included, so two groups of 512 fit an SM).</summary>
    public static KernelSpecialization ForwardSpecialization => new(GroupThreads, 2);

    /// <summary>y = groupnorm(x)·gamma + beta (silu of it when s.Silu), mean and rstd [N, G]: one group per (n, g).</summary>
    public static void Forward(IlgpuKernels k, ArrayView<float> x, ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> y,
        ArrayView<float> mean, ArrayView<float> rstd, GroupNorm.GroupShape s, float eps)
    {
        int threads = ThreadsFor(k.Accelerator.MaxNumThreadsPerGroup, s.GroupSize);
        k.GroupNorm.TiledForward(k.Stream, new KernelConfig(s.N * s.G, threads), x, gamma, beta, mean, rstd, y, s, eps);
    }

    /// <summary>Threads a forward or backward group takes for <paramref name="groupSize"/> elements on a device whose groups
    /// take at most <paramref name="maxGroup"/>: a power of two, at most <see cref="GroupThreads"/> and maxGroup, and no
    /// more than the smallest one ≥ groupSize (<see cref="TiledReduce.Threads(int, long, int)"/>).</summary>
    public static int ThreadsFor(int maxGroup, long groupSize) => TiledReduce.Threads(maxGroup, groupSize, GroupThreads);

    /// <summary>True when a forward group of <paramref name="threads"/> holds all <paramref name="groupSize"/> elements of its
    /// (image, group) in registers and reads x once.</summary>
    public static bool ReadsOnce(long groupSize, int threads) => groupSize <= (long)threads * Held;

    /// <summary>Elements a backward thread holds (their xhat and du, four runs of eight each) between its sums and its dx: the
    /// group reads dy and x once where each channel segment's lanes cover their channel in at most HeldBackward elements a
    /// lane, in one round.</summary>
    public const int HeldBackward = 32;

    /// <summary>The backward's launch bounds (.maxntid 512, one group an SM at least: up to 128 registers a thread, the 64
    /// held values included).</summary>
    public static KernelSpecialization BackwardSpecialization => new(GroupThreads, 1);

    /// <summary>True when a backward group of <paramref name="threads"/> holds its slice between the sums and dx: every channel
    /// of the group in one round of segments, at most <see cref="HeldBackward"/> elements a lane.</summary>
    public static bool BackwardReadsOnce(int channelsPerGroup, int hw, int threads) =>
        HoldsBackward(channelsPerGroup, hw, threads, Lanes(channelsPerGroup, threads));

    /// <summary><see cref="BackwardReadsOnce"/> with the group's <paramref name="lanes"/> a segment known (the kernel's rule).</summary>
    private static bool HoldsBackward(int channelsPerGroup, int hw, int threads, int lanes) =>
        channelsPerGroup <= threads / lanes && (hw + lanes - 1) / lanes <= HeldBackward;

    /// <summary>dx (+)= ∂L/∂x, dgamma += Σ du·xhat, dbeta += Σ du, from the saved mean and rstd: one launch.</summary>
    public static void Backward(IlgpuKernels k, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> dx, ArrayView<float> dgamma, ArrayView<float> dbeta, GroupNorm.GroupShape s, bool accumulate)
    {
        int threads = ThreadsFor(k.Accelerator.MaxNumThreadsPerGroup, s.GroupSize), lanes = Lanes(s.ChannelsPerGroup, threads);
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
        var sh = SharedMemory.Allocate<float>(GroupThreads);
        int ng = Grid.IdxX, t = Group.IdxX, threads = Group.DimX;
        int start = ng * s.GroupSize, c0 = ng % s.G * s.ChannelsPerGroup;
        if (ReadsOnce(s.GroupSize, threads))
        {
            HeldForward(x, gamma, beta, mean, rstd, y, s, eps, sh, ng, t, threads, start, c0);
            return;
        }
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
            y[start + j] = Normalized(x[start + j], m, r, c0 + j / s.Hw, gamma, beta, s.Silu);
        }
    }

    /// <summary>The forward of a group that holds its slice in registers: element j = t + threads·i of the slice in run i / 8,
    /// field i mod 8; the same passes, the same sums in the same order (each thread adds its elements in j order), x read
    /// once.</summary>
    private static void HeldForward(ArrayView<float> x, ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> y, GroupNorm.GroupShape s, float eps, ArrayView<float> sh, int ng, int t, int threads, int start, int c0)
    {
        int run = 8 * threads, size = s.GroupSize;
        var slice = x.SubView(start, size);
        Floats8 v0 = Load8(slice, t, threads), v1 = Load8(slice, t + run, threads), v2 = Load8(slice, t + 2 * run, threads),
            v3 = Load8(slice, t + 3 * run, threads), v4 = Load8(slice, t + 4 * run, threads);
        float sum = Sum8(Sum8(Sum8(Sum8(Sum8(0f, v0), v1), v2), v3), v4);
        float m = TiledReduce.GroupSum(sh, sum) / size;
        float sq = Deviations8(0f, v0, m, t, threads, size);
        sq = Deviations8(sq, v1, m, t + run, threads, size);
        sq = Deviations8(sq, v2, m, t + 2 * run, threads, size);
        sq = Deviations8(sq, v3, m, t + 3 * run, threads, size);
        sq = Deviations8(sq, v4, m, t + 4 * run, threads, size);
        float r = 1f / MathF.Sqrt(TiledReduce.GroupSum(sh, sq) / size + eps);
        if (t == 0)
        {
            mean[ng] = m;
            rstd[ng] = r;
        }
        var outSlice = y.SubView(start, size);
        Write8(outSlice, v0, m, r, t, threads, s, c0, gamma, beta);
        Write8(outSlice, v1, m, r, t + run, threads, s, c0, gamma, beta);
        Write8(outSlice, v2, m, r, t + 2 * run, threads, s, c0, gamma, beta);
        Write8(outSlice, v3, m, r, t + 3 * run, threads, s, c0, gamma, beta);
        Write8(outSlice, v4, m, r, t + 4 * run, threads, s, c0, gamma, beta);
    }

    /// <summary>y of one element: (silu of) (x - mean)·rstd·gamma[c] + beta[c].</summary>
    private static float Normalized(float x, float m, float r, int c, ArrayView<float> gamma, ArrayView<float> beta, int silu)
    {
        float u = (x - m) * r * gamma[c] + beta[c];
        return silu != 0 ? Silu.Apply(u) : u;
    }

    /// <summary>Elements j, j + step, …, j + 7·step of the slice (0 past its end).</summary>
    private static Floats8 Load8(ArrayView<float> slice, int j, int step) => new()
    {
        V0 = ElementOrZero(slice, j), V1 = ElementOrZero(slice, j + step), V2 = ElementOrZero(slice, j + 2 * step), V3 = ElementOrZero(slice, j + 3 * step),
        V4 = ElementOrZero(slice, j + 4 * step), V5 = ElementOrZero(slice, j + 5 * step), V6 = ElementOrZero(slice, j + 6 * step), V7 = ElementOrZero(slice, j + 7 * step),
    };

    private static float ElementOrZero(ArrayView<float> slice, int j) => j < slice.IntLength ? slice[j] : 0f;

    /// <summary>acc plus the eight values, in order (a zero past the slice's end adds nothing).</summary>
    private static float Sum8(float acc, Floats8 v) => acc + v.V0 + v.V1 + v.V2 + v.V3 + v.V4 + v.V5 + v.V6 + v.V7;

    /// <summary>acc plus the squared deviations from m of the values of elements j, j + step, … inside the slice, in order.</summary>
    private static float Deviations8(float acc, Floats8 v, float m, int j, int step, int size)
    {
        acc = Deviation(acc, v.V0, m, j < size);
        acc = Deviation(acc, v.V1, m, j + step < size);
        acc = Deviation(acc, v.V2, m, j + 2 * step < size);
        acc = Deviation(acc, v.V3, m, j + 3 * step < size);
        acc = Deviation(acc, v.V4, m, j + 4 * step < size);
        acc = Deviation(acc, v.V5, m, j + 5 * step < size);
        acc = Deviation(acc, v.V6, m, j + 6 * step < size);
        return Deviation(acc, v.V7, m, j + 7 * step < size);
    }

    /// <summary>The squared deviation of x from m, added as the fallback path adds it (acc + d·d, which ptxas may contract to
    /// one FMA in both), with d = 0 for an element past the slice's end.</summary>
    private static float Deviation(float acc, float x, float m, bool inside)
    {
        float d = inside ? x - m : 0f;
        return acc + d * d;
    }

    /// <summary>Writes y of the held elements j, j + step, … that are inside the slice.</summary>
    private static void Write8(ArrayView<float> y, Floats8 v, float m, float r, int j, int step, GroupNorm.GroupShape s, int c0, ArrayView<float> gamma,
        ArrayView<float> beta)
    {
        Write1(y, v.V0, m, r, j, s, c0, gamma, beta);
        Write1(y, v.V1, m, r, j + step, s, c0, gamma, beta);
        Write1(y, v.V2, m, r, j + 2 * step, s, c0, gamma, beta);
        Write1(y, v.V3, m, r, j + 3 * step, s, c0, gamma, beta);
        Write1(y, v.V4, m, r, j + 4 * step, s, c0, gamma, beta);
        Write1(y, v.V5, m, r, j + 5 * step, s, c0, gamma, beta);
        Write1(y, v.V6, m, r, j + 6 * step, s, c0, gamma, beta);
        Write1(y, v.V7, m, r, j + 7 * step, s, c0, gamma, beta);
    }

    private static void Write1(ArrayView<float> y, float x, float m, float r, int j, GroupNorm.GroupShape s, int c0, ArrayView<float> gamma,
        ArrayView<float> beta)
    {
        if (j < y.IntLength)
        {
            y[j] = Normalized(x, m, r, c0 + j / s.Hw, gamma, beta, s.Silu);
        }
    }

    // du: dy, or dy·silu'(u) with u = gamma·xhat + beta recomputed.
    private static float Du(float dy, float xhat, float gamma, float beta, int silu) => silu != 0 ? dy * Silu.Derivative(xhat * gamma + beta) : dy;

    /// <summary>dx of one element: rstd·(du·gamma - mean(g) - xhat·mean(g·xhat)), added to <paramref name="old"/> when
    /// accumulating.</summary>
    private static float Dx(float old, float xhat, float du, float r, float gamma, float meanG, float meanGx, int accumulate)
    {
        float v = r * (du * gamma - meanG - xhat * meanGx);
        return accumulate != 0 ? old + v : v;
    }

    /// <summary>xhat and du of eight held elements (x and dy zero past the channel's end: du is then zero), their Σ du and
    /// Σ du·xhat added to a and b in order.</summary>
    private static void Grad8(Floats8 x, Floats8 dy, float m, float r, float gamma, float beta, int silu, ref float a, ref float b, out Floats8 xhat,
        out Floats8 du)
    {
        xhat = default;
        du = default;
        du.V0 = Grad1(x.V0, dy.V0, m, r, gamma, beta, silu, ref a, ref b, out xhat.V0);
        du.V1 = Grad1(x.V1, dy.V1, m, r, gamma, beta, silu, ref a, ref b, out xhat.V1);
        du.V2 = Grad1(x.V2, dy.V2, m, r, gamma, beta, silu, ref a, ref b, out xhat.V2);
        du.V3 = Grad1(x.V3, dy.V3, m, r, gamma, beta, silu, ref a, ref b, out xhat.V3);
        du.V4 = Grad1(x.V4, dy.V4, m, r, gamma, beta, silu, ref a, ref b, out xhat.V4);
        du.V5 = Grad1(x.V5, dy.V5, m, r, gamma, beta, silu, ref a, ref b, out xhat.V5);
        du.V6 = Grad1(x.V6, dy.V6, m, r, gamma, beta, silu, ref a, ref b, out xhat.V6);
        du.V7 = Grad1(x.V7, dy.V7, m, r, gamma, beta, silu, ref a, ref b, out xhat.V7);
    }

    /// <summary>du of one element (its xhat out), with du and du·xhat added to a and b.</summary>
    private static float Grad1(float x, float dy, float m, float r, float gamma, float beta, int silu, ref float a, ref float b, out float xhat)
    {
        xhat = (x - m) * r;
        float du = Du(dy, xhat, gamma, beta, silu);
        a += du;
        b += du * xhat;
        return du;
    }

    /// <summary>Writes dx of the held elements j, j + step, … that are inside the channel (<paramref name="dx"/> its view).</summary>
    private static void Dx8(ArrayView<float> dx, Floats8 xhat, Floats8 du, int j, int step, float r, float gamma, float meanG, float meanGx, int accumulate)
    {
        Dx1(dx, xhat.V0, du.V0, j + 0 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V1, du.V1, j + 1 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V2, du.V2, j + 2 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V3, du.V3, j + 3 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V4, du.V4, j + 4 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V5, du.V5, j + 5 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V6, du.V6, j + 6 * step, r, gamma, meanG, meanGx, accumulate);
        Dx1(dx, xhat.V7, du.V7, j + 7 * step, r, gamma, meanG, meanGx, accumulate);
    }

    private static void Dx1(ArrayView<float> dx, float xhat, float du, int j, float r, float gamma, float meanG, float meanGx, int accumulate)
    {
        if (j < dx.IntLength)
        {
            dx[j] = Dx(accumulate != 0 ? dx[j] : 0f, xhat, du, r, gamma, meanG, meanGx, accumulate);
        }
    }

    // Group ng over [N·G]; tables [2, N, C] (Σ du, then Σ du·xhat) get this group's channels; the last group adds them
    // into dgamma and dbeta. counters[0] counts the groups' arrivals.
    internal static void BackwardKernel(ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd, ArrayView<float> gamma,
        ArrayView<float> beta, ArrayView<float> dx, ArrayView<float> tables, ArrayView<float> dgamma, ArrayView<float> dbeta, ArrayView<int> counters,
        GroupNorm.GroupShape s, int lanes, int accumulate)
    {
        // [0, B): Σ du per thread, then per segment; [B, 2B): Σ du·xhat; 2B, 2B+1: the group's mean(g), mean(g·xhat)
        // (B = GroupThreads).
        const int B = GroupThreads;
        var sh = SharedMemory.Allocate<float>(2 * B + 2);
        var last = SharedMemory.Allocate<int>(1);
        long tableLength = (long)s.N * s.C;
        var sumDu = tables.SubView(0, tableLength);
        var sumDuXhat = tables.SubView(tableLength, tableLength);
        int ng = Grid.IdxX, t = Group.IdxX, threads = Group.DimX;
        int n = ng / s.G, c0 = ng % s.G * s.ChannelsPerGroup, start = ng * s.GroupSize;
        int segments = threads / lanes, segment = t / lanes, lane = t - segment * lanes;
        float m = mean[ng], r = rstd[ng];
        // Held: one round, this thread's elements of its channel (lane, lane + lanes, …) kept as xhat and du for dx.
        bool held = HoldsBackward(s.ChannelsPerGroup, s.Hw, threads, lanes);
        Floats8 xh0 = default, xh1 = default, xh2 = default, xh3 = default, du0 = default, du1 = default, du2 = default, du3 = default;
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
                if (held)
                {
                    // x and dy read once; the elements past the channel's end are zeros and add nothing.
                    var xs = x.SubView(row, s.Hw);
                    var dys = dy.SubView(row, s.Hw);
                    int run = 8 * lanes;
                    Grad8(Load8(xs, lane, lanes), Load8(dys, lane, lanes), m, r, gm, bt, s.Silu, ref a, ref b, out xh0, out du0);
                    Grad8(Load8(xs, lane + run, lanes), Load8(dys, lane + run, lanes), m, r, gm, bt, s.Silu, ref a, ref b, out xh1, out du1);
                    Grad8(Load8(xs, lane + 2 * run, lanes), Load8(dys, lane + 2 * run, lanes), m, r, gm, bt, s.Silu, ref a, ref b, out xh2, out du2);
                    Grad8(Load8(xs, lane + 3 * run, lanes), Load8(dys, lane + 3 * run, lanes), m, r, gm, bt, s.Silu, ref a, ref b, out xh3, out du3);
                }
                else
                {
                    for (int j = lane; j < s.Hw; j += lanes)
                    {
                        Grad1(x[row + j], dy[row + j], m, r, gm, bt, s.Silu, ref a, ref b, out _);
                    }
                }
            }
            sh[t] = a;
            sh[B + t] = b;
            Group.Barrier();
            // Segmented tree: lane 0 of each segment ends with its channel's sums.
            TiledReduce.SegmentTree(sh, t, lanes, two: true, second: B);
            if (lane == 0 && cg < s.ChannelsPerGroup)
            {
                sumDu[n * s.C + c0 + cg] = sh[t];
                sumDuXhat[n * s.C + c0 + cg] = sh[B + t];
            }
            if (t == 0)
            {
                for (int q = 0; q < segments && round + q < s.ChannelsPerGroup; q++)
                {
                    float gm = gamma[c0 + round + q];
                    sumG += gm * sh[q * lanes];
                    sumGx += gm * sh[B + q * lanes];
                }
            }
            // The next round overwrites sh.
            Group.Barrier();
        }
        if (t == 0)
        {
            sh[2 * B] = sumG / s.GroupSize;
            sh[2 * B + 1] = sumGx / s.GroupSize;
        }
        Group.Barrier();
        float meanG = sh[2 * B], meanGx = sh[2 * B + 1];
        if (held)
        {
            if (segment < s.ChannelsPerGroup)
            {
                int c = c0 + segment;
                var dxs = dx.SubView(start + segment * s.Hw, s.Hw);
                float gm = gamma[c];
                int run = 8 * lanes;
                Dx8(dxs, xh0, du0, lane, lanes, r, gm, meanG, meanGx, accumulate);
                Dx8(dxs, xh1, du1, lane + run, lanes, r, gm, meanG, meanGx, accumulate);
                Dx8(dxs, xh2, du2, lane + 2 * run, lanes, r, gm, meanG, meanGx, accumulate);
                Dx8(dxs, xh3, du3, lane + 3 * run, lanes, r, gm, meanG, meanGx, accumulate);
            }
        }
        else
        {
            for (int j = t; j < s.GroupSize; j += threads)
            {
                int c = c0 + j / s.Hw, i = start + j;
                float xhat = (x[i] - m) * r;
                dx[i] = Dx(accumulate != 0 ? dx[i] : 0f, xhat, Du(dy[i], xhat, gamma[c], beta[c], s.Silu), r, gamma[c], meanG, meanGx, accumulate);
            }
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
