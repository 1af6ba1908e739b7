namespace Ddpm.Tensors;

/// <summary>
/// How a GPU computes the products of the convolutions and linear layers (the tiled GEMMs); every other op, and the
/// managed CPU backend always, computes in fp32. The names are the command line's (<see cref="MathPrecisions"/>).
/// </summary>
public enum MathPrecision
{
    /// <summary>fp32: the FFMA core, every product and sum in fp32 (PyTorch with TF32 off).</summary>
    Fp32,

    /// <summary>tf32: convolutions on TF32 tensor cores (operands rounded to 10 mantissa bits, fp32 sums), linear layers in
    /// fp32: what PyTorch does by default on Ampere and Hopper (cudnn.allow_tf32 on, cuda.matmul.allow_tf32 off).</summary>
    Tf32,

    /// <summary>3xtf32: convolutions and linear layers on tensor cores, each operand split into a TF32 high part and a TF32
    /// low part and three products summed (lo·hi + hi·lo + hi·hi): fp32 accuracy at tensor-core speed.</summary>
    Tf32x3,
}

/// <summary>The math modes' names, help and default: one place for the command line, the checkpoint and the docs.</summary>
public static class MathPrecisions
{
    /// <summary>The default: PyTorch's (TF32 convolutions, fp32 linear layers).</summary>
    public const MathPrecision Default = MathPrecision.Tf32;

    /// <summary>Every mode, in the help's order.</summary>
    public static IReadOnlyList<MathPrecision> All { get; } = [MathPrecision.Fp32, MathPrecision.Tf32, MathPrecision.Tf32x3];

    /// <summary>The name on the command line and in the checkpoint: fp32, tf32, 3xtf32.</summary>
    public static string Name(this MathPrecision mode) => mode switch
    {
        MathPrecision.Fp32 => "fp32",
        MathPrecision.Tf32 => "tf32",
        MathPrecision.Tf32x3 => "3xtf32",
        _ => throw new ArgumentOutOfRangeException(nameof(mode), mode, null),
    };

    /// <summary>What the mode computes, in a few words (the help, <c>info</c> and the banner).</summary>
    public static string Describe(this MathPrecision mode) => mode switch
    {
        MathPrecision.Fp32 => "strict fp32 on the FFMA core",
        MathPrecision.Tf32 => "TF32 tensor cores for convolutions, fp32 linear layers (PyTorch's default)",
        MathPrecision.Tf32x3 => "3xTF32 tensor cores for convolutions and linear layers (fp32 accuracy)",
        _ => throw new ArgumentOutOfRangeException(nameof(mode), mode, null),
    };

    /// <summary>The names, in order.</summary>
    public static string[] Names { get; } = [.. All.Select(Name)];

    /// <summary>The mode named <paramref name="name"/> (case-insensitive), or null.</summary>
    public static MathPrecision? Parse(string? name) =>
        All.Cast<MathPrecision?>().FirstOrDefault(m => string.Equals(m!.Value.Name(), name?.Trim(), StringComparison.OrdinalIgnoreCase));

    /// <summary>True when <paramref name="mode"/> runs the convolutions on tensor cores.</summary>
    public static bool TensorConvolutions(this MathPrecision mode) => mode != MathPrecision.Fp32;

    /// <summary>True when <paramref name="mode"/> runs the linear layers (and every other matmul) on tensor cores.</summary>
    public static bool TensorMatmuls(this MathPrecision mode) => mode == MathPrecision.Tf32x3;
}
