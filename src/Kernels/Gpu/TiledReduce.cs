using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Explicitly grouped reductions for the ILGPU backend: each group of T threads adds its values in
/// shared memory along a fixed radix-16 tree (<see cref="SegmentTree"/>: two levels for 256 values,
/// one <see cref="Group.Barrier"/> each), and a second, equally fixed pass adds the groups' partials. No atomics: for one accelerator (one T)
/// every rerun adds in the same order and is bit-identical.
///   full sums (sum, mean, Σx², MSE):  [n] → partial [B] (grid-stride, B groups) → out [1]
///   per-channel sums (conv bias):     dy [N, K, PQ] → partial [K, S] (S splits of the batch) → db [K] (+=)
///   row sums (time-embedding bias):   dy [N·C, HW] → de [N·C] (+=), one launch: L lanes a row, T / L rows a group
///   strided segment sums:             dst[g] (+)= scale·Σ_i src[g·segStride + i·elemStride]
///   non-finite flag:                  flag[0] = min(flag[0], id) when x holds a NaN or ±inf
/// T = min(256, the largest power of two the accelerator allows per group): 256 on CUDA, 16 on
/// ILGPU's default CPU accelerator. The simple twins (one thread per output) stay in Reduce.cs,
/// Conv2d.cs and Elementwise.cs and run when <see cref="IlgpuKernels.Simple"/> is set.
/// </summary>
internal static class TiledReduce
{
    /// <summary>Threads per group at most; every shared buffer is sized for it.</summary>
    public const int MaxThreads = 256;

    /// <summary>Elements a thread of a full reduction covers at least before another group is launched.</summary>
    public const int PerThread = 8;

    /// <summary>Most groups a full reduction launches (their partials are then added by one group).</summary>
    public const int MaxGroups = 1024;

    /// <summary>Threads per group on <paramref name="accelerator"/>: a power of two, at most <see cref="MaxThreads"/>.</summary>
    public static int Threads(Accelerator accelerator) => Threads(accelerator.MaxNumThreadsPerGroup, long.MaxValue, MaxThreads);

    /// <summary>Threads per group for a reduction of <paramref name="count"/> values a group: <see cref="Threads(Accelerator)"/>,
    /// or the smallest power of two ≥ count when that is fewer (the batch's 128 partials of a channel need no 256 threads).</summary>
    public static int Threads(Accelerator accelerator, long count) => Threads(accelerator.MaxNumThreadsPerGroup, count, MaxThreads);

    /// <summary>Threads per group, a power of two: at most <paramref name="most"/> and <paramref name="deviceMax"/> (the
    /// device's largest group), and no more than the smallest power of two ≥ <paramref name="count"/>.</summary>
    public static int Threads(int deviceMax, long count, int most)
    {
        int t = most;
        while (t > 1 && (t > deviceMax || t / 2 >= count))
        {
            t >>= 1;
        }
        return t;
    }

    /// <summary>Groups of a grid-stride reduction over <paramref name="n"/> elements with <paramref name="threads"/> per group.</summary>
    public static int GroupsFor(long n, int threads) => (int)Math.Clamp((n + (long)threads * PerThread - 1) / ((long)threads * PerThread), 1, MaxGroups);

    // ---------------- host side: launches ----------------

    /// <summary>out[0] = scale·Σ f(a, b) with f by mode (0: a, 1: a², 2: (a - b)²), in two launches.</summary>
    public static void Full(IlgpuKernels k, ArrayView<float> a, ArrayView<float> b, ArrayView<float> output, int n, int mode, float scale)
    {
        int threads = Threads(k.Accelerator, n), groups = GroupsFor(n, threads);
        using var partial = k.Scratch(groups);
        k.Reduce.TiledPartial(k.Stream, new KernelConfig(groups, threads), a, b, partial.View, n, mode);
        k.Reduce.TiledSegments(k.Stream, new KernelConfig(1, Threads(k.Accelerator, groups)), partial.View, output, groups, 0, 1, scale, 0);
    }

