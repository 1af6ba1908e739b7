using System.Globalization;
using Ddpm.Cli;
using Ddpm.Diffusion;

namespace Ddpm.Tests;

/// <summary>
/// The one declaration of each training setting (<see cref="TrainSettings"/>) against everything derived from it: the
/// help (each recipe's value, the resume rule), the README's table of settings, the options a new run takes under each
/// recipe, the checkpoint metadata written and read back, and what --resume does.
/// </summary>
public sealed class TrainSettingsTests
{
    /// <summary>The README's row of a setting: flag, each recipe's value, what --resume does, what it is.</summary>
    internal static string ReadmeRow(TrainSetting s) =>
        $"| `{s.Flag}` | {string.Join(" | ", Recipe.All.Select(r => s == TrainSettings.Preset ? $"{s.DefaultText(r)} (CPU), {TrainSettings.Preset.OnGpu} (GPU)" : s.DefaultText(r)))} | " +
        $"{(s.Resume == OnResume.MayChange ? "may change" : "fixed")} | {s.Help} |";

    [Fact]
    public void TheReadmeTableIsTheDeclarations()
    {
        string readme = CliTests.Readme();
        string header = $"| setting | {string.Join(" | ", Recipe.All.Select(r => $"`{r.Name}`"))} | on --resume | what it is |";
        var missing = new[] { header }.Concat(TrainSettings.Flags.Select(ReadmeRow)).Where(row => !readme.Contains(row, StringComparison.Ordinal)).ToList();
        Assert.True(missing.Count == 0, "README.md lacks these rows (or has them otherwise):\n" + string.Join("\n", missing));
    }

    [Fact]
    public void TheHelpIsTheDeclarations()
    {
        string help = CliTests.Run("train", "--help").Out.Replace("\n", " ", StringComparison.Ordinal);
        help = System.Text.RegularExpressions.Regex.Replace(help, @"\s+", " ");
        foreach (var s in TrainSettings.Flags)
        {
            Assert.Contains(System.Text.RegularExpressions.Regex.Replace(s.HelpText(Recipe.All), @"\s+", " "), help);
            foreach (var r in Recipe.All)
            {
                Assert.Contains(s.DefaultText(r), s.HelpText(Recipe.All));
            }
        }
    }

    [Theory]
    [InlineData("default")]
    [InlineData("quick")]
    [InlineData("seed")]
    public void ARecipesRunTakesItsValues(string name)
    {
        var r = Recipe.Named(name);
        var o = TrainSettings.Defaults(r);
        Assert.Equal((r.CpuPreset, r.Epochs, r.Lr, r.Warmup, r.LrDecay, r.Schedule, r.Ema, r.EmaWarmup, r.MinSnr, r.Name),
            (o.Preset, o.Epochs, o.Lr, o.Warmup, o.LrDecay, o.Schedule, o.EmaDecay, o.EmaWarmup, o.MinSnr, o.Recipe));
        Assert.Empty(o.Problems());
        // The seed's recipe is also what `new TrainOptions()` holds (its initialisers read the declarations).
        if (name == "seed")
        {
            Assert.Equal(new TrainOptions { Preset = r.CpuPreset, Recipe = "seed" }, o);
        }
    }

    [Fact]
    public void EveryDeclarationRoundTripsThroughTheCheckpoint()
    {
        var o = TrainSettings.Defaults(Recipe.Default) with { Batch = 12, Lr = 3.3e-4f, Seed = 123_456_789_012UL, Classes = 10, MaxSteps = 77, Clip = 0.5f };
        var meta = o.ToMetadata();
        Assert.Equal(TrainSettings.All.Select(s => s.Key).Append(TrainOptions.RecipeKey).Order(), meta.Keys.Order());
        Assert.Equal(o, TrainOptions.FromMetadata(meta, "test"));
        // A run from before a setting existed: its legacy value; a required key missing: one line naming it.
        foreach (var s in TrainSettings.All)
        {
            var without = new Dictionary<string, string>(meta);
            without.Remove(s.Key);
            if (s.Legacy is { } legacy)
            {
                Assert.Equal(legacy, s.Text(TrainOptions.FromMetadata(without, "old")));
            }
            else
            {
                var e = Assert.Throws<Ddpm.Nn.CheckpointException>(() => TrainOptions.FromMetadata(without, "old"));
                Assert.Contains($"lacks '{s.Key}'", e.Message);
            }
        }
    }

    [Fact]
    public void AValueOutOfRangeIsNamedByItsFlag()
    {
        var o = TrainSettings.Defaults(Recipe.Default);
        foreach (var (bad, flag) in new (TrainOptions, string)[]
        {
            (o with { Epochs = 0 }, "--epochs"), (o with { Lr = -1 }, "--lr"), (o with { Schedule = "square" }, "--schedule"),
            (o with { EmaDecay = 1 }, "--ema"), (o with { Classes = 1 }, "--classes"), (o with { DiffusionSteps = 1 }, "T"),
        })
        {
            Assert.Contains(bad.Problems(), p => p.Flag == flag);
        }
    }

    [Fact]
    public void TheResumeRulesAreTheDeclarations()
    {
        // The fixed ones are those that would change the model, the data order or the noise a step draws.
        Assert.Equal(["preset", "batch", "schedule", "T", "seed", "classes"],
            TrainSettings.All.Where(s => s.Resume == OnResume.Fixed).Select(s => s.Key).ToArray());
    }
}
