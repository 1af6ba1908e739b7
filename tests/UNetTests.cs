using Ddpm.Nn;
using Ddpm.Tensors;
using Xunit.Abstractions;

namespace Ddpm.Tests;

/// <summary>The U-Net of the model spec: names, shapes and counts as the PyTorch peer; the whole
/// network's gradient against finite differences; the peer's weights give the peer's output.</summary>
public sealed class UNetTests(ITestOutputHelper output)
{
    internal static string Fixture(string name) => Path.Combine(AppContext.BaseDirectory, "Fixtures", name);

    [Theory]
    [InlineData("tiny", 279_409)]
    [InlineData("small", 1_112_801)]
    [InlineData("base", 4_441_537)]
    public void ParameterCountsMatchTheSpec(string preset, long expected)
    {
        var model = new UNet(Presets.Channels(preset), CpuDevice.Instance);
        Assert.Equal(expected, model.ParameterCount);
    }

    /// <summary>unet-tiny-names.txt is `torch_unet.py names --preset tiny`: same names, same shapes, same order.</summary>
    [Fact]
    public void NamesAndShapesMatchThePeer()
    {
        var want = File.ReadAllLines(Fixture("unet-tiny-names.txt")).Where(l => l.Length > 0).ToArray();
        var model = new UNet(16, CpuDevice.Instance);
        var got = model.Parameters.Select(p => $"{p.Name} {string.Join("x", p.Shape)}").ToArray();
        Assert.Equal(want, got);
    }

    [Fact]
    public void InitialisationIsPyTorchsDefaultAndSeeded()
    {
        var a = new UNet(16, CpuDevice.Instance, seed: 5);
        var b = new UNet(16, CpuDevice.Instance, seed: 5);
        var c = new UNet(16, CpuDevice.Instance, seed: 6);
        var w = a["enc1.conv1.weight"].Value.ToArray();
        Assert.Equal(w, b["enc1.conv1.weight"].Value.ToArray());
        Assert.NotEqual(w, c["enc1.conv1.weight"].Value.ToArray());
        // Uniform in ±1/sqrt(fan_in), fan_in = 16·3·3: bounded, and spread over the whole range.
        float bound = 1f / MathF.Sqrt(16 * 9);
        Assert.All(w, v => Assert.InRange(v, -bound, bound));
        Assert.True(w.Max() > 0.9f * bound && w.Min() < -0.9f * bound);
        Assert.All(a["enc0.norm1.weight"].Value.ToArray(), v => Assert.Equal(1f, v));
        Assert.All(a["enc0.norm1.bias"].Value.ToArray(), v => Assert.Equal(0f, v));
    }

    /// <summary>
    /// The fixture (tests/Fixtures/make_interop_fixture.py: the peer's tiny U-Net, seed 0, GroupNorm
    /// affines nudged off 1/0, x [3,1,28,28] normal, t = 0, 137, 299, the peer's float32 forward)
    /// loads into the C# U-Net and gives the peer's eps. Tolerance 2e-4 absolute on outputs of
    /// size ~0.3: float32 sums in another order through 30 layers drift by a few 1e-6 relative.
    /// </summary>
    [Fact]
    public void PeerWeightsGiveThePeersPrediction()
    {
        var model = new UNet(16, CpuDevice.Instance);
        Checkpoint.Load(Fixture("tiny-weights.safetensors"), model);
        var input = SafeTensors.Read(Fixture("tiny-input.safetensors"));
        var x = input.ReadFloats("x", [3, 1, 28, 28]);
        var t = input.ReadInt64("t").Select(v => (float)v).ToArray();
        var want = SafeTensors.Read(Fixture("tiny-eps.safetensors")).ReadFloats("eps", [3, 1, 28, 28]);
        var got = Predict(model, x, t);
        double worst = want.Zip(got, (a, b) => Math.Abs(a - b)).Max();
        output.WriteLine($"max |engine - peer| = {worst:E2}");
        Assert.True(worst < 2e-4, $"max |engine - peer| = {worst}");
    }

    internal static float[] Predict(UNet model, float[] x, float[] t)
    {
        var d = model.Device;
        using var tape = Tape.NoGrad(d);
        using var xt = Tensor.FromHost(d, x, t.Length, 1, 28, 28);
        using var tt = Tensor.FromHost(d, t, t.Length);
        return model.Forward(tape, tape.Constant(xt), tape.Constant(tt)).Value.ToArray();
    }

    /// <summary>
    /// Reverse interop: a checkpoint the engine writes (the model's names only) loads into the
    /// peer's `predict`, which gives the engine's output. Needs /usr/bin/python3 with torch
    /// (Debian's python3-torch); the same check by hand:
    /// /usr/bin/python3 tests/Fixtures/check_engine_checkpoint.py ../shared/reference DIR.
    /// </summary>
    [TorchFact]
    public void EngineCheckpointLoadsIntoPeer()
    {
        var dir = Directory.CreateTempSubdirectory("ddpm-interop").FullName;
        var model = new UNet(16, CpuDevice.Instance, seed: 11);
        Checkpoint.Save(Path.Combine(dir, "weights.safetensors"), model);
        var rng = new Random(3);
        var x = Enumerable.Range(0, 2 * 784).Select(_ => (float)rng.NextDouble() * 2 - 1).ToArray();
        float[] t = [5, 250];
        var eps = Predict(model, x, t);
        WriteInput(Path.Combine(dir, "input.safetensors"), x, [5, 250]);
        SafeTensors.Write(Path.Combine(dir, "engine-eps.safetensors"), [("eps", [2, 1, 28, 28], eps)]);
        var (code, text) = TorchFactAttribute.RunPython(Path.Combine(AppContext.BaseDirectory, "Fixtures", "check_engine_checkpoint.py"), TorchFactAttribute.ReferenceDir!, dir);
        output.WriteLine(text);
        Assert.True(code == 0, text);
    }