    /// <summary>dst[g] (+)= scale·Σ_{i &lt; count} src[g·segStride + i·elemStride] for g &lt; segments: one group per segment.
    /// Rows of a [segments, count] table (segStride = count, elemStride = 1) or its columns (segStride = 1, elemStride = segments).</summary>
    public static void Segments(IlgpuKernels k, ArrayView<float> src, ArrayView<float> dst, int segments, int count, int segStride, int elemStride,
        float scale, bool accumulate)
    {
        int threads = Threads(k.Accelerator, count);
        k.Reduce.TiledSegments(k.Stream, new KernelConfig(segments, threads), src, dst, count, segStride, elemStride, scale, accumulate ? 1 : 0);
    }

    /// <summary>db[c] += Σ_{n, j} dy[n, c, j] for dy [n, channels, inner]: S splits of the batch per channel, then one group per channel adds them.</summary>
    public static void ChannelSums(IlgpuKernels k, ArrayView<float> dy, ArrayView<float> db, int n, int channels, int inner)
    {
        int threads = Threads(k.Accelerator);
        var (rowsPerSplit, splits) = ChannelSplits(n, inner, threads);
        using var partial = k.Scratch(channels * splits);
        k.Reduce.TiledChannelPartial(k.Stream, new KernelConfig(channels * splits, Threads(k.Accelerator, (long)rowsPerSplit * inner)), dy, partial.View, n,
            channels, inner, rowsPerSplit, splits);
        k.Reduce.TiledSegments(k.Stream, new KernelConfig(channels, Threads(k.Accelerator, splits)), partial.View, db, splits, splits, 1, 1f, 1);
    }

    /// <summary>How <see cref="ChannelSums"/> splits the batch: each group about 8·T elements (whole images), so a
    /// 28×28 map at batch 128 gives 43 groups per channel and a 7×7 map 4.</summary>
    public static (int RowsPerSplit, int Splits) ChannelSplits(int n, int inner, int threads)
    {
        int rows = Math.Clamp((PerThread * threads + inner - 1) / Math.Max(1, inner), 1, Math.Max(1, n));
        return (rows, Math.Max(1, (n + rows - 1) / rows));
    }

    /// <summary>sums[r] += Σ_{j &lt; cols} x[r·cols + j] for x [rows, cols]: <see cref="RowLanes"/> threads a row striding it
    /// (neighbouring threads on neighbouring elements, so a warp's loads coalesce), T / lanes rows a group, one launch.</summary>
    public static void RowSums(IlgpuKernels k, ArrayView<float> x, ArrayView<float> sums, int rows, int cols)
    {
        int threads = Threads(k.Accelerator), lanes = RowLanes(cols, threads), perGroup = threads / lanes;
        k.Reduce.TiledRowSums(k.Stream, new KernelConfig((rows + perGroup - 1) / perGroup, threads), x, sums, rows, cols, lanes);
    }

    /// <summary>Elements a lane of <see cref="RowSums"/> adds at most before a row gets more lanes.</summary>
    public const int RowPerLane = 4;

    /// <summary>Threads per row of <see cref="RowSums"/>: the smallest power of two that covers the row at
    /// <see cref="RowPerLane"/> elements a lane, at most <paramref name="threads"/>. For the time-embedding bias gradient
    /// at T = 256: 28×28 rows get 256 lanes (a group a row), 14×14 64 (four rows a group), 7×7 16 (sixteen rows).</summary>
    public static int RowLanes(int cols, int threads)
    {
        int lanes = 1;
        while (lanes < threads && (long)lanes * RowPerLane < cols)
        {
            lanes <<= 1;
        }
        return lanes;
    }

    /// <summary>flag[0] = min(flag[0], id) when any of x [n] is NaN or ±inf.</summary>
    public static void FlagNonFinite(IlgpuKernels k, ArrayView<float> x, ArrayView<float> flag, int n, int id)
    {
        int threads = Threads(k.Accelerator, n);
        k.Reduce.TiledFlagNonFinite(k.Stream, new KernelConfig(GroupsFor(n, threads), threads), x, flag, n, id);
    }

    // ---------------- device side ----------------

    /// <summary>Values a thread adds per level of the shared-memory tree: 256 values take two levels (two barriers) instead of eight.</summary>
    public const int Radix = 16;

