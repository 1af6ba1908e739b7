using System.Diagnostics;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// Time per op kind, forward and backward, for finding where a step's time goes
/// (`ddpm bench --profile`). Timing synchronises the device around every op, so a profiled run is
/// slower than an unprofiled one on a GPU; on the CPU backend ops are synchronous anyway.
/// </summary>
public sealed class OpProfile
{
    private readonly Dictionary<string, (double Ms, long Calls)> _totals = [];
    private readonly Dictionary<string, (double Ms, long Calls, double Flops)> _details = [];

    /// <summary>When set, ops that can (the convolutions) also time each pass by shape into a second table, with
    /// GFLOP/s; those rows are inside the op's own row, not added to the total.</summary>
    public bool ByShape { get; init; }

    private readonly List<(string Pass, Ddpm.Kernels.ConvShape Shape)> _convPasses = [];

    /// <summary>Every convolution pass run while <see cref="ByShape"/> was on, in order: "fwd", "dx" or "dw" and its shape
    /// (what the GPU prediction of <c>ddpm check --sass</c> sums over).</summary>
    public IReadOnlyList<(string Pass, Ddpm.Kernels.ConvShape Shape)> ConvPasses => _convPasses;

    /// <summary>Notes one convolution pass (see <see cref="ConvPasses"/>).</summary>
    public void RecordConv(string pass, Ddpm.Kernels.ConvShape shape) => _convPasses.Add((pass, shape));

    /// <summary>Total milliseconds and calls by op name ("conv2d", "conv2d.backward", ...).</summary>
    public IReadOnlyDictionary<string, (double Ms, long Calls)> Totals => _totals;

    /// <summary>Starts timing one op on <paramref name="device"/>; disposing the result stops it.</summary>
    public Timer Time(string op, Device device)
    {
        device.Synchronize();
        return new Timer(this, op, device, Stopwatch.GetTimestamp());
    }

    /// <summary>Starts timing one pass of one shape (see <see cref="ByShape"/>); <paramref name="flops"/> per call.</summary>
    public Timer TimeDetail(string key, double flops, Device device)
    {
        device.Synchronize();
        return new Timer(this, key, device, Stopwatch.GetTimestamp(), flops);
    }

    private void Add(string op, double ms, double flops)
    {
        if (flops > 0)
        {
            var (dms, dcalls, dflops) = _details.GetValueOrDefault(op);
            _details[op] = (dms + ms, dcalls + 1, dflops + flops);
            return;
        }
        Add(op, ms);
    }

    private void Add(string op, double ms)
    {
        var (total, calls) = _totals.GetValueOrDefault(op);
        _totals[op] = (total + ms, calls + 1);
    }

    /// <summary>The table, largest first, with each op's share of the total.</summary>
    public IEnumerable<string> Report()
    {
        double all = _totals.Values.Sum(v => v.Ms);
        yield return $"{"op",-24} {"ms",10} {"calls",8} {"share",7}";
        foreach (var (op, (ms, calls)) in _totals.OrderByDescending(kv => kv.Value.Ms))
        {
            yield return $"{op,-24} {ms,10:F1} {calls,8} {100 * ms / all,6:F1}%";
        }
        yield return $"{"total",-24} {all,10:F1}";
        if (_details.Count == 0)
        {
            yield break;
        }
        yield return "";
        yield return $"{"by shape (inside the rows above)",-40} {"ms",10} {"calls",8} {"GFLOP/s",8}";
        foreach (var (key, (ms, calls, flops)) in _details.OrderByDescending(kv => kv.Value.Ms))
        {
            yield return $"{key,-40} {ms,10:F1} {calls,8} {flops / ms / 1e6,8:F1}";
        }
    }

    /// <summary>Stops the clock of one op on dispose.</summary>
    public readonly struct Timer(OpProfile owner, string op, Device device, long start, double flops = 0) : IDisposable
    {
        /// <inheritdoc/>
        public void Dispose()
        {
            if (owner is null)
            {
                return;
            }
            device.Synchronize();
            owner.Add(op, Stopwatch.GetElapsedTime(start).TotalMilliseconds, flops);
        }
    }
}