    /// <summary>
    /// The same for a model of other images: 3-channel 16x16, three classes (what a labelled folder of colour images trains).
    /// The peer builds it with --channels 3 --size 16 --classes 3 and loads the engine's weights strictly.
    /// </summary>
    [TorchFact]
    public void EngineRgbConditionalCheckpointLoadsIntoPeer()
    {
        var dir = Directory.CreateTempSubdirectory("ddpm-interop-rgb").FullName;
        var model = new UNet(16, CpuDevice.Instance, seed: 12, classes: 3, imageChannels: 3) { ImageSize = 16 };
        Checkpoint.Save(Path.Combine(dir, "weights.safetensors"), model);
        var rng = new Random(4);
        var x = Enumerable.Range(0, 2 * 3 * 16 * 16).Select(_ => (float)rng.NextDouble() * 2 - 1).ToArray();
        float[] t = [7, 120], y = [2, 3];
        var d = model.Device;
        using var tape = Tape.NoGrad(d);
        using var xt = Tensor.FromHost(d, x, 2, 3, 16, 16);
        using var tt = Tensor.FromHost(d, t, 2);
        using var yt = Tensor.FromHost(d, y, 2);
        var eps = model.Forward(tape, tape.Constant(xt), tape.Constant(tt), tape.Constant(yt)).Value.ToArray();
        WriteInput(Path.Combine(dir, "input.safetensors"), x, [7, 120], [2, 3, 16, 16], [2, 3]);
        SafeTensors.Write(Path.Combine(dir, "engine-eps.safetensors"), [("eps", [2, 3, 16, 16], eps)]);
        var (code, text) = TorchFactAttribute.RunPython(Path.Combine(AppContext.BaseDirectory, "Fixtures", "check_engine_checkpoint.py"), TorchFactAttribute.ReferenceDir!, dir,
            "--channels", "3", "--size", "16", "--classes", "3");
        output.WriteLine(text);
        Assert.True(code == 0, text);
    }

    private static void WriteInput(string path, float[] x, long[] t, int[]? shape = null, long[]? y = null)
    {
        // x as F32, t (and y) as I64, the peer's predict input; written by hand (the engine writes F32 only).
        shape ??= [t.Length, 1, 28, 28];
        long afterT = 4 * x.Length + 8 * t.Length;
        var header = $"{{\"x\":{{\"dtype\":\"F32\",\"shape\":[{string.Join(",", shape)}],\"data_offsets\":[0,{4 * x.Length}]}},"
            + $"\"t\":{{\"dtype\":\"I64\",\"shape\":[{t.Length}],\"data_offsets\":[{4 * x.Length},{afterT}]}}"
            + (y is null ? "" : $",\"y\":{{\"dtype\":\"I64\",\"shape\":[{y.Length}],\"data_offsets\":[{afterT},{afterT + 8 * y.Length}]}}") + "}";
        var json = System.Text.Encoding.UTF8.GetBytes(header.PadRight((header.Length + 7) / 8 * 8));
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes((ulong)json.Length));
        f.Write(json);
        foreach (var v in x)
        {
            f.Write(BitConverter.GetBytes(v));
        }
        foreach (var v in t)
        {
            f.Write(BitConverter.GetBytes(v));
        }
        foreach (var v in y ?? [])
        {
            f.Write(BitConverter.GetBytes(v));
        }
    }
}

/// <summary>A fact that runs only where /usr/bin/python3 imports torch and the shared reference is
/// beside the repository; elsewhere it is reported as skipped, with the reason.</summary>
public sealed class TorchFactAttribute : FactAttribute
{
    public static readonly string? ReferenceDir = FindReference();
    private static readonly bool HasTorch = ReferenceDir is not null && RunPython("-c", "import torch").Code == 0;

    public TorchFactAttribute()
    {
        if (!HasTorch)
        {
            Skip = "PyTorch not installed (apt-get install python3-torch) or ../shared/reference missing";
        }
    }

    private static string? FindReference()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "shared", "reference", "torch_unet.py");
            if (File.Exists(candidate) && File.Exists("/usr/bin/python3"))
            {
                return Path.GetDirectoryName(candidate);
            }
        }
        return null;
    }

    public static (int Code, string Output) RunPython(params string[] args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("/usr/bin/python3") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        try
        {
            using var p = System.Diagnostics.Process.Start(psi)!;
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEnd();
            p.WaitForExit();
            return (p.ExitCode, stdout.Result + stderr);
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            return (-1, e.Message);
        }
    }
}
