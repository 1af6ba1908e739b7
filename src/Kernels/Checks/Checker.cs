using System.Text;
using Ddpm.Tensors;

namespace Ddpm.Kernels.Checks;

/// <summary>Outcome of one check: the op, which check, the worst error as a share of the
/// tolerance's scale, pass or fail, and the first mismatches with their index.</summary>
public sealed record CheckResult(string Op, string Check, double MaxError, bool Pass, string Detail)
{
    /// <inheritdoc/>
    public override string ToString() => $"{Op} [{Check}] max err {MaxError:E2} {(Pass ? "pass" : "FAIL")}{(Detail.Length > 0 ? ": " + Detail : "")}";
}

/// <summary>
/// The two checks every op passes (llm.c's validate_result and tinygrad's gradcheck, here):
///  - <see cref="CompareDevices"/>: the same seeded inputs on the managed CPU backend and on a
///    target device; forward outputs (poisoned with NaN before the run) and backward gradients
///    (pre-filled with the same random values, since backward adds) must agree within the case's
///    tolerance, element by element.
///  - <see cref="GradCheck"/>: L = Σ r·y for a fixed random r; each sampled input coordinate's
///    analytic gradient (backward with dy = r) must match the central difference
///    (L(x + h) - L(x - h)) / 2h computed in double from the forward.
/// </summary>
public static class Checker
{
    /// <summary>How many coordinates of each input the gradient check perturbs.</summary>
    public const int SamplesPerInput = 16;

    /// <summary>Seeded host values for every input of a case.</summary>
    public static float[][] MakeInputs(OpCase c, int seed)
    {
        var rng = new Random(seed);
        return c.Inputs.Select(spec => Fill(rng, spec)).ToArray();
    }

    private static float[] Fill(Random rng, InputSpec spec)
    {
        int n = spec.Shape.Aggregate(1, (a, b) => a * b);
        var v = new float[n];
        for (int i = 0; i < n; i++)
        {
            v[i] = spec.Fill switch
            {
                InputFill.Positive => 0.5f + (float)rng.NextDouble(),
                InputFill.Timesteps => rng.Next(0, 300),
                InputFill.Uniform => (float)rng.NextDouble(),
                InputFill.Labels => rng.Next(0, 11),
                InputFill.Digits => rng.Next(0, 10),
                InputFill.Tf32Exact => (rng.Next(2) == 0 ? 1 : -1) * (1 + (2 * rng.Next(512) + 1) / 1024f) * MathF.ScaleB(1, -rng.Next(2)),
                _ => Gaussian(rng),
            };
        }
        return v;
    }

