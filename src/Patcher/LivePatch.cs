namespace Optpoline.Patcher;

/// <summary>A patch to live code and what a thread does if it arrives while the patch is in flight.</summary>
/// <param name="Patch">The bytes to change (validated against the code before anything is written).</param>
/// <param name="OnTrap">The equivalent path for a thread that hits the temporary int3 at the first byte.</param>
public sealed record LivePatch(CodePatch Patch, TrapAction OnTrap);
