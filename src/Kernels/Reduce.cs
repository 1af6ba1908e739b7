using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Full reductions to a scalar ([1] tensor) and the MSE loss, with backward:
///   sum:  out = Σ x                      backward dx += dOut
///   mean: out = Σ x / n                  backward dx += dOut / n
///   sum of squares: out = Σ x²           (gradient-norm clipping; no backward needed)
///   mse:  out = Σ (pred - target)² / n   backward dpred += dOut·2(pred - target)/n
///   softmax cross-entropy over rows of logits z [N, K] with integer labels y [N] (held as floats):
///         out = (1/N) Σ_n (logsumexp_k z[n,k] - z[n,y_n])
///         backward dz[n,k] += dOut·(softmax(z[n])_k - [k = y_n])/N
/// Results are deterministic on every backend: a fixed split into partial sums, then one ordered
/// sum. Versions: CPU partial sums in double over chunks on the cores; ILGPU v1 (the simple twin), 256 strided
/// partial sums (one thread each), then one thread adds them; ILGPU v2 (<see cref="TiledReduce"/>, the
/// default), groups of 256 threads reducing in shared memory, then one group adding their partials.
/// </summary>
public static class Reduce
{
    private const int Slots = 256;

    /// <summary>out[0] = Σ x.</summary>
    public static void Sum(Tensor x, Tensor output) => Run("sum", x, null, output, Mode.Identity, 1f);

    /// <summary>out[0] = Σ x / n.</summary>
    public static void Mean(Tensor x, Tensor output) => Run("mean", x, null, output, Mode.Identity, 1f / x.Length);

    /// <summary>out[0] = Σ x².</summary>
    public static void SumSquares(Tensor x, Tensor output) => Run("sum of squares", x, null, output, Mode.Square, 1f);

    /// <summary>out[0] = mean((pred - target)²).</summary>
    public static void Mse(Tensor pred, Tensor target, Tensor output)
    {
        Check.Shape("mse", "target", target, pred.Shape);
        Run("mse", pred, target, output, Mode.SquaredDifference, 1f / pred.Length);
    }

    /// <summary>The value a non-finite flag holds while nothing was found (larger than any tensor id).</summary>
    public const float NoneFlagged = 16_777_216f;

