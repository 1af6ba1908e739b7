using System.Globalization;
using System.Text.RegularExpressions;

namespace Ddpm.Kernels;

/// <summary>What <c>ptxas -v</c> says about one compiled kernel.</summary>
/// <param name="Registers">Hardware registers a thread.</param>
/// <param name="StackBytes">The stack frame.</param>
/// <param name="SpillStores">Bytes spilled to local memory.</param>
/// <param name="SpillLoads">Bytes reloaded from it.</param>
/// <param name="SharedBytes">Static shared memory a group.</param>
public sealed record PtxasInfo(int Registers, int StackBytes, int SpillStores, int SpillLoads, int SharedBytes)
{
    /// <summary>Reads ptxas's "Function properties" and "Used N registers" lines (its -v output for one entry).</summary>
    public static PtxasInfo Parse(string text)
    {
        var frame = Regex.Match(text, @"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads");
        var used = Regex.Match(text, @"Used (\d+) registers(?:, (\d+) bytes smem)?");
        if (!frame.Success || !used.Success)
        {
            throw new FormatException("ptxas -v printed no register and stack report: " + text.Trim().Split('\n').LastOrDefault());
        }
        int Int(Group g) => g.Success ? int.Parse(g.Value, CultureInfo.InvariantCulture) : 0;
        return new PtxasInfo(Int(used.Groups[1]), Int(frame.Groups[1]), Int(frame.Groups[2]), Int(frame.Groups[3]), Int(used.Groups[2]));
    }

    private static readonly Regex Entry = new(@"^ptxas info\s*: Compiling entry function '([^']+)'", RegexOptions.Multiline | RegexOptions.Compiled);

    /// <summary>The report of each entry in the -v output of one ptxas run on several PTX files, by entry name: the text
    /// from its "Compiling entry function" line to the next one's.</summary>
    public static IReadOnlyDictionary<string, PtxasInfo> ParseEntries(string text)
    {
        var entries = Entry.Matches(text);
        var map = new Dictionary<string, PtxasInfo>(StringComparer.Ordinal);
        for (int i = 0; i < entries.Count; i++)
        {
            int end = i + 1 < entries.Count ? entries[i + 1].Index : text.Length;
            map[entries[i].Groups[1].Value] = Parse(text[entries[i].Index..end]);
        }
        return map;
    }
}

/// <summary>
/// PTX modules made ready to be compiled together: one ptxas run on several files gives one cubin, whose code one
/// disassembler run reads (<see cref="Cubin"/>). ILGPU names every kernel's entry after its method (all of TiledGemm's
/// are "Kernel_Kernel") and its shared memory by the same few names, and ptxas links the files it is given, so each
/// module's own symbols get a suffix.
/// </summary>
public static class PtxModules
{
    // Entries and functions by the name before their parameters; variables in the global, constant and shared spaces (a
    // function's shared arrays too: ptxas gives them module scope, and two files' __shared_alloca0 became one) by the name
    // before their extents, initializer or semicolon.
    private static readonly Regex Function = new(@"^(?:\.(?:visible|extern|weak)\s+)*\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)", RegexOptions.Multiline | RegexOptions.Compiled);
    private static readonly Regex Variable = new(@"^\s*(?:\.(?:visible|extern|weak)\s+)*\.(?:global|const|shared)\s.*?([A-Za-z_$][\w$]*)\s*(?:\[[^\]]*\])*\s*(?:=|;)", RegexOptions.Multiline | RegexOptions.Compiled);
    private static readonly Regex EntryName = new(@"\.entry\s+([A-Za-z_$][\w$]*)", RegexOptions.Compiled);

    private static readonly Regex ExternShared = new(@"^\s*\.extern\s+\.shared\b", RegexOptions.Multiline | RegexOptions.Compiled);

