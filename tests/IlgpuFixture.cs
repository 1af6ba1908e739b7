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
    private (IReadOnlyList<LoadedKernel> Order, Dictionary<LoadedKernel, string> Sm90)? _gpu;

    /// <summary>
    /// The PTX of <paramref name="kernel"/> for sm_90 at the toolkit's PTX ISA (CUDA 11.8), compiled once for every test
    /// that reads it. The kernels a GPU loads are compiled all at once, as <c>ddpm check --sass</c> compiles them (a fresh
    /// simulator's context, its tables' order, sm_80 and then sm_90: <see cref="KernelPtx.CompileInOrder"/>), so the text is
    /// the compiler table's; with DDPM_SASS_PTX=DIR they are also left in DIR, where <c>check --sass --ptx-from DIR</c>
    /// (CI's compiler step) takes them instead of compiling them again. The simulator's own twins compile on this context.
    /// </summary>
    public string Sm90Ptx(LoadedKernel kernel)
    {
        lock (_sm90Ptx)
        {
            _gpu ??= CompileGpuKernels();
            if (_gpu.Value.Sm90.TryGetValue(kernel, out var gpu))
            {
                return gpu;
            }
            _sm90 ??= new KernelPtx(Device.Context, ILGPU.Runtime.Cuda.CudaArchitecture.SM_90, Cli.CheckCommand.ToolkitCuda);
            if (!_sm90Ptx.TryGetValue(kernel, out var ptx))
            {
                _sm90Ptx[kernel] = ptx = _sm90.Compile(kernel);
            }
            return ptx;
        }
    }

    /// <summary>The kernels a GPU loads (<see cref="IlgpuKernels.Listing"/>), in the compiler table's order; their PTX is
    /// <see cref="Sm90Ptx"/>'s.</summary>
    public IReadOnlyList<LoadedKernel> GpuKernels
    {
        get
        {
            lock (_sm90Ptx)
            {
                _gpu ??= CompileGpuKernels();
                return _gpu.Value.Order;
            }
        }
    }

    private static (IReadOnlyList<LoadedKernel> Order, Dictionary<LoadedKernel, string> Sm90) CompileGpuKernels()
    {
        using var simulator = IlgpuDevice.OpenSimulator();
        var order = KernelPtx.TableOrder(IlgpuKernels.Listing(simulator).Compilable);
        var architectures = Cli.CheckCommand.SassArchitectures.Select(a => a.Architecture).ToList();
        var ptx = KernelPtx.CompileInOrder(simulator.Context, order, architectures, Cli.CheckCommand.ToolkitCuda);
        if (Environment.GetEnvironmentVariable("DDPM_SASS_PTX") is { Length: > 0 } folder)
        {
            KernelPtx.Save(folder, KernelPtx.Stamp(order, architectures, Cli.CheckCommand.ToolkitCuda), order, architectures, ptx);
        }
        int sm90 = architectures.FindIndex(a => a == ILGPU.Runtime.Cuda.CudaArchitecture.SM_90);
        return (order, order.Select((k, i) => (k, i)).ToDictionary(p => p.k, p => ptx[sm90][p.i]));
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
