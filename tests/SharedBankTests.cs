using Ddpm.Kernels;

namespace Ddpm.Tests;

/// <summary>
/// Shared-memory bank conflicts of every tiled kernel, counted as the hardware does: words in the same bank (word address
/// mod 32) but at different addresses are served in separate wavefronts, one address read by many lanes is a broadcast.
/// Every store and load the kernels make (their addressing is plain functions they call: <see cref="TiledGemm.SlotA"/>,
/// <see cref="TiledGemm.SlotB"/>, <see cref="TiledGemm.ReadA"/>, <see cref="TiledGemm.ReadB"/>,
/// <see cref="TiledGemm.RowSumSlot"/>, the tensor-core kernel's <see cref="TiledGemm.MmaReadA"/> and
/// <see cref="TiledGemm.MmaReadB"/>, <see cref="TiledReduce.TreeSlot"/>) is walked for every warp of the 256-thread
/// group: a 32-bit access must be one wavefront, a 128-bit one the fewest its bytes need (docs/gpu.md).
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

    /// <summary>Every element of a tile has a slot of its own, inside one buffer, whichever way it is fetched, and the
    /// register tiles' loads read it where it was stored.</summary>
    /// <summary>The tensor-core kernel's fragment loads (TiledGemm.MmaReadA, MmaReadB): per k8 step two 128-bit loads of A
    /// (mma k = i and i + 4) and four of B (two column halves at each): the fewest wavefronts, and within each quarter-warp
    /// (the eight lanes one 128-bit wavefront serves) eight different 16-byte groups across the 32 banks.</summary>
    [Fact]
    public void EveryFragmentLoadOfTheTensorCoreKernelTakesTheFewestWavefronts()
    {
        foreach (var (w, lanes) in Warps())
        {
            for (int buffer = 0; buffer < 2; buffer++)
            {
                for (int kb = 0; kb < TiledGemm.TK; kb += 8)
                {
                    for (int upper = 0; upper < 2; upper++)
                    {
                        var loads = new List<(string What, int[] Groups)>
                        {
                            ("A", lanes.Select(tid => buffer * TiledGemm.ATile / 4 + TiledGemm.MmaReadA(kb, upper, w, tid & 31)).ToArray()),
                        };
                        for (int half = 0; half < 2; half++)
                        {
                            loads.Add(($"B half {half}", lanes.Select(tid => buffer * TiledGemm.BTile / 4 + TiledGemm.MmaReadB(kb, upper, half, w, tid & 31)).ToArray()));
                        }
                        foreach (var (what, groups) in loads)
                        {
                            var words = groups.SelectMany(Words4).ToArray();
                            Assert.True(Wavefronts(words) == Least(words), $"{what}, warp {w}, buffer {buffer}, kb {kb}, upper {upper}: {Wavefronts(words)} wavefronts");
                            for (int quarter = 0; quarter < 4; quarter++)
                            {
                                var banks = groups.Skip(8 * quarter).Take(8).Select(g => g % (Banks / 4)).Distinct().Count();
                                Assert.True(banks == 8, $"{what}, warp {w}, kb {kb}, upper {upper}, quarter {quarter}: {8 - banks} lanes share a bank group");
                            }
                        }
                    }
                }
            }
        }
    }

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
