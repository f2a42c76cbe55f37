using Optpoline.Learning;
using Optpoline.Stress;

namespace Optpoline.Tests.Learning;

/// <summary>
/// The engine learns by itself: 1000 sites called by two threads through the phases mono A, mono B,
/// 90/10, uniform 8, megamorphic 256, mono C; every call checked, convergence counted in epochs of the
/// default length (100 ms) at the default sample period (64).
/// </summary>
/// <remarks>
/// Asserted: no wrong call ever; at least 90 % of the sites on exactly the phase's hot set within 12
/// epochs. Measured, every phase converges for 99-100 % of the sites within 1-4 epochs, also inside the
/// full suite. Epochs-to-converge is printed; its acceptance (5 epochs) belongs to the Learning benchmark.
/// </remarks>
[NonParallelizable]
public sealed class LearningEndToEndTests
{
    private const int Sites = 1000;

    private static readonly (string Name, (int Target, double Share)[] Weights, int Stride, int Expected)[] Phases =
    [
        ("mono A", [(0, 1.0)], 1, 1),
        ("mono B", [(100, 1.0)], 1, 1),
        ("90/10", [(10, 0.9), (20, 0.1)], 1, 2),
        ("uniform 8", [.. Enumerable.Range(0, 8).Select(i => (30 + i, 0.125))], 1, 8),
        ("megamorphic 256", [.. Enumerable.Range(0, 256).Select(i => (i, 1.0 / 256))], 0, 0),
        ("mono C", [(200, 1.0)], 1, 1),
    ];

    [Test]
    public void A_thousand_sites_follow_every_phase_with_no_wrong_call()
    {
        using var engine = NewEngine();
        using var workload = new LearningWorkload(engine, Sites);
        try
        {
            RunPhases(engine, workload);
        }
        finally
        {
            workload.Stop();
        }

        TestContext.Out.WriteLine($"{workload.Calls:N0} calls, {workload.WrongCalls} wrong, {engine.PatchStatistics.Patches:N0} patches, {engine.GracePeriods} grace periods, {engine.LostSamples:N0} samples lost");
        Assert.That(workload.WrongCalls, Is.Zero);
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    /// <summary>
    /// After the last phase has converged, 10 more epochs: no converged site is patched again. (This
    /// failed about one run in six until the learner let the epoch after a promotion settle: promotions
    /// land after the next grace period, and the misses before that made sites relearn.)
    /// </summary>
    [Test]
    public void Converged_sites_are_not_patched_again_while_the_workload_is_steady()
    {
        using var engine = NewEngine();
        using var workload = new LearningWorkload(engine, Sites);
        try
        {
            RunPhases(engine, workload);
            var last = Phases[^1];
            var settled = workload.Sites
                .Select((site, j) => (site, j))
                .Where(x => !x.site.IsPending && x.site.Targets.SequenceEqual(new[] { workload.TargetFor(x.j, last.Weights[0].Target, last.Stride) }))
                .Select(x => (x.site, x.site.PatchCount))
                .ToList();
            for (var i = 0; i < 10; i++)
            {
                Thread.Sleep(100);
                engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10));
            }

            Assert.That(settled, Has.Count.GreaterThanOrEqualTo(Sites * 9 / 10));
            Assert.That(
                settled.Where(x => x.site.PatchCount != x.PatchCount).Select(x => $"{x.site.Name} ({engine.GetLearningState(x.site)})"),
                Is.Empty,
                "converged sites cause no patches");
        }
        finally
        {
            workload.Stop();
        }
    }

    private static OptpolineEngine NewEngine() => new(new EngineOptions
    {
        Learning = new LearningOptions { Enabled = true, Background = false, RingCapacity = 1 << 18 },
    });

    private static void RunPhases(OptpolineEngine engine, LearningWorkload workload)
    {
        workload.SetPhase(Phases[0].Weights, Phases[0].Stride);
        workload.Start(callerThreads: 2);
        foreach (var (name, weights, stride, expected) in Phases)
        {
            workload.SetPhase(weights, stride);
            var epochs = 0;
            var converged = 0.0;
            while (epochs < 12)
            {
                Thread.Sleep(100);
                var result = engine.LearnEpoch();
                Assert.That(result.Applied.Wait(TimeSpan.FromSeconds(10)), Is.True, $"{name}: changes applied");
                epochs++;
                converged = Converged(workload, weights, stride, expected);
                if (converged >= 0.99)
                {
                    break;
                }
            }

            TestContext.Out.WriteLine(
                $"{name}: {converged:P1} of sites converged after {epochs} epochs; lost samples {engine.LostSamples}, " +
                $"grace periods {engine.GracePeriods} ({engine.GracePeriodTimeouts} timed out), failed epochs {engine.LearningFailures}");
            var stragglers = workload.Sites.Select((site, j) => (site, j)).Where(x => x.site.Targets.Count != expected).Take(3)
                .Select(x => $"{x.site.Name}: [{string.Join(",", x.site.Targets.Select(t => $"{t:X}"))}] want [{string.Join(",", weights.Take(expected).Select(w => $"{workload.TargetFor(x.j, w.Target, stride):X}"))}], {engine.GetLearningState(x.site)}");
            Assert.That(converged, Is.GreaterThanOrEqualTo(0.90),
                $"{name}: sites converged after {epochs} epochs; lost {engine.LostSamples}, timeouts {engine.GracePeriodTimeouts}, " +
                $"failed epochs {engine.LearningFailures}; {string.Join(" | ", stragglers)}");
        }
    }

    /// <summary>Share of sites whose targets are the phase's hot set (any order for uniform sets).</summary>
    private static double Converged(LearningWorkload workload, (int Target, double Share)[] weights, int stride, int expected)
    {
        var ok = 0;
        for (var j = 0; j < workload.Sites.Count; j++)
        {
            var site = workload.Sites[j];
            var want = weights.Take(expected).Select(w => workload.TargetFor(j, w.Target, stride)).ToHashSet();
            if (!site.IsPending && site.Targets.Count == expected && want.SetEquals(site.Targets))
            {
                ok++;
            }
        }

        return (double)ok / workload.Sites.Count;
    }
}
