using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// In-place optimiser updates, elementwise over a parameter p and its gradient g (same shape):
///   Adam (Kingma and Ba 2015, as torch.optim.Adam): m = β1·m + (1-β1)·g, v = β2·v + (1-β2)·g²,
///     p -= lr·(m / (1-β1^t)) / (sqrt(v) / sqrt(1-β2^t) + eps), t the 1-based step.
///   EMA of weights: e = decay·e + (1-decay)·p.
/// No backward: these run after it. Versions: CPU loops over chunks; ILGPU one thread per element.
/// </summary>
public static class Optim
{
    /// <summary>One Adam step on p, with moments m and v updated in place.</summary>
    public static void Adam(Tensor p, Tensor g, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, int step)
    {
        if (step < 1)
        {
            throw new ArgumentException($"adam: step {step} must be 1 or more");
        }
        Check.Devices("adam", p, g, m, v);
        Check.Shape("adam", "g", g, p.Shape);
        Check.Shape("adam", "m", m, p.Shape);
        Check.Shape("adam", "v", v, p.Shape);
        var h = new AdamHyper(lr, beta1, beta2, eps,
            (float)(1.0 / (1.0 - Math.Pow(beta1, step))), (float)(1.0 / Math.Sqrt(1.0 - Math.Pow(beta2, step))));
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.Optim.Adam(k.Stream, p.Length, p.View, g.View, m.View, v.View, h);
            return;
        }
        Cpu.For(p.Length, 1 << 15, (p.HostArray, g.HostArray, m.HostArray, v.HostArray, h), static (state, first, last) =>
        {
            var (pv, gv, mv, vv, h) = state;
            for (int i = first; i < last; i++)
            {
                AdamElement(ref pv[i], gv[i], ref mv[i], ref vv[i], h);
            }
        });
    }

    /// <summary>e = decay·e + (1 - decay)·p.</summary>
    public static void Ema(Tensor ema, Tensor p, float decay)
    {
        Check.Same("ema", ema, p);
        Check.Shape("ema", "ema", ema, p.Shape);
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.Optim.Ema(k.Stream, p.Length, ema.View, p.View, decay);
            return;
        }
        var ev = ema.HostArray;
        var pv = p.HostArray;
        for (int i = 0; i < p.Length; i++)
        {
            ev[i] = decay * ev[i] + (1f - decay) * pv[i];
        }
    }

    /// <summary>Adam's constants for one step: the bias corrections 1/(1-β1^t) and 1/sqrt(1-β2^t) precomputed in double.</summary>
    internal readonly struct AdamHyper(float lr, float beta1, float beta2, float eps, float correction1, float correction2)
    {
        public readonly float Lr = lr, Beta1 = beta1, Beta2 = beta2, Eps = eps, Correction1 = correction1, Correction2 = correction2;
    }

    internal static void AdamElement(ref float p, float g, ref float m, ref float v, AdamHyper h)
    {
        m = h.Beta1 * m + (1f - h.Beta1) * g;
        v = h.Beta2 * v + (1f - h.Beta2) * g * g;
        p -= h.Lr * (m * h.Correction1) / (MathF.Sqrt(v) * h.Correction2 + h.Eps);
    }

    internal static void AdamKernel(Index1D i, ArrayView<float> p, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamHyper h)
    {
        float mi = h.Beta1 * m[i] + (1f - h.Beta1) * g[i];
        float vi = h.Beta2 * v[i] + (1f - h.Beta2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] -= h.Lr * (mi * h.Correction1) / (MathF.Sqrt(vi) * h.Correction2 + h.Eps);
    }

    internal static void EmaKernel(Index1D i, ArrayView<float> ema, ArrayView<float> p, float decay) =>
        ema[i] = decay * ema[i] + (1f - decay) * p[i];

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper> Adam =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper>>(AdamKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Ema =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(EmaKernel);
    }
}
