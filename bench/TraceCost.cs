using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using Optpoline.Patcher;
using Optpoline.Sites;

namespace Optpoline.Bench;

/// <summary>
/// What tracing (text pokes and a jitdump) adds to a 1000-site patch batch, in one run, at two levels:
/// <list type="bullet">
/// <item><c>Patcher</c>: the INT3-protocol batch itself, <see cref="LivePatcher.Apply"/> on the engine's
/// patcher with the 1000 slot patches the engine writes to promote the sites (then the 1000 that demote
/// them), recording included: text pokes written inside the int3 window and the jitdump reload of the
/// block after it.</item>
/// <item><c>Engine</c>: <see cref="OptpolineEngine.PromoteAsync(IReadOnlyList{SiteUpdate})"/> of the
/// same 1000 sites (promote, then demote), which adds the scheduler's planning to each batch.</item>
/// </list>
/// Each level has its untraced baseline. Batches run back to back (64 promote+demote pairs per
/// iteration): this is throughput, with no idle time for the trace's extender (see
/// <see cref="TraceLatency"/> for batches spaced as a host's epochs space them). Every iteration starts
/// fresh trace files, so files do not grow for ever (a benchmark that keeps appending would measure the
/// kernel throttling gigabytes of dirty pages), and runs 8 batches of each level before it is measured
/// (untraced too). See <see cref="TraceWorkload"/> for where the files go.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[MemoryDiagnoser]
[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
[Config(typeof(SteadyGc))]
public class TraceCost
{
    private TraceWorkload _workload = null!;

    [GlobalSetup]
    public void Setup() => _workload = new TraceWorkload();

    /// <summary>Traced benchmarks trace into fresh files every iteration.</summary>
    [IterationSetup(Targets = [nameof(PatcherTraced), nameof(EngineTraced)])]
    public void StartTrace()
    {
        _workload.StartTracing();
        Settle();
    }

    /// <summary>Untraced benchmarks start an iteration the same way, without a trace.</summary>
    [IterationSetup(Targets = [nameof(PatcherUntraced), nameof(EngineUntraced)])]
    public void Settle()
    {
        // A few batches first, as the interleaved harness does: what is measured is a trace (or no
        // trace) that is running, not the first writes into new files.
        GC.Collect();
        for (var i = 0; i < 4; i++)
        {
            Run();
            Patch();
        }
    }

    [IterationCleanup(Targets = [nameof(PatcherTraced), nameof(EngineTraced)])]
    public void StopTrace() => _workload.Engine.StopTracing();

    [GlobalCleanup]
    public void Cleanup() => _workload.Dispose();

    /// <summary>The patcher's batch of 1000 slot promotions, then the 1000 demotions; no trace.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = 2)]
    [BenchmarkCategory("Patcher")]
    public void PatcherUntraced() => Patch();

    /// <summary>The same batches with text pokes and a jitdump.</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Patcher")]
    public void PatcherTraced() => Patch();

    /// <summary>The engine promoting the 1000 sites, then demoting them; no trace.</summary>
    [Benchmark(Baseline = true, OperationsPerInvoke = 2)]
    [BenchmarkCategory("Engine")]
    public void EngineUntraced() => Run();

    /// <summary>The same requests with text pokes and a jitdump.</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    [BenchmarkCategory("Engine")]
    public void EngineTraced() => Run();

    /// <summary>
    /// In this process (<see cref="TraceJobs.InProcess"/>), a long warm-up (tiering settles only after a
    /// few thousand batches); gen0 collections happen every 40 batches or so, and count.
    /// </summary>
    private sealed class SteadyGc : ManualConfig
    {
        public SteadyGc() => AddJob(Job.Default.InProcess().WithInvocationCount(64).WithUnrollFactor(1).WithWarmupCount(30).WithIterationCount(20));
    }

    private void Patch()
    {
        _workload.Patch(promote: true);
        _workload.Patch(promote: false);
    }

    private void Run()
    {
        _workload.Run(promote: true);
        _workload.Run(promote: false);
    }
}
