// Span helpers with explicit SIMD for the managed CPU backend's kernels.

namespace Ddpm.Kernels;

/// <summary>Small SIMD span helpers for the CPU kernels.</summary>
internal static class Simd
{
    /// <summary>dst[i] += value.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
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
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
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
