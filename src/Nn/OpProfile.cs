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

    /// <summary>Total milliseconds and calls by op name ("conv2d", "conv2d.backward", ...).</summary>
    public IReadOnlyDictionary<string, (double Ms, long Calls)> Totals => _totals;

    /// <summary>Starts timing one op on <paramref name="device"/>; disposing the result stops it.</summary>
    public Timer Time(string op, Device device)
    {
        device.Synchronize();
        return new Timer(this, op, device, Stopwatch.GetTimestamp());
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
    }

    /// <summary>Stops the clock of one op on dispose.</summary>
    public readonly struct Timer(OpProfile owner, string op, Device device, long start) : IDisposable
    {
        /// <inheritdoc/>
        public void Dispose()
        {
            if (owner is null)
            {
                return;
            }
            device.Synchronize();
            owner.Add(op, Stopwatch.GetElapsedTime(start).TotalMilliseconds);
        }
    }
}
