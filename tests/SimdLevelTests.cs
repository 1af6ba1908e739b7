using System.Runtime.Intrinsics;
using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>The instruction-level setting itself, the micro-kernel each level runs, and the element-wise fast paths
/// (group norm with and without SiLU, SiLU, exp) at every level the processor has, against the scalar references.</summary>
[Collection(SimdLevelCollection.Name)]
public sealed unsafe class SimdLevelTests
{
    public static IEnumerable<object[]> Levels => SimdLevelCollection.Cross(Array.Empty<object>());

    /// <summary>The levels with a vector exp of their own (the scalar level calls MathF.Exp).</summary>
    public static IEnumerable<object[]> VectorLevels => Levels.Where(l => (SimdLevel)l[0] != SimdLevel.Scalar);

    /// <summary>The level is a setting of the CPU device: an op runs at its tensors' device's level, its helpers with it,
    /// and the thread goes back to the widest after it; a level the processor lacks is refused, not clamped.</summary>
    [Fact]
    public void TheLevelIsTheDevicesAndAScopeRestoresIt()
    {
        Assert.True(CpuSimd.Supports(SimdLevel.Scalar));
        Assert.Equal(CpuSimd.Max, CpuSimd.Level);
        Assert.Equal(CpuSimd.Max, CpuDevice.Instance.Simd);
        var scalar = CpuDevice.At(SimdLevel.Scalar);
        Assert.Same(scalar, CpuDevice.At(SimdLevel.Scalar));
        Assert.Equal("scalar", scalar.SimdName);
        using (CpuSimd.Enter(scalar))
        {
            Assert.Equal(SimdLevel.Scalar, CpuSimd.Level);
            using (CpuSimd.Enter(CpuDevice.Instance))
            {
                Assert.Equal(CpuSimd.Max, CpuSimd.Level);
            }
            Assert.Equal(SimdLevel.Scalar, CpuSimd.Level);
        }
        Assert.Equal(CpuSimd.Max, CpuSimd.Level);
        // A parallel GEMM inside an op of the scalar device runs the scalar micro-kernel on every thread.
        var a = new float[64 * 64];
        using (CpuSimd.Enter(scalar))
        {
            unsafe
            {
                fixed (float* pa = a)
                {
                    Gemm.LastKernel = null;
                    Gemm.Multiply(64, 64, 64, pa, 64, 1, pa, 64, 1, pa, 64, accumulate: true, parallel: true);
                }
            }
            Assert.Equal("ScalarKernel", Gemm.LastKernel);
        }
        if (CpuSimd.Max < SimdLevel.Avx512)
        {
            Assert.Throws<NotSupportedException>(() => CpuDevice.At(SimdLevel.Avx512));
            Assert.Throws<NotSupportedException>(() => CpuSimd.Enter(SimdLevel.Avx512));
        }
        Assert.Equal(SimdLevel.Vector128, CpuSimd.Parse("128"));
        Assert.Null(CpuSimd.Parse("avx3"));
    }

