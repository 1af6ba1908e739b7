using System.Runtime.InteropServices;
using System.Text;

namespace Ddpm.Diffusion.Parallel;

/// <summary>
/// The few MPI calls data-parallel training needs, by plain P/Invoke into the C library the launcher belongs to: MPICH's
/// ABI (libmpich.so.12; handles are ints: MPI_COMM_WORLD 0x44000000, MPI_FLOAT 0x4c00040a, ...) or Open MPI's
/// (libmpi.so.40; handles are the addresses of exported objects: ompi_mpi_comm_world, ompi_mpi_float, ...). Every
/// handle travels as a pointer-sized integer: an MPICH int in a 64-bit argument slot reads the same (little-endian
/// registers and stack slots on x86-64 and ARM64). Only data movement and MPI_MAX are used: the gradient sum is this
/// program's own (<see cref="GradientSum"/>), so its order never depends on the library.
/// </summary>
public sealed unsafe class Mpi : IDisposable
{
    /// <summary>The environment variable naming the MPI library to load in place of the launcher's.</summary>
    public const string LibraryVariable = "DDPM_MPI_LIBRARY";

    private readonly nint _lib;
    private readonly nint _world, _float, _byte, _int, _max, _errorsReturn, _infoNull;
    private readonly int _typeShared;
    private nint _local;
    private bool _finalized;

    private readonly delegate* unmanaged<int*, int> _initialized;
    private readonly delegate* unmanaged<int*, nint*, int> _init;
    private readonly delegate* unmanaged<int> _finalize;
    private readonly delegate* unmanaged<nint, int, int> _abort;
    private readonly delegate* unmanaged<nint, int*, int> _commRank, _commSize;
    private readonly delegate* unmanaged<nint, int, int, nint, nint*, int> _commSplitType;
    private readonly delegate* unmanaged<nint*, int> _commFree;
    private readonly delegate* unmanaged<nint, nint, int> _setErrhandler;
    private readonly delegate* unmanaged<void*, int, nint, void*, int, nint, nint, int> _alltoall, _allgather;
    private readonly delegate* unmanaged<void*, void*, int, nint, nint, nint, int> _allreduce;
    private readonly delegate* unmanaged<void*, int, nint, int, nint, int> _bcast;
    private readonly delegate* unmanaged<int, byte*, int*, int> _errorString;

    private Mpi(nint lib, string name)
    {
        _lib = lib;
        Library = name;
        nint Export(string symbol) =>
            NativeLibrary.TryGetExport(lib, symbol, out var p) ? p : throw new MpiException($"{name} has no {symbol}: not an MPI library");
        _initialized = (delegate* unmanaged<int*, int>)Export("MPI_Initialized");
        _init = (delegate* unmanaged<int*, nint*, int>)Export("MPI_Init");
        _finalize = (delegate* unmanaged<int>)Export("MPI_Finalize");
        _abort = (delegate* unmanaged<nint, int, int>)Export("MPI_Abort");
        _commRank = (delegate* unmanaged<nint, int*, int>)Export("MPI_Comm_rank");
        _commSize = (delegate* unmanaged<nint, int*, int>)Export("MPI_Comm_size");
        _commSplitType = (delegate* unmanaged<nint, int, int, nint, nint*, int>)Export("MPI_Comm_split_type");
        _commFree = (delegate* unmanaged<nint*, int>)Export("MPI_Comm_free");
        _setErrhandler = (delegate* unmanaged<nint, nint, int>)Export("MPI_Comm_set_errhandler");
        _alltoall = (delegate* unmanaged<void*, int, nint, void*, int, nint, nint, int>)Export("MPI_Alltoall");
        _allgather = (delegate* unmanaged<void*, int, nint, void*, int, nint, nint, int>)Export("MPI_Allgather");
        _allreduce = (delegate* unmanaged<void*, void*, int, nint, nint, nint, int>)Export("MPI_Allreduce");
        _bcast = (delegate* unmanaged<void*, int, nint, int, nint, int>)Export("MPI_Bcast");
        _errorString = (delegate* unmanaged<int, byte*, int*, int>)Export("MPI_Error_string");
        if (NativeLibrary.TryGetExport(lib, "ompi_mpi_comm_world", out var world))
        {
            Abi = "Open MPI";
            _world = world;
            _float = Export("ompi_mpi_float");
            _byte = Export("ompi_mpi_byte");
            _int = Export("ompi_mpi_int");
            _max = Export("ompi_mpi_op_max");
            _errorsReturn = Export("ompi_mpi_errors_return");
            _infoNull = Export("ompi_mpi_info_null");
            _typeShared = 0; // OMPI_COMM_TYPE_SHARED, the enum's first
        }
        else
        {
            // mpi.h of MPICH 3/4 (and its ABI-compatible kin: Intel MPI, MVAPICH, Cray MPICH).
            Abi = "MPICH";
            _world = 0x44000000;
            _float = 0x4c00040a;
            _byte = 0x4c00010d;
            _int = 0x4c000405;
            _max = 0x58000001;
            _errorsReturn = 0x54000001;
            _infoNull = 0x1c000000;
            _typeShared = 1;
        }
    }

