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
    /// <summary>DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, S steps; deterministic at eta 0, its SDE form above.</summary>
    DpmSolver2M,
}

/// <summary>
/// One reverse step as arithmetic. With <see cref="X0"/> null (the seed's form):
/// x ← C1·x + C2·eps_theta(x, t) + Sigma·z (z ~ N(0, I); Sigma 0 means no noise). With it, the step
/// goes through the x0 estimate: see <see cref="X0Step"/>, then x ← P·x0 + Q·x + PPrevious·x0_prev + Sigma·z.
/// </summary>
public readonly record struct ReverseStep(int T, double C1, double C2, double Sigma)
{
    /// <summary>The x0 form of the step, or null for the direct form x ← C1·x + C2·eps + Sigma·z.</summary>
    public X0Step? X0 { get; init; }

    /// <summary>A step through the x0 estimate (C1 and C2 unused, left 0).</summary>
    public static ReverseStep ThroughX0(int t, X0Step x0, double sigma) => new(t, 0, 0, sigma) { X0 = x0 };
}

/// <summary>
/// The x0 form of a step: x0 = A·x + B·eps_theta (clipped to [-1, 1] when <paramref name="Clip"/>),
/// then x ← P·x0 + Q·x + PPrevious·x0_prev + Sigma·z, x0_prev being the previous step's x0
/// (used by multistep solvers only; 0 elsewhere and on the first step).
/// </summary>
public readonly record struct X0Step(double A, double B, bool Clip, double P, double Q, double PPrevious = 0);

/// <summary>
/// Samplers as lists of <see cref="ReverseStep"/>s, computed in double from the schedule, then run
/// on the device with the model. Every formula of the model spec in one place.
/// Unclipped (the seed's recipe; steps in the direct form, bit-identical to the seed's sampler):
///   DDPM: x_{t-1} = (x_t - beta_t/sqrt(1-ābar_t)·eps)/sqrt(alpha_t) + sigma_t·z, no noise at t = 0.
///   DDIM: x0 = (x_t - sqrt(1-ābar_t)·eps)/sqrt(ābar_t);
///         sigma = eta·sqrt((1-ābar_prev)/(1-ābar_t))·sqrt(1-ābar_t/ābar_prev);
///         x_prev = sqrt(ābar_prev)·x0 + sqrt(1-ābar_prev-sigma²)·eps + sigma·z.
/// Clipped (the default; improved-diffusion's and diffusers' clip_sample), every sampler goes through
///   x0 = clip((x_t - sqrt(1-ābar_t)·eps)/sqrt(ābar_t), -1, 1), i.e. A = 1/sqrt(ābar_t), B = -sqrt(1-ābar_t)/sqrt(ābar_t):
///   DDPM: x_{t-1} = mu + sigma_t·z with the posterior mean
///         mu = beta_t·sqrt(ābar_{t-1})/(1-ābar_t)·x0 + (1-ābar_{t-1})·sqrt(alpha_t)/(1-ābar_t)·x_t
///         (without the clip this is the unclipped step exactly; with it, a schedule whose ābar_t
///         nears 0, as the cosine one does, no longer amplifies the model's error by 1/sqrt(ābar_t)).
///   DDIM: eps' = (x_t - sqrt(ābar_t)·x0)/sqrt(1-ābar_t) re-derived from the clipped x0 (improved-diffusion's
///         ddim_sample), then x_prev = sqrt(ābar_prev)·x0 + sqrt(1-ābar_prev-sigma²)·eps' + sigma·z, so
///         P = sqrt(ābar_prev) - d·sqrt(ābar_t)/sqrt(1-ābar_t), Q = d/sqrt(1-ābar_t), d = sqrt(1-ābar_prev-sigma²).
///   DPM-Solver++(2M): see <see cref="DpmSolver2M"/> (clipped or not, it is always in the x0 form).
/// Noise comes from the Philox stream of the seed: x_T at offset 0, step i's z at offset (i+1)·N·784,
/// so a seed gives the same digits on every backend.
/// </summary>
public static class Sampler
{
    /// <summary>The DDPM ancestral steps, t = T-1 down to 0; <paramref name="clip"/> false is the seed's step.</summary>
    public static IReadOnlyList<ReverseStep> Ddpm(NoiseSchedule s, bool fixedSmall, bool clip = true)
    {
        var steps = new List<ReverseStep>();
        for (int t = s.T - 1; t >= 0; t--)
        {
            double beta = s.Betas[t], alpha = s.Alphas[t], abar = s.AlphaBars[t], prev = s.AlphaBarPrevious(t);
            double variance = fixedSmall ? beta * (1 - prev) / (1 - abar) : beta;
            double sigma = t == 0 ? 0 : Math.Sqrt(variance);
            if (!clip)
            {
                double c1 = 1 / Math.Sqrt(alpha), c2 = -beta / (Math.Sqrt(1 - abar) * Math.Sqrt(alpha));
                steps.Add(new ReverseStep(t, c1, c2, sigma));
                continue;
            }
            double p = beta * Math.Sqrt(prev) / (1 - abar), q = (1 - prev) * Math.Sqrt(alpha) / (1 - abar);
            steps.Add(ReverseStep.ThroughX0(t, new X0Step(X0A(abar), X0B(abar), Clip: true, p, q), sigma));
        }
        return steps;
    }

