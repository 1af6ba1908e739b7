// The managed CPU backend's parallel loops (Cpu.For, Cpu.Items) and the helper threads they run on.

namespace Ddpm.Kernels;

/// <summary>Work splitting for the managed CPU backend.</summary>
internal static class Cpu
{
    /// <summary>Worker count: every core the process may use, or its share of them (<see cref="Tensors.CpuThreads.Share"/>).</summary>
    public static int Threads => Tensors.CpuThreads.Count;

    /// <summary>The most parts a sum over images is cut into (<see cref="Parts"/>).</summary>
    public const int MaxParts = 16;

    /// <summary>
    /// How many partial sums a reduction over <paramref name="items"/> items (images of a batch) keeps: a function of the
    /// item count alone, never of the thread count, so the parts, their contents and the order they are added in are the
    /// same on any machine and a run gives the same bits on 1 core or 64. The threads take the parts as they come.
    /// </summary>
    public static int Parts(int items) => Math.Clamp(items, 1, MaxParts);

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
            // The same chunks the helpers would have run, in order: a body sees the same ranges either way.
            for (int i = 0; i < chunks; i++)
            {
                body(state, Pool.ChunkStart(length, i, chunks), Pool.ChunkStart(length, i + 1, chunks));
            }
        }
    }

    /// <summary>Runs <paramref name="body"/>(state, i) for each item i in [0, count), items spread over the cores.</summary>
    public static void Items<TState>(int count, TState state, Action<TState, int> body)
    {
        if (count <= 1 || Threads == 1 || !Pool.TryRun(count, 0, state, body, null))
        {
            for (int i = 0; i < count; i++)
            {
                body(state, i);
            }
        }
    }

    // When the helpers are busy (a call from inside a job, or a second caller while another call runs) the work runs
    // inline on the calling thread rather than on Parallel.For: the helpers are already using the cores, so
    // Parallel.For would buy little but would allocate (closures, its loop state) on every call, and inline runs the
    // very same items or chunks, so results stay bit for bit those of a parallel run. A nested call therefore never
    // waits for the helpers its own job occupies, and cannot deadlock.

    /// <summary>Stops the helper threads and frees their scratch (<see cref="Arena"/>) and the calling thread's; the next
    /// parallel call starts them again. Waits for a running parallel call to finish; calls made meanwhile run inline.
    /// Called when a <see cref="Ddpm.Tensors.CpuDevice"/> is disposed: the pool is process-wide, so this stops the threads
    /// every CPU device shares (a device in use elsewhere just restarts them on its next parallel call).</summary>
    /// <exception cref="InvalidOperationException">Called from inside a parallel job (it would wait for itself).</exception>
    public static void Shutdown() => Pool.Shutdown();

    /// <summary>Helper threads running now (tests: a shutdown leaves none).</summary>
    internal static int RunningHelpers => Pool.RunningHelpers;

    /// <summary>
    /// The process's one set of helper threads, for <see cref="For"/> and <see cref="Items"/> and through them the
    /// GEMM's parallel split: a parallel call allocates nothing (a Parallel.For allocated about 1.5 KB; the job's state
    /// waits in <see cref="Job{TState}"/>'s static fields) and the caller works alongside the helpers, items claimed one
    /// at a time from a shared counter. One call at a time: a call made while another runs (tests in parallel) or from
    /// inside a job runs inline (above). Each helper goes Signaled -> Running -> Finished; a caller that runs out of
    /// items cancels any helper that has not woken yet (Signaled -> Finished), so a descheduled helper never stalls the
    /// call, and that helper's late wake-up finds nothing to do. <see cref="Shutdown"/> moves idle helpers to Stopping.
    /// </summary>
    private static class Pool
    {
        private const int Signaled = 1, Running = 2, Finished = 3, Stopping = 4;

        private sealed class Helper
        {
            public readonly SemaphoreSlim Wake = new(0);
            public int State = Finished;
            public Thread? Thread;
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
        private static Ddpm.Tensors.SimdLevel s_level;
        [ThreadStatic] private static bool t_inJob;

        public static int RunningHelpers => Volatile.Read(ref s_helpers)?.Length ?? 0;

        public static int ChunkStart(int length, int i, int chunks) => (int)((long)length * i / chunks);

        public static bool TryRun<TState>(int count, int length, TState state, Action<TState, int>? items, Action<TState, int, int>? range)
        {
            if (t_inJob || Interlocked.CompareExchange(ref s_busy, 1, 0) != 0)
            {
                return false;
            }
            try
            {
                Helper[] helpers = s_helpers ?? Start(Threads - 1);
                (Job<TState>.State, Job<TState>.Items, Job<TState>.Range) = (state, items, range);
                (s_items, s_range) = (items is null ? null : Job<TState>.RunItem, range is null ? null : Job<TState>.RunRange);
                (s_count, s_length, s_error) = (count, length, null);
                // The caller's instruction level (its device's, for the op that runs): the helpers run the job at it.
                s_level = Ddpm.Tensors.CpuSimd.Level;
                Volatile.Write(ref s_next, 0);
                int used = Math.Min(helpers.Length, count - 1);
                for (int t = 0; t < used; t++)
                {
                    // Interlocked/volatile accesses order the job fields above before the helper's claim.
                    Volatile.Write(ref helpers[t].State, Signaled);
                    helpers[t].Wake.Release();
                }
                Work();
                for (int t = 0; t < used; t++)
                {
                    Helper h = helpers[t];
                    if (Interlocked.CompareExchange(ref h.State, Finished, Signaled) == Signaled)
                    {
                        continue; // never woke
                    }
                    // The helper is on its last item (a few hundred µs at most): spin rather than block, but let other
                    // threads run if it takes longer.
                    var spin = new SpinWait();
                    while (Volatile.Read(ref h.State) != Finished)
                    {
                        spin.SpinOnce(sleep1Threshold: -1);
                    }
                }
                // The first exception any item threw, once; the other items still ran.
                if (s_error is { } error)
                {
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(error);
                }
                return true;
            }
            finally
            {
                (Job<TState>.State, Job<TState>.Items, Job<TState>.Range) = (default, null, null);
                (s_items, s_range, s_error) = (null, null, null);
                Volatile.Write(ref s_busy, 0);
            }
        }

        public static void Shutdown()
        {
            if (t_inJob)
            {
                throw new InvalidOperationException("Cpu.Shutdown was called from inside a parallel job; it would wait for itself.");
            }
            // Take the pool as a caller would, so no job is running and every helper is Finished (or about to see a
            // stale wake-up); parallel calls made meanwhile run inline.
            var spin = new SpinWait();
            while (Interlocked.CompareExchange(ref s_busy, 1, 0) != 0)
            {
                spin.SpinOnce();
            }
            try
            {
                if (s_helpers is { } helpers)
                {
                    foreach (Helper h in helpers)
                    {
                        Volatile.Write(ref h.State, Stopping);
                        h.Wake.Release();
                    }
                    foreach (Helper h in helpers)
                    {
                        h.Thread!.Join();
                        h.Wake.Dispose();
                    }
                    Volatile.Write(ref s_helpers, null);
                }
                Arena.FreeCurrent();
            }
            finally
            {
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
                            s_range!(ChunkStart(s_length, i, s_count), ChunkStart(s_length, i + 1, s_count));
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

        /// <summary>Starts the helpers (the only allocations of the parallel path, once per start); called under s_busy.</summary>
        private static Helper[] Start(int count)
        {
            var helpers = new Helper[Math.Max(count, 0)];
            for (int i = 0; i < helpers.Length; i++)
            {
                Helper h = helpers[i] = new Helper();
                h.Thread = new Thread(() => HelperLoop(h)) { IsBackground = true, Name = $"CPU backend helper {i + 1}" };
                h.Thread.Start();
            }
            Tensors.CpuDevice.StopRuntime = Shutdown;
            Volatile.Write(ref s_helpers, helpers);
            return helpers;
        }

        private static void HelperLoop(Helper h)
        {
            try
            {
                while (true)
                {
                    h.Wake.Wait();
                    int state = Interlocked.CompareExchange(ref h.State, Running, Signaled);
                    if (state == Stopping)
                    {
                        return;
                    }
                    if (state != Signaled)
                    {
                        continue; // cancelled: the caller ran out of items before this helper woke
                    }
                    using (Ddpm.Tensors.CpuSimd.Enter(s_level))
                    {
                        Work();
                    }
                    Volatile.Write(ref h.State, Finished);
                }
            }
            finally
            {
                Arena.FreeCurrent();
            }
        }
    }
}
