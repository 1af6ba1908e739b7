using System.Globalization;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>
/// The part of <c>ddpm check --sass</c> that turns the compiler's figures into a prediction: the base preset's convolution
/// passes at batch 128 (recorded from one training step of the real model on the CPU backend, at batch 1, then scaled),
/// each priced by <see cref="GpuPrediction"/> with its kernel's SASS cost, summed into a train step and a denoising step
/// on an H100 and an H200, against the PyTorch peer's strict-fp32 estimate. docs/gpu.md carries its output.
/// </summary>
public static class GpuForecast
{
    /// <summary>The preset and batch the prediction is for.</summary>
    public const string Preset = "base";

    /// <summary>The batch.</summary>
    public const int Batch = 128;

    /// <summary>The rest of a step on each chip, ms, (low, high): GroupNorm, bias and time-embedding gradients, reductions,
    /// elementwise, the optimizer: memory-bound passes priced by their bytes in docs/gpu.md ("GroupNorm, bias gradients and
    /// reductions"), not from the SASS. The GroupNorm forward reads x once (its groups hold their slices:
    /// TiledNorm.ReadsOnce), so a denoising step's rest is one figure; a train step's range is the backward's on
    /// dec0.norm1, the one slice its groups do not hold (TiledNorm.BackwardReadsOnce), whose second reads may or may
    /// not hit L2.</summary>
    private static (double Low, double High) Rest(Chip chip, bool train) => (chip == Chip.H200, train) switch
    {
        (false, true) => (0.7, 0.8),
        (true, true) => (0.45, 0.51),
        (false, false) => (0.46, 0.46),
        (true, false) => (0.38, 0.38),
    };

    /// <summary>PyTorch eager in strict fp32 on each chip, ms (low, high): issue 12's estimate for the H100, scaled by the
    /// memory-bound share for the H200 (docs/gpu.md). An estimate too: no GPU has run the peer here.</summary>
    private static (double Low, double High) Peer(Chip chip, bool train) => (chip == Chip.H200, train) switch
    {
        (false, true) => (14, 18),
        (true, true) => (13.5, 17.5),
        _ => (5, 6),
    };

