using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.OpenCL;

namespace Ddpm.Tensors;

/// <summary>Device selection: <c>auto | cpu | cuda | opencl | ilgpu-cpu</c>.</summary>
public static class DeviceCatalog
{
    /// <summary>The names <see cref="Open"/> accepts.</summary>
    public static readonly string[] Choices = ["auto", "cpu", "cuda", "opencl", "ilgpu-cpu"];

    /// <summary>The selection name of a device kind.</summary>
    public static string KindName(DeviceKind kind) => kind switch
    {
        DeviceKind.Cpu => "cpu",
        DeviceKind.Cuda => "cuda",
        DeviceKind.OpenCL => "opencl",
        DeviceKind.IlgpuCpu => "ilgpu-cpu",
        _ => kind.ToString(),
    };

    /// <summary>
    /// Opens a device by name. <c>auto</c> picks a CUDA GPU, else an OpenCL GPU, else the managed
    /// CPU backend (never ILGPU's CPU simulator, which is hundreds of times slower).
    /// <paramref name="reason"/> says why that device was chosen.
    /// </summary>
    public static Device Open(string name, out string reason)
    {
        switch (name.ToLowerInvariant())
        {
            case "cpu":
                reason = "asked for cpu";
                return CpuDevice.Instance;
            case "cuda":
                reason = "asked for cuda";
                return OpenGpu(DeviceKind.Cuda, out var failure, out _)
                    ?? throw new DeviceNotFoundException($"--device cuda: {failure} (--device cpu runs on the processor)");
            case "opencl":
                reason = "asked for opencl";
                return OpenGpu(DeviceKind.OpenCL, out failure, out _)
                    ?? throw new DeviceNotFoundException($"--device opencl: {failure} (--device cpu runs on the processor)");
            case "ilgpu-cpu":
                reason = "asked for ilgpu-cpu (a test vehicle: hundreds of times slower than cpu)";
                return IlgpuDevice.TryOpen(DeviceKind.IlgpuCpu)!;
            case "auto":
                // A GPU that is there but fails (a stub driver, a driver error) is said in the reason,
                // never swallowed: the user would otherwise train on the CPU without knowing why.
                var notes = new List<string>();
                foreach (var kind in new[] { DeviceKind.Cuda, DeviceKind.OpenCL })
                {
                    if (OpenGpu(kind, out failure, out bool broken) is { } gpu)
                    {
                        reason = string.Join("; ", [.. notes, $"auto: {KindName(kind)} GPU found"]);
                        return gpu;
                    }
                    if (broken)
                    {
                        notes.Add($"{KindName(kind)}: unavailable ({failure})");
                    }
                }
                reason = notes.Count == 0
                    ? "auto: no CUDA or OpenCL GPU found, using the managed CPU backend"
                    : $"auto: {string.Join("; ", notes)}; using the managed CPU backend";
                return CpuDevice.Instance;
            default:
                throw new ArgumentException($"unknown device '{name}': expected one of {string.Join(", ", Choices)}");
        }
    }

    /// <summary>
    /// Opens the GPU of <paramref name="kind"/>, or returns null with <paramref name="failure"/> saying
    /// why in a few words: the CUDA driver's own error (CUDA_ERROR_STUB_LIBRARY, no device, ...), a
    /// device ILGPU cannot compile for, or the exception opening it threw. <paramref name="broken"/>:
    /// the GPU's software is there but fails (a driver that loads, an exception), as opposed to absent.
    /// </summary>
    public static IlgpuDevice? OpenGpu(DeviceKind kind, out string failure, out bool broken)
    {
        IlgpuDevice? gpu;
        try
        {
            gpu = IlgpuDevice.TryOpen(kind);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            failure = $"{e.GetType().Name}: {OneLine(e.Message)}";
            broken = true;
            return null;
        }
        broken = gpu is null && kind == DeviceKind.Cuda && CudaDriver.Status.Present;
        failure = gpu is not null ? "" : kind switch
        {
            DeviceKind.Cuda => CudaProblem(),
            DeviceKind.OpenCL => "no OpenCL GPU found (is an OpenCL ICD installed?)",
            _ => $"no {KindName(kind)} device",
        };
        return gpu;
    }

    /// <summary>Why ILGPU shows no CUDA device, from the driver itself.</summary>
    private static string CudaProblem()
    {
        var status = CudaDriver.Status;
        if (status.Present && status.Error == 0 && status.DeviceCount > 0 && IlgpuDevice.NativeResolver.RejectedCudaDevices is { Count: > 0 } rejected)
        {
            return $"ILGPU 1.5.3 cannot compile for {string.Join(", ", rejected)}";
        }
        return status.Problem ?? "the driver shows a device, yet ILGPU found none";
    }

    private static string OneLine(string message) => string.Join(' ', message.Split(['\n', '\r', '\t'], StringSplitOptions.RemoveEmptyEntries));

