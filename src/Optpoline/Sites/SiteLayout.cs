namespace Optpoline.Sites;

/// <summary>
/// One compare-and-call slot: <c>S: movabs r11, T; cmp R, r11; jne Miss; C: call T</c>. Patchable: the
/// 10 bytes at <see cref="Start"/> (a movabs, or <c>jmp Miss</c> + int3 when empty) and the rel32 call
/// at <see cref="Call"/>.
/// </summary>
internal sealed class Slot(ulong start, ulong call, ulong miss, ulong callTarget)
{
    public ulong Start { get; } = start;

    public ulong Call { get; } = call;

    public ulong Miss { get; } = miss;

    /// <summary>Promoted target, or 0 when the slot is empty.</summary>
    public ulong Target { get; set; }

    /// <summary>What the call at <see cref="Call"/> encodes now (dead bytes while empty).</summary>
    public ulong CallTarget { get; set; } = callTarget;
}

/// <summary>A patchable <c>call rel32</c> or <c>jmp rel32</c> that enters an outline chain or the fallback.</summary>
internal sealed class Link(ulong address, byte opcode, ulong target)
{
    public ulong Address { get; } = address;

    public byte Opcode { get; } = opcode;

    public ulong Target { get; set; } = target;
}