    /// <summary>
    /// Reduces, in place, every segment of <paramref name="lanes"/> consecutive floats of sh (and, when
    /// <paramref name="two"/>, of sh[second..], second being MaxThreads unless a larger group, the GroupNorm backward's,
    /// puts them further on: a multiple of 32, so both trees fall on the same banks) to its first element, in a fixed order: at each level the n
    /// values of a segment become m = n/r (r = min(Radix, n)), lane l &lt; m adding sh[l + i·m] for i &lt; r, so
    /// neighbouring lanes read neighbouring banks. lanes is a power of two dividing Group.DimX; t is Group.IdxX.
    /// Every thread must call it (one barrier per level), after the values are written and a barrier.
    /// </summary>
    public static void SegmentTree(ArrayView<float> sh, int t, int lanes, bool two, int second = MaxThreads)
    {
        int lane = t & (lanes - 1);
        int n = lanes;
        while (n > 1)
        {
            int r = Math.Min(Radix, n), m = n / r;
            if (lane < m)
            {
                float a = 0, b = 0;
                for (int i = 0; i < r; i++)
                {
                    a += sh[TreeSlot(t, i, m)];
                    if (two)
                    {
                        b += sh[second + TreeSlot(t, i, m)];
                    }
                }
                sh[t] = a;
                if (two)
                {
                    sh[second + t] = b;
                }
            }
            Group.Barrier();
            n = m;
        }
    }

    /// <summary>Where thread t reads value i of its level of the tree (m values apart): the addressing the bank-conflict
    /// test walks.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static int TreeSlot(int t, int i, int m) => t + i * m;

    /// <summary>
    /// Counts this group's arrival on counters[slot] and answers, in every thread, whether it was the last of the
    /// <paramref name="arrivals"/> groups counting there: the last group may then read what every other group wrote
    /// before arriving, and finish the launch's work (a split-K sum, a batch sum) in the same launch instead of a second
    /// one. The release: every thread fences its own writes (device level) before the group's barrier, then thread 0
    /// adds 1 atomically; the acquire: the last group fences again before reading. The last group puts the counter back
    /// to 0, so the counters are zero between launches (launches on the stream run one after another). Every thread of
    /// the group must call it; <paramref name="last"/> is one shared int. What the last group then adds, it adds in a
    /// fixed order, so the result does not depend on which group came last.
    /// </summary>
    public static bool ArriveLast(ArrayView<int> counters, int slot, int arrivals, ArrayView<int> last)
    {
        MemoryFence.DeviceLevel();
        Group.Barrier();
        if (Group.IdxX == 0)
        {
            int before = Atomic.Add(ref counters[slot], 1);
            bool isLast = before == arrivals - 1;
            if (isLast)
            {
                Atomic.Exchange(ref counters[slot], 0);
            }
            last[0] = isLast ? 1 : 0;
        }
        Group.Barrier();
        bool result = last[0] != 0;
        if (result)
        {
            MemoryFence.DeviceLevel();
        }
        return result;
    }

    /// <summary>The group's total of one value per thread, returned to every thread: a radix-16 tree in shared memory
    /// (sh holds at least Group.DimX floats; Group.DimX is a power of two). Every thread must call it.</summary>
    public static float GroupSum(ArrayView<float> sh, float value)
    {
        int t = Group.IdxX;
        sh[t] = value;
        Group.Barrier();
        SegmentTree(sh, t, Group.DimX, two: false);
        float total = sh[0];
        // Nobody may overwrite sh[0] before every thread has read it.
        Group.Barrier();
        return total;
    }

    /// <summary>Two totals at once (one tree for both): sh holds at least 2·<see cref="MaxThreads"/> floats. Every thread must call it.</summary>
    public static (float A, float B) GroupSum2(ArrayView<float> sh, float a, float b)
    {
        int t = Group.IdxX;
        sh[t] = a;
        sh[MaxThreads + t] = b;
        Group.Barrier();
        SegmentTree(sh, t, Group.DimX, two: true);
        var total = (sh[0], sh[MaxThreads]);
        Group.Barrier();
        return total;
    }

