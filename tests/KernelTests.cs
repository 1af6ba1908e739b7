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

    public static TheoryData<string> GradCases => new(OpCatalog.Differentiable.Select(c => c.Name));

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
