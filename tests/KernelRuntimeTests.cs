using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>The managed CPU backend's runtime: its one pool of helper threads (<c>Cpu</c>: nested and concurrent
/// calls, errors, shutdown and restart) and its one per-thread scratch arena (<c>Arena</c>). In the quiet collection:
/// the shutdown tests count the helpers, which a concurrent test would restart.</summary>
[Collection(QuietCollection.Name)]
public sealed unsafe class KernelRuntimeTests
{
    private sealed class Boom : Exception
    {
    }

    [Fact]
    public void NestedCallRunsInlineAndCompletes()
    {
        const int outer = 8, inner = 1000;
        var hits = new int[outer * inner];
        var innerThreads = new int[outer];
        var outerThreads = new int[outer];
        Cpu.Items(outer, (hits, innerThreads, outerThreads), static (s, i) =>
        {
            s.outerThreads[i] = Environment.CurrentManagedThreadId;
            // A parallel call from inside a job: the helpers are busy with this very job, so it runs inline here.
            Cpu.For(inner, 1, (s.hits, s.innerThreads, i), static (t, first, last) =>
            {
                t.innerThreads[t.i] = Environment.CurrentManagedThreadId;
                for (int j = first; j < last; j++)
                {
                    Interlocked.Increment(ref t.hits[t.i * inner + j]);
                }
            });
        });
        Assert.All(hits, h => Assert.Equal(1, h));
        Assert.Equal(outerThreads, innerThreads);
    }

    [Fact]
    public void TwoConcurrentCallersBothGetCorrectResults()
    {
        const int m = 96, n = 200, k = 160, rounds = 20;
        var rng = new Random(3);
        float[] a = Enumerable.Range(0, m * k).Select(_ => (float)rng.Next(-3, 4)).ToArray();
        float[] b = Enumerable.Range(0, k * n).Select(_ => (float)rng.Next(-3, 4)).ToArray();
        var want = new float[m * n];
        fixed (float* pa = a, pb = b, pw = want)
        {
            Gemm.MultiplyNaive(m, n, k, pa, k, 1, pb, n, 1, pw, n, accumulate: false);
        }
        using var start = new Barrier(2);
        float[][] Caller()
        {
            start.SignalAndWait();
            var results = new float[rounds][];
            for (int r = 0; r < rounds; r++)
            {
                // One caller gets the helpers, the other runs the same stripes inline; both must be exact (small ints).
                var c = results[r] = new float[m * n];
                fixed (float* pa = a, pb = b, pc = c)
                {
                    Gemm.Multiply(m, n, k, pa, k, 1, pb, n, 1, pc, n, accumulate: false, parallel: true);
                }
            }
            return results;
        }
        var results = new float[2][][];
        var callers = Enumerable.Range(0, 2).Select(t => new Thread(() => results[t] = Caller())).ToArray();
        foreach (var caller in callers)
        {
            caller.Start();
        }
        foreach (var caller in callers)
        {
            caller.Join();
        }
        Assert.All(results, r => Assert.Equal(rounds, r.Length));
        foreach (float[] c in results.SelectMany(r => r))
        {
            Assert.Equal(want, c);
        }
    }

    [Fact]
    public void InlineStripesMatchTheParallelGemmBitForBit()
    {
        const int m = 70, n = 333, k = 517;
        var rng = new Random(9);
        float[] a = Enumerable.Range(0, m * k).Select(_ => (float)rng.NextDouble() - 0.5f).ToArray();
        float[] b = Enumerable.Range(0, k * n).Select(_ => (float)rng.NextDouble() - 0.5f).ToArray();
        var parallel = new float[m * n];
        var nested = new float[m * n];
        fixed (float* pa = a, pb = b, pc = parallel, pn = nested)
        {
            Gemm.Multiply(m, n, k, pa, k, 1, pb, n, 1, pc, n, accumulate: false, parallel: true);
            // From inside a job the split runs inline: the same stripes, so the same roundings.
            Cpu.Items(2, ((nint)pa, (nint)pb, (nint)pn), static (s, i) =>
            {
                if (i == 0)
                {
                    Gemm.Multiply(m, n, k, (float*)s.Item1, k, 1, (float*)s.Item2, n, 1, (float*)s.Item3, n, accumulate: false, parallel: true);
                }
            });
        }
        Assert.Equal(parallel, nested);
    }

    [Fact]
    public void AnExceptionInAJobPropagatesOnceAndThePoolStaysUsable()
    {
        var ran = new int[16];
        // Two items throw; the caller sees one exception (not an AggregateException), after every item has run.
        Assert.Throws<Boom>(() => Cpu.Items(ran.Length, ran, static (r, i) =>
        {
            Interlocked.Increment(ref r[i]);
            if (i is 3 or 11)
            {
                throw new Boom();
            }
        }));
        Assert.All(ran, r => Assert.Equal(1, r));
        Assert.Throws<Boom>(() => Cpu.For(1 << 20, 1, 0, static (_, first, _) =>
        {
            if (first == 0)
            {
                throw new Boom();
            }
        }));
        var sums = new long[4];
        Cpu.Items(sums.Length, sums, static (s, i) => s[i] = i + 1);
        Assert.Equal([1L, 2L, 3L, 4L], sums);
    }

    [Fact]
    public void ShutdownStopsTheHelpersAndTheNextCallRestartsThem()
    {
        var ones = new int[64];
        Cpu.Items(ones.Length, ones, static (o, i) => o[i] = 1);
        Assert.Equal(Cpu.Threads - 1, Cpu.RunningHelpers);

        Cpu.Shutdown();
        Assert.Equal(0, Cpu.RunningHelpers);
        Cpu.Shutdown(); // stopping a stopped pool is a no-op

        var twos = new int[64];
        Cpu.Items(twos.Length, twos, static (o, i) => o[i] = 2);
        Assert.All(twos, v => Assert.Equal(2, v));
        Assert.Equal(Cpu.Threads - 1, Cpu.RunningHelpers);
    }

