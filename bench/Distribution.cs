namespace Optpoline.Bench;

/// <summary>Which targets a site sees, and how often.</summary>
public enum Distribution
{
    /// <summary>One target.</summary>
    Mono,

    /// <summary>Two targets, 90 % / 10 %.</summary>
    Bi90,

    /// <summary>Three targets, uniform.</summary>
    Uniform3,

    /// <summary>64 targets, uniform (megamorphic).</summary>
    Mega64,
}
