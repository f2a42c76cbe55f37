using System.Runtime.InteropServices;
using Optpoline.Patcher.Platform;

namespace Optpoline.Patcher.Native;

/// <summary>
/// Process-wide state shared with the signal handlers: the handler page (written once, then sealed
/// read+execute), the control block, the installed SIGTRAP and flush-signal actions, and native tables
/// retired until it is proven that no handler still reads them. Signal actions are per process, so
/// there is exactly one of these, created on first use and never torn down.
/// </summary>
internal sealed unsafe class PatchRuntime
{
    private static readonly Lock s_createLock = new();
    private static PatchRuntime? s_instance;

    private readonly byte* _cb;
    private readonly List<(nint Table, long Bytes)> _retired = [];
    private readonly List<(nint Table, long Bytes)> _staleDescriptors = [];
    private readonly Lock _regionLock = new();
    private long _retiredBytes;

    private PatchRuntime(int flushSignal)
    {
        FlushSignal = flushSignal;
        _cb = (byte*)NativeMemory.AlignedAlloc(ControlBlock.Size, 64);
        new Span<byte>(_cb, ControlBlock.Size).Clear();

        var page = PatcherOs.Mmap(0, 4096, PatcherOs.ProtRead | PatcherOs.ProtWrite, PatcherOs.MapPrivate | PatcherOs.MapAnonymous, -1, 0);
        if (page == PatcherOs.MapFailed)
        {
            throw new InvalidOperationException($"Mapping the signal-handler page failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }

        // rseq: glibc's registration (the descriptor for the self-test is reserved before the page is built).
        var registration = PatcherOs.RseqRegistration();
        RestartableSequences? rseq = null;
        ulong rseqTestDescriptor = 0;
        if (registration is { Size: >= 20 } found)   // the original ABI (20 bytes) already has rseq_cs at 8
        {
            rseq = new RestartableSequences(found.Offset);
            rseqTestDescriptor = rseq.ReserveDescriptor();
        }
        else
        {
            RseqUnavailable = registration is null
                ? "glibc registers no rseq area (older than 2.35)"
                : "glibc did not register rseq (glibc.pthread.rseq=0, or the kernel lacks rseq)";
        }

        var (code, entries) = HandlerCode.Build((ulong)page, (ulong)_cb, rseq?.CsFieldOffset, rseqTestDescriptor);
        code.CopyTo(new Span<byte>((void*)page, 4096));
        // Sealed before use: the page is writable only while no code in it can run, never both.
        if (PatcherOs.Mprotect(page, 4096, PatcherOs.ProtRead | PatcherOs.ProtExec) != 0)
        {
            throw new InvalidOperationException($"Sealing the signal-handler page failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }

        Entries = entries;
        CoreSyncByMembarrier = RegisterMembarrier();
        InstallFlushHandler();
        InstallTrapHandler();
        SelfTest();
        if (rseq is not null)
        {
            RseqUnavailable = EnableRseq(rseq, rseqTestDescriptor);
            Rseq = RseqUnavailable is null ? rseq : null;
        }
    }

    /// <summary>Restartable sequences, when the kernel and glibc support them and the self-test passed; else null.</summary>
    public RestartableSequences? Rseq { get; }

    /// <summary>Why <see cref="Rseq"/> is null (null when it is not).</summary>
    public string? RseqUnavailable { get; }

    public long RseqRestarts => Interlocked.Read(ref *(long*)(_cb + ControlBlock.RseqRestarts));

    /// <summary>Serialises batch application across every engine of the process (one trap table at a time).</summary>
    public Lock PatchLock { get; } = new();

    /// <summary>Serialises thread flushes (one descriptor at a time); the fields below are guarded by it.</summary>
    public Lock FlushLock { get; } = new();

    /// <summary>Generation of the last flush (handlers write it into their acknowledgement slot).</summary>
    public uint FlushGeneration { get; set; }

    /// <summary>The published flush descriptor, freed once a later flush completes.</summary>
    public (nint Address, long Bytes) CurrentDescriptor { get; set; }

    public int FlushSignal { get; }

    public HandlerCode.Entries Entries { get; }

    /// <summary>Whether core sync uses membarrier(PRIVATE_EXPEDITED_SYNC_CORE); otherwise a thread flush serialises every core.</summary>
    public bool CoreSyncByMembarrier { get; }

    public long TrapHits => Interlocked.Read(ref *(long*)(_cb + ControlBlock.TrapHits));

    public long ForeignTraps => Interlocked.Read(ref *(long*)(_cb + ControlBlock.ForeignTraps));

    public long StaleTraps => Interlocked.Read(ref *(long*)(_cb + ControlBlock.StaleTraps));

    public long FlushHandlerRuns => Interlocked.Read(ref *(long*)(_cb + ControlBlock.FlushRuns));

    /// <summary>The runtime, created on first use with <paramref name="flushSignal"/>.</summary>
    /// <exception cref="InvalidOperationException">The runtime exists with another flush signal, or installing the handlers failed.</exception>
    public static PatchRuntime Get(int flushSignal)
    {
        lock (s_createLock)
        {
            if (s_instance is null)
            {
                s_instance = new PatchRuntime(flushSignal);
            }
            else if (s_instance.FlushSignal != flushSignal)
            {
                throw new InvalidOperationException(
                    $"The patcher's signal handlers are installed once per process and use signal {s_instance.FlushSignal}; " +
                    $"a second patcher asked for signal {flushSignal}. Use the same PatcherOptions.FlushSignal for every engine.");
            }

            return s_instance;
        }
    }

    /// <summary>
    /// Publishes a trap table (or 0), then moves the generation: a handler that read the generation
    /// before an older table and then finds an int3 of this batch sees it changed (x86 keeps the
    /// order of these stores, and of the int3 written after them).
    /// </summary>
    public void PublishTrapTable(nint table)
    {
        Volatile.Write(ref *(nint*)(_cb + ControlBlock.TrapTable), table);
        Interlocked.Increment(ref *(long*)(_cb + ControlBlock.TrapGeneration));
    }

    /// <summary>
    /// Adds a code region the patcher writes in: a trap at an address no longer holding int3 is taken
    /// as a late one of ours only inside a registered region (when any is registered). Append-only.
    /// </summary>
    public void AddCodeRegion(ulong start, ulong size)
    {
        lock (_regionLock)
        {
            var old = (ulong*)*(nint*)(_cb + ControlBlock.RegionTable);
            var count = old == null ? 0UL : old[0];
            for (var i = 0UL; i < count; i++)
            {
                if (old[1 + (2 * i)] == start)
                {
                    return;
                }
            }

            // A new table each time (old ones stay: a handler may be reading one; regions are few).
            var table = (ulong*)NativeMemory.AllocZeroed((nuint)(8 * (1 + (2 * (count + 1)))));
            for (var i = 0UL; i < 2 * count; i++)
            {
                table[1 + i] = old[1 + i];
            }

            table[1 + (2 * count)] = start;
            table[2 + (2 * count)] = start + size;
            table[0] = count + 1;
            Volatile.Write(ref *(nint*)(_cb + ControlBlock.RegionTable), (nint)table);
        }
    }

    /// <summary>Test seam: parks the next trap handler after it loaded the table pointer (see <see cref="ControlBlock.TestPark"/>).</summary>
    internal ref long TestPark => ref *(long*)(_cb + ControlBlock.TestPark);

    public void PublishFlushDescriptor(nint descriptor) => Volatile.Write(ref *(nint*)(_cb + ControlBlock.FlushDescriptor), descriptor);

    /// <summary>
    /// Hands an unpublished table that handlers may still be reading to the runtime; it is freed by
    /// <see cref="ReclaimRetired"/> once no trap handler counts itself as a reader.
    /// </summary>
    public void Retire(nint table, long bytes)
    {
        lock (_retired)
        {
            _retired.Add((table, bytes));
            _retiredBytes += bytes;
        }
    }

    /// <summary>
    /// Frees every retired table when no trap handler is reading one: a handler counts itself as a
    /// reader (locked increment) before it loads the table pointer, and every table here was unpublished
    /// before it was retired, so a count of zero read after a full fence means no handler holds one.
    /// Returns whether the tables were freed (else they stay for a later call, or a thread flush).
    /// </summary>
    public bool ReclaimRetired()
    {
        lock (_retired)
        {
            if (_retired.Count == 0)
            {
                return true;
            }

            Interlocked.MemoryBarrier();
            if (Interlocked.Read(ref *(long*)(_cb + ControlBlock.TrapReaders)) != 0)
            {
                return false;
            }

            FreeRetired(_retired);
            _retired.Clear();
            _retiredBytes = 0;
            return true;
        }
    }

    internal void AddTrapReaders(long delta) => Interlocked.Add(ref *(long*)(_cb + ControlBlock.TrapReaders), delta);

    /// <summary>
    /// Called as a flush starts (under <see cref="FlushLock"/>): the descriptors of earlier flushes become
    /// freeable when it completes, since every thread then ran a handler that started after them.
    /// </summary>
    public List<(nint Table, long Bytes)> TakeStaleDescriptors()
    {
        var taken = new List<(nint, long)>(_staleDescriptors);
        _staleDescriptors.Clear();
        return taken;
    }

    /// <summary>A flush timed out: its descriptors wait for the next one.</summary>
    public void ReturnStaleDescriptors(List<(nint Table, long Bytes)> descriptors) => _staleDescriptors.AddRange(descriptors);

    /// <summary>Bytes of retired tables waiting for a flush.</summary>
    public long RetiredBytes
    {
        get
        {
            lock (_retired)
            {
                return _retiredBytes;
            }
        }
    }

    /// <summary>Serialises every core of the process (membarrier SYNC_CORE); 0.7 µs per call measured here.</summary>
    public void CoreSync()
    {
        if (CoreSyncByMembarrier)
        {
            if (PatcherOs.Membarrier(PatcherOs.MembarrierPrivateExpeditedSyncCore) != 0)
            {
                throw new InvalidOperationException($"membarrier(SYNC_CORE) failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
            }
        }
        else
        {
            SignalAllThreadsAndWait();
        }
    }

    /// <summary>
    /// Test seam: replaces the recorded previous SIGTRAP handler so that chaining can be observed,
    /// and returns the one it replaced. Restore it afterwards.
    /// </summary>
    internal ulong SwapPreviousTrapHandler(ulong handler) =>
        (ulong)Interlocked.Exchange(ref *(long*)(_cb + ControlBlock.PreviousTrapHandler), (long)handler);

    private static bool RegisterMembarrier()
    {
        var supported = PatcherOs.Membarrier(PatcherOs.MembarrierQuery);
        if (supported < 0 || (supported & PatcherOs.MembarrierPrivateExpeditedSyncCore) == 0)
        {
            return false;
        }

        return PatcherOs.Membarrier(PatcherOs.MembarrierRegisterPrivateExpeditedSyncCore) == 0;
    }

    private void InstallFlushHandler()
    {
        var action = stackalloc byte[PatcherOs.SigactionSize];
        new Span<byte>(action, PatcherOs.SigactionSize).Clear();
        *(ulong*)action = Entries.FlushHandler;
        *(int*)(action + PatcherOs.SigactionFlagsOffset) = PatcherOs.SaSiginfo | PatcherOs.SaRestart | PatcherOs.SaOnStack;
        if (PatcherOs.Sigaction(FlushSignal, action, null) != 0)
        {
            throw new InvalidOperationException($"Installing the flush handler for signal {FlushSignal} failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }
    }

    private void InstallTrapHandler()
    {
        var action = stackalloc byte[PatcherOs.SigactionSize];
        var previous = stackalloc byte[PatcherOs.SigactionSize];
        new Span<byte>(action, PatcherOs.SigactionSize).Clear();
        *(ulong*)action = Entries.TrapHandler;
        // Block the flush signal inside the trap handler: a thread acknowledges a flush only after it
        // has left the trap handler, which is what makes retiring trap tables after a flush safe.
        var bit = FlushSignal - 1;
        action[PatcherOs.SigactionMaskOffset + (bit / 8)] |= (byte)(1 << (bit % 8));
        *(int*)(action + PatcherOs.SigactionFlagsOffset) = PatcherOs.SaSiginfo | PatcherOs.SaRestart | PatcherOs.SaOnStack;

        // Record the previous handler before ours can run, so a foreign trap never finds it missing.
        if (PatcherOs.Sigaction(PatcherOs.SigTrapNumber, null, previous) != 0)
        {
            throw new InvalidOperationException($"Reading the SIGTRAP action failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }

        *(ulong*)(_cb + ControlBlock.PreviousTrapHandler) = *(ulong*)previous;
        if (PatcherOs.Sigaction(PatcherOs.SigTrapNumber, action, null) != 0)
        {
            throw new InvalidOperationException($"Installing the SIGTRAP handler failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }
    }

    /// <summary>
    /// Registers for the membarrier rseq command and checks, on this thread, that the kernel restarts an
    /// armed sequence when it delivers a signal inside it and that the trap handler leaves the restarted
    /// context alone. Returns why rseq cannot be used, or null.
    /// </summary>
    private string? EnableRseq(RestartableSequences rseq, ulong descriptor)
    {
        var supported = PatcherOs.Membarrier(PatcherOs.MembarrierQuery);
        if (supported < 0 || (supported & PatcherOs.MembarrierPrivateExpeditedRseq) == 0)
        {
            return "the kernel has no membarrier(PRIVATE_EXPEDITED_RSEQ) (Linux 5.10 and later)";
        }

        if (PatcherOs.Membarrier(PatcherOs.MembarrierRegisterPrivateExpeditedRseq) != 0)
        {
            return $"registering for membarrier(PRIVATE_EXPEDITED_RSEQ) failed: {PatcherOs.Describe(PatcherOs.LastErrno)}";
        }

        var test = Entries.Rseq!.Value;
        RestartableSequences.Describe(descriptor, test.Start, test.End, test.Abort);
        var result = RunWithOneTrapEntry(test.Test, test.Trap, test.NotRestarted);
        return result == 1 ? null : $"the rseq self-test failed: the kernel did not restart an armed sequence at a signal (result {result})";
    }

    /// <summary>Runs <c>int test()</c> on this thread while a one-entry trap table sends an int3 at <paramref name="trap"/> to <paramref name="redirect"/>.</summary>
    private int RunWithOneTrapEntry(ulong test, ulong trap, ulong redirect)
    {
        var table = (ulong*)NativeMemory.AlignedAlloc(8 + ControlBlock.TrapEntrySize, 64);
        table[0] = 1;
        table[1] = trap;
        table[2] = 0;
        table[3] = redirect;
        table[4] = 0;
        int result;
        lock (PatchLock)
        {
            PublishTrapTable((nint)table);
            result = ((delegate* unmanaged<int>)test)();
            PublishTrapTable(0);
        }

        Retire((nint)table, 8 + ControlBlock.TrapEntrySize);
        return result;
    }

    /// <summary>Executes an armed int3 and checks that the handler redirected it.</summary>
    private void SelfTest()
    {
        if (RunWithOneTrapEntry(Entries.SelfTest, Entries.SelfTestTrap, Entries.SelfTestRedirect) != 1)
        {
            throw new InvalidOperationException("The SIGTRAP handler self-test failed: an armed int3 was not redirected.");
        }
    }

    private void SignalAllThreadsAndWait()
    {
        // Without membarrier SYNC_CORE, a signal delivered to and returned from on every thread
        // serialises each core (the kernel returns to user space through IRET after a handler).
        var before = FlushHandlerRuns;
        var self = PatcherOs.Gettid();
        var pid = PatcherOs.Getpid();
        var sent = 0;
        foreach (var tid in PatcherOs.ThreadIds())
        {
            if (tid != self && PatcherOs.Tgkill(pid, tid, FlushSignal) == 0)
            {
                sent++;
            }
        }

        var spin = new SpinWait();
        var deadline = Environment.TickCount64 + 1000;
        while (FlushHandlerRuns - before < sent && Environment.TickCount64 < deadline)
        {
            spin.SpinOnce();
        }
    }

    /// <summary>Frees tables whose last possible reader is gone (called after a successful flush).</summary>
    internal static void FreeRetired(List<(nint Table, long Bytes)> tables)
    {
        foreach (var (table, _) in tables)
        {
            NativeMemory.AlignedFree((void*)table);
        }
    }
}
