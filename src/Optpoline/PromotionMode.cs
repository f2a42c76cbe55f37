namespace Optpoline;

/// <summary>Who may promote targets into sites.</summary>
public enum PromotionMode
{
    /// <summary>The engine's learner promotes what it samples (the engine must learn); explicit promotions work too.</summary>
    Learn,

    /// <summary>Only explicit promotions by the host; the learner counts but changes nothing.</summary>
    Static,

    /// <summary>Every site stays on the fallback: switching to Off demotes them all, and promotions are refused.</summary>
    Off,
}
