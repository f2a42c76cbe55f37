using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

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

    /// <summary>Learning: sampling stubs, the epoch loop and the promotion policy.</summary>
    public LearningOptions Learning { get; init; } = new();

    /// <summary>Live patching: the thread-flush signal and timeout.</summary>
    public PatcherOptions Patching { get; init; } = new();

    /// <summary>Tracing from the moment the engine exists (null: off; start it later with <see cref="OptpolineEngine.StartTracing"/>).</summary>
    public Tracing.TracingOptions? Tracing { get; init; }

    /// <summary>
    /// Test-only: <c>pause</c> instructions emitted between a slot's compare and its call, to widen the
    /// window in which a thread can be preempted inside a slot. Production code leaves it at 0.
    /// </summary>
    internal int SlotWindowPauses { get; init; }

    /// <summary>
    /// Test-only: the address of a byte flag. When not 0, every slot spins between its compare and its
    /// call while the flag is non-zero (<c>movabs r11, flag; L: cmp byte [r11], 0; jne L</c>; r11 and
    /// the flags are dead there), so a test can park a thread inside the window on demand.
    /// </summary>
    internal ulong SlotWindowSpinFlag { get; init; }

    /// <summary>
    /// Test-only broken variant: promote into slots without waiting for a grace period. It exists so
    /// that the concurrency tests can show they catch the bug it introduces.
    /// </summary>
    internal bool UnsafeSkipGracePeriod { get; init; }
}
