using System.Buffers.Binary;
using System.Text;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>safetensors checkpoints: round trips, atomic writes, and a clear error for every way a
/// file can be broken or hostile.</summary>
public sealed class CheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-ckpt").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    [Fact]
    public void ModelAdamAndEmaRoundTrip()
    {
        var d = CpuDevice.Instance;
        var model = new UNet(16, d, seed: 1);
        using var adam = new Adam(model.Parameters) { Step = 17 };
        using var ema = new Ema(model.Parameters, 0.99f);
        foreach (var m in adam.M)
        {
            Kernels.RandomFill.Normal(m, 5, 0);
        }
        Checkpoint.Save(PathOf("a.safetensors"), model, adam, ema, new Dictionary<string, string> { ["epoch"] = "2" });

        var other = new UNet(16, d, seed: 2);
        using var adam2 = new Adam(other.Parameters);
        using var ema2 = new Ema(other.Parameters, 0.99f);
        var meta = Checkpoint.Load(PathOf("a.safetensors"), other, adam2, ema2);
        Assert.Equal("2", meta["epoch"]);
        Assert.Equal("tiny", meta["preset"]);
        Assert.Equal(17, adam2.Step);
        for (int i = 0; i < model.Parameters.Count; i++)
        {
            Assert.Equal(model.Parameters[i].Value.ToArray(), other.Parameters[i].Value.ToArray());
            Assert.Equal(adam.M[i].ToArray(), adam2.M[i].ToArray());
            Assert.Equal(ema.Weights[i].ToArray(), ema2.Weights[i].ToArray());
        }
    }

    [Fact]
    public void WriteIsAtomicAndLeavesNoTemporaryFile()
    {
        var path = PathOf("m.safetensors");
        SafeTensors.Write(path, [("a", [2], new[] { 1f, 2f })]);
        var before = File.ReadAllBytes(path);
        // A failing write (values do not fill the shape) must leave the old file untouched.
        Assert.Throws<ArgumentException>(() => SafeTensors.Write(path, [("a", [3], new[] { 1f, 2f })]));
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(_dir));
    }

    [Fact]
    public void OtherPresetIsRefusedByName()
    {
        var small = new UNet(32, CpuDevice.Instance);
        Checkpoint.Save(PathOf("small.safetensors"), small);
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Load(PathOf("small.safetensors"), new UNet(16, CpuDevice.Instance)));
        Assert.Contains("small", e.Message);
        Assert.Contains("tiny", e.Message);
    }

    [Fact]
    public void MissingFileIsAClearError()
    {
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Read(PathOf("nope.safetensors")));
        Assert.Contains("no such file", e.Message);
    }

    public static TheoryData<string, string> Broken => new()
    {
        { "empty", "shorter than the 8-byte header length" },
        { "huge header length", "does not fit a file" },
        { "header not json", "header is not JSON" },
        { "header not object", "not a JSON object" },
        { "unknown dtype", "dtype F16 is not supported" },
        { "negative dim", "not a non-negative 32-bit integer" },
        { "offsets outside", "lie outside" },
        { "size mismatch", "bytes for" },
        { "overlap", "overlap" },
        { "bad metadata", "is not a string" },
        { "giant shape", "more than 2^31 elements" },
    };

    [Theory]
    [MemberData(nameof(Broken))]
    public void BrokenFilesGetANamedError(string kind, string expected)
    {
        byte[] bytes = kind switch
        {
            "empty" => [1, 2, 3],
            "huge header length" => Image("{}", 0, headerLength: ulong.MaxValue),
            "header not json" => Image("{\"a\": [", 0),
            "header not object" => Image("[1,2]", 0),
            "unknown dtype" => Image("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4),
            "negative dim" => Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8),
            "offsets outside" => Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8),
            "size mismatch" => Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8),
            "overlap" => Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12),
            "bad metadata" => Image("{\"__metadata__\":{\"step\":3}}", 0),
            "giant shape" => Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[65536,65536],\"data_offsets\":[0,8]}}", 8),
            _ => throw new ArgumentException(kind),
        };
        var path = PathOf("broken.safetensors");
        File.WriteAllBytes(path, bytes);
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Read(path));
        Assert.Contains(expected, e.Message);
        Assert.Contains(path, e.Message);
    }

    [Fact]
    public void TruncatedCheckpointIsRefused()
    {
        var model = new UNet(16, CpuDevice.Instance);
        var path = PathOf("t.safetensors");
        Checkpoint.Save(path, model);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, model));
        Assert.Contains("lie outside", e.Message);
    }

    [Fact]
    public void WrongShapeOrUnexpectedTensorIsRefusedAndTheModelIsUntouched()
    {
        var model = new UNet(16, CpuDevice.Instance, seed: 1);
        var before = model["conv_out.weight"].Value.ToArray();
        var tensors = model.Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())).ToList();
        tensors[^1] = (tensors[^1].Name, [2], new float[2]);
        SafeTensors.Write(PathOf("w.safetensors"), tensors);
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Load(PathOf("w.safetensors"), model));
        Assert.Contains("conv_out.bias", e.Message);
        Assert.Equal(before, model["conv_out.weight"].Value.ToArray());

        var extra = model.Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())).Append(("junk", [1], new float[1]));
        SafeTensors.Write(PathOf("x.safetensors"), extra);
        e = Assert.Throws<CheckpointException>(() => Checkpoint.Load(PathOf("x.safetensors"), model));
        Assert.Contains("unexpected tensor 'junk'", e.Message);
    }

    private static byte[] Image(string header, int dataBytes, ulong? headerLength = null)
    {
        var json = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + json.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, headerLength ?? (ulong)json.Length);
        json.CopyTo(bytes, 8);
        return bytes;
    }
}