    private static float Gaussian(Random rng) =>
        (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));

    /// <summary>Runs the case's forward (and backward) on <paramref name="device"/> and returns every
    /// result as host arrays: outputs first, then the gradients of differentiable inputs.</summary>
    public static List<(string Name, float[] Values)> RunOnDevice(OpCase c, Device device, float[][] inputs, int seed)
    {
        using var scope = new CaseScope(device);
        var xs = c.Inputs.Select((spec, i) => scope.Host(inputs[i], spec.Shape)).ToArray();
        var ys = c.Forward(scope, xs);
        var results = ys.Select((y, i) => ($"out{i}", y.ToArray())).ToList();
        if (c.Backward is not null)
        {
            var rng = new Random(seed + 1);
            var dOut = scope.Host(Fill(rng, new InputSpec("dy", ys[0].Shape)), ys[0].Shape);
            var grads = c.Inputs.Select(spec => spec.Differentiable ? scope.Host(Fill(rng, spec with { Fill = InputFill.Normal }), spec.Shape) : null).ToArray();
            c.Backward(scope, xs, ys, dOut, grads);
            for (int i = 0; i < grads.Length; i++)
            {
                if (grads[i] is { } g)
                {
                    results.Add(($"d{c.Inputs[i].Name}", g.ToArray()));
                }
            }
        }
        return results;
    }

    /// <summary>The kernel check: <paramref name="target"/> against the managed CPU backend.</summary>
    public static CheckResult CompareDevices(OpCase c, Device target, int seed = 1234)
    {
        var mode = target is IlgpuDevice gpu ? IlgpuKernels.For(gpu).EffectivePrecision : MathPrecision.Fp32;
        double products = ProductTolerance(mode, c.ProductTerms);
        var inputs = MakeInputs(c, seed);
        var expected = RunOnDevice(c, CpuDevice.Instance, inputs, seed);
        var actual = RunOnDevice(c, target, inputs, seed);
        double worst = 0;
        var detail = new StringBuilder();
        bool pass = true;
        for (int r = 0; r < expected.Count; r++)
        {
            var (name, want) = expected[r];
            var got = actual[r].Values;
            int shown = 0;
            for (int i = 0; i < want.Length; i++)
            {
                double diff = Math.Abs((double)got[i] - want[i]);
                double allowed = c.KernelAtol + c.KernelRtol * Math.Abs(want[i]) + products;
                double err = double.IsNaN(diff) ? double.PositiveInfinity : diff / Math.Max(1.0, Math.Abs(want[i]));
                worst = Math.Max(worst, err);
                if (!(diff <= allowed))
                {
                    pass = false;
                    if (shown++ < 3)
                    {
                        detail.Append($"{name}[{i}] cpu {want[i]:G7} {target.Kind} {got[i]:G7}; ");
                    }
                }
            }
        }
        return new CheckResult(c.Name, $"{DeviceCatalog.KindName(target.Kind)} vs cpu", worst, pass, detail.ToString());
    }

    /// <summary>
    /// The kernel check's extra absolute tolerance for an output that sums <paramref name="terms"/> products of standard
    /// normal values on tensor cores in <paramref name="mode"/> (docs/gpu.md, "Tolerances"). TF32 rounds each operand to
    /// within 2^-11 relative (uniformly), so a product is off by a relative error of standard deviation 2^-11·√(2/3) and
    /// the sum by σ = 2^-11·√(2/3)·√T; six σ covers every output of a case. 3xTF32 leaves about 3·2^-22 of each product
    /// (lo·lo and the low parts' own rounding): 2^-20·√(2/3)·√T. Both add the tensor core's fp32 accumulation, which
    /// may truncate rather than round: at most 2^-23 of a partial sum (≈ √T) per add, T·√T·2^-23. fp32: 0.
    /// </summary>
    public static double ProductTolerance(MathPrecision mode, int terms)
    {
        if (mode == MathPrecision.Fp32 || terms <= 0)
        {
            return 0;
        }
        double unit = mode == MathPrecision.Tf32 ? Math.Pow(2, -11) : Math.Pow(2, -20);
        double t = terms;
        return 6 * unit * Math.Sqrt(2.0 / 3) * Math.Sqrt(t) + t * Math.Sqrt(t) * Math.Pow(2, -23);
    }

    /// <summary>
    /// The finite-difference check on <paramref name="device"/>. <paramref name="breakBackward"/>
    /// lets a test corrupt the analytic gradients (drop a term, shift an index) to show the check
    /// then fails.
    /// </summary>
    public static CheckResult GradCheck(OpCase c, Device device, int seed = 4321, Action<string, float[]>? breakBackward = null)
    {
        if (c.Backward is null)
        {
            throw new ArgumentException($"{c.Name} has no backward to check");
        }
        var inputs = MakeInputs(c, seed);
        var rng = new Random(seed + 7);
        double[] projection;
        float[][] analytic = new float[inputs.Length][];
        using (var scope = new CaseScope(device))
        {
            var xs = c.Inputs.Select((spec, i) => scope.Host(inputs[i], spec.Shape)).ToArray();
            var ys = c.Forward(scope, xs);
            var r = Fill(rng, new InputSpec("r", ys[0].Shape));
            projection = r.Select(v => (double)v).ToArray();
            var dOut = scope.Host(r, ys[0].Shape);
            // Start gradients from non-zero values and subtract them after: backward must add, not overwrite.
            var start = c.Inputs.Select(spec => Fill(rng, spec with { Fill = InputFill.Normal })).ToArray();
            var grads = c.Inputs.Select((spec, i) => spec.Differentiable ? scope.Host(start[i], spec.Shape) : null).ToArray();
            c.Backward(scope, xs, ys, dOut, grads);
            for (int i = 0; i < grads.Length; i++)
            {
                if (grads[i] is { } g)
                {
                    analytic[i] = g.ToArray();
                    for (int j = 0; j < analytic[i].Length; j++)
                    {
                        analytic[i][j] -= start[i][j];
                    }
                    breakBackward?.Invoke(c.Inputs[i].Name, analytic[i]);
                }
            }
        }

        double worst = 0;
        bool pass = true;
        var detail = new StringBuilder();
        for (int i = 0; i < inputs.Length; i++)
        {
            if (!c.Inputs[i].Differentiable)
            {
                continue;
            }
            foreach (int j in SampleIndices(inputs[i].Length, rng))
            {
                float saved = inputs[i][j];
                inputs[i][j] = (float)(saved + c.Step);
                double plus = Loss(c, device, inputs, projection);
                inputs[i][j] = (float)(saved - c.Step);
                double minus = Loss(c, device, inputs, projection);
                inputs[i][j] = saved;
                double numeric = (plus - minus) / (2 * c.Step);
                double diff = Math.Abs(analytic[i][j] - numeric);
                worst = Math.Max(worst, diff / Math.Max(1.0, Math.Abs(numeric)));
                if (!(diff <= c.GradAtol + c.GradRtol * Math.Abs(numeric)))
                {
                    if (pass || detail.Length < 300)
                    {
                        detail.Append($"d{c.Inputs[i].Name}[{j}] analytic {analytic[i][j]:G6} numeric {numeric:G6}; ");
                    }
                    pass = false;
                }
            }
        }
        return new CheckResult(c.Name, $"grad on {DeviceCatalog.KindName(device.Kind)}", worst, pass, detail.ToString());
    }

    private static double Loss(OpCase c, Device device, float[][] inputs, double[] projection)
    {
        using var scope = new CaseScope(device);
        var xs = c.Inputs.Select((spec, i) => scope.Host(inputs[i], spec.Shape)).ToArray();
        var y = c.Forward(scope, xs)[0].ToArray();
        double loss = 0;
        for (int k = 0; k < y.Length; k++)
        {
            loss += projection[k] * y[k];
        }
        return loss;
    }

    private static IEnumerable<int> SampleIndices(int length, Random rng)
    {
        if (length <= SamplesPerInput)
        {
            return Enumerable.Range(0, length);
        }
        // The first and last elements (edges of every tiling) plus random interior ones.
        var picks = new SortedSet<int> { 0, length - 1 };
        while (picks.Count < SamplesPerInput)
        {
            picks.Add(rng.Next(length));
        }
        return picks;
    }
}
