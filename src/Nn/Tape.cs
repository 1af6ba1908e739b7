using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// The autograd tape. Ops run eagerly on the device; while recording, each op also records what its
/// backward needs. <see cref="Backward(Var)"/> runs the records in reverse, adding gradients into every
/// input that requires one. Every derivative rule of the engine is here, one per primitive (as
/// tinygrad's gradient.py); layers and the U-Net get their gradients from these for free.
///
/// Memory: intermediates belong to the tape. During backward a value goes back to the device pool
/// as soon as no remaining record needs it, and a gradient as soon as its producer has used it, so
/// a training step's memory is bounded and returns to the pool for the next step. A tape made by
/// <see cref="NoGrad"/> records nothing; its values are released on <see cref="Dispose"/>.
/// </summary>
public sealed class Tape : IDisposable
{
    private readonly List<Step> _records = [];
    private readonly List<Var> _owned = [];
    private bool _backwardDone;

    /// <summary>A recording tape on <paramref name="device"/>.</summary>
    public Tape(Device device) : this(device, recording: true)
    {
    }

    private Tape(Device device, bool recording)
    {
        Device = device;
        Recording = recording;
    }

    /// <summary>A tape that records nothing (sampling, evaluation): no gradient, nothing kept for backward.</summary>
    public static Tape NoGrad(Device device) => new(device, recording: false);

    /// <summary>The device every op runs on.</summary>
    public Device Device { get; }

    /// <summary>False for a <see cref="NoGrad"/> tape.</summary>
    public bool Recording { get; }

    /// <summary>When set, every op and backward step of every tape is timed into it (see <see cref="OpProfile"/>).</summary>
    public static OpProfile? Profile { get; set; }

    /// <summary>Number of backward records kept (0 on a no-grad tape).</summary>
    public int RecordCount => _records.Count;

    /// <summary>Wraps a tensor the caller owns as a graph input that needs no gradient.</summary>
    public Var Constant(Tensor value) => new(value, requiresGrad: false);

    /// <summary>Takes a value out of the tape: the caller now owns (and disposes) its tensor.</summary>
    public Tensor Keep(Var v)
    {
        if (!_owned.Remove(v))
        {
            throw new InvalidOperationException("only a value this tape made can be kept");
        }
        v.OwnedByTape = false;
        return v.Value;
    }

    // ---------------- primitives and their derivative rules ----------------

    /// <summary>y = conv2d(x, w) + b. dx = convᵀ(dy, w), dw = Σ dy ⋆ x, db = Σ dy.</summary>
    public Var Conv2d(Var x, Var w, Var b, int stride, int pad)
    {
        using var timer = Profile?.Time("conv2d", Device) ?? default;
        var g = ConvShape.Of(x.Value, w.Value, stride, pad);
        var y = Make([g.N, g.K, g.P, g.Q], x, w, b);
        using (ConvDetail("fwd", g))
        {
            Kernels.Conv2d.Forward(x.Value, w.Value, b.Value, y.Value, stride, pad);
        }
        Record("conv2d", y, [x, w], dy =>
        {
            if (x.RequiresGrad)
            {
                using var detail = ConvDetail("dx ", g);
                var dx = x.GradForWrite(out bool accumulate);
                Kernels.Conv2d.BackwardInput(dy, w.Value, dx, stride, pad, accumulate);
            }
            if (w.RequiresGrad)
            {
                using var detail = ConvDetail("dw ", g);
                Kernels.Conv2d.BackwardWeight(dy, x.Value, w.GradBuffer(), stride, pad);
            }
            if (b.RequiresGrad)
            {
                Kernels.Conv2d.BackwardBias(dy, b.GradBuffer());
            }
        });
        return y;
    }

    /// <summary>A by-shape timer for one convolution pass when the profile asks for it, e.g. "conv fwd 16>32 3x3/1 14x14".</summary>
    private OpProfile.Timer ConvDetail(string pass, ConvShape g) =>
        Profile is { ByShape: true } p
            ? p.TimeDetail($"conv {pass} {g.C}>{g.K} {g.R}x{g.S}/{g.Stride} {g.H}x{g.W}", 2.0 * g.N * g.K * g.Crs * g.Pq, Device)
            : default;

