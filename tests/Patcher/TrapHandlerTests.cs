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
