using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using Optpoline.Sites;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>Adds CoreSyncs and Flushes per operation to <see cref="PatchCost"/>, counted by replaying the operation once in the host process.</summary>
[AttributeUsage(AttributeTargets.Class)]
public sealed class PatchCounterColumnsAttribute : Attribute, IConfigSource
{
    public PatchCounterColumnsAttribute() =>
        Config = ManualConfig.CreateEmpty().AddColumn(new CounterColumn("CoreSyncs/op", s => s.CoreSyncs), new CounterColumn("Flushes/op", s => s.Flushes));

    public IConfig Config { get; }

    private sealed class CounterColumn(string name, Func<Optpoline.Patcher.PatcherStatistics, long> pick) : IColumn
    {
        public string Id => name;

        public string ColumnName => name;

        public bool AlwaysShow => true;

        public ColumnCategory Category => ColumnCategory.Custom;

        public int PriorityInCategory => 0;

        public bool IsNumeric => true;

        public UnitType UnitType => UnitType.Dimensionless;

        public string Legend => $"{name}: counted by running the operation once (per batch for PromoteOrDemoteBatch)";

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
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

        public bool IsAvailable(Summary summary) => true;

        public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    }
}
