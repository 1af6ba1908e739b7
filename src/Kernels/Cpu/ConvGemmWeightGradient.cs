// The weight gradient of the implicit-GEMM convolution (the layout and the plan: ConvGemm.cs): the packed GEMM over
// groups of images, or for few output channels dot-product tiles along the image.

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Ddpm.Kernels;

internal static unsafe partial class ConvGemm
{
    /// <summary>
    /// The weight gradient's GEMM has the reduction along the image (J = P·Wh, up to 840) and transposes both operands
    /// into its panels; with few output channels (K) those transposes cost as much as the products. The dot-product
    /// tiles read dy and the lowered rows as they lie, at the price of a horizontal sum per result and tile: worth it
    /// for small K on large images.
    /// </summary>
    internal static bool UsesDotWeightGradient(ConvShape g, bool? forced = null)
    {
        if (!Isa.V128) return false;
        if (forced is { } choice) return choice;
        long j = (long)g.P * (g.Q + (g.S - 1) / g.Stride);
        return g.K <= DotSmallK || (g.K <= DotMaxK && j >= DotMinJ);
    }

    // Thresholds from measurement against the packed GEMM (docs/perf.md): with up to 32 output channels the dot tiles
    // win or tie at every size; with 64 they win on large images (28x28, J = 840) and lose below; from 128 the GEMM
    // wins. Small images go through the tiles in groups of about DotMinJ positions. The 256-bit tiles were checked
    // against the AVX2 GEMM on the K <= 64 shapes these pick, and win there too.
    private const int DotSmallK = 32, DotMaxK = 64, DotMinJ = 400;

