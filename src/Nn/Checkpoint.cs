using System.Globalization;
using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// Model checkpoints as safetensors, in the model spec's names and layouts: the weights under
/// their own names (so the PyTorch peer loads them), Adam's moments under "adam.m.NAME" and
/// "adam.v.NAME", EMA weights under "ema.NAME", run metadata (step, epoch, preset, schedule,
/// seed, ...) in __metadata__. Loading checks every name and shape before changing the model.
/// </summary>
public static class Checkpoint
{
    /// <summary>Metadata key of the base width.</summary>
    public const string ChannelsKey = "channels";

    /// <summary>Metadata key of the class count of a class-conditional model (absent or "0": unconditional).</summary>
    public const string ClassesKey = "classes";

    /// <summary>The class count of MNIST's conditional model (the digits; label 10 = none).</summary>
    public const int ConditionalClasses = 10;

    /// <summary>The most classes a conditional model may have (a folder of images labelled by subfolder): a bound on what a
    /// file may claim.</summary>
    public const int MaxClasses = 1000;

    /// <summary>Metadata keys of the images' channel count and side (absent: 1 and 28, MNIST's). The <see cref="ChannelsKey"/>
    /// key stays the U-Net's width.</summary>
    public const string ImageChannelsKey = "image_channels", ImageSizeKey = "image_size";

    /// <summary>Metadata key of a conditional model's class names (a JSON array of strings, in label order).</summary>
    public const string ClassNamesKey = "class_names";

    /// <summary>The image sides a checkpoint may claim: multiples of 4 (two downsamplings) from 4 to this.</summary>
    public const int MaxImageSize = 512;

    /// <summary>The image side when a checkpoint records none (MNIST's).</summary>
    public const int DefaultImageSize = 28;

    /// <summary>Metadata key of Adam's step count.</summary>
    public const string AdamStepKey = "adam.step";

    /// <summary>Writes the model (and, when given, Adam's moments and the EMA weights) atomically.</summary>
    public static void Save(string path, UNet model, Adam? adam = null, Ema? ema = null, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var tensors = new List<(string, int[], float[])>();
        var ps = model.Parameters;
        for (int i = 0; i < ps.Count; i++)
        {
            tensors.Add((ps[i].Name, ps[i].Shape, ps[i].Value.ToArray()));
        }
        var meta = new Dictionary<string, string>(metadata ?? new Dictionary<string, string>())
        {
            [ChannelsKey] = model.Channels.ToString(CultureInfo.InvariantCulture),
            ["preset"] = Presets.NameOf(model.Channels) ?? "custom",
            ["format"] = "ddpm-unet-v1",
            [ImageChannelsKey] = model.ImageChannels.ToString(CultureInfo.InvariantCulture),
        };
        if (model.Classes > 0)
        {
            meta[ClassesKey] = model.Classes.ToString(CultureInfo.InvariantCulture);
        }
        if (adam is not null)
        {
            for (int i = 0; i < ps.Count; i++)
            {
                tensors.Add(($"adam.m.{ps[i].Name}", ps[i].Shape, adam.M[i].ToArray()));
                tensors.Add(($"adam.v.{ps[i].Name}", ps[i].Shape, adam.V[i].ToArray()));
            }
            meta[AdamStepKey] = adam.Step.ToString(CultureInfo.InvariantCulture);
        }
        if (ema is not null)
        {
            for (int i = 0; i < ps.Count; i++)
            {
                tensors.Add(($"ema.{ps[i].Name}", ps[i].Shape, ema.Weights[i].ToArray()));
            }
            meta["ema.decay"] = ema.Decay.ToString("R", CultureInfo.InvariantCulture);
        }
        foreach (var (name, _, values) in tensors)
        {
            int at = Array.FindIndex(values, v => !float.IsFinite(v));
            if (at >= 0)
            {
                throw new CheckpointException($"{path}: not saved: tensor '{name}' holds a non-finite value at index {at} (the file on disk is unchanged)");
            }
        }
        SafeTensors.Write(path, tensors, meta);
    }

