// The CPU kernels' handle on a tensor's elements: a view of a flat buffer (a parameter, a gradient) starts at an
// offset into its parent's storage, so the kernels index from the tensor's first element, never from the array's.

using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>
/// A CPU tensor's elements from its first one (<see cref="Tensor.Pointer"/>: its offset into shared storage already
/// added), indexed from 0. Taken once per call; a loop over it costs what a loop over a raw pointer costs. Valid while
/// the tensor lives (CPU storage is pinned).
/// </summary>
internal readonly unsafe struct Floats
{
    private readonly float* _p;

    public Floats(Tensor t) => _p = t.Pointer;

    private Floats(float* p) => _p = p;

    /// <summary>Element <paramref name="i"/>.</summary>
    public ref float this[int i]
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => ref _p[i];
    }

    /// <summary>Element <paramref name="i"/> (a 64-bit index).</summary>
    public ref float this[long i]
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => ref _p[i];
    }

    /// <summary>The first element's address.</summary>
    public float* Pointer => _p;

    /// <summary>Elements [start, start + length) as a span.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Span<float> Slice(int start, int length) => new(_p + start, length);

    /// <summary>The elements from <paramref name="start"/> on.</summary>
    public Floats From(int start) => new(_p + start);

    /// <summary>Vector&lt;float&gt;.Count elements from <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector<float> Load(int i) => Unsafe.ReadUnaligned<Vector<float>>(_p + i);

    /// <summary>Writes <paramref name="v"/> at elements <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Store(int i, Vector<float> v) => Unsafe.WriteUnaligned(_p + i, v);

    /// <summary>16 elements from <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector512<float> Load512(int i) => Vector512.Load(_p + i);

    /// <summary>8 elements from <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector256<float> Load256(int i) => Vector256.Load(_p + i);

    /// <summary>4 elements from <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Vector128<float> Load128(int i) => Vector128.Load(_p + i);

    /// <summary>Writes 16 elements at <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Store(int i, Vector512<float> v) => v.Store(_p + i);

    /// <summary>Writes 8 elements at <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Store(int i, Vector256<float> v) => v.Store(_p + i);

    /// <summary>Writes 4 elements at <paramref name="i"/> on.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Store(int i, Vector128<float> v) => v.Store(_p + i);
}

/// <summary><see cref="Floats"/> of a tensor.</summary>
internal static class FloatsOfTensor
{
    /// <summary>The tensor's elements for a CPU kernel (see <see cref="Floats"/>).</summary>
    public static Floats Host(this Tensor t) => new(t);
}
