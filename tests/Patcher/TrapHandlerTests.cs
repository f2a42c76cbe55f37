using Iced.Intel;
using Optpoline.Patcher;
using Optpoline.Patcher.Native;
using Optpoline.Tests.Support;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Patcher;

/// <summary>Invariant 4: the trap handler preserves control flow and passes on traps that are not ours.</summary>
[NonParallelizable]
public sealed unsafe class TrapHandlerTests
{
    [Test]
    public void A_foreign_int3_reaches_the_previously_installed_handler()
    {
        using var engine = new OptpolineEngine();
        var runtime = PatchRuntime.Get(engine.Scheduler.Patcher.FlushSignal);

        // A stand-in for the previous SIGTRAP action: counts its calls and returns (RIP is already past the int3).
        var counter = (long*)System.Runtime.InteropServices.NativeMemory.AllocZeroed(8);
        var asm = new Assembler(64);
        asm.mov(rax, (ulong)counter);
        asm.@lock.inc(__qword_ptr[rax]);
        asm.ret();
        var previousHandler = engine.Assemble(asm);

        var foreign = new Assembler(64);
        foreign.mov(eax, 7);
        foreign.int3();
        foreign.ret();
        var code = engine.Assemble(foreign);

        var foreignBefore = engine.PatchStatistics.ForeignTraps;
        var saved = runtime.SwapPreviousTrapHandler(previousHandler.Address);
        int result;
        try
        {
            result = ((delegate* unmanaged<int>)code.Address)();
        }
        finally
        {
            runtime.SwapPreviousTrapHandler(saved);
        }

        Assert.That(result, Is.EqualTo(7));
        var calls = *counter;
        System.Runtime.InteropServices.NativeMemory.Free(counter);
        Assert.That(calls, Is.EqualTo(1), "the previous handler ran once");
        Assert.That(engine.PatchStatistics.ForeignTraps - foreignBefore, Is.EqualTo(1));
        Assert.That(saved, Is.Not.Zero, "the .NET runtime had installed a SIGTRAP handler before ours");
    }

    [Test]
    public void A_two_byte_int3_is_passed_on_and_never_rewound_into()
    {
        // Review finding F11: `int $3` (CD 03) reports SI_KERNEL like int3, with RIP after both bytes.
        // The byte before RIP is 03, not CC; it must not be taken for a late trap of ours (RIP - 1 is
        // the middle of the instruction: `03 C3` is `add eax, ebx`).
        using var engine = new OptpolineEngine();
        var site = engine.CreateInlineSite(Register.RAX, 1);
        ChecksumCode.EmitDriver(engine, Register.RAX, site);
        site.Promote([ChecksumCode.EmitTargets(engine, 1)[0]]);   // a batch, so the engine's regions are registered
        var asm = new Assembler(64);
        asm.mov(ebx, 5);
        asm.db(0xB8, 0x07, 0x00, 0x00, 0x00, 0xCD, 0x03, 0xC3, 0xC3);   // mov eax, 7; int $3; ret; ret
        var code = engine.Assemble(asm);
        var (result, calls, foreign, stale) = RunWithCountingPreviousHandler(engine, code.Address);
        Assert.That(result, Is.EqualTo(7), "today's handler rewound RIP and ran `add eax, ebx` (12)");
        Assert.That(calls, Is.EqualTo(1), "the previous handler ran once");
        Assert.That(foreign, Is.EqualTo(1));
        Assert.That(stale, Is.Zero);
    }

    [Test]
    public void A_foreign_breakpoint_its_owner_removed_outside_engine_code_is_passed_on()
    {
        // Finding F11, second half: a debugger's int3 outside the engine's regions, removed before our
        // handler reads the byte, belongs to the debugger (the previous handler), not to us.
        using var engine = new OptpolineEngine();
        var site = engine.CreateInlineSite(Register.RAX, 1);
        ChecksumCode.EmitDriver(engine, Register.RAX, site);
        site.Promote([ChecksumCode.EmitTargets(engine, 1)[0]]);
        var page = Mmap(0, 4096, 3 /* RW */, 0x22 /* MAP_PRIVATE | MAP_ANONYMOUS */, -1, 0);
        Assert.That(page, Is.Not.EqualTo((nint)(-1)));
        try
        {
            var bytes = (byte*)page;
            new Span<byte>(bytes, 8).Clear();
            ReadOnlySpan<byte> code = [0xB8, 0x07, 0x00, 0x00, 0x00, 0xCC, 0xC3];   // mov eax, 7; int3; ret
            code.CopyTo(new Span<byte>(bytes, code.Length));
            Assert.That(Mprotect(page, 4096, 5 /* RX */), Is.Zero);
            var runtime = engine.Scheduler.Patcher.Runtime;
            var (result, calls, foreign, stale) = RunWithCountingPreviousHandler(engine, (ulong)page, whileParked: () =>
            {
                // The owner removes its breakpoint while our handler is between its table load and its byte read.
                Assert.That(Mprotect(page, 4096, 3), Is.Zero);
                bytes[5] = 0x90;
                Assert.That(Mprotect(page, 4096, 5), Is.Zero);
            });
            Assert.That(result, Is.EqualTo(7));
            Assert.That(calls, Is.EqualTo(1), "the previous handler (the breakpoint's owner) saw its trap");
            Assert.That(stale, Is.Zero);
        }
        finally
        {
            _ = Munmap(page, 4096);
        }
    }

