// Packing for the managed CPU backend's GEMM (the driver and its overview: Gemm.cs): A blocks into MR-row panels,
// B micro-panels from their sources (strided matrices, and the row- or column-offset views of a padded image that
// the implicit-GEMM convolution multiplies), the AVX-512 (16x16, 8x16) and AVX2 (8x8, 4x8) register transposes the packers use.
//
// The packed panels live in the calling thread's Arena (slots GemmA, GemmB: 64-byte aligned, so packed B rows are whole
// cache lines and the kernel's zmm loads never split lines), so concurrent calls from many threads with parallel=false
// are safe and allocation-free.

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

public static unsafe partial class Gemm
{
    /// <summary>
    /// A block [mc x kc] into MR-row panels: panel q holds A(q*MR + r, p) at q*MR*kc + p*MR + r, rows past mc zeroed,
    /// so the kernel reads one contiguous MR-float column per k step.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackA<TK>(int mc, int kc, float* a, int aRow, int aCol, float* dst) where TK : struct, IMicroKernel
    {
        int MR = TK.MR;
        for (int i0 = 0; i0 < mc; i0 += MR)
        {
            int mr = Math.Min(MR, mc - i0);
            float* d = dst + (long)i0 * kc;
            float* s0 = a + (long)i0 * aRow;
            if (MR == 8 && mr == 8 && aCol == 1 && Isa.Avx512)
            {
                // Row-major A (weights, dY): the panel is a transpose; do it 8x16 at a time in registers.
                int p0 = 0;
                for (; p0 + 16 <= kc; p0 += 16) Transpose8x16(s0 + p0, aRow, d + p0 * 8);
                for (int r = 0; r < 8; r++)
                {
                    float* s = s0 + (long)r * aRow;
                    for (int p = p0; p < kc; p++) d[p * 8 + r] = s[p];
                }
            }
            else if (MR == 8 && mr == 8 && aRow == 1 && Isa.Avx2)
            {
                // Column-major A (W^T): each panel column is already 8 contiguous floats.
                for (int p = 0; p < kc; p++) Vector256.Store(Vector256.Load(s0 + (long)p * aCol), d + p * 8);
            }
            else if (MR == 4 && mr == 4 && aCol == 1 && Isa.Avx2)
            {
                // Row-major A at the 4x24 kernel: the panel is a transpose; do it 4x8 at a time in registers.
                int p0 = 0;
                for (; p0 + 8 <= kc; p0 += 8)
                {
                    float* s = s0 + p0;
                    Transpose4x8(Vector256.Load(s), Vector256.Load(s + aRow), Vector256.Load(s + 2L * aRow), Vector256.Load(s + 3L * aRow), d + p0 * 4);
                }
                for (int r = 0; r < 4; r++)
                {
                    float* s = s0 + (long)r * aRow;
                    for (int p = p0; p < kc; p++) d[p * 4 + r] = s[p];
                }
            }
            else if (MR == 4 && mr == 4 && aRow == 1 && Isa.Avx2)
            {
                // Column-major A (W^T) at the 4x24 kernel: each panel column is already 4 contiguous floats.
                for (int p = 0; p < kc; p++) Vector128.Store(Vector128.Load(s0 + (long)p * aCol), d + p * 4);
            }
            else if (aCol == 1)
            {
                for (int r = 0; r < mr; r++)
                {
                    float* s = s0 + (long)r * aRow;
                    for (int p = 0; p < kc; p++) d[p * MR + r] = s[p];
                }
                for (int r = mr; r < MR; r++)
                    for (int p = 0; p < kc; p++) d[p * MR + r] = 0f;
            }
            else
            {
                for (int p = 0; p < kc; p++)
                {
                    float* s = s0 + (long)p * aCol;
                    float* dd = d + p * MR;
                    int r = 0;
                    for (; r < mr; r++) dd[r] = s[(long)r * aRow];
                    for (; r < MR; r++) dd[r] = 0f;
                }
            }
        }
    }

