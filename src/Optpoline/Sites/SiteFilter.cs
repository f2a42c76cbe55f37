using System.Text.RegularExpressions;

namespace Optpoline.Sites;

/// <summary>
/// Which sites may be promoted, by name: a site is allowed when it matches an include pattern (none:
/// every site) and no exclude pattern. Patterns are globs: <c>*</c> any run of characters, <c>?</c> one.
/// </summary>
public sealed class SiteFilter
{
    private readonly Regex[] _include;
    private readonly Regex[] _exclude;

    /// <summary>Builds a filter.</summary>
    /// <exception cref="ArgumentException">A pattern is empty.</exception>
    public SiteFilter(IReadOnlyList<string>? include = null, IReadOnlyList<string>? exclude = null)
    {
        Include = include ?? [];
        Exclude = exclude ?? [];
        _include = [.. Include.Select(Compile)];
        _exclude = [.. Exclude.Select(Compile)];
    }

    /// <summary>The filter that allows every site.</summary>
    public static SiteFilter All { get; } = new();

    /// <summary>Include patterns (empty: every site).</summary>
    public IReadOnlyList<string> Include { get; }

    /// <summary>Exclude patterns.</summary>
    public IReadOnlyList<string> Exclude { get; }

    /// <summary>Whether a site named <paramref name="name"/> may be promoted; when not, <paramref name="reason"/> says which pattern decided.</summary>
    public bool Allows(string name, out string? reason)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (_include.Length > 0 && !_include.Any(r => r.IsMatch(name)))
        {
            reason = $"it matches no sites.include pattern ({string.Join(", ", Include)})";
            return false;
        }

        for (var i = 0; i < _exclude.Length; i++)
        {
            if (_exclude[i].IsMatch(name))
            {
                reason = $"it matches the sites.exclude pattern '{Exclude[i]}'";
                return false;
            }
        }

        reason = null;
        return true;
    }

    private static Regex Compile(string pattern)
    {
        if (string.IsNullOrEmpty(pattern))
        {
            throw new ArgumentException("A site name pattern cannot be empty.", nameof(pattern));
        }

        var regex = "^" + Regex.Escape(pattern).Replace(@"\*", ".*", StringComparison.Ordinal).Replace(@"\?", ".", StringComparison.Ordinal) + "$";
        return new Regex(regex, RegexOptions.CultureInvariant | RegexOptions.Singleline);
    }
}
