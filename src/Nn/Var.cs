using Ddpm.Tensors;

namespace Ddpm.Nn;

/// <summary>
/// A value in the autograd graph: a tensor, and where gradients flow, its gradient (allocated on
/// first use, zero-filled, then added into by every consumer: a value used twice gets the sum).
/// Intermediates belong to the <see cref="Tape"/> that made them and go back to the pool once
/// backward no longer needs them.
/// </summary>
public class Var
{
    internal Var(Tensor value, bool requiresGrad)
    {
        Value = value;
        RequiresGrad = requiresGrad;
    }

    /// <summary>The forward value.</summary>
    public Tensor Value { get; private set; }

    /// <summary>∂loss/∂value once backward has reached it; null before (or where no gradient flows).</summary>
    public Tensor? Grad { get; internal set; }

    /// <summary>Whether backward computes a gradient for this value.</summary>
    public bool RequiresGrad { get; private set; }

    /// <summary>Shape of the value.</summary>
    public int[] Shape => Value.Shape;

    // Bookkeeping for releasing intermediates during backward: how many recorded backward steps
    // still need this value, and whether the step that produced it has run.
    internal int PendingUses;
    internal bool ProducerDone;
    internal bool OwnedByTape;

    /// <summary>Makes a recycled Var (see <see cref="Tape.Reset"/>) a fresh value.</summary>
    internal void Reuse(Tensor value, bool requiresGrad)
    {
        (Value, Grad, RequiresGrad) = (value, null, requiresGrad);
        (PendingUses, ProducerDone, OwnedByTape) = (0, false, false);
    }

    internal void Release()
    {
        Value.Dispose();
        Grad?.Dispose();
        Grad = null;
    }

    /// <inheritdoc/>
    public override string ToString() => $"Var[{Value.ShapeText}]";
}

/// <summary>A learned tensor with its spec name (e.g. "enc1.conv1.weight") and a persistent gradient.</summary>
public sealed class Parameter : Var
{
    /// <summary>Wraps <paramref name="value"/> as a trainable parameter called <paramref name="name"/>.</summary>
    public Parameter(string name, Tensor value) : base(value, requiresGrad: true) => Name = name;

    /// <summary>The parameter's name in checkpoints, as the model spec and the PyTorch peer spell it.</summary>
    public string Name { get; }

    /// <summary>Element count.</summary>
    public int Length => Value.Length;

    /// <summary>Sets the gradient to zero (allocating it the first time).</summary>
    public void ZeroGrad()
    {
        if (Grad is { } g)
        {
            g.Zero();
        }
        else
        {
            Grad = Value.ZerosLike();
        }
    }
}
