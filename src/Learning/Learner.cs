namespace Optpoline.Learning;

/// <summary>
/// Decides, per site, which targets to promote from sampled fallback calls. Pure managed code and
/// deterministic: the same samples in the same epochs give the same decisions. Not thread safe; the
/// engine calls it from one thread.
/// </summary>
/// <remarks>
/// Samples come from misses only (a promoted site's hits are never seen), so each site moves through
/// three modes:
/// - Learning: it is on the fallback and every call is a candidate sample. Once it has enough samples
///   the cost model picks the prefix of hottest targets with the lowest expected cost per call; if that
///   saves less than <see cref="LearnerOptions.MinGain"/>, the site is megamorphic and backs off.
/// - Promoted: only misses are sampled. When they exceed what the promotion predicted while the
///   promoted targets still take most calls, the well-known missed targets are appended (a chain swap).
///   When most calls miss (a phase change), or after the periodic relearning interval, the site goes
///   back to the fallback to relearn (a demotion costs no grace period). A steady site causes no patches.
/// - Backoff (megamorphic): it stays on the fallback and is decided again after 1, 2, 4, … epochs
///   (at most <see cref="LearnerOptions.MaxBackoffEpochs"/>), counting all the while.
/// Counters are Space-Saving heavy hitters with their overestimation tracked, so a megamorphic stream
/// never looks concentrated. A learning site accumulates; back-off counts and miss evidence decay by
/// <see cref="LearnerOptions.Decay"/> per epoch.
/// </remarks>
public sealed class Learner
{
    private readonly LearnerOptions _options;
    private readonly SortedDictionary<int, SiteState> _sites = [];
    private long _droppedSamples;

    /// <summary>Creates a learner.</summary>
    /// <exception cref="ArgumentOutOfRangeException">An option is out of range.</exception>
    public Learner(LearnerOptions? options = null)
    {
        _options = options ?? new LearnerOptions();
        _options.Validate();
    }

    /// <summary>Epochs ended so far.</summary>
    public long Epoch { get; private set; }

    /// <summary>While true, <see cref="EndEpoch"/> asks for no change (learning goes on); a trace session needs a stable text.</summary>
    public bool Suspended { get; set; }

    /// <summary>Samples for sites the learner does not know (removed, or never added).</summary>
    public long DroppedSamples => _droppedSamples;

    /// <summary>Starts learning a site that can hold <paramref name="maxTargets"/> targets.</summary>
    /// <exception cref="ArgumentException">The site is known already, or <paramref name="maxTargets"/> is not positive.</exception>
    public void AddSite(int site, int maxTargets)
    {
        if (maxTargets < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(maxTargets), maxTargets, "A site holds at least one target.");
        }

