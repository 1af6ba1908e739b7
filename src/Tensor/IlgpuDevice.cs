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

    /// <summary>The device's kernel mode: true runs every op's simple twin (one thread per output) instead of the tiled
    /// kernels, for a suspected kernel bug (<c>--gpu-kernels simple</c>). Read when the device's kernels load, at its
    /// first op; set it right after opening.</summary>
    public bool SimpleKernels { get; set; }

    /// <summary>How the convolutions and linear layers compute (<c>--math</c>): fp32, TF32 or 3xTF32 on tensor cores. Read
    /// when the device's kernels load, at its first op; set it right after opening. A device opened by the library starts
    /// at fp32 (results a library user can compare bit for bit); the command line sets <see cref="MathPrecisions.Default"/>
    /// unless told otherwise.</summary>
    public MathPrecision Precision { get; set; } = MathPrecision.Fp32;

    /// <summary>The group the tensor-core kernels run in (TiledGemm.Threads: four warps of 32).</summary>
    public const int TensorCoreGroup = 128;

    /// <summary>True when this accelerator runs the tensor-core kernels: CUDA on sm_80 or later (mma.sync), or ILGPU's CPU simulator shaped
    /// like a GPU (warps of 32, groups of at least 128), which runs their managed emulation. OpenCL and small-warp
    /// simulators compute fp32 whatever <see cref="Precision"/> says.</summary>
    public bool TensorCores => Accelerator switch
    {
        // mma.sync with TF32 operands needs sm_80 (A100) or later: a T4 (sm_75) or V100 (sm_70) has none.
        CudaAccelerator cuda => cuda.Architecture >= CudaArchitecture.SM_80 && cuda.WarpSize == 32 && cuda.MaxNumThreadsPerGroup >= TensorCoreGroup,
        _ => Accelerator.AcceleratorType == AcceleratorType.CPU && Accelerator.WarpSize == 32 && Accelerator.MaxNumThreadsPerGroup >= TensorCoreGroup,
    };

    /// <summary>The mode the products run in: <see cref="Precision"/> where the device has the tensor-core path and runs the
    /// fast kernels, else fp32.</summary>
    public MathPrecision EffectivePrecision => TensorCores && !SimpleKernels ? Precision : MathPrecision.Fp32;

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
        return Context.Create(b => NativeResolver.AddCuda(b)
            .OpenCL()
            .CPU(CPUDeviceKind.Default)
            .Optimize(OptimizationLevel.O2)
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
        var context = Context.Create(b => b.CPU(cpu).Optimize(OptimizationLevel.O2).EnableAlgorithms());
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

    /// <summary>Which of several matching GPUs <see cref="TryOpen"/> takes: the n-th (modulo their count), as each MPI rank on a
    /// machine takes the one of its local rank; null: the one with the most memory.</summary>
    public static int? Ordinal { get; set; }

    /// <summary>How many devices of this one's kind the machine shows (MPI ranks beyond that many share one).</summary>
    public int Siblings { get; private init; } = 1;

    /// <summary>Opens a device of <paramref name="kind"/> (see <see cref="Ordinal"/>), or returns null when there is none.</summary>
    public static IlgpuDevice? TryOpen(DeviceKind kind)
    {
        var context = CreateContext();
        try
        {
            ILGPU.Runtime.Device? found = null;
            var matches = new List<ILGPU.Runtime.Device>();
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
                if (match)
                {
                    matches.Add(d);
                }
            }
            if (Ordinal is int ordinal && matches.Count > 0)
            {
                found = matches[ordinal % matches.Count];
            }
            if (found is null)
            {
                context.Dispose();
                return null;
            }
            return new IlgpuDevice(context, found.CreateAccelerator(context), kind) { Siblings = Math.Max(1, matches.Count) };
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>What this device has queued and waited for since it opened: kernel launches (counted by the kernel
    /// loaders), memsets, device copies, asynchronous uploads and host synchronisations. <c>bench --profile</c> prints them per step.</summary>
    public DeviceCounters Counters { get; } = new();

    /// <inheritdoc/>
    public override void Synchronize()
    {
        Counters.Count(ref Counters.SynchronizationsField);
        Accelerator.Synchronize();
    }

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

    // A plain upload from pageable memory: ILGPU's CopyFromCPU synchronises the stream.
    internal override void Upload(object storage, int offset, ReadOnlySpan<float> source)
    {
        Counters.Count(ref Counters.SynchronizationsField);
        ViewOf(storage).SubView(offset, source.Length).CopyFromCPU(Accelerator.DefaultStream, source);
    }

    // From page-locked memory: queued on the stream, no synchronisation (ILGPU's CPU simulator has no page locking
    // and copies at once, which is the same thing on a device that runs every launch synchronously).
    internal override void UploadAsync(object storage, int offset, HostBuffer source)
    {
        Counters.Count(ref Counters.AsyncUploadsField);
        ViewOf(storage).SubView(offset, source.Length).CopyFromPageLockedAsync(Accelerator.DefaultStream, (PageLockedArray1D<float>)source.Owner!);
    }

    internal override void Download(object storage, int offset, Span<float> destination)
    {
        Counters.Count(ref Counters.SynchronizationsField);
        Accelerator.Synchronize();
        ViewOf(storage).SubView(offset, destination.Length).CopyToCPU(Accelerator.DefaultStream, destination);
        Accelerator.Synchronize();
    }

    internal override void Zero(object storage, int offset, int length)
    {
        Counters.Count(ref Counters.MemsetsField);
        ViewOf(storage).SubView(offset, length).MemSetToZero(Accelerator.DefaultStream);
    }

    internal override void Copy(object source, int sourceOffset, object destination, int destinationOffset, int length)
    {
        Counters.Count(ref Counters.CopiesField);
        ViewOf(source).SubView(sourceOffset, length).CopyTo(Accelerator.DefaultStream, ViewOf(destination).SubView(destinationOffset, length));
    }

    /// <inheritdoc/>
    public override HostBuffer AllocateHost(int length)
    {
        var locked = Accelerator.AllocatePageLocked1D<float>(length, uninitialized: false);
        return new HostBuffer(this, locked.GetArray(), locked);
    }

    /// <inheritdoc/>
    protected override void DisposeBackend()
    {
        Accelerator.Dispose();
        _context.Dispose();
    }

    /// <summary>
    /// How ILGPU finds the native drivers, and CUDA's devices added to a context without ILGPU's own
    /// <c>Cuda()</c> builder step. ILGPU asks for the CUDA driver as "cuda" (libcuda.so) and OpenCL as
    /// "OpenCL" (libOpenCL.so), and two things go wrong with that on real machines:
    ///  - a CUDA toolkit puts a stub libcuda.so (cuInit fails with CUDA_ERROR_STUB_LIBRARY) on the
    ///    library path, or a box ships only the versioned libcuda.so.1: so WSL2's driver folder (where
    ///    it exists) and then the versioned name, which only the driver installs, are tried before the
    ///    bare name;
    ///  - under WSL2 ILGPU's <c>Cuda()</c> sets its own resolver on its assembly every time it runs
    ///    (ILGPU 1.5.3, CudaContextExtensions.CudaInternal), and .NET allows one per assembly: the
    ///    second context, or ours set first, throws InvalidOperationException. So <see cref="AddCuda"/>
    ///    registers CUDA devices itself (CudaDevice.GetDevices, with the predicate ILGPU's Cuda()
    ///    uses) and ILGPU never sets a resolver: ours is the only one, WSL2 included.
    /// If the host already set a resolver on ILGPU's assembly, ours joins as the load context's
    /// ResolvingUnmanagedDll handler, which .NET runs after that resolver and the default probing fail.
    /// </summary>
    public static class NativeResolver
    {
        /// <summary>Where WSL2 puts the Windows driver's libcuda (ILGPU looks there too).</summary>
        public const string WslLibraryFolder = "/usr/lib/wsl/lib";

        private static int _installed;

        /// <summary>The CUDA devices the driver shows that ILGPU cannot compile for (architecture or
        /// PTX version unknown to ILGPU 1.5.3), as "name (sm_XY, driver A.B)": said when no device is usable.</summary>
        public static IReadOnlyList<string> RejectedCudaDevices { get; private set; } = [];

        /// <summary>True when the host set its own resolver on ILGPU's assembly before ours.</summary>
        public static bool HostResolverFirst { get; private set; }

        /// <summary>The CUDA driver's file names, in the order tried: WSL2's copy where it exists, the
        /// driver's versioned name (a toolkit's stub is libcuda.so), then the bare name.</summary>
        public static IReadOnlyList<string> CudaCandidates
        {
            get
            {
                if (OperatingSystem.IsWindows())
                {
                    return ["nvcuda.dll"];
                }
                var names = new List<string>();
                if (Directory.Exists(WslLibraryFolder))
                {
                    // Only WSL2 has this folder, and there the Windows driver's copy is the one that works
                    // (a Linux driver package installed inside WSL2 by mistake would shadow it).
                    names.Add(Path.Combine(WslLibraryFolder, "libcuda.so.1"));
                    names.Add(Path.Combine(WslLibraryFolder, "libcuda.so"));
                }
                names.Add("libcuda.so.1");
                names.Add("libcuda.so");
                return names;
            }
        }

        /// <summary>The OpenCL loader's names, the versioned one (the ICD loader's) first.</summary>
        public static IReadOnlyList<string> OpenCLCandidates =>
            OperatingSystem.IsWindows() ? ["OpenCL.dll"] : ["libOpenCL.so.1", "libOpenCL.so"];

        /// <summary>Sets the resolver on ILGPU's assembly once per process, before any context exists.</summary>
        public static void Install()
        {
            if (Interlocked.Exchange(ref _installed, 1) != 0)
            {
                return;
            }
            var ilgpu = typeof(Context).Assembly;
            try
            {
                NativeLibrary.SetDllImportResolver(ilgpu, Resolve);
            }
            catch (InvalidOperationException)
            {
                HostResolverFirst = true;
                System.Runtime.Loader.AssemblyLoadContext.GetLoadContext(ilgpu)!.ResolvingUnmanagedDll +=
                    (assembly, name) => assembly == ilgpu ? Resolve(name, assembly, null) : IntPtr.Zero;
            }
        }

        /// <summary>
        /// Adds every CUDA device ILGPU can compile for to <paramref name="builder"/>, as ILGPU's
        /// <c>Cuda()</c> does but without its WSL2 resolver (see the class summary). The builder's
        /// device registry is internal in ILGPU 1.5.3, hence the reflection; if a later ILGPU renames
        /// it, <c>Cuda()</c> itself runs (a test pins the property).
        /// </summary>
        public static Context.Builder AddCuda(Context.Builder builder)
        {
            Install();
            if (RegistryOf(builder) is not { } registry)
            {
                return builder.Cuda();
            }
            var rejected = new List<string>();
            foreach (var d in CudaDevice.GetDevices(_ => true))
            {
                var cuda = (CudaDevice)d;
                if (Compilable(cuda))
                {
                    registry.Register(cuda);
                }
                else
                {
                    rejected.Add($"{cuda.Name} ({cuda.Architecture?.ToString() ?? "unknown architecture"}, driver {cuda.DriverVersion})");
                }
            }
            RejectedCudaDevices = rejected;
            return builder;
        }

        /// <summary>ILGPU's own filter in Cuda(): an architecture and a PTX version it knows.</summary>
        private static bool Compilable(CudaDevice d) =>
            d.Architecture.HasValue && d.InstructionSet.HasValue &&
            ILGPU.Backends.PTX.PTXCodeGenerator.SupportedInstructionSets.Contains(d.InstructionSet.Value);

        /// <summary>The builder's internal device registry, or null where ILGPU no longer has it.</summary>
        public static DeviceRegistry? RegistryOf(Context.Builder builder) =>
            typeof(Context.Builder).GetProperty("DeviceRegistry", BindingFlags.Instance | BindingFlags.NonPublic)?.GetValue(builder) as DeviceRegistry;

        private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
        {
            var candidates = name switch
            {
                "cuda" or "nvcuda" => CudaCandidates,
                "OpenCL" => OpenCLCandidates,
                _ => [],
            };
            foreach (var candidate in candidates)
            {
                // A full path (WSL2's) loads only from there; a bare name searches as dlopen does.
                if (Path.IsPathRooted(candidate)
                    ? NativeLibrary.TryLoad(candidate, out var handle)
                    : NativeLibrary.TryLoad(candidate, assembly, path, out handle))
                {
                    return handle;
                }
            }
            return IntPtr.Zero;
        }
    }
}

/// <summary>Counts of what an ILGPU device queued and waited for (see <see cref="IlgpuDevice.Counters"/>); thread-safe.</summary>
public sealed class DeviceCounters
{
    internal long LaunchesField, MemsetsField, CopiesField, AsyncUploadsField, SynchronizationsField;

    /// <summary>Adds one kernel launch (the kernel loaders call it for every launch).</summary>
    public void CountLaunch() => Interlocked.Increment(ref LaunchesField);

    internal void Count(ref long field) => Interlocked.Increment(ref field);

    /// <summary>The counts now.</summary>
    public CounterSnapshot Snapshot() => new(Interlocked.Read(ref LaunchesField), Interlocked.Read(ref MemsetsField),
        Interlocked.Read(ref CopiesField), Interlocked.Read(ref AsyncUploadsField), Interlocked.Read(ref SynchronizationsField));
}

/// <summary>Kernel launches, memsets, device-to-device copies, asynchronous uploads and host synchronisations (a wait
/// for the device: a synchronise, a read-back, a plain upload), counted since the device opened; subtract two for an interval.</summary>
public readonly record struct CounterSnapshot(long Launches, long Memsets, long Copies, long AsyncUploads, long Synchronizations)
{
    /// <summary>The counts between <paramref name="b"/> and <paramref name="a"/>.</summary>
    public static CounterSnapshot operator -(CounterSnapshot a, CounterSnapshot b) =>
        new(a.Launches - b.Launches, a.Memsets - b.Memsets, a.Copies - b.Copies, a.AsyncUploads - b.AsyncUploads, a.Synchronizations - b.Synchronizations);

    /// <summary>The sums of two intervals' counts.</summary>
    public static CounterSnapshot operator +(CounterSnapshot a, CounterSnapshot b) =>
        new(a.Launches + b.Launches, a.Memsets + b.Memsets, a.Copies + b.Copies, a.AsyncUploads + b.AsyncUploads, a.Synchronizations + b.Synchronizations);
}

/// <summary>A device ran out of memory; the message says how much was asked and how much is live.</summary>
public sealed class OutOfDeviceMemoryException(string message, Exception inner) : Exception(message, inner);
