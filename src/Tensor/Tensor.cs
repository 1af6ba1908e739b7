using ILGPU;

namespace Ddpm.Tensors;

/// <summary>
/// A contiguous float32 tensor (row-major; NCHW for images) living on one device. Its storage
/// comes from the device's pool and goes back there on <see cref="Dispose"/>. Host copies are
/// explicit: <see cref="FromHost"/>, <see cref="CopyFrom(ReadOnlySpan{float})"/>, <see cref="ToArray"/>.
/// </summary>
public sealed class Tensor : IDisposable
{
    private object? _storage;

    private Tensor(Device device, int[] shape, object storage, int length)
    {
        Device = device;
        Shape = shape;
        Length = length;
        _storage = storage;
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
        if (_storage is not null)
        {
            throw new InvalidOperationException($"only a disposed tensor can be reopened; this {ShapeText} one is live");
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
        Device.Upload(Storage, data);
    }

    /// <summary>Copies another tensor of the same length (on the same device) into this one.</summary>
    public void CopyFrom(Tensor source)
    {
        if (source.Length != Length || source.Device != Device)
        {
            throw new ArgumentException($"cannot copy {source.ShapeText} on {source.Device} into {ShapeText} on {Device}");
        }
        Device.Copy(source.Storage, Storage, Length);
    }

    /// <summary>Copies the values to a new host array (waits for queued work).</summary>
    public float[] ToArray()
    {
        var host = new float[Length];
        Device.Download(Storage, host);
        return host;
    }

    /// <summary>Copies the values into <paramref name="destination"/> (waits for queued work).</summary>
    public void CopyTo(Span<float> destination)
    {
        if (destination.Length != Length)
        {
            throw new ArgumentException($"{destination.Length} slots for a {ShapeText} tensor");
        }
        Device.Download(Storage, destination);
    }

    /// <summary>Sets every element to zero.</summary>
    public void Zero() => Device.Zero(Storage, Length);

    /// <summary>The managed array behind a CPU tensor (length may only be read up to <see cref="Length"/>).</summary>
    public float[] HostArray => Device.Kind == DeviceKind.Cpu
        ? (float[])Storage
        : throw new InvalidOperationException($"tensor lives on {Device}, not on the managed CPU backend");

    /// <summary>The elements of a CPU tensor as a span.</summary>
    public Span<float> Span => HostArray.AsSpan(0, Length);

    /// <summary>The elements of an ILGPU tensor as a view for kernels.</summary>
    public ArrayView<float> View => Device.IsIlgpu
        ? IlgpuDevice.ViewOf(Storage).SubView(0, Length)
        : throw new InvalidOperationException($"tensor lives on {Device}, not on an ILGPU accelerator");

    internal object Storage => _storage ?? throw new ObjectDisposedException(nameof(Tensor), $"{ShapeText} tensor used after Dispose");

    /// <summary>Returns the storage to the device pool. Safe to call twice.</summary>
    public void Dispose()
    {
        var storage = Interlocked.Exchange(ref _storage, null);
        if (storage is not null)
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