    /// <summary>The file the calls go to.</summary>
    public string Library { get; }

    /// <summary>"MPICH" or "Open MPI": whose handles the library takes.</summary>
    public string Abi { get; }

    /// <summary>This process's rank in MPI_COMM_WORLD.</summary>
    public int Rank { get; private set; }

    /// <summary>The number of ranks.</summary>
    public int Size { get; private set; }

    /// <summary>This process's rank among those on its machine (its GPU, its share of the cores).</summary>
    public int LocalRank { get; private set; }

    /// <summary>The number of ranks on this machine.</summary>
    public int LocalSize { get; private set; }

    /// <summary>The launcher this process runs under, read from the environment ("Open MPI", "MPICH (Hydra)" ...), or null when
    /// none started it: then MPI is not loaded at all.</summary>
    public static string? Launcher() => Launcher(Environment.GetEnvironmentVariable);

    internal static string? Launcher(Func<string, string?> env) =>
        env("OMPI_COMM_WORLD_SIZE") is not null ? "Open MPI"
        : env("PMIX_RANK") is not null ? "PMIx"
        : env("PMI_SIZE") is not null || env("PMI_RANK") is not null || env("MPI_LOCALNRANKS") is not null ? "MPICH (Hydra)"
        : null;

    /// <summary>The libraries tried for a launcher, in order: <see cref="LibraryVariable"/> alone when it is set.</summary>
    internal static string[] Candidates(string launcher, string? overridden) =>
        overridden is { Length: > 0 } ? [overridden]
        : launcher is "Open MPI" or "PMIx" ? ["libmpi.so.40", "libmpi.so"]
        : ["libmpich.so.12", "libmpi.so.12", "libmpich.so", "libmpi.so"];

    /// <summary>Loads the launcher's MPI library and initialises it; a launcher with no library to go with it is an error
    /// naming what was tried.</summary>
    public static Mpi Start(string launcher)
    {
        string? overridden = Environment.GetEnvironmentVariable(LibraryVariable);
        var tried = Candidates(launcher, overridden);
        foreach (var name in tried)
        {
            if (NativeLibrary.TryLoad(name, out var lib))
            {
                var mpi = new Mpi(lib, name);
                mpi.Initialise();
                return mpi;
            }
        }
        throw new MpiException(overridden is { Length: > 0 }
            ? $"started by {launcher}, but {LibraryVariable}={overridden} does not load"
            : $"started by {launcher}, but no MPI library loads (tried {string.Join(", ", tried)}): install the launcher's library (apt-get install mpich or libopenmpi3) or name it in {LibraryVariable}");
    }

