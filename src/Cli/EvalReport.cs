using System.Globalization;
using System.Text;
using Ddpm.Diffusion;
using Ddpm.Storage;

namespace Ddpm.Cli;

/// <summary>What one <c>ddpm eval</c> of a set of samples found, as its report shows it.</summary>
public sealed record EvalFindings
{
    /// <summary>The command line that made the report.</summary>
    public required string Command { get; init; }

    /// <summary>Where the samples came from ("checkpoint PATH" or "IDX file PATH").</summary>
    public required string Source { get; init; }

    /// <summary>How they were drawn (sampler, steps, seed, ...), as (name, value) rows; empty for an IDX file.</summary>
    public IReadOnlyList<(string Name, string Value)> Sampling { get; init; } = [];

    /// <summary>The classifier file, its SHA-256 (hex) and its accuracy on the MNIST test set.</summary>
    public required string ClassifierPath { get; init; }

    /// <inheritdoc cref="ClassifierPath"/>
    public required string ClassifierSha256 { get; init; }

    /// <inheritdoc cref="ClassifierPath"/>
    public required double ClassifierAccuracy { get; init; }

    /// <summary>The scores of the samples and of the real-data floor.</summary>
    public required SampleScores Samples { get; init; }

    /// <inheritdoc cref="Samples"/>
    public required SampleScores Floor { get; init; }

    /// <summary>For a conditional model asked for digits: the share classified as asked, overall and by digit.</summary>
    public (double Overall, SortedDictionary<int, double> ByClass)? Asked { get; init; }

    /// <summary>The samples [Count·784] in [-1, 1] and their class probabilities [Count, Classes].</summary>
    public required float[] Digits { get; init; }

    /// <inheritdoc cref="Digits"/>
    public required float[] Probabilities { get; init; }

    /// <summary>Number of classes K of the classifier.</summary>
    public required int Classes { get; init; }

    /// <summary>The shape of one sample (MNIST's unless the data is other images).</summary>
    public ImageShape Shape { get; init; } = ImageShape.Mnist;
}

/// <summary>
/// <c>ddpm eval</c>'s report folder: report.md (the scores beside the real-data floor, how the samples were made, the
/// classifier's hash) and by-class.png (the samples in rows by predicted class, low-confidence ones last and framed red).
/// </summary>
public static class EvalReport
{
    /// <summary>The files written.</summary>
    public const string MarkdownFile = "report.md", GridFile = "by-class.png";

    /// <summary>Digits shown a row of the grid.</summary>
    public const int PerRow = 16;

    /// <summary>
    /// The grid's rows: row k holds the first <paramref name="perRow"/> samples (in sample order, so an unbiased
    /// selection) whose most probable class is k, those with top-class probability above
    /// <see cref="SampleScores.ConfidentAbove"/> first, the others after them.
    /// </summary>
    public static List<List<int>> ByClass(float[] probabilities, int count, int classes, int perRow = PerRow)
    {
        var rows = Enumerable.Range(0, classes).Select(_ => new List<int>()).ToList();
        for (int i = 0; i < count; i++)
        {
            int k = Classifier.ArgMax(probabilities.AsSpan(i * classes, classes));
            if (rows[k].Count < perRow)
            {
                rows[k].Add(i);
            }
        }
        return rows.Select(r => r.OrderBy(i => Unsure(probabilities, i, classes) ? 1 : 0).ToList()).ToList();
    }

    /// <summary>True when sample i's top-class probability is at most <see cref="SampleScores.ConfidentAbove"/>.</summary>
    public static bool Unsure(float[] probabilities, int i, int classes)
    {
        var p = probabilities.AsSpan(i * classes, classes);
        return p[Classifier.ArgMax(p)] <= SampleScores.ConfidentAbove;
    }

    /// <summary>Writes report.md and by-class.png into <paramref name="folder"/> (which exists).</summary>
    public static void Write(string folder, EvalFindings f)
    {
        var rows = ByClass(f.Probabilities, f.Samples.Count, f.Classes);
        Images.SaveRowGrid(Path.Combine(folder, GridFile), f.Digits, rows, PerRow, i => Unsure(f.Probabilities, i, f.Classes), f.Shape);
        byte[] markdown = System.Text.Encoding.UTF8.GetBytes(Markdown(f));
        Durable.WriteAtomically(Path.Combine(folder, MarkdownFile), s => s.Write(markdown));
    }

    /// <summary>The report as markdown.</summary>
    public static string Markdown(EvalFindings f)
    {
        static string F(double v, string format) => v.ToString(format, CultureInfo.InvariantCulture);
        var s = f.Samples;
        var r = f.Floor;
        var md = new StringBuilder();
        md.AppendLine($"# ddpm eval: {f.Source}").AppendLine();
        md.AppendLine("```sh").AppendLine(f.Command).AppendLine("```").AppendLine();
        if (f.Sampling.Count > 0)
        {
            md.AppendLine("| sampling | |").AppendLine("|---|---|");
            foreach (var (name, value) in f.Sampling)
            {
                md.AppendLine($"| {name} | {value} |");
            }
            md.AppendLine();
        }
        md.AppendLine("| score | samples | real floor (MNIST train) |").AppendLine("|---|---|---|");
        md.AppendLine($"| digits | {s.Count} | {r.Count} |");
        md.AppendLine($"| mean confidence | {F(s.MeanConfidence, "F4")} | {F(r.MeanConfidence, "F4")} |");
        md.AppendLine($"| confident share (> {F(SampleScores.ConfidentAbove, "0.##")}) | {F(s.ConfidentShare, "F3")} | {F(r.ConfidentShare, "F3")} |");
        md.AppendLine($"| class KL to uniform (nats) | {F(s.ClassKl, "F4")} | {F(r.ClassKl, "F4")} |");
        md.AppendLine($"| Fréchet distance (classifier features, vs MNIST test) | {F(s.Frechet, "F1")} | {F(r.Frechet, "F1")} |");
        md.AppendLine($"| histogram 0..{f.Classes - 1} | {string.Join(" ", s.Histogram)} | {string.Join(" ", r.Histogram)} |");
        md.AppendLine();
        if (f.Asked is { } asked)
        {
            md.AppendLine("| asked digit | " + string.Join(" | ", asked.ByClass.Keys) + " | all |");
            md.AppendLine("|---|" + string.Concat(Enumerable.Repeat("---|", asked.ByClass.Count + 1)));
            md.AppendLine("| classified as asked | " + string.Join(" | ", asked.ByClass.Values.Select(v => F(v, "F3"))) + $" | {F(asked.Overall, "F3")} |");
            md.AppendLine();
        }
        md.AppendLine($"Classifier: `{f.ClassifierPath}`, sha256 `{f.ClassifierSha256}`, MNIST test accuracy {F(f.ClassifierAccuracy, "P2")}.").AppendLine();
        md.AppendLine($"![samples by predicted class]({GridFile})").AppendLine();
        md.AppendLine($"{GridFile}: row k holds samples the classifier puts in class k (the first {PerRow} of each, in sample order); " +
            $"those with top-class probability at most {F(SampleScores.ConfidentAbove, "0.##")} come last in their row, framed in red. " +
            "An empty row is a class no sample fell in.");
        return md.ToString();
    }
}