    /// <summary>Whether <paramref name="ptx"/> declares dynamic shared memory (an extern shared array). Only such modules may
    /// be compiled together with it: ptxas then rounds every function's static shared memory up to 16 bytes (so that the
    /// dynamic part starts aligned), which a module without one, compiled alone, does not (TiledNorm.BackwardKernel: 4,108 B,
    /// beside a tensor-core kernel 4,112).</summary>
    public static bool DeclaresDynamicShared(string ptx) => ExternShared.IsMatch(ptx);

    /// <summary><paramref name="ptx"/> with every symbol ptxas would link by name renamed NAME + <paramref name="suffix"/>,
    /// and its entry's new name. Only names change: ptxas makes the same code of it.</summary>
    public static (string Ptx, string Entry) Apart(string ptx, string suffix)
    {
        var entry = EntryName.Match(ptx);
        if (!entry.Success)
        {
            throw new FormatException("a kernel's PTX has no .entry");
        }
        var names = Function.Matches(ptx).Concat(Variable.Matches(ptx)).Select(m => m.Groups[1].Value).Distinct();
        foreach (string name in names)
        {
            ptx = Regex.Replace(ptx, $@"(?<![\w$]){Regex.Escape(name)}(?![\w$])", name + suffix);
        }
        return (ptx, entry.Groups[1].Value + suffix);
    }
}

/// <summary>One kernel's code in a cubin: the ".text.NAME" section's place in the file.</summary>
public readonly record struct CubinFunction(string Name, int Offset, int Size);

/// <summary>
/// The code of a cubin (an ELF64 file) as one raw image for <c>nvdisasm -b SMxy</c>, and its disassembly split back into
/// kernels. cuobjdump -sass does the same a kernel at a time, with one disassembler process each, whose start costs about
/// 0.3 s however short the code (most of <c>check --sass</c>'s time when every kernel had its own); raw, branch targets
/// print as addresses, also to an instruction the disassembler does not print (a label would name nothing).
/// </summary>
public static class Cubin
{
    /// <summary>Every code section (".text.NAME") of the ELF64 file <paramref name="elf"/>, in file order.</summary>
    public static IReadOnlyList<CubinFunction> Functions(byte[] elf)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F' || elf[4] != 2 || elf[5] != 1)
        {
            throw new FormatException("not a little-endian ELF64 cubin");
        }
        var span = elf.AsSpan();
        long headers = BitConverter.ToInt64(span[0x28..]);
        int size = BitConverter.ToUInt16(span[0x3a..]), count = BitConverter.ToUInt16(span[0x3c..]), names = BitConverter.ToUInt16(span[0x3e..]);
        if (size < 64 || names >= count || headers < 0 || headers + (long)size * count > elf.Length)
        {
            throw new FormatException("a cubin's section headers lie outside it");
        }
        ReadOnlySpan<byte> Header(int i) => elf.AsSpan((int)headers + i * size, size);
        long strings = BitConverter.ToInt64(Header(names)[24..]);
        var list = new List<CubinFunction>();
        for (int i = 0; i < count; i++)
        {
            var h = Header(i);
            long nameAt = strings + BitConverter.ToUInt32(h);
            int end = nameAt >= 0 && nameAt < elf.Length ? span[(int)nameAt..].IndexOf((byte)0) : -1;
            if (end < 0)
            {
                throw new FormatException("a cubin's section name lies outside it");
            }
            string name = System.Text.Encoding.ASCII.GetString(span.Slice((int)nameAt, end));
            long offset = BitConverter.ToInt64(h[24..]), length = BitConverter.ToInt64(h[32..]);
            if (name.StartsWith(".text.", StringComparison.Ordinal))
            {
                if (offset < 0 || length < 0 || offset + length > elf.Length || length % 16 != 0)
                {
                    throw new FormatException($"a cubin's section {name} lies outside it or is not whole 16-byte instructions");
                }
                list.Add(new CubinFunction(name[".text.".Length..], (int)offset, (int)length));
            }
        }
        return list;
    }

    /// <summary>The code of <paramref name="functions"/>, one after another: a raw image whose addresses run on from one
    /// function to the next.</summary>
    public static byte[] Image(byte[] elf, IReadOnlyList<CubinFunction> functions)
    {
        var image = new byte[functions.Sum(f => f.Size)];
        int at = 0;
        foreach (var f in functions)
        {
            elf.AsSpan(f.Offset, f.Size).CopyTo(image.AsSpan(at));
            at += f.Size;
        }
        return image;
    }

    /// <summary>The disassembly of <see cref="Image"/> split back into its functions, each from address 0 (branch targets too).</summary>
    public static IReadOnlyDictionary<string, IReadOnlyList<SassInstruction>> Split(IReadOnlyList<SassInstruction> code, IReadOnlyList<CubinFunction> functions)
    {
        var map = new Dictionary<string, IReadOnlyList<SassInstruction>>(StringComparer.Ordinal);
        int start = 0;
        foreach (var f in functions)
        {
            int from = start;
            map[f.Name] = [.. code.Where(i => i.Address >= from && i.Address < from + f.Size).Select(i => i with { Address = i.Address - from, Target = i.Target - from })];
            start += f.Size;
        }
        return map;
    }
}

