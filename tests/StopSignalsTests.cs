using System.Runtime.InteropServices;
using Ddpm.Cli;

namespace Ddpm.Tests;

/// <summary>
/// The stop-signal decisions, driven through <see cref="StopSignals.Raise"/>: no real signal is sent, since one
/// would reach the test host itself.
/// </summary>
public sealed class StopSignalsTests
{
    [Theory]
    [InlineData(PosixSignal.SIGTERM, 143)]
    [InlineData(PosixSignal.SIGHUP, 129)]
    [InlineData(PosixSignal.SIGINT, 130)]
    public void FirstSignalIsAbsorbedAndCancels(PosixSignal signal, int exitCode)
    {
        using var stop = new StopSignals();
        Assert.False(stop.Token.IsCancellationRequested);
        Assert.Null(stop.Received);
        Assert.Equal(0, stop.ExitCode);

        Assert.True(stop.Raise(signal));

        Assert.True(stop.Token.IsCancellationRequested);
        Assert.Equal(signal, stop.Received);
        Assert.Equal(exitCode, stop.ExitCode);
    }

    [Fact]
    public void SecondSignalOutsideCriticalIsNotAbsorbedAndKeepsTheFirst()
    {
        using var stop = new StopSignals();
        Assert.True(stop.Raise(PosixSignal.SIGINT));
        Assert.False(stop.Raise(PosixSignal.SIGTERM));
        Assert.Equal(PosixSignal.SIGINT, stop.Received);
        Assert.Equal(130, stop.ExitCode);
    }

    [Fact]
    public void CriticalScopeAbsorbsEverySignalUntilDisposed()
    {
        using var stop = new StopSignals();
        using (stop.Critical())
        {
            Assert.True(stop.Raise(PosixSignal.SIGTERM));
            Assert.True(stop.Token.IsCancellationRequested);
            Assert.True(stop.Raise(PosixSignal.SIGINT));
            Assert.True(stop.Raise(PosixSignal.SIGINT));
        }
        Assert.False(stop.Raise(PosixSignal.SIGINT));
        Assert.Equal(143, stop.ExitCode);
    }

    [Fact]
    public void CriticalScopesNestAndDoubleDisposeCountsOnce()
    {
        using var stop = new StopSignals();
        Assert.True(stop.Raise(PosixSignal.SIGHUP));
        var outer = stop.Critical();
        var inner = stop.Critical();
        inner.Dispose();
        inner.Dispose();
        Assert.True(stop.Raise(PosixSignal.SIGINT)); // outer still open
        outer.Dispose();
        Assert.False(stop.Raise(PosixSignal.SIGINT));
    }

    [Fact]
    public void TokenCallbacksRunOnceOnFirstSignal()
    {
        using var stop = new StopSignals();
        int calls = 0;
        stop.Token.Register(() => Interlocked.Increment(ref calls));
        using (stop.Critical())
        {
            stop.Raise(PosixSignal.SIGTERM);
            stop.Raise(PosixSignal.SIGTERM);
        }
        Assert.Equal(1, calls);
    }

    [Fact]
    public void ConcurrentSignalsAbsorbExactlyOneOutsideCritical()
    {
        for (int round = 0; round < 50; round++)
        {
            using var stop = new StopSignals();
            using var start = new Barrier(4);
            var absorbed = new bool[4];
            var threads = Enumerable.Range(0, 4).Select(i => new Thread(() =>
            {
                start.SignalAndWait();
                absorbed[i] = stop.Raise(i % 2 == 0 ? PosixSignal.SIGINT : PosixSignal.SIGTERM);
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
            Assert.Equal(1, absorbed.Count(a => a));
            Assert.NotNull(stop.Received);
        }
    }

    [Fact]
    public void SignalNumbersArePosix()
    {
        Assert.Equal(1, StopSignals.SignalNumber(PosixSignal.SIGHUP));
        Assert.Equal(2, StopSignals.SignalNumber(PosixSignal.SIGINT));
        Assert.Equal(3, StopSignals.SignalNumber(PosixSignal.SIGQUIT));
        Assert.Equal(15, StopSignals.SignalNumber(PosixSignal.SIGTERM));
        Assert.Equal(10, StopSignals.SignalNumber((PosixSignal)10));
    }

    [Fact]
    public void TokenStaysReadableAfterDispose()
    {
        var stop = new StopSignals();
        stop.Raise(PosixSignal.SIGTERM);
        stop.Dispose();
        stop.Dispose();
        Assert.True(stop.Token.IsCancellationRequested);
        Assert.Equal(143, stop.ExitCode);
    }
}
