using System.Text.Json;
using Ddpm.Cli;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>
/// The self-check before a GPU run, on ILGPU's CPU accelerator (forced: it is skipped there by
/// default): the verdict is cached by GPU, driver, build and kernel mode; a wrong kernel result stops
/// the run with one line naming the kernel; the CPU backend is never checked.
/// </summary>
[Collection(IlgpuCollection.Name)]
public sealed class SelfCheckTests(IlgpuFixture fixture) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-selfcheck").FullName;
    private readonly List<string> _log = [];

    private string CacheFile => Path.Combine(_dir, "cache", SelfCheck.FileName);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>A kernel that is wrong on the GPU only: the ILGPU device writes 2.5 where the CPU writes 2.</summary>
    private static readonly OpCase Poisoned = new()
    {
        Name = "poisoned fill",
        Inputs = [],
        Forward = (s, x) =>
        {
            var y = s.Output(3, 5);
            Elementwise.Fill(y, s.Device.IsIlgpu ? 2.5f : 2f);
            return [y];
        },
    };

    private static IReadOnlyList<OpCase> Good => [OpCatalog.Get("fill"), OpCatalog.Get("add"), OpCatalog.Get("silu")];

    private List<SelfCheck.Verdict> Cached() => JsonSerializer.Deserialize<List<SelfCheck.Verdict>>(File.ReadAllText(CacheFile))!;

    [Fact]
    public void APassIsCachedByGpuDriverBuildAndKernelMode()
    {
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, Good, force: true);
        Assert.Contains(_log, l => l.Contains("3 kernel checks pass"));
        var v = Assert.Single(Cached());
        Assert.True(v.Pass);
        Assert.Equal(fixture.Device.Accelerator.Name, v.Gpu);
        Assert.Equal(SelfCheck.Build, v.Build);
        Assert.Equal(fixture.Kernels.Simple ? "simple" : "fast", v.Kernels);
        Assert.Equal(3, v.Checks);

        // Cached: nothing runs, so even a wrong kernel in the list goes unseen.
        _log.Clear();
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, [Poisoned], force: true);
        Assert.Empty(_log);

        // The other kernel mode is another key: checked again, and both verdicts kept.
        bool simple = fixture.Kernels.Simple;
        fixture.Kernels.Simple = !simple;
        try
        {
            SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, Good, force: true);
        }
        finally
        {
            fixture.Kernels.Simple = simple;
        }
        Assert.Contains(_log, l => l.Contains("3 kernel checks pass"));
        Assert.Equal(["fast", "simple"], Cached().Select(c => c.Kernels).Order());
    }

    [Fact]
    public void AWrongKernelStopsTheRunWithOneLineNamingIt()
    {
        var e = Assert.Throws<SelfCheckFailedException>(() =>
            SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, [OpCatalog.Get("fill"), Poisoned, OpCatalog.Get("add")], force: true));
        Assert.DoesNotContain('\n', e.Message);
        Assert.Contains("kernel 'poisoned fill' differs from the CPU backend", e.Message);
        Assert.Contains("out0[0] cpu 2 IlgpuCpu 2.5", e.Message);
        Assert.Contains("--device cpu", e.Message);
        var v = Assert.Single(Cached());
        Assert.False(v.Pass);
        Assert.Equal("poisoned fill", v.Failed);
        Assert.Equal(2, v.Checks); // stopped at the failing kernel: "add" never ran

        // The failure is cached too: the next run stops at once, with the same kernel named.
        _log.Clear();
        var again = Assert.Throws<SelfCheckFailedException>(() => SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, Good, force: true));
        Assert.Contains("'poisoned fill'", again.Message);
        Assert.Empty(_log);
    }

    /// <summary>A kernel that cannot run (a driver error, a lost context, no memory) stops the command naming it, but is no
    /// verdict on the kernels: nothing is cached, and the next run checks again.</summary>
    [Fact]
    public void AKernelThatThrowsStopsTheRunNamingItAndIsNotCached()
    {
        var throwing = new OpCase
        {
            Name = "throwing op",
            Inputs = [],
            Forward = (s, x) => s.Device.IsIlgpu ? throw new InvalidOperationException("launch failed") : [s.Zeros(1)],
        };
        var e = Assert.Throws<SelfCheckFailedException>(() => SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, [throwing], force: true));
        Assert.Contains("kernel 'throwing op'", e.Message);
        Assert.Contains("InvalidOperationException: launch failed", e.Message);
        Assert.Contains("not cached", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.False(File.Exists(CacheFile));
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, Good, force: true);
        Assert.True(Assert.Single(Cached()).Pass);
    }

    [SkippableFact]
    public void TheCpuBackendAndAnUnforcedSimulatorAreNotChecked()
    {
        Skip.If(Environment.GetEnvironmentVariable("DDPM_SELF_CHECK") is { Length: > 0 }, "DDPM_SELF_CHECK is set in this environment");
        SelfCheck.Ensure(CpuDevice.Instance, _log.Add, CacheFile, [Poisoned], force: true);
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, [Poisoned]);
        Assert.Empty(_log);
        Assert.False(File.Exists(CacheFile));
    }

    [Fact]
    public void AnUnreadableCacheIsCheckedAgainAndRewritten()
    {
        Directory.CreateDirectory(Path.GetDirectoryName(CacheFile)!);
        File.WriteAllText(CacheFile, "{ not json");
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, Good, force: true);
        Assert.True(Assert.Single(Cached()).Pass);
    }

    /// <summary>The real thing: every case of the catalogue (what a GPU run checks) passes on the simulator.</summary>
    [Fact]
    public void TheWholeCataloguePasses()
    {
        SelfCheck.Ensure(fixture.Device, _log.Add, CacheFile, force: true);
        var v = Assert.Single(Cached());
        Assert.True(v.Pass, $"{v.Failed}: {v.Detail}");
        Assert.Equal(OpCatalog.All.Count, v.Checks);
    }
}
