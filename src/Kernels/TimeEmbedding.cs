using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Sinusoidal time embedding of the model spec: t [N] (integer timesteps held as floats) →
/// y [N, D], half = D/2, f_i = exp(-ln(10000)·i/half), y[n, i] = sin(t·f_i), y[n, half + i] = cos(t·f_i).
/// No backward: t is an integer input, not a learned value. Versions: CPU loops; ILGPU one
/// thread per output element.
/// </summary>
public static class TimeEmbedding
{
    /// <summary>y = [sin(t·f), cos(t·f)].</summary>
    public static void Forward(Tensor t, Tensor y)
    {
        Check.Rank("time embedding", "t", t, 1);
        Check.Devices("time embedding", t, y);
        Check.Rank("time embedding", "y", y, 2);
        int n = t.Dim(0), d = y.Dim(1);
        Check.Shape("time embedding", "y", y, n, d);
        if (d % 2 != 0)
        {
            throw new ArgumentException($"time embedding: width {d} is not even");
        }
        using var simd = CpuSimd.Enter(t.Device);
        if (t.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(t);
            k.TimeEmbedding.Forward(k.Stream, y.Length, t.View, y.View, d / 2);
            return;
        }
        var tv = t.Host();
        var yv = y.Host();
        int half = d / 2;
        for (int i = 0; i < n * d; i++)
        {
            yv[i] = Value(tv[i / d], i % d, half);
        }
    }

    /// <summary>One element: frequency index j mod half, sine below half, cosine above.</summary>
    internal static float Value(float t, int column, int half)
    {
        int j = column < half ? column : column - half;
        // Same float32 arithmetic as the PyTorch peer: exp(-ln(1e4)·j/half), then t·f.
        float freq = MathF.Exp(-9.21034037f * j / half);
        float arg = t * freq;
        // Arguments reach ~300 rad. CUDA's sin.approx/cos.approx (what ILGPU emits for MathF.Sin)
        // are accurate only on [-π, π], so reduce first, in float, with 2π split in two
        // (Cody-Waite): k·TwoPiHigh is exact for k < 2^16 since TwoPiHigh has 8 significant bits.
        const float TwoPiHigh = 6.28125f, TwoPiLow = 1.9353071795864769e-3f;
        float k = MathF.Round(arg * (1f / (2f * MathF.PI)));
        float reduced = arg - k * TwoPiHigh - k * TwoPiLow;
        return column < half ? MathF.Sin(reduced) : MathF.Cos(reduced);
    }

    internal static void ForwardKernel(Index1D i, ArrayView<float> t, ArrayView<float> y, int half) =>
        y[i] = Value(t[i / (2 * half)], i % (2 * half), half);

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> Forward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(ForwardKernel);
    }
}