    /// <summary>The convolution passes of one training step of <paramref name="preset"/> at <paramref name="batch"/>, in
    /// the order the tape runs them.</summary>
    public static IReadOnlyList<ConvPass> TrainPasses(string preset, int batch)
    {
        var pixels = new byte[2 * ImageSet.MnistPixels];
        var data = new ImageSet(pixels, new byte[2], 2);
        using var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = preset, Batch = 1, Epochs = 1, Lr = 1e-4f }, data);
        var profile = new OpProfile { ByShape = true };
        trainer.Profile = profile;
        trainer.TrainStep();
        return profile.ConvPasses.Select(p => new ConvPass(p.Pass, WithBatch(p.Shape, batch))).ToList();
    }

    private static ConvShape WithBatch(ConvShape g, int n) => new(n, g.C, g.H, g.W, g.K, g.R, g.S, g.Stride, g.Pad);

    /// <summary>TF32 tensor cores' dense peak on <paramref name="chip"/> at its sustained clock, TFLOP/s: 1,024 multiply-adds a
    /// clock an SM (Hopper; the spec sheet's 495 TFLOP/s is at the 1.83 GHz boost).</summary>
    public static double Tf32PeakTflops(Chip chip) => chip.Sms * 1024 * 2 * chip.ClockGhz / 1000;

    /// <summary>The share of the TF32 peak PyTorch's cuDNN convolutions are assumed to reach on these small images (28x28 and
    /// less, 64 to 384 channels), (low, high): an assumption, like the strict-fp32 estimate, until a GPU runs the peer.</summary>
    public static readonly (double Low, double High) PeerTf32Share = (0.30, 0.45);

    /// <summary>PyTorch's default (TF32 convolutions) on <paramref name="chip"/>, ms (low, high): the step's convolution
    /// GFLOP at <see cref="PeerTf32Share"/> of the TF32 peak, plus the rest of PyTorch's step, which TF32 does not change:
    /// its normalisations, elementwise ops and optimizer, taken as the engine's memory-bound rest plus PyTorch eager's
    /// launch overhead (about 1 ms a train step, 0.3 ms a forward). Derived, not measured.</summary>
    public static (double Low, double High) PeerDefault(Chip chip, bool train, double convGflop)
    {
        var (restLow, restHigh) = Rest(chip, train);
        double launches = train ? 1.0 : 0.3, peak = Tf32PeakTflops(chip);
        return (convGflop / (PeerTf32Share.High * peak) + restLow + launches, convGflop / (PeerTf32Share.Low * peak) + restHigh + launches);
    }

    /// <summary>Prints the prediction for each math mode's kernel costs by pass kind ("Forward", "Input", "Weight"), with the
    /// one-output-channel forward's instructions a tap (<paramref name="singleChannelTap"/>) and the narrow weight
    /// gradient's a pixel (<paramref name="narrowPixel"/>), every mode's: the per-pass table of each mode on an H100, then
    /// each mode's steps on the three chips against PyTorch in strict fp32 and PyTorch's default.</summary>
    public static void Print(IReadOnlyDictionary<MathPrecision, IReadOnlyDictionary<string, GemmCost>> byMode, int singleChannelTap, int narrowPixel)
    {
        var passes = TrainPasses(Preset, Batch);
        string F(double v, string format = "0.000") => v.ToString(format, CultureInfo.InvariantCulture);
        static double Gflop(ConvPass p) => GpuPrediction.Gemm(p) is var (m, cols, kd, _) ? 2.0 * m * cols * kd / 1e9 : 0;
        double trainGflop = passes.Sum(Gflop), forwardGflop = passes.Where(p => p.Pass == "fwd").Sum(Gflop);
        Console.WriteLine();
        Console.WriteLine($"### Prediction from the sm_90 figures: {Preset} preset, batch {Batch} (unmeasured)");
        Console.WriteLine();
        Console.WriteLine($"Each pass: groups in waves of SMs x groups an SM, a wave = K steps x the instructions a thread issues a step x warps / " +
            $"(4 a clock x {F(GpuPrediction.IssueEfficiency(3), "0.00")} issue efficiency with 3 warps a scheduler, less with fewer), or on tensor cores " +
            $"the HMMA a step x {F(GpuPrediction.ClocksPerHmma, "0")} clocks each when that is longer, at least the compulsory bytes at " +
            $"{GpuPrediction.MemoryShare:P0} of HBM, plus {GpuPrediction.LaunchGapMs * 1000:0} µs a launch. The step's convolutions: {F(trainGflop, "0")} GFLOP " +
            $"a train step, {F(forwardGflop, "0")} a denoising step; a train step adds the permutation of the weights its passes in K steps of one tap " +
            $"read ({F(GpuPrediction.HeldPermutationMs(passes, Chip.H100))} ms on an H100, one launch), a denoising step nothing (once a sampling run).");
        foreach (var (mode, costs) in byMode)
        {
            // A pass in K steps of one tap runs its own kernel ("ForwardTap", "InputTap") where the mode has one (not 3xTF32), and
            // a weight gradient with tap-major columns its own ("WeightTap": strict fp32 only).
            bool byTaps = costs.ContainsKey("ForwardTap"), byTapColumns = costs.ContainsKey("WeightTap");
            bool OwnKernel(ConvPass p) => p.Pass == "dw" ? byTapColumns && GpuPrediction.ByTapColumns(p) : byTaps && GpuPrediction.ByTaps(p);
            GemmCost Cost(ConvPass p) => costs[p.Pass switch { "fwd" => "Forward", "dx" => "Input", _ => "Weight" } + (OwnKernel(p) ? "Tap" : "")];
            PassPrediction Predict(ConvPass p, Chip chip) => GpuPrediction.SingleChannel(p)
                ? GpuPrediction.PredictSingleChannel(p, singleChannelTap, chip)
                : GpuPrediction.NarrowWeight(p) ? GpuPrediction.PredictNarrowWeight(p, narrowPixel, chip)
                : GpuPrediction.Predict(p, Cost(p), chip);
            Console.WriteLine();
            Console.WriteLine($"#### --math {mode.Name()}: {mode.Describe()}");
            Console.WriteLine();
            Console.WriteLine("Instructions (HMMA) a thread issues a K step: " +
                string.Join(", ", costs.Select(c => $"{c.Key.ToLowerInvariant()} {c.Value.StepInstructions}" + (c.Value.StepHmma > 0 ? $" ({c.Value.StepHmma} HMMA)" : $" ({TiledGemm.RowsPerThread * TiledGemm.ColsPerThread * TiledGemm.TK} FFMA)"))) +
                $"; the one-output-channel forward (a thread an output pixel, strict fp32 in every mode) {singleChannelTap} a tap; " +
                $"the narrow weight gradient (one input or output channel: groups of 256 a channel pair and pixel split, strict fp32 in every mode) {narrowPixel} a pixel.");
            Console.WriteLine();
            Console.WriteLine($"| pass | shape (C>K, kernel/stride, input) | GFLOP | groups (splits) | K steps | H100 ms | share of {F(mode == MathPrecision.Fp32 ? Chip.H100.PeakTflops : Tf32PeakTflops(Chip.H100), "0.0")} TFLOP/s |");
            Console.WriteLine("|---|---|---|---|---|---|---|");
            double peak = mode == MathPrecision.Fp32 ? Chip.H100.PeakTflops : Tf32PeakTflops(Chip.H100);
            foreach (var p in passes)
            {
                var r = Predict(p, Chip.H100);
                var g = p.Shape;
                string groups = GpuPrediction.SingleChannel(p) ? $"{r.Groups} x 256 threads"
                    : GpuPrediction.NarrowWeight(p) ? $"{r.Groups} x 256 threads ({r.Splits})" : $"{r.Groups} ({r.Splits})";
                string steps = GpuPrediction.SingleChannel(p) ? $"{r.Steps} taps" : GpuPrediction.NarrowWeight(p) ? $"{r.Steps} pixels" : $"{r.Steps}";
                Console.WriteLine($"| {p.Pass} | {g.C}>{g.K}, {g.R}x{g.S}/{g.Stride}, {g.H}x{g.W} | {F(r.Gflop, "0.00")} | {groups} | {steps} | {F(r.Ms)} | {r.Gflop / (r.Ms * 1e-3) / (peak * 1e3):P0} |");
            }
            Console.WriteLine();
            Console.WriteLine("| chip | forward convs ms | input-gradient convs ms | weight-gradient convs ms | train step ms (+ the rest) | PyTorch strict fp32 (estimate) | ratio | PyTorch default, TF32 (estimate) | ratio | denoising step ms | PyTorch strict | ratio | PyTorch default | ratio |");
            Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            foreach (var chip in new[] { Chip.H100, Chip.H200, Chip.H100Pcie })
            {
                double Sum(string pass) => passes.Where(p => p.Pass == pass).Sum(p => Predict(p, chip).Ms);
                double fwd = Sum("fwd"), dx = Sum("dx"), dw = Sum("dw");
                if (chip == Chip.H100Pcie)
                {
                    Console.WriteLine($"| {chip.Name} ({chip.Sms} SMs; the split-K sized for 132) | {F(fwd, "0.0")} | {F(dx, "0.0")} | {F(dw, "0.0")} | - | - | - | - | - | - | - | - | - | - |");
                    continue;
                }
                var (trainLow, trainHigh) = Rest(chip, train: true);
                var (fwdLow, fwdHigh) = Rest(chip, train: false);
                // The held weights' permutation (one launch a train step; once a sampling run, so nothing a denoising step).
                double train = fwd + dx + dw + (byTaps ? GpuPrediction.HeldPermutationMs(passes, chip) : 0);
                (double Low, double High) ours = (train + trainLow, train + trainHigh), oursFwd = (fwd + fwdLow, fwd + fwdHigh);
                string Range((double Low, double High) v) => F(v.Low, "0.0") == F(v.High, "0.0") ? F(v.Low, "0.0") : $"{F(v.Low, "0.0")}-{F(v.High, "0.0")}";
                string Ratio((double Low, double High) a, (double Low, double High) b) => $"{F(a.Low / b.High, "0.00")}-{F(a.High / b.Low, "0.00")}x";
                var strict = Peer(chip, train: true);
                var strictFwd = Peer(chip, train: false);
                var tf32 = PeerDefault(chip, train: true, trainGflop);
                var tf32Fwd = PeerDefault(chip, train: false, forwardGflop);
                Console.WriteLine($"| {chip.Name} | {F(fwd, "0.0")} | {F(dx, "0.0")} | {F(dw, "0.0")} | {Range(ours)} | {Range(strict)} | {Ratio(ours, strict)} | " +
                    $"{Range(tf32)} | {Ratio(ours, tf32)} | {Range(oursFwd)} | {Range(strictFwd)} | {Ratio(oursFwd, strictFwd)} | {Range(tf32Fwd)} | {Ratio(oursFwd, tf32Fwd)} |");
            }
        }
    }
}
