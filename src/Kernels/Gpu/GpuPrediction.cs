namespace Ddpm.Kernels;

/// <summary>A GPU the prediction is for: its SMs, the clock it sustains under an fp32 load, and its memory bandwidth.</summary>
/// <param name="Name">"H100 SXM".</param>
/// <param name="Sms">Streaming multiprocessors.</param>
/// <param name="ClockGhz">The clock assumed under load (the boost clock is higher; fp32 peak = SMs · 128 · 2 · clock).</param>
/// <param name="MemoryTBs">HBM bandwidth, TB/s.</param>
public sealed record Chip(string Name, int Sms, double ClockGhz, double MemoryTBs)
{
    /// <summary>H100 SXM (132 SMs, 3.35 TB/s), H200 (the same die and clocks, 4.8 TB/s), H100 PCIe (114 SMs, 2.0 TB/s).</summary>
    public static readonly Chip H100 = new("H100 SXM", 132, 1.755, 3.35), H200 = new("H200", 132, 1.755, 4.8), H100Pcie = new("H100 PCIe", 114, 1.755, 2.0);

    /// <summary>fp32 FMA peak, TFLOP/s.</summary>
    public double PeakTflops => Sms * 128 * 2 * ClockGhz / 1000;
}

/// <summary>What the compiler's table says about one tiled GEMM kernel: the instructions a thread issues a K step (the
/// main loop's static count, its inner multiply-add loop counted once per trip), groups an SM holds, warps a group, and the
/// tensor-core mma (HMMA.1688) a warp issues a K step (0 on the FFMA core).</summary>
public sealed record GemmCost(int StepInstructions, int GroupsPerSm, int Warps = TiledGemm.Threads / 32, int StepHmma = 0)
{
    /// <summary>From the main loop's and the inner loop's static mixes: static + (trips - 1) · inner, for the instructions
    /// and the HMMA alike.</summary>
    public static GemmCost FromLoops(SassMix mainLoop, SassMix innerLoop, int groupsPerSm, int innerTrips) =>
        new(mainLoop.Total + (innerTrips - 1) * innerLoop.Total, groupsPerSm, StepHmma: mainLoop.Hmma + (innerTrips - 1) * innerLoop.Hmma);
}

/// <summary>One convolution pass of a step: "fwd" (y), "dx" (the input gradient) or "dw" (weight and bias gradients).</summary>
public readonly record struct ConvPass(string Pass, ConvShape Shape);

/// <summary>The predicted time of one pass, and how it was reached.</summary>
public sealed record PassPrediction(ConvPass Pass, long M, long Cols, long Kd, int Groups, int Splits, int Steps, double Gflop, double Mbytes, double ComputeMs,
    double MemoryMs, double Ms, double ShareOfPeak);

/// <summary>
/// The convolutions' time on a GPU, derived from the compiler's figures (docs/gpu.md, "The prediction"): each pass is the
/// tiled GEMM of its shape; its groups run in waves of SMs x groups-an-SM; a wave takes the K steps times the
/// instructions a thread issues a step (from the SASS) times the warps on an SM, at 4 warp instructions a clock
/// (four schedulers) times an issue efficiency that grows with the warps a scheduler can choose from, or, on tensor
/// cores, the HMMA a step at <see cref="ClocksPerHmma"/> each when their pipe is the slower; a pass takes
/// at least its compulsory bytes at 70% of HBM bandwidth, plus a split's partials (written and read once more at that
/// bandwidth) and a launch gap. A prediction, not a measurement.
/// </summary>
public static class GpuPrediction
{
    /// <summary>Issue slots used when each scheduler has 1, 2, 3 or more warps of these kernels to choose from: one warp
    /// stalls on every shared load and barrier; three hide them behind each other's multiply-adds (an assumption, the
    /// figure a GPU run corrects).</summary>
    public static double IssueEfficiency(int warpsPerScheduler) => warpsPerScheduler switch { <= 1 => 0.55, 2 => 0.75, _ => 0.85 };

    /// <summary>Clocks an SM sub-partition's tensor core takes for one HMMA.1688.F32.TF32 (1,024 multiply-adds) issued by
    /// mma.sync on an H100: an assumption between the A100's 8 (156 TFLOP/s TF32 on 108 SMs at 1.41 GHz) and the 4 of
    /// Hopper's wgmma peak (495 TFLOP/s on 132 SMs); mma.sync is reported to reach about two thirds of wgmma's rate.
    /// The figure a GPU run corrects (docs/gpu.md, "Tensor cores").</summary>
    public const double ClocksPerHmma = 6;

    /// <summary>The gap between two queued kernels, ms.</summary>
    public const double LaunchGapMs = 0.002;

