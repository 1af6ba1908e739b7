using System.Diagnostics;
using Ddpm.Kernels;
using Ddpm.Kernels.Checks;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>
/// The explicitly grouped GroupNorm and reduction kernels (TiledNorm, TiledReduce) and their simple
/// twins against the managed CPU backend, on ILGPU's simulator shaped as a warp-32 GPU (groups of
/// 256; the GroupNorm forward's and backward's up to 512) and a warp-4 one (groups of 64): ragged shapes (C/G not a power of two, 7×7 and 5×3 maps,
/// lengths that are multiples of no group size, channel counts that need several rounds), outputs
/// poisoned with NaN, and a rerun that must be bit-identical.
/// </summary>
[Collection(GpuLikeCollection.Name)]
public sealed class GpuTiledReductionTests(GpuLikeFixture fixture, ITestOutputHelper output)
{
    private static readonly OpCase[] All =
    [
        // C/G = 3 channels of 7×7, 147 elements a group: full groups of 256 threads at warp 32, the segments of a round outnumber the channels.
        Norm("groupnorm N3 C12 G4 7x7", n: 3, c: 12, h: 7, w: 7, groups: 4, silu: false, accumulate: true),
        // 45 elements a group: groups of 64 threads, 19 of them idle.
        Norm("groupnorm+silu N3 C12 G4 5x3", n: 3, c: 12, h: 5, w: 3, groups: 4, silu: true, accumulate: true),
        // 40 channels in one group: two rounds of 32 segments at warp 32, five of 8 at warp 4; dx overwritten (poisoned first).
        Norm("groupnorm+silu N2 C40 G1 2x3 dx overwritten", n: 2, c: 40, h: 2, w: 3, groups: 1, silu: true, accumulate: false),
        // The forward's slice in registers: 2,400 elements a group, 512 threads at warp 32 (one held run of eight, ragged),
        // 64 at warp 4 (all five runs, 37 or 38 elements a thread: the last run ragged).
        Norm("groupnorm+silu N2 C6 G3 30x40", n: 2, c: 6, h: 30, w: 40, groups: 3, silu: true, accumulate: true),
        // 2,560 elements: at warp 4 every one of a thread's 40 fields holds an element (the held path's capacity).
        Norm("groupnorm N1 C2 G1 32x40", n: 1, c: 2, h: 32, w: 40, groups: 1, silu: false, accumulate: true),
        // The backward's held path at warp 4: 2 channels of 900 in two segments of 32 lanes, 29 elements a lane (four
        // runs, the last ragged), dx overwritten; the cases above with over 32 a lane (30x40, 37x37, 32x40 at warp 4) and
        // the 40 channels in several rounds take its two-read path.
        Norm("groupnorm+silu N2 C4 G2 30x30 dx overwritten", n: 2, c: 4, h: 30, w: 30, groups: 2, silu: true, accumulate: false),
        // Held at warp 4 without SiLU, dx accumulated: 2 channels of 784, 25 elements a lane (four runs, the last one short).
        Norm("groupnorm N1 C2 G1 28x28", n: 1, c: 2, h: 28, w: 28, groups: 1, silu: false, accumulate: true),
        // dec0.norm1's case in small: 24 channels of 23x23 in one group take 512 threads at warp 32 (32 segments of 16
        // lanes, 34 elements a lane: over the 32 held), so the backward reads dy and x twice there; three rounds at warp 4.
        Norm("groupnorm+silu N1 C24 G1 23x23", n: 1, c: 24, h: 23, w: 23, groups: 1, silu: true, accumulate: true),
        // 2,738 elements a group: held by 512 threads at warp 32; over the 64 x 40 = 2,560 that warp 4's groups hold, so
        // there the forward reads x three times (TiledNorm.ReadsOnce).
        Norm("groupnorm N1 C4 G2 37x37", n: 1, c: 4, h: 37, w: 37, groups: 2, silu: false, accumulate: true),
        // 40 images of 3×5: at warp 4 (64 threads, 512 elements a group) the batch splits in two, the second split short.
        ConvBias("conv bias N40 K3 3x5", n: 40, k: 3, h: 3, w: 5),
        ConvBias("conv bias N3 K5 7x7", n: 3, k: 5, h: 7, w: 7),
        // Time-embedding bias gradient (row sums over H×W): 63 columns get 16 lanes, 15 rows fill one group of 16 short at
        // warp 32 and four of 4 (the last short) at warp 4; 784 columns, a row a group, 3 or 12 elements a lane with a
        // ragged tail; 196 columns, 64 lanes; 3 columns, one lane a row and 35 rows in one group.
        RowSums("time bias rows N3 C5 7x9", n: 3, c: 5, h: 7, w: 9),
        RowSums("time bias rows N2 C3 28x28", n: 2, c: 3, h: 28, w: 28),
        RowSums("time bias rows N3 C5 14x14", n: 3, c: 5, h: 14, w: 14),
        RowSums("time bias rows N5 C7 1x3", n: 5, c: 7, h: 1, w: 3),
        // 5,003 elements: 3 groups at warp 32, 10 at warp 4, the last one ragged.
        Reductions("sum, mean, sum of squares, mse over 5003", 5003),
        Reductions("sum, mean, sum of squares, mse over 7", 7),
        Flags("flag non-finite over 1203", 1203),
        new OpCase
        {
            Name = "softmax cross-entropy 7x11",
            Inputs = [new("logits", [7, 11]), new("labels", [7], InputFill.Digits, Differentiable: false)],
            Forward = (s, x) =>
            {
                var y = s.Output(1);
                Reduce.SoftmaxCrossEntropy(x[0], x[1], y);
                return [y];
            },
        },
    ];

