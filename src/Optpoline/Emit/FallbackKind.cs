namespace Optpoline.Emit;

/// <summary>What a site does with a target that no slot matched.</summary>
public enum FallbackKind
{
    /// <summary>
    /// A retpoline thunk (the kernel's <c>__x86_indirect_thunk_R</c>): safe against Spectre-v2 branch
    /// target injection. The default, and the reason the engine exists.
    /// </summary>
    Retpoline = 0,

    /// <summary>
    /// A plain <c>jmp R</c>: for hosts that do not need Spectre-v2 hardening and want the cheapest
    /// miss path.
    /// </summary>
    Indirect = 1,
}