    /// <summary>Metadata key of the steps taken (the trainer's position).</summary>
    public const string StepKey = "step";

    /// <summary>Metadata key of the steps the optimizer skipped because the loss or a gradient was not finite.</summary>
    public const string SkippedKey = "skipped";

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(int, int, int), IReadOnlyList<(string Name, int[] Shape)>> Layouts = new();

    /// <summary>
    /// Every parameter's name and shape for a U-Net of width <paramref name="ch"/>, in parameter
    /// order; with <paramref name="classes"/> &gt; 0 the class-conditional one, for images of
    /// <paramref name="imageChannels"/> channels. Only the presets' widths, at most <see cref="MaxClasses"/>
    /// classes and 1 or 3 channels are ever asked for, so a hostile file cannot make it build a huge model.
    /// </summary>
    public static IReadOnlyList<(string Name, int[] Shape)> Layout(int ch, int classes = 0, int imageChannels = 1) => Layouts.GetOrAdd((ch, classes, imageChannels), static key =>
    {
        var model = new UNet(key.Item1, CpuDevice.Instance, classes: key.Item2, imageChannels: key.Item3);
        var layout = model.Parameters.Select(p => (p.Name, p.Shape)).ToArray();
        foreach (var p in model.Parameters)
        {
            p.Value.Dispose();
        }
        return layout;
    });

    /// <summary>Reads and validates a whole checkpoint (see <see cref="Inspect(SafeTensorsFile)"/>).</summary>
    public static CheckpointInfo Inspect(string path) => Inspect(SafeTensors.Read(path));

