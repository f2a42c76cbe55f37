using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Stress;

/// <summary>
/// The native loop both workloads run, <c>void loop(ulong iterations, ulong* tables, ulong* wrongOut)</c>:
/// on iteration i, for every site j, it loads <c>tables[j * tableLength + i % tableLength]</c> into the
/// site's register, runs the site (which calls a <see cref="CheckingTarget"/>), and adds RAX, the
/// target's verdict, to the wrong-call count it stores at the end. Loop state lives in rbx and r12-r15,
/// so any other register but rsp and r11 can carry a target.
/// </summary>
internal static unsafe class SiteLoop
{
    /// <param name="engine">Where the loop is assembled.</param>
    /// <param name="siteCount">Sites per iteration.</param>
    /// <param name="tableLength">Entries per site's table, a power of two.</param>
    /// <param name="registerOf">The register site j dispatches on.</param>
    /// <param name="emitSite">Emits site j (its target is in <paramref name="registerOf"/>(j)).</param>
    public static delegate* unmanaged<ulong, ulong*, ulong*, void> Emit(
        OptpolineEngine engine, int siteCount, int tableLength, Func<int, Register> registerOf, Action<Assembler, int> emitSite)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        var saved = new[] { rbx, rbp, r12, r13, r14, r15 };
        foreach (var register in saved)
        {
            asm.push(register);
        }

        asm.sub(rsp, 8);                // 16-byte aligned; the slot keeps wrongOut
        asm.mov(__qword_ptr[rsp], rdx);
        asm.mov(r12, rsi);
        asm.mov(r13, rdi);
        asm.xor(r14d, r14d);
        asm.xor(r15d, r15d);
        asm.Label(ref top);
        asm.mov(rbx, r14);
        asm.and(ebx, tableLength - 1);
        for (var j = 0; j < siteCount; j++)
        {
            asm.mov(new AssemblerRegister64(registerOf(j)), __qword_ptr[r12 + (rbx * 8) + (j * tableLength * 8)]);
            emitSite(asm, j);
            asm.add(r15, rax);
        }

        asm.inc(r14);
        asm.cmp(r14, r13);
        asm.jb(top);
        asm.mov(rax, __qword_ptr[rsp]);
        asm.mov(__qword_ptr[rax], r15);
        asm.add(rsp, 8);
        foreach (var register in Enumerable.Reverse(saved))
        {
            asm.pop(register);
        }

        asm.ret();
        return (delegate* unmanaged<ulong, ulong*, ulong*, void>)engine.Assemble(asm).Address;
    }
}