    /// <summary>dW += Σ_n dy[n]·col(x[n])ᵀ, one private partial sum per worker, summed at the end.</summary>
    public static void BackwardWeight(ConvShape g, float* dy, float* x, float* dw, CpuConvPaths paths = default)
    {
        if (UsesDotWeightGradient(g, paths.DotWeightGradient))
        {
            BackwardWeightDot(g, dy, x, dw);
            return;
        }
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad, g.Q);
        int crs = g.Crs, wlen = g.K * crs, j = g.P * pl.Wh;
        int* off = Workspace.Current.Offsets(crs);
        pl.Offsets(g.R, g.S, off);
        // Parts of the batch, each summed into its own dW, added in part order: a function of N, not of the cores.
        int workers = Cpu.Parts(g.N);
        // The GEMM reads and writes all of its C (the worker's dW) once per block of its reduction. Small images go in
        // groups whose positions (each image's rounded up to whole 16-float slices, the rest zero) fill about one
        // block, so a 7x7 layer's dW is swept once per two images instead of once per image.
        int group = Math.Clamp(Gemm.KC / ((j + 15) & ~15), 1, Math.Max(1, g.N / workers));
        int ldk = group > 1 ? (j + 15) & ~15 : j;
        float* partials = Arena.Current.Floats(ArenaSlot.Partials, (long)workers * wlen);
        Cpu.Items(workers, (g, pl, (nint)dy, (nint)x, (nint)off, (nint)partials, workers, group, ldk), static (state, worker) =>
        {
            var (g, pl, dyp, xp, offp, partialsp, workers, group, ldk) = state;
            float* dy = (float*)dyp, x = (float*)xp;
            int* off = (int*)offp;
            int crs = g.Crs, wlen = g.K * crs, ldd = group * ldk;
            long planeLen = pl.Length;
            float* acc = (float*)partialsp + (long)worker * wlen;
            new Span<float>(acc, wlen).Clear();
            var ws = Workspace.Current;
            float* planes = ws.Planes(group * planeLen);
            float* dyw = ws.Wide((long)g.K * ldd);
            if (ldk > g.P * pl.Wh) new Span<float>(dyw, g.K * ldd).Clear(); // the zero slice ends, never written after
            int first = (int)((long)g.N * worker / workers), last = (int)((long)g.N * (worker + 1) / workers);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0);
                StageGroup(g, pl, x, dy, n0, count, planes, dyw, imageStride: ldk, channelStride: ldd);
                // dW [K, CRS] += dywide [K, count·ldk] · colᵀ [count·ldk, CRS], image i's columns read from its planes
                Gemm.MultiplyColumnOffsets(g.K, crs, count * ldk, dyw, ldd, 1, planes, off, acc, crs, accumulate: true,
                    groupStride: planeLen, kPerGroup: ldk);
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    /// <summary>
    /// The weight gradient as dot products along the image: dW[k, p] += Σ_j dywide[k, j]·planes[off[p] + j], in tiles of
    /// 4 output channels x 6 lowered rows (24 zmm accumulators), 16 positions a step. dy is copied onto the wide grid
    /// with its rows padded to whole vectors and its channels to a multiple of 4 (zeros), and the offsets to a multiple
    /// of 6 (repeats of the last), so every tile runs the same loop; results outside [K, CRS) are dropped.
    /// </summary>
    private static void BackwardWeightDot(ConvShape g, float* dy, float* x, float* dw)
    {
        var pl = new Planes(g.C, g.H, g.W, g.Stride, g.Pad, g.Pad, g.Q);
        int crs = g.Crs, crs6 = (crs + 5) / 6 * 6, wlen = g.K * crs;
        int j = g.P * pl.Wh, ldd = (j + 15) & ~15;
        int* off = Workspace.Current.Offsets(crs6);
        pl.Offsets(g.R, g.S, off);
        for (int p = crs; p < crs6; p++) off[p] = off[crs - 1];
        int workers = Cpu.Parts(g.N); // parts of the batch, as in the GEMM path
        // Small images go in groups, so that each tile's sums run over ~DotMinJ positions before their horizontal sum.
        int group = Math.Clamp((DotMinJ + ldd - 1) / ldd, 1, Math.Max(1, g.N / workers));
        float* partials = Arena.Current.Floats(ArenaSlot.Partials, (long)workers * wlen);
        Cpu.Items(workers, (g, pl, (nint)dy, (nint)x, (nint)off, (nint)partials, workers, group, ldd), static (state, worker) =>
        {
            var (g, pl, dyp, xp, offp, partialsp, workers, group, ldd) = state;
            float* dy = (float*)dyp, x = (float*)xp;
            int* off = (int*)offp;
            int crs = g.Crs, wlen = g.K * crs, k4 = (g.K + 3) & ~3;
            long planeLen = pl.Length, dyLen = (long)k4 * ldd;
            float* acc = (float*)partialsp + (long)worker * wlen;
            new Span<float>(acc, wlen).Clear();
            var ws = Workspace.Current;
            // The planes' slack (Wh + 64 floats) covers the reads of the padded row end past j.
            float* planes = ws.Planes(group * planeLen);
            float* dyw = ws.Wide(group * dyLen);
            new Span<float>(dyw, (int)(group * dyLen)).Clear();
            int first = (int)((long)g.N * worker / workers), last = (int)((long)g.N * (worker + 1) / workers);
            for (int n0 = first; n0 < last; n0 += group)
            {
                int count = Math.Min(group, last - n0);
                StageGroup(g, pl, x, dy, n0, count, planes, dyw, imageStride: dyLen, channelStride: ldd);
                if (Isa.Avx512) DotTiles(g.K, crs, ldd, dyw, dyLen, planes, planeLen, count, off, acc);
                else if (Isa.Avx2) DotTiles256(g.K, crs, ldd, dyw, dyLen, planes, planeLen, count, off, acc);
                else DotTiles128(g.K, crs, ldd, dyw, dyLen, planes, planeLen, count, off, acc);
            }
        });
        var dst = new Span<float>(dw, wlen);
        for (int worker = 0; worker < workers; worker++)
        {
            Simd.AddInPlace(dst, new ReadOnlySpan<float>(partials + (long)worker * wlen, wlen));
        }
    }

    /// <summary>acc[k, p] += Σ_i Σ_{j &lt; ldd} dyw[i·dyStride + k·ldd + j]·planes[i·planeStride + off[p] + j] for k &lt; kk,
    /// p &lt; crs, over <paramref name="images"/> images (see <see cref="BackwardWeightDot"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotTiles(int kk, int crs, int ldd, float* dyw, long dyStride, float* planes, long planeStride, int images, int* off, float* acc)
    {
        for (int k0 = 0; k0 < kk; k0 += 4)
        {
            for (int p0 = 0; p0 < crs; p0 += 6)
            {
                Vector512<float> a00 = default, a01 = default, a02 = default, a03 = default, a04 = default, a05 = default;
                Vector512<float> a10 = default, a11 = default, a12 = default, a13 = default, a14 = default, a15 = default;
                Vector512<float> a20 = default, a21 = default, a22 = default, a23 = default, a24 = default, a25 = default;
                Vector512<float> a30 = default, a31 = default, a32 = default, a33 = default, a34 = default, a35 = default;
                for (int i = 0; i < images; i++)
                {
                    float* d0 = dyw + i * dyStride + (long)k0 * ldd, d1 = d0 + ldd, d2 = d1 + ldd, d3 = d2 + ldd;
                    float* pi = planes + i * planeStride;
                    float* c0 = pi + off[p0], c1 = pi + off[p0 + 1], c2 = pi + off[p0 + 2];
                    float* c3 = pi + off[p0 + 3], c4 = pi + off[p0 + 4], c5 = pi + off[p0 + 5];
                    for (int j = 0; j < ldd; j += 16)
                    {
                        Vector512<float> y0 = Vector512.Load(d0 + j), y1 = Vector512.Load(d1 + j), y2 = Vector512.Load(d2 + j), y3 = Vector512.Load(d3 + j);
                        Vector512<float> v = Vector512.Load(c0 + j);
                        a00 = Avx512F.FusedMultiplyAdd(y0, v, a00); a10 = Avx512F.FusedMultiplyAdd(y1, v, a10);
                        a20 = Avx512F.FusedMultiplyAdd(y2, v, a20); a30 = Avx512F.FusedMultiplyAdd(y3, v, a30);
                        v = Vector512.Load(c1 + j);
                        a01 = Avx512F.FusedMultiplyAdd(y0, v, a01); a11 = Avx512F.FusedMultiplyAdd(y1, v, a11);
                        a21 = Avx512F.FusedMultiplyAdd(y2, v, a21); a31 = Avx512F.FusedMultiplyAdd(y3, v, a31);
                        v = Vector512.Load(c2 + j);
                        a02 = Avx512F.FusedMultiplyAdd(y0, v, a02); a12 = Avx512F.FusedMultiplyAdd(y1, v, a12);
                        a22 = Avx512F.FusedMultiplyAdd(y2, v, a22); a32 = Avx512F.FusedMultiplyAdd(y3, v, a32);
                        v = Vector512.Load(c3 + j);
                        a03 = Avx512F.FusedMultiplyAdd(y0, v, a03); a13 = Avx512F.FusedMultiplyAdd(y1, v, a13);
                        a23 = Avx512F.FusedMultiplyAdd(y2, v, a23); a33 = Avx512F.FusedMultiplyAdd(y3, v, a33);
                        v = Vector512.Load(c4 + j);
                        a04 = Avx512F.FusedMultiplyAdd(y0, v, a04); a14 = Avx512F.FusedMultiplyAdd(y1, v, a14);
                        a24 = Avx512F.FusedMultiplyAdd(y2, v, a24); a34 = Avx512F.FusedMultiplyAdd(y3, v, a34);
                        v = Vector512.Load(c5 + j);
                        a05 = Avx512F.FusedMultiplyAdd(y0, v, a05); a15 = Avx512F.FusedMultiplyAdd(y1, v, a15);
                        a25 = Avx512F.FusedMultiplyAdd(y2, v, a25); a35 = Avx512F.FusedMultiplyAdd(y3, v, a35);
                    }
                }
                int np = Math.Min(6, crs - p0);
                StoreSums(acc + (long)k0 * crs + p0, np, a00, a01, a02, a03, a04, a05);
                if (k0 + 1 < kk) StoreSums(acc + (long)(k0 + 1) * crs + p0, np, a10, a11, a12, a13, a14, a15);
                if (k0 + 2 < kk) StoreSums(acc + (long)(k0 + 2) * crs + p0, np, a20, a21, a22, a23, a24, a25);
                if (k0 + 3 < kk) StoreSums(acc + (long)(k0 + 3) * crs + p0, np, a30, a31, a32, a33, a34, a35);
            }
        }
    }

    /// <summary>
    /// <see cref="DotTiles"/> at 256 bits: tiles of 2 output channels x 6 lowered rows (12 ymm accumulators + 2 dy
    /// vectors + 1 lowered-row vector = 15 of the 16 registers), 8 positions a step. Same contract; k runs in pairs
    /// inside the caller's multiple of 4.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotTiles256(int kk, int crs, int ldd, float* dyw, long dyStride, float* planes, long planeStride, int images, int* off, float* acc)
    {
        for (int k0 = 0; k0 < kk; k0 += 2)
        {
            for (int p0 = 0; p0 < crs; p0 += 6)
            {
                Vector256<float> a00 = default, a01 = default, a02 = default, a03 = default, a04 = default, a05 = default;
                Vector256<float> a10 = default, a11 = default, a12 = default, a13 = default, a14 = default, a15 = default;
                for (int i = 0; i < images; i++)
                {
                    float* d0 = dyw + i * dyStride + (long)k0 * ldd, d1 = d0 + ldd;
                    float* pi = planes + i * planeStride;
                    float* c0 = pi + off[p0], c1 = pi + off[p0 + 1], c2 = pi + off[p0 + 2];
                    float* c3 = pi + off[p0 + 3], c4 = pi + off[p0 + 4], c5 = pi + off[p0 + 5];
                    for (int j = 0; j < ldd; j += 8)
                    {
                        Vector256<float> y0 = Vector256.Load(d0 + j), y1 = Vector256.Load(d1 + j);
                        Vector256<float> v = Vector256.Load(c0 + j);
                        a00 = Fma.MultiplyAdd(y0, v, a00); a10 = Fma.MultiplyAdd(y1, v, a10);
                        v = Vector256.Load(c1 + j);
                        a01 = Fma.MultiplyAdd(y0, v, a01); a11 = Fma.MultiplyAdd(y1, v, a11);
                        v = Vector256.Load(c2 + j);
                        a02 = Fma.MultiplyAdd(y0, v, a02); a12 = Fma.MultiplyAdd(y1, v, a12);
                        v = Vector256.Load(c3 + j);
                        a03 = Fma.MultiplyAdd(y0, v, a03); a13 = Fma.MultiplyAdd(y1, v, a13);
                        v = Vector256.Load(c4 + j);
                        a04 = Fma.MultiplyAdd(y0, v, a04); a14 = Fma.MultiplyAdd(y1, v, a14);
                        v = Vector256.Load(c5 + j);
                        a05 = Fma.MultiplyAdd(y0, v, a05); a15 = Fma.MultiplyAdd(y1, v, a15);
                    }
                }
                int np = Math.Min(6, crs - p0);
                StoreSums(acc + (long)k0 * crs + p0, np, a00, a01, a02, a03, a04, a05);
                if (k0 + 1 < kk) StoreSums(acc + (long)(k0 + 1) * crs + p0, np, a10, a11, a12, a13, a14, a15);
            }
        }
    }

    /// <summary>The same tiles at 128 bits (the portable path: NEON on ARM64, SSE/AVX-128 on x86), 2 channels x 6 lowered
    /// rows (12 accumulators), 4 positions a step; MultiplyAddEstimate fuses where the processor can.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotTiles128(int kk, int crs, int ldd, float* dyw, long dyStride, float* planes, long planeStride, int images, int* off, float* acc)
    {
        for (int k0 = 0; k0 < kk; k0 += 2)
        {
            for (int p0 = 0; p0 < crs; p0 += 6)
            {
                Vector128<float> a00 = default, a01 = default, a02 = default, a03 = default, a04 = default, a05 = default;
                Vector128<float> a10 = default, a11 = default, a12 = default, a13 = default, a14 = default, a15 = default;
                for (int i = 0; i < images; i++)
                {
                    float* d0 = dyw + i * dyStride + (long)k0 * ldd, d1 = d0 + ldd;
                    float* pi = planes + i * planeStride;
                    float* c0 = pi + off[p0], c1 = pi + off[p0 + 1], c2 = pi + off[p0 + 2];
                    float* c3 = pi + off[p0 + 3], c4 = pi + off[p0 + 4], c5 = pi + off[p0 + 5];
                    for (int j = 0; j < ldd; j += 4)
                    {
                        Vector128<float> y0 = Vector128.Load(d0 + j), y1 = Vector128.Load(d1 + j);
                        Vector128<float> v = Vector128.Load(c0 + j);
                        a00 = Vector128.MultiplyAddEstimate(y0, v, a00); a10 = Vector128.MultiplyAddEstimate(y1, v, a10);
                        v = Vector128.Load(c1 + j);
                        a01 = Vector128.MultiplyAddEstimate(y0, v, a01); a11 = Vector128.MultiplyAddEstimate(y1, v, a11);
                        v = Vector128.Load(c2 + j);
                        a02 = Vector128.MultiplyAddEstimate(y0, v, a02); a12 = Vector128.MultiplyAddEstimate(y1, v, a12);
                        v = Vector128.Load(c3 + j);
                        a03 = Vector128.MultiplyAddEstimate(y0, v, a03); a13 = Vector128.MultiplyAddEstimate(y1, v, a13);
                        v = Vector128.Load(c4 + j);
                        a04 = Vector128.MultiplyAddEstimate(y0, v, a04); a14 = Vector128.MultiplyAddEstimate(y1, v, a14);
                        v = Vector128.Load(c5 + j);
                        a05 = Vector128.MultiplyAddEstimate(y0, v, a05); a15 = Vector128.MultiplyAddEstimate(y1, v, a15);
                    }
                }
                int np = Math.Min(6, crs - p0);
                StoreSums(acc + (long)k0 * crs + p0, np, a00, a01, a02, a03, a04, a05);
                if (k0 + 1 < kk) StoreSums(acc + (long)(k0 + 1) * crs + p0, np, a10, a11, a12, a13, a14, a15);
            }
        }
    }

    /// <summary>dst[i] += the lane sum of the i-th vector, for i &lt; count (≤ 6).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreSums(float* dst, int count, Vector128<float> v0, Vector128<float> v1, Vector128<float> v2,
        Vector128<float> v3, Vector128<float> v4, Vector128<float> v5)
    {
        Vector128<float> sums = Vector128.Create(Vector128.Sum(v0), Vector128.Sum(v1), Vector128.Sum(v2), Vector128.Sum(v3));
        if (count >= 4)
        {
            Vector128.Store(Vector128.Load(dst) + sums, dst);
            if (count > 4) dst[4] += Vector128.Sum(v4);
            if (count > 5) dst[5] += Vector128.Sum(v5);
            return;
        }
        for (int i = 0; i < count; i++)
        {
            dst[i] += sums.GetElement(i);
        }
    }

