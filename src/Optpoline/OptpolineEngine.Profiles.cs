using Optpoline.Memory;
using Optpoline.Profiles;

namespace Optpoline;

/// <summary>Profiles: what the learner learned, saved and given to a restarted host.</summary>
public sealed partial class OptpolineEngine
{
    private readonly HashSet<string> _profileMatched = new(StringComparer.Ordinal);
    private SortedDictionary<string, List<ProfileTarget>> _profileEntries = new(StringComparer.Ordinal);
    private ProfileStatus _profileStatus = ProfileStatus.None;

    /// <summary>Sites of <see cref="_sitesById"/> (in order) already given their profile entry, or found without one.</summary>
    private int _profileScanned;

    /// <summary>What the last <see cref="LoadProfile"/> gave: entries applied so far, and those ignored as stale.</summary>
    public ProfileStatus Profile
    {
        get
        {
            lock (_learnLock)
            {
                return _profileStatus with { UnmatchedSites = _profileEntries.Count - _profileMatched.Count };
            }
        }
    }

    /// <summary>
    /// Writes every site's learned target histogram (<see cref="Learning.Learner.GetHistogram"/>) to
    /// <paramref name="path"/>, sites by name and targets by where they lie: a published block of engine
    /// code (<see cref="Assemble"/> or <see cref="PublishCode"/> with a name) and an offset, or a
    /// file-backed module and a file offset. Sites that share a name (the same call site compiled
    /// again, say) add up into one entry. Targets in neither kind of place (unnamed or anonymous code)
    /// are left out and counted; so are sites without a sample. Entries of a loaded profile that matched
    /// no site are not written (merge profiles with <see cref="LearnedProfile.Merge"/> to keep them).
    /// </summary>
    /// <returns>Sites written, and targets left out because they have no name another process could find.</returns>
    /// <exception cref="InvalidOperationException">The engine does not learn.</exception>
    /// <exception cref="ProfileException">The file cannot be written.</exception>
    public (int Sites, int UnnamedTargets) SaveProfile(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var perSite = new List<LearnedProfile>();
        var unnamed = 0;
        lock (_learnLock)
        {
            var learner = _learner ?? throw new InvalidOperationException("This engine does not learn, so it has no profile: create it with EngineOptions.Learning.Enabled = true.");
            var namer = new TargetNames(this);
            foreach (var site in _sitesById)
            {
                var targets = new List<ProfileTarget>();
                foreach (var (target, count) in learner.GetHistogram(site.LearningId))
                {
                    var samples = (long)Math.Round(count);
                    if (samples <= 0)
                    {
                        continue;
                    }

                    if (namer.Name(target) is { } named)
                    {
                        named.Count = samples;
                        targets.Add(named);
                    }
                    else
                    {
                        unnamed++;
                    }
                }

                if (targets.Count > 0)
                {
                    var one = new LearnedProfile();
                    one.Sites[site.Name] = targets;
                    perSite.Add(one);
                }
            }
        }

        var profile = LearnedProfile.Merge(perSite);
        profile.Save(path);
        return (profile.Sites.Count, unnamed);
    }

    /// <summary>
    /// Reads a profile written by <see cref="SaveProfile"/> (or merged) and gives each site of that name
    /// its histogram as if sampled (<see cref="Learning.Learner.Seed"/>), so the next epoch promotes from
    /// it. Sites bound now get it at once, sites bound later (another copy of the same call site too) at
    /// the first epoch after they are. Entry by entry, a stale profile is ignored: a target whose block or
    /// module no longer exists (or is shorter) is dropped and counted in
    /// <see cref="ProfileStatus.StaleTargets"/>; a site name no site has is counted in
    /// <see cref="ProfileStatus.UnmatchedSites"/> until one appears. A new load replaces the previous one.
    /// </summary>
    /// <exception cref="InvalidOperationException">The engine does not learn.</exception>
    /// <exception cref="ProfileException">The file cannot be read or is not a profile; nothing changes.</exception>
    public ProfileStatus LoadProfile(string path)
    {
        var profile = LearnedProfile.Load(path);
        lock (_learnLock)
        {
            if (_learner is null)
            {
                throw new InvalidOperationException("This engine does not learn, so it cannot use a profile: create it with EngineOptions.Learning.Enabled = true.");
            }

            _profileEntries = new(profile.Sites, StringComparer.Ordinal);
            _profileMatched.Clear();
            _profileScanned = 0;
            _profileStatus = new ProfileStatus(path, profile.Sites.Count, 0, profile.Sites.Count, profile.Sites.Values.Sum(t => t.Count), 0);
            ApplyProfileLocked();
            return _profileStatus with { UnmatchedSites = _profileEntries.Count - _profileMatched.Count };
        }
    }

