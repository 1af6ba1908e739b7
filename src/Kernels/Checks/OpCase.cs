using Ddpm.Tensors;

namespace Ddpm.Kernels.Checks;

/// <summary>How a case's input is filled: normal values, positive values (variances, scales),
/// integer timesteps in 0..299, uniform [0, 1), or digit labels 0..9.</summary>
public enum InputFill
{
    /// <summary>Standard normal.</summary>
    Normal,
    /// <summary>Uniform in [0.5, 1.5).</summary>
    Positive,
    /// <summary>Integers 0..299 held as floats.</summary>
    Timesteps,
    /// <summary>Uniform in [0, 1).</summary>
    Uniform,
    /// <summary>Class labels 0..10 held as floats (10: no label).</summary>
    Labels,
    /// <summary>Integers 0..9 held as floats (class labels of a K ≥ 10 classifier).</summary>
    Digits,
    /// <summary>TF32 values whose last mantissa bit is set: ±(1 + k·2^-10)·2^e, k odd in 1..1023, e = -1 or 0. Every math mode
    /// multiplies them exactly; a tensor core that rounded its operands' low 13 bits instead of dropping them would take
    /// each one a TF32 unit up (the staging adds half a unit: a tie) and miss by ~2^-10 a product.</summary>
    Tf32Exact,
}

/// <summary>One input of an op case: its name, shape, fill, and whether the gradient check differentiates it.</summary>
public sealed record InputSpec(string Name, int[] Shape, InputFill Fill = InputFill.Normal, bool Differentiable = true);

/// <summary>Runs an op on inputs already on a device and returns its outputs; the first output is
/// what the gradient check differentiates. Outputs come from <see cref="CaseScope.Output"/> (poisoned).</summary>
public delegate Tensor[] ForwardFn(CaseScope scope, Tensor[] inputs);

/// <summary>Adds the gradients of the first output (upstream gradient <paramref name="dOut"/>) into
/// <paramref name="grads"/>, one per input (null where the input is not differentiable).</summary>
public delegate void BackwardFn(CaseScope scope, Tensor[] inputs, Tensor[] outputs, Tensor dOut, Tensor?[] grads);

/// <summary>
/// One op under test: inputs, forward, and (where the op has one) backward. The same case drives
/// the kernel check (ILGPU against the managed CPU backend) and the finite-difference check.
/// </summary>
public sealed class OpCase
{
    /// <summary>Name shown in reports, e.g. "conv2d 3x3 s2".</summary>
    public required string Name { get; init; }

    /// <summary>The inputs, filled from the check's seed.</summary>
    public required InputSpec[] Inputs { get; init; }

    /// <summary>The forward op.</summary>
    public required ForwardFn Forward { get; init; }

    /// <summary>The backward op, or null for ops without one (optimiser steps, random fills).</summary>
    public BackwardFn? Backward { get; init; }

    /// <summary>Kernel check tolerance: |gpu - cpu| ≤ Atol + Rtol·|cpu|. Float sums in another order
    /// differ by a few ulps times the number of terms; 1e-4 covers the sums here (≤ 500 terms).</summary>
    public double KernelAtol { get; init; } = 1e-4;

    /// <summary>See <see cref="KernelAtol"/>.</summary>
    public double KernelRtol { get; init; } = 1e-4;

    /// <summary>The longest sum of products any of the case's outputs takes through a tiled GEMM (a convolution's C·R·S,
    /// K·R·S or N·P·Q, a linear layer's inputs or batch); 0 for an op with none. On tensor cores the kernel check widens
    /// the tolerance by <see cref="Checker.ProductTolerance"/> of it.</summary>
    public int ProductTerms { get; init; }

    /// <summary>Finite-difference step. Float32 needs 1e-2..1e-3: smaller steps drown in rounding.</summary>
    public double Step { get; init; } = 1e-2;

    /// <summary>
    /// Gradient check tolerance: |analytic - numeric| ≤ GradAtol + GradRtol·|numeric|. The numeric
    /// derivative carries the loss's float32 rounding (~1e-6 relative over a few hundred terms)
    /// divided by 2·step, about 1e-4, plus the step's curvature error O(step²·f‴) ~ 1e-4 for the
    /// smooth ops here; 3e-3 + 2e-2 relative leaves margin yet fails a dropped term or a wrong index.
    /// </summary>
    public double GradAtol { get; init; } = 3e-3;

    /// <summary>See <see cref="GradAtol"/>.</summary>
    public double GradRtol { get; init; } = 2e-2;

    /// <inheritdoc/>
    public override string ToString() => Name;
}

/// <summary>The tensors one run of a case creates; disposed together at the end of the run.</summary>
public sealed class CaseScope(Device device) : IDisposable
{
    private readonly List<Tensor> _owned = [];

    /// <summary>The device the case runs on.</summary>
    public Device Device { get; } = device;

    /// <summary>An output tensor filled with NaN, so an element the op never writes shows as a mismatch.</summary>
    public Tensor Output(params int[] shape)
    {
        var t = Own(Tensor.Empty(Device, shape));
        Elementwise.Fill(t, float.NaN);
        return t;
    }

    /// <summary>A zero-filled tensor (for gradients the case adds into).</summary>
    public Tensor Zeros(params int[] shape) => Own(Tensor.Zeros(Device, shape));

    /// <summary>A tensor holding host values.</summary>
    public Tensor Host(float[] values, params int[] shape) => Own(Tensor.FromHost(Device, values, shape));

    /// <summary>Takes ownership of a tensor.</summary>
    public Tensor Own(Tensor t)
    {
        _owned.Add(t);
        return t;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        foreach (var t in _owned)
        {
            t.Dispose();
        }
        _owned.Clear();
    }
}