    [Fact]
    public void DisposingACpuDeviceStopsTheHelpersAndLaterOpsStillRun()
    {
        using (var device = new CpuDevice())
        {
            using var x = Tensor.FromHost(device, Enumerable.Range(0, 1 << 18).Select(i => (float)(i % 7)).ToArray(), 1 << 18);
            using var y = Tensor.Empty(device, 1 << 18);
            Elementwise.Scale(x, 2f, y);
            Assert.Equal(Cpu.Threads - 1, Cpu.RunningHelpers);
        }
        Assert.Equal(0, Cpu.RunningHelpers);

        // The shared device (never disposed) still works: its next parallel op restarts the helpers.
        var cpu = CpuDevice.Instance;
        using var a = Tensor.FromHost(cpu, Enumerable.Range(0, 1 << 18).Select(i => (float)(i % 5)).ToArray(), 1 << 18);
        using var b = Tensor.Empty(cpu, 1 << 18);
        Elementwise.Scale(a, 3f, b);
        Assert.Equal(Enumerable.Range(0, 1 << 18).Select(i => 3f * (i % 5)), b.ToArray());
        Assert.Equal(Cpu.Threads - 1, Cpu.RunningHelpers);
    }

    [Fact]
    public void ShutdownFromInsideAJobIsRefused()
    {
        var refused = new int[2];
        Cpu.Items(2, refused, static (r, i) =>
        {
            try
            {
                Cpu.Shutdown();
            }
            catch (InvalidOperationException)
            {
                r[i] = 1;
            }
        });
        // On one core there are no helpers: the items run inline, outside any job, and stopping is allowed.
        Assert.Equal(Cpu.Threads > 1 ? [1, 1] : [0, 0], refused);
    }

    /// <summary>Runs <paramref name="test"/> on a thread of its own, so its arena starts empty and dies with it.</summary>
    private static void OnFreshThread(Action test)
    {
        Exception? error = null;
        var thread = new Thread(() =>
        {
            try
            {
                test();
            }
            catch (Exception e)
            {
                error = e;
            }
            finally
            {
                Arena.FreeCurrent();
            }
        });
        thread.Start();
        thread.Join();
        if (error != null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(error);
        }
    }

    [Fact]
    public void ArenaBlocksAre64ByteAligned() => OnFreshThread(() =>
    {
        var arena = Arena.Current;
        foreach (ArenaSlot slot in Enum.GetValues<ArenaSlot>())
        {
            foreach (int floats in new[] { 1, 3, 17, 1000, 123457 })
            {
                Assert.Equal(0, (long)arena.Floats(slot, floats) % 64);
            }
        }
    });

    [Fact]
    public void ArenaGrowthReplacesTheSizeAndKeepsTheBlockForSmallerRequests() => OnFreshThread(() =>
    {
        var arena = Arena.Current;
        Assert.Equal(0u, arena.Capacity(ArenaSlot.GemmB));
        float* small = arena.Floats(ArenaSlot.GemmB, 10);
        Assert.Equal(40u, arena.Capacity(ArenaSlot.GemmB));
        float* large = arena.Floats(ArenaSlot.GemmB, 100_000);
        Assert.Equal(400_000u, arena.Capacity(ArenaSlot.GemmB));
        // Every float of the grown block is usable (a stale size would under-allocate and this would corrupt the heap).
        new Span<float>(large, 100_000).Fill(1f);
        Assert.True(arena.Floats(ArenaSlot.GemmB, 50) == large);
        Assert.Equal(400_000u, arena.Capacity(ArenaSlot.GemmB));
        Assert.True(small != null);

        Arena.FreeCurrent();
        Assert.Equal(0u, Arena.Current.Capacity(ArenaSlot.GemmB));
    });

    [Fact]
    public void ArenaSlotsDoNotAlias() => OnFreshThread(() =>
    {
        var arena = Arena.Current;
        var slots = Enum.GetValues<ArenaSlot>();
        const int floats = 4096;
        var blocks = slots.Select(s => (nint)arena.Floats(s, floats)).ToArray();
        for (int i = 0; i < slots.Length; i++)
        {
            new Span<float>((float*)blocks[i], floats).Fill(i);
        }
        for (int i = 0; i < slots.Length; i++)
        {
            Assert.All(new Span<float>((float*)blocks[i], floats).ToArray(), v => Assert.Equal(i, v));
            for (int j = i + 1; j < slots.Length; j++)
            {
                Assert.True(blocks[i] + floats * sizeof(float) <= blocks[j] || blocks[j] + floats * sizeof(float) <= blocks[i]);
            }
        }
    });

    [Fact]
    public void ArenasArePerThread()
    {
        var blocks = new nint[2];
        using var held = new Barrier(2);
        var threads = Enumerable.Range(0, 2).Select(t => new Thread(() =>
        {
            blocks[t] = (nint)Arena.Current.Floats(ArenaSlot.Col, 1024);
            // Both blocks are live here: a shared arena would have handed the same block to both threads.
            held.SignalAndWait();
            Arena.FreeCurrent();
        })).ToArray();
        foreach (var thread in threads)
        {
            thread.Start();
        }
        foreach (var thread in threads)
        {
            thread.Join();
        }
        Assert.NotEqual(blocks[0], blocks[1]);
    }
}