    /// <summary>
    /// <see cref="LoadProfile"/> for expected failures (a missing or damaged file): false with the
    /// reason instead of an exception.
    /// </summary>
    public bool TryLoadProfile(string path, out ProfileStatus status, [System.Diagnostics.CodeAnalysis.NotNullWhen(false)] out string? error)
    {
        try
        {
            status = LoadProfile(path);
            error = null;
            return true;
        }
        catch (Exception e) when (e is ProfileException or InvalidOperationException or ArgumentException)
        {
            status = Profile;
            error = e.Message;
            return false;
        }
    }

    /// <summary>Seeds the sites bound since the last call that a loaded profile names (under the learning lock).</summary>
    private void ApplyProfileLocked()
    {
        if (_profileEntries.Count == 0 || _learner is null)
        {
            return;
        }

        TargetNames? resolver = null;
        for (; _profileScanned < _sitesById.Count; _profileScanned++)
        {
            var site = _sitesById[_profileScanned];
            if (!_profileEntries.TryGetValue(site.Name, out var entry))
            {
                continue;
            }

            resolver ??= new TargetNames(this);
            var histogram = new List<(ulong, double)>();
            var stale = 0;
            foreach (var target in entry)
            {
                if (resolver.Resolve(target) is { } address)
                {
                    histogram.Add((address, target.Count));
                }
                else
                {
                    stale++;
                }
            }

            _learner.Seed(site.LearningId, histogram);
            if (_profileMatched.Add(site.Name))
            {
                _profileStatus = _profileStatus with { AppliedSites = _profileStatus.AppliedSites + 1, StaleTargets = _profileStatus.StaleTargets + stale };
            }
        }
    }

    /// <summary>Names targets for profiles and finds them again: published blocks by name, else file-backed modules.</summary>
    private sealed class TargetNames(OptpolineEngine engine)
    {
        private readonly List<ProcMaps.Mapping> _maps = ProcMaps.Read();
        private Dictionary<string, CodeBlock>? _blocksByName;

        public ProfileTarget? Name(ulong address)
        {
            if (engine.Code.TryFindBlock(address, out var start, out _))
            {
                lock (engine._published)
                {
                    return engine._published.TryGetValue(start, out var entry)
                        ? new ProfileTarget { Block = entry.Name, Offset = (long)(address - start) }
                        : null;
                }
            }

            foreach (var map in _maps)
            {
                // A file another process can map too (not a memfd, not a deleted file).
                if (address >= map.Start && address < map.End && map.Path.StartsWith('/') && !map.Path.StartsWith("/memfd:", StringComparison.Ordinal) && !map.Path.EndsWith(" (deleted)", StringComparison.Ordinal))
                {
                    return new ProfileTarget { Module = map.Path, Offset = (long)(map.FileOffset + (address - map.Start)) };
                }
            }

            return null;
        }

        public ulong? Resolve(ProfileTarget target)
        {
            if (target.Block is { } name)
            {
                if (_blocksByName is null)
                {
                    lock (engine._published)
                    {
                        // A name given twice (the host's choice) names the block published first.
                        _blocksByName = [];
                        foreach (var (_, (block, blockName)) in engine._published.OrderBy(p => p.Key))
                        {
                            _blocksByName.TryAdd(blockName, block);
                        }
                    }
                }

                return _blocksByName.TryGetValue(name, out var found) && target.Offset < found.Size ? found.Address + (ulong)target.Offset : null;
            }

            var offset = (ulong)target.Offset;
            foreach (var map in _maps)
            {
                if (map.Path == target.Module && offset >= map.FileOffset && offset < map.FileOffset + (map.End - map.Start))
                {
                    return map.Start + (offset - map.FileOffset);
                }
            }

            return null;
        }
    }
}
