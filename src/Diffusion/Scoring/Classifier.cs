using System.Diagnostics;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>Square images as bytes [Count, Channels, Side, Side] with a class label each: MNIST, another data set, or a
/// synthetic stand-in.</summary>
public sealed record LabeledImages(byte[] Images, byte[] Labels, int Count, int Side, int Channels = 1)
{
    /// <summary>Bytes of one image.</summary>
    public int ImageBytes => Channels * Side * Side;

    /// <summary>An image set as labelled images (no copy).</summary>
    public static LabeledImages From(ImageSet set) => new(set.PixelArray(), set.Labels, set.Count, set.Size, set.Channels);

    /// <summary>The first <paramref name="count"/> images (no copy of the pixels beyond the slice).</summary>
    public LabeledImages Take(int count) =>
        new(Images[..(count * ImageBytes)], Labels[..count], Math.Min(count, Count), Side, Channels);
}

/// <summary>
/// The digit classifier that <c>ddpm eval</c> scores samples with, built from the engine's own ops:
///   conv 1→w 3×3 s1, SiLU; conv w→2w 3×3 s2, SiLU; conv 2w→2w 3×3 s2, SiLU  (28 → 14 → 7)
///   fc 2w·7·7 → 4w, SiLU (the penultimate features f); fc 4w → K (logits)
/// with w = 32 for MNIST (64·7·7 = 3136 → 128 → 10). The fully connected layers are convolutions whose kernel covers
/// the whole map (7×7, no padding, output 1×1) and then 1×1: the same arithmetic as a flatten and a linear layer
/// (weight [out, C, 7, 7] is the linear weight [out, C·49] in NCHW flatten order), without a reshape op on the tape.
/// Trained with softmax cross-entropy; inputs are x = p/127.5 - 1, as the diffusion model's.
/// </summary>
public sealed class Classifier : IDisposable
{
    private readonly Conv2dLayer _conv1, _conv2, _conv3, _fc, _head;

    /// <summary>A classifier with weights from <paramref name="seed"/> (PyTorch's default initialisation).</summary>
    public Classifier(Device device, ulong seed, int width = 32, int classes = 10, int side = Mnist.Side, int channels = 1)
    {
        if (width < 1 || classes < 2 || side < 4 || channels is not (1 or 3))
        {
            throw new ArgumentException($"classifier: width {width}, classes {classes}, side {side}, channels {channels} (need ≥ 1, ≥ 2, ≥ 4, 1 or 3)");
        }
        Device = device;
        Width = width;
        Classes = classes;
        Side = side;
        Channels = channels;
        int map = Halve(Halve(side));
        var f = new ParameterFactory(device, seed);
        _conv1 = new Conv2dLayer(f, "conv1", channels, width, 3);
        _conv2 = new Conv2dLayer(f, "conv2", width, 2 * width, 3, stride: 2);
        _conv3 = new Conv2dLayer(f, "conv3", 2 * width, 2 * width, 3, stride: 2);
        _fc = new Conv2dLayer(f, "fc", 2 * width, 4 * width, map, pad: 0);
        _head = new Conv2dLayer(f, "head", 4 * width, classes, 1);
        // One flat buffer, as the U-Net's: Adam steps it in one pass (the same element arithmetic as one parameter at a
        // time, so the trained bytes are the same).
        Parameters = f.Gather();
    }

    /// <summary>The largest width and class count a classifier file may claim (a byte label has 256 values; the engine's
    /// classifier is 32 wide): a file outside them is refused before anything is allocated.</summary>
    public const int MaxWidth = 256, MaxClasses = 256, MaxSide = 256;

    /// <summary>Every tensor's name and shape for these dimensions, in creation order, computed without building anything.</summary>
    public static IEnumerable<(string Name, int[] Shape)> Layout(int width, int classes, int side, int channels = 1)
    {
        int map = Halve(Halve(side));
        foreach (var (name, cin, cout, k) in new[] { ("conv1", channels, width, 3), ("conv2", width, 2 * width, 3), ("conv3", 2 * width, 2 * width, 3), ("fc", 2 * width, 4 * width, map), ("head", 4 * width, classes, 1) })
        {
            yield return ($"{name}.weight", [cout, cin, k, k]);
            yield return ($"{name}.bias", [cout]);
        }
    }

