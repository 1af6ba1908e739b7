using System.CommandLine;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using ILGPU.Runtime.Cuda;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary><c>ddpm check</c>: every op on an ILGPU device against the managed CPU backend and
/// against finite differences, as one table (what scripts/gpu-check.sh runs on a GPU box). With <c>--ptx DIR</c>
/// instead: the PTX of every kernel the engine loads, for <c>ptxas -v</c>.</summary>
public static class CheckCommand
{
    /// <summary>The command and its options.</summary>
    public static Command Build()
    {
        var device = new Option<string>("--device")
        {
            Description = "the ILGPU device to check against the managed CPU backend: cuda | opencl | ilgpu-cpu",
            DefaultValueFactory = _ => "cuda",
        };
        device.AcceptOnlyFromAmong("cuda", "opencl", "ilgpu-cpu");
        var ptx = new Option<string?>("--ptx")
        {
            Description = "instead of the checks: write the PTX of every kernel the engine loads into this folder (tiled/ for the " +
                "explicitly grouped kernels, implicit/ for the rest), compiled by ILGPU's PTX backend on this machine: no GPU needed; for ptxas -v",
        }.IsPath();
        var sm = new Option<int>("--sm") { Description = "the CUDA architecture --ptx compiles for, as major·10 + minor (90: sm_90, H100 and H200)", DefaultValueFactory = _ => 90 }
            .Within(30, 200);
        var cuda = new Option<string>("--cuda")
        {
            Description = "the CUDA version (toolkit or driver, major.minor) whose newest PTX ISA --ptx writes, so that version's ptxas reads it",
            DefaultValueFactory = _ => "12.0",
        };
        var sass = new Option<string?>("--sass")
        {
            Description = "instead of the checks: compile every kernel for sm_80 and sm_90 with the ptxas and nvdisasm in this folder " +
                "(scripts/cuda-toolkit.sh fetches them; no GPU needed), print registers, spills, shared memory, groups per SM and each " +
                "kernel's main-loop instruction mix, and fail when a tiled kernel breaks the rules (docs/gpu.md)",
        }.IsPath();
        var only = new Option<string?>("--only")
        {
            Description = "with --ptx: write only the kernels whose file name contains one of these comma-separated parts " +
                "(e.g. TiledGemm.Kernel.ConvForwardTile,RowSums); a part that names no kernel is an error",
        };
        var ptxFrom = new Option<string?>("--ptx-from")
        {
            Description = "with --sass: take the PTX the tests compiled into this folder (DDPM_SASS_PTX=DIR dotnet test: the same " +
                "compile, on a fresh simulator's context in the tables' order) when its stamp names this build, ILGPU, the " +
                "toolkit's CUDA version and the kernels; otherwise compile here, and say why",
        }.IsPath();
        var check = new Command("check", "Check every op on an ILGPU device against the CPU backend and finite differences; print one table.") { device, ptx, sm, cuda, sass, ptxFrom, only };
        check.SetAction(parse => Program.Guard(() =>
        {
            if (parse.GetValue(only) is not null && parse.GetValue(ptx) is null)
            {
                throw new UsageException("--only applies to --ptx");
            }
            if (parse.GetValue(ptxFrom) is not null && parse.GetValue(sass) is null)
            {
                throw new UsageException("--ptx-from applies to --sass");
            }
            return parse.GetValue(ptx) is { } folder
                ? WritePtx(folder, parse.GetValue(sm), parse.GetValue(cuda)!, parse.GetValue(only))
                : parse.GetValue(sass) is { } tools
                    ? CompilerTable(tools, parse.GetValue(ptxFrom))
                    : Run(Program.ChosenDevice(parse, device));
        }));
        return check;
    }

