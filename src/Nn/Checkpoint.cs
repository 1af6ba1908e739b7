using System.Globalization;

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
        };
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
        SafeTensors.Write(path, tensors, meta);
    }

    /// <summary>The base width of the model in a checkpoint, from conv_in.weight [ch, 1, 3, 3].</summary>
    public static int ChannelsOf(SafeTensorsFile file)
    {
        if (!file.Entries.TryGetValue("conv_in.weight", out var e) || e.Shape.Length != 4)
        {
            throw new CheckpointException($"{file.Label}: no conv_in.weight, so not a checkpoint of this model");
        }
        return e.Shape[0];
    }

    /// <summary>
    /// Loads a checkpoint into <paramref name="model"/> (and Adam, and the EMA, when given and
    /// present). Every tensor's name and shape is checked first; on any problem nothing is changed
    /// and the message names it. Returns the file's metadata.
    /// </summary>
    public static IReadOnlyDictionary<string, string> Load(string path, UNet model, Adam? adam = null, Ema? ema = null)
    {
        var file = SafeTensors.Read(path);
        int ch = ChannelsOf(file);
        if (ch != model.Channels)
        {
            throw new CheckpointException(
                $"{path}: holds a ch={ch} model ({Presets.NameOf(ch) ?? "custom"}), not ch={model.Channels} ({Presets.NameOf(model.Channels) ?? "custom"})");
        }
        var ps = model.Parameters;
        var known = new HashSet<string>();
        foreach (var p in ps)
        {
            known.Add(p.Name);
            known.Add($"adam.m.{p.Name}");
            known.Add($"adam.v.{p.Name}");
            known.Add($"ema.{p.Name}");
        }
        foreach (var name in file.Entries.Keys)
        {
            if (!known.Contains(name))
            {
                throw new CheckpointException($"{path}: unexpected tensor '{name}' (not a parameter of this model)");
            }
        }
        bool hasAdam = adam is not null && ps.All(p => file.Contains($"adam.m.{p.Name}") && file.Contains($"adam.v.{p.Name}"));
        bool hasEma = ema is not null && ps.All(p => file.Contains($"ema.{p.Name}"));
        if (adam is not null && !hasAdam)
        {
            throw new CheckpointException($"{path}: has no (or incomplete) Adam state to resume from");
        }
        // Read and check everything before touching the model.
        var weights = ps.Select(p => file.ReadFloats(p.Name, p.Shape)).ToArray();
        var m = hasAdam ? ps.Select(p => file.ReadFloats($"adam.m.{p.Name}", p.Shape)).ToArray() : null;
        var v = hasAdam ? ps.Select(p => file.ReadFloats($"adam.v.{p.Name}", p.Shape)).ToArray() : null;
        var e = hasEma ? ps.Select(p => file.ReadFloats($"ema.{p.Name}", p.Shape)).ToArray() : null;
        int step = 0;
        if (hasAdam && !(file.Metadata.TryGetValue(AdamStepKey, out var s) && int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out step)))
        {
            throw new CheckpointException($"{path}: Adam state without a valid '{AdamStepKey}' in the metadata");
        }
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
            adam!.Step = step;
        }
        return file.Metadata;
    }

    /// <summary>True when the file holds EMA weights for every parameter of a model of its width.</summary>
    public static bool HasEma(SafeTensorsFile file) =>
        file.Entries.Keys.Any(k => k.StartsWith("ema.", StringComparison.Ordinal));
}
