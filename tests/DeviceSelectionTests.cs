using System.Diagnostics;
using System.Reflection;
using Ddpm.Tensors;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace Ddpm.Tests;

/// <summary>
/// How CUDA is found and how its failures are reported. A fake libcuda.so.1 (compiled here with the C
/// compiler, whose cuInit returns what a toolkit's stub returns) stands in for a broken driver: the
/// probe names the error, and a real <c>ddpm</c> process with the fake first on LD_LIBRARY_PATH says it
/// in one line from <c>info</c>, from <c>auto</c>, and as the error of <c>--device cuda</c>.
/// Also the --gpu-kernels switch. In the CLI collection: one test runs ddpm in-process, swapping the console.
/// </summary>
[Collection(CliCollection.Name)]
public sealed class DeviceSelectionTests : IDisposable
{
    private const int StubLibrary = 34; // CUDA_ERROR_STUB_LIBRARY

    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-devsel").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void TheDriversVersionedNameComesBeforeTheToolkitsStubName()
    {
        var names = IlgpuDevice.NativeResolver.CudaCandidates;
        if (OperatingSystem.IsWindows())
        {
            Assert.Equal(["nvcuda.dll"], names);
            return;
        }
        Assert.True(names.ToList().IndexOf("libcuda.so.1") < names.ToList().IndexOf("libcuda.so"), string.Join(", ", names));
        // WSL2's folder, where it exists, before anything the library path could shadow it with.
        if (Directory.Exists(IlgpuDevice.NativeResolver.WslLibraryFolder))
        {
            Assert.StartsWith(IlgpuDevice.NativeResolver.WslLibraryFolder, names[0]);
        }
    }

    [Fact]
    public void CudaDevicesAreAddedWithoutIlgpusOwnResolver()
    {
        // The builder's registry that AddCuda fills: if ILGPU renames it, CUDA would go back to ILGPU's
        // Cuda() step and its WSL2 resolver (which throws beside ours), so this pins it.
        using var context = Context.Create(b => Assert.NotNull(IlgpuDevice.NativeResolver.RegistryOf(b)));
        // Two contexts in a row: under WSL2 ILGPU's own Cuda() threw on the second one.
        using var first = IlgpuDevice.CreateContext();
        using var second = IlgpuDevice.CreateContext();
        Assert.Equal(first.Devices.Length, second.Devices.Length);
        Assert.False(IlgpuDevice.NativeResolver.HostResolverFirst);
    }

    [Fact]
    public void NoDriverIsSaidAsSuch()
    {
        var status = CudaDriver.Probe([Path.Combine(_dir, "absent", "libcuda.so.1")]);
        Assert.False(status.Present);
        Assert.Contains("no NVIDIA driver", status.Problem);
    }

    [SkippableFact]
    public void AStubDriverIsReportedByItsErrorName()
    {
        var stub = FakeDriver("stub", initResult: StubLibrary, devices: 0);
        var status = CudaDriver.Probe([stub]);
        Assert.True(status.Present);
        Assert.Equal(StubLibrary, status.Error);
        Assert.Equal("CUDA_ERROR_STUB_LIBRARY: fake: CUDA driver is a stub library, from " + stub, status.Problem);
        Assert.Equal("12.4", status.VersionText);
    }

    [SkippableFact]
    public void ADriverWithoutDevicesIsReported()
    {
        var status = CudaDriver.Probe([FakeDriver("empty", initResult: 0, devices: 0)]);
        Assert.Equal(0, status.Error);
        Assert.Contains("shows no CUDA device", status.Problem);
        Assert.Null(CudaDriver.Probe([FakeDriver("one", initResult: 0, devices: 1)]).Problem);
    }

    [SkippableFact]
    public void ALibraryThatIsNotTheDriverIsNotMistakenForIt()
    {
        Skip.If(OperatingSystem.IsWindows(), "libc is a Linux library");
        var status = CudaDriver.Probe(["libc.so.6"]);
        Assert.True(status.Present);
        Assert.Contains("not a CUDA driver", status.Problem);
    }