    /// <summary>Compiles every loaded kernel (or those <paramref name="only"/> names a part of) to PTX for
    /// sm_<paramref name="sm"/> and writes one file a kernel.</summary>
    private static int WritePtx(string folder, int sm, string cudaVersion, string? only)
    {
        Program.RequireFolder("--ptx", folder);
        var parts = cudaVersion.Split('.');
        if (parts.Length != 2 || !int.TryParse(parts[0], out int major) || !int.TryParse(parts[1], out int minor))
        {
            throw new UsageException($"--cuda {cudaVersion}: expected major.minor, e.g. 12.4");
        }
        // ILGPU's CPU accelerator shaped like a GPU (warp 32, groups up to 1,024), so every kernel is the one a GPU
        // loads (the tiled GEMM's 256-thread kernel with its launch bounds, not the simulators' multi-pass one).
        using var ilgpu = IlgpuDevice.OpenSimulator();
        var kernels = IlgpuKernels.Listing(ilgpu);
        using var compiler = new KernelPtx(ilgpu.Context, new CudaArchitecture(sm / 10, sm % 10), CudaDriverVersion.FromMajorMinor(major, minor));
        var wanted = only?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (wanted is { Length: 0 })
        {
            throw new UsageException("--only: no kernel name given");
        }
        var chosen = kernels.Compilable.Where(k => wanted is null || wanted.Any(p => KernelPtx.Name(k).Contains(p, StringComparison.Ordinal))).ToList();
        if (wanted?.FirstOrDefault(p => !chosen.Any(k => KernelPtx.Name(k).Contains(p, StringComparison.Ordinal))) is { } unknown)
        {
            throw new UsageException($"--only {unknown}: no kernel's name contains it (`ddpm check --ptx DIR` writes every kernel, named as its file)");
        }
        int tiled = 0;
        string? target = null;
        foreach (var kernel in chosen)
        {
            string sub = Path.Combine(folder, kernel.Grouped ? "tiled" : "implicit");
            Directory.CreateDirectory(sub);
            string code = compiler.Compile(kernel);
            target ??= System.Text.RegularExpressions.Regex.Match(code, @"^\.target\s+(\S+)", System.Text.RegularExpressions.RegexOptions.Multiline).Groups[1].Value;
            byte[] bytes = System.Text.Encoding.UTF8.GetBytes(code);
            Durable.WriteAtomically(Path.Combine(sub, KernelPtx.Name(kernel) + ".ptx"), s => s.Write(bytes));
            tiled += kernel.Grouped ? 1 : 0;
        }
        var isa = compiler.InstructionSet;
        // ILGPU 1.5 writes .target sm_80 at most: say what the files hold, and that ptxas -arch=sm_NN still compiles them for NN.
        string written = target is { Length: > 0 } && target != $"sm_{sm}" ? $"asked for sm_{sm}, written as .target {target} (ILGPU writes at most sm_80; ptxas -arch=sm_{sm} compiles it for sm_{sm})" : $"for sm_{sm}";
        Console.WriteLine($"wrote the PTX of {chosen.Count} kernel{(chosen.Count == 1 ? "" : "s")} {written} (PTX ISA {isa.Major}.{isa.Minor}) into {folder}: " +
            $"{tiled} tiled in tiled/, {chosen.Count - tiled} in implicit/");
        return 0;
    }

    /// <summary>The architectures <c>--sass</c> compiles for.</summary>
    public static readonly SmLimits[] SassArchitectures = [SmLimits.Sm80, SmLimits.Sm90];

    /// <summary>The CUDA version of the toolkit scripts/cuda-toolkit.sh fetches (Debian bookworm's nvidia-cuda-toolkit), whose
    /// PTX ISA the tests compile at when they leave their PTX for <c>check --sass --ptx-from</c>.</summary>
    public static readonly CudaDriverVersion ToolkitCuda = CudaDriverVersion.FromMajorMinor(11, 8);

