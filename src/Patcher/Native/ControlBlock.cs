namespace Optpoline.Patcher.Native;

/// <summary>
/// Layout of the native control block the signal handlers read (one per process, never freed).
/// Managed code publishes tables here with release stores; handlers load each pointer once.
/// </summary>
internal static class ControlBlock
{
    /// <summary>Pointer to the published trap table, or 0: <c>{u64 count; {u64 int3Address, kind, target, returnAddress}[count]}</c>, sorted.</summary>
    public const int TrapTable = 0;

    /// <summary>Pointer to the current flush descriptor, or 0 (see <see cref="FlushDescriptor"/>).</summary>
    public const int FlushDescriptor = 8;

    /// <summary>The SIGTRAP handler that was installed before ours (0 = SIG_DFL, 1 = SIG_IGN).</summary>
    public const int PreviousTrapHandler = 16;

    /// <summary>Traps our handler redirected (u64, atomic).</summary>
    /// <summary>Incremented after every store to <see cref="TrapTable"/>: a handler that finds no entry but an int3 looks again if it moved.</summary>
    public const int TrapGeneration = 24;

    public const int TrapHits = 32;

    /// <summary>Traps passed on to the previous handler (u64, atomic).</summary>
    public const int ForeignTraps = 40;

    /// <summary>Flush handler invocations (u64, atomic).</summary>
    public const int FlushRuns = 48;

    /// <summary>Late traps of ours (the int3 was already gone) that re-executed the restored instruction (u64, atomic).</summary>
    public const int StaleTraps = 56;

    /// <summary>A zeroed kernel <c>struct sigaction</c> (SIG_DFL), used to re-raise a foreign trap when the previous action was the default.</summary>
    public const int DefaultAction = 64;

    /// <summary>SIGTRAP deliveries whose context the kernel had moved to a restartable window's abort handler (returned from at once).</summary>
    public const int RseqRestarts = 96;

    /// <summary>Trap handlers between loading the trap table and their last read of it.</summary>
    public const int TrapReaders = 104;

    /// <summary>The engine's code regions, <c>{count, (start, end)...}</c>: a late trap is ours only inside one (null: no filter).</summary>
    public const int RegionTable = 112;

    /// <summary>Test seam: 1 parks the next trap handler after its table load (it writes 2, then waits for 0).</summary>
    public const int TestPark = 120;

    public const int Size = 128;

    /// <summary>Bytes per trap table entry.</summary>
    public const int TrapEntrySize = 32;
}

/// <summary>
/// Layout of a flush descriptor: <c>{u64 generation; u64 rangeCount; u64 tidCount; u64 reserved;
/// {u64 start, end, redirect}[rangeCount]; u32 tids[tidCount]; u32 acks[tidCount]}</c>. Ranges are
/// sorted and disjoint; a handler whose thread's RIP lies in [start, end) sets RIP to redirect, then
/// writes the generation into its own ack slot.
/// </summary>
internal static class FlushDescriptor
{
    public const int Generation = 0;
    public const int RangeCount = 8;
    public const int TidCount = 16;
    public const int Ranges = 32;
    public const int RangeSize = 24;

    public static int TidsOffset(int rangeCount) => Ranges + (rangeCount * RangeSize);

    public static int AcksOffset(int rangeCount, int tidCount) => TidsOffset(rangeCount) + (tidCount * 4);

    public static int Size(int rangeCount, int tidCount) => AcksOffset(rangeCount, tidCount) + (tidCount * 4);
}
