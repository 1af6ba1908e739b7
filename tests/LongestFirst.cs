using Xunit.Abstractions;

[assembly: TestCollectionOrderer("Ddpm.Tests.LongestFirst", "Ddpm.Tests")]

namespace Ddpm.Tests;

/// <summary>
/// Starts the longest collections first. The runner keeps two collections running at a time (one a core here) and starts
/// them in this order; with its default order the simulator collections began late and the last of them ran on alone
/// while the other core had nothing left, the suite's tail. Longest first, the short collections fill in beside them.
/// The rest keep the runner's own stable order (by the collection's id).
/// </summary>
public sealed class LongestFirst : ITestCollectionOrderer
{
    /// <summary>The collections that take longest on two cores, longest first (seconds in a full run, 2 cores, Dec 2026:
    /// about 120-160, 135, 115 and 95). The schedule training runs, left to the id order, began two thirds into the
    /// parallel part and ran on alone for its last ~45 s.</summary>
    internal static readonly string[] Longest = [GpuLikeCollection.Name, IlgpuCollection.Name, ImageFolderCollection.Name, ScheduleTrainingCollection.Name];

    public IEnumerable<ITestCollection> OrderTestCollections(IEnumerable<ITestCollection> testCollections) =>
        testCollections.OrderBy(c => Array.IndexOf(Longest, c.DisplayName) is int i && i >= 0 ? i : Longest.Length)
            .ThenBy(c => c.UniqueID);
}
