using Ddpm.Diffusion;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>
/// The clipped samplers and DPM-Solver++(2M) against the unclipped seed's steps and against a toy
/// "perfect denoiser": for a fixed x0, eps_theta(x_t, t) = (x_t - sqrt(ābar_t)·x0)/sqrt(1-ābar_t)
/// exactly, so a correct sampler must land on x0. No U-Net: the predictNoise overload of Sampler.Run.
/// </summary>
public sealed class SamplerTests
{
    private const int N = 2, H = 4, W = 4;

    public static TheoryData<string> Schedules => new(["linear", "cosine"]);

    /// <summary>With clipping off, the plans are the seed's formulas to the last bit (so --recipe seed samples the same digits).</summary>
    [Theory]
    [MemberData(nameof(Schedules))]
    public void UnclippedPlansAreTheSeedsBitForBit(string name)
    {
        var s = NoiseSchedule.ByName(name);
        foreach (bool small in new[] { false, true })
        {
            var plan = Sampler.Ddpm(s, small, clip: false);
            for (int t = s.T - 1, i = 0; t >= 0; t--, i++)
            {
                // The seed's DDPM step, as the code before the clipped form computed it.
                double beta = s.Betas[t], alpha = s.Alphas[t], abar = s.AlphaBars[t];
                double c1 = 1 / Math.Sqrt(alpha), c2 = -beta / (Math.Sqrt(1 - abar) * Math.Sqrt(alpha));
                double variance = small ? beta * (1 - s.AlphaBarPrevious(t)) / (1 - abar) : beta;
                Assert.Equal(new ReverseStep(t, c1, c2, t == 0 ? 0 : Math.Sqrt(variance)), plan[i]);
                Assert.Null(plan[i].X0);
            }
        }
        var ddim = Sampler.Ddim(s, 7, eta: 0.5, clip: false);
        int[] taus = [0, 50, 100, 150, 199, 249, 299];
        for (int i = taus.Length - 1, k = 0; i >= 0; i--, k++)
        {
            int t = taus[i];
            double abar = s.AlphaBars[t], prev = i > 0 ? s.AlphaBars[taus[i - 1]] : 1.0;
            double sigma = 0.5 * Math.Sqrt((1 - prev) / (1 - abar)) * Math.Sqrt(1 - abar / prev);
            double direction = Math.Sqrt(Math.Max(0, 1 - prev - sigma * sigma));
            double c1 = Math.Sqrt(prev / abar), c2 = -Math.Sqrt(prev) * Math.Sqrt(1 - abar) / Math.Sqrt(abar) + direction;
            Assert.Equal(new ReverseStep(t, c1, c2, sigma), ddim[k]);
        }
    }

    /// <summary>Without the clip biting, the x0 form is the same step: P·(A·x + B·eps) + Q·x = C1·x + C2·eps.</summary>
    [Theory]
    [MemberData(nameof(Schedules))]
    public void ClippedStepsEqualUnclippedWhereX0IsInRange(string name)
    {
        var s = NoiseSchedule.ByName(name);
        var pairs = new[]
        {
            (Sampler.Ddpm(s, false, clip: true), Sampler.Ddpm(s, false, clip: false)),
            (Sampler.Ddpm(s, true, clip: true), Sampler.Ddpm(s, true, clip: false)),
            (Sampler.Ddim(s, 50, 0, clip: true), Sampler.Ddim(s, 50, 0, clip: false)),
            (Sampler.Ddim(s, 50, 1, clip: true), Sampler.Ddim(s, 50, 1, clip: false)),
        };
        foreach (var (clipped, plain) in pairs)
        {
            Assert.Equal(plain.Count, clipped.Count);
            for (int i = 0; i < plain.Count; i++)
            {
                var f = clipped[i].X0!.Value;
                Assert.True(f.Clip);
                Assert.Equal(plain[i].T, clipped[i].T);
                Assert.Equal(plain[i].Sigma, clipped[i].Sigma);
                Close(plain[i].C1, f.P * f.A + f.Q);
                Close(plain[i].C2, f.P * f.B);
            }
        }
    }

