using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime.Cuda;

namespace Ddpm.Kernels;

/// <summary>
/// The PTX of the kernels an <see cref="IlgpuKernels"/> set loaded, compiled for a CUDA architecture with no GPU
/// present: ILGPU's PTX backend needs only a context, so the kernels loaded on its CPU accelerator compile as a GPU
/// would compile them. For the PTX tests, and for <c>ddpm check --ptx</c>, whose files <c>ptxas -v</c> reads on a GPU
/// machine (hardware registers and spills, which only ptxas knows).
/// </summary>
public sealed class KernelPtx : IDisposable
{
    private readonly PTXBackend _backend;

    /// <summary>A PTX backend for <paramref name="architecture"/> at the newest PTX ISA that <paramref name="cuda"/> (a CUDA
    /// driver or toolkit version) accepts, on <paramref name="context"/>.</summary>
    public KernelPtx(Context context, CudaArchitecture architecture, CudaDriverVersion cuda)
    {
        if (!CudaAccelerator.TryGetInstructionSet(architecture, cuda, out _, out var isa))
        {
            throw new ArgumentException($"ILGPU knows no PTX instruction set for {architecture} under CUDA {cuda.Major}.{cuda.Minor}");
        }
        Architecture = architecture;
        InstructionSet = isa;
        _backend = new PTXBackend(context, new CudaCapabilityContext(architecture), architecture, isa, null);
    }

    /// <summary>The architecture compiled for (sm_90: H100 and H200).</summary>
    public CudaArchitecture Architecture { get; }

    /// <summary>The PTX ISA the text declares (its <c>.version</c>).</summary>
    public CudaInstructionSet InstructionSet { get; }

    /// <summary>The kernel's PTX text: one <c>.entry</c>.</summary>
    public string Compile(LoadedKernel kernel)
    {
        var entry = kernel.Grouped
            ? EntryPointDescription.FromExplicitlyGroupedKernel(kernel.Method)
            : EntryPointDescription.FromImplicitlyGroupedKernel(kernel.Method);
        return ((PTXCompiledKernel)_backend.Compile(entry, kernel.Bounds)).PTXAssembly;
    }

    /// <summary>"Type.Method", with the generic arguments after dots ("Elementwise.MapKernel.Silu"): unique among the
    /// loaded kernels, and a file name.</summary>
    public static string Name(LoadedKernel kernel)
    {
        var method = kernel.Method;
        string generic = method.IsGenericMethod ? "." + string.Join(".", method.GetGenericArguments().Select(t => t.Name)) : "";
        return $"{method.DeclaringType?.Name}.{method.Name}{generic}";
    }

    /// <summary>Frees the backend.</summary>
    public void Dispose() => _backend.Dispose();
}
