using System.Diagnostics;
using System.Runtime.InteropServices;
using Optpoline.Patcher.Native;
using Optpoline.Patcher.Platform;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Patcher;

/// <summary>
/// Changes code while other threads execute it, the way the kernel's <c>text_poke_bp_batch</c> does,
/// and runs thread flushes (grace periods) for bytes a thread may still be inside. Thread safe; every
/// patcher of a process shares one set of signal handlers.
/// </summary>
/// <remarks>
/// The INT3 protocol, once per batch whatever its size:
/// 1. write <c>int3</c> over the first byte of every patch; core sync;
/// 2. write every patch's remaining bytes; core sync;
/// 3. write every patch's first byte; core sync.
/// A thread that reaches a first byte between steps 1 and 3 traps; the handler finds the address in
/// the published batch (binary search) and sends the thread along the patch's <see cref="TrapAction"/>,
/// an equivalent path, so no thread ever executes a half-written instruction. Core sync is
/// <c>membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)</c>; where the kernel lacks it, a signal
/// delivered to every thread serialises the cores instead (slower, same guarantee).
/// </remarks>
public sealed unsafe class LivePatcher
{
    /// <summary>Retired native tables above which a flush is due, so that they can be freed.</summary>
    private const long RetiredBudgetBytes = 1 << 20;

    private readonly PatchRuntime _runtime;
    private long _batches;
    private long _batchTicks;
    private long _recordTicks;
    private long _patches;
    private long _coreSyncs;
    private long _flushes;
    private long _flushTimeouts;
    private long _flushedThreads;
    private long _fences;
    private long _blockedTrapRefusals;
    private long _lastCleanTrapScan;

    /// <summary>How long a scan that found no thread blocking SIGTRAP stands for later batches.</summary>
    private static readonly TimeSpan TrapScanReuse = TimeSpan.FromMilliseconds(10);

    /// <summary>Creates a patcher; the first one in the process installs the signal handlers and runs their self-test.</summary>
    /// <exception cref="ArgumentOutOfRangeException">An option is out of range.</exception>
    /// <exception cref="InvalidOperationException">The handlers could not be installed, or another patcher uses a different flush signal.</exception>
    public LivePatcher(PatcherOptions? options = null)
    {
        Options = options ?? new PatcherOptions();
        _runtime = PatchRuntime.Get(Options.ResolveFlushSignal());
    }

    /// <summary>The options in force.</summary>
    public PatcherOptions Options { get; }

    /// <summary>The signal thread flushes use.</summary>
    public int FlushSignal => _runtime.FlushSignal;

    /// <summary>Whether core sync uses membarrier (true on Linux 4.16 and later).</summary>
    public bool UsesMembarrier => _runtime.CoreSyncByMembarrier;

    /// <summary>A snapshot of the counters.</summary>
    public PatcherStatistics Statistics => new(
        Interlocked.Read(ref _batches), Interlocked.Read(ref _patches), Interlocked.Read(ref _coreSyncs),
        Interlocked.Read(ref _flushes), Interlocked.Read(ref _flushTimeouts), Interlocked.Read(ref _flushedThreads),
        _runtime.TrapHits, _runtime.ForeignTraps, _runtime.StaleTraps,
        Stopwatch.GetElapsedTime(0, Interlocked.Read(ref _batchTicks)), Stopwatch.GetElapsedTime(0, Interlocked.Read(ref _recordTicks)),
        Interlocked.Read(ref _fences), _runtime.RseqRestarts, Interlocked.Read(ref _blockedTrapRefusals));

    /// <summary>
    /// Restartable sequences for slot windows, or null: turned off in <see cref="PatcherOptions"/>, or
    /// not supported here (<see cref="RestartableSequencesUnavailable"/> says why).
    /// </summary>
    public RestartableSequences? RestartableSequences => Options.UseRestartableSequences ? _runtime.Rseq : null;

    /// <summary>Why <see cref="RestartableSequences"/> is null, or null.</summary>
    public string? RestartableSequencesUnavailable =>
        !Options.UseRestartableSequences ? "turned off (PatcherOptions.UseRestartableSequences)" : _runtime.RseqUnavailable;

    /// <summary>
    /// The grace period of restartable windows: after it, no thread can resume inside a window with
    /// values it compared against the window's bytes before the call (see <see cref="RestartableSequences.Fence"/>).
    /// </summary>
    /// <exception cref="InvalidOperationException">Restartable sequences are not in use, or the fence failed.</exception>
    public void RestartWindows()
    {
        var rseq = RestartableSequences ?? throw new InvalidOperationException($"Restartable sequences are not in use: {RestartableSequencesUnavailable}.");
        rseq.Fence();
        Interlocked.Increment(ref _fences);
    }

