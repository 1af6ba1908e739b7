using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>
/// Tensor views (an offset into a parent's storage) on both backends, and the optimizer over parameters held as one
/// flat buffer: Adam, EMA, the non-finite flag and clipping as one launch each, against the per-parameter path.
/// </summary>
[Collection(IlgpuCollection.Name)]
public sealed class FlatParameterTests(IlgpuFixture gpu)
{
    private static float[] Random(int n, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
    }

    public static TheoryData<string> Backends => new() { "cpu", "ilgpu" };

    private Device DeviceOf(string backend) => backend == "cpu" ? CpuDevice.Instance : gpu.Device;

    [Theory]
    [MemberData(nameof(Backends))]
    public void AViewReadsAndWritesItsRangeOfTheParent(string backend)
    {
        var d = DeviceOf(backend);
        var values = Random(23, 1);
        using var parent = Tensor.FromHost(d, values, 23);
        using var view = parent.Slice(5, 3, 4); // elements 5..16
        Assert.True(view.IsView);
        Assert.Equal(5, view.Offset);
        Assert.Equal(values[5..17], view.ToArray());
        using var inner = view.Slice(2, 3); // elements 7..9 of the parent
        Assert.Equal(7, inner.Offset);
        Assert.Equal(values[7..10], inner.ToArray());

        inner.CopyFrom([100f, 101f, 102f]);
        view.Slice(11, 1).Zero(); // element 16
        var want = (float[])values.Clone();
        (want[7], want[8], want[9], want[16]) = (100f, 101f, 102f, 0f);
        Assert.Equal(want, parent.ToArray());

        // A device copy between two views of one buffer moves exactly their ranges.
        using var tail = parent.Slice(20, 3);
        tail.CopyFrom(inner);
        (want[20], want[21], want[22]) = (100f, 101f, 102f);
        Assert.Equal(want, parent.ToArray());

        // Disposing a view frees nothing; the parent still holds every value.
        view.Dispose();
        Assert.Equal(want, parent.ToArray());
        Assert.Throws<ArgumentOutOfRangeException>(() => parent.Slice(21, 3));
    }

    /// <summary>Kernels on views off the parent's start, on both backends: each touches its range only (the CPU kernels
    /// index from <see cref="Tensor.Pointer"/>, which includes the offset). A SIMD op (scale), a scalar one (fill), a
    /// reduction into a view (the time-embedding bias gradient) and a GEMM (linear, weights and bias as views).</summary>
    [Theory]
    [MemberData(nameof(Backends))]
    public void AKernelOnAViewTouchesOnlyItsRange(string backend)
    {
        var d = DeviceOf(backend);
        var values = Random(61, 2);
        using var parent = Tensor.FromHost(d, values, 61);
        using var view = parent.Slice(6, 21); // longer than a vector, ragged
        Elementwise.Scale(view, 2f, view);
        using (var head = parent.Slice(0, 1))
        {
            Elementwise.Fill(head, 7f);
        }
        var want = (float[])values.Clone();
        for (int i = 6; i < 27; i++)
        {
            want[i] *= 2f;
        }
        want[0] = 7f;
        Assert.Equal(want, parent.ToArray());

        // de [1, 2] at 40..41 += Σ_hw dy for dy [1, 2, 3, 3].
        var dy = Random(18, 4);
        using (var dyT = Tensor.FromHost(d, dy, 1, 2, 3, 3))
        using (var de = parent.Slice(40, 1, 2))
        {
            Elementwise.AddChannelsBackward(dyT, de);
        }
        want[40] += dy[..9].Sum();
        want[41] += dy[9..].Sum();
        var got = parent.ToArray();
        for (int i = 0; i < 61; i++)
        {
            Assert.True(Math.Abs(got[i] - want[i]) <= 1e-5f, $"[{i}]: {got[i]} against {want[i]}");
        }

        // y [2, 3] = x [2, 4]·wᵀ + b with w [3, 4] at 44..55 and b [3] at 56..58 of the parent.
        var x = Random(8, 5);
        using var xT = Tensor.FromHost(d, x, 2, 4);
        using var w = parent.Slice(44, 3, 4);
        using var b = parent.Slice(56, 3);
        using var y = Tensor.Empty(d, 2, 3);
        Linear.Forward(xT, w, b, y);
        var yv = y.ToArray();
        for (int r = 0; r < 2; r++)
        {
            for (int o = 0; o < 3; o++)
            {
                float e = got[56 + o];
                for (int j = 0; j < 4; j++)
                {
                    e += x[r * 4 + j] * got[44 + o * 4 + j];
                }
                Assert.True(Math.Abs(yv[r * 3 + o] - e) <= 1e-5f, $"y[{r}, {o}]: {yv[r * 3 + o]} against {e}");
            }
        }
    }

