using Ddpm.Nn;

namespace Ddpm.Tests;

/// <summary>
/// The same run on any number of cores: every reduction's order is a function of the shapes alone, so training steps give
/// the same bits at 1, 2 and 3 threads (the process's core count set by DOTNET_PROCESSOR_COUNT, which the CPU backend's
/// thread count follows). Separate processes: the count is read once per process.
/// </summary>
[Collection(ImageFolderCollection.Name)]
public sealed class ThreadCountTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-threads").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>Batch 12 (more images than threads) at 28x28 (the 7x7 maps' dense-column groups) and batch 2 at 16x16
    /// (fewer than three threads: the paths that split an image's work instead of the batch's).</summary>
    [Theory]
    [InlineData(12, 28)]
    [InlineData(2, 16)]
    public async Task TrainingStepsGiveTheSameBitsOnOneTwoAndThreeThreads(int batch, int side)
    {
        string images = Path.Combine(_dir, "shapes");
        ImageFolderTests.Draw(images, 8);
        var weights = new List<Dictionary<string, float[]>>();
        foreach (int threads in new[] { 1, 2, 3, 16 })
        {
            string run = Path.Combine(_dir, $"run{threads}");
            // RGB images, tiny: every convolution pass, GroupNorm, the reductions and Adam, three steps.
            var (code, output) = await Ddpm(threads, "train", "--data", images, "--image-size", $"{side}", "--preset", "tiny", "--batch", $"{batch}",
                "--max-steps", "3", "--grid", "0", "--out", run, "--device", "cpu", "--seed", "5");
            Assert.True(code == 0, output);
            var file = SafeTensors.Read(Path.Combine(run, "model.safetensors"));
            weights.Add(file.Entries.Keys.ToDictionary(name => name, name => file.ReadFloats(name, file.Entries[name].Shape)));
        }
        foreach (var (other, threads) in new[] { (weights[1], 2), (weights[2], 3), (weights[3], 16) })
        {
            var differing = weights[0].Keys.Where(name => !weights[0][name].AsSpan().SequenceEqual(other[name])).ToList();
            Assert.True(differing.Count == 0, $"{threads} threads give other bits than 1 in {differing.Count} tensors: {string.Join(", ", differing.Take(8))}");
        }
    }

    /// <summary>Runs the built ddpm.dll in a process of its own with <paramref name="threads"/> cores.</summary>
    private static async Task<(int Code, string Output)> Ddpm(int threads, params string[] args)
    {
        var start = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "ddpm.dll"));
        foreach (var a in args)
        {
            start.ArgumentList.Add(a);
        }
        start.Environment["DOTNET_PROCESSOR_COUNT"] = threads.ToString(System.Globalization.CultureInfo.InvariantCulture);
        start.Environment["DDPM_SELF_CHECK"] = "off";
        using var process = System.Diagnostics.Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync().WaitAsync(TimeSpan.FromMinutes(3));
        return (process.ExitCode, await stdout + await stderr);
    }
}
