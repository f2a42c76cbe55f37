namespace Optpoline.Learning;

/// <summary>
/// Learning policy parameters. Anchors: .NET dynamic PGO guesses at >= 25-30 % likelihood from a
/// 32-entry table; HotSpot guards at >= 90 %; BOLT promotes >= 30 % of calls; V8 stays polymorphic
/// up to 4 shapes. This policy uses a cost model instead of one fixed share: a target is worth a slot
/// when the misses it saves outweigh the compare every later call then pays.
/// </summary>
public sealed class LearnerOptions
{
    /// <summary>Target counters kept per site (Space-Saving heavy hitters): bounded memory whatever the site sees.</summary>
    public int CountersPerSite { get; init; } = 16;

    /// <summary>Weight the previous epochs keep at each epoch end (0: only the last epoch counts).</summary>
    public double Decay { get; init; } = 0.5;

    /// <summary>Decayed samples a learning site needs before the learner decides anything for it.</summary>
    public double MinSamples { get; init; } = 16;

    /// <summary>
    /// Samples each target of a promotion needs (its guaranteed count): a mono site decides at
    /// <see cref="MinSamples"/>, an 8-way site once each target was seen this often. Deciding on too
    /// little made 8-way sites promote 5 of their targets and relearn again and again (measured).
    /// </summary>
    public double MinTargetSamples { get; init; } = 6;

    /// <summary>Cost of one call that takes the fallback (a retpoline: ~10 ns measured here).</summary>
    public double FallbackCostNs { get; init; } = 10;

    /// <summary>Cost of each compare a call passes before its target (inline slot or chain entry: ~0.3 ns here).</summary>
    public double CompareCostNs { get; init; } = 0.3;

    /// <summary>
    /// A promotion must save at least this fraction of the all-fallback cost; below it the site is
    /// megamorphic for the policy and backs off.
    /// </summary>
    public double MinGain { get; init; } = 0.25;

    /// <summary>
    /// A promoted site is revisited when its misses (decayed, since the promotion) exceed this many
    /// times what its promotion predicted, plus <see cref="MinTargetSamples"/> so that rare noise on a
    /// fully covered site does not count.
    /// </summary>
    public double RelearnMissFactor { get; init; } = 2;

    /// <summary>
    /// Epochs after which a promoted site is relearned anyway (its hits are not sampled, so a shift among
    /// promoted targets is otherwise invisible); doubles each time relearning confirms the promotion, up
    /// to 16 times this value. 0 turns periodic relearning off.
    /// </summary>
    public int RelearnPeriod { get; init; } = 256;

    /// <summary>
    /// Back-off of a megamorphic site: it is decided again after 1 epoch, then 2, 4, … up to this many.
    /// It bounds how late a site that stops being megamorphic is promoted (default: within 5 epochs).
    /// </summary>
    public int MaxBackoffEpochs { get; init; } = 4;

    /// <summary>Global patch-rate limit: site changes the learner asks for per epoch, most valuable first.</summary>
    public int MaxChangesPerEpoch { get; init; } = 1024;

    /// <summary>Per-site limit: epochs between two promotions of the same site (demotions are free and never wait).</summary>
    public int MinEpochsBetweenChanges { get; init; } = 2;

    internal void Validate()
    {
        if (CountersPerSite is < 1 or > 256)
        {
            throw new ArgumentOutOfRangeException(nameof(CountersPerSite), CountersPerSite, "Between 1 and 256.");
        }

        if (Decay is < 0 or >= 1)
        {
            throw new ArgumentOutOfRangeException(nameof(Decay), Decay, "Decay is a weight in [0, 1).");
        }

        if (MinSamples <= 0 || MinTargetSamples <= 0 || FallbackCostNs <= 0 || CompareCostNs < 0 || MinGain is < 0 or > 1 || RelearnMissFactor < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(MinSamples), "MinSamples and FallbackCostNs must be positive, CompareCostNs >= 0, MinGain in [0, 1], RelearnMissFactor >= 1.");
        }

        if (RelearnPeriod < 0 || MaxBackoffEpochs < 1 || MaxChangesPerEpoch < 1 || MinEpochsBetweenChanges < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(RelearnPeriod), "RelearnPeriod >= 0; MaxBackoffEpochs, MaxChangesPerEpoch, MinEpochsBetweenChanges >= 1.");
        }
    }
}
