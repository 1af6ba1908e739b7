using System.Globalization;
using Ddpm.Kernels;
using Ddpm.Nn;
using Ddpm.Tensors;

namespace Ddpm.Diffusion;

/// <summary>Saving a run and resuming it exactly.</summary>
public sealed partial class Trainer
{
    /// <summary>What MPI ranks compare before training together: the settings, the position, a hash of every weight, Adam and
    /// EMA value, and the data's hash (see <see cref="ImageSet.Hash"/>).</summary>
    public IReadOnlyList<(string Name, string Value)> Identity()
    {
        var settings = Options.ToMetadata();
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        var tensors = new List<Tensor> { Model.Parameters.Values! };
        tensors.AddRange(Adam.M);
        tensors.AddRange(Adam.V);
        if (Model.Parameters.Count > 0)
        {
            tensors.Add(Adam.State);
        }
        if (Ema is not null)
        {
            tensors.AddRange(Ema.Weights);
        }
        foreach (var t in tensors)
        {
            sha.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(t.ToArray().AsSpan()));
        }
        return
        [
            .. settings.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => ($"setting {kv.Key}", kv.Value)),
            ("position", $"step {Step}, {Skipped} skipped, EMA from {EmaStart}, Adam step {Adam.Step}"),
            ("weights and optimiser state", Convert.ToHexString(sha.GetHashAndReset())[..16].ToLowerInvariant()),
            ("training data", $"{_data.Count} images, sha256 {_data.Hash[..Math.Min(16, _data.Hash.Length)]}"),
        ];
    }

    /// <summary>Writes model, Adam, EMA and the run's options and position, atomically.</summary>
    public void Save(string path)
    {
        if (_pending > 0)
        {
            throw new InvalidOperationException($"{_pending} queued steps are not read back: read them before saving (their skips count in the checkpoint)");
        }
        var meta = Options.ToMetadata();
        meta[Checkpoint.StepKey] = Step.ToString(CultureInfo.InvariantCulture);
        meta["epoch"] = Epoch.ToString(CultureInfo.InvariantCulture);
        meta["steps_per_epoch"] = StepsPerEpoch.ToString(CultureInfo.InvariantCulture);
        meta[Checkpoint.SkippedKey] = Skipped.ToString(CultureInfo.InvariantCulture);
        meta[DataHashKey] = _data.Hash;
        meta[Checkpoint.ImageSizeKey] = _data.Size.ToString(CultureInfo.InvariantCulture);
        if (Model.Classes > 0)
        {
            meta[Checkpoint.ClassNamesKey] = System.Text.Json.JsonSerializer.Serialize(_data.ClassNames);
        }
        if (EmaStart > 0)
        {
            meta[TrainOptions.EmaStartKey] = EmaStart.ToString(CultureInfo.InvariantCulture);
        }
        if (_changes.Count > 0)
        {
            meta["changes"] = string.Join("; ", _changes);
        }
        Checkpoint.Save(path, Model, Adam, Ema, meta);
    }

    /// <summary>
    /// Continues the run saved in <paramref name="path"/>, validated whole first: its options,
    /// weights, Adam, EMA, step and skipped count. <paramref name="change"/> may change what can
    /// change mid-run (epochs, step cap, learning rate, clipping, EMA decay); each change is
    /// recorded in <see cref="Changes"/> and so in the next checkpoint's metadata. What would
    /// break the run's exactness (preset, batch, seed, classes, schedule, T) is refused, as is a data set
    /// that gives another number of steps an epoch.
    /// </summary>
    public static Trainer Resume(Device device, string path, ImageSet data, Func<TrainOptions, TrainOptions>? change = null) =>
        Resume(device, Checkpoint.Inspect(path), data, change);

    /// <inheritdoc cref="Resume(Device, string, ImageSet, Func{TrainOptions, TrainOptions}?)"/>
    /// <remarks>For a caller that validated the checkpoint already (<see cref="Checkpoint.Inspect(string)"/>): it is not read twice.</remarks>
    /// <remarks>With <paramref name="mpi"/>, this rank's share of the run (every rank reads the same checkpoint).</remarks>
    public static Trainer Resume(Device device, CheckpointInfo info, ImageSet data, Func<TrainOptions, TrainOptions>? change = null, Parallel.Mpi? mpi = null)
    {
        string path = info.Path;
        if (!info.HasAdam)
        {
            throw new CheckpointException($"{path}: holds weights only (no Adam state), so it can be sampled from but not resumed");
        }
        var saved = TrainOptions.FromMetadata(info.Metadata, path);
        var meta = info.Metadata;
        if (!meta.ContainsKey(Checkpoint.StepKey))
        {
            throw new CheckpointException($"{path}: metadata lacks '{Checkpoint.StepKey}'");
        }
        long step = long.Parse(meta[Checkpoint.StepKey], CultureInfo.InvariantCulture);
        long skipped = meta.TryGetValue(Checkpoint.SkippedKey, out var sk) ? long.Parse(sk, CultureInfo.InvariantCulture) : 0;
        long emaStart = EmaStartOf(meta, step, path);
        if (meta.TryGetValue("steps_per_epoch", out var pe) && long.Parse(pe, CultureInfo.InvariantCulture) != data.Count / saved.Batch)
        {
            throw new CheckpointException(
                $"{path}: the run took {pe} steps an epoch, but this training set gives {data.Count / saved.Batch} ({data.Count} images): --data holds another data set than the run's");
        }
        if (info.ImageChannels != data.Channels || info.ImageSize != data.Size)
        {
            throw new UsageException(
                $"--resume: the run trained on {info.ImageChannels}-channel {info.ImageSize}x{info.ImageSize} images, --data gives {data.Channels}-channel {data.Size}x{data.Size} ones; pass the run's --data and sizes, or start a new run with another --out");
        }
        // The ranks are the run's now (recorded below as a change when the count differs from the checkpoint's).
        var options = (change?.Invoke(saved) ?? saved) with { Ranks = mpi?.Size ?? 1 };
        foreach (var setting in TrainSettings.All.Where(s => s.Resume == OnResume.Fixed))
        {
            string was = setting.Text(saved), now = setting.Text(options);
            if (was != now)
            {
                throw new UsageException($"--resume: {setting.Flag ?? setting.Key} cannot change mid-run (the run has {setting.Display(saved)}, asked for {setting.Display(options)}); start a new run with another --out");
            }
        }
        // After the flags: a changed flag is named first, the data set then.
        if (meta.TryGetValue(DataHashKey, out var dataHash) && dataHash != data.Hash)
        {
            throw new UsageException(
                $"--resume: --data holds another data set than the run's (sha256 {data.Hash[..12]}..., the run trained on {dataHash[..Math.Min(12, dataHash.Length)]}...); pass the run's --data, or start a new run with another --out");
        }
        if (saved.EmaDecay > 0 && options.EmaDecay == 0)
        {
            throw new UsageException($"--resume: --ema 0 would drop the run's EMA weights; keep them (sample --no-ema uses the raw weights)");
        }
        var trainer = new Trainer(device, options, data, mpi);
        try
        {
            Checkpoint.Load(info, trainer.Model, trainer.Adam, trainer.Ema);
            if (trainer.Ema is { } ema && !info.HasEma)
            {
                // EMA switched on mid-run: it starts from the weights as they are now, its warm-up from this step.
                for (int i = 0; i < ema.Weights.Count; i++)
                {
                    ema.Weights[i].CopyFrom(trainer.Model.Parameters[i].Value);
                }
                emaStart = step;
            }
            trainer.EmaStart = trainer.Ema is null ? 0 : emaStart;
            trainer.Step = step;
            trainer.Skipped = skipped;
            if (meta.TryGetValue("changes", out var earlier) && earlier.Length > 0)
            {
                trainer._changes.AddRange(earlier.Split("; "));
            }
            foreach (var setting in TrainSettings.All.Where(s => s.Resume == OnResume.MayChange))
            {
                string was = setting.Text(saved), now = setting.Text(options);
                if (was != now)
                {
                    trainer._changes.Add($"step {step}: {setting.Key} {was} -> {now}");
                }
            }
            return trainer;
        }
        catch
        {
            trainer.Dispose();
            throw;
        }
    }

    /// <summary>The step a checkpoint's average started at (<see cref="TrainOptions.EmaStartKey"/>; absent: 0), checked against its step.</summary>
    public static long EmaStartOf(IReadOnlyDictionary<string, string> meta, long step, string label)
    {
        if (!meta.TryGetValue(TrainOptions.EmaStartKey, out var text))
        {
            return 0;
        }
        if (!long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out long start) || start > step)
        {
            throw new CheckpointException($"{label}: metadata '{TrainOptions.EmaStartKey}' = '{text}' is not a step in 0..{step}");
        }
        return start;
    }

    /// <summary>
    /// How much of a checkpoint's averaged weights is still the weights the average started from (the random initial ones
    /// for a run that kept an EMA from its start), by its EMA schedule's own arithmetic (<see cref="EmaSchedule.InitialShare"/>);
    /// null when the metadata does not say (a checkpoint without EMA weights, or not written by <see cref="Save"/>).
    /// </summary>
    public static double? EmaInitialShare(IReadOnlyDictionary<string, string> meta)
    {
        static bool Read<T>(IReadOnlyDictionary<string, string> m, string key, out T value) where T : IParsable<T>
        {
            value = default!;
            return m.TryGetValue(key, out var text) && T.TryParse(text, CultureInfo.InvariantCulture, out value!);
        }
        if (!Read(meta, "ema", out float decay) || !(decay is > 0 and < 1) || !Read(meta, Checkpoint.StepKey, out long step) || step < 0)
        {
            return null;
        }
        float power = Read(meta, TrainOptions.EmaWarmupKey, out float p) && p is >= 0 and <= EmaSchedule.MaxPower ? p : 0f;
        long skipped = Read(meta, Checkpoint.SkippedKey, out long sk) ? sk : 0;
        long start = Read(meta, TrainOptions.EmaStartKey, out long st) && st >= 0 && st <= step ? st : 0;
        return new EmaSchedule(decay, power, start).InitialShare(step, skipped);
    }

    /// <summary>The changes the last <see cref="Resume(Device, CheckpointInfo, ImageSet, Func{TrainOptions, TrainOptions}?, Parallel.Mpi?)"/> made (those recorded at its step).</summary>
    public IEnumerable<string> ChangesAtResume => _changes.Where(c => c.StartsWith($"step {Step}:", StringComparison.Ordinal));

}
