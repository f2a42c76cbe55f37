using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace Optpoline.Bench;

/// <summary>Adds Epochs and Patches (to converge into the phase) to the Learned rows of <see cref="LearningPhases"/>, replayed in the host process.</summary>
[AttributeUsage(AttributeTargets.Class)]
public sealed class LearningPhaseColumnsAttribute : Attribute, IConfigSource
{
    private static readonly Dictionary<LearningPhases.Phase, (int Epochs, long Patches)> Replayed = [];

    public LearningPhaseColumnsAttribute() =>
        Config = ManualConfig.CreateEmpty().AddColumn(new Column("Epochs", r => r.Epochs), new Column("Patches", r => r.Patches));

    public IConfig Config { get; }

    private static (int Epochs, long Patches) Replay(LearningPhases.Phase phase)
    {
        lock (Replayed)
        {
            if (!Replayed.TryGetValue(phase, out var result))
            {
                var (engine, workload, epochs, patches) = LearningPhases.ConvergeThrough(phase);
                workload.Dispose();
                engine.Dispose();
                Replayed[phase] = result = (epochs, patches);
            }

            return result;
        }
    }

    private sealed class Column(string name, Func<(int Epochs, long Patches), long> pick) : IColumn
    {
        public string Id => name;

        public string ColumnName => name;

        public bool AlwaysShow => true;

        public ColumnCategory Category => ColumnCategory.Custom;

        public int PriorityInCategory => 0;

        public bool IsNumeric => true;

        public UnitType UnitType => UnitType.Dimensionless;

        public string Legend => $"{name}: for the learned engine, to converge into this phase from the previous one (replayed once in the host process)";

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

        public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) =>
            benchmarkCase.Descriptor.WorkloadMethod.Name == nameof(LearningPhases.Learned)
                ? pick(Replay((LearningPhases.Phase)benchmarkCase.Parameters["Current"])).ToString(System.Globalization.CultureInfo.InvariantCulture)
                : "-";

        public bool IsAvailable(Summary summary) => true;

        public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    }
}
