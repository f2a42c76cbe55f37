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
/// - Promoted: only misses are sampled. When they exceed what the promotion predicted (a phase change),
///   or after the periodic relearning interval, the site goes back to the fallback to relearn (a
///   demotion costs no grace period). A steady site therefore causes no patches.
/// - Backoff (megamorphic): it stays on the fallback and is decided again after 1, 2, 4, … epochs
///   (at most <see cref="LearnerOptions.MaxBackoffEpochs"/>), counting all the while.
/// Counters are Space-Saving heavy hitters with their overestimation tracked, so a megamorphic stream
/// never looks concentrated; counts decay by <see cref="LearnerOptions.Decay"/> per epoch.
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

    /// <summary>Never promotes <paramref name="target"/> at <paramref name="site"/> again (a direct call cannot reach it).</summary>
    public void MarkUnreachable(int site, ulong target)
    {
        if (_sites.TryGetValue(site, out var state))
        {
            state.Unreachable.Add(target);
        }
    }

    /// <summary>Where a site stands, for statistics.</summary>
    public SiteLearningState? GetState(int site) =>
        _sites.TryGetValue(site, out var s) ? new SiteLearningState(s.Mode.ToString(), [.. s.Promoted], s.BackoffEpochs, s.Unreachable.Count) : null;

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
            state.Age(_options.Decay);
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
        var rate = Math.Max(state.EpochSamples, total * (1 - _options.Decay));
        candidates.Add((state, new SiteDecision(id, targets, DecisionReason.Promote), gain * rate, () =>
        {
            var confirmed = state.PeriodicCheck is { } previous && previous.SequenceEqual(targets);
            state.RelearnEvery = confirmed
                ? Math.Min(state.RelearnEvery * 2, _options.RelearnPeriod * 16)
                : _options.RelearnPeriod;
            state.PeriodicCheck = null;
            state.Mode = Mode.Promoted;
            state.Promoted = targets;
            state.ExpectedMisses = rate * (1 - coverage);
            state.RelearnAt = state.RelearnEvery == 0 ? long.MaxValue : Epoch + state.RelearnEvery;
            state.BackoffEpochs = 0;
        }));
    }

    private void ConsiderPromoted(int id, SiteState state, List<(SiteState, SiteDecision, double, Action)> candidates)
    {
        var misses = state.EpochSamples;
        var limit = (_options.RelearnMissFactor * state.ExpectedMisses) + (_options.MinSamples / 2);
        DecisionReason? reason = misses > limit ? DecisionReason.PhaseChange : Epoch >= state.RelearnAt ? DecisionReason.Periodic : null;
        if (reason is null)
        {
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

        public ulong[]? PeriodicCheck { get; set; }

        public double ExpectedMisses { get; set; }

        public long LastPromotion { get; set; } = long.MinValue / 2;

        public long RelearnAt { get; set; } = long.MaxValue;

        public int RelearnEvery { get; set; } = relearnPeriod;

        public int BackoffEpochs { get; set; }

        public long BackoffUntil { get; set; }

        public double TotalWeight { get; private set; }

        public void Count(ulong target)
        {
            TotalWeight++;
            for (var i = 0; i < _used; i++)
            {
                if (_counters[i].Target == target)
                {
                    _counters[i].Weight++;
                    return;
                }
            }

            if (_used < _counters.Length)
            {
                _counters[_used++] = new Counter { Target = target, Weight = 1 };
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

            _counters[min] = new Counter { Target = target, Weight = _counters[min].Weight + 1, Error = _counters[min].Weight };
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

        public void Clear()
        {
            _used = 0;
            TotalWeight = 0;
        }
    }
}

/// <summary>A site as the learner sees it.</summary>
/// <param name="Mode">Learning, Promoted or Backoff.</param>
/// <param name="Promoted">Targets the learner promoted (empty unless promoted).</param>
/// <param name="BackoffEpochs">Current back-off length of a megamorphic site.</param>
/// <param name="Unreachable">Targets excluded because a direct call cannot reach them.</param>
public sealed record SiteLearningState(string Mode, IReadOnlyList<ulong> Promoted, int BackoffEpochs, int Unreachable);
