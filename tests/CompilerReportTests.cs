using Ddpm.Kernels;

namespace Ddpm.Tests;

/// <summary>The reading of ptxas's and nvdisasm's output behind <c>ddpm check --sass</c>, on text and files in their formats
/// (the tools themselves run in scripts/compiler-check.sh, which .ci/run calls).</summary>
public sealed class CompilerReportTests
{
    private const string Ptxas = """
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'Kernel_Kernel' for 'sm_90'
        ptxas info    : Function properties for Kernel_Kernel
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 151 registers, 25860 bytes smem, 664 bytes cmem[0]
        """;

    // A straight stretch, an inner loop (0x40-0x70) inside an outer one (0x10-0xa0), and a generic load.
    private const string Code = """
                /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
                /*0010*/                   LDG.E R2, [R4.64] ;                     /* 0x0000000404027981 */
                /*0020*/                   STS [R3], R2 ;                          /* 0x0000000203007388 */
                /*0030*/                   BAR.SYNC 0x0 ;                          /* 0x0000000000007b1d */
                /*0040*/                   LDS.128 R8, [R3] ;                      /* 0x0000000003087984 */
                /*0050*/                   FFMA R9, R8, R8, R9 ;                   /* 0x0000000808097223 */
                /*0060*/                   FFMA R10, R8, R9, R10 ;                 /* 0x00000009080a7223 */
                /*0070*/               @P0 BRA 0x40 ;                              /* 0xfffffffc00008947 */
                /*0080*/                   LD.E R5, [R6.64] ;                      /* 0x0000000406057980 */
                /*0090*/                   IADD3 R0, R0, 0x1, RZ ;                 /* 0x0000000100007810 */
                /*00a0*/              @!P1 BRA 0x10 ;                              /* 0xfffffff000009947 */
                /*00b0*/                   EXIT ;                                  /* 0x000000000000794d */
                /*00c0*/                   BRA 0xc0;                               /* 0xfffffff000007947 */
                /*00d0*/                   NOP;                                    /* 0x0000000000007918 */
        """;

    [Fact]
    public void PtxasReportIsRead()
    {
        var info = PtxasInfo.Parse(Ptxas);
        Assert.Equal(new PtxasInfo(151, 16, 8, 4, 25860), info);
        Assert.Throws<FormatException>(() => PtxasInfo.Parse("ptxas fatal   : Unresolved extern function"));
    }

    [Fact]
    public void SassMixAndLoopsAreCounted()
    {
        var code = Sass.Parse(Code);
        Assert.Equal(13, code.Count); // the NOP is padding
        var whole = SassMix.Of(code);
        Assert.Equal((2, 1, 1, 1, 1, 1), (whole.Ffma, whole.Lds128, whole.Ldg, whole.Sts, whole.Barriers, whole.Generic));
        // The main loop is the outer one (most FFMA, then the most global loads: it also holds the LDG); the inner one is
        // the smallest loop with FFMA; the EXIT's self-branch is no loop.
        var main = Sass.MainLoop(code);
        Assert.Equal((0x10, 0xa0), (main[0].Address, main[^1].Address));
        var inner = Sass.InnerLoop(code);
        Assert.Equal((0x40, 0x70), (inner[0].Address, inner[^1].Address));
        Assert.Equal(2.0, SassMix.Of(main).FfmaPerLds);
    }

    [Fact]
    public void TheRulesNameWhatATiledKernelBreaks()
    {
        var code = Sass.Parse(Code);
        var report = new KernelReport("TiledGemm.Kernel.ConvForwardTile", true, SmLimits.Sm90, PtxasInfo.Parse(Ptxas), 128, 3, SassMix.Of(code),
            SassMix.Of(Sass.MainLoop(code)), SassMix.Of(Sass.InnerLoop(code)));
        Assert.Equal(168, report.RegisterBudget);
        var problems = string.Join("; ", report.Problems);
        Assert.Contains("spills", problems);
        Assert.Contains("stack frame", problems);
        Assert.Contains("generic global", problems);
        Assert.Contains("FFMA a shared load", problems);
        Assert.DoesNotContain("registers, over", problems);
        // Not tiled: reported, no rules.
        Assert.Empty((report with { Tiled = false }).Problems);
        // The main loop, its inner loop counted once a trip: 10 + (4 - 1) · 4 (four kk a trip of a 16-deep K step).
        Assert.Equal(10 + (TiledGemm.TK / TiledGemm.KkPerTrip - 1) * 4, report.GemmCost.StepInstructions);
        Assert.Equal(0, report.GemmCost.StepHmma);
    }

