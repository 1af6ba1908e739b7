using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>Fused kernels against the composites they replace, forward and backward, on both backends.</summary>
[Collection(IlgpuCollection.Name)]
public sealed class FusionTests(IlgpuFixture fixture)
{
    [Theory]
    [InlineData("cpu")]
    [InlineData("ilgpu-cpu")]
    public void GroupNormSiluEqualsGroupNormThenSilu(string deviceName)
    {
        Device d = deviceName == "cpu" ? CpuDevice.Instance : fixture.Device;
        const int n = 3, c = 8, h = 5, w = 11, g = 4;
        var rng = new Random(5);
        float[] R(int count) => Enumerable.Range(0, count).Select(_ => (float)(rng.NextDouble() * 4 - 2)).ToArray();
        using var x = Tensor.FromHost(d, R(n * c * h * w), n, c, h, w);
        using var gamma = Tensor.FromHost(d, R(c), c);
        using var beta = Tensor.FromHost(d, R(c), c);
        using var dy = Tensor.FromHost(d, R(n * c * h * w), n, c, h, w);
        using var mean = Tensor.Empty(d, n, g);
        using var rstd = Tensor.Empty(d, n, g);

        // Composite: u = groupnorm(x); y = silu(u); backward through silu, then group norm.
        using var u = x.EmptyLike();
        using var yComposite = x.EmptyLike();
        GroupNorm.Forward(x, gamma, beta, g, 1e-5f, u, mean, rstd);
        Silu.Forward(u, yComposite);
        using var du = x.ZerosLike();
        Silu.Backward(dy, u, du);
        using var dxComposite = x.ZerosLike();
        using var dgComposite = gamma.ZerosLike();
        using var dbComposite = beta.ZerosLike();
        GroupNorm.Backward(du, x, mean, rstd, gamma, beta, g, dxComposite, dgComposite, dbComposite);

        using var yFused = x.EmptyLike();
        GroupNorm.Forward(x, gamma, beta, g, 1e-5f, yFused, mean, rstd, silu: true);
        using var dxFused = x.ZerosLike();
        using var dgFused = gamma.ZerosLike();
        using var dbFused = beta.ZerosLike();
        GroupNorm.Backward(dy, x, mean, rstd, gamma, beta, g, dxFused, dgFused, dbFused, silu: true);

        // The same arithmetic in another order: agreement to float rounding (sums of ≤ 110 terms).
        AssertClose(yComposite.ToArray(), yFused.ToArray());
        AssertClose(dxComposite.ToArray(), dxFused.ToArray());
        AssertClose(dgComposite.ToArray(), dgFused.ToArray());
        AssertClose(dbComposite.ToArray(), dbFused.ToArray());
    }

    private static void AssertClose(float[] want, float[] got)
    {
        Assert.Equal(want.Length, got.Length);
        for (int i = 0; i < want.Length; i++)
        {
            Assert.True(Math.Abs(want[i] - got[i]) <= 1e-5 + 1e-4 * Math.Abs(want[i]), $"[{i}] composite {want[i]} fused {got[i]}");
        }
    }
}
