using System.CommandLine;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>The <c>ddpm</c> command line: train, sample, eval, bench, info, check.</summary>
public static class Program
{
    /// <summary>Entry point: parses the command and runs it. Bad input is one line on stderr and a non-zero exit.</summary>
    public static int Main(string[] args)
    {
        var gpuKernels = GpuKernels;
        var root = new RootCommand("ddpm: a denoising diffusion model (DDPM) engine in C#, trained on MNIST.")
        {
            TrainCommand.Build(),
            SampleCommand.Build(),
            BenchCommand.Build(),
            InfoCommand(),
            CheckCommand.Build(),
            EvalCommand.Build(),
            gpuKernels,
        };
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            // One line, not a page of help: the problems and where to look.
            var messages = parsed.Errors.Select(Describe);
            Console.Error.WriteLine($"ddpm: {string.Join("; ", messages.Reverse())} (see 'ddpm --help')");
            return ExitCodes.Usage;
        }
        try
        {
            EnvironmentSettings.Check();
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"ddpm: {e.Message}");
            return ExitCodes.Usage;
        }
        return parsed.Invoke();
    }

    /// <summary>The environment variable behind --gpu-kernels (read here, set on the device as it opens).</summary>
    public const string GpuKernelsVariable = "DDPM_GPU_KERNELS";

    /// <summary>--gpu-kernels fast|simple, accepted after any command (one definition, read from each command's parse).</summary>
    public static Option<string?> GpuKernels { get; } = GpuKernelsOption();

    /// <summary>The kernel mode a command asked for: --gpu-kernels, else DDPM_GPU_KERNELS (validated before any command
    /// runs), else fast.</summary>
    public static bool SimpleKernels(System.CommandLine.ParseResult p) =>
        string.Equals((p.GetValue(GpuKernels) ?? Environment.GetEnvironmentVariable(GpuKernelsVariable))?.Trim(), "simple", StringComparison.OrdinalIgnoreCase);

    /// <summary>The device a command asked for: --device (its option <paramref name="device"/>) and the kernel mode.</summary>
    public static DeviceChoice ChosenDevice(System.CommandLine.ParseResult p, Option<string> device, Option<string?>? math = null) =>
        new(p.GetValue(device)!, SimpleKernels(p), EnvironmentSettings.Simd, MathPrecisions.Parse(math is null ? null : p.GetValue(math)) ?? MathPrecisions.Default);

    /// <summary>--math for the commands that run a model without training it (sample, eval, bench); train's is its setting
    /// (<see cref="TrainSettings.Math"/>), recorded in the checkpoint. The same choices and help.</summary>
    public static Option<string?> MathOption()
    {
        var option = new Option<string?>("--math")
        {
            Description = $"{string.Join(" | ", MathPrecisions.Names)}: {TrainSettings.Math.Help} (default {MathPrecisions.Default.Name()})",
        };
        option.AcceptOnlyFromAmong(MathPrecisions.Names);
        return option;
    }

    /// <summary>Opens the chosen device (no self-check, no message), its kernel mode set.</summary>
    public static Device Open(DeviceChoice choice, out string reason)
    {
        var device = DeviceCatalog.Open(choice.Name, out reason);
        if (device is IlgpuDevice gpu)
        {
            gpu.SimpleKernels = choice.SimpleKernels;
            gpu.Precision = choice.Math;
        }
        // The managed CPU backend at the instruction level asked for (DDPM_SIMD, bench's --simd): a setting of the device.
        return device is CpuDevice && choice.Simd is { } level ? CpuDevice.At(level) : device;
    }

    private static Option<string?> GpuKernelsOption()
    {
        var option = new Option<string?>("--gpu-kernels")
        {
            Description = "GPU kernels: fast (tiled, the default) | simple (one thread per output: for a suspected kernel bug); same as DDPM_GPU_KERNELS",
            Recursive = true,
        };
        option.AcceptOnlyFromAmong("fast", "simple");
        return option;
    }

    /// <summary>A parse error on one line, naming its flag when the parser's message does not
    /// ("--lr-decay: Argument 'linear' not recognized. Must be one of ...").</summary>
    private static string Describe(System.CommandLine.Parsing.ParseError e)
    {
        var message = string.Join(' ', e.Message.Split(['\n', '\t', '\r'], StringSplitOptions.RemoveEmptyEntries)).TrimEnd('.');
        // "Cannot parse argument '-1' for option '--seed' as expected type 'System.Nullable`1[[System.UInt64, ...]]'": said
        // as a person would, by what the flag takes.
        var parse = System.Text.RegularExpressions.Regex.Match(message, @"^Cannot parse argument '(.*)' for option '(.*)' as expected type '(.*)'$");
        if (parse.Success)
        {
            string type = parse.Groups[3].Value;
            string wants = type.Contains("UInt", StringComparison.Ordinal) ? "a whole number, 0 or more"
                : type.Contains("Int", StringComparison.Ordinal) ? "a whole number"
                : type.Contains("Single", StringComparison.Ordinal) || type.Contains("Double", StringComparison.Ordinal) ? "a number"
                : "a value of another kind";
            return $"{parse.Groups[2].Value} {parse.Groups[1].Value}: must be {wants}";
        }
        var option = e.SymbolResult switch
        {
            System.CommandLine.Parsing.OptionResult o => o.Option,
            System.CommandLine.Parsing.ArgumentResult { Parent: System.CommandLine.Parsing.OptionResult o } => o.Option,
            _ => null,
        };
        return option is not null && !message.Contains(option.Name, StringComparison.Ordinal) ? $"{option.Name}: {message}" : message;
    }

    /// <summary>Runs a command body; the errors a user can cause become one line and an exit code.</summary>
    public static int Guard(Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (Known(e) || Environment.GetEnvironmentVariable("DDPM_DEBUG") is null)
        {
            return Report(e);
        }
    }

    /// <summary>The engine's build: the module ids of its five assemblies (the same source and compiler give the same ids:
    /// builds are deterministic), which MPI ranks compare.</summary>
    public static string Version => string.Join("+", new[] { typeof(Program).Assembly }
        .Concat(new[] { "Ddpm.Diffusion", "Ddpm.Nn", "Ddpm.Kernels", "Ddpm.Tensor" }.Select(name => System.Reflection.Assembly.Load(name)))
        .Select(a => a.ManifestModule.ModuleVersionId.ToString("N")[..8]));

    /// <summary>Says an error in one line (after <paramref name="prefix"/>) and returns its exit code; an exception no user
    /// input should cause is said as an internal error, with the way to its stack trace.</summary>
    public static int Report(Exception e, string prefix = "")
    {
        if (e is RankFailedException { InnerException: { } original } && Environment.GetEnvironmentVariable("DDPM_DEBUG") is not null)
        {
            Console.Error.WriteLine(original);
        }
        Console.Error.WriteLine(Known(e)
            ? $"ddpm: {prefix}{OneLine(e.Message)}"
            : $"ddpm: {prefix}internal error: {e.GetType().Name}: {OneLine(e.Message)} (set DDPM_DEBUG=1 for the stack trace)");
        return ExitCodeOf(e);
    }

    /// <summary>The exit code an error ends the process with (<see cref="ExitCodes"/>).</summary>
    public static int ExitCodeOf(Exception e) => e switch
    {
        RankFailedException r => r.ExitCode,
        UsageException => ExitCodes.Usage,
        TrainingDivergedException => ExitCodes.Diverged,
        OutOfDeviceMemoryException or OutOfMemoryException => ExitCodes.OutOfMemory,
        _ when Known(e) => ExitCodes.Failure,
        _ => ExitCodes.Internal,
    };

    // The errors a user can cause: said as they are.
    private static bool Known(Exception e) => e is ArgumentException or DeviceNotFoundException or DeviceUnsupportedException or CheckpointException or DataException or RunLockedException
        or TrainingDivergedException or OutOfDeviceMemoryException or IOException or UnauthorizedAccessException or OutOfMemoryException
        or SelfCheckFailedException or RankFailedException;

    internal static string OneLine(string message) => string.Join(' ', message.Split(['\n', '\r', '\t'], StringSplitOptions.RemoveEmptyEntries));

    /// <summary>Refuses a folder flag that names an existing file, by the flag's name.</summary>
    public static void RequireFolder(string flag, string path)
    {
        if (File.Exists(path))
        {
            throw new UsageException($"{flag} {path}: is a file, not a folder");
        }
    }

    /// <summary>Takes the lock of the folder a command writes to (creating the folder), or says which process holds it: one
    /// writer a folder, refused in one line before anything is written (<paramref name="flag"/> names the folder's flag).</summary>
    public static RunLock LockRun(string folder, string flag = "--out")
    {
        try
        {
            return RunLock.Acquire(folder, msg => Console.Error.WriteLine(msg), flag);
        }
        catch (Exception e) when (e is (IOException or UnauthorizedAccessException) and not RunLockedException)
        {
            throw new UsageException($"{flag} {folder}: cannot write there ({OneLine(e.Message)})");
        }
    }

    /// <summary>Creates an output folder and proves it writable before any work is done, naming the flag when it is not.</summary>
    public static void RequireWritableFolder(string flag, string folder)
    {
        RequireFolder(flag, folder);
        try
        {
            Directory.CreateDirectory(folder);
            var probe = Path.Combine(folder, $".ddpm-write-test.{Environment.ProcessId}");
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UsageException($"{flag} {folder}: cannot write there ({OneLine(e.Message)})");
        }
    }

    /// <summary>Refuses an output folder where one of the files a command writes is a folder (or anything but a file), by the
    /// flag's name, before any work.</summary>
    public static void RequireFileSlots(string flag, string folder, params string[] files)
    {
        foreach (var name in files)
        {
            if (Directory.Exists(Path.Combine(folder, name)))
            {
                throw new UsageException($"{flag} {folder}: {name} there is a folder, where this command writes a file; move it away or pass another {flag}");
            }
        }
    }

    /// <summary>Marks a path option: an empty value (<c>--out ''</c>) is a usage error naming the flag, as is a value with a NUL
    /// character; a missing value is the parser's.</summary>
    public static TOption IsPath<TOption>(this TOption option) where TOption : Option
    {
        option.Validators.Add(r => CheckPath(option.Name, r));
        return option;
    }

    private static void CheckPath(string name, System.CommandLine.Parsing.OptionResult r)
    {
        foreach (var token in r.Tokens)
        {
            if (token.Value.Length == 0 || token.Value.Trim().Length == 0)
            {
                r.AddError($"{name}: an empty path");
            }
            else if (token.Value.Contains('\0'))
            {
                r.AddError($"{name}: a path with a NUL character");
            }
        }
    }

    /// <summary>Limits a numeric option to [min, max]; a value outside (NaN included) is a usage error naming the flag.</summary>
    public static Option<T> Within<T>(this Option<T> option, T min, T max) where T : struct, System.Numerics.INumber<T>
    {
        AddRange(option, r => r.GetValueOrDefault<T>(), min, max);
        return option;
    }

    /// <inheritdoc cref="Within{T}(Option{T}, T, T)"/>
    public static Option<T?> Within<T>(this Option<T?> option, T min, T max) where T : struct, System.Numerics.INumber<T>
    {
        AddRange(option, r => r.GetValueOrDefault<T?>(), min, max);
        return option;
    }

    private static void AddRange<T>(Option option, Func<System.CommandLine.Parsing.OptionResult, T?> read, T min, T max)
        where T : struct, System.Numerics.INumber<T>
    {
        option.Validators.Add(r =>
        {
            T? value;
            try
            {
                value = read(r);
            }
            catch (InvalidOperationException)
            {
                return; // not a number at all: the parser reports that
            }
            if (value is { } v && !(v >= min && v <= max))
            {
                r.AddError($"{option.Name} {Text(v)}: must be {Range(min, max)}");
            }
        });
    }

    private static string Text<T>(T v) where T : System.Numerics.INumber<T> => v.ToString(null, System.Globalization.CultureInfo.InvariantCulture);

    private static string Range<T>(T min, T max) where T : System.Numerics.INumber<T>
    {
        bool floating = typeof(T) == typeof(float) || typeof(T) == typeof(double);
        if (floating && double.CreateChecked(max) >= float.MaxValue)
        {
            return $"a finite number, {Text(min)} or more";
        }
        if (floating && double.CreateChecked(min) > 0 && double.CreateChecked(min) < 1e-30)
        {
            return $"a number in (0, {Text(max)}]";
        }
        if (typeof(T) == typeof(float) && float.CreateChecked(max) == 0.99999994f)
        {
            return $"a number in [{Text(min)}, 1)";
        }
        if (!floating && (double.CreateChecked(max) >= int.MaxValue))
        {
            return $"{Text(min)} or more";
        }
        return $"in {Text(min)}..{Text(max)}";
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

    /// <summary>Opens a device by name and says which and why on stderr; on a GPU, the self-check
    /// runs first if this GPU, driver and build have not passed it yet (<see cref="SelfCheck"/>).</summary>
    public static Device OpenDevice(DeviceChoice choice)
    {
        var device = Open(choice, out var reason);
        Console.Error.WriteLine($"device: {device.Name} ({reason})");
        try
        {
            SelfCheck.Ensure(device, msg => Console.Error.WriteLine(msg));
        }
        catch
        {
            device.Dispose();
            throw;
        }
        return device;
    }

    /// <summary>What --math does on <paramref name="device"/> by default: the mode, and whether this device runs it.</summary>
    internal static string MathInfo(Device device)
    {
        var mode = MathPrecisions.Default;
        string where = device is IlgpuDevice gpu
            ? gpu.TensorCores ? "this device runs it on tensor cores" : "this device has no tensor-core path, so it computes fp32"
            : "the CPU backend computes fp32 whatever --math says";
        return $"{mode.Name()} by default ({mode.Describe()}); {where}; --math {string.Join("|", MathPrecisions.Names)}";
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
            Console.WriteLine($"math: {MathInfo(chosen)}");
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

    /// <summary>Stopped by Ctrl-C after saving a checkpoint (128 + SIGINT); SIGTERM gives 143 and SIGHUP 129, likewise after saving.</summary>
    public const int Interrupted = 130;

    /// <summary>Stopped at a step boundary because another MPI rank was asked to (SIGTERM's status, 128 + 15), after rank 0 saved.</summary>
    public const int Terminated = 143;

    /// <summary>A bug in the engine (an exception no user input should cause): one line, and DDPM_DEBUG=1 shows the stack.</summary>
    public const int Internal = 70;
}

/// <summary>A device by name (--device), the kernel mode to open a GPU in (--gpu-kernels, DDPM_GPU_KERNELS) and the
/// instruction level of the managed CPU backend (DDPM_SIMD, bench's --simd; null: the widest).</summary>
public readonly record struct DeviceChoice(string Name, bool SimpleKernels, SimdLevel? Simd = null, MathPrecision Math = MathPrecisions.Default);
