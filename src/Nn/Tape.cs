using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// The autograd tape. Ops run eagerly on the device; while recording, each op also records what its
/// backward needs. <see cref="Backward(Var)"/> runs the records in reverse, adding gradients into every
/// input that requires one. Every derivative rule of the engine is here, one per primitive (as
/// tinygrad's gradient.py); layers and the U-Net get their gradients from these for free.
///
/// Records: one struct type per op (<see cref="Conv2dRecord"/>, <see cref="GroupNormRecord"/>, ...) with its inputs,
/// arguments and saved tensors as named fields and its derivative rule as a method. Each type has its own list; the
/// tape keeps the order of all records as (list, index) entries and runs them backwards.
///
/// Memory: intermediates belong to the tape. During backward a value goes back to the device pool
/// as soon as no remaining record needs it, and a gradient as soon as its producer has used it, so
/// a training step's memory is bounded and returns to the pool for the next step. A tape made by
/// <see cref="NoGrad"/> records nothing; its values are released on <see cref="Reset"/> or <see cref="Dispose"/>.
/// A loop that keeps one tape and resets it every step allocates no managed memory after the first: records are
/// structs in lists that keep their capacity, rules are ordinary methods (no delegate, no closure), and the Var and
/// Tensor objects are recycled.
/// </summary>
public sealed class Tape : IDisposable
{
    private readonly List<Entry> _order = [];
    private readonly Records<Conv2dRecord> _conv2d = new();
    private readonly Records<GroupNormRecord> _groupNorm = new();
    private readonly Records<SiluRecord> _silu = new();
    private readonly Records<UpsampleRecord> _upsample = new();
    private readonly Records<LinearRecord> _linear = new();
    private readonly Records<ConcatRecord> _concat = new();
    private readonly Records<AddRecord> _add = new();
    private readonly Records<MseRecord> _mse = new();
    private readonly Records<EmbeddingRecord> _embedding = new();
    private readonly Records<CrossEntropyRecord> _crossEntropy = new();
    private readonly RecordList[] _allRecords;
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
        _allRecords = [_conv2d, _groupNorm, _silu, _upsample, _linear, _concat, _add, _mse, _embedding, _crossEntropy];
    }

    /// <summary>A tape that records nothing (sampling, evaluation): no gradient, nothing kept for backward.</summary>
    public static Tape NoGrad(Device device) => new(device, recording: false);

    /// <summary>The device every op runs on.</summary>
    public Device Device { get; }

    /// <summary>False for a <see cref="NoGrad"/> tape.</summary>
    public bool Recording { get; }

    /// <summary>When set, every op and backward step of this tape is timed into it (see <see cref="OpProfile"/>): set on
    /// the tape a profiled run uses (<c>ddpm bench --profile</c>), never process-wide.</summary>
    public OpProfile? Profile { get; set; }

    /// <summary>Number of backward records kept (0 on a no-grad tape).</summary>
    public int RecordCount => _order.Count;

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
        ClearRecords();
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

    // ---------------- primitives ----------------
    // Each op runs its forward kernel and records a struct of its own type; the derivative rules are the records'
    // Backward methods, further down.

    /// <summary>y = conv2d(x, w) + b, and with <paramref name="channelBias"/> e [N, K] also + e[n, k] over each image (in
    /// the convolution's epilogue), and with <paramref name="residual"/> (shaped as y) also + residual (a ResBlock's skip
    /// path, in the epilogue on the tiled ILGPU path). dx = convᵀ(dy, w), dw = Σ dy ⋆ x, db = Σ dy, de = Σ_hw dy,
    /// dresidual = dy.</summary>
    public Var Conv2d(Var x, Var w, Var b, int stride, int pad, Var? channelBias = null, Var? residual = null)
    {
        using var timer = Profile?.Time("conv2d", Device) ?? default;
        var g = ConvShape.Of(x.Value, w.Value, stride, pad);
        var y = Make([g.N, g.K, g.P, g.Q], x, w, b, channelBias, residual);
        using (ConvDetail("fwd", g))
        {
            Kernels.Conv2d.Forward(x.Value, w.Value, b.Value, y.Value, stride, pad, channelBias?.Value, residual?.Value);
        }
        Record(_conv2d, new Conv2dRecord(y, x, w, b, channelBias, residual, stride, pad));
        return y;
    }

    /// <summary>A by-shape timer for one convolution pass when the profile asks for it, e.g. "conv fwd 16>32 3x3/1 14x14".</summary>
    private OpProfile.Timer ConvDetail(string pass, ConvShape g) => ConvDetail(Profile, pass, g, Device);

    private static OpProfile.Timer ConvDetail(OpProfile? profile, string pass, ConvShape g, Device device)
    {
        if (profile is not { ByShape: true } p)
        {
            return default;
        }
        p.RecordConv(pass.Trim(), g);
        return p.TimeDetail($"conv {pass} {g.C}>{g.K} {g.R}x{g.S}/{g.Stride} {g.H}x{g.W}", 2.0 * g.N * g.K * g.Crs * g.Pq, device);
    }

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
        if (!Record(_groupNorm, new GroupNormRecord(y, x, gamma, beta, mean, rstd, groups, silu)))
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
        Record(_silu, new SiluRecord(y, x));
        return y;
    }

    /// <summary>y = nearest 2× upsampling of x. dx = 2×2 block sums of dy.</summary>
    public Var Upsample2x(Var x)
    {
        using var timer = Profile?.Time("upsample", Device) ?? default;
        var s = x.Shape;
        var y = Make([s[0], s[1], 2 * s[2], 2 * s[3]], x);
        Kernels.Upsample.Forward(x.Value, y.Value);
        Record(_upsample, new UpsampleRecord(y, x));
        return y;
    }

    /// <summary>y = x·wᵀ + b. dx = dy·w, dw = dyᵀ·x, db = Σ_n dy.</summary>
    public Var Linear(Var x, Var w, Var b)
    {
        using var timer = Profile?.Time("linear", Device) ?? default;
        var y = Make([x.Shape[0], w.Shape[0]], x, w, b);
        Kernels.Linear.Forward(x.Value, w.Value, b.Value, y.Value);
        Record(_linear, new LinearRecord(y, x, w, b));
        return y;
    }

    /// <summary>y = cat(a, b) along channels. da, db = the two slices of dy.</summary>
    public Var Concat(Var a, Var b)
    {
        using var timer = Profile?.Time("concat", Device) ?? default;
        var s = a.Shape;
        var y = Make([s[0], s[1] + b.Shape[1], s[2], s[3]], a, b);
        Kernels.Concat.Forward(a.Value, b.Value, y.Value);
        Record(_concat, new ConcatRecord(y, a, b));
        return y;
    }

    /// <summary>y = a + b. da = db = dy.</summary>
    public Var Add(Var a, Var b)
    {
        using var timer = Profile?.Time("add", Device) ?? default;
        var y = Make(a.Shape, a, b);
        Elementwise.Add(a.Value, b.Value, y.Value);
        Record(_add, new AddRecord(y, a, b));
        return y;
    }

    /// <summary>loss = mean((pred - target)²), a [1] tensor. dpred = dloss·2(pred - target)/n.</summary>
    public Var MseLoss(Var pred, Var target)
    {
        using var timer = Profile?.Time("mse", Device) ?? default;
        var y = Make([1], pred, target);
        Reduce.Mse(pred.Value, target.Value, y.Value);
        Record(_mse, new MseRecord(y, pred, target));
        return y;
    }

    /// <summary>
    /// Embedding lookup (torch.nn.Embedding): y[n] = table[labels[n]] for labels [N] (integers as
    /// floats) and table [R, D] → [N, D], as a one-hot [N, R] times the table. dtable += one-hotᵀ·dy
    /// (the GEMM sums each row's batch entries in a fixed order: deterministic); labels get no gradient.
    /// </summary>
    public Var Embedding(Var labels, Var table)
    {
        using var timer = Profile?.Time("embedding", Device) ?? default;
        var oneHot = NewTensor([labels.Shape[0], table.Shape[0]]);
        Kernels.Embedding.OneHot(labels.Value, oneHot);
        var y = Make([labels.Shape[0], table.Shape[1]], table);
        Kernels.Embedding.Forward(oneHot, table.Value, y.Value);
        if (!Record(_embedding, new EmbeddingRecord(y, table, oneHot)))
        {
            oneHot.Dispose();
        }
        return y;
    }

    /// <summary>loss = (1/N) Σ_n (logsumexp(logits[n]) - logits[n, labels[n]]), a [1] tensor, for logits [N, K] (or
    /// [N, K, 1, 1]) and integer labels [N] held as floats. dlogits = dloss·(softmax(logits) - onehot(labels))/N; the
    /// labels get no gradient.</summary>
    public Var SoftmaxCrossEntropy(Var logits, Var labels)
    {
        using var timer = Profile?.Time("softmax_ce", Device) ?? default;
        var y = Make([1], logits);
        Reduce.SoftmaxCrossEntropy(logits.Value, labels.Value, y.Value);
        Record(_crossEntropy, new CrossEntropyRecord(y, logits, labels));
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

    // ---------------- records and their derivative rules ----------------

    /// <summary>
    /// One op's backward record: its output, then its inputs, arguments and saved tensors as named fields. An input
    /// whose value the rule reads is held (<see cref="Hold"/>) from recording until the rule has run
    /// (<see cref="Unhold"/>), so backward frees it no earlier; an input the rule only sends a gradient to is not.
    /// </summary>
    private interface IRecord
    {
        /// <summary>The op's output; its gradient is the rule's dy.</summary>
        Var Output { get; }

        /// <summary>The name the profile times the rule under.</summary>
        string Op { get; }

        /// <summary>The derivative rule: adds ∂loss/∂input into every input that requires a gradient, given
        /// <paramref name="dy"/> = ∂loss/∂output.</summary>
        void Backward(Tape tape, Tensor dy);

        /// <summary>Counts a pending use on every input whose value <see cref="Backward"/> reads.</summary>
        void Hold();

        /// <summary>After the rule (or instead of it, when no gradient reached the output): gives those uses back,
        /// releasing what no record needs any more, and disposes the tensors the record saved.</summary>
        void Unhold();

        /// <summary>On a reset before backward: disposes the tensors the record saved.</summary>
        void Discard();
    }

    /// <summary>conv2d: y = conv(X, W; Stride, Pad) + Bias (+ ChannelBias[n, k]) (+ Residual). The rule reads X and W.</summary>
    private readonly record struct Conv2dRecord(Var Output, Var X, Var W, Var Bias, Var? ChannelBias, Var? Residual, int Stride, int Pad) : IRecord
    {
        public string Op => "conv2d.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            if (ChannelBias is { RequiresGrad: true })
            {
                Elementwise.AddChannelsBackward(dy, tape.GradOf(ChannelBias, GradWrite.Add, out _));
            }
            var g = ConvShape.Of(X.Value, W.Value, Stride, Pad);
            if (X.RequiresGrad)
            {
                using var detail = ConvDetail(tape.Profile, "dx ", g, tape.Device);
                var dx = tape.GradOf(X, GradWrite.OverwriteOrAdd, out bool accumulate);
                Kernels.Conv2d.BackwardInput(dy, W.Value, dx, Stride, Pad, accumulate);
            }
            if (W.RequiresGrad)
            {
                // The bias gradient rides in the weight gradient's pass (one launch on the tiled ILGPU path).
                using var detail = ConvDetail(tape.Profile, "dw ", g, tape.Device);
                var db = Bias.RequiresGrad ? tape.GradOf(Bias, GradWrite.Add, out _) : null;
                Kernels.Conv2d.BackwardWeight(dy, X.Value, tape.GradOf(W, GradWrite.Add, out _), Stride, Pad, db);
            }
            else if (Bias.RequiresGrad)
            {
                Kernels.Conv2d.BackwardBias(dy, tape.GradOf(Bias, GradWrite.Add, out _));
            }
            // Last: the residual may take dy's buffer as its own gradient, after every read of dy above.
            if (Residual is { RequiresGrad: true })
            {
                tape.PassGrad(Residual, Output, dy);
            }
        }

        public void Hold()
        {
            X.PendingUses++;
            W.PendingUses++;
        }

        public void Unhold()
        {
            Give(X);
            Give(W);
        }

        public void Discard()
        {
        }
    }

    /// <summary>groupnorm(+silu): y = [silu](norm(X; Groups)·Gamma + Beta), with the forward's per-group Mean and Rstd
    /// saved. The rule reads X, Gamma and Beta (the fused SiLU recomputes the pre-activation).</summary>
    private readonly record struct GroupNormRecord(Var Output, Var X, Var Gamma, Var Beta, Tensor Mean, Tensor Rstd, int Groups, bool Silu)
        : IRecord
    {
        public string Op => Silu ? "groupnorm+silu.backward" : "groupnorm.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            // The kernel computes all three gradients together; a frozen input gets a throwaway buffer.
            bool accumulate = false;
            var dx = X.RequiresGrad ? tape.GradOf(X, GradWrite.OverwriteOrAdd, out accumulate) : tape.NewTensor(X.Shape);
            var dgamma = Gamma.RequiresGrad ? tape.GradOf(Gamma, GradWrite.Add, out _) : tape.Zeros(Gamma.Shape);
            var dbeta = Beta.RequiresGrad ? tape.GradOf(Beta, GradWrite.Add, out _) : tape.Zeros(Beta.Shape);
            Kernels.GroupNorm.Backward(dy, X.Value, Mean, Rstd, Gamma.Value, Beta.Value, Groups, dx, dgamma, dbeta, Silu, accumulate);
        }

        public void Hold()
        {
            X.PendingUses++;
            Gamma.PendingUses++;
            Beta.PendingUses++;
        }

        public void Unhold()
        {
            Give(X);
            Give(Gamma);
            Give(Beta);
            Discard();
        }

        public void Discard()
        {
            Mean.Dispose();
            Rstd.Dispose();
        }
    }

    /// <summary>silu: y = silu(X). The rule reads X.</summary>
    private readonly record struct SiluRecord(Var Output, Var X) : IRecord
    {
        public string Op => "silu.backward";

        public void Backward(Tape tape, Tensor dy) => Kernels.Silu.Backward(dy, X.Value, tape.GradOf(X, GradWrite.Add, out _));

        public void Hold() => X.PendingUses++;

        public void Unhold() => Give(X);

        public void Discard()
        {
        }
    }

    /// <summary>upsample: y = nearest 2× of X. The rule reads no value.</summary>
    private readonly record struct UpsampleRecord(Var Output, Var X) : IRecord
    {
        public string Op => "upsample.backward";

        public void Backward(Tape tape, Tensor dy) => Kernels.Upsample.Backward(dy, tape.GradOf(X, GradWrite.Add, out _));

        public void Hold()
        {
        }

        public void Unhold()
        {
        }

        public void Discard()
        {
        }
    }

    /// <summary>linear: y = X·Wᵀ + Bias. The rule reads X and W.</summary>
    private readonly record struct LinearRecord(Var Output, Var X, Var W, Var Bias) : IRecord
    {
        public string Op => "linear.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            if (X.RequiresGrad)
            {
                Kernels.Linear.BackwardInput(dy, W.Value, tape.GradOf(X, GradWrite.Add, out _));
            }
            if (W.RequiresGrad)
            {
                // The bias gradient rides in the weight gradient's product (one launch on the tiled ILGPU path).
                var db = Bias.RequiresGrad ? tape.GradOf(Bias, GradWrite.Add, out _) : null;
                Kernels.Linear.BackwardWeight(dy, X.Value, tape.GradOf(W, GradWrite.Add, out _), db);
            }
            else if (Bias.RequiresGrad)
            {
                Kernels.Linear.BackwardBias(dy, tape.GradOf(Bias, GradWrite.Add, out _));
            }
        }

        public void Hold()
        {
            X.PendingUses++;
            W.PendingUses++;
        }

        public void Unhold()
        {
            Give(X);
            Give(W);
        }

        public void Discard()
        {
        }
    }

    /// <summary>concat: y = cat(A, B) along channels. The rule reads no value (only the shapes).</summary>
    private readonly record struct ConcatRecord(Var Output, Var A, Var B) : IRecord
    {
        public string Op => "concat.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            // A side that needs no gradient writes into a throwaway buffer.
            bool accA = false, accB = false;
            var da = A.RequiresGrad ? tape.GradOf(A, GradWrite.OverwriteOrAdd, out accA) : tape.NewTensor(A.Shape);
            var db = B.RequiresGrad ? tape.GradOf(B, GradWrite.OverwriteOrAdd, out accB) : tape.NewTensor(B.Shape);
            Kernels.Concat.Backward(dy, da, db, accA, accB);
        }

        public void Hold()
        {
        }

        public void Unhold()
        {
        }

        public void Discard()
        {
        }
    }

    /// <summary>add: y = A + B. The rule reads no value.</summary>
    private readonly record struct AddRecord(Var Output, Var A, Var B) : IRecord
    {
        public string Op => "add.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            if (B.RequiresGrad)
            {
                tape.PassGrad(B, Output, dy);
            }
            if (A.RequiresGrad)
            {
                tape.PassGrad(A, Output, dy);
            }
        }

        public void Hold()
        {
        }

        public void Unhold()
        {
        }

        public void Discard()
        {
        }
    }

    /// <summary>embedding: y = OneHot·Table. The rule reads only the saved one-hot matrix.</summary>
    private readonly record struct EmbeddingRecord(Var Output, Var Table, Tensor OneHot) : IRecord
    {
        public string Op => "embedding.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            if (Table.RequiresGrad)
            {
                Kernels.Embedding.Backward(OneHot, dy, tape.GradOf(Table, GradWrite.Add, out _));
            }
        }

        public void Hold()
        {
        }

        public void Unhold() => Discard();

        public void Discard() => OneHot.Dispose();
    }

    /// <summary>mse: loss = mean((Pred - Target)²). The rule reads Pred and Target.</summary>
    private readonly record struct MseRecord(Var Output, Var Pred, Var Target) : IRecord
    {
        public string Op => "mse.backward";

        public void Backward(Tape tape, Tensor dy)
        {
            if (Pred.RequiresGrad)
            {
                Reduce.MseBackward(dy, Pred.Value, Target.Value, tape.GradOf(Pred, GradWrite.Add, out _));
            }
            if (Target.RequiresGrad)
            {
                // d/dtarget = -d/dpred.
                var dPred = tape.Zeros(Pred.Shape);
                Reduce.MseBackward(dy, Pred.Value, Target.Value, dPred);
                Elementwise.Accumulate(tape.GradOf(Target, GradWrite.Add, out _), dPred, -1f);
            }
        }

        public void Hold()
        {
            Pred.PendingUses++;
            Target.PendingUses++;
        }

        public void Unhold()
        {
            Give(Pred);
            Give(Target);
        }

        public void Discard()
        {
        }
    }

    /// <summary>softmax cross-entropy: loss = mean_n (logsumexp(Logits[n]) - Logits[n, Labels[n]]). The rule reads both.</summary>
    private readonly record struct CrossEntropyRecord(Var Output, Var Logits, Var Labels) : IRecord
    {
        public string Op => "softmax_ce.backward";

        public void Backward(Tape tape, Tensor dy) =>
            Reduce.SoftmaxCrossEntropyBackward(dy, Logits.Value, Labels.Value, tape.GradOf(Logits, GradWrite.Add, out _));

        public void Hold()
        {
            Logits.PendingUses++;
            Labels.PendingUses++;
        }

        public void Unhold()
        {
            Give(Logits);
            Give(Labels);
        }

        public void Discard()
        {
        }
    }

    /// <summary>The records of one op type, in recording order; the list keeps its capacity across resets.</summary>
    private abstract class RecordList
    {
        /// <summary>Runs record <paramref name="index"/>'s rule (when its output got a gradient) and lets go of what it held.</summary>
        public abstract void Backward(Tape tape, int index);

        /// <summary>Forgets every record, disposing what they saved unless backward already did.</summary>
        public abstract void Clear(bool backwardRan);
    }

    private sealed class Records<T> : RecordList where T : struct, IRecord
    {
        private readonly List<T> _items = [];

        public int Add(in T record)
        {
            _items.Add(record);
            return _items.Count - 1;
        }

        public override void Backward(Tape tape, int index)
        {
            var r = _items[index];
            if (r.Output.Grad is { } dy)
            {
                using var timer = tape.Profile?.Time(r.Op, tape.Device) ?? default;
                r.Backward(tape, dy);
            }
            r.Unhold();
            r.Output.ProducerDone = true;
            ReleaseIfDone(r.Output);
        }

        public override void Clear(bool backwardRan)
        {
            if (!backwardRan)
            {
                foreach (var r in _items)
                {
                    r.Discard();
                }
            }
            _items.Clear();
        }
    }

    /// <summary>A record's place in the recording: its type's list and its index there.</summary>
    private readonly record struct Entry(RecordList List, int Index);

    /// <summary>Records a backward step when the output needs a gradient; false when nothing was recorded.</summary>
    private bool Record<T>(Records<T> list, in T record) where T : struct, IRecord
    {
        if (!record.Output.RequiresGrad)
        {
            return false;
        }
        record.Hold();
        _order.Add(new Entry(list, list.Add(record)));
        return true;
    }

    private void ClearRecords(bool backwardRan = false)
    {
        foreach (var list in _allRecords)
        {
            list.Clear(backwardRan);
        }
        _order.Clear();
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
        var seed = GradOf(output, GradWrite.OverwriteOrAdd, out bool accumulate);
        if (accumulate)
        {
            Elementwise.Accumulate(seed, dOutput);
        }
        else
        {
            seed.CopyFrom(dOutput);
        }
        for (int i = _order.Count - 1; i >= 0; i--)
        {
            var (list, index) = _order[i];
            list.Backward(this, index);
        }
        ClearRecords(backwardRan: true);
    }

    /// <summary>Gives back a use a record held on <paramref name="v"/>, releasing it if that was the last.</summary>
    private static void Give(Var v)
    {
        v.PendingUses--;
        ReleaseIfDone(v);
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

    /// <summary>How a rule's kernel writes into a gradient buffer.</summary>
    private enum GradWrite
    {
        /// <summary>The kernel only adds (+=): a first gradient starts as zeros.</summary>
        Add,

        /// <summary>The kernel overwrites (=) or adds as told by the accumulate flag: a first gradient starts
        /// uninitialised and the kernel must write every element of it.</summary>
        OverwriteOrAdd,
    }

    /// <summary>
    /// v's gradient buffer: the one way a rule gets one. When a gradient has already reached v, its buffer, with
    /// <paramref name="accumulate"/> true: the kernel must add into it. Otherwise a new buffer becomes v's gradient (a
    /// tape tensor for an intermediate, the Var's own persistent tensor for a parameter or input): zeros for
    /// <see cref="GradWrite.Add"/> (accumulate true: adding into zeros), uninitialised for
    /// <see cref="GradWrite.OverwriteOrAdd"/> (accumulate false: the kernel overwrites every element, saving the
    /// zeroing pass).
    /// </summary>
    private Tensor GradOf(Var v, GradWrite write, out bool accumulate)
    {
        if (v.Grad is { } existing)
        {
            accumulate = true;
            return existing;
        }
        var g = v.OwnedByTape ? NewTensor(v.Shape) : Tensor.Empty(Device, v.Shape);
        accumulate = write == GradWrite.Add;
        if (accumulate)
        {
            g.Zero();
        }
        v.Grad = g;
        return g;
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
        var g = GradOf(v, GradWrite.OverwriteOrAdd, out bool accumulate);
        if (accumulate)
        {
            Elementwise.Accumulate(g, dy);
        }
        else
        {
            g.CopyFrom(dy);
        }
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

    /// <summary>The output of an op on up to five inputs: it needs a gradient when recording and any input does.</summary>
    private Var Make(ReadOnlySpan<int> shape, Var? a = null, Var? b = null, Var? c = null, Var? d = null, Var? e = null)
    {
        ObjectDisposedException.ThrowIf(_backwardDone && Recording, this);
        bool requiresGrad = Recording && (a is { RequiresGrad: true } || b is { RequiresGrad: true } || c is { RequiresGrad: true }
            || d is { RequiresGrad: true } || e is { RequiresGrad: true });
        var v = NewVar(NewTensor(shape), requiresGrad);
        v.OwnedByTape = true;
        _owned.Add(v);
        return v;
    }
}
