namespace Ddpm.Tensors;

/// <summary>How many threads the managed CPU backend runs its loops on.</summary>
public static class CpuThreads
{
    /// <summary>The worker count: every core the process may use (affinity and DOTNET_PROCESSOR_COUNT counted), unless shared.</summary>
    public static int Count { get; private set; } = Environment.ProcessorCount;

    /// <summary>Takes this process's share of the cores when <paramref name="processes"/> processes share them (MPI ranks on
    /// one machine): max(1, cores / processes), set before the first parallel loop starts the helper threads. An MPI launcher
    /// that pinned the process to some of the cores (Open MPI binds each rank) has shared them already: then the process
    /// keeps the cores it was given.</summary>
    public static void Share(int processes)
    {
        if (!Pinned())
        {
            Count = Math.Max(1, Environment.ProcessorCount / Math.Max(1, processes));
        }
    }

    // Whether the process may run on fewer processors than the machine has online (an affinity mask set by a launcher,
    // taskset or a container's cpuset); false when that cannot be told.
    private static bool Pinned()
    {
        try
        {
            string online = File.ReadAllText("/sys/devices/system/cpu/online").Trim(); // "0-15" or "0,2-5"
            int machine = online.Split(',').Sum(range => range.Split('-') is [var a, var b] ? int.Parse(b) - int.Parse(a) + 1 : 1);
            return Environment.ProcessorCount < machine && Environment.GetEnvironmentVariable("DOTNET_PROCESSOR_COUNT") is null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return false;
        }
    }
}
