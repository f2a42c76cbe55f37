namespace Optpoline.Sites;

/// <summary>One site's new targets, for <see cref="OptpolineEngine.PromoteAsync(IReadOnlyList{SiteUpdate})"/>.</summary>
/// <param name="Site">The site.</param>
/// <param name="Targets">Targets in dispatch order (hottest first); empty demotes everything.</param>
public sealed record SiteUpdate(Site Site, IReadOnlyList<ulong> Targets);
