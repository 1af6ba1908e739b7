using Ddpm.Tensors;
using ILGPU;

namespace Ddpm.Kernels;

/// <summary>
/// A model's convolution weights permuted once for the passes in K steps of one tap (<see cref="TiledConv.ByTaps"/>:
/// <see cref="ConvForwardTapTile"/>'s [K][R·S][C], <see cref="ConvInputTapTile"/>'s [C][R·S][K]) while the weights do not
/// change: a training step's forwards and backwards, a sampling run's denoising steps (<see cref="Conv2d.HoldWeights"/>).
/// One launch permutes them all (<see cref="TiledConv.PermuteWeightsKernel"/>), where each pass would take one of its own;
/// a convolution whose weight is held reads the copy, any other permutes its weight at the call. The holder must not
/// write the weights while it holds them; disposing lets go. The layout and the copies' memory stay for the next hold of
/// the same list (a training step allocates nothing), until another list replaces them.
/// </summary>
internal sealed class HeldConvWeights : IDisposable
{
    /// <summary>Ints a weight takes in the segment table: its first element in the launch, its offset in the storage,
    /// K, C, R·S, and its two copies' offsets (-1: none).</summary>
    internal const int SegmentInts = 7;

    private readonly IlgpuKernels _k;
    private readonly Dictionary<Tensor, (int Forward, int Input)> _at = new(ReferenceEqualityComparer.Instance);
    private readonly Tensor? _forward, _input;
    private readonly object? _storage;
    private readonly ArrayView<int> _table;
    private readonly int _total, _segments;

    /// <summary>Lays out the copies of <paramref name="weights"/> and takes their memory (kept until <see cref="Free"/>: a
    /// training run holds the same weights every step); <see cref="Hold"/> fills them.</summary>
    public HeldConvWeights(IlgpuKernels k, IReadOnlyList<Tensor> weights)
    {
        _k = k;
        Weights = weights;
        var table = new List<int>();
        int forward = 0, input = 0;
        foreach (var w in weights)
        {
            if (w.Shape.Length != 4 || !w.Device.IsIlgpu)
            {
                continue;
            }
            int kk = w.Shape[0], c = w.Shape[1], r = w.Shape[2], s = w.Shape[3];
            bool takes = r <= Taps.MaxKernel && s <= Taps.MaxKernel;
            bool byForward = takes && kk > 1 && TiledConv.ByTaps(c), byInput = takes && TiledConv.ByTaps(kk);
            // One launch reads one storage: a weight elsewhere (not in the model's flat parameters) permutes at its call.
            if (!(byForward || byInput) || _at.ContainsKey(w) || (_storage is not null && !ReferenceEquals(_storage, w.Storage)))
            {
                continue;
            }
            _storage = w.Storage;
            _at[w] = (byForward ? forward : -1, byInput ? input : -1);
            table.AddRange([_total, w.Offset, kk, c, r * s, byForward ? forward : -1, byInput ? input : -1]);
            _total = checked(_total + w.Length);
            forward += byForward ? w.Length : 0;
            input += byInput ? w.Length : 0;
        }
        if (_total == 0)
        {
            return;
        }
        _segments = table.Count / SegmentInts;
        _table = k.SegmentTable([.. table]);
        _forward = Tensor.Empty(k.Device, Math.Max(forward, 1));
        _input = Tensor.Empty(k.Device, Math.Max(input, 1));
    }

    /// <summary>The weights this layout is for (the list itself: a caller that holds the same list again reuses it).</summary>
    public IReadOnlyList<Tensor> Weights { get; }

    /// <summary>Queues the permutation of every weight (one launch) and makes this the kernels' hold until disposed.</summary>
    public HeldConvWeights Hold()
    {
        if (_total > 0)
        {
            _k.Conv2d.PermuteWeights(_k.Stream, _total, IlgpuDevice.ViewOf(_storage!), _table, _segments, _forward!.View, _input!.View);
        }
        _k.Held = this;
        return this;
    }

    /// <summary>The forward's copy of <paramref name="w"/> ([K][R·S][C]), or null where it is not held.</summary>
    public ArrayView<float>? Forward(Tensor w) =>
        _at.TryGetValue(w, out var at) && at.Forward >= 0 ? _forward!.View.SubView(at.Forward, w.Length) : null;

    /// <summary>The input gradient's copy of <paramref name="w"/> ([C][R·S][K]), or null where it is not held.</summary>
    public ArrayView<float>? Input(Tensor w) =>
        _at.TryGetValue(w, out var at) && at.Input >= 0 ? _input!.View.SubView(at.Input, w.Length) : null;

    /// <summary>Ends the hold: the weights may change again (the copies are filled anew by the next <see cref="Hold"/>).</summary>
    public void Dispose()
    {
        if (ReferenceEquals(_k.Held, this))
        {
            _k.Held = null;
        }
    }

    /// <summary>Gives the copies' memory back (the layout is done with: another list replaced it).</summary>
    public void Free()
    {
        Dispose();
        _forward?.Dispose();
        _input?.Dispose();
    }
}
