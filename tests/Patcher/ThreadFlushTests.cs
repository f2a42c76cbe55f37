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
        // spin: pause; jmp spin   -- forever, unless a flush redirects it to `exit`.
        var asm = new Assembler(64);
        var spin = asm.CreateLabel();
        asm.mov(eax, 1);
        asm.Label(ref spin);
        asm.pause();
        asm.jmp(spin);
        asm.mov(eax, 2);   // exit: 5 bytes after the 2-byte jmp
        asm.ret();
        var code = engine.Assemble(asm);
        var loopStart = code.Address + 5;
        var exit = loopStart + 4;

        var result = 0;
        var thread = new Thread(() => result = ((delegate* unmanaged<int>)code.Address)()) { IsBackground = true };
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