    /// <summary>A tensor-core kernel: its main loop is found by its HMMA, the inner loop counts once per k8 step (two a K
    /// step), and a loop without HMMA breaks its rule.</summary>
    [Fact]
    public void TensorCoreKernelsAreReadByTheirHmma()
    {
        const string code = """
                /*0000*/                   MOV R1, c[0x0][0x28] ;
                /*0010*/                   LDG.E R2, [R4.64] ;
                /*0020*/                   STS [R3], R2 ;
                /*0030*/                   BAR.SYNC 0x0 ;
                /*0040*/                   LDS.128 R8, [R5] ;
                /*0050*/                   HMMA.1688.F32.TF32 R20, R8, R12, R20 ;
                /*0060*/                   HMMA.1688.F32.TF32 R24, R8, R14, R24 ;
                /*0070*/               @!P0 BRA 0x40 ;
                /*0080*/               @!P1 BRA 0x10 ;
                /*0090*/                   EXIT ;
            """;
        var sass = Sass.Parse(code);
        var main = SassMix.Of(Sass.MainLoop(sass));
        var inner = SassMix.Of(Sass.InnerLoop(sass));
        Assert.Equal((2, 8, 4), (main.Hmma, main.Total, inner.Total));
        var report = new KernelReport("TiledGemm.TensorKernel.ConvForwardTile.Tf32Math.PtxLayout", true, SmLimits.Sm90,
            PtxasInfo.Parse("ptxas info    : Function properties for x\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 150 registers, 25872 bytes smem"),
            128, 3, SassMix.Of(sass), main, inner);
        // 8 + (2 - 1) · 4 instructions and 2 + (2 - 1) · 2 HMMA a K step.
        Assert.Equal((12, 4), (report.GemmCost.StepInstructions, report.GemmCost.StepHmma));
        Assert.Contains("HMMA, under 16", string.Join("; ", report.Problems));
        Assert.DoesNotContain("FFMA a shared load", string.Join("; ", report.Problems));
    }

    /// <summary>A K loop whose mma steps are written out (TF32): the innermost loop holding HMMA is the main loop itself,
    /// and a K step is its static count once, not once per k8 step.</summary>
    [Fact]
    public void AWrittenOutKStepCountsOnce()
    {
        const string code = """
                /*0000*/                   MOV R1, c[0x0][0x28] ;
                /*0010*/                   LDG.E R2, [R4.64] ;
                /*0020*/                   STS [R3], R2 ;
                /*0030*/                   BAR.SYNC 0x0 ;
                /*0040*/                   LDS.128 R8, [R5] ;
                /*0050*/                   HMMA.1688.F32.TF32 R20, R8, R12, R20 ;
                /*0060*/                   LDS.128 R8, [R5+0x10] ;
                /*0070*/                   HMMA.1688.F32.TF32 R20, R8, R12, R20 ;
                /*0080*/               @!P1 BRA 0x10 ;
                /*0090*/                   EXIT ;
            """;
        var sass = Sass.Parse(code);
        var main = SassMix.Of(Sass.MainLoop(sass));
        var inner = SassMix.Of(Sass.InnerLoop(sass));
        Assert.Equal(main, inner);
        var report = new KernelReport("TiledGemm.TensorKernel.ConvForwardTile.Tf32Math.PtxLayout", true, SmLimits.Sm90,
            PtxasInfo.Parse("ptxas info    : Function properties for x\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 150 registers, 25872 bytes smem"),
            128, 3, SassMix.Of(sass), main, inner);
        Assert.Equal((8, 2), (report.GemmCost.StepInstructions, report.GemmCost.StepHmma));
    }

