using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using BenchmarkDotNet.Attributes;

namespace Ddpm.Benchmarks;

/// <summary>
/// The machine's measured peak, the denominator of every "share of peak" in docs/perf.md: 24 independent chains of
/// fused multiply-adds in registers (no memory traffic), on one core and on every core.
/// FLOPs = 2 (multiply and add) · lanes · 24 chains · iterations, per thread.
/// </summary>
public class PeakBenchmarks
{
    private const int Iterations = 4_000_000, Chains = 24;
    private static readonly int Lanes = Avx512F.IsSupported ? 16 : 8;
    private static readonly double FlopsPerThread = 2.0 * Lanes * Chains * Iterations;

    [Benchmark]
    public float OneCore() => Avx512F.IsSupported ? Fma512() : Fma256();

    [Benchmark]
    public void AllCores() => Parallel.For(0, Environment.ProcessorCount, i => Sink[i & 15] = Avx512F.IsSupported ? Fma512() : Fma256());

    private static readonly float[] Sink = new float[16];

    /// <summary>GFLOP/s of one invocation of each method, for <see cref="GflopsColumn"/>.</summary>
    public static double FlopsOf(string method) => method == nameof(AllCores) ? FlopsPerThread * Environment.ProcessorCount : FlopsPerThread;

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Fma512()
    {
        Vector512<float> m = Vector512.Create(0.999999f), a = Vector512.Create(1e-7f);
        Vector512<float> x0 = Vector512.Create(1f), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;
        Vector512<float> x8 = x0, x9 = x0, x10 = x0, x11 = x0, x12 = x0, x13 = x0, x14 = x0, x15 = x0;
        Vector512<float> x16 = x0, x17 = x0, x18 = x0, x19 = x0, x20 = x0, x21 = x0, x22 = x0, x23 = x0;
        for (int i = 0; i < Iterations; i++)
        {
            x0 = Avx512F.FusedMultiplyAdd(x0, m, a); x1 = Avx512F.FusedMultiplyAdd(x1, m, a); x2 = Avx512F.FusedMultiplyAdd(x2, m, a);
            x3 = Avx512F.FusedMultiplyAdd(x3, m, a); x4 = Avx512F.FusedMultiplyAdd(x4, m, a); x5 = Avx512F.FusedMultiplyAdd(x5, m, a);
            x6 = Avx512F.FusedMultiplyAdd(x6, m, a); x7 = Avx512F.FusedMultiplyAdd(x7, m, a); x8 = Avx512F.FusedMultiplyAdd(x8, m, a);
            x9 = Avx512F.FusedMultiplyAdd(x9, m, a); x10 = Avx512F.FusedMultiplyAdd(x10, m, a); x11 = Avx512F.FusedMultiplyAdd(x11, m, a);
            x12 = Avx512F.FusedMultiplyAdd(x12, m, a); x13 = Avx512F.FusedMultiplyAdd(x13, m, a); x14 = Avx512F.FusedMultiplyAdd(x14, m, a);
            x15 = Avx512F.FusedMultiplyAdd(x15, m, a); x16 = Avx512F.FusedMultiplyAdd(x16, m, a); x17 = Avx512F.FusedMultiplyAdd(x17, m, a);
            x18 = Avx512F.FusedMultiplyAdd(x18, m, a); x19 = Avx512F.FusedMultiplyAdd(x19, m, a); x20 = Avx512F.FusedMultiplyAdd(x20, m, a);
            x21 = Avx512F.FusedMultiplyAdd(x21, m, a); x22 = Avx512F.FusedMultiplyAdd(x22, m, a); x23 = Avx512F.FusedMultiplyAdd(x23, m, a);
        }
        Vector512<float> s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11 + x12 + x13 + x14 + x15 + x16 + x17 + x18 + x19 + x20 + x21 + x22 + x23;
        return Vector512.Sum(s);
    }

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static float Fma256()
    {
        Vector256<float> m = Vector256.Create(0.999999f), a = Vector256.Create(1e-7f);
        Vector256<float> x0 = Vector256.Create(1f), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;
        Vector256<float> x8 = x0, x9 = x0, x10 = x0, x11 = x0;
        // 12 registers of 8 lanes twice over = the same 24 chains' worth of lanes per iteration as 24 x 8.
        for (int i = 0; i < Iterations * 2; i++)
        {
            x0 = Fma.MultiplyAdd(x0, m, a); x1 = Fma.MultiplyAdd(x1, m, a); x2 = Fma.MultiplyAdd(x2, m, a); x3 = Fma.MultiplyAdd(x3, m, a);
            x4 = Fma.MultiplyAdd(x4, m, a); x5 = Fma.MultiplyAdd(x5, m, a); x6 = Fma.MultiplyAdd(x6, m, a); x7 = Fma.MultiplyAdd(x7, m, a);
            x8 = Fma.MultiplyAdd(x8, m, a); x9 = Fma.MultiplyAdd(x9, m, a); x10 = Fma.MultiplyAdd(x10, m, a); x11 = Fma.MultiplyAdd(x11, m, a);
        }
        return Vector256.Sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11);
    }
}
