using System.Runtime.InteropServices;

namespace Ddpm.Cli;

/// <summary>
/// Stop requests from outside: SIGINT (Ctrl-C), SIGTERM (kill, systemd, docker stop) and SIGHUP (the terminal
/// closed; not registered where the platform lacks it). The first signal is absorbed and cancels
/// <see cref="Token"/>, so training can save a checkpoint and exit with <see cref="ExitCode"/>. A second signal
/// gets the runtime's default action (the process ends: a user pressing Ctrl-C twice wants out), except inside
/// a <see cref="Critical"/> scope, where every signal is absorbed so a checkpoint save is never cut short.
/// Handlers run on a thread of the runtime's; all state is guarded by one lock.
/// </summary>
public sealed class StopSignals : IDisposable
{
    private readonly object _gate = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly List<PosixSignalRegistration> _registrations = [];
    private PosixSignal? _received;
    private int _criticalDepth;
    private bool _disposed;

    /// <summary>Registers the handlers for SIGINT, SIGTERM and SIGHUP (each one the platform supports).</summary>
    public StopSignals()
    {
        Token = _stop.Token; // kept, so it can be read after Dispose
        foreach (var signal in new[] { PosixSignal.SIGINT, PosixSignal.SIGTERM, PosixSignal.SIGHUP })
        {
            try
            {
                _registrations.Add(PosixSignalRegistration.Create(signal, context => context.Cancel = Handle(context.Signal)));
            }
            catch (PlatformNotSupportedException)
            {
                // SIGHUP on some platforms: nothing to stop on there.
            }
        }
    }

    /// <summary>Cancelled at the first signal.</summary>
    public CancellationToken Token { get; }

    /// <summary>The first signal received, or null while none has come.</summary>
    public PosixSignal? Received
    {
        get
        {
            lock (_gate)
            {
                return _received;
            }
        }
    }

    /// <summary>The shell's exit status for the first signal, 128 + its number (SIGHUP 129, SIGINT 130, SIGTERM 143); 0 while none has come.</summary>
    public int ExitCode => Received is { } signal ? 128 + SignalNumber(signal) : 0;

    /// <summary>
    /// A scope (until disposed) in which every signal is absorbed: the stop is still requested, the process is
    /// not ended. Wrap each checkpoint save in one. Scopes nest and may be disposed more than once.
    /// </summary>
    public IDisposable Critical()
    {
        lock (_gate)
        {
            _criticalDepth++;
        }
        return new CriticalScope(this);
    }

    /// <summary>
    /// Delivers <paramref name="signal"/> through the handlers' own code, without a real signal (for tests).
    /// Returns whether it was absorbed; false means a real signal would have ended the process.
    /// </summary>
    public bool Raise(PosixSignal signal) => Handle(signal);

    /// <summary>The signal's number on Linux and macOS (SIGHUP 1, SIGINT 2, SIGQUIT 3, SIGTERM 15); a raw number passes through.</summary>
    public static int SignalNumber(PosixSignal signal) => signal switch
    {
        // The enum's named members are negative, platform-neutral values; the numbers are POSIX's.
        PosixSignal.SIGHUP => 1,
        PosixSignal.SIGINT => 2,
        PosixSignal.SIGQUIT => 3,
        PosixSignal.SIGTERM => 15,
        _ when (int)signal > 0 => (int)signal,
        _ => throw new ArgumentOutOfRangeException(nameof(signal), signal, "no exit code is defined for this signal"),
    };

    /// <summary>Unregisters the handlers: signals get the runtime's default action again. The token stays as it is.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
        }
        foreach (var registration in _registrations)
        {
            registration.Dispose();
        }
        // _stop is not disposed: Token (and callbacks registered on it) may outlive this object, and a
        // CancellationTokenSource without timers or a wait handle holds nothing that needs freeing.
    }

    /// <summary>Decides one signal: absorbed (true) if it is the first or a critical scope is open.</summary>
    private bool Handle(PosixSignal signal)
    {
        bool first;
        bool absorb;
        lock (_gate)
        {
            first = _received is null;
            if (first)
            {
                _received = signal;
            }
            absorb = first || _criticalDepth > 0;
        }
        if (first)
        {
            // Outside the lock: Cancel runs the token's callbacks on this thread.
            _stop.Cancel();
        }
        return absorb;
    }

    private sealed class CriticalScope(StopSignals owner) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0)
            {
                return;
            }
            lock (owner._gate)
            {
                owner._criticalDepth--;
            }
        }
    }
}
