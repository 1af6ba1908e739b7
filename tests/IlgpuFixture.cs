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

    private KernelPtx? _sm90;
    private readonly Dictionary<LoadedKernel, string> _sm90Ptx = [];

    /// <summary>The PTX of <paramref name="kernel"/> for sm_90 (driver 13.0), compiled once for every test that reads it.</summary>
    public string Sm90Ptx(LoadedKernel kernel)
    {
        lock (_sm90Ptx)
        {
            _sm90 ??= new KernelPtx(Device.Context, ILGPU.Runtime.Cuda.CudaArchitecture.SM_90, ILGPU.Runtime.Cuda.CudaDriverVersion.FromMajorMinor(13, 0));
            if (!_sm90Ptx.TryGetValue(kernel, out var ptx))
            {
                _sm90Ptx[kernel] = ptx = _sm90.Compile(kernel);
            }
            return ptx;
        }
    }

    public void Dispose()
    {
        _sm90?.Dispose();
        Device.Dispose();
    }
}

[CollectionDefinition(Name)]
public sealed class IlgpuCollection : ICollectionFixture<IlgpuFixture>
{
    public const string Name = "ilgpu";
}

/// <summary>
/// Two ILGPU simulators shaped like GPUs, for the explicitly grouped (tiled) kernels: a CUDA-like
/// device (warp 32, groups up to 1,024 threads) and a small-warp one (warp 4, groups up to 64), where
/// a barrier or shuffle that assumes 32 lanes goes wrong. Tests on them use tiny shapes and timeouts:
/// a divergent barrier deadlocks the simulator.
/// </summary>
public sealed class GpuLikeFixture : IDisposable
{
    public GpuLikeFixture()
    {
        Warp32 = IlgpuDevice.OpenSimulator(warpSize: 32, warpsPerGroup: 32);
        Warp4 = IlgpuDevice.OpenSimulator(warpSize: 4, warpsPerGroup: 16);
    }

    /// <summary>Warp 32, groups of up to 1,024 threads, as CUDA.</summary>
    public IlgpuDevice Warp32 { get; }

    /// <summary>Warp 4, groups of up to 64 threads.</summary>
    public IlgpuDevice Warp4 { get; }

    /// <summary>Both devices, for theories.</summary>
    public IlgpuDevice this[int warp] => warp == 32 ? Warp32 : Warp4;

    public void Dispose()
    {
        Warp32.Dispose();
        Warp4.Dispose();
    }
}

[CollectionDefinition(Name)]
public sealed class GpuLikeCollection : ICollectionFixture<GpuLikeFixture>
{
    public const string Name = "gpu-like";
}