    /// <summary>
    /// Whether enough batch tables wait to be freed that <see cref="ReclaimTables"/> should run soon: a
    /// batch's trap table is freed once no trap handler reads it, which the batch itself checks as it
    /// ends; a handler that was reading then (a thread preempted in it) leaves the table for later.
    /// The engine's grace worker checks this; a host that uses the patcher alone calls
    /// <see cref="ReclaimTables"/> when it is set.
    /// </summary>
    public bool FlushDue => _runtime.RetiredBytes > RetiredBudgetBytes;

    /// <summary>
    /// Tells the trap handler where this patcher writes: once any region is known, a trap at an address
    /// that no longer holds an int3 is taken as a late one of ours (and the instruction re-executed)
    /// only inside a known region; anywhere else it goes to the previous SIGTRAP action, as a foreign
    /// breakpoint its owner removed. Process-wide, append-only; the engine registers its code regions.
    /// </summary>
    public void AddCodeRegion(ulong start, ulong size) => _runtime.AddCodeRegion(start, size);

    /// <summary>Frees the retired trap tables if no trap handler is reading one now; returns whether they were freed.</summary>
    public bool ReclaimTables() => _runtime.ReclaimRetired();

    /// <summary>Bytes of retired trap tables not freed yet.</summary>
    internal long RetiredTableBytes => _runtime.RetiredBytes;

    /// <summary>Test seam: counts a trap handler in (+1) or out (-1) of the trap table, as the handler does.</summary>
    internal void TrapReadersForTest(int delta) => _runtime.AddTrapReaders(delta);

    /// <summary>
    /// Called after the tails are written and before any first byte is restored, that is, before a
    /// change can be visible to another thread (tracing records the change here).
    /// </summary>
    public Action<IReadOnlyList<CodePatch>>? BeforeVisible { get; set; }

    /// <summary>
    /// Called under the patch lock before a batch writes anything (the engine checks its jitdump here).
    /// An <see cref="IOException"/> from it refuses the batch with a <see cref="PatchRejectedException"/>.
    /// </summary>
    public Action? BeforeArm { get; set; }

    /// <summary>Whether a batch (of any patcher of this process) is being applied now.</summary>
    internal bool Busy => _runtime.PatchLock.IsHeld();

    /// <summary>Test seam: sends a flush signal instead of tgkill, returning (result, errno) (null: tgkill).</summary>
    internal Func<int, int, int, (int Result, int Errno)>? SignalForTest { get; set; }

    /// <summary>Test seam: the process-wide runtime (flush generation, control block).</summary>
    internal PatchRuntime Runtime => _runtime;

    /// <summary>Test-only broken variant: the text pokes are written after the first bytes are restored.</summary>
    internal bool RecordAfterVisible { get; set; }

    /// <summary>Called after a batch is complete (every patch visible), with the patches written.</summary>
    public Action<IReadOnlyList<CodePatch>>? AfterApply { get; set; }

    /// <summary>
    /// Where every applied patch is recorded as a PERF_RECORD_TEXT_POKE (null: not recorded). The
    /// record is submitted, with its time, after the tails and before the first bytes are restored, as
    /// the kernel emits it: from then on the change can be visible to other threads, and a decoder that
    /// sees an int3 at the record's address between its time and the next core sync knows the old or
    /// the new bytes apply. The record is on file before the first byte is restored, so a crash never
    /// leaves a visible change without its record. A writer whose write failed refuses every later batch
    /// before it writes anything (<see cref="PatchRejectedException"/>).
    /// </summary>
    public PerfDataWriter? Trace { get; set; }

    /// <summary>
    /// Runs <paramref name="action"/> while no batch is in flight, and none starts (it holds the lock
    /// that batches take): a trace starts and stops here, so that its snapshot holds no int3 window.
    /// </summary>
    public void BetweenBatches(Action action)
    {
        ArgumentNullException.ThrowIfNull(action);
        lock (_runtime.PatchLock)
        {
            action();
        }
    }

