using Iced.Intel;
using Optpoline.Memory;

namespace Optpoline.Emit;

/// <summary>
/// The shared fallback thunks, one per register and kind, in one block of code memory. Each behaves
/// as <c>jmp R</c>: a site enters it with <c>call</c> (call form, the callee returns to the site) or
/// <c>jmp</c> (jmp form, the tail of an outline chain).
/// </summary>
/// <remarks>
/// Retpoline (kernel layout): <c>call 1f; 2: pause; lfence; jmp 2b; 1: mov [rsp], R; ret</c>. The
/// <c>ret</c> is predicted from the return stack, which the <c>call</c> pointed at the capture loop, so
/// no indirect branch predictor entry is ever consulted. Indirect: <c>jmp R</c>.
/// </remarks>
internal sealed class ThunkTable
{
    private const int Stride = 32;
    private readonly ulong _base;

    public ThunkTable(CodeMemory memory)
    {
        var kinds = Enum.GetValues<FallbackKind>();
        var count = SiteRegisters.All.Count * kinds.Length;
        Block = memory.Allocate(count * Stride, 64);
        _base = Block.Address;
        var code = Block.GetWritableSpan();
        foreach (var kind in kinds)
        {
            foreach (var register in SiteRegisters.All)
            {
                var at = Address(register, kind);
                var bytes = X64.Encode(at, Build(kind, register, at));
                bytes.CopyTo(code[(int)(at - _base)..]);
            }
        }
    }

    /// <summary>The block holding every thunk.</summary>
    public CodeBlock Block { get; }

    /// <summary>Thunk for <paramref name="register"/> of the given kind.</summary>
    public ulong Address(Register register, FallbackKind kind) =>
        _base + (ulong)((((int)kind * SiteRegisters.All.Count) + SiteRegisters.IndexOf(register)) * Stride);

    /// <summary>The instructions of one thunk placed at <paramref name="at"/>.</summary>
    public static List<Instruction> Build(FallbackKind kind, Register register, ulong at)
    {
        if (kind == FallbackKind.Indirect)
        {
            return [Instruction.Create(Code.Jmp_rm64, register)];
        }

        // 0: call 12 | 5: pause | 7: lfence | 10: jmp 5 | 12: mov [rsp], R | ret
        const ulong Capture = 5;
        const ulong Setup = 12;
        return
        [
            Instruction.CreateBranch(Code.Call_rel32_64, at + Setup),
            Instruction.Create(Code.Pause),
            Instruction.Create(Code.Lfence),
            Instruction.CreateBranch(Code.Jmp_rel8_64, at + Capture),
            Instruction.Create(Code.Mov_rm64_r64, new MemoryOperand(Register.RSP), register),
            Instruction.Create(Code.Retnq),
        ];
    }
}
