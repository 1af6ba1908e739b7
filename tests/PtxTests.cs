using System.Text.RegularExpressions;
using Ddpm.Kernels;
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
    /// <summary>The listing `check --ptx` and `check --sass` compile (<see cref="IlgpuKernels.Listing"/>: nothing compiled for
    /// the device) names the same kernels, with the same grouping and bounds, as the set a device loads; its launchers
    /// throw.</summary>
    [Fact]
    public void TheListingNamesWhatTheDeviceLoads()
    {
        var listing = IlgpuKernels.Listing(fixture.Device);
        var listed = listing.Compilable.ToHashSet();
        Assert.Equal(listing.Compilable.Count, listed.Count);
        // The device's set as it is now, after other tests: every listed kernel, and beyond them only the simulator's
        // multi-pass twin of a GPU kernel declared for loading at first use (the K steps of one tap), loaded since.
        var loaded = fixture.Kernels.Compilable;
        Assert.Subset(loaded.ToHashSet(), listed);
        Assert.All(loaded.Where(k => !listed.Contains(k)), k =>
        {
            Assert.Equal(nameof(TiledGemm.KernelInPasses), k.Method.Name);
            Assert.Contains(listed, l => l.Method.Name == nameof(TiledGemm.Kernel) && l.Method.GetGenericArguments()[0] == k.Method.GetGenericArguments()[0]);
        });
        Assert.Empty(listing.Launches);
        using var x = Ddpm.Tensors.Tensor.Empty(fixture.Device, 4);
        var e = Assert.Throws<InvalidOperationException>(() => listing.Elementwise.Fill(listing.Stream, 4, x.View, 1f));
        Assert.Contains("listed, not loaded", e.Message);
    }

    /// <summary>A folder of PTX is taken only under the stamp it was saved with: another build, ILGPU, CUDA version or
    /// kernel set gives none and a reason, and so does a folder whose stamp was never written (a save cut short).</summary>
    [Fact]
    public void APtxFolderIsTakenOnlyUnderItsOwnStamp()
    {
        var order = KernelPtx.TableOrder(fixture.Kernels.Compilable.Take(3));
        CudaArchitecture[] architectures = [CudaArchitecture.SM_80, CudaArchitecture.SM_90];
        string[][] ptx = [[.. order.Select((k, i) => $"// {i} sm_80")], [.. order.Select((k, i) => $"// {i} sm_90")]];
        string folder = Directory.CreateTempSubdirectory("ddpm-ptx-").FullName;
        try
        {
            string stamp = KernelPtx.Stamp(order, architectures, Cli.CheckCommand.ToolkitCuda);
            Assert.Contains(KernelPtx.Build, stamp);
            Assert.Null(KernelPtx.Load(folder, stamp, order, architectures, out string why));
            Assert.Contains("no stamp.txt", why);
            KernelPtx.Save(folder, stamp, order, architectures, ptx);
            Assert.Equal(ptx, KernelPtx.Load(folder, stamp, order, architectures, out _));
            string other = KernelPtx.Stamp(order, architectures, CudaDriverVersion.FromMajorMinor(12, 4));
            Assert.NotEqual(stamp, other);
            Assert.Null(KernelPtx.Load(folder, other, order, architectures, out why));
            Assert.Contains("another build, ILGPU, CUDA version or kernel set", why);
            Assert.NotEqual(stamp, KernelPtx.Stamp(order.Take(2).ToList(), architectures, Cli.CheckCommand.ToolkitCuda));
            File.Delete(Directory.GetFiles(Path.Combine(folder, "sm_90")).First());
            Assert.Null(KernelPtx.Load(folder, stamp, order, architectures, out why));
            Assert.StartsWith(folder, why);
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>The tests compile at the PTX ISA of the toolkit scripts/cuda-toolkit.sh fetches, so that CI's compiler step
    /// can take their PTX.</summary>
    [Fact]
    public void TheTestsCompileForTheToolkitTheScriptFetches()
    {
        string script = File.ReadAllText(Path.Combine(CliTests.RepoRoot(), "scripts", "cuda-toolkit.sh"));
        var cuda = Cli.CheckCommand.ToolkitCuda;
        Assert.Contains($"CUDA {cuda.Major}.{cuda.Minor} from Debian", script);
        Assert.Contains($"ddpm/cuda-{cuda.Major}.{cuda.Minor}", script);
    }

    [Fact]
    public void EveryLoadedKernelCompilesForSm90()
    {
        var loaded = fixture.GpuKernels.Concat(fixture.Kernels.Compilable).Distinct().ToList();
        Assert.True(loaded.Count >= 30, $"only {loaded.Count} kernels were loaded");
        var failures = new List<string>();
        foreach (var kernel in loaded)
        {
            try
            {
                string ptx = fixture.Sm90Ptx(kernel);
                Assert.Contains(".entry", ptx);
                // DDPM_PTX_DIR=folder keeps each kernel's PTX for reading (`ddpm check --ptx DIR` writes the same files).
                if (Environment.GetEnvironmentVariable("DDPM_PTX_DIR") is { Length: > 0 } dir)
                {
                    Directory.CreateDirectory(dir);
                    File.WriteAllText(Path.Combine(dir, KernelPtx.Name(kernel) + ".ptx"), ptx);
                }
                output.WriteLine($"{KernelPtx.Name(kernel)}: {ptx.Length} chars of PTX");
            }
            catch (Exception e)
            {
                failures.Add($"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}: {e.GetType().Name}: {e.Message}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>
    /// The tiled (explicitly grouped) kernels keep their register tiles in registers and stage operands in shared
    /// memory: their PTX for sm_90 has no <c>.local</c> declarations (an array indexed in a loop would land there; the
    /// tensor-core kernels' inline PTX operands are scalar slots ptxas promotes, and the compiler table checks that),
    /// declares <c>.shared</c> memory and synchronises with <c>bar.sync</c>, and declares at most 48 KB of static
    /// shared memory (the per-group limit without an opt-in, which ILGPU 1.5.3 cannot request).
    /// </summary>
    [Fact]
    public void TiledKernelsUseSharedMemoryAndNoLocalArrays()
    {
        // What a GPU loads, and this fixture's simulator's own twins.
        var grouped = fixture.GpuKernels.Concat(fixture.Kernels.Compilable).Where(k => k.Grouped).Distinct().ToList();
        Assert.True(grouped.Count >= 4, $"only {grouped.Count} explicitly grouped kernels were loaded");
        // The reductions by name, so a tiled kernel that stops being loaded (and so checked here) fails instead of vanishing.
        var names = grouped.Select(k => $"{k.Method.DeclaringType?.Name}.{k.Method.Name}").ToHashSet();
        foreach (var expected in new[] { "TiledReduce.PartialKernel", "TiledReduce.SegmentsKernel", "TiledReduce.ChannelPartialKernel",
            "TiledReduce.RowSumsKernel", "TiledReduce.FlagNonFiniteKernel", "TiledNorm.ForwardKernel", "TiledNorm.BackwardKernel" })
        {
            Assert.Contains(expected, names);
        }
        var shared = new Regex(@"\.shared\s+(?:\.align\s+\d+\s+)?\.b8\s+\w+\[(\d+)\]");
        var failures = new List<string>();
        foreach (var kernel in grouped)
        {
            string name = $"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}<{string.Join(",", kernel.Method.GetGenericArguments().Select(t => t.Name))}>";
            string ptx = fixture.Sm90Ptx(kernel);
            long sharedBytes = shared.Matches(ptx).Sum(m => long.Parse(m.Groups[1].Value));
            // PTX registers are virtual (ptxas allocates the hardware ones): printed for docs/gpu.md, not asserted.
            string regs = string.Join(" ", Regex.Matches(ptx, @"\.reg\s+\.(\w+)\s+%\w+<(\d+)>").Select(m => $"{m.Groups[1].Value}:{m.Groups[2].Value}"));
            output.WriteLine($"{name}: {sharedBytes} shared bytes; virtual registers {regs}");
            if (kernel.Method.Name == nameof(TiledGemm.TensorKernel))
            {
                // The mma's operands pass to the inline PTX through locals whose address is taken (CudaAsm.EmitRef): scalar
                // 4-byte slots, which ptxas keeps in registers (the compiler table, check --sass, fails on any LDL/STL). An
                // array in local memory would still fail here.
                var arrays = Regex.Matches(ptx, @"\.local\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\]").Where(m => m.Groups[1].Value != "4").ToList();
                if (arrays.Count > 0) failures.Add($"{name}: {arrays.Count} local arrays in PTX beyond the mma's scalar operand slots");
                if (!ptx.Contains("mma.sync.aligned.m16n8k8", StringComparison.Ordinal)) failures.Add($"{name}: no mma.sync in PTX");
            }
            else if (ptx.Contains(".local", StringComparison.Ordinal)) failures.Add($"{name}: .local in PTX");
            if (!ptx.Contains(".shared", StringComparison.Ordinal)) failures.Add($"{name}: no .shared in PTX");
            if (!ptx.Contains("bar.sync", StringComparison.Ordinal)) failures.Add($"{name}: no bar.sync in PTX");
            if (sharedBytes == 0 || sharedBytes > 48 * 1024) failures.Add($"{name}: {sharedBytes} bytes of static shared memory (want 1..49152)");
            // The multi-pass form's need, which a launch checks the device against, is what its PTX declares.
            if (kernel.Method.Name == nameof(TiledGemm.KernelInPasses) && sharedBytes != TiledGemm.InPassesSharedBytes)
            {
                failures.Add($"{name}: {sharedBytes} bytes of static shared memory, TiledGemm.InPassesSharedBytes says {TiledGemm.InPassesSharedBytes}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>
    /// A convolution's B is gathered on a GPU from a view at the thread's pixel, whose base may be negative (a window over
    /// the first image's padding). ILGPU offsets a view by an int as unsigned (mul.wide.u32), which would put such a view
    /// 16 GiB on; TiledGemm's PixelView sign-extends the base by shifts, so its PTX must do so (shr.s64 by 32, then the
    /// 64-bit multiply-add onto b's pointer). No simulator takes this path: this is its check.
    /// </summary>
    [Fact]
    public void TheGpuViewsAtAPixelSignExtendItsBase()
    {
        // The kernels a GPU loads (this fixture's simulator loads the FFMA core's multi-pass twins instead).
        var tapped = fixture.GpuKernels.Where(k => k.Grouped && k.Method.Name is nameof(TiledGemm.Kernel) or nameof(TiledGemm.TensorKernel)
            && k.Method.GetGenericArguments()[0].Name.StartsWith("Conv", StringComparison.Ordinal)).ToList();
        Assert.True(tapped.Count(k => k.Method.Name == nameof(TiledGemm.Kernel)) >= 3, $"only {tapped.Count} tiled convolution kernels a GPU loads");
        var signExtended = new Regex(@"shr\.s64\s+(%rd\d+),\s*%rd\d+,\s*32;\s*mad\.lo\.u64\s+%rd\d+,\s*\1,\s*4,");
        foreach (var kernel in tapped)
        {
            string ptx = fixture.Sm90Ptx(kernel);
            Assert.True(signExtended.IsMatch(ptx), $"{KernelPtx.Name(kernel)}: the pixel view's base is not sign-extended in its PTX");
        }
    }
}