    /// <summary>
    /// Every loaded kernel compiled by NVIDIA's own compiler for each of <see cref="SassArchitectures"/> (the PTX as a GPU
    /// would load it, at the newest ISA the toolkit's ptxas reads), read back from the machine code: one table an
    /// architecture, tiled kernels first. Exit 1, with one line a problem, when a tiled kernel breaks a rule.
    /// </summary>
    private static int CompilerTable(string tools, string? reuse)
    {
        string ptxas = Path.Combine(tools, "ptxas"), nvdisasm = Path.Combine(tools, "nvdisasm");
        if (!File.Exists(ptxas) || !File.Exists(nvdisasm))
        {
            throw new UsageException($"--sass {tools}: no ptxas and nvdisasm there (scripts/cuda-toolkit.sh fetches them and prints their folder)");
        }
        string version = Tool(ptxas, "--version");
        var release = System.Text.RegularExpressions.Regex.Match(version, @"release (\d+)\.(\d+)");
        if (!release.Success)
        {
            throw new UsageException($"--sass {tools}: ptxas --version names no CUDA release");
        }
        var cudaVersion = CudaDriverVersion.FromMajorMinor(int.Parse(release.Groups[1].Value), int.Parse(release.Groups[2].Value));
        using var ilgpu = IlgpuDevice.OpenSimulator();
        var kernels = IlgpuKernels.Listing(ilgpu);
        string work = Directory.CreateTempSubdirectory(Durable.TempMark + "sass-").FullName;
        var problems = new List<string>();
        try
        {
            Console.WriteLine($"NVIDIA's compiler on the engine's {kernels.Compilable.Count} kernels: ptxas CUDA {release.Groups[1].Value}.{release.Groups[2].Value}, " +
                "static SASS counts (nvdisasm); the main loop is the loop with the most FFMA (docs/gpu.md)");
            var order = KernelPtx.TableOrder(kernels.Compilable);
            var reports = SassArchitectures.ToDictionary(a => a, _ => new KernelReport[order.Count]);
            // ptxas and nvdisasm (separate processes) take the PTX as ILGPU writes it: one of them beside ILGPU's backend, which
            // is single-threaded, then as many as there are cores once it is done. (With a ptxas on every core from the start
            // ILGPU got less than a core and the whole took longer.) A worker takes what has queued up, up to BatchKernels, as
            // one ptxas run and one nvdisasm run (PtxModules: the disassembler's start is most of what it costs a kernel).
            using var jobs = new System.Collections.Concurrent.BlockingCollection<(SmLimits Arch, int Index, string Code)>();
            void Drain()
            {
                foreach (var first in jobs.GetConsumingEnumerable())
                {
                    var batch = new List<(SmLimits Arch, int Index, string Code)> { first };
                    while (batch.Count < BatchKernels && jobs.TryTake(out var next))
                    {
                        batch.Add(next);
                    }
                    foreach (var group in batch.GroupBy(j => (j.Arch, PtxModules.DeclaresDynamicShared(j.Code))))
                    {
                        Compile(group.Key.Arch, [.. group.Select(j => (j.Index, j.Code))]);
                    }
                }
            }
            void Compile(SmLimits arch, List<(int Index, string Code)> batch)
            {
                string cubin = Path.Combine(work, $"{arch.Name}.{batch[0].Index}.cubin");
                var files = new List<string>();
                var entries = new List<string>();
                foreach (var (i, code) in batch)
                {
                    string file = Path.Combine(work, $"{KernelPtx.Name(order[i])}.{arch.Name}.ptx");
                    var (text, entry) = PtxModules.Apart(code, $"_k{i}");
                    File.WriteAllText(file, text);
                    files.Add(file);
                    entries.Add(entry);
                }
                string what = $"-arch={arch.Name} on {KernelPtx.Name(order[batch[0].Index])}{(batch.Count > 1 ? $" and {batch.Count - 1} more kernels" : "")}";
                var infos = PtxasInfo.ParseEntries(Tool(ptxas, $"-arch={arch.Name} -v -o \"{cubin}\" {string.Join(" ", files.Select(f => $"\"{f}\""))}", what));
                byte[] elf = File.ReadAllBytes(cubin);
                var sections = Cubin.Functions(elf);
                File.WriteAllBytes(cubin + ".code", Cubin.Image(elf, sections));
                var functions = Cubin.Split(Sass.Parse(Tool(nvdisasm, $"-b SM{arch.Name["sm_".Length..]} \"{cubin}.code\"", what)), sections);
                foreach (var ((i, code), entry) in batch.Zip(entries))
                {
                    if (!infos.TryGetValue(entry, out var info) || !functions.TryGetValue(entry, out var sassCode))
                    {
                        throw new IOException($"ptxas and nvdisasm on {what}: no report or code for {KernelPtx.Name(order[i])}");
                    }
                    var (threads, minGroups) = KernelReport.Bounds(code);
                    reports[arch][i] = new KernelReport(KernelPtx.Name(order[i]), order[i].Grouped, arch, info, threads, minGroups, SassMix.Of(sassCode),
                        SassMix.Of(Sass.MainLoop(sassCode)), SassMix.Of(Sass.InnerLoop(sassCode)));
                }
            }
            var beside = Enumerable.Range(0, Math.Max(1, Environment.ProcessorCount - 1)).Select(_ => Task.Factory.StartNew(Drain, TaskCreationOptions.LongRunning)).ToList();
            try
            {
                var architectures = SassArchitectures.Select(a => a.Architecture).ToList();
                string stamp = KernelPtx.Stamp(order, architectures, cudaVersion);
                string why = "";
                if (reuse is not null && KernelPtx.Load(reuse, stamp, order, architectures, out why) is { } saved)
                {
                    Console.WriteLine($"PTX: the tests' ({reuse}), compiled from this build as below");
                    for (int a = 0; a < saved.Length; a++)
                    {
                        for (int i = 0; i < order.Count; i++)
                        {
                            jobs.Add((SassArchitectures[a], i, saved[a][i]));
                        }
                    }
                }
                else
                {
                    Console.WriteLine($"PTX: compiled here by ILGPU on a fresh simulator's context, in the tables' order{(reuse is null ? "" : $" ({why})")}");
                    // The PTX one kernel at a time (ILGPU's backend) while the tools beside read what is ready; a tool that
                    // failed stops the compiles: its error is the one to show.
                    KernelPtx.CompileInOrder(ilgpu.Context, order, architectures, cudaVersion, (a, i, code) => jobs.Add((SassArchitectures[a], i, code)),
                        () => beside.Any(t => t.IsFaulted));
                }
            }
            catch
            {
                // Let the tools beside finish what they hold before the folder goes.
                jobs.CompleteAdding();
                Task.WhenAll(beside).ContinueWith(_ => { }).Wait();
                throw;
            }
            jobs.CompleteAdding();
            var rest = Enumerable.Range(0, Environment.ProcessorCount - beside.Count).Select(_ => Task.Factory.StartNew(Drain, TaskCreationOptions.LongRunning));
            // A tool's failure (one line, from Tool) as itself, not wrapped.
            Task.WhenAll([.. beside, .. rest]).GetAwaiter().GetResult();
            foreach (var arch in SassArchitectures)
            {
                Console.WriteLine();
                Console.WriteLine($"### {arch.Name} ({arch.Card}: {arch.SharedPerSm / 1024} KB shared, 64 K registers an SM)");
                Console.WriteLine();
                Console.WriteLine(KernelReport.Header);
                foreach (var r in reports[arch])
                {
                    Console.WriteLine(r.Row());
                    problems.AddRange(r.Problems.Select(p => $"{r.Name} ({arch.Name}): {p}"));
                }
                if (arch == SmLimits.Sm90)
                {
                    // Each mode's convolution kernels by pass kind ("Forward", "Input", "Weight"): the FFMA core's, then the
                    // tensor-core kernels' (TiledGemm.TensorKernel.ConvForwardTile.Tf32Math.PtxLayout).
                    var sm90 = reports[arch];
                    IReadOnlyDictionary<string, GemmCost> Costs(string prefix, string suffix) =>
                        sm90.Where(r => r.Name.StartsWith(prefix, StringComparison.Ordinal) && r.Name.EndsWith(suffix, StringComparison.Ordinal))
                            .ToDictionary(r => r.Name[prefix.Length..^suffix.Length], r => r.GemmCost);
                    GpuForecast.Print(new Dictionary<MathPrecision, IReadOnlyDictionary<string, GemmCost>>
                    {
                        [MathPrecision.Fp32] = Costs("TiledGemm.Kernel.Conv", "Tile"),
                        [MathPrecision.Tf32] = Costs("TiledGemm.TensorKernel.Conv", $"Tile.{nameof(Tf32Math)}.{nameof(PtxLayout)}"),
                        [MathPrecision.Tf32x3] = Costs("TiledGemm.TensorKernel.Conv", $"Tile.{nameof(Tf32x3Math)}.{nameof(PtxLayout)}"),
                    }, sm90.Single(r => r.Name == "TiledConv.SingleChannelForwardKernel").Loop.Total,
                        sm90.Single(r => r.Name == "TiledConv.NarrowWeightKernel").Loop.Total);
                }
            }
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
        Console.WriteLine();
        foreach (var p in problems)
        {
            Console.Error.WriteLine($"ddpm: compiler check: {p}");
        }
        int tiled = kernels.Compilable.Count(k => k.Grouped);
        Console.WriteLine(problems.Count == 0
            ? $"compiler check: the {tiled} tiled kernels keep every rule on {string.Join(" and ", SassArchitectures.Select(a => a.Name))}"
            : $"compiler check: {problems.Count} broken rules");
        return problems.Count == 0 ? 0 : 1;
    }