    private void Initialise()
    {
        int flag = 0;
        Check(_initialized(&flag), "MPI_Initialized");
        if (flag == 0)
        {
            Check(_init(null, null), "MPI_Init");
        }
        // Errors come back as codes, so a lost rank becomes one line naming the call, not the library's abort.
        Check(_setErrhandler(_world, _errorsReturn), "MPI_Comm_set_errhandler");
        int rank, size;
        Check(_commRank(_world, &rank), "MPI_Comm_rank");
        Check(_commSize(_world, &size), "MPI_Comm_size");
        Rank = rank;
        Size = size;
        nint local = 0;
        Check(_commSplitType(_world, _typeShared, 0, _infoNull, &local), "MPI_Comm_split_type");
        _local = local;
        Check(_commRank(local, &rank), "MPI_Comm_rank");
        Check(_commSize(local, &size), "MPI_Comm_size");
        LocalRank = rank;
        LocalSize = size;
    }

    /// <summary>recv[r·count .. (r+1)·count) = rank r's send[me·count ..]: every rank's block for every rank (MPI_Alltoall).</summary>
    public void AllToAll(ReadOnlySpan<float> send, Span<float> receive, int count)
    {
        Require(send.Length >= count * Size && receive.Length >= count * Size, "MPI_Alltoall");
        fixed (float* s = send, r = receive)
        {
            Check(_alltoall(s, count, _float, r, count, _float, _world), "MPI_Alltoall");
        }
    }

    /// <summary>receive[r·send.Length ..] = rank r's <paramref name="send"/> (MPI_Allgather).</summary>
    public void AllGather(ReadOnlySpan<float> send, Span<float> receive)
    {
        Require(receive.Length >= send.Length * Size, "MPI_Allgather");
        fixed (float* s = send, r = receive)
        {
            Check(_allgather(s, send.Length, _float, r, send.Length, _float, _world), "MPI_Allgather");
        }
    }

    /// <summary>receive[r·send.Length ..] = rank r's bytes (MPI_Allgather of MPI_BYTE).</summary>
    public void AllGather(ReadOnlySpan<byte> send, Span<byte> receive)
    {
        Require(receive.Length >= send.Length * Size, "MPI_Allgather");
        fixed (byte* s = send, r = receive)
        {
            Check(_allgather(s, send.Length, _byte, r, send.Length, _byte, _world), "MPI_Allgather");
        }
    }

    /// <summary>The largest of every rank's <paramref name="value"/> (MPI_Allreduce with MPI_MAX: exact in any order).</summary>
    public int Max(int value)
    {
        int result = 0;
        Check(_allreduce(&value, &result, 1, _int, _max, _world), "MPI_Allreduce");
        return result;
    }

    /// <summary>Rank 0's bytes on every rank (MPI_Bcast, in pieces below 2³¹).</summary>
    public void Broadcast(Span<byte> data)
    {
        const int Piece = 1 << 30;
        fixed (byte* p = data)
        {
            for (long at = 0; at < data.Length; at += Piece)
            {
                Check(_bcast(p + at, (int)Math.Min(Piece, data.Length - at), _byte, 0, _world), "MPI_Bcast");
            }
        }
    }

    /// <summary>Ends every rank of the job at once with <paramref name="code"/> (MPI_Abort): for a rank that cannot go on
    /// while the others wait in a collective.</summary>
    public void Abort(int code) => _abort(_world, code);

    /// <summary>MPI_Finalize, once.</summary>
    public void Dispose()
    {
        if (_finalized)
        {
            return;
        }
        _finalized = true;
        if (_local != 0)
        {
            nint local = _local;
            _commFree(&local);
            _local = 0;
        }
        _finalize();
    }

    private static void Require(bool ok, string call)
    {
        if (!ok)
        {
            throw new ArgumentException($"{call}: buffer too small");
        }
    }

    private void Check(int code, string call)
    {
        if (code != 0)
        {
            throw new MpiException($"{call} failed: {ErrorText(code)}");
        }
    }

    private string ErrorText(int code)
    {
        var text = stackalloc byte[1024]; // MPI_MAX_ERROR_STRING is 512 (MPICH) or 256 (Open MPI)
        int length = 0;
        return _errorString(code, text, &length) == 0 && length > 0
            ? Encoding.UTF8.GetString(text, Math.Min(length, 1024)).Trim()
            : $"error {code}";
    }
}

/// <summary>An MPI library that does not load, or a call that failed (a rank lost mid-collective, say).</summary>
public sealed class MpiException(string message) : IOException(message);
