using Optpoline.Learning;

namespace Optpoline.Tests.Learning;

/// <summary>The learning policy on synthetic, deterministic sample streams: exact decisions.</summary>
public sealed class LearnerPolicyTests
{
    private const int Site = 7;
    private const int PerEpoch = 1000;

    private static readonly ulong A = 0xA000, B = 0xB000, C = 0xC000;

    [Test]
    public void A_steady_monomorphic_site_is_promoted_in_the_first_epoch_and_then_left_alone()
    {
        var learner = NewLearner();
        Assert.That(Epoch(learner, Mono(A)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A) }));
        for (var i = 0; i < 100; i++)
        {
            Assert.That(Epoch(learner, []), Is.Empty, $"epoch {i}: a promoted site's hits are not sampled; no misses, no change");
        }
    }

    [Test]
    public void A_90_10_site_promotes_both_hottest_first() =>
        Assert.That(Epoch(NewLearner(), Mix((A, 900), (B, 100))), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A, B) }));

    [Test]
    public void A_uniform_3_site_promotes_all_three_in_target_order_on_ties() =>
        Assert.That(Epoch(NewLearner(), Mix((C, 333), (A, 333), (B, 333))), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A, B, C) }));

    [Test]
    public void A_uniform_8_site_fills_two_inline_slots_and_a_six_entry_chain()
    {
        var targets = Enumerable.Range(1, 8).Select(i => (ulong)i << 12).ToArray();
        var decisions = Epoch(NewLearner(), Mix([.. targets.Select(t => (t, 125))]));
        Assert.That(decisions, Is.EqualTo(new[] { Decision(DecisionReason.Promote, targets) }));
    }

    [Test]
    public void A_megamorphic_site_stays_on_the_fallback_and_backs_off_exponentially()
    {
        var learner = new Learner(new LearnerOptions { RelearnPeriod = 0, MaxBackoffEpochs = 16 });
        learner.AddSite(Site, 8);
        var targets = Enumerable.Range(1, 256).Select(i => (ulong)i << 12).ToArray();
        var mega = Mix([.. targets.Select(t => (t, 4))]);
        var backoffs = new List<int>();
        for (var i = 0; i < 40; i++)
        {
            Assert.That(Epoch(learner, mega), Is.Empty, $"epoch {i}");
            backoffs.Add(learner.GetState(Site)!.BackoffEpochs);
        }

        Assert.That(backoffs.Distinct(), Is.EqualTo(new[] { 1, 2, 4, 8, 16 }), "1, 2, 4, 8, 16 epochs between looks");
    }

    [Test]
    public void A_phase_change_between_monomorphic_targets_is_followed_in_two_epochs()
    {
        var learner = NewLearner();
        Assert.That(Epoch(learner, Mono(A)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A) }));
        Epoch(learner, []);
        Assert.That(Epoch(learner, Mono(B)), Is.EqualTo(new[] { Decision(DecisionReason.PhaseChange) }), "every call to B misses");
        Assert.That(Epoch(learner, Mono(B)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, B) }));
        Assert.That(Epoch(learner, []), Is.Empty);
    }

    [TestCase("mono", "90/10")]
    [TestCase("90/10", "uniform3")]
    [TestCase("uniform3", "uniform8")]
    [TestCase("uniform8", "mega")]
    [TestCase("mega", "uniform8")]
    [TestCase("uniform8", "mono")]
    [TestCase("uniform3", "mono")]
    [TestCase("mono", "mega")]
    [TestCase("mega", "mono")]
    public void Every_phase_change_converges_within_five_epochs(string from, string to)
    {
        var learner = NewLearner();
        var streams = new Dictionary<string, (ulong Target, int Count)[]>
        {
            ["mono"] = Mono(0x1000),
            ["90/10"] = Mix((0x2000, 900), (0x3000, 100)),
            ["uniform3"] = Mix((0x4000, 333), (0x5000, 333), (0x6000, 334)),
            ["uniform8"] = Mix([.. Enumerable.Range(1, 8).Select(i => ((ulong)(0x70 + i) << 12, 125))]),
            ["mega"] = Mix([.. Enumerable.Range(1, 256).Select(i => ((ulong)i << 20, 4))]),
        };
        var expected = new Dictionary<string, ulong[]>
        {
            ["mono"] = [0x1000], ["90/10"] = [0x2000, 0x3000], ["uniform3"] = [0x6000, 0x4000, 0x5000], ["mega"] = [],
            ["uniform8"] = [.. Enumerable.Range(1, 8).Select(i => (ulong)(0x70 + i) << 12)],
        };

        ulong[] promoted = [];
        for (var i = 0; i < 8; i++)
        {
            promoted = Apply(promoted, Epoch(learner, Misses(streams[from], promoted)));
        }

        Assert.That(promoted, Is.EqualTo(expected[from]));
        var epochs = 0;
        while (!promoted.SequenceEqual(expected[to]) && epochs < 5)
        {
            promoted = Apply(promoted, Epoch(learner, Misses(streams[to], promoted)));
            epochs++;
        }

        Assert.That(promoted, Is.EqualTo(expected[to]), $"converged after {epochs} epochs");
        var changes = 0;
        for (var i = 0; i < 50; i++)
        {
            var decisions = Epoch(learner, Misses(streams[to], promoted));
            changes += decisions.Count;
            promoted = Apply(promoted, decisions);
        }

        Assert.That(changes, Is.Zero, "no thrash once converged");
    }

    [Test]
    public void Noise_does_not_get_promoted_or_trigger_relearning()
    {
        var learner = NewLearner();
        var noise = Enumerable.Range(1, 50).Select(i => ((ulong)i << 24, 1)).ToArray();
        Assert.That(Epoch(learner, Mix([(A, 950), .. noise])), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A) }));
        for (var i = 0; i < 30; i++)
        {
            Assert.That(Epoch(learner, Mix(noise)), Is.Empty, "50 noise misses per epoch were predicted by the promotion");
        }
    }

    [Test]
    public void Suspended_learning_asks_for_nothing_and_resumes_where_it_was()
    {
        var learner = NewLearner();
        learner.Suspended = true;
        Assert.That(Epoch(learner, Mono(A)), Is.Empty);
        Assert.That(Epoch(learner, Mono(A)), Is.Empty);
        learner.Suspended = false;
        Assert.That(Epoch(learner, Mono(A)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A) }));
    }

    [Test]
    public void The_global_change_limit_takes_the_most_valuable_sites_first_and_defers_the_rest()
    {
        var learner = new Learner(new LearnerOptions { MaxChangesPerEpoch = 2, RelearnPeriod = 0 });
        for (var site = 1; site <= 4; site++)
        {
            learner.AddSite(site, 8);
            for (var i = 0; i < site * 100; i++)
            {
                learner.Record(site, A);
            }
        }

        Assert.That(learner.EndEpoch().Select(d => d.Site), Is.EqualTo(new[] { 3, 4 }));
        for (var site = 1; site <= 2; site++)
        {
            for (var i = 0; i < site * 100; i++)
            {
                learner.Record(site, A);
            }
        }

        Assert.That(learner.EndEpoch().Select(d => d.Site), Is.EqualTo(new[] { 1, 2 }));
    }

    [Test]
    public void A_site_is_promoted_at_most_once_per_interval_but_demoted_at_once()
    {
        var learner = new Learner(new LearnerOptions { MinEpochsBetweenChanges = 4, RelearnPeriod = 0 });
        learner.AddSite(Site, 8);
        Assert.That(Epoch(learner, Mono(A)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, A) }));
        Assert.That(Epoch(learner, Mono(B)), Is.Empty, "the epoch after a promotion only settles (the promotion may land late)");
        Assert.That(Epoch(learner, Mono(B)), Is.EqualTo(new[] { Decision(DecisionReason.PhaseChange) }), "demotion never waits");
        Assert.That(Epoch(learner, Mono(B)), Is.Empty, "learned, but only 3 epochs after the last promotion: B waits");
        Assert.That(Epoch(learner, Mono(B)), Is.EqualTo(new[] { Decision(DecisionReason.Promote, B) }), "4 epochs after the last promotion");
    }

    [Test]
    public void Periodic_relearning_backs_off_when_it_confirms_the_promotion()
    {
        var learner = new Learner(new LearnerOptions { RelearnPeriod = 4 });
        learner.AddSite(Site, 8);
        ulong[] promoted = [];
        var periodic = new List<long>();
        for (var i = 0; i < 60; i++)
        {
            var decisions = Epoch(learner, Misses(Mono(A), promoted));
            if (decisions.Any(d => d.Reason == DecisionReason.Periodic))
            {
                periodic.Add(learner.Epoch);
            }

            promoted = Apply(promoted, decisions);
        }

        Assert.That(periodic, Has.Count.GreaterThanOrEqualTo(2));
        Assert.That(periodic[1] - periodic[0], Is.GreaterThan(4 + 1), "the interval doubled after a confirming relearn");
    }

    [Test]
    public void Unreachable_targets_are_never_promoted_again()
    {
        var learner = NewLearner();
        learner.MarkUnreachable(Site, A);
        Assert.That(Epoch(learner, Mix((A, 500), (B, 500))), Is.EqualTo(new[] { Decision(DecisionReason.Promote, B) }));
        Assert.That(learner.GetState(Site)!.Unreachable, Is.EqualTo(1));
    }

    [Test]
    public void Samples_of_unknown_sites_are_dropped_and_counted()
    {
        var learner = NewLearner();
        learner.Record(99, A);
        Assert.That(learner.DroppedSamples, Is.EqualTo(1));
        Assert.That(() => learner.AddSite(Site, 8), Throws.ArgumentException);
        Assert.That(() => new Learner(new LearnerOptions { Decay = 1 }), Throws.TypeOf<ArgumentOutOfRangeException>());
    }

    private static Learner NewLearner()
    {
        var learner = new Learner(new LearnerOptions { RelearnPeriod = 0 });
        learner.AddSite(Site, 8);
        return learner;
    }

    private static SiteDecision Decision(DecisionReason reason, params ulong[] targets) => new(Site, targets, reason);

    private static (ulong Target, int Count)[] Mono(ulong target) => [(target, PerEpoch)];

    [Test]
    public void A_partial_promotion_tolerates_its_own_speed_up_but_not_a_new_phase()
    {
        var learner = NewLearner();
        var h = Enumerable.Range(1, 16).Sum(k => 1.0 / k);
        var zipf = Mix([.. Enumerable.Range(1, 16).Select(k => ((ulong)k << 12, (int)Math.Round(1000 / (k * h))))]);
        var promoted = Apply([], Epoch(learner, zipf));
        Assert.That(promoted, Has.Length.EqualTo(8));

        // Promoted, the loop runs 3x faster: the same tail, 3x the misses per epoch. Not a phase change.
        var fasterTail = Misses(zipf, promoted).Select(m => (m.Target, m.Count * 3)).ToArray();
        for (var i = 0; i < 50; i++)
        {
            Assert.That(Epoch(learner, fasterTail), Is.Empty, $"epoch {i}");
        }

        // A new phase: every call goes to targets the promotion never saw, and the site relearns.
        var epochs = 1;
        while (Epoch(learner, Mono(0xABC000)) is var decisions && decisions.Count == 0 && epochs < 5)
        {
            epochs++;
        }

        Assert.That(epochs, Is.LessThan(5), $"a new phase is still seen: {learner.GetState(Site)}");
    }

    [Test]
    public void A_seeded_site_promotes_at_the_next_epoch_without_samples_and_keeps_its_histogram()
    {
        var learner = new Learner();
        learner.AddSite(Site, 8);
        Assert.That(learner.Seed(Site, [(0xA, 900), (0xB, 100), (0xC, 1)]), Is.True);
        var decisions = learner.EndEpoch();
        Assert.That(decisions, Has.Count.EqualTo(1), learner.GetState(Site)?.ToString());
        Assert.That(decisions[0].Targets, Is.EqualTo(new ulong[] { 0xA, 0xB }), "C (1 in 1001, below the noise floor after scaling) is left out");
        var histogram = learner.GetHistogram(Site);
        Assert.That(histogram.Select(h => h.Target), Is.EqualTo(new ulong[] { 0xA, 0xB, 0xC }));
        Assert.That(histogram.Sum(h => h.Count), Is.EqualTo(256).Within(1e-9), "scaled to 16 x MinSamples");
        Assert.That(learner.Seed(Site, [(0xD, 10)]), Is.False, "a promoted site is not seeded again");
        Assert.That(learner.Seed(Site + 1, [(0xD, 10)]), Is.False, "an unknown site");
        Assert.That(learner.GetHistogram(Site + 1), Is.Empty);
    }

    private static (ulong Target, int Count)[] Mix(params (ulong Target, int Count)[] parts) => parts;

    /// <summary>Only misses are sampled: calls to promoted targets disappear from the stream.</summary>
    private static (ulong Target, int Count)[] Misses((ulong Target, int Count)[] stream, ulong[] promoted) =>
        [.. stream.Where(s => !promoted.Contains(s.Target))];

    private static ulong[] Apply(ulong[] promoted, List<SiteDecision> decisions) =>
        decisions.Count == 0 ? promoted : [.. decisions[^1].Targets];

    /// <summary>Feeds one epoch's samples interleaved round-robin (a deterministic stand-in for random order).</summary>
    private static List<SiteDecision> Epoch(Learner learner, (ulong Target, int Count)[] stream)
    {
        var left = stream.Select(s => s.Count).ToArray();
        for (var any = true; any;)
        {
            any = false;
            for (var i = 0; i < stream.Length; i++)
            {
                if (left[i]-- > 0)
                {
                    learner.Record(Site, stream[i].Target);
                    any = true;
                }
            }
        }

        return [.. learner.EndEpoch()];
    }
}
