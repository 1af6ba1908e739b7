using System.Numerics;

namespace Ddpm.Diffusion.Parallel;

/// <summary>
/// A step's gradient over MPI ranks, summed in one fixed order whatever the transport: the step's batch is M = local
/// micro-batches · ranks, micro-batch j = k·ranks + rank (the k-th round of micro-batches, one a rank), and the result is
/// ((g₀ + g₁) + g₂ + … + g_{M-1}) · (1/M), a left fold in j's order, elementwise. <c>--accumulate M</c> in one process
/// folds the same vectors in the same order on its device, so both give the same bits. MPI only moves the data
/// (MPI_Alltoall, MPI_Allgather: no MPI_SUM, whose association depends on the library and the rank count).
///
/// The vectors are cut into one chunk a rank (Chunk floats, the last zero-padded). Each round (<see cref="Add"/>) every
/// rank sends its vector's chunk d to rank d, which receives its chunk of the round's vectors in rank order and folds them
/// into its running sum, j's order; <see cref="Finish"/> scales and all-gathers the folded chunks. So a rank holds one
/// vector whatever the micro-batch count, and sends and receives (N-1)/N of a vector a round and once more at the end.
/// </summary>
public sealed class GradientSum
{
    private readonly Mpi _mpi;
    private readonly float[] _send, _receive, _folded, _gathered;
    private int _rounds;

    /// <summary>Sums vectors of <paramref name="length"/> floats, one a rank a round.</summary>
    public GradientSum(Mpi mpi, int length)
    {
        _mpi = mpi;
        Length = length;
        Chunk = (int)(((long)length + mpi.Size - 1) / mpi.Size);
        _send = new float[(long)mpi.Size * Chunk];
        _receive = new float[(long)mpi.Size * Chunk];
        _folded = new float[Chunk];
        _gathered = new float[(long)mpi.Size * Chunk];
    }

    /// <summary>The vectors' length.</summary>
    public int Length { get; }

    /// <summary>Floats a rank folds: its chunk of the vectors.</summary>
    public int Chunk { get; }

    /// <summary>Adds this rank's vector of the next round (every rank calls it together): its chunks go to their ranks, and
    /// the round's chunks of this rank's part are folded into the running sum in rank order.</summary>
    public void Add(ReadOnlySpan<float> vector)
    {
        if (vector.Length != Length)
        {
            throw new ArgumentException($"{vector.Length} floats of {Length}");
        }
        for (int d = 0; d < _mpi.Size; d++)
        {
            int first = (int)Math.Min((long)d * Chunk, Length), count = Math.Min(Length - first, Chunk);
            var block = _send.AsSpan(d * Chunk, Chunk);
            vector.Slice(first, count).CopyTo(block);
            block[count..].Clear();
        }
        _mpi.AllToAll(_send, _receive, Chunk);
        for (int r = 0; r < _mpi.Size; r++)
        {
            var chunk = _receive.AsSpan(r * Chunk, Chunk);
            if (_rounds == 0 && r == 0)
            {
                chunk.CopyTo(_folded);
            }
            else
            {
                Accumulate(_folded, chunk);
            }
        }
        _rounds++;
    }

    /// <summary>The rounds' vectors folded in micro-batch order and scaled by 1/M, into <paramref name="result"/> on every rank
    /// (the same bits on each); the next <see cref="Add"/> starts a new sum.</summary>
    public void Finish(Span<float> result)
    {
        Scale(_folded, _rounds * _mpi.Size);
        _mpi.AllGather(_folded, _gathered);
        _gathered.AsSpan(0, Length).CopyTo(result);
        _rounds = 0;
    }

    /// <summary>folded = (v₀ + v₁ + … + v_{count-1}) · (1/count), left to right, for <paramref name="count"/> vectors laid
    /// end to end in <paramref name="vectors"/>: the arithmetic of Elementwise.Accumulate then Elementwise.Scale on a device
    /// (each sum and the product rounded once), so the host and a device agree bit for bit.</summary>
    internal static void Fold(ReadOnlySpan<float> vectors, int count, Span<float> folded)
    {
        int n = folded.Length;
        vectors[..n].CopyTo(folded);
        for (int j = 1; j < count; j++)
        {
            Accumulate(folded, vectors.Slice(j * n, n));
        }
        Scale(folded, count);
    }

    // v *= 1/count when count > 1 (one rounding, as Elementwise.Scale).
    private static void Scale(Span<float> v, int count)
    {
        if (count <= 1)
        {
            return;
        }
        float scale = 1f / count;
        var s = new Vector<float>(scale);
        int i = 0;
        for (; i <= v.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            (new Vector<float>(v[i..]) * s).CopyTo(v[i..]);
        }
        for (; i < v.Length; i++)
        {
            v[i] *= scale;
        }
    }

    // acc += v (one rounding each, as Elementwise.Accumulate).
    private static void Accumulate(Span<float> acc, ReadOnlySpan<float> v)
    {
        int i = 0;
        for (; i <= acc.Length - Vector<float>.Count; i += Vector<float>.Count)
        {
            (new Vector<float>(acc[i..]) + new Vector<float>(v[i..])).CopyTo(acc[i..]);
        }
        for (; i < acc.Length; i++)
        {
            acc[i] += v[i];
        }
    }
}
