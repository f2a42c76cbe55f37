namespace Optpoline.Memory;

/// <summary>
/// No code memory could be had within reach of the anchor: every region is full and no new region
/// fits (the reach window is taken, <see cref="CodeMemoryOptions.MaxRegions"/> is reached, or the OS
/// refused memory).
/// </summary>
public sealed class CodeMemoryExhaustedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CodeMemoryExhaustedException() : this("Code memory is exhausted.")
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public CodeMemoryExhaustedException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public CodeMemoryExhaustedException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
