namespace Optpoline.Sites;

/// <summary>How a site is laid out.</summary>
public enum SiteKind
{
    /// <summary>Compare-and-call slots emitted into the host's code; the miss path is an engine stub.</summary>
    Inline = 0,

    /// <summary>The host emits only <c>call Entry</c>; all dispatch happens in engine memory.</summary>
    Outline = 1,
}
