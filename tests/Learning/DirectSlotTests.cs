using Optpoline.Stress;

namespace Optpoline.Tests.Learning;

/// <summary>
/// A megamorphic site skips its miss path: an inline site's first slot jumps straight to its own call to
/// the fallback thunk, a site without inline slots links its call straight to the thunk, and both sample
/// again now and then through the same call, so a phase change still brings them back to promotion.
/// Every call is checked while the sites change under two caller threads.
/// </summary>
[NonParallelizable]
public sealed class DirectSlotTests
{
    [TestCase(2, false, TestName = "Megamorphic inline sites go direct through their first slot, keep every call right and come back on a phase change")]
    [TestCase(0, false, TestName = "Megamorphic sites without inline slots link straight to the thunk, keep every call right and come back on a phase change")]
    [TestCase(0, true, TestName = "Megamorphic outline sites link their entry straight to the thunk, keep every call right and come back on a phase change")]
    public void Megamorphic_sites_go_direct_keep_every_call_right_and_come_back_on_a_phase_change(int inlineSlots, bool outline)
    {
        using var engine = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, Background = false, RingCapacity = 1 << 18 } });
        using var workload = new LearningWorkload(engine, siteCount: 200, inlineSlots: inlineSlots, outline: outline);
        var megamorphic = Enumerable.Range(0, 256).Select(i => (i, 1.0 / 256)).ToArray();
        workload.SetPhase(megamorphic, 1);
        workload.Start(callerThreads: 2);
        try
        {
            var direct = 0;
            var sampledWhileDirect = false;
            for (var epoch = 0; epoch < 40; epoch++)
            {
                Thread.Sleep(30);
                var samples = workload.Sites.Sum(s => s.SampleCount);
                var wasDirect = workload.Sites.Count(IsDirect);
                Assert.That(engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
                direct = Math.Max(direct, workload.Sites.Count(s => IsDirect(s) && CallsTheThunk(s)));
                if (wasDirect == workload.Sites.Count && workload.Sites.Sum(s => s.SampleCount) > samples)
                {
                    sampledWhileDirect = true;   // probes sample through the direct call (its own key)
                }
            }

            Assert.That(direct, Is.GreaterThanOrEqualTo(190), "megamorphic sites go direct");
            Assert.That(workload.Sites.All(s => s.Targets.Count == 0), Is.True, "and stay unpromoted");
            Assert.That(sampledWhileDirect, Is.True, "direct sites are still sampled now and then");
            Assert.That(engine.AuditCode(), Is.Empty, "direct slots decode cleanly");

            // Mono: every site comes back from the direct state and is promoted, within a probe period.
            workload.SetPhase([(7, 1.0)], 1);
            var converged = 0;
            for (var epoch = 0; epoch < 30 && converged < workload.Sites.Count; epoch++)
            {
                Thread.Sleep(30);
                Assert.That(engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
                converged = workload.Sites.Select((s, j) => (s, j)).Count(x => x.s.Targets.SequenceEqual([workload.TargetFor(x.j, 7, 1)]));
            }

            Assert.That(converged, Is.GreaterThanOrEqualTo(198), "sites leave the direct state when the phase changes");
            Assert.That(workload.Sites.Count(IsDirect), Is.LessThanOrEqualTo(2));
        }
        finally
        {
            workload.Stop();
        }

        Assert.That(workload.WrongCalls, Is.Zero);
        Assert.That(workload.Calls, Is.GreaterThan(0));
    }

    /// <summary>Direct: through the first slot for inline sites, through the out link for sites without slots.</summary>
    private static bool IsDirect(Optpoline.Sites.Site site) => site.InlineSlotCount > 0 ? site.Slots[0].Direct : site.DirectLink;

    /// <summary>Where a direct site's call goes now: the thunk (not the sampling stub of a probe).</summary>
    private static bool CallsTheThunk(Optpoline.Sites.Site site) => (site.InlineSlotCount > 0 ? site.Slots[0].CallTarget : site.OutLink!.Target) == site.Fallback;

    [TestCase(true, TestName = "Leaving a direct slot without a grace period is caught")]
    [TestCase(false, TestName = "Leaving a direct slot after a grace period keeps every call right")]
    public void Leaving_a_direct_slot(bool skipGracePeriod)
    {
        // The broken variant: without grace periods, a thread that jumped to the direct slot's call may
        // call a newly promoted target it never compared against. With the window widened by pauses, the
        // checking targets must see wrong calls (when the scheduler waits, they never do: the test above).
        using var engine = new OptpolineEngine(new EngineOptions
        {
            Learning = new LearningOptions { Enabled = true, Background = false, RingCapacity = 1 << 18 },
            UnsafeSkipGracePeriod = skipGracePeriod,
            SlotWindowPauses = 32,
            // The broken variant is the thread-flush design without its flush: with restartable windows
            // the kernel restarts a preempted or trapped thread even when no grace period runs, so the
            // missing grace period would almost never show.
            Patching = new Optpoline.Patcher.PatcherOptions { UseRestartableSequences = !skipGracePeriod },
        });
        using var workload = new LearningWorkload(engine, siteCount: 64, targetCount: 8);
        workload.SetPhase([.. Enumerable.Range(0, 8).Select(i => (i, 1.0 / 8))], 1);
        workload.Start(callerThreads: 2);
        try
        {
            var flip = 0;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var limit = TimeSpan.FromSeconds(skipGracePeriod ? 5 : 1.5);
            while (workload.WrongCalls == 0 && clock.Elapsed < limit)
            {
                // Direct, then straight to a promoted target, over and over.
                engine.PromoteAsync([.. workload.Sites.Select(s => new Optpoline.Sites.SiteUpdate(s, []) { DirectCall = s.Fallback })]).Wait();
                flip ^= 1;
                engine.PromoteAsync([.. workload.Sites.Select((s, j) => new Optpoline.Sites.SiteUpdate(s, [workload.TargetFor(j, flip, 1)]))]).Wait();
            }
        }
        finally
        {
            workload.Stop();
        }

        if (skipGracePeriod)
        {
            Assert.That(workload.WrongCalls, Is.GreaterThan(0), "the broken variant is caught");
        }
        else
        {
            Assert.That(workload.WrongCalls, Is.Zero);
            Assert.That(engine.GracePeriods, Is.GreaterThan(0));
        }
    }
}
