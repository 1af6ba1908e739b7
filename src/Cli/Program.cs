using System.CommandLine;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>The <c>ddpm</c> command line.</summary>
public static class Program
{
    /// <summary>Entry point: parses the command and runs it; errors are one line on stderr and a non-zero exit.</summary>
    public static int Main(string[] args)
    {
        var device = new Option<string>("--device")
        {
            Description = "auto | cpu | cuda | opencl | ilgpu-cpu",
            DefaultValueFactory = _ => "auto",
        };
        device.AcceptOnlyFromAmong(DeviceCatalog.Choices);

        var info = new Command("info", "List the devices the engine sees and the one 'auto' picks.");
        info.SetAction(_ => Run(Info));

        var checkDevice = new Option<string>("--device")
        {
            Description = "the ILGPU device to check against the managed CPU backend: cuda | opencl | ilgpu-cpu",
            DefaultValueFactory = _ => "cuda",
        };
        checkDevice.AcceptOnlyFromAmong("cuda", "opencl", "ilgpu-cpu");
        var check = new Command("check", "Run every op on a device against the managed CPU backend and against finite differences; print one table.")
        {
            checkDevice,
        };
        check.SetAction(parse => Run(() => Check(parse.GetValue(checkDevice)!)));

        var root = new RootCommand("ddpm: a denoising diffusion model (DDPM) engine in C#, trained on MNIST.") { info, check };
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            // One line, not a page of help: the first problem and where to look.
            var messages = parsed.Errors.Select(e => string.Join(' ', e.Message.Split(['\n', '\t', '\r'], StringSplitOptions.RemoveEmptyEntries)).TrimEnd('.'));
            Console.Error.WriteLine($"ddpm: {string.Join("; ", messages.Reverse())} (see 'ddpm --help')");
            return 2;
        }
        return parsed.Invoke();
    }

    private static int Run(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (e is ArgumentException or DeviceNotFoundException or OutOfDeviceMemoryException or IOException)
        {
            Console.Error.WriteLine($"ddpm: {e.Message}");
            return 2;
        }
    }

    private static int Info()
    {
        Console.WriteLine("devices:");
        foreach (var line in DeviceCatalog.List())
        {
            Console.WriteLine($"  {line}");
        }
        using var chosen = DeviceCatalog.Open("auto", out var reason);
        Console.WriteLine($"auto picks: {chosen.Name} ({reason})");
        return 0;
    }

    private static int Check(string deviceName)
    {
        using var device = DeviceCatalog.Open(deviceName, out _);
        Console.WriteLine($"checking {device.Name} against {CpuDevice.Instance.Name}");
        var started = DateTime.UtcNow;
        _ = IlgpuKernels.For((IlgpuDevice)device);
        Console.WriteLine($"kernels compiled in {(DateTime.UtcNow - started).TotalSeconds:F1} s");
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
        return failed.Count == 0 ? 0 : 1;
    }
}
