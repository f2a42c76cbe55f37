namespace Optpoline.Patcher;

/// <summary>
/// A critical range for a thread flush: a thread interrupted with RIP in [<see cref="Start"/>,
/// <see cref="End"/>) is moved to <see cref="Redirect"/>, an equivalent safe point (for a slot, its
/// start; for a retired outline chain, the register's fallback thunk).
/// </summary>
public readonly record struct FlushRange(ulong Start, ulong End, ulong Redirect);
