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

    /// <summary>
    /// Write every patch batch's records on the patching thread, before its changes can be visible to
    /// another thread (inside the batch's int3 window), instead of on the trace's writer threads. Default
    /// false (write-behind): records are taken with their times in the int3 window as well, and the
    /// next batch waits until they are on file, so a crash loses at most the last batch's records either
    /// way; write-through also keeps them when the process dies inside that batch, and costs every batch
    /// the encoding and the writes (bench/results/TraceCost.md).
    /// </summary>
    public bool WriteThrough { get; init; }

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
