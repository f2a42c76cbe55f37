using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Engines;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace Optpoline.Bench;

/// <summary>
/// Tracing's cost on one 1000-site engine batch, untraced and traced batches interleaved within one
/// benchmark case, so that the machine's drift (which moves this VM's batches by more than the effect
/// between BenchmarkDotNet cases run one after the other, see <see cref="TraceLatency"/>) falls on both
/// alike. Two engines with 1000 sites each live in the process, one tracing; every iteration is one
/// batch (a promotion or a demotion, in turn for each engine) after <see cref="GapMilliseconds"/> with
/// nothing running, of the untraced and the traced engine in turn. The <c>Traced/untraced</c> column
/// takes BenchmarkDotNet's own measurements of the case's actual iterations, pairs each traced batch with
/// the untraced batch just before it, and gives the median of those ratios; <c>Untraced</c> and
/// <c>Traced</c> give the medians of either kind. The traced engine's extender waits for either engine
/// to be idle.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engines.")]
[Config(typeof(Paired))]
public class TracePaired
{
    /// <summary>Which engine each invocation ran, in order (the last ones are the actual iterations).</summary>
    private static readonly List<bool> Invocations = [];

    private TraceWorkload _untraced = null!;
    private TraceWorkload _traced = null!;
    private bool _nextTraced;
    private bool _promoteUntraced;
    private bool _promoteTraced;

    /// <summary>Idle time before each batch: 0 is back to back (BenchmarkDotNet's own work between them only).</summary>
    [Params(5, 0)]
    public int GapMilliseconds { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        Invocations.Clear();
        _untraced = new TraceWorkload();
        _traced = new TraceWorkload();
        _traced.StartTracing();
        var tracing = _traced.Engine.Tracing!;
        Func<bool> busy = () => _untraced.Engine.Scheduler.Busy || _traced.Engine.Scheduler.Busy || _traced.Engine.Scheduler.Patcher.Busy;
        tracing.Pokes!.HostBusy = busy;
        tracing.Jit!.HostBusy = busy;

        // Tiering settles after about a thousand batches.
        for (var i = 0; i < 300; i++)
        {
            foreach (var workload in new[] { _untraced, _traced })
            {
                workload.Run(promote: true);
                workload.Run(promote: false);
            }
        }
    }

    [IterationSetup]
    public void Idle()
    {
        if (GapMilliseconds > 0)
        {
            Thread.Sleep(GapMilliseconds);
        }

        _nextTraced = !_nextTraced;
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        CaseLogs[GapMilliseconds] = [.. Invocations];
        _traced.Engine.StopTracing();
        _traced.Dispose();
        _untraced.Dispose();
    }

    /// <summary>One batch of the untraced or of the traced engine, in turn.</summary>
    [Benchmark]
    public void EngineBatch()
    {
        if (_nextTraced)
        {
            _promoteTraced = !_promoteTraced;
            _traced.Run(_promoteTraced);
        }
        else
        {
            _promoteUntraced = !_promoteUntraced;
            _untraced.Run(_promoteUntraced);
        }

        Invocations.Add(_nextTraced);
    }

    /// <summary>The case's actual iterations, each with the engine it ran (the invocations log is in this process).</summary>
    private static List<(bool Traced, double Nanoseconds)> Actual(Summary summary, BenchmarkCase benchmarkCase)
    {
        var measured = summary[benchmarkCase]?.AllMeasurements
            .Where(m => m.IterationMode == IterationMode.Workload && m.IterationStage == IterationStage.Actual)
            .OrderBy(m => m.IterationIndex).Select(m => m.Nanoseconds / m.Operations).ToList() ?? [];
        var log = CaseLogs.TryGetValue((int)benchmarkCase.Parameters[nameof(GapMilliseconds)], out var kept) ? kept : [];
        if (measured.Count == 0 || log.Count < measured.Count)
        {
            return [];
        }

        // The invocations alternate; if the log's tail does not, it is not this case's actual iterations.
        var modes = log[^measured.Count..];
        if (modes.Zip(modes.Skip(1)).Any(pair => pair.First == pair.Second))
        {
            return [];
        }

        return [.. measured.Select((ns, i) => (modes[i], ns))];
    }

    /// <summary>Each case's invocation log, by its gap, kept when the case ends (the next case starts a new one).</summary>
    private static readonly Dictionary<int, List<bool>> CaseLogs = [];

    private static string Ratio(Summary summary, BenchmarkCase benchmarkCase)
    {
        var actual = Actual(summary, benchmarkCase);
        var ratios = new List<double>();
        for (var i = 1; i < actual.Count; i++)
        {
            if (actual[i].Traced && !actual[i - 1].Traced)
            {
                ratios.Add(actual[i].Nanoseconds / actual[i - 1].Nanoseconds);
            }
        }

        return ratios.Count == 0 ? "?" : FormattableString.Invariant($"{Median(ratios):F3}x ({ratios.Count} pairs)");
    }

    private static string MedianOf(Summary summary, BenchmarkCase benchmarkCase, bool traced)
    {
        var values = Actual(summary, benchmarkCase).Where(a => a.Traced == traced).Select(a => a.Nanoseconds / 1000).ToList();
        return values.Count == 0 ? "?" : FormattableString.Invariant($"{Median(values):F1} us");
    }

    private static double Median(List<double> values) => values.Order().ElementAt(values.Count / 2);

    /// <summary>In this process (the columns read its invocation log), one batch per iteration, no forced GC (see <see cref="TraceLatency"/>).</summary>
    private sealed class Paired : ManualConfig
    {
        public Paired()
        {
            AddJob(Job.Default.InProcess().WithGcForce(false).WithInvocationCount(1).WithUnrollFactor(1).WithWarmupCount(40).WithIterationCount(600));
            AddColumn(
                new ReplayColumn("Untraced", "median of the untraced engine's batches", (s, c) => MedianOf(s, c, traced: false)),
                new ReplayColumn("Traced", "median of the traced engine's batches", (s, c) => MedianOf(s, c, traced: true)),
                new ReplayColumn("Traced/untraced", "median over the pairs of a traced batch and the untraced batch just before it", Ratio));
        }
    }
}