    /// <summary>y = groupnorm(x)·gamma + beta, saving mean and rstd for backward.</summary>
    public Var GroupNorm(Var x, Var gamma, Var beta, int groups, float eps) => GroupNorm(x, gamma, beta, groups, eps, silu: false);

    /// <summary>y = silu(groupnorm(x)·gamma + beta) in one pass (the pattern in front of every U-Net
    /// convolution); backward recomputes the normalised value instead of storing it.</summary>
    public Var GroupNormSilu(Var x, Var gamma, Var beta, int groups, float eps) => GroupNorm(x, gamma, beta, groups, eps, silu: true);

    private Var GroupNorm(Var x, Var gamma, Var beta, int groups, float eps, bool silu)
    {
        string op = silu ? "groupnorm+silu" : "groupnorm";
        using var timer = Profile?.Time(op, Device) ?? default;
        var y = Make(x.Shape, x, gamma, beta);
        int n = x.Shape[0];
        var mean = Tensor.Empty(Device, n, groups);
        var rstd = Tensor.Empty(Device, n, groups);
        Kernels.GroupNorm.Forward(x.Value, gamma.Value, beta.Value, groups, eps, y.Value, mean, rstd, silu);
        if (!Record(op, y, [x, gamma, beta], dy =>
        {
            // The kernel computes all three gradients together; a frozen input gets a throwaway buffer.
            bool accumulate = false;
            using var scratchX = x.RequiresGrad ? null : Tensor.Empty(Device, x.Shape);
            using var scratchG = gamma.RequiresGrad ? null : gamma.Value.ZerosLike();
            using var scratchB = beta.RequiresGrad ? null : beta.Value.ZerosLike();
            Kernels.GroupNorm.Backward(dy, x.Value, mean, rstd, gamma.Value, beta.Value, groups,
                scratchX ?? x.GradForWrite(out accumulate), scratchG ?? gamma.GradBuffer(), scratchB ?? beta.GradBuffer(), silu, accumulate);
        }, mean, rstd))
        {
            mean.Dispose();
            rstd.Dispose();
        }
        return y;
    }

    /// <summary>y = silu(x). dx = dy·silu'(x).</summary>
    public Var Silu(Var x)
    {
        using var timer = Profile?.Time("silu", Device) ?? default;
        var y = Make(x.Shape, x);
        Kernels.Silu.Forward(x.Value, y.Value);
        Record("silu", y, [x], dy => Kernels.Silu.Backward(dy, x.Value, x.GradBuffer()));
        return y;
    }

    /// <summary>y = nearest 2× upsampling of x. dx = 2×2 block sums of dy.</summary>
    public Var Upsample2x(Var x)
    {
        using var timer = Profile?.Time("upsample", Device) ?? default;
        var s = x.Shape;
        var y = Make([s[0], s[1], 2 * s[2], 2 * s[3]], x);
        Kernels.Upsample.Forward(x.Value, y.Value);
        Record("upsample", y, [], dy => Kernels.Upsample.Backward(dy, x.GradBuffer()));
        return y;
    }

    /// <summary>y = x·wᵀ + b. dx = dy·w, dw = dyᵀ·x, db = Σ_n dy.</summary>
    public Var Linear(Var x, Var w, Var b)
    {
        using var timer = Profile?.Time("linear", Device) ?? default;
        var y = Make([x.Shape[0], w.Shape[0]], x, w, b);
        Kernels.Linear.Forward(x.Value, w.Value, b.Value, y.Value);
        Record("linear", y, [x, w], dy =>
        {
            if (x.RequiresGrad)
            {
                Kernels.Linear.BackwardInput(dy, w.Value, x.GradBuffer());
            }
            if (w.RequiresGrad)
            {
                Kernels.Linear.BackwardWeight(dy, x.Value, w.GradBuffer());
            }
            if (b.RequiresGrad)
            {
                Kernels.Linear.BackwardBias(dy, b.GradBuffer());
            }
        });
        return y;
    }