    [Test]
    public void An_int3_armed_after_the_handler_read_the_table_is_still_ours()
    {
        // Review finding F5: the handler read the table before a new batch published one and armed this
        // address; it finds no entry, yet the byte is int3. It must look again, not chain to the runtime.
        using var engine = new OptpolineEngine();
        var asm = new Assembler(64);
        var redirect = asm.CreateLabel();
        asm.mov(eax, 1);
        asm.int3();
        asm.ret();
        asm.Label(ref redirect);
        asm.mov(eax, 9);
        asm.ret();
        var code = engine.Assemble(asm);
        var trapAt = code.Address + 5;
        var target = code.Address + 7;
        var runtime = engine.Scheduler.Patcher.Runtime;
        var table = (ulong*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(8 + 32, 64);
        table[0] = 1;
        table[1] = trapAt;
        table[2] = 0;
        table[3] = target;
        table[4] = 0;
        try
        {
            var (result, calls, _, _) = RunWithCountingPreviousHandler(engine, code.Address, whileParked: () => runtime.PublishTrapTable((nint)table));
            Assert.That(result, Is.EqualTo(9), "redirected by the table published meanwhile");
            Assert.That(calls, Is.Zero, "not chained to the previous handler");
        }
        finally
        {
            lock (runtime.PatchLock)
            {
                runtime.PublishTrapTable(0);
            }

            System.Runtime.InteropServices.NativeMemory.AlignedFree(table);
        }
    }

    /// <summary>
    /// Runs <c>int f()</c> at <paramref name="code"/> on this thread with a counting stand-in for the
    /// previous SIGTRAP action; with <paramref name="whileParked"/>, the trap handler is parked after its
    /// table load (another thread runs the action, then lets it go).
    /// </summary>
    private static (int Result, long Calls, long Foreign, long Stale) RunWithCountingPreviousHandler(OptpolineEngine engine, ulong code, Action? whileParked = null)
    {
        var runtime = engine.Scheduler.Patcher.Runtime;
        var counter = (long*)System.Runtime.InteropServices.NativeMemory.AllocZeroed(8);
        var asm = new Assembler(64);
        asm.mov(rax, (ulong)counter);
        asm.@lock.inc(__qword_ptr[rax]);
        asm.ret();
        var previousHandler = engine.Assemble(asm);
        var before = engine.PatchStatistics;
        var saved = runtime.SwapPreviousTrapHandler(previousHandler.Address);
        int result;
        Thread? helper = null;
        try
        {
            if (whileParked is not null)
            {
                Volatile.Write(ref runtime.TestPark, 1);
                helper = new Thread(() =>
                {
                    SpinWait.SpinUntil(() => Volatile.Read(ref runtime.TestPark) == 2, 5000);
                    whileParked();
                    Volatile.Write(ref runtime.TestPark, 0);
                });
                helper.Start();
            }

            result = ((delegate* unmanaged<int>)code)();
        }
        finally
        {
            Volatile.Write(ref runtime.TestPark, 0);
            helper?.Join();
            runtime.SwapPreviousTrapHandler(saved);
        }

        var after = engine.PatchStatistics;
        var calls = *counter;
        System.Runtime.InteropServices.NativeMemory.Free(counter);
        return (result, calls, after.ForeignTraps - before.ForeignTraps, after.StaleTraps - before.StaleTraps);
    }

    [System.Runtime.InteropServices.DllImport("libc.so.6", EntryPoint = "mmap")]
    private static extern nint Mmap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [System.Runtime.InteropServices.DllImport("libc.so.6", EntryPoint = "mprotect")]
    private static extern int Mprotect(nint address, nuint length, int protection);

    [System.Runtime.InteropServices.DllImport("libc.so.6", EntryPoint = "munmap")]
    private static extern int Munmap(nint address, nuint length);

    [TestCase(0)]
    [TestCase(1)]
    [TestCase(2)]
    public void A_thread_that_hits_a_patch_in_flight_takes_the_equivalent_path(int slots)
    {
        using var engine = new OptpolineEngine();
        var targets = ChecksumCode.EmitTargets(engine, 8);
        var site = engine.CreateInlineSite(Register.RSI, slots);
        var driver = ChecksumCode.EmitDriver(engine, Register.RSI, site);
        var outline = engine.CreateOutlineSite(Register.RDI);
        var outlineDriver = ChecksumCode.EmitDriver(engine, Register.RDI, site: null, outline.Entry);
        var random = new Random(3);
        var checkedCalls = 0;

        // Between the tail write and the first-byte write, the int3s are live: call through every site
        // from the patching thread itself, so each armed first byte is hit.
        engine.Scheduler.Patcher.BeforeVisible = _ =>
        {
            for (var k = 0; k < targets.Length; k++)
            {
                var (actual, expected) = ChecksumCode.Run(driver, Register.RSI, k, targets[k], random);
                Assert.That(actual, Is.EqualTo(expected), $"inline site, target {k}");
                (actual, expected) = ChecksumCode.Run(outlineDriver, Register.RDI, k, targets[k], random);
                Assert.That(actual, Is.EqualTo(expected), $"outline site, target {k}");
                checkedCalls++;
            }
        };

        var hitsBefore = engine.PatchStatistics.TrapHits;
        try
        {
            site.Promote(targets[..(slots + 2)]);
            outline.Promote(targets[..3]);
            site.Promote([.. targets[..(slots + 2)].Reverse()]);
            outline.Promote([targets[5]]);
            site.Reset();
            outline.Reset();
        }
        finally
        {
            engine.Scheduler.Patcher.BeforeVisible = null;
        }

        Assert.That(checkedCalls, Is.GreaterThan(0));
        Assert.That(engine.PatchStatistics.TrapHits - hitsBefore, Is.GreaterThanOrEqualTo(checkedCalls), "each batch arms one site, and every round of calls went through its int3");
    }
}