    /// <summary>The perfect denoiser: every sampler, clipped, lands on x0 (DPM-Solver++ at 20 steps, DDIM at 50, DDPM at T).</summary>
    [Theory]
    [MemberData(nameof(Schedules))]
    public void EverySamplerRecoversX0FromAPerfectDenoiser(string name)
    {
        var s = NoiseSchedule.ByName(name);
        var x0 = Image();
        foreach (var (label, plan) in new[]
        {
            ("ddpm large", Sampler.Ddpm(s, false)),
            ("ddpm small", Sampler.Ddpm(s, true)),
            ("ddim 50", Sampler.Ddim(s, 50, 0)),
        })
        {
            var result = Sampler.Run(CpuDevice.Instance, N, plan, seed: 3, Perfect(s, x0), height: H, width: W);
            // DDPM and DDIM end on the (clipped) x0 estimate at t = 0, which is x0.
            AssertClose(label, x0, result, 2e-3f);
        }

        // DPM-Solver++ ends on x at t = 0: exactly alpha_0·x0 + sigma_0·eps_T, eps_T the noise of x_T.
        foreach (bool clip in new[] { true, false })
        {
            var plan = Sampler.DpmSolver2M(s, 20, clip);
            Assert.Equal(20, plan.Count);
            Assert.Equal(s.T - 1, plan[0].T);
            float[]? epsT = null;
            var perfect = Perfect(s, x0);
            var result = Sampler.Run(CpuDevice.Instance, N, plan, seed: 3, (x, t, eps) =>
            {
                perfect(x, t, eps);
                epsT ??= eps.ToArray();
            }, height: H, width: W);
            double a0 = Math.Sqrt(s.AlphaBars[0]), s0 = Math.Sqrt(1 - s.AlphaBars[0]);
            var expected = x0.Select((v, i) => (float)(a0 * v + s0 * epsT![i])).ToArray();
            AssertClose($"dpm++ clip {clip}", expected, result, 2e-3f);
            AssertClose($"dpm++ clip {clip} vs x0", x0, result, 0.05f);
        }
    }

    /// <summary>DPM-Solver++(2M): first order on the first step and (S &lt; 15) the last; second order between.</summary>
    [Fact]
    public void DpmSolverPlanIsSecondOrderBetweenFirstOrderEnds()
    {
        var s = NoiseSchedule.Linear();
        var plan = Sampler.DpmSolver2M(s, 10);
        Assert.Equal([299, 269, 239, 209, 179, 150, 120, 90, 60, 30], plan.Select(p => p.T));
        Assert.Equal(0, plan[0].X0!.Value.PPrevious);
        Assert.Equal(0, plan[^1].X0!.Value.PPrevious);
        Assert.All(plan.Skip(1).SkipLast(1), p => Assert.True(p.X0!.Value.PPrevious < 0));
        Assert.All(plan, p => Assert.Equal(0, p.Sigma));
        Assert.Equal(0, Sampler.DpmSolver2M(s, 14)[^1].X0!.Value.PPrevious);
        Assert.True(Sampler.DpmSolver2M(s, 15)[^1].X0!.Value.PPrevious < 0);
        Assert.Throws<ArgumentException>(() => Sampler.DpmSolver2M(s, 300));
        Assert.Throws<ArgumentException>(() => Sampler.DpmSolver2M(s, 0));
    }