    /// <summary>Every device this machine shows, one line each, ILGPU's and the managed CPU backend;
    /// a CUDA driver that is installed but fails is a line too.</summary>
    public static IReadOnlyList<string> List()
    {
        var lines = new List<string> { $"cpu        {CpuDevice.Instance.Name}" };
        using var context = IlgpuDevice.CreateContext();
        var cuda = CudaDriver.Status;
        if (cuda.Present && !context.Devices.Any(d => d.AcceleratorType == AcceleratorType.Cuda))
        {
            lines.Add($"cuda       unavailable ({CudaProblem()})");
        }
        foreach (var d in context)
        {
            if (d.AcceleratorType == AcceleratorType.OpenCL && d is CLDevice cl && cl.DeviceType != CLDeviceType.CL_DEVICE_TYPE_GPU)
            {
                lines.Add($"opencl     {d.Name} (not a GPU: not used)");
                continue;
            }
            string kind = d.AcceleratorType switch
            {
                AcceleratorType.Cuda => "cuda",
                AcceleratorType.OpenCL => "opencl",
                AcceleratorType.CPU => "ilgpu-cpu",
                _ => d.AcceleratorType.ToString(),
            };
            lines.Add(d.AcceleratorType == AcceleratorType.CPU
                ? $"{kind,-10} {d.Name} (ILGPU's CPU simulator: for tests, not for training)"
                : $"{kind,-10} {d.Name}, {d.MemorySize / (1 << 20)} MiB");
        }
        return lines;
    }
}

/// <summary>The asked-for device is not present on this machine.</summary>
public sealed class DeviceNotFoundException(string message) : Exception(message);

/// <summary>The device is present but cannot run what was asked of it (a limit it has, named in the message).</summary>
public sealed class DeviceUnsupportedException(string message) : Exception(message);

/// <summary>
/// What the CUDA driver says when asked directly: the library that loaded (null: none of the names
/// ILGPU's resolver tries), cuInit's result (0: CUDA_SUCCESS) with its name and text, the driver
/// version (1000·major + 10·minor) and the device count. ILGPU swallows all of this (a failing
/// cuInit just leaves CUDA out of the device list); the engine reports it.
/// </summary>
public sealed record CudaDriverStatus(string? Library, int Error, string ErrorName, string ErrorText, int DriverVersion, int DeviceCount)
{
    /// <summary>A library with the CUDA driver's name loaded: the user meant to have CUDA.</summary>
    public bool Present => Library is not null;

    /// <summary>The driver as "major.minor", or "unknown".</summary>
    public string VersionText => DriverVersion > 0 ? $"{DriverVersion / 1000}.{DriverVersion % 1000 / 10}" : "unknown";

    /// <summary>Why CUDA cannot be used, in a few words, or null when the driver is fine and shows a device.</summary>
    public string? Problem =>
        !Present ? $"no NVIDIA driver ({string.Join(", ", IlgpuDevice.NativeResolver.CudaCandidates.Select(Path.GetFileName).Distinct())} not found)"
        : Error != 0 ? $"{ErrorName}: {ErrorText}, from {Library}"
        : DeviceCount == 0 ? $"the driver ({VersionText}, {Library}) shows no CUDA device"
        : null;
}

/// <summary>Asks the CUDA driver directly (cuInit, cuDriverGetVersion, cuDeviceGetCount) what ILGPU
/// would find, loading it under the names and in the order ILGPU's resolver uses.</summary>
public static class CudaDriver
{
    private static readonly Lazy<CudaDriverStatus> _status = new(() => Probe(IlgpuDevice.NativeResolver.CudaCandidates));

    /// <summary>This machine's CUDA driver, probed once per process.</summary>
    public static CudaDriverStatus Status => _status.Value;

    /// <summary>Loads the first of <paramref name="candidates"/> that loads and asks it; a library
    /// without the driver's entry points counts as a failing driver.</summary>
    public static unsafe CudaDriverStatus Probe(IEnumerable<string> candidates)
    {
        foreach (var name in candidates)
        {
            if (!NativeLibrary.TryLoad(name, out var lib))
            {
                continue;
            }
            if (!NativeLibrary.TryGetExport(lib, "cuInit", out var init)
                || !NativeLibrary.TryGetExport(lib, "cuDriverGetVersion", out var version)
                || !NativeLibrary.TryGetExport(lib, "cuDeviceGetCount", out var count))
            {
                return new CudaDriverStatus(name, -1, "not a CUDA driver", "cuInit, cuDriverGetVersion or cuDeviceGetCount missing", 0, 0);
            }
            int driver = 0, devices = 0;
            _ = ((delegate* unmanaged<int*, int>)version)(&driver);
            int error = ((delegate* unmanaged<uint, int>)init)(0);
            if (error == 0)
            {
                error = ((delegate* unmanaged<int*, int>)count)(&devices);
            }
            return error == 0
                ? new CudaDriverStatus(name, 0, "CUDA_SUCCESS", "no error", driver, devices)
                : new CudaDriverStatus(name, error, ErrorString(lib, "cuGetErrorName", error) ?? $"CUDA error {error}",
                    ErrorString(lib, "cuGetErrorString", error) ?? "no description", driver, 0);
        }
        return new CudaDriverStatus(null, -1, "", "", 0, 0);
    }

    private static unsafe string? ErrorString(IntPtr lib, string export, int error)
    {
        if (!NativeLibrary.TryGetExport(lib, export, out var fn))
        {
            return null;
        }
        byte* text = null;
        return ((delegate* unmanaged<int, byte**, int>)fn)(error, &text) == 0 && text != null
            ? Marshal.PtrToStringUTF8((IntPtr)text)
            : null;
    }
}
