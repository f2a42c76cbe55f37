using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tests.Support;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Patcher;

/// <summary>
/// Invariant 5 for a thread whose interrupted context sits in a slot's window while it runs another
/// signal handler (review finding F1): the grace period must hold for that outer context, not for the
/// frame a signal happens to land in.
/// </summary>
[NonParallelizable]
public sealed unsafe class NestedSignalTests
{
    // Control block of the host loop: [0] target to load, [1] wrong calls, [2] stop, [3] calls.
    private const int Current = 0;
    private const int Wrong = 1;
    private const int Stop = 2;
    private const int Calls = 3;

    [Test]
    public void A_thread_parked_in_another_signal_handler_never_calls_the_new_target_with_the_old_value()
    {
        var wrong = RepromoteWhileParked(restartable: true, out var mechanism);
        Assert.That(mechanism, Is.EqualTo("in use"), "restartable sequences are available here");
        Assert.That(wrong, Is.Zero, "the outer context called t1 with RAX == t0");
    }

    [Test]
    public void The_same_test_catches_a_grace_period_made_of_thread_flushes_alone()
    {
        // The broken variant: with restartable windows turned off, the flush handler acknowledges from
        // inside the host's handler, and the parked outer context calls the new target.
        var wrong = RepromoteWhileParked(restartable: false, out _);
        Assert.That(wrong, Is.EqualTo(1));
    }

    private static ulong RepromoteWhileParked(bool restartable, out string mechanism)
    {
        var spinFlag = (byte*)NativeMemory.AllocZeroed(64);
        var control = (ulong*)NativeMemory.AllocZeroed(64);
        using var engine = new OptpolineEngine(new EngineOptions
        {
            SlotWindowSpinFlag = (ulong)spinFlag,
            Patching = new Optpoline.Patcher.PatcherOptions { UseRestartableSequences = restartable },
        });
        mechanism = engine.Scheduler.Patcher.RestartableSequencesUnavailable ?? "in use";
        var t0 = CheckingTarget.Emit(engine, Register.RAX, "t0");
        var t1 = CheckingTarget.Emit(engine, Register.RAX, "t1");
        var site = engine.CreateInlineSite(Register.RAX, 1, "parked");
        var loop = EmitLoop(engine, site);
        site.Promote([t0]);
        control[Current] = t0;
        var slot = site.Slots[0];
        TestContext.Out.WriteLine($"rseq: {engine.Scheduler.Patcher.RestartableSequencesUnavailable ?? "in use"}; arm 0x{slot.Arm:X}, start 0x{slot.Start:X}, restart 0x{slot.Restart:X}");

        // Park the caller inside the host handler while its outer context is in the window (or wherever
        // the kernel moved that context to, in the site's own stub).
        using var host = new HostSignal(engine, HostSignal.SigRtMin() + 10, (slot.Start + 1, slot.Call + 1),
            (site.Stub.Address, site.Stub.Address + (ulong)site.Stub.Size));
        *spinFlag = 1;
        var (caller, tid) = StartCaller(loop, control);
        try
        {
            Assert.That(host.ParkThread(tid, TimeSpan.FromSeconds(5)), Is.True, "the caller parks in the host handler");
            *spinFlag = 0;   // when its outer context resumes, it goes on to the slot's call

            // Repromote while the caller is parked: the grace period must not count it as outside the window.
            var promoted = site.PromoteAsync([t1]);
            Assert.That(promoted.Wait(TimeSpan.FromSeconds(10)), Is.True, "the repromotion completes");
            Assert.That(slot.CallTarget, Is.EqualTo(t1));
        }
        finally
        {
            *spinFlag = 0;
            host.Release();
            StopCaller(caller, control);
        }

        return control[Wrong];
    }

    [Test]
    public void A_thread_parked_in_another_signal_handler_never_resumes_in_a_reused_chain()
    {
        var wrong = ReuseChainWhileParked(restartable: true);
        Assert.That(wrong, Is.Zero, "the outer context followed the reused chain's je with RAX == t0");
    }

    [Test]
    public void The_same_test_catches_chains_freed_after_a_thread_flush_alone()
    {
        Assert.That(ReuseChainWhileParked(restartable: false), Is.EqualTo(1));
    }

