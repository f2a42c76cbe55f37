namespace Optpoline;

/// <summary>What one learning epoch did.</summary>
public sealed class LearningEpochEventArgs : EventArgs
{
    internal LearningEpochEventArgs(long epoch, int samples, int dropped, int changes, Task applied)
    {
        Epoch = epoch;
        Samples = samples;
        DroppedSamples = dropped;
        Changes = changes;
        Applied = applied;
    }

    /// <summary>The epoch number (1 for the first).</summary>
    public long Epoch { get; }

    /// <summary>Samples drained from the rings.</summary>
    public int Samples { get; }

    /// <summary>Samples whose key named no site (torn, or a site removed).</summary>
    public int DroppedSamples { get; }

    /// <summary>Site changes requested.</summary>
    public int Changes { get; }

    /// <summary>Completes when the requested changes are in place (some wait for the next grace period).</summary>
    public Task Applied { get; }
}
