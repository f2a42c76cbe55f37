using Iced.Intel;
using Optpoline.Patcher;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Patcher;

/// <summary>Invariants 3 and 6: batches with three core syncs, shared grace periods, rollback.</summary>
[NonParallelizable]
public sealed class BatchTests
{
    [Test]
    public void A_batch_of_1000_promotions_or_demotions_costs_three_core_syncs_and_no_flush()
    {
        using var engine = new OptpolineEngine();
        var targets = ChecksumCode.EmitTargets(engine, 4);
        var sites = SiteBlock.Emit(engine, 1000);
        var before = engine.PatchStatistics;
        var graceBefore = engine.GracePeriods;
        var promote = engine.PromoteAsync([.. sites.Select(s => new SiteUpdate(s, targets[..1]))]);
        Assert.That(promote.IsCompletedSuccessfully, Is.True, "fresh slots need no grace period");
        var promoted = engine.PatchStatistics;
        Assert.That(promoted.CoreSyncs - before.CoreSyncs, Is.EqualTo(3));
        Assert.That(promoted.Batches - before.Batches, Is.EqualTo(1));
        Assert.That(promoted.Patches - before.Patches, Is.EqualTo(2000), "movabs + call per slot");

        var demote = engine.PromoteAsync([.. sites.Select(s => new SiteUpdate(s, []))]);
        Assert.That(demote.IsCompletedSuccessfully, Is.True, "demotion never waits");
        Assert.That(engine.PatchStatistics.CoreSyncs - promoted.CoreSyncs, Is.EqualTo(3));
        Assert.That(engine.GracePeriods, Is.EqualTo(graceBefore));

        // Promoting the same target back needs no grace period: a thread stuck in the slot compared against it.
        var again = engine.PromoteAsync([.. sites.Select(s => new SiteUpdate(s, targets[..1]))]);
        Assert.That(again.IsCompletedSuccessfully, Is.True);
    }

    [Test]
    public void Batch_tables_are_freed_as_their_batch_ends_when_no_trap_handler_reads_them()
    {
        using var engine = new OptpolineEngine();
        var targets = ChecksumCode.EmitTargets(engine, 1);
        var sites = SiteBlock.Emit(engine, 1000);
        var promote = sites.Select(s => new SiteUpdate(s, targets)).ToList();
        var demote = sites.Select(s => new SiteUpdate(s, [])).ToList();
        var flushesBefore = engine.PatchStatistics.Flushes;
        for (var i = 0; i < 100; i++)
        {
            // Each batch of 1000 retires a 32 KB trap table: 6.4 MB if nothing ever frees them.
            Assert.That(engine.PromoteAsync(promote).IsCompletedSuccessfully, Is.True);
            Assert.That(engine.PromoteAsync(demote).IsCompletedSuccessfully, Is.True);
        }

        Assert.That(engine.Scheduler.Patcher.RetiredTableBytes, Is.Zero, "every table was freed as its batch ended");
        Assert.That(engine.PatchStatistics.Flushes, Is.EqualTo(flushesBefore), "no thread flush was needed for that");
    }

    [Test]
    public void A_batch_table_stays_while_a_trap_handler_may_read_it()
    {
        // The broken variant would free a table whatever the handlers do; a handler in flight is simulated
        // by its reader count (what the handler increments before it loads the table pointer).
        using var engine = new OptpolineEngine();
        var targets = ChecksumCode.EmitTargets(engine, 1);
        var site = engine.CreateInlineSite(Register.RCX, 1);
        ChecksumCode.EmitDriver(engine, Register.RCX, site);
        var patcher = engine.Scheduler.Patcher;
        Assert.That(patcher.ReclaimTables(), Is.True);
        patcher.TrapReadersForTest(+1);
        try
        {
            site.Promote(targets);
            Assert.That(patcher.RetiredTableBytes, Is.GreaterThan(0), "a reader may hold the batch's table");
            Assert.That(patcher.ReclaimTables(), Is.False);
        }
        finally
        {
            patcher.TrapReadersForTest(-1);
        }

        Assert.That(patcher.ReclaimTables(), Is.True);
        Assert.That(patcher.RetiredTableBytes, Is.Zero);
    }

    [Test]
    public void A_thousand_repromotions_share_one_grace_period()
    {
        using var engine = new OptpolineEngine();
        var targets = ChecksumCode.EmitTargets(engine, 4);
        var sites = SiteBlock.Emit(engine, 1000);
        engine.PromoteAsync([.. sites.Select(s => new SiteUpdate(s, targets[..1]))]).Wait();
        var graceBefore = engine.GracePeriods;
        var before = engine.PatchStatistics;

        var repromote = engine.PromoteAsync([.. sites.Select(s => new SiteUpdate(s, [targets[1]]))]);
        Assert.That(repromote.IsCompleted, Is.False, "a new target in a used slot waits for a grace period");
        Assert.That(repromote.Wait(TimeSpan.FromSeconds(10)), Is.True);
        var after = engine.PatchStatistics;
        Assert.That(engine.GracePeriods - graceBefore, Is.EqualTo(1), "one shared grace period");
        Assert.That(after.Fences - before.Fences, Is.EqualTo(1), "one rseq fence");
        Assert.That(after.Flushes - before.Flushes, Is.Zero, "no thread flush: no chain or table waits for one");
        Assert.That(after.CoreSyncs - before.CoreSyncs, Is.EqualTo(6), "demote batch + promote batch");
        Assert.That(sites.All(s => s.Targets.SequenceEqual([targets[1]]) && !s.IsPending), Is.True);
    }

