// The managed CPU backend's GEMM split over the backend's helper threads (the driver and its overview: Gemm.cs).
//
// parallel=true splits C into one column (or row) stripe per core and hands the stripes to Cpu.Items: the caller
// computes stripes alongside the pool's helpers, and takes over any stripe whose helper has not started by the time it
// is done (so a busy core costs nothing). No allocation per call: the split's state is a struct passed by value to a
// static lambda. If the pool is busy (another caller, or a GEMM called from inside a parallel job), Cpu.Items runs the
// same stripes inline, so the result does not depend on who ran them.

namespace Ddpm.Kernels;

public static unsafe partial class Gemm
{
    /// <summary>One parallel GEMM: the serial product to run per stripe, the operands, and the stripe layout.</summary>
    private readonly struct Split
    {
        private readonly delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> _fn;
        private readonly int _m, _n, _k, _aRow, _aCol, _bRow, _bCol, _ldc, _per;
        private readonly float* _a, _b, _c;
        private readonly bool _accumulate, _columns;

        public Split(delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> fn, int m, int n, int k,
            float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate, bool columns, int per)
        {
            _fn = fn;
            (_m, _n, _k, _aRow, _aCol, _bRow, _bCol, _ldc) = (m, n, k, aRow, aCol, bRow, bCol, ldc);
            _a = a;
            _b = b;
            _c = c;
            (_accumulate, _columns, _per) = (accumulate, columns, per);
        }

        public void Run(int part)
        {
            int o = part * _per;
            if (_columns)
            {
                _fn(_m, Math.Min(_per, _n - o), _k, _a, _aRow, _aCol, _b + (long)o * _bCol, _bRow, _bCol, _c + o, _ldc, _accumulate);
            }
            else
            {
                _fn(Math.Min(_per, _m - o), _n, _k, _a + (long)o * _aRow, _aRow, _aCol, _b, _bRow, _bCol, _c + (long)o * _ldc, _ldc, _accumulate);
            }
        }
    }

    /// <summary>Runs the product as stripes on the backend's pool; false when it splits into fewer than two stripes
    /// (the caller then runs it serially).</summary>
    private static bool TryRunSplit(delegate*<int, int, int, float*, int, int, float*, int, int, float*, int, bool, void> fn, int mr, int nr,
        int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
    {
        int workers = Cpu.Threads;
        // Stripes are whole panels, so the split creates no new edge tiles. Column stripes each pack all of A (small:
        // weights) and their own part of B (large: im2col); row stripes each pack all of B. So prefer columns unless
        // rows balance clearly better (n = 196: 3 + 2 panels vs 64 + 64 rows; n = 49: 48 + 1).
        int nTiles = (n + nr - 1) / nr, mTiles = (m + mr - 1) / mr;
        int perCol = (nTiles + workers - 1) / workers * nr, perRow = (mTiles + workers - 1) / workers * mr;
        bool columns = (double)Math.Min(perCol, n) / n <= 1.15 * Math.Min(perRow, m) / m;
        int per = columns ? perCol : perRow;
        int parts = columns ? (n + per - 1) / per : (m + per - 1) / per;
        if (parts < 2)
        {
            return false;
        }
        Cpu.Items(parts, new Split(fn, m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate, columns, per), static (split, part) => split.Run(part));
        return true;
    }
}
