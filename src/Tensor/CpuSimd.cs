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
/// The instruction level every CPU kernel dispatches on. <see cref="Max"/> is what this processor offers; the level is
/// a setting of the CPU device (<see cref="CpuDevice.Simd"/>, <see cref="CpuDevice.At"/>: the CLI opens one from its
/// DDPM_SIMD setting or bench's --simd), which each op enters for its length (<see cref="Enter(Device)"/>) and hands to
/// the pool's helpers with each job, so the narrower paths run and are tested on one machine beside the wide ones. Why a
/// setting of our own rather than the runtime's switches (DOTNET_EnableAVX512=0 ...): those need a new process, so one
/// test run could not cover every level, and they cannot be changed for a benchmark.
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

    // The level the calling thread's kernels run at: set for the length of an op from the device its tensors live on
    // (Enter(Device)), and handed to the pool's helpers with each parallel job; the widest the processor has otherwise.
    [ThreadStatic] private static SimdLevel? t_level;

    // Whether any thread has ever entered a level below Max: until one has, every thread runs at Max and the level is
    // read without the thread-local lookup (the kernels' dispatch reads it often; the lookup cost ~10% of a CPU step).
    private static volatile bool s_lowered;

    /// <summary>The level the kernels on this thread use now: the level of the CPU device whose op is running
    /// (<see cref="CpuDevice.Simd"/>), else <see cref="Max"/>.</summary>
    public static SimdLevel Level
    {
        [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveInlining)]
        get => s_lowered ? Lowered() : Max;
    }

    // Out of line, so the common path (no lowered level anywhere) inlines into every dispatch site as one load and a test.
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
    private static SimdLevel Lowered() => t_level ?? Max;

    /// <summary>Whether this processor can run <paramref name="level"/> (level &lt;= <see cref="Max"/>).</summary>
    public static bool Supports(SimdLevel level) => level <= Max;

    /// <summary>Runs this thread's kernels at <paramref name="level"/> until the returned scope is disposed (the previous
    /// level back then): what an op does with its device's level, and what the pool's helpers do with a job's; the raw
    /// kernels' tests, which take no device, do the same. Throws when the processor lacks the level: a silent clamp would
    /// let a test of that level pass on a narrower path.</summary>
    public static Scope Enter(SimdLevel level)
    {
        if (!Supports(level))
        {
            throw new NotSupportedException($"this processor offers up to {Name(Max)}, not {Name(level)}");
        }
        if (level < Max)
        {
            s_lowered = true;
        }
        var scope = new Scope(t_level, active: true);
        t_level = level;
        return scope;
    }

    /// <summary>Runs this thread's kernels at the level of <paramref name="device"/> when it is a CPU device (an ILGPU
    /// device: nothing changes) until the scope is disposed.</summary>
    public static Scope Enter(Device device) => device is CpuDevice cpu ? Enter(cpu.Simd) : default;

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

    /// <summary>Restores the thread's previous level on dispose (a struct: entering an op allocates nothing).</summary>
    public readonly struct Scope(SimdLevel? previous, bool active) : IDisposable
    {
        /// <inheritdoc/>
        public void Dispose()
        {
            if (active)
            {
                t_level = previous;
            }
        }
    }
}