    /// <summary>
    /// dpm++'s eta: 0 is the deterministic solver to the bit; 1 is the SDE form, each step's coefficients
    /// as diffusers' sde-dpmsolver++ (midpoint) writes them, its noise sigma_t·sqrt(1 - e^{-2h}).
    /// </summary>
    [Fact]
    public void DpmSolverEtaGivesTheSdeFormAndZeroIsTheOde()
    {
        var s = NoiseSchedule.Cosine();
        Assert.Equal(Sampler.DpmSolver2M(s, 20), Sampler.DpmSolver2M(s, 20, eta: 0));
        var sde = Sampler.DpmSolver2M(s, 20, eta: 1);
        var grid = sde.Select(p => p.T).Append(0).ToArray();
        double Alpha(int t) => Math.Sqrt(s.AlphaBars[t]);
        double Sig(int t) => Math.Sqrt(1 - s.AlphaBars[t]);
        double Lambda(int t) => Math.Log(Alpha(t) / Sig(t));
        for (int i = 0; i < sde.Count; i++)
        {
            int from = grid[i], to = grid[i + 1];
            double h = Lambda(to) - Lambda(from), w = Alpha(to) * (1 - Math.Exp(-2 * h));
            var x0 = sde[i].X0!.Value;
            Assert.Equal(Sig(to) / Sig(from) * Math.Exp(-h), x0.Q, 12);
            Assert.Equal(Sig(to) * Math.Sqrt(1 - Math.Exp(-2 * h)), sde[i].Sigma, 12);
            // D0 + D1/2 with D1 = (m0 - m1)/r: P + PPrevious is the weight itself.
            Assert.Equal(w, x0.P + x0.PPrevious, 12);
            Assert.True(i == 0 ? x0.PPrevious == 0 : x0.PPrevious < 0);
        }
        Assert.Throws<ArgumentException>(() => Sampler.DpmSolver2M(s, 20, eta: 1.5));
    }

    /// <summary>
    /// Cosine schedule, with a denoiser that is off by 0.05 in eps and bounded like a network's output:
    /// near t = T, ābar ≈ 3e-8, so the unclipped x0 estimate multiplies the error by sqrt(1-ābar)/sqrt(ābar)
    /// ≈ 6000 (the "every sampler turns the model into noise"), while the clipped one stays in [-1, 1]
    /// and ends near x0.
    /// </summary>
    [Fact]
    public void CosineUnclippedDdimDivergesWhereClippedStaysBounded()
    {
        var s = NoiseSchedule.Cosine();
        var x0 = Image();
        var perfect = Perfect(s, x0);
        void Imperfect(Tensor x, int t, Tensor eps)
        {
            perfect(x, t, eps);
            eps.CopyFrom(eps.ToArray().Select((v, i) => Math.Clamp(v + (i % 2 == 0 ? 0.05f : -0.05f), -4f, 4f)).ToArray());
        }
        double Peak(IReadOnlyList<ReverseStep> plan, out float[] result)
        {
            double peak = 0;
            result = Sampler.Run(CpuDevice.Instance, N, plan, seed: 4, Imperfect, (i, x) => peak = Math.Max(peak, x.ToArray().Max(Math.Abs)), H, W);
            return peak;
        }
        double unclipped = Peak(Sampler.Ddim(s, 50, 0, clip: false), out var wild);
        double clipped = Peak(Sampler.Ddim(s, 50, 0, clip: true), out var tame);
        Assert.True(unclipped > 20, $"unclipped ddim peaked at only {unclipped}");
        Assert.True(clipped < 6, $"clipped ddim peaked at {clipped}");
        Assert.All(tame, v => Assert.InRange(v, -1f, 1f));
        AssertClose("clipped ddim", x0, tame, 0.05f);
        Assert.Contains(wild, v => Math.Abs(v) > 1.5f);
    }

    // A fixed image in [-0.9, 0.9], as data scaled to [-1, 1] is.
    private static float[] Image()
    {
        var rng = new Random(7);
        return Enumerable.Range(0, N * H * W).Select(_ => (float)(rng.NextDouble() * 1.8 - 0.9)).ToArray();
    }

    private static Action<Tensor, int, Tensor> Perfect(NoiseSchedule s, float[] x0) => (x, t, eps) =>
    {
        var xt = x.ToArray();
        double a = s.AlphaBars[t];
        eps.CopyFrom(xt.Select((v, i) => (float)((v - Math.Sqrt(a) * x0[i]) / Math.Sqrt(1 - a))).ToArray());
    };

    private static void Close(double expected, double actual) =>
        Assert.True(Math.Abs(expected - actual) <= 1e-9 * Math.Max(1, Math.Abs(expected)), $"{actual} != {expected}");

    private static void AssertClose(string label, float[] expected, float[] actual, float tolerance)
    {
        Assert.Equal(expected.Length, actual.Length);
        float worst = expected.Zip(actual, (e, a) => Math.Abs(e - a)).Max();
        Assert.True(worst <= tolerance, $"{label}: off by {worst} (tolerance {tolerance})");
    }
}
