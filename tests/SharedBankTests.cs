using Ddpm.Kernels;

namespace Ddpm.Tests;

/// <summary>
/// Shared-memory bank conflicts of every tiled kernel, counted as the hardware does: words in the same bank (word address
/// mod 32) but at different addresses are served in separate wavefronts, one address read by many lanes is a broadcast.
/// Every store and load the kernels make (their addressing is plain functions they call: <see cref="TiledGemm.SlotA"/>,
/// <see cref="TiledGemm.SlotB"/>, <see cref="TiledGemm.ReadA"/>, <see cref="TiledGemm.ReadB"/>,
/// <see cref="TiledGemm.RowSumSlot"/>, the tensor-core kernel's <see cref="TiledGemm.PairSlotA"/>,
/// <see cref="TiledGemm.PairSlotB"/>, <see cref="TiledGemm.MmaReadA"/> and <see cref="TiledGemm.MmaReadB"/>,
/// <see cref="TiledGemm.FirstReadSlot"/>, <see cref="TiledReduce.TreeSlot"/>) is walked for every warp of the group: a 32-bit access must be one wavefront, a
/// 128-bit one the fewest its bytes need, except where docs/gpu.md names the exception and its reason.
/// </summary>
public sealed class SharedBankTests
{
    private const int Warp = 32, Banks = 32;

    /// <summary>Wavefronts for one warp's 32-bit accesses at <paramref name="addresses"/> (word indices).</summary>
    internal static int Wavefronts(IEnumerable<int> addresses) =>
        addresses.Distinct().GroupBy(a => a % Banks).Max(g => g.Count());

    private static IEnumerable<(int Warp, int[] Lanes)> Warps() =>
        Enumerable.Range(0, TiledGemm.Threads / Warp).Select(w => (w, Enumerable.Range(w * Warp, Warp).ToArray()));

    [Fact]
    public void TheCounterSeesConflictsAndBroadcasts()
    {
        Assert.Equal(1, Wavefronts(Enumerable.Range(0, 32)));
        Assert.Equal(1, Wavefronts(Enumerable.Repeat(5, 32)));
        Assert.Equal(16, Wavefronts(Enumerable.Range(0, 32).Select(l => (l % 16) * 64 + l / 16))); // the old layout's store along K
        Assert.Equal(2, Wavefronts(Enumerable.Range(0, 32).Select(l => 2 * l)));
    }

