using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using Ddpm.Storage;

namespace Ddpm.Nn;

/// <summary>One tensor of a safetensors file: name, dtype ("F32" or "I64"), shape, and where its bytes lie in the data section.</summary>
public sealed record SafeTensorEntry(string Name, string DType, int[] Shape, long Begin, long End)
{
    /// <summary>Element count.</summary>
    public long Count => Shape.Aggregate(1L, (a, b) => a * b);
}

/// <summary>A safetensors file that failed validation; the message names the file and the problem.</summary>
public sealed class CheckpointException(string message) : Exception(message);

/// <summary>
/// safetensors (huggingface/safetensors): an 8-byte little-endian header length, a JSON header
/// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {string: string}}, then the
/// raw little-endian data. Writing is atomic (temporary file, flushed to disk, renamed over the
/// old one). Reading trusts nothing: header length against the file size, JSON shape, dtypes,
/// shapes, offsets inside the data, no overlaps, sizes matching dtype × shape, all before a
/// single tensor is read, so a truncated or hostile file gets a clear error, never a huge
/// allocation or an unhandled exception.
/// </summary>
public static class SafeTensors
{
    /// <summary>
    /// Largest header accepted. The format allows 100 MB, but a base checkpoint's header is about
    /// 40 KB, and parsing JSON costs up to about six times its size in memory: 8 MiB keeps every
    /// read within twice the file's size plus 64 MiB.
    /// </summary>
    public const long MaxHeaderBytes = 8L << 20;

    /// <summary>Metadata key of the file's integrity hash (see <see cref="Checksum"/>).</summary>
    public const string ChecksumKey = "checksum";

    /// <summary>Largest file read: a base model with Adam moments and EMA is about 71 MB.</summary>
    public const long MaxFileBytes = 1L << 30;

