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
///
/// The guarded forms serve a training step that never waits for the device. Over a model's parameters held
/// as one flat buffer each of them is one launch: <see cref="FlagNonFinite"/> marks a non-finite gradient,
/// <see cref="PrepareStep"/> (one thread) decides on the device whether the step is skipped (loss or a
/// gradient not finite), counts Adam's step t, and computes the bias corrections and the clip scale
/// min(1, maxNorm / (‖g‖ + 1e-6)); <see cref="Adam(Tensor, Tensor, Tensor, Tensor, AdamSettings, Tensor)"/> and
/// <see cref="Ema(Tensor, Tensor, float, Tensor)"/> read that state and leave everything unchanged on a skipped step.
///   state  [5]: t, 1/(1-β1^t), 1/sqrt(1-β2^t), clip scale, skip (1) or not (0)
///   record [4]: loss, first non-finite gradient element (int bits, see <see cref="FirstFlagged"/>), Σg², skipped
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
        using var simd = CpuSimd.Enter(p.Device);
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.WeightsWritten();
            k.Optim.Adam(k.Stream, p.Length, p.View, g.View, m.View, v.View, h);
            return;
        }
        Cpu.For(p.Length, 1 << 15, (p.Host(), g.Host(), m.Host(), v.Host(), h),
            static (x, first, last) =>
            {
                var (pv, gv, mv, vv, h) = x;
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
        using var simd = CpuSimd.Enter(p.Device);
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.WeightsWritten();
            k.Optim.Ema(k.Stream, p.Length, ema.View, p.View, decay);
            return;
        }
        var ev = ema.Span;
        var pv = p.Span;
        for (int i = 0; i < pv.Length; i++)
        {
            ev[i] = decay * ev[i] + (1f - decay) * pv[i];
        }
    }

    /// <summary>Length of the guarded step's state tensor: t, the two bias corrections, the clip scale, the skip flag.</summary>
    public const int StateLength = 5;

    /// <summary>Length of a step's record: loss, the non-finite flag, Σg², skipped.</summary>
    public const int RecordLength = 4;

    /// <summary>
    /// Raises <paramref name="flag"/> [1] when <paramref name="x"/> holds a NaN or infinity: it keeps, as the bits of an
    /// int, max(flag, int.MaxValue - (<paramref name="first"/> + i)) over the non-finite elements i, so after
    /// the flag was zeroed and the calls for every gradient in order (or one call over the flat buffer),
    /// <see cref="FirstFlagged"/> gives the first non-finite element of the whole sequence. One launch.
    /// </summary>
    public static void FlagNonFinite(Tensor x, Tensor flag, int first)
    {
        Check.Shape("flag non-finite", "flag", flag, 1);
        Check.Devices("flag non-finite", x, flag);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Optim.Flag(k.Stream, x.Length, x.View, flag.View.Cast<int>(), first);
            return;
        }
        var span = x.Span;
        for (int i = 0; i < span.Length; i++)
        {
            if (!float.IsFinite(span[i]))
            {
                ref float f = ref flag.Span[0];
                f = BitConverter.Int32BitsToSingle(Math.Max(BitConverter.SingleToInt32Bits(f), int.MaxValue - (first + i)));
                return;
            }
        }
    }

    /// <summary>The first non-finite element a flag of <see cref="FlagNonFinite"/> holds (read as a float), or -1 for none.</summary>
    public static int FirstFlagged(float flag)
    {
        int bits = BitConverter.SingleToInt32Bits(flag);
        return bits == 0 ? -1 : int.MaxValue - bits;
    }

    /// <summary>
    /// The guarded step's decision, on the device (one thread): skip when record[0] (the loss) is not finite or
    /// record[1] flags a gradient; otherwise t += 1 and the bias corrections for t. With
    /// <paramref name="normSquared"/> [1] (Σg²; null when not clipping) it stores Σg² in record[2] and the
    /// clip scale min(1, maxNorm / (sqrt(Σg²) + 1e-6)) in state[3] (1 without clipping), as torch's clip_grad_norm_.
    /// </summary>
    public static void PrepareStep(Tensor state, Tensor record, Tensor? normSquared, float maxNorm, float beta1, float beta2)
    {
        Check.Shape("adam prepare", "state", state, StateLength);
        Check.Shape("adam prepare", "record", record, RecordLength);
        Check.Devices("adam prepare", state, record);
        if (normSquared is not null)
        {
            Check.Shape("adam prepare", "normSquared", normSquared, 1);
            Check.Same("adam prepare", state, normSquared);
        }
        using var simd = CpuSimd.Enter(state.Device);
        if (state.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(state);
            // Without clipping the kernel still takes a view: the record's own slot, which it does not read then.
            k.Optim.Prepare(k.Stream, 1, state.View, record.View, record.View.Cast<int>(), (normSquared ?? record).View, normSquared is null ? 0 : 1, maxNorm, beta1, beta2);
            return;
        }
        PrepareOnHost(state.Span, record.Span, normSquared is null ? default : normSquared.Span, normSquared is null ? 0 : 1, maxNorm, beta1, beta2);
    }

    private static void PrepareOnHost(Span<float> state, Span<float> record, ReadOnlySpan<float> normSquared, int clip, float maxNorm, float beta1, float beta2)
    {
        bool skip = !float.IsFinite(record[0]) || BitConverter.SingleToInt32Bits(record[1]) != 0;
        if (clip != 0)
        {
            record[2] = normSquared[0];
        }
        record[3] = skip ? 1f : 0f;
        state[4] = skip ? 1f : 0f;
        if (skip)
        {
            return;
        }
        var next = StepState.After(state[0], clip != 0 ? normSquared[0] : 0f, clip, maxNorm, beta1, beta2);
        (state[0], state[1], state[2], state[3]) = (next.T, next.Correction1, next.Correction2, next.ClipScale);
    }

    /// <summary>What a step that is taken writes into the state: t + 1, Adam's bias corrections 1/(1-β1^t) and
    /// 1/sqrt(1-β2^t) for it, and the clip scale min(1, maxNorm / (sqrt(Σg²) + 1e-6)) (1 without clipping). One
    /// formula for the host and the device's <see cref="PrepareKernel"/>.</summary>
    private readonly struct StepState(float t, float correction1, float correction2, float clipScale)
    {
        public readonly float T = t, Correction1 = correction1, Correction2 = correction2, ClipScale = clipScale;

        public static StepState After(float previousT, float normSquared, int clip, float maxNorm, float beta1, float beta2)
        {
            float t = previousT + 1f;
            float scale = 1f;
            if (clip != 0)
            {
                float s = maxNorm / (MathF.Sqrt(normSquared) + 1e-6f);
                scale = s < 1f ? s : 1f;
            }
            return new StepState(t, (float)(1.0 / (1.0 - Math.Pow(beta1, t))), (float)(1.0 / Math.Sqrt(1.0 - Math.Pow(beta2, t))), scale);
        }
    }

    /// <summary>Adam's step-independent settings.</summary>
    public readonly record struct AdamSettings(float Lr, float Beta1, float Beta2, float Eps);

    /// <summary>
    /// Adam as <see cref="Adam(Tensor, Tensor, Tensor, Tensor, float, float, float, float, int)"/>, with the gradient scaled by
    /// state[3] and the bias corrections from <paramref name="state"/> (see <see cref="PrepareStep"/>); nothing changes when
    /// state[4] says the step is skipped. One launch over a flat buffer of every parameter.
    /// </summary>
    public static void Adam(Tensor p, Tensor g, Tensor m, Tensor v, AdamSettings s, Tensor state)
    {
        Check.Devices("adam", p, g, m, v, state);
        Check.Shape("adam", "g", g, p.Shape);
        Check.Shape("adam", "m", m, p.Shape);
        Check.Shape("adam", "v", v, p.Shape);
        Check.Shape("adam", "state", state, StateLength);
        using var simd = CpuSimd.Enter(p.Device);
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.WeightsWritten();
            k.Optim.AdamGuarded(k.Stream, p.Length, p.View, g.View, m.View, v.View, new AdamHyper(s.Lr, s.Beta1, s.Beta2, s.Eps, 0, 0), state.View);
            return;
        }
        var st = state.Span;
        if (st[4] != 0)
        {
            return;
        }
        var h = new AdamHyper(s.Lr, s.Beta1, s.Beta2, s.Eps, st[1], st[2]);
        float scale = st[3];
        Cpu.For(p.Length, 1 << 15, (p.Host(), g.Host(), m.Host(), v.Host(), h, scale),
            static (x, first, last) =>
            {
                var (pv, gv, mv, vv, h, scale) = x;
                for (int i = first; i < last; i++)
                {
                    AdamElement(ref pv[i], gv[i] * scale, ref mv[i], ref vv[i], h);
                }
            });
    }

    /// <summary>e = decay·e + (1 - decay)·p unless state[4] says the step is skipped (see <see cref="PrepareStep"/>). One launch.</summary>
    public static void Ema(Tensor ema, Tensor p, float decay, Tensor state)
    {
        Check.Devices("ema", ema, p, state);
        Check.Shape("ema", "ema", ema, p.Shape);
        Check.Shape("ema", "state", state, StateLength);
        using var simd = CpuSimd.Enter(p.Device);
        if (p.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(p);
            k.WeightsWritten();
            k.Optim.EmaGuarded(k.Stream, p.Length, ema.View, p.View, decay, state.View);
            return;
        }
        if (state.Span[4] != 0)
        {
            return;
        }
        var ev = ema.Span;
        var pv = p.Span;
        for (int i = 0; i < pv.Length; i++)
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

    // i over the parameters: Adam unless the prepared state says skip; the gradient scaled by the clip scale.
    internal static void AdamGuardedKernel(Index1D i, ArrayView<float> p, ArrayView<float> g, ArrayView<float> m, ArrayView<float> v, AdamHyper h,
        ArrayView<float> state)
    {
        if (state[4] != 0f)
        {
            return;
        }
        float gi = g[i] * state[3];
        float mi = h.Beta1 * m[i] + (1f - h.Beta1) * gi;
        float vi = h.Beta2 * v[i] + (1f - h.Beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= h.Lr * (mi * state[1]) / (MathF.Sqrt(vi) * state[2] + h.Eps);
    }

    internal static void EmaGuardedKernel(Index1D i, ArrayView<float> ema, ArrayView<float> p, float decay, ArrayView<float> state)
    {
        if (state[4] == 0f)
        {
            ema[i] = decay * ema[i] + (1f - decay) * p[i];
        }
    }

    // i over x: a non-finite element raises the flag to int.MaxValue - (first + i); the largest value names the first element.
    internal static void FlagKernel(Index1D i, ArrayView<float> x, ArrayView<int> flag, int first)
    {
        float v = x[i];
        if (float.IsNaN(v) || float.IsInfinity(v))
        {
            Atomic.Max(ref flag[0], int.MaxValue - (first + i));
        }
    }

    // One thread: the step's skip decision, t and the bias corrections, the clip scale (see PrepareStep).
    internal static void PrepareKernel(Index1D zero, ArrayView<float> state, ArrayView<float> record, ArrayView<int> recordBits,
        ArrayView<float> normSquared, int clip, float maxNorm, float beta1, float beta2)
    {
        float loss = record[0];
        bool skip = float.IsNaN(loss) || float.IsInfinity(loss) || recordBits[1] != 0;
        if (clip != 0)
        {
            record[2] = normSquared[0];
        }
        record[3] = skip ? 1f : 0f;
        state[4] = skip ? 1f : 0f;
        if (!skip)
        {
            var next = StepState.After(state[0], clip != 0 ? normSquared[0] : 0f, clip, maxNorm, beta1, beta2);
            state[0] = next.T;
            state[1] = next.Correction1;
            state[2] = next.Correction2;
            state[3] = next.ClipScale;
        }
    }

    internal static void EmaKernel(Index1D i, ArrayView<float> ema, ArrayView<float> p, float decay) =>
        ema[i] = decay * ema[i] + (1f - decay) * p[i];

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper> Adam =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper>>(AdamKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Ema =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(EmaKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper, ArrayView<float>> AdamGuarded =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamHyper, ArrayView<float>>>(AdamGuardedKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float, ArrayView<float>> EmaGuarded =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float, ArrayView<float>>>(EmaGuardedKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<int>, int> Flag =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<int>, int>>(FlagKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, float, float, float> Prepare =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, int, float, float, float>>(PrepareKernel);
    }
}