    /// <summary>y = cat(a, b) along channels. da, db = the two slices of dy.</summary>
    public Var Concat(Var a, Var b)
    {
        using var timer = Profile?.Time("concat", Device) ?? default;
        var s = a.Shape;
        var y = Make([s[0], s[1] + b.Shape[1], s[2], s[3]], a, b);
        Kernels.Concat.Forward(a.Value, b.Value, y.Value);
        Record("concat", y, [], dy =>
        {
            // A side that needs no gradient writes into a throwaway buffer.
            bool accA = false, accB = false;
            using var scratchA = a.RequiresGrad ? null : Tensor.Empty(Device, a.Shape);
            using var scratchB = b.RequiresGrad ? null : Tensor.Empty(Device, b.Shape);
            var da = scratchA ?? a.GradForWrite(out accA);
            var db = scratchB ?? b.GradForWrite(out accB);
            Kernels.Concat.Backward(dy, da, db, accA, accB);
        });
        return y;
    }

    /// <summary>y = a + b. da = db = dy.</summary>
    public Var Add(Var a, Var b)
    {
        using var timer = Profile?.Time("add", Device) ?? default;
        var y = Make(a.Shape, a, b);
        Elementwise.Add(a.Value, b.Value, y.Value);
        Record("add", y, [], dy =>
        {
            if (b.RequiresGrad)
            {
                PassGrad(b, y, dy);
            }
            if (a.RequiresGrad)
            {
                PassGrad(a, y, dy);
            }
        });
        return y;
    }

    /// <summary>y[n,c,h,w] = x[n,c,h,w] + e[n,c]. dx = dy, de = Σ_hw dy.</summary>
    public Var AddChannels(Var x, Var e)
    {
        using var timer = Profile?.Time("add_channels", Device) ?? default;
        var y = Make(x.Shape, x, e);
        Elementwise.AddChannels(x.Value, e.Value, y.Value);
        Record("add_channels", y, [], dy =>
        {
            if (e.RequiresGrad)
            {
                Elementwise.AddChannelsBackward(dy, e.GradBuffer());
            }
            if (x.RequiresGrad)
            {
                PassGrad(x, y, dy);
            }
        });
        return y;
    }

    /// <summary>loss = mean((pred - target)²), a [1] tensor. dpred = dloss·2(pred - target)/n.</summary>
    public Var MseLoss(Var pred, Var target)
    {
        using var timer = Profile?.Time("mse", Device) ?? default;
        var y = Make([1], pred, target);
        Reduce.Mse(pred.Value, target.Value, y.Value);
        Record("mse", y, [pred, target], dy =>
        {
            if (pred.RequiresGrad)
            {
                Reduce.MseBackward(dy, pred.Value, target.Value, pred.GradBuffer());
            }
            if (target.RequiresGrad)
            {
                // d/dtarget = -d/dpred.
                using var dPred = pred.Value.ZerosLike();
                Reduce.MseBackward(dy, pred.Value, target.Value, dPred);
                Elementwise.Accumulate(target.GradBuffer(), dPred, -1f);
            }
        });
        return y;
    }

    /// <summary>The sinusoidal embedding of integer timesteps t [N] → [N, dim]; no gradient (t is data).</summary>
    public Var TimeEmbedding(Var t, int dim)
    {
        using var timer = Profile?.Time("time_embedding", Device) ?? default;
        var y = Make([t.Shape[0], dim]);
        Kernels.TimeEmbedding.Forward(t.Value, y.Value);
        return y;
    }

    // ---------------- backward ----------------