    // Group g of B, grid-stride: partial[g] = Σ f(a[i], b[i]) over i ≡ g·T + t (mod B·T), neighbouring threads on neighbouring elements.
    internal static void PartialKernel(ArrayView<float> a, ArrayView<float> b, ArrayView<float> partial, int n, int mode)
    {
        var sh = SharedMemory.Allocate<float>(MaxThreads);
        int stride = Grid.DimX * Group.DimX;
        float s = 0;
        for (int i = Grid.IdxX * Group.DimX + Group.IdxX; i < n; i += stride)
        {
            float v = mode == 2 ? a[i] - b[i] : a[i];
            s += mode == 0 ? v : v * v;
        }
        float total = GroupSum(sh, s);
        if (Group.IdxX == 0)
        {
            partial[Grid.IdxX] = total;
        }
    }

    // Group g: dst[g] (+)= scale·Σ_i src[g·segStride + i·elemStride], i < count.
    internal static void SegmentsKernel(ArrayView<float> src, ArrayView<float> dst, int count, int segStride, int elemStride, float scale, int accumulate)
    {
        var sh = SharedMemory.Allocate<float>(MaxThreads);
        int g = Grid.IdxX;
        float s = 0;
        for (int i = Group.IdxX; i < count; i += Group.DimX)
        {
            s += src[g * segStride + i * elemStride];
        }
        float total = GroupSum(sh, s) * scale;
        if (Group.IdxX == 0)
        {
            dst[g] = accumulate != 0 ? dst[g] + total : total;
        }
    }

    // Group (c, split) over [channels, splits]: partial[c·splits + split] = Σ dy[n, c, j] for the split's images n, j < inner.
    // The split's rows are walked as one flat range, so a 7×7 map keeps all T threads busy.
    internal static void ChannelPartialKernel(ArrayView<float> dy, ArrayView<float> partial, int n, int channels, int inner, int rowsPerSplit, int splits)
    {
        var sh = SharedMemory.Allocate<float>(MaxThreads);
        int c = Grid.IdxX / splits, first = Grid.IdxX % splits * rowsPerSplit;
        int rows = Math.Min(rowsPerSplit, n - first), length = rows * inner;
        float s = 0;
        for (int f = Group.IdxX; f < length; f += Group.DimX)
        {
            int r = f / inner;
            s += dy[((first + r) * channels + c) * inner + f - r * inner];
        }
        float total = GroupSum(sh, s);
        if (Group.IdxX == 0)
        {
            partial[Grid.IdxX] = total;
        }
    }

    // Group g, lanes L: rows g·(T/L) + t/L; lane t mod L adds x[row, j] for j ≡ lane (mod L), then the row's L partials are
    // added in a fixed tree (its segment of shared memory) and lane 0 adds the total into sums[row]. Rows past the end add
    // nothing but still reach every barrier.
    internal static void RowSumsKernel(ArrayView<float> x, ArrayView<float> sums, int rows, int cols, int lanes)
    {
        var sh = SharedMemory.Allocate<float>(MaxThreads);
        int t = Group.IdxX, lane = t & (lanes - 1);
        int row = Grid.IdxX * (Group.DimX / lanes) + t / lanes;
        float s = 0;
        if (row < rows)
        {
            int start = row * cols;
            for (int j = lane; j < cols; j += lanes)
            {
                s += x[start + j];
            }
        }
        sh[t] = s;
        Group.Barrier();
        SegmentTree(sh, t, lanes, two: false);
        if (lane == 0 && row < rows)
        {
            sums[row] += sh[t];
        }
    }

    // Grid-stride: counts the group's non-finite elements; a group that saw one lowers flag[0] to id. Every group
    // that writes writes the same id, and launches for lower ids ran earlier on the stream, so the flag ends as
    // the lowest id, with no atomics.
    internal static void FlagNonFiniteKernel(ArrayView<float> x, ArrayView<float> flag, int n, int id)
    {
        var sh = SharedMemory.Allocate<float>(MaxThreads);
        int stride = Grid.DimX * Group.DimX;
        float bad = 0;
        for (int i = Grid.IdxX * Group.DimX + Group.IdxX; i < n; i += stride)
        {
            float v = x[i];
            bad += float.IsNaN(v) || float.IsInfinity(v) ? 1f : 0f;
        }
        float total = GroupSum(sh, bad);
        if (Group.IdxX == 0 && total > 0 && flag[0] > id)
        {
            flag[0] = id;
        }
    }
}
