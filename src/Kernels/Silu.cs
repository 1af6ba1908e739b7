using System.Runtime.Intrinsics;
using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>
/// SiLU (swish), the U-Net's only activation: silu(x) = x·σ(x), σ(x) = 1 / (1 + e^-x);
/// silu'(x) = σ(x)·(1 + x·(1 - σ(x))). Versions: ILGPU through the generic elementwise kernels
/// (one thread per element); CPU with the vector exp of FastMath at the level CpuSimd.Level sets (512, 256 or
/// 128 bits; the generic scalar loop at the scalar level), over chunks on the cores.
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
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu || !Isa.V128)
        {
            Elementwise.Map<Silu>(x, y);
            return;
        }
        Check.Same("silu", x, y);
        Check.Shape("silu", "y", y, x.Shape);
        Cpu.For(x.Length, 1 << 14, (x.Host(), y.Host()), static (state, first, last) =>
        {
            var (xs, ys) = state;
            int i = first;
            if (Isa.Avx512)
            {
                for (; i <= last - 16; i += 16)
                {
                    var v = xs.Load512(i);
                    ys.Store(i, v * FastMath.Sigmoid(v));
                }
            }
            else if (Isa.Avx2)
            {
                for (; i <= last - 8; i += 8)
                {
                    var v = xs.Load256(i);
                    ys.Store(i, v * FastMath.Sigmoid(v));
                }
            }
            else
            {
                for (; i <= last - 4; i += 4)
                {
                    var v = xs.Load128(i);
                    ys.Store(i, v * FastMath.Sigmoid(v));
                }
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
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu || !Isa.V128)
        {
            Elementwise.MapBackward<Silu>(dy, x, dx);
            return;
        }
        Check.Devices("silu backward", dy, x, dx);
        Check.Shape("silu backward", "dy", dy, x.Shape);
        Check.Shape("silu backward", "dx", dx, x.Shape);
        Cpu.For(x.Length, 1 << 14, (dy.Host(), x.Host(), dx.Host()), static (state, first, last) =>
        {
            var (dys, xs, dxs) = state;
            int i = first;
            if (Isa.Avx512)
            {
                for (; i <= last - 16; i += 16)
                {
                    var v = xs.Load512(i);
                    var s = FastMath.Sigmoid(v);
                    var d = s * (Vector512<float>.One + v * (Vector512<float>.One - s));
                    dxs.Store(i, Vector512.FusedMultiplyAdd(dys.Load512(i), d, dxs.Load512(i)));
                }
            }
            else if (Isa.Avx2)
            {
                for (; i <= last - 8; i += 8)
                {
                    var v = xs.Load256(i);
                    var s = FastMath.Sigmoid(v);
                    var d = s * (Vector256<float>.One + v * (Vector256<float>.One - s));
                    dxs.Store(i, Vector256.FusedMultiplyAdd(dys.Load256(i), d, dxs.Load256(i)));
                }
            }
            else
            {
                for (; i <= last - 4; i += 4)
                {
                    var v = xs.Load128(i);
                    var s = FastMath.Sigmoid(v);
                    var d = s * (Vector128<float>.One + v * (Vector128<float>.One - s));
                    dxs.Store(i, Vector128.MultiplyAddEstimate(dys.Load128(i), d, dxs.Load128(i)));
                }
            }
            for (; i < last; i++)
            {
                dxs[i] += dys[i] * Derivative(xs[i]);
            }
        });
    }
}