    /// <summary>The end-to-end case: a real ddpm process whose dlopen finds the fake stub first.</summary>
    [SkippableFact]
    public void AutoInfoAndDeviceCudaSayTheDriverErrorInOneLine()
    {
        Skip.If(OperatingSystem.IsWindows(), "LD_LIBRARY_PATH is Linux's");
        var stub = FakeDriver("stub", initResult: StubLibrary, devices: 0);
        var folder = Path.Combine(_dir, "lib");
        Directory.CreateDirectory(folder);
        File.Copy(stub, Path.Combine(folder, "libcuda.so.1"));

        var info = RunDdpm(folder, "info");
        Assert.Equal(0, info.Code);
        var listed = info.Out.Split('\n').Single(l => l.TrimStart().StartsWith("cuda", StringComparison.Ordinal));
        Assert.Contains("unavailable (CUDA_ERROR_STUB_LIBRARY: fake: CUDA driver is a stub library", listed);
        var why = info.Out.Split('\n').Single(l => l.StartsWith("why:", StringComparison.Ordinal));
        Assert.Contains("cuda: unavailable (CUDA_ERROR_STUB_LIBRARY", why);
        Assert.EndsWith("using the managed CPU backend", why.TrimEnd());

        var cuda = RunDdpm(folder, "bench", "--device", "cuda", "--preset", "tiny", "--batch", "1", "--steps", "1");
        Assert.Equal(1, cuda.Code);
        var line = Assert.Single(cuda.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith("ddpm: --device cuda: CUDA_ERROR_STUB_LIBRARY: fake: CUDA driver is a stub library", line);
        Assert.Contains("--device cpu", line);
    }

    [Fact]
    public void GpuKernelsIsAGlobalSwitchScopedToItsCommand()
    {
        var wrong = CliTests.Run("train", "--gpu-kernels", "wild");
        Assert.Equal(Ddpm.Cli.ExitCodes.Usage, wrong.Code);
        Assert.Contains("wild", wrong.Err);
        var before = Environment.GetEnvironmentVariable(Ddpm.Cli.Program.GpuKernelsVariable);
        var info = CliTests.Run("info", "--gpu-kernels", "simple");
        Assert.Equal(0, info.Code);
        Assert.Equal(before, Environment.GetEnvironmentVariable(Ddpm.Cli.Program.GpuKernelsVariable));
    }

    /// <summary>`bench --peak`'s kernel, compiled for sm_90 as a GPU would: the FMA chains stay fused
    /// multiply-adds in registers (no .local), so its FLOP count (2 per FMA) is what runs.</summary>
    [Fact]
    public void ThePeakKernelIsFusedMultiplyAddsInRegisters()
    {
        using var context = Context.Create(b => b.CPU().EnableAlgorithms());
        var caps = new CudaCapabilityContext(CudaArchitecture.SM_90);
        Assert.True(CudaAccelerator.TryGetInstructionSet(CudaArchitecture.SM_90, CudaDriverVersion.FromMajorMinor(13, 0), out _, out var isa));
        using var backend = new PTXBackend(context, caps, CudaArchitecture.SM_90, isa, null);
        var method = typeof(Ddpm.Cli.BenchCommand).GetMethod("PeakKernel", BindingFlags.Static | BindingFlags.NonPublic)!;
        var ptx = ((PTXCompiledKernel)backend.Compile(EntryPointDescription.FromImplicitlyGroupedKernel(method), default)).PTXAssembly;
        if (Environment.GetEnvironmentVariable("DDPM_PTX_DIR") is { Length: > 0 } dir)
        {
            Directory.CreateDirectory(dir);
            File.WriteAllText(Path.Combine(dir, "BenchCommand.PeakKernel.ptx"), ptx);
        }
        Assert.DoesNotContain(".local", ptx);
        Assert.DoesNotContain("call", ptx);
        // 32 multiply-adds a trip, mul.f32 then add.f32 with no rounding mode: ptxas contracts each pair
        // into one FFMA (its default), which only a GPU's SASS can show.
        int muls = ptx.Split("mul.f32").Length - 1, adds = ptx.Split("add.f32").Length - 1;
        Assert.True(muls >= 32 && adds >= 32, $"{muls} mul.f32 and {adds} add.f32 in the peak kernel's PTX");
        Assert.DoesNotContain("mul.rn.f32", ptx);
    }

    /// <summary>Compiles a fake CUDA driver: cuInit returns <paramref name="initResult"/>, the driver is
    /// 12.4 with <paramref name="devices"/> devices, and the error strings name the stub error.</summary>
    private string FakeDriver(string name, int initResult, int devices)
    {
        Skip.If(OperatingSystem.IsWindows(), "the fake driver is a Linux shared library");
        var cc = new[] { "/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang" }.FirstOrDefault(File.Exists);
        Skip.If(cc is null, "no C compiler to build the fake libcuda with");
        var source = Path.Combine(_dir, $"{name}.c");
        File.WriteAllText(source, $$"""
            int cuInit(unsigned int flags) { return {{initResult}}; }
            int cuDriverGetVersion(int *v) { *v = 12040; return 0; }
            int cuDeviceGetCount(int *n) { *n = {{devices}}; return 0; }
            int cuGetErrorName(int e, const char **s) { *s = e == 34 ? "CUDA_ERROR_STUB_LIBRARY" : "CUDA_ERROR_UNKNOWN"; return 0; }
            int cuGetErrorString(int e, const char **s) { *s = "fake: CUDA driver is a stub library"; return 0; }
            """);
        var library = Path.Combine(_dir, $"{name}.so");
        using var p = Process.Start(new ProcessStartInfo(cc!, ["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", library, source])
        {
            UseShellExecute = false,
            RedirectStandardError = true,
        })!;
        var err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{cc} failed: {err}");
        return library;
    }

    private static (int Code, string Out, string Err) RunDdpm(string libraryPath, params string[] args)
    {
        var info = new ProcessStartInfo(DdpmChild.Dotnet)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "ddpm.dll"));
        foreach (var a in args)
        {
            info.ArgumentList.Add(a);
        }
        info.Environment["LD_LIBRARY_PATH"] = libraryPath;
        info.Environment.Remove("DDPM_GPU_KERNELS");
        using var p = Process.Start(info)!;
        var output = p.StandardOutput.ReadToEndAsync();
        var error = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(120_000), $"ddpm {string.Join(' ', args)} did not finish in 120 s");
        return (p.ExitCode, output.Result, error.Result);
    }
}
