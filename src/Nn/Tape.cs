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
/// <see cref="NoGrad"/> records nothing; its values are released on <see cref="Reset"/> or <see cref="Dispose"/>.
/// A loop that keeps one tape and resets it every step allocates no managed memory after the first: records are
/// structs whose rules are static lambdas, and the Var and Tensor objects are recycled.
/// </summary>
public sealed class Tape : IDisposable
{
    private readonly List<Step> _records = [];
    private readonly List<Var> _owned = [];
    private readonly List<Var> _constants = [];
    private readonly List<Tensor> _tensors = [];
    private readonly Stack<Var> _spareVars = new();
    private readonly Dictionary<int, Stack<Tensor>> _spareTensors = []; // by rank, so a recycled handle keeps its shape array
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
    public Var Constant(Tensor value)
    {
        var v = NewVar(value, requiresGrad: false);
        _constants.Add(v);
        return v;
    }

    /// <summary>
    /// Releases every value, gradient and saved tensor of the last recording to the pool and starts a new one. The
    /// tape keeps the Var and Tensor objects for the next recording, so a training loop that resets one tape per
    /// step allocates no managed memory after its first step; in return, a value the tape made (or a constant it
    /// wrapped) must not be used after the reset.
    /// </summary>
    public void Reset()
    {
        foreach (var r in _records)
        {
            r.Aux0?.Dispose();
            r.Aux1?.Dispose();
        }
        _records.Clear();
        foreach (var v in _owned)
        {
            v.Release();
            _spareVars.Push(v);
        }
        _owned.Clear();
        foreach (var v in _constants)
        {
            _spareVars.Push(v);
        }
        _constants.Clear();
        foreach (var t in _tensors)
        {
            t.Dispose();
            if (!_spareTensors.TryGetValue(t.Rank, out var spares))
            {
                _spareTensors[t.Rank] = spares = new Stack<Tensor>();
            }
            spares.Push(t);
        }
        _tensors.Clear();
        _backwardDone = false;
    }

    // ---------------- primitives and their derivative rules ----------------
    // Each rule is a static lambda that reads what it needs from its record (inputs A, B, C, integer arguments, saved
    // tensors): a capturing lambda would allocate a closure per op and step.

    /// <summary>y = conv2d(x, w) + b, and with <paramref name="channelBias"/> e [N, K] also + e[n, k] over each image (in
    /// the convolution's epilogue). dx = convᵀ(dy, w), dw = Σ dy ⋆ x, db = Σ dy, de = Σ_hw dy.</summary>
    public Var Conv2d(Var x, Var w, Var b, int stride, int pad, Var? channelBias = null)
    {
        using var timer = Profile?.Time("conv2d", Device) ?? default;
        var g = ConvShape.Of(x.Value, w.Value, stride, pad);
        var y = Make([g.N, g.K, g.P, g.Q], x, w, b, channelBias);
        using (ConvDetail("fwd", g))
        {
            Kernels.Conv2d.Forward(x.Value, w.Value, b.Value, y.Value, stride, pad, channelBias?.Value);
        }
        Record(new Step("conv2d.backward", y, static (tape, in r, dy) =>
        {
            var (x, w, b, e, stride, pad) = (r.A!, r.B!, r.C!, r.D, r.I0, r.I1);
            if (e is { RequiresGrad: true })
            {
                Elementwise.AddChannelsBackward(dy, tape.GradOf(e));
            }
            var g = ConvShape.Of(x.Value, w.Value, stride, pad);
            if (x.RequiresGrad)
            {
                using var detail = ConvDetail("dx ", g, tape.Device);
                var dx = tape.GradForWrite(x, out bool accumulate);
                Kernels.Conv2d.BackwardInput(dy, w.Value, dx, stride, pad, accumulate);
            }
            if (w.RequiresGrad)
            {
                using var detail = ConvDetail("dw ", g, tape.Device);
                Kernels.Conv2d.BackwardWeight(dy, x.Value, tape.GradOf(w), stride, pad);
            }
            if (b.RequiresGrad)
            {
                Kernels.Conv2d.BackwardBias(dy, tape.GradOf(b));
            }
        }, x, w, b, channelBias) { Saved = 2, I0 = stride, I1 = pad });
        return y;
    }

