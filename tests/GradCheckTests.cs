using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>Every op's backward against central finite differences of its forward, on the managed
/// CPU backend (the ILGPU side is in <see cref="KernelTests"/>), and proof that the check bites.</summary>
public sealed class GradCheckTests(ITestOutputHelper output)
{
    public static TheoryData<string> GradCases => new(OpCatalog.Differentiable.Select(c => c.Name));

    /// <summary>The ops whose gradient differs between neighbouring elements: all but sum and mean (there every
    /// element's gradient is the same, so a shift is harmless and nothing could fail).</summary>
    public static TheoryData<string> ShiftCases => new(OpCatalog.Differentiable.Select(c => c.Name).Where(n => n is not ("sum" or "mean")));

    [Theory]
    [MemberData(nameof(GradCases))]
    public void BackwardMatchesFiniteDifferencesOnCpu(string name)
    {
        var result = Checker.GradCheck(OpCatalog.Get(name), CpuDevice.Instance);
        output.WriteLine(result.ToString());
        Assert.True(result.Pass, result.ToString());
    }

    /// <summary>A dropped term: every analytic gradient scaled by 0.8 (as when one of several
    /// additive terms goes missing) must fail the check, for every op.</summary>
    [Theory]
    [MemberData(nameof(GradCases))]
    public void ScaledGradientIsCaught(string name)
    {
        var result = Checker.GradCheck(OpCatalog.Get(name), CpuDevice.Instance, breakBackward: (_, g) =>
        {
            for (int i = 0; i < g.Length; i++)
            {
                g[i] *= 0.8f;
            }
        });
        Assert.False(result.Pass, $"a gradient scaled by 0.8 passed for {name}");
    }

    /// <summary>A swapped index: each gradient shifted by one place must fail, for every op whose neighbouring
    /// gradients differ (<see cref="ShiftCases"/>).</summary>
    [Theory]
    [MemberData(nameof(ShiftCases))]
    public void ShiftedGradientIsCaught(string name)
    {
        var result = Checker.GradCheck(OpCatalog.Get(name), CpuDevice.Instance, breakBackward: (_, g) =>
        {
            if (g.Length > 1)
            {
                float first = g[0];
                Array.Copy(g, 1, g, 0, g.Length - 1);
                g[^1] = first;
            }
        });
        Assert.False(result.Pass, $"a gradient shifted by one index passed for {name}");
    }

    /// <summary>A hand-broken SiLU backward that forgets the x·σ'(x) term (uses σ(x) alone) fails.</summary>
    [Fact]
    public void SiluWithoutTheProductRuleTermFails()
    {
        var broken = new OpCase
        {
            Name = "silu, broken backward",
            Inputs = [new("x", [3, 5, 7])],
            Forward = (s, x) =>
            {
                var y = s.Output(x[0].Shape);
                Silu.Forward(x[0], y);
                return [y];
            },
            Backward = (s, x, y, dy, dx) => Elementwise.MapBackward<SigmoidOnly>(dy, x[0], dx[0]!),
        };
        Assert.False(Checker.GradCheck(broken, CpuDevice.Instance).Pass);
    }

    /// <summary>A hand-broken group-norm backward that drops the mean-of-gradient term fails.</summary>
    [Fact]
    public void GroupNormWithoutTheMeanTermFails()
    {
        var good = OpCatalog.Get("groupnorm C6 G3");
        var broken = new OpCase
        {
            Name = "groupnorm, broken backward",
            Inputs = good.Inputs,
            Forward = good.Forward,
            Backward = (s, x, y, dy, d) =>
            {
                // Adds rstd·(dy·gamma - xhat·mean(g·xhat)): the -mean(g) term is missing.
                good.Backward!(s, x, y, dy, d);
                var meanG = s.Zeros(x[0].Shape);
                var gamma = x[1].ToArray();
                var dyh = dy.ToArray();
                var rstd = y[2].ToArray();
                int n = 3, c = 6, hw = 63, groups = 3, size = c / groups * hw;
                var fix = new float[n * c * hw];
                for (int ng = 0; ng < n * groups; ng++)
                {
                    double sum = 0;
                    for (int j = 0; j < size; j++)
                    {
                        sum += dyh[ng * size + j] * gamma[ng % groups * (c / groups) + j / hw];
                    }
                    for (int j = 0; j < size; j++)
                    {
                        fix[ng * size + j] = (float)(sum / size) * rstd[ng];
                    }
                }
                meanG.CopyFrom(fix);
                Elementwise.Accumulate(d[0]!, meanG, 1f);
            },
        };
        Assert.False(Checker.GradCheck(broken, CpuDevice.Instance).Pass);
    }

    private struct SigmoidOnly : IUnaryOp
    {
        public static float Apply(float x) => Silu.Apply(x);

        public static float Derivative(float x) => 1f / (1f + MathF.Exp(-x));
    }
}
