using Optpoline.Memory;
using Optpoline.Patcher.Tracing;
using Optpoline.Platform;

namespace Optpoline.Tracing;

/// <summary>
/// One running trace of an engine: the perf.data text pokes, the jitdump and the start and end images.
/// The engine calls it with its locks held, in the order patch lock, published blocks, code memory;
/// the writers' own locks come last, and nothing here calls back into the engine.
/// </summary>
internal sealed class TraceSession : ICodeMemoryObserver, IDisposable
{
    private readonly List<string> _files = [];

    public TraceSession(TracingOptions options)
    {
        options.Validate();
        Options = options;
        Directory = Path.GetFullPath(options.Directory);
        System.IO.Directory.CreateDirectory(Directory);
        try
        {
            if (options.TextPokes)
            {
                Pokes = new PerfDataWriter(Path.Combine(Directory, TraceFiles.TextPokes));
                _files.Add(Pokes.Path);
                // A stale end image of an earlier trace would pair with this one's pokes.
                File.Delete(Path.Combine(Directory, TraceFiles.EndSnapshot));
            }

            if (options.JitDump)
            {
                Jit = new JitDumpWriter(Directory);
                _files.Add(Jit.Path);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public TracingOptions Options { get; }

    public string Directory { get; }

    public PerfDataWriter? Pokes { get; }

    public JitDumpWriter? Jit { get; }

    /// <summary>Tells both writers when the engine is busy, so that mapping their files ahead waits for a quiet moment.</summary>
    public void HostBusy(Func<bool> busy)
    {
        Pokes?.HostBusy = busy;
        Jit?.HostBusy = busy;
    }

    /// <summary>When the trace started (the start image's time).</summary>
    public ulong StartTime { get; private set; }

    /// <summary>Under the memory lock, at the start: names the process and the regions, and writes the start image.</summary>
    public void Begin(IReadOnlyList<(ulong Start, ulong Size, ulong Committed)> regions)
    {
        var now = PerfDataWriter.Now();
        StartTime = now;
        if (Pokes is null)
        {
            return;
        }

        Pokes.Comm(Path.GetFileName(Environment.ProcessPath) ?? "dotnet", Environment.ProcessId, now);
        foreach (var (start, size, _) in regions)
        {
            Pokes.Mmap2(start, size, MemfdPageProvider.MapsName, now);
        }

        WriteImage(TraceFiles.StartSnapshot, regions, now);
    }

    /// <summary>Under the memory lock, at the stop: writes the end image.</summary>
    public void Finish(IReadOnlyList<(ulong Start, ulong Size, ulong Committed)> regions)
    {
        if (Pokes is not null)
        {
            WriteImage(TraceFiles.EndSnapshot, regions, PerfDataWriter.Now());
        }
    }

    /// <summary>A block became code: its bytes replace the int3 it held since allocation.</summary>
    public void Published(CodeBlock block, string name)
    {
        var code = block.GetExecutableSpan();
        var now = PerfDataWriter.Now();   // one time for both records: the block has this name from then on
        try
        {
            Pokes?.TextPoke(block.Address, Int3s(code.Length), code, now, LinuxOs.Gettid());
            Jit?.CodeLoad(block.Address, code, name, LinuxOs.Gettid(), now);
        }
        catch (IOException)
        {
            // A trace that cannot write does not stop the host's code: the failure stays with the
            // writer, refuses the next patch batch and is thrown by StopTracing.
        }
    }

    /// <summary>
    /// Blocks a patch batch changed, as they are now. Runs after the batch is applied, so it never throws
    /// for a failed trace (the engine's view of the sites must follow the bytes): see <see cref="Published"/>.
    /// </summary>
    public void Patched(IReadOnlyList<(ulong Address, int Length, string Name)> blocks)
    {
        try
        {
            Jit?.CodeLoads(blocks, LinuxOs.Gettid());
        }
        catch (IOException)
        {
        }
    }

    /// <summary>Blocks published before the trace started, as they were at its start.</summary>
    public void Existing(IReadOnlyList<(ulong Address, int Length, string Name)> blocks) => Jit?.CodeLoads(blocks, LinuxOs.Gettid(), StartTime);

    public void RegionReserved(ulong start, ulong size)
    {
        try
        {
            Pokes?.Mmap2(start, size, MemfdPageProvider.MapsName, PerfDataWriter.Now());
        }
        catch (IOException)
        {
        }
    }

    public void BlockFreeing(ulong address, ReadOnlySpan<byte> code)
    {
        try
        {
            Pokes?.TextPoke(address, code, Int3s(code.Length), PerfDataWriter.Now(), LinuxOs.Gettid());
        }
        catch (IOException)
        {
        }
    }

    /// <summary>The first failed write of the trace's files, if any (after <see cref="Dispose"/>: of the whole trace).</summary>
    public IOException? Failure => Pokes?.Failure ?? Jit?.Failure;

    public TraceSummary Summary() => new(Directory, [.. _files], Pokes?.TextPokeRecords ?? 0, Jit?.Loads ?? 0);

    public void Dispose()
    {
        Pokes?.Dispose();
        Jit?.Dispose();
    }

    /// <summary>What code memory holds outside live blocks.</summary>
    private static byte[] Int3s(int length)
    {
        var bytes = new byte[length];
        bytes.AsSpan().Fill(0xCC);
        return bytes;
    }

    private void WriteImage(string file, IReadOnlyList<(ulong Start, ulong Size, ulong Committed)> regions, ulong time)
    {
        var path = Path.Combine(Directory, file);
        CodeSnapshot.WriteLive(path, Environment.ProcessId, time, regions);
        if (!_files.Contains(path))
        {
            _files.Add(path);
        }
    }
}