    /// <summary>The DDIM steps over <paramref name="count"/> timesteps evenly spread over 0..T-1 (rounded).</summary>
    public static IReadOnlyList<ReverseStep> Ddim(NoiseSchedule s, int count, double eta, bool clip = true)
    {
        if (count < 1 || count > s.T)
        {
            throw new ArgumentException($"ddim: steps must be in 1..{s.T}, not {count}");
        }
        if (eta < 0)
        {
            throw new ArgumentException($"ddim: eta {eta} must not be negative");
        }
        var taus = Timesteps(s.T, count);
        var steps = new List<ReverseStep>();
        for (int i = taus.Length - 1; i >= 0; i--)
        {
            int t = taus[i];
            double abar = s.AlphaBars[t], prev = i > 0 ? s.AlphaBars[taus[i - 1]] : 1.0;
            double sigma = eta * Math.Sqrt((1 - prev) / (1 - abar)) * Math.Sqrt(1 - abar / prev);
            double direction = Math.Sqrt(Math.Max(0, 1 - prev - sigma * sigma));
            if (!clip)
            {
                double c1 = Math.Sqrt(prev / abar);
                double c2 = -Math.Sqrt(prev) * Math.Sqrt(1 - abar) / Math.Sqrt(abar) + direction;
                steps.Add(new ReverseStep(t, c1, c2, sigma));
                continue;
            }
            double p = Math.Sqrt(prev) - direction * Math.Sqrt(abar) / Math.Sqrt(1 - abar), q = direction / Math.Sqrt(1 - abar);
            steps.Add(ReverseStep.ThroughX0(t, new X0Step(X0A(abar), X0B(abar), Clip: true, p, q), sigma));
        }
        return steps;
    }