    /// <summary>Backpropagates from a scalar loss: ∂loss/∂loss = 1, then every record in reverse.
    /// Gradients add into parameters' <see cref="Var.Grad"/>; intermediates return to the pool.</summary>
    public void Backward(Var loss)
    {
        if (loss.Value.Length != 1)
        {
            throw new ArgumentException($"backward needs a scalar loss, got {loss.Value.ShapeText}");
        }
        using var one = Tensor.Empty(Device, 1);
        Elementwise.Fill(one, 1f);
        Backward(loss, one);
    }

    /// <summary>Backpropagates a given gradient <paramref name="dOutput"/> of any value
    /// (a vector-Jacobian product; <see cref="Backward(Var)"/> is the scalar case).</summary>
    public void Backward(Var output, Tensor dOutput)
    {
        if (!Recording)
        {
            throw new InvalidOperationException("backward on a no-grad tape");
        }
        if (_backwardDone)
        {
            throw new InvalidOperationException("backward already ran on this tape; make a new tape per step");
        }
        _backwardDone = true;
        output.GradBuffer().CopyFrom(dOutput);
        for (int i = _records.Count - 1; i >= 0; i--)
        {
            var r = _records[i];
            if (r.Output.Grad is { } dy)
            {
                using var timer = Profile?.Time(r.Op, Device) ?? default;
                r.Backward(dy);
            }
            foreach (var aux in r.Aux)
            {
                aux.Dispose();
            }
            foreach (var saved in r.Saved)
            {
                saved.PendingUses--;
                ReleaseIfDone(saved);
            }
            r.Output.ProducerDone = true;
            ReleaseIfDone(r.Output);
        }
        _records.Clear();
    }

    private static void ReleaseIfDone(Var v)
    {
        // A value is dead once its producer's backward has run (so every consumer ran before it)
        // and no record still needs it. Parameters and inputs are never the tape's to free.
        if (v.OwnedByTape && v.ProducerDone && v.PendingUses == 0)
        {
            v.Release();
        }
    }

    /// <summary>
    /// v's gradient += y's, for ops whose derivative is the identity (additions). When v has no gradient yet and y's is
    /// still its own, v takes y's buffer instead of a copy: y's gradient is read by no one after its producer's backward,
    /// which is running now. Later calls of the same backward (the other input, or the same Var twice in x + x) still
    /// read dy, which nothing has changed yet.
    /// </summary>
    private static void PassGrad(Var v, Var y, Tensor dy)
    {
        if (v.Grad is null && v is not Parameter && ReferenceEquals(y.Grad, dy))
        {
            v.Grad = dy;
            y.Grad = null;
            return;
        }
        if (v.Grad is null)
        {
            v.Grad = Tensor.Empty(dy.Device, dy.Shape);
            v.Grad.CopyFrom(dy);
            return;
        }
        Elementwise.Accumulate(v.Grad, dy);
    }

    /// <summary>Releases every value and saved tensor the tape still holds.</summary>
    public void Dispose()
    {
        foreach (var r in _records)
        {
            foreach (var aux in r.Aux)
            {
                aux.Dispose();
            }
        }
        _records.Clear();
        foreach (var v in _owned)
        {
            if (v.OwnedByTape)
            {
                v.Release();
            }
        }
        _owned.Clear();
    }

    private Var Make(int[] shape, params Var[] inputs)
    {
        ObjectDisposedException.ThrowIf(_backwardDone && Recording, this);
        bool requiresGrad = Recording && inputs.Any(v => v.RequiresGrad);
        var v = new Var(Tensor.Empty(Device, shape), requiresGrad) { OwnedByTape = true };
        _owned.Add(v);
        return v;
    }

    /// <summary>Records a backward step when the output needs a gradient; false when nothing was recorded.</summary>
    private bool Record(string op, Var output, Var[] saved, Action<Tensor> backward, params Tensor[] aux)
    {
        if (!output.RequiresGrad)
        {
            return false;
        }
        foreach (var s in saved)
        {
            s.PendingUses++;
        }
        _records.Add(new Step(op + ".backward", output, saved, backward, aux));
        return true;
    }

    private sealed record Step(string Op, Var Output, Var[] Saved, Action<Tensor> Backward, Tensor[] Aux);
}
