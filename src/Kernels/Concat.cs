using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Channel concatenation (torch.cat(dim=1)) and its backward, the split: y = cat(a, b) with
/// a [N, Ca, H, W], b [N, Cb, H, W], y [N, Ca+Cb, H, W]; backward da += dy[:, :Ca], db += dy[:, Ca:].
/// Versions: CPU block copies per image; ILGPU v1 one thread per element of y.
/// </summary>
public static class Concat
{
    /// <summary>y = cat(a, b) along channels, a first.</summary>
    public static void Forward(Tensor a, Tensor b, Tensor y)
    {
        var (n, ca, cb, hw) = Shapes("concat", a, b, y);
        using var simd = CpuSimd.Enter(a.Device);
        if (a.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(a);
            k.Concat.Forward(k.Stream, y.Length, a.View, b.View, y.View, ca * hw, cb * hw);
            return;
        }
        int sa = ca * hw, sb = cb * hw;
        Cpu.For(n, Math.Max(1, (1 << 15) / (sa + sb)), (a.Host(), b.Host(), y.Host(), sa, sb), static (v, first, last) =>
        {
            var (av, bv, yv, sa, sb) = v;
            for (int i = first; i < last; i++)
            {
                av.Slice(i * sa, sa).CopyTo(yv.Slice(i * (sa + sb), sa));
                bv.Slice(i * sb, sb).CopyTo(yv.Slice(i * (sa + sb) + sa, sb));
            }
        });
    }

    /// <summary>da += dy[:, :Ca], db += dy[:, Ca:] (= instead of += for a side whose accumulate flag is false: its
    /// old contents are never read).</summary>
    public static void Backward(Tensor dy, Tensor da, Tensor db, bool accumulateA = true, bool accumulateB = true)
    {
        var (n, ca, cb, hw) = Shapes("concat backward", da, db, dy);
        using var simd = CpuSimd.Enter(dy.Device);
        if (dy.Device.IsIlgpu)
        {
            if (!accumulateA) da.Zero();
            if (!accumulateB) db.Zero();
            var k = IlgpuKernels.For(dy);
            k.Concat.Backward(k.Stream, dy.Length, dy.View, da.View, db.View, ca * hw, cb * hw);
            return;
        }
        int sa = ca * hw, sb = cb * hw;
        Cpu.For(n, Math.Max(1, (1 << 15) / (sa + sb)), (dy.Host(), da.Host(), db.Host(), sa, sb, accumulateA, accumulateB),
            static (v, first, last) =>
        {
            var (dyv, dav, dbv, sa, sb, accumulateA, accumulateB) = v;
            for (int i = first; i < last; i++)
            {
                Part(dyv.Slice(i * (sa + sb), sa), dav.Slice(i * sa, sa), accumulateA);
                Part(dyv.Slice(i * (sa + sb) + sa, sb), dbv.Slice(i * sb, sb), accumulateB);
            }
        });

        static void Part(ReadOnlySpan<float> src, Span<float> dst, bool accumulate)
        {
            if (accumulate)
            {
                Simd.AddInPlace(dst, src);
            }
            else
            {
                src.CopyTo(dst);
            }
        }
    }

    private static (int N, int Ca, int Cb, int Hw) Shapes(string op, Tensor a, Tensor b, Tensor y)
    {
        Check.Rank(op, "a", a, 4);
        Check.Devices(op, a, b, y);
        int n = a.Dim(0), h = a.Dim(2), w = a.Dim(3);
        Check.Rank(op, "b", b, 4);
        Check.Shape(op, "b", b, n, b.Dim(1), h, w);
        Check.Shape(op, "y", y, n, a.Dim(1) + b.Dim(1), h, w);
        return (n, a.Dim(1), b.Dim(1), h * w);
    }

    // i over y [N, (Ca+Cb)·H·W]; sa = Ca·H·W, sb = Cb·H·W
    internal static void ForwardKernel(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> y, int sa, int sb)
    {
        int n = i / (sa + sb), j = i % (sa + sb);
        y[i] = j < sa ? a[n * sa + j] : b[n * sb + j - sa];
    }

    internal static void BackwardKernel(Index1D i, ArrayView<float> dy, ArrayView<float> da, ArrayView<float> db, int sa, int sb)
    {
        int n = i / (sa + sb), j = i % (sa + sb);
        if (j < sa)
        {
            da[n * sa + j] += dy[i];
        }
        else
        {
            db[n * sb + j - sa] += dy[i];
        }
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> Forward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>>(ForwardKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> Backward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>>(BackwardKernel);
    }
}