    /// <summary>A U-Net gathers its parameters into one flat buffer on both backends: every value and gradient is a view,
    /// in creation order, and the buffers hold exactly the model's parameters.</summary>
    [Theory]
    [MemberData(nameof(Backends))]
    public void AUNetsParametersAreViewsOfOneBufferOnEveryBackend(string backend)
    {
        var model = new UNet(16, DeviceOf(backend), seed: 7);
        var set = model.Parameters;
        Assert.True(set.IsFlat);
        Assert.Equal(model.ParameterCount, (long)set.Values.Length);
        Assert.Equal(model.ParameterCount, (long)set.Grads.Length);
        for (int i = 0; i < set.Count; i++)
        {
            Assert.True(set[i].Value.IsView && set[i].Grad!.IsView, set[i].Name);
            Assert.Equal(set.OffsetOf(i), set[i].Value.Offset);
            Assert.Equal(set.OffsetOf(i), set[i].Grad!.Offset);
        }
        set.Dispose();
    }

    [Fact]
    public unsafe void ACpuViewPointsIntoItsParent()
    {
        using var parent = Tensor.FromHost(CpuDevice.Instance, Random(10, 3), 10);
        using var view = parent.Slice(4, 6);
        Assert.True(parent.Pointer + 4 == view.Pointer);
        Assert.Equal(parent.ToArray()[4..], view.Span.ToArray());
        Assert.Equal(parent.ToArray()[4], *view.Pointer);
    }

    [Theory]
    [MemberData(nameof(Backends))]
    public void MoveIntoMakesATensorAViewAndGivesItsStorageBack(string backend)
    {
        var d = DeviceOf(backend);
        using var flat = Tensor.Zeros(d, 12);
        var a = Tensor.FromHost(d, [1f, 2f, 3f], 3);
        var b = Tensor.FromHost(d, [4f, 5f, 6f, 7f], 2, 2);
        long live = d.Stats.LiveBytes;
        a.MoveInto(flat, 2);
        b.MoveInto(flat, 7);
        Assert.Equal(live - 4 * 7, d.Stats.LiveBytes);
        Assert.Equal([0f, 0f, 1f, 2f, 3f, 0f, 0f, 4f, 5f, 6f, 7f, 0f], flat.ToArray());
        b.CopyFrom([8f, 9f, 10f, 11f]);
        Assert.Equal(11f, flat.ToArray()[10]);
        Assert.Equal([2, 2], b.Shape);
        a.Dispose();
        b.Dispose();
        Assert.Equal(8f, flat.ToArray()[7]);
    }

    /// <summary>Parameters of ragged shapes with random values and gradients: one set as separate tensors (the per-parameter
    /// path), one flat (every value and gradient a view of one buffer), holding the same numbers.</summary>
    private static (ParameterSet Separate, ParameterSet Flat) TwoSets(Device separateDevice, Device flatDevice, int seed)
    {
        int[][] shapes = [[5, 3, 3, 3], [5], [1], [7, 4], [7], [3, 1, 3, 3], [3]];
        var separate = new List<Parameter>();
        var flat = new List<Parameter>();
        for (int i = 0; i < shapes.Length; i++)
        {
            int n = shapes[i].Aggregate(1, (x, y) => x * y);
            var v = Random(n, seed + i);
            var g = Random(n, seed + 100 + i);
            separate.Add(new Parameter($"p{i}", Tensor.FromHost(separateDevice, v, shapes[i])) { Grad = Tensor.FromHost(separateDevice, g, shapes[i]) });
            flat.Add(new Parameter($"p{i}", Tensor.FromHost(flatDevice, v, shapes[i])) { Grad = Tensor.FromHost(flatDevice, g, shapes[i]) });
        }
        var flatSet = new ParameterSet(flat, flat: true);
        // The gradients were replaced by views of the zeroed flat buffer: put the same values back.
        for (int i = 0; i < flat.Count; i++)
        {
            flat[i].Grad!.CopyFrom(separate[i].Grad!.ToArray());
        }
        return (new ParameterSet(separate, flat: false), flatSet);
    }

    private static float[] All(IEnumerable<Tensor> ts) => ts.SelectMany(t => t.ToArray()).ToArray();