    public static TheoryData<string, int, bool> Cases
    {
        get
        {
            var data = new TheoryData<string, int, bool>();
            foreach (var c in All)
            {
                foreach (int warp in new[] { 32, 4 })
                {
                    data.Add(c.Name, warp, false);
                    data.Add(c.Name, warp, true);
                }
            }
            return data;
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task MatchesCpuAndRerunsBitIdentical(string name, int warp, bool simple)
    {
        var c = All.First(x => x.Name == name);
        var device = fixture[warp];
        var kernels = IlgpuKernels.For(device);
        bool before = kernels.Simple;
        kernels.Simple = simple;
        try
        {
            var clock = Stopwatch.StartNew();
            var inputs = Checker.MakeInputs(c, 1234);
            List<(string Name, float[] Values)>? expected = null, first = null, second = null;
            // A barrier some thread never reaches deadlocks the simulator: bound the wait instead of hanging the run.
            var run = Task.Run(() =>
            {
                expected = Checker.RunOnDevice(c, CpuDevice.Instance, inputs, 1234);
                first = Checker.RunOnDevice(c, device, inputs, 1234);
                second = Checker.RunOnDevice(c, device, inputs, 1234);
            });
            bool finished = await Task.WhenAny(run, Task.Delay(TimeSpan.FromSeconds(180))) == run;
            Assert.True(finished, $"{name} at warp {warp} did not finish in 180 s (a divergent barrier, or a starved machine)");
            await run;
            output.WriteLine($"{name}: {(simple ? "simple" : "tiled")}, warp {warp}, {clock.ElapsedMilliseconds} ms");
            for (int r = 0; r < expected!.Count; r++)
            {
                var (outName, want) = expected[r];
                var got = first![r].Values;
                var again = second![r].Values;
                for (int i = 0; i < want.Length; i++)
                {
                    // The case's tolerance: float sums in another order than the CPU's double ones (KernelAtol + KernelRtol·|cpu|).
                    double diff = Math.Abs((double)got[i] - want[i]);
                    Assert.True(diff <= c.KernelAtol + c.KernelRtol * Math.Abs(want[i]), $"{outName}[{i}]: cpu {want[i]:G7}, ilgpu {got[i]:G7}");
                    Assert.True(BitConverter.SingleToInt32Bits(got[i]) == BitConverter.SingleToInt32Bits(again[i]),
                        $"{outName}[{i}] differs between reruns: {got[i]:R} then {again[i]:R}");
                }
            }
        }
        finally
        {
            kernels.Simple = before;
        }
    }

    [Fact]
    public void TheForwardReadsTheBasePresetsSlicesOnce()
    {
        // Base preset, GroupNorm G = 8 (the inputs of its 3x3 stride-1 convolutions but conv_in's, and conv_out's norm):
        // the largest (image, group) slice is dec0.norm1's, 192 channels of 28x28 (24 x 784);
        // on a CUDA device (groups of 1,024) 512 threads hold it, 37 elements a thread. docs/gpu.md prices the forward at
        // one read of x on that.
        foreach (var (channels, hw) in new[] { (64, 784), (128, 784), (192, 784), (64, 196), (128, 196), (256, 196), (384, 196), (128, 49), (256, 49) })
        {
            int size = channels / 8 * hw, threads = TiledNorm.ThreadsFor(1024, size);
            Assert.True(TiledNorm.ReadsOnce(size, threads), $"{channels} channels of {hw}: {size} elements, {threads} threads");
        }
        Assert.Equal(512, TiledNorm.ThreadsFor(1024, 24 * 784));
        // Small slices take the smallest power of two that covers them; warp 4's groups hold 2,560 at most.
        Assert.Equal(64, TiledNorm.ThreadsFor(1024, 45));
        Assert.False(TiledNorm.ReadsOnce(2738, TiledNorm.ThreadsFor(64, 2738)));
    }

    [Fact]
    public void TheBackwardReadsEveryBaseSliceButTheLargestOnce()
    {
        // Base preset, G = 8, a CUDA device (groups of 1,024): every GroupNorm's backward holds its elements between the sums
        // and dx (one round of channel segments, at most 32 elements a lane) but dec0.norm1's, 24 channels of 28x28 (32
        // segments of 16 lanes, 49 a lane), 28% of the step's GroupNorm elements, which reads dy and x twice.
        foreach (var (channels, hw) in new[] { (64, 784), (128, 784), (64, 196), (128, 196), (256, 196), (384, 196), (128, 49), (256, 49) })
        {
            int perGroup = channels / 8, threads = TiledNorm.ThreadsFor(1024, perGroup * hw);
            Assert.True(TiledNorm.BackwardReadsOnce(perGroup, hw, threads), $"{channels} channels of {hw}: {threads} threads");
        }
        Assert.False(TiledNorm.BackwardReadsOnce(24, 784, TiledNorm.ThreadsFor(1024, 24 * 784)));
        // The simulator cases: held at warp 4 with 900 a channel, not with 1,200 or 40 channels.
        Assert.True(TiledNorm.BackwardReadsOnce(2, 900, TiledNorm.ThreadsFor(64, 1800)));
        Assert.False(TiledNorm.BackwardReadsOnce(2, 1200, TiledNorm.ThreadsFor(64, 2400)));
        Assert.False(TiledNorm.BackwardReadsOnce(40, 6, TiledNorm.ThreadsFor(64, 240)));
    }

    [Theory]
    [InlineData(3, 256, 64)] // 3 channels: 4 segments of 64 lanes, one idle
    [InlineData(8, 256, 32)] // base 28×28 (C=64, G=8)
    [InlineData(48, 256, 8)] // base 14×14 decoder input (C=384) in a group of 256: 32 segments of 8 lanes, two rounds
    [InlineData(3, 64, 16)]
    [InlineData(40, 64, 8)]
    [InlineData(3, 16, 8)]
    [InlineData(1, 16, 16)]
    public void BackwardSegmentsAreNeverNarrowerThanASector(int channelsPerGroup, int threads, int lanes)
    {
        Assert.Equal(lanes, TiledNorm.Lanes(channelsPerGroup, threads));
    }

    [Theory]
    [InlineData(128, 784, 256, 3, 43)] // 28×28 at batch 128: 43 groups per channel
    [InlineData(128, 196, 256, 11, 12)]
    [InlineData(128, 49, 256, 42, 4)] // 7×7
    [InlineData(3, 49, 256, 3, 1)]
    [InlineData(40, 15, 64, 35, 2)]
    public void BiasGradientSplitsTheBatchIntoWholeImages(int n, int inner, int threads, int rows, int splits)
    {
        Assert.Equal((rows, splits), TiledReduce.ChannelSplits(n, inner, threads));
    }

    [Theory]
    [InlineData(784, 256, 256)] // 28×28: a group a row
    [InlineData(196, 256, 64)] // 14×14: four rows a group
    [InlineData(49, 256, 16)] // 7×7: sixteen rows a group
    [InlineData(784, 64, 64)] // the warp-4 simulator's groups of 64
    [InlineData(4, 256, 1)]
    [InlineData(5, 256, 2)]
    public void TimeBiasRowsGetAboutFourElementsALane(int cols, int threads, int lanes)
    {
        Assert.Equal(lanes, TiledReduce.RowLanes(cols, threads));
    }

    [Fact]
    public void GroupSizeIsAPowerOfTwoTheDeviceAllows()
    {
        Assert.Equal(256, TiledReduce.Threads(fixture.Warp32.Accelerator));
        Assert.Equal(64, TiledReduce.Threads(fixture.Warp4.Accelerator));
    }

    // Forward and backward in one run: y, mean, rstd, then dx (accumulated onto random values, or overwritten
    // over NaN), dgamma and dbeta (accumulated onto random values).
    private static OpCase Norm(string name, int n, int c, int h, int w, int groups, bool silu, bool accumulate) => new()
    {
        Name = name,
        Inputs =
        [
            new("x", [n, c, h, w]), new("gamma", [c], InputFill.Positive), new("beta", [c]), new("dy", [n, c, h, w]),
            new("dx0", [n, c, h, w]), new("dgamma0", [c]), new("dbeta0", [c]),
        ],
        Forward = (s, x) =>
        {
            var y = s.Output(n, c, h, w);
            var mean = s.Output(n, groups);
            var rstd = s.Output(n, groups);
            GroupNorm.Forward(x[0], x[1], x[2], groups, 1e-5f, y, mean, rstd, silu);
            var dx = s.Output(n, c, h, w);
            if (accumulate)
            {
                dx.CopyFrom(x[4]);
            }
            var dgamma = s.Output(c);
            dgamma.CopyFrom(x[5]);
            var dbeta = s.Output(c);
            dbeta.CopyFrom(x[6]);
            GroupNorm.Backward(x[3], x[0], mean, rstd, x[1], x[2], groups, dx, dgamma, dbeta, silu, accumulate);
            return [y, mean, rstd, dx, dgamma, dbeta];
        },
    };

    // db (random start) += Σ_{n, hw} dy.
    private static OpCase ConvBias(string name, int n, int k, int h, int w) => new()
    {
        Name = name,
        Inputs = [new("dy", [n, k, h, w]), new("db0", [k])],
        Forward = (s, x) =>
        {
            var db = s.Output(k);
            db.CopyFrom(x[1]);
            Conv2d.BackwardBias(x[0], db);
            return [db];
        },
    };

    // de (random start) += Σ_hw dy: the time embedding's gradient through a ResBlock's channel bias.
    private static OpCase RowSums(string name, int n, int c, int h, int w) => new()
    {
        Name = name,
        Inputs = [new("dy", [n, c, h, w]), new("de0", [n, c])],
        Forward = (s, x) =>
        {
            var de = s.Output(n, c);
            de.CopyFrom(x[1]);
            Elementwise.AddChannelsBackward(x[0], de);
            return [de];
        },
    };

    private static OpCase Reductions(string name, int length) => new()
    {
        Name = name,
        Inputs = [new("a", [length]), new("b", [length])],
        Forward = (s, x) =>
        {
            var outs = new[] { s.Output(1), s.Output(1), s.Output(1), s.Output(1) };
            Reduce.Sum(x[0], outs[0]);
            Reduce.Mean(x[0], outs[1]);
            Reduce.SumSquares(x[0], outs[2]);
            Reduce.Mse(x[0], x[1], outs[3]);
            return outs;
        },
    };

    // Four flags: all finite (stays), +inf in the ragged last element, NaN in the middle, and a higher id after a lower one.
    private static OpCase Flags(string name, int length) => new()
    {
        Name = name,
        Inputs = [new("x", [length])],
        Forward = (s, x) =>
        {
            var host = x[0].ToArray();
            var lastInf = (float[])host.Clone();
            lastInf[^1] = float.PositiveInfinity;
            var midNaN = (float[])host.Clone();
            midNaN[length / 2] = float.NaN;
            var flags = Enumerable.Range(0, 3).Select(_ => s.Output(1)).ToArray();
            foreach (var f in flags)
            {
                Elementwise.Fill(f, Reduce.NoneFlagged);
            }
            Reduce.FlagNonFinite(x[0], flags[0], 4);
            Reduce.FlagNonFinite(s.Host(lastInf, length), flags[1], 7);
            Reduce.FlagNonFinite(s.Host(midNaN, length), flags[2], 2);
            Reduce.FlagNonFinite(s.Host(lastInf, length), flags[2], 5);
            return flags;
        },
    };
}
