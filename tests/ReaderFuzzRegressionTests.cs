using System.Buffers.Binary;
using System.Text;
using Ddpm.Diffusion;
using Ddpm.Nn;

namespace Ddpm.Tests;

/// <summary>
/// Regression tests for what <see cref="CheckpointFuzzTests"/> found: System.Text.Json throws
/// InvalidOperationException (not JsonException) when a key or string it reads holds an escaped
/// lone surrogate such as "\ud800"; the readers must turn that into their own error type.
/// </summary>
public sealed class ReaderFuzzRegressionTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-fuzz-reg").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory]
    [InlineData("""{"\ud800":1,"step":2,"loss":0.5}""")]
    [InlineData("""{"step":2,"\udc00x":1,"loss":0.5}""")]
    [InlineData("""{"ev\ud800ent":"resume","step":2}""")]
    public void MetricsLineWithLoneSurrogateKeyIsDroppedByLine(string bad)
    {
        var path = Path.Combine(_dir, "metrics.jsonl");
        File.WriteAllText(path, "{\"step\":1,\"loss\":0.5}\n" + bad + "\n{\"step\":3,\"loss\":0.25}\n");
        var metrics = RunMetrics.Read(path, long.MaxValue);
        Assert.Equal([(1L, 0.5), (3L, 0.25)], metrics.History);
        var problem = Assert.Single(metrics.Problems);
        Assert.StartsWith($"{path} line 2: ", problem);
        Assert.Contains("surrogate", problem);
    }

    [Theory]
    [InlineData("""{"\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""")]
    [InlineData("""{"__metadata__":{"\udc00":"1"}}""")]
    [InlineData("""{"__metadata__":{"step":"1\ud800"}}""")]
    [InlineData("""{"x":{"dtype":"F3\ud8002","shape":[1],"data_offsets":[0,4]}}""")]
    public void SafeTensorsHeaderWithLoneSurrogateIsACheckpointError(string header)
    {
        var json = Encoding.UTF8.GetBytes(header);
        var image = new byte[8 + json.Length + 4];
        BinaryPrimitives.WriteUInt64LittleEndian(image, (ulong)json.Length);
        json.CopyTo(image, 8);
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Parse("lone.safetensors", image));
        Assert.StartsWith("lone.safetensors: not a valid safetensors file: header", e.Message);
        Assert.Contains("surrogate", e.Message);
    }
}
