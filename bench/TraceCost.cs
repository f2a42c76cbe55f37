using BenchmarkDotNet.Attributes;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tracing;

namespace Optpoline.Bench;

/// <summary>
/// What tracing adds to a 1000-site patch batch, in one run: the batch (promote every site, then
/// demote it) on an engine that does not trace and on one that writes text pokes and a jitdump, and
/// the recording alone: the 1000 TEXT_POKE records of a batch (one write) and the jitdump reload of
/// the block the batch changed. The batch's own time varies by a third from process to process (its
/// allocations); the recording alone is the steady measure of what tracing adds.
/// Every iteration starts fresh trace files (one invocation of two batches per iteration), so files
/// do not grow for ever: back-to-back batches write about 80 KB each, and a benchmark that keeps
/// appending would measure the kernel throttling gigabytes of dirty pages, not a batch. The trace
/// goes to /dev/shm (RAM) when it exists (set OPTPOLINE_BENCH_TRACE_DIR to measure a disk).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[MemoryDiagnoser]
public class TraceCost
{
    private const int Sites = 1000;
    private OptpolineEngine _engine = null!;
    private List<SiteUpdate> _promote = null!;
    private List<SiteUpdate> _demote = null!;
    private List<CodePatch> _patches = null!;
    private (ulong Address, int Length, string Name)[] _block = null!;
    private PerfDataWriter? _pokes;
    private JitDumpWriter? _jit;
    private string _directory = null!;

    /// <summary>What BatchTraced writes.</summary>
    public enum TraceOutputs
    {
        Both,
        TextPokes,
        JitDump,
    }

    [Params(TraceOutputs.Both, TraceOutputs.TextPokes, TraceOutputs.JitDump)]
    public TraceOutputs Outputs { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var root = Environment.GetEnvironmentVariable("OPTPOLINE_BENCH_TRACE_DIR") ?? (Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath());
        _directory = Path.Combine(root, $"optpoline-tracecost-{Environment.ProcessId}");
        Directory.CreateDirectory(Path.Combine(_directory, "alone"));
        _engine = new OptpolineEngine();
        var target = LoopKernels.EmitTargets(_engine, 1)[0];
        var sites = SiteBlock.Emit(_engine, Sites);
        _promote = [.. sites.Select(s => new SiteUpdate(s, [target]))];
        _demote = [.. sites.Select(s => new SiteUpdate(s, []))];

        // The records one batch writes when traced: a 10-byte slot per site, and the block of the sites.
        _patches = [.. sites.Select(s => new CodePatch(s.Address, new byte[10], Enumerable.Repeat((byte)0x90, 10).ToArray()))];
        var length = (int)(sites[^1].Address + (ulong)sites[^1].InlineLength - sites[0].Address);
        _block = [(sites[0].Address, length, "site_block")];
    }

    /// <summary>The same engine traces while BatchTraced runs, into fresh files every iteration.</summary>
    [IterationSetup(Target = nameof(BatchTraced))]
    public void StartTrace()
    {
        _engine.StartTracing(new TracingOptions
        {
            Directory = Path.Combine(_directory, "engine"),
            TextPokes = Outputs is TraceOutputs.Both or TraceOutputs.TextPokes,
            JitDump = Outputs is TraceOutputs.Both or TraceOutputs.JitDump,
        });
        Collect();
    }

    /// <summary>Both batch benchmarks start an iteration with a collected heap.</summary>
    [IterationSetup(Target = nameof(BatchUntraced))]
    public void Collect()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
    }

    [IterationCleanup(Target = nameof(BatchTraced))]
    public void StopTrace() => _engine.StopTracing();

    [IterationSetup(Targets = [nameof(RecordTextPokes), nameof(RecordJitDump)])]
    public void OpenWriters()
    {
        _pokes = new PerfDataWriter(Path.Combine(_directory, "alone", TraceFiles.TextPokes));
        _jit = new JitDumpWriter(Path.Combine(_directory, "alone"));
    }

    [IterationCleanup(Targets = [nameof(RecordTextPokes), nameof(RecordJitDump)])]
    public void CloseWriters()
    {
        _pokes?.Dispose();
        _jit?.Dispose();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _engine.Dispose();
        Directory.Delete(_directory, recursive: true);
    }

    /// <summary>One batch promoting every site, then one demoting them; no trace.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = 2)]
    public void BatchUntraced() => Run();

    /// <summary>The same batches on the same engine, writing text pokes and a jitdump.</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    public void BatchTraced() => Run();

    /// <summary>The text pokes of one 1000-site batch (written between its second and third core sync).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    public void RecordTextPokes()
    {
        _pokes!.TextPokes(_patches, PerfDataWriter.Now(), 1);
        _pokes!.TextPokes(_patches, PerfDataWriter.Now(), 1);
    }

    /// <summary>The jitdump reload of the block one batch changed (after the batch).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    public void RecordJitDump()
    {
        _jit!.CodeLoads(_block, 1);
        _jit!.CodeLoads(_block, 1);
    }

    private void Run()
    {
        _engine.PromoteAsync(_promote).Wait();
        _engine.PromoteAsync(_demote).Wait();
    }
}