    /// <summary>
    /// Applies a batch to live code with the INT3 protocol. The whole batch is validated first
    /// (expected bytes, overlaps); patches that change nothing are skipped.
    /// </summary>
    /// <returns>The number of patches written.</returns>
    /// <exception cref="PatchRejectedException">Validation failed; nothing was written.</exception>
    public int Apply(ICodeView code, IReadOnlyList<LivePatch> patches)
    {
        ArgumentNullException.ThrowIfNull(code);
        ArgumentNullException.ThrowIfNull(patches);
        var started = Stopwatch.GetTimestamp();
        lock (_runtime.PatchLock)
        {
            var byPatch = patches.ToDictionary(p => p.Patch);
            var effective = QuiescentPatcher.Validate(code, [.. patches.Select(p => p.Patch)]);
            if (effective.Count == 0)
            {
                return 0;
            }

            // A trace that could not write refuses the batch, with nothing written.
            var waitStart = Stopwatch.GetTimestamp();
            try
            {
                if (Trace?.Failure is { } failed)
                {
                    throw failed;
                }

                BeforeArm?.Invoke();
            }
            catch (IOException failure)
            {
                throw new PatchRejectedException($"The trace could not record earlier changes, so this batch was not applied: {failure.Message}", failure);
            }

            // An armed int3 kills a thread that blocks SIGTRAP (finding F8): no int3 while one exists.
            if (Options.BlockedTraps == BlockedTrapPolicy.Refuse && ThreadsBlockingTraps() is { Count: > 0 } blocking)
            {
                Interlocked.Increment(ref _blockedTrapRefusals);
                throw new PatchRejectedException(
                    $"Thread(s) {string.Join(", ", blocking)} of this process block SIGTRAP, so this batch was not applied: a thread that " +
                    "blocks SIGTRAP and reaches an armed int3 is killed by the kernel. Unblock SIGTRAP in threads that run generated code, " +
                    "or set PatcherOptions.BlockedTraps = Ignore if those threads never run it.");
            }

            // The records are encoded now and only stamped with their time in the int3 window, which
            // stays as short as without a trace (threads that arrive in it trap).
            var prepared = Trace?.PrepareTextPokes(effective, PatcherOs.Gettid());
            Interlocked.Add(ref _recordTicks, Stopwatch.GetTimestamp() - waitStart);
            var table = BuildTrapTable(effective, p => byPatch[p].OnTrap);
            var tableBytes = 8L + (effective.Count * ControlBlock.TrapEntrySize);
            _runtime.PublishTrapTable(table);
            var armed = 0;
            try
            {
                // First step: int3 over every first byte.
                ReadOnlySpan<byte> int3 = [0xCC];
                foreach (var patch in effective)
                {
                    code.Write(patch.Address, int3);
                    armed++;
                }

                CoreSync();
                if (patches.Any(p => p.FenceAfterArming))
                {
                    // Bytes inside restartable windows: a thread that entered before the int3 is
                    // restarted now, so none is past it when the tails change.
                    RestartWindows();
                }

                // Second step: the tails. Threads that arrive now trap and take the equivalent path.
                foreach (var patch in effective)
                {
                    if (patch.Length > 1)
                    {
                        code.Write(patch.Address + 1, patch.Replacement.Span[1..]);
                    }
                }

                CoreSync();
                var recordStart = Stopwatch.GetTimestamp();
                if (prepared is not null && !RecordAfterVisible)
                {
                    Trace!.SubmitTextPokes(prepared, PerfDataWriter.Now());
                }

                Interlocked.Add(ref _recordTicks, Stopwatch.GetTimestamp() - recordStart);
                BeforeVisible?.Invoke(effective);

                // Third step: the first bytes, highest address first, so that within a slot the call is
                // complete before the compare that guards it becomes reachable.
                for (var i = effective.Count - 1; i >= 0; i--)
                {
                    code.Write(effective[i].Address, effective[i].Replacement.Span[..1]);
                }

                CoreSync();
                if (prepared is not null && RecordAfterVisible)
                {
                    Trace!.SubmitTextPokes(prepared, PerfDataWriter.Now());
                }
            }
            catch (Exception failure) when (armed > 0)
            {
                Restore(code, effective, armed);
                throw new PatchRejectedException($"Writing a patch batch failed after {armed} patches were armed; the original bytes were restored.", failure);
            }
            finally
            {
                _runtime.PublishTrapTable(0);
                _runtime.Retire(table, tableBytes);
                _runtime.ReclaimRetired();
            }

            Interlocked.Increment(ref _batches);
            Interlocked.Add(ref _patches, effective.Count);
            var afterStart = Stopwatch.GetTimestamp();
            AfterApply?.Invoke(effective);
            var end = Stopwatch.GetTimestamp();
            Interlocked.Add(ref _recordTicks, end - afterStart);
            Interlocked.Add(ref _batchTicks, end - started);
            return effective.Count;
        }
    }

