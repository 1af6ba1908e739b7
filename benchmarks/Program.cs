using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace Ddpm.Benchmarks;

/// <summary>
/// Kernel benchmarks: naive against fast versions of each op, with a GFLOP/s column.
/// Run: dotnet run -c Release --project benchmarks -- --filter '*Conv*'
/// </summary>
public static class Program
{
    public static void Main(string[] args)
    {
        var config = DefaultConfig.Instance
            // Few iterations: a naive 3×3 convolution of the reference case takes seconds (the pilot stage then runs one
            // invocation an iteration); fast kernels of a few ms get as many invocations as fill an iteration.
            .AddJob(Job.ShortRun.WithWarmupCount(2).WithIterationCount(5).WithUnrollFactor(1))
            .AddColumn(new GflopsColumn())
            .WithOptions(ConfigOptions.DisableOptimizationsValidator);
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args, config);
    }
}

/// <summary>Marks a benchmark method with its floating-point operation count, for <see cref="GflopsColumn"/>.</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class FlopsAttribute(double flops) : Attribute
{
    public double Flops { get; } = flops;
}

/// <summary>GFLOP/s = [Flops] of the method / mean time of one invocation (for the memory-bound
/// benchmarks the attribute holds bytes moved, so the column reads GB/s).</summary>
public sealed class GflopsColumn : IColumn
{
    public string Id => nameof(GflopsColumn);

    public string ColumnName => "GFLOP/s (GB/s)";

    public bool AlwaysShow => true;

    public ColumnCategory Category => ColumnCategory.Custom;

    public int PriorityInCategory => 0;

    public bool IsNumeric => true;

    public UnitType UnitType => UnitType.Dimensionless;

    public string Legend => "billions of floating-point operations per second (method's [Flops] / mean time)";

    public string GetValue(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        var method = benchmarkCase.Descriptor.WorkloadMethod;
        // A [Flops] constant, or for counts known only at run time (lanes, cores) the class's static FlopsOf(method name).
        var flops = method.GetCustomAttributes(typeof(FlopsAttribute), false).OfType<FlopsAttribute>().FirstOrDefault()?.Flops
            ?? method.DeclaringType?.GetMethod("FlopsOf")?.Invoke(null, [method.Name]) as double?;
        var mean = summary[benchmarkCase]?.ResultStatistics?.Mean;
        return flops is null || mean is null or 0 ? "-" : $"{flops.Value / mean.Value:F1}";
    }

    public bool IsAvailable(Summary summary) => true;

    public bool IsDefault(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase) => false;
}