    /// <summary>
    /// DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep, deterministic) over
    /// <paramref name="count"/> steps: the model is evaluated at S timesteps s_0 = T-1 > ... > s_{S-1},
    /// and step i moves x from s_i to s_{i+1}, with s_0..s_S evenly spread over T-1..0 (rounded), so the
    /// output is x at t = 0. With alpha_t = sqrt(ābar_t), sigma_t = sqrt(1-ābar_t), lambda_t = log(alpha_t/sigma_t),
    /// h = lambda_t - lambda_s (s = s_i, t = s_{i+1}), x0_i = (x - sigma_s·eps)/alpha_s (clipped to [-1, 1] when
    /// <paramref name="clip"/>):
    ///   first order (step 0, and the last step when S &lt; 15, as diffusers' lower_order_final):
    ///     x_t = (sigma_t/sigma_s)·x_s + alpha_t·(1 - e^{-h})·x0_i;
    ///   second order otherwise, with r = h_{i-1}/h and D = (1 + 1/(2r))·x0_i - 1/(2r)·x0_{i-1}:
    ///     x_t = (sigma_t/sigma_s)·x_s + alpha_t·(1 - e^{-h})·D.
    /// <paramref name="eta"/> &gt; 0 takes the stochastic form of the same solver (SDE-DPM-Solver++(2M), Lu et al. 2022's
    /// SDE variant; diffusers' sde-dpmsolver++ with the midpoint rule at eta 1, k-diffusion's dpmpp_2m_sde for any eta):
    ///     x_t = (sigma_t/sigma_s)·e^{-eta·h}·x_s + alpha_t·(1 - e^{-(1+eta)·h})·D + sigma_t·sqrt(1 - e^{-2·eta·h})·z,
    /// which is the deterministic step at eta 0. Part of the noise is re-drawn each step, as DDPM's ancestral steps do,
    /// which corrects the model's errors instead of carrying them along the ODE.
    /// </summary>
    public static IReadOnlyList<ReverseStep> DpmSolver2M(NoiseSchedule s, int count, bool clip = true, double eta = 0)
    {
        if (count < 1 || count > s.T - 1)
        {
            throw new ArgumentException($"dpm++: steps must be in 1..{s.T - 1}, not {count}");
        }
        if (!(eta >= 0 && eta <= 1))
        {
            throw new ArgumentException($"dpm++: eta must be in [0, 1], not {eta}");
        }
        // count + 1 grid points, descending; distinct since count + 1 <= T.
        var grid = Timesteps(s.T, count + 1).Reverse().ToArray();
        double Alpha(int t) => Math.Sqrt(s.AlphaBars[t]);
        double Sigma(int t) => Math.Sqrt(1 - s.AlphaBars[t]);
        double Lambda(int t) => Math.Log(Alpha(t) / Sigma(t));
        var steps = new List<ReverseStep>();
        for (int i = 0; i < count; i++)
        {
            int from = grid[i], to = grid[i + 1];
            double h = Lambda(to) - Lambda(from);
            double q = Sigma(to) / Sigma(from) * Math.Exp(-eta * h), weight = Alpha(to) * (1 - Math.Exp(-(1 + eta) * h));
            double noise = eta > 0 ? Sigma(to) * Math.Sqrt(1 - Math.Exp(-2 * eta * h)) : 0;
            bool firstOrder = i == 0 || (i == count - 1 && count < 15);
            double p = weight, pPrevious = 0;
            if (!firstOrder)
            {
                double r = (Lambda(from) - Lambda(grid[i - 1])) / h;
                p = weight * (1 + 1 / (2 * r));
                pPrevious = -weight / (2 * r);
            }
            double abar = s.AlphaBars[from];
            steps.Add(ReverseStep.ThroughX0(from, new X0Step(X0A(abar), X0B(abar), clip, p, q, pPrevious), noise));
        }
        return steps;
    }

