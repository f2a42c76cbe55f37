using System.Runtime.InteropServices;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Stress;

/// <summary>What else the host's threads do while the stress workload patches (each can be turned on alone).</summary>
public sealed record HostileOptions
{
    /// <summary>
    /// A profiler-like signal: a native handler installed with an empty mask (as CoreCLR installs its
    /// own) that keeps the thread about 20 µs, sent to a random caller thread about every millisecond, so that
    /// callers sit inside another handler while their outer context is anywhere in a site.
    /// </summary>
    public bool HostSignals { get; init; }

    /// <summary>Threads that start and exit all the time (each lives 0 to 2 ms): a thread pool that retires idle threads.</summary>
    public int ChurnThreads { get; init; }

    /// <summary>A thread that blocks every signal for the whole run (the server-worker idiom). It runs no site: one that did would die at an armed int3.</summary>
    public bool BlockedWorker { get; init; }

    /// <summary>All of the above.</summary>
    public static HostileOptions All { get; } = new() { HostSignals = true, ChurnThreads = 2, BlockedWorker = true };
}

/// <summary>Runs the <see cref="HostileOptions"/> next to a workload's callers, until disposed.</summary>
public sealed unsafe partial class HostileHost : IDisposable
{
    private const int SaSiginfo = 4;
    private const int SaOnStack = 0x08000000;
    private const int SaRestart = 0x10000000;
    private const int SigactionSize = 152;

    private readonly HostileOptions _options;
    private readonly List<Thread> _threads = [];
    private readonly byte* _previous;
    private readonly int _signal;
    private readonly Func<IReadOnlyList<int>> _callers;
    private volatile bool _stop;
    private long _signals;
    private long _churned;

    /// <param name="engine">Where the host handler's code goes.</param>
    /// <param name="options">What to run.</param>
    /// <param name="callers">The thread ids host signals go to (read again as callers start).</param>
    public HostileHost(OptpolineEngine engine, HostileOptions options, Func<IReadOnlyList<int>> callers)
    {
        ArgumentNullException.ThrowIfNull(engine);
        ArgumentNullException.ThrowIfNull(options);
        _options = options;
        _callers = callers;
        _signal = SigRtMin() + 11;
        _previous = (byte*)NativeMemory.AllocZeroed(SigactionSize);
        if (options.HostSignals)
        {
            InstallHandler(engine);
            Start(SendSignals);
        }

        for (var i = 0; i < options.ChurnThreads; i++)
        {
            var seed = i;
            Start(() => Churn(seed));
        }

        if (options.BlockedWorker)
        {
            Start(BlockEverything);
        }
    }

    /// <summary>Host signals sent so far.</summary>
    public long Signals => Interlocked.Read(ref _signals);

    /// <summary>Short-lived threads started so far.</summary>
    public long Churned => Interlocked.Read(ref _churned);

    public override string ToString() => $"{Signals:N0} host signals, {Churned:N0} short-lived threads{(_options.BlockedWorker ? ", a worker blocking every signal" : "")}";

    public void Dispose()
    {
        _stop = true;
        _threads.ForEach(t => t.Join());
        if (_options.HostSignals)
        {
            // Signals still queued would meet the previous action (the default one terminates the
            // process): ignoring the signal first discards them, then the previous action comes back.
            IgnoreThenRestore(_signal, _previous);
        }

        NativeMemory.Free(_previous);
    }

    private void Start(ThreadStart body)
    {
        var thread = new Thread(body) { IsBackground = true, Name = "hostile host" };
        _threads.Add(thread);
        thread.Start();
    }

    private void InstallHandler(OptpolineEngine engine)
    {
        // handler(sig, info, uc): spin ~20 µs on the TSC, then return (sigreturn restores every register).
        var asm = new Assembler(64);
        var spin = asm.CreateLabel();
        asm.rdtsc();
        asm.shl(rdx, 32);
        asm.or(rax, rdx);
        asm.lea(rcx, __[rax + 40_000]);
        asm.Label(ref spin);
        asm.pause();
        asm.rdtsc();
        asm.shl(rdx, 32);
        asm.or(rax, rdx);
        asm.cmp(rax, rcx);
        asm.jb(spin);
        asm.ret();
        var handler = engine.Assemble(asm, name: "hostile_host_handler");
        var action = stackalloc byte[SigactionSize];
        new Span<byte>(action, SigactionSize).Clear();
        *(ulong*)action = handler.Address;
        *(int*)(action + 136) = SaSiginfo | SaOnStack | SaRestart;   // sa_mask (at 8) stays empty
        if (Sigaction(_signal, action, _previous) != 0)
        {
            throw new InvalidOperationException($"Installing the host signal handler failed (errno {Marshal.GetLastPInvokeError()}).");
        }
    }

