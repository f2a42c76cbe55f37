using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

namespace Optpoline.Sites;

/// <summary>
/// An immutable compare-and-jump chain in engine memory, entered by <c>call</c> from a site's miss
/// path (so it only tail-jumps): <c>movabs r11, Ti; cmp R, r11; je Ti</c> per target, then
/// <c>jmp tail</c>. Swapping chains patches the one rel32 that enters it; a chain is never edited.
/// </summary>
internal sealed class OutlineChain
{
    /// <summary>Targets one chain holds at most.</summary>
    public const int MaxTargets = 6;

    private const int EntryLength = X64.MovAbsLength + X64.CmpLength + X64.JccRel32Length;

    private OutlineChain(CodeBlock block, IReadOnlyList<ulong> targets, ChainSlot? slot, LivePatch? write)
    {
        Block = block;
        Targets = targets;
        Slot = slot;
        Write = write;
    }

    /// <summary>The arena slot the chain lives in (restartable windows), or null (a block of its own).</summary>
    public ChainSlot? Slot { get; }

    /// <summary>
    /// For a chain in a used arena slot: the live patch that writes it, to be applied in the batch that
    /// links it (with a fence after its int3). Null when the chain was written already.
    /// </summary>
    public LivePatch? Write { get; }

    public CodeBlock Block { get; }

    public ulong Entry => Block.Address;

    public IReadOnlyList<ulong> Targets { get; }

    /// <summary>Bytes a chain of <paramref name="count"/> targets takes.</summary>
    public static int Length(int count) => (count * EntryLength) + X64.Rel32Length;

    /// <summary>
    /// Builds a chain in a slot of <paramref name="arena"/>: it first arms the slot's block descriptor,
    /// so that it is a restartable window. Returns null with the targets a <c>je</c> cannot reach (the
    /// slot goes back to the arena).
    /// </summary>
    public static OutlineChain? TryCreate(ChainArena arena, ICodeView code, Register register, IReadOnlyList<ulong> targets, ulong tail, out List<ulong> unreachable)
    {
        var slot = arena.Take(register);
        var arm = RestartableSequences.ArmLength;
        unreachable = [];
        for (var i = 0; i < targets.Count; i++)
        {
            var next = slot.Address + (ulong)(arm + ((i + 1) * EntryLength));
            if (!X64.TryRel32(next, targets[i], out _))
            {
                unreachable.Add(targets[i]);
            }
        }

        if (unreachable.Count > 0)
        {
            arena.Return(slot, linked: false);
            return null;
        }

        var instructions = new List<Instruction>((targets.Count * 3) + 2) { arena.Rseq.Arm(slot.Descriptor) };
        AddEntries(instructions, register, targets, tail);
        var bytes = X64.Encode(slot.Address, instructions);
        var block = slot.Block(bytes.Length);
        if (!slot.Used)
        {
            // Never reachable yet: a plain write through the writable view is safe.
            bytes.CopyTo(block.GetWritableSpan());
            return new OutlineChain(block, [.. targets], slot, null);
        }

        // A thread may be about to execute the old chain's first instruction here: the bytes change with
        // the INT3 protocol, and one that traps there goes to the fallback (the same call).
        var current = new byte[bytes.Length];
        code.Read(slot.Address, current);
        var write = new LivePatch(new CodePatch(slot.Address, current, bytes), TrapAction.ContinueAt(arena.Fallback(register))) { FenceAfterArming = true };
        return new OutlineChain(block, [.. targets], slot, write);
    }

    private static void AddEntries(List<Instruction> instructions, Register register, IReadOnlyList<ulong> targets, ulong tail)
    {
        foreach (var target in targets)
        {
            instructions.Add(Instruction.Create(Code.Mov_r64_imm64, Register.R11, target));
            instructions.Add(Instruction.Create(Code.Cmp_rm64_r64, register, Register.R11));
            instructions.Add(Instruction.CreateBranch(Code.Je_rel32_64, target));
        }

        instructions.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, tail));
    }

    /// <summary>
    /// Builds a chain, or returns null with the targets a <c>je</c> from the chain cannot reach (the
    /// block is then freed again).
    /// </summary>
    public static OutlineChain? TryCreate(CodeMemory memory, Register register, IReadOnlyList<ulong> targets, ulong tail, out List<ulong> unreachable)
    {
        var block = memory.Allocate(Length(targets.Count), 16);
        unreachable = [];
        for (var i = 0; i < targets.Count; i++)
        {
            var next = block.Address + (ulong)((i + 1) * EntryLength);
            if (!X64.TryRel32(next, targets[i], out _))
            {
                unreachable.Add(targets[i]);
            }
        }

        if (unreachable.Count > 0)
        {
            memory.Free(block);
            return null;
        }

        var instructions = new List<Instruction>((targets.Count * 3) + 1);
        AddEntries(instructions, register, targets, tail);
        var bytes = X64.Encode(block.Address, instructions);
        // Not yet reachable by any thread: a plain write through the writable view is safe.
        bytes.CopyTo(block.GetWritableSpan());
        return new OutlineChain(block, [.. targets], null, null);
    }
}