    /// <summary>The steps of a sampler by kind; <paramref name="clip"/> false is the seed's unclipped recipe.</summary>
    public static IReadOnlyList<ReverseStep> Plan(NoiseSchedule s, SamplerKind kind, int steps = 50, double eta = 0, bool clip = true) => kind switch
    {
        SamplerKind.DdpmLarge => Ddpm(s, fixedSmall: false, clip),
        SamplerKind.DdpmSmall => Ddpm(s, fixedSmall: true, clip),
        SamplerKind.Ddim => Ddim(s, steps, eta, clip),
        SamplerKind.DpmSolver2M => DpmSolver2M(s, steps, clip, eta),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    // x0 = A·x_t + B·eps: the x0 estimate's coefficients at ābar_t.
    private static double X0A(double abar) => 1 / Math.Sqrt(abar);

    private static double X0B(double abar) => -Math.Sqrt(1 - abar) / Math.Sqrt(abar);

    // count timesteps evenly spread over 0..T-1 (rounded), ascending, duplicates dropped.
    private static int[] Timesteps(int T, int count) => Enumerable.Range(0, count)
        .Select(i => count == 1 ? T - 1 : (int)Math.Round((double)i * (T - 1) / (count - 1)))
        .Distinct().ToArray();

    /// <summary>
    /// Runs <paramref name="steps"/> from pure noise with <paramref name="predictNoise"/> (x, t, eps) and
    /// returns x_0 as host floats [N·C·H·W]. <paramref name="onStep"/> sees the step index and the device
    /// tensor x after it (for progress and animation frames). The n samples are samples
    /// <paramref name="first"/>.. of a set of <paramref name="total"/> (default: n, the whole set): each sample's noise,
    /// at the start and at every step, is drawn at its own place in the Philox stream, so a set sampled in batches gives
    /// the digits of the set sampled at once, bit for bit.
    /// </summary>
    public static float[] Run(Device device, int n, IReadOnlyList<ReverseStep> steps, ulong seed,
        Action<Tensor, int, Tensor> predictNoise, Action<int, Tensor>? onStep = null, int height = 28, int width = 28, int first = 0, int total = 0,
        int channels = 1)
    {
        int per = channels * height * width;
        total = total == 0 ? n : total;
        if (first < 0 || n < 1 || first + n > total)
        {
            throw new ArgumentOutOfRangeException(nameof(first), $"samples {first}..{first + n - 1} are not in a set of {total}");
        }
        ulong start = (ulong)first * (ulong)per, stride = (ulong)total * (ulong)per;
        using var x = Tensor.Empty(device, n, channels, height, width);
        using var next = Tensor.Empty(device, n, channels, height, width);
        using var eps = Tensor.Empty(device, n, channels, height, width);
        using var z = Tensor.Empty(device, n, channels, height, width);
        using var c1 = Tensor.Empty(device, n);
        using var c2 = Tensor.Empty(device, n);
        // The x0 estimates of this step and the last one, allocated only for plans in the x0 form.
        bool throughX0 = steps.Any(st => st.X0 is not null);
        using var x0 = throughX0 ? Tensor.Empty(device, n, channels, height, width) : null;
        using var x0Previous = throughX0 ? Tensor.Empty(device, n, channels, height, width) : null;
        RandomFill.Normal(x, seed, start);
        var current = x;
        var other = next;
        var estimate = x0;
        var previous = x0Previous;
        for (int i = 0; i < steps.Count; i++)
        {
            var step = steps[i];
            predictNoise(current, step.T, eps);
            if (step.X0 is { } f)
            {
                Elementwise.Fill(c1, (float)f.A);
                Elementwise.Fill(c2, (float)f.B);
                Elementwise.Combine(current, c1, eps, c2, estimate!);
                if (f.Clip)
                {
                    Elementwise.Clamp(estimate!, -1f, 1f, estimate!);
                }
                Elementwise.Fill(c1, (float)f.P);
                Elementwise.Fill(c2, (float)f.Q);
                Elementwise.Combine(estimate!, c1, current, c2, other);
                if (f.PPrevious != 0)
                {
                    Elementwise.Accumulate(other, previous!, (float)f.PPrevious);
                }
                (estimate, previous) = (previous, estimate);
            }
            else
            {
                Elementwise.Fill(c1, (float)step.C1);
                Elementwise.Fill(c2, (float)step.C2);
                Elementwise.Combine(current, c1, eps, c2, other);
            }
            if (step.Sigma > 0)
            {
                RandomFill.Normal(z, seed, (ulong)(i + 1) * stride + start);
                Elementwise.Accumulate(other, z, (float)step.Sigma);
            }
            (current, other) = (other, current);
            onStep?.Invoke(i, current);
        }
        return current.ToArray();
    }

    /// <summary>Runs a sampler with a U-Net (no gradient tape: nothing is kept between steps). A class-conditional
    /// model samples unguided with "no label" for every digit.</summary>
    public static float[] Run(UNet model, int n, IReadOnlyList<ReverseStep> steps, ulong seed, Action<int, Tensor>? onStep = null) =>
        Run(model, n, steps, seed, labels: null, guidance: 0, onStep);

    /// <summary>
    /// Runs a sampler with classifier-free guidance (Ho &amp; Salimans 2022) on a class-conditional model:
    /// eps = eps(x, t, none) + w·(eps(x, t, y) - eps(x, t, none)), two forwards a step, with
    /// <paramref name="labels"/> [n] the digit asked for each sample and w = <paramref name="guidance"/>.
    /// Without labels, a conditional model runs once a step with "no label"; an unconditional model takes no labels.
    /// </summary>
    public static float[] Run(UNet model, int n, IReadOnlyList<ReverseStep> steps, ulong seed, float[]? labels, float guidance,
        Action<int, Tensor>? onStep = null) => Run(model, n, steps, seed, labels, guidance, onStep, first: 0, total: n);

    /// <summary>
    /// Draws <paramref name="total"/> samples in batches of at most <paramref name="batch"/>, each sample's noise at its own
    /// place in the stream, so the digits are those of one batch of <paramref name="total"/>, bit for bit, with the device
    /// memory of one batch. <paramref name="onStep"/> sees (step, first sample of the batch, x of the batch).
    /// <paramref name="labels"/> [total] as in the unbatched call.
    /// </summary>
    public static float[] RunBatched(UNet model, int total, int batch, IReadOnlyList<ReverseStep> steps, ulong seed, float[]? labels, float guidance,
        Action<int, int, Tensor>? onStep = null)
    {
        if (batch < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(batch), batch, "a batch holds one sample at least");
        }
        long per = (long)model.ImageChannels * model.ImageSize * model.ImageSize;
        var all = new float[total * per];
        for (int first = 0; first < total; first += batch)
        {
            int n = Math.Min(batch, total - first);
            int from = first;
            var part = Run(model, n, steps, seed, labels?[first..(first + n)], guidance,
                onStep is null ? null : (i, x) => onStep(i, from, x), first, total);
            part.CopyTo(all, first * per);
            if (first + n < total)
            {
                if (Math.Min(batch, total - first - n) != n)
                {
                    // The last batch is smaller: free the pooled buffers of the full ones first, or the pool holds both sizes.
                    model.Device.Trim();
                }
                // A batch's garbage (its result, the host copies of its frames) is large-object memory that the runtime would
                // otherwise let grow over many batches: collected here, so memory stays that of one batch.
                GC.Collect();
            }
        }
        return all;
    }