    [Fact]
    public void TheKeptFirstLoadsAreOneWavefront()
    {
        foreach (var (w, lanes) in Warps())
        {
            foreach (int operand in new[] { 0, 1 })
            {
                Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.FirstReadSlot(operand, tid))) == 1, $"first loads of operand {operand}, warp {w}");
            }
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void EveryStoreOfTheGemmTilesIsOneWavefront(bool alongK)
    {
        foreach (var (w, lanes) in Warps())
        {
            // Thread tid stores elements tid + q·128 of each tile (the GPU kernel): 8 of A, 16 of B.
            for (int q = 0; q < TiledGemm.TK * TiledGemm.TM / TiledGemm.Threads; q++)
            {
                Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.SlotA(alongK, tid + q * TiledGemm.Threads))) == 1, $"A, along K {alongK}, warp {w}, store {q}");
            }
            for (int q = 0; q < TiledGemm.TK * TiledGemm.TN / TiledGemm.Threads; q++)
            {
                Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.SlotB(alongK, tid + q * TiledGemm.Threads))) == 1, $"B, along K {alongK}, warp {w}, store {q}");
            }
        }
    }

    /// <summary>Words a 128-bit access to 16-byte group <paramref name="group"/> touches.</summary>
    private static IEnumerable<int> Words4(int group) => Enumerable.Range(4 * group, 4);

    /// <summary>The fewest wavefronts the words need: 32 distinct words a wavefront (a 128-bit load by 32 lanes that
    /// read different groups: 4, one per eight lanes).</summary>
    private static int Least(IEnumerable<int> words) => (words.Distinct().Count() + Banks - 1) / Banks;

    [Fact]
    public void EveryLoadOfTheGemmTilesTakesTheFewestWavefronts()
    {
        int across = TiledGemm.TN / TiledGemm.ColsPerThread;
        foreach (var (w, lanes) in Warps())
        {
            for (int buffer = 0; buffer < 2; buffer++)
            {
                for (int kk = 0; kk < TiledGemm.TK; kk++)
                {
                    // Thread tid owns rows 8·(tid / 16) + i and columns 4·(tid % 16) + j, 64 + 4·(tid % 16) + j: two 128-bit
                    // loads of each tile a kk.
                    for (int half = 0; half < 2; half++)
                    {
                        var a = lanes.SelectMany(tid => Words4(buffer * TiledGemm.ATile / 4 + TiledGemm.ReadA(kk, tid / across) + half)).ToArray();
                        var b = lanes.SelectMany(tid => Words4(buffer * TiledGemm.BTile / 4 + TiledGemm.ReadB(kk, tid % across) + half * TiledGemm.TN / 8)).ToArray();
                        Assert.True(Wavefronts(a) == Least(a), $"A load, warp {w}, buffer {buffer}, kk {kk}, half {half}: {Wavefronts(a)} wavefronts");
                        Assert.True(Wavefronts(b) == Least(b), $"B load, warp {w}, buffer {buffer}, kk {kk}, half {half}: {Wavefronts(b)} wavefronts");
                    }
                    // The fused row sums: thread r reads aS[kk][r] for its rows r < 64.
                    var rows = lanes.Where(r => r < TiledGemm.TM).Select(r => buffer * TiledGemm.ATile + TiledGemm.RowSumSlot(kk, r)).ToArray();
                    if (rows.Length > 0)
                    {
                        Assert.True(Wavefronts(rows) == 1, $"row sums, warp {w}, kk {kk}");
                    }
                }
            }
        }
    }

    /// <summary>The tensor-core kernel's fragment loads (TiledGemm.MmaReadA, MmaReadB): per k8 step two 128-bit loads of A
    /// (one a m16 tile) and four of B (two n-tiles each): the fewest wavefronts, and within each quarter-warp (the eight lanes
    /// one 128-bit wavefront serves) eight different 16-byte groups across the 32 banks.</summary>
    [Fact]
    public void EveryFragmentLoadOfTheTensorCoreKernelTakesTheFewestWavefronts()
    {
        foreach (var (w, lanes) in Warps())
        {
            for (int buffer = 0; buffer < 2; buffer++)
            {
                for (int kb = 0; kb < TiledGemm.TK; kb += 8)
                {
                    var loads = new List<(string What, int[] Groups)>();
                    for (int t = 0; t < 2; t++)
                    {
                        loads.Add(($"A tile {t}", lanes.Select(tid => buffer * TiledGemm.ATile / 4 + TiledGemm.MmaReadA(kb, t, w, tid & 31)).ToArray()));
                    }
                    for (int q = 0; q < 4; q++)
                    {
                        loads.Add(($"B n-tiles {2 * q}, {2 * q + 1}", lanes.Select(tid => buffer * TiledGemm.BTile / 4 + TiledGemm.MmaReadB(kb, q, w, tid & 31)).ToArray()));
                    }
                    foreach (var (what, groups) in loads)
                    {
                        var words = groups.SelectMany(Words4).ToArray();
                        Assert.True(Wavefronts(words) == Least(words), $"{what}, warp {w}, buffer {buffer}, kb {kb}: {Wavefronts(words)} wavefronts");
                        for (int quarter = 0; quarter < 4; quarter++)
                        {
                            var banks = groups.Skip(8 * quarter).Take(8).Select(g => g % (Banks / 4)).Distinct().Count();
                            Assert.True(banks == 8, $"{what}, warp {w}, kb {kb}, quarter {quarter}: {8 - banks} lanes share a bank group");
                        }
                    }
                }
            }
        }
    }

    /// <summary>The tensor-core kernel's stores into its kk-pair layout (TiledGemm.PairSlotA, PairSlotB): along K one
    /// wavefront each. Across K two, the exception docs/gpu.md names: a warp stores 32 neighbouring rows (columns) at one kk,
    /// and a pair's 16-byte group holds two rows by both kk, so the warp's words are every other one (B: the forward's and
    /// the input gradient's 16 stores a K step; A: only a transposed matmul's). The fused row sums read 32 rows at one kk:
    /// two as well. The loads, which the mma waits on, are the ones kept to one.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TheTensorCoreStoresTakeTheWavefrontsDocsGpuNames(bool alongK)
    {
        int expected = alongK ? 1 : 2;
        foreach (var (w, lanes) in Warps())
        {
            for (int q = 0; q < TiledGemm.TK * TiledGemm.TM / TiledGemm.Threads; q++)
            {
                int got = Wavefronts(lanes.Select(tid => PairA(alongK, tid + q * TiledGemm.Threads)));
                Assert.True(got == expected, $"A, along K {alongK}, warp {w}, store {q}: {got} wavefronts");
            }
            for (int q = 0; q < TiledGemm.TK * TiledGemm.TN / TiledGemm.Threads; q++)
            {
                int got = Wavefronts(lanes.Select(tid => PairB(alongK, tid + q * TiledGemm.Threads)));
                Assert.True(got == expected, $"B, along K {alongK}, warp {w}, store {q}: {got} wavefronts");
            }
            for (int kk = 0; kk < TiledGemm.TK; kk++)
            {
                var rows = lanes.Where(r => r < TiledGemm.TM).Select(r => TiledGemm.PairSlotA(kk, r)).ToArray();
                if (rows.Length > 0)
                {
                    Assert.Equal(2, Wavefronts(rows));
                }
            }
        }
    }

    /// <summary>The kk-pair layout holds every element once, inside a buffer of the FFMA core's size; a thread's staged
    /// elements are its first one's slot plus PairOffsetA/B; and each fragment load reads, in register order, exactly the
    /// elements the PTX ISA puts in a0..a3 (rows g, g + 8 of tile t at k = i, i + 4) and in b0, b1 of its two n-tiles.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TheTensorCoreLayoutHoldsEachElementOnceAndLoadsFragmentsInOrder(bool alongK)
    {
        int aElements = TiledGemm.TK * TiledGemm.TM, bElements = TiledGemm.TK * TiledGemm.TN;
        var a = Enumerable.Range(0, aElements).Select(e => PairA(alongK, e)).ToArray();
        var b = Enumerable.Range(0, bElements).Select(e => PairB(alongK, e)).ToArray();
        Assert.Equal(aElements, a.Distinct().Count());
        Assert.Equal(bElements, b.Distinct().Count());
        Assert.All(a, s => Assert.InRange(s, 0, TiledGemm.ATile - 1));
        Assert.All(b, s => Assert.InRange(s, 0, TiledGemm.BTile - 1));
        for (int tid = 0; tid < TiledGemm.Threads; tid++)
        {
            for (int j = 0; j < 8; j++)
            {
                Assert.Equal(PairA(alongK, tid + j * TiledGemm.Threads), PairA(alongK, tid) + TiledGemm.PairOffsetA(alongK, j));
                Assert.Equal(PairB(alongK, tid + j * TiledGemm.Threads), PairB(alongK, tid) + TiledGemm.PairOffsetB(alongK, j));
                Assert.Equal(PairB(alongK, tid + (8 + j) * TiledGemm.Threads), PairB(alongK, tid + 8 * TiledGemm.Threads) + TiledGemm.PairOffsetB(alongK, j));
            }
        }
        for (int w = 0; w < TiledGemm.Threads / Warp; w++)
        {
            for (int lane = 0; lane < Warp; lane++)
            {
                int g = lane >> 2, i = lane & 3;
                for (int kb = 0; kb < TiledGemm.TK; kb += 8)
                {
                    for (int u = 0; u < 2; u++) // mma k = i (u = 0) is kk = kb + 2i, k = i + 4 is kk = kb + 2i + 1
                    {
                        int kk = kb + 2 * i + u;
                        for (int t = 0; t < 2; t++)
                        {
                            for (int h = 0; h < 2; h++) // a0 (g, i), a1 (g + 8, i), a2 (g, i + 4), a3 (g + 8, i + 4): register h + 2u
                            {
                                int row = 32 * (w & 1) + TiledGemm.MmaRow(g, t, h);
                                Assert.Equal(TiledGemm.PairSlotA(kk, row), 4 * TiledGemm.MmaReadA(kb, t, w, lane) + h + 2 * u);
                            }
                        }
                        for (int j = 0; j < 8; j++) // b0 (i, g), b1 (i + 4, g) of n-tile j: register 2·(j mod 2) + u of load j / 2
                        {
                            int column = 64 * (w >> 1) + TiledGemm.MmaColumn(g, j);
                            Assert.Equal(TiledGemm.PairSlotB(kk, column), 4 * TiledGemm.MmaReadB(kb, j >> 1, w, lane) + 2 * (j & 1) + u);
                        }
                    }
                }
            }
        }
        Assert.Equal(64, Enumerable.Range(0, 2).SelectMany(wm => Enumerable.Range(0, 16).Select(x => 32 * wm + TiledGemm.MmaRow(x % 8, x / 8 % 2, 0)))
            .Concat(Enumerable.Range(0, 2).SelectMany(wm => Enumerable.Range(0, 16).Select(x => 32 * wm + TiledGemm.MmaRow(x % 8, x / 8 % 2, 1)))).Distinct().Count());
        Assert.Equal(64, Enumerable.Range(0, 64).Select(x => TiledGemm.MmaColumn(x % 8, x / 8)).Distinct().Count());
    }

    /// <summary>A loaded in fours (the K steps of one tap, <see cref="ITileOperands.TapSteps"/>): each thread's two rows by four
    /// kd go once each to the slot the layout's loads read (the FFMA core's aS[kk][row], the tensor-core kernels'
    /// <see cref="TiledGemm.PairSlotA"/>), in the register order the stores write; the FFMA core's eight 32-bit stores are one
    /// wavefront each, the tensor-core kernels' two 128-bit stores the fewest, eight different 16-byte groups a quarter-warp.</summary>
    [Fact]
    public void TheStoresOfAInFoursAreOneToOneAndTakeTheFewestWavefronts()
    {
        var ffma = new HashSet<int>();
        var tensor = new HashSet<int>();
        for (int tid = 0; tid < TiledGemm.Threads; tid++)
        {
            int row = TiledGemm.Tile8x8.FoursRow(tid), quad = TiledGemm.Tile8x8.FoursQuad(tid);
            int pair = TiledGemm.FoursPair(tid), tensorQuad = TiledGemm.FoursQuadOf(tid);
            for (int h = 0; h < 2; h++)
            {
                for (int i = 0; i < 4; i++)
                {
                    // Element V(4h + i): row h of the thread's two, kd 4·quad + i.
                    int slot = FfmaFours(tid, h, i);
                    Assert.Equal((4 * quad + i) * TiledGemm.AStride + row + h * TiledGemm.Tile8x8.FoursRowStep, slot);
                    Assert.True(ffma.Add(slot), $"FFMA core: thread {tid}'s element {4 * h + i} lands on another's");
                    int pairSlot = TensorFours(tid, h, i);
                    Assert.Equal(TiledGemm.PairSlotA(4 * tensorQuad + i, 2 * pair + h), pairSlot);
                    Assert.True(tensor.Add(pairSlot), $"tensor cores: thread {tid}'s element {4 * h + i} lands on another's");
                }
            }
        }
        Assert.Equal(TiledGemm.TK * TiledGemm.TM, ffma.Count);
        Assert.Equal(TiledGemm.TK * TiledGemm.TM, tensor.Count);
        Assert.All(ffma, s => Assert.InRange(s, 0, TiledGemm.ATile - 1));
        Assert.All(tensor, s => Assert.InRange(s, 0, TiledGemm.ATile - 1));
        foreach (var (w, lanes) in Warps())
        {
            for (int h = 0; h < 2; h++)
            {
                for (int i = 0; i < 4; i++)
                {
                    Assert.True(Wavefronts(lanes.Select(tid => FfmaFours(tid, h, i))) == 1, $"FFMA core's store of element {4 * h + i}, warp {w}");
                }
            }
            for (int store = 0; store < 2; store++)
            {
                var groups = lanes.Select(tid => TiledGemm.FoursGroup(tid) + store * (TiledGemm.PairAStride / 4)).ToArray();
                var words = groups.SelectMany(Words4).ToArray();
                Assert.True(Wavefronts(words) == Least(words), $"tensor cores' store {store}, warp {w}: {Wavefronts(words)} wavefronts");
                for (int quarter = 0; quarter < 4; quarter++)
                {
                    var banks = groups.Skip(8 * quarter).Take(8).Select(g => g % (Banks / 4)).Distinct().Count();
                    Assert.True(banks == 8, $"tensor cores' store {store}, warp {w}, quarter {quarter}: {8 - banks} lanes share a bank group");
                }
            }
        }
    }

    /// <summary>Where the FFMA core's <see cref="TiledGemm.Tile8x8.StoreFours"/> puts element V(4h + i) of thread tid.</summary>
    private static int FfmaFours(int tid, int h, int i) => TiledGemm.FoursSlot(tid) + i * TiledGemm.AStride + h * 32;

    /// <summary>Where the tensor-core kernels' StoreFours puts element V(4h + i): the first 16-byte group holds (V0, V4, V1, V5),
    /// the second, a kk pair on, (V2, V6, V3, V7).</summary>
    private static int TensorFours(int tid, int h, int i) =>
        4 * TiledGemm.FoursGroup(tid) + (i >= 2 ? TiledGemm.PairAStride : 0) + 2 * (i & 1) + h;

    /// <summary>The weight gradient's column taps (a <see cref="Tap"/>, two words, a column of the tile): thread tid stores
    /// entry tid once a launch (a warp's 64 words: the two wavefronts they need), and each K step reads entries line + 8·j
    /// as 64-bit loads (a warp's lanes share 8 lines: one wavefront).</summary>
    [Fact]
    public void TheColumnTapsTakeTheFewestWavefronts()
    {
        foreach (var (w, lanes) in Warps())
        {
            var stores = lanes.SelectMany(tid => new[] { 2 * tid, 2 * tid + 1 }).ToArray();
            Assert.Equal(Least(stores), Wavefronts(stores));
            for (int j = 0; j < TiledGemm.TK; j++)
            {
                var reads = lanes.SelectMany(tid => new[] { 0, 1 }.Select(h => 2 * (TiledGemm.Element(true, tid, TiledGemm.TN).Line + 8 * j) + h)).ToArray();
                Assert.Equal(1, Wavefronts(reads));
            }
        }
    }

    private static int PairA(bool alongK, int e)
    {
        var (kk, row) = TiledGemm.Element(alongK, e, TiledGemm.TM);
        return TiledGemm.PairSlotA(kk, row);
    }

    private static int PairB(bool alongK, int e)
    {
        var (kk, column) = TiledGemm.Element(alongK, e, TiledGemm.TN);
        return TiledGemm.PairSlotB(kk, column);
    }

    /// <summary>Every element of a tile has a slot of its own, inside one buffer, whichever way it is fetched, and the
    /// register tiles' loads read it where it was stored.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TheSlotsAreAOneToOneLayoutInsideTheTiles(bool alongK)
    {
        int aElements = TiledGemm.TK * TiledGemm.TM, bElements = TiledGemm.TK * TiledGemm.TN;
        var a = Enumerable.Range(0, aElements).Select(e => TiledGemm.SlotA(alongK, e)).ToArray();
        var b = Enumerable.Range(0, bElements).Select(e => TiledGemm.SlotB(alongK, e)).ToArray();
        Assert.Equal(aElements, a.Distinct().Count());
        Assert.Equal(bElements, b.Distinct().Count());
        Assert.All(a, s => Assert.InRange(s, 0, TiledGemm.ATile - 1));
        Assert.All(b, s => Assert.InRange(s, 0, TiledGemm.BTile - 1));
        Assert.Equal(0, TiledGemm.AStride % 4);
        Assert.Equal(0, TiledGemm.BStride % 4);
        Assert.Equal(0, TiledGemm.ATile % Banks);
        Assert.Equal(0, TiledGemm.BTile % Banks);
        for (int e = 0; e < aElements; e++)
        {
            var (kk, row) = TiledGemm.Element(alongK, e, TiledGemm.TM);
            Assert.Equal(4 * (TiledGemm.ReadA(kk, row / 8) + row % 8 / 4) + row % 4, a[e]);
            Assert.Equal(TiledGemm.RowSumSlot(kk, row), a[e]);
        }
        for (int e = 0; e < bElements; e++)
        {
            var (kk, column) = TiledGemm.Element(alongK, e, TiledGemm.TN);
            Assert.Equal(4 * (TiledGemm.ReadB(kk, column % 64 / 4) + column / 64 * TiledGemm.TN / 8) + column % 4, b[e]);
        }
    }

    /// <summary>
    /// The group reductions of TiledReduce and TiledNorm (GroupSum, GroupSum2, the segmented tree): each thread stores
    /// sh[t] (and sh[MaxThreads + t]), then each level of the radix-16 tree has lane &lt; m of every segment read
    /// sh[t + i·m] (<see cref="TiledReduce.TreeSlot"/>). Walked for every segment width a launch uses (1 to 256 lanes),
    /// every level, every i and every warp: one wavefront each. (Thread 0's reads of the segments' results, sh[q·lanes],
    /// are one lane: one wavefront.)
    /// </summary>
    [Fact]
    public void EveryAccessOfTheGroupReductionsIsOneWavefront()
    {
        const int group = 256;
        foreach (var (w, lanes) in Warps())
        {
            Assert.Equal(1, Wavefronts(lanes));
            Assert.Equal(1, Wavefronts(lanes.Select(t => TiledReduce.MaxThreads + t)));
            for (int width = 1; width <= group; width *= 2)
            {
                for (int n = width; n > 1;)
                {
                    int r = Math.Min(TiledReduce.Radix, n), m = n / r;
                    var active = lanes.Where(t => (t & (width - 1)) < m).ToArray();
                    for (int i = 0; i < r && active.Length > 0; i++)
                    {
                        Assert.True(Wavefronts(active.Select(t => TiledReduce.TreeSlot(t, i, m))) == 1, $"tree, width {width}, n {n}, i {i}, warp {w}");
                        Assert.True(Wavefronts(active.Select(t => TiledReduce.MaxThreads + TiledReduce.TreeSlot(t, i, m))) == 1, $"second tree, width {width}, n {n}, i {i}, warp {w}");
                    }
                    n = m;
                }
            }
        }
    }
}
