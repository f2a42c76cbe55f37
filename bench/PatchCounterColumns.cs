using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Running;
using Optpoline.Sites;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>Adds CoreSyncs and Flushes per operation to <see cref="PatchCost"/>, counted by replaying the operation once in the host process.</summary>
[AttributeUsage(AttributeTargets.Class)]
public sealed class PatchCounterColumnsAttribute : Attribute, IConfigSource
{
    private const string Legend = "counted by running the operation once (per batch for PromoteOrDemoteBatch)";

    public PatchCounterColumnsAttribute() =>
        Config = ManualConfig.CreateEmpty().AddColumn(
            new ReplayColumn("CoreSyncs/op", $"CoreSyncs/op: {Legend}", c => Count(c, s => s.CoreSyncs)),
            new ReplayColumn("Flushes/op", $"Flushes/op: {Legend}", c => Count(c, s => s.Flushes)));

    public IConfig Config { get; }

    private static string Count(BenchmarkCase benchmarkCase, Func<Optpoline.Patcher.PatcherStatistics, long> pick)
    {
        var sites = (int)benchmarkCase.Parameters["Sites"];
        using var engine = new OptpolineEngine();
        var targets = LoopKernels.EmitTargets(engine, 2);
        var all = SiteBlock.Emit(engine, sites);
        var single = SiteBlock.Emit(engine, 1)[0];
        single.Promote([targets[0]]);
        var before = engine.PatchStatistics;
        double per;
        switch (benchmarkCase.Descriptor.WorkloadMethod.Name)
        {
            case nameof(PatchCost.PromoteOrDemoteBatch):
                engine.PromoteAsync([.. all.Select(s => new SiteUpdate(s, [targets[0]]))]).Wait();
                engine.PromoteAsync([.. all.Select(s => new SiteUpdate(s, []))]).Wait();
                per = (pick(engine.PatchStatistics) - pick(before)) / 2.0;
                break;
            case nameof(PatchCost.RepromoteOneSite):
                single.Promote([targets[1]]);
                per = pick(engine.PatchStatistics) - pick(before);
                break;
            default:
                return "-";
        }

        return per.ToString("0.#", System.Globalization.CultureInfo.InvariantCulture);
    }
}