    /// <summary>
    /// Runs a thread flush: signals every other thread of the process; each one's handler moves it out
    /// of <paramref name="ranges"/> (to the range's redirect) and acknowledges. Returns true when every
    /// thread acknowledged (or exited) within the timeout: from then on no thread is inside the ranges,
    /// except by entering them anew from their start. False on timeout; nothing is changed then.
    /// </summary>
    /// <exception cref="ArgumentException">Ranges are empty or overlap.</exception>
    public bool Flush(IReadOnlyList<FlushRange> ranges, TimeSpan? timeout = null)
    {
        ArgumentNullException.ThrowIfNull(ranges);
        var sorted = ranges.OrderBy(r => r.Start).ToList();
        for (var i = 0; i < sorted.Count; i++)
        {
            if (sorted[i].End <= sorted[i].Start || (i > 0 && sorted[i - 1].End > sorted[i].Start))
            {
                throw new ArgumentException($"Flush ranges must be non-empty and disjoint: {sorted[i]}.", nameof(ranges));
            }
        }

        var limit = timeout ?? Options.FlushTimeout;
        lock (_runtime.FlushLock)
        {
            // Descriptors of earlier flushes may still be read by a late handler; they go when this one completes.
            var freeable = _runtime.TakeStaleDescriptors();
            var pid = PatcherOs.Getpid();
            var self = PatcherOs.Gettid();
            var tids = PatcherOs.ThreadIds();
            tids.Remove(self);
            // Acknowledgement slots start at 0: generation 0 would count every thread as done (finding F12).
            var generation = ++_runtime.FlushGeneration;
            if (generation == 0)
            {
                generation = ++_runtime.FlushGeneration;
            }

            var size = FlushDescriptor.Size(sorted.Count, tids.Count);
            var descriptor = (byte*)NativeMemory.AlignedAlloc((nuint)size, 64);
            new Span<byte>(descriptor, size).Clear();
            *(ulong*)(descriptor + FlushDescriptor.Generation) = generation;
            *(ulong*)(descriptor + FlushDescriptor.RangeCount) = (ulong)sorted.Count;
            *(ulong*)(descriptor + FlushDescriptor.TidCount) = (ulong)tids.Count;
            var range = (ulong*)(descriptor + FlushDescriptor.Ranges);
            foreach (var r in sorted)
            {
                *range++ = r.Start;
                *range++ = r.End;
                *range++ = r.Redirect;
            }

            var tidSlots = (int*)(descriptor + FlushDescriptor.TidsOffset(sorted.Count));
            var acks = (uint*)(descriptor + FlushDescriptor.AcksOffset(sorted.Count, tids.Count));
            for (var i = 0; i < tids.Count; i++)
            {
                tidSlots[i] = tids[i];
            }

            // The previous descriptor may still be read by a late handler; it goes when this flush completes.
            if (_runtime.CurrentDescriptor.Address != 0)
            {
                freeable.Add(_runtime.CurrentDescriptor);
            }

            _runtime.CurrentDescriptor = ((nint)descriptor, size);
            _runtime.PublishFlushDescriptor((nint)descriptor);
            Interlocked.MemoryBarrier();

            // Only ESRCH means the thread is gone. EAGAIN (the user's queue of real-time signals is full,
            // RLIMIT_SIGPENDING) or any other failure leaves the thread pending: it is signalled again
            // while the flush waits, and the flush times out if it never gets through (finding F2).
            var unsent = new List<int>();
            for (var i = 0; i < tids.Count; i++)
            {
                var (result, errno) = SendFlushSignal(pid, tids[i]);
                if (result != 0 && errno == PatcherOs.ESRCH)
                {
                    acks[i] = generation;
                }
                else if (result != 0)
                {
                    unsent.Add(i);
                }
            }

            bool completed;
            try
            {
                completed = WaitForAcks(tids, acks, generation, limit, unsent, pid);
            }
            finally
            {
                // A signal that arrives after the flush (queued late, or sent by anyone) finds no ranges
                // to apply (finding F10); the descriptor itself is freed only after a later flush, since
                // a handler may have loaded it just before this store.
                _runtime.PublishFlushDescriptor(0);
            }

            if (completed)
            {
                PatchRuntime.FreeRetired(freeable);
                Interlocked.Increment(ref _flushes);
                Interlocked.Add(ref _flushedThreads, tids.Count);
            }
            else
            {
                _runtime.ReturnStaleDescriptors(freeable);
                Interlocked.Increment(ref _flushTimeouts);
            }

            return completed;
        }
    }

