using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>
/// SiLU (swish), the U-Net's only activation: silu(x) = x·σ(x), σ(x) = 1 / (1 + e^-x);
/// silu'(x) = σ(x)·(1 + x·(1 - σ(x))). Runs through the generic elementwise kernels.
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
    public static void Forward(Tensor x, Tensor y) => Elementwise.Map<Silu>(x, y);

    /// <summary>dx += dy·silu'(x).</summary>
    public static void Backward(Tensor dy, Tensor x, Tensor dx) => Elementwise.MapBackward<Silu>(dy, x, dx);
}
