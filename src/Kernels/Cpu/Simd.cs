// Span helpers with explicit SIMD for the managed CPU backend's kernels, and the level checks every dispatch site uses.

using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>
/// Which vector paths the CPU kernels may take now: the setting <see cref="CpuSimd.Level"/> and the hardware check
/// together. The hardware check comes first and is a JIT-time constant, so on ARM64 the x86 branches are removed
/// from the compiled code; the level makes the narrower paths testable on a wide machine.
/// </summary>
internal static class Isa
{
    /// <summary>512-bit x86 code (Avx512F intrinsics, Vector512) may run.</summary>
    public static bool Avx512
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => Avx512F.IsSupported && Fma.IsSupported && CpuSimd.Level >= SimdLevel.Avx512;
    }

    /// <summary>256-bit code with FMA (Fma intrinsics, Vector256) may run.</summary>
    public static bool Avx2
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => Fma.IsSupported && System.Runtime.Intrinsics.X86.Avx2.IsSupported && CpuSimd.Level >= SimdLevel.Avx2;
    }

    /// <summary>Portable 128-bit code (Vector128: SSE on x86, NEON on ARM64) may run.</summary>
    public static bool V128
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => Vector128.IsHardwareAccelerated && CpuSimd.Level >= SimdLevel.Vector128;
    }
}

/// <summary>Small SIMD span helpers for the CPU kernels.</summary>
internal static class Simd
{
    /// <summary>
    /// Whether loops on System.Numerics.Vector&lt;float&gt; may run: its width is fixed by the JIT at start-up (8 lanes
    /// on AVX2 and AVX-512 machines, 4 with SSE or NEON only), so they run when the level allows that width and fall
    /// to their scalar tails otherwise (on an x86 machine set to the 128-bit level too: memory-bound loops, a small
    /// share of a step).
    /// </summary>
    public static bool VectorT
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => System.Numerics.Vector.IsHardwareAccelerated && (System.Numerics.Vector<float>.Count <= 4 ? Isa.V128 : Isa.Avx2);
    }

    /// <summary>dst[i] += value.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void AddScalar(Span<float> dst, float value)
    {
        int i = 0;
        if (Isa.Avx2)
        {
            var v = Vector256.Create(value);
            for (; i <= dst.Length - 8; i += 8)
            {
                (Vector256.Create(dst.Slice(i, 8)) + v).CopyTo(dst.Slice(i, 8));
            }
        }
        else if (Isa.V128)
        {
            var v = Vector128.Create(value);
            for (; i <= dst.Length - 4; i += 4)
            {
                (Vector128.Create(dst.Slice(i, 4)) + v).CopyTo(dst.Slice(i, 4));
            }
        }
        for (; i < dst.Length; i++)
        {
            dst[i] += value;
        }
    }

    /// <summary>dst[i] += src[i].</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void AddInPlace(Span<float> dst, ReadOnlySpan<float> src)
    {
        int i = 0;
        if (Isa.Avx2)
        {
            for (; i <= dst.Length - 8; i += 8)
            {
                (Vector256.Create(dst.Slice(i, 8)) + Vector256.Create(src.Slice(i, 8))).CopyTo(dst.Slice(i, 8));
            }
        }
        else if (Isa.V128)
        {
            for (; i <= dst.Length - 4; i += 4)
            {
                (Vector128.Create(dst.Slice(i, 4)) + Vector128.Create(src.Slice(i, 4))).CopyTo(dst.Slice(i, 4));
            }
        }
        for (; i < dst.Length; i++)
        {
            dst[i] += src[i];
        }
    }

    /// <summary>dst[0..n) = src[0..n) (+= when <paramref name="accumulate"/>, else + bias): one row of a wide GEMM
    /// result into a dense tensor, at the current level.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static unsafe void AddRow(float* src, float* dst, int n, float bias, bool accumulate)
    {
        int x = 0;
        if (Isa.Avx2)
        {
            var bv = Vector256.Create(bias);
            for (; x <= n - 8; x += 8)
            {
                Vector256<float> v = Vector256.Load(src + x);
                Vector256.Store(accumulate ? v + Vector256.Load(dst + x) : v + bv, dst + x);
            }
            // Image rows are 7, 14 or 28 floats: a 4-float step leaves at most 3 to the scalar tail.
            if (x <= n - 4)
            {
                Vector128<float> v = Vector128.Load(src + x);
                Vector128.Store(accumulate ? v + Vector128.Load(dst + x) : v + bv.GetLower(), dst + x);
                x += 4;
            }
        }
        else if (Isa.V128)
        {
            var bv = Vector128.Create(bias);
            for (; x <= n - 4; x += 4)
            {
                Vector128<float> v = Vector128.Load(src + x);
                Vector128.Store(accumulate ? v + Vector128.Load(dst + x) : v + bv, dst + x);
            }
        }
        if (accumulate)
        {
            for (; x < n; x++)
            {
                dst[x] += src[x];
            }
        }
        else
        {
            for (; x < n; x++)
            {
                dst[x] = src[x] + bias;
            }
        }
    }
}
