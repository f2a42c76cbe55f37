namespace Optpoline.Patcher;

/// <summary>How live patching behaves.</summary>
public sealed class PatcherOptions
{
    /// <summary>Default offset of the flush signal from SIGRTMIN (glibc's SIGRTMIN is 34 once NPTL reserved 32 and 33).</summary>
    public const int DefaultFlushSignalOffset = 6;

    /// <summary>
    /// The real-time signal sent to every thread of the process during a thread flush. Its handler is
    /// installed with SA_RESTART, so most interrupted system calls restart transparently, but calls
    /// the kernel never restarts after a handler (epoll_wait, poll, select, nanosleep/clock_nanosleep,
    /// sigtimedwait, io_getevents, …) return EINTR to the host thread, which must retry them (the .NET
    /// runtime does). Choose a signal the host does not use. Null: SIGRTMIN + 6.
    /// The first patcher of a process fixes it; every later one must use the same signal.
    /// </summary>
    public int? FlushSignal { get; init; }

    /// <summary>
    /// How long a thread flush waits for every thread to acknowledge. A thread that blocks the flush
    /// signal (or is stopped) makes the flush time out, and the work that waited for it is rolled back.
    /// Measured here: ~0.1 ms while runnable threads fit the cores, 8-12 ms once they outnumber them.
    /// </summary>
    public TimeSpan FlushTimeout { get; init; } = TimeSpan.FromMilliseconds(500);

    /// <summary>
    /// Whether slot windows are restartable sequences where the process supports them (glibc 2.35+
    /// registration, Linux 5.10+, self-test passed; <see cref="LivePatcher.RestartableSequences"/>).
    /// Their grace period is then one membarrier call the kernel guarantees, whatever the host's
    /// threads do (nested signal handlers, blocked signals, exits), at the price of one store per slot
    /// entry. Turn it off only for a host whose site-running threads are not created by glibc; the
    /// thread flush it falls back to is not sound for a thread whose outer context waits in a slot
    /// while it runs another signal handler (DESIGN.md, invariant 5).
    /// </summary>
    public bool UseRestartableSequences { get; init; } = true;

    /// <summary>
    /// What a batch does when a thread of the process blocks SIGTRAP (a server worker's
    /// <c>sigfillset</c> + <c>pthread_sigmask</c>): if such a thread reached an armed int3, the kernel would
    /// force SIGTRAP's default action and kill the process. <see cref="BlockedTrapPolicy.Ignore"/> (the
    /// default) patches anyway: the host contract is that threads that run generated code do not block
    /// SIGTRAP. <see cref="BlockedTrapPolicy.Refuse"/> checks every thread first
    /// (<c>/proc/self/task/*/status</c>; a check that found none stands for 10 ms of batches, and a thread
    /// seen blocking is looked at again a few times 50 µs apart) and refuses the batch with a
    /// <see cref="PatchRejectedException"/> that names the threads, counted in
    /// <see cref="PatcherStatistics.BlockedTrapRefusals"/>. It is not the default because it cannot tell a
    /// thread that blocks SIGTRAP from one that is inside a signal handler (ours, for a trap, or the
    /// host's) or inside <c>pthread_create</c> (glibc blocks every signal there): under load such a
    /// thread stays "blocking" for a scheduler slice and batches are refused that need not be. A thread
    /// that starts blocking SIGTRAP after the check is not seen either.
    /// </summary>
    public BlockedTrapPolicy BlockedTraps { get; init; }

    internal int ResolveFlushSignal()
    {
        var min = Platform.PatcherOs.SigRtMin();
        var max = Platform.PatcherOs.SigRtMax();
        var signal = FlushSignal ?? (min + DefaultFlushSignalOffset);
        if (signal < min || signal > max)
        {
            throw new ArgumentOutOfRangeException(nameof(FlushSignal), signal, $"The flush signal must be a real-time signal between {min} and {max}.");
        }

        if (FlushTimeout <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(FlushTimeout), FlushTimeout, "The flush timeout must be positive.");
        }

        return signal;
    }
}

/// <summary>What a patch batch does while a thread blocks SIGTRAP (see <see cref="PatcherOptions.BlockedTraps"/>).</summary>
public enum BlockedTrapPolicy
{
    /// <summary>Patch anyway: the host guarantees that no thread blocking SIGTRAP runs patched code (the default).</summary>
    Ignore,

    /// <summary>Refuse the batch: nothing is written, the request fails with a message naming the threads.</summary>
    Refuse,
}
