using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Stress;

/// <summary>
/// The native loop both workloads run, <c>void loop(ulong iterations, ulong* tables, ulong* wrongOut)</c>:
/// on iteration i, for every site j, it loads <c>tables[j * tableLength + i % tableLength]</c> into the
/// site's register, runs the site (which calls a <see cref="CheckingTarget.EmitTicketed"/> target), and
/// counts the call as wrong when the target's verdict says so, or when the site called no target or two
/// (the ticket at the top of its frame is not consumed exactly once), on every register. Loop state
/// lives in rbx and r12-r15, so any other register but rsp and r11 can carry a target.
/// </summary>
internal static unsafe class SiteLoop
{
    /// <param name="engine">Where the loop is assembled.</param>
    /// <param name="siteCount">Sites per iteration.</param>
    /// <param name="tableLength">Entries per site's table, a power of two.</param>
    /// <param name="registerOf">The register site j dispatches on.</param>
    /// <param name="emitSite">Emits site j (its target is in <paramref name="registerOf"/>(j)).</param>
    public static delegate* unmanaged<ulong, ulong*, ulong*, void> Emit(
        OptpolineEngine engine, int siteCount, int tableLength, Func<int, Register> registerOf, Action<Assembler, int> emitSite, bool ticketed = true)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        var saved = new[] { rbx, rbp, r12, r13, r14, r15 };
        foreach (var register in saved)
        {
            asm.push(register);
        }

        asm.sub(rsp, 24);               // 16-byte aligned: [rsp] the call's ticket, [rsp+8] wrongOut
        asm.mov(__qword_ptr[rsp + 8], rdx);
        asm.mov(r12, rsi);
        asm.mov(r13, rdi);
        asm.xor(r14d, r14d);
        asm.xor(r15d, r15d);
        asm.Label(ref top);
        asm.mov(rbx, r14);
        asm.and(ebx, tableLength - 1);
        for (var j = 0; j < siteCount; j++)
        {
            if (!ticketed)
            {
                // The lighter loop (the learning workloads, which time convergence): RAX, the verdict of
                // a CheckingTarget.Emit target, is added as it is.
                asm.mov(new AssemblerRegister64(registerOf(j)), __qword_ptr[r12 + (rbx * 8) + (j * tableLength * 8)]);
                emitSite(asm, j);
                asm.add(r15, rax);
                continue;
            }

            // The target consumes the ticket and overwrites eax with its verdict; a site that calls
            // nothing leaves both (eax 1, or the target's address in rax for rax sites).
            asm.mov(__qword_ptr[rsp], 1);
            asm.mov(eax, 1);
            asm.mov(new AssemblerRegister64(registerOf(j)), __qword_ptr[r12 + (rbx * 8) + (j * tableLength * 8)]);
            emitSite(asm, j);
            asm.test(rax, rax);
            asm.setne(al);
            asm.movzx(eax, al);
            asm.add(r15, rax);
            asm.cmp(__qword_ptr[rsp], 0);
            asm.setne(al);
            asm.movzx(eax, al);
            asm.add(r15, rax);
        }

        asm.inc(r14);
        asm.cmp(r14, r13);
        asm.jb(top);
        asm.mov(rax, __qword_ptr[rsp + 8]);
        asm.mov(__qword_ptr[rax], r15);
        asm.add(rsp, 24);
        foreach (var register in Enumerable.Reverse(saved))
        {
            asm.pop(register);
        }

        asm.ret();
        return (delegate* unmanaged<ulong, ulong*, ulong*, void>)engine.Assemble(asm).Address;
    }
}
