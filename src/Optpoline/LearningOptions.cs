using Optpoline.Learning;

namespace Optpoline;

/// <summary>Whether and how the engine learns which targets to promote.</summary>
public sealed class LearningOptions
{
    /// <summary>
    /// Sites fall back through sampling stubs and the engine promotes by itself. Off (the default),
    /// sites fall back straight to the thunk (learning costs nothing) and change only on explicit requests.
    /// </summary>
    public bool Enabled { get; init; }

    /// <summary>The engine's own thread ends an epoch every <see cref="EpochInterval"/>; false: the host calls <see cref="OptpolineEngine.LearnEpoch"/>.</summary>
    public bool Background { get; init; } = true;

    /// <summary>Epoch length of the background learner.</summary>
    public TimeSpan EpochInterval { get; init; } = TimeSpan.FromMilliseconds(100);

    /// <summary>One sample every this many fallback calls, per CPU (all sites of a CPU share the countdown).</summary>
    public int SamplePeriod { get; init; } = 64;

    /// <summary>Samples each CPU's ring holds between two epochs; more are lost (counted in statistics).</summary>
    public int RingCapacity { get; init; } = 16384;

    /// <summary>The promotion policy.</summary>
    public LearnerOptions Policy { get; init; } = new();
}
