using System.Reflection;
using NetArchTest.Rules;

namespace Ddpm.Tests;

/// <summary>
/// docs/architecture.md's "What each layer may use", enforced: each rule names the layer, what it may not depend on, and
/// the few types allowed through (each with the reason the doc gives). A new call that skips a layer fails here with the
/// rule's name; <see cref="APlantedLayerSkipFails"/> proves the rules see one.
/// </summary>
public sealed class ArchitectureTests
{
    private static readonly Assembly Tensor = typeof(Tensors.Tensor).Assembly, Kernels = typeof(Ddpm.Kernels.Conv2d).Assembly,
        Nn = typeof(Ddpm.Nn.Tape).Assembly, Diffusion = typeof(Ddpm.Diffusion.Trainer).Assembly, Cli = typeof(Ddpm.Cli.Program).Assembly;

    /// <summary>One rule of the table: the layer's namespace, the namespaces it may not use, and the types of a forbidden
    /// namespace it may use all the same (full names), or the layer's own types that may (simple names).</summary>
    public sealed record LayerRule(string Name, string Layer, string[] Forbidden, string[] AllowedTypes, string[] AllowedUsers, string Why);

    /// <summary>The rules, as the doc's table states them.</summary>
    public static readonly LayerRule[] Rules =
    [
        new("tensor-uses-nothing", "Ddpm.Tensors", ["Ddpm.Kernels", "Ddpm.Nn", "Ddpm.Diffusion", "Ddpm.Cli"], [], [],
            "Tensor is the bottom: tensors, devices, the pool, Philox"),
        new("storage-uses-nothing", "Ddpm.Storage", ["Ddpm.Kernels", "Ddpm.Nn", "Ddpm.Diffusion", "Ddpm.Cli"], [], [],
            "durable files sit in the bottom project, where every layer that writes reaches them"),
        new("kernels-use-only-tensor", "Ddpm.Kernels", ["Ddpm.Nn", "Ddpm.Diffusion", "Ddpm.Cli"], [], [],
            "an op knows tensors and devices, no layer, no model"),
        new("nn-uses-tensor-and-kernels", "Ddpm.Nn", ["Ddpm.Diffusion", "Ddpm.Cli"], [], [],
            "the tape records ops; no schedule, no flag"),
        new("diffusion-uses-nn-and-device-arithmetic", "Ddpm.Diffusion", ["Ddpm.Cli", "Ddpm.Kernels"],
            ["Ddpm.Kernels.Elementwise", "Ddpm.Kernels.RandomFill", "Ddpm.Kernels.Optim"], [],
            "Diffusion reaches Kernels only for device arithmetic no model and no gradient involves: the noising, Gaussian noise, " +
            "the reverse steps, the optimizer's records and non-finite flag"),
        new("cli-reaches-kernels-only-in-bench-and-check", "Ddpm.Cli", ["Ddpm.Kernels"], [],
            ["BenchCommand", "CheckCommand", "GpuForecast", "SelfCheck"],
            "the CLI drives Kernels directly only where the kernels are the command: bench's synthetic inputs, check, the compiler " +
            "table's prediction, and the GPU self-check"),
    ];

    public static TheoryData<string> RuleNames => new(Rules.Select(r => r.Name));

    /// <summary>The types of <paramref name="types"/> in the rule's layer that break it.</summary>
    public static IReadOnlyList<string> Violations(LayerRule rule, IEnumerable<Type> types)
    {
        var forbidden = rule.Forbidden.SelectMany(ns => AllTypesIn(ns)).Except(rule.AllowedTypes).ToArray();
        var result = Types.InAssemblies(types.Select(t => t.Assembly).Distinct())
            .That().ResideInNamespace(rule.Layer)
            .And().DoNotHaveName(rule.AllowedUsers.Length == 0 ? ["\0"] : rule.AllowedUsers)
            .ShouldNot().HaveDependencyOnAny(forbidden)
            .GetResult();
        var scope = types.Select(t => t.FullName).ToHashSet();
        return result.IsSuccessful ? [] : [.. result.FailingTypeNames.Where(scope.Contains).Select(n => $"{rule.Name}: {n} ({rule.Why})")];
    }

    /// <summary>Every type of the engine's namespace <paramref name="ns"/> (full names), nested ones included.</summary>
    private static IEnumerable<string> AllTypesIn(string ns) =>
        new[] { Tensor, Kernels, Nn, Diffusion, Cli }.SelectMany(a => a.GetTypes()).Where(t => t.Namespace is { } n && (n == ns || n.StartsWith(ns + ".", StringComparison.Ordinal)))
            .Select(t => t.FullName!.Replace('+', '/'));

    [Theory]
    [MemberData(nameof(RuleNames))]
    public void EachLayerUsesOnlyWhatTheTableAllows(string name)
    {
        var rule = Rules.Single(r => r.Name == name);
        var engine = new[] { Tensor, Kernels, Nn, Diffusion, Cli }.SelectMany(a => a.GetTypes());
        var broken = Violations(rule, engine);
        Assert.True(broken.Count == 0, string.Join("\n", broken));
    }

    /// <summary>A class planted in Diffusion's namespace that calls a convolution kernel directly (skipping Nn): the
    /// Diffusion rule must name it.</summary>
    [Fact]
    public void APlantedLayerSkipFails()
    {
        var rule = Rules.Single(r => r.Name == "diffusion-uses-nn-and-device-arithmetic");
        var broken = Violations(rule, [typeof(Ddpm.Diffusion.Planted.SkipsNn)]);
        Assert.Single(broken);
        Assert.StartsWith("diffusion-uses-nn-and-device-arithmetic: Ddpm.Diffusion.Planted.SkipsNn", broken[0]);
        Assert.Empty(Violations(rule, [typeof(Ddpm.Diffusion.Planted.UsesNnOnly)]));
    }

    /// <summary>docs/architecture.md's map of src/Kernels names every source file there, and only files that exist.</summary>
    [Fact]
    public void TheKernelsMapInTheDocMatchesTheFolder()
    {
        string doc = File.ReadAllText(Path.Combine(CliTests.RepoRoot(), "docs", "architecture.md"));
        int start = doc.IndexOf("src/Kernels/\n", StringComparison.Ordinal);
        Assert.True(start >= 0, "docs/architecture.md has no map of src/Kernels/");
        string map = doc[start..doc.IndexOf("```", start, StringComparison.Ordinal)];
        var named = System.Text.RegularExpressions.Regex.Matches(map, @"[A-Za-z0-9]+\.cs").Select(m => m.Value).ToHashSet();
        string kernels = Path.Combine(CliTests.RepoRoot(), "src", "Kernels");
        var files = Directory.EnumerateFiles(kernels, "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}") && !f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}")
                && Path.GetDirectoryName(f) != Path.Combine(kernels, "Checks"))
            .Select(Path.GetFileName).ToHashSet();
        Assert.True(files.SetEquals(named!), $"in the folder, not the map: {string.Join(", ", files.Except(named!))}; in the map, not the folder: {string.Join(", ", named.Except(files!))}");
    }
}