    private void SendSignals()
    {
        var random = new Random(3);
        var pid = Environment.ProcessId;
        while (!_stop)
        {
            var callers = _callers();
            if (callers.Count > 0 && Tgkill(pid, callers[random.Next(callers.Count)], _signal) == 0)
            {
                Interlocked.Increment(ref _signals);
            }

            // About 1 ms apart. Real-time signals queue: a sender faster than the handler (a 0 ms sleep
            // only yields) piles them up until a thread never leaves its handler and the user's queue fills.
            Thread.Sleep(1);
        }
    }

    private void Churn(int seed)
    {
        var random = new Random(seed);
        while (!_stop)
        {
            var spin = random.Next(0, 2000);
            var thread = new Thread(() => Thread.SpinWait(spin * 100)) { IsBackground = true };
            thread.Start();
            Interlocked.Increment(ref _churned);
            thread.Join();
        }
    }

    private void BlockEverything()
    {
        var set = stackalloc ulong[16];
        new Span<ulong>(set, 16).Fill(ulong.MaxValue);
        _ = PthreadSigmask(0 /* SIG_BLOCK */, set, null);
        while (!_stop)
        {
            Thread.Sleep(10);
        }
    }

    /// <summary>Sets <paramref name="signal"/> to SIG_IGN (which discards its queued instances), then back to <paramref name="previous"/>.</summary>
    public static void IgnoreThenRestore(int signal, byte* previous)
    {
        var ignore = stackalloc byte[SigactionSize];
        new Span<byte>(ignore, SigactionSize).Clear();
        *(ulong*)ignore = 1;   // SIG_IGN
        _ = Sigaction(signal, ignore, null);
        _ = Sigaction(signal, previous, null);
    }

    /// <summary>
    /// Lowers this process's RLIMIT_SIGPENDING to the signals its user has queued now plus
    /// <paramref name="headroom"/> (the count is per user, across processes), so that queuing real-time
    /// signals soon fails with EAGAIN. Returns the new limit.
    /// </summary>
    public static long LimitQueuedSignals(int headroom)
    {
        var line = File.ReadLines("/proc/self/status").First(l => l.StartsWith("SigQ:", StringComparison.Ordinal));
        var queued = long.Parse(line[5..].Trim().Split('/')[0], System.Globalization.CultureInfo.InvariantCulture);
        var limit = stackalloc ulong[2];
        if (Getrlimit(RlimitSigpending, limit) != 0)
        {
            throw new InvalidOperationException($"getrlimit failed (errno {Marshal.GetLastPInvokeError()}).");
        }

        limit[0] = (ulong)(queued + headroom);
        if (Setrlimit(RlimitSigpending, limit) != 0)
        {
            throw new InvalidOperationException($"setrlimit failed (errno {Marshal.GetLastPInvokeError()}).");
        }

        return (long)limit[0];
    }

    private const int RlimitSigpending = 11;

    [LibraryImport("libc.so.6", EntryPoint = "getrlimit", SetLastError = true)]
    private static partial int Getrlimit(int resource, ulong* limit);

    [LibraryImport("libc.so.6", EntryPoint = "setrlimit", SetLastError = true)]
    private static partial int Setrlimit(int resource, ulong* limit);

    [LibraryImport("libc.so.6", EntryPoint = "sigaction", SetLastError = true)]
    private static partial int Sigaction(int signal, byte* action, byte* previous);

    [LibraryImport("libc.so.6", EntryPoint = "tgkill")]
    private static partial int Tgkill(int tgid, int tid, int signal);

    [LibraryImport("libc.so.6", EntryPoint = "pthread_sigmask")]
    private static partial int PthreadSigmask(int how, ulong* set, ulong* old);

    [LibraryImport("libc.so.6", EntryPoint = "__libc_current_sigrtmin")]
    private static partial int SigRtMin();
}
