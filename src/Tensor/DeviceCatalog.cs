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
                return IlgpuDevice.TryOpen(DeviceKind.Cuda)
                    ?? throw new DeviceNotFoundException("no CUDA device found (is the NVIDIA driver installed? libcuda.so.1 is looked for too)");
            case "opencl":
                reason = "asked for opencl";
                return IlgpuDevice.TryOpen(DeviceKind.OpenCL)
                    ?? throw new DeviceNotFoundException("no OpenCL GPU found (is an OpenCL ICD installed?)");
            case "ilgpu-cpu":
                reason = "asked for ilgpu-cpu (a test vehicle: hundreds of times slower than cpu)";
                return IlgpuDevice.TryOpen(DeviceKind.IlgpuCpu)!;
            case "auto":
                foreach (var kind in new[] { DeviceKind.Cuda, DeviceKind.OpenCL })
                {
                    IlgpuDevice? gpu = null;
                    try
                    {
                        gpu = IlgpuDevice.TryOpen(kind);
                    }
                    catch (Exception e) when (e is not OutOfMemoryException)
                    {
                        // A broken driver must not stop a CPU run; fall through to the next choice.
                    }
                    if (gpu is not null)
                    {
                        reason = $"auto: {KindName(kind)} GPU found";
                        return gpu;
                    }
                }
                reason = "auto: no CUDA or OpenCL GPU found, using the managed CPU backend";
                return CpuDevice.Instance;
            default:
                throw new ArgumentException($"unknown device '{name}': expected one of {string.Join(", ", Choices)}");
        }
    }

    /// <summary>Every device this machine shows, one line each, ILGPU's and the managed CPU backend.</summary>
    public static IReadOnlyList<string> List()
    {
        var lines = new List<string> { $"cpu        {CpuDevice.Instance.Name}" };
        using var context = IlgpuDevice.CreateContext();
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
