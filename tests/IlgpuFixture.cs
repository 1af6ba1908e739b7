using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>One ILGPU CPU-accelerator device for every test that runs kernels: its kernels compile
/// once. The collection keeps those tests serial (the simulator runs each GPU thread as an OS thread).</summary>
public sealed class IlgpuFixture : IDisposable
{
    public IlgpuFixture()
    {
        Device = IlgpuDevice.TryOpen(DeviceKind.IlgpuCpu) ?? throw new InvalidOperationException("ILGPU CPU accelerator missing");
        Kernels = IlgpuKernels.For(Device);
    }

    public IlgpuDevice Device { get; }

    public IlgpuKernels Kernels { get; }

    public void Dispose() => Device.Dispose();
}

[CollectionDefinition(Name)]
public sealed class IlgpuCollection : ICollectionFixture<IlgpuFixture>
{
    public const string Name = "ilgpu";
}
