using System.Diagnostics;
using System.Text.Json;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Nn;
using Ddpm.Tensors;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>
/// The self-check before training or sampling on a GPU: the first time a GPU, driver, build and
/// kernel mode (simple, or fast in a math mode: fp32, tf32, 3xtf32) meet, every op's kernel check (<see cref="Checker.CompareDevices"/>:
/// the case's small, odd shapes on the GPU against the managed CPU backend, forward and backward) runs
/// once, seconds in all, and the verdict is cached beside the MNIST cache. A mismatch stops the
/// command with one line naming the kernel and suggesting <c>--device cpu</c> (in a tensor-core mode, one line naming the
/// kernel, and the run goes on in fp32, itself checked); a cached failure stops it
/// again without rerunning (a new driver or build is a new key). The managed CPU backend is never
/// checked (it is the reference), nor ILGPU's CPU simulator unless asked (<c>DDPM_SELF_CHECK=force</c>,
/// or force in <see cref="Ensure"/>); <c>DDPM_SELF_CHECK=off</c> skips it.
/// </summary>
public static class SelfCheck
{
    /// <summary>The cache file's name, in the folder above the MNIST cache (~/.cache/ddpm).</summary>
    public const string FileName = "gpu-self-check.json";

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    /// <summary>$XDG_CACHE_HOME/ddpm/gpu-self-check.json, else ~/.cache/ddpm/gpu-self-check.json.</summary>
    public static string DefaultCacheFile => Path.Combine(Path.GetDirectoryName(Path.GetFullPath(Mnist.DefaultFolder))!, FileName);

    /// <summary>One cached verdict: the key's parts, pass or the first failing kernel and its detail.</summary>
    public sealed record Verdict(string Gpu, string Driver, string Build, string Kernels, bool Pass, string? Failed, string? Detail, int Checks, DateTime CheckedAt);

    /// <summary>
    /// Runs the self-check on <paramref name="device"/> unless a verdict for its key is cached in
    /// <paramref name="cacheFile"/> (default <see cref="DefaultCacheFile"/>); throws
    /// <see cref="SelfCheckFailedException"/> on a mismatch. <paramref name="cases"/> replaces the
    /// catalogue (tests pass a few, one of them wrong on purpose).
    /// </summary>
    public static void Ensure(Device device, Action<string> log, string? cacheFile = null, IReadOnlyList<OpCase>? cases = null, bool force = false)
    {
        var mode = Environment.GetEnvironmentVariable("DDPM_SELF_CHECK")?.ToLowerInvariant();
        if (device is not IlgpuDevice gpu || mode == "off")
        {
            return;
        }
        if (device.Kind == DeviceKind.IlgpuCpu && !force && mode != "force")
        {
            return;
        }
        cacheFile ??= DefaultCacheFile;
        var kernels = IlgpuKernels.For(gpu);
        while (true)
        {
            var verdict = Check(gpu, kernels, log, cacheFile, cases);
            if (verdict.Pass)
            {
                return;
            }
            if (kernels.EffectivePrecision != MathPrecision.Fp32)
            {
                // A tensor-core mode that disagrees is not used: the run goes on in strict fp32, checked in its turn.
                log($"self-check: {verdict.Kernels} kernel '{verdict.Failed}' differs from the CPU backend ({verdict.Detail}); " +
                    $"computing in fp32 instead (verdict cached in {cacheFile})");
                kernels.Precision = gpu.Precision = MathPrecision.Fp32;
                continue;
            }
            throw new SelfCheckFailedException(
                $"GPU self-check failed on {verdict.Gpu} (driver {verdict.Driver}, {verdict.Kernels} kernels): kernel '{verdict.Failed}' " +
                $"differs from the CPU backend ({verdict.Detail}); run with --device cpu" +
                (!kernels.Simple ? " or --gpu-kernels simple" : "") +
                $" (verdict cached in {cacheFile}; delete it to check again)");
        }
    }

    /// <summary>The kernels' mode as the cache keys it: "simple", or "fast" and the math ("fast tf32"); fp32 is plain
    /// "fast", the key of the verdicts from before the tensor-core modes.</summary>
    public static string ModeKey(IlgpuKernels kernels) =>
        kernels.Simple ? "simple" : kernels.EffectivePrecision == MathPrecision.Fp32 ? "fast" : $"fast {kernels.EffectivePrecision.Name()}";

    /// <summary>The verdict for the kernels' current mode: cached, or checked now and cached.</summary>
    private static Verdict Check(IlgpuDevice gpu, IlgpuKernels kernels, Action<string> log, string cacheFile, IReadOnlyList<OpCase>? cases)
    {
        var key = new Verdict(gpu.Accelerator.Name, DriverOf(gpu), Build, ModeKey(kernels), false, null, null, 0, default);
        var cache = Load(cacheFile, log);
        var verdict = cache.FirstOrDefault(v => SameKey(v, key));
        if (verdict is null)
        {
            log($"self-check: {key.Gpu} (driver {key.Driver}, {key.Kernels} kernels) against the CPU backend, once for this GPU, driver, build and mode...");
            var clock = Stopwatch.StartNew();
            verdict = Run(gpu, key, cases ?? OpCatalog.All, log);
            log(verdict.Pass
                ? $"self-check: {verdict.Checks} kernel checks pass ({clock.Elapsed.TotalSeconds:F1} s); cached in {cacheFile}"
                : $"self-check: FAILED at {verdict.Failed} after {clock.Elapsed.TotalSeconds:F1} s; cached in {cacheFile}");
            cache.RemoveAll(v => SameKey(v, key));
            cache.Add(verdict);
            Save(cacheFile, cache, log);
        }
        return verdict;
    }

