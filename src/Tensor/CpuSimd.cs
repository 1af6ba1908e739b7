using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Tensors;

/// <summary>Instruction levels of the managed CPU backend's kernels, narrowest first (so levels compare with &lt; and &gt;).</summary>
public enum SimdLevel
{
    /// <summary>Plain scalar loops: the reference and the last fallback, correct on every processor.</summary>
    Scalar,

    /// <summary>128-bit vectors through the cross-platform API (x86 SSE, ARM64 NEON), multiply-add where the processor fuses it.</summary>
    Vector128,

    /// <summary>256-bit vectors with FMA (x86 AVX2 + FMA3).</summary>
    Avx2,

    /// <summary>512-bit vectors with FMA (x86 AVX-512F).</summary>
    Avx512,
}

/// <summary>
/// The instruction level every CPU kernel dispatches on. <see cref="Max"/> is what this processor offers;
/// <see cref="Level"/> (default: <see cref="Max"/>; the CLI sets it from its DDPM_SIMD setting or bench's --simd)
/// may be lowered to run and test the narrower paths on one machine. Why a setting of our own rather than the
/// runtime's switches (DOTNET_EnableAVX512=0 ...): those need a new process, so one test run could not cover every
/// level, and they cannot be changed for a benchmark. Process-wide: a change is seen by every thread, so code that
/// changes it must not race with kernels on other threads (the tests that do run in a collection of their own).
/// </summary>
public static class CpuSimd
{
    /// <summary>
    /// The widest level this processor runs: Avx512 needs AVX-512F and FMA, Avx2 needs AVX2 and FMA (the 256-bit
    /// kernels are written around fused multiply-add), Vector128 needs hardware 128-bit vectors (SSE or NEON).
    /// </summary>
    public static SimdLevel Max { get; } =
        Avx512F.IsSupported && Fma.IsSupported ? SimdLevel.Avx512
        : Avx2.IsSupported && Fma.IsSupported ? SimdLevel.Avx2
        : Vector128.IsHardwareAccelerated ? SimdLevel.Vector128
        : SimdLevel.Scalar;

    // Declared after Max: static initializers run in text order, and this one reads Max.
    private static volatile SimdLevel s_level = Max;

    /// <summary>The level the kernels use now; a value above <see cref="Max"/> is clamped to it.</summary>
    public static SimdLevel Level
    {
        get => s_level;
        set => s_level = value > Max ? Max : value;
    }

    /// <summary>Whether this processor can run <paramref name="level"/> (level &lt;= <see cref="Max"/>).</summary>
    public static bool Supports(SimdLevel level) => level <= Max;

    /// <summary>
    /// Sets <see cref="Level"/> until the returned scope is disposed, then restores the previous level. Throws when
    /// the processor lacks the level: a silent clamp would let a test of that level pass on a narrower path.
    /// </summary>
    public static IDisposable Use(SimdLevel level)
    {
        if (!Supports(level))
        {
            throw new NotSupportedException($"this processor offers up to {Name(Max)}, not {Name(level)}");
        }
        var scope = new Scope(s_level);
        s_level = level;
        return scope;
    }

    /// <summary>A level's display name: "AVX-512", "AVX2", "128-bit SIMD" or "scalar".</summary>
    public static string Name(SimdLevel level) => level switch
    {
        SimdLevel.Avx512 => "AVX-512",
        SimdLevel.Avx2 => "AVX2",
        SimdLevel.Vector128 => "128-bit SIMD",
        _ => "scalar",
    };

    /// <summary>Parses avx512 | avx2 | 128 (or vector128) | scalar, case-insensitively; null when it is none of them.</summary>
    public static SimdLevel? Parse(string? text) => text?.Trim().ToLowerInvariant() switch
    {
        "avx512" or "avx-512" => SimdLevel.Avx512,
        "avx2" => SimdLevel.Avx2,
        "128" or "vector128" or "sse" or "neon" => SimdLevel.Vector128,
        "scalar" => SimdLevel.Scalar,
        _ => null,
    };

    private sealed class Scope(SimdLevel previous) : IDisposable
    {
        private bool _disposed;

        public void Dispose()
        {
            if (!_disposed)
            {
                _disposed = true;
                s_level = previous;
            }
        }
    }
}