    /// <summary>
    /// Validates a whole checkpoint before anything is built from it: the width it claims must be
    /// a preset's, every tensor a parameter of that preset (or its Adam moment or EMA copy) in
    /// F32 with the parameter's exact shape, every parameter present, Adam's moments and the EMA
    /// complete or absent, every value finite (and Adam's second moments not negative), and the
    /// metadata consistent with the tensors and itself. A weights-only file without metadata (what
    /// the PyTorch peer writes) passes when its shapes match one preset. Each failure is a
    /// <see cref="CheckpointException"/> naming the file and the tensor or metadata key at fault.
    /// </summary>
    public static CheckpointInfo Inspect(SafeTensorsFile file)
    {
        string label = file.Label;
        CheckpointException Bad(string problem) => new($"{label}: {problem}");
        if (!file.Entries.TryGetValue("conv_in.weight", out var convIn) || convIn.Shape.Length != 4)
        {
            throw Bad("no conv_in.weight [ch, C, 3, 3], so not a checkpoint of this model");
        }
        int ch = convIn.Shape[0], imageChannels = convIn.Shape[1];
        if (imageChannels is not (1 or 3))
        {
            throw Bad($"conv_in.weight is {string.Join("x", convIn.Shape)}: images of {imageChannels} channels (1 or 3 expected)");
        }
        string preset = Presets.NameOf(ch)
            ?? throw Bad($"conv_in.weight is {string.Join("x", convIn.Shape)}: its width {ch} matches no preset (tiny 16, small 32, base 64)");
        var meta = file.Metadata;
        if (meta.TryGetValue(ChannelsKey, out var channels) && channels != ch.ToString(CultureInfo.InvariantCulture))
        {
            throw Bad($"metadata '{ChannelsKey}' = '{channels}' but the weights are ch={ch} ({preset})");
        }
        if (meta.TryGetValue("preset", out var claimed) && claimed != preset)
        {
            throw Bad($"metadata 'preset' = '{claimed}' but the weights are {preset} (ch={ch})");
        }
        if (meta.TryGetValue("format", out var format) && format != "ddpm-unet-v1")
        {
            throw Bad($"metadata 'format' = '{format}' is not ddpm-unet-v1");
        }

        if (meta.TryGetValue(ImageChannelsKey, out var imageChannelsText) && imageChannelsText != imageChannels.ToString(CultureInfo.InvariantCulture))
        {
            throw Bad($"metadata '{ImageChannelsKey}' = '{imageChannelsText}' but conv_in.weight takes {imageChannels}-channel images");
        }
        int imageSize = DefaultImageSize;
        if (meta.TryGetValue(ImageSizeKey, out var sizeText)
            && !(int.TryParse(sizeText, NumberStyles.None, CultureInfo.InvariantCulture, out imageSize) && imageSize >= 4 && imageSize <= MaxImageSize && imageSize % 4 == 0))
        {
            throw Bad($"metadata '{ImageSizeKey}' = '{sizeText}' is not a multiple of 4 in 4..{MaxImageSize}");
        }

        // A label embedding [classes + 1, 4ch] makes it the conditional layout; its shape is then checked against that
        // layout's like every other tensor, and the metadata's class count must agree.
        int classes = 0;
        if (file.Entries.TryGetValue("label_emb.weight", out var labelEmb))
        {
            classes = labelEmb.Shape.Length == 2 && labelEmb.Shape[0] >= 3 && labelEmb.Shape[0] <= MaxClasses + 1
                ? labelEmb.Shape[0] - 1
                : throw Bad($"label_emb.weight is {string.Join("x", labelEmb.Shape)}: not [classes + 1, 4ch] for 2..{MaxClasses} classes");
        }
        if (meta.TryGetValue(ClassesKey, out var classesText) && classesText != classes.ToString(CultureInfo.InvariantCulture))
        {
            throw Bad(classes == 0
                ? $"metadata '{ClassesKey}' = '{classesText}' but there is no label_emb.weight (an unconditional model)"
                : $"metadata '{ClassesKey}' = '{classesText}' but label_emb.weight makes it a {classes}-class model");
        }
        if (classes > 0)
        {
            preset += $" conditional ({classes} classes)";
        }
        if (imageChannels != 1)
        {
            preset += $", {imageChannels}-channel images";
        }
        // The class names the run recorded, else "0", "1", … (MNIST's digits, and runs from before the key).
        string[] classNames = [.. Enumerable.Range(0, classes).Select(i => i.ToString(CultureInfo.InvariantCulture))];
        if (meta.TryGetValue(ClassNamesKey, out var namesJson))
        {
            string[]? names = null;
            try
            {
                names = System.Text.Json.JsonSerializer.Deserialize<string[]>(namesJson);
            }
            catch (System.Text.Json.JsonException)
            {
            }
            if (names is null || names.Length != classes || names.Any(n => n is null || n.Length == 0 || n.Length > 255))
            {
                throw Bad($"metadata '{ClassNamesKey}' is not {classes} class names (a JSON array of 1..255-character strings)");
            }
            classNames = names;
        }
        var layout = Layout(ch, classes, imageChannels);
        var shapes = layout.ToDictionary(p => p.Name, p => p.Shape);
        int adamM = 0, adamV = 0, emaCount = 0;
        foreach (var (name, entry) in file.Entries)
        {
            string parameter = name;
            foreach (var prefix in (string[])["adam.m.", "adam.v.", "ema."])
            {
                if (name.StartsWith(prefix, StringComparison.Ordinal))
                {
                    parameter = name[prefix.Length..];
                    adamM += prefix == "adam.m." ? 1 : 0;
                    adamV += prefix == "adam.v." ? 1 : 0;
                    emaCount += prefix == "ema." ? 1 : 0;
                    break;
                }
            }
            if (!shapes.TryGetValue(parameter, out var shape))
            {
                throw Bad($"unexpected tensor '{name}' (not a parameter of the {preset} model)");
            }
            if (entry.DType != "F32")
            {
                throw Bad($"tensor '{name}' is {entry.DType}, expected F32");
            }
            if (!entry.Shape.AsSpan().SequenceEqual(shape))
            {
                throw Bad($"tensor '{name}' is {string.Join("x", entry.Shape)}, expected {string.Join("x", shape)} for the {preset} model");
            }
            long at = file.FirstNonFinite(name);
            if (at >= 0)
            {
                throw Bad($"tensor '{name}' holds a non-finite value at index {at}");
            }
            if (name.StartsWith("adam.v.", StringComparison.Ordinal) && file.FirstNegative(name) is var negative and >= 0)
            {
                throw Bad($"tensor '{name}' (Adam's second moment) holds a negative value at index {negative}");
            }
        }
        foreach (var (name, _) in layout)
        {
            if (!file.Contains(name))
            {
                throw Bad($"no tensor '{name}' (every parameter of the {preset} model must be present)");
            }
        }
        string? Missing(string prefix) => layout.Select(p => prefix + p.Name).FirstOrDefault(n => !file.Contains(n));
        if ((adamM | adamV) != 0 && (adamM != layout.Count || adamV != layout.Count))
        {
            throw Bad($"incomplete Adam state: no tensor '{Missing("adam.m.") ?? Missing("adam.v.")}'");
        }
        if (emaCount != 0 && emaCount != layout.Count)
        {
            throw Bad($"incomplete EMA weights: {emaCount} of {layout.Count} parameters have an 'ema.' copy; no tensor '{Missing("ema.")}'");
        }
        bool hasAdam = adamM == layout.Count, hasEma = emaCount == layout.Count;

        long? Integer(string key, long min, long max)
        {
            if (!meta.TryGetValue(key, out var text))
            {
                return null;
            }
            return long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long v) && v >= min && v <= max
                ? v
                : throw Bad($"metadata '{key}' = '{text}' is not an integer in {min}..{max}");
        }
        long? adamStep = Integer(AdamStepKey, 0, int.MaxValue);
        if (hasAdam != adamStep.HasValue)
        {
            throw Bad(hasAdam ? $"Adam state without '{AdamStepKey}' in the metadata" : $"metadata '{AdamStepKey}' without Adam state");
        }
        if (meta.TryGetValue("ema.decay", out var decayText))
        {
            if (!hasEma)
            {
                throw Bad("metadata 'ema.decay' without EMA weights");
            }
            if (!float.TryParse(decayText, NumberStyles.Float, CultureInfo.InvariantCulture, out float decay) || !(decay >= 0 && decay < 1))
            {
                throw Bad($"metadata 'ema.decay' = '{decayText}' is not a number in [0, 1)");
            }
        }
        long? step = Integer(StepKey, 0, long.MaxValue / 2);
        long skipped = Integer(SkippedKey, 0, long.MaxValue / 2) ?? 0;
        if (step is { } s && adamStep is { } a && s != a + skipped)
        {
            throw Bad($"metadata '{StepKey}' = {s} disagrees with '{AdamStepKey}' = {a} and '{SkippedKey}' = {skipped} (step = adam.step + skipped)");
        }
        long? perEpoch = Integer("steps_per_epoch", 1, int.MaxValue);
        if (Integer("epoch", 0, int.MaxValue) is { } epoch && step is { } s2 && perEpoch is { } pe && epoch != s2 / pe)
        {
            throw Bad($"metadata 'epoch' = {epoch} disagrees with 'step' = {s2} at {pe} steps an epoch");
        }
        Integer("T", 2, NoiseScheduleLimits.MaxT);
        if (meta.TryGetValue("schedule", out var schedule) && schedule is not ("linear" or "cosine"))
        {
            throw Bad($"metadata 'schedule' = '{schedule}' is not linear or cosine");
        }
        return new CheckpointInfo(file, ch, Presets.NameOf(ch)!, hasAdam, hasEma, classes, imageChannels, imageSize) { ClassNames = classNames };
    }

    /// <summary>
    /// Loads a checkpoint into <paramref name="model"/> (and Adam, and the EMA, when given and
    /// present). The whole file is validated first (<see cref="Inspect(SafeTensorsFile)"/>); on
    /// any problem nothing is changed and the message names it. Returns the file's metadata.
    /// </summary>
    public static IReadOnlyDictionary<string, string> Load(string path, UNet model, Adam? adam = null, Ema? ema = null) =>
        Load(Inspect(path), model, adam, ema);

    /// <inheritdoc cref="Load(string, UNet, Adam?, Ema?)"/>
    public static IReadOnlyDictionary<string, string> Load(CheckpointInfo info, UNet model, Adam? adam = null, Ema? ema = null)
    {
        var file = info.File;
        string path = file.Label;
        if (info.Channels != model.Channels)
        {
            throw new CheckpointException(
                $"{path}: holds a ch={info.Channels} model ({info.Preset}), not ch={model.Channels} ({Presets.NameOf(model.Channels) ?? "custom"})");
        }
        if (info.Classes != model.Classes)
        {
            throw new CheckpointException(info.Classes == 0
                ? $"{path}: holds an unconditional model, not a {model.Classes}-class one"
                : $"{path}: holds a {info.Classes}-class conditional model, not {(model.Classes == 0 ? "an unconditional one" : $"a {model.Classes}-class one")}");
        }
        if (info.ImageChannels != model.ImageChannels)
        {
            throw new CheckpointException($"{path}: holds a model of {info.ImageChannels}-channel images, not {model.ImageChannels}-channel ones");
        }
        if (adam is not null && !info.HasAdam)
        {
            throw new CheckpointException($"{path}: has no Adam state to resume from (a weights-only file)");
        }
        var ps = model.Parameters;
        bool hasAdam = adam is not null, hasEma = ema is not null && info.HasEma;
        // Read everything before touching the model.
        var weights = ps.Select(p => file.ReadFloats(p.Name, p.Shape)).ToArray();
        var m = hasAdam ? ps.Select(p => file.ReadFloats($"adam.m.{p.Name}", p.Shape)).ToArray() : null;
        var v = hasAdam ? ps.Select(p => file.ReadFloats($"adam.v.{p.Name}", p.Shape)).ToArray() : null;
        var e = hasEma ? ps.Select(p => file.ReadFloats($"ema.{p.Name}", p.Shape)).ToArray() : null;
        for (int i = 0; i < ps.Count; i++)
        {
            ps[i].Value.CopyFrom(weights[i]);
            if (hasAdam)
            {
                adam!.M[i].CopyFrom(m![i]);
                adam.V[i].CopyFrom(v![i]);
            }
            if (hasEma)
            {
                ema!.Weights[i].CopyFrom(e![i]);
            }
        }
        if (hasAdam)
        {
            adam!.Step = (int)info.AdamStep!.Value;
        }
        return file.Metadata;
    }
}