    /// <summary>A by-shape timer for one convolution pass when the profile asks for it, e.g. "conv fwd 16>32 3x3/1 14x14".</summary>
    private OpProfile.Timer ConvDetail(string pass, ConvShape g) => ConvDetail(pass, g, Device);

    private static OpProfile.Timer ConvDetail(string pass, ConvShape g, Device device) =>
        Profile is { ByShape: true } p
            ? p.TimeDetail($"conv {pass} {g.C}>{g.K} {g.R}x{g.S}/{g.Stride} {g.H}x{g.W}", 2.0 * g.N * g.K * g.Crs * g.Pq, device)
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
        var mean = NewTensor([n, groups]);
        var rstd = NewTensor([n, groups]);
        Kernels.GroupNorm.Forward(x.Value, gamma.Value, beta.Value, groups, eps, y.Value, mean, rstd, silu);
        if (!Record(new Step(silu ? "groupnorm+silu.backward" : "groupnorm.backward", y, static (tape, in r, dy) =>
        {
            var (x, gamma, beta, groups, silu) = (r.A!, r.B!, r.C!, r.I0, r.I1 != 0);
            // The kernel computes all three gradients together; a frozen input gets a throwaway buffer.
            bool accumulate = false;
            var dx = x.RequiresGrad ? tape.GradForWrite(x, out accumulate) : tape.NewTensor(x.Shape);
            var dgamma = gamma.RequiresGrad ? tape.GradOf(gamma) : tape.Zeros(gamma.Shape);
            var dbeta = beta.RequiresGrad ? tape.GradOf(beta) : tape.Zeros(beta.Shape);
            Kernels.GroupNorm.Backward(dy, x.Value, r.Aux0!, r.Aux1!, gamma.Value, beta.Value, groups, dx, dgamma, dbeta, silu, accumulate);
        }, x, gamma, beta) { Saved = 3, I0 = groups, I1 = silu ? 1 : 0, Aux0 = mean, Aux1 = rstd }))
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
        Record(new Step("silu.backward", y, static (tape, in r, dy) => Kernels.Silu.Backward(dy, r.A!.Value, tape.GradOf(r.A!)), x) { Saved = 1 });
        return y;
    }

    /// <summary>y = nearest 2× upsampling of x. dx = 2×2 block sums of dy.</summary>
    public Var Upsample2x(Var x)
    {
        using var timer = Profile?.Time("upsample", Device) ?? default;
        var s = x.Shape;
        var y = Make([s[0], s[1], 2 * s[2], 2 * s[3]], x);
        Kernels.Upsample.Forward(x.Value, y.Value);
        Record(new Step("upsample.backward", y, static (tape, in r, dy) => Kernels.Upsample.Backward(dy, tape.GradOf(r.A!)), x));
        return y;
    }

    /// <summary>y = x·wᵀ + b. dx = dy·w, dw = dyᵀ·x, db = Σ_n dy.</summary>
    public Var Linear(Var x, Var w, Var b)
    {
        using var timer = Profile?.Time("linear", Device) ?? default;
        var y = Make([x.Shape[0], w.Shape[0]], x, w, b);
        Kernels.Linear.Forward(x.Value, w.Value, b.Value, y.Value);
        Record(new Step("linear.backward", y, static (tape, in r, dy) =>
        {
            var (x, w, b) = (r.A!, r.B!, r.C!);
            if (x.RequiresGrad)
            {
                Kernels.Linear.BackwardInput(dy, w.Value, tape.GradOf(x));
            }
            if (w.RequiresGrad)
            {
                Kernels.Linear.BackwardWeight(dy, x.Value, tape.GradOf(w));
            }
            if (b.RequiresGrad)
            {
                Kernels.Linear.BackwardBias(dy, tape.GradOf(b));
            }
        }, x, w, b) { Saved = 2 });
        return y;
    }

    /// <summary>y = cat(a, b) along channels. da, db = the two slices of dy.</summary>
    public Var Concat(Var a, Var b)
    {
        using var timer = Profile?.Time("concat", Device) ?? default;
        var s = a.Shape;
        var y = Make([s[0], s[1] + b.Shape[1], s[2], s[3]], a, b);
        Kernels.Concat.Forward(a.Value, b.Value, y.Value);
        Record(new Step("concat.backward", y, static (tape, in r, dy) =>
        {
            // A side that needs no gradient writes into a throwaway buffer.
            var (a, b) = (r.A!, r.B!);
            bool accA = false, accB = false;
            var da = a.RequiresGrad ? tape.GradForWrite(a, out accA) : tape.NewTensor(a.Shape);
            var db = b.RequiresGrad ? tape.GradForWrite(b, out accB) : tape.NewTensor(b.Shape);
            Kernels.Concat.Backward(dy, da, db, accA, accB);
        }, a, b));
        return y;
    }

    /// <summary>y = a + b. da = db = dy.</summary>
    public Var Add(Var a, Var b)
    {
        using var timer = Profile?.Time("add", Device) ?? default;
        var y = Make(a.Shape, a, b);
        Elementwise.Add(a.Value, b.Value, y.Value);
        Record(new Step("add.backward", y, static (tape, in r, dy) =>
        {
            if (r.B!.RequiresGrad)
            {
                tape.PassGrad(r.B, r.Output, dy);
            }
            if (r.A!.RequiresGrad)
            {
                tape.PassGrad(r.A, r.Output, dy);
            }
        }, a, b));
        return y;
    }

    /// <summary>loss = mean((pred - target)²), a [1] tensor. dpred = dloss·2(pred - target)/n.</summary>
    public Var MseLoss(Var pred, Var target)
    {
        using var timer = Profile?.Time("mse", Device) ?? default;
        var y = Make([1], pred, target);
        Reduce.Mse(pred.Value, target.Value, y.Value);
        Record(new Step("mse.backward", y, static (tape, in r, dy) =>
        {
            var (pred, target) = (r.A!, r.B!);
            if (pred.RequiresGrad)
            {
                Reduce.MseBackward(dy, pred.Value, target.Value, tape.GradOf(pred));
            }
            if (target.RequiresGrad)
            {
                // d/dtarget = -d/dpred.
                var dPred = tape.Zeros(pred.Shape);
                Reduce.MseBackward(dy, pred.Value, target.Value, dPred);
                Elementwise.Accumulate(tape.GradOf(target), dPred, -1f);
            }
        }, pred, target) { Saved = 2 });
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
        var one = NewTensor([1]);
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
            throw new InvalidOperationException("backward already ran on this recording; reset the tape (or make a new one) per step");
        }
        _backwardDone = true;
        GradOf(output).CopyFrom(dOutput);
        for (int i = _records.Count - 1; i >= 0; i--)
        {
            var r = _records[i];
            if (r.Output.Grad is { } dy)
            {
                using var timer = Profile?.Time(r.Op, Device) ?? default;
                r.Backward(this, r, dy);
            }
            r.Aux0?.Dispose();
            r.Aux1?.Dispose();
            for (int k = 0; k < r.Saved; k++)
            {
                var saved = r.Input(k);
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

    /// <summary>v's gradient, created as zeros on first use (a parameter's own persistent one, else a tape tensor).</summary>
    private Tensor GradOf(Var v) => v.OwnedByTape ? v.Grad ??= Zeros(v.Shape) : v.GradBuffer();

    /// <summary>
    /// The gradient buffer for a kernel that can either overwrite or add: a fresh, uninitialised buffer with
    /// <paramref name="accumulate"/> false when no gradient has arrived yet (saving the zeroing pass), else the
    /// existing one with <paramref name="accumulate"/> true.
    /// </summary>
    private Tensor GradForWrite(Var v, out bool accumulate)
    {
        accumulate = v.Grad is not null;
        return v.Grad ??= v.OwnedByTape ? NewTensor(v.Shape) : Tensor.Empty(Device, v.Shape);
    }

    /// <summary>
    /// v's gradient += y's, for ops whose derivative is the identity (additions). When v has no gradient yet and y's is
    /// still its own, v takes y's buffer instead of a copy: y's gradient is read by no one after its producer's backward,
    /// which is running now. Later calls of the same backward (the other input, or the same Var twice in x + x) still
    /// read dy, which nothing has changed yet.
    /// </summary>
    private void PassGrad(Var v, Var y, Tensor dy)
    {
        if (v.Grad is null && v.OwnedByTape && ReferenceEquals(y.Grad, dy))
        {
            v.Grad = dy;
            y.Grad = null;
            return;
        }
        if (v.Grad is null)
        {
            var g = GradForWrite(v, out _);
            g.CopyFrom(dy);
            return;
        }
        Elementwise.Accumulate(v.Grad, dy);
    }

    /// <summary>Releases every value and saved tensor the tape still holds.</summary>
    public void Dispose()
    {
        Reset();
        _spareVars.Clear();
        _spareTensors.Clear();
    }

    /// <summary>A tensor that lives until the next <see cref="Reset"/> (a recycled handle when the tape has one).</summary>
    private Tensor NewTensor(ReadOnlySpan<int> shape)
    {
        var t = _spareTensors.TryGetValue(shape.Length, out var spares) && spares.TryPop(out var spare)
            ? spare.Reopen(shape)
            : Tensor.Empty(Device, shape);
        _tensors.Add(t);
        return t;
    }

    private Tensor Zeros(ReadOnlySpan<int> shape)
    {
        var t = NewTensor(shape);
        t.Zero();
        return t;
    }

    private Var NewVar(Tensor value, bool requiresGrad)
    {
        if (_spareVars.TryPop(out var v))
        {
            v.Reuse(value, requiresGrad);
            return v;
        }
        return new Var(value, requiresGrad);
    }

    /// <summary>The output of an op on up to four inputs: it needs a gradient when recording and any input does.</summary>
    private Var Make(ReadOnlySpan<int> shape, Var? a = null, Var? b = null, Var? c = null, Var? d = null)
    {
        ObjectDisposedException.ThrowIf(_backwardDone && Recording, this);
        bool requiresGrad = Recording && (a is { RequiresGrad: true } || b is { RequiresGrad: true } || c is { RequiresGrad: true }
            || d is { RequiresGrad: true });
        var v = NewVar(NewTensor(shape), requiresGrad);
        v.OwnedByTape = true;
        _owned.Add(v);
        return v;
    }

    /// <summary>Records a backward step when the output needs a gradient; false when nothing was recorded.</summary>
    private bool Record(in Step step)
    {
        if (!step.Output.RequiresGrad)
        {
            return false;
        }
        for (int k = 0; k < step.Saved; k++)
        {
            step.Input(k).PendingUses++;
        }
        _records.Add(step);
        return true;
    }

    /// <summary>A derivative rule: adds ∂loss/∂input for the record's inputs, given ∂loss/∂output <paramref name="dy"/>.</summary>
    private delegate void Rule(Tape tape, in Step record, Tensor dy);

    /// <summary>
    /// One backward record: the op's rule, its output, its inputs A, B, C, D, of which the first <see cref="Saved"/> have
    /// values the rule reads (so they stay alive until it has run), integer arguments and saved tensors.
    /// </summary>
    private readonly record struct Step(string Op, Var Output, Rule Backward, Var? A = null, Var? B = null, Var? C = null, Var? D = null)
    {
        public int Saved { get; init; }
        public int I0 { get; init; }
        public int I1 { get; init; }
        public Tensor? Aux0 { get; init; }
        public Tensor? Aux1 { get; init; }

        public Var Input(int k) => (k == 0 ? A : k == 1 ? B : C)!;
    }
}
