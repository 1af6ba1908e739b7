using System.Runtime.Intrinsics;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

// The tiled GroupNorm backward's launcher: stream, config, dy, x, mean, rstd, gamma, beta, dx, tables, dgamma, dbeta,
// the arrival counters, the shape, lanes, accumulate (TiledNorm.BackwardKernel).
using NormBackwardLauncher = System.Action<ILGPU.Runtime.AcceleratorStream, ILGPU.KernelConfig, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>,
    ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<float>,
    ILGPU.ArrayView<float>, ILGPU.ArrayView<float>, ILGPU.ArrayView<int>, Ddpm.Kernels.GroupNorm.GroupShape, int, int>;

namespace Ddpm.Kernels;

/// <summary>
/// Group normalisation with affine weight and bias (Wu and He 2018), as torch.nn.GroupNorm,
/// optionally fused with the SiLU that follows every group norm of the U-Net.
/// Shapes: x, y [N, C, H, W]; gamma, beta [C]; mean, rstd [N, G]; G divides C, and each group
/// holds M = (C/G)·H·W contiguous elements.
///   forward:  xhat = (x - mean)·rstd, rstd = 1/sqrt(var + eps) (biased variance),
///             u = gamma·xhat + beta, y = u (or silu(u) when fused)
///   backward: du = dy (or dy·silu'(u) when fused, u recomputed from x); with g = du·gamma,
///             dx = rstd·(g - mean_grp(g) - xhat·mean_grp(g·xhat)), dgamma[c] += Σ du·xhat, dbeta[c] += Σ du.
/// Forward saves mean and rstd by name for backward; the fused op never stores u.
/// Versions: CPU, one task per (n, group), SIMD sums at the level CpuSimd.Level sets (Vector512, Vector256 or Vector128) with per-(n, c) partials in
/// double, two passes over the data per direction; ILGPU v1 (the simple twin), one thread per (n, group) for
/// statistics, one per element for the pointwise parts, one per channel for dgamma/dbeta; ILGPU v2
/// (<see cref="TiledNorm"/>, the default), one group of 256 threads per (n, group) with shared-memory
/// reductions: forward in one launch, backward in two.
/// </summary>
public static class GroupNorm
{
    /// <summary>y = groupnorm(x)·gamma + beta, or silu of it when <paramref name="silu"/>; writes mean and rstd [N, G].</summary>
    public static void Forward(Tensor x, Tensor gamma, Tensor beta, int groups, float eps, Tensor y, Tensor mean, Tensor rstd, bool silu = false)
    {
        var s = ShapeOf("groupnorm", x, groups, silu);
        Check.Devices("groupnorm", x, gamma, beta, y, mean, rstd);
        Check.Shape("groupnorm", "gamma", gamma, s.C);
        Check.Shape("groupnorm", "beta", beta, s.C);
        Check.Shape("groupnorm", "y", y, x.Shape);
        Check.Shape("groupnorm", "mean", mean, s.N, groups);
        Check.Shape("groupnorm", "rstd", rstd, s.N, groups);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            if (!k.Simple)
            {
                TiledNorm.Forward(k, x.View, gamma.View, beta.View, y.View, mean.View, rstd.View, s, eps);
                return;
            }
            k.GroupNorm.Stats(k.Stream, s.N * groups, x.View, mean.View, rstd.View, s.GroupSize, eps);
            k.GroupNorm.Normalize(k.Stream, x.Length, x.View, gamma.View, beta.View, mean.View, rstd.View, y.View, s);
            return;
        }
        var arrays = (x.Host(), y.Host(), gamma.Host(), beta.Host(), mean.Host(), rstd.Host());
        Cpu.For(s.N * groups, 1, (arrays, s, groups, eps, silu), static (state, first, last) =>
        {
            var ((xv, yv, gv, bv, mv, rv), s, groups, eps, silu) = state;
            for (int ng = first; ng < last; ng++)
            {
                var span = xv.Slice(ng * s.GroupSize, s.GroupSize);
                double mu = Sum(span) / s.GroupSize;
                float m = (float)mu, r = (float)(1.0 / Math.Sqrt(SumSquaredDeviations(span, m) / s.GroupSize + eps));
                mv[ng] = m;
                rv[ng] = r;
                int c0 = ng % groups * s.ChannelsPerGroup;
                for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                {
                    float scale = r * gv[c0 + cg], shift = bv[c0 + cg] - m * scale;
                    int start = ng * s.GroupSize + cg * s.Hw;
                    AffineSilu(xv.Slice(start, s.Hw), yv.Slice(start, s.Hw), scale, shift, silu);
                }
            }
        });
    }

    /// <summary>dx += ∂L/∂x (dx = ∂L/∂x, old contents unread, when not <paramref name="accumulate"/>), dgamma += Σ du·xhat,
    /// dbeta += Σ du, from the saved mean and rstd (beta is read only when fused, to recompute u).</summary>
    public static void Backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor gamma, Tensor beta, int groups, Tensor dx, Tensor dgamma, Tensor dbeta, bool silu = false,
        bool accumulate = true)
    {
        var s = ShapeOf("groupnorm backward", x, groups, silu);
        Check.Devices("groupnorm backward", dy, x, mean, rstd, gamma, beta, dx, dgamma, dbeta);
        Check.Shape("groupnorm backward", "dy", dy, x.Shape);
        Check.Shape("groupnorm backward", "dx", dx, x.Shape);
        Check.Shape("groupnorm backward", "dgamma", dgamma, s.C);
        Check.Shape("groupnorm backward", "dbeta", dbeta, s.C);
        Check.Shape("groupnorm backward", "mean", mean, s.N, groups);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            if (!k.Simple)
            {
                TiledNorm.Backward(k, dy.View, x.View, mean.View, rstd.View, gamma.View, beta.View, dx.View, dgamma.View, dbeta.View, s, accumulate);
                return;
            }
            if (!accumulate)
            {
                dx.Zero();
            }
            using var sums = k.Scratch(2 * s.N * groups);
            k.GroupNorm.GroupSums(k.Stream, s.N * groups, dy.View, x.View, mean.View, rstd.View, gamma.View, beta.View, sums.View, s);
            k.GroupNorm.InputGrad(k.Stream, x.Length, dy.View, x.View, mean.View, rstd.View, gamma.View, beta.View, sums.View, dx.View, s);
            k.GroupNorm.ParamGrad(k.Stream, s.C, dy.View, x.View, mean.View, rstd.View, gamma.View, beta.View, dgamma.View, dbeta.View, s);
            return;
        }
        var dyv = dy.Host();
        var xv = x.Host();
        var mv = mean.Host();
        var rv = rstd.Host();
        var gv = gamma.Host();
        var bv = beta.Host();
        var dxv = dx.Host();
        // Per (n, c): Σ_hw du and Σ_hw du·x. The group sums and dgamma/dbeta all follow from these.
        // Both [N, C] sum tables in the caller's arena: the workers write disjoint entries while the caller waits.
        nint tables = Arena.Current.Doubles(ArenaSlot.GroupNormSums, 2 * s.N * s.C);
        {
            var arrays = (dyv, xv, mv, rv, gv, bv, dxv, tables);
            Cpu.For(s.N * groups, 1, (arrays, s, groups, silu, accumulate), static (state, first, last) =>
            {
                var ((dyv, xv, mv, rv, gv, bv, dxv, sums), s, groups, silu, accumulate) = state;
                var sumDu = SumTable(sums, s, 0);
                var sumDuX = SumTable(sums, s, 1);
                // With SiLU fused, du = dy·silu'(u) is computed once into this scratch and read back by the second pass.
                Span<float> du = silu ? Arena.Current.Span(ArenaSlot.GroupNormDu, s.GroupSize) : default;
                for (int ng = first; ng < last; ng++)
                {
                    float m = mv[ng], r = rv[ng];
                    int n = ng / groups, c0 = ng % groups * s.ChannelsPerGroup;
                    double sumG = 0, sumGx = 0;
                    for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                    {
                        int c = c0 + cg, start = ng * s.GroupSize + cg * s.Hw;
                        float scale = r * gv[c], shift = bv[c] - m * scale;
                        var (a, b) = ChannelSums(dyv.Slice(start, s.Hw), xv.Slice(start, s.Hw), scale, shift, silu ? du.Slice(cg * s.Hw, s.Hw) : default, silu);
                        sumDu[n * s.C + c] = a;
                        sumDuX[n * s.C + c] = b;
                        // Σ g = γ·Σ du; Σ g·xhat = γ·r·(Σ du·x - m·Σ du).
                        sumG += gv[c] * a;
                        sumGx += gv[c] * r * (b - m * a);
                    }
                    float meanG = (float)(sumG / s.GroupSize), meanGx = (float)(sumGx / s.GroupSize);
                    for (int cg = 0; cg < s.ChannelsPerGroup; cg++)
                    {
                        int c = c0 + cg, start = ng * s.GroupSize + cg * s.Hw;
                        float scale = r * gv[c], shift = bv[c] - m * scale;
                        var duc = silu ? du.Slice(cg * s.Hw, s.Hw) : dyv.Slice(start, s.Hw);
                        InputGrad(duc, xv.Slice(start, s.Hw), dxv.Slice(start, s.Hw), gv[c], m, r, meanG, meanGx, accumulate);
                    }
                }
            });
            var dgv = dgamma.Host();
            var dbv = dbeta.Host();
            var sumDuTable = SumTable(tables, s, 0);
            var sumDuXTable = SumTable(tables, s, 1);
            for (int c = 0; c < s.C; c++)
            {
                double sg = 0, sb = 0;
                for (int n = 0; n < s.N; n++)
                {
                    int ng = n * groups + c / s.ChannelsPerGroup;
                    double a = sumDuTable[n * s.C + c], b = sumDuXTable[n * s.C + c];
                    sg += rv[ng] * (b - mv[ng] * a);
                    sb += a;
                }
                dgv[c] += (float)sg;
                dbv[c] += (float)sb;
            }
        }
    }

    /// <summary>Table <paramref name="which"/> (0: Σ du, 1: Σ du·x) of the two [N, C] tables at <paramref name="sums"/>.</summary>
    private static unsafe Span<double> SumTable(nint sums, GroupShape s, int which) => new((double*)sums + which * s.N * s.C, s.N * s.C);

    private static GroupShape ShapeOf(string op, Tensor x, int groups, bool silu)
    {
        Check.Rank(op, "x", x, 4);
        int c = x.Dim(1);
        if (groups < 1 || c % groups != 0)
        {
            throw new ArgumentException($"{op}: {groups} groups do not divide {c} channels");
        }
        return new GroupShape(x.Dim(0), c, groups, x.Dim(2) * x.Dim(3), silu);
    }

    // ---------------- CPU SIMD helpers: by CpuSimd.Level (Isa), Vector512 where AVX-512 is, then Vector256 (AVX2) or
    // Vector128 (SSE, NEON), scalar tails; the scalar level runs the tails only ----------------

    private static double Sum(ReadOnlySpan<float> v)
    {
        int i = 0;
        double s = 0;
        if (Isa.Avx2)
        {
            var acc0 = Vector256<float>.Zero;
            var acc1 = Vector256<float>.Zero;
            int w = Vector256<float>.Count;
            for (; i <= v.Length - 2 * w; i += 2 * w)
            {
                acc0 += Vector256.Create(v.Slice(i, w));
                acc1 += Vector256.Create(v.Slice(i + w, w));
            }
            s = Vector256.Sum(acc0 + acc1);
        }
        else if (Isa.V128)
        {
            var acc0 = Vector128<float>.Zero;
            var acc1 = Vector128<float>.Zero;
            for (; i <= v.Length - 8; i += 8)
            {
                acc0 += Vector128.Create(v.Slice(i, 4));
                acc1 += Vector128.Create(v.Slice(i + 4, 4));
            }
            s = Vector128.Sum(acc0 + acc1);
        }
        for (; i < v.Length; i++)
        {
            s += v[i];
        }
        return s;
    }

    private static double SumSquaredDeviations(ReadOnlySpan<float> v, float mean)
    {
        int i = 0;
        double s = 0;
        if (Isa.Avx2)
        {
            var m = Vector256.Create(mean);
            var acc = Vector256<float>.Zero;
            int w = Vector256<float>.Count;
            for (; i <= v.Length - w; i += w)
            {
                var d = Vector256.Create(v.Slice(i, w)) - m;
                acc = Vector256.FusedMultiplyAdd(d, d, acc);
            }
            s = Vector256.Sum(acc);
        }
        else if (Isa.V128)
        {
            var m = Vector128.Create(mean);
            var acc = Vector128<float>.Zero;
            for (; i <= v.Length - 4; i += 4)
            {
                var d = Vector128.Create(v.Slice(i, 4)) - m;
                acc = Vector128.MultiplyAddEstimate(d, d, acc);
            }
            s = Vector128.Sum(acc);
        }
        for (; i < v.Length; i++)
        {
            double d = v[i] - mean;
            s += d * d;
        }
        return s;
    }

    private static Vector256<float> SiluOf(Vector256<float> u) => u * FastMath.Sigmoid(u);

    // silu'(u) = σ(u)·(1 + u·(1 - σ(u)))
    private static Vector256<float> SiluDerivative(Vector256<float> u)
    {
        var sig = FastMath.Sigmoid(u);
        return sig * (Vector256<float>.One + u * (Vector256<float>.One - sig));
    }

    private static Vector512<float> SiluDerivative(Vector512<float> u)
    {
        var sig = FastMath.Sigmoid(u);
        return sig * (Vector512<float>.One + u * (Vector512<float>.One - sig));
    }

    private static Vector128<float> SiluDerivative(Vector128<float> u)
    {
        var sig = FastMath.Sigmoid(u);
        return sig * (Vector128<float>.One + u * (Vector128<float>.One - sig));
    }

    // y = u or silu(u), u = x·scale + shift
    private static void AffineSilu(ReadOnlySpan<float> x, Span<float> y, float scale, float shift, bool silu)
    {
        int i = 0;
        if (Isa.Avx512)
        {
            var ws = Vector512.Create(scale);
            var wb = Vector512.Create(shift);
            for (; i <= x.Length - 16; i += 16)
            {
                var u = Vector512.FusedMultiplyAdd(Vector512.Create(x.Slice(i, 16)), ws, wb);
                (silu ? u * FastMath.Sigmoid(u) : u).CopyTo(y.Slice(i, 16));
            }
        }
        if (Isa.Avx2)
        {
            var vs = Vector256.Create(scale);
            var vb = Vector256.Create(shift);
            int w = Vector256<float>.Count;
            for (; i <= x.Length - w; i += w)
            {
                var u = Vector256.FusedMultiplyAdd(Vector256.Create(x.Slice(i, w)), vs, vb);
                (silu ? SiluOf(u) : u).CopyTo(y.Slice(i, w));
            }
        }
        else if (Isa.V128)
        {
            var vs = Vector128.Create(scale);
            var vb = Vector128.Create(shift);
            for (; i <= x.Length - 4; i += 4)
            {
                var u = Vector128.MultiplyAddEstimate(Vector128.Create(x.Slice(i, 4)), vs, vb);
                (silu ? u * FastMath.Sigmoid(u) : u).CopyTo(y.Slice(i, 4));
            }
        }
        for (; i < x.Length; i++)
        {
            float u = x[i] * scale + shift;
            y[i] = silu ? Silu.Apply(u) : u;
        }
    }

    // (Σ du, Σ du·x) over one channel, du = dy or dy·silu'(x·scale + shift); with SiLU, du is also stored in duOut.
    private static (double, double) ChannelSums(ReadOnlySpan<float> dy, ReadOnlySpan<float> x, float scale, float shift, Span<float> duOut, bool silu)
    {
        int i = 0;
        double sa = 0, sb = 0;
        if (Isa.Avx512)
        {
            var ws = Vector512.Create(scale);
            var wb = Vector512.Create(shift);
            var wa = Vector512<float>.Zero;
            var wbx = Vector512<float>.Zero;
            for (; i <= x.Length - 16; i += 16)
            {
                var xv = Vector512.Create(x.Slice(i, 16));
                var du = Vector512.Create(dy.Slice(i, 16));
                if (silu)
                {
                    du *= SiluDerivative(Vector512.FusedMultiplyAdd(xv, ws, wb));
                    du.CopyTo(duOut.Slice(i, 16));
                }
                wa += du;
                wbx = Vector512.FusedMultiplyAdd(du, xv, wbx);
            }
            sa = Vector512.Sum(wa);
            sb = Vector512.Sum(wbx);
        }
        if (Isa.Avx2)
        {
            var vs = Vector256.Create(scale);
            var vb = Vector256.Create(shift);
            var a = Vector256<float>.Zero;
            var b = Vector256<float>.Zero;
            int w = Vector256<float>.Count;
            for (; i <= x.Length - w; i += w)
            {
                var xv = Vector256.Create(x.Slice(i, w));
                var du = Vector256.Create(dy.Slice(i, w));
                if (silu)
                {
                    du *= SiluDerivative(Vector256.FusedMultiplyAdd(xv, vs, vb));
                    du.CopyTo(duOut.Slice(i, w));
                }
                a += du;
                b = Vector256.FusedMultiplyAdd(du, xv, b);
            }
            sa += Vector256.Sum(a);
            sb += Vector256.Sum(b);
        }
        else if (Isa.V128)
        {
            var vs = Vector128.Create(scale);
            var vb = Vector128.Create(shift);
            var a = Vector128<float>.Zero;
            var b = Vector128<float>.Zero;
            for (; i <= x.Length - 4; i += 4)
            {
                var xv = Vector128.Create(x.Slice(i, 4));
                var du = Vector128.Create(dy.Slice(i, 4));
                if (silu)
                {
                    du *= SiluDerivative(Vector128.MultiplyAddEstimate(xv, vs, vb));
                    du.CopyTo(duOut.Slice(i, 4));
                }
                a += du;
                b = Vector128.MultiplyAddEstimate(du, xv, b);
            }
            sa += Vector128.Sum(a);
            sb += Vector128.Sum(b);
        }
        for (; i < x.Length; i++)
        {
            float du = silu ? dy[i] * Silu.Derivative(x[i] * scale + shift) : dy[i];
            if (silu)
            {
                duOut[i] = du;
            }
            sa += du;
            sb += du * x[i];
        }
        return (sa, sb);
    }

    // dx (+)= r·(du·γ - meanG - xhat·meanGx), xhat = (x - m)·r
    private static void InputGrad(ReadOnlySpan<float> du, ReadOnlySpan<float> x, Span<float> dx, float gamma, float m, float r, float meanG, float meanGx, bool accumulate)
    {
        int i = 0;
        if (Isa.Avx512)
        {
            var wg = Vector512.Create(gamma);
            var wm = Vector512.Create(m);
            var wr = Vector512.Create(r);
            var wmg = Vector512.Create(meanG);
            var wmgx = Vector512.Create(meanGx);
            for (; i <= x.Length - 16; i += 16)
            {
                var xhat = (Vector512.Create(x.Slice(i, 16)) - wm) * wr;
                var g = Vector512.Create(du.Slice(i, 16)) * wg - wmg - xhat * wmgx;
                (accumulate ? Vector512.FusedMultiplyAdd(wr, g, Vector512.Create(dx.Slice(i, 16))) : wr * g).CopyTo(dx.Slice(i, 16));
            }
        }
        if (Isa.Avx2)
        {
            var vg = Vector256.Create(gamma);
            var vm = Vector256.Create(m);
            var vr = Vector256.Create(r);
            var vmg = Vector256.Create(meanG);
            var vmgx = Vector256.Create(meanGx);
            int w = Vector256<float>.Count;
            for (; i <= x.Length - w; i += w)
            {
                var xv = Vector256.Create(x.Slice(i, w));
                var xhat = (xv - vm) * vr;
                var g = Vector256.Create(du.Slice(i, w)) * vg - vmg - xhat * vmgx;
                (accumulate ? Vector256.FusedMultiplyAdd(vr, g, Vector256.Create(dx.Slice(i, w))) : vr * g).CopyTo(dx.Slice(i, w));
            }
        }
        else if (Isa.V128)
        {
            var vg = Vector128.Create(gamma);
            var vm = Vector128.Create(m);
            var vr = Vector128.Create(r);
            var vmg = Vector128.Create(meanG);
            var vmgx = Vector128.Create(meanGx);
            for (; i <= x.Length - 4; i += 4)
            {
                var xv = Vector128.Create(x.Slice(i, 4));
                var xhat = (xv - vm) * vr;
                var g = Vector128.Create(du.Slice(i, 4)) * vg - vmg - xhat * vmgx;
                (accumulate ? Vector128.MultiplyAddEstimate(vr, g, Vector128.Create(dx.Slice(i, 4))) : vr * g).CopyTo(dx.Slice(i, 4));
            }
        }
        for (; i < x.Length; i++)
        {
            float xhat = (x[i] - m) * r;
            float v = r * (du[i] * gamma - meanG - xhat * meanGx);
            dx[i] = accumulate ? dx[i] + v : v;
        }
    }

    /// <summary>N, C, G and H·W of a group-norm call, the derived sizes kernels need, and whether SiLU is fused (1) or not (0).</summary>
    internal readonly struct GroupShape(int n, int c, int g, int hw, bool silu)
    {
        public readonly int N = n, C = c, G = g, Hw = hw;
        public readonly int ChannelsPerGroup = c / g;
        public readonly int GroupSize = c / g * hw;
        public readonly int Silu = silu ? 1 : 0;
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
        float u = (x[i] - mean[ng]) * rstd[ng] * gamma[c] + beta[c];
        y[i] = s.Silu != 0 ? Silu.Apply(u) : u;
    }

    // The upstream gradient of the normalised value u: dy, or dy·silu'(u) with u recomputed.
    private static float Du(float dy, float x, float m, float r, float gamma, float beta, int silu) =>
        silu != 0 ? dy * Silu.Derivative((x - m) * r * gamma + beta) : dy;

    // ng over [N*G]: sums[2ng] = Σ du·gamma, sums[2ng+1] = Σ du·gamma·xhat over the group.
    internal static void GroupSumsKernel(Index1D ng, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean,
        ArrayView<float> rstd, ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> sums, GroupShape s)
    {
        float m = mean[ng], r = rstd[ng], sg = 0, sgx = 0;
        int start = ng * s.GroupSize, c0 = ng % s.G * s.ChannelsPerGroup;
        for (int j = 0; j < s.GroupSize; j++)
        {
            int c = c0 + j / s.Hw;
            float gi = Du(dy[start + j], x[start + j], m, r, gamma[c], beta[c], s.Silu) * gamma[c];
            sg += gi;
            sgx += gi * (x[start + j] - m) * r;
        }
        sums[2 * ng] = sg;
        sums[2 * ng + 1] = sgx;
    }

    // i over x [N, C, H, W]
    internal static void InputGradKernel(Index1D i, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> sums, ArrayView<float> dx, GroupShape s)
    {
        int c = i / s.Hw % s.C, ng = i / s.GroupSize;
        float m = mean[ng], r = rstd[ng], xhat = (x[i] - m) * r;
        float du = Du(dy[i], x[i], m, r, gamma[c], beta[c], s.Silu);
        dx[i] += r * (du * gamma[c] - sums[2 * ng] / s.GroupSize - xhat * sums[2 * ng + 1] / s.GroupSize);
    }

    // c over [C]
    internal static void ParamGradKernel(Index1D c, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> mean, ArrayView<float> rstd,
        ArrayView<float> gamma, ArrayView<float> beta, ArrayView<float> dgamma, ArrayView<float> dbeta, GroupShape s)
    {
        float sg = 0, sb = 0;
        for (int n = 0; n < s.N; n++)
        {
            int ng = n * s.G + c / s.ChannelsPerGroup, start = (n * s.C + c) * s.Hw;
            float m = mean[ng], r = rstd[ng];
            for (int j = 0; j < s.Hw; j++)
            {
                float du = Du(dy[start + j], x[start + j], m, r, gamma[c], beta[c], s.Silu);
                sg += du * (x[start + j] - m) * r;
                sb += du;
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

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> GroupSums =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(GroupSumsKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> InputGrad =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(InputGradKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape> ParamGrad =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape>>(ParamGradKernel);

        // v2, explicitly grouped (TiledNorm): launched with KernelConfig(groups, threads).
        public readonly Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape, float> TiledForward =
            k.Grouped<Action<AcceleratorStream, KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, GroupShape, float>>(TiledNorm.ForwardKernel,
                TiledNorm.ForwardSpecialization);

        public readonly NormBackwardLauncher TiledBackward = k.Grouped<NormBackwardLauncher>(TiledNorm.BackwardKernel, TiledNorm.BackwardSpecialization);
    }
}
