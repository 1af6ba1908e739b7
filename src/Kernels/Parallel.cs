namespace Ddpm.Kernels;

/// <summary>Work splitting for the managed CPU backend.</summary>
internal static class Cpu
{
    /// <summary>Worker count: every core the process may use.</summary>
    public static int Threads => Environment.ProcessorCount;

    /// <summary>Runs <paramref name="body"/>(start, end) over [0, length) in contiguous chunks, on
    /// every core when the work is large enough to pay for the hand-off, else inline.</summary>
    public static void For(int length, int grain, Action<int, int> body)
    {
        int chunks = Math.Min(Threads, (length + grain - 1) / Math.Max(grain, 1));
        if (chunks <= 1)
        {
            body(0, length);
            return;
        }
        Parallel.For(0, chunks, i =>
        {
            long start = (long)length * i / chunks, end = (long)length * (i + 1) / chunks;
            body((int)start, (int)end);
        });
    }

    /// <summary>Runs <paramref name="body"/>(i) for each item i in [0, count), items spread over the cores.</summary>
    public static void Items(int count, Action<int> body)
    {
        if (count <= 1 || Threads == 1)
        {
            for (int i = 0; i < count; i++)
            {
                body(i);
            }
            return;
        }
        Parallel.For(0, count, body);
    }
}

/// <summary>Small SIMD span helpers for the CPU kernels.</summary>
internal static class Simd
{
    /// <summary>dst[i] += value.</summary>
    public static void AddScalar(Span<float> dst, float value)
    {
        var v = new System.Numerics.Vector<float>(value);
        int n = System.Numerics.Vector<float>.Count, i = 0;
        for (; i <= dst.Length - n; i += n)
        {
            (new System.Numerics.Vector<float>(dst.Slice(i)) + v).CopyTo(dst.Slice(i));
        }
        for (; i < dst.Length; i++)
        {
            dst[i] += value;
        }
    }

    /// <summary>dst[i] += src[i].</summary>
    public static void AddInPlace(Span<float> dst, ReadOnlySpan<float> src)
    {
        int n = System.Numerics.Vector<float>.Count, i = 0;
        for (; i <= dst.Length - n; i += n)
        {
            (new System.Numerics.Vector<float>(dst.Slice(i)) + new System.Numerics.Vector<float>(src.Slice(i))).CopyTo(dst.Slice(i));
        }
        for (; i < dst.Length; i++)
        {
            dst[i] += src[i];
        }
    }
}