    /// <summary>dst[i] += the lane sum of the i-th vector, for i &lt; count (≤ 6).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreSums(float* dst, int count, Vector512<float> v0, Vector512<float> v1, Vector512<float> v2,
        Vector512<float> v3, Vector512<float> v4, Vector512<float> v5)
    {
        // Pairwise halving: 512 -> 256 bits for all six at once, then as at 256 bits.
        StoreSums(dst, count, v0.GetLower() + v0.GetUpper(), v1.GetLower() + v1.GetUpper(), v2.GetLower() + v2.GetUpper(),
            v3.GetLower() + v3.GetUpper(), v4.GetLower() + v4.GetUpper(), v5.GetLower() + v5.GetUpper());
    }

    /// <summary>dst[i] += the lane sum of the i-th vector, for i &lt; count (≤ 6).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreSums(float* dst, int count, Vector256<float> h0, Vector256<float> h1, Vector256<float> h2,
        Vector256<float> h3, Vector256<float> h4, Vector256<float> h5)
    {
        // hadd pairs: [h0, h1] -> lanes (h0 sums, h1 sums) per 128-bit half
        Vector256<float> s01 = Avx.HorizontalAdd(h0, h1), s23 = Avx.HorizontalAdd(h2, h3), s45 = Avx.HorizontalAdd(h4, h5);
        Vector256<float> s0123 = Avx.HorizontalAdd(s01, s23), s45x = Avx.HorizontalAdd(s45, s45);
        // s0123 lanes: [v0a v1a v2a v3a | v0b v1b v2b v3b] (a, b: the two 128-bit halves); add the halves.
        Vector128<float> r0123 = s0123.GetLower() + s0123.GetUpper();
        Vector128<float> r45 = s45x.GetLower() + s45x.GetUpper();
        if (count == 6)
        {
            Vector128.Store(Vector128.Load(dst) + r0123, dst);
            dst[4] += r45.GetElement(0);
            dst[5] += r45.GetElement(1);
            return;
        }
        for (int i = 0; i < count; i++)
        {
            dst[i] += i < 4 ? r0123.GetElement(i) : r45.GetElement(i - 4);
        }
    }

    /// <summary>
    /// The weight gradient's operands for images n0 .. n0 + count: image i's padded planes at planes + i·pl.Length, and
    /// each channel k of its dy on the wide grid at dyw + i·imageStride + k·channelStride (P rows of Wh floats).
    /// </summary>
    private static void StageGroup(ConvShape g, Planes pl, float* x, float* dy, int n0, int count, float* planes, float* dyw, long imageStride, long channelStride)
    {
        long xs = (long)g.C * g.H * g.W, ys = (long)g.K * g.Pq;
        for (int i = 0; i < count; i++)
        {
            pl.Fill(x + (n0 + i) * xs, planes + i * pl.Length);
            for (int k = 0; k < g.K; k++)
            {
                ToWideColumns(dy + (n0 + i) * ys + (long)k * g.Pq, 1, g.P, g.Q, dyw + i * imageStride + k * channelStride, pl.Wh);
            }
        }
    }

    /// <summary>wide[k, y·ldw + x] = dy[k, y, x] for x &lt; q, 0 for q ≤ x &lt; ldw: dy [rows, p, q] on the wide grid.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ToWideColumns(float* dy, int rows, int p, int q, float* wide, int ldw)
    {
        for (long row = 0; row < (long)rows * p; row++)
        {
            float* dst = wide + row * ldw;
            CopyRow(dy + row * q, dst, q);
            new Span<float>(dst + q, ldw - q).Clear();
        }
    }
}
