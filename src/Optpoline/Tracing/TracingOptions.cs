namespace Optpoline.Tracing;

/// <summary>What a trace writes, and where.</summary>
public sealed class TracingOptions
{
    /// <summary>The directory the trace files go to (created if missing; files of an earlier trace of this process are replaced).</summary>
    public required string Directory { get; init; }

    /// <summary>
    /// Write <c>text-poke.data</c> (perf.data: a PERF_RECORD_TEXT_POKE for every change, COMM and MMAP2)
    /// and the start and end images (<c>snapshot-start.bin</c>, <c>snapshot-end.bin</c>) that replay
    /// needs. Default true.
    /// </summary>
    public bool TextPokes { get; init; } = true;

    /// <summary>Write <c>jit-PID.dump</c> for <c>perf inject --jit</c>. Default true.</summary>
    public bool JitDump { get; init; } = true;

    internal void Validate()
    {
        if (string.IsNullOrWhiteSpace(Directory))
        {
            throw new ArgumentException("TracingOptions.Directory must name a directory.", nameof(Directory));
        }

        if (!TextPokes && !JitDump)
        {
            throw new ArgumentException("TracingOptions selects no output: set TextPokes, JitDump or both.", nameof(TextPokes));
        }
    }
}
