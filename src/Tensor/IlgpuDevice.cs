using System.Reflection;
using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;

namespace Ddpm.Tensors;

/// <summary>
/// An ILGPU accelerator (CUDA, OpenCL or ILGPU's CPU simulator) with its own context. Tensors are
/// pooled device buffers; every op is queued on the accelerator's default stream, and host copies
/// synchronise.
/// </summary>
public sealed class IlgpuDevice : Device
{
    private readonly Context _context;

    private IlgpuDevice(Context context, Accelerator accelerator, DeviceKind kind)
    {
        _context = context;
        Accelerator = accelerator;
        Kind = kind;
    }

    /// <summary>The ILGPU accelerator that runs this device's kernels.</summary>
    public Accelerator Accelerator { get; }

    /// <summary>The ILGPU context the accelerator belongs to.</summary>
    public Context Context => _context;

    /// <inheritdoc/>
    public override DeviceKind Kind { get; }

    /// <inheritdoc/>
    public override string Name => $"{DeviceCatalog.KindName(Kind)}: {Accelerator.Name}";

    /// <summary>Creates the ILGPU context every device shares the settings of: all backends, XMath
    /// through ILGPU.Algorithms (without it XMath fails to compile for CUDA, while the CPU
    /// simulator still runs it).</summary>
    public static Context CreateContext()
    {
        NativeResolver.Install();
        return Context.Create(b => b
            .Cuda()
            .OpenCL()
            .CPU(CPUDeviceKind.Default)
            .EnableAlgorithms());
    }

    /// <summary>
    /// ILGPU's CPU simulator shaped like a GPU: <paramref name="warpSize"/> threads a warp,
    /// <paramref name="warpsPerGroup"/> warps a group (CUDA's 32 x 32 = 1,024 threads), on
    /// <paramref name="multiprocessors"/> simulated multiprocessors. Explicitly grouped kernels are
    /// tested on it, at a GPU's warp size and at a small one; every simulated thread is an OS thread,
    /// so keep the shapes tiny.
    /// </summary>
    public static IlgpuDevice OpenSimulator(int warpSize = 32, int warpsPerGroup = 32, int multiprocessors = 1)
    {
        NativeResolver.Install();
        var cpu = new CPUDevice(warpSize, warpsPerGroup, multiprocessors);
        var context = Context.Create(b => b.CPU(cpu).EnableAlgorithms());
        try
        {
            return new IlgpuDevice(context, context.GetCPUDevice(0).CreateAccelerator(context), DeviceKind.IlgpuCpu);
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>Opens the first device of <paramref name="kind"/>, or returns null when there is none.</summary>
    public static IlgpuDevice? TryOpen(DeviceKind kind)
    {
        var context = CreateContext();
        try
        {
            ILGPU.Runtime.Device? found = null;
            foreach (var d in context)
            {
                bool match = kind switch
                {
                    DeviceKind.Cuda => d is CudaDevice,
                    DeviceKind.OpenCL => d is CLDevice cl && cl.DeviceType == CLDeviceType.CL_DEVICE_TYPE_GPU,
                    DeviceKind.IlgpuCpu => d is CPUDevice,
                    _ => false,
                };
                // Several GPUs: the one with the most memory.
                if (match && (found is null || d.MemorySize > found.MemorySize))
                {
                    found = d;
                }
            }
            if (found is null)
            {
                context.Dispose();
                return null;
            }
            return new IlgpuDevice(context, found.CreateAccelerator(context), kind);
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <inheritdoc/>
    public override void Synchronize() => Accelerator.Synchronize();

    /// <summary>The storage of a tensor on this device as a view kernels take.</summary>
    public static ArrayView<float> ViewOf(object storage) => ((MemoryBuffer1D<float, Stride1D.Dense>)storage).View;

    /// <inheritdoc/>
    protected override object AllocateStorage(int length)
    {
        try
        {
            return Accelerator.Allocate1D<float>(Math.Max(length, 1));
        }
        catch (Exception e) when (e is OutOfMemoryException or AcceleratorException)
        {
            throw new OutOfDeviceMemoryException(
                $"{Name} is out of memory allocating {4L * length / (1 << 20)} MiB ({Stats.LiveBytes / (1 << 20)} MiB live)", e);
        }
    }

    /// <inheritdoc/>
    protected override void FreeStorage(object storage) => ((IDisposable)storage).Dispose();

    internal override void Upload(object storage, ReadOnlySpan<float> source)
    {
        var buffer = (MemoryBuffer1D<float, Stride1D.Dense>)storage;
        buffer.View.SubView(0, source.Length).CopyFromCPU(Accelerator.DefaultStream, source);
    }

    internal override void Download(object storage, Span<float> destination)
    {
        var buffer = (MemoryBuffer1D<float, Stride1D.Dense>)storage;
        Accelerator.Synchronize();
        buffer.View.SubView(0, destination.Length).CopyToCPU(Accelerator.DefaultStream, destination);
        Accelerator.Synchronize();
    }

    internal override void Zero(object storage, int length) =>
        ((MemoryBuffer1D<float, Stride1D.Dense>)storage).View.SubView(0, length).MemSetToZero(Accelerator.DefaultStream);

    internal override void Copy(object source, object destination, int length) =>
        ((MemoryBuffer1D<float, Stride1D.Dense>)source).View.SubView(0, length)
            .CopyTo(Accelerator.DefaultStream, ((MemoryBuffer1D<float, Stride1D.Dense>)destination).View.SubView(0, length));

    /// <inheritdoc/>
    protected override void DisposeBackend()
    {
        Accelerator.Dispose();
        _context.Dispose();
    }

    /// <summary>
    /// ILGPU asks for the CUDA driver as "cuda" (libcuda.so) and OpenCL as "OpenCL"
    /// (libOpenCL.so). Many machines ship only the versioned names; without this resolver CUDA
    /// silently disappears from the device list.
    /// </summary>
    private static class NativeResolver
    {
        private static int _installed;

        public static void Install()
        {
            if (Interlocked.Exchange(ref _installed, 1) != 0)
            {
                return;
            }
            try
            {
                NativeLibrary.SetDllImportResolver(typeof(Context).Assembly, Resolve);
            }
            catch (InvalidOperationException)
            {
                // A resolver is already set for ILGPU's assembly (by the host); keep it.
            }
        }

        private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
        {
            string[] candidates = name switch
            {
                "cuda" or "nvcuda" => ["libcuda.so", "libcuda.so.1", "nvcuda.dll"],
                "OpenCL" => ["libOpenCL.so", "libOpenCL.so.1", "OpenCL.dll"],
                _ => [],
            };
            foreach (var candidate in candidates)
            {
                if (NativeLibrary.TryLoad(candidate, assembly, path, out var handle))
                {
                    return handle;
                }
            }
            return IntPtr.Zero;
        }
    }
}

/// <summary>A device ran out of memory; the message says how much was asked and how much is live.</summary>
public sealed class OutOfDeviceMemoryException(string message, Exception inner) : Exception(message, inner);
