namespace Optpoline.Sites;

/// <summary>
/// One compare-and-call slot: <c>S: movabs r11, T; cmp R, r11; jne Miss; C: call T</c>. Patchable: the
/// 10 bytes at <see cref="Start"/> (a movabs, or <c>jmp Miss</c> + int3 when empty) and the rel32 call
/// at <see cref="Call"/>. Its critical range is (S, C]: a thread there has compared R with the slot's
/// old target and will call whatever <see cref="Call"/> encodes.
/// </summary>
internal sealed class Slot(ulong start, ulong call, ulong miss, ulong callTarget, ulong directLanding, ulong arm, ulong restart)
{
    /// <summary>Marks a slot no thread can be inside of.</summary>
    public const long Clean = long.MaxValue;

    public ulong Start { get; } = start;

    public ulong Call { get; } = call;

    public ulong Miss { get; } = miss;

    /// <summary>
    /// Where a thread enters the slot: its rseq arming store, or <see cref="Start"/> when the slot is
    /// not a restartable window. Every redirect back into the slot goes here, so the window is armed.
    /// </summary>
    public ulong Arm { get; } = arm;

    /// <summary>The window's rseq abort handler (it jumps to <see cref="Arm"/>), or 0 when it is not restartable.</summary>
    public ulong Restart { get; } = restart;

    /// <summary>Where a direct slot's short jump lands: just after the <c>jne</c> (before any test-only widening).</summary>
    public ulong DirectLanding { get; } = directLanding;

    /// <summary>Promoted target, or 0 when the slot is empty.</summary>
    public ulong Target { get; set; }

    /// <summary>
    /// Direct (a megamorphic site's first slot): its first bytes jump over the compare to its own call,
    /// which goes to the fallback thunk, so a call costs one short jump more than the thunk alone
    /// instead of the whole miss path. <see cref="Target"/> is 0 then.
    /// </summary>
    public bool Direct { get; set; }

    /// <summary>What the call at <see cref="Call"/> encodes now (dead bytes while empty).</summary>
    public ulong CallTarget { get; set; } = callTarget;

    /// <summary>
    /// The grace-period epoch in which the slot was last demoted, or <see cref="Clean"/>. A thread may
    /// still sit between its compare and its call until a flush that started after that epoch completes;
    /// until then only <see cref="CallTarget"/> may be promoted into it.
    /// </summary>
    public long DirtyEpoch { get; set; } = Clean;

    /// <summary>The range a thread flush moves threads out of (back to the slot start).</summary>
    public Optpoline.Patcher.FlushRange CriticalRange => new(Start + 1, Call + 1, Arm);
}

/// <summary>A patchable <c>call rel32</c> or <c>jmp rel32</c> that enters an outline chain or the fallback.</summary>
internal sealed class Link(ulong address, byte opcode, ulong target)
{
    public ulong Address { get; } = address;

    public byte Opcode { get; } = opcode;

    public ulong Target { get; set; } = target;
}
