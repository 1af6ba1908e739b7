using System.Numerics;

namespace Ddpm.Diffusion.Parallel;

/// <summary>
/// A step's gradient over MPI ranks, summed in one fixed order whatever the transport: the step's batch is M = ranks ·
/// local micro-batches, micro-batch j = rank·local + k, and the result is ((g₀ + g₁) + g₂ + … + g_{M-1}) · (1/M), a left
/// fold in j's order, elementwise. <c>--accumulate M</c> in one process folds the same vectors in the same order on its
/// device, so both give the same bits. MPI only moves the data (MPI_Alltoall, MPI_Allgather: no MPI_SUM, whose
/// association depends on the library and the rank count).
///
/// The vectors are cut into one chunk a rank (Chunk floats, the last zero-padded). The send buffer is [rank d][micro k]
/// [Chunk]: every local micro-batch's chunk d goes to rank d, which receives [rank s][micro k][Chunk], that is its chunk of
/// all M vectors in j's order; it folds them, and an all-gather gives every rank every folded chunk. Each rank sends and
/// receives (N-1)/N of its vectors twice: a ring all-reduce's traffic.
/// </summary>
public sealed class GradientSum
{
    private readonly Mpi _mpi;
    private readonly float[] _send, _receive, _folded, _gathered;

    /// <summary>Sums vectors of <paramref name="length"/> floats, <paramref name="local"/> of them from each rank.</summary>
    public GradientSum(Mpi mpi, int length, int local)
    {
        _mpi = mpi;
        Length = length;
        Local = local;
        Chunk = (length + mpi.Size - 1) / mpi.Size;
        _send = new float[mpi.Size * local * Chunk];
        _receive = new float[mpi.Size * local * Chunk];
        _folded = new float[Chunk];
        _gathered = new float[mpi.Size * Chunk];
    }

    /// <summary>The vectors' length.</summary>
    public int Length { get; }

    /// <summary>Vectors (micro-batches) each rank contributes.</summary>
    public int Local { get; }

    /// <summary>Floats a rank folds: its chunk of the vectors.</summary>
    public int Chunk { get; }

    /// <summary>Micro-batches in all: ranks · local.</summary>
    public int Count => _mpi.Size * Local;

    /// <summary>Puts local micro-batch <paramref name="k"/>'s vector, cut into the ranks' chunks.</summary>
    public void Put(int k, ReadOnlySpan<float> vector)
    {
        if (vector.Length != Length || (uint)k >= (uint)Local)
        {
            throw new ArgumentException($"micro-batch {k} of {Local}, {vector.Length} floats of {Length}");
        }
        for (int d = 0; d < _mpi.Size; d++)
        {
            int first = d * Chunk, count = Math.Clamp(Length - first, 0, Chunk);
            var block = _send.AsSpan((d * Local + k) * Chunk, Chunk);
            vector.Slice(Math.Min(first, Length), count).CopyTo(block);
            block[count..].Clear();
        }
    }

    /// <summary>Every rank's vectors folded in micro-batch order and scaled by 1/M, into <paramref name="result"/> on every
    /// rank (the same bits on each).</summary>
    public void Sum(Span<float> result)
    {
        _mpi.AllToAll(_send, _receive, Local * Chunk);
        Fold(_receive, Count, _folded);
        _mpi.AllGather(_folded, _gathered);
        _gathered.AsSpan(0, Length).CopyTo(result);
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
            Add(folded, vectors.Slice(j * n, n));
        }
        if (count > 1)
        {
            float scale = 1f / count;
            int i = 0;
            var s = new Vector<float>(scale);
            for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
            {
                (new Vector<float>(folded[i..]) * s).CopyTo(folded[i..]);
            }
            for (; i < n; i++)
            {
                folded[i] *= scale;
            }
        }
    }

    private static void Add(Span<float> acc, ReadOnlySpan<float> v)
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
