namespace Optpoline;

/// <summary>
/// Marks a member whose indirect calls the host emits as engine sites that may be promoted:
/// <c>optpoline scan</c> reads it from the assembly's metadata (without loading it) and adds the site
/// name pattern to <c>sites.include</c>. The engine itself does not read attributes at run time.
/// </summary>
/// <remarks>
/// The pattern (<c>*</c> and <c>?</c>, as in <see cref="Sites.SiteFilter"/>) defaults to
/// <c>Namespace.Type.Member*</c>: name the sites a member's code emits after the member.
/// </remarks>
[AttributeUsage(AttributeTargets.Method | AttributeTargets.Field | AttributeTargets.Property | AttributeTargets.Constructor, AllowMultiple = true, Inherited = false)]
public sealed class PromoteCallsAttribute : Attribute
{
    /// <summary>Sites named after the member: <c>Namespace.Type.Member*</c>.</summary>
    public PromoteCallsAttribute()
    {
    }

    /// <summary>Sites whose names match <paramref name="sitePattern"/>.</summary>
    public PromoteCallsAttribute(string sitePattern) => SitePattern = sitePattern;

    /// <summary>The site name pattern; null: <c>Namespace.Type.Member*</c>.</summary>
    public string? SitePattern { get; }
}

/// <summary>
/// Marks a member whose sites must stay on the fallback (for example code that must not change while
/// it runs, or targets a host wants to keep out of direct reach): <c>optpoline scan</c> adds the site
/// name pattern to <c>sites.exclude</c>, which wins over <c>sites.include</c>.
/// </summary>
/// <remarks>The pattern defaults to <c>Namespace.Type.Member*</c>, as for <see cref="PromoteCallsAttribute"/>.</remarks>
[AttributeUsage(AttributeTargets.Method | AttributeTargets.Field | AttributeTargets.Property | AttributeTargets.Constructor, AllowMultiple = true, Inherited = false)]
public sealed class NeverPromoteAttribute : Attribute
{
    /// <summary>Sites named after the member: <c>Namespace.Type.Member*</c>.</summary>
    public NeverPromoteAttribute()
    {
    }

    /// <summary>Sites whose names match <paramref name="sitePattern"/>.</summary>
    public NeverPromoteAttribute(string sitePattern) => SitePattern = sitePattern;

    /// <summary>The site name pattern; null: <c>Namespace.Type.Member*</c>.</summary>
    public string? SitePattern { get; }
}
