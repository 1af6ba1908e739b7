namespace Ddpm.Tensors;

/// <summary>Which engine a device runs ops on.</summary>
public enum DeviceKind
{
    /// <summary>The managed CPU backend: plain C# with SIMD and threads.</summary>
    Cpu,
    /// <summary>An NVIDIA GPU through ILGPU's CUDA accelerator.</summary>
    Cuda,
    /// <summary>An OpenCL device through ILGPU.</summary>
    OpenCL,
    /// <summary>ILGPU's CPU accelerator: a test vehicle for the kernels, far slower than <see cref="Cpu"/>.</summary>
    IlgpuCpu,
}

/// <summary>
/// Where tensors live and ops run. Owns a pool of buffers keyed by exact length, so a training
/// step that asks for the same shapes every step reuses memory instead of allocating it.
/// </summary>
public abstract class Device : IDisposable
{
    private readonly Dictionary<int, Stack<object>> _free = new();
    private readonly Dictionary<Type, object> _extensions = new();
    private readonly object _lock = new();
    private long _liveBytes, _pooledBytes, _peakLiveBytes, _systemBytes, _systemAllocations;
    private bool _disposed;

    /// <summary>The backend behind this device.</summary>
    public abstract DeviceKind Kind { get; }

    /// <summary>A human-readable name, e.g. "cpu (2 threads, AVX-512)" or "cuda: NVIDIA H100".</summary>
    public abstract string Name { get; }

    /// <summary>True for ILGPU accelerators (CUDA, OpenCL, ILGPU CPU).</summary>
    public bool IsIlgpu => Kind != DeviceKind.Cpu;

    /// <summary>Memory counters of the pool, in bytes of float32 storage.</summary>
    public PoolStats Stats
    {
        get
        {
            lock (_lock)
            {
                return new PoolStats(_liveBytes, _pooledBytes, _peakLiveBytes, _systemBytes, _systemAllocations);
            }
        }
    }

    /// <summary>Starts a new peak: <see cref="PoolStats.PeakLiveBytes"/> becomes the bytes live now, so a command
    /// (<c>ddpm bench</c>) reports its own peak on a device that earlier work in the process used (the shared CPU device).</summary>
    public void ResetPeak()
    {
        lock (_lock)
        {
            _peakLiveBytes = _liveBytes;
        }
    }

    /// <summary>Waits until every queued op on this device has finished.</summary>
    public virtual void Synchronize()
    {
    }

    /// <summary>
    /// Per-device singletons (compiled kernel sets): created once by <paramref name="create"/>,
    /// then returned from the cache, so kernels are loaded once per accelerator.
    /// </summary>
    public T GetExtension<T>(Func<Device, T> create) where T : class
    {
        lock (_lock)
        {
            if (_extensions.TryGetValue(typeof(T), out var found))
            {
                return (T)found;
            }
        }
        var made = create(this);
        lock (_lock)
        {
            if (_extensions.TryGetValue(typeof(T), out var raced))
            {
                return (T)raced;
            }
            _extensions[typeof(T)] = made;
            return made;
        }
    }

    /// <summary>Takes a buffer of exactly <paramref name="length"/> floats from the pool, or allocates one.</summary>
    internal object Rent(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long bytes = 4L * length;
        lock (_lock)
        {
            _liveBytes += bytes;
            _peakLiveBytes = Math.Max(_peakLiveBytes, _liveBytes);
            if (_free.TryGetValue(length, out var stack) && stack.Count > 0)
            {
                _pooledBytes -= bytes;
                return stack.Pop();
            }
            _systemBytes += bytes;
            _systemAllocations++;
        }
        try
        {
            return AllocateStorage(length);
        }
        catch
        {
            lock (_lock)
            {
                _liveBytes -= bytes;
                _systemBytes -= bytes;
                _systemAllocations--;
            }
            throw;
        }
    }

    /// <summary>Gives a buffer back to the pool for the next tensor of the same length.</summary>
    internal void Return(object storage, int length)
    {
        long bytes = 4L * length;
        lock (_lock)
        {
            _liveBytes -= bytes;
            if (_disposed)
            {
                FreeStorage(storage);
                return;
            }
            if (!_free.TryGetValue(length, out var stack))
            {
                _free[length] = stack = new Stack<object>();
            }
            stack.Push(storage);
            _pooledBytes += bytes;
        }
    }

