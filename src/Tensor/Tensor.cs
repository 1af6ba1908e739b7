using ILGPU;

namespace Ddpm.Tensors;

/// <summary>
/// A contiguous float32 tensor (row-major; NCHW for images) living on one device. Its storage
/// comes from the device's pool and goes back there on <see cref="Dispose"/>. Host copies are
/// explicit: <see cref="FromHost"/>, <see cref="CopyFrom(ReadOnlySpan{float})"/>, <see cref="ToArray"/>.
/// A view (<see cref="Slice"/>) is a tensor over a contiguous range of another's storage, starting at
/// <see cref="Offset"/>: on an ILGPU device its <see cref="View"/> is a SubView, on the CPU backend
/// its <see cref="Span"/> starts at the offset. A view owns nothing; its parent frees the storage.
/// </summary>
public sealed class Tensor : IDisposable
{
    private object? _storage;
    private Tensor? _parent; // set for a view: the tensor that owns the storage

    private Tensor(Device device, int[] shape, object storage, int length, int offset = 0, Tensor? parent = null)
    {
        Device = device;
        Shape = shape;
        Length = length;
        _storage = storage;
        Offset = offset;
        _parent = parent;
    }

    /// <summary>Where this tensor starts in its storage: 0 for a tensor that owns it, the element offset for a view.</summary>
    public int Offset { get; private set; }

    /// <summary>True for a view of another tensor's storage (see <see cref="Slice"/>).</summary>
    public bool IsView => _parent is not null;

