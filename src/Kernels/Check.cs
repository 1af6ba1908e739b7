using Ddpm.Tensors;

namespace Ddpm.Kernels;

/// <summary>Shape checks shared by every op: one clear message naming the op and the shapes.</summary>
internal static class Check
{
    public static void Same(string op, Tensor a, Tensor b)
    {
        if (a.Device != b.Device)
        {
            throw new ArgumentException($"{op}: tensors on different devices ({a.Device.Name} and {b.Device.Name})");
        }
    }

    public static void Shape(string op, string name, Tensor t, params ReadOnlySpan<int> expected)
    {
        if (!t.Shape.AsSpan().SequenceEqual(expected))
        {
            throw new ArgumentException($"{op}: {name} is {t.ShapeText}, expected {Tensor.ShapeString(expected)}");
        }
    }

    public static void Rank(string op, string name, Tensor t, int rank)
    {
        if (t.Rank != rank)
        {
            throw new ArgumentException($"{op}: {name} is {t.ShapeText}, expected rank {rank}");
        }
    }

    public static void Devices(string op, params ReadOnlySpan<Tensor> ts)
    {
        for (int i = 1; i < ts.Length; i++)
        {
            Same(op, ts[0], ts[i]);
        }
    }
}
