using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;

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

    private OutlineChain(CodeBlock block, IReadOnlyList<ulong> targets)
    {
        Block = block;
        Targets = targets;
    }

    public CodeBlock Block { get; }

    public ulong Entry => Block.Address;

    public IReadOnlyList<ulong> Targets { get; }

    /// <summary>Bytes a chain of <paramref name="count"/> targets takes.</summary>
    public static int Length(int count) => (count * EntryLength) + X64.Rel32Length;

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

        var instructions = new List<Instruction>(targets.Count * 3 + 1);
        foreach (var target in targets)
        {
            instructions.Add(Instruction.Create(Code.Mov_r64_imm64, Register.R11, target));
            instructions.Add(Instruction.Create(Code.Cmp_rm64_r64, register, Register.R11));
            instructions.Add(Instruction.CreateBranch(Code.Je_rel32_64, target));
        }

        instructions.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, tail));
        var bytes = X64.Encode(block.Address, instructions);
        // Not yet reachable by any thread: a plain write through the writable view is safe.
        bytes.CopyTo(block.GetWritableSpan());
        return new OutlineChain(block, [.. targets]);
    }
}
