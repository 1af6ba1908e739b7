using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>
/// Every kernel the engine loads compiles to PTX for an sm_90 (H100) device, with no GPU present.
/// Catches what the CPU accelerator forgives: a managed call without a GPU intrinsic (XMath
/// without EnableAlgorithms, a BCL method ILGPU cannot translate), unsupported types.
/// </summary>
[Collection(IlgpuCollection.Name)]
public sealed class PtxTests(IlgpuFixture fixture, ITestOutputHelper output)
{
    [Fact]
    public void EveryLoadedKernelCompilesForSm90()
    {
        var loaded = fixture.Kernels.Loaded;
        Assert.True(loaded.Count >= 30, $"only {loaded.Count} kernels were loaded");
        var caps = new CudaCapabilityContext(CudaArchitecture.SM_90);
        Assert.True(CudaAccelerator.TryGetInstructionSet(CudaArchitecture.SM_90, CudaDriverVersion.FromMajorMinor(13, 0), out _, out var isa));
        using var backend = new PTXBackend(fixture.Device.Context, caps, CudaArchitecture.SM_90, isa, null);
        var failures = new List<string>();
        foreach (var kernel in loaded)
        {
            var entry = kernel.Grouped
                ? EntryPointDescription.FromExplicitlyGroupedKernel(kernel.Method)
                : EntryPointDescription.FromImplicitlyGroupedKernel(kernel.Method);
            try
            {
                var compiled = (PTXCompiledKernel)backend.Compile(entry, default);
                Assert.Contains(".entry", compiled.PTXAssembly);
                // DDPM_PTX_DIR=folder keeps each kernel's PTX for reading.
                if (Environment.GetEnvironmentVariable("DDPM_PTX_DIR") is { Length: > 0 } dir)
                {
                    Directory.CreateDirectory(dir);
                    File.WriteAllText(Path.Combine(dir, $"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}.ptx"), compiled.PTXAssembly);
                }
                output.WriteLine($"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}: {compiled.PTXAssembly.Length} chars of PTX");
            }
            catch (Exception e)
            {
                failures.Add($"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}: {e.GetType().Name}: {e.Message}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }
}