    /// <summary>Writes float32 tensors and string metadata to <paramref name="path"/> atomically.</summary>
    public static void Write(string path, IEnumerable<(string Name, int[] Shape, float[] Data)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        var header = new Dictionary<string, object>();
        var index = new List<SafeTensorEntry>();
        long offset = 0;
        foreach (var (name, shape, data) in list)
        {
            long count = shape.Aggregate(1L, (a, b) => a * b);
            if (count != data.Length)
            {
                throw new ArgumentException($"safetensors: {name} has {data.Length} values for shape {string.Join("x", shape)}");
            }
            if (header.ContainsKey(name))
            {
                throw new ArgumentException($"safetensors: duplicate tensor name {name}");
            }
            header[name] = new { dtype = "F32", shape, data_offsets = new[] { offset, offset + 4L * data.Length } };
            index.Add(new SafeTensorEntry(name, "F32", shape, offset, offset + 4L * data.Length));
            offset += 4L * data.Length;
        }
        var meta = new Dictionary<string, string>(metadata ?? new Dictionary<string, string>());
        meta.Remove(ChecksumKey);
        meta[ChecksumKey] = Checksum(meta, index, hash =>
        {
            foreach (var (_, _, data) in list)
            {
                hash(System.Runtime.InteropServices.MemoryMarshal.AsBytes(data.AsSpan()));
            }
        });
        header["__metadata__"] = meta;
        var json = JsonSerializer.SerializeToUtf8Bytes(header);
        // Pad the header with spaces so the data section starts 8-byte aligned (as the reference writer does).
        int padded = (json.Length + 7) / 8 * 8;
        Durable.WriteAtomically(path, stream =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)padded);
            stream.Write(len);
            stream.Write(json);
            for (int i = json.Length; i < padded; i++)
            {
                stream.WriteByte((byte)' ');
            }
            SaveDelay.Begin(path);
            foreach (var (_, _, data) in list)
            {
                WriteFloats(stream, data);
            }
            SaveDelay.Pause();
        }, 1 << 20);
        SaveDelay.End();
    }

    /// <summary>
    /// The file's integrity hash, "sha256:HEX" over the metadata (sorted key=value lines, the
    /// checksum itself left out), the tensor index (name, dtype, shape, offsets, sorted by name)
    /// and the raw data section. Written by this engine into every file; a file that carries one
    /// and does not match it was damaged or edited, so a flipped byte in a step count or a weight
    /// cannot pass as valid. Files without one (the PyTorch peer's) are checked structurally only.
    /// </summary>
    public static string Checksum(IReadOnlyDictionary<string, string> metadata, IEnumerable<SafeTensorEntry> index, Action<Action<ReadOnlySpan<byte>>> data)
    {
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        var text = new StringBuilder();
        foreach (var (k, v) in metadata.Where(m => m.Key != ChecksumKey).OrderBy(m => m.Key, StringComparer.Ordinal))
        {
            text.Append(k).Append('=').Append(v).Append('\n');
        }
        foreach (var e in index.OrderBy(e => e.Name, StringComparer.Ordinal))
        {
            text.Append(e.Name).Append('|').Append(e.DType).Append('|').Append(string.Join(",", e.Shape)).Append('|').Append(e.Begin).Append('|').Append(e.End).Append('\n');
        }
        sha.AppendData(Encoding.UTF8.GetBytes(text.ToString()));
        if (!BitConverter.IsLittleEndian)
        {
            throw new PlatformNotSupportedException("safetensors: big-endian hosts are not supported");
        }
        data(bytes => sha.AppendData(bytes));
        return "sha256:" + Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    private static void WriteFloats(Stream stream, float[] data)
    {
        var bytes = new byte[Math.Min(data.Length, 1 << 18) * 4];
        for (int start = 0; start < data.Length; start += bytes.Length / 4)
        {
            int n = Math.Min(bytes.Length / 4, data.Length - start);
            for (int i = 0; i < n; i++)
            {
                BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(4 * i), data[start + i]);
            }
            stream.Write(bytes, 0, 4 * n);
        }
    }

    /// <summary>Opens and validates <paramref name="path"/>; tensors are read on demand.</summary>
    /// <remarks>
    /// Only a regular file's recorded size is ever read: a FIFO, /dev/zero or a device reports
    /// a length of 0 and is refused before it is opened (it would block, or never end), and the
    /// read stops at the recorded size whatever the file does meanwhile.
    /// </remarks>
    public static SafeTensorsFile Read(string path)
    {
        if (Directory.Exists(path))
        {
            throw new CheckpointException($"{path}: is a folder, not a checkpoint file");
        }
        if (!File.Exists(path))
        {
            throw new CheckpointException($"{path}: no such file");
        }
        long size = new FileInfo(path).Length;
        if (size < 8)
        {
            throw new CheckpointException($"{path}: not a valid safetensors file: {size} bytes, shorter than the 8-byte header length (or not a regular file)");
        }
        if (size > MaxFileBytes)
        {
            throw new CheckpointException($"{path}: {size >> 20} MiB is larger than any checkpoint of this engine ({MaxFileBytes >> 20} MiB at most)");
        }
        var bytes = new byte[size];
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
            int read = 0;
            while (read < bytes.Length)
            {
                int n = stream.Read(bytes, read, bytes.Length - read);
                if (n == 0)
                {
                    throw new CheckpointException($"{path}: ends at byte offset {read}, before its recorded size of {size} bytes");
                }
                read += n;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointException($"{path}: cannot read ({e.Message})");
        }
        return Parse(path, bytes);
    }

    /// <summary>Validates a safetensors image held in memory (<paramref name="label"/> names it in errors).</summary>
    public static SafeTensorsFile Parse(string label, byte[] bytes)
    {
        string Fail(string problem) => throw new CheckpointException($"{label}: not a valid safetensors file: {problem}");

        if (bytes.Length < 8)
        {
            Fail($"{bytes.Length} bytes, shorter than the 8-byte header length");
        }
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        if (headerLength < 2 || headerLength > MaxHeaderBytes || headerLength > (ulong)(bytes.Length - 8))
        {
            Fail($"header length {headerLength} does not fit a file of {bytes.Length} bytes");
        }
        long dataStart = 8 + (long)headerLength, dataLength = bytes.Length - dataStart;
        var headerBytes = bytes.AsMemory(8, (int)headerLength);
        int invalid = FirstInvalidUtf8(headerBytes.Span);
        if (invalid >= 0)
        {
            Fail($"header has invalid UTF-8 at byte offset {8 + invalid}");
        }
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(headerBytes, new JsonDocumentOptions { MaxDepth = 8 });
        }
        catch (JsonException e)
        {
            string where = e.LineNumber == 0 && e.BytePositionInLine is { } p ? $" at byte offset {8 + p}" : e.LineNumber is { } line ? $" at header line {line + 1}" : "";
            return Fail<SafeTensorsFile>(label, $"header is not JSON{where} ({e.Message.Split('|')[0].Split(" LineNumber")[0].Trim()})");
        }
        using (doc)
        {
            try
            {
                return FromHeader(label, bytes, doc.RootElement, dataStart, dataLength);
            }
            catch (InvalidOperationException e)
            {
                // System.Text.Json throws this, not a JsonException, when a name or string it reads holds an escaped lone surrogate ("\ud800").
                return Fail<SafeTensorsFile>(label, $"header has a string that is not valid UTF-16 ({e.Message})");
            }
        }
    }

    /// <summary>The checks of a parsed header: entries, metadata, overlaps and the checksum (see <see cref="Parse"/>).</summary>
    private static SafeTensorsFile FromHeader(string label, byte[] bytes, JsonElement root, long dataStart, long dataLength)
    {
        string Fail(string problem) => throw new CheckpointException($"{label}: not a valid safetensors file: {problem}");

        if (root.ValueKind != JsonValueKind.Object)
        {
            Fail("header is not a JSON object");
        }
        var entries = new List<SafeTensorEntry>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        Dictionary<string, string>? metadata = null;
        foreach (var property in root.EnumerateObject())
        {
            if (property.Name == "__metadata__")
            {
                if (property.Value.ValueKind != JsonValueKind.Object || metadata is not null)
                {
                    Fail("__metadata__ is not an object, or appears twice");
                }
                metadata = [];
                foreach (var m in property.Value.EnumerateObject())
                {
                    string value = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()! : Fail($"metadata '{m.Name}' is not a string");
                    if (!metadata.TryAdd(m.Name, value))
                    {
                        Fail($"metadata '{m.Name}' appears twice");
                    }
                }
                continue;
            }
            if (!names.Add(property.Name))
            {
                Fail($"tensor '{property.Name}' appears twice");
            }
            entries.Add(ParseEntry(label, property, dataLength));
        }
        metadata ??= [];
        var byOffset = entries.OrderBy(e => e.Begin).ThenBy(e => e.End).ToList();
        for (int i = 1; i < byOffset.Count; i++)
        {
            if (byOffset[i].Begin < byOffset[i - 1].End)
            {
                Fail($"tensors {byOffset[i - 1].Name} and {byOffset[i].Name} overlap");
            }
        }
        if (metadata.TryGetValue(ChecksumKey, out var expected))
        {
            var actual = Checksum(metadata, entries, hash => hash(bytes.AsSpan((int)dataStart)));
            if (actual != expected)
            {
                Fail($"metadata '{ChecksumKey}' does not match the contents (the file was damaged or edited after it was written)");
            }
        }
        return new SafeTensorsFile(label, bytes, dataStart, entries, metadata);
    }

    /// <summary>The offset of the first byte that is not part of valid UTF-8, or -1.</summary>
    private static int FirstInvalidUtf8(ReadOnlySpan<byte> text)
    {
        int offset = 0;
        while (offset < text.Length)
        {
            if (System.Text.Rune.DecodeFromUtf8(text[offset..], out _, out int consumed) != System.Buffers.OperationStatus.Done)
            {
                return offset;
            }
            offset += consumed;
        }
        return -1;
    }

    private static T Fail<T>(string label, string problem) => throw new CheckpointException($"{label}: not a valid safetensors file: {problem}");

    private static SafeTensorEntry ParseEntry(string label, JsonProperty property, long dataLength)
    {
        string name = property.Name;
        var v = property.Value;
        string Bad(string problem) => Fail<string>(label, $"tensor '{name}': {problem}");
        if (v.ValueKind != JsonValueKind.Object)
        {
            Bad("entry is not an object");
        }
        if (!v.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
        {
            Bad("no dtype");
        }
        string dtype = dtypeElement.GetString()!;
        int elementSize = dtype switch { "F32" => 4, "I64" => 8, _ => 0 };
        if (elementSize == 0)
        {
            Bad($"dtype {dtype} is not supported (F32, I64)");
        }
        if (!v.TryGetProperty("shape", out var shapeElement) || shapeElement.ValueKind != JsonValueKind.Array || shapeElement.GetArrayLength() > 8)
        {
            Bad("shape is not an array of at most 8 dimensions");
        }
        var shape = new int[shapeElement.GetArrayLength()];
        long count = 1;
        int k = 0;
        foreach (var d in shapeElement.EnumerateArray())
        {
            int dim = -1;
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt32(out dim) || dim < 0)
            {
                Bad("shape has a dimension that is not a non-negative 32-bit integer");
            }
            shape[k++] = dim;
            count *= dim;
            if (count > int.MaxValue)
            {
                Bad("more than 2^31 elements");
            }
        }
        if (!v.TryGetProperty("data_offsets", out var offsets) || offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2)
        {
            Bad("data_offsets is not a [begin, end] pair");
        }
        long begin = OffsetOf(offsets[0]), end = OffsetOf(offsets[1]);
        if (begin < 0 || end < begin || end > dataLength)
        {
            Bad($"data_offsets [{begin}, {end}] lie outside the {dataLength} data bytes");
        }
        if (end - begin != count * elementSize)
        {
            Bad($"{end - begin} bytes for {count} {dtype} values");
        }
        return new SafeTensorEntry(name, dtype, shape, begin, end);
    }

    private static long OffsetOf(JsonElement e) => e.ValueKind == JsonValueKind.Number && e.TryGetInt64(out long v) ? v : -1;
}