    [Test]
    public void A_timed_out_grace_period_rolls_every_waiting_site_back()
    {
        // The thread-flush fallback (no restartable windows): a thread that blocks the flush signal.
        using var engine = new OptpolineEngine(new EngineOptions { Patching = new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100), UseRestartableSequences = false } });
        var targets = ChecksumCode.EmitTargets(engine, 10);
        var site = engine.CreateInlineSite(Register.RCX, 2);
        var driver = ChecksumCode.EmitDriver(engine, Register.RCX, site);
        site.Promote(targets[..4]);
        var bytesBefore = SiteBytes(engine, site);
        var chainBefore = site.Chain!.Block.Address;

        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var blocker = new Thread(() =>
        {
            NativeThreads.Block(engine.Scheduler.Patcher.FlushSignal);
            blocked.Set();
            release.Wait();
            NativeThreads.Unblock(engine.Scheduler.Patcher.FlushSignal);
        });
        blocker.Start();
        blocked.Wait();
        try
        {
            var request = site.PromoteAsync([.. targets[4..10]]);
            Assert.That(() => request.Wait(TimeSpan.FromSeconds(10)), Throws.InstanceOf<AggregateException>().With.InnerException.TypeOf<PatchTimeoutException>());
            Assert.That(site.Targets, Is.EqualTo(targets[..4]));
            Assert.That(site.IsPending, Is.False);
            Assert.That(engine.GracePeriodTimeouts, Is.GreaterThanOrEqualTo(1));
            Assert.That(SiteBytes(engine, site), Is.EqualTo(bytesBefore), "every byte is back");
            Assert.That(site.Chain!.Block.Address, Is.EqualTo(chainBefore), "the old chain is in use again");
            for (var k = 0; k < targets.Length; k++)
            {
                var (actual, expected) = ChecksumCode.Run(driver, Register.RCX, k, targets[k], new Random(k));
                Assert.That(actual, Is.EqualTo(expected));
            }

            Assert.That(site.TryPromote([targets[9]], out var error), Is.False);
            Assert.That(error, Does.Contain("rolled back"));
        }
        finally
        {
            release.Set();
            blocker.Join();
        }

        site.Promote([targets[9]]);
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[9] }));
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void A_thread_that_blocks_every_signal_does_not_hold_up_a_repromotion()
    {
        // Review finding F13 for slots: with restartable windows, a slot's grace period is an rseq fence,
        // which needs no signal; the thread flush used to time out on such a thread and roll back.
        // The blocker runs no site (it blocks SIGTRAP too, which the default BlockedTraps = Ignore allows).
        using var engine = new OptpolineEngine(new EngineOptions { Patching = new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100) } });
        Assert.That(engine.Rseq, Is.Not.Null, engine.Scheduler.Patcher.RestartableSequencesUnavailable);
        var targets = ChecksumCode.EmitTargets(engine, 4);
        var site = engine.CreateInlineSite(Register.RCX, 1);
        var driver = ChecksumCode.EmitDriver(engine, Register.RCX, site);
        site.Promote([targets[0]]);
        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var blocker = new Thread(() =>
        {
            var old = NativeThreads.BlockAll();
            blocked.Set();
            release.Wait();
            NativeThreads.Restore(old);
        });
        blocker.Start();
        blocked.Wait();
        try
        {
            var timeouts = engine.GracePeriodTimeouts;
            Assert.That(site.PromoteAsync([targets[1]]).Wait(TimeSpan.FromSeconds(5)), Is.True, "the repromotion completes");
            Assert.That(site.Targets, Is.EqualTo(new[] { targets[1] }));
            Assert.That(engine.GracePeriodTimeouts, Is.EqualTo(timeouts), "no grace period timed out");
            var (actual, expected) = ChecksumCode.Run(driver, Register.RCX, 1, targets[1], new Random(1));
            Assert.That(actual, Is.EqualTo(expected));
        }
        finally
        {
            release.Set();
            blocker.Join();
        }
    }

    [Test]
    public void A_grace_period_that_times_out_while_patching_is_suspended_neither_patches_nor_relinks_a_freed_chain()
    {
        // Review finding F4 (thread-flush fallback: restartable windows never time out). A flush that
        // completes while patching is suspended frees the retired chain; a later timed-out flush must not
        // roll the waiting request back onto it, nor patch anything while suspended.
        using var engine = new OptpolineEngine(new EngineOptions
        {
            Patching = new PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(100), UseRestartableSequences = false },
        });
        var targets = ChecksumCode.EmitTargets(engine, 10);
        var site = engine.CreateInlineSite(Register.RCX, 1);
        var driver = ChecksumCode.EmitDriver(engine, Register.RCX, site);
        site.Promote(targets[..3]);
        var c0 = site.Chain!.Block;
        var request = site.PromoteAsync([targets[3], targets[4], targets[5]]);   // slot 0 waits; C0 is retired
        engine.PatchingSuspended = true;
        Assert.That(SpinWait.SpinUntil(() => engine.Scheduler.RetiredChainCount == 0, 5000), Is.True, "a flush completed and freed C0");
        Assert.That(engine.Code.IsLive(c0.Address, 1), Is.False);
        Assert.That(request.IsCompleted, Is.False, "the promotion waits while patching is suspended");

        var patches = engine.PatchStatistics.Patches;
        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var blocker = new Thread(() =>
        {
            NativeThreads.Block(engine.Scheduler.Patcher.FlushSignal);
            blocked.Set();
            release.Wait();
            NativeThreads.Unblock(engine.Scheduler.Patcher.FlushSignal);
        });
        blocker.Start();
        blocked.Wait();
        try
        {
            var timeouts = engine.GracePeriodTimeouts;
            Assert.That(SpinWait.SpinUntil(() => engine.GracePeriodTimeouts > timeouts, 5000), Is.True, "a flush timed out");
            Assert.That(engine.PatchStatistics.Patches, Is.EqualTo(patches), "no patch while suspended");
            Assert.That(engine.Code.IsLive(site.Chain!.Block.Address, 1), Is.True, "the site links a live chain");
        }
        finally
        {
            release.Set();
            blocker.Join();
        }

        engine.PatchingSuspended = false;
        Assert.That(request.Wait(TimeSpan.FromSeconds(10)), Is.True, "after resuming, the promotion lands");
        Assert.That(site.Targets, Is.EqualTo(targets[3..6]));
        for (var k = 0; k < targets.Length; k++)
        {
            var (actual, expected) = ChecksumCode.Run(driver, Register.RCX, k, targets[k], new Random(k));
            Assert.That(actual, Is.EqualTo(expected));
        }

        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void A_batch_is_refused_while_a_thread_blocks_SIGTRAP()
    {
        // Review finding F8: a thread that blocks SIGTRAP and reaches an armed int3 is killed with the
        // process. With BlockedTraps = Refuse, no int3 is armed while such a thread exists; the request says why.
        using var engine = new OptpolineEngine(new EngineOptions { Patching = new PatcherOptions { BlockedTraps = BlockedTrapPolicy.Refuse } });
        var targets = ChecksumCode.EmitTargets(engine, 2);
        var site = engine.CreateInlineSite(Register.RCX, 1);
        var driver = ChecksumCode.EmitDriver(engine, Register.RCX, site);
        site.Promote([targets[0]]);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var none = Optpoline.Patcher.Platform.PatcherOs.ThreadsBlocking(5);
        TestContext.Out.WriteLine($"scan of {Optpoline.Patcher.Platform.PatcherOs.ThreadIds().Count} threads: {clock.Elapsed.TotalMicroseconds:F0} us");
        Assert.That(none, Is.Empty);
        using var blocked = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var tid = 0;
        var blocker = new Thread(() =>
        {
            tid = HostSignal.Gettid();
            NativeThreads.Block(5);
            blocked.Set();
            release.Wait();
            NativeThreads.Unblock(5);
        });
        blocker.Start();
        blocked.Wait();
        Thread.Sleep(20);   // the last clean scan (the promotion above) stands for 10 ms of batches
        try
        {
            var refusals = engine.PatchStatistics.BlockedTrapRefusals;
            var bytes = SiteBytes(engine, site);
            Assert.That(() => site.Promote([targets[1]]), Throws.InstanceOf<PatchRejectedException>().With.Message.Contains($"{tid}").And.Message.Contains("block SIGTRAP"));
            Assert.That(engine.PatchStatistics.BlockedTrapRefusals - refusals, Is.GreaterThanOrEqualTo(1));
            Assert.That(SiteBytes(engine, site), Is.EqualTo(bytes), "nothing was written");
        }
        finally
        {
            release.Set();
            blocker.Join();
        }

        site.Promote([targets[1]]);
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[1] }));
        var (actual, expected) = ChecksumCode.Run(driver, Register.RCX, 1, targets[1], new Random(1));
        Assert.That(actual, Is.EqualTo(expected));
    }

    private static byte[] SiteBytes(OptpolineEngine engine, InlineSite site)
    {
        var bytes = new byte[site.InlineLength];
        engine.Code.Read(site.Address, bytes);
        return [.. bytes, .. site.Stub.GetExecutableSpan()];
    }
}