/// <summary>One SASS instruction: its address, its predicate-free opcode with modifiers ("LDS.128"), and the branch
/// target when it is a branch.</summary>
public readonly record struct SassInstruction(int Address, string Opcode, int? Target);

/// <summary>The static instruction mix of a stretch of SASS.</summary>
public sealed record SassMix(int Total, int Ffma, int OtherFloat, int Lds32, int Lds64, int Lds128, int Sts, int Ldg, int Stg, int Generic, int Local,
    int Integer, int Branches, int Barriers, int Hmma = 0)
{
    /// <summary>Shared loads of any width.</summary>
    public int Lds => Lds32 + Lds64 + Lds128;

    /// <summary>FFMA per shared load instruction (∞ as 0 loads: reported as the FFMA count).</summary>
    public double FfmaPerLds => Lds == 0 ? Ffma : (double)Ffma / Lds;

    /// <summary>Counts the mix of <paramref name="code"/>.</summary>
    public static SassMix Of(IReadOnlyList<SassInstruction> code)
    {
        int ffma = 0, hmma = 0, fl = 0, l32 = 0, l64 = 0, l128 = 0, sts = 0, ldg = 0, stg = 0, generic = 0, local = 0, integer = 0, bra = 0, bar = 0;
        foreach (var i in code)
        {
            string op = i.Opcode, root = op.Split('.')[0];
            switch (root)
            {
                case "FFMA": ffma++; break;
                case "HMMA": hmma++; break;
                case "FADD" or "FMUL" or "FMNMX" or "FSETP" or "FSEL" or "MUFU" or "FCHK" or "FSET": fl++; break;
                case "LDS":
                    if (op.Contains(".128")) l128++;
                    else if (op.Contains(".64")) l64++;
                    else l32++;
                    break;
                case "STS": sts++; break;
                case "LDG": ldg++; break;
                case "STG" or "ATOMG" or "REDG": stg++; break;
                case "LD" or "ST" or "ATOM" or "RED": generic++; break;
                case "LDL" or "STL": local++; break;
                case "IMAD" or "IADD3" or "LEA" or "SHF" or "LOP3" or "ISETP" or "SEL" or "IABS" or "IMNMX" or "PRMT" or "IMUL" or "UIMAD" or "UIADD3"
                    or "ULEA" or "USHF" or "ULOP3" or "UISETP" or "USEL" or "MOV" or "UMOV" or "S2R" or "S2UR" or "CS2R" or "PLOP3" or "P2R" or "R2P"
                    or "POPC" or "FLO" or "BREV" or "IDP" or "I2F" or "F2I" or "VOTE" or "VOTEU" or "R2UR" or "I2FP" or "F2IP" or "ULDC" or "LDC":
                    integer++;
                    break;
                case "BRA" or "BRX" or "JMP" or "CALL" or "RET" or "EXIT" or "BSSY" or "BSYNC" or "WARPSYNC": bra++; break;
                case "BAR": bar++; break;
            }
        }
        return new SassMix(code.Count, ffma, fl, l32, l64, l128, sts, ldg, stg, generic, local, integer, bra, bar, hmma);
    }
}

