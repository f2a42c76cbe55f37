namespace Optpoline.Patcher;

/// <summary>Asking from another thread whether a lock is held, for work that should wait until it is not.</summary>
internal static class LockProbe
{
    /// <summary>Whether some thread holds <paramref name="gate"/>: asking takes it for an instant when it is free.</summary>
    public static bool IsHeld(this Lock gate)
    {
        if (!gate.TryEnter())
        {
            return true;
        }

        gate.Exit();
        return false;
    }
}
