namespace Ddpm.Kernels;

/// <summary>PLACEHOLDER until the packed GEMM lands.</summary>
public static unsafe class Gemm
{
    public static void Multiply(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate, bool parallel) =>
        MultiplyNaive(m, n, k, a, aRow, aCol, b, bRow, bCol, c, ldc, accumulate);

    public static void MultiplyNaive(int m, int n, int k, float* a, int aRow, int aCol, float* b, int bRow, int bCol, float* c, int ldc, bool accumulate)
    {
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            float s = 0;
            for (int p = 0; p < k; p++) s += a[(long)i * aRow + (long)p * aCol] * b[(long)p * bRow + (long)j * bCol];
            c[(long)i * ldc + j] = accumulate ? c[(long)i * ldc + j] + s : s;
        }
    }
}
