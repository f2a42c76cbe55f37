using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Sites;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Support;

/// <summary>
/// Emits target functions that return a checksum of every register a site must not clobber (all GPRs
/// but rsp and r11) and of two stack arguments, mixed with the target's id; and a driver per site
/// that loads those values, puts the target in the site's register and runs the site.
/// </summary>
internal static unsafe class ChecksumCode
{
    /// <summary>Slots of the driver's input block: 14 registers (in <see cref="SiteRegisters.All"/> order), 2 stack arguments, the target.</summary>
    public const int StackArgIndex = 14;
    public const int TargetIndex = 16;
    public const int BlockLength = 17;

    public static ulong[] EmitTargets(OptpolineEngine engine, int count)
    {
        var targets = new ulong[count];
        for (var k = 0; k < count; k++)
        {
            var asm = new Assembler(64);
            asm.mov(r11, (ulong)(k + 1) * 0x1000_0001UL);
            foreach (var register in SiteRegisters.All)
            {
                asm.imul(r11, r11, 31);
                asm.add(r11, new AssemblerRegister64(register));
            }

            for (var s = 0; s < 2; s++)
            {
                asm.imul(r11, r11, 31);
                asm.add(r11, __qword_ptr[rsp + (8 * (s + 1))]);
            }

            asm.mov(rax, r11);
            asm.ret();
            targets[k] = engine.Assemble(asm).Address;
        }

        return targets;
    }

    public static ulong Expected(int targetIndex, ulong target, Register siteRegister, ReadOnlySpan<ulong> block)
    {
        unchecked
        {
            var acc = (ulong)(targetIndex + 1) * 0x1000_0001UL;
            for (var i = 0; i < SiteRegisters.All.Count; i++)
            {
                acc = (acc * 31) + (SiteRegisters.All[i] == siteRegister ? target : block[i]);
            }

            acc = (acc * 31) + block[StackArgIndex];
            acc = (acc * 31) + block[StackArgIndex + 1];
            return acc;
        }
    }

    /// <summary>A host function <c>ulong drive(ulong* block)</c> that runs <paramref name="site"/> (inline) or calls <paramref name="outlineEntry"/>.</summary>
    public static CodeBlock EmitDriver(OptpolineEngine engine, Register siteRegister, InlineSite? site, ulong outlineEntry = 0)
    {
        var asm = new Assembler(64);
        var saved = new[] { rbx, rbp, r12, r13, r14, r15 };
        foreach (var register in saved)
        {
            asm.push(register);
        }

        asm.mov(r11, rdi);
        asm.sub(rsp, 8);
        asm.push(__qword_ptr[r11 + (8 * (StackArgIndex + 1))]);
        asm.push(__qword_ptr[r11 + (8 * StackArgIndex)]);
        for (var i = 0; i < SiteRegisters.All.Count; i++)
        {
            asm.mov(new AssemblerRegister64(SiteRegisters.All[i]), __qword_ptr[r11 + (8 * i)]);
        }

        asm.mov(new AssemblerRegister64(siteRegister), __qword_ptr[r11 + (8 * TargetIndex)]);
        if (site is not null)
        {
            site.Emit(asm);
        }
        else
        {
            asm.call(outlineEntry);
        }

        asm.add(rsp, 24);
        foreach (var register in Enumerable.Reverse(saved))
        {
            asm.pop(register);
        }

        asm.ret();
        return engine.Assemble(asm);
    }

    /// <summary>Runs a driver with fresh pseudo-random register values; returns (result, expected).</summary>
    public static (ulong Actual, ulong Expected) Run(CodeBlock driver, Register siteRegister, int targetIndex, ulong target, Random random)
    {
        var block = stackalloc ulong[BlockLength];
        for (var i = 0; i < BlockLength; i++)
        {
            block[i] = (ulong)random.NextInt64();
        }

        block[TargetIndex] = target;
        var actual = ((delegate* unmanaged<ulong*, ulong>)driver.Address)(block);
        return (actual, Expected(targetIndex, target, siteRegister, new ReadOnlySpan<ulong>(block, BlockLength)));
    }
}
