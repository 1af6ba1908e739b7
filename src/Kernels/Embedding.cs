using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Embedding lookup (torch.nn.Embedding) as a one-hot matrix product: labels [N] (integers held
/// as floats) → one-hot h [N, R], then y = h·table with table [R, D]; backward dtable += hᵀ·dy.
/// Going through the GEMM keeps the gradient's reduction over the batch deterministic (a fixed
/// summation order) and needs no scatter kernel; the only new kernel is the one-hot fill. Labels
/// outside 0..R-1 give a zero row (no embedding), never an out-of-range read.
/// Versions: CPU loops; ILGPU one thread per one-hot element.
/// </summary>
public static class Embedding
{
    /// <summary>h[n, r] = 1 where labels[n] = r, else 0.</summary>
    public static void OneHot(Tensor labels, Tensor h)
    {
        Check.Rank("one-hot", "labels", labels, 1);
        Check.Devices("one-hot", labels, h);
        Check.Rank("one-hot", "h", h, 2);
        int n = labels.Dim(0), rows = h.Dim(1);
        Check.Shape("one-hot", "h", h, n, rows);
        using var simd = CpuSimd.Enter(labels.Device);
        if (labels.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(labels);
            k.Embedding.OneHot(k.Stream, h.Length, labels.View, h.View, rows);
            return;
        }
        var lv = labels.Host();
        var hv = h.Host();
        for (int i = 0; i < n * rows; i++)
        {
            hv[i] = Value(lv[i / rows], i % rows);
        }
    }

    /// <summary>y = oneHot·table (overwrites y).</summary>
    public static void Forward(Tensor oneHot, Tensor table, Tensor y) => Linear.Matmul(oneHot, false, table, false, y, accumulate: false);

    /// <summary>dtable += oneHotᵀ·dy: each row gets the sum of dy over the batch entries with that label.</summary>
    public static void Backward(Tensor oneHot, Tensor dy, Tensor dtable) => Linear.Matmul(oneHot, true, dy, false, dtable, accumulate: true);

    /// <summary>One element: labels compare as rounded integers, so 3.0000002 still means 3.</summary>
    internal static float Value(float label, int row) => (int)MathF.Round(label) == row ? 1f : 0f;

    internal static void OneHotKernel(Index1D i, ArrayView<float> labels, ArrayView<float> h, int rows) =>
        h[i] = Value(labels[i / rows], i % rows);

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> OneHot =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(OneHotKernel);
    }
}
