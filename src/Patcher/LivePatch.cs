namespace Optpoline.Patcher;

/// <summary>A patch to live code and what a thread does if it arrives while the patch is in flight.</summary>
/// <param name="Patch">The bytes to change (validated against the code before anything is written).</param>
/// <param name="OnTrap">The equivalent path for a thread that hits the temporary int3 at the first byte.</param>
public sealed record LivePatch(CodePatch Patch, TrapAction OnTrap)
{
    /// <summary>
    /// Whether the batch must restart every restartable window right after its int3s are armed and
    /// synced (<see cref="LivePatcher.RestartWindows"/>): for bytes inside a window that a thread may
    /// have entered before the int3 (a reused chain slot); after that fence no thread is past the int3.
    /// </summary>
    public bool FenceAfterArming { get; init; }
}
