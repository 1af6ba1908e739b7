using Ddpm.Tensors;


namespace Ddpm.Diffusion;

/// <summary>The order the training digits are drawn in: a seeded permutation an epoch.</summary>
public sealed partial class Trainer
{
    private int[] _order = [];
    private int _orderEpoch = -1;

    /// <summary>The epoch's permutation of the training digits (Fisher-Yates on the shuffle stream).</summary>
    private int[] Order(int epoch)
    {
        if (_orderEpoch == epoch)
        {
            return _order;
        }
        if (_order.Length != _data.Count)
        {
            _order = new int[_data.Count];
        }
        var order = _order;
        for (int i = 0; i < order.Length; i++)
        {
            order[i] = i;
        }
        ulong key = Philox.Key(Options.Seed, ShuffleStream), start = (ulong)epoch * (ulong)_data.Count;
        for (int i = order.Length - 1; i > 0; i--)
        {
            int k = (int)(Philox.Bits(key, start + (ulong)i) % (uint)(i + 1));
            (order[i], order[k]) = (order[k], order[i]);
        }
        _orderEpoch = epoch;
        return order;
    }
}
