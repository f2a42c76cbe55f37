namespace Optpoline.Sites;

/// <summary>One site's new targets, for <see cref="OptpolineEngine.PromoteAsync(IReadOnlyList{SiteUpdate})"/>.</summary>
/// <param name="Site">The site.</param>
/// <param name="Targets">Targets in dispatch order (hottest first); empty demotes everything.</param>
public sealed record SiteUpdate(Site Site, IReadOnlyList<ulong> Targets)
{
    /// <summary>
    /// With no targets: make the site direct, its first inline slot's call (or, for a site without
    /// inline slots, the call or jump that leaves its code) going to this address: the fallback thunk,
    /// or the sampling stub while the learner checks the site. 0: not direct.
    /// </summary>
    internal ulong DirectCall { get; init; }
}