/// <summary>A checkpoint that passed <see cref="Checkpoint.Inspect(SafeTensorsFile)"/>: its file, width, preset, what it holds,
/// its class count (0: unconditional), and its images' channels and side.</summary>
public sealed record CheckpointInfo(SafeTensorsFile File, int Channels, string Preset, bool HasAdam, bool HasEma, int Classes = 0, int ImageChannels = 1,
    int ImageSize = Checkpoint.DefaultImageSize)
{
    /// <summary>The class names the run recorded (metadata <c>class_names</c>, validated by
    /// <see cref="Checkpoint.Inspect(SafeTensorsFile)"/>), else "0", "1", …; empty for an unconditional model.</summary>
    public IReadOnlyList<string> ClassNames { get; init; } = [];

    /// <summary>The file's name, as used in messages.</summary>
    public string Path => File.Label;

    /// <summary>The run metadata.</summary>
    public IReadOnlyDictionary<string, string> Metadata => File.Metadata;

    /// <summary>Adam's step count, when the file has Adam state.</summary>
    public long? AdamStep => HasAdam ? long.Parse(Metadata[Checkpoint.AdamStepKey], CultureInfo.InvariantCulture) : null;
}

/// <summary>Bounds on the diffusion process a checkpoint may claim.</summary>
public static class NoiseScheduleLimits
{
    /// <summary>The most diffusion steps T a checkpoint may claim (the spec's T is 300).</summary>
    public const int MaxT = 4000;
}
