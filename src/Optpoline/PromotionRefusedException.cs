namespace Optpoline;

/// <summary>A promotion was refused by policy (promotion is off, or the site filter excludes the site); nothing was changed.</summary>
public sealed class PromotionRefusedException : InvalidOperationException
{
    /// <summary>Creates the exception.</summary>
    public PromotionRefusedException()
    {
    }

    /// <summary>Creates the exception with a message.</summary>
    public PromotionRefusedException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception with a message and a cause.</summary>
    public PromotionRefusedException(string message, Exception innerException)
        : base(message, innerException)
    {
    }
}
