using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Nearest-neighbour 2× upsampling (torch.nn.functional.interpolate, scale 2, "nearest"):
/// y[n,c,h,w] = x[n,c,h/2,w/2]; backward dx[n,c,h,w] += Σ of the 2×2 block of dy it was copied to.
/// Shapes: x [N, C, H, W], y [N, C, 2H, 2W]. Versions: CPU row loops over (n, c) on the cores;
/// ILGPU v1 one thread per output (forward) or per input (backward, a gather: no atomics).
/// </summary>
public static class Upsample
{
    /// <summary>y = nearest2x(x).</summary>
    public static void Forward(Tensor x, Tensor y)
    {
        Check.Rank("upsample", "x", x, 4);
        Check.Devices("upsample", x, y);
        int n = x.Dim(0), c = x.Dim(1), h = x.Dim(2), w = x.Dim(3);
        Check.Shape("upsample", "y", y, n, c, 2 * h, 2 * w);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Upsample.Forward(k.Stream, y.Length, x.View, y.View, h, w);
            return;
        }
        Cpu.For(n * c, 8, (x.Host(), y.Host(), h, w), static (state, first, last) =>
        {
            var (xv, yv, h, w) = state;
            for (int nc = first; nc < last; nc++)
            {
                for (int i = 0; i < h; i++)
                {
                    int src = (nc * h + i) * w, dst = (nc * 2 * h + 2 * i) * 2 * w;
                    for (int j = 0; j < w; j++)
                    {
                        float v = xv[src + j];
                        yv[dst + 2 * j] = v;
                        yv[dst + 2 * j + 1] = v;
                    }
                    yv.Slice(dst, 2 * w).CopyTo(yv.Slice(dst + 2 * w, 2 * w));
                }
            }
        });
    }

    /// <summary>dx += the 2×2 block sums of dy.</summary>
    public static void Backward(Tensor dy, Tensor dx)
    {
        Check.Rank("upsample backward", "dx", dx, 4);
        Check.Devices("upsample backward", dy, dx);
        int n = dx.Dim(0), c = dx.Dim(1), h = dx.Dim(2), w = dx.Dim(3);
        Check.Shape("upsample backward", "dy", dy, n, c, 2 * h, 2 * w);
        using var simd = CpuSimd.Enter(dx.Device);
        if (dx.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dx);
            k.Upsample.Backward(k.Stream, dx.Length, dy.View, dx.View, h, w);
            return;
        }
        Cpu.For(n * c, 8, (dy.Host(), dx.Host(), h, w), static (v, first, last) =>
        {
            var (dyv, dxv, h, w) = v;
            for (int nc = first; nc < last; nc++)
            {
                for (int i = 0; i < h; i++)
                {
                    int top = (nc * 2 * h + 2 * i) * 2 * w, bottom = top + 2 * w, dst = (nc * h + i) * w;
                    for (int j = 0; j < w; j++)
                    {
                        dxv[dst + j] += dyv[top + 2 * j] + dyv[top + 2 * j + 1] + dyv[bottom + 2 * j] + dyv[bottom + 2 * j + 1];
                    }
                }
            }
        });
    }

    // i over y [N, C, 2H, 2W]
    internal static void ForwardKernel(Index1D i, ArrayView<float> x, ArrayView<float> y, int h, int w)
    {
        int ow = i % (2 * w), oh = i / (2 * w) % (2 * h), nc = i / (4 * h * w);
        y[i] = x[(nc * h + oh / 2) * w + ow / 2];
    }

    // i over dx [N, C, H, W]
    internal static void BackwardKernel(Index1D i, ArrayView<float> dy, ArrayView<float> dx, int h, int w)
    {
        int j = i % w, r = i / w % h, nc = i / (h * w);
        int top = (nc * 2 * h + 2 * r) * 2 * w + 2 * j, bottom = top + 2 * w;
        dx[i] += dy[top] + dy[top + 1] + dy[bottom] + dy[bottom + 1];
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int> Forward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int>>(ForwardKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int> Backward =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int, int>>(BackwardKernel);
    }
}
