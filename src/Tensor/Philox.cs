namespace Ddpm.Tensors;

/// <summary>
/// Philox 4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), a
/// counter-based generator: element <c>i</c> of the stream for key <c>seed</c> is a pure function
/// of (seed, offset + i). Every backend computes the same function, so a run is reproducible and
/// CPU and GPU streams agree element by element (uniforms bit for bit; normals to float rounding
/// of log/sin/cos). Written with plain integer arithmetic so ILGPU compiles it into kernels.
/// </summary>
public static class Philox
{
    private const uint M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85;

    /// <summary>The 4 words of block <paramref name="counter"/> under key <paramref name="seed"/>.</summary>
    public static (uint, uint, uint, uint) Block(ulong seed, ulong counter) =>
        Block((uint)counter, (uint)(counter >> 32), 0, 0, (uint)seed, (uint)(seed >> 32));

    /// <summary>The Philox 4x32-10 bijection of a 128-bit counter under a 64-bit key (Random123's philox4x32_10).</summary>
    public static (uint, uint, uint, uint) Block(uint c0, uint c1, uint c2, uint c3, uint k0, uint k1)
    {
        for (int round = 0; round < 10; round++)
        {
            ulong p0 = (ulong)M0 * c0;
            ulong p1 = (ulong)M1 * c2;
            uint n0 = (uint)(p1 >> 32) ^ c1 ^ k0;
            uint n2 = (uint)(p0 >> 32) ^ c3 ^ k1;
            c1 = (uint)p1;
            c3 = (uint)p0;
            c0 = n0;
            c2 = n2;
            k0 += W0;
            k1 += W1;
        }
        return (c0, c1, c2, c3);
    }

    /// <summary>32 random bits: element <paramref name="index"/> of the word stream of <paramref name="seed"/>.</summary>
    public static uint Bits(ulong seed, ulong index)
    {
        var (a, b, c, d) = Block(seed, index >> 2);
        return (index & 3) switch { 0 => a, 1 => b, 2 => c, _ => d };
    }

    /// <summary>A key for stream <paramref name="stream"/> of a run seeded <paramref name="seed"/>
    /// (shuffling, timesteps and noise each draw from their own).</summary>
    public static ulong Key(ulong seed, ulong stream) => seed * 0x9E3779B97F4A7C15UL + stream * 0xD1B54A32D192ED03UL + 1;

    /// <summary>Uniform in [0, 1): element <paramref name="index"/> of the stream, 24 random bits.</summary>
    public static float Uniform(ulong seed, ulong index) => (Bits(seed, index) >> 8) * (1.0f / 16777216.0f);

    /// <summary>The two uniforms (u1 in (0, 1], u2 in [0, 1)) behind the normal pair of block <paramref name="pair"/>.</summary>
    public static (float U1, float U2) NormalUniforms(ulong seed, ulong pair)
    {
        // A separate key half keeps the normal stream independent of the uniform one.
        var (a, b, _, _) = Block(seed ^ 0x5DEECE66DUL << 32, pair);
        return (((a >> 8) + 1) * (1.0f / 16777216.0f), (b >> 8) * (1.0f / 16777216.0f));
    }

    /// <summary>Standard normal: element <paramref name="index"/> of the stream (Box-Muller; even
    /// indices take the cosine, odd the sine of the same pair).</summary>
    public static float Normal(ulong seed, ulong index)
    {
        var (u1, u2) = NormalUniforms(seed, index >> 1);
        float r = MathF.Sqrt(-2.0f * MathF.Log(u1));
        // The angle lies in [-π, π): GPUs' fast sin/cos are accurate on that range only.
        float angle = MathF.PI * (2.0f * u2 - 1.0f);
        return (index & 1) == 0 ? r * MathF.Cos(angle) : r * MathF.Sin(angle);
    }
}
