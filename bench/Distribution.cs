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

    /// <summary>16 targets, Zipf (target k with weight 1/k).</summary>
    Zipf16,

    /// <summary>A phase change: 90 % / 10 % over targets 0 and 1, then the same over targets 2 and 3 (benchmarks that support it).</summary>
    Phases,
}