    /// <summary>
    /// What the register transposes of a transposed B leave: columns nFull..NR (past nr zeroed) over the first kFull
    /// rows, then rows kFull..kc whole. Shared by the 16x16 (AVX-512) and 8x8 (AVX2) paths.
    /// </summary>
    private static void TransposedTails(float* b, int bCol, float* dst, int NR, int nr, int kc, int nFull, int kFull)
    {
        for (int j = nFull; j < NR; j++)
        {
            float* s = b + (long)j * bCol;
            if (j < nr) for (int p = 0; p < kFull; p++) dst[p * NR + j] = s[p];
            else for (int p = 0; p < kFull; p++) dst[p * NR + j] = 0f;
        }
        for (int p = kFull; p < kc; p++)
        {
            float* d = dst + p * NR;
            int j = 0;
            for (; j < nr; j++) d[j] = b[p + (long)j * bCol];
            for (; j < NR; j++) d[j] = 0f;
        }
    }

    /// <summary>One B micro-panel [kc x nr] (nr &lt;= NR) into dst[p*NR + j], columns nr..NR zeroed.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void PackB<TK>(int kc, int nr, float* b, int bRow, int bCol, float* dst) where TK : struct, IMicroKernel
    {
        int NR = TK.NR;
        if (bCol == 1 && nr == NR && NR % 16 == 0 && Isa.Avx512)
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                for (int j = 0; j < NR; j += 16) Vector512.Store(Vector512.Load(s + j), d + j);
            }
        }
        else if (bCol == 1 && NR % 16 == 0 && Isa.Avx512)
        {
            // Edge panel (n = 784 leaves 16 columns, 196 leaves 4).
            int nv = nr & ~15;
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nv; j += 16) Vector512.Store(Vector512.Load(s + j), d + j);
                for (; j < nr; j++) d[j] = s[j];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
        else if (bCol == 1 && nr == NR && NR % 8 == 0 && Isa.Avx2)
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                for (int j = 0; j < NR; j += 8) Vector256.Store(Vector256.Load(s + j), d + j);
            }
        }
        else if (bRow == 1 && NR % 16 == 0 && Isa.Avx512)
        {
            // Transposed B (col^T, linear weights): 16x16 register transposes; each source column is read sequentially.
            int nFull = nr & ~15, kFull = kc & ~15;
            for (int p0 = 0; p0 < kFull; p0 += 16)
                for (int j0 = 0; j0 < nFull; j0 += 16)
                    Transpose16x16(b + (long)j0 * bCol + p0, bCol, dst + p0 * NR + j0, NR);
            TransposedTails(b, bCol, dst, NR, nr, kc, nFull, kFull);
        }
        else if (bRow == 1 && NR % 8 == 0 && Isa.Avx2)
        {
            // Transposed B at 256 bits: 8x8 register transposes, each source column read sequentially.
            int nFull = nr & ~7, kFull = kc & ~7;
            for (int j0 = 0; j0 < nFull; j0 += 8)
                for (int p0 = 0; p0 < kFull; p0 += 8)
                    Transpose8x8(new StridedRows(b + (long)j0 * bCol + p0, bCol), dst + p0 * NR + j0, NR);
            TransposedTails(b, bCol, dst, NR, nr, kc, nFull, kFull);
        }
        else if (bCol == 1 && NR % 4 == 0 && Isa.V128)
        {
            // 128-bit rows (the 6x8 kernel).
            int nv = nr & ~3;
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nv; j += 4) Vector128.Store(Vector128.Load(s + j), d + j);
                for (; j < nr; j++) d[j] = s[j];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
        else if (bRow == 1)
        {
            // Transposed B without register transposes (128-bit and scalar levels): column by column, so the source is read in order and the
            // strided writes stay inside the L1-sized panel.
            for (int j = 0; j < nr; j++)
            {
                float* s = b + (long)j * bCol;
                for (int p = 0; p < kc; p++) dst[p * NR + j] = s[p];
            }
            for (int p = 0; p < kc; p++)
                for (int j = nr; j < NR; j++) dst[p * NR + j] = 0f;
        }
        else
        {
            for (int p = 0; p < kc; p++)
            {
                float* s = b + (long)p * bRow;
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nr; j++) d[j] = s[(long)j * bCol];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>Where the driver gets its B micro-panels from: a strided matrix, or rows/columns scattered in an image.</summary>
    private interface IBSource
    {
        /// <summary>dst[p*NR + j] = B(p0 + p, j0 + j) for p &lt; kc, j &lt; nr (nr &lt;= NR); columns nr..NR zeroed.</summary>
        void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel;

        /// <summary>Whether a whole NR-wide panel (rows p0.., columns j0..j0 + NR) can be multiplied where it lies,
        /// without packing (<see cref="RunInPlace"/>): true for sources whose rows are contiguous runs.</summary>
        bool InPlace { get; }

        /// <summary>C[0..mr, 0..NR) (=|+=) rows 0..mr (mr &lt;= MR) of the packed A panel times B(p0.., j0..j0 + NR) read
        /// where it lies.</summary>
        void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel;
    }

    /// <summary>B(p,j) = b[p*bRow + j*bCol].</summary>
    private readonly struct StridedB(float* b, int bRow, int bCol) : IBSource
    {
        private readonly float* _b = b;
        private readonly int _bRow = bRow, _bCol = bCol;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
            => PackB<TK>(kc, nr, _b + (long)p0 * _bRow + (long)j0 * _bCol, _bRow, _bCol, dst);

        public bool InPlace => _bCol == 1;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel
            => RunPanel<TK, StridedWalk>(kc, a, new StridedWalk(_b + (long)p0 * _bRow + j0, _bRow), mr, c, ldc, accumulate, tile);
    }

    /// <summary>B(p,j) = b[rowOffsets[p] + j]: each packed row is one contiguous (masked at the edge) copy.</summary>
    private readonly struct RowOffsetsB(float* b, int* rowOffsets) : IBSource
    {
        private readonly float* _b = b;
        private readonly int* _off = rowOffsets;

        public bool InPlace => true;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel
            => RunPanel<TK, OffsetWalk>(kc, a, new OffsetWalk(_b + j0, _off + p0), mr, c, ldc, accumulate, tile);

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            int NR = TK.NR;
            int* off = _off + p0;
            float* b = _b + j0;
            if (NR == 48 && Isa.Avx512)
            {
                if (nr == 48)
                {
                    for (int p = 0; p < kc; p++)
                    {
                        float* s = b + off[p];
                        float* d = dst + p * 48;
                        Vector512.Store(Vector512.Load(s), d);
                        Vector512.Store(Vector512.Load(s + 16), d + 16);
                        Vector512.Store(Vector512.Load(s + 32), d + 32);
                    }
                    return;
                }
                // Edge panel: masked loads read nothing past column nr - 1 and fill the rest with zeros.
                Vector512<int> lane = Vector512<int>.Indices, width = Vector512.Create(nr);
                Vector512<float> m0 = Vector512.LessThan(lane, width).AsSingle();
                Vector512<float> m1 = Vector512.LessThan(lane + Vector512.Create(16), width).AsSingle();
                Vector512<float> m2 = Vector512.LessThan(lane + Vector512.Create(32), width).AsSingle();
                for (int p = 0; p < kc; p++)
                {
                    float* s = b + off[p];
                    float* d = dst + p * 48;
                    Vector512.Store(Avx512F.MaskLoad(s, m0, Vector512<float>.Zero), d);
                    Vector512.Store(Avx512F.MaskLoad(s + 16, m1, Vector512<float>.Zero), d + 16);
                    Vector512.Store(Avx512F.MaskLoad(s + 32, m2, Vector512<float>.Zero), d + 32);
                }
                return;
            }
            if (NR == 24 && Isa.Avx2)
            {
                if (nr == 24)
                {
                    for (int p = 0; p < kc; p++)
                    {
                        float* s = b + off[p];
                        float* d = dst + p * 24;
                        Vector256.Store(Vector256.Load(s), d);
                        Vector256.Store(Vector256.Load(s + 8), d + 8);
                        Vector256.Store(Vector256.Load(s + 16), d + 16);
                    }
                    return;
                }
                // Edge panel (the 7x7 maps leave 15 columns of 24): masked loads read nothing past column nr - 1 and
                // fill the rest with zeros, where a scalar tail would cost a load and a store per float.
                Vector256<int> lane = Vector256<int>.Indices, width = Vector256.Create(nr);
                Vector256<float> m0 = Vector256.LessThan(lane, width).AsSingle();
                Vector256<float> m1 = Vector256.LessThan(lane + Vector256.Create(8), width).AsSingle();
                Vector256<float> m2 = Vector256.LessThan(lane + Vector256.Create(16), width).AsSingle();
                for (int p = 0; p < kc; p++)
                {
                    float* s = b + off[p];
                    float* d = dst + p * 24;
                    Vector256.Store(Avx.MaskLoad(s, m0), d);
                    Vector256.Store(Avx.MaskLoad(s + 8, m1), d + 8);
                    Vector256.Store(Avx.MaskLoad(s + 16, m2), d + 16);
                }
                return;
            }
            if (NR % 4 == 0 && Isa.V128)
            {
                int nv = nr & ~3;
                for (int p = 0; p < kc; p++)
                {
                    float* s = b + off[p];
                    float* d = dst + p * NR;
                    int j = 0;
                    for (; j < nv; j += 4) Vector128.Store(Vector128.Load(s + j), d + j);
                    for (; j < nr; j++) d[j] = s[j];
                    for (; j < NR; j++) d[j] = 0f;
                }
                return;
            }
            for (int p = 0; p < kc; p++)
            {
                float* s = b + off[p];
                float* d = dst + p * NR;
                int j = 0;
                for (; j < nr; j++) d[j] = s[j];
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>
    /// B(p, j) = b[t·imageStride + rowOffsets[p] + y·ldRow + x] for j = t·pq + y·q + x (<see cref="Gemm.MultiplyDenseColumns"/>):
    /// a panel's columns are runs of at most q floats, found once per panel and copied for every row with whole vectors
    /// (a run's overhang is overwritten by the next run, or by the next row: the panel buffer has slack after its last
    /// row, and the planes after their last).
    /// </summary>
    private readonly struct DenseColumnsB(float* b, int* rowOffsets, long imageStride, int ldRow, int p, int q) : IBSource
    {
        private readonly float* _b = b;
        private readonly int* _off = rowOffsets;
        private readonly long _imageStride = imageStride;
        private readonly int _ldRow = ldRow, _q = q, _pq = p * q;

        public bool InPlace => false;

        public void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel
            => throw new NotSupportedException("dense columns are gathered: pack them");

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            int NR = TK.NR;
            // The panel's runs: where each starts in the panel and in the planes, and its length.
            int maxRuns = nr / _q + 2;
            int* at = stackalloc int[maxRuns];
            int* len = stackalloc int[maxRuns];
            long* from = stackalloc long[maxRuns];
            int runs = 0;
            for (int j = j0; j < j0 + nr; runs++)
            {
                int t = j / _pq, rest = j - t * _pq, y = rest / _q, x = rest - y * _q;
                int l = Math.Min(_q - x, j0 + nr - j);
                at[runs] = j - j0;
                from[runs] = t * _imageStride + (long)y * _ldRow + x;
                len[runs] = l;
                j += l;
            }
            int* off = _off + p0;
            for (int pp = 0; pp < kc; pp++)
            {
                float* s = _b + off[pp];
                float* d = dst + pp * NR;
                for (int r = 0; r < runs; r++) CopyRun(s + from[r], d + at[r], len[r]);
                for (int j = nr; j < NR; j++) d[j] = 0f;
            }
        }

        /// <summary>dst[0..n) = src[0..n) in whole vectors (up to a vector's width - 1 floats more are read and written).</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void CopyRun(float* src, float* dst, int n)
        {
            if (Isa.Avx512)
            {
                for (int i = 0; i < n; i += 16) Vector512.Store(Vector512.Load(src + i), dst + i);
            }
            else if (Isa.Avx2)
            {
                for (int i = 0; i < n; i += 8) Vector256.Store(Vector256.Load(src + i), dst + i);
            }
            else if (Isa.V128)
            {
                for (int i = 0; i < n; i += 4) Vector128.Store(Vector128.Load(src + i), dst + i);
            }
            else
            {
                for (int i = 0; i < n; i++) dst[i] = src[i];
            }
        }
    }

    /// <summary>B(p,j) = b[columnOffsets[j] + p]: register transposes (16x16 at AVX-512, 8x8 at AVX2) of contiguous column runs.</summary>
    private readonly struct ColumnOffsetsB(float* b, int* columnOffsets) : IBSource
    {
        public bool InPlace => false;

        public void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel
            => throw new NotSupportedException("columns are not contiguous: pack them");

        private readonly float* _b = b;
        private readonly int* _off = columnOffsets;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            int NR = TK.NR;
            int* off = _off + j0;
            float* b = _b + p0;
            int jv = 0;
            if (NR % 16 == 0 && Isa.Avx512)
            {
                int kFull = kc & ~15;
                for (; jv + 16 <= nr; jv += 16)
                    for (int p = 0; p < kFull; p += 16)
                        TransposeGather16x16(b + p, off + jv, dst + p * NR + jv, NR);
                for (int p = kFull; p < kc; p++)
                {
                    float* d = dst + p * NR;
                    for (int j = 0; j < jv; j++) d[j] = b[off[j] + p];
                }
            }
            else if (NR % 8 == 0 && Isa.Avx2)
            {
                // The same at 256 bits: 8x8 register transposes of 8 column runs, each run read in order.
                int kFull = kc & ~7;
                for (; jv + 8 <= nr; jv += 8)
                    for (int p = 0; p < kFull; p += 8)
                        TransposeGather8x8(b + p, off + jv, dst + p * NR + jv, NR);
                for (int p = kFull; p < kc; p++)
                {
                    float* d = dst + p * NR;
                    for (int j = 0; j < jv; j++) d[j] = b[off[j] + p];
                }
            }
            if (jv == 0)
            {
                // No transposes at this level: column by column, each source run read in order.
                for (int j = 0; j < nr; j++)
                {
                    float* s = b + off[j];
                    for (int p = 0; p < kc; p++) dst[p * NR + j] = s[p];
                }
                jv = nr;
            }
            for (int p = 0; p < kc; p++)
            {
                float* d = dst + p * NR;
                int j = jv;
                for (; j < nr; j++) d[j] = b[off[j] + p];
                if (NR % 16 == 0 && Isa.Avx512)
                {
                    // Narrow panels (C·R·S = 9 for a one-channel input) are mostly zero padding.
                    for (; (j & 15) != 0; j++) d[j] = 0f;
                    for (; j < NR; j += 16) Vector512.Store(Vector512<float>.Zero, d + j);
                }
                for (; j < NR; j++) d[j] = 0f;
            }
        }
    }

    /// <summary>
    /// Column offsets over groups: rows [i·kPerGroup, (i+1)·kPerGroup) of B are the column-offset matrix of the block
    /// b + i·groupStride (several images' lowered matrices stacked along the reduction). A packing slice never straddles
    /// two groups when kPerGroup is a multiple of 16.
    /// </summary>
    private readonly struct GroupedColumnOffsetsB(float* b, int* columnOffsets, long groupStride, int kPerGroup) : IBSource
    {
        public bool InPlace => false;

        public void RunInPlace<TK>(int p0, int kc, int j0, float* a, int mr, float* c, int ldc, bool accumulate, float* tile) where TK : struct, IMicroKernel
            => throw new NotSupportedException("columns are not contiguous: pack them");

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Pack<TK>(int p0, int kc, int j0, int nr, float* dst) where TK : struct, IMicroKernel
        {
            for (int p = p0; p < p0 + kc;)
            {
                int i = p / kPerGroup, end = Math.Min(p0 + kc, (i + 1) * kPerGroup);
                // Group i's B(p, j) = b[i·groupStride + off[j] + p - i·kPerGroup].
                new ColumnOffsetsB(b + i * (groupStride - kPerGroup), columnOffsets).Pack<TK>(p, end - p, j0, nr, dst + (long)(p - p0) * TK.NR);
                p = end;
            }
        }
    }

    /// <summary>dst[q*ldd + r] = src[r*lds + q] for a 16x16 block (4 shuffle stages, 64 shuffles).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose16x16(float* src, int lds, float* dst, int ldd) => Transpose16x16(new StridedRows(src, lds), dst, ldd);

    /// <summary>dst[q*ldd + r] = src[offsets[r] + q] for r, q &lt; 16: the same transpose of 16 scattered rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TransposeGather16x16(float* src, int* offsets, float* dst, int ldd) => Transpose16x16(new OffsetRows(src, offsets), dst, ldd);

    /// <summary>Where the 16 rows of a register transpose start. A struct type argument, so every use is inlined: the
    /// transpose must compile as one optimised method (16 vector arguments would exceed the JIT's inlining limit).</summary>
    private interface IRows
    {
        float* Row(int i);
    }

    private readonly struct StridedRows(float* src, int lds) : IRows
    {
        private readonly float* _src = src;
        private readonly int _lds = lds;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float* Row(int i) => _src + (long)i * _lds;
    }

    private readonly struct OffsetRows(float* src, int* offsets) : IRows
    {
        private readonly float* _src = src;
        private readonly int* _offsets = offsets;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float* Row(int i) => _src + _offsets[i];
    }

    /// <summary>dst[q*ldd + r] = rows.Row(r)[q] for r, q &lt; 16.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose16x16<TRows>(TRows rows, float* dst, int ldd) where TRows : struct, IRows
    {
        Vector512<float> r0 = Vector512.Load(rows.Row(0)), r1 = Vector512.Load(rows.Row(1)), r2 = Vector512.Load(rows.Row(2)), r3 = Vector512.Load(rows.Row(3));
        Vector512<float> r4 = Vector512.Load(rows.Row(4)), r5 = Vector512.Load(rows.Row(5)), r6 = Vector512.Load(rows.Row(6)), r7 = Vector512.Load(rows.Row(7));
        Vector512<float> r8 = Vector512.Load(rows.Row(8)), r9 = Vector512.Load(rows.Row(9)), r10 = Vector512.Load(rows.Row(10)), r11 = Vector512.Load(rows.Row(11));
        Vector512<float> r12 = Vector512.Load(rows.Row(12)), r13 = Vector512.Load(rows.Row(13)), r14 = Vector512.Load(rows.Row(14)), r15 = Vector512.Load(rows.Row(15));
        Vector512<float> t0 = Avx512F.UnpackLow(r0, r1), t1 = Avx512F.UnpackHigh(r0, r1), t2 = Avx512F.UnpackLow(r2, r3), t3 = Avx512F.UnpackHigh(r2, r3);
        Vector512<float> t4 = Avx512F.UnpackLow(r4, r5), t5 = Avx512F.UnpackHigh(r4, r5), t6 = Avx512F.UnpackLow(r6, r7), t7 = Avx512F.UnpackHigh(r6, r7);
        Vector512<float> t8 = Avx512F.UnpackLow(r8, r9), t9 = Avx512F.UnpackHigh(r8, r9), t10 = Avx512F.UnpackLow(r10, r11), t11 = Avx512F.UnpackHigh(r10, r11);
        Vector512<float> t12 = Avx512F.UnpackLow(r12, r13), t13 = Avx512F.UnpackHigh(r12, r13), t14 = Avx512F.UnpackLow(r14, r15), t15 = Avx512F.UnpackHigh(r14, r15);
        // After this stage, 128-bit lane L of u(4g+q) holds rows 4g..4g+3 of column 4L+q.
        Vector512<float> u0 = Lo64(t0, t2), u1 = Hi64(t0, t2), u2 = Lo64(t1, t3), u3 = Hi64(t1, t3);
        Vector512<float> u4 = Lo64(t4, t6), u5 = Hi64(t4, t6), u6 = Lo64(t5, t7), u7 = Hi64(t5, t7);
        Vector512<float> u8 = Lo64(t8, t10), u9 = Hi64(t8, t10), u10 = Lo64(t9, t11), u11 = Hi64(t9, t11);
        Vector512<float> u12 = Lo64(t12, t14), u13 = Hi64(t12, t14), u14 = Lo64(t13, t15), u15 = Hi64(t13, t15);
        // 0x88 picks lanes {0,2} of each source, 0xDD lanes {1,3}: two rounds assemble whole columns.
        Vector512<float> v0 = Avx512F.Shuffle4x128(u0, u4, 0x88), v1 = Avx512F.Shuffle4x128(u0, u4, 0xDD);
        Vector512<float> v2 = Avx512F.Shuffle4x128(u1, u5, 0x88), v3 = Avx512F.Shuffle4x128(u1, u5, 0xDD);
        Vector512<float> v4 = Avx512F.Shuffle4x128(u2, u6, 0x88), v5 = Avx512F.Shuffle4x128(u2, u6, 0xDD);
        Vector512<float> v6 = Avx512F.Shuffle4x128(u3, u7, 0x88), v7 = Avx512F.Shuffle4x128(u3, u7, 0xDD);
        Vector512<float> v8 = Avx512F.Shuffle4x128(u8, u12, 0x88), v9 = Avx512F.Shuffle4x128(u8, u12, 0xDD);
        Vector512<float> v10 = Avx512F.Shuffle4x128(u9, u13, 0x88), v11 = Avx512F.Shuffle4x128(u9, u13, 0xDD);
        Vector512<float> v12 = Avx512F.Shuffle4x128(u10, u14, 0x88), v13 = Avx512F.Shuffle4x128(u10, u14, 0xDD);
        Vector512<float> v14 = Avx512F.Shuffle4x128(u11, u15, 0x88), v15 = Avx512F.Shuffle4x128(u11, u15, 0xDD);
        Vector512.Store(Avx512F.Shuffle4x128(v0, v8, 0x88), dst);
        Vector512.Store(Avx512F.Shuffle4x128(v2, v10, 0x88), dst + 1L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v4, v12, 0x88), dst + 2L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v6, v14, 0x88), dst + 3L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v1, v9, 0x88), dst + 4L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v3, v11, 0x88), dst + 5L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v5, v13, 0x88), dst + 6L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v7, v15, 0x88), dst + 7L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v0, v8, 0xDD), dst + 8L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v2, v10, 0xDD), dst + 9L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v4, v12, 0xDD), dst + 10L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v6, v14, 0xDD), dst + 11L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v1, v9, 0xDD), dst + 12L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v3, v11, 0xDD), dst + 13L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v5, v13, 0xDD), dst + 14L * ldd);
        Vector512.Store(Avx512F.Shuffle4x128(v7, v15, 0xDD), dst + 15L * ldd);
    }

    /// <summary>dst[q*ldd + r] = src[offsets[r] + q] for r, q &lt; 8: the 256-bit transpose of 8 scattered rows.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TransposeGather8x8(float* src, int* offsets, float* dst, int ldd) => Transpose8x8(new OffsetRows(src, offsets), dst, ldd);

    /// <summary>dst[q*ldd + r] = rows.Row(r)[q] for r, q &lt; 8 (3 shuffle stages, 24 shuffles: AVX2's transposes, where
    /// the scalar packing they replace costs a load and a store per float).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose8x8<TRows>(TRows rows, float* dst, int ldd) where TRows : struct, IRows
    {
        Vector256<float> r0 = Vector256.Load(rows.Row(0)), r1 = Vector256.Load(rows.Row(1)), r2 = Vector256.Load(rows.Row(2)), r3 = Vector256.Load(rows.Row(3));
        Vector256<float> r4 = Vector256.Load(rows.Row(4)), r5 = Vector256.Load(rows.Row(5)), r6 = Vector256.Load(rows.Row(6)), r7 = Vector256.Load(rows.Row(7));
        Transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7, dst, ldd);
    }

    /// <summary>dst[q*4 + r] = r(r)[q] for r &lt; 4, q &lt; 8: one 8-step slice of a 4-row A panel (32 contiguous floats).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose4x8(Vector256<float> r0, Vector256<float> r1, Vector256<float> r2, Vector256<float> r3, float* dst)
    {
        Vector256<float> t0 = Avx.UnpackLow(r0, r1), t1 = Avx.UnpackHigh(r0, r1), t2 = Avx.UnpackLow(r2, r3), t3 = Avx.UnpackHigh(r2, r3);
        // Half h of u(q) is column 4h+q (rows 0..3).
        Vector256<float> u0 = Avx.Shuffle(t0, t2, 0x44), u1 = Avx.Shuffle(t0, t2, 0xEE), u2 = Avx.Shuffle(t1, t3, 0x44), u3 = Avx.Shuffle(t1, t3, 0xEE);
        Vector256.Store(Avx.Permute2x128(u0, u1, 0x20), dst);
        Vector256.Store(Avx.Permute2x128(u2, u3, 0x20), dst + 8);
        Vector256.Store(Avx.Permute2x128(u0, u1, 0x31), dst + 16);
        Vector256.Store(Avx.Permute2x128(u2, u3, 0x31), dst + 24);
    }

    /// <summary>Stores the transpose of the 8x8 block whose rows are r0..r7: dst[q*ldd + r] = r(r)[q].</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose8x8(Vector256<float> r0, Vector256<float> r1, Vector256<float> r2, Vector256<float> r3,
        Vector256<float> r4, Vector256<float> r5, Vector256<float> r6, Vector256<float> r7, float* dst, int ldd)
    {
        // Within each 128-bit half: t0 = [r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] r0[5] r1[5]], t1 the same for 2,3 | 6,7.
        Vector256<float> t0 = Avx.UnpackLow(r0, r1), t1 = Avx.UnpackHigh(r0, r1), t2 = Avx.UnpackLow(r2, r3), t3 = Avx.UnpackHigh(r2, r3);
        Vector256<float> t4 = Avx.UnpackLow(r4, r5), t5 = Avx.UnpackHigh(r4, r5), t6 = Avx.UnpackLow(r6, r7), t7 = Avx.UnpackHigh(r6, r7);
        // Half h of u(q) holds rows 0..3 of column 4h+q; u(4+q) the same for rows 4..7.
        Vector256<float> u0 = Avx.Shuffle(t0, t2, 0x44), u1 = Avx.Shuffle(t0, t2, 0xEE), u2 = Avx.Shuffle(t1, t3, 0x44), u3 = Avx.Shuffle(t1, t3, 0xEE);
        Vector256<float> u4 = Avx.Shuffle(t4, t6, 0x44), u5 = Avx.Shuffle(t4, t6, 0xEE), u6 = Avx.Shuffle(t5, t7, 0x44), u7 = Avx.Shuffle(t5, t7, 0xEE);
        // 0x20 joins the lower halves (columns 0..3), 0x31 the upper ones (columns 4..7).
        Vector256.Store(Avx.Permute2x128(u0, u4, 0x20), dst);
        Vector256.Store(Avx.Permute2x128(u1, u5, 0x20), dst + 1L * ldd);
        Vector256.Store(Avx.Permute2x128(u2, u6, 0x20), dst + 2L * ldd);
        Vector256.Store(Avx.Permute2x128(u3, u7, 0x20), dst + 3L * ldd);
        Vector256.Store(Avx.Permute2x128(u0, u4, 0x31), dst + 4L * ldd);
        Vector256.Store(Avx.Permute2x128(u1, u5, 0x31), dst + 5L * ldd);
        Vector256.Store(Avx.Permute2x128(u2, u6, 0x31), dst + 6L * ldd);
        Vector256.Store(Avx.Permute2x128(u3, u7, 0x31), dst + 7L * ldd);
    }

    /// <summary>dst[p*8 + r] = src[r*lds + p] for r &lt; 8, p &lt; 16: one 16-step slice of an 8-row A panel.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Transpose8x16(float* src, int lds, float* dst)
    {
        Vector512<float> r0 = Vector512.Load(src), r1 = Vector512.Load(src + lds), r2 = Vector512.Load(src + 2L * lds), r3 = Vector512.Load(src + 3L * lds);
        Vector512<float> r4 = Vector512.Load(src + 4L * lds), r5 = Vector512.Load(src + 5L * lds), r6 = Vector512.Load(src + 6L * lds), r7 = Vector512.Load(src + 7L * lds);
        Vector512<float> t0 = Avx512F.UnpackLow(r0, r1), t1 = Avx512F.UnpackHigh(r0, r1), t2 = Avx512F.UnpackLow(r2, r3), t3 = Avx512F.UnpackHigh(r2, r3);
        Vector512<float> t4 = Avx512F.UnpackLow(r4, r5), t5 = Avx512F.UnpackHigh(r4, r5), t6 = Avx512F.UnpackLow(r6, r7), t7 = Avx512F.UnpackHigh(r6, r7);
        // Lane L of u(q) holds rows 0..3 of column 4L+q; u(4+q) the same for rows 4..7.
        Vector512<double> u0 = Lo64(t0, t2).AsDouble(), u1 = Hi64(t0, t2).AsDouble(), u2 = Lo64(t1, t3).AsDouble(), u3 = Hi64(t1, t3).AsDouble();
        Vector512<double> u4 = Lo64(t4, t6).AsDouble(), u5 = Hi64(t4, t6).AsDouble(), u6 = Lo64(t5, t7).AsDouble(), u7 = Hi64(t5, t7).AsDouble();
        // Interleave the two row halves lane by lane: the lower 256 bits become one full column, the upper another.
        Vector512<long> lo = Vector512.Create(0L, 1, 8, 9, 2, 3, 10, 11), hi = Vector512.Create(4L, 5, 12, 13, 6, 7, 14, 15);
        StoreHalves(Avx512F.PermuteVar8x64x2(u0, lo, u4), dst + 0 * 8, dst + 4 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u0, hi, u4), dst + 8 * 8, dst + 12 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u1, lo, u5), dst + 1 * 8, dst + 5 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u1, hi, u5), dst + 9 * 8, dst + 13 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u2, lo, u6), dst + 2 * 8, dst + 6 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u2, hi, u6), dst + 10 * 8, dst + 14 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u3, lo, u7), dst + 3 * 8, dst + 7 * 8);
        StoreHalves(Avx512F.PermuteVar8x64x2(u3, hi, u7), dst + 11 * 8, dst + 15 * 8);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreHalves(Vector512<double> v, float* lower, float* upper)
    {
        Vector256.Store(v.GetLower().AsSingle(), lower);
        Vector256.Store(v.GetUpper().AsSingle(), upper);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Lo64(Vector512<float> x, Vector512<float> y) => Avx512F.UnpackLow(x.AsDouble(), y.AsDouble()).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Hi64(Vector512<float> x, Vector512<float> y) => Avx512F.UnpackHigh(x.AsDouble(), y.AsDouble()).AsSingle();
}
