using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>
/// Fills a tensor from the counter-based <see cref="Philox"/> stream: element i gets stream
/// element offset + i for the seed, so the same (seed, offset) gives the same numbers on every
/// backend. Uniform in [0, 1) or standard normal. Versions: CPU loops over chunks; ILGPU one
/// thread per element.
/// </summary>
public static class RandomFill
{
    /// <summary>t[i] = U[0,1) element (offset + i) of stream <paramref name="seed"/>.</summary>
    public static void Uniform(Tensor t, ulong seed, ulong offset) => Fill(t, seed, offset, normal: false);

    /// <summary>t[i] = N(0,1) element (offset + i) of stream <paramref name="seed"/>.</summary>
    public static void Normal(Tensor t, ulong seed, ulong offset) => Fill(t, seed, offset, normal: true);

    private static void Fill(Tensor t, ulong seed, ulong offset, bool normal)
    {
        using var simd = CpuSimd.Enter(t.Device);
        if (t.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(t);
            if (normal)
            {
                k.Random.Normal(k.Stream, t.Length, t.View, seed, offset);
            }
            else
            {
                k.Random.Uniform(k.Stream, t.Length, t.View, seed, offset);
            }
            return;
        }
        Cpu.For(t.Length, 1 << 14, (t.Host(), seed, offset, normal), static (state, first, last) =>
        {
            var (v, seed, offset, normal) = state;
            for (int i = first; i < last; i++)
            {
                v[i] = normal ? Philox.Normal(seed, offset + (ulong)i) : Philox.Uniform(seed, offset + (ulong)i);
            }
        });
    }

    internal static void UniformKernel(Index1D i, ArrayView<float> t, ulong seed, ulong offset) =>
        t[i] = Philox.Uniform(seed, offset + (ulong)i.X);

    internal static void NormalKernel(Index1D i, ArrayView<float> t, ulong seed, ulong offset) =>
        t[i] = Philox.Normal(seed, offset + (ulong)i.X);

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ulong, ulong> Uniform =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ulong, ulong>>(UniformKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ulong, ulong> Normal =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ulong, ulong>>(NormalKernel);
    }
}