    /// <summary>Frees every pooled (unused) buffer back to the system.</summary>
    public void Trim()
    {
        lock (_lock)
        {
            foreach (var (length, stack) in _free)
            {
                while (stack.Count > 0)
                {
                    FreeStorage(stack.Pop());
                    _systemBytes -= 4L * length;
                }
            }
            _pooledBytes = 0;
        }
    }

    /// <summary>Allocates storage of <paramref name="length"/> floats from the system.</summary>
    protected abstract object AllocateStorage(int length);

    /// <summary>Frees storage made by <see cref="AllocateStorage"/>.</summary>
    protected abstract void FreeStorage(object storage);

    /// <summary>Copies host floats into a tensor's storage from element <paramref name="offset"/> on.</summary>
    internal abstract void Upload(object storage, int offset, ReadOnlySpan<float> source);

    /// <summary>Queues a copy of host memory that the device can read without a synchronisation (see <see cref="AllocateHost"/>).</summary>
    internal abstract void UploadAsync(object storage, int offset, HostBuffer source);

    /// <summary>Copies a tensor's storage from element <paramref name="offset"/> on into host floats (synchronising first).</summary>
    internal abstract void Download(object storage, int offset, Span<float> destination);

    /// <summary>Sets <paramref name="length"/> elements of the storage to zero, from <paramref name="offset"/> on.</summary>
    internal abstract void Zero(object storage, int offset, int length);

    /// <summary>Copies <paramref name="length"/> elements between storages (or ranges of one) on this device.</summary>
    internal abstract void Copy(object source, int sourceOffset, object destination, int destinationOffset, int length);

    /// <summary>
    /// Host memory of <paramref name="length"/> floats that <see cref="Tensor.CopyFromAsync"/> uploads without waiting:
    /// page-locked on an ILGPU accelerator, a pinned array on the CPU backend.
    /// </summary>
    public abstract HostBuffer AllocateHost(int length);

    /// <summary>Frees the pool and whatever the backend holds (contexts, accelerators).</summary>
    public void Dispose()
    {
        if (_disposed || IsShared)
        {
            return;
        }
        Trim();
        _disposed = true;
        foreach (var ext in _extensions.Values)
        {
            (ext as IDisposable)?.Dispose();
        }
        DisposeBackend();
        GC.SuppressFinalize(this);
    }

    /// <summary>True for a process-wide device that outlives every user (Dispose does nothing).</summary>
    protected virtual bool IsShared => false;

    /// <summary>Releases backend resources after the pool has been emptied.</summary>
    protected virtual void DisposeBackend()
    {
    }

    /// <inheritdoc/>
    public override string ToString() => Name;
}

/// <summary>
/// Host memory a device copies from asynchronously (<see cref="Tensor.CopyFromAsync"/>): write it through
/// <see cref="Span"/>, queue the copy, and do not write it again until the device has synchronised.
/// </summary>
public sealed class HostBuffer : IDisposable
{
    private readonly float[] _array;
    private IDisposable? _owner;

    internal HostBuffer(Device device, float[] array, IDisposable? owner)
    {
        Device = device;
        _array = array;
        _owner = owner;
    }

    /// <summary>The device that copies from this memory.</summary>
    public Device Device { get; }

    /// <summary>Number of floats.</summary>
    public int Length => _array.Length;

    /// <summary>The memory, for the host to fill.</summary>
    public Span<float> Span => _array;

    /// <summary>The backend's handle (an ILGPU page-locked array), or null on the CPU backend.</summary>
    internal IDisposable? Owner => _owner;

    internal float[] Array => _array;

    /// <summary>Unlocks the memory.</summary>
    public void Dispose() => Interlocked.Exchange(ref _owner, null)?.Dispose();
}

/// <summary>Pool counters: bytes held by live tensors, bytes waiting in the pool, the live peak,
/// bytes obtained from the system in all and how many system allocations that took.</summary>
public readonly record struct PoolStats(long LiveBytes, long PooledBytes, long PeakLiveBytes, long SystemBytes, long SystemAllocations);
