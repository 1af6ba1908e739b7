using System.CommandLine;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary><c>ddpm check</c>: every op on an ILGPU device against the managed CPU backend and
/// against finite differences, as one table (what scripts/gpu-check.sh runs on a GPU box).</summary>
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
        var check = new Command("check", "Check every op on an ILGPU device against the CPU backend and finite differences; print one table.") { device };
        check.SetAction(parse => Program.Guard(() => Run(parse.GetValue(device)!)));
        return check;
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