        if (!_sites.TryAdd(site, new SiteState(maxTargets, _options.CountersPerSite, _options.RelearnPeriod)))
        {
            throw new ArgumentException($"Site {site} is already being learned.", nameof(site));
        }
    }

    /// <summary>Forgets a site; later samples for it are dropped.</summary>
    public bool RemoveSite(int site) => _sites.Remove(site);

    /// <summary>Records one sampled fallback call of <paramref name="site"/> to <paramref name="target"/>.</summary>
    public void Record(int site, ulong target)
    {
        if (!_sites.TryGetValue(site, out var state) || target == 0)
        {
            _droppedSamples++;
            return;
        }

        state.EpochSamples++;
        state.Count(target);
    }

    /// <summary>
    /// The engine could not apply a decision for <paramref name="site"/> (it rolled the site back, for
    /// example after a grace period timed out): the site learns again from scratch, on its old targets.
    /// </summary>
    public void Relearn(int site)
    {
        if (_sites.TryGetValue(site, out var state))
        {
            state.Mode = Mode.Learning;
            state.Promoted = [];
            state.ExcessEpochs = 0;
            state.Clear();
        }
    }

    /// <summary>Never promotes <paramref name="target"/> at <paramref name="site"/> again (a direct call cannot reach it).</summary>
    public void MarkUnreachable(int site, ulong target)
    {
        if (_sites.TryGetValue(site, out var state))
        {
            state.Unreachable.Add(target);
        }
    }

    /// <summary>Whether the policy holds <paramref name="site"/> on the fallback as megamorphic (backing off, nothing promoted).</summary>
    public bool IsMegamorphic(int site) =>
        _sites.TryGetValue(site, out var s) && s.Mode == Mode.Backoff && s.Promoted.Length == 0;

    /// <summary>
    /// Whether a megamorphic site's back-off has run out and the policy is deciding it again: it needs
    /// samples now (a site that sends none keeps its old, decaying evidence and cannot leave back-off).
    /// </summary>
    public bool IsDeciding(int site) =>
        _sites.TryGetValue(site, out var s) && s.Mode == Mode.Backoff && Epoch >= s.BackoffUntil;

    /// <summary>Where a site stands, for statistics.</summary>
    public SiteLearningState? GetState(int site) =>
        _sites.TryGetValue(site, out var s)
            ? new SiteLearningState(s.Mode.ToString(), [.. s.Promoted], s.BackoffEpochs, s.Unreachable.Count, s.TotalWeight)
            {
                Detail = $"expected {s.ExpectedMisses:F1}/epoch, rate {s.Rate:F1}, excess epochs {s.ExcessEpochs}, " +
                         $"counters [{string.Join(", ", s.Ranked().Take(4).Select(c => $"{c.Target:X}:{c.Weight:F1}-{c.Error:F1}"))}]",
            }
            : null;

    /// <summary>
    /// The site's learned target histogram, hottest first: the counts its promotion was decided from
    /// while it is promoted (its hits are not sampled then), else what it counts now. Counts are the
    /// guaranteed (never overestimated) sample counts; empty for an unknown site.
    /// </summary>
    public IReadOnlyList<(ulong Target, double Count)> GetHistogram(int site)
    {
        if (!_sites.TryGetValue(site, out var state))
        {
            return [];
        }

        return state.Mode == Mode.Promoted
            ? state.Decided
            : [.. state.Ranked().Where(c => c.Guaranteed > 0).Select(c => (c.Target, c.Guaranteed))];
    }

    /// <summary>
    /// Gives a learning site the histogram of an earlier run (a saved profile) as if it had sampled it:
    /// the counts are scaled to 16 x <see cref="LearnerOptions.MinSamples"/> samples in all, past the 8 x
    /// at which the next <see cref="EndEpoch"/> decides among the well-known targets (those below
    /// <see cref="LearnerOptions.MinTargetSamples"/> after scaling are noise, as sampled ones are). What
    /// the site sampled already counts too, and the usual rules correct a profile that no longer fits.
    /// </summary>
    /// <returns>False when the site is unknown, not learning (promoted or backing off), or the histogram is empty.</returns>
    public bool Seed(int site, IReadOnlyList<(ulong Target, double Count)> histogram)
    {
        ArgumentNullException.ThrowIfNull(histogram);
        var counts = histogram.Where(h => h.Target != 0 && h.Count > 0).OrderByDescending(h => h.Count).ThenBy(h => h.Target).ToList();
        var total = counts.Sum(h => h.Count);
        if (!_sites.TryGetValue(site, out var state) || state.Mode != Mode.Learning || total <= 0)
        {
            return false;
        }

        var scale = 16 * _options.MinSamples / total;
        foreach (var (target, count) in counts)
        {
            state.Count(target, count * scale);
        }

        return true;
    }

    /// <summary>
    /// Ends an epoch: decides for every site from what it has seen, applies the per-site and global
    /// change limits (most valuable changes first; the rest wait), and returns the changes to make.
    /// </summary>
    public IReadOnlyList<SiteDecision> EndEpoch()
    {
        Epoch++;
        var candidates = new List<(SiteState State, SiteDecision Decision, double Value, Action Commit)>();
        foreach (var (id, state) in _sites)
        {
            state.EpochsCounted++;
            switch (state.Mode)
            {
                case Mode.Learning:
                    ConsiderLearning(id, state, candidates);
                    break;
                case Mode.Promoted:
                    ConsiderPromoted(id, state, candidates);
                    break;
                case Mode.Backoff when Epoch >= state.BackoffUntil:
                    ConsiderLearning(id, state, candidates);
                    break;
            }

            state.EpochSamples = 0;
            if (state.Mode != Mode.Learning)
            {
                // A learning site was reset when it started learning, so all it counts belongs to the
                // current phase: it accumulates until it can decide. Back-off and miss evidence decay.
                state.Age(_options.Decay);
            }
        }

        if (Suspended)
        {
            return [];
        }

        // Demotions are free (no grace period) and only ever make a site safer, so the per-site limit
        // spaces out promotions; the global limit counts every change.
        var decisions = new List<SiteDecision>();
        foreach (var (state, decision, _, commit) in candidates
                     .Where(c => c.Decision.Targets.Count == 0 || Epoch - c.State.LastPromotion >= _options.MinEpochsBetweenChanges)
                     .OrderByDescending(c => c.Value)
                     .ThenBy(c => c.Decision.Site)
                     .Take(_options.MaxChangesPerEpoch))
        {
            commit();
            if (decision.Targets.Count > 0)
            {
                state.LastPromotion = Epoch;
            }

            decisions.Add(decision);
        }

        decisions.Sort((a, b) => a.Site.CompareTo(b.Site));
        return decisions;
    }

    private void ConsiderLearning(int id, SiteState state, List<(SiteState, SiteDecision, double, Action)> candidates)
    {
        var ranked = state.Ranked();
        var total = state.TotalWeight;
        if (total < _options.MinSamples)
        {
            return;
        }

        var usable = ranked.Where(c => !state.Unreachable.Contains(c.Target)).Take(state.MaxTargets).ToList();
        var (count, cost, coverage) = BestPrefix(usable, total);
        var gain = 1 - (cost / _options.FallbackCostNs);
        var dropped = 0.0;
        if (count > 0 && gain >= _options.MinGain && usable[count - 1].Guaranteed < _options.MinTargetSamples)
        {
            if (total < 8 * _options.MinSamples)
            {
                // Worth promoting, but the coldest chosen target is not yet known well enough: wait.
                // (At the defaults, 128 samples: a real 1-in-8 target falls below 6 with probability ~1e-4.)
                return;
            }

            // Enough evidence overall: targets still below the threshold are noise (or the residue of an
            // earlier phase); decide among the well-known ones. A real one left out is added later by an
            // extension, from its misses.
            dropped = usable.Where(c => c.Guaranteed < _options.MinTargetSamples).Sum(c => c.Guaranteed) / total;
            usable = [.. usable.Where(c => c.Guaranteed >= _options.MinTargetSamples)];
            (count, cost, coverage) = BestPrefix(usable, total);
            gain = 1 - (cost / _options.FallbackCostNs);
        }

        if (count == 0 || gain < _options.MinGain)
        {
            // Megamorphic for this policy: stay on the fallback and decide again later, less often each
            // time. Counting goes on (decayed), so a stream that becomes concentrated is promoted at the
            // next look, at most MaxBackoffEpochs later.
            state.BackoffEpochs = Math.Min(state.BackoffEpochs == 0 ? 1 : state.BackoffEpochs * 2, _options.MaxBackoffEpochs);
            state.BackoffUntil = Epoch + state.BackoffEpochs;
            state.Mode = Mode.Backoff;
            return;
        }

        var targets = usable.Take(count).Select(c => c.Target).ToArray();
        (ulong, double)[] decided = [.. ranked.Where(c => c.Guaranteed > 0).Select(c => (c.Target, c.Guaranteed))];

        // Samples per epoch: a learning site accumulated `total` over the epochs since it was reset; a
        // site in back-off holds decayed counts, whose steady total is the rate / (1 - decay).
        var rate = state.Mode == Mode.Learning
            ? total / Math.Max(1, state.EpochsCounted)
            : total * (1 - _options.Decay);
        rate = Math.Max(rate, state.EpochSamples);
        candidates.Add((state, new SiteDecision(id, targets, DecisionReason.Promote), gain * rate, () =>
        {
            var confirmed = state.PeriodicCheck is { } previous && previous.SequenceEqual(targets);
            state.RelearnEvery = confirmed
                ? Math.Min(state.RelearnEvery * 2, _options.RelearnPeriod * 16)
                : _options.RelearnPeriod;
            state.PeriodicCheck = null;
            state.Mode = Mode.Promoted;
            state.Promoted = targets;
            state.Decided = decided;
            state.Rate = rate;
            state.SettleUntil = Epoch + 1;

            // Targets left out for lack of evidence are not expected to miss: if they are real they keep
            // missing and get added by an extension; if they were noise or residue they disappear.
            state.ExpectedMisses = rate * Math.Max(0, 1 - coverage - dropped);
            state.Speedup = _options.FallbackCostNs / Math.Max(cost, _options.CompareCostNs);
            state.ExcessEpochs = 0;
            state.Clear();
            state.RelearnAt = state.RelearnEvery == 0 ? long.MaxValue : Epoch + state.RelearnEvery;
            state.BackoffEpochs = 0;
        }));
    }

    private void ConsiderPromoted(int id, SiteState state, List<(SiteState, SiteDecision, double, Action)> candidates)
    {
        // A promotion lands asynchronously (into a used slot only after the next grace period), so the
        // epoch after it still sees misses that say nothing about it: that epoch only settles. Without
        // this, sites oscillated between promoted and relearning (measured in the 1000-site phase test).
        if (Epoch <= state.SettleUntil)
        {
            state.Clear();
            return;
        }

        // Misses are compared as decayed evidence since the promotion, not per epoch: a target missing
        // from an 8-way promotion is sampled only a few times per epoch, below any per-epoch noise floor.
        var misses = state.EpochSamples;
        var evidence = state.TotalWeight;
        var limit = (_options.RelearnMissFactor * state.ExpectedMisses / (1 - _options.Decay)) + _options.MinTargetSamples;
        var excess = evidence > limit && !ExplainedBySpeedup(state, evidence, limit);
        DecisionReason? reason = excess ? DecisionReason.PhaseChange : Epoch >= state.RelearnAt ? DecisionReason.Periodic : null;
        var previousMisses = state.LastMisses;
        state.LastMisses = misses;
        state.ExcessEpochs = reason == DecisionReason.PhaseChange ? state.ExcessEpochs + 1 : 0;
        if (reason is null)
        {
            return;
        }

        if (reason == DecisionReason.PhaseChange && misses < state.Rate / 4)
        {
            // The promotion still serves most calls. Extend it only once the excess is stable: two
            // epochs in a row, not growing. An epoch in the middle of a phase change looks partial too,
            // and extending then kept the old phase's targets in the inline slots in front of the new
            // ones (measured in the 1000-site phase test); there the misses keep growing, so wait.
            if (state.ExcessEpochs >= 2 && misses <= previousMisses * 1.5)
            {
                TryExtend(id, state, misses, candidates);
            }

            return;
        }

        candidates.Add((state, new SiteDecision(id, [], reason.Value), misses, () =>
        {
            state.PeriodicCheck = reason == DecisionReason.Periodic ? state.Promoted : null;
            state.Mode = Mode.Learning;
            state.Promoted = [];
            state.Clear();
        }));
    }

    /// <summary>
    /// Whether misses above the limit are the known tail of the promotion coming round faster. The rate a
    /// promotion predicts its misses from was measured with every call on the fallback; promoted, the
    /// calls get cheaper, and a thread that does little but call comes round faster, by up to the cost
    /// model's speed-up, so the tail left on the fallback misses as much more often (measured: a Zipf-16
    /// site relearned every 4 epochs, its misses 3x what the slow rate said). That is no phase change when
    /// at least 80 % of the misses go to targets the promotion was decided among but left out, and there
    /// are at most speed-up times the limit. Misses to other targets are judged by the limit alone.
    /// </summary>
    private static bool ExplainedBySpeedup(SiteState state, double evidence, double limit)
    {
        if (state.Speedup <= 1 || evidence > limit * state.Speedup)
        {
            return false;
        }

        var known = new HashSet<ulong>(state.Decided.Select(d => d.Target));
        known.ExceptWith(state.Promoted);
        var explained = state.Ranked().Where(c => known.Contains(c.Target)).Sum(c => c.Weight);
        return explained >= 0.8 * evidence;
    }

    /// <summary>
    /// The promoted targets still take most calls, but others miss more than predicted: append the well
    /// known missed targets (counted since the promotion) instead of relearning everything. The inline
    /// slots keep their targets, so the change is a chain swap, which needs no grace period.
    /// </summary>
    private void TryExtend(int id, SiteState state, double misses, List<(SiteState, SiteDecision, double, Action)> candidates)
    {
        var room = state.MaxTargets - state.Promoted.Length;
        var total = state.TotalWeight;
        var extra = state.Ranked()
            .Where(c => !state.Promoted.Contains(c.Target) && !state.Unreachable.Contains(c.Target) && c.Guaranteed >= _options.MinTargetSamples)
            .Take(room)
            .ToList();
        if (extra.Count == 0 || total <= 0)
        {
            return;
        }

        var targets = state.Promoted.Concat(extra.Select(c => c.Target)).ToArray();
        var stillMissing = Math.Max(0, 1 - (extra.Sum(c => c.Guaranteed) / total));
        candidates.Add((state, new SiteDecision(id, targets, DecisionReason.Promote), misses, () =>
        {
            state.Promoted = targets;
            state.Decided = [.. state.Decided, .. extra.Select(c => (c.Target, c.Guaranteed))];
            state.ExpectedMisses = misses * stillMissing;
            state.ExcessEpochs = 0;
            state.SettleUntil = Epoch + 1;
            state.Clear();
        }));
    }

    /// <summary>The prefix of hottest targets with the lowest expected cost per call.</summary>
    private (int Count, double Cost, double Coverage) BestPrefix(List<Counter> ranked, double total)
    {
        var best = (Count: 0, Cost: _options.FallbackCostNs, Coverage: 0.0);
        double hitCost = 0, covered = 0;
        for (var n = 1; n <= ranked.Count; n++)
        {
            var share = ranked[n - 1].Guaranteed / total;
            if (share <= 0)
            {
                break;
            }

            covered += share;
            hitCost += share * n * _options.CompareCostNs;
            var cost = hitCost + ((1 - covered) * ((n * _options.CompareCostNs) + _options.FallbackCostNs));
            if (cost < best.Cost)
            {
                best = (n, cost, covered);
            }
        }

        return best;
    }

    private enum Mode
    {
        Learning,
        Promoted,
        Backoff,
    }

    private struct Counter
    {
        public ulong Target;
        public double Weight;
        public double Error;

        public readonly double Guaranteed => Math.Max(0, Weight - Error);
    }

    private sealed class SiteState(int maxTargets, int counters, int relearnPeriod)
    {
        private readonly Counter[] _counters = new Counter[counters];
        private int _used;

        public int MaxTargets { get; } = maxTargets;

        public Mode Mode { get; set; }

        public HashSet<ulong> Unreachable { get; } = [];

        public double EpochSamples { get; set; }

        public ulong[] Promoted { get; set; } = [];

        /// <summary>How much faster the cost model says a call is with the promotion than on the fallback.</summary>
        public double Speedup { get; set; } = 1;

        /// <summary>The counts the promotion was decided from (and the extensions' counts), hottest first.</summary>
        public (ulong Target, double Count)[] Decided { get; set; } = [];

        public ulong[]? PeriodicCheck { get; set; }

        public double ExpectedMisses { get; set; }

        /// <summary>Last epoch whose samples are discarded because the site's promotion may not have landed yet.</summary>
        public long SettleUntil { get; set; }

        /// <summary>Samples of the previous epoch (a promoted site's misses).</summary>
        public double LastMisses { get; set; }

        /// <summary>Consecutive epochs in which a promoted site missed more than predicted.</summary>
        public int ExcessEpochs { get; set; }

        /// <summary>Samples per epoch while the site was learning (all its calls then reach the fallback).</summary>
        public double Rate { get; set; }

        public long LastPromotion { get; set; } = long.MinValue / 2;

        public long RelearnAt { get; set; } = long.MaxValue;

        public int RelearnEvery { get; set; } = relearnPeriod;

        public int BackoffEpochs { get; set; }

        public long BackoffUntil { get; set; }

        public double TotalWeight { get; private set; }

        public void Count(ulong target, double weight = 1)
        {
            TotalWeight += weight;
            for (var i = 0; i < _used; i++)
            {
                if (_counters[i].Target == target)
                {
                    _counters[i].Weight += weight;
                    return;
                }
            }

            if (_used < _counters.Length)
            {
                _counters[_used++] = new Counter { Target = target, Weight = weight };
                return;
            }

            // Space-Saving: the smallest counter is taken over; its weight becomes the new one's error.
            var min = 0;
            for (var i = 1; i < _used; i++)
            {
                if (_counters[i].Weight < _counters[min].Weight)
                {
                    min = i;
                }
            }

            _counters[min] = new Counter { Target = target, Weight = _counters[min].Weight + weight, Error = _counters[min].Weight };
        }

        public List<Counter> Ranked() =>
            [.. _counters.Take(_used).OrderByDescending(c => c.Guaranteed).ThenBy(c => c.Target)];

        public void Age(double decay)
        {
            TotalWeight *= decay;
            for (var i = 0; i < _used; i++)
            {
                _counters[i].Weight *= decay;
                _counters[i].Error *= decay;
            }
        }

        /// <summary>Epochs since the counters were last cleared.</summary>
        public int EpochsCounted { get; set; }

        public void Clear()
        {
            _used = 0;
            TotalWeight = 0;
            EpochsCounted = 0;
        }
    }
}

/// <summary>A site as the learner sees it.</summary>
/// <param name="Mode">Learning, Promoted or Backoff.</param>
/// <param name="Promoted">Targets the learner promoted (empty unless promoted).</param>
/// <param name="BackoffEpochs">Current back-off length of a megamorphic site.</param>
/// <param name="Unreachable">Targets excluded because a direct call cannot reach them.</param>
/// <param name="Evidence">Decayed samples counted so far (compared with <see cref="LearnerOptions.MinSamples"/>).</param>
public sealed record SiteLearningState(string Mode, IReadOnlyList<ulong> Promoted, int BackoffEpochs, int Unreachable, double Evidence)
{
    /// <summary>The policy's working values, for diagnostics.</summary>
    public string Detail { get; init; } = string.Empty;

    /// <inheritdoc/>
    public override string ToString() => $"{Mode}, {Promoted.Count} promoted, evidence {Evidence:F1}, {Detail}";
}
