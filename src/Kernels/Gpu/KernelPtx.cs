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

    /// <summary>The build of the code kernels run: the module version ids of Ddpm.Kernels and Ddpm.Tensor (whose Philox
    /// the random kernels call). Any rebuild with a change gives new ids; deterministic builds keep them when nothing
    /// changed.</summary>
    public static string Build { get; } =
        $"{typeof(IlgpuKernels).Assembly.ManifestModule.ModuleVersionId:N}".Substring(0, 12) + "-" +
        $"{typeof(Tensors.Tensor).Assembly.ManifestModule.ModuleVersionId:N}".Substring(0, 12);

    /// <summary>The order of <c>ddpm check --sass</c>'s tables, which is also the order it compiles in: the explicitly
    /// grouped (tiled) kernels first, each part by name.</summary>
    public static IReadOnlyList<LoadedKernel> TableOrder(IEnumerable<LoadedKernel> kernels) =>
        [.. kernels.OrderBy(k => k.Grouped ? 0 : 1).ThenBy(Name, StringComparer.Ordinal)];

    /// <summary>
    /// The PTX of <paramref name="order"/> for each of <paramref name="architectures"/> in turn, compiled one kernel after
    /// another on <paramref name="context"/>. ILGPU's PTX of a kernel depends on what its context compiled before (docs/gpu.md),
    /// so the same text comes only from the same steps: a fresh simulator's context and this order, as <c>ddpm check
    /// --sass</c> and the PTX tests both do. ILGPU 1.5.3 writes <c>.target sm_80</c> at most, so a later architecture's
    /// text is the earlier one's: when the first kernel and the first tensor-core kernel (its inline PTX) compile to the
    /// same text for it, the others are not compiled again. <paramref name="each"/> gets every (architecture, kernel, PTX)
    /// as it is ready; <paramref name="stop"/> ends the compiles early (the arrays then hold nulls).
    /// </summary>
    public static string[][] CompileInOrder(Context context, IReadOnlyList<LoadedKernel> order, IReadOnlyList<CudaArchitecture> architectures,
        CudaDriverVersion cuda, Action<int, int, string>? each = null, Func<bool>? stop = null)
    {
        var ptx = new string[architectures.Count][];
        for (int a = 0; a < architectures.Count && stop?.Invoke() != true; a++)
        {
            using var compiler = new KernelPtx(context, architectures[a], cuda);
            var previous = a > 0 ? ptx[a - 1] : null;
            bool same = previous is not null && Enumerable.Range(0, order.Count).Where(i => i == 0 || order[i].Method.Name == nameof(TiledGemm.TensorKernel)).Take(2)
                .All(i => compiler.Compile(order[i]) == previous[i]);
            ptx[a] = same ? previous! : new string[order.Count];
            for (int i = 0; i < order.Count && stop?.Invoke() != true; i++)
            {
                if (!same)
                {
                    ptx[a][i] = compiler.Compile(order[i]);
                }
                each?.Invoke(a, i, ptx[a][i]);
            }
        }
        return ptx;
    }

    /// <summary>What a folder of PTX (<see cref="Save"/>) must have been compiled from to be taken for this build's:
    /// the <see cref="Build"/>, ILGPU's version, the CUDA version, the architectures and the kernels in order.</summary>
    public static string Stamp(IReadOnlyList<LoadedKernel> order, IReadOnlyList<CudaArchitecture> architectures, CudaDriverVersion cuda) =>
        string.Join("\n", [
            "ddpm PTX folder 1",
            $"build {Build}",
            $"ilgpu {typeof(Context).Assembly.GetName().Version}",
            $"cuda {cuda.Major}.{cuda.Minor}",
            $"architectures {string.Join(" ", architectures.Select(a => $"sm_{a.Major}{a.Minor}"))}",
            .. order.Select(k => $"{(k.Grouped ? "tiled" : "implicit")} {Name(k)} bounds {k.Bounds.MaxNumThreadsPerGroup?.ToString() ?? "-"} {k.Bounds.MinNumGroupsPerMultiprocessor?.ToString() ?? "-"}"),
        ]) + "\n";

    private const string StampFile = "stamp.txt";

    /// <summary>Writes <paramref name="ptx"/> (from <see cref="CompileInOrder"/>) into <paramref name="folder"/>, one file a
    /// kernel and architecture, and the stamp last: a folder without its stamp is never taken.</summary>
    public static void Save(string folder, string stamp, IReadOnlyList<LoadedKernel> order, IReadOnlyList<CudaArchitecture> architectures, string[][] ptx)
    {
        Directory.CreateDirectory(folder);
        File.Delete(Path.Combine(folder, StampFile));
        for (int a = 0; a < architectures.Count; a++)
        {
            string sub = Directory.CreateDirectory(Path.Combine(folder, $"sm_{architectures[a].Major}{architectures[a].Minor}")).FullName;
            for (int i = 0; i < order.Count; i++)
            {
                File.WriteAllText(Path.Combine(sub, Name(order[i]) + ".ptx"), ptx[a][i]);
            }
        }
        File.WriteAllText(Path.Combine(folder, StampFile), stamp);
    }

    /// <summary>The PTX <see cref="Save"/> wrote into <paramref name="folder"/> when its stamp is <paramref name="stamp"/>;
    /// otherwise null and <paramref name="why"/> says in a few words why not.</summary>
    public static string[][]? Load(string folder, string stamp, IReadOnlyList<LoadedKernel> order, IReadOnlyList<CudaArchitecture> architectures, out string why)
    {
        string file = Path.Combine(folder, StampFile);
        if (!File.Exists(file))
        {
            why = $"no {StampFile} in {folder}";
            return null;
        }
        if (File.ReadAllText(file) != stamp)
        {
            why = $"{folder} holds PTX of another build, ILGPU, CUDA version or kernel set";
            return null;
        }
        var ptx = new string[architectures.Count][];
        try
        {
            for (int a = 0; a < architectures.Count; a++)
            {
                string sub = Path.Combine(folder, $"sm_{architectures[a].Major}{architectures[a].Minor}");
                ptx[a] = [.. order.Select(k => File.ReadAllText(Path.Combine(sub, Name(k) + ".ptx")))];
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            why = $"{folder}: {e.Message}";
            return null;
        }
        why = "";
        return ptx;
    }
}
