using System.Buffers.Binary;
using System.Diagnostics;
using System.IO.Compression;
using Ddpm.Diffusion;

namespace Ddpm.Tests;

/// <summary>The IDX reader against hostile files: truncated, padded, bad magic, huge claimed sizes
/// (raw, gzipped, a real gzip bomb) refused within 2 x file size + 64 MiB of allocation, FIFOs and
/// devices refused unopened; the 28x28 set checks; loading without md5 or test files; stale .part cleanup.</summary>
public sealed class DataReaderTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ddpm-reader").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>An IDX file of unsigned bytes with the given sizes, data i % 251 (or <paramref name="fill"/>).</summary>
    internal static byte[] Idx(int[] dims, Func<long, byte>? fill = null)
    {
        long n = dims.Aggregate(1L, (a, b) => a * b);
        var bytes = new byte[4 + 4 * dims.Length + n];
        bytes[2] = 0x08;
        bytes[3] = (byte)dims.Length;
        for (int i = 0; i < dims.Length; i++)
        {
            BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4 + 4 * i), dims[i]);
        }
        for (long i = 0; i < n; i++)
        {
            bytes[4 + 4 * dims.Length + i] = fill?.Invoke(i) ?? (byte)(i % 251);
        }
        return bytes;
    }

    internal static byte[] Gzip(byte[] raw)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true))
        {
            gz.Write(raw);
        }
        return ms.ToArray();
    }

    private string Write(string name, byte[] bytes)
    {
        var path = Path.Combine(_dir, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    /// <summary>Reads <paramref name="path"/> expecting a one-line DataException that names it and every <paramref name="expected"/>; checks the allocation bound.</summary>
    private static DataException Refused(string path, params string[] expected)
    {
        long bound = Mnist.AllocationBound(new FileInfo(path).Length);
        long before = GC.GetAllocatedBytesForCurrentThread();
        var e = Assert.Throws<DataException>(() => Mnist.ReadIdx(path));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(allocated < bound, $"allocated {allocated} bytes, bound {bound}");
        Assert.Contains(path, e.Message);
        Assert.DoesNotContain('\n', e.Message);
        foreach (var s in expected)
        {
            Assert.Contains(s, e.Message);
        }
        return e;
    }

    [Fact]
    public void RawAndGzippedFilesRead()
    {
        var raw = Idx([3, 28, 28]);
        var a = Mnist.ReadIdx(Write("a", raw));
        var b = Mnist.ReadIdx(Write("b.gz", Gzip(raw)));
        Assert.Equal(3, a.Count);
        Assert.Equal([28, 28], a.ItemShape);
        Assert.Equal(raw[16..], a.Values);
        Assert.Equal(a.Values, b.Values);
    }

    [Fact]
    public void TruncatedRawFileNamesWhereTheDataRunsShort()
    {
        var raw = Idx([2, 28, 28]);
        // 16 + 1568 = 1584 bytes expected; 10 cut leaves 1574.
        Refused(Write("t", raw[..^10]), "truncated", "byte offset 1574", "1584");
        Refused(Write("t.gz", Gzip(raw[..^10])), "truncated", "uncompressed byte offset 1574", "1584");
        Refused(Write("h", raw[..10]), "too short", "byte offset 10");
    }

    [Fact]
    public void PaddedFileNamesWhereTheTrailingDataStarts()
    {
        byte[] raw = [.. Idx([2, 28, 28]), 7, 7, 7];
        Refused(Write("p", raw), "padded", "3 bytes", "byte offset 1584");
        Refused(Write("p.gz", Gzip(raw)), "padded", "uncompressed byte offset 1584");
        var e = Assert.Throws<DataException>(() => Mnist.ParseIdx("mem", raw));
        Assert.Contains("mem: padded", e.Message);
    }

    [Fact]
    public void BadMagicAndDimensionCountAreRefused()
    {
        var raw = Idx([2, 28, 28]);
        raw[2] = 0x09;
        Refused(Write("m", raw), "bad IDX magic 00000903", "byte offset 0");
        raw[2] = 0x08;
        raw[3] = 5;
        Refused(Write("d", raw), "5 dimensions");
        raw[3] = 0;
        Refused(Write("z", raw), "0 dimensions");
        var negative = Idx([2, 28, 28]);
        BinaryPrimitives.WriteInt32BigEndian(negative.AsSpan(8), -1);
        Refused(Write("n", negative), "dimension 1 is negative", "byte offset 8");
    }

    [Fact]
    public void HugeClaimedSizesAreRefusedBeforeAllocating()
    {
        // [2^31-1, 28, 28] is 1.7 TB: a raw file must hold it, a gzipped one may not claim it.
        byte[] header = [0, 0, 8, 3, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2, 3];
        Refused(Write("huge", header), "truncated", "dimensions 2147483647x28x28");
        Refused(Write("huge.gz", Gzip(header)), "over the", "2 x size + 64 MiB");
        // Four maximal sizes: the product is 2^124, past any 64-bit integer.
        byte[] four = [0, 0, 8, 4, .. Enumerable.Repeat(new byte[] { 0x7f, 0xff, 0xff, 0xff }, 4).SelectMany(b => b), 0];
        Refused(Write("four", four), "truncated");
        Refused(Write("four.gz", Gzip(four)), "over the");
        var e = Assert.Throws<DataException>(() => Mnist.ParseIdx("mem", four));
        Assert.Contains("mem: truncated", e.Message);
    }

    [Fact]
    public void GzipBombIsRefusedByTheBoundWithoutInflating()
    {
        // 200 MB of zeros behind a well-formed header [255102, 28, 28] (199,999,968 bytes): a few
        // hundred KB gzipped, so its bound is about 65 MB and the claim is refused before inflating.
        var path = Path.Combine(_dir, "train-images-idx3-ubyte.gz");
        using (var file = File.Create(path))
        using (var gz = new GZipStream(file, CompressionLevel.SmallestSize))
        {
            gz.Write(Idx([255102, 28, 28])[..16]);
            var zeros = new byte[1 << 20];
            for (long left = 255102L * 784; left > 0; left -= zeros.Length)
            {
                gz.Write(zeros, 0, (int)Math.Min(left, zeros.Length));
            }
        }
        Assert.True(new FileInfo(path).Length < 4 << 20);
        long before = GC.GetAllocatedBytesForCurrentThread();
        Refused(path, "199999968 data bytes", "over the");
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 1 << 20, "the bomb was inflated or its data allocated");
    }

    [UnixFact]
    public void FifoAndDevZeroAreRefusedUnopened()
    {
        var fifo = Path.Combine(_dir, "train-images-idx3-ubyte");
        using (var p = Process.Start("mkfifo", [fifo]))
        {
            p.WaitForExit();
            Assert.Equal(0, p.ExitCode);
        }
        foreach (var path in new[] { fifo, "/dev/zero" })
        {
            // Opening a FIFO blocks until a writer comes and /dev/zero never ends: a hang here is the failure.
            var read = Task.Run(() => Assert.Throws<DataException>(() => Mnist.ReadIdx(path)));
            Assert.True(read.Wait(TimeSpan.FromSeconds(10)), $"{path}: reader hung");
            Assert.Contains(path, read.Result.Message);
            Assert.Contains("not a regular IDX file", read.Result.Message);
        }
    }

    private void WriteSet(string folder, int count, Func<long, byte>? label = null, bool gzipImages = false)
    {
        Directory.CreateDirectory(folder);
        var images = Idx([count, 28, 28]);
        File.WriteAllBytes(Path.Combine(folder, gzipImages ? "train-images-idx3-ubyte.gz" : "train-images-idx3-ubyte"), gzipImages ? Gzip(images) : images);
        File.WriteAllBytes(Path.Combine(folder, "train-labels-idx1-ubyte"), Idx([count], label ?? (i => (byte)(i % 10))));
    }

    [Fact]
    public void SyntheticSetLoadsWithoutMd5TestFilesOrFetching()
    {
        var folder = Path.Combine(_dir, "set");
        WriteSet(folder, 5, gzipImages: true);
        var log = new List<string>();
        var set = Mnist.LoadTraining(folder, log.Add);
        Assert.Equal(5, set.Count);
        Assert.Equal(Idx([5, 28, 28])[16..], set.Images);
        Assert.Equal([0, 1, 2, 3, 4], set.Labels);
        // Nothing fetched: no log line, no new file (a t10k fetch would have logged and written).
        Assert.Empty(log);
        Assert.Equal(["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte"], Directory.GetFiles(folder).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void LabelOutOfRangeIsNamedByItsByteOffset()
    {
        var folder = Path.Combine(_dir, "bad");
        WriteSet(folder, 6, i => i == 3 ? (byte)10 : (byte)1);
        var e = Assert.Throws<DataException>(() => Mnist.LoadTraining(folder));
        Assert.Contains("train-labels-idx1-ubyte", e.Message);
        Assert.Contains("label 10 at byte offset 11", e.Message);
    }

    [Theory]
    [InlineData("count", "train-labels-idx1-ubyte: dimension 0 (count) is 4")]
    [InlineData("side", "train-images-idx3-ubyte: dimension 2 is 27")]
    [InlineData("empty", "train-images-idx3-ubyte: dimension 0 (count) is 0")]
    [InlineData("labelMagic", "train-labels-idx1-ubyte: magic 0x00000802")]
    public void SetShapesAreChecked(string kind, string expected)
    {
        var folder = Path.Combine(_dir, kind);
        WriteSet(folder, 5);
        var images = Path.Combine(folder, "train-images-idx3-ubyte");
        var labels = Path.Combine(folder, "train-labels-idx1-ubyte");
        switch (kind)
        {
            case "count": File.WriteAllBytes(labels, Idx([4])); break;
            case "side": File.WriteAllBytes(images, Idx([5, 28, 27])); break;
            case "empty": File.WriteAllBytes(images, Idx([0, 28, 28])); File.WriteAllBytes(labels, Idx([0])); break;
            case "labelMagic": File.WriteAllBytes(labels, Idx([5, 1])); break;
        }
        var e = Assert.Throws<DataException>(() => Mnist.LoadTraining(folder));
        Assert.Contains(expected, e.Message);
    }

    /// <summary>A stream that yields <paramref name="good"/> bytes and then fails, as a dropped download does.</summary>
    private sealed class FailingStream(int good) : Stream
    {
        private int _left = good;

        public override int Read(byte[] buffer, int offset, int count)
        {
            if (_left == 0)
            {
                throw new IOException("connection reset");
            }
            int n = Math.Min(count, _left);
            Array.Fill(buffer, (byte)1, offset, n);
            _left -= n;
            return n;
        }

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Fact]
    public void StoreChecksMd5AndLeavesNoPartFileOnFailure()
    {
        var bytes = Idx([2, 28, 28]);
        var file = ("train-images-idx3-ubyte", Mnist.Md5(bytes));
        // A wrong md5 and a stream that breaks mid-way both fail, leaving neither the file nor a .part.
        var e = Assert.Throws<DataException>(() => Mnist.Store(_dir, (file.Item1, Mnist.Md5([1])), new MemoryStream(bytes)));
        Assert.Contains("md5", e.Message);
        Assert.Throws<IOException>(() => Mnist.Store(_dir, file, new FailingStream(100_000)));
        Assert.Empty(Directory.GetFiles(_dir));
        Mnist.Store(_dir, file, new MemoryStream(bytes));
        Assert.Equal(["train-images-idx3-ubyte"], Directory.GetFiles(_dir).Select(Path.GetFileName));
        Assert.Equal(bytes, File.ReadAllBytes(Path.Combine(_dir, "train-images-idx3-ubyte")));
    }

    [Fact]
    public void StalePartFilesOfDeadProcessesAreRemoved()
    {
        // No process has pid 2^31-2 (Linux caps pids at 2^22); this process is alive.
        var dead = Write($".train-images-idx3-ubyte.ddpm-{int.MaxValue - 1}-0a1b2c.part", [1, 2, 3]);
        var live = Write($".train-labels-idx1-ubyte.ddpm-{Environment.ProcessId}-3d4e5f.part", [1]);
        var other = Write("notes.part", [1]);
        var unmarked = Write($".notes.{int.MaxValue - 1}.0a1b2c.part", [1]);
        Assert.Equal(1, Mnist.RemoveStaleParts(_dir));
        Assert.False(File.Exists(dead));
        Assert.True(File.Exists(live));
        Assert.True(File.Exists(other));
        Assert.True(File.Exists(unmarked));
    }
}

/// <summary>A fact that needs Unix (mkfifo, /dev/zero); on Windows it is reported skipped.</summary>
public sealed class UnixFactAttribute : FactAttribute
{
    public UnixFactAttribute()
    {
        if (OperatingSystem.IsWindows())
        {
            Skip = "needs mkfifo and /dev/zero (Unix only)";
        }
    }
}
