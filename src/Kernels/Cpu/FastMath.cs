using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

/// <summary>
/// Vector exp and sigmoid for the CPU backend's SiLU paths, at 128, 256 and 512 bits (callers pick by Isa). Vector256.Exp of .NET 10 computes in double and cost more
/// than the rest of a fused group norm + SiLU (docs/perf.md); this is the single-precision Cephes expf: n = round(x·log2 e),
/// r = x - n·ln 2 in two parts (Cody-Waite), exp r by a degree-6 polynomial, times 2^n built in the exponent bits.
/// Inputs are clamped to [ln FLT_MIN, 88.376] (-87.34: no subnormal results, exp(-1000) gives FLT_MIN; the top keeps
/// exp finite); NaN stays NaN. Error within 2 ulp of exp on [-87, 88].
/// </summary>
internal static class FastMath
{
    private const float Lo = -87.3365447505531f, Hi = 88.3762626647949f, Log2E = 1.44269504088896341f, Ln2Hi = 0.693359375f, Ln2Lo = -2.12194440e-4f;
    private const float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f, P3 = 4.1665795894e-2f, P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

    /// <summary>e^x per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp(Vector256<float> x)
    {
        // Min/Max of .NET 10 propagate NaN, so a NaN input reaches the polynomial and the result.
        x = Vector256.Min(Vector256.Max(x, Vector256.Create(Lo)), Vector256.Create(Hi));
        Vector256<float> n = Vector256.Round(x * Vector256.Create(Log2E));
        Vector256<float> r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Hi), x);
        r = Vector256.FusedMultiplyAdd(n, Vector256.Create(-Ln2Lo), r);
        Vector256<float> p = Vector256.Create(P0);
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P1));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P2));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P3));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P4));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(P5));
        p = Vector256.FusedMultiplyAdd(p, r * r, r + Vector256<float>.One);
        // n is a whole number in [-126, 128] after the clamp: the plain truncating conversion is exact, where
        // Vector256.ConvertToInt32 adds a compare and a blend per vector for its saturation of out-of-range lanes.
        Vector256<int> bits = (Avx.ConvertToVector256Int32WithTruncation(n) + Vector256.Create(127)) << 23;
        return p * bits.AsSingle();
    }

    /// <summary>σ(u) = 1 / (1 + e^-u) per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Sigmoid(Vector256<float> u) => Vector256<float>.One / (Vector256<float>.One + Exp(-u));

    /// <summary>e^x per lane, 4 lanes (the same algorithm): the portable 128-bit path (SSE, NEON). MultiplyAddEstimate
    /// fuses where the processor can and is a multiply and an add where it cannot (Vector128.FusedMultiplyAdd would then
    /// be a software FMA per lane); unfused, the Cody-Waite reduction loses a little, within 3 ulp.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Exp(Vector128<float> x)
    {
        x = Vector128.Min(Vector128.Max(x, Vector128.Create(Lo)), Vector128.Create(Hi));
        Vector128<float> n = Vector128.Round(x * Vector128.Create(Log2E));
        Vector128<float> r = Vector128.MultiplyAddEstimate(n, Vector128.Create(-Ln2Hi), x);
        r = Vector128.MultiplyAddEstimate(n, Vector128.Create(-Ln2Lo), r);
        Vector128<float> p = Vector128.Create(P0);
        p = Vector128.MultiplyAddEstimate(p, r, Vector128.Create(P1));
        p = Vector128.MultiplyAddEstimate(p, r, Vector128.Create(P2));
        p = Vector128.MultiplyAddEstimate(p, r, Vector128.Create(P3));
        p = Vector128.MultiplyAddEstimate(p, r, Vector128.Create(P4));
        p = Vector128.MultiplyAddEstimate(p, r, Vector128.Create(P5));
        p = Vector128.MultiplyAddEstimate(p, r * r, r + Vector128<float>.One);
        Vector128<int> bits = (Vector128.ConvertToInt32(n) + Vector128.Create(127)) << 23;
        return p * bits.AsSingle();
    }

    /// <summary>σ(u) = 1 / (1 + e^-u), 4 lanes.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Sigmoid(Vector128<float> u) => Vector128<float>.One / (Vector128<float>.One + Exp(-u));

    /// <summary>e^x per lane, 16 lanes (the same algorithm as the 8-lane version).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp(Vector512<float> x)
    {
        x = Vector512.Min(Vector512.Max(x, Vector512.Create(Lo)), Vector512.Create(Hi));
        Vector512<float> n = Vector512.Round(x * Vector512.Create(Log2E));
        Vector512<float> r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Hi), x);
        r = Vector512.FusedMultiplyAdd(n, Vector512.Create(-Ln2Lo), r);
        Vector512<float> p = Vector512.Create(P0);
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P1));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P2));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P3));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P4));
        p = Vector512.FusedMultiplyAdd(p, r, Vector512.Create(P5));
        p = Vector512.FusedMultiplyAdd(p, r * r, r + Vector512<float>.One);
        Vector512<int> bits = (Vector512.ConvertToInt32(n) + Vector512.Create(127)) << 23;
        return p * bits.AsSingle();
    }

    /// <summary>σ(u) = 1 / (1 + e^-u), 16 lanes.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Sigmoid(Vector512<float> u) => Vector512<float>.One / (Vector512<float>.One + Exp(-u));
}
