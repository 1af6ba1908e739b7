using Ddpm.Kernels;

namespace Ddpm.Tests;

/// <summary>
/// Shared-memory bank conflicts of the tiled GEMM, counted as the hardware does: a warp's 32 lanes each access one 32-bit
/// word; words in the same bank (address mod 32) but at different addresses are served in separate wavefronts, one
/// address read by many lanes is a broadcast. Every store and load the kernel makes (its addressing is
/// <see cref="TiledGemm.SlotA"/>, <see cref="TiledGemm.SlotB"/>, <see cref="TiledGemm.ReadA"/>, <see cref="TiledGemm.ReadB"/>)
/// is walked for every warp of the 256-thread group: each must be one wavefront.
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
            for (int q = 0; q < TiledGemm.TK * TiledGemm.TM / TiledGemm.Threads; q++)
            {
                // Thread tid stores elements tid + q·256 of each tile (the pipelined GPU path).
                Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.SlotA(alongK, tid + q * TiledGemm.Threads))) == 1, $"A, along K {alongK}, warp {w}, store {q}");
                Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.SlotB(alongK, tid + q * TiledGemm.Threads))) == 1, $"B, along K {alongK}, warp {w}, store {q}");
            }
        }
    }

    [Fact]
    public void EveryLoadOfTheGemmTilesIsOneWavefront()
    {
        foreach (var (w, lanes) in Warps())
        {
            for (int kk = 0; kk < TiledGemm.TK; kk++)
            {
                for (int i = 0; i < 4; i++)
                {
                    // Thread tid owns the register tile of rows tid / 16 + 16·i and columns tid % 16 + 16·j.
                    Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.ReadA(kk, tid / 16, i))) == 1, $"A load, warp {w}, kk {kk}, i {i}");
                    Assert.True(Wavefronts(lanes.Select(tid => TiledGemm.ReadB(kk, tid % 16, i))) == 1, $"B load, warp {w}, kk {kk}, j {i}");
                }
                // The fused row sums: thread r reads aS[kk][r] for its rows r < 64.
                var rowLanes = lanes.Where(r => r < TiledGemm.TM).ToArray();
                if (rowLanes.Length > 0)
                {
                    Assert.True(Wavefronts(rowLanes.Select(r => TiledGemm.ReadA(kk, r, 0))) == 1, $"row sums, warp {w}, kk {kk}");
                }
            }
        }
    }

    /// <summary>Every element of a tile has a slot of its own, inside the allocation, whichever way it is fetched.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TheSlotsAreAOneToOneLayoutInsideTheTiles(bool alongK)
    {
        int elements = TiledGemm.TK * TiledGemm.TM;
        var a = Enumerable.Range(0, elements).Select(e => TiledGemm.SlotA(alongK, e)).ToArray();
        var b = Enumerable.Range(0, elements).Select(e => TiledGemm.SlotB(alongK, e)).ToArray();
        Assert.Equal(elements, a.Distinct().Count());
        Assert.Equal(elements, b.Distinct().Count());
        Assert.All(a, s => Assert.InRange(s, 0, TiledGemm.TK * TiledGemm.AStride - 1));
        Assert.All(b, s => Assert.InRange(s, 0, TiledGemm.TK * TiledGemm.BStride - 1));
        // Element (kk, row) is where the loads read it.
        for (int e = 0; e < elements; e++)
        {
            int kk = alongK ? e % TiledGemm.TK : e / TiledGemm.TM, row = alongK ? e / TiledGemm.TK : e % TiledGemm.TM;
            Assert.Equal(TiledGemm.ReadA(kk, row % 16, row / 16), a[e]);
            Assert.Equal(TiledGemm.ReadB(kk, row % 16, row / 16), b[e]);
        }
    }
}