    /// <summary>Runs the cases; a mismatch is a verdict (cached by the caller). A kernel that cannot run at all (out of device
    /// memory, a lost context, a driver or compiler error) is no verdict on the kernels: the command stops with one line
    /// naming the kernel and the error, and nothing is cached, so the check runs again next time.</summary>
    private static Verdict Run(IlgpuDevice gpu, Verdict key, IReadOnlyList<OpCase> cases, Action<string> log)
    {
        int done = 0;
        foreach (var c in cases)
        {
            CheckResult result;
            try
            {
                result = Checker.CompareDevices(c, gpu);
            }
            catch (OutOfDeviceMemoryException e)
            {
                throw new OutOfDeviceMemoryException($"GPU self-check: kernel '{c.Name}' ran out of device memory ({OneLine(e.Message)}); nothing cached, it runs again next time", e);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                log($"self-check: kernel '{c.Name}' could not run; not cached, it runs again next time");
                throw new SelfCheckFailedException(
                    $"GPU self-check could not run kernel '{c.Name}' on {key.Gpu} (driver {key.Driver}): {e.GetType().Name}: {OneLine(e.Message)}; " +
                    "run with --device cpu, or DDPM_SELF_CHECK=off to skip the check (not cached: it runs again next time)");
            }
            done++;
            if (!result.Pass)
            {
                var detail = result.Detail.TrimEnd(' ', ';');
                return key with { Failed = c.Name, Detail = $"max err {result.MaxError:E2}{(detail.Length > 0 ? ": " + detail : "")}", Checks = done, CheckedAt = DateTime.UtcNow };
            }
        }
        return key with { Pass = true, Checks = done, CheckedAt = DateTime.UtcNow };
    }

    private static bool SameKey(Verdict a, Verdict b) => a.Gpu == b.Gpu && a.Driver == b.Driver && a.Build == b.Build && a.Kernels == b.Kernels;

    /// <summary>The build's identity (<see cref="KernelPtx.Build"/>: the module version ids of the assemblies whose code
    /// runs in the kernels).</summary>
    public static string Build => KernelPtx.Build;

    private static string DriverOf(IlgpuDevice gpu) => gpu.Accelerator.Device switch
    {
        CudaDevice cuda => CudaDriver.Status.DriverVersion > 0 ? CudaDriver.Status.VersionText : cuda.DriverVersion.ToString(),
        CLDevice cl => $"{cl.PlatformName} {cl.PlatformVersion}",
        _ => "ILGPU simulator",
    };

    /// <summary>A cache file holds a few verdicts: anything larger is not one of ours.</summary>
    private const int MaxCacheBytes = 1 << 20;

    /// <summary>
    /// The cached verdicts, validated like any other file: read bounded (a FIFO or device in its place is not opened), every
    /// entry whole (no null entry or field). A damaged cache is ignored with one line (<paramref name="log"/>), checked again
    /// and rewritten.
    /// </summary>
    private static List<Verdict> Load(string file, Action<string> log)
    {
        string? problem;
        try
        {
            var bytes = Durable.ReadBounded(file, MaxCacheBytes);
            if (bytes is null)
            {
                return [];
            }
            var list = bytes.Length == 0 ? null : JsonSerializer.Deserialize<List<Verdict?>>(bytes);
            problem = list is null ? "empty, or not a regular file"
                : list.Any(v => v is null || v.Gpu is null || v.Driver is null || v.Build is null || v.Kernels is null) ? "an entry is null or lacks a field"
                : null;
            if (problem is null)
            {
                return [.. list!.OfType<Verdict>()];
            }
        }
        catch (Exception e) when (e is JsonException or IOException or UnauthorizedAccessException or NotSupportedException)
        {
            problem = OneLine(e.Message);
        }
        log($"self-check: ignored the damaged cache {file} ({problem}); checking again, and it is rewritten");
        return [];
    }

    private static void Save(string file, List<Verdict> cache, Action<string> log)
    {
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(file))!);
            Durable.WriteAtomically(file, s => JsonSerializer.Serialize(s, cache, Json));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log($"self-check: could not cache the verdict in {file} ({OneLine(e.Message)}); it runs again next time");
        }
    }

    private static string OneLine(string message) => string.Join(' ', message.Split(['\n', '\r', '\t'], StringSplitOptions.RemoveEmptyEntries));
}

/// <summary>A GPU kernel disagreed with the CPU backend in the self-check; the message names it.</summary>
public sealed class SelfCheckFailedException(string message) : Exception(message);
