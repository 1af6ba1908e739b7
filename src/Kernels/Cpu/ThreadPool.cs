// The managed CPU backend's parallel loops (Cpu.For, Cpu.Items) and the helper threads they run on.

namespace Ddpm.Kernels;

/// <summary>Work splitting for the managed CPU backend.</summary>
internal static class Cpu
{
    /// <summary>Worker count: every core the process may use.</summary>
    public static int Threads => Environment.ProcessorCount;

    // The bodies are static lambdas that get their arrays and sizes through a state value (a tuple or a small struct)
    // rather than captures: a capturing lambda allocates a closure and a delegate on every call, a static one nothing.

    /// <summary>Runs <paramref name="body"/>(state, start, end) over [0, length) in contiguous chunks, on every core
    /// when the work is large enough to pay for the hand-off, else inline.</summary>
    public static void For<TState>(int length, int grain, TState state, Action<TState, int, int> body)
    {
        int chunks = Math.Min(Threads, (length + grain - 1) / Math.Max(grain, 1));
        if (chunks <= 1)
        {
            body(state, 0, length);
            return;
        }
        if (!Pool.TryRun(chunks, length, state, null, body))
        {
            RangesOnThreadPool(length, chunks, state, body);
        }
    }

    /// <summary>Runs <paramref name="body"/>(state, i) for each item i in [0, count), items spread over the cores.</summary>
    public static void Items<TState>(int count, TState state, Action<TState, int> body)
    {
        if (count <= 1 || Threads == 1)
        {
            for (int i = 0; i < count; i++)
            {
                body(state, i);
            }
            return;
        }
        if (!Pool.TryRun(count, 0, state, body, null))
        {
            ItemsOnThreadPool(count, state, body);
        }
    }

    // The fallbacks when the helpers are busy (another caller, or a call from inside a job). Their lambdas live in methods
    // of their own: C# allocates a method's closure on entry, so in For or Items it would be paid on every call.

    private static void RangesOnThreadPool<TState>(int length, int chunks, TState state, Action<TState, int, int> body) =>
        Parallel.For(0, chunks, i =>
        {
            long start = (long)length * i / chunks, end = (long)length * (i + 1) / chunks;
            body(state, (int)start, (int)end);
        });

    private static void ItemsOnThreadPool<TState>(int count, TState state, Action<TState, int> body) =>
        Parallel.For(0, count, i => body(state, i));

    /// <summary>
    /// Dedicated helper threads for <see cref="For"/> and <see cref="Items"/>: a parallel call allocates nothing (a
    /// Parallel.For allocated about 1.5 KB; the job's state waits in <see cref="Job{TState}"/>'s static fields) and the
    /// caller works alongside the helpers, items claimed one at a time from a shared counter. One call at a time: a call made while another runs (tests in parallel) or from inside a
    /// job falls back to Parallel.For. Each helper goes Signaled -> Running -> Finished; a caller that runs out of
    /// items cancels any helper that has not woken yet (Signaled -> Finished), so a descheduled helper never stalls
    /// the call, and that helper's late wake-up finds nothing to do.
    /// </summary>
    private static class Pool
    {
        private const int Signaled = 1, Running = 2, Finished = 3;

        private sealed class Helper
        {
            public readonly SemaphoreSlim Wake = new(0);
            public int State = Finished;
        }

        private static int s_busy, s_next, s_count, s_length;
        private static Helper[]? s_helpers;
        /// <summary>The running job's state and body for one state type, and delegates made once per type that call it.</summary>
        private static class Job<TState>
        {
            public static TState? State;
            public static Action<TState, int>? Items;
            public static Action<TState, int, int>? Range;
            public static readonly Action<int> RunItem = static i => Items!(State!, i);
            public static readonly Action<int, int> RunRange = static (start, end) => Range!(State!, start, end);
        }

        private static Action<int>? s_items;
        private static Action<int, int>? s_range;
        private static Exception? s_error;
        [ThreadStatic] private static bool t_inJob;

        public static bool TryRun<TState>(int count, int length, TState state, Action<TState, int>? items, Action<TState, int, int>? range)
        {
            if (t_inJob || Interlocked.CompareExchange(ref s_busy, 1, 0) != 0) return false;
            try
            {
                Helper[] helpers = EnsureHelpers(Threads - 1);
                (Job<TState>.State, Job<TState>.Items, Job<TState>.Range) = (state, items, range);
                (s_items, s_range) = (items is null ? null : Job<TState>.RunItem, range is null ? null : Job<TState>.RunRange);
                (s_count, s_length, s_error) = (count, length, null);
                Volatile.Write(ref s_next, 0);
                int used = Math.Min(helpers.Length, count - 1);
                for (int t = 0; t < used; t++)
                {
                    Volatile.Write(ref helpers[t].State, Signaled);
                    helpers[t].Wake.Release();
                }
                Work();
                for (int t = 0; t < used; t++)
                {
                    Helper h = helpers[t];
                    if (Interlocked.CompareExchange(ref h.State, Finished, Signaled) == Signaled) continue; // never woke
                    var spin = new SpinWait();
                    while (Volatile.Read(ref h.State) != Finished) spin.SpinOnce(sleep1Threshold: -1);
                }
                if (s_error is { } error) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(error);
                return true;
            }
            finally
            {
                (Job<TState>.State, Job<TState>.Items, Job<TState>.Range) = (default, null, null);
                (s_items, s_range, s_error) = (null, null, null);
                Volatile.Write(ref s_busy, 0);
            }
        }

        private static void Work()
        {
            t_inJob = true;
            try
            {
                int i;
                while ((i = Interlocked.Increment(ref s_next) - 1) < s_count)
                {
                    try
                    {
                        if (s_items is { } items)
                        {
                            items(i);
                        }
                        else
                        {
                            long start = (long)s_length * i / s_count, end = (long)s_length * (i + 1) / s_count;
                            s_range!((int)start, (int)end);
                        }
                    }
                    catch (Exception e)
                    {
                        Interlocked.CompareExchange(ref s_error, e, null);
                    }
                }
            }
            finally
            {
                t_inJob = false;
            }
        }

        /// <summary>Starts the helpers on first use; called under s_busy.</summary>
        private static Helper[] EnsureHelpers(int count)
        {
            if (s_helpers != null) return s_helpers;
            var helpers = new Helper[Math.Max(count, 0)];
            for (int i = 0; i < helpers.Length; i++)
            {
                Helper h = helpers[i] = new Helper();
                new Thread(() => HelperLoop(h)) { IsBackground = true, Name = $"CPU backend helper {i + 1}" }.Start();
            }
            return s_helpers = helpers;
        }

        private static void HelperLoop(Helper h)
        {
            while (true)
            {
                h.Wake.Wait();
                if (Interlocked.CompareExchange(ref h.State, Running, Signaled) != Signaled) continue; // cancelled
                Work();
                Volatile.Write(ref h.State, Finished);
            }
        }
    }
}
