using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using Optpoline.Patcher;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tracing;

namespace Optpoline.Bench;

/// <summary>
/// The 1000-site batch that the trace benchmarks measure: an engine with 1000 inline sites in one
/// block, the requests that promote them all to one target and demote them again, and the engine's
/// own 1000 slot patches for each (captured from its patcher, with their trap actions) for the
/// protocol batch alone. Trace files go to /dev/shm (RAM) when it exists; OPTPOLINE_BENCH_TRACE_DIR
/// names another directory (a disk).
/// </summary>
internal sealed class TraceWorkload : IDisposable
{
    /// <summary>The fixed gen0 budget the trace benchmarks need (see <see cref="InProcess"/>).</summary>
    public const string Gen0Size = "0x4000000";

    public const int Sites = 1000;

    private readonly List<SiteUpdate> _promote;
    private readonly List<SiteUpdate> _demote;
    private readonly List<LivePatch> _promotePatches;
    private readonly List<LivePatch> _demotePatches;
    private readonly string _directory;

    public TraceWorkload()
    {
        if (Environment.GetEnvironmentVariable("DOTNET_GCgen0size") != Gen0Size)
        {
            throw new InvalidOperationException(
                $"The trace benchmarks run in the benchmark's own process with a fixed gen0 budget: start it with DOTNET_GCgen0size={Gen0Size} " +
                "(for example: DOTNET_GCgen0size=0x4000000 dotnet run -c Release --project bench -- --filter '*TraceCost*' '*TraceLatency*').");
        }

        var root = Environment.GetEnvironmentVariable("OPTPOLINE_BENCH_TRACE_DIR") ?? (Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath());
        _directory = Path.Combine(root, $"optpoline-tracecost-{Environment.ProcessId}");
        Engine = new OptpolineEngine();
        var target = LoopKernels.EmitTargets(Engine, 1)[0];
        var sites = SiteBlock.Emit(Engine, Sites);
        _promote = [.. sites.Select(s => new SiteUpdate(s, [target]))];
        _demote = [.. sites.Select(s => new SiteUpdate(s, []))];

        // The patches of the steady cycle (the second promote and demote: each call already goes to the
        // target, so a batch is the 1000 slot heads), as the engine writes them, with its trap actions.
        Run(promote: true);
        Run(promote: false);
        var captured = new List<List<CodePatch>>();
        Engine.Scheduler.Patcher.BeforeVisible = patches => captured.Add([.. patches]);
        Run(promote: true);
        Run(promote: false);
        Engine.Scheduler.Patcher.BeforeVisible = null;
        var misses = sites.SelectMany(s => s.Slots).ToDictionary(s => s.Start, s => s.Miss);
        _promotePatches = [.. captured[0].Select(p => new LivePatch(p, TrapAction.ContinueAt(misses[p.Address])))];
        _demotePatches = [.. captured[1].Select(p => new LivePatch(p, TrapAction.ContinueAt(misses[p.Address])))];
        if (_promotePatches.Count != Sites || _demotePatches.Count != Sites)
        {
            throw new InvalidOperationException($"Expected {Sites} patches per batch, got {_promotePatches.Count} and {_demotePatches.Count}.");
        }
    }

    public OptpolineEngine Engine { get; }

    /// <summary>Starts a trace (text pokes and jitdump) into fresh files.</summary>
    public void StartTracing() => Engine.StartTracing(new TracingOptions { Directory = _directory });

    /// <summary>The engine promoting (or demoting) the 1000 sites: planning, then one protocol batch.</summary>
    public void Run(bool promote) => Engine.PromoteAsync(promote ? _promote : _demote).Wait();

    /// <summary>The protocol batch alone: the patcher writing the engine's 1000 slot patches.</summary>
    public void Patch(bool promote) => Engine.Scheduler.Patcher.Apply(Engine.Code, promote ? _promotePatches : _demotePatches);

    public void Dispose()
    {
        Engine.Dispose();
        if (Directory.Exists(_directory))
        {
            Directory.Delete(_directory, recursive: true);
        }
    }
}

/// <summary>The job of the trace benchmarks.</summary>
internal static class TraceJobs
{
    /// <summary>
    /// Every case in this one process, one after the other. Cases in processes of their own differed by
    /// more than the effect measured (the untraced batch: 757 to 1049 us mean in three launches of one
    /// run); in one process they share the code's tiering and the heap's layout. The batch allocates
    /// 1.5 MB (the scheduler's plan), so its time follows the GC's gen0 budget, which is fixed for the
    /// process (<see cref="TraceWorkload.Gen0Size"/>, checked when a case starts).
    /// </summary>
    public static Job InProcess(this Job job) => job.WithToolchain(InProcessEmitToolchain.Instance);
}