    /// <summary>The share of HBM bandwidth a streaming kernel reaches.</summary>
    public const double MemoryShare = 0.7;

    /// <summary>The GEMM a pass runs: (M, Cols, Kd, splits).</summary>
    public static (long M, long Cols, long Kd, int Splits) Gemm(ConvPass p)
    {
        var g = p.Shape;
        return p.Pass switch
        {
            "fwd" => (g.K, (long)g.N * g.Pq, g.Crs, TiledConv.ForwardSplits(g)),
            "dx" => (g.C, (long)g.N * g.H * g.W, (long)g.K * g.R * g.S, TiledConv.InputSplits(g)),
            "dw" => (g.K, g.Crs, (long)g.N * g.Pq, TiledConv.WeightSplits(g)),
            _ => throw new ArgumentException($"unknown convolution pass {p.Pass}"),
        };
    }

    /// <summary>True for a weight gradient with tap-major columns (<see cref="TiledConv.ByTapColumns"/>), in the modes that have
    /// its kernel (strict fp32).</summary>
    public static bool ByTapColumns(ConvPass p) => p.Pass == "dw" && TiledConv.ByTapColumns(p.Shape.C) && !NarrowWeight(p);

    /// <summary>True for a pass that runs in K steps of one tap (<see cref="TiledConv.ByTaps"/>: the forward over C, the input
    /// gradient over K, a multiple of 16), its weights permuted first (<see cref="HeldPermutationMs"/>).</summary>
    public static bool ByTaps(ConvPass p) => p.Pass switch
    {
        "fwd" => TiledConv.ByTaps(p.Shape.C) && !SingleChannel(p),
        "dx" => TiledConv.ByTaps(p.Shape.K),
        _ => false,
    };

    /// <summary>The held weights' permutation a train step (<see cref="HeldConvWeights"/>: one launch before the forwards, every
    /// convolution weight of <paramref name="passes"/> read once and written once for each of its passes in K steps of one
    /// tap, at <see cref="MemoryShare"/> of HBM) plus its launch gap. A sampling run permutes once for all its denoising
    /// steps: nothing a step.</summary>
    public static double HeldPermutationMs(IEnumerable<ConvPass> passes, Chip chip)
    {
        double bytes = 0;
        foreach (var p in passes)
        {
            long weights = (long)p.Shape.K * p.Shape.Crs;
            bytes += (p.Pass == "fwd" ? 4.0 * weights : 0) + (ByTaps(p) ? 4.0 * weights : 0);
        }
        return bytes / (MemoryShare * chip.MemoryTBs * 1e9) + LaunchGapMs;
    }

    /// <summary>True for a pass the one-output-channel forward kernel runs (<see cref="PredictSingleChannel"/>).</summary>
    public static bool SingleChannel(ConvPass p) => p.Pass == "fwd" && TiledConv.SingleChannel(p.Shape);

    /// <summary>
    /// Predicts a one-output-channel forward (<see cref="TiledConv.SingleChannelForwardKernel"/>: a thread an output pixel,
    /// <paramref name="tapInstructions"/> instructions a thread issues a tap, from its SASS loop) on <paramref name="chip"/>:
    /// its warps' instructions at 4 a clock an SM and the issue efficiency of many warps, at least its compulsory bytes,
    /// plus a launch gap. Groups are of 256 threads; "steps" are the taps a thread walks (C·R·S).
    /// </summary>
    public static PassPrediction PredictSingleChannel(ConvPass pass, int tapInstructions, Chip chip)
    {
        var g = pass.Shape;
        long pixels = (long)g.N * g.Pq;
        return Direct(pass, chip, (double)((pixels + 31) / 32) * g.Crs * tapInstructions, 2.0 * pixels * g.Crs,
            4.0 * ((long)g.N * g.C * g.H * g.W + g.Crs + pixels), 1, pixels, g.Crs, (int)((pixels + 255) / 256), 1, g.Crs);
    }

    /// <summary>A kernel of many small groups, not a tile (<see cref="PredictSingleChannel"/>, <see cref="PredictNarrowWeight"/>):
    /// its <paramref name="warpInstructions"/> at 4 a clock an SM and the issue efficiency of many warps, at least its
    /// compulsory <paramref name="bytes"/>, plus a launch gap; the rest of the row as given.</summary>
    private static PassPrediction Direct(ConvPass pass, Chip chip, double warpInstructions, double flop, double bytes, long m, long cols, long kd,
        int groups, int splits, int steps)
    {
        double computeMs = warpInstructions / (chip.Sms * 4 * IssueEfficiency(3)) / (chip.ClockGhz * 1e6);
        double memoryMs = bytes / (MemoryShare * chip.MemoryTBs * 1e9);
        double ms = Math.Max(computeMs, memoryMs) + LaunchGapMs;
        return new PassPrediction(pass, m, cols, kd, groups, splits, steps, flop / 1e9, bytes / 1e6, computeMs, memoryMs, ms,
            flop / (ms * 1e-3) / (chip.PeakTflops * 1e12));
    }

