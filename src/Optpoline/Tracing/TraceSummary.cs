namespace Optpoline.Tracing;

/// <summary>What a trace wrote, reported when it stops.</summary>
/// <param name="Directory">The trace directory.</param>
/// <param name="Files">The files written, by full path.</param>
/// <param name="TextPokes">PERF_RECORD_TEXT_POKE records (0 without text pokes).</param>
/// <param name="JitLoads">JIT_CODE_LOAD records (0 without a jitdump).</param>
public sealed record TraceSummary(string Directory, IReadOnlyList<string> Files, long TextPokes, ulong JitLoads);
