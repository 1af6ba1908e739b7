using System.Diagnostics;
using Ddpm.Diffusion;
using Ddpm.Diffusion.Parallel;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Cli;

/// <summary>
/// <c>mpiexec -n N ddpm bench --allreduce</c>: the ranks' gradient sum (<see cref="GradientSum"/>: all-to-all, fold,
/// all-gather, as a training step makes it) timed for each preset's gradient, one table on rank 0's stdout: floats, bytes,
/// the median and fastest of the timed sums. What docs/scale-out.md's cost model starts from.
/// </summary>
internal static class AllReduceBench
{
    public static int Run(int repeats)
    {
        if (Mpi.Launcher() is not { } launcher)
        {
            throw new UsageException("--allreduce times the ranks' gradient sum: run it under an MPI launcher (mpiexec -n 2 ddpm bench --allreduce)");
        }
        using var mpi = Mpi.Start(launcher);
        var rows = new List<string>();
        foreach (var preset in Presets.Names)
        {
            var model = new UNet(Presets.Channels(preset), CpuDevice.Instance, seed: 0);
            int length = (int)model.ParameterCount + 2;
            model.Parameters.Dispose(); // the gradient, the loss and the stop flag, as a step sends them
            var sum = new GradientSum(mpi, length);
            var random = new Random(mpi.Rank);
            var vector = Enumerable.Range(0, length).Select(_ => random.NextSingle() - 0.5f).ToArray();
            var times = new List<double>();
            for (int i = 0; i < repeats + 3; i++)
            {
                mpi.Max(0); // start together
                var clock = Stopwatch.StartNew();
                sum.Add(vector);
                sum.Finish(vector);
                if (i >= 3)
                {
                    times.Add(clock.Elapsed.TotalMilliseconds);
                }
            }
            times.Sort();
            rows.Add($"| {preset} | {length - 2:N0} | {(length * 4.0) / (1 << 20):F2} MiB | {times[times.Count / 2]:F2} ms | {times[0]:F2} ms |");
        }
        if (mpi.Rank == 0)
        {
            Console.WriteLine($"gradient sum over {mpi.Size} ranks ({mpi.Abi}, {mpi.Library}; {mpi.LocalSize} on this machine), {repeats} timed sums each:");
            Console.WriteLine("| preset | parameters | vector | median | fastest |");
            Console.WriteLine("|---|---|---|---|---|");
            rows.ForEach(Console.WriteLine);
        }
        return 0;
    }
}
