using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>The tape: gradients through the whole U-Net against finite differences, gradients of a
/// value used twice add up, no-grad keeps nothing, and memory returns to the pool every step.</summary>
[Collection(IlgpuCollection.Name)]
public sealed class AutogradTests(IlgpuFixture gpu, ITestOutputHelper output)
{
    /// <summary>
    /// Finite differences through a whole tiny U-Net (ch=16) on 8×8 images (every level still
    /// runs: 8 → 4 → 2 and back), for a sample of coordinates of every layer kind and of the input.
    /// L = Σ r·eps_theta(x, t) for a fixed random r, in double on the host; backward is seeded
    /// with dL/d(output) = r. Step 1e-2: float32 forward noise over ~10⁴ terms is ~1e-5 in L,
    /// 5e-4 after dividing by 2h; curvature adds O(h²). Tolerance 2e-3 + 3e-2 relative; a dropped
    /// term or a wrong index in any rule moves a gradient by far more (see <see cref="GradCheckTests"/>).
    /// So that a backward that returns (near) zero cannot pass on coordinates whose gradient is small anyway, most
    /// coordinates are drawn among those whose analytic gradient is at least <c>floor</c> = 2e-2 (ten times the
    /// absolute tolerance), and a parameter with no gradient that large fails; one per parameter (two of the input)
    /// is drawn from all, so an analytic zero where the true gradient is large is still caught.
    /// On the managed CPU backend; the ILGPU backend's whole-U-Net gradient is held to this one, every element, by
    /// <see cref="WholeUNetGradientOnIlgpuEqualsTheCpuBackends"/> (its ops are also checked against finite differences one
    /// by one, in KernelTests).
    /// </summary>
    [Theory]
    [InlineData("cpu")]
    public void WholeUNetGradientMatchesFiniteDifferences(string deviceName)
    {
        using var device = DeviceCatalog.Open(deviceName, out _);
        var model = new UNet(16, device, seed: 3);
        var rng = new Random(9);
        const int n = 2, hw = 8;
        var x = Enumerable.Range(0, n * hw * hw).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        float[] t = [3, 250];
        var r = Enumerable.Range(0, n * hw * hw).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        using var xt = Tensor.FromHost(device, x, n, 1, hw, hw);
        using var tt = Tensor.FromHost(device, t, n);
        using var rt = Tensor.FromHost(device, r, n, 1, hw, hw);

        double Loss()
        {
            using var g = Tape.NoGrad(device);
            var y = model.Forward(g, g.Constant(xt), g.Constant(tt)).Value.ToArray();
            double s = 0;
            for (int i = 0; i < y.Length; i++)
            {
                s += (double)r[i] * y[i];
            }
            return s;
        }

        float[] dx = Backward(model, xt, tt, rt);

        string[] sampled =
        [
            "time_lin1.weight", "time_lin2.bias", "conv_in.weight", "enc0.norm1.weight", "enc0.norm1.bias",
            "enc0.conv1.weight", "enc0.temb.weight", "enc1.skip.weight", "down0.conv.weight", "down1.conv.bias",
            "mid0.norm2.weight", "mid1.conv2.weight", "up1.conv.weight", "dec1.conv1.weight", "dec0.skip.bias",
            "norm_out.bias", "conv_out.weight", "conv_out.bias",
        ];
        const double h = 1e-2;
        const float floor = 2e-2f;
        var failures = new List<string>();
        var pick = new Random(4);

        // Coordinates to compare: `any` drawn from all, `large` from those whose |analytic| >= floor (none when
        // there are none: that is a failure).
        List<int> Coordinates(string label, float[] grad, int any, int large)
        {
            var picked = Enumerable.Range(0, any).Select(_ => pick.Next(grad.Length)).ToList();
            var candidates = Enumerable.Range(0, grad.Length).Where(i => Math.Abs(grad[i]) >= floor).ToArray();
            if (candidates.Length == 0)
            {
                failures.Add($"{label}: no analytic gradient of size {floor} or more (max {grad.Max(Math.Abs):G3})");
                output.WriteLine(failures[^1]);
            }
            else
            {
                picked.AddRange(Enumerable.Range(0, large).Select(_ => candidates[pick.Next(candidates.Length)]));
            }
            return picked;
        }

        void Compare(string label, float analytic, Action<float> set, float original)
        {
            set(original + (float)h);
            double plus = Loss();
            set(original - (float)h);
            double minus = Loss();
            set(original);
            double numeric = (plus - minus) / (2 * h);
            bool ok = Math.Abs(analytic - numeric) <= 2e-3 + 3e-2 * Math.Abs(numeric);
            string line = $"{label,-28} analytic {analytic,12:G6} numeric {numeric,12:G6}";
            if (!ok)
            {
                failures.Add(line);
            }
            output.WriteLine($"{line} {(ok ? "" : "FAIL")}");
        }

        foreach (var name in sampled)
        {
            var p = model[name];
            var values = p.Value.ToArray();
            var grad = p.Grad!.ToArray();
            foreach (int i in Coordinates(name, grad, any: 1, large: 2))
            {
                Compare($"{name}[{i}]", grad[i], v => { values[i] = v; p.Value.CopyFrom(values); }, values[i]);
            }
        }
        foreach (int i in Coordinates("x", dx, any: 2, large: 4))
        {
            Compare($"x[{i}]", dx[i], v => { x[i] = v; xt.CopyFrom(x); }, x[i]);
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>
    /// The same tiny U-Net (ch=16, 8×8, the seed's weights) on ILGPU's CPU accelerator and on the managed CPU backend:
    /// one backward each, seeded with the same dL/d(output) = r, and every element of every parameter's gradient and of
    /// the input's compared. The CPU backend's gradient is the one finite differences check above; this extends that
    /// check to every coordinate on ILGPU at the cost of one backward (finite differences there need two forward passes
    /// a coordinate, each seconds long on the simulator). Per tensor: ‖g_ilgpu - g_cpu‖ ≤ 1e-4·‖g_cpu‖ + 1e-6 (float32
    /// sums in other orders differ by ~2e-6 relative here; a wrong rule moves a gradient by far more), and at most 1e-4 of the
    /// largest |g_cpu| at any element; no gradient may be all zero.
    /// </summary>
    [Fact]
    public void WholeUNetGradientOnIlgpuEqualsTheCpuBackends()
    {
        const int n = 2, hw = 8;
        var rng = new Random(9);
        var x = Enumerable.Range(0, n * hw * hw).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        var r = Enumerable.Range(0, n * hw * hw).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        float[] t = [3, 250];

        (Dictionary<string, float[]> Grads, float[] Dx) Gradients(Device device)
        {
            var model = new UNet(16, device, seed: 3);
            using var xt = Tensor.FromHost(device, x, n, 1, hw, hw);
            using var tt = Tensor.FromHost(device, t, n);
            using var rt = Tensor.FromHost(device, r, n, 1, hw, hw);
            float[] dx = Backward(model, xt, tt, rt);
            return (model.Parameters.ToDictionary(p => p.Name, p => p.Grad!.ToArray()), dx);
        }

        var (cpuGrads, cpuDx) = Gradients(CpuDevice.Instance);
        var (gpuGrads, gpuDx) = Gradients(gpu.Device); // the collection's device: its kernels compiled once for every test
        var failures = new List<string>();
        void Compare(string name, float[] want, float[] got)
        {
            double diff = Math.Sqrt(want.Zip(got, (a, b) => (double)(a - b) * (a - b)).Sum());
            double norm = Math.Sqrt(want.Sum(a => (double)a * a));
            double largest = want.Max(a => Math.Abs((double)a));
            double worst = want.Zip(got, (a, b) => Math.Abs((double)a - b)).Max();
            bool ok = norm > 0 && diff <= 1e-4 * norm + 1e-6 && worst <= 1e-4 * largest + 1e-6;
            string line = $"{name,-22} ‖g‖ {norm,10:G4}  ‖ilgpu - cpu‖ {diff,10:G3}  worst element {worst,10:G3}";
            output.WriteLine(line + (ok ? "" : " FAIL"));
            if (!ok)
            {
                failures.Add(line);
            }
        }
        Assert.Equal(cpuGrads.Keys.Order(), gpuGrads.Keys.Order());
        foreach (var (name, want) in cpuGrads)
        {
            Compare(name, want, gpuGrads[name]);
        }
        Compare("x", cpuDx, gpuDx);
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    /// <summary>Zeroes the model's gradients and backpropagates dL/d(output) = <paramref name="r"/> through eps_theta(x, t):
    /// the parameters' gradients are left in place; returns the input's.</summary>
    private static float[] Backward(UNet model, Tensor x, Tensor t, Tensor r)
    {
        model.ZeroGrad();
        using var tape = new Tape(x.Device);
        var xv = new ProbeVar(x);
        var y = model.Forward(tape, xv.Var, tape.Constant(t));
        tape.Backward(y, r);
        float[] dx = xv.Var.Grad!.ToArray();
        xv.Var.Grad!.Dispose();
        return dx;
    }

    /// <summary>A graph input that requires a gradient (the tape's constants do not).</summary>
    private sealed class ProbeVar(Tensor t)
    {
        public Var Var { get; } = new Parameter("x", t);
    }

    [Fact]
    public void GradientOfAValueUsedTwiceAddsUp()
    {
        var d = CpuDevice.Instance;
        var a = new Parameter("a", Tensor.FromHost(d, [1f, -2f, 3f], 1, 3, 1, 1));
        a.ZeroGrad();
        using (var tape = new Tape(d))
        {
            // y = silu(a) + a: dy/da = silu'(a) + 1.
            var y = tape.Add(tape.Silu(a), a);
            using var ones = Tensor.FromHost(d, [1f, 1f, 1f], 1, 3, 1, 1);
            tape.Backward(y, ones);
        }
        var got = a.Grad!.ToArray();
        float[] av = [1f, -2f, 3f];
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(Silu.Derivative(av[i]) + 1f, got[i], 1e-6f);
        }
    }

    [Fact]
    public void NoGradTapeRecordsNothingAndKeepsNothing()
    {
        using var device = new CpuDevice();
        var model = new UNet(16, device, seed: 1);
        long parameters = device.Stats.LiveBytes;
        using var x = Tensor.Zeros(device, 2, 1, 28, 28);
        using var t = Tensor.Zeros(device, 2);
        using (var tape = Tape.NoGrad(device))
        {
            model.Forward(tape, tape.Constant(x), tape.Constant(t));
            Assert.Equal(0, tape.RecordCount);
        }
        Assert.Equal(parameters + 4L * (x.Length + t.Length), device.Stats.LiveBytes);
    }

    /// <summary>Memory is bounded: after the first step (which sizes the pool) a training step takes
    /// nothing new from the system, and every intermediate is back in the pool when the step ends.</summary>
    [Fact]
    public void TrainingStepMemoryDoesNotGrow()
    {
        using var device = new CpuDevice();
        var model = new UNet(16, device, seed: 1);
        using var adam = new Adam(model.Parameters);
        using var x = Tensor.Empty(device, 4, 1, 28, 28);
        using var target = Tensor.Empty(device, 4, 1, 28, 28);
        using var t = Tensor.FromHost(device, [1f, 50f, 150f, 299f], 4);
        RandomFill.Normal(x, 1, 0);
        RandomFill.Normal(target, 2, 0);
        var afterStep = new List<PoolStats>();
        for (int step = 0; step < 4; step++)
        {
            TrainStep(model, adam, x, t, target);
            afterStep.Add(device.Stats);
        }
        foreach (var s in afterStep)
        {
            output.WriteLine($"live {s.LiveBytes >> 10} KiB, pooled {s.PooledBytes >> 10} KiB, peak {s.PeakLiveBytes >> 10} KiB, from system {s.SystemBytes >> 10} KiB in {s.SystemAllocations} allocations");
        }
        Assert.All(afterStep.Skip(1), s => Assert.Equal(afterStep[0].SystemBytes, s.SystemBytes));
        Assert.All(afterStep.Skip(1), s => Assert.Equal(afterStep[0].LiveBytes, s.LiveBytes));
        Assert.All(afterStep.Skip(1), s => Assert.Equal(afterStep[0].PeakLiveBytes, s.PeakLiveBytes));
    }

    internal static float TrainStep(UNet model, Adam adam, Tensor x, Tensor t, Tensor target, float? clip = null)
    {
        model.ZeroGrad();
        float loss;
        using (var tape = new Tape(model.Device))
        {
            var pred = model.Forward(tape, tape.Constant(x), tape.Constant(t));
            var l = tape.MseLoss(pred, tape.Constant(target));
            loss = l.Value.ToArray()[0];
            tape.Backward(l);
        }
        if (clip is { } c)
        {
            adam.ClipGradNorm(c);
        }
        adam.Update();
        return loss;
    }

    /// <summary>
    /// The pinned regression (as llm.c's test_gpt2): a tiny U-Net, seed 7, one fixed batch of 8
    /// noise-prediction pairs, 30 Adam steps at lr 1e-3 with clipping at 1.0. The loss must fall
    /// and follow the recorded trajectory within 1% (float32 sums in another order, e.g. on a
    /// machine with other SIMD widths, move it by far less).
    /// </summary>
    [Fact]
    public void TinyUNetLearnsAFixedBatch()
    {
        var d = CpuDevice.Instance;
        var model = new UNet(16, d, seed: 7);
        using var adam = new Adam(model.Parameters, lr: 1e-3f);
        using var x = Tensor.Empty(d, 8, 1, 28, 28);
        using var target = Tensor.Empty(d, 8, 1, 28, 28);
        using var t = Tensor.FromHost(d, [0f, 10f, 40f, 80f, 120f, 180f, 240f, 299f], 8);
        RandomFill.Normal(x, 21, 0);
        RandomFill.Normal(target, 22, 0);
        var losses = new List<float>();
        for (int step = 0; step < 30; step++)
        {
            losses.Add(TrainStep(model, adam, x, t, target, clip: 1f));
        }
        output.WriteLine(string.Join(", ", losses.Select((l, i) => $"{i}: {l:F5}")));
        Assert.True(losses[^1] < 0.8 * losses[0], $"loss {losses[0]} -> {losses[^1]}");
        foreach (var (step, expected) in Pinned)
        {
            Assert.True(Math.Abs(losses[step] - expected) <= 0.01 * expected, $"step {step}: loss {losses[step]}, pinned {expected}");
        }
    }

    // Recorded on the managed CPU backend (AVX-512 GEMM), 2 cores.
    private static readonly (int Step, float Loss)[] Pinned = [(0, 1.18048f), (10, 0.53801f), (20, 0.22205f), (29, 0.06626f)];
}