/// <summary>A validated safetensors image: entries by name, metadata, and typed reads.</summary>
public sealed class SafeTensorsFile
{
    private readonly byte[] _bytes;
    private readonly long _dataStart;
    private readonly Dictionary<string, SafeTensorEntry> _entries;

    internal SafeTensorsFile(string label, byte[] bytes, long dataStart, List<SafeTensorEntry> entries, Dictionary<string, string> metadata)
    {
        Label = label;
        _bytes = bytes;
        _dataStart = dataStart;
        _entries = entries.ToDictionary(e => e.Name);
        Metadata = metadata;
    }

    /// <summary>The file name used in messages.</summary>
    public string Label { get; }

    /// <summary>Run metadata (the header's __metadata__).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Every tensor entry by name.</summary>
    public IReadOnlyDictionary<string, SafeTensorEntry> Entries => _entries;

    /// <summary>True when a tensor called <paramref name="name"/> exists.</summary>
    public bool Contains(string name) => _entries.ContainsKey(name);

    /// <summary>The F32 tensor <paramref name="name"/>, checked against <paramref name="expectedShape"/> when given.</summary>
    public float[] ReadFloats(string name, int[]? expectedShape = null)
    {
        var e = Entry(name, "F32", expectedShape);
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(Bytes(e)).ToArray();
    }

