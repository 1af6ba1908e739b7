namespace Ddpm.Tensors;

/// <summary>The managed CPU backend: tensors are pooled float arrays, ops are C# with SIMD and threads.</summary>
public sealed class CpuDevice : Device
{
    /// <summary>The process-wide managed CPU device.</summary>
    public static CpuDevice Instance { get; } = new(shared: true, CpuSimd.Max);

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<SimdLevel, CpuDevice> s_atLevel = new();

    private readonly bool _shared;

    private CpuDevice(bool shared, SimdLevel simd)
    {
        _shared = shared;
        Simd = simd;
    }

    /// <summary>A managed CPU device with its own pool (most code shares <see cref="Instance"/>), its kernels at
    /// <paramref name="simd"/> (default: the widest this processor has).</summary>
    public CpuDevice(SimdLevel? simd = null) : this(false, Checked(simd ?? CpuSimd.Max))
    {
    }

    /// <summary>The shared device whose kernels run at <paramref name="simd"/> (one a level, never disposed, as
    /// <see cref="Instance"/>): what <c>--simd</c> and DDPM_SIMD open.</summary>
    public static CpuDevice At(SimdLevel simd) => simd == CpuSimd.Max ? Instance : s_atLevel.GetOrAdd(Checked(simd), l => new CpuDevice(shared: true, l));

    /// <summary>The instruction level this device's kernels use (a setting of the device: every op on its tensors runs
    /// at it), at most what the processor offers.</summary>
    public SimdLevel Simd { get; }

    private static SimdLevel Checked(SimdLevel simd) =>
        CpuSimd.Supports(simd) ? simd : throw new NotSupportedException($"this processor offers up to {CpuSimd.Name(CpuSimd.Max)}, not {CpuSimd.Name(simd)}");

    /// <inheritdoc/>
    protected override bool IsShared => _shared;

    /// <summary>Stops the CPU kernels' helper threads and frees their scratch. Set by the kernels layer when it starts its
    /// threads (this layer cannot reference that one); null while none run.</summary>
    internal static Action? StopRuntime;

    /// <summary>Stops the helper threads the CPU kernels run on. They are process-wide, shared by every CPU device:
    /// disposing one device stops them, and the next parallel kernel call (on any device) starts them again.
    /// <see cref="Instance"/> is never disposed (its Dispose does nothing); its threads are background threads and end
    /// with the process.</summary>
    protected override void DisposeBackend() => StopRuntime?.Invoke();

    /// <inheritdoc/>
    public override DeviceKind Kind => DeviceKind.Cpu;

    /// <inheritdoc/>
    public override string Name => $"cpu ({CpuThreads.Count} thread{(CpuThreads.Count == 1 ? "" : "s")}, {SimdName})";

    /// <summary>The instruction level this device's kernels use (<see cref="Simd"/>), not merely what the processor offers.</summary>
    public string SimdName => CpuSimd.Name(Simd);

    /// <inheritdoc/>
    protected override object AllocateStorage(int length) => GC.AllocateUninitializedArray<float>(length, pinned: true);

    /// <inheritdoc/>
    protected override void FreeStorage(object storage)
    {
    }

    internal override void Upload(object storage, int offset, ReadOnlySpan<float> source) => source.CopyTo(((float[])storage).AsSpan(offset));

    internal override void UploadAsync(object storage, int offset, HostBuffer source) => Upload(storage, offset, source.Span);

    internal override void Download(object storage, int offset, Span<float> destination) =>
        ((float[])storage).AsSpan(offset, destination.Length).CopyTo(destination);

    internal override void Zero(object storage, int offset, int length) => Array.Clear((float[])storage, offset, length);

    internal override void Copy(object source, int sourceOffset, object destination, int destinationOffset, int length) =>
        Array.Copy((float[])source, sourceOffset, (float[])destination, destinationOffset, length);

    /// <inheritdoc/>
    public override HostBuffer AllocateHost(int length) => new(this, GC.AllocateArray<float>(length, pinned: true), null);
}
