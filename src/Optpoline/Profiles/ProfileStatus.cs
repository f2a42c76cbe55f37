namespace Optpoline.Profiles;

/// <summary>What a loaded profile gave (<see cref="OptpolineEngine.Profile"/>).</summary>
/// <param name="Path">The profile file; null when none was loaded.</param>
/// <param name="Sites">Sites in the profile.</param>
/// <param name="AppliedSites">Sites bound in this engine that were given their histogram.</param>
/// <param name="UnmatchedSites">Sites in the profile that no site of this engine has matched (yet): ignored.</param>
/// <param name="Targets">Targets in the profile, over all sites.</param>
/// <param name="StaleTargets">Targets of applied sites whose block or module no longer exists: ignored.</param>
public sealed record ProfileStatus(string? Path, int Sites, int AppliedSites, int UnmatchedSites, int Targets, int StaleTargets)
{
    /// <summary>No profile loaded.</summary>
    public static ProfileStatus None { get; } = new(null, 0, 0, 0, 0, 0);

    /// <inheritdoc/>
    public override string ToString() =>
        Path is null ? "no profile" : $"profile {Path}: {AppliedSites}/{Sites} sites applied, {UnmatchedSites} unmatched, {StaleTargets}/{Targets} targets stale";
}
