using Ddpm.Cli;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Tests;

/// <summary>The command line as a user meets it: wrong flags, missing or foreign checkpoints and
/// broken data get one line on stderr and a non-zero exit; sample writes its three files.
/// Serial: the tests swap the process's console writers.</summary>
[Collection(CliCollection.Name)]
public sealed class CliTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-cli").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>Runs <c>ddpm ARGS</c> in-process with the console captured.</summary>
    internal static (int Code, string Err, string Out) Run(params string[] args)
    {
        var (err, output) = (new StringWriter(), new StringWriter());
        var (oldErr, oldOut) = (Console.Error, Console.Out);
        Console.SetError(err);
        Console.SetOut(output);
        try
        {
            return (Program.Main(args), err.ToString(), output.ToString());
        }
        finally
        {
            Console.SetError(oldErr);
            Console.SetOut(oldOut);
        }
    }

    private static void OneLineError((int Code, string Err, string Out) r, int code, string contains)
    {
        Assert.Equal(code, r.Code);
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines, l => l.StartsWith("ddpm: ", StringComparison.Ordinal));
        Assert.Contains(contains, r.Err);
    }

    /// <summary>A user's own images end to end: train on a folder of colour squares in class subfolders at --image-size 16,
    /// resume, sample in colour; a side the U-Net cannot take and a folder without images are one line each.</summary>
    [Fact]
    public void TrainResumeAndSampleOnAFolderOfColourImages()
    {
        string images = Path.Combine(_dir, "shapes"), run = Path.Combine(_dir, "run"), samples = Path.Combine(_dir, "drawn");
        ImageFolderTests.Draw(images, 8);
        var cached = new List<string>();
        try
        {
            var trained = Run("train", "--data", images, "--image-size", "16", "--classes", "3", "--preset", "tiny", "--max-steps", "4", "--batch", "6",
                "--out", run, "--grid", "9", "--device", "cpu");
            Assert.True(trained.Code == 0, trained.Err);
            Assert.Contains("24 images from", trained.Err);
            Assert.Contains("3 classes by subfolder (blue, green, red)", trained.Err);
            cached.AddRange(System.Text.RegularExpressions.Regex.Matches(trained.Err, @"cached in (\S+\.bin)").Select(m => m.Groups[1].Value));
            var info = Checkpoint.Inspect(Path.Combine(run, TrainCommand.CheckpointFile));
            Assert.Equal((3, 16, 3), (info.ImageChannels, info.ImageSize, info.Classes));

            var resumed = Run("train", "--resume", "--out", run, "--data", images, "--image-size", "16", "--max-steps", "6", "--device", "cpu");
            Assert.True(resumed.Code == 0, resumed.Err);
            Assert.Contains("from the cache", resumed.Err);
            Assert.Contains("resuming at step 4", resumed.Err);

            var drawn = Run("sample", "--checkpoint", Path.Combine(run, TrainCommand.CheckpointFile), "--n", "4", "--sampler", "ddim", "--steps", "5",
                "--out", samples, "--device", "cpu");
            Assert.True(drawn.Code == 0, drawn.Err);
            Assert.Contains("3x16x16 images", drawn.Err);
            Assert.True(File.Exists(Path.Combine(samples, "samples-idx4-ubyte")));
            using var grid = SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.Rgba32>(Path.Combine(samples, "samples.png"));
            bool colour = false;
            grid.ProcessPixelRows(rows =>
            {
                for (int y = 0; y < rows.Height && !colour; y++)
                {
                    foreach (var p in rows.GetRowSpan(y))
                    {
                        colour |= p.R != p.G || p.G != p.B;
                    }
                }
            });
            Assert.True(colour, "samples.png of an RGB model is grey");

            // A class by name (the checkpoint's), every class in rows, a name it does not have, and --digit on it.
            string model = Path.Combine(run, TrainCommand.CheckpointFile);
            var red = Run("sample", "--checkpoint", model, "--class", "red", "--n", "2", "--sampler", "ddim", "--steps", "3", "--out", Path.Combine(_dir, "red"), "--device", "cpu",
                "--png-files");
            Assert.True(red.Code == 0, red.Err);
            using (var one = SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.Rgb24>(Path.Combine(_dir, "red", SampleCommand.PngFolder, "000001.png")))
            {
                Assert.Equal((16, 16), (one.Width, one.Height));
            }
            Assert.Contains("classes: blue, green, red", red.Err);
            Assert.Contains("class red with guidance", red.Err);
            var rows = Run("sample", "--checkpoint", model, "--class", "all", "--n", "2", "--sampler", "ddim", "--steps", "3", "--out", Path.Combine(_dir, "rows"), "--device", "cpu");
            Assert.True(rows.Code == 0, rows.Err);
            Assert.Contains("sampling 6 3x16x16 images", rows.Err);
            OneLineError(Run("sample", "--checkpoint", model, "--class", "purple", "--out", Path.Combine(_dir, "purple"), "--device", "cpu"), 2, "classes are blue, green, red");

            // Scored on the folder's own labels: a classifier of 3x16x16 images learns them (every tenth image held out), the
            // samples are written as idx4, the report's grid in colour.
            var scored = Run("eval", "--samples", run, "--data", images, "--n", "6", "--sampler", "ddim", "--steps", "3", "--report", Path.Combine(_dir, "report"), "--device", "cpu");
            Assert.True(scored.Code == 0, scored.Err);
            cached.AddRange(System.Text.RegularExpressions.Regex.Matches(scored.Err, @"saved to (\S+\.safetensors)").Select(m => m.Groups[1].Value));
            Assert.Contains("\"reference\":\"the test set of", scored.Out);
            Assert.True(File.Exists(Path.Combine(_dir, "report", "samples-idx4-ubyte")));
            using (var byClass = SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.Rgba32>(Path.Combine(_dir, "report", EvalReport.GridFile)))
            {
                Assert.True(byClass.Width > 0);
            }
            // An unlabelled folder cannot be scored: one line.
            string flat = Path.Combine(_dir, "flat");
            ImageFolderTests.Square(Path.Combine(flat, "a.png"), new SixLabors.ImageSharp.PixelFormats.Rgb24(200, 0, 0), 16, 16);
            ImageFolderTests.Square(Path.Combine(flat, "b.png"), new SixLabors.ImageSharp.PixelFormats.Rgb24(0, 200, 0), 16, 16);
            var unlabelled = Run("eval", "--data", flat, "--device", "cpu");
            cached.AddRange(System.Text.RegularExpressions.Regex.Matches(unlabelled.Err, @"cached in (\S+\.bin)").Select(m => m.Groups[1].Value));
            OneLineError(unlabelled, 1, "unlabelled images");
            OneLineError(Run("sample", "--checkpoint", model, "--digit", "3", "--out", Path.Combine(_dir, "three"), "--device", "cpu"), 2, "pick one with --class NAME");

            OneLineError(Run("train", "--data", images, "--image-size", "30", "--out", Path.Combine(_dir, "odd"), "--device", "cpu"), 2, "the nearest: 28 or 32");
            // A small set at the recipe's epochs: a note says what to ask for (24 images at batch 12: 2 steps an epoch, 24 in all).
            var few = Run("train", "--data", images, "--image-size", "8", "--batch", "12", "--grid", "0", "--out", Path.Combine(_dir, "few"), "--device", "cpu");
            Assert.True(few.Code == 0, few.Err);
            Assert.Contains("note: 24 images at batch 12 are 2 steps an epoch, 24 in all", few.Err);
            Assert.Contains("pass --epochs 1000", few.Err);
            cached.AddRange(System.Text.RegularExpressions.Regex.Matches(few.Err, @"cached in (\S+\.bin)").Select(m => m.Groups[1].Value));
            string text = Path.Combine(_dir, "text");
            Directory.CreateDirectory(text);
            File.WriteAllText(Path.Combine(text, "readme.txt"), "no pictures");
            OneLineError(Run("train", "--data", text, "--out", Path.Combine(_dir, "none"), "--device", "cpu"), 1, "no images");
        }
        finally
        {
            foreach (var file in cached)
            {
                File.Delete(file);
            }
        }
    }

    /// <summary>The repository's README.md (found above the test binaries).</summary>
    internal static string Readme() => File.ReadAllText(Path.Combine(RepoRoot(), "README.md"));

    /// <summary>The repository's root: the folder above the test binaries that holds Ddpm.sln.</summary>
    internal static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Ddpm.sln")))
            {
                return dir.FullName;
            }
        }
        throw new FileNotFoundException("no Ddpm.sln above " + AppContext.BaseDirectory);
    }

    /// <summary>The README's usage block of <c>train</c> names every flag that <c>train --help</c> lists, and its recipes are
    /// the ones the command takes, each with the summary the help gives (a new flag or recipe fails here until documented).</summary>
    [Fact]
    public void TheReadmeNamesEveryTrainFlagAndRecipe()
    {
        var help = Run("train", "--help");
        Assert.Equal(0, help.Code);
        var flags = System.Text.RegularExpressions.Regex.Matches(help.Out, @"^\s+(--[a-z0-9-]+)", System.Text.RegularExpressions.RegexOptions.Multiline)
            .Select(m => m.Groups[1].Value).ToList();
        // The options every command takes (--help, --gpu-kernels) are the root's: the README gives them apart.
        var global = System.Text.RegularExpressions.Regex.Matches(Run("--help").Out, @"^\s+(?:-\S+, )*(--[a-z0-9-]+)", System.Text.RegularExpressions.RegexOptions.Multiline)
            .Select(m => m.Groups[1].Value).ToHashSet();
        flags.RemoveAll(f => global.Contains(f) || f == "--help");
        Assert.Contains("--ema-warmup", flags);
        string readme = Readme();
        int start = readme.IndexOf("ddpm train  [", StringComparison.Ordinal);
        Assert.True(start >= 0, "README has no 'ddpm train  [' usage block");
        string usage = readme[start..readme.IndexOf("ddpm sample", start, StringComparison.Ordinal)];
        Assert.All(flags, f => Assert.Contains($"[{f}", usage));
        Assert.Contains($"[--recipe {string.Join("|", Recipe.Names)}]", usage);
        foreach (var recipe in Recipe.All)
        {
            Assert.Contains($"{recipe.Name} ({recipe.Summary})", help.Out.Replace("\n", " ", StringComparison.Ordinal).Replace("  ", " ", StringComparison.Ordinal));
        }
    }

    /// <summary>train --help gives each recipe's value of the flags a recipe sets, from the recipes themselves.</summary>
    [Fact]
    public void TrainHelpShowsEachRecipesDefaults()
    {
        var help = Run("train", "--help").Out;
        string Line(string flag) => help.Split('\n').Single(l => l.TrimStart().StartsWith(flag + " ", StringComparison.Ordinal));
        foreach (var r in Recipe.All)
        {
            Assert.Contains($"{r.Name} {r.Epochs}", Line("--epochs"));
            Assert.Contains($"{r.Name} {r.Schedule}", Line("--schedule"));
            Assert.Contains($"{r.Name} {r.Ema.ToString(System.Globalization.CultureInfo.InvariantCulture)}", Line("--ema"));
        }
    }

    /// <summary>The README's table of environment variables is the program's list (<see cref="EnvironmentSettings.All"/>):
    /// every variable it reads, what each takes and does, in one row each.</summary>
    [Fact]
    public void TheReadmeListsEveryEnvironmentVariableTheProgramReads()
    {
        string readme = Readme();
        foreach (var v in EnvironmentSettings.All)
        {
            Assert.Contains($"| `{v.Name}` | {v.Takes} | {v.Does} |", readme);
        }
        var rows = System.Text.RegularExpressions.Regex.Matches(readme, @"^\| `([A-Z_]+)` \|", System.Text.RegularExpressions.RegexOptions.Multiline).Select(m => m.Groups[1].Value);
        Assert.Equal(EnvironmentSettings.All.Select(v => v.Name).Order(), rows.Order());
    }

    [Theory]
    [InlineData(new[] { "train", "--preset", "huge" }, "huge")]
    [InlineData(new[] { "train", "--batch", "many" }, "many")]
    [InlineData(new[] { "train", "--epochs" }, "--epochs")]
    [InlineData(new[] { "sample", "--sampler", "euler" }, "euler")]
    [InlineData(new[] { "sample", "--recipe", "wild" }, "wild")]
    [InlineData(new[] { "train", "--recipe", "wild" }, "wild")]
    [InlineData(new[] { "sample", "--steps", "5" }, "--steps applies to --sampler ddim or dpm++ only")]
    [InlineData(new[] { "sample", "--sampler", "dpm++", "--variance", "small" }, "--variance applies to --sampler ddpm only")]
    [InlineData(new[] { "sample", "--sampler", "ddim", "--variance", "small" }, "--variance applies to --sampler ddpm only")]
    [InlineData(new[] { "bench", "--device", "tpu" }, "tpu")]
    [InlineData(new[] { "frobnicate" }, "frobnicate")]
    public void WrongFlagsAreOneLineAndExitTwo(string[] args, string contains) => OneLineError(Run(args), ExitCodes.Usage, contains);

    /// <summary>bench's one JSON line carries the keys scripts/gpu-check.sh and scripts/bench-vs-torch.sh read, the pool's
    /// peak among them: at least the four copies of the parameters that are live for the whole run (values, gradients, Adam's
    /// M and V; 4 bytes each).</summary>
    [Fact]
    public void BenchPrintsStepTimesAndThePoolPeak()
    {
        var r = Run("bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--device", "cpu");
        Assert.Equal(0, r.Code);
        using var json = System.Text.Json.JsonDocument.Parse(r.Out.Trim().Split('\n')[^1]);
        var root = json.RootElement;
        Assert.True(root.GetProperty("train_step_ms").GetDouble() > 0);
        Assert.True(root.GetProperty("denoise_step_ms").GetDouble() > 0);
        double parametersMib = 4 * 4.0 * root.GetProperty("params").GetInt64() / (1024 * 1024);
        double peak = root.GetProperty("peak_mem_mib").GetDouble();
        Assert.True(peak >= parametersMib, $"peak {peak} MiB below the parameters' four copies, {parametersMib:F1} MiB");
    }

    /// <summary>`check --ptx` writes a PTX file a loaded kernel, the tiled ones apart, for the sm asked for (here the kernels
    /// `--only` names: every kernel's PTX is compiled by CI's compiler step and PtxTests); a CUDA version that is not
    /// major.minor, an `--only` part that names no kernel and `--only` without `--ptx` are usage errors.</summary>
    [Fact]
    public void CheckPtxWritesEveryKernelForPtxas()
    {
        var folder = Path.Combine(_dir, "ptx");
        var r = Run("check", "--ptx", folder, "--sm", "90", "--cuda", "12.4", "--only", "TiledReduce.RowSumsKernel,TiledGemm.Kernel.ConvForwardTile,Elementwise.RowSums");
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("wrote the PTX of 3 kernels", r.Out);
        Assert.Equal(3, Directory.GetFiles(folder, "*.ptx", SearchOption.AllDirectories).Length);
        OneLineError(Run("check", "--ptx", folder, "--only", "NoSuchKernel"), ExitCodes.Usage, "--only NoSuchKernel");
        OneLineError(Run("check", "--only", "RowSums"), ExitCodes.Usage, "--only applies to --ptx");
        var rows = File.ReadAllText(Path.Combine(folder, "tiled", "TiledReduce.RowSumsKernel.ptx"));
        Assert.Contains(".entry", rows);
        Assert.Contains("bar.sync", rows);
        Assert.Contains(".version 8.4", rows);
        Assert.True(File.Exists(Path.Combine(folder, "tiled", "TiledGemm.Kernel.ConvForwardTile.ptx")));
        Assert.True(File.Exists(Path.Combine(folder, "implicit", "Elementwise.RowSumsKernel.ptx")));
        Assert.Contains("for sm_90", r.Out);
        OneLineError(Run("check", "--ptx", folder, "--cuda", "twelve"), ExitCodes.Usage, "--cuda twelve");
        // The GPU kernel of the tiled GEMM, with its launch bounds (check --ptx compiles what a GPU loads).
        var forward = File.ReadAllText(Path.Combine(folder, "tiled", "TiledGemm.Kernel.ConvForwardTile.ptx"));
        Assert.Contains(".maxntid 128", forward);
        Assert.Contains(".minnctapersm 3", forward);
        Assert.Contains("ld.global", forward);
        Assert.Contains("ld.shared.v4.f32", forward);
    }

    /// <summary>`check --sass` needs a folder holding ptxas and nvdisasm, and says so in one line otherwise.</summary>
    [Fact]
    public void CheckSassWithoutTheToolsIsAUsageError() =>
        OneLineError(Run("check", "--sass", _dir), ExitCodes.Usage, "no ptxas and nvdisasm there");

    [Fact]
    public void PtxFromWithoutSassIsAUsageError() =>
        OneLineError(Run("check", "--ptx-from", _dir), ExitCodes.Usage, "--ptx-from applies to --sass");

    /// <summary>A ptxas that fails (here a script that knows its version and exits 3 on anything else) stops `check --sass`
    /// with its own line and exit 1, and leaves no temporary folder.</summary>
    [SkippableFact]
    public void CheckSassStopsAtAFailingPtxasWithItsLine()
    {
        Skip.If(OperatingSystem.IsWindows(), "the planted tools are shell scripts");
        string tools = Directory.CreateDirectory(Path.Combine(_dir, "tools")).FullName;
        foreach (var name in new[] { "ptxas", "nvdisasm" })
        {
            string file = Path.Combine(tools, name);
            File.WriteAllText(file, "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'Cuda compilation tools, release 11.8, V11.8.89'; exit 0; }\n" +
                "echo 'ptxas fatal: planted failure' >&2\nexit 3\n");
            if (!OperatingSystem.IsWindows())
            {
                File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            }
        }
        var before = Directory.GetDirectories(Path.GetTempPath(), Ddpm.Storage.Durable.TempMark + "sass-*").ToHashSet();
        var r = Run("check", "--sass", tools);
        OneLineError(r, ExitCodes.Failure, "exit 3: ptxas fatal: planted failure");
        Assert.Subset(before, Directory.GetDirectories(Path.GetTempPath(), Ddpm.Storage.Durable.TempMark + "sass-*").ToHashSet());
    }

    [Fact]
    public void MissingCheckpoint()
    {
        OneLineError(Run("sample", "--checkpoint", Path.Combine(_dir, "none.safetensors")), ExitCodes.Failure, "does not exist");
        OneLineError(Run("train", "--resume", "--out", _dir, "--data", _dir), ExitCodes.Failure, "does not exist");
    }

    [Fact]
    public void CorruptCheckpoint()
    {
        var path = Path.Combine(_dir, "bad.safetensors");
        File.WriteAllBytes(path, [9, 9, 9, 9]);
        OneLineError(Run("sample", "--checkpoint", path), ExitCodes.Failure, "not a valid safetensors file");
    }

    [Fact]
    public void CheckpointOfAnotherPresetOnResume()
    {
        using (var trainer = new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = 2 }, new ImageSet(new byte[4 * 784], new byte[4], 4)))
        {
            trainer.Save(Path.Combine(_dir, TrainCommand.CheckpointFile));
        }
        OneLineError(Run("train", "--resume", "--preset", "small", "--out", _dir, "--data", _dir), ExitCodes.Usage, "holds a tiny model, not small");
    }

    [Fact]
    public void NewRunRefusesToOverwriteAnOldOne()
    {
        File.WriteAllBytes(Path.Combine(_dir, TrainCommand.CheckpointFile), [1]);
        OneLineError(Run("train", "--out", _dir), ExitCodes.Failure, "--resume");
        Assert.Equal([1], File.ReadAllBytes(Path.Combine(_dir, TrainCommand.CheckpointFile)));
    }

    [Fact]
    public void BrokenDataNamesTheFile()
    {
        var data = Path.Combine(_dir, "data");
        Directory.CreateDirectory(data);
        foreach (var (name, _) in Mnist.Files)
        {
            File.WriteAllBytes(Path.Combine(data, name), [0, 0, 8, 3, 0, 0, 0, 0]);
        }
        OneLineError(Run("train", "--data", data, "--out", Path.Combine(_dir, "run")), ExitCodes.Failure, "train-images-idx3-ubyte");
    }

    [Fact]
    public void SampleWritesGridIdxAndAnimation()
    {
        var checkpoint = Path.Combine(_dir, "tiny.safetensors");
        var model = new UNet(16, CpuDevice.Instance, seed: 1);
        using (var ema = new Ema(model.Parameters, 0.9f))
        {
            Checkpoint.Save(checkpoint, model, ema: ema);
        }
        var output = Path.Combine(_dir, "out");
        var r = Run("sample", "--checkpoint", checkpoint, "--n", "3", "--sampler", "ddim", "--steps", "4", "--seed", "2", "--device", "cpu", "--out", output);
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("EMA", r.Err);
        var idx = Mnist.ParseIdx("samples", File.ReadAllBytes(Path.Combine(output, "samples-idx3-ubyte")));
        Assert.Equal(3, idx.Count);
        Assert.Equal([28, 28], idx.ItemShape);
        Assert.True(new FileInfo(Path.Combine(output, "samples.png")).Length > 100);
        Assert.True(new FileInfo(Path.Combine(output, "reverse.gif")).Length > 100);
        // Same seed, same digits.
        var again = Path.Combine(_dir, "again");
        Assert.Equal(0, Run("sample", "--checkpoint", checkpoint, "--n", "3", "--sampler", "ddim", "--steps", "4", "--seed", "2", "--device", "cpu", "--out", again).Code);
        Assert.Equal(File.ReadAllBytes(Path.Combine(output, "samples-idx3-ubyte")), File.ReadAllBytes(Path.Combine(again, "samples-idx3-ubyte")));
        // DPM-Solver++ with the seed's unclipped recipe runs end to end and says what it ran.
        var dpm = Run("sample", "--checkpoint", checkpoint, "--n", "2", "--sampler", "dpm++", "--steps", "3", "--recipe", "seed", "--device", "cpu", "--out", Path.Combine(_dir, "dpm"));
        Assert.True(dpm.Code == 0, dpm.Err);
        Assert.Contains("dpm++ (2M) 3 steps eta 1 (SDE), the seed recipe's unclipped step", dpm.Err);
    }

    [Fact]
    public void DigitNeedsAConditionalCheckpoint()
    {
        var checkpoint = Path.Combine(_dir, "plain.safetensors");
        Checkpoint.Save(checkpoint, new UNet(16, CpuDevice.Instance, seed: 1));
        OneLineError(Run("sample", "--checkpoint", checkpoint, "--digit", "7", "--device", "cpu", "--out", Path.Combine(_dir, "o")), ExitCodes.Usage, "unconditional");
        OneLineError(Run("sample", "--checkpoint", checkpoint, "--guidance", "2", "--device", "cpu"), ExitCodes.Usage, "--guidance applies with --digit or --class only");
        OneLineError(Run("sample", "--checkpoint", checkpoint, "--digit", "11"), ExitCodes.Usage, "11");
    }

    [Fact]
    public void DigitAllWritesOneRowPerDigit()
    {
        var checkpoint = Path.Combine(_dir, "cond.safetensors");
        Checkpoint.Save(checkpoint, new UNet(16, CpuDevice.Instance, seed: 1, classes: 10));
        var output = Path.Combine(_dir, "all");
        var r = Run("sample", "--checkpoint", checkpoint, "--digit", "all", "--n", "2", "--sampler", "ddim", "--steps", "3", "--device", "cpu", "--out", output);
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("digit all with guidance 3", r.Err);
        Assert.Equal(20, Mnist.ParseIdx("samples", File.ReadAllBytes(Path.Combine(output, "samples-idx3-ubyte"))).Count);
        using (var grid = SixLabors.ImageSharp.Image.Load(Path.Combine(output, "samples.png")))
        {
            // 10 rows of 2 tiles: the grid is 5 times taller than wide (tiles and gaps alike).
            Assert.Equal(5 * (grid.Width - 2 * 2) + 2 * 2, grid.Height);
        }
        // Unguided (label 10) works on the same checkpoint; one digit with a guidance weight too.
        Assert.Equal(0, Run("sample", "--checkpoint", checkpoint, "--n", "2", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--out", Path.Combine(_dir, "u")).Code);
        var seven = Run("sample", "--checkpoint", checkpoint, "--digit", "7", "--guidance", "1.5", "--n", "2", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--out", Path.Combine(_dir, "s"));
        Assert.True(seven.Code == 0, seven.Err);
    }

    [Fact]
    public void InfoSaysWhatAutoPicksAndWhy()
    {
        var r = Run("info");
        Assert.Equal(0, r.Code);
        Assert.Contains("auto picks:", r.Out);
        Assert.Contains("why:", r.Out);
    }
}

[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class CliCollection
{
    public const string Name = "cli";
}