    /// <summary>
    /// Threads that block SIGTRAP in their own mask. A thread inside a signal handler (our trap handler,
    /// for a late trap of an earlier batch) blocks it only for that handler's microseconds: a thread is
    /// counted only if it still blocks SIGTRAP after a few looks 50 µs apart.
    /// </summary>
    private List<int> ThreadsBlockingTraps()
    {
        // A scan reads every thread's status (about 10 µs each): batches in quick succession share one
        // clean scan for up to 10 ms (a thread that starts blocking SIGTRAP within that time is not seen).
        var now = Stopwatch.GetTimestamp();
        if (Stopwatch.GetElapsedTime(_lastCleanTrapScan, now) < TrapScanReuse)
        {
            return [];
        }

        var blocking = PatcherOs.ThreadsBlocking(PatcherOs.SigTrapNumber);
        for (var look = 0; look < 4 && blocking.Count > 0; look++)
        {
            PatcherOs.SleepMicroseconds(50);
            var again = PatcherOs.ThreadsBlocking(PatcherOs.SigTrapNumber);
            blocking.RemoveAll(tid => !again.Contains(tid));
        }

        if (blocking.Count == 0)
        {
            _lastCleanTrapScan = Stopwatch.GetTimestamp();
        }

        return blocking;
    }

    private (int Result, int Errno) SendFlushSignal(int pid, int tid)
    {
        if (SignalForTest is { } seam)
        {
            return seam(pid, tid, _runtime.FlushSignal);
        }

        var result = PatcherOs.Tgkill(pid, tid, _runtime.FlushSignal);
        return (result, result == 0 ? 0 : PatcherOs.LastErrno);
    }

    private bool WaitForAcks(List<int> tids, uint* acks, uint generation, TimeSpan limit, List<int> unsent, int pid)
    {
        var clock = Stopwatch.StartNew();
        var nextExitCheck = TimeSpan.FromMilliseconds(1);
        var spin = new SpinWait();
        while (true)
        {
            var pending = 0;
            for (var i = 0; i < tids.Count; i++)
            {
                if (Volatile.Read(ref acks[i]) != generation)
                {
                    pending++;
                }
            }

            if (pending == 0)
            {
                return true;
            }

            if (clock.Elapsed > nextExitCheck)
            {
                // Signals that could not be queued are sent again.
                unsent.RemoveAll(i =>
                {
                    var (result, errno) = SendFlushSignal(pid, tids[i]);
                    if (result != 0 && errno == PatcherOs.ESRCH)
                    {
                        acks[i] = generation;
                    }

                    return result == 0 || errno == PatcherOs.ESRCH;
                });

                // A thread that exits after being signalled never acknowledges; it is outside every range.
                for (var i = 0; i < tids.Count; i++)
                {
                    if (Volatile.Read(ref acks[i]) != generation && !PatcherOs.ThreadExists(tids[i]))
                    {
                        acks[i] = generation;
                    }
                }

                nextExitCheck = clock.Elapsed + TimeSpan.FromMilliseconds(1);
            }

            if (clock.Elapsed > limit)
            {
                return false;
            }

            spin.SpinOnce(sleep1Threshold: -1);
        }
    }

    private static nint BuildTrapTable(IReadOnlyList<CodePatch> effective, Func<CodePatch, TrapAction> action)
    {
        var table = (ulong*)NativeMemory.AlignedAlloc((nuint)(8 + (effective.Count * ControlBlock.TrapEntrySize)), 64);
        table[0] = (ulong)effective.Count;
        var entry = table + 1;
        foreach (var patch in effective)
        {
            var onTrap = action(patch);
            *entry++ = patch.Address;
            *entry++ = onTrap.EmulatesCall ? 1UL : 0UL;
            *entry++ = onTrap.Target;
            *entry++ = onTrap.ReturnAddress;
        }

        return (nint)table;
    }

    private void CoreSync()
    {
        _runtime.CoreSync();
        Interlocked.Increment(ref _coreSyncs);
    }

    /// <summary>Puts the expected bytes back with the same protocol, for a batch that failed half way.</summary>
    private void Restore(ICodeView code, IReadOnlyList<CodePatch> effective, int armed)
    {
        ReadOnlySpan<byte> int3 = [0xCC];
        for (var i = 0; i < armed; i++)
        {
            code.Write(effective[i].Address, int3);
        }

        CoreSync();
        for (var i = 0; i < armed; i++)
        {
            if (effective[i].Length > 1)
            {
                code.Write(effective[i].Address + 1, effective[i].Expected.Span[1..]);
            }
        }

        CoreSync();
        for (var i = armed - 1; i >= 0; i--)
        {
            code.Write(effective[i].Address, effective[i].Expected.Span[..1]);
        }

        CoreSync();
    }
}