    /// <summary>
    /// A site without inline slots calls chain C0 = [t0]; the caller is parked in a host handler with
    /// its outer context at C0's <c>je t0</c> (flags: equal), or wherever the kernel moved it. C0 is
    /// retired (promote t1), freed after the next grace period, and its memory goes to C2 = [t2]: the
    /// same layout, so an outer context resumed there takes <c>je t2</c> with RAX == t0.
    /// </summary>
    private static ulong ReuseChainWhileParked(bool restartable)
    {
        var control = (ulong*)NativeMemory.AllocZeroed(64);
        using var engine = new OptpolineEngine(new EngineOptions
        {
            Patching = new Optpoline.Patcher.PatcherOptions { UseRestartableSequences = restartable },
        });
        var t0 = CheckingTarget.Emit(engine, Register.RAX, "t0");
        var t1 = CheckingTarget.Emit(engine, Register.RAX, "t1");
        var t2 = CheckingTarget.Emit(engine, Register.RAX, "t2");
        var site = engine.CreateInlineSite(Register.RAX, 0, "chained");
        var loop = EmitLoop(engine, site);
        site.Promote([t0]);
        control[Current] = t0;
        var c0 = site.Chain!.Block;
        var bytes = c0.GetExecutableSpan().ToArray();
        var decoder = Decoder.Create(64, new ByteArrayCodeReader(bytes), c0.Address);
        var je = 0UL;
        while (decoder.IP < c0.Address + (ulong)bytes.Length && je == 0)
        {
            var instruction = decoder.Decode();
            je = instruction.Code == Code.Je_rel32_64 ? instruction.IP : 0;
        }

        Assert.That(je, Is.Not.Zero);
        var restart = site.Chain.Slot is { } slot ? (ulong)Marshal.ReadInt64((nint)slot.Descriptor, 24) : 0;
        using var host = new HostSignal(engine, HostSignal.SigRtMin() + 10, (je, je + 1), (restart, restart == 0 ? 0 : restart + 5));
        var (caller, tid) = StartCaller(loop, control);
        try
        {
            Assert.That(host.ParkThread(tid, TimeSpan.FromSeconds(20)), Is.True, "the caller parks at the je (or at the chains' restart)");
            Assert.That(site.PromoteAsync([t1]).Wait(TimeSpan.FromSeconds(10)), Is.True);
            Assert.That(SpinWait.SpinUntil(() => engine.Scheduler.RetiredChainCount == 0, 10_000), Is.True, "C0 is freed after a grace period");
            Assert.That(site.PromoteAsync([t2]).Wait(TimeSpan.FromSeconds(10)), Is.True);
            Assert.That(site.Chain!.Block.Address, Is.EqualTo(c0.Address), "C2 took C0's memory");
        }
        finally
        {
            host.Release();
            StopCaller(caller, control);
        }

        return control[Wrong];
    }

    /// <summary>Runs the loop on a new thread; returns it with its kernel thread id.</summary>
    private static (Thread Caller, int Tid) StartCaller(ulong loop, ulong* control)
    {
        var tid = 0;
        var caller = new Thread(() =>
        {
            Volatile.Write(ref tid, HostSignal.Gettid());
            ((delegate* unmanaged<ulong*, void>)loop)(control);
        }) { IsBackground = true };
        caller.Start();
        SpinWait.SpinUntil(() => Volatile.Read(ref tid) != 0);
        return (caller, tid);
    }

    /// <summary>Lets the caller make a few more calls (what a released outer context does), then stops it.</summary>
    private static void StopCaller(Thread caller, ulong* control)
    {
        var calls = Volatile.Read(ref control[Calls]);
        SpinWait.SpinUntil(() => Volatile.Read(ref control[Calls]) > calls + 2, 5000);
        Volatile.Write(ref control[Stop], 1);
        Assert.That(caller.Join(TimeSpan.FromSeconds(5)), Is.True);
    }

    /// <summary><c>loop(ulong* control)</c>: load the target, call through the site, count what the target says, until stop.</summary>
    private static ulong EmitLoop(OptpolineEngine engine, InlineSite site)
    {
        var asm = new Assembler(64);
        var top = asm.CreateLabel();
        asm.push(rbx);
        asm.mov(rbx, rdi);
        asm.Label(ref top);
        asm.mov(rax, __qword_ptr[rbx + (8 * Current)]);
        site.Emit(asm);
        asm.add(__qword_ptr[rbx + (8 * Wrong)], rax);
        asm.inc(__qword_ptr[rbx + (8 * Calls)]);
        asm.cmp(__qword_ptr[rbx + (8 * Stop)], 0);
        asm.je(top);
        asm.pop(rbx);
        asm.ret();
        return engine.Assemble(asm, name: "parked_loop").Address;
    }
}