/// <summary>Reads SASS as <c>cuobjdump -sass</c> and <c>nvdisasm -b SMxy</c> (a raw code image) print it.</summary>
public static class Sass
{
    private static readonly Regex Line = new(@"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)([^;]*);", RegexOptions.Compiled);
    private static readonly Regex BranchTarget = new(@"0x([0-9a-f]+)", RegexOptions.Compiled);

    /// <summary>The instructions of the one kernel in <paramref name="text"/>, in address order; NOPs are left out (padding).</summary>
    public static IReadOnlyList<SassInstruction> Parse(string text)
    {
        var list = new List<SassInstruction>();
        foreach (string raw in text.Split('\n'))
        {
            var m = Line.Match(raw);
            if (!m.Success)
            {
                continue;
            }
            string op = m.Groups[2].Value;
            if (op == "NOP")
            {
                continue;
            }
            int address = int.Parse(m.Groups[1].Value, NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            int? target = null;
            if (op.StartsWith("BRA", StringComparison.Ordinal) && BranchTarget.Match(m.Groups[3].Value) is { Success: true } t)
            {
                target = int.Parse(t.Groups[1].Value, NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            }
            list.Add(new SassInstruction(address, op, target));
        }
        return list;
    }

    /// <summary>
    /// The kernel's main loop: of the loops (a backward branch and the code from its target to it), the one holding the
    /// most FFMA and HMMA (tensor-core mma), then the most global loads, then the most instructions; of equals, the outermost. Its static mix is
    /// what a trip of the loop issues when everything inside it is straight-line code (the tiled GEMM's K loop, whose
    /// multiply-adds are written out). Empty when the kernel has no loop.
    /// </summary>
    public static IReadOnlyList<SassInstruction> MainLoop(IReadOnlyList<SassInstruction> code)
    {
        IReadOnlyList<SassInstruction> best = [];
        (int, int, int) bestKey = (-1, -1, -1);
        foreach (var body in Loops(code))
        {
            var mix = SassMix.Of(body);
            var key = (mix.Ffma + mix.Hmma, mix.Ldg + mix.Generic, body.Count);
            if (key.CompareTo(bestKey) > 0)
            {
                (best, bestKey) = (body, key);
            }
        }
        return best;
    }

    /// <summary>The innermost loop holding FFMA or HMMA (the tiled GEMM's multiply-add loop inside its K loop); empty when none.</summary>
    public static IReadOnlyList<SassInstruction> InnerLoop(IReadOnlyList<SassInstruction> code) =>
        Loops(code).Where(body => body.Any(i => i.Opcode.StartsWith("FFMA", StringComparison.Ordinal) || i.Opcode.StartsWith("HMMA", StringComparison.Ordinal)))
            .MinBy(body => body.Count) ?? [];

    /// <summary>Every loop: a backward branch and the code from its target to it, in the order of the branches.</summary>
    private static IEnumerable<IReadOnlyList<SassInstruction>> Loops(IReadOnlyList<SassInstruction> code) =>
        code.Where(i => i.Target is { } t && t < i.Address)
            .Select(branch => (IReadOnlyList<SassInstruction>)code.Where(i => i.Address >= branch.Target && i.Address <= branch.Address).ToList());
}

/// <summary>Resident limits of one GPU generation, for groups per SM.</summary>
/// <param name="Name">The architecture, "sm_90".</param>
/// <param name="Card">The card the figure is for.</param>
/// <param name="SharedPerSm">Shared memory an SM can give its groups, bytes.</param>
public sealed record SmLimits(string Name, string Card, int SharedPerSm)
{
    /// <summary>Registers, threads and groups an SM holds (the same on sm_80 and sm_90), and the shared memory the
    /// runtime reserves per group.</summary>
    public const int Registers = 65536, Threads = 2048, Groups = 32, ReservedShared = 1024;

    /// <summary>sm_80 (A100: 164 KB of shared memory an SM) and sm_90 (H100 and H200: 228 KB).</summary>
    public static readonly SmLimits Sm80 = new("sm_80", "A100", 164 * 1024), Sm90 = new("sm_90", "H100", 228 * 1024);

    /// <summary>The architecture as ILGPU names it (sm_90: 9.0).</summary>
    public ILGPU.Runtime.Cuda.CudaArchitecture Architecture
    {
        get
        {
            int sm = int.Parse(Name["sm_".Length..], CultureInfo.InvariantCulture);
            return new ILGPU.Runtime.Cuda.CudaArchitecture(sm / 10, sm % 10);
        }
    }

    /// <summary>Groups of <paramref name="threads"/> threads, <paramref name="registers"/> registers a thread and
    /// <paramref name="shared"/> bytes of shared memory one SM runs at once (registers are allocated to warps in
    /// 256-register units).</summary>
    public int GroupsPerSm(int threads, int registers, int shared)
    {
        int warps = (threads + 31) / 32;
        int warpRegisters = (Math.Max(registers, 1) * 32 + 255) / 256 * 256;
        int byRegisters = Registers / warpRegisters / warps;
        int byThreads = Threads / (warps * 32);
        int byShared = SharedPerSm / (shared + ReservedShared);
        return Math.Min(Math.Min(byRegisters, byThreads), Math.Min(byShared, Groups));
    }
}

/// <summary>One kernel, compiled for one architecture by ptxas, read back by nvdisasm.</summary>
/// <param name="Name">"TiledGemm.Kernel.ConvForwardTile".</param>
/// <param name="Tiled">An explicitly grouped kernel (the rules apply).</param>
/// <param name="Arch">The limits of the architecture it was compiled for.</param>
/// <param name="Info">ptxas's report.</param>
/// <param name="GroupThreads">The group size: the launch bounds' .maxntid, else 256.</param>
/// <param name="MinGroups">The launch bounds' .minnctapersm, 0 when none.</param>
/// <param name="Whole">The whole kernel's mix.</param>
/// <param name="Loop">Its main loop's mix.</param>
/// <param name="Inner">Its innermost multiply-add loop's mix (the GEMM's; empty otherwise).</param>
public sealed record KernelReport(string Name, bool Tiled, SmLimits Arch, PtxasInfo Info, int GroupThreads, int MinGroups, SassMix Whole, SassMix Loop,
    SassMix Inner)
{
    /// <summary>A tiled GEMM's cost a K step, for the prediction: the main loop with its inner loop counted once per trip
    /// (<see cref="TiledGemm.KkPerTrip"/> kk a trip on the FFMA core, one k8 mma step on tensor cores), or the main loop
    /// alone when its multiply-adds are written out (the innermost loop holding them is the main loop itself: TF32).</summary>
    public GemmCost GemmCost => GemmCost.FromLoops(Loop, Inner, GroupsPerSm,
        Inner.Total == Loop.Total ? 1 : TensorCores ? TiledGemm.TK / 8 : TiledGemm.TK / TiledGemm.KkPerTrip);

    /// <summary>A tensor-core kernel (TiledGemm.TensorKernel).</summary>
    public bool TensorCores => Name.StartsWith("TiledGemm.TensorKernel.", StringComparison.Ordinal);

    /// <summary>The fewest HMMA a tensor-core kernel's main loop holds: one k8 step of the warp's 2 x 8 mma tiles.</summary>
    public const int MinTensorHmma = 16;

    /// <summary>Generic global accesses the table accepts, by kernel, with the reason ILGPU cannot express them otherwise.
    /// Empty: at O2 ILGPU infers every kernel view as global, so every access is an LDG, STG or ATOMG.</summary>
    public static readonly IReadOnlyDictionary<string, string> JustifiedGeneric = new Dictionary<string, string>();

    /// <summary>The fewest FFMA per shared load a tiled GEMM's main loop may do.</summary>
    public const double MinGemmFfmaPerLds = 4;

    /// <summary>The register budget the launch bounds give (65,536 / (threads · groups)), or 255 without bounds.</summary>
    public int RegisterBudget => MinGroups > 0 ? Math.Min(255, SmLimits.Registers / (GroupThreads * MinGroups) / 8 * 8) : 255;

    /// <summary>Groups an SM holds.</summary>
    public int GroupsPerSm => Arch.GroupsPerSm(GroupThreads, Info.Registers, Info.SharedBytes);

    /// <summary>What breaks the rules for a tiled kernel (none for the others): spills, a stack frame, local memory, more
    /// registers than the budget, an unjustified generic global access, a GEMM loop under 4 FFMA a shared load.</summary>
    public IReadOnlyList<string> Problems
    {
        get
        {
            var list = new List<string>();
            if (!Tiled)
            {
                return list;
            }
            if (Info.SpillStores > 0 || Info.SpillLoads > 0) list.Add($"spills {Info.SpillStores} B stored, {Info.SpillLoads} B loaded");
            if (Info.StackBytes > 0) list.Add($"a {Info.StackBytes} B stack frame");
            if (Whole.Local > 0) list.Add($"{Whole.Local} local-memory instructions (LDL/STL)");
            if (Info.Registers > RegisterBudget) list.Add($"{Info.Registers} registers, over the launch bounds' budget of {RegisterBudget}");
            if (Whole.Generic > 0 && !JustifiedGeneric.ContainsKey(Name)) list.Add($"{Whole.Generic} generic global accesses (LD/ST/ATOM without G)");
            if (Name.StartsWith("TiledGemm.Kernel.", StringComparison.Ordinal) && Loop.FfmaPerLds < MinGemmFfmaPerLds)
            {
                list.Add($"main loop {Loop.FfmaPerLds:0.0} FFMA a shared load, under {MinGemmFfmaPerLds}");
            }
            if (TensorCores && Loop.Hmma < MinTensorHmma)
            {
                list.Add($"main loop {Loop.Hmma} HMMA, under {MinTensorHmma} (the mma did not reach the tensor cores)");
            }
            return list;
        }
    }

    /// <summary>The table's header row and its separator (markdown).</summary>
    public static string Header =>
        "| kernel | regs (budget) | spill, stack | smem B | groups/SM | loop: FFMA, HMMA | LDS 32/64/128 | FFMA/LDS | STS | LDG | STG | int | branch | bar | loop / kernel instr. | rules |\n" +
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    /// <summary>This kernel's row.</summary>
    public string Row()
    {
        var l = Loop;
        string budget = MinGroups > 0 ? $"{Info.Registers} ({RegisterBudget})" : $"{Info.Registers}";
        string rules = !Tiled ? "-" : Problems.Count == 0 ? "ok" : string.Join("; ", Problems);
        return string.Create(CultureInfo.InvariantCulture,
            $"| {Name} | {budget} | {Info.SpillStores + Info.SpillLoads}, {Info.StackBytes} | {Info.SharedBytes:N0} | {GroupsPerSm} x {GroupThreads} | {l.Ffma}, {l.Hmma} | {l.Lds32}/{l.Lds64}/{l.Lds128} | {l.FfmaPerLds:0.0} | {l.Sts} | {l.Ldg} | {l.Stg} | {l.Integer} | {l.Branches} | {l.Barriers} | {l.Total} / {Whole.Total} | {rules} |");
    }

    /// <summary>The launch bounds a PTX entry declares: (.maxntid x, .minnctapersm n), (256, 0) when none.</summary>
    public static (int Threads, int MinGroups) Bounds(string ptx)
    {
        var threads = Regex.Match(ptx, @"\.maxntid\s+(\d+)");
        var groups = Regex.Match(ptx, @"\.minnctapersm\s+(\d+)");
        return (threads.Success ? int.Parse(threads.Groups[1].Value, CultureInfo.InvariantCulture) : 256,
            groups.Success ? int.Parse(groups.Groups[1].Value, CultureInfo.InvariantCulture) : 0);
    }
}