    [Fact]
    public void FlatAdamAndEmaOnTheCpuMatchThePerParameterStepsBitForBit()
    {
        var d = CpuDevice.Instance;
        var (separate, flat) = TwoSets(d, d, 10);
        using var _s = separate;
        using var _f = flat;
        Assert.True(flat.IsFlat);
        Assert.False(separate.IsFlat);
        using var adamOld = new Adam(separate, lr: 1e-2f);
        using var emaOld = new Ema(separate, 0.9f);
        using var adamNew = new Adam(flat, lr: 1e-2f);
        using var emaNew = new Ema(flat, 0.9f);
        using var record = Tensor.Zeros(d, Optim.RecordLength);
        using var flag = record.Slice(1, 1);
        for (int step = 0; step < 3; step++)
        {
            adamOld.Update();
            emaOld.Update();
            record.Zero();
            adamNew.QueueStep(record, flag, clip: 0);
            emaNew.QueueUpdate(adamNew.State);
        }
        adamNew.Applied(3);
        Assert.Equal(adamOld.Step, adamNew.Step);
        Assert.Equal(All(separate.Select(p => p.Value)), flat.Values!.ToArray());
        Assert.Equal(All(adamOld.M), All(adamNew.M));
        Assert.Equal(All(adamOld.V), All(adamNew.V));
        Assert.Equal(All(emaOld.Weights), All(emaNew.Weights));
    }

    [Fact]
    public void ClippingOnTheDeviceMatchesTheHostClipGivenTheSameNorm()
    {
        // The per-parameter path reduces Σg² parameter by parameter, as ClipGradNorm always did: so over separate
        // parameters the queued step clips bit for bit as ClipGradNorm + Update.
        var d = CpuDevice.Instance;
        var (a, b) = TwoSets(d, d, 20);
        b.Dispose();
        var (c, flat) = TwoSets(d, d, 20);
        using var _a = a;
        using var _c = c;
        using var _f = flat;
        using var adamOld = new Adam(a, lr: 1e-2f);
        using var adamNew = new Adam(c, lr: 1e-2f);
        using var adamFlat = new Adam(flat, lr: 1e-2f);
        using var record = Tensor.Zeros(d, Optim.RecordLength);
        using var flag = record.Slice(1, 1);
        using var recordFlat = Tensor.Zeros(d, Optim.RecordLength);
        using var flagFlat = recordFlat.Slice(1, 1);
        float norm = adamOld.ClipGradNorm(0.5f);
        Assert.True(norm > 0.5f, $"the norm {norm} must be above the clip for the test to clip");
        adamOld.Update();
        adamNew.QueueStep(record, flag, clip: 0.5f);
        adamFlat.QueueStep(recordFlat, flagFlat, clip: 0.5f);
        var r = record.ToArray();
        Assert.Equal(norm, MathF.Sqrt(r[2]));
        Assert.Equal(0f, r[3]);
        Assert.Equal(All(a.Select(p => p.Value)), All(c.Select(p => p.Value)));
        Assert.Equal(All(adamOld.V), All(adamNew.V));
        // The flat reduction sums in another order: the same norm to float rounding, the same step to a few ulps.
        Assert.Equal(norm, MathF.Sqrt(recordFlat.ToArray()[2]), 1e-5);
        var want = All(a.Select(p => p.Value));
        var got = flat.Values!.ToArray();
        for (int i = 0; i < want.Length; i++)
        {
            Assert.True(Math.Abs(want[i] - got[i]) <= 1e-6f + 1e-6f * Math.Abs(want[i]), $"element {i}: {got[i]} vs {want[i]}");
        }
    }

