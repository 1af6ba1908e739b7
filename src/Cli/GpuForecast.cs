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
    /// reductions"), not from the SASS.</summary>
    private static (double Low, double High) Rest(Chip chip, bool train) => (chip == Chip.H200, train) switch
    {
        (false, true) => (0.7, 1.25),
        (true, true) => (0.45, 0.8),
        (false, false) => (0.46, 0.72),
        (true, false) => (0.38, 0.55),
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
        var pixels = new byte[2 * MnistSet.Pixels];
        var data = new MnistSet(pixels, new byte[2], 2);
        using var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = preset, Batch = 1, Epochs = 1, Lr = 1e-4f }, data);
        var profile = new OpProfile { ByShape = true };
        trainer.Profile = profile;
        trainer.TrainStep();
        return profile.ConvPasses.Select(p => new ConvPass(p.Pass, WithBatch(p.Shape, batch))).ToList();
    }

    private static ConvShape WithBatch(ConvShape g, int n) => new(n, g.C, g.H, g.W, g.K, g.R, g.S, g.Stride, g.Pad);

    /// <summary>Prints the prediction for the kernels' costs by pass kind ("Forward", "Input", "Weight").</summary>
    public static void Print(IReadOnlyDictionary<string, GemmCost> costs)
    {
        var passes = TrainPasses(Preset, Batch);
        GemmCost Cost(ConvPass p) => costs[p.Pass switch { "fwd" => "Forward", "dx" => "Input", _ => "Weight" }];
        string F(double v, string format = "0.000") => v.ToString(format, CultureInfo.InvariantCulture);
        Console.WriteLine();
        Console.WriteLine($"### Prediction from the sm_90 figures: {Preset} preset, batch {Batch} (unmeasured)");
        Console.WriteLine();
        Console.WriteLine($"Each pass: groups in waves of SMs x groups an SM, a wave = K steps x the instructions a thread issues a step x warps / " +
            $"(4 a clock x {F(GpuPrediction.IssueEfficiency(3), "0.00")} issue efficiency with 3 warps a scheduler, less with fewer), at least the " +
            $"compulsory bytes at {GpuPrediction.MemoryShare:P0} of HBM, plus {GpuPrediction.LaunchGapMs * 1000:0} µs a launch. Instructions a K step: " +
            string.Join(", ", costs.Select(c => $"{c.Key.ToLowerInvariant()} {c.Value.StepInstructions} for {TiledGemm.RowsPerThread * TiledGemm.ColsPerThread * TiledGemm.TK} FFMA")) + ".");
        Console.WriteLine();
        Console.WriteLine($"| pass | shape (C>K, kernel/stride, input) | GFLOP | groups (splits) | K steps | H100 ms | share of {F(Chip.H100.PeakTflops, "0.0")} TFLOP/s |");
        Console.WriteLine("|---|---|---|---|---|---|---|");
        foreach (var p in passes)
        {
            var r = GpuPrediction.Predict(p, Cost(p), Chip.H100);
            var g = p.Shape;
            Console.WriteLine($"| {p.Pass} | {g.C}>{g.K}, {g.R}x{g.S}/{g.Stride}, {g.H}x{g.W} | {F(r.Gflop, "0.00")} | {r.Groups} ({r.Splits}) | {r.Steps} | {F(r.Ms)} | {r.ShareOfPeak:P0} |");
        }
        Console.WriteLine();
        Console.WriteLine("| chip | forward convs ms | input-gradient convs ms | weight-gradient convs ms | train step ms (+ the rest) | PyTorch strict fp32 (estimate) | ratio | denoising step ms | PyTorch | ratio |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|");
        foreach (var chip in new[] { Chip.H100, Chip.H200, Chip.H100Pcie })
        {
            double Sum(string pass) => passes.Where(p => p.Pass == pass).Sum(p => GpuPrediction.Predict(p, Cost(p), chip).Ms);
            double fwd = Sum("fwd"), dx = Sum("dx"), dw = Sum("dw");
            if (chip == Chip.H100Pcie)
            {
                Console.WriteLine($"| {chip.Name} ({chip.Sms} SMs; the split-K sized for 132) | {F(fwd, "0.0")} | {F(dx, "0.0")} | {F(dw, "0.0")} | - | - | - | - | - | - |");
                continue;
            }
            var (trainLow, trainHigh) = Rest(chip, train: true);
            var (fwdLow, fwdHigh) = Rest(chip, train: false);
            var (peerTrainLow, peerTrainHigh) = Peer(chip, train: true);
            var (peerFwdLow, peerFwdHigh) = Peer(chip, train: false);
            double train = fwd + dx + dw;
            Console.WriteLine($"| {chip.Name} | {F(fwd, "0.0")} | {F(dx, "0.0")} | {F(dw, "0.0")} | {F(train + trainLow, "0.0")}-{F(train + trainHigh, "0.0")} | " +
                $"{F(peerTrainLow, "0.#")}-{F(peerTrainHigh, "0.#")} | {F((train + trainLow) / peerTrainHigh, "0.00")}-{F((train + trainHigh) / peerTrainLow, "0.00")}x | " +
                $"{F(fwd + fwdLow, "0.0")}-{F(fwd + fwdHigh, "0.0")} | {F(peerFwdLow, "0.#")}-{F(peerFwdHigh, "0.#")} | " +
                $"{F((fwd + fwdLow) / peerFwdHigh, "0.00")}-{F((fwd + fwdHigh) / peerFwdLow, "0.00")}x |");
        }
    }
}
