using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using Optpoline.Patcher;
using Optpoline.Sites;

namespace Optpoline.Bench;

/// <summary>
/// The latency of one 1000-site patch batch with tracing (text pokes and a jitdump) against without,
/// in one run, at the same two levels as <see cref="TraceCost"/> (<c>Engine</c>:
/// <see cref="OptpolineEngine.PromoteAsync(IReadOnlyList{SiteUpdate})"/>; <c>Patcher</c>:
/// <see cref="LivePatcher.Apply"/> of the engine's 1000 slot patches). Each measured invocation is one
/// batch, promoting or demoting in turn, after a <see cref="Gap"/> with nothing running: a host's
/// batches come from learning epochs (100 ms apart by default), so this is a batch as a host sees it,
/// with the idle time the trace's extender uses to map the file ahead. <see cref="TraceCost"/> measures
/// batches back to back, where it has none.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[MemoryDiagnoser]
[GroupBenchmarksBy(BenchmarkLogicalGroupRule.ByCategory)]
[CategoriesColumn]
[Config(typeof(Spaced))]
public class TraceLatency
{
    /// <summary>Idle time before each batch: 20 times the rate of the default learning epoch.</summary>
    public static readonly TimeSpan Gap = TimeSpan.FromMilliseconds(5);

    private TraceWorkload _workload = null!;
    private bool _promote;

    [GlobalSetup(Targets = [nameof(EngineUntraced), nameof(PatcherUntraced)])]
    public void Setup() => Warm(traced: false);

    [GlobalSetup(Targets = [nameof(EngineTraced), nameof(PatcherTraced)])]
    public void SetupTraced() => Warm(traced: true);

    /// <summary>The gap, then the other direction (a promote after a demote and back).</summary>
    [IterationSetup]
    public void Idle()
    {
        Thread.Sleep(Gap);
        _promote = !_promote;
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _workload.Engine.StopTracing();
        _workload.Dispose();
    }

    /// <summary>One protocol batch of 1000 slot patches; no trace.</summary>
    [Benchmark(Baseline = true)]
    [BenchmarkCategory("Patcher")]
    public void PatcherUntraced() => _workload.Patch(_promote);

    /// <summary>The same with text pokes and a jitdump.</summary>
    [Benchmark]
    [BenchmarkCategory("Patcher")]
    public void PatcherTraced() => _workload.Patch(_promote);

    /// <summary>The engine promoting or demoting the 1000 sites; no trace.</summary>
    [Benchmark(Baseline = true)]
    [BenchmarkCategory("Engine")]
    public void EngineUntraced() => _workload.Run(_promote);

    /// <summary>The same with text pokes and a jitdump.</summary>
    [Benchmark]
    [BenchmarkCategory("Engine")]
    public void EngineTraced() => _workload.Run(_promote);

    /// <summary>
    /// Tiering settles after about a thousand batches: 400 promote+demote pairs at each level first, and
    /// 50 more with the trace running (traced cases) or not.
    /// </summary>
    private void Warm(bool traced)
    {
        _workload = new TraceWorkload();
        for (var i = 0; i < 450; i++)
        {
            if (i == 400 && traced)
            {
                _workload.StartTracing();
            }

            _workload.Run(promote: true);
            _workload.Run(promote: false);
            _workload.Patch(promote: true);
            _workload.Patch(promote: false);
        }
    }

    /// <summary>
    /// One batch per iteration (each after its gap), in this process (<see cref="TraceJobs.InProcess"/>).
    /// No forced collection between iterations: with one batch per iteration that would be a full GC
    /// before every batch, which then runs on a cold heap (batches measured 0.8 to 10 ms that way); gen0
    /// collections happen as they do in a host, every 40 batches or so.
    /// </summary>
    private sealed class Spaced : ManualConfig
    {
        public Spaced() => AddJob(Job.Default.InProcess().WithGcForce(false).WithInvocationCount(1).WithUnrollFactor(1).WithWarmupCount(50).WithIterationCount(400));
    }
}