    [SkippableTheory]
    [MemberData(nameof(Levels))]
    public void EachLevelRunsItsOwnMicroKernel(SimdLevel level)
    {
        Skip.IfNot(CpuSimd.Supports(level), $"this processor has no {level}");
        // The raw GEMM takes no device: the test runs it at the level, as an op of a device at that level would.
        using var _ = CpuSimd.Enter(level);
        string want = level switch
        {
            SimdLevel.Avx512 => "Avx512Kernel",
            SimdLevel.Avx2 => "Avx2Kernel",
            SimdLevel.Vector128 => "Vector128Kernel",
            _ => "ScalarKernel",
        };
        var a = new float[13 * 11];
        var b = new float[11 * 17];
        var c = new float[13 * 17];
        foreach (bool parallel in new[] { false, true })
        {
            Gemm.LastKernel = null;
            fixed (float* pa = a, pb = b, pc = c)
            {
                Gemm.Multiply(13, 17, 11, pa, 11, 1, pb, 17, 1, pc, 17, accumulate: false, parallel);
            }
            Assert.Equal(want, Gemm.LastKernel);
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Levels))]
    public void GroupNormAndSiluMatchTheScalarLevel(SimdLevel level)
    {
        Skip.IfNot(CpuSimd.Supports(level), $"this processor has no {level}");
        // Odd sizes: H·W = 5·11 = 55 leaves tails after 16-, 8- and 4-lane loops.
        foreach (bool silu in new[] { false, true })
        {
            float[][] want, got;
            want = RunGroupNorm(CpuDevice.At(SimdLevel.Scalar), silu);
            got = RunGroupNorm(CpuDevice.At(level), silu);
            for (int o = 0; o < want.Length; o++)
            {
                AssertClose(want[o], got[o], $"{level} silu={silu} output {o}");
            }
        }
    }

    private static float[][] RunGroupNorm(CpuDevice d, bool silu)
    {
        const int n = 3, c = 8, h = 5, w = 11, g = 4;
        var rng = new Random(5);
        float[] R(int count) => Enumerable.Range(0, count).Select(_ => (float)(rng.NextDouble() * 4 - 2)).ToArray();
        using var x = Tensor.FromHost(d, R(n * c * h * w), n, c, h, w);
        using var gamma = Tensor.FromHost(d, R(c), c);
        using var beta = Tensor.FromHost(d, R(c), c);
        using var dy = Tensor.FromHost(d, R(n * c * h * w), n, c, h, w);
        using var mean = Tensor.Empty(d, n, g);
        using var rstd = Tensor.Empty(d, n, g);
        using var y = x.EmptyLike();
        GroupNorm.Forward(x, gamma, beta, g, 1e-5f, y, mean, rstd, silu);
        using var dx = x.ZerosLike();
        using var dg = gamma.ZerosLike();
        using var db = beta.ZerosLike();
        GroupNorm.Backward(dy, x, mean, rstd, gamma, beta, g, dx, dg, db, silu);
        using var s = x.EmptyLike();
        Silu.Forward(x, s);
        using var ds = x.ZerosLike();
        Silu.Backward(dy, x, ds);
        return [y.ToArray(), mean.ToArray(), rstd.ToArray(), dx.ToArray(), dg.ToArray(), db.ToArray(), s.ToArray(), ds.ToArray()];
    }

    private static void AssertClose(float[] want, float[] got, string what)
    {
        Assert.Equal(want.Length, got.Length);
        for (int i = 0; i < want.Length; i++)
        {
            Assert.True(Math.Abs(want[i] - got[i]) <= 1e-5 + 1e-4 * Math.Abs(want[i]), $"{what} [{i}] scalar {want[i]} vector {got[i]}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(VectorLevels))]
    public void FastExpIsWithinTwoUlpAndClampsAtTheEnds(SimdLevel level)
    {
        Skip.IfNot(CpuSimd.Supports(level), $"this processor has no {level}");
        // Each level's own lane count: 4 (Vector128), 8 (Vector256), 16 (Vector512).
        Func<float[], float[]> exp = level switch
        {
            SimdLevel.Avx512 => v => Lanes(FastMath.Exp(Vector512.Create(v))),
            SimdLevel.Avx2 => v => Lanes(FastMath.Exp(Vector256.Create(v))),
            _ => v => Lanes(FastMath.Exp(Vector128.Create(v))),
        };
        Func<float[], float[]> sigmoid = level switch
        {
            SimdLevel.Avx512 => v => Lanes(FastMath.Sigmoid(Vector512.Create(v))),
            SimdLevel.Avx2 => v => Lanes(FastMath.Sigmoid(Vector256.Create(v))),
            _ => v => Lanes(FastMath.Sigmoid(Vector128.Create(v))),
        };
        int lanes = level switch { SimdLevel.Avx512 => 16, SimdLevel.Avx2 => 8, _ => 4 };
        double worst = 0;
        var input = new float[lanes];
        // -87..88: the whole range where exp is a normal float (87.34 = ln FLT_MIN); each lane a different scale.
        for (float x = -87f; x <= 88f; x += 0.0137f)
        {
            for (int i = 0; i < lanes; i++)
            {
                input[i] = i % 2 == 0 ? x / (1 << (i / 2)) : Math.Max(-87f, -x / (1 << (i / 2)));
            }
            float[] e = exp(input);
            for (int i = 0; i < lanes; i++)
            {
                double exact = Math.Exp(input[i]);
                double ulp = MathF.BitIncrement((float)exact) - (float)exact;
                worst = Math.Max(worst, Math.Abs(e[i] - exact) / Math.Max(ulp, double.Epsilon));
            }
        }
        // The 128-bit exp multiplies and adds unfused where the processor has no FMA: up to 3 ulp there.
        Assert.True(worst <= (level == SimdLevel.Vector128 ? 3.0 : 2.0), $"worst error {worst:F2} ulp at {level}");
        float[] special = [-1000f, 1000f, float.NaN, float.NegativeInfinity, float.PositiveInfinity, 0f, 1f, -1f, -88f, 88f, -1e30f, 1e-30f];
        for (int start = 0; start < special.Length; start += lanes)
        {
            var v = new float[lanes];
            Array.Copy(special, start, v, 0, Math.Min(lanes, special.Length - start));
            float[] got = exp(v);
            for (int i = 0; i < lanes && start + i < special.Length; i++)
            {
                float x = special[start + i], y = got[i];
                if (float.IsNaN(x))
                {
                    Assert.True(float.IsNaN(y), "NaN must stay NaN");
                }
                else if (x < -87.34f)
                {
                    // Clamped at ln FLT_MIN: no subnormals, no zero.
                    Assert.InRange(y, 0f, 1.2e-38f);
                }
                else if (x > 88.38f)
                {
                    Assert.True(float.IsFinite(y) && y > 1e38f, $"exp({x}) = {y}");
                }
                else
                {
                    Assert.True(Math.Abs(y - MathF.Exp(x)) <= 2.5e-7 * MathF.Exp(x), $"exp({x}) = {y}, MathF.Exp {MathF.Exp(x)}");
                }
            }
        }
        float[] s = sigmoid(Pad([-100f, 100f, 0f, 2f], lanes));
        Assert.Equal(0f, s[0], 1e-30f);
        Assert.Equal(1f, s[1]);
        Assert.Equal(0.5f, s[2]);
        Assert.Equal(1 / (1 + Math.Exp(-2)), s[3], 1e-7);
    }

    private static float[] Pad(float[] v, int lanes)
    {
        var r = new float[lanes];
        Array.Copy(v, r, Math.Min(v.Length, lanes));
        return r;
    }

    private static float[] Lanes<T>(T v) where T : struct
    {
        return v switch
        {
            Vector512<float> z => Enumerable.Range(0, 16).Select(i => z[i]).ToArray(),
            Vector256<float> y => Enumerable.Range(0, 8).Select(i => y[i]).ToArray(),
            Vector128<float> x => Enumerable.Range(0, 4).Select(i => x[i]).ToArray(),
            _ => throw new ArgumentException(typeof(T).Name),
        };
    }
}
