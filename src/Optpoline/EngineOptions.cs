using Optpoline.Emit;
using Optpoline.Memory;

namespace Optpoline;

/// <summary>How an engine is set up.</summary>
public sealed class EngineOptions
{
    /// <summary>
    /// Where unmatched targets go. Retpoline (default) keeps Spectre-v2 hardening; Indirect is a plain
    /// <c>jmp R</c> for hosts that do not need it.
    /// </summary>
    public FallbackKind Fallback { get; init; } = FallbackKind.Retpoline;

    /// <summary>Code memory placement and sizes.</summary>
    public CodeMemoryOptions Memory { get; init; } = new();
}
