using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>The reverse-process samplers.</summary>
public enum SamplerKind
{
    /// <summary>DDPM ancestral, sigma_t² = beta_t ("fixed large", the seed's choice).</summary>
    DdpmLarge,
    /// <summary>DDPM ancestral, sigma_t² = beta_t·(1 - ābar_{t-1})/(1 - ābar_t) ("fixed small").</summary>
    DdpmSmall,
    /// <summary>DDIM (Song et al. 2021) over a subsequence of S steps, with eta.</summary>
    Ddim,
}

/// <summary>One reverse step as arithmetic: x ← C1·x + C2·eps_theta(x, t) + Sigma·z (z ~ N(0, I); Sigma 0 means no noise).</summary>
public readonly record struct ReverseStep(int T, double C1, double C2, double Sigma);

/// <summary>
/// Samplers as lists of <see cref="ReverseStep"/>s, computed in double from the schedule, then run
/// on the device with the model. Every formula of the model spec in one place:
///   DDPM: x_{t-1} = (x_t - beta_t/sqrt(1-ābar_t)·eps)/sqrt(alpha_t) + sigma_t·z, no noise at t = 0.
///   DDIM: x0 = (x_t - sqrt(1-ābar_t)·eps)/sqrt(ābar_t);
///         sigma = eta·sqrt((1-ābar_prev)/(1-ābar_t))·sqrt(1-ābar_t/ābar_prev);
///         x_prev = sqrt(ābar_prev)·x0 + sqrt(1-ābar_prev-sigma²)·eps + sigma·z.
/// Noise comes from the Philox stream of the seed: x_T at offset 0, step i's z at offset (i+1)·N·784,
/// so a seed gives the same digits on every backend.
/// </summary>
public static class Sampler
{
    /// <summary>The DDPM ancestral steps, t = T-1 down to 0.</summary>
    public static IReadOnlyList<ReverseStep> Ddpm(NoiseSchedule s, bool fixedSmall)
    {
        var steps = new List<ReverseStep>();
        for (int t = s.T - 1; t >= 0; t--)
        {
            double beta = s.Betas[t], alpha = s.Alphas[t], abar = s.AlphaBars[t];
            double c1 = 1 / Math.Sqrt(alpha), c2 = -beta / (Math.Sqrt(1 - abar) * Math.Sqrt(alpha));
            double variance = fixedSmall ? beta * (1 - s.AlphaBarPrevious(t)) / (1 - abar) : beta;
            steps.Add(new ReverseStep(t, c1, c2, t == 0 ? 0 : Math.Sqrt(variance)));
        }
        return steps;
    }

    /// <summary>The DDIM steps over <paramref name="count"/> timesteps evenly spread over 0..T-1 (rounded).</summary>
    public static IReadOnlyList<ReverseStep> Ddim(NoiseSchedule s, int count, double eta)
    {
        if (count < 1 || count > s.T)
        {
            throw new ArgumentException($"ddim: steps must be in 1..{s.T}, not {count}");
        }
        if (eta < 0)
        {
            throw new ArgumentException($"ddim: eta {eta} must not be negative");
        }
        var taus = Enumerable.Range(0, count)
            .Select(i => count == 1 ? s.T - 1 : (int)Math.Round((double)i * (s.T - 1) / (count - 1)))
            .Distinct().ToArray();
        var steps = new List<ReverseStep>();
        for (int i = taus.Length - 1; i >= 0; i--)
        {
            int t = taus[i];
            double abar = s.AlphaBars[t], prev = i > 0 ? s.AlphaBars[taus[i - 1]] : 1.0;
            double sigma = eta * Math.Sqrt((1 - prev) / (1 - abar)) * Math.Sqrt(1 - abar / prev);
            double direction = Math.Sqrt(Math.Max(0, 1 - prev - sigma * sigma));
            double c1 = Math.Sqrt(prev / abar);
            double c2 = -Math.Sqrt(prev) * Math.Sqrt(1 - abar) / Math.Sqrt(abar) + direction;
            steps.Add(new ReverseStep(t, c1, c2, sigma));
        }
        return steps;
    }

    /// <summary>The steps of a sampler by kind.</summary>
    public static IReadOnlyList<ReverseStep> Plan(NoiseSchedule s, SamplerKind kind, int ddimSteps = 50, double eta = 0) => kind switch
    {
        SamplerKind.DdpmLarge => Ddpm(s, fixedSmall: false),
        SamplerKind.DdpmSmall => Ddpm(s, fixedSmall: true),
        SamplerKind.Ddim => Ddim(s, ddimSteps, eta),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    /// <summary>
    /// Runs <paramref name="steps"/> from pure noise with <paramref name="predictNoise"/> (x, t, eps) and
    /// returns x_0 as host floats [N·784]. <paramref name="onStep"/> sees the step index and the device
    /// tensor x after it (for progress and animation frames).
    /// </summary>
    public static float[] Run(Device device, int n, IReadOnlyList<ReverseStep> steps, ulong seed,
        Action<Tensor, int, Tensor> predictNoise, Action<int, Tensor>? onStep = null, int height = 28, int width = 28)
    {
        int per = height * width;
        using var x = Tensor.Empty(device, n, 1, height, width);
        using var next = Tensor.Empty(device, n, 1, height, width);
        using var eps = Tensor.Empty(device, n, 1, height, width);
        using var z = Tensor.Empty(device, n, 1, height, width);
        using var c1 = Tensor.Empty(device, n);
        using var c2 = Tensor.Empty(device, n);
        RandomFill.Normal(x, seed, 0);
        var current = x;
        var other = next;
        for (int i = 0; i < steps.Count; i++)
        {
            var step = steps[i];
            predictNoise(current, step.T, eps);
            Elementwise.Fill(c1, (float)step.C1);
            Elementwise.Fill(c2, (float)step.C2);
            Elementwise.Combine(current, c1, eps, c2, other);
            if (step.Sigma > 0)
            {
                RandomFill.Normal(z, seed, (ulong)(i + 1) * (ulong)(n * per));
                Elementwise.Accumulate(other, z, (float)step.Sigma);
            }
            (current, other) = (other, current);
            onStep?.Invoke(i, current);
        }
        return current.ToArray();
    }

    /// <summary>Runs a sampler with a U-Net (no gradient tape: nothing is kept between steps).</summary>
    public static float[] Run(UNet model, int n, IReadOnlyList<ReverseStep> steps, ulong seed, Action<int, Tensor>? onStep = null)
    {
        var device = model.Device;
        using var t = Tensor.Empty(device, n);
        using var tape = Tape.NoGrad(device);
        return Run(device, n, steps, seed, (x, step, eps) =>
        {
            Elementwise.Fill(t, step);
            var y = model.Forward(tape, tape.Constant(x), tape.Constant(t));
            eps.CopyFrom(y.Value);
            tape.Reset();
        }, onStep);
    }
}
