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
    public static ulong[] Sequence(Distribution distribution, ulong[] targets, int seed = 42) =>
        [.. Indices(distribution, seed).Select(i => targets[i])];

    /// <summary>
    /// The same sequence as target indices, one phase (<see cref="Distribution.Phases"/> gives its first
    /// phase, 90 % / 10 % over 0 and 1; add 2 for the second).
    /// </summary>
    public static byte[] Indices(Distribution distribution, int seed = 42)
    {
        var random = new Random(seed);
        var zipf = Enumerable.Range(1, 16).Select(k => 1.0 / k).ToArray();
        var table = new byte[TableLength];
        for (var i = 0; i < table.Length; i++)
        {
            table[i] = distribution switch
            {
                Distribution.Mono => 0,
                Distribution.Bi90 or Distribution.Phases => (byte)(random.Next(10) == 0 ? 1 : 0),
                Distribution.Uniform3 => (byte)random.Next(3),
                Distribution.Mega64 => (byte)random.Next(64),
                Distribution.Zipf16 => Pick(zipf, random.NextDouble() * zipf.Sum()),
                _ => throw new ArgumentOutOfRangeException(nameof(distribution)),
            };
        }

        return table;
    }

    private static byte Pick(double[] weights, double point)
    {
        for (var k = 0; k < weights.Length - 1; k++)
        {
            point -= weights[k];
            if (point < 0)
            {
                return (byte)k;
            }
        }

        return (byte)(weights.Length - 1);
    }

    /// <summary>Emits a loop whose body is produced by <paramref name="callForm"/> (target in RAX).</summary>
    public static delegate* unmanaged<ulong, ulong*, void> Emit(OptpolineEngine engine, Action<Assembler> callForm) =>
        (delegate* unmanaged<ulong, ulong*, void>)EmitLoop(engine, callForm, chained: false);

    /// <summary>
    /// Targets for chained loops: distinct, 64-byte aligned functions <c>ulong f(ulong x) =&gt; x + 1</c>
    /// (<c>lea rax, [rdi+1]; ret</c>, what gcc makes of the C peers' targets).
    /// </summary>
    public static ulong[] EmitIncrementTargets(OptpolineEngine engine, int count)
    {
        var targets = new ulong[count];
        for (var i = 0; i < count; i++)
        {
            var asm = new Assembler(64);
            asm.lea(rax, __qword_ptr[rdi + 1]);
            asm.ret();
            targets[i] = engine.Assemble(asm, alignment: 64).Address;
        }

        return targets;
    }

    /// <summary>
    /// Emits <c>ulong loop(ulong n, ulong* table)</c>, the C peers' loop: <c>acc = 0</c>, then n times
    /// <c>acc = table[i % 4096](acc)</c> with the target in RAX and <c>acc</c> in RDI; returns <c>acc</c>,
    /// which is n when every call ran.
    /// </summary>
    public static delegate* unmanaged<ulong, ulong*, ulong> EmitChained(OptpolineEngine engine, Action<Assembler> callForm) =>
        (delegate* unmanaged<ulong, ulong*, ulong>)EmitLoop(engine, callForm, chained: true);

    /// <summary>
    /// The loop both kinds share: n iterations over the 4096-entry table in r13, the loop head 64-byte
    /// aligned; <paramref name="chained"/> passes each call's result (RAX) to the next call (RDI) and
    /// returns the last one.
    /// </summary>
    private static ulong EmitLoop(OptpolineEngine engine, Action<Assembler> callForm, bool chained)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        asm.push(rbx);
        asm.push(r12);
        asm.push(r13);
        asm.mov(r12, rdi);
        asm.mov(r13, rsi);
        asm.xor(ebx, ebx);
        if (chained)
        {
            asm.xor(edi, edi);
        }

        // The prologue is 13 bytes (15 chained); pad so that the loop head starts at 64.
        asm.db(Enumerable.Repeat((byte)0x90, 64 - (chained ? 15 : 13)).ToArray());
        asm.Label(ref top);
        asm.mov(eax, ebx);
        asm.and(eax, TableLength - 1);
        asm.mov(rax, __qword_ptr[r13 + (rax * 8)]);
        callForm(asm);
        if (chained)
        {
            asm.mov(rdi, rax);
        }

        asm.inc(rbx);
        asm.cmp(rbx, r12);
        asm.jb(top);
        if (chained)
        {
            asm.mov(rax, rdi);
        }

        asm.pop(r13);
        asm.pop(r12);
        asm.pop(rbx);
        asm.ret();
        return engine.Assemble(asm, alignment: 64).Address;
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
