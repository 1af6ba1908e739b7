using Ddpm.Tensors;

// Test fixtures for ArchitectureTests.APlantedLayerSkipFails: types in Diffusion's namespace (inside the test assembly,
// so the engine stays clean), one that skips Nn to run a kernel and one that goes through Nn.
namespace Ddpm.Diffusion.Planted;

/// <summary>Calls a convolution kernel directly from the Diffusion layer: what the architecture rule must refuse.</summary>
internal static class SkipsNn
{
    public static void Run(Tensor x, Tensor w, Tensor b, Tensor y) => Ddpm.Kernels.Conv2d.Forward(x, w, b, y, 1, 1);
}

/// <summary>Goes through Nn only: allowed.</summary>
internal static class UsesNnOnly
{
    public static long Count(Ddpm.Nn.UNet model) => model.ParameterCount;
}
