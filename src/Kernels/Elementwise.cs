using System.Numerics;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>A pointwise function with its derivative, as static members so one generic kernel
/// (ILGPU) and one generic loop (CPU) serve every activation.</summary>
public interface IUnaryOp
{
    /// <summary>f(x).</summary>
    static abstract float Apply(float x);

    /// <summary>f'(x), for backward: dx += dy·f'(x).</summary>
    static abstract float Derivative(float x);
}

/// <summary>
/// Elementwise ops and their backward: generic unary map, add, scaled accumulate, scale, clamp, fill, and
/// the add of an [N, C] tensor broadcast over H×W (the time embedding added into a ResBlock).
/// Shapes: any for the flat ops; x, y [N, C, H, W] and e [N, C] for <see cref="AddChannels"/>.
/// Versions: one thread per element on ILGPU; SIMD loops over chunks on the CPU. The time-embedding bias gradient
/// (<see cref="AddChannelsBackward"/>, row sums over H×W) is a group reduction on ILGPU (<see cref="TiledReduce.RowSums"/>),
/// with its simple twin, one thread a row, behind <see cref="IlgpuKernels.Simple"/>.
/// </summary>
public static class Elementwise
{
    /// <summary>y = f(x) for an op struct f.</summary>
    public static void Map<TOp>(Tensor x, Tensor y) where TOp : struct, IUnaryOp
    {
        SameShape("map", x, y);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Elementwise.MapLauncher<TOp>()(k.Stream, x.Length, x.View, y.View);
            return;
        }
        Cpu.For(x.Length, 1 << 15, (x.Host(), y.Host()), static (v, s, e) =>
        {
            var (xs, ys) = v;
            for (int i = s; i < e; i++)
            {
                ys[i] = TOp.Apply(xs[i]);
            }
        });
    }

    /// <summary>dx += dy·f'(x).</summary>
    public static void MapBackward<TOp>(Tensor dy, Tensor x, Tensor dx) where TOp : struct, IUnaryOp
    {
        SameShape("map backward", x, dy);
        SameShape("map backward", x, dx);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Elementwise.MapBackwardLauncher<TOp>()(k.Stream, x.Length, dy.View, x.View, dx.View);
            return;
        }
        Cpu.For(x.Length, 1 << 15, (dy.Host(), x.Host(), dx.Host()), static (v, s, e) =>
        {
            var (dys, xs, dxs) = v;
            for (int i = s; i < e; i++)
            {
                dxs[i] += dys[i] * TOp.Derivative(xs[i]);
            }
        });
    }

    /// <summary>y = a + b.</summary>
    public static void Add(Tensor a, Tensor b, Tensor y)
    {
        SameShape("add", a, b);
        SameShape("add", a, y);
        using var simd = CpuSimd.Enter(a.Device);
        if (a.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(a);
            k.Elementwise.Add(k.Stream, a.Length, a.View, b.View, y.View);
            return;
        }
        Cpu.For(a.Length, 1 << 16, (a.Host(), b.Host(), y.Host()), static (v, s, e) =>
        {
            var (av, bv, yv) = v;
            int i = s;
            for (; Simd.VectorT && i <= e - Vector<float>.Count; i += Vector<float>.Count)
            {
                yv.Store(i, av.Load(i) + bv.Load(i));
            }
            for (; i < e; i++)
            {
                yv[i] = av[i] + bv[i];
            }
        });
    }

    /// <summary>dst += alpha·src: gradient accumulation and the backward of add.</summary>
    public static void Accumulate(Tensor dst, Tensor src, float alpha = 1f)
    {
        SameShape("accumulate", dst, src);
        using var simd = CpuSimd.Enter(dst.Device);
        if (dst.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dst);
            k.Elementwise.Axpy(k.Stream, dst.Length, src.View, dst.View, alpha);
            return;
        }
        Cpu.For(dst.Length, 1 << 16, (src.Host(), dst.Host(), alpha), static (v, s, e) =>
        {
            var (sv, dv, alpha) = v;
            var va = new Vector<float>(alpha);
            int i = s;
            for (; Simd.VectorT && i <= e - Vector<float>.Count; i += Vector<float>.Count)
            {
                dv.Store(i, Vector.FusedMultiplyAdd(sv.Load(i), va, dv.Load(i)));
            }
            for (; i < e; i++)
            {
                dv[i] += alpha * sv[i];
            }
        });
    }

    /// <summary>y = s·x (y may be x).</summary>
    public static void Scale(Tensor x, float s, Tensor y)
    {
        SameShape("scale", x, y);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Elementwise.Scale(k.Stream, x.Length, x.View, y.View, s);
            return;
        }
        Cpu.For(x.Length, 1 << 16, (x.Host(), y.Host(), s), static (v, st, e) =>
        {
            var (xv, yv, s) = v;
            var vs = new Vector<float>(s);
            int i = st;
            for (; Simd.VectorT && i <= e - Vector<float>.Count; i += Vector<float>.Count)
            {
                yv.Store(i, xv.Load(i) * vs);
            }
            for (; i < e; i++)
            {
                yv[i] = s * xv[i];
            }
        });
    }

    /// <summary>
    /// y = min(max(x, lo), hi) (y may be x): the samplers' clip of the x0 estimate to the data range
    /// [-1, 1]. No backward: it only ever acts on sampler state. NaN stays NaN on both versions, so a
    /// diverged model is not hidden behind a clipped image.
    /// </summary>
    public static void Clamp(Tensor x, float lo, float hi, Tensor y)
    {
        SameShape("clamp", x, y);
        if (!(lo <= hi))
        {
            throw new ArgumentException($"clamp: lo {lo} must not exceed hi {hi}");
        }
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Elementwise.Clamp(k.Stream, x.Length, x.View, y.View, lo, hi);
            return;
        }
        Cpu.For(x.Length, 1 << 16, (x.Host(), y.Host(), lo, hi), static (v, s, e) =>
        {
            var (xv, yv, lo, hi) = v;
            for (int i = s; i < e; i++)
            {
                yv[i] = ClampOne(xv[i], lo, hi);
            }
        });
    }

    // Comparisons written so NaN fails both and passes through, the same on the CPU and in the kernel.
    private static float ClampOne(float v, float lo, float hi) => v < lo ? lo : v > hi ? hi : v;

    /// <summary>Every element = value.</summary>
    public static void Fill(Tensor t, float value)
    {
        using var simd = CpuSimd.Enter(t.Device);
        if (t.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(t);
            k.Elementwise.Fill(k.Stream, t.Length, t.View, value);
            return;
        }
        t.Span.Fill(value);
    }

    /// <summary>y[n,c,h,w] = x[n,c,h,w] + e[n,c]. Shapes: x, y [N, C, H, W], e [N, C].</summary>
    public static void AddChannels(Tensor x, Tensor e, Tensor y)
    {
        const string op = "add channels";
        Check.Rank(op, "x", x, 4);
        Check.Devices(op, x, e, y);
        int n = x.Dim(0), c = x.Dim(1), hw = x.Dim(2) * x.Dim(3);
        Check.Shape(op, "e", e, n, c);
        Check.Shape(op, "y", y, x.Shape);
        using var simd = CpuSimd.Enter(x.Device);
        if (x.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(x);
            k.Elementwise.AddChannels(k.Stream, x.Length, x.View, e.View, y.View, hw);
            return;
        }
        Cpu.For(n * c, Math.Max(1, (1 << 15) / Math.Max(hw, 1)), (x.Host(), e.Host(), y.Host(), hw), static (v, s, end) =>
        {
            var (xv, ev, yv, hw) = v;
            for (int nc = s; nc < end; nc++)
            {
                var vb = new Vector<float>(ev[nc]);
                int i = nc * hw, stop = i + hw;
                for (; Simd.VectorT && i <= stop - Vector<float>.Count; i += Vector<float>.Count)
                {
                    yv.Store(i, xv.Load(i) + vb);
                }
                for (; i < stop; i++)
                {
                    yv[i] = xv[i] + ev[nc];
                }
            }
        });
    }

    /// <summary>de[n,c] += Σ_hw dy[n,c,h,w] (dx += dy is <see cref="Accumulate"/>).</summary>
    public static void AddChannelsBackward(Tensor dy, Tensor de)
    {
        const string op = "add channels backward";
        Check.Rank(op, "dy", dy, 4);
        Check.Devices(op, dy, de);
        int n = dy.Dim(0), c = dy.Dim(1), hw = dy.Dim(2) * dy.Dim(3);
        Check.Shape(op, "de", de, n, c);
        using var simd = CpuSimd.Enter(dy.Device);
        if (dy.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dy);
            if (!k.Simple)
            {
                TiledReduce.RowSums(k, dy.View, de.View, n * c, hw);
                return;
            }
            k.Elementwise.RowSums(k.Stream, n * c, dy.View, de.View, hw);
            return;
        }
        Cpu.For(n * c, Math.Max(1, (1 << 15) / Math.Max(hw, 1)), (dy.Host(), de.Host(), hw), static (v, s, end) =>
        {
            var (dyv, dev, hw) = v;
            for (int nc = s; nc < end; nc++)
            {
                dev[nc] += SumSpan(dyv.Slice(nc * hw, hw));
            }
        });
    }

    /// <summary>
    /// y[n, ...] = ca[n]·a[n, ...] + cb[n]·b[n, ...]: per-sample coefficients ca, cb [N] over
    /// a, b, y [N, ...]. The diffusion forward process (x_t = sqrt(ābar_t)·x0 + sqrt(1-ābar_t)·eps)
    /// and every sampler step are this op. No backward: its inputs are data and noise.
    /// </summary>
    public static void Combine(Tensor a, Tensor ca, Tensor b, Tensor cb, Tensor y)
    {
        const string op = "combine";
        SameShape(op, a, b);
        SameShape(op, a, y);
        Check.Devices(op, a, ca, b, cb, y);
        int n = a.Dim(0), per = a.Length / Math.Max(n, 1);
        Check.Shape(op, "ca", ca, n);
        Check.Shape(op, "cb", cb, n);
        using var simd = CpuSimd.Enter(a.Device);
        if (a.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(a);
            k.Elementwise.Combine(k.Stream, a.Length, a.View, ca.View, b.View, cb.View, y.View, per);
            return;
        }
        Cpu.For(n, Math.Max(1, (1 << 15) / Math.Max(per, 1)), (a.Host(), ca.Host(), b.Host(), cb.Host(), y.Host(), per),
            static (v, first, last) =>
        {
            var (av, cav, bv, cbv, yv, per) = v;
            for (int s = first; s < last; s++)
            {
                var va = new Vector<float>(cav[s]);
                var vb = new Vector<float>(cbv[s]);
                int i = s * per, stop = i + per;
                for (; Simd.VectorT && i <= stop - Vector<float>.Count; i += Vector<float>.Count)
                {
                    yv.Store(i, va * av.Load(i) + vb * bv.Load(i));
                }
                for (; i < stop; i++)
                {
                    yv[i] = cav[s] * av[i] + cbv[s] * bv[i];
                }
            }
        });
    }

    /// <summary>Σ of a span with SIMD partial sums (float; callers sum a few thousand at most).</summary>
    internal static float SumSpan(ReadOnlySpan<float> v)
    {
        var acc = Vector<float>.Zero;
        int i = 0;
        for (; Simd.VectorT && i <= v.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            acc += new Vector<float>(v.Slice(i));
        }
        float sum = Vector.Sum(acc);
        for (; i < v.Length; i++)
        {
            sum += v[i];
        }
        return sum;
    }

    private static void SameShape(string op, Tensor a, Tensor b)
    {
        Check.Same(op, a, b);
        if (!a.Shape.AsSpan().SequenceEqual(b.Shape))
        {
            throw new ArgumentException($"{op}: shapes {a.ShapeText} and {b.ShapeText} differ");
        }
    }

    // ---------------- ILGPU kernels: one thread per element ----------------

    internal static void MapKernel<TOp>(Index1D i, ArrayView<float> x, ArrayView<float> y) where TOp : struct, IUnaryOp =>
        y[i] = TOp.Apply(x[i]);

    internal static void MapBackwardKernel<TOp>(Index1D i, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> dx)
        where TOp : struct, IUnaryOp =>
        dx[i] += dy[i] * TOp.Derivative(x[i]);

    internal static void AddKernel(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> y) => y[i] = a[i] + b[i];

    internal static void AxpyKernel(Index1D i, ArrayView<float> src, ArrayView<float> dst, float alpha) => dst[i] += alpha * src[i];

    internal static void ScaleKernel(Index1D i, ArrayView<float> x, ArrayView<float> y, float s) => y[i] = s * x[i];

    internal static void ClampKernel(Index1D i, ArrayView<float> x, ArrayView<float> y, float lo, float hi)
    {
        float v = x[i];
        y[i] = v < lo ? lo : v > hi ? hi : v;
    }

    internal static void FillKernel(Index1D i, ArrayView<float> t, float value) => t[i] = value;

    // x, y [N*C, HW], e [N*C]
    internal static void AddChannelsKernel(Index1D i, ArrayView<float> x, ArrayView<float> e, ArrayView<float> y, int hw) =>
        y[i] = x[i] + e[i / hw];

    // The simple twin of TiledReduce.RowSumsKernel: one thread per row, sums [rows, cols] along cols into out[rows] (+=).
    // Neighbouring threads read cols apart, so a warp's loads do not coalesce.
    internal static void RowSumsKernel(Index1D row, ArrayView<float> x, ArrayView<float> sums, int cols)
    {
        float s = 0;
        int start = row * cols;
        for (int j = 0; j < cols; j++)
        {
            s += x[start + j];
        }
        sums[row] += s;
    }

    // i over a, b, y [N, per]
    internal static void CombineKernel(Index1D i, ArrayView<float> a, ArrayView<float> ca, ArrayView<float> b, ArrayView<float> cb,
        ArrayView<float> y, int per) =>
        y[i] = ca[i / per] * a[i] + cb[i / per] * b[i];

    internal sealed class Gpu
    {
        private readonly IlgpuKernels _k;
        private readonly Dictionary<Type, Delegate> _maps = [];

        public Gpu(IlgpuKernels k)
        {
            _k = k;
            Add = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>>>(AddKernel);
            Axpy = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(AxpyKernel);
            Scale = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float>>(ScaleKernel);
            Fill = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, float>>(FillKernel);
            Clamp = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float, float>>(ClampKernel);
            AddChannels = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>>(AddChannelsKernel);
            RowSums = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(RowSumsKernel);
            Combine = k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int>>(CombineKernel);
            // Every activation the engine uses is loaded up front, with the rest.
            MapLauncher<Silu>();
            MapBackwardLauncher<Silu>();
        }

        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>> Add { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Axpy { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float> Scale { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, float> Fill { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, float, float> Clamp { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> AddChannels { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> RowSums { get; }
        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int> Combine { get; }

        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>> MapLauncher<TOp>() where TOp : struct, IUnaryOp =>
            Cached(typeof(Map<TOp>), () => _k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>>>(MapKernel<TOp>));

        public Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>> MapBackwardLauncher<TOp>()
            where TOp : struct, IUnaryOp =>
            Cached(typeof(Backward<TOp>), () => _k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>>>(MapBackwardKernel<TOp>));

        private T Cached<T>(Type key, Func<T> load) where T : Delegate
        {
            lock (_maps)
            {
                if (!_maps.TryGetValue(key, out var d))
                {
                    _maps[key] = d = load();
                }
                return (T)d;
            }
        }

        // Type keys for the per-op launcher cache.
        private struct Map<TOp>;

        private struct Backward<TOp>;
    }
}