    /// <summary>
    /// Marks a non-finite tensor: when any element of <paramref name="x"/> is NaN or infinite,
    /// flag[0] becomes min(flag[0], <paramref name="id"/>). Called for each parameter's gradient
    /// in order after flag[0] was set to <see cref="NoneFlagged"/>, flag[0] names the first
    /// parameter whose gradient went non-finite, and stays on the device until it is read.
    /// </summary>
    public static void FlagNonFinite(Tensor x, Tensor flag, int id)
    {
        Check.Shape("flag non-finite", "flag", flag, 1);
        Check.Devices("flag non-finite", x, flag);
        if (id < 0 || id >= NoneFlagged)
        {
            throw new ArgumentOutOfRangeException(nameof(id), $"flag non-finite: id {id} must be in 0..{NoneFlagged - 1}");
        }
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            if (!k.Simple)
            {
                TiledReduce.FlagNonFinite(k, x.View, flag.View, x.Length, id);
                return;
            }
            k.Reduce.FlagNonFinite(k.Stream, x.Length, x.View, flag.View, id);
            return;
        }
        if (flag.Host()[0] <= id)
        {
            return;
        }
        // x·0 is 0 for every finite x and NaN for NaN and ±inf: one multiply-add per element, in SIMD.
        var span = x.Span;
        var acc = System.Numerics.Vector<float>.Zero;
        int i = 0;
        for (; Simd.VectorT && i <= span.Length - System.Numerics.Vector<float>.Count; i += System.Numerics.Vector<float>.Count)
        {
            acc += new System.Numerics.Vector<float>(span[i..]) * System.Numerics.Vector<float>.Zero;
        }
        float tail = 0;
        for (; i < span.Length; i++)
        {
            tail += span[i] * 0f;
        }
        if (float.IsNaN(System.Numerics.Vector.Sum(acc) + tail))
        {
            flag.Host()[0] = id;
        }
    }

    /// <summary>dx += dOut[0]·scale (scale 1 for sum, 1/n for mean).</summary>
    public static void SumBackward(Tensor dOut, Tensor dx, float scale)
    {
        Check.Shape("sum backward", "dOut", dOut, 1);
        Check.Devices("sum backward", dOut, dx);
        using var simd = CpuSimd.Enter(dx.Device);
        if (dx.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dx);
            k.Reduce.Broadcast(k.Stream, dx.Length, dOut.View, dx.View, scale);
            return;
        }
        Simd.AddScalar(dx.Span, dOut.Host()[0] * scale);
    }

    /// <summary>dpred += dOut[0]·2·(pred - target)/n.</summary>
    public static void MseBackward(Tensor dOut, Tensor pred, Tensor target, Tensor dPred)
    {
        Check.Shape("mse backward", "dOut", dOut, 1);
        Check.Shape("mse backward", "target", target, pred.Shape);
        Check.Shape("mse backward", "dPred", dPred, pred.Shape);
        Check.Devices("mse backward", dOut, pred, target, dPred);
        float scale = 2f / pred.Length;
        using var simd = CpuSimd.Enter(pred.Device);
        if (pred.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(pred);
            k.Reduce.MseBackward(k.Stream, pred.Length, dOut.View, pred.View, target.View, dPred.View, scale);
            return;
        }
        float s = dOut.Host()[0] * scale;
        Cpu.For(pred.Length, 1 << 16, (pred.Host(), target.Host(), dPred.Host(), s), static (v, first, last) =>
        {
            var (p, t, d, s) = v;
            for (int i = first; i < last; i++)
            {
                d[i] += s * (p[i] - t[i]);
            }
        });
    }

    /// <summary>
    /// out[0] = (1/N) Σ_n (log Σ_k exp z[n,k] - z[n, y_n]) for logits z [N, K] (any shape whose first dimension is
    /// N: K = length/N, so a [N, K, 1, 1] convolution output works as is) and labels y [N] holding integers
    /// 0..K-1 as floats. A label outside 0..K-1 makes its row's loss NaN (so the non-finite checks catch it)
    /// rather than reading out of bounds. Per row max-shifted, so large logits do not overflow.
    /// </summary>
    public static void SoftmaxCrossEntropy(Tensor logits, Tensor labels, Tensor output)
    {
        int n = CrossEntropyRows("softmax cross-entropy", logits, labels);
        Check.Shape("softmax cross-entropy", "output", output, 1);
        Check.Devices("softmax cross-entropy", logits, labels, output);
        int k = logits.Length / n;
        using var simd = CpuSimd.Enter(logits.Device);
        if (logits.Device.IsIlgpu)
        {
            var kk = IlgpuKernels.For(logits);
            using var rows = kk.Scratch(n);
            kk.Reduce.CrossEntropyRows(kk.Stream, n, logits.View, labels.View, rows.View, k);
            if (!kk.Simple)
            {
                // The rows' mean by one group (a row's K classes are few: one thread per row stays).
                TiledReduce.Segments(kk, rows.View, output.View, 1, n, 0, 1, 1f / n, accumulate: false);
                return;
            }
            kk.Reduce.Finish(kk.Stream, 1, rows.View, output.View, 1f / n);
            return;
        }
        var z = logits.Host();
        var y = labels.Host();
        // Rows in order in double: deterministic, and N·K is small next to the network that made the logits.
        double total = 0;
        for (int row = 0; row < n; row++)
        {
            total += RowLoss(z, row * k, k, y[row]);
        }
        output.Host()[0] = (float)(total / n);
    }

    /// <summary>dz[n,k] += dOut[0]·(softmax(z[n])_k - [k = y_n])/N.</summary>
    public static void SoftmaxCrossEntropyBackward(Tensor dOut, Tensor logits, Tensor labels, Tensor dLogits)
    {
        int n = CrossEntropyRows("softmax cross-entropy backward", logits, labels);
        Check.Shape("softmax cross-entropy backward", "dOut", dOut, 1);
        Check.Shape("softmax cross-entropy backward", "dLogits", dLogits, logits.Shape);
        Check.Devices("softmax cross-entropy backward", dOut, logits, labels, dLogits);
        int k = logits.Length / n;
        using var simd = CpuSimd.Enter(logits.Device);
        if (logits.Device.IsIlgpu)
        {
            var kk = IlgpuKernels.For(logits);
            kk.Reduce.CrossEntropyBackward(kk.Stream, n, dOut.View, logits.View, labels.View, dLogits.View, k, 1f / n);
            return;
        }
        float scale = dOut.Host()[0] / n;
        var z = logits.Host();
        var y = labels.Host();
        var d = dLogits.Host();
        for (int row = 0; row < n; row++)
        {
            int first = row * k;
            float max = z[first];
            for (int j = 1; j < k; j++)
            {
                max = MathF.Max(max, z[first + j]);
            }
            float sum = 0;
            for (int j = 0; j < k; j++)
            {
                sum += MathF.Exp(z[first + j] - max);
            }
            int label = (int)y[row];
            for (int j = 0; j < k; j++)
            {
                float p = MathF.Exp(z[first + j] - max) / sum;
                d[first + j] += scale * (p - (j == label ? 1f : 0f));
            }
        }
    }

    private static int CrossEntropyRows(string op, Tensor logits, Tensor labels)
    {
        if (logits.Rank < 2)
        {
            throw new ArgumentException($"{op}: logits are {logits.ShapeText}, expected [N, K]");
        }
        int n = logits.Dim(0);
        Check.Shape(op, "labels", labels, n);
        return n;
    }

    // Row loss logsumexp(z) - z[label], max-shifted; NaN for a label outside 0..K-1. The CPU twin of the kernel below.
    private static double RowLoss(Floats z, int first, int k, float labelValue)
    {
        int label = (int)labelValue;
        if (!(labelValue >= 0 && labelValue < k) || label != labelValue)
        {
            return double.NaN;
        }
        float max = z[first];
        for (int j = 1; j < k; j++)
        {
            max = MathF.Max(max, z[first + j]);
        }
        float sum = 0;
        for (int j = 0; j < k; j++)
        {
            sum += MathF.Exp(z[first + j] - max);
        }
        return MathF.Log(sum) + max - z[first + label];
    }

    private enum Mode
    {
        Identity = 0,
        Square = 1,
        SquaredDifference = 2,
    }

    private static void Run(string op, Tensor a, Tensor? b, Tensor output, Mode mode, float scale)
    {
        Check.Shape(op, "output", output, 1);
        Check.Devices(op, a, output);
        if (b is not null)
        {
            Check.Same(op, a, b);
        }
        using var simd = CpuSimd.Enter(a.Device);
        if (a.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(a);
            var bv = (b ?? a).View;
            if (!k.Simple)
            {
                TiledReduce.Full(k, a.View, bv, output.View, a.Length, (int)mode, scale);
                return;
            }
            using var partial = k.Scratch(Slots);
            k.Reduce.Partial(k.Stream, Slots, a.View, bv, partial.View, a.Length, (int)mode);
            k.Reduce.Finish(k.Stream, 1, partial.View, output.View, scale);
            return;
        }
        // Fixed chunks summed in order, their number a function of the length alone: the result depends neither on which
        // thread ran which chunk nor on how many threads there are.
        int chunks = Math.Max(1, Math.Min(64, a.Length / 4096));
        // The chunk sums go to the calling thread's arena: the workers write them while this thread waits.
        nint results = Arena.Current.Doubles(ArenaSlot.ReduceChunks, chunks);
        Cpu.Items(chunks, (a.Host(), b is null ? default : b.Host(), a.Length, chunks, mode, results), static (state, c) =>
        {
            // bh is read only for the squared difference, which always has b.
            var (av, bh, length, chunks, mode, results) = state;
            long first = (long)length * c / chunks, last = (long)length * (c + 1) / chunks;
            double s = 0;
            for (long i = first; i < last; i++)
            {
                double v = mode == Mode.SquaredDifference ? av[i] - bh[i] : av[i];
                s += mode == Mode.Identity ? v : v * v;
            }
            Chunk(results, c) = s;
        });
        double total = 0;
        for (int c = 0; c < chunks; c++)
        {
            total += Chunk(results, c);
        }
        output.Host()[0] = (float)(total * scale);
    }

    private static unsafe ref double Chunk(nint results, int c) => ref ((double*)results)[c];

    // slot over [Slots]: strided partial sums, so neighbouring threads read neighbouring elements.
    internal static void PartialKernel(Index1D slot, ArrayView<float> a, ArrayView<float> b, ArrayView<float> partial, int n, int mode)
    {
        float s = 0;
        for (int i = slot; i < n; i += Slots)
        {
            float v = mode == 2 ? a[i] - b[i] : a[i];
            s += mode == 0 ? v : v * v;
        }
        partial[slot] = s;
    }

    // a single thread: out[0] = scale · Σ partial, in slot order (deterministic).
    internal static void FinishKernel(Index1D zero, ArrayView<float> partial, ArrayView<float> output, float scale)
    {
        float s = 0;
        for (int i = 0; i < partial.IntLength; i++)
        {
            s += partial[i];
        }
        output[zero] = s * scale;
    }

    internal static void BroadcastKernel(Index1D i, ArrayView<float> dOut, ArrayView<float> dx, float scale) => dx[i] += dOut[0] * scale;

    internal static void MseBackwardKernel(Index1D i, ArrayView<float> dOut, ArrayView<float> pred, ArrayView<float> target,
        ArrayView<float> dPred, float scale) =>
        dPred[i] += dOut[0] * scale * (pred[i] - target[i]);

    // row over [N]: that row's loss logsumexp(z[row]) - z[row, label] into rows[row]; FinishKernel then averages them.
    internal static void CrossEntropyRowsKernel(Index1D row, ArrayView<float> z, ArrayView<float> labels, ArrayView<float> rows, int k)
    {
        float labelValue = labels[row];
        int label = (int)labelValue;
        if (!(labelValue >= 0 && labelValue < k) || label != labelValue)
        {
            rows[row] = float.NaN;
            return;
        }
        int first = row * k;
        float max = z[first];
        for (int j = 1; j < k; j++)
        {
            max = MathF.Max(max, z[first + j]);
        }
        float sum = 0;
        for (int j = 0; j < k; j++)
        {
            sum += MathF.Exp(z[first + j] - max);
        }
        rows[row] = MathF.Log(sum) + max - z[first + label];
    }

    // row over [N]: dz[row, j] += dOut·(softmax_j - [j = label])·scale, scale = 1/N.
    internal static void CrossEntropyBackwardKernel(Index1D row, ArrayView<float> dOut, ArrayView<float> z, ArrayView<float> labels,
        ArrayView<float> dz, int k, float scale)
    {
        int first = row * k;
        float max = z[first];
        for (int j = 1; j < k; j++)
        {
            max = MathF.Max(max, z[first + j]);
        }
        float sum = 0;
        for (int j = 0; j < k; j++)
        {
            sum += MathF.Exp(z[first + j] - max);
        }
        float s = dOut[0] * scale;
        int label = (int)labels[row];
        for (int j = 0; j < k; j++)
        {
            float p = MathF.Exp(z[first + j] - max) / sum;
            dz[first + j] += s * (p - (j == label ? 1f : 0f));
        }
    }

    // i over x: every thread that sees a non-finite value lowers the flag to id. Launches for lower ids ran
    // earlier on the same stream, so the flag ends as the lowest id; writers within a launch write the same value.
    internal static void FlagNonFiniteKernel(Index1D i, ArrayView<float> x, ArrayView<float> flag, int id)
    {
        float v = x[i];
        if ((float.IsNaN(v) || float.IsInfinity(v)) && flag[0] > id)
        {
            flag[0] = id;
        }
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> FlagNonFinite =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(FlagNonFiniteKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> Partial =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>>(PartialKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Finish =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(FinishKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Broadcast =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(BroadcastKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> CrossEntropyRows =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>>(CrossEntropyRowsKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, float>
            CrossEntropyBackward = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>,
                ArrayView<float>, int, float>>(CrossEntropyBackwardKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, float> MseBackward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, float>>(MseBackwardKernel);

        // v2, explicitly grouped (TiledReduce): launched with KernelConfig(groups, threads).
        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> TiledPartial =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>>(TiledReduce.PartialKernel);

        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int, float, int> TiledSegments =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int, float, int>>(TiledReduce.SegmentsKernel);

        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int, int, int> TiledChannelPartial =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int, int, int>>(TiledReduce.ChannelPartialKernel);

        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int> TiledRowSums =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int, int>>(TiledReduce.RowSumsKernel);

        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int> TiledFlagNonFinite =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, int, int>>(TiledReduce.FlagNonFiniteKernel);
    }
}
