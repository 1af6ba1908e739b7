using System.Text.Json;
using Ddpm.Storage;

namespace Ddpm.Diffusion;

/// <summary>A run's metrics.jsonl as read back: the lines kept (raw UTF-8), the loss history, and what was dropped and why.</summary>
public sealed record RunMetricsFile(IReadOnlyList<byte[]> Lines, List<(long Step, double Loss)> History, IReadOnlyList<string> Problems);

/// <summary>
/// metrics.jsonl: one JSON object a line, {"step": S, "loss": L, ...} for each training step
/// (loss null for a skipped step) and {"event": "...", "step": S, ...} for events such as a
/// resume with changed settings. Reading back (on --resume) keeps the lines up to the
/// checkpoint's step and drops the rest (work the resumed run redoes). A last line cut short by a
/// crash is dropped silently; any other line that is not such an object is dropped and named in
/// <see cref="RunMetricsFile.Problems"/> by line number and field. The reader reads only the
/// file's recorded size, skips over-long lines without holding them, and throws only
/// <see cref="DataException"/> (naming the file) for a file it cannot read at all.
/// </summary>
public static class RunMetrics
{
    /// <summary>The longest line read; longer ones are dropped unread (a step's line is about 150 bytes).</summary>
    public const int MaxLineBytes = 1 << 16;

    /// <summary>The largest metrics file read (a thousand epochs of base is about 150 MB).</summary>
    public const long MaxFileBytes = 1L << 30;

    /// <summary>Reads <paramref name="path"/>, keeping the lines of steps up to <paramref name="upToStep"/>; a missing or empty file is an empty history.</summary>
    public static RunMetricsFile Read(string path, long upToStep)
    {
        var lines = new List<byte[]>();
        var history = new List<(long, double)>();
        var problems = new List<string>();
        var info = new FileInfo(path);
        if (!info.Exists || info.Length == 0)
        {
            // Missing, empty, or not a regular file (a FIFO or device reports 0): nothing to keep, nothing opened.
            return new RunMetricsFile(lines, history, problems);
        }
        if (info.Length > MaxFileBytes)
        {
            throw new DataException($"{path}: {info.Length >> 20} MiB is larger than any metrics file of this engine ({MaxFileBytes >> 20} MiB at most)");
        }
        byte[] bytes;
        try
        {
            bytes = new byte[info.Length];
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1 << 16);
            int read = 0;
            while (read < bytes.Length)
            {
                int n = stream.Read(bytes, read, bytes.Length - read);
                if (n == 0)
                {
                    Array.Resize(ref bytes, read); // shrank meanwhile: read what is there
                    break;
                }
                read += n;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new DataException($"{path}: cannot read ({e.Message})", e);
        }
        long lastStep = 0;
        int lineNumber = 0;
        for (int start = 0; start < bytes.Length;)
        {
            int newline = Array.IndexOf(bytes, (byte)'\n', start);
            bool torn = newline < 0;
            int end = torn ? bytes.Length : newline;
            lineNumber++;
            var line = bytes.AsMemory(start, end - start);
            start = end + 1;
            if (line.Span.Trim((byte)'\r').IsEmpty)
            {
                continue;
            }
            long step = 0;
            double? loss = null;
            string? problem = line.Length > MaxLineBytes ? $"longer than {MaxLineBytes} bytes" : Check(line, out step, out loss);
            if (problem is not null)
            {
                if (!torn)
                {
                    problems.Add($"{path} line {lineNumber}: {problem}; dropped");
                }
                continue;
            }
            if (step > upToStep)
            {
                continue;
            }
            if (loss is { } l)
            {
                if (step <= lastStep)
                {
                    problems.Add($"{path} line {lineNumber}: step {step} does not follow step {lastStep}; dropped");
                    continue;
                }
                history.Add((step, l));
                lastStep = step;
            }
            lines.Add(line.ToArray());
        }
        return new RunMetricsFile(lines, history, problems);
    }

    /// <summary>What is wrong with one line, or null when it is a step line (loss set, or null for a skipped step) or an event line (loss null).</summary>
    private static string? Check(ReadOnlyMemory<byte> line, out long step, out double? loss)
    {
        step = 0;
        loss = null;
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(line, new JsonDocumentOptions { MaxDepth = 4 });
        }
        catch (JsonException e)
        {
            return $"not JSON at byte {e.BytePositionInLine ?? 0} of the line";
        }
        catch (ArgumentException)
        {
            return "not UTF-8 JSON";
        }
        using (doc)
        {
            try
            {
                return Check(doc.RootElement, out step, out loss);
            }
            catch (InvalidOperationException)
            {
                // System.Text.Json throws this when a key it compares holds an escaped lone surrogate ("\ud800").
                return "a key holds a \\u escape that is not valid UTF-16 (a lone surrogate)";
            }
        }
    }

    /// <summary>The checks of one parsed line (see the overload above).</summary>
    private static string? Check(JsonElement root, out long step, out double? loss)
    {
        step = 0;
        loss = null;
        if (root.ValueKind != JsonValueKind.Object)
        {
            return "not a JSON object";
        }
        if (!root.TryGetProperty("step", out var s) || s.ValueKind != JsonValueKind.Number || !s.TryGetInt64(out step) || step < 0)
        {
            return "'step' is not a non-negative integer";
        }
        bool isEvent = root.TryGetProperty("event", out var ev) && ev.ValueKind == JsonValueKind.String;
        if (!root.TryGetProperty("loss", out var l) || l.ValueKind == JsonValueKind.Null)
        {
            return isEvent || (root.TryGetProperty("skipped", out var sk) && sk.ValueKind == JsonValueKind.True) ? null : "no 'loss'";
        }
        if (l.ValueKind != JsonValueKind.Number || !l.TryGetDouble(out double value) || !double.IsFinite(value))
        {
            return "'loss' is not a finite number";
        }
        if (step < 1)
        {
            return "'step' of a training step must be at least 1";
        }
        loss = value;
        return null;
    }

    /// <summary>Replaces <paramref name="path"/> with the kept lines, atomically (a crash leaves the old file or the new one).</summary>
    public static void Rewrite(string path, RunMetricsFile metrics) => Durable.WriteAtomically(path, stream =>
    {
        foreach (var line in metrics.Lines)
        {
            stream.Write(line);
            stream.WriteByte((byte)'\n');
        }
    });
}
