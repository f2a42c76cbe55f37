using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Stress;

/// <summary>Targets for the concurrency workloads: each knows its own address and checks the register it was called through.</summary>
public static class CheckingTarget
{
    /// <summary>Emits a function that returns 0 when <paramref name="register"/> holds its own address, else 1 (published as <paramref name="name"/>, if given).</summary>
    public static ulong Emit(OptpolineEngine engine, Register register, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(engine);
        var asm = new Assembler(64);
        var self = asm.CreateLabel();
        asm.Label(ref self);
        asm.lea(r11, __[self]);
        asm.cmp(new AssemblerRegister64(register), r11);
        asm.setne(al);
        asm.movzx(eax, al);
        asm.ret();
        return engine.Assemble(asm, name: name).Address;
    }
}
