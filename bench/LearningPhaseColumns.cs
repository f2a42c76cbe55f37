using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Running;

namespace Optpoline.Bench;

/// <summary>Adds Epochs and Patches (to converge into the phase) to the Learned rows of <see cref="LearningPhases"/>, replayed in the host process.</summary>
[AttributeUsage(AttributeTargets.Class)]
public sealed class LearningPhaseColumnsAttribute : Attribute, IConfigSource
{
    private const string Legend = "for the learned engine, to converge into this phase from the previous one (replayed once in the host process)";
    private static readonly Dictionary<LearningPhases.Phase, (int Epochs, long Patches)> Replayed = [];

    public LearningPhaseColumnsAttribute() =>
        Config = ManualConfig.CreateEmpty().AddColumn(
            new ReplayColumn("Epochs", $"Epochs: {Legend}", c => Value(c, r => r.Epochs)),
            new ReplayColumn("Patches", $"Patches: {Legend}", c => Value(c, r => r.Patches)));

    public IConfig Config { get; }

    private static string Value(BenchmarkCase benchmarkCase, Func<(int Epochs, long Patches), long> pick) =>
        benchmarkCase.Descriptor.WorkloadMethod.Name == nameof(LearningPhases.Learned)
            ? pick(Replay((LearningPhases.Phase)benchmarkCase.Parameters["Current"])).ToString(System.Globalization.CultureInfo.InvariantCulture)
            : "-";

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
}
