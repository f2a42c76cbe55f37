using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using Optpoline.Patcher;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tracing;

namespace Optpoline.Bench;

/// <summary>
/// What tracing (text pokes and a jitdump) adds to a 1000-site patch batch, in one run, at two levels:
/// <list type="bullet">
/// <item><c>Patcher</c>: the INT3-protocol batch itself, <see cref="LivePatcher.Apply"/> on the engine's
/// patcher with the 1000 slot patches the engine writes to promote the sites (then the 1000 that demote
/// them), recording included: text pokes taken inside the int3 window, the jitdump reload of the block
/// after it, and the wait for the previous batch's records before it starts.</item>
/// <item><c>Engine</c>: <see cref="OptpolineEngine.PromoteAsync(IReadOnlyList{SiteUpdate})"/> of the
/// same 1000 sites (promote, then demote), which adds the scheduler's planning to each batch.</item>
/// </list>
/// Each level has its untraced baseline, the default write-behind trace and write-through. Batches run
/// back to back (64 promote+demote pairs per iteration), so a write-behind trace's writer has only the
/// time between batches. Every iteration starts fresh trace files, so files do not grow for ever (a
/// benchmark that keeps appending would measure the kernel throttling gigabytes of dirty pages), and
/// runs 8 batches of each level before it is measured (untraced too). The files go to /dev/shm (RAM)
/// when it exists (set OPTPOLINE_BENCH_TRACE_DIR to measure a disk).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[MemoryDiagnoser]
[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
[Config(typeof(SteadyGc))]
public class TraceCost
{
    private const int Sites = 1000;
    private OptpolineEngine _engine = null!;
    private List<SiteUpdate> _promote = null!;
    private List<SiteUpdate> _demote = null!;
    private List<LivePatch> _promotePatches = null!;
    private List<LivePatch> _demotePatches = null!;
    private string _directory = null!;

    [GlobalSetup]
    public void Setup()
    {
        var root = Environment.GetEnvironmentVariable("OPTPOLINE_BENCH_TRACE_DIR") ?? (Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath());
        _directory = Path.Combine(root, $"optpoline-tracecost-{Environment.ProcessId}");
        _engine = new OptpolineEngine();
        var target = LoopKernels.EmitTargets(_engine, 1)[0];
        var sites = SiteBlock.Emit(_engine, Sites);
        _promote = [.. sites.Select(s => new SiteUpdate(s, [target]))];
        _demote = [.. sites.Select(s => new SiteUpdate(s, []))];

        // The patches of the steady cycle (the second promote and demote: each call already goes to the
        // target, so a batch is the 1000 slot heads), as the engine writes them, with its trap actions.
        _engine.PromoteAsync(_promote).Wait();
        _engine.PromoteAsync(_demote).Wait();
        var captured = new List<List<CodePatch>>();
        _engine.Scheduler.Patcher.BeforeVisible = patches => captured.Add([.. patches]);
        _engine.PromoteAsync(_promote).Wait();
        _engine.PromoteAsync(_demote).Wait();
        _engine.Scheduler.Patcher.BeforeVisible = null;
        var misses = sites.SelectMany(s => s.Slots).ToDictionary(s => s.Start, s => s.Miss);
        _promotePatches = [.. captured[0].Select(p => new LivePatch(p, TrapAction.ContinueAt(misses[p.Address])))];
        _demotePatches = [.. captured[1].Select(p => new LivePatch(p, TrapAction.ContinueAt(misses[p.Address])))];
        if (_promotePatches.Count != Sites || _demotePatches.Count != Sites)
        {
            throw new InvalidOperationException($"Expected {Sites} patches per batch, got {_promotePatches.Count} and {_demotePatches.Count}.");
        }
    }

    /// <summary>Traced benchmarks trace into fresh files every iteration, written behind.</summary>
    [IterationSetup(Targets = [nameof(PatcherTraced), nameof(EngineTraced)])]
    public void StartTrace() => Start(writeThrough: false);

    /// <summary>The same, written through (inside each batch's int3 window).</summary>
    [IterationSetup(Targets = [nameof(PatcherTracedWriteThrough), nameof(EngineTracedWriteThrough)])]
    public void StartTraceWriteThrough() => Start(writeThrough: true);

    /// <summary>Untraced benchmarks start an iteration the same way, without a trace.</summary>
    [IterationSetup(Targets = [nameof(PatcherUntraced), nameof(EngineUntraced)])]
    public void Settle()
    {
        // A few batches first, as the interleaved harness does: what is measured is a trace (or no
        // trace) that is running, not the first writes into new files by writer threads just started.
        GC.Collect();
        for (var i = 0; i < 4; i++)
        {
            Run();
            Patch();
        }

        _engine.FlushTrace();
    }

    [IterationCleanup(Targets = [nameof(PatcherTraced), nameof(EngineTraced), nameof(PatcherTracedWriteThrough), nameof(EngineTracedWriteThrough)])]
    public void StopTrace() => _engine.StopTracing();

    [GlobalCleanup]
    public void Cleanup()
    {
        _engine.Dispose();
        if (Directory.Exists(_directory))
        {
            Directory.Delete(_directory, recursive: true);
        }
    }

    /// <summary>The patcher's batch of 1000 slot promotions, then the 1000 demotions; no trace.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = 2)]
    [BenchmarkCategory("Patcher")]
    public void PatcherUntraced() => Patch();

    /// <summary>The same batches with text pokes and a jitdump, written behind (the default).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Patcher")]
    public void PatcherTraced() => Patch();

    /// <summary>The same batches with text pokes and a jitdump, written through.</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Patcher")]
    public void PatcherTracedWriteThrough() => Patch();

    /// <summary>The engine promoting the 1000 sites, then demoting them; no trace.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = 2)]
    [BenchmarkCategory("Engine")]
    public void EngineUntraced() => Run();

    /// <summary>The same requests with text pokes and a jitdump, written behind (the default).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Engine")]
    public void EngineTraced() => Run();

    /// <summary>The same requests with text pokes and a jitdump, written through.</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Engine")]
    public void EngineTracedWriteThrough() => Run();

    /// <summary>
    /// The batch allocates about 1.5 MB (the scheduler's plan), so its time follows the GC's dynamic gen0
    /// budget, which differs from process to process by up to 40 % here: more than the effect measured.
    /// Every case runs with the same fixed 64 MB gen0 budget (DOTNET_GCgen0size; collections still
    /// happen, every 40 batches or so, and count), a long warm-up (tiering settles only after a few
    /// thousand batches) and three launches, whose results are pooled.
    /// </summary>
    private sealed class SteadyGc : ManualConfig
    {
        public SteadyGc() => AddJob(Job.Default
            .WithEnvironmentVariables(new EnvironmentVariable("DOTNET_GCgen0size", "0x4000000"))
            .WithLaunchCount(3).WithInvocationCount(64).WithUnrollFactor(1).WithWarmupCount(30).WithIterationCount(20));
    }

    private void Start(bool writeThrough)
    {
        _engine.StartTracing(new TracingOptions { Directory = _directory, WriteThrough = writeThrough });
        Settle();
    }

    private void Patch()
    {
        _engine.Scheduler.Patcher.Apply(_engine.Code, _promotePatches);
        _engine.Scheduler.Patcher.Apply(_engine.Code, _demotePatches);
    }

    private void Run()
    {
        _engine.PromoteAsync(_promote).Wait();
        _engine.PromoteAsync(_demote).Wait();
    }
}