    /// <summary>
    /// A view of product(<paramref name="shape"/>) elements of this tensor's
    /// storage starting at element <paramref name="offset"/> (relative to this tensor): writes through
    /// it change this tensor. The view lives as long as this tensor's storage; disposing it frees nothing.
    /// </summary>
    public Tensor Slice(int offset, params ReadOnlySpan<int> shape)
    {
        int length = CheckedLength(shape);
        if (offset < 0 || (long)offset + length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"a {ShapeString(shape)} view at {offset} does not fit in a {ShapeText} tensor");
        }
        return new Tensor(Device, shape.ToArray(), Storage, length, Offset + offset, _parent ?? this);
    }

    /// <summary>
    /// Moves this tensor's values into <paramref name="parent"/> at element <paramref name="offset"/> and makes
    /// this tensor a view there: its own storage goes back to the pool, and every holder of this object now
    /// reads and writes the parent's storage. For gathering a model's parameters into one flat buffer
    /// after they were made one by one.
    /// </summary>
    public void MoveInto(Tensor parent, int offset)
    {
        if (IsView || parent.Device != Device)
        {
            throw new InvalidOperationException($"only a tensor that owns its storage can move into another on its device ({this}, into {parent})");
        }
        using (var target = parent.Slice(offset, Length))
        {
            target.CopyFrom(this);
        }
        var own = Interlocked.Exchange(ref _storage, parent.Storage) ?? throw new ObjectDisposedException(nameof(Tensor));
        Device.Return(own, Length);
        Offset = parent.Offset + offset;
        _parent = parent._parent ?? parent;
    }

    /// <summary>The device holding the data.</summary>
    public Device Device { get; }

    /// <summary>Dimensions, outermost first.</summary>
    public int[] Shape { get; private set; }

    /// <summary>Number of elements: the product of <see cref="Shape"/>.</summary>
    public int Length { get; private set; }

    /// <summary>Number of dimensions.</summary>
    public int Rank => Shape.Length;

    /// <summary>Size of dimension <paramref name="i"/> (negative counts from the end).</summary>
    public int Dim(int i) => Shape[i < 0 ? Shape.Length + i : i];

    /// <summary>The shape as text, e.g. "3x5x7x9".</summary>
    public string ShapeText => ShapeString(Shape);

    /// <summary>"3x5x7x9" for a shape.</summary>
    public static string ShapeString(ReadOnlySpan<int> shape) => shape.Length == 0 ? "scalar" : string.Join("x", shape.ToArray());

    /// <summary>A tensor of <paramref name="shape"/> with unspecified contents (pooled memory is not cleared).</summary>
    public static Tensor Empty(Device device, params ReadOnlySpan<int> shape)
    {
        int length = CheckedLength(shape);
        return new Tensor(device, shape.ToArray(), device.Rent(length), length);
    }

    /// <summary>
    /// Gives a disposed tensor new storage for <paramref name="shape"/>, reusing the object (and its shape array when the
    /// rank matches). For the autograd tape, which recycles the handles it made between steps; no one else may hold them.
    /// </summary>
    internal Tensor Reopen(ReadOnlySpan<int> shape)
    {
        if (_storage is not null || IsView)
        {
            throw new InvalidOperationException($"only a disposed tensor that owned its storage can be reopened; this {ShapeText} one is live or a view");
        }
        int length = CheckedLength(shape);
        if (Shape.Length == shape.Length)
        {
            shape.CopyTo(Shape);
        }
        else
        {
            Shape = shape.ToArray();
        }
        Length = length;
        _storage = Device.Rent(length);
        return this;
    }

    /// <summary>A tensor of zeros.</summary>
    public static Tensor Zeros(Device device, params ReadOnlySpan<int> shape)
    {
        var t = Empty(device, shape);
        t.Zero();
        return t;
    }

    /// <summary>A tensor holding a copy of <paramref name="data"/>.</summary>
    public static Tensor FromHost(Device device, ReadOnlySpan<float> data, params ReadOnlySpan<int> shape)
    {
        var t = Empty(device, shape);
        if (data.Length != t.Length)
        {
            t.Dispose();
            throw new ArgumentException($"{data.Length} values do not fill a {ShapeString(shape)} tensor ({t.Length})");
        }
        t.CopyFrom(data);
        return t;
    }

    /// <summary>A tensor of the same shape on the same device, contents unspecified.</summary>
    public Tensor EmptyLike() => Empty(Device, Shape);

    /// <summary>A tensor of zeros of the same shape on the same device.</summary>
    public Tensor ZerosLike() => Zeros(Device, Shape);

    /// <summary>Copies host values into this tensor.</summary>
    public void CopyFrom(ReadOnlySpan<float> data)
    {
        if (data.Length != Length)
        {
            throw new ArgumentException($"{data.Length} values for a {ShapeText} tensor");
        }
        Device.Upload(Storage, Offset, data);
    }

    /// <summary>
    /// Queues a copy of <paramref name="source"/> (exactly <see cref="Length"/> values) into this tensor without waiting:
    /// on an ILGPU device from page-locked memory on the device's stream, so the host must not write
    /// <paramref name="source"/> again until the device has synchronised; on the CPU backend a plain copy.
    /// </summary>
    public void CopyFromAsync(HostBuffer source)
    {
        if (source.Length != Length || source.Device != Device)
        {
            throw new ArgumentException($"a {source.Length}-value host buffer of {source.Device} for a {ShapeText} tensor on {Device}");
        }
        Device.UploadAsync(Storage, Offset, source);
    }

    /// <summary>Copies another tensor of the same length (on the same device) into this one.</summary>
    public void CopyFrom(Tensor source)
    {
        if (source.Length != Length || source.Device != Device)
        {
            throw new ArgumentException($"cannot copy {source.ShapeText} on {source.Device} into {ShapeText} on {Device}");
        }
        Device.Copy(source.Storage, source.Offset, Storage, Offset, Length);
    }

    /// <summary>Copies the values to a new host array (waits for queued work).</summary>
    public float[] ToArray()
    {
        var host = new float[Length];
        Device.Download(Storage, Offset, host);
        return host;
    }

    /// <summary>Copies the values into <paramref name="destination"/> (waits for queued work).</summary>
    public void CopyTo(Span<float> destination)
    {
        if (destination.Length != Length)
        {
            throw new ArgumentException($"{destination.Length} slots for a {ShapeText} tensor");
        }
        Device.Download(Storage, Offset, destination);
    }

    /// <summary>Sets every element to zero.</summary>
    public void Zero() => Device.Zero(Storage, Offset, Length);

    /// <summary>
    /// The first element of a CPU tensor (at <see cref="Offset"/> in its storage, so a view's element 0), for the CPU
    /// kernels, which take it once per call and index from it: the pool allocates CPU storage pinned, so the address
    /// holds while the tensor lives, and a loop pays no per-element offset or bounds check.
    /// </summary>
    public unsafe float* Pointer => (float*)System.Runtime.CompilerServices.Unsafe.AsPointer(
        ref System.Runtime.InteropServices.MemoryMarshal.GetArrayDataReference(StorageArray)) + Offset;

    /// <summary>The managed array a CPU tensor's values live in, from <see cref="Offset"/> on (shared by every view of it).</summary>
    public float[] StorageArray => Device.Kind == DeviceKind.Cpu
        ? (float[])Storage
        : throw new InvalidOperationException($"tensor lives on {Device}, not on the managed CPU backend");

    /// <summary>The elements of a CPU tensor as a span.</summary>
    public Span<float> Span => StorageArray.AsSpan(Offset, Length);

    /// <summary>The elements of an ILGPU tensor as a view for kernels (a SubView at <see cref="Offset"/> for a view).</summary>
    public ArrayView<float> View => Device.IsIlgpu
        ? IlgpuDevice.ViewOf(Storage).SubView(Offset, Length)
        : throw new InvalidOperationException($"tensor lives on {Device}, not on an ILGPU accelerator");

    internal object Storage => (_parent is { _storage: null } ? null : _storage) ?? throw new ObjectDisposedException(nameof(Tensor), $"{ShapeText} tensor used after Dispose");

    /// <summary>Returns the storage to the device pool (a view only lets go of it). Safe to call twice.</summary>
    public void Dispose()
    {
        var storage = Interlocked.Exchange(ref _storage, null);
        if (storage is not null && _parent is null)
        {
            Device.Return(storage, Length);
        }
    }

    /// <inheritdoc/>
    public override string ToString() => $"Tensor[{ShapeText}] on {Device.Name}";

    private static int CheckedLength(ReadOnlySpan<int> shape)
    {
        long length = 1;
        foreach (int d in shape)
        {
            if (d < 0)
            {
                throw new ArgumentException($"negative dimension in shape {ShapeString(shape)}");
            }
            length *= d;
            if (length > int.MaxValue)
            {
                throw new ArgumentException($"shape {ShapeString(shape)} has more than 2^31 elements");
            }
        }
        return (int)length;
    }
}
