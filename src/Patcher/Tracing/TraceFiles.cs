namespace Optpoline.Patcher.Tracing;

/// <summary>The files of a trace directory.</summary>
public static class TraceFiles
{
    /// <summary>The perf.data file with a PERF_RECORD_TEXT_POKE for every change, and COMM/MMAP2 records.</summary>
    public const string TextPokes = "text-poke.data";

    /// <summary>The bytes of every region when tracing started.</summary>
    public const string StartSnapshot = "snapshot-start.bin";

    /// <summary>The bytes of every region when tracing stopped (absent after a crash).</summary>
    public const string EndSnapshot = "snapshot-end.bin";

    /// <summary>The jitdump of process <paramref name="pid"/> (<c>jit-PID.dump</c>).</summary>
    public static string JitDump(int pid) => JitDumpWriter.FileName(pid);
}
