using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>Every ILGPU kernel against its CPU twin, on ILGPU's CPU accelerator: seeded inputs, odd
/// shapes, outputs poisoned with NaN, tolerances stated per case in <see cref="OpCatalog"/>.</summary>
[Collection(IlgpuCollection.Name)]
public sealed class KernelTests(IlgpuFixture fixture, ITestOutputHelper output)
{
    public static TheoryData<string> Cases => new(OpCatalog.All.Select(c => c.Name));

    /// <summary>
    /// The finite-difference check on the simulator, for every differentiable case but the two split-K convolutions: on
    /// ILGPU's CPU accelerator their 96 probing forwards took 49 s and 16 s of the suite. Their ILGPU backward is held to
    /// the CPU backend's by <see cref="IlgpuKernelMatchesCpu"/> (a tighter tolerance than a finite difference's), and the
    /// CPU backend's backward to finite differences by GradCheckTests, so the pair is checked without them.
    /// </summary>
    public static TheoryData<string> GradCases => new(OpCatalog.Differentiable.Where(c => !SplitK.Contains(c.Name)).Select(c => c.Name));

    /// <summary>The cases <see cref="GradCases"/> leaves to the device comparison.</summary>
    public static readonly string[] SplitK = ["conv2d 3x3 split-K, 2 row tiles", "conv2d 3x3 split-K forward and input gradient"];

    [Theory]
    [MemberData(nameof(Cases))]
    public void IlgpuKernelMatchesCpu(string name)
    {
        var result = Checker.CompareDevices(OpCatalog.Get(name), fixture.Device);
        output.WriteLine(result.ToString());
        Assert.True(result.Pass, result.ToString());
    }

    [Theory]
    [MemberData(nameof(GradCases))]
    public void BackwardMatchesFiniteDifferencesOnIlgpu(string name)
    {
        var result = Checker.GradCheck(OpCatalog.Get(name), fixture.Device);
        output.WriteLine(result.ToString());
        Assert.True(result.Pass, result.ToString());
    }

    [Fact]
    public void TheCasesLeftToTheDeviceComparisonAreDifferentiableCatalogCases()
    {
        // A renamed case would otherwise fall back into the slow check silently.
        Assert.All(SplitK, name => Assert.Contains(OpCatalog.Differentiable, c => c.Name == name));
    }

    [Fact]
    public void PoisonedOutputShowsAnUnwrittenElement()
    {
        // A "kernel" that forgets its last element must fail the comparison: NaN poison makes it visible.
        var lazy = new OpCase
        {
            Name = "forgets last element",
            Inputs = [new("x", [3, 5])],
            Forward = (s, x) =>
            {
                var y = s.Output(3, 5);
                if (s.Device.Kind == DeviceKind.Cpu)
                {
                    y.CopyFrom(x[0]);
                }
                else
                {
                    var host = x[0].ToArray();
                    var partial = y.ToArray();
                    Array.Copy(host, partial, host.Length - 1);
                    y.CopyFrom(partial);
                }
                return [y];
            },
        };
        Assert.False(Checker.CompareDevices(lazy, fixture.Device).Pass);
    }
}
