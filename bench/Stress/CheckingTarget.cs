using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Stress;

/// <summary>Targets for the concurrency workloads: each knows its own address and checks the register it was called through.</summary>
public static class CheckingTarget
{
    /// <summary>Emits a function that returns 0 when <paramref name="register"/> holds its own address, else 1 (published as <paramref name="name"/>, if given).</summary>
    public static ulong Emit(OptpolineEngine engine, Register register, string? name = null) => Emit(engine, register, name, ticketed: false);

    /// <summary>
    /// As <see cref="Emit"/>, and consumes the caller's ticket: decrements the qword just above its
    /// return address (<c>[rsp+8]</c>, the top of the <see cref="SiteLoop"/> frame, whatever path the
    /// site took: a direct call, a chain's jump, the thunk, an emulated call). The loop sets the ticket
    /// to 1 before each site and counts a call as wrong unless it is 0 after: a skipped call or a
    /// duplicated one shows, on any register. Only for <see cref="SiteLoop"/> callers.
    /// </summary>
    public static ulong EmitTicketed(OptpolineEngine engine, Register register, string? name = null) => Emit(engine, register, name, ticketed: true);

    private static ulong Emit(OptpolineEngine engine, Register register, string? name, bool ticketed)
    {
        ArgumentNullException.ThrowIfNull(engine);
        var asm = new Assembler(64);
        var self = asm.CreateLabel();
        asm.Label(ref self);
        asm.lea(r11, __[self]);
        asm.cmp(new AssemblerRegister64(register), r11);
        asm.setne(al);
        asm.movzx(eax, al);
        if (ticketed)
        {
            asm.dec(__qword_ptr[rsp + 8]);
        }

        asm.ret();
        return engine.Assemble(asm, name: name).Address;
    }
}
