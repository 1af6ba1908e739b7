using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>
/// Every environment variable the program reads, each validated like a flag before a command runs: a value it does not
/// take is a usage error naming the variable (exit 2), never silently ignored. The README's table of them is held to
/// this list by a test.
/// </summary>
public static class EnvironmentSettings
{
    /// <summary>One variable: its name, what it takes (for the message and the README), and the check of a set value.</summary>
    public sealed record Variable(string Name, string Takes, string Does, Func<string, bool> Valid);

    /// <summary>The variables, in the README's order.</summary>
    public static IReadOnlyList<Variable> All { get; } =
    [
        new(Program.GpuKernelsVariable, "fast or simple", "the GPU kernels, as --gpu-kernels",
            v => v.Trim().ToLowerInvariant() is "fast" or "simple"),
        new("DDPM_SIMD", "avx512, avx2, 128 or scalar", "caps the CPU backend's SIMD level (never above the machine's)",
            v => CpuSimd.Parse(v) is not null),
        new("DDPM_SELF_CHECK", "on, off or force", "the GPU self-check: on (the default), off (skipped), force (also on ILGPU's CPU accelerator)",
            v => v.Trim().ToLowerInvariant() is "on" or "off" or "force"),
        new("DDPM_DEBUG", "1", "an internal error prints its stack trace",
            v => v.Trim() is "1" or "0" or "true" or "false"),
        new("XDG_CACHE_HOME", "an absolute folder", "where the ddpm cache lives (MNIST, classifiers, the self-check's verdicts); default ~/.cache",
            v => Path.IsPathFullyQualified(v) && !File.Exists(v)),
        new("DDPM_TEST_SAVE_DELAY_MS", "0..60000", "fault injection only: milliseconds a checkpoint save waits before its rename",
            v => int.TryParse(v, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int ms) && ms <= 60_000),
    ];

    /// <summary>The CPU device's instruction level DDPM_SIMD asks for (checked before any command runs), or null.</summary>
    public static SimdLevel? Simd => CpuSimd.Parse(Environment.GetEnvironmentVariable("DDPM_SIMD")) is { } level
        ? (level > CpuSimd.Max ? CpuSimd.Max : level)
        : null;

    /// <summary>Throws a <see cref="Ddpm.Diffusion.UsageException"/> naming the first variable set to a value it does not take
    /// (an empty value counts as unset).</summary>
    public static void Check()
    {
        foreach (var v in All)
        {
            var value = Environment.GetEnvironmentVariable(v.Name);
            if (!string.IsNullOrEmpty(value) && !v.Valid(value))
            {
                throw new Ddpm.Diffusion.UsageException($"environment variable {v.Name}={Shown(value)}: takes {v.Takes}");
            }
        }
    }

    private static string Shown(string value) => value.Length > 60 ? value[..60] + "..." : value.ReplaceLineEndings(" ");
}