    /// <summary>Kernels a worker gives one ptxas run and one nvdisasm run at most: few enough that every core gets a share
    /// once ILGPU is done.</summary>
    private const int BatchKernels = 8;

    /// <summary>Runs one of the toolkit's programs and returns what it printed; a failure is one line naming it and
    /// <paramref name="what"/> it was run on (the arguments when not given).</summary>
    private static string Tool(string program, string arguments, string? what = null)
    {
        var start = new System.Diagnostics.ProcessStartInfo(program, arguments) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = System.Diagnostics.Process.Start(start) ?? throw new IOException($"{program}: cannot start");
        var stderr = process.StandardError.ReadToEndAsync();
        string output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        string text = output + stderr.Result;
        if (process.ExitCode != 0)
        {
            throw new IOException($"{Path.GetFileName(program)} {what ?? arguments}: exit {process.ExitCode}: {text.Trim().Split('\n').LastOrDefault()}");
        }
        return text;
    }

    private static int Run(DeviceChoice deviceName)
    {
        using var device = Program.Open(deviceName, out _);
        Console.WriteLine($"checking {device.Name} against {CpuDevice.Instance.Name}");
        var started = DateTime.UtcNow;
        var kernels = IlgpuKernels.For((IlgpuDevice)device);
        Console.WriteLine($"kernels ({(kernels.Simple ? "simple twins" : "fast")}; --gpu-kernels or DDPM_GPU_KERNELS picks) compiled in {(DateTime.UtcNow - started).TotalSeconds:F1} s");
        var results = new List<CheckResult>();
        foreach (var c in OpCatalog.All)
        {
            results.Add(Checker.CompareDevices(c, device));
            if (c.Backward is not null)
            {
                results.Add(Checker.GradCheck(c, device));
            }
        }
        // The products again in each tensor-core mode this device runs, with the mode's tolerance (docs/gpu.md, "Tolerances").
        if (kernels.TensorCores && !kernels.Simple)
        {
            var asked = kernels.Precision;
            try
            {
                foreach (var mode in MathPrecisions.All.Where(m => m != MathPrecision.Fp32))
                {
                    kernels.Precision = mode;
                    foreach (var c in OpCatalog.All.Where(c => c.ProductTerms > 0))
                    {
                        var r = Checker.CompareDevices(c, device);
                        results.Add(r with { Check = $"{r.Check} {mode.Name()}" });
                    }
                }
            }
            finally
            {
                kernels.Precision = asked;
            }
        }
        Console.WriteLine($"| {"op",-32} | {"check",-25} | {"max rel err",11} | result |");
        Console.WriteLine($"|{new string('-', 34)}|{new string('-', 27)}|{new string('-', 13)}|--------|");
        foreach (var r in results)
        {
            Console.WriteLine($"| {r.Op,-32} | {r.Check,-25} | {r.MaxError,11:E2} | {(r.Pass ? "pass" : "FAIL"),-6} |");
        }
        var failed = results.Where(r => !r.Pass).ToList();
        foreach (var r in failed)
        {
            Console.WriteLine($"FAIL {r}");
        }
        Console.WriteLine($"{results.Count - failed.Count} passed, {failed.Count} failed");
        return failed.Count == 0 ? 0 : ExitCodes.Failure;
    }
}
