// The managed CPU backend's one per-thread scratch allocator: every kernel's scratch (GEMM packing panels, the
// convolution's padded planes, wide results, offsets, lowered matrices and partial sums, group norm's du, a
// reduction's chunk sums) is a named
// slot of the calling thread's arena.

using System.Runtime.InteropServices;

namespace Ddpm.Kernels;

/// <summary>The named scratch blocks of <see cref="Arena"/>. A slot is one buffer per thread: two buffers a kernel
/// holds at the same time must be different slots, or the second request would hand back (or free) the first.</summary>
internal enum ArenaSlot
{
    /// <summary>The GEMM's packed A block (<see cref="Gemm"/>).</summary>
    GemmA,

    /// <summary>The GEMM's packed B micro-panel.</summary>
    GemmB,

    /// <summary>The implicit convolution's padded copy of the current image(s).</summary>
    ConvPlanes,

    /// <summary>The implicit convolution's wide GEMM result (forward, input gradient) or wide dy (weight gradient).</summary>
    ConvWide,

    /// <summary>The row offsets of the implicitly lowered matrix, shared read-only by the workers of one call.</summary>
    ConvOffsets,

    /// <summary>The input gradient's flipped, transposed kernel, shared read-only by the workers of one call.</summary>
    ConvWeights,

    /// <summary>The weights packed once per call for the GEMM, shared read-only by the workers of one call.</summary>
    ConvPackedA,

    /// <summary>One padded input row, for the input gradient's stride-phase split.</summary>
    ConvLine,

    /// <summary>The explicit lowering's im2col matrix.</summary>
    Col,

    /// <summary>The per-worker partial sums of one weight gradient, written by the workers while the caller waits.</summary>
    Partials,

    /// <summary>Group norm's fused backward: du = dy·silu'(u) of one group.</summary>
    GroupNormDu,

    /// <summary>A CPU reduction's per-chunk sums (doubles), written by the workers while the caller waits.</summary>
    ReduceChunks,

    /// <summary>Group norm's backward: per (n, c) Σ du and Σ du·x (doubles), written by the workers while the caller waits.</summary>
    GroupNormSums,
}

/// <summary>
/// Per-thread scratch memory for the CPU kernels: one block per <see cref="ArenaSlot"/>, native and 64-byte aligned (a
/// packed row or a vector load never splits a cache line), grown on demand and kept, so a training step allocates
/// nothing once the first step has sized it. Per thread, so concurrent callers never share a block; a block that the
/// workers of one call share (offsets, packed weights, partial sums) is the calling thread's, and the call waits for
/// its workers. The pool's helpers free theirs when the pool stops (<see cref="Cpu.Shutdown"/>); any other thread's
/// arena is freed by the finalizer once the thread is gone, or by <see cref="FreeCurrent"/>.
/// </summary>
internal sealed unsafe class Arena
{
    [ThreadStatic] private static Arena? t_current;

    private static readonly int SlotCount = Enum.GetValues<ArenaSlot>().Length;

    private readonly void*[] _blocks = new void*[SlotCount];
    private readonly nuint[] _bytes = new nuint[SlotCount];

    /// <summary>The calling thread's arena, made on first use.</summary>
    public static Arena Current => t_current ??= new Arena();

    /// <summary>Frees the calling thread's arena now (a later <see cref="Current"/> starts an empty one). Only between
    /// kernel calls: a pointer handed out before is dangling afterwards.</summary>
    public static void FreeCurrent()
    {
        if (t_current is { } arena)
        {
            t_current = null;
            arena.Free();
            GC.SuppressFinalize(arena);
        }
    }

    /// <summary>The block of <paramref name="slot"/>, at least <paramref name="floats"/> floats, 64-byte aligned. Its
    /// contents are undefined after growth (the old block is freed, not copied: no kernel carries scratch over).</summary>
    public float* Floats(ArenaSlot slot, long floats) => (float*)Bytes(slot, checked((nuint)floats * sizeof(float)));

    /// <summary>The block of <paramref name="slot"/> as ints, at least <paramref name="count"/> of them.</summary>
    public int* Ints(ArenaSlot slot, int count) => (int*)Bytes(slot, checked((nuint)count * sizeof(int)));

    /// <summary>The block of <paramref name="slot"/> as doubles, at least <paramref name="count"/> of them, as an address
    /// (a kernel's static lambda gets it through its state tuple, which cannot hold a pointer).</summary>
    public nint Doubles(ArenaSlot slot, int count) => (nint)Bytes(slot, checked((nuint)count * sizeof(double)));

    /// <summary>The block of <paramref name="slot"/> as a span of <paramref name="floats"/> floats.</summary>
    public Span<float> Span(ArenaSlot slot, int floats) => new(Floats(slot, floats), floats);

    /// <summary>Bytes held for <paramref name="slot"/> now (tests: growth replaces the size rather than keeping a stale one).</summary>
    public nuint Capacity(ArenaSlot slot) => _bytes[(int)slot];

    private void* Bytes(ArenaSlot slot, nuint bytes)
    {
        int s = (int)slot;
        if (bytes > _bytes[s])
        {
            // Free first and record the empty slot before allocating, so a failed allocation leaves no freed pointer
            // or stale capacity behind for the next request to trust.
            NativeMemory.AlignedFree(_blocks[s]);
            _blocks[s] = null;
            _bytes[s] = 0;
            _blocks[s] = NativeMemory.AlignedAlloc(bytes, 64);
            _bytes[s] = bytes;
        }
        return _blocks[s];
    }

    private void Free()
    {
        for (int s = 0; s < _blocks.Length; s++)
        {
            NativeMemory.AlignedFree(_blocks[s]);
            _blocks[s] = null;
            _bytes[s] = 0;
        }
    }

    /// <summary>The owning thread is gone (nothing else references a [ThreadStatic] arena): return its native memory.</summary>
    ~Arena() => Free();
}
