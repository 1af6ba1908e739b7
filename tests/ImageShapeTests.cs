using Ddpm.Cli;
using Ddpm.Diffusion;
using Ddpm.Nn;
using Ddpm.Tensors;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace Ddpm.Tests;

/// <summary>
/// Images other than MNIST's 1 x 28 x 28 through the whole engine: the model's input and output channels, the trainer's
/// tensors, the checkpoint's image_channels, image_size and class names, a resume on other images refused, the sampler's
/// draws, and the colour grid and 4-D IDX file sample writes.
/// </summary>
public sealed class ImageShapeTests
{
    /// <summary>count RGB images of side 16 in three classes (red, green, blue squares on grey), labels 0, 1, 2 in turn.</summary>
    internal static ImageSet Coloured(int count, int side = 16)
    {
        int plane = side * side;
        var pixels = new byte[count * 3 * plane];
        var labels = new byte[count];
        var rng = new Random(5);
        for (int i = 0; i < count; i++)
        {
            int label = i % 3, x0 = rng.Next(side / 2), y0 = rng.Next(side / 2);
            labels[i] = (byte)label;
            for (int c = 0; c < 3; c++)
            {
                for (int y = 0; y < side; y++)
                {
                    for (int x = 0; x < side; x++)
                    {
                        bool inside = x >= x0 && x < x0 + side / 2 && y >= y0 && y < y0 + side / 2;
                        pixels[(i * 3 + c) * plane + y * side + x] = (byte)(inside ? (c == label ? 230 : 20) : 128);
                    }
                }
            }
        }
        return new ImageSet(pixels, labels, count, Channels: 3, Size: side) { ClassNames = ["red", "green", "blue"] };
    }

    [Fact]
    public void AnRgbModelTrainsSavesResumesAndSamplesAtItsSize()
    {
        var d = CpuDevice.Instance;
        var data = Coloured(24);
        var options = new TrainOptions { Preset = "tiny", Batch = 6, Epochs = 1, Seed = 1, Classes = 3 };
        string dir = Directory.CreateTempSubdirectory("ddpm-rgb").FullName;
        try
        {
            string path = Path.Combine(dir, "model.safetensors");
            using (var trainer = new Trainer(d, options, data))
            {
                Assert.Equal(3, trainer.Model.ImageChannels);
                Assert.Equal(new[] { 16, 3, 3, 3 }, trainer.Model["conv_in.weight"].Shape);
                Assert.Equal(new[] { 3, 16, 3, 3 }, trainer.Model["conv_out.weight"].Shape);
                for (int i = 0; i < 2; i++)
                {
                    Assert.True(float.IsFinite(trainer.TrainStep()));
                }
                trainer.Save(path);
            }
            var info = Checkpoint.Inspect(path);
            Assert.Equal((3, 16, 3), (info.ImageChannels, info.ImageSize, info.Classes));
            Assert.Equal(new[] { "red", "green", "blue" }, info.ClassNames);
            Assert.Equal("3", info.Metadata[Checkpoint.ImageChannelsKey]);

            using (var resumed = Trainer.Resume(d, path, data))
            {
                Assert.Equal(2, resumed.Step);
                Assert.True(float.IsFinite(resumed.TrainStep()));
            }
            // Other images than the run's: refused before anything is built.
            var grey = new ImageSet(new byte[24 * 16 * 16], [.. Enumerable.Range(0, 24).Select(i => (byte)(i % 3))], 24, Channels: 1, Size: 16)
            {
                ClassNames = ["a", "b", "c"],
            };
            Assert.Contains("3-channel 16x16 images, --data gives 1-channel 16x16", Assert.Throws<UsageException>(() => Trainer.Resume(d, path, grey)).Message);
            // A grayscale model does not load the RGB weights.
            Assert.Contains("3-channel images", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, new UNet(16, d, classes: 3))).Message);

            // The sampler draws images of the model's shape.
            var model = new UNet(16, d, classes: 3, imageChannels: 3) { ImageSize = info.ImageSize };
            Checkpoint.Load(info, model);
            var plan = Sampler.Plan(NoiseSchedule.ByName("linear", 300), SamplerKind.Ddim, steps: 3);
            var images = Sampler.Run(model, 2, plan, seed: 4, labels: [0f, 2f], guidance: 2f);
            Assert.Equal(2 * 3 * 16 * 16, images.Length);

