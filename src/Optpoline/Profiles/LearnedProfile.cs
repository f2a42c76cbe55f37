using System.Text.Json;
using System.Text.Json.Serialization;

namespace Optpoline.Profiles;

/// <summary>
/// What an engine learned, saved so that a restarted host promotes from its first epoch: per site
/// name, the sampled target histogram, with each target named so that it can be found again in
/// another process (a block of engine code by its published name and an offset, or a file-backed
/// module by its path and a file offset). Written by <see cref="OptpolineEngine.SaveProfile"/>, read
/// by <see cref="OptpolineEngine.LoadProfile"/>, combined by <see cref="Merge"/>.
/// </summary>
/// <remarks>
/// Counts are whole samples, so merging is exact: it adds them, and any grouping or order of the same
/// profiles gives the same result.
/// </remarks>
public sealed class LearnedProfile
{
    /// <summary>The value of <see cref="Format"/> in every profile.</summary>
    public const string FormatName = "optpoline-profile";

    /// <summary>The only <see cref="Version"/> this engine reads and writes.</summary>
    public const int CurrentVersion = 1;

    /// <summary>Always <see cref="FormatName"/>: tells a profile from other JSON.</summary>
    public string Format { get; set; } = FormatName;

    /// <summary>The file layout's version.</summary>
    public int Version { get; set; } = CurrentVersion;

    /// <summary>Per site name, its targets, hottest first.</summary>
    public SortedDictionary<string, List<ProfileTarget>> Sites { get; set; } = new(StringComparer.Ordinal);

    /// <summary>Reads a profile.</summary>
    /// <exception cref="ProfileException">The file cannot be read, is not JSON, or is not a profile of this version; the message names the path (and line and column).</exception>
    public static LearnedProfile Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ProfileException($"{path}: cannot read the profile: {e.Message}", e);
        }

        return Parse(text, path);
    }

    /// <summary>Parses a profile's text; <paramref name="path"/> names it in errors.</summary>
    /// <exception cref="ProfileException">Not JSON, or not a profile of this version.</exception>
    public static LearnedProfile Parse(string text, string path)
    {
        ArgumentNullException.ThrowIfNull(text);
        LearnedProfile? profile;
        try
        {
            profile = JsonSerializer.Deserialize(text, ProfileJsonContext.Default.LearnedProfile);
        }
        catch (JsonException e)
        {
            var where = e.LineNumber is { } line ? $":{line + 1}:{(e.BytePositionInLine ?? 0) + 1}" : string.Empty;
            throw new ProfileException($"{path}{where}: not a valid profile: {e.Message}", e);
        }

        if (profile is null || profile.Format != FormatName)
        {
            throw new ProfileException($"{path}: not an Optpoline profile (\"format\" is not \"{FormatName}\").");
        }

        if (profile.Version != CurrentVersion)
        {
            throw new ProfileException($"{path}: profile version {profile.Version}; this engine reads version {CurrentVersion}.");
        }

        foreach (var (site, targets) in profile.Sites)
        {
            if (targets is null || targets.Any(t => t is null || t.Count < 0 || (t.Block is null) == (t.Module is null) || t.Offset < 0))
            {
                throw new ProfileException($"{path}: site '{site}': every target needs a non-negative count and offset, and exactly one of \"block\" and \"module\".");
            }
        }

        return profile;
    }

    /// <summary>Writes the profile (indented JSON), replacing <paramref name="path"/> in one rename.</summary>
    /// <exception cref="ProfileException">The file cannot be written.</exception>
    public void Save(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var temporary = $"{path}.{Environment.ProcessId}.tmp";
        try
        {
            File.WriteAllText(temporary, JsonSerializer.Serialize(this, ProfileJsonContext.Default.LearnedProfile));
            File.Move(temporary, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            File.Delete(temporary);
            throw new ProfileException($"{path}: cannot write the profile: {e.Message}", e);
        }
    }

    /// <summary>
    /// Combines profiles (of several runs or machines): a target's counts add up per site, and each
    /// site's targets are sorted hottest first (then by name). Associative and commutative.
    /// </summary>
    public static LearnedProfile Merge(IEnumerable<LearnedProfile> profiles)
    {
        ArgumentNullException.ThrowIfNull(profiles);
        var merged = new LearnedProfile();
        var sums = new Dictionary<(string Site, string? Block, string? Module, long Offset), long>();
        foreach (var profile in profiles)
        {
            foreach (var (site, targets) in profile.Sites)
            {
                foreach (var target in targets)
                {
                    var key = (site, target.Block, target.Module, target.Offset);
                    sums[key] = checked(sums.GetValueOrDefault(key) + target.Count);
                }
            }
        }

        foreach (var group in sums.GroupBy(s => s.Key.Site))
        {
            merged.Sites[group.Key] = [.. group
                .Select(s => new ProfileTarget { Block = s.Key.Block, Module = s.Key.Module, Offset = s.Key.Offset, Count = s.Value })
                .OrderByDescending(t => t.Count).ThenBy(t => t.Block, StringComparer.Ordinal).ThenBy(t => t.Module, StringComparer.Ordinal).ThenBy(t => t.Offset)];
        }

        return merged;
    }
}

/// <summary>One target of a site in a profile: where it is, and how often it was sampled.</summary>
public sealed class ProfileTarget
{
    /// <summary>The name of the published block of engine code it lies in (null for a module target).</summary>
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? Block { get; set; }

    /// <summary>The path of the file-backed module it lies in (null for a block target).</summary>
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? Module { get; set; }

    /// <summary>Offset from the block's start, or the file offset in the module.</summary>
    public long Offset { get; set; }

    /// <summary>Samples (whole; merged profiles add them).</summary>
    public long Count { get; set; }

    /// <inheritdoc/>
    public override string ToString() => $"{Block ?? Module}+0x{Offset:x}";
}

/// <summary>A profile could not be read or written; the message names the file.</summary>
public sealed class ProfileException : Exception
{
    /// <summary>Creates the exception.</summary>
    public ProfileException()
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public ProfileException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception with a message and its cause.</summary>
    public ProfileException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}

/// <summary>Source-generated (de)serialization, so profiles work under NativeAOT.</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase,
    ReadCommentHandling = JsonCommentHandling.Skip,
    AllowTrailingCommas = true,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    WriteIndented = true)]
[JsonSerializable(typeof(LearnedProfile))]
internal sealed partial class ProfileJsonContext : JsonSerializerContext
{
}
