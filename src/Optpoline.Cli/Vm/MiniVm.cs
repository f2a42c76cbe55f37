using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Sites;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Cli.Vm;

/// <summary>
/// The sample host of <c>optpoline run</c>: a tiny object VM whose JIT emits x86 with Iced into engine
/// code. Objects are {vtable, field}; every class has one virtual method (<c>field + K</c>), JIT-compiled.
/// The program is a loop making <see cref="Sites"/> virtual calls per iteration, each at its own call
/// site: load the receiver, its vtable, the method, and call it. The engine's variant makes each call an
/// optpoline site (with the inline slots asked for); the baseline variant calls through the retpoline
/// thunk, as a hardened JIT would. Both run the same receivers, so their results must match to the bit.
/// </summary>
internal sealed unsafe class MiniVm : IDisposable
{
    /// <summary>Rows of receivers per site; iteration i uses row i mod Rows.</summary>
    public const int Rows = 64;

    /// <summary>Loop iterations per call of a compiled program.</summary>
    public const int IterationsPerCall = 8;

    private readonly ulong* _vtables;
    private readonly ulong* _objects;
    private readonly List<nint> _tables = [];

    public MiniVm(OptpolineEngine engine, int classes, int sites, int inlineSlots)
    {
        Classes = classes;
        Sites = sites;
        _vtables = (ulong*)NativeMemory.AllocZeroed((nuint)classes * 8);
        _objects = (ulong*)NativeMemory.AllocZeroed((nuint)classes * 16);
        for (var c = 0; c < classes; c++)
        {
            var method = new Assembler(64);
            method.mov(rax, __qword_ptr[rdi + 8]);
            method.add(rax, Constant(c));
            method.ret();
            _vtables[c] = engine.Assemble(method, name: $"vm_class{c}_method").Address;
            _objects[2 * c] = (ulong)(_vtables + c);
            _objects[(2 * c) + 1] = (ulong)((c * 7) + 1);
        }

        var sitesList = new List<InlineSite>(sites);
        Optimized = Compile(engine, "vm_program", (asm, j) =>
        {
            var site = engine.CreateInlineSite(Register.RAX, inlineSlots, $"vm_call{j}");
            site.Emit(asm);
            sitesList.Add(site);
        });
        CallSites = sitesList;
        var retpoline = engine.GetThunk(Register.RAX, FallbackKind.Retpoline);
        Baseline = Compile(engine, "vm_program_retpoline", (asm, _) => asm.call(retpoline));
    }

    public int Classes { get; }

    public int Sites { get; }

    /// <summary>The program with optpoline sites.</summary>
    public delegate* unmanaged<ulong*, ulong, ulong, ulong> Optimized { get; }

    /// <summary>The same program calling through the retpoline thunk.</summary>
    public delegate* unmanaged<ulong*, ulong, ulong, ulong> Baseline { get; }

    /// <summary>The optimized program's sites, in call order.</summary>
    public IReadOnlyList<InlineSite> CallSites { get; }

    /// <summary>
    /// Lays out receivers: <paramref name="classOf"/>(site, row) picks the class of site j's receiver
    /// in row r. Returns the table and, per starting row, the checksum a program call of
    /// <see cref="IterationsPerCall"/> iterations from that row must return.
    /// </summary>
    public (nint Table, ulong[] Expected) Layout(Func<int, int, int> classOf)
    {
        var table = (ulong*)NativeMemory.AlignedAlloc((nuint)(Rows * Sites * 8), 64);
        _tables.Add((nint)table);
        var rows = new ulong[Rows];
        for (var r = 0; r < Rows; r++)
        {
            for (var j = 0; j < Sites; j++)
            {
                var c = classOf(j, r);
                table[(r * Sites) + j] = (ulong)(_objects + (2 * c));
                rows[r] += (ulong)((c * 7) + 1) + (ulong)Constant(c);
            }
        }

        var expected = new ulong[Rows];
        for (var first = 0; first < Rows; first++)
        {
            for (var i = 0; i < IterationsPerCall; i++)
            {
                expected[first] += rows[(first + i) % Rows];
            }
        }

        return ((nint)table, expected);
    }

    public void Dispose()
    {
        foreach (var table in _tables)
        {
            NativeMemory.AlignedFree((void*)table);
        }

        NativeMemory.Free(_vtables);
        NativeMemory.Free(_objects);
    }

    private static int Constant(int c) => (c + 1) * 1_000_003;

    /// <summary>
    /// <c>ulong program(ulong* table, ulong first, ulong end)</c>: for i in [first, end), for every site
    /// j, calls the method of <c>table[(i mod Rows) * Sites + j]</c> and sums the results.
    /// </summary>
    private delegate* unmanaged<ulong*, ulong, ulong, ulong> Compile(OptpolineEngine engine, string name, Action<Assembler, int> call)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        var saved = new[] { rbx, r12, r13, r14, r15 };
        foreach (var register in saved)
        {
            asm.push(register);   // 5 pushes: rsp is 16-byte aligned at every call below
        }

        asm.mov(r12, rdi);
        asm.mov(r15, rsi);        // iteration
        asm.mov(r13, rdx);        // end
        asm.xor(r14d, r14d);      // checksum
        asm.Label(ref top);
        asm.mov(rbx, r15);
        asm.and(ebx, Rows - 1);
        asm.imul(rbx, rbx, Sites * 8);
        asm.add(rbx, r12);
        for (var j = 0; j < Sites; j++)
        {
            asm.mov(rdi, __qword_ptr[rbx + (j * 8)]);   // the receiver
            asm.mov(rax, __qword_ptr[rdi]);             // its vtable
            asm.mov(rax, __qword_ptr[rax]);             // the method
            call(asm, j);                               // the virtual call
            asm.add(r14, rax);
        }

        asm.inc(r15);
        asm.cmp(r15, r13);
        asm.jb(top);
        asm.mov(rax, r14);
        foreach (var register in Enumerable.Reverse(saved))
        {
            asm.pop(register);
        }

        asm.ret();
        return (delegate* unmanaged<ulong*, ulong, ulong, ulong>)engine.Assemble(asm, name: name).Address;
    }
}
