namespace Optpoline.Learning;

/// <summary>Why the learner changes a site.</summary>
public enum DecisionReason
{
    /// <summary>Learned a distribution worth promoting.</summary>
    Promote,

    /// <summary>Misses rose above what the promotion predicted (a phase change): back to the fallback to relearn.</summary>
    PhaseChange,

    /// <summary>The periodic relearning of a promoted site.</summary>
    Periodic,
}

/// <summary>A change the learner asks for: <paramref name="Targets"/> in dispatch order (empty: fallback only).</summary>
public sealed record SiteDecision(int Site, IReadOnlyList<ulong> Targets, DecisionReason Reason)
{
    /// <summary>Equal when site, reason and targets (in order) are equal.</summary>
    public bool Equals(SiteDecision? other) =>
        other is not null && Site == other.Site && Reason == other.Reason && Targets.SequenceEqual(other.Targets);

    /// <inheritdoc/>
    public override int GetHashCode() => HashCode.Combine(Site, Reason, Targets.Count);

    /// <inheritdoc/>
    public override string ToString() => $"site {Site}: {Reason} [{string.Join(", ", Targets.Select(t => $"0x{t:X}"))}]";
}
