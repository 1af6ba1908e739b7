using System.Buffers.Binary;
using System.Text;
using Ddpm.Diffusion.Parallel;

namespace Ddpm.Cli;

/// <summary>
/// The ranks of a training run as the command sees them: one process (no MPI), or the ranks an MPI launcher started. Rank 0
/// is the writer (the run folder, its lock, the checkpoint, metrics, plots, samples and every line on the terminal); the
/// others train their share and stay quiet. A step of the start-up that can fail on one rank (its data folder, its
/// device) runs inside <see cref="Agree"/>, so every rank learns of a failure and stops with the same line.
/// </summary>
internal sealed class Ranks(Mpi? mpi)
{
    // The bytes a rank's record takes in an agreement or a comparison.
    private const int RecordBytes = 2048;

    /// <summary>One process: no MPI.</summary>
    public static Ranks Single { get; } = new(null);

    /// <summary>The MPI library, or null in one process.</summary>
    public Mpi? Mpi => mpi;

    /// <summary>This process's rank (0 in one process).</summary>
    public int Rank => mpi?.Rank ?? 0;

    /// <summary>The ranks in all (1 in one process).</summary>
    public int Size => mpi?.Size ?? 1;

    /// <summary>Rank 0: the one that writes.</summary>
    public bool Writer => Rank == 0;

    /// <summary>Runs <paramref name="phase"/> on every rank; when it failed on any, every rank throws: the failing rank its own
    /// exception, the others a <see cref="RankFailedException"/> with the lowest failing rank's line and exit code.</summary>
    public void Agree(Action phase)
    {
        Exception? failure = null;
        try
        {
            phase();
        }
        catch (Exception e) when (mpi is not null)
        {
            failure = e;
        }
        if (mpi is null)
        {
            return;
        }
        // Each rank's record: "" when its phase went well, else "CODE MESSAGE".
        var records = Gather(mpi, failure is null ? "" : $"{Program.ExitCodeOf(failure)} {Said(failure)}", RecordBytes);
        for (int r = 0; r < mpi.Size; r++)
        {
            if (records[r].Length == 0)
            {
                continue;
            }
            var parts = records[r].Split(' ', 2);
            int code = int.Parse(parts[0], System.Globalization.CultureInfo.InvariantCulture);
            if (r == mpi.Rank && failure is not null)
            {
                // Said by rank 0 when it is rank 0's, else by rank 0 naming this rank: this rank's stderr is quiet.
                throw new RankFailedException(Said(failure), code, failure);
            }
            throw new RankFailedException($"rank {r} of {mpi.Size}: {parts[1]}", code);
        }
    }

    /// <summary>Every rank's host and process id, "0 host:pid, 1 host:pid, ...": the line that maps a launcher's report of a
    /// process ("PID 1171 ... Killed") to its rank.</summary>
    public string Processes()
    {
        string mine = $"{Environment.MachineName}:{Environment.ProcessId}";
        if (mpi is null)
        {
            return $"0 {mine}";
        }
        var all = Gather(mpi, mine, 256);
        return string.Join(", ", all.Select((text, r) => $"{r} {text}"));
    }

    // Every rank's text in rank order, by one MPI_Allgather of records of `bytes` bytes each: a length, then the text's UTF-8
    // (cut to fit).
    private static string[] Gather(Mpi mpi, string text, int bytes)
    {
        var mine = new byte[bytes];
        var utf8 = Encoding.UTF8.GetBytes(text);
        int length = Math.Min(utf8.Length, bytes - 4);
        BinaryPrimitives.WriteInt32LittleEndian(mine, length);
        utf8.AsSpan(0, length).CopyTo(mine.AsSpan(4));
        var all = new byte[bytes * mpi.Size];
        mpi.AllGather(mine, all);
        return [.. Enumerable.Range(0, mpi.Size).Select(r => Encoding.UTF8.GetString(all, r * bytes + 4, BinaryPrimitives.ReadInt32LittleEndian(all.AsSpan(r * bytes))))];
    }

    // An error as Program.Report says it: the message, or for a bug its type too.
    private static string Said(Exception e) => Program.ExitCodeOf(e) == ExitCodes.Internal
        ? $"internal error: {e.GetType().Name}: {Program.OneLine(e.Message)}" : Program.OneLine(e.Message);

    /// <summary>Rank 0's <paramref name="data"/> on every rank (the others pass null).</summary>
    public byte[] Broadcast(byte[]? data)
    {
        if (mpi is null)
        {
            return data ?? [];
        }
        var length = new byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(length, data?.LongLength ?? 0);
        mpi.Broadcast(length);
        var result = Writer ? data! : new byte[BinaryPrimitives.ReadInt64LittleEndian(length)];
        mpi.Broadcast(result);
        return result;
    }

    /// <summary>
    /// Refuses to train unless every rank holds what rank 0 holds: each (name, value) pair (the settings, a hash of the
    /// weights and optimiser state, the data's hash, the build, the backend and its instruction set) compared across ranks;
    /// the first that differs is one line naming the rank, the item and both values.
    /// </summary>
    public void RequireSame(IReadOnlyList<(string Name, string Value)> identity)
    {
        if (mpi is null || mpi.Size == 1)
        {
            return;
        }
        var ranks = Gather(mpi, string.Join("\n", identity.Select(i => $"{i.Name}={i.Value}")), RecordBytes)
            .Select(text => text.Split('\n').Select(line => line.Split('=', 2)).ToDictionary(kv => kv[0], kv => kv.Length > 1 ? kv[1] : "")).ToList();
        for (int r = 1; r < ranks.Count; r++)
        {
            foreach (var (name, value) in ranks[0])
            {
                string other = ranks[r].GetValueOrDefault(name, "(none)");
                if (other != value)
                {
                    throw new RankFailedException(
                        $"rank {r} of {mpi.Size} differs from rank 0 in its {name}: {other} (rank 0: {value}); every rank needs the same build, settings, data and instruction set",
                        ExitCodes.Failure);
                }
            }
        }
    }
}

/// <summary>A failure every rank agreed on (one rank's, said by rank 0), with the exit code each rank leaves with.</summary>
public sealed class RankFailedException(string message, int exitCode, Exception? original = null) : Exception(message, original)
{
    /// <summary>The exit code of the rank that failed.</summary>
    public int ExitCode { get; } = exitCode;
}
