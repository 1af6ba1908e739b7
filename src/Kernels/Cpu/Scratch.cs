// Per-thread scratch arrays of the managed CPU backend's convolution (the explicit im2col lowering, the
// per-worker partial sums of a weight gradient).

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Ddpm.Kernels;

/// <summary>Per-thread scratch memory for the CPU kernels: pinned, grown on demand and kept, so
/// a training step allocates nothing once the first step has sized it.</summary>
internal static unsafe class Scratch
{
    [ThreadStatic] private static float[]? _col;
    [ThreadStatic] private static float[]? _partials;

    /// <summary>This thread's lowering buffer, at least <paramref name="length"/> floats.</summary>
    public static float* Col(int length)
    {
        if (_col is null || _col.Length < length)
        {
            _col = GC.AllocateUninitializedArray<float>(length, pinned: true);
        }
        return (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_col));
    }

    /// <summary>The calling thread's buffer of <paramref name="workers"/>·<paramref name="length"/> floats
    /// for the per-worker partial sums of one weight-gradient call; the workers write into it while the
    /// caller waits. Per calling thread: a single shared buffer let concurrent weight gradients (tests run
    /// in parallel) overwrite, or reallocate and free, each other's partial sums.</summary>
    public static float* Partials(int workers, int length)
    {
        long need = (long)workers * length;
        if (_partials is null || _partials.Length < need)
        {
            _partials = GC.AllocateUninitializedArray<float>((int)need, pinned: true);
        }
        return (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_partials));
    }
}