    [Fact]
    public void GroupsPerSmFollowRegistersSharedMemoryAndThreads()
    {
        // 128 threads at 151 registers: 4 warps of 152 · 32 = 4,864 registers, 13 warps fit, 3 groups; shared 25,860 B
        // would allow 8 on an sm_90; threads 16.
        Assert.Equal(3, SmLimits.Sm90.GroupsPerSm(128, 151, 25860));
        Assert.Equal(8, SmLimits.Sm90.GroupsPerSm(256, 20, 1024));
        // Shared memory binds: 164 KB / (48 KB + 1 KB) = 3 on an sm_80.
        Assert.Equal(3, SmLimits.Sm80.GroupsPerSm(128, 32, 48 * 1024));
    }

    /// <summary>One ptxas run on several files reports each entry under its own "Compiling entry function" line.</summary>
    [Fact]
    public void EachEntryOfOnePtxasRunIsReadApart()
    {
        const string text = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'Kernel_Kernel_k0' for 'sm_90'
            ptxas info    : Function properties for Kernel_Kernel_k0
                0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 148 registers, 27908 bytes smem, 664 bytes cmem[0]
            ptxas info    : Compiling entry function 'Kernel_PartialKernel_k1' for 'sm_90'
            ptxas info    : Function properties for Kernel_PartialKernel_k1
                8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 15 registers, 1024 bytes smem, 380 bytes cmem[0]
            """;
        var entries = PtxasInfo.ParseEntries(text);
        Assert.Equal(new PtxasInfo(148, 0, 0, 0, 27908), entries["Kernel_Kernel_k0"]);
        Assert.Equal(new PtxasInfo(15, 8, 0, 0, 1024), entries["Kernel_PartialKernel_k1"]);
    }

    /// <summary>Modules compiled together keep their symbols apart: the entry, module variables and a function's shared
    /// arrays take the suffix; registers, parameters and instructions that merely contain a name do not.</summary>
    [Fact]
    public void ModulesCompiledTogetherKeepTheirSymbolsApart()
    {
        const string ptx = """
            .version 7.8
            .target sm_80
            .address_size 64
            .extern .shared .align 4 .b8 __dyn_shared_alloca[];
            .global .align 4 .b8 table[16] = {0};

            .visible .entry Kernel_Kernel(
            	.param .u64 Kernel_Kernel_param_0
            )
            {
            	.shared .align 16 .b8 __shared_alloca0[8704];
            	.reg .b64 	%rd<3>;
            	ld.param.u64 	%rd1, [Kernel_Kernel_param_0];
            	mov.b64	%rd2, __shared_alloca0;
            	mov.b64	%rd2, __dyn_shared_alloca;
            	mov.b64	%rd2, table;
            	ret;
            }
            """;
        var (renamed, entry) = PtxModules.Apart(ptx, "_k7");
        Assert.Equal("Kernel_Kernel_k7", entry);
        Assert.Contains(".visible .entry Kernel_Kernel_k7(", renamed);
        Assert.Contains("__shared_alloca0_k7[8704]", renamed);
        Assert.Contains("mov.b64\t%rd2, __shared_alloca0_k7;", renamed);
        Assert.Contains(".extern .shared .align 4 .b8 __dyn_shared_alloca_k7[];", renamed);
        Assert.Contains("mov.b64\t%rd2, table_k7;", renamed);
        Assert.Contains("[Kernel_Kernel_param_0]", renamed);
        Assert.Contains(".reg .b64 \t%rd<3>;", renamed);
        Assert.True(PtxModules.DeclaresDynamicShared(ptx));
        Assert.False(PtxModules.DeclaresDynamicShared(ptx.Replace(".extern .shared .align 4 .b8 __dyn_shared_alloca[];", "")));
        Assert.Throws<FormatException>(() => PtxModules.Apart(".version 7.8\n", "_k0"));
    }

    /// <summary>A cubin's code sections are found in its ELF headers, laid end to end as one raw image, and the image's
    /// disassembly is split back into kernels, each from address 0 with its branch targets.</summary>
    [Fact]
    public void ACubinsCodeIsDisassembledAsOneImageAndSplitBack()
    {
        byte[] a = [.. Enumerable.Repeat((byte)0xa1, 0x40)], b = [.. Enumerable.Repeat((byte)0xb2, 0x30)];
        byte[] elf = Elf(("", []), (".shstrtab", null), (".nv.info", [1, 2, 3, 4]), (".text.k0", a), (".text.k1", b));
        var functions = Cubin.Functions(elf);
        Assert.Equal(["k0", "k1"], functions.Select(f => f.Name));
        Assert.Equal([.. a, .. b], Cubin.Image(elf, functions));
        // The image's disassembly: k1 starts at 0x40; its loop branches back to 0x50, that is 0x10 in k1.
        const string code = """
                    /*0000*/                   MOV R1, c[0x0][0x28] ;
                    /*0010*/                   FFMA R2, R2, R2, R2 ;
                    /*0020*/               @!P0 BRA 0x10 ;
                    /*0030*/                   EXIT ;
                    /*0040*/                   MOV R1, c[0x0][0x28] ;
                    /*0050*/                   FFMA R2, R2, R2, R2 ;
                    /*0060*/               @!P0 BRA 0x50 ;
            """;
        var split = Cubin.Split(Sass.Parse(code), functions);
        Assert.Equal([0x0, 0x10, 0x20, 0x30], split["k0"].Select(i => i.Address));
        Assert.Equal([0x0, 0x10, 0x20], split["k1"].Select(i => i.Address));
        Assert.Equal(0x10, split["k1"][2].Target);
        Assert.Equal(2, Sass.MainLoop(split["k1"]).Count);
        Assert.Throws<FormatException>(() => Cubin.Functions([0x7f, (byte)'E', (byte)'L', (byte)'F']));
        Assert.Throws<FormatException>(() => Cubin.Functions(elf[..^8]));
    }

    /// <summary>A little-endian ELF64 file with these sections (a null one first; the section whose data is null holds the
    /// names), their data after the header and the section headers at the end.</summary>
    private static byte[] Elf(params (string Name, byte[]? Data)[] sections)
    {
        var names = new List<byte>();
        var nameAt = sections.Select(s => { int at = names.Count; names.AddRange(System.Text.Encoding.ASCII.GetBytes(s.Name)); names.Add(0); return at; }).ToArray();
        var data = sections.Select(s => s.Data ?? [.. names]).ToArray();
        var file = new List<byte>(new byte[64]);
        var offsets = new long[sections.Length];
        for (int i = 0; i < sections.Length; i++)
        {
            offsets[i] = file.Count;
            file.AddRange(data[i]);
        }
        long headers = file.Count;
        for (int i = 0; i < sections.Length; i++)
        {
            var h = new byte[64];
            BitConverter.GetBytes(nameAt[i]).CopyTo(h, 0);
            BitConverter.GetBytes(offsets[i]).CopyTo(h, 24);
            BitConverter.GetBytes((long)data[i].Length).CopyTo(h, 32);
            file.AddRange(h);
        }
        var elf = file.ToArray();
        elf[0] = 0x7f; elf[1] = (byte)'E'; elf[2] = (byte)'L'; elf[3] = (byte)'F'; elf[4] = 2; elf[5] = 1;
        BitConverter.GetBytes(headers).CopyTo(elf, 0x28);
        BitConverter.GetBytes((ushort)64).CopyTo(elf, 0x3a);
        BitConverter.GetBytes((ushort)sections.Length).CopyTo(elf, 0x3c);
        BitConverter.GetBytes((ushort)Array.FindIndex(sections, s => s.Data is null)).CopyTo(elf, 0x3e);
        return elf;
    }

    [Fact]
    public void LaunchBoundsAreReadFromThePtx()
    {
        Assert.Equal((128, 3), KernelReport.Bounds(".entry Kernel_Kernel(\n.maxntid 128, 1, 1\n.minnctapersm 3\n{"));
        Assert.Equal((256, 0), KernelReport.Bounds(".entry Kernel_Kernel(\n{"));
    }
}
