using BenchmarkDotNet.Attributes;
using Optpoline.Sites;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>
/// The phase workload of the learning issue, single-threaded: 64 two-slot inline sites called in turn,
/// each with the phase's distribution, through mono A, mono B, 90/10, uniform 8, megamorphic 256, mono
/// C. Per phase, in one run: the retpoline baseline (sites never promoted), the best static promotion
/// for the phase's known distribution, and the learned engine after it converged from the previous
/// phase (the Epochs and Patches columns: epochs until its last change, and patches it took).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
[LearningPhaseColumns]
public class LearningPhases
{
    public const int SiteCount = 64;
    private const int Iterations = 1024;

    private OptpolineEngine _engine = null!;
    private LearningWorkload _workload = null!;

    public enum Phase
    {
        MonoA,
        MonoB,
        Bi90,
        Uniform8,
        Mega256,
        MonoC,
    }

    [Params(Phase.MonoA, Phase.MonoB, Phase.Bi90, Phase.Uniform8, Phase.Mega256, Phase.MonoC)]
    public Phase Current { get; set; }

    [GlobalSetup(Target = nameof(Retpoline))]
    public void SetupRetpoline()
    {
        _engine = new OptpolineEngine();
        _workload = new LearningWorkload(_engine, SiteCount);
        Set(_workload, Current);
    }

    [GlobalSetup(Target = nameof(BestStatic))]
    public void SetupBestStatic()
    {
        SetupRetpoline();
        var (weights, stride) = Describe(Current);
        var hot = weights.Where(w => w.Share >= 0.05).OrderByDescending(w => w.Share).ThenBy(w => w.Target).Take(8).ToArray();
        _engine.PromoteAsync([.. _workload.Sites.Select((site, j) => new SiteUpdate(site, [.. hot.Select(w => _workload.TargetFor(j, w.Target, stride))]))]).Wait();
    }

    [GlobalSetup(Target = nameof(Learned))]
    public void SetupLearned() => (_engine, _workload, _, _) = ConvergeThrough(Current);

    [GlobalCleanup]
    public void Cleanup()
    {
        _workload.Dispose();
        _engine.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Iterations * SiteCount)]
    public long Retpoline() => _workload.Run(Iterations);

    [Benchmark(OperationsPerInvoke = Iterations * SiteCount)]
    public long BestStatic() => _workload.Run(Iterations);

    [Benchmark(OperationsPerInvoke = Iterations * SiteCount)]
    public long Learned() => _workload.Run(Iterations);

    /// <summary>A learning engine taken through every phase up to <paramref name="phase"/>; returns epochs and patches of the last.</summary>
    internal static (OptpolineEngine Engine, LearningWorkload Workload, int Epochs, long Patches) ConvergeThrough(Phase phase)
    {
        var engine = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, Background = false } });
        var workload = new LearningWorkload(engine, SiteCount);
        (int Epochs, long Patches) last = default;
        foreach (var step in Enum.GetValues<Phase>().Where(p => p <= phase))
        {
            Set(workload, step);
            last = Converge(engine, workload);
        }

        return (engine, workload, last.Epochs, last.Patches);
    }

    private static (int Epochs, long Patches) Converge(OptpolineEngine engine, LearningWorkload workload)
    {
        var before = engine.PatchStatistics.Patches;
        int epochs = 0, lastChange = 0, quiet = 0;
        while (quiet < 5 && epochs < 60)
        {
            for (var i = 0; i < 20; i++)
            {
                if (workload.Run(Iterations) != 0)
                {
                    throw new InvalidOperationException("A call reached the wrong target.");
                }
            }

            var result = engine.LearnEpoch();
            result.Applied.Wait();
            epochs++;
            if (result.Changes > 0)
            {
                lastChange = epochs;
                quiet = 0;
            }
            else
            {
                quiet++;
            }
        }

        return (lastChange, engine.PatchStatistics.Patches - before);
    }

    private static void Set(LearningWorkload workload, Phase phase)
    {
        var (weights, stride) = Describe(phase);
        workload.SetPhase(weights, stride);
    }

    private static ((int Target, double Share)[] Weights, int Stride) Describe(Phase phase) => phase switch
    {
        Phase.MonoA => ([(0, 1.0)], 1),
        Phase.MonoB => ([(100, 1.0)], 1),
        Phase.Bi90 => ([(10, 0.9), (20, 0.1)], 1),
        Phase.Uniform8 => ([.. Enumerable.Range(0, 8).Select(i => (30 + i, 0.125))], 1),
        Phase.Mega256 => ([.. Enumerable.Range(0, 256).Select(i => (i, 1.0 / 256))], 0),
        _ => ([(200, 1.0)], 1),
    };
}
