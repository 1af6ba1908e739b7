// Times ONNX Runtime's CPU execution of the U-Net exported by `torch_unet.py onnx`: one denoising forward pass of a
// batch, as `ddpm bench` and `torch_unet.py bench` time theirs (2 warm-ups, then the mean of --steps passes), and
// prints one JSON line with the same keys.
//   dotnet run -c Release --project benchmarks/OnnxPeer -- MODEL.onnx [--batch 64] [--steps 5] [--threads 2]
using System.Diagnostics;
using System.Text.Json;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;

if (args.Length < 1 || !File.Exists(args[0]))
{
    Console.Error.WriteLine("usage: OnnxPeer MODEL.onnx [--batch 64] [--steps 5] [--threads 2] (export with torch_unet.py onnx)");
    return 2;
}
int Arg(string name, int fallback)
{
    int i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1]) : fallback;
}
int batch = Arg("--batch", 64), steps = Arg("--steps", 5), threads = Arg("--threads", 2);
using var options = new SessionOptions
{
    IntraOpNumThreads = threads,
    InterOpNumThreads = 1,
    GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL,
};
using var session = new InferenceSession(args[0], options);
var rng = new Random(0);
var x = new DenseTensor<float>(Enumerable.Range(0, batch * 784).Select(_ => (float)rng.NextDouble() * 2 - 1).ToArray(), [batch, 1, 28, 28]);
// The exported graph's t input: its element type as the export made it (integer timesteps or floats).
var tMeta = session.InputMetadata["t"];
NamedOnnxValue t = tMeta.ElementType == typeof(long)
    ? NamedOnnxValue.CreateFromTensor("t", new DenseTensor<long>(Enumerable.Repeat(10L, batch).ToArray(), [batch]))
    : NamedOnnxValue.CreateFromTensor("t", new DenseTensor<float>(Enumerable.Repeat(10f, batch).ToArray(), [batch]));
var inputs = new List<NamedOnnxValue> { NamedOnnxValue.CreateFromTensor("x", x), t };
for (int i = 0; i < 2; i++)
{
    using var warm = session.Run(inputs);
}
var clock = Stopwatch.StartNew();
for (int i = 0; i < steps; i++)
{
    using var r = session.Run(inputs);
}
double ms = clock.Elapsed.TotalMilliseconds / steps;
Console.WriteLine(JsonSerializer.Serialize(new Dictionary<string, object>
{
    ["torch"] = "onnxruntime " + typeof(InferenceSession).Assembly.GetName().Version,
    ["device"] = "cpu",
    ["threads"] = threads,
    ["batch"] = batch,
    ["denoise_step_ms"] = Math.Round(ms, 2),
}));
return 0;
