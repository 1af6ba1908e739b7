using System.CommandLine;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>The <c>ddpm</c> command line: train, sample, bench, info, check.</summary>
public static class Program
{
    /// <summary>Entry point: parses the command and runs it. Bad input is one line on stderr and a non-zero exit.</summary>
    public static int Main(string[] args)
    {
        var root = new RootCommand("ddpm: a denoising diffusion model (DDPM) engine in C#, trained on MNIST.")
        {
            TrainCommand.Build(),
            SampleCommand.Build(),
            BenchCommand.Build(),
            InfoCommand(),
            CheckCommand.Build(),
        };
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            // One line, not a page of help: the problems and where to look.
            var messages = parsed.Errors.Select(e => string.Join(' ', e.Message.Split(['\n', '\t', '\r'], StringSplitOptions.RemoveEmptyEntries)).TrimEnd('.'));
            Console.Error.WriteLine($"ddpm: {string.Join("; ", messages.Reverse())} (see 'ddpm --help')");
            return ExitCodes.Usage;
        }
        return parsed.Invoke();
    }

    /// <summary>Runs a command body; the errors a user can cause become one line and an exit code.</summary>
    public static int Guard(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (e is ArgumentException or DeviceNotFoundException or CheckpointException or DataException
            or TrainingDivergedException or OutOfDeviceMemoryException or IOException or UnauthorizedAccessException or OutOfMemoryException)
        {
            Console.Error.WriteLine($"ddpm: {e.Message}");
            return e switch
            {
                TrainingDivergedException => ExitCodes.Diverged,
                OutOfDeviceMemoryException or OutOfMemoryException => ExitCodes.OutOfMemory,
                _ => ExitCodes.Failure,
            };
        }
    }

    /// <summary>The --device option every command shares.</summary>
    public static Option<string> DeviceOption()
    {
        var device = new Option<string>("--device")
        {
            Description = "where to run: auto (a GPU if present, else the managed CPU backend) | cpu | cuda | opencl | ilgpu-cpu",
            DefaultValueFactory = _ => "auto",
        };
        device.AcceptOnlyFromAmong(DeviceCatalog.Choices);
        return device;
    }

    /// <summary>Opens a device by name and says which and why on stderr.</summary>
    public static Device OpenDevice(string name)
    {
        var device = DeviceCatalog.Open(name, out var reason);
        Console.Error.WriteLine($"device: {device.Name} ({reason})");
        return device;
    }

    private static Command InfoCommand()
    {
        var info = new Command("info", "List the devices the engine sees, the one 'auto' picks, and why.");
        info.SetAction(_ => Guard(() =>
        {
            Console.WriteLine("devices:");
            foreach (var line in DeviceCatalog.List())
            {
                Console.WriteLine($"  {line}");
            }
            using var chosen = DeviceCatalog.Open("auto", out var reason);
            Console.WriteLine($"auto picks: {chosen.Name}");
            Console.WriteLine($"why: {reason}");
            return 0;
        }));
        return info;
    }
}

/// <summary>Process exit codes.</summary>
public static class ExitCodes
{
    /// <summary>A command's own failure (bad file, missing data, a check that failed).</summary>
    public const int Failure = 1;

    /// <summary>Wrong flags or arguments.</summary>
    public const int Usage = 2;

    /// <summary>Training diverged (NaN or infinite loss).</summary>
    public const int Diverged = 3;

    /// <summary>Out of memory on the device or host.</summary>
    public const int OutOfMemory = 4;

    /// <summary>Stopped by Ctrl-C after saving a checkpoint (128 + SIGINT).</summary>
    public const int Interrupted = 130;
}