    [Fact]
    public void TheFlatStepOnIlgpuIsOneLaunchPerKindAndMatchesTheCpu()
    {
        var (cpu, flat) = TwoSets(CpuDevice.Instance, gpu.Device, 30);
        using var _c = cpu;
        using var _f = flat;
        using var adamCpu = new Adam(cpu, lr: 1e-2f);
        using var emaCpu = new Ema(cpu, 0.9f);
        using var adamGpu = new Adam(flat, lr: 1e-2f);
        using var emaGpu = new Ema(flat, 0.9f);
        using var recordCpu = Tensor.Zeros(CpuDevice.Instance, Optim.RecordLength);
        using var flagCpu = recordCpu.Slice(1, 1);
        using var record = Tensor.Zeros(gpu.Device, Optim.RecordLength);
        using var flag = record.Slice(1, 1);
        var counters = gpu.Device.Counters;
        for (int step = 0; step < 2; step++)
        {
            recordCpu.Zero();
            adamCpu.QueueStep(recordCpu, flagCpu, clip: 0.5f);
            emaCpu.QueueUpdate(adamCpu.State);
            record.Zero();
            var before = counters.Snapshot();
            adamGpu.QueueStep(record, flag, clip: 0.5f);
            emaGpu.QueueUpdate(adamGpu.State);
            flat.ZeroGrad();
            var used = counters.Snapshot() - before;
            // The step count is set once (a fill) before the first step; then: flag, Σg² (partial + finish), prepare,
            // Adam, EMA, and one memset for every gradient. Independent of the number of parameters (7 here, 86 in the U-Net).
            Assert.Equal(step == 0 ? 7 : 6, used.Launches);
            Assert.Equal(1, used.Memsets);
            Assert.Equal(0, used.Synchronizations);
            // Put the gradients back for the next step on both sides.
            for (int i = 0; i < cpu.Count; i++)
            {
                flat[i].Grad!.CopyFrom(cpu[i].Grad!.ToArray());
            }
        }
        static void Close(float[] want, float[] got, string what)
        {
            for (int i = 0; i < want.Length; i++)
            {
                Assert.True(Math.Abs(want[i] - got[i]) <= 1e-6f + 1e-5f * Math.Abs(want[i]), $"{what} element {i}: {got[i]} vs {want[i]}");
            }
        }
        Close(All(cpu.Select(p => p.Value)), flat.Values!.ToArray(), "weights");
        Close(All(adamCpu.M), All(adamGpu.M), "m");
        Close(All(adamCpu.V), All(adamGpu.V), "v");
        Close(All(emaCpu.Weights), All(emaGpu.Weights), "ema");
        Assert.Equal(adamCpu.State.ToArray()[..3], adamGpu.State.ToArray()[..3]); // t and the bias corrections, to the bit
    }

    [Theory]
    [MemberData(nameof(Backends))]
    public void ANonFiniteGradientSkipsTheStepOnTheDeviceAndIsNamed(string backend)
    {
        var d = DeviceOf(backend);
        var (separate, flat) = TwoSets(d, d, 40);
        using var _s = separate;
        using var _f = flat;
        foreach (var set in new[] { separate, flat })
        {
            using var adam = new Adam(set, lr: 1e-2f);
            using var ema = new Ema(set, 0.9f);
            using var record = Tensor.Zeros(d, Optim.RecordLength);
            using var flag = record.Slice(1, 1);
            adam.QueueStep(record, flag, clip: 1f);
            ema.QueueUpdate(adam.State);
            var weights = All(set.Select(p => p.Value));
            var m = All(adam.M);
            var averaged = All(ema.Weights);
            var state = adam.State.ToArray();
            // Two bad elements: the flag names the first in the flat order (parameter 3, element 5 of it).
            var g3 = set[3].Grad!.ToArray();
            g3[5] = float.NaN;
            set[3].Grad!.CopyFrom(g3);
            var g5 = set[5].Grad!.ToArray();
            g5[0] = float.PositiveInfinity;
            set[5].Grad!.CopyFrom(g5);
            record.Zero();
            adam.QueueStep(record, flag, clip: 1f);
            ema.QueueUpdate(adam.State);
            var r = record.ToArray();
            Assert.Equal(1f, r[3]);
            int bad = Optim.FirstFlagged(r[1]);
            Assert.Equal(set.OffsetOf(3) + 5, bad);
            Assert.Equal(3, set.IndexOfElement(bad));
            Assert.Equal(weights, All(set.Select(p => p.Value)));
            Assert.Equal(m, All(adam.M));
            Assert.Equal(averaged, All(ema.Weights));
            Assert.Equal(state[0], adam.State.ToArray()[0]); // t did not advance

            // A non-finite loss alone skips too, and names no gradient.
            g3[5] = 0.25f;
            set[3].Grad!.CopyFrom(g3);
            g5[0] = 0.5f;
            set[5].Grad!.CopyFrom(g5);
            record.Zero();
            using (var loss = record.Slice(0, 1))
            {
                loss.CopyFrom([float.NaN]);
            }
            adam.QueueStep(record, flag, clip: 1f);
            r = record.ToArray();
            Assert.Equal(1f, r[3]);
            Assert.Equal(-1, Optim.FirstFlagged(r[1]));
            Assert.Equal(weights, All(set.Select(p => p.Value)));

            // A finite step after them is taken, as t = 2.
            record.Zero();
            adam.QueueStep(record, flag, clip: 1f);
            Assert.Equal(0f, record.ToArray()[3]);
            Assert.Equal(2f, adam.State.ToArray()[0]);
            Assert.NotEqual(weights, All(set.Select(p => p.Value)));
        }
    }
}
