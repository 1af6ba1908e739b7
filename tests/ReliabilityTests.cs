using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Ddpm.Cli;
using Ddpm.Diffusion;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>
/// Nothing lost, nothing trusted: each case a hostile file or a careless command found, as the
/// user meets it (one line on stderr naming the file or flag, a non-zero exit) or as the engine
/// must behave (validated before anything is built, never a non-finite checkpoint, --resume never
/// silently ignoring a flag). Serial: the CLI cases swap the process's console writers.
/// </summary>
[Collection(CliCollection.Name)]
public sealed class ReliabilityTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-rel").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private static (int Code, string Err) Run(params string[] args)
    {
        var (code, err, _) = CliTests.Run(args);
        return (code, err);
    }

    private static void OneLine((int Code, string Err) r, int code, params string[] contains)
    {
        Assert.True(r.Code == code, $"exit {r.Code}, expected {code}: {r.Err}");
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines, l => l.StartsWith("ddpm: ", StringComparison.Ordinal));
        Assert.DoesNotContain("   at ", r.Err);
        foreach (var c in contains)
        {
            Assert.Contains(c, r.Err);
        }
    }

    private static byte[] Image(string header, int dataBytes)
    {
        var json = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + json.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)json.Length);
        json.CopyTo(bytes, 8);
        return bytes;
    }

    /// <summary>A tiny training run's checkpoint after <paramref name="steps"/> steps (Adam, EMA when asked, metadata).</summary>
    private string TrainedCheckpoint(string name, int steps = 2, float ema = 0.9f, int batch = 2, string schedule = "linear")
    {
        var path = PathOf(name);
        using var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = batch, EmaDecay = ema, Seed = 4, Schedule = schedule }, Synthetic(8));
        for (int i = 0; i < steps; i++)
        {
            trainer.TrainStep();
        }
        trainer.Save(path);
        return path;
    }

    internal static ImageSet Synthetic(int count)
    {
        var pixels = new byte[count * ImageSet.MnistPixels];
        new Random(7).NextBytes(pixels);
        return new ImageSet(pixels, new byte[count], count);
    }

    /// <summary>Writes train-images/labels IDX files of <paramref name="count"/> simple shapes into a folder (what --data accepts).</summary>
    private string SyntheticDataFolder(int count = 8)
    {
        var folder = PathOf("data");
        FaultInjectionTests.WriteShapes(folder, count);
        return folder;
    }

    /// <summary>Rewrites a checkpoint's metadata (re-signing it, so only the cross-checks can catch the edit).</summary>
    private static void EditMetadata(string path, Action<Dictionary<string, string>> edit, bool resign = true)
    {
        var file = SafeTensors.Read(path);
        var meta = new Dictionary<string, string>(file.Metadata);
        edit(meta);
        if (!resign)
        {
            meta.Remove(SafeTensors.ChecksumKey);
        }
        var tensors = file.Entries.Values.OrderBy(e => e.Begin).Select(e => (e.Name, e.Shape, file.ReadFloats(e.Name))).ToList();
        SafeTensors.Write(path, tensors, meta);
        if (!resign)
        {
            // Write signs every file: strip the signature again to make a peer-style unsigned file.
            var again = SafeTensors.Read(path);
            var unsigned = new Dictionary<string, string>(again.Metadata);
            unsigned.Remove(SafeTensors.ChecksumKey);
            RewriteHeaderWithout(path, unsigned);
        }
    }

    private static void RewriteHeaderWithout(string path, Dictionary<string, string> meta)
    {
        var bytes = File.ReadAllBytes(path);
        ulong len = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        using var doc = JsonDocument.Parse(bytes.AsMemory(8, (int)len));
        var header = new Dictionary<string, JsonElement>();
        foreach (var p in doc.RootElement.EnumerateObject())
        {
            if (p.Name != "__metadata__")
            {
                header[p.Name] = p.Value.Clone();
            }
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(new Dictionary<string, object>(header.Select(kv => new KeyValuePair<string, object>(kv.Key, kv.Value))) { ["__metadata__"] = meta });
        int padded = (json.Length + 7) / 8 * 8;
        var output = new byte[8 + padded + (bytes.Length - 8 - (int)len)];
        BinaryPrimitives.WriteUInt64LittleEndian(output, (ulong)padded);
        json.CopyTo(output, 8);
        output.AsSpan(8 + json.Length, padded - json.Length).Fill((byte)' ');
        bytes.AsSpan(8 + (int)len).CopyTo(output.AsSpan(8 + padded));
        File.WriteAllBytes(path, output);
    }

    [Fact]
    public void HostileWidthIsRefusedBeforeAnyModelIsBuilt()
    {
        var path = PathOf("wide.safetensors");
        File.WriteAllBytes(path, Image("{\"conv_in.weight\":{\"dtype\":\"F32\",\"shape\":[8192,1,3,0],\"data_offsets\":[0,0]}}", 0));
        long before = GC.GetAllocatedBytesForCurrentThread();
        OneLine(Run("sample", "--checkpoint", path, "--out", PathOf("s")), ExitCodes.Failure, path, "matches no preset");
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 64L << 20);
    }

    [UnixFact]
    public void DevZeroAndFifoAreRefusedUnopened()
    {
        var clock = Stopwatch.StartNew();
        OneLine(Run("sample", "--checkpoint", "/dev/zero", "--out", PathOf("s")), ExitCodes.Failure, "/dev/zero", "not a regular file");
        var fifo = PathOf("fifo");
        Process.Start("mkfifo", fifo)!.WaitForExit();
        OneLine(Run("sample", "--checkpoint", fifo, "--out", PathOf("s")), ExitCodes.Failure, fifo, "not a regular file");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20));
    }

    [Fact]
    public void PartialEmaIsRefusedNotSampledAsNoise()
    {
        var model = new UNet(16, CpuDevice.Instance, seed: 1);
        var tensors = model.Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())).ToList();
        tensors.AddRange(model.Parameters.Take(5).Select(p => ($"ema.{p.Name}", p.Shape, p.Value.ToArray())));
        var path = PathOf("partial.safetensors");
        SafeTensors.Write(path, tensors);
        OneLine(Run("sample", "--checkpoint", path, "--out", PathOf("s")), ExitCodes.Failure, "incomplete EMA", "5 of");
        Assert.False(Directory.Exists(PathOf("s")) && Directory.EnumerateFiles(PathOf("s")).Any());
    }

    [Fact]
    public void InvalidUtf8InTheHeaderNamesItsOffset()
    {
        var bytes = Image("{\"__metadata__\":{\"a\":\"\u00e9\"}}", 0);
        int at = Array.IndexOf(bytes, (byte)0xC3);
        bytes[at + 1] = 0x28; // a lead byte followed by no continuation byte
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Parse("x.safetensors", bytes));
        Assert.Contains($"invalid UTF-8 at byte offset {at}", e.Message);
    }

    [Fact]
    public void DuplicateTensorNamesAreRefusedByName()
    {
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Parse("d.safetensors",
            Image("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8)));
        Assert.Contains("'a' appears twice", e.Message);
    }

    [Fact]
    public void MetricsLinesThatAreNotMetricsAreDroppedWithTheirLineNumber()
    {
        var path = PathOf("metrics.jsonl");
        File.WriteAllText(path, "{\"step\":1,\"loss\":0.5}\n{\"step\":\"two\",\"loss\":0.4}\n{\"step\":2.5,\"loss\":0.4}\n{\"step\":3,\"loss\":0.3}\n{\"step\":4,\"lo");
        var m = RunMetrics.Read(path, 10);
        Assert.Equal([1L, 3L], m.History.Select(h => h.Step));
        Assert.Equal(2, m.Problems.Count);
        Assert.Contains("line 2", m.Problems[0]);
        Assert.Contains("'step'", m.Problems[0]);
        Assert.Equal([1L], RunMetrics.Read(path, 2).History.Select(h => h.Step));
    }

    [Theory]
    [InlineData(new[] { "bench", "--batch", "2000000" }, "--batch")]
    [InlineData(new[] { "bench", "--steps", "0" }, "--steps")]
    [InlineData(new[] { "sample", "--sampler", "ddim", "--eta", "nan" }, "--eta")]
    [InlineData(new[] { "sample", "--sampler", "ddim", "--eta", "5" }, "--eta")]
    [InlineData(new[] { "sample", "--n", "0" }, "--n")]
    [InlineData(new[] { "train", "--ema", "nan" }, "--ema")]
    [InlineData(new[] { "train", "--ema", "1" }, "--ema")]
    [InlineData(new[] { "train", "--clip", "-1" }, "--clip")]
    [InlineData(new[] { "train", "--clip", "inf" }, "--clip")]
    [InlineData(new[] { "train", "--lr", "0" }, "--lr")]
    [InlineData(new[] { "train", "--lr", "nan" }, "--lr")]
    [InlineData(new[] { "train", "--batch", "0" }, "--batch")]
    [InlineData(new[] { "train", "--epochs", "0" }, "--epochs")]
    [InlineData(new[] { "train", "--warmup", "-1" }, "--warmup")]
    [InlineData(new[] { "train", "--lr-decay", "linear" }, "--lr-decay")]
    [InlineData(new[] { "train", "--save-every", "-5" }, "--save-every")]
    public void OutOfRangeFlagValuesAreUsageErrorsNamingTheFlag(string[] args, string flag) => OneLine(Run(args), ExitCodes.Usage, flag);

    [Fact]
    public void SamplerFlagsThatWouldBeIgnoredAreRefused()
    {
        var checkpoint = TrainedCheckpoint("c.safetensors");
        OneLine(Run("sample", "--checkpoint", checkpoint, "--steps", "20"), ExitCodes.Usage, "--steps", "ddim");
        OneLine(Run("sample", "--checkpoint", checkpoint, "--eta", "0.5"), ExitCodes.Usage, "--eta");
        OneLine(Run("sample", "--checkpoint", checkpoint, "--sampler", "ddim", "--variance", "small"), ExitCodes.Usage, "--variance");
        OneLine(Run("sample", "--checkpoint", checkpoint, "--sampler", "ddim", "--steps", "301", "--out", PathOf("s")), ExitCodes.Usage, "--steps 301", "T = 300");
    }

    [Fact]
    public void NonFiniteWeightsAreRefusedOnLoadAndNeverSaved()
    {
        var model = new UNet(16, CpuDevice.Instance, seed: 1);
        var tensors = model.Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())).ToList();
        tensors[3].Item3[2] = float.NaN;
        var path = PathOf("nan.safetensors");
        SafeTensors.Write(path, tensors);
        OneLine(Run("sample", "--checkpoint", path, "--out", PathOf("s")), ExitCodes.Failure, $"'{tensors[3].Name}'", "non-finite value at index 2");

        var good = PathOf("good.safetensors");
        Checkpoint.Save(good, model);
        var before = File.ReadAllBytes(good);
        model.Parameters[0].Value.CopyFrom(Enumerable.Repeat(float.PositiveInfinity, model.Parameters[0].Length).ToArray());
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Save(good, model));
        Assert.Contains(model.Parameters[0].Name, e.Message);
        Assert.Equal(before, File.ReadAllBytes(good));
    }

    [Fact]
    public void TheOptimizerSkipsANonFiniteStepAndNamesIt()
    {
        using var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = 2, EmaDecay = 0.9f, Seed = 1 }, Synthetic(8));
        trainer.TrainStep();
        var weights = trainer.Model.Parameters.Select(p => p.Value.ToArray()).ToArray();
        var ema = trainer.Ema!.Weights.Select(w => w.ToArray()).ToArray();
        // A NaN in the last layer's bias: the loss and every gradient go NaN.
        var bias = trainer.Model["conv_out.bias"];
        var poisoned = bias.Value.ToArray();
        poisoned[0] = float.NaN;
        bias.Value.CopyFrom(poisoned);
        float loss = trainer.TrainStep();
        Assert.True(float.IsNaN(loss));
        Assert.NotNull(trainer.LastSkip);
        Assert.Contains("step 1", trainer.LastSkip);
        Assert.Equal(1, trainer.Skipped);
        Assert.Equal(2, trainer.Step);
        Assert.Equal(1, trainer.Adam.Step);
        for (int i = 0; i < weights.Length; i++)
        {
            if (trainer.Model.Parameters[i].Name != "conv_out.bias")
            {
                Assert.Equal(weights[i], trainer.Model.Parameters[i].Value.ToArray());
            }
            Assert.Equal(ema[i], trainer.Ema.Weights[i].ToArray());
        }
        // Five in a row: diverged, with the step named.
        var e = Assert.Throws<TrainingDivergedException>(() =>
        {
            for (int i = 0; i < Trainer.MaxConsecutiveSkips; i++)
            {
                trainer.TrainStep();
            }
        });
        Assert.Contains("steps in a row", e.Message);
        Assert.Contains("--lr", e.Message);
    }

    [Fact]
    public void TheNonFiniteFlagNamesTheFirstBadTensor()
    {
        var d = CpuDevice.Instance;
        using var flag = Tensor.Empty(d, 1);
        using var good = Tensor.FromHost(d, Enumerable.Range(0, 100).Select(i => (float)i).ToArray(), 100);
        using var inf = Tensor.FromHost(d, Enumerable.Range(0, 37).Select(i => i == 36 ? float.NegativeInfinity : 1f).ToArray(), 37);
        using var nan = Tensor.FromHost(d, Enumerable.Range(0, 19).Select(i => i == 0 ? float.NaN : 1f).ToArray(), 19);
        Elementwise.Fill(flag, Reduce.NoneFlagged);
        Reduce.FlagNonFinite(good, flag, 0);
        Assert.Equal(Reduce.NoneFlagged, flag.ToArray()[0]);
        Reduce.FlagNonFinite(inf, flag, 1);
        Reduce.FlagNonFinite(nan, flag, 2);
        Assert.Equal(1f, flag.ToArray()[0]);
    }

    /// <summary>
    /// The EMA's warm-up is a function of the step: 2 steps, a checkpoint and 2 more give the average of 4 straight steps bit
    /// for bit, with the warm-up and without it. A checkpoint from before the warm-up existed (no <c>ema_warmup</c> key)
    /// resumes without one (and with uniform timesteps: no <c>min_snr</c>), bit for bit as the run it came from would have gone on;
    /// the next checkpoint records 0. A min-SNR run resumes exactly too (its timesteps are a function of the step).
    /// </summary>
    [Theory]
    [InlineData(0f, 0f, false)]
    [InlineData(0.75f, 0f, false)]
    [InlineData(0.75f, 5f, false)]
    [InlineData(0f, 0f, true)]
    public void ResumeKeepsTheEmaWarmupExact(float warmup, float minSnr, bool oldCheckpoint)
    {
        var options = new TrainOptions { Preset = "tiny", Batch = 2, EmaDecay = 0.9f, EmaWarmup = warmup, MinSnr = minSnr, Seed = 4 };
        using var straight = new Trainer(CpuDevice.Instance, options, Synthetic(8));
        for (int i = 0; i < 4; i++)
        {
            straight.TrainStep();
        }
        var path = PathOf("warm.safetensors");
        using (var first = new Trainer(CpuDevice.Instance, options, Synthetic(8)))
        {
            first.TrainStep();
            first.TrainStep();
            first.Save(path);
        }
        Assert.Equal(Text(warmup), Checkpoint.Inspect(path).Metadata[TrainOptions.EmaWarmupKey]);
        if (oldCheckpoint)
        {
            EditMetadata(path, m =>
            {
                m.Remove(TrainOptions.EmaWarmupKey);
                m.Remove(TrainOptions.MinSnrKey);
            });
        }
        using var resumed = Trainer.Resume(CpuDevice.Instance, path, Synthetic(8));
        Assert.Equal(warmup, resumed.Options.EmaWarmup);
        Assert.Equal(minSnr, resumed.Options.MinSnr);
        Assert.Empty(resumed.Changes);
        resumed.TrainStep();
        resumed.TrainStep();
        for (int i = 0; i < straight.Ema!.Weights.Count; i++)
        {
            Assert.Equal(straight.Ema.Weights[i].ToArray(), resumed.Ema!.Weights[i].ToArray());
        }
        resumed.Save(path);
        Assert.Equal(Text(warmup), Checkpoint.Inspect(path).Metadata[TrainOptions.EmaWarmupKey]);

        static string Text(float v) => v.ToString("R", CultureInfo.InvariantCulture);
    }

    /// <summary>The warm-up's decays: the first update copies the weights, the decay then rises as 1 - (1 + k)^-p to its cap;
    /// an average switched on by a resume warms up from that step, and the next checkpoint records where it started.</summary>
    [Fact]
    public void TheEmaWarmupRisesToItsCapFromTheAveragesStart()
    {
        var s = new EmaSchedule(0.999f, 0.75f);
        Assert.Equal(0f, s.At(0));
        Assert.Equal((float)(1 - Math.Pow(10, -0.75)), s.At(9), 6);
        Assert.Equal(0.999f, s.At(10_000_000));
        for (long k = 1; k < 20_000; k++)
        {
            Assert.True(s.At(k) >= s.At(k - 1), $"falls at {k}");
        }
        Assert.Equal(0.9f, new EmaSchedule(0.9f, 0).At(0));
        Assert.Equal(0.0, s.InitialShare(1));
        Assert.Equal(1.0, s.InitialShare(0));
        Assert.Equal(Math.Pow(0.9995, 937), new EmaSchedule(0.9995f, 0).InitialShare(937), 4);
        Assert.Equal(0f, new EmaSchedule(0.9f, 0.75f, Start: 5).At(5));

        var path = TrainedCheckpoint("late.safetensors", steps: 2, ema: 0f);
        using (var resumed = Trainer.Resume(CpuDevice.Instance, path, Synthetic(8), o => o with { EmaDecay = 0.99f, EmaWarmup = 0.75f }))
        {
            Assert.Equal(2, resumed.EmaStart);
            Assert.Equal(0f, resumed.EmaSchedule.At(2));
            resumed.TrainStep();
            Assert.Equal(resumed.Model.Parameters[0].Value.ToArray(), resumed.Ema!.Weights[0].ToArray());
            resumed.Save(path);
        }
        Assert.Equal("2", Checkpoint.Inspect(path).Metadata[TrainOptions.EmaStartKey]);
        using var again = Trainer.Resume(CpuDevice.Instance, path, Synthetic(8));
        Assert.Equal(2, again.EmaStart);
        EditMetadata(path, m => m[TrainOptions.EmaStartKey] = "9");
        Assert.Contains(TrainOptions.EmaStartKey, Assert.Throws<CheckpointException>(() => Trainer.Resume(CpuDevice.Instance, path, Synthetic(8))).Message);
    }

    [Fact]
    public void ResumeAppliesTheFlagsThatMayChangeAndRecordsThem()
    {
        var path = TrainedCheckpoint("r.safetensors", steps: 2, ema: 0f);
        using (var resumed = Trainer.Resume(CpuDevice.Instance, path, Synthetic(8), o => o with { Lr = 5e-4f, Clip = 1f, EmaDecay = 0.99f }))
        {
            Assert.Equal(5e-4f, resumed.Adam.LearningRate);
            Assert.Equal(1f, resumed.Options.Clip);
            Assert.NotNull(resumed.Ema);
            Assert.Equal(resumed.Model.Parameters[0].Value.ToArray(), resumed.Ema!.Weights[0].ToArray());
            Assert.Contains(resumed.Changes, c => c == "step 2: lr 0.001 -> 0.0005");
            Assert.Contains(resumed.Changes, c => c.StartsWith("step 2: clip 0 -> 1", StringComparison.Ordinal));
            resumed.TrainStep();
            resumed.Save(path);
        }
        var meta = Checkpoint.Inspect(path).Metadata;
        Assert.Equal("0.0005", meta["lr"]);
        Assert.Contains("step 2: lr 0.001 -> 0.0005", meta["changes"]);
    }

    [Theory]
    [InlineData("batch")]
    [InlineData("seed")]
    [InlineData("schedule")]
    [InlineData("ema off")]
    public void ResumeRefusesAChangeThatWouldBreakTheRun(string what)
    {
        var path = TrainedCheckpoint("r.safetensors");
        var e = Assert.Throws<UsageException>(() => Trainer.Resume(CpuDevice.Instance, path, Synthetic(8), o => what switch
        {
            "batch" => o with { Batch = 4 },
            "seed" => o with { Seed = 99 },
            "schedule" => o with { Schedule = "cosine" },
            _ => o with { EmaDecay = 0 },
        }));
        Assert.Contains(what == "ema off" ? "--ema" : $"--{what}", e.Message);
    }

    /// <summary>--recipe names a set of defaults: the checkpoint records the recipe's values, and a flag given wins.</summary>
    [Theory]
    [InlineData("default", "cosine", "0.9995", "500", "cosine")]
    [InlineData("seed", "linear", "0", "0", "constant")]
    public void RecipeSetsTheDefaultsAndAFlagOverridesThem(string recipe, string schedule, string ema, string warmup, string decay)
    {
        var data = SyntheticDataFolder();
        var run = PathOf($"recipe-{recipe}");
        var result = Run("train", "--recipe", recipe, "--max-steps", "1", "--batch", "2", "--grid", "0", "--lr", "0.002", "--out", run, "--data", data, "--device", "cpu");
        Assert.True(result.Code == 0, result.Err);
        var meta = Checkpoint.Inspect(Path.Combine(run, TrainCommand.CheckpointFile)).Metadata;
        Assert.Equal((schedule, ema, warmup, decay, "0.002"), (meta["schedule"], meta["ema"], meta["warmup"], meta["lr_decay"], meta["lr"]));
    }

    [Fact]
    public void ResumeOnTheCommandLineRefusesAChangedBatchInOneLine()
    {
        var data = SyntheticDataFolder();
        var run = PathOf("run");
        Directory.CreateDirectory(run);
        File.Copy(TrainedCheckpoint("r.safetensors"), Path.Combine(run, TrainCommand.CheckpointFile));
        OneLine(Run("train", "--resume", "--batch", "4", "--out", run, "--data", data, "--device", "cpu"), ExitCodes.Usage, "--batch cannot change mid-run");
    }

    [Fact]
    public void MetadataThatContradictsItselfOrTheTensorsIsRefused()
    {
        var path = TrainedCheckpoint("m.safetensors", steps: 3);
        Assert.Equal("3", Checkpoint.Inspect(path).Metadata["step"]);

        // A one-byte flip of the step in the file: the checksum no longer matches.
        var bytes = File.ReadAllBytes(path);
        var text = Encoding.UTF8.GetString(bytes, 0, Math.Min(bytes.Length, 200_000));
        int at = text.IndexOf("\"step\":\"3\"", StringComparison.Ordinal);
        Assert.True(at > 0);
        var flipped = (byte[])bytes.Clone();
        flipped[at + "\"step\":\"".Length] = (byte)'7';
        var e = Assert.Throws<CheckpointException>(() => SafeTensors.Parse(path, flipped));
        Assert.Contains("'checksum' does not match", e.Message);

        // The same edit re-signed, or in an unsigned file: the cross-check with Adam's step catches it.
        foreach (bool resign in new[] { true, false })
        {
            var copy = PathOf($"m{resign}.safetensors");
            File.Copy(path, copy, overwrite: true);
            EditMetadata(copy, m => m["step"] = "7", resign);
            e = Assert.Throws<CheckpointException>(() => Checkpoint.Inspect(copy));
            Assert.Contains("'step' = 7 disagrees with 'adam.step' = 3", e.Message);
        }
        var t = PathOf("t.safetensors");
        File.Copy(path, t);
        EditMetadata(t, m => m["T"] = "1000000");
        e = Assert.Throws<CheckpointException>(() => Checkpoint.Inspect(t));
        Assert.Contains("'T' = '1000000'", e.Message);
        var p = PathOf("p.safetensors");
        File.Copy(path, p);
        EditMetadata(p, m => m["preset"] = "base");
        Assert.Contains("'preset' = 'base'", Assert.Throws<CheckpointException>(() => Checkpoint.Inspect(p)).Message);
    }

    [Fact]
    public void ThePeersWeightsOnlyFileIsStillAccepted()
    {
        var info = Checkpoint.Inspect(UNetTests.Fixture("tiny-weights.safetensors"));
        Assert.Equal("tiny", info.Preset);
        Assert.False(info.HasAdam);
        Assert.False(info.HasEma);
        Assert.Throws<CheckpointException>(() => Trainer.Resume(CpuDevice.Instance, UNetTests.Fixture("tiny-weights.safetensors"), Synthetic(8)));
    }

    [Fact]
    public void OutThatIsAFileIsNamedByItsFlag()
    {
        var file = PathOf("afile");
        File.WriteAllText(file, "x");
        OneLine(Run("train", "--out", file), ExitCodes.Usage, "--out", "is a file");
        var checkpoint = TrainedCheckpoint("c.safetensors");
        OneLine(Run("sample", "--checkpoint", checkpoint, "--out", file), ExitCodes.Usage, "--out", "is a file");
    }

    [UnixFact]
    public void AnUnwritableSampleFolderIsFoundBeforeSampling()
    {
        var checkpoint = TrainedCheckpoint("c.safetensors");
        var clock = Stopwatch.StartNew();
        OneLine(Run("sample", "--checkpoint", checkpoint, "--n", "64", "--out", "/dev/null/samples"), ExitCodes.Usage, "--out /dev/null/samples", "cannot write");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), "the folder must be checked before 300 denoising steps");
    }

    [Fact]
    public void ASecondWriterIsRefusedNamingTheHolder()
    {
        var run = PathOf("run");
        using (RunLock.Acquire(run))
        {
            OneLine(Run("train", "--out", run, "--data", SyntheticDataFolder()), ExitCodes.Failure, $"pid {Environment.ProcessId}");
        }
        Assert.False(File.Exists(Path.Combine(run, TrainCommand.MetricsFile)));
    }

    [Fact]
    public void StaleTemporaryCheckpointsAreRemovedByTheNextRun()
    {
        var run = PathOf("run");
        Directory.CreateDirectory(run);
        var stale = Path.Combine(run, ".model.safetensors.ddpm-99999999-00ff.tmp");
        File.WriteAllBytes(stale, new byte[1000]);
        // A user's own temp files in the folder are not the program's: never removed.
        var users = new[] { Path.Combine(run, ".thesis.docx.tmp"), Path.Combine(run, ".notes.1234.tmp") };
        foreach (var f in users)
        {
            File.WriteAllText(f, "mine");
        }
        // A refused run removes nothing, not even its own kind of leftover.
        OneLine(Run("train", "--out", run, "--resume", "--device", "cpu"), ExitCodes.Failure, "--resume");
        Assert.True(File.Exists(stale));
        var data = PathOf("baddata");
        Directory.CreateDirectory(data);
        File.WriteAllBytes(Path.Combine(data, "train-images-idx3-ubyte"), [0, 0, 8, 3, 0, 0, 0, 0]);
        File.WriteAllBytes(Path.Combine(data, "train-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 0]);
        OneLine(Run("train", "--out", run, "--data", data, "--device", "cpu"), ExitCodes.Failure, "train-images-idx3-ubyte");
        Assert.False(File.Exists(stale));
        Assert.All(users, f => Assert.Equal("mine", File.ReadAllText(f)));
    }

    [Fact]
    public void ATrainingRunSavesEveryNStepsAndResumesExactly()
    {
        var data = SyntheticDataFolder(16);
        var run = PathOf("run");
        // 8 steps an epoch at batch 2; --save-every 3 saves at 3 and 6 before the epoch ends.
        var r = Run("train", "--preset", "tiny", "--batch", "2", "--max-steps", "7", "--save-every", "3", "--grid", "0", "--out", run, "--data", data, "--device", "cpu", "--seed", "2");
        Assert.True(r.Code == 0, r.Err);
        var metrics = RunMetrics.Read(Path.Combine(run, TrainCommand.MetricsFile), long.MaxValue);
        Assert.Equal(Enumerable.Range(1, 7).Select(i => (long)i), metrics.History.Select(h => h.Step));
        Assert.Equal("7", Checkpoint.Inspect(Path.Combine(run, TrainCommand.CheckpointFile)).Metadata["step"]);
        Assert.Empty(Directory.GetFiles(run, ".*"));
    }
}
