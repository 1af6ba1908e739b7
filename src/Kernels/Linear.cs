using Ddpm.Tensors;
using ILGPU;
using ILGPU.Runtime;

namespace Ddpm.Kernels;

/// <summary>Strided GEMM geometry for kernels: C [M, N] (=|+=) A·B with A(i,p) = a[i·ARow + p·ACol]
/// and B(p,j) = b[p·BRow + j·BCol]; strides express the transposes.</summary>
public readonly struct MatmulShape(int m, int n, int k, int aRow, int aCol, int bRow, int bCol, bool accumulate)
{
    /// <summary>Rows of C, columns of C, inner dimension.</summary>
    public readonly int M = m, N = n, K = k;

    /// <summary>Element strides of A and B.</summary>
    public readonly int ARow = aRow, ACol = aCol, BRow = bRow, BCol = bCol;

    /// <summary>1 to add into C, 0 to overwrite it (an int: kernels take blittable values).</summary>
    public readonly int Accumulate = accumulate ? 1 : 0;
}

/// <summary>
/// Matrix multiply and the fully connected layer (torch.nn.Linear): y = x·wᵀ + b with
/// x [N, In], w [Out, In], b [Out], y [N, Out]; backward dx += dy·w, dw += dyᵀ·x, db += Σ_n dy.
/// Versions: CPU through the packed SIMD <see cref="Gemm"/> (transposes are strides);
/// ILGPU v1 (the simple twin) one thread per output element; ILGPU v2 (the default) the tiled GEMM of
/// <see cref="TiledGemm"/> (64x64 tiles, 256 threads, 4x4 register tiles, K step 16 in shared memory).
/// </summary>
public static unsafe class Linear
{
    /// <summary>c (=|+=) op(a)·op(b), op = transpose when asked. a, b, c are 2-D.</summary>
    public static void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, bool accumulate) =>
        Matmul(a, transA, b, transB, c, accumulate, bias: null, rowSums: null);

    /// <summary>
    /// c (=|+=) op(a)·op(b) (+ bias[j] on every row, when given) and rowSums[i] += Σ_p op(a)[i, p] (when given). On the
    /// tiled ILGPU path both ride in the product's launch (the epilogue, and the row sums of A as it passes through shared
    /// memory); elsewhere they are passes of their own.
    /// </summary>
    private static void Matmul(Tensor a, bool transA, Tensor b, bool transB, Tensor c, bool accumulate, Tensor? bias, Tensor? rowSums)
    {
        Check.Rank("matmul", "a", a, 2);
        Check.Rank("matmul", "b", b, 2);
        Check.Devices("matmul", a, b, c);
        int m = transA ? a.Dim(1) : a.Dim(0), k = transA ? a.Dim(0) : a.Dim(1);
        int kb = transB ? b.Dim(1) : b.Dim(0), n = transB ? b.Dim(0) : b.Dim(1);
        if (k != kb)
        {
            throw new ArgumentException($"matmul: inner sizes differ ({a.ShapeText}{(transA ? "ᵀ" : "")} · {b.ShapeText}{(transB ? "ᵀ" : "")})");
        }
        Check.Shape("matmul", "c", c, m, n);
        if (rowSums is not null && !transA)
        {
            // Row i of op(a) is column i of a when transposed: as the linear layer's dyᵀ, the bias gradient Σ_n dy[n, i].
            throw new NotSupportedException("matmul: row sums are taken of a transposed a only (a bias gradient)");
        }
        var s = new MatmulShape(m, n, k,
            transA ? 1 : a.Dim(1), transA ? a.Dim(1) : 1,
            transB ? 1 : b.Dim(1), transB ? b.Dim(1) : 1, accumulate);
        using var simd = CpuSimd.Enter(a.Device);
        if (a.Device.IsIlgpu)
        {
            var kk = IlgpuKernels.For(a);
            if (!kk.Simple)
            {
                var t = new TileArgs(m, n, k, 0, accumulate, false, default, s, rowSums: rowSums is not null, bias: bias is not null);
                TiledGemm.Launch<MatmulTile>(kk, kk.Linear.TiledMatmul.For(), t, a.View, b.View, c.View, (bias ?? c).View, (rowSums ?? c).View, c.View);
                return;
            }
            kk.Linear.Matmul(kk.Stream, m * n, a.View, b.View, c.View, s);
            if (bias is not null)
            {
                kk.Linear.AddRows(kk.Stream, c.Length, bias.View, c.View, n);
            }
        }
        else
        {
            Gemm.Multiply(m, n, k, a.Pointer, s.ARow, s.ACol, b.Pointer, s.BRow, s.BCol, c.Pointer, n, accumulate, parallel: true);
            if (bias is not null)
            {
                var cv = c.Host();
                var bv = bias.Host();
                for (int i = 0; i < m; i++)
                {
                    Simd.AddInPlace(cv.Slice(i * n, n), bv.Slice(0, n));
                }
            }
        }
        if (rowSums is not null)
        {
            ColumnSumsInto(a, rowSums);
        }
    }

    /// <summary>y = x·wᵀ + b (the bias in the product's epilogue on the tiled ILGPU path).</summary>
    public static void Forward(Tensor x, Tensor w, Tensor b, Tensor y)
    {
        Check.Rank("linear", "w", w, 2);
        Check.Shape("linear", "b", b, w.Dim(0));
        Check.Devices("linear", x, b);
        Matmul(x, false, w, true, y, accumulate: false, bias: b, rowSums: null);
    }

    /// <summary>dx += dy·w.</summary>
    public static void BackwardInput(Tensor dy, Tensor w, Tensor dx) => Matmul(dy, false, w, false, dx, accumulate: true);

    /// <summary>dw += dyᵀ·x, and with <paramref name="db"/> also db[o] += Σ_n dy[n, o] (on the tiled ILGPU path in the
    /// same launch: the row sums of dyᵀ).</summary>
    public static void BackwardWeight(Tensor dy, Tensor x, Tensor dw, Tensor? db = null)
    {
        if (db is not null)
        {
            Check.Rank("linear backward bias", "dy", dy, 2);
            Check.Devices("linear backward bias", dy, db);
            Check.Shape("linear backward bias", "db", db, dy.Dim(1));
        }
        Matmul(dy, true, x, false, dw, accumulate: true, bias: null, rowSums: db);
    }

    /// <summary>db[o] += Σ_n dy[n, o].</summary>
    public static void BackwardBias(Tensor dy, Tensor db)
    {
        Check.Rank("linear backward bias", "dy", dy, 2);
        Check.Devices("linear backward bias", dy, db);
        Check.Shape("linear backward bias", "db", db, dy.Dim(1));
        ColumnSumsInto(dy, db);
    }

    /// <summary>db[o] += Σ_n dy[n, o] for dy [N, O], in its own pass.</summary>
    private static void ColumnSumsInto(Tensor dy, Tensor db)
    {
        int n = dy.Dim(0), outs = dy.Dim(1);
        using var simd = CpuSimd.Enter(dy.Device);
        if (dy.Device.IsIlgpu)
        {
            var k = IlgpuKernels.For(dy);
            k.Linear.ColumnSums(k.Stream, outs, dy.View, db.View, n);
            return;
        }
        var dyv = dy.Host();
        var dbv = db.Host();
        for (int i = 0; i < n; i++)
        {
            Simd.AddInPlace(dbv.Slice(0, outs), dyv.Slice(i * outs, outs));
        }
    }

    // i over c [M, N]
    internal static void MatmulKernel(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> c, MatmulShape s)
    {
        int row = i / s.N, col = i % s.N;
        float acc = 0;
        for (int p = 0; p < s.K; p++)
        {
            acc += a[row * s.ARow + p * s.ACol] * b[p * s.BRow + col * s.BCol];
        }
        c[i] = s.Accumulate != 0 ? c[i] + acc : acc;
    }

    // i over y [rows, cols]
    internal static void AddRowsKernel(Index1D i, ArrayView<float> b, ArrayView<float> y, int cols) => y[i] += b[i % cols];

    // col over [cols]: sums [rows, cols] down the rows into out (+=)
    internal static void ColumnSumsKernel(Index1D col, ArrayView<float> x, ArrayView<float> sums, int rows)
    {
        int cols = sums.IntLength;
        float acc = 0;
        for (int r = 0; r < rows; r++)
        {
            acc += x[r * cols + col];
        }
        sums[col] += acc;
    }

    internal sealed class Gpu(IlgpuKernels k)
    {
        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, MatmulShape> Matmul =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, MatmulShape>>(MatmulKernel);

        public readonly TiledKernels<MatmulTile> TiledMatmul = new(k, matmul: true);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> AddRows =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(AddRowsKernel);

        public readonly Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int> ColumnSums =
            k.Auto<Action<AcceleratorStream, Index1D, ArrayView<float>, ArrayView<float>, int>>(ColumnSumsKernel);
    }
}
