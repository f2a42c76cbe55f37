namespace Optpoline.Patcher;

/// <summary>Counters of one patcher (trap counts are process-wide).</summary>
/// <param name="Batches">Batches applied with the INT3 protocol.</param>
/// <param name="Patches">Patches written (no-ops skipped).</param>
/// <param name="CoreSyncs">Core serialisations issued (3 per batch, whatever its size).</param>
/// <param name="Flushes">Thread flushes completed.</param>
/// <param name="FlushTimeouts">Thread flushes that timed out.</param>
/// <param name="FlushedThreads">Threads signalled by completed flushes.</param>
/// <param name="TrapHits">Threads the trap handler redirected, process-wide.</param>
/// <param name="ForeignTraps">Traps passed on to the previous SIGTRAP action, process-wide.</param>
/// <param name="StaleTraps">Traps at one of our int3s that arrived after the batch had restored it (the instruction re-executes), process-wide.</param>
/// <param name="BatchTime">Wall time spent applying batches, recording included.</param>
/// <param name="Fences">rseq fences run (grace periods of restartable windows).</param>
/// <param name="RseqRestarts">Traps inside a restartable window that the kernel had already restarted (the handler left them alone), process-wide.</param>
/// <param name="BlockedTrapRefusals">Batches refused because a thread blocked SIGTRAP (<see cref="PatcherOptions.BlockedTraps"/>).</param>
/// <param name="RecordTime">Of that, the time spent recording them (text pokes before the last step, and the after-batch hook: jitdump reloads).</param>
public readonly record struct PatcherStatistics(
    long Batches, long Patches, long CoreSyncs, long Flushes, long FlushTimeouts, long FlushedThreads, long TrapHits, long ForeignTraps, long StaleTraps,
    TimeSpan BatchTime, TimeSpan RecordTime, long Fences = 0, long RseqRestarts = 0, long BlockedTrapRefusals = 0);
