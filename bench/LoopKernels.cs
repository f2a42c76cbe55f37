using Iced.Intel;
using Optpoline.Memory;
using Optpoline.Sites;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Bench;

/// <summary>
/// Native loop kernels, <c>void loop(ulong n, ulong* table)</c>: each iteration loads the next target
/// of a 4096-entry table into RAX and runs one call form, so every form pays the same loop overhead.
/// The loop head is 64-byte aligned.
/// </summary>
internal static unsafe class LoopKernels
{
    public const int TableLength = 4096;

    /// <summary>Targets: distinct, 64-byte aligned functions that just return.</summary>
    public static ulong[] EmitTargets(OptpolineEngine engine, int count)
    {
        var targets = new ulong[count];
        for (var i = 0; i < count; i++)
        {
            var asm = new Assembler(64);
            asm.ret();
            targets[i] = engine.Assemble(asm, alignment: 64).Address;
        }

        return targets;
    }

    /// <summary>A pseudo-random (seeded) sequence of targets following <paramref name="distribution"/>.</summary>
    public static ulong[] Sequence(Distribution distribution, ulong[] targets, int seed = 42)
    {
        var random = new Random(seed);
        var table = new ulong[TableLength];
        for (var i = 0; i < table.Length; i++)
        {
            table[i] = distribution switch
            {
                Distribution.Mono => targets[0],
                Distribution.Bi90 => random.Next(10) == 0 ? targets[1] : targets[0],
                Distribution.Uniform3 => targets[random.Next(3)],
                Distribution.Mega64 => targets[random.Next(64)],
                _ => throw new ArgumentOutOfRangeException(nameof(distribution)),
            };
        }

        return table;
    }

    /// <summary>Emits a loop whose body is produced by <paramref name="callForm"/> (target in RAX).</summary>
    public static delegate* unmanaged<ulong, ulong*, void> Emit(OptpolineEngine engine, Action<Assembler> callForm)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        asm.push(rbx);
        asm.push(r12);
        asm.push(r13);
        asm.mov(r12, rdi);
        asm.mov(r13, rsi);
        asm.xor(ebx, ebx);
        // Prologue is 13 bytes; pad so that the loop head starts at 64.
        asm.db(Enumerable.Repeat((byte)0x90, 64 - 13).ToArray());
        asm.Label(ref top);
        asm.mov(eax, ebx);
        asm.and(eax, TableLength - 1);
        asm.mov(rax, __qword_ptr[r13 + (rax * 8)]);
        callForm(asm);
        asm.inc(rbx);
        asm.cmp(rbx, r12);
        asm.jb(top);
        asm.pop(r13);
        asm.pop(r12);
        asm.pop(rbx);
        asm.ret();
        var block = engine.Assemble(asm, alignment: 64);
        return (delegate* unmanaged<ulong, ulong*, void>)block.Address;
    }

    /// <summary>An inline site on RAX with <paramref name="slots"/> slots, emitted by the loop.</summary>
    public static delegate* unmanaged<ulong, ulong*, void> EmitSite(OptpolineEngine engine, int slots, out InlineSite site)
    {
        var created = engine.CreateInlineSite(Register.RAX, slots);
        site = created;
        return Emit(engine, created.Emit);
    }

    public static ulong* Pin(ulong[] table)
    {
        var native = (ulong*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(table.Length * 8), 64);
        table.CopyTo(new Span<ulong>(native, table.Length));
        return native;
    }
}