    /// <summary>True for a pass the narrow weight-gradient kernel runs (<see cref="PredictNarrowWeight"/>).</summary>
    public static bool NarrowWeight(ConvPass p) => p.Pass == "dw" && TiledConv.NarrowWeight(p.Shape);

    /// <summary>
    /// Predicts a narrow weight gradient (<see cref="TiledConv.NarrowWeightKernel"/>: groups of 256 threads a (k, c) pair and
    /// pixel split, a thread a pixel at a time, <paramref name="pixelInstructions"/> instructions a pixel, from its SASS loop)
    /// on <paramref name="chip"/>: its warps' instructions at 4 a clock an SM and the issue efficiency of many warps, at
    /// least its compulsory bytes (x and dy once; the other, one channel, from L2), plus a launch gap. "Steps" are the
    /// pixels a thread walks.
    /// </summary>
    public static PassPrediction PredictNarrowWeight(ConvPass pass, int pixelInstructions, Chip chip)
    {
        var g = pass.Shape;
        long pairs = (long)g.K * g.C, pixels = (long)g.N * g.Pq;
        int splits = TiledConv.NarrowSplits(g), threads = TiledReduce.MaxThreads;
        return Direct(pass, chip, pairs * ((pixels + 31) / 32.0) * pixelInstructions, 2.0 * pairs * pixels * g.R * g.S,
            4.0 * ((long)g.N * g.C * g.H * g.W + (long)g.N * g.K * g.Pq + pairs * g.R * g.S), g.K, g.Crs, pixels, (int)(pairs * splits), splits,
            (int)((pixels / splits + threads - 1) / threads));
    }

    /// <summary>Predicts one pass on <paramref name="chip"/> with the kernel's <paramref name="cost"/>.</summary>
    public static PassPrediction Predict(ConvPass pass, GemmCost cost, Chip chip)
    {
        var g = pass.Shape;
        var (m, cols, kd, splits) = Gemm(pass);
        long chunk = TileArgs.RoundUp((int)((kd + splits - 1) / splits), TiledGemm.TK);
        int steps = (int)((chunk + TiledGemm.TK - 1) / TiledGemm.TK);
        long tiles = (m + TiledGemm.TM - 1) / TiledGemm.TM * ((cols + TiledGemm.TN - 1) / TiledGemm.TN);
        long groups = tiles * splits;
        // Waves of Sms x GroupsPerSm; a wave with n groups an SM takes n·steps·instructions·warps / (4·efficiency(n)) clocks.
        double clocks = 0;
        for (long left = groups; left > 0; left -= (long)chip.Sms * cost.GroupsPerSm)
        {
            long inWave = Math.Min(left, (long)chip.Sms * cost.GroupsPerSm);
            int perSm = (int)((inWave + chip.Sms - 1) / chip.Sms);
            // Each of the 4 schedulers holds perSm·warps/4 warps: it issues their instructions at the efficiency those warps
            // allow, and its tensor core works through their HMMA; the slower of the two sets the pace.
            double warpsPerScheduler = perSm * cost.Warps / 4.0;
            double issue = warpsPerScheduler * cost.StepInstructions / IssueEfficiency(perSm * cost.Warps / 4);
            double tensor = warpsPerScheduler * cost.StepHmma * ClocksPerHmma;
            clocks += steps * Math.Max(issue, tensor);
        }
        double computeMs = clocks / (chip.ClockGhz * 1e6);
        double flop = 2.0 * m * cols * kd;
        long x = (long)g.N * g.C * g.H * g.W, w = (long)g.K * g.Crs, y = (long)g.N * g.K * g.Pq;
        // The compulsory bytes overlap the product; a split's partials, written as its groups end and read by the last
        // group of each tile, mostly do not (the split sizing puts the groups in one wave, which ends together).
        double bytes = 4.0 * (x + w + y), partialBytes = splits > 1 ? 4.0 * 2 * splits * m * cols : 0;
        double memoryMs = bytes / (MemoryShare * chip.MemoryTBs * 1e9);
        double ms = Math.Max(computeMs, memoryMs) + partialBytes / (MemoryShare * chip.MemoryTBs * 1e9) + LaunchGapMs;
        return new PassPrediction(pass, m, cols, kd, (int)groups, splits, steps, flop / 1e9, (bytes + partialBytes) / 1e6, computeMs, memoryMs, ms,
            flop / (ms * 1e-3) / (chip.PeakTflops * 1e12));
    }
}