            // Written in colour: a grid of RGB tiles, an IDX file of n x 3 x 16 x 16.
            var shape = new ImageShape(3, 16);
            string png = Path.Combine(dir, "grid.png"), idx = Path.Combine(dir, Images.IdxName(shape));
            var red = new float[3 * 16 * 16];
            Array.Fill(red, -1f);
            Array.Fill(red, 1f, 0, 16 * 16); // the red plane full
            Images.SaveGrid(png, red, 1, shape: shape);
            using (var grid = Image.Load<Rgba32>(png))
            {
                Assert.Equal(new Rgba32(255, 0, 0), grid[2 * 2 + 1, 2 * 2 + 1]);
            }
            Images.SaveIdx(idx, images, 2, shape);
            var read = Mnist.ReadIdx(idx);
            Assert.Equal("samples-idx4-ubyte", Path.GetFileName(idx));
            Assert.Equal(2, read.Count);
            Assert.Equal(new[] { 3, 16, 16 }, read.ItemShape);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>The spec's "Other images": only conv_in and conv_out change; RGB tiny has 279,987 parameters.</summary>
    [Fact]
    public void AnRgbTinyModelHasTheSpecsParameterCount()
    {
        var model = new UNet(16, CpuDevice.Instance, imageChannels: 3);
        Assert.Equal(279_987, model.ParameterCount);
        Assert.Throws<ArgumentException>(() => new UNet(16, CpuDevice.Instance, imageChannels: 2));
    }

    [Fact]
    public void ClassesMustBeTheDatasOwnCount()
    {
        var data = Coloured(12);
        var e = Assert.Throws<UsageException>(() => new Trainer(CpuDevice.Instance, new TrainOptions { Preset = "tiny", Batch = 4, Epochs = 1, Classes = 10 }, data));
        Assert.Contains("--classes 10: the data has 3 classes (red, green, blue); pass --classes 3", e.Message);
    }
}

/// <summary>--flip: an image is mirrored when its (seed, step, image) bit says so, and a resumed run flips as the straight one.</summary>
public sealed class FlipTests
{
    [Fact]
    public void FlipsMirrorRowsAndResumeExactly()
    {
        var data = ImageShapeTests.Coloured(12);
        var plain = new float[data.ImageBytes];
        var flipped = new float[data.ImageBytes];
        data.CopyImage(4, plain);
        data.CopyImage(4, flipped, flip: true);
        for (int c = 0; c < 3; c++)
        {
            for (int y = 0; y < 16; y++)
            {
                for (int x = 0; x < 16; x++)
                {
                    Assert.Equal(plain[(c * 16 + y) * 16 + x], flipped[(c * 16 + y) * 16 + 15 - x]);
                }
            }
        }

        var d = CpuDevice.Instance;
        var options = new TrainOptions { Preset = "tiny", Batch = 4, Epochs = 3, Seed = 9, Flip = true };
        using var straight = new Trainer(d, options, data);
        int flips = Enumerable.Range(0, 6).Sum(step => Enumerable.Range(0, 12).Count(i => straight.Flips(step, i)));
        Assert.InRange(flips, 18, 54); // about half of 72
        var want = Enumerable.Range(0, 6).Select(_ => straight.TrainStep()).ToArray();
        string path = Path.Combine(Directory.CreateTempSubdirectory("ddpm-flip").FullName, "model.safetensors");
        var got = new List<float>();
        using (var first = new Trainer(d, options, data))
        {
            got.AddRange(Enumerable.Range(0, 3).Select(_ => first.TrainStep()));
            first.Save(path);
        }
        using (var resumed = Trainer.Resume(d, path, data))
        {
            Assert.True(resumed.Options.Flip);
            got.AddRange(Enumerable.Range(0, 3).Select(_ => resumed.TrainStep()));
        }
        Assert.Equal(want, got);
        // Without flips the losses differ: the flips reach the batch.
        using var unflipped = new Trainer(d, options with { Flip = false }, data);
        Assert.NotEqual(want, Enumerable.Range(0, 6).Select(_ => unflipped.TrainStep()).ToArray());
        Directory.Delete(Path.GetDirectoryName(path)!, recursive: true);
    }
}
