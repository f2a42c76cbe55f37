using Iced.Intel;
using Optpoline.Patcher;
using Optpoline.Tests.Support;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Patcher;

/// <summary>Invariant 5 mechanics: a flush moves threads out of critical ranges and times out cleanly.</summary>
[NonParallelizable]
public sealed unsafe class ThreadFlushTests
{
    [Test]
    public void A_flush_moves_a_thread_out_of_a_critical_range()
    {
        using var engine = new OptpolineEngine();
        var (code, loopStart, exit) = EmitSpinner(engine);
        var result = 0;
        var thread = new Thread(() => result = ((delegate* unmanaged<int>)code)()) { IsBackground = true };
        thread.Start();
        Thread.Sleep(50);
        Assert.That(thread.IsAlive, Is.True, "the thread spins in the range");

        var completed = engine.Scheduler.Patcher.Flush([new FlushRange(loopStart, exit, exit)]);
        Assert.That(completed, Is.True);
        Assert.That(thread.Join(TimeSpan.FromSeconds(5)), Is.True, "the flush moved the thread to the exit");
        Assert.That(result, Is.EqualTo(2));
    }

    [Test]
    public void A_flush_times_out_when_a_thread_blocks_the_signal()
    {
        var patcher = new LivePatcher(new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100) });
        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var thread = new Thread(() =>
        {
            NativeThreads.Block(patcher.FlushSignal);
            blocked.Set();
            release.Wait();
            NativeThreads.Unblock(patcher.FlushSignal);
        });
        thread.Start();
        blocked.Wait();
        try
        {
            var timeouts = patcher.Statistics.FlushTimeouts;
            Assert.That(patcher.Flush([]), Is.False);
            Assert.That(patcher.Statistics.FlushTimeouts - timeouts, Is.EqualTo(1));
        }
        finally
        {
            release.Set();
            thread.Join();
        }

        Assert.That(patcher.Flush([]), Is.True, "with the thread gone, flushes complete again");
    }

    [Test]
    public void A_flush_whose_signal_cannot_be_queued_does_not_complete()
    {
        // Review finding F2: tgkill fails with EAGAIN when the user's queue of real-time signals is full
        // (RLIMIT_SIGPENDING, counted across processes). Only ESRCH means the thread is gone.
        using var engine = new OptpolineEngine(new EngineOptions { Patching = new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100) } });
        var (code, loopStart, exit) = EmitSpinner(engine);
        var result = 0;
        var thread = new Thread(() => result = ((delegate* unmanaged<int>)code)()) { IsBackground = true };
        thread.Start();
        Thread.Sleep(50);
        var patcher = engine.Scheduler.Patcher;
        patcher.SignalForTest = (_, _, _) => (-1, 11 /* EAGAIN */);
        bool completed, spinning;
        try
        {
            completed = patcher.Flush([new FlushRange(loopStart, exit, exit)]);
            spinning = thread.IsAlive;
        }
        finally
        {
            // Whatever happened, the spinner leaves engine code before the engine goes.
            patcher.SignalForTest = null;
            Assert.That(patcher.Flush([new FlushRange(loopStart, exit, exit)]), Is.True);
            Assert.That(thread.Join(TimeSpan.FromSeconds(5)), Is.True);
        }

        Assert.That(completed && spinning, Is.False, "a flush that reports success must have moved the spinner");
        Assert.That(completed, Is.False);
        Assert.That(result, Is.EqualTo(2));
    }

    [Test]
    public void A_flush_signal_after_the_flush_moves_no_thread()
    {
        // Review finding F10: a late or stray flush signal must not apply the ranges of a flush that
        // has ended (their code may have been freed and reused).
        using var engine = new OptpolineEngine();
        var (code, loopStart, exit) = EmitSpinner(engine);
        var patcher = engine.Scheduler.Patcher;
        var first = new Thread(() => ((delegate* unmanaged<int>)code)()) { IsBackground = true };
        first.Start();
        Thread.Sleep(20);
        Assert.That(patcher.Flush([new FlushRange(loopStart, exit, exit)]), Is.True);
        Assert.That(first.Join(TimeSpan.FromSeconds(5)), Is.True);

        var tid = 0;
        var result = 0;
        var second = new Thread(() =>
        {
            Volatile.Write(ref tid, HostSignal.Gettid());
            result = ((delegate* unmanaged<int>)code)();
        }) { IsBackground = true };
        second.Start();
        SpinWait.SpinUntil(() => Volatile.Read(ref tid) != 0);
        Thread.Sleep(20);
        Assert.That(NativeThreads.Tgkill(Environment.ProcessId, tid, patcher.FlushSignal), Is.Zero);
        Thread.Sleep(100);
        Assert.That(second.IsAlive, Is.True, "the stray signal left the spinner where it was");
        Assert.That(patcher.Flush([new FlushRange(loopStart, exit, exit)]), Is.True);
        Assert.That(second.Join(TimeSpan.FromSeconds(5)), Is.True);
        Assert.That(result, Is.EqualTo(2));
    }

    [Test]
    public void A_wrapped_flush_generation_is_not_acknowledged_in_advance()
    {
        // Review finding F12: the acknowledgement slots start at 0, so generation 0 must never be used.
        var patcher = new LivePatcher(new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100) });
        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var thread = new Thread(() =>
        {
            NativeThreads.Block(patcher.FlushSignal);
            blocked.Set();
            release.Wait();
            NativeThreads.Unblock(patcher.FlushSignal);
        });
        thread.Start();
        blocked.Wait();
        var saved = patcher.Runtime.FlushGeneration;
        try
        {
            lock (patcher.Runtime.FlushLock)
            {
                patcher.Runtime.FlushGeneration = uint.MaxValue;
            }

            Assert.That(patcher.Flush([]), Is.False, "a thread that blocks the signal never acknowledged");
        }
        finally
        {
            release.Set();
            thread.Join();
        }
    }

    /// <summary><c>mov eax, 1; L: pause; jmp L; exit: mov eax, 2; ret</c>: spins until a flush moves it to exit.</summary>
    private static (ulong Code, ulong LoopStart, ulong Exit) EmitSpinner(OptpolineEngine engine)
    {
        var asm = new Assembler(64);
        var spin = asm.CreateLabel();
        asm.mov(eax, 1);
        asm.Label(ref spin);
        asm.pause();
        asm.jmp(spin);
        asm.mov(eax, 2);
        asm.ret();
        var code = engine.Assemble(asm);
        return (code.Address, code.Address + 5, code.Address + 9);
    }

    [Test]
    public void Overlapping_or_empty_ranges_are_refused()
    {
        var patcher = new LivePatcher();
        Assert.That(() => patcher.Flush([new FlushRange(10, 20, 0), new FlushRange(15, 30, 0)]), Throws.ArgumentException);
        Assert.That(() => patcher.Flush([new FlushRange(10, 10, 0)]), Throws.ArgumentException);
    }

    [Test]
    public void A_different_flush_signal_in_the_same_process_is_refused()
    {
        var first = new LivePatcher();
        Assert.That(() => new LivePatcher(new PatcherOptions { FlushSignal = first.FlushSignal + 1 }),
            Throws.InvalidOperationException.With.Message.Contains("once per process"));
    }
}
