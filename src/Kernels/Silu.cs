using System.Runtime.Intrinsics;
using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>
/// SiLU (swish), the U-Net's only activation: silu(x) = x·σ(x), σ(x) = 1 / (1 + e^-x);
/// silu'(x) = σ(x)·(1 + x·(1 - σ(x))). Versions: ILGPU through the generic elementwise kernels
/// (one thread per element); CPU with Vector256 exp (scalar loop where 256-bit SIMD is absent),
/// over chunks on the cores.
/// </summary>
public struct Silu : IUnaryOp
{
    /// <inheritdoc/>
    public static float Apply(float x) => x / (1f + MathF.Exp(-x));

    /// <inheritdoc/>
    public static float Derivative(float x)
    {
        float s = 1f / (1f + MathF.Exp(-x));
        return s * (1f + x * (1f - s));
    }

    /// <summary>y = silu(x).</summary>
    public static void Forward(Tensor x, Tensor y)
    {
        if (x.Device.IsIlgpu || !Vector256.IsHardwareAccelerated)
        {
            Elementwise.Map<Silu>(x, y);
            return;
        }
        Check.Same("silu", x, y);
        Check.Shape("silu", "y", y, x.Shape);
        Cpu.For(x.Length, 1 << 14, (x.HostArray, y.HostArray), static (state, first, last) =>
        {
            var (xs, ys) = state;
            int i = first;
            for (; i <= last - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                var v = Vector256.Create(xs, i);
                (v * FastMath.Sigmoid(v)).CopyTo(ys, i);
            }
            for (; i < last; i++)
            {
                ys[i] = Apply(xs[i]);
            }
        });
    }

    /// <summary>dx += dy·silu'(x).</summary>
    public static void Backward(Tensor dy, Tensor x, Tensor dx)
    {
        if (x.Device.IsIlgpu || !Vector256.IsHardwareAccelerated)
        {
            Elementwise.MapBackward<Silu>(dy, x, dx);
            return;
        }
        Check.Devices("silu backward", dy, x, dx);
        Check.Shape("silu backward", "dy", dy, x.Shape);
        Check.Shape("silu backward", "dx", dx, x.Shape);
        Cpu.For(x.Length, 1 << 14, (dy.HostArray, x.HostArray, dx.HostArray), static (state, first, last) =>
        {
            var (dys, xs, dxs) = state;
            int i = first;
            for (; i <= last - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                var v = Vector256.Create(xs, i);
                var s = FastMath.Sigmoid(v);
                var d = s * (Vector256<float>.One + v * (Vector256<float>.One - s));
                Vector256.FusedMultiplyAdd(Vector256.Create(dys, i), d, Vector256.Create(dxs, i)).CopyTo(dxs, i);
            }
            for (; i < last; i++)
            {
                dxs[i] += dys[i] * Derivative(xs[i]);
            }
        });
    }
}
