using Optpoline.Stress;

namespace Optpoline.Tests.Learning;

/// <summary>Misses the learner compares stay meaningful when a promotion makes its own loop faster.</summary>
[NonParallelizable]
public sealed class SamplingRateTests
{
    [Test]
    public void A_site_whose_promotion_speeds_up_its_own_loop_stays_promoted()
    {
        // One thread calls one Zipf-16 site as fast as it can: promoted, its 8 hottest targets take 80 %
        // of the calls and the loop runs about 3x faster, so the tail misses 3x as often per epoch as the
        // all-fallback rate said. That is no phase change (it relearned every 4 epochs before).
        using var engine = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, EpochInterval = TimeSpan.FromMilliseconds(10) } });
        using var workload = new LearningWorkload(engine, siteCount: 1, targetCount: 16);
        var h = Enumerable.Range(1, 16).Sum(k => 1.0 / k);
        workload.SetPhase([.. Enumerable.Range(0, 16).Select(k => (k, 1.0 / ((k + 1) * h)))]);
        workload.Start(callerThreads: 1);
        Thread.Sleep(2000);
        workload.Stop();
        var site = workload.Sites[0];
        TestContext.Out.WriteLine($"{site}: {site.PatchCount} patches in 2 s; {engine.GetLearningState(site)}");
        Assert.That(site.Targets, Has.Count.EqualTo(8));
        Assert.That(site.PatchCount, Is.LessThanOrEqualTo(12), "promoted once (a few patches), then left alone");
        Assert.That(workload.WrongCalls, Is.Zero);
    }
}
