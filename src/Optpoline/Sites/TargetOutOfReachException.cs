namespace Optpoline.Sites;

/// <summary>
/// A promotion named a target that a direct call from the site cannot reach (rel32, +-2 GiB). Promoting
/// it would need an indirect branch, which is what a site exists to avoid, so the site is unchanged.
/// Allocate the host's code from the engine's code memory, or choose an anchor near the target.
/// </summary>
public sealed class TargetOutOfReachException : Exception
{
    /// <summary>Creates the exception.</summary>
    public TargetOutOfReachException() : this("A target is out of direct reach of the site.")
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public TargetOutOfReachException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public TargetOutOfReachException(string message, Exception innerException) : base(message, innerException)
    {
    }

    /// <summary>The targets that are out of reach.</summary>
    public IReadOnlyList<ulong> Targets { get; init; } = [];
}