    private static float[] Run(UNet model, int n, IReadOnlyList<ReverseStep> steps, ulong seed, float[]? labels, float guidance,
        Action<int, Tensor>? onStep, int first, int total)
    {
        if (labels is not null && model.Classes == 0)
        {
            throw new ArgumentException("sampler: labels given to an unconditional model");
        }
        if (labels is not null && (labels.Length != n || labels.Any(l => l < 0 || l > model.NullLabel || l != MathF.Floor(l))))
        {
            throw new ArgumentException($"sampler: labels must be {n} integers in 0..{model.NullLabel}");
        }
        var device = model.Device;
        using var t = Tensor.Empty(device, n);
        using var none = model.Classes > 0 ? Tensor.Empty(device, n) : null;
        using var cond = labels is not null ? Tensor.FromHost(device, labels, n) : null;
        int c = model.ImageChannels, side = model.ImageSize;
        using var epsNone = cond is not null ? Tensor.Empty(device, n, c, side, side) : null;
        using var wCond = cond is not null ? Tensor.Empty(device, n) : null;
        using var wNone = cond is not null ? Tensor.Empty(device, n) : null;
        if (none is not null)
        {
            Elementwise.Fill(none, model.NullLabel);
        }
        if (cond is not null)
        {
            Elementwise.Fill(wCond!, guidance);
            Elementwise.Fill(wNone!, 1f - guidance);
        }
        using var tape = Tape.NoGrad(device);
        // The weights do not change while sampling: the GPU's convolutions read them permuted once (UNet.HoldConvWeights).
        using var held = model.HoldConvWeights();
        return Run(device, n, steps, seed, (x, step, eps) =>
        {
            Elementwise.Fill(t, step);
            var y = model.Forward(tape, tape.Constant(x), tape.Constant(t), none is null ? null : tape.Constant(none));
            if (cond is null)
            {
                eps.CopyFrom(y.Value);
                tape.Reset();
                return;
            }
            epsNone!.CopyFrom(y.Value);
            tape.Reset();
            y = model.Forward(tape, tape.Constant(x), tape.Constant(t), tape.Constant(cond));
            // eps_none + w·(eps_cond - eps_none) = w·eps_cond + (1 - w)·eps_none.
            Elementwise.Combine(y.Value, wCond!, epsNone, wNone!, eps);
            tape.Reset();
        }, onStep, height: side, width: side, first: first, total: total, channels: c);
    }
}
