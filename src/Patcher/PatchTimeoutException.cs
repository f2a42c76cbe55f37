namespace Optpoline.Patcher;

/// <summary>
/// A thread flush did not complete in time (a thread blocked the flush signal, or is stopped), so the
/// work that needed it was rolled back: every site is in its state from before the request.
/// </summary>
public sealed class PatchTimeoutException : Exception
{
    /// <summary>Creates the exception.</summary>
    public PatchTimeoutException() : this("A thread flush timed out; the change was rolled back.")
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public PatchTimeoutException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public PatchTimeoutException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
