using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Group normalisation with affine weight and bias (Wu and He 2018), as torch.nn.GroupNorm.
/// Shapes: x, y [N, C, H, W]; gamma, beta [C]; mean, rstd [N, G]; G divides C, and each group
/// holds M = (C/G)·H·W elements.
///   forward:  xhat = (x - mean)·rstd, rstd = 1/sqrt(var + eps) (biased variance), y = gamma·xhat + beta
///   backward: with g = dy·gamma, dx = rstd·(g - mean_grp(g) - xhat·mean_grp(g·xhat)),
///             dgamma[c] += Σ dy·xhat, dbeta[c] += Σ dy.
/// Forward saves mean and rstd by name for backward. Versions: CPU, one task per (n, group)
/// (two-pass statistics in double); ILGPU v1, one thread per (n, group) for statistics, one per
/// element for the pointwise parts, one per channel for dgamma/dbeta.
/// </summary>
public static class GroupNorm
{
    /// <summary>y = groupnorm(x)·gamma + beta; writes mean and rstd [N, G] for backward.</summary>
    public static void Forward(Tensor x, Tensor gamma, Tensor beta, int groups, float eps, Tensor y, Tensor mean, Tensor rstd)
    {
        var s = ShapeOf("groupnorm", x, groups);
        Check.Devices("groupnorm", x, gamma, beta, y, mean, rstd);
        Check.Shape("groupnorm", "gamma", gamma, s.C);
        Check.Shape("groupnorm", "beta", beta, s.C);
        Check.Shape("groupnorm", "y", y, x.Shape);
        Check.Shape("groupnorm", "mean", mean, s.N, groups);
        Check.Shape("groupnorm", "rstd", rstd, s.N, groups);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.GroupNorm.Stats(k.Stream, s.N * groups, x.View, mean.View, rstd.View, s.GroupSize, eps);
            k.GroupNorm.Normalize(k.Stream, x.Length, x.View, gamma.View, beta.View, mean.View, rstd.View, y.View, s);
            return;
        }
        var xv = x.HostArray;
        var yv = y.HostArray;
        var gv = gamma.HostArray;
        var bv = beta.HostArray;
        var mv = mean.HostArray;
        var rv = rstd.HostArray;
        Cpu.For(s.N * groups, 1, (first, last) =>
        {
            for (int ng = first; ng < last; ng++)
            {
                var span = xv.AsSpan(ng * s.GroupSize, s.GroupSize);
                double sum = 0;
                foreach (float v in span)
                {
                    sum += v;
                }
                double mu = sum / s.GroupSize, sq = 0;
                foreach (float v in span)
                {
                    sq += (v - mu) * (v - mu);
                }
                float m = (float)mu, r = (float)(1.0 / Math.Sqrt(sq / s.GroupSize + eps));
                mv[ng] = m;
                rv[ng] = r;
                int c0 = ng % groups * s.ChannelsPerGroup;
                for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                {
                    float scale = r * gv[c0 + cg], shift = bv[c0 + cg] - m * scale;
                    int start = ng * s.GroupSize + cg * s.Hw;
                    for (int i = start; i < start + s.Hw; i++)
                    {
                        yv[i] = xv[i] * scale + shift;
                    }
                }
            }
        });
    }

    /// <summary>dx += ∂L/∂x, dgamma += Σ dy·xhat, dbeta += Σ dy, from the saved mean and rstd.</summary>
    public static void Backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor gamma, int groups, Tensor dx, Tensor dgamma, Tensor dbeta)
    {
        var s = ShapeOf("groupnorm backward", x, groups);
        Check.Devices("groupnorm backward", dy, x, mean, rstd, gamma, dx, dgamma, dbeta);
        Check.Shape("groupnorm backward", "dy", dy, x.Shape);
        Check.Shape("groupnorm backward", "dx", dx, x.Shape);
        Check.Shape("groupnorm backward", "dgamma", dgamma, s.C);
        Check.Shape("groupnorm backward", "dbeta", dbeta, s.C);
        Check.Shape("groupnorm backward", "mean", mean, s.N, groups);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            using var sums = k.Scratch(2 * s.N * groups);
            k.GroupNorm.GroupSums(k.Stream, s.N * groups, dy.View, x.View, mean.View, rstd.View, gamma.View, sums.View, s);
            k.GroupNorm.InputGrad(k.Stream, x.Length, dy.View, x.View, mean.View, rstd.View, gamma.View, sums.View, dx.View, s);
            k.GroupNorm.ParamGrad(k.Stream, s.C, dy.View, x.View, mean.View, rstd.View, dgamma.View, dbeta.View, s);
            return;
        }
        var dyv = dy.HostArray;
        var xv = x.HostArray;
        var mv = mean.HostArray;
        var rv = rstd.HostArray;
        var gv = gamma.HostArray;
        var dxv = dx.HostArray;
        var dgv = dgamma.HostArray;
        var dbv = dbeta.HostArray;
        Cpu.For(s.N * groups, 1, (first, last) =>
        {
            for (int ng = first; ng < last; ng++)
            {
                float m = mv[ng], r = rv[ng];
                int c0 = ng % groups * s.ChannelsPerGroup;
                double sumG = 0, sumGx = 0;
                for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                {
                    float gam = gv[c0 + cg];
                    int start = ng * s.GroupSize + cg * s.Hw;
                    for (int i = start; i < start + s.Hw; i++)
                    {
                        float gi = dyv[i] * gam;
                        sumG += gi;
                        sumGx += gi * (xv[i] - m) * r;
                    }
                }
                float meanG = (float)(sumG / s.GroupSize), meanGx = (float)(sumGx / s.GroupSize);
                for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                {
                    float gam = gv[c0 + cg];
                    int start = ng * s.GroupSize + cg * s.Hw;
                    for (int i = start; i < start + s.Hw; i++)
                    {
                        float xhat = (xv[i] - m) * r;
                        dxv[i] += r * (dyv[i] * gam - meanG - xhat * meanGx);
                    }
                }
            }
        });
        // dgamma, dbeta: one task per channel so no two tasks write the same element.
        Cpu.For(s.C, 1, (first, last) =>
        {
            for (int c = first; c < last; c++)
            {
                double sg = 0, sb = 0;
                for (int n = 0; n < s.N; n++)
                {
                    int ng = n * groups + c / s.ChannelsPerGroup;
                    float m = mv[ng], r = rv[ng];
                    int start = (n * s.C + c) * s.Hw;
                    for (int i = start; i < start + s.Hw; i++)
                    {
                        sg += dyv[i] * (xv[i] - m) * r;
                        sb += dyv[i];
                    }
                }
                dgv[c] += (float)sg;
                dbv[c] += (float)sb;
            }
        });
    }

    private static GroupShape ShapeOf(string op, Tensor x, int groups)
    {
        Check.Rank(op, "x", x, 4);
        int c = x.Dim(1);
        if (groups < 1 || c % groups != 0)
        {
            throw new ArgumentException($"{op}: {groups} groups do not divide {c} channels");
        }
        return new GroupShape(x.Dim(0), c, groups, x.Dim(2) * x.Dim(3));
    }

    /// <summary>N, C, G and H·W of a group-norm call, with the derived sizes kernels need.</summary>
    internal readonly struct GroupShape(int n, int c, int g, int hw)
    {
        public readonly int N = n, C = c, G = g, Hw = hw;
        public readonly int ChannelsPerGroup = c / g;
        public readonly int GroupSize = c / g * hw;
    }

    // ---------------- ILGPU v1 ----------------

    // ng over [N*G]: two-pass mean and biased variance of one group.
    internal static void StatsKernel(Index1D ng, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd, int groupSize, float eps)
    {
        int start = ng * groupSize;
        float sum = 0;
        for (int i = 0; i < groupSize; i++)
        {
            sum += x[start + i];
        }
        float m = sum / groupSize, sq = 0;
        for (int i = 0; i < groupSize; i++)
        {
            float d = x[start + i] - m;
            sq += d * d;
        }
        mean[ng] = m;
        rstd[ng] = 1f / MathF.Sqrt(sq / groupSize + eps);
    }

    // i over x [N, C, H, W]
    internal static void NormalizeKernel(Index1D i, ArrayView<float> x, ArrayView<float> gamma, ArrayView<float> beta,
        ArrayView<float> mean, ArrayView<float> rstd, ArrayView<float> y, GroupShape s)
    {
        int c = i / s.Hw % s.C, ng = i / s.GroupSize;
        y[i] = (x[i] - mean[ng]) * rstd[ng] * gamma[c] + beta[c];
    }

    // ng over [N*G]: sums[2ng] = Σ dy·gamma, sums[2ng+1] = Σ dy·gamma·xhat over the group.
    internal static void GroupSumsKernel(Index1D ng, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean,
        ArrayView<float> rstd, ArrayView<float> gamma, ArrayView<float> sums, GroupShape s)
    {
        float m = mean[ng], r = rstd[ng], sg = 0, sgx = 0;
        int start = ng * s.GroupSize, c0 = ng % s.G * s.ChannelsPerGroup;
        for (int j = 0; j < s.GroupSize; j++)
        {
            float gi = dy[start + j] * gamma[c0 + j / s.Hw];
            sg += gi;
            sgx += gi * (x[start + j] - m) * r;
        }
        sums[2 * ng] = sg;
        sums[2 * ng + 1] = sgx;
    }

    // i over x [N, C, H, W]
    internal static void InputGradKernel(Index1D i, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> gamma, ArrayView<float> sums, ArrayView<float> dx, GroupShape s)
    {
        int c = i / s.Hw % s.C, ng = i / s.GroupSize;
        float r = rstd[ng], xhat = (x[i] - mean[ng]) * r;
        dx[i] += r * (dy[i] * gamma[c] - sums[2 * ng] / s.GroupSize - xhat * sums[2 * ng + 1] / s.GroupSize);
    }

    // c over [C]
    internal static void ParamGradKernel(Index1D c, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> dgamma, ArrayView<float> dbeta, GroupShape s)
    {
        float sg = 0, sb = 0;
        for (int n = 0; n < s.N; n++)
        {
            int ng = n * s.G + c / s.ChannelsPerGroup, start = (n * s.C + c) * s.Hw;
            float m = mean[ng], r = rstd[ng];
            for (int j = 0; j < s.Hw; j++)
            {
                float d = dy[start + j];
                sg += d * (x[start + j] - m) * r;
                sb += d;
            }
        }
        dgamma[c] += sg;
        dbeta[c] += sb;
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, float> Stats =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, float>>(StatsKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> Normalize =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(NormalizeKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> GroupSums =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(GroupSumsKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> InputGrad =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(InputGradKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> ParamGrad =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(ParamGradKernel);
    }
}
