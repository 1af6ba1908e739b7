namespace Ddpm.Tests;

/// <summary>The simulators the tiled kernels are tested on are shaped as asked.</summary>
[Collection(GpuLikeCollection.Name)]
public sealed class GpuLikeDeviceTests(GpuLikeFixture fixture)
{
    [Theory]
    [InlineData(32, 1024)]
    [InlineData(4, 64)]
    public void SimulatorHasTheAskedWarpAndGroupSize(int warp, int group)
    {
        var accelerator = fixture[warp].Accelerator;
        Assert.Equal(warp, accelerator.WarpSize);
        Assert.Equal(group, accelerator.MaxNumThreadsPerGroup);
    }
}
