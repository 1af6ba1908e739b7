using System.CommandLine;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using ILGPU.Runtime.Cuda;

namespace Ddpm.Cli;

/// <summary><c>ddpm check</c>: every op on an ILGPU device against the managed CPU backend and
/// against finite differences, as one table (what scripts/gpu-check.sh runs on a GPU box). With <c>--ptx DIR</c>
/// instead: the PTX of every kernel the engine loads, for <c>ptxas -v</c>.</summary>
public static class CheckCommand
{
    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var device = new Option<string>("--device")
        {
            Description = "the ILGPU device to check against the managed CPU backend: cuda | opencl | ilgpu-cpu",
            DefaultValueFactory = _ => "cuda",
        };
        device.AcceptOnlyFromAmong("cuda", "opencl", "ilgpu-cpu");
        var ptx = new Option<string?>("--ptx")
        {
            Description = "instead of the checks: write the PTX of every kernel the engine loads into this folder (tiled/ for the " +
                "explicitly grouped kernels, implicit/ for the rest), compiled on ILGPU's CPU accelerator: no GPU needed; for ptxas -v",
        }.IsPath();
        var sm = new Option<int>("--sm") { Description = "the CUDA architecture --ptx compiles for, as major·10 + minor (90: sm_90, H100 and H200)", DefaultValueFactory = _ => 90 }
            .Within(30, 200);
        var cuda = new Option<string>("--cuda")
        {
            Description = "the CUDA version (toolkit or driver, major.minor) whose newest PTX ISA --ptx writes, so that version's ptxas reads it",
            DefaultValueFactory = _ => "12.0",
        };
        var check = new Command("check", "Check every op on an ILGPU device against the CPU backend and finite differences; print one table.") { device, ptx, sm, cuda };
        check.SetAction(parse => Program.Guard(() => parse.GetValue(ptx) is { } folder
            ? WritePtx(folder, parse.GetValue(sm), parse.GetValue(cuda)!)
            : Run(parse.GetValue(device)!)));
        return check;
    }

    /// <summary>Compiles every loaded kernel to PTX for sm_<paramref name="sm"/> and writes one file a kernel.</summary>
    private static int WritePtx(string folder, int sm, string cudaVersion)
    {
        Program.RequireFolder("--ptx", folder);
        var parts = cudaVersion.Split('.');
        if (parts.Length != 2 || !int.TryParse(parts[0], out int major) || !int.TryParse(parts[1], out int minor))
        {
            throw new UsageException($"--cuda {cudaVersion}: expected major.minor, e.g. 12.4");
        }
        using var device = DeviceCatalog.Open("ilgpu-cpu", out _);
        var ilgpu = (IlgpuDevice)device;
        var kernels = IlgpuKernels.For(ilgpu);
        using var compiler = new KernelPtx(ilgpu.Context, new CudaArchitecture(sm / 10, sm % 10), CudaDriverVersion.FromMajorMinor(major, minor));
        int tiled = 0;
        string? target = null;
        foreach (var kernel in kernels.Loaded)
        {
            string sub = Path.Combine(folder, kernel.Grouped ? "tiled" : "implicit");
            Directory.CreateDirectory(sub);
            string code = compiler.Compile(kernel);
            target ??= System.Text.RegularExpressions.Regex.Match(code, @"^\.target\s+(\S+)", System.Text.RegularExpressions.RegexOptions.Multiline).Groups[1].Value;
            byte[] bytes = System.Text.Encoding.UTF8.GetBytes(code);
            Ddpm.Nn.Durable.WriteAtomically(Path.Combine(sub, KernelPtx.Name(kernel) + ".ptx"), s => s.Write(bytes));
            tiled += kernel.Grouped ? 1 : 0;
        }
        var isa = compiler.InstructionSet;
        // ILGPU 1.5 writes .target sm_80 at most: say what the files hold, and that ptxas -arch=sm_NN still compiles them for NN.
        string written = target is { Length: > 0 } && target != $"sm_{sm}" ? $"asked for sm_{sm}, written as .target {target} (ILGPU writes at most sm_80; ptxas -arch=sm_{sm} compiles it for sm_{sm})" : $"for sm_{sm}";
        Console.WriteLine($"wrote the PTX of {kernels.Loaded.Count} kernels {written} (PTX ISA {isa.Major}.{isa.Minor}) into {folder}: " +
            $"{tiled} tiled in tiled/, {kernels.Loaded.Count - tiled} in implicit/");
        return 0;
    }

    private static int Run(string deviceName)
    {
        using var device = DeviceCatalog.Open(deviceName, out _);
        Console.WriteLine($"checking {device.Name} against {CpuDevice.Instance.Name}");
        var started = DateTime.UtcNow;
        var kernels = IlgpuKernels.For((IlgpuDevice)device);
        Console.WriteLine($"kernels ({(kernels.Simple ? "simple twins" : "fast")}; --gpu-kernels or DDPM_GPU_KERNELS picks) compiled in {(DateTime.UtcNow - started).TotalSeconds:F1} s");
        var results = new List<CheckResult>();
        foreach (var c in OpCatalog.All)
        {
            results.Add(Checker.CompareDevices(c, device));
            if (c.Backward is not null)
            {
                results.Add(Checker.GradCheck(c, device));
            }
        }
        Console.WriteLine($"| {"op",-32} | {"check",-18} | {"max rel err",11} | result |");
        Console.WriteLine($"|{new string('-', 34)}|{new string('-', 20)}|{new string('-', 13)}|--------|");
        foreach (var r in results)
        {
            Console.WriteLine($"| {r.Op,-32} | {r.Check,-18} | {r.MaxError,11:E2} | {(r.Pass ? "pass" : "FAIL"),-6} |");
        }
        var failed = results.Where(r => !r.Pass).ToList();
        foreach (var r in failed)
        {
            Console.WriteLine($"FAIL {r}");
        }
        Console.WriteLine($"{results.Count - failed.Count} passed, {failed.Count} failed");
        return failed.Count == 0 ? 0 : ExitCodes.Failure;
    }
}