    /// <summary>The index of the first NaN or infinite value of the F32 tensor <paramref name="name"/>, or -1 (reads in place, allocates nothing).</summary>
    public long FirstNonFinite(string name)
    {
        var values = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(Bytes(Entry(name, "F32", null)));
        for (int i = 0; i < values.Length; i++)
        {
            if (!float.IsFinite(values[i]))
            {
                return i;
            }
        }
        return -1;
    }

    /// <summary>The index of the first negative value of the F32 tensor <paramref name="name"/>, or -1.</summary>
    public long FirstNegative(string name)
    {
        var values = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(Bytes(Entry(name, "F32", null)));
        for (int i = 0; i < values.Length; i++)
        {
            if (values[i] < 0)
            {
                return i;
            }
        }
        return -1;
    }

    private ReadOnlySpan<byte> Bytes(SafeTensorEntry e) => _bytes.AsSpan((int)(_dataStart + e.Begin), (int)(e.End - e.Begin));

    /// <summary>The I64 tensor <paramref name="name"/>.</summary>
    public long[] ReadInt64(string name)
    {
        var e = Entry(name, "I64", null);
        var values = new long[e.Count];
        var span = _bytes.AsSpan((int)(_dataStart + e.Begin), (int)(e.End - e.Begin));
        for (int i = 0; i < values.Length; i++)
        {
            values[i] = BinaryPrimitives.ReadInt64LittleEndian(span.Slice(8 * i));
        }
        return values;
    }

    private SafeTensorEntry Entry(string name, string dtype, int[]? expectedShape)
    {
        if (!_entries.TryGetValue(name, out var e))
        {
            throw new CheckpointException($"{Label}: no tensor '{name}'");
        }
        if (e.DType != dtype)
        {
            throw new CheckpointException($"{Label}: tensor '{name}' is {e.DType}, expected {dtype}");
        }
        if (expectedShape is not null && !e.Shape.AsSpan().SequenceEqual(expectedShape))
        {
            throw new CheckpointException($"{Label}: tensor '{name}' is {string.Join("x", e.Shape)}, expected {string.Join("x", expectedShape)}");
        }
        return e;
    }
}

/// <summary>
/// A test-only hook that widens the window of a checkpoint save so a fault-injection test can kill
/// the process inside it: with DDPM_TEST_SAVE_DELAY_MS=N in the environment, each write marks its
/// start and end on stderr and sleeps N/2 ms after the header and again before the flush and rename.
/// Without the variable it does nothing.
/// </summary>
internal static class SaveDelay
{
    private static readonly int Milliseconds =
        int.TryParse(Environment.GetEnvironmentVariable("DDPM_TEST_SAVE_DELAY_MS"), out int ms) && ms > 0 ? ms : 0;

    public static void Begin(string path)
    {
        if (Milliseconds > 0)
        {
            Console.Error.WriteLine($"test-hook: save begin {Path.GetFileName(path)}");
            Thread.Sleep(Milliseconds / 2);
        }
    }

    public static void Pause()
    {
        if (Milliseconds > 0)
        {
            Thread.Sleep(Milliseconds - Milliseconds / 2);
        }
    }

    public static void End()
    {
        if (Milliseconds > 0)
        {
            Console.Error.WriteLine("test-hook: save end");
        }
    }
}
