namespace Optpoline.Patcher;

/// <summary>
/// A batch of patches was refused before any byte was written: the code did not hold the expected
/// bytes, or two patches overlapped. The code is unchanged.
/// </summary>
public sealed class PatchRejectedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public PatchRejectedException() : this("A patch batch was rejected; the code is unchanged.")
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public PatchRejectedException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public PatchRejectedException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