    /// <summary>The device the weights live on.</summary>
    public Device Device { get; }

    /// <summary>Channels of the first convolution (w).</summary>
    public int Width { get; }

    /// <summary>Number of classes K.</summary>
    public int Classes { get; }

    /// <summary>Side of the square input images.</summary>
    public int Side { get; }

    /// <summary>Channels of the input images (1 or 3).</summary>
    public int Channels { get; }

    /// <summary>Length of the penultimate feature vector: 4w.</summary>
    public int Features => 4 * Width;

    /// <summary>Every weight, in creation order (the order of the saved file).</summary>
    public ParameterSet Parameters { get; }

    /// <summary>The penultimate features f [N, 4w, 1, 1] and the logits [N, K, 1, 1] of images x [N, 1, Side, Side].</summary>
    public (Var Features, Var Logits) Forward(Tape g, Var x)
    {
        var h = g.Silu(_conv1.Forward(g, x));
        h = g.Silu(_conv2.Forward(g, h));
        h = g.Silu(_conv3.Forward(g, h));
        var features = g.Silu(_fc.Forward(g, h));
        return (features, _head.Forward(g, features));
    }

    // Output side of a 3×3 stride-2 convolution with padding 1.
    private static int Halve(int side) => (side - 1) / 2 + 1;

    /// <summary>
    /// Class probabilities softmax(logits) [Count, K] and penultimate features [Count, 4w] of every image, in batches
    /// on a no-grad tape.
    /// </summary>
    public (float[] Probabilities, float[] Features) Predict(LabeledImages data, int batch = 256)
    {
        CheckSide(data);
        var probs = new float[data.Count * Classes];
        var features = new float[data.Count * Features];
        using var tape = Tape.NoGrad(Device);
        int per = Channels * Side * Side;
        var host = new float[batch * per];
        var logits = new float[batch * Classes];
        for (int first = 0; first < data.Count; first += batch)
        {
            int n = Math.Min(batch, data.Count - first);
            FillPixels(data, first, n, host);
            using var x = Tensor.FromHost(Device, host.AsSpan(0, n * per), n, Channels, Side, Side);
            var (f, l) = Forward(tape, tape.Constant(x));
            f.Value.CopyTo(features.AsSpan(first * Features, n * Features));
            l.Value.CopyTo(logits.AsSpan(0, n * Classes));
            tape.Reset();
            for (int i = 0; i < n; i++)
            {
                Softmax(logits.AsSpan(i * Classes, Classes), probs.AsSpan((first + i) * Classes, Classes));
            }
        }
        return (probs, features);
    }

    /// <summary>The share of images whose most probable class is their label.</summary>
    public double Accuracy(LabeledImages data)
    {
        var (probs, _) = Predict(data);
        int right = 0;
        for (int i = 0; i < data.Count; i++)
        {
            if (ArgMax(probs.AsSpan(i * Classes, Classes)) == data.Labels[i])
            {
                right++;
            }
        }
        return (double)right / data.Count;
    }

    /// <summary>Index of the largest value (the first on ties).</summary>
    public static int ArgMax(ReadOnlySpan<float> v)
    {
        int best = 0;
        for (int i = 1; i < v.Length; i++)
        {
            if (v[i] > v[best])
            {
                best = i;
            }
        }
        return best;
    }

    /// <summary>p_k = exp(z_k - max z) / Σ_j exp(z_j - max z).</summary>
    public static void Softmax(ReadOnlySpan<float> z, Span<float> p)
    {
        float max = z[0];
        foreach (float v in z)
        {
            max = MathF.Max(max, v);
        }
        double sum = 0;
        for (int i = 0; i < z.Length; i++)
        {
            sum += Math.Exp(z[i] - max);
        }
        for (int i = 0; i < z.Length; i++)
        {
            p[i] = (float)(Math.Exp(z[i] - max) / sum);
        }
    }

