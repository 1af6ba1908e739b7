// The managed CPU backend's GEMM's own helper threads (the driver and its overview: Gemm.cs).
//
// parallel=true splits C into one column (or row) stripe per core: the caller computes one, dedicated background
// helper threads the others, and the caller takes over any stripe whose helper has not started by the time it is done
// (so a busy core costs nothing). No allocation per call. If another parallel call already owns the helpers, the call
// simply runs serially on the calling thread.

using System.Runtime.ExceptionServices;

namespace Ddpm.Kernels;

public static unsafe partial class Gemm
{
    // ---------------------------------------------------------------------------------------------------------------
    // Parallel split: dedicated helper threads instead of Parallel.For, so a parallel call allocates nothing and wakes
    // exactly the threads it needs. One job at a time; a concurrent parallel caller falls back to running serially.
    // ---------------------------------------------------------------------------------------------------------------

    private static class Workers
    {
        // Helper state machine: the caller moves Finished -> Signaled before waking a helper; the helper claims its
        // part with Signaled -> Running and ends with Running -> Finished. A caller that finishes its own part first
        // steals any part whose helper has not woken yet (Signaled -> Finished), so a descheduled helper never
        // stalls the call; the helper then finds its wake-up stale and goes back to sleep.
        private const int Signaled = 1, Running = 2, Finished = 3;

        private sealed class Helper
        {
            public readonly SemaphoreSlim Wake = new(0);
            public int State = Finished;
        }

        private static int s_busy;
        private static Helper[]? s_helpers;
        private static Exception? s_error;

        // The current job, written by the owner of s_busy before it signals the helpers.
        private static delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> s_fn;
        private static int s_m, s_n, s_k, s_aRow, s_aCol, s_bRow, s_bCol, s_ldc, s_per;
        private static float* s_a, s_b, s_c;
        private static bool s_acc, s_splitColumns;

        public static bool TryRun(delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> fn, int mr, int nr,
            int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
        {
            if (Interlocked.CompareExchange(ref s_busy, 1, 0) != 0) return false;
            try
            {
                Helper[] helpers = EnsureHelpers(Environment.ProcessorCount - 1);
                int workers = helpers.Length + 1;
                // Stripes are whole panels, so the split creates no new edge tiles. Column stripes each pack all of A
                // (small: weights) and their own part of B (large: im2col); row stripes each pack all of B. So prefer
                // columns unless rows balance clearly better (n = 196: 3 + 2 panels vs 64 + 64 rows; n = 49: 48 + 1).
                int nTiles = (n + nr - 1) / nr, mTiles = (m + mr - 1) / mr;
                int perCol = (nTiles + workers - 1) / workers * nr, perRow = (mTiles + workers - 1) / workers * mr;
                bool splitColumns = (double)Math.Min(perCol, n) / n <= 1.15 * Math.Min(perRow, m) / m;
                int per = splitColumns ? perCol : perRow;
                int parts = splitColumns ? (n + per - 1) / per : (m + per - 1) / per;
                if (parts < 2) return false;
                s_fn = fn;
                s_m = m; s_n = n; s_k = k; s_a = a; s_aRow = aRow; s_aCol = aCol; s_b = b; s_bRow = bRow; s_bCol = bCol;
                s_c = c; s_ldc = ldc; s_acc = accumulate; s_splitColumns = splitColumns; s_per = per;
                s_error = null;
                for (int t = 1; t < parts; t++)
                {
                    // Interlocked/volatile accesses order the job fields above before the helper's claim of its part.
                    Volatile.Write(ref helpers[t - 1].State, Signaled);
                    helpers[t - 1].Wake.Release();
                }
                Exception? own = null;
                try { RunPart(0); }
                catch (Exception e) { own = e; }
                for (int t = 1; t < parts; t++)
                {
                    Helper h = helpers[t - 1];
                    if (Interlocked.CompareExchange(ref h.State, Finished, Signaled) == Signaled)
                    {
                        try { RunPart(t); }
                        catch (Exception e) { own ??= e; }
                        continue;
                    }
                    // The helper is running its part (a few hundred µs at most): spin rather than block, but let
                    // other threads run if it takes longer.
                    var spin = new SpinWait();
                    while (Volatile.Read(ref h.State) != Finished) spin.SpinOnce(sleep1Threshold: -1);
                }
                if (own != null) ExceptionDispatchInfo.Throw(own);
                if (s_error is { } err) ExceptionDispatchInfo.Throw(err);
                return true;
            }
            finally
            {
                Volatile.Write(ref s_busy, 0);
            }
        }

        private static void RunPart(int t)
        {
            int o = t * s_per;
            if (s_splitColumns)
                s_fn(s_m, Math.Min(s_per, s_n - o), s_k, s_a, s_aRow, s_aCol, s_b + (long)o * s_bCol, s_bRow, s_bCol, s_c + o, s_ldc, s_acc);
            else
                s_fn(Math.Min(s_per, s_m - o), s_n, s_k, s_a + (long)o * s_aRow, s_aRow, s_aCol, s_b, s_bRow, s_bCol, s_c + (long)o * s_ldc, s_ldc, s_acc);
        }

        /// <summary>Starts the helpers on first use (the only allocations of the parallel path); called under s_busy.</summary>
        private static Helper[] EnsureHelpers(int count)
        {
            if (s_helpers != null) return s_helpers;
            var helpers = new Helper[Math.Max(count, 0)];
            for (int i = 0; i < helpers.Length; i++)
            {
                Helper h = helpers[i] = new Helper();
                int part = i + 1;
                new Thread(() => HelperLoop(h, part)) { IsBackground = true, Name = $"Gemm helper {part}" }.Start();
            }
            return s_helpers = helpers;
        }

        private static void HelperLoop(Helper h, int part)
        {
            while (true)
            {
                h.Wake.Wait();
                if (Interlocked.CompareExchange(ref h.State, Running, Signaled) != Signaled) continue; // stolen by the caller
                try { RunPart(part); }
                catch (Exception e) { s_error = e; }
                finally { Volatile.Write(ref h.State, Finished); }
            }
        }
    }
}
