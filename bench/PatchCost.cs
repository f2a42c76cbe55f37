using BenchmarkDotNet.Attributes;
using Optpoline.Patcher;
using Optpoline.Sites;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>
/// What live patching costs: one repromotion (demote, shared grace period, promote), batches of
/// promotions and demotions of 1 to 10,000 sites (3 core syncs per batch whatever its size), and a
/// plain membarrier core sync as the unit of cost. The counters per batch are in the CoreSyncs and
/// Flushes columns, replayed in the host process.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[PatchCounterColumns]
public class PatchCost
{
    private OptpolineEngine _engine = null!;
    private ulong[] _targets = null!;
    private List<SiteUpdate> _promote = null!;
    private List<SiteUpdate> _demote = null!;
    private InlineSite _single = null!;
    private int _flip;
    private Optpoline.Patcher.Native.PatchRuntime _runtime = null!;

    [Params(1, 10, 100, 1000, 10000)]
    public int Sites { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _engine = new OptpolineEngine();
        _targets = LoopKernels.EmitTargets(_engine, 2);
        var sites = SiteBlock.Emit(_engine, Sites);
        _promote = [.. sites.Select(s => new SiteUpdate(s, [_targets[0]]))];
        _demote = [.. sites.Select(s => new SiteUpdate(s, []))];
        _runtime = Optpoline.Patcher.Native.PatchRuntime.Get(_engine.Scheduler.Patcher.FlushSignal);
        _single = SiteBlock.Emit(_engine, 1)[0];
        _single.Promote([_targets[0]]);
    }

    [GlobalCleanup]
    public void Cleanup() => _engine.Dispose();

    /// <summary>One batch promoting every site, then one batch demoting them (no grace period needed: same target).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    public void PromoteOrDemoteBatch()
    {
        _engine.PromoteAsync(_promote).Wait();
        _engine.PromoteAsync(_demote).Wait();
    }

    /// <summary>One site to a new target: demote at once, one thread flush, promote (wall-clock latency).</summary>
    [Benchmark]
    public void RepromoteOneSite()
    {
        _flip ^= 1;
        _single.Promote([_targets[_flip]]);
    }

    /// <summary>The unit all batches pay three times.</summary>
    [Benchmark]
    public void CoreSync() => _runtime.CoreSync();
}