    /// <summary>Writes images first..first+n-1 as x = p/127.5 - 1 into <paramref name="destination"/>.</summary>
    internal static void FillPixels(LabeledImages data, int first, int n, Span<float> destination)
    {
        int pixels = data.ImageBytes;
        var src = data.Images.AsSpan(first * pixels, n * pixels);
        for (int i = 0; i < src.Length; i++)
        {
            destination[i] = src[i] / 127.5f - 1f;
        }
    }

    internal void CheckSide(LabeledImages data)
    {
        if (data.Side != Side || data.Channels != Channels)
        {
            throw new ArgumentException($"classifier: images are {data.Channels}x{data.Side}x{data.Side}, the classifier takes {Channels}x{Side}x{Side}");
        }
    }

    /// <summary>The metadata key naming this file kind, and its value.</summary>
    public const string FormatKey = "format", FormatValue = "ddpm-digit-classifier";

    /// <summary>
    /// Writes the weights (names conv1.weight … head.bias) and the architecture to a safetensors file, atomically
    /// (a temporary file renamed over the target), with <paramref name="metadata"/> beside.
    /// </summary>
    public void Save(string path, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var meta = new Dictionary<string, string>(metadata ?? new Dictionary<string, string>())
        {
            [FormatKey] = FormatValue,
            ["width"] = Width.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["classes"] = Classes.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["side"] = Side.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["channels"] = Channels.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        SafeTensors.Write(path, Parameters.Select(p => (p.Name, p.Shape, p.Value.ToArray())), meta); // atomic: the old file or the new one
    }

    /// <summary>
    /// Loads a classifier saved by <see cref="Save"/>: the format tag, the architecture, exactly the expected tensor
    /// names with their shapes, and finite values are checked before any weight is used; anything else is a
    /// <see cref="CheckpointException"/> naming the file and the problem.
    /// </summary>
    public static Classifier Load(string path, Device device) => Load(SafeTensors.Read(path), device);

    /// <inheritdoc cref="Load(string, Device)"/>
    public static Classifier Load(SafeTensorsFile file, Device device)
    {
        string path = file.Label;
        if (!file.Metadata.TryGetValue(FormatKey, out var format) || format != FormatValue)
        {
            throw new CheckpointException($"{path}: not a digit classifier (metadata {FormatKey} is not {FormatValue})");
        }
        int width = MetaInt(file, "width", 1, MaxWidth), classes = MetaInt(file, "classes", 2, MaxClasses), side = MetaInt(file, "side", 4, MaxSide);
        // Files from before colour: one channel.
        int channels = file.Metadata.ContainsKey("channels") ? MetaInt(file, "channels", 1, 3) : 1;
        if (channels == 2)
        {
            throw new CheckpointException($"{path}: metadata channels = 2 (1 or 3 expected)");
        }
        // The shapes come from the tensors, never from the metadata alone: every tensor is checked against the layout the
        // metadata claims before a weight is allocated.
        var layout = Layout(width, classes, side, channels).ToList();
        var unexpected = file.Entries.Keys.Except(layout.Select(l => l.Name)).Order().FirstOrDefault();
        if (unexpected is not null)
        {
            throw new CheckpointException($"{path}: unexpected tensor {unexpected} in a classifier file");
        }
        foreach (var (name, shape) in layout)
        {
            if (!file.Entries.TryGetValue(name, out var entry))
            {
                throw new CheckpointException($"{path}: missing tensor {name}");
            }
            if (!entry.Shape.SequenceEqual(shape))
            {
                throw new CheckpointException($"{path}: tensor {name} has shape [{string.Join(", ", entry.Shape)}], but the metadata (width {width}, classes {classes}, side {side}, channels {channels}) gives [{string.Join(", ", shape)}]");
            }
        }
        var model = new Classifier(device, 0, width, classes, side, channels);
        try
        {
            var expected = model.Parameters.Select(p => p.Name).ToHashSet();
            var extra = file.Entries.Keys.Where(k => !expected.Contains(k)).Order().FirstOrDefault();
            if (extra is not null)
            {
                throw new CheckpointException($"{path}: unexpected tensor {extra} in a classifier file");
            }
            var weights = new float[model.Parameters.Count][];
            for (int i = 0; i < weights.Length; i++)
            {
                var p = model.Parameters[i];
                if (!file.Contains(p.Name))
                {
                    throw new CheckpointException($"{path}: missing tensor {p.Name}");
                }
                weights[i] = file.ReadFloats(p.Name, p.Shape);
                long bad = file.FirstNonFinite(p.Name);
                if (bad >= 0)
                {
                    throw new CheckpointException($"{path}: {p.Name}[{bad}] is not finite");
                }
            }
            for (int i = 0; i < weights.Length; i++)
            {
                model.Parameters[i].Value.CopyFrom(weights[i]);
            }
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    private static int MetaInt(SafeTensorsFile file, string key, int min, int max)
    {
        if (!file.Metadata.TryGetValue(key, out var text)
            || !int.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int v)
            || v < min || v > max)
        {
            throw new CheckpointException($"{file.Label}: metadata {key} is missing or not an integer in {min}..{max}");
        }
        return v;
    }

    /// <summary>Releases the weights and their gradients.</summary>
    public void Dispose()
    {
        foreach (var p in Parameters)
        {
            p.Value.Dispose();
            p.Grad?.Dispose();
        }
    }
}

/// <summary>
/// Trains a <see cref="Classifier"/> with Adam on softmax cross-entropy: each epoch visits the images in an order drawn
/// from (seed, epoch), in full batches (the last partial batch of an epoch is left out, so every step has the same
/// shapes and the tape allocates nothing after the first step).
/// </summary>
public sealed class ClassifierTrainer : IDisposable
{
    private readonly Tape _tape;
    private readonly Tensor _x, _labels;
    private readonly float[] _hostX, _hostLabels, _hostLoss = new float[1];
    private readonly Random _shifts;

    /// <summary>A trainer for <paramref name="model"/> at batch size <paramref name="batch"/> and learning rate <paramref name="lr"/>.</summary>
    public ClassifierTrainer(Classifier model, int batch = 128, float lr = 1e-3f, int seed = 0, int maxShift = 0)
    {
        Model = model;
        Batch = batch;
        Seed = seed;
        MaxShift = maxShift;
        _shifts = new Random(seed);
        Adam = new Adam(model.Parameters, lr);
        _tape = new Tape(model.Device);
        _x = Tensor.Empty(model.Device, batch, model.Channels, model.Side, model.Side);
        _labels = Tensor.Empty(model.Device, batch);
        _hostX = new float[_x.Length];
        _hostLabels = new float[batch];
    }

    /// <summary>The model being trained.</summary>
    public Classifier Model { get; }

    /// <summary>The optimizer.</summary>
    public Adam Adam { get; }

    /// <summary>Images per step.</summary>
    public int Batch { get; }

    /// <summary>Seed of the epochs' orders and of the shifts.</summary>
    public int Seed { get; }

    /// <summary>
    /// Augmentation: each training image is translated by (dx, dy) drawn uniformly from -MaxShift..MaxShift (the
    /// uncovered border is background, p = 0), so the classifier does not lean on exact stroke positions (0: none).
    /// </summary>
    public int MaxShift { get; }

    /// <summary>One step on images <paramref name="order"/>[first..first+Batch): forward, loss, backward, Adam. Returns the loss.</summary>
    public float Step(LabeledImages data, int[] order, int first)
    {
        int pixels = data.ImageBytes;
        for (int i = 0; i < Batch; i++)
        {
            int idx = order[first + i];
            var dst = _hostX.AsSpan(i * pixels, pixels);
            if (MaxShift > 0)
            {
                Shifted(data, idx, _shifts.Next(-MaxShift, MaxShift + 1), _shifts.Next(-MaxShift, MaxShift + 1), dst);
            }
            else
            {
                Classifier.FillPixels(data, idx, 1, dst);
            }
            _hostLabels[i] = data.Labels[idx];
        }
        _x.CopyFrom(_hostX);
        _labels.CopyFrom(_hostLabels);
        var ps = Model.Parameters;
        for (int i = 0; i < ps.Count; i++)
        {
            ps[i].ZeroGrad();
        }
        try
        {
            var (_, logits) = Model.Forward(_tape, _tape.Constant(_x));
            var loss = _tape.SoftmaxCrossEntropy(logits, _tape.Constant(_labels));
            loss.Value.CopyTo(_hostLoss);
            _tape.Backward(loss);
        }
        finally
        {
            _tape.Reset();
        }
        if (!float.IsFinite(_hostLoss[0]))
        {
            throw new InvalidOperationException($"classifier training: the loss went non-finite at Adam step {Adam.Step + 1}");
        }
        Adam.Update();
        return _hostLoss[0];
    }

    // Image idx moved by (dx, dy) as x = p/127.5 - 1: destination (y, x) reads source (y - dy, x - dx), or background -1.
    private static void Shifted(LabeledImages data, int idx, int dx, int dy, Span<float> destination)
    {
        int side = data.Side, plane = side * side;
        var image = data.Images.AsSpan(idx * data.ImageBytes, data.ImageBytes);
        for (int c = 0; c < data.Channels; c++)
        {
            var src = image.Slice(c * plane, plane);
            for (int y = 0; y < side; y++)
            {
                for (int x = 0; x < side; x++)
                {
                    int sy = y - dy, sx = x - dx;
                    destination[c * plane + y * side + x] = sy >= 0 && sy < side && sx >= 0 && sx < side ? src[sy * side + sx] / 127.5f - 1f : -1f;
                }
            }
        }
    }

    /// <summary>
    /// Trains <paramref name="epochs"/> epochs, the last <paramref name="decayedEpochs"/> of them at a tenth of the
    /// learning rate (a step decay: the steps at the full rate leave the weights jittering around a minimum that the
    /// smaller steps settle into); <paramref name="log"/> gets a line per epoch (mean loss, seconds).
    /// Returns the mean loss of each epoch.
    /// </summary>
    public List<double> Train(LabeledImages data, int epochs, Action<string>? log = null, int decayedEpochs = 0)
    {
        float baseLr = Adam.LearningRate;
        Model.CheckSide(data);
        if (data.Count < Batch)
        {
            throw new ArgumentException($"classifier training: {data.Count} images are fewer than one batch of {Batch}");
        }
        var losses = new List<double>();
        for (int epoch = 0; epoch < epochs; epoch++)
        {
            Adam.LearningRate = epoch >= epochs - decayedEpochs ? baseLr / 10 : baseLr;
            var clock = Stopwatch.StartNew();
            var order = Enumerable.Range(0, data.Count).ToArray();
            // Not HashCode.Combine: it is seeded per process, and the order must be the same in every run.
            new Random(unchecked(Seed * 1_000_003 + epoch) & int.MaxValue).Shuffle(order);
            double sum = 0;
            int steps = data.Count / Batch;
            for (int s = 0; s < steps; s++)
            {
                sum += Step(data, order, s * Batch);
            }
            losses.Add(sum / steps);
            log?.Invoke($"classifier epoch {epoch + 1}/{epochs} (lr {Adam.LearningRate:G2}): loss {sum / steps:F4}, {clock.Elapsed.TotalSeconds:F1} s");
        }
        Adam.LearningRate = baseLr;
        return losses;
    }

    /// <summary>Releases the tape, the batch buffers and Adam's state (not the model).</summary>
    public void Dispose()
    {
        _tape.Dispose();
        _x.Dispose();
        _labels.Dispose();
        Adam.Dispose();
    }
}

/// <summary>
/// The cached MNIST classifier of <c>ddpm eval</c>: ~/.cache/ddpm/classifier.safetensors (beside the MNIST cache),
/// trained once with fixed settings (seed 0, batch 128, Adam 1e-3, <see cref="Epochs"/> epochs of which the last two at
/// 1e-4, images shifted by up to ±2 pixels) and then only loaded,
/// so every score of every run comes from the same frozen weights.
/// </summary>
public static class ClassifierCache
{
    /// <summary>Epochs of the one training run.</summary>
    public const int Epochs = 5;

    /// <summary>The metadata key of the hash of the data set a classifier was trained on (<see cref="ImageSet.Hash"/>).</summary>
    public const string DataHashKey = ImageSet.HashKey;

    /// <summary>The cache file of the classifier of the data set whose hash is <paramref name="dataHash"/>: beside the MNIST
    /// cache (the parent of <see cref="Mnist.DefaultFolder"/>), classifier-HASH16.safetensors, so each data set scores with
    /// its own classifier.</summary>
    public static string PathFor(string dataHash) =>
        Path.Combine(Path.GetDirectoryName(Path.GetFullPath(Mnist.DefaultFolder))!, $"classifier-{dataHash[..16]}.safetensors");

    /// <summary>
    /// Loads the classifier at <paramref name="path"/> (the cache is <see cref="PathFor"/> the training set's hash), or (when it is
    /// missing or <paramref name="retrain"/>) trains one on <paramref name="train"/>, measures its accuracy on
    /// <paramref name="test"/> and saves both there (the accuracy and the data set's hash in the metadata). A classifier
    /// recorded as trained on another data set is refused, naming both hashes.
    /// </summary>
    public static Classifier LoadOrTrain(Device device, string path, ImageSet train, ImageSet test, bool retrain, int epochs = Epochs,
        Action<string>? log = null)
    {
        if (!retrain && File.Exists(path))
        {
            // One read: the data set is checked before anything is built.
            var file = SafeTensors.Read(path);
            if (file.Metadata.TryGetValue(DataHashKey, out var trainedOn) && trainedOn != train.Hash)
            {
                throw new CheckpointException(
                    $"{path}: a classifier of another data set (sha256 {trainedOn[..Math.Min(12, trainedOn.Length)]}..., --data is {train.Hash[..12]}...); leave out --classifier, or pass --train-classifier to train one for this data");
            }
            var loaded = Classifier.Load(file, device);
            log?.Invoke($"classifier: loaded {path}");
            return loaded;
        }
        if (train.ClassNames.Count < 2)
        {
            throw new DataException($"the training images have no labels ({train.ClassNames.Count} classes): the scoring classifier needs two or more (a folder's class subfolders)");
        }
        return Train(device, path, LabeledImages.From(train), LabeledImages.From(test), train.Hash, epochs, log, train.ClassNames.Count);
    }

    private static Classifier Train(Device device, string path, LabeledImages train, LabeledImages test, string dataHash, int epochs, Action<string>? log, int classes)
    {
        var model = new Classifier(device, seed: 0, classes: classes, side: train.Side, channels: train.Channels);
        try
        {
            var clock = Stopwatch.StartNew();
            using (var trainer = new ClassifierTrainer(model, batch: Math.Min(128, train.Count), lr: 1e-3f, seed: 0, maxShift: 2))
            {
                trainer.Train(train, epochs, log, decayedEpochs: 2);
            }
            double accuracy = model.Accuracy(test);
            model.Save(path, new Dictionary<string, string>
            {
                ["epochs"] = epochs.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["test_accuracy"] = accuracy.ToString("R", System.Globalization.CultureInfo.InvariantCulture),
                ["train_seconds"] = clock.Elapsed.TotalSeconds.ToString("F0", System.Globalization.CultureInfo.InvariantCulture),
                [DataHashKey] = dataHash,
            });
            log?.Invoke($"classifier: {epochs} epochs in {clock.Elapsed.TotalSeconds:F0} s, test accuracy {accuracy:P2}; saved to {path}");
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }
}
