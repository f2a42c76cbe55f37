using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace Optpoline.Bench;

/// <summary>
/// A numeric column whose value the host process computes per benchmark case (typically by replaying
/// the operation once, or from the case's measurements), for what BenchmarkDotNet does not compute itself.
/// </summary>
internal sealed class ReplayColumn(string name, string legend, Func<Summary, BenchmarkCase, string> value) : IColumn
{
    public ReplayColumn(string name, string legend, Func<BenchmarkCase, string> value)
        : this(name, legend, (_, benchmarkCase) => value(benchmarkCase))
    {
    }

    public string Id => name;

    public string ColumnName => name;

    public bool AlwaysShow => true;

    public ColumnCategory Category => ColumnCategory.Custom;

    public int PriorityInCategory => 0;

    public bool IsNumeric => true;

    public UnitType UnitType => UnitType.Dimensionless;

    public string Legend => legend;

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => value(summary, benchmarkCase);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style) => value(summary, benchmarkCase);

    public bool IsAvailable(Summary summary) => true;

    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
}
