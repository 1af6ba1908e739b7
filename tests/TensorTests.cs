using Ddpm.Kernels;
using Ddpm.Tensors;

namespace Ddpm.Tests;

public sealed class TensorTests
{
    /// <summary>Random123's known-answer vectors for Philox 4x32-10 (kat_vectors).</summary>
    [Theory]
    [InlineData(0u, 0u, 0u, 0u, 0u, 0u, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u)]
    [InlineData(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu)]
    [InlineData(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u, 0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u)]
    public void PhiloxMatchesKnownAnswers(uint c0, uint c1, uint c2, uint c3, uint k0, uint k1, uint r0, uint r1, uint r2, uint r3)
    {
        Assert.Equal((r0, r1, r2, r3), Philox.Block(c0, c1, c2, c3, k0, k1));
    }

    [Fact]
    public void NormalStreamHasUnitMomentsAndIsReproducible()
    {
        using var t = Tensor.Empty(CpuDevice.Instance, 100_000);
        RandomFill.Normal(t, seed: 7, offset: 0);
        var v = t.ToArray();
        double mean = v.Average(x => (double)x), var = v.Average(x => (x - mean) * (x - mean));
        Assert.InRange(mean, -0.01, 0.01);
        Assert.InRange(var, 0.98, 1.02);
        // Offsets address the same stream: elements 1000.. of a fill at offset 0 equal a fill at offset 1000.
        using var tail = Tensor.Empty(CpuDevice.Instance, 10);
        RandomFill.Normal(tail, seed: 7, offset: 1000);
        Assert.Equal(v.AsSpan(1000, 10).ToArray(), tail.ToArray());
        // Another seed gives another stream.
        RandomFill.Normal(tail, seed: 8, offset: 1000);
        Assert.NotEqual(v.AsSpan(1000, 10).ToArray(), tail.ToArray());
    }

    [Fact]
    public void PoolReusesBuffersAcrossSteps()
    {
        using var device = new CpuDevice();
        for (int step = 0; step < 5; step++)
        {
            using var a = Tensor.Empty(device, 64, 32, 28, 28);
            using var b = Tensor.Zeros(device, 64, 32);
            using var c = Tensor.Empty(device, 64, 32, 28, 28);
        }
        var stats = device.Stats;
        Assert.Equal(3, stats.SystemAllocations);
        Assert.Equal(0, stats.LiveBytes);
        Assert.Equal(stats.SystemBytes, stats.PooledBytes);
    }

    [Fact]
    public void HostRoundTripAndShapeErrors()
    {
        var data = Enumerable.Range(0, 6).Select(i => (float)i).ToArray();
        using var t = Tensor.FromHost(CpuDevice.Instance, data, 2, 3);
        Assert.Equal(data, t.ToArray());
        Assert.Throws<ArgumentException>(() => Tensor.FromHost(CpuDevice.Instance, data, 4, 2));
        var e = Assert.Throws<ArgumentException>(() => Silu.Forward(t, Tensor.Empty(CpuDevice.Instance, 3, 2)));
        Assert.Contains("2x3", e.Message);
    }

    [Fact]
    public void DeviceSelection()
    {
        using var auto = DeviceCatalog.Open("auto", out var reason);
        Assert.False(string.IsNullOrEmpty(reason));
        if (auto.Kind == DeviceKind.Cpu)
        {
            Assert.Contains("no CUDA", reason);
        }
        var e = Assert.Throws<ArgumentException>(() => DeviceCatalog.Open("tpu", out _));
        Assert.Contains("auto, cpu, cuda, opencl, ilgpu-cpu", e.Message);
        Assert.Contains(DeviceCatalog.List(), l => l.StartsWith("cpu"));
    }
}
