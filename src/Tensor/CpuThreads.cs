namespace Ddpm.Tensors;

/// <summary>How many threads the managed CPU backend runs its loops on.</summary>
public static class CpuThreads
{
    /// <summary>The worker count: every core the process may use (affinity and DOTNET_PROCESSOR_COUNT counted), unless shared.</summary>
    public static int Count { get; private set; } = Environment.ProcessorCount;

    /// <summary>Takes this process's share of the cores when <paramref name="processes"/> processes share them (MPI ranks on
    /// one machine): max(1, cores / processes), set before the first parallel loop starts the helper threads. An MPI launcher
    /// that pinned the process to fewer cores shows in the core count already.</summary>
    public static void Share(int processes) => Count = Math.Max(1, Environment.ProcessorCount / Math.Max(1, processes));
}
