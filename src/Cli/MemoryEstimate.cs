using Ddpm.Diffusion;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>
/// What a request needs in memory, estimated from the model's width and the batch before anything is allocated, and
/// refused up front in one line with the figure when it is more than the machine has (host memory for the CPU backend,
/// the GPU's memory for an ILGPU device). The per-sample figures are the U-Net's activations, measured as the growth of
/// a process per sample (docs/reliability.md) and rounded up.
/// </summary>
public static class MemoryEstimate
{
    /// <summary>What a process holds before any batch: the runtime, the kernels, the data set, the weights.</summary>
    public const long BaseBytes = 400L << 20;

    /// <summary>Image-sized (28×28 for MNIST) float maps at the model's width one sample keeps live in a training step (forward activations kept
    /// for backward, their gradients, the convolutions' lowered rows), rounded up from the measured step.</summary>
    public const int TrainMapsPerSample = 56;

    /// <summary>Bytes a training step at <paramref name="batch"/> takes with a model of width <paramref name="channels"/> on
    /// images of side <paramref name="side"/> (the maps scale with its square).</summary>
    public static long TrainBytes(int channels, int batch, int side = 28) => BaseBytes + (long)batch * TrainMapsPerSample * channels * side * side * sizeof(float);

    /// <summary>Refuses a --memory budget for sampling (plus the process's own) that is more than <paramref name="device"/> offers.</summary>
    public static void RequireSampling(int memoryMiB, Device device) => Require($"--memory {memoryMiB}", BaseBytes + ((long)memoryMiB << 20), device);

    /// <summary>Bytes the device offers: the GPU's memory, or the host's for the CPU backend and ILGPU's simulator.</summary>
    public static long Available(Device device) => device is IlgpuDevice { Kind: DeviceKind.Cuda or DeviceKind.OpenCL } gpu
        ? gpu.Accelerator.MemorySize
        : GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;

    /// <summary>Refuses <paramref name="what"/> (the flag that sets its size, e.g. "--batch 4096") when
    /// <paramref name="bytes"/> is more than <paramref name="device"/> offers.</summary>
    public static void Require(string what, long bytes, Device device)
    {
        long available = Available(device);
        if (bytes > available)
        {
            throw new UsageException($"{what}: needs about {Gib(bytes)} of memory, more than the {Gib(available)} {(device.Kind == DeviceKind.Cpu ? "this machine has" : "the device has")}; ask for less");
        }
    }

    private static string Gib(long bytes) => bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):F1} GiB" : $"{bytes >> 20} MiB";
}
