using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Optpoline.Bench;

/// <summary>
/// <c>bench -- report [--input JSON] [--output DIR]</c>: turns the JSON export of a <see cref="Peers"/>
/// run into <c>REPORT.md</c> (ns per call and the ratio to the direct call, per distribution and peer,
/// and the issue's acceptance checks) and <c>Peers.svg</c> (the same as bars).
/// </summary>
internal static class PeersReport
{
    private const string Baseline = nameof(Peers.Direct);
    private static readonly CultureInfo Invariant = CultureInfo.InvariantCulture;

    /// <summary>Peers in report order, with what each one is.</summary>
    private static readonly (string Method, string Label, string Description)[] PeerRows =
    [
        (nameof(Peers.Direct), "direct call", "`call T0`, the hottest target called directly: the floor"),
        (nameof(Peers.Indirect), "indirect call", "`call rax`, unhardened"),
        (nameof(Peers.Retpoline), "retpoline", "`call` to the engine's retpoline thunk"),
        (nameof(Peers.GccO2), "gcc -O2", "the loop in C, `call *%rax`, unhardened"),
        (nameof(Peers.GccRetpoline), "gcc retpoline", "`-O2 -mindirect-branch=thunk`"),
        (nameof(Peers.GccPgo), "gcc PGO", "the retpoline build with `-fprofile-use`, trained on the same table"),
        (nameof(Peers.DelegatePgo), ".NET delegate, PGO", "`Func<ulong, ulong>` with tiered PGO (guarded devirtualization)"),
        (nameof(Peers.DelegateNoPgo), ".NET delegate", "the same loop, never instrumented"),
        (nameof(Peers.FunctionPointerPgo), ".NET delegate*, PGO", "`delegate*<ulong, ulong>` with tiered PGO"),
        (nameof(Peers.FunctionPointerNoPgo), ".NET delegate*", "the same loop, never instrumented"),
        (nameof(Peers.EngineStatic), "engine, static", "two-slot site, the host promotes the targets with >= 5 % of calls"),
        (nameof(Peers.EngineLearned), "engine, learned", "the same site, the engine samples and promotes by itself"),
        (nameof(Peers.EngineFallback), "engine, fallback", "the same site with nothing promoted"),
    ];

    private static readonly string[] Colors =
        ["#555555", "#999999", "#bbbbbb", "#8c6d31", "#bd9e39", "#e7ba52", "#7b4173", "#a55194", "#ce6dbd", "#de9ed6", "#31a354", "#006d2c", "#a1d99b"];

    public static int Run(string[] args)
    {
        var input = Program.Option(args, "--input", Path.Combine("BenchmarkDotNet.Artifacts", "results", "Optpoline.Bench.Peers-report-full.json"));
        var output = Program.Option(args, "--output", Directory.Exists(Path.Combine("bench", "results")) ? Path.Combine("bench", "results") : "results");
        if (!File.Exists(input))
        {
            Console.Error.WriteLine($"report: {input} does not exist. Run `dotnet run -c Release --project bench -- --filter '*Peers*'` first (it writes that file), or give --input.");
            return 2;
        }

        PeersRun run;
        try
        {
            run = Read(input);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            Console.Error.WriteLine($"report: {input} is not a BenchmarkDotNet full JSON export of Peers: {e.Message}");
            return 2;
        }

        Directory.CreateDirectory(output);
        // BenchmarkDotNet's own table of the same run (errors, standard deviations) goes beside the report.
        var table = Path.Combine(Path.GetDirectoryName(input) ?? ".", "Optpoline.Bench.Peers-report-github.md");
        var hasTable = File.Exists(table);
        if (hasTable)
        {
            File.Copy(table, Path.Combine(output, "Peers-bdn.md"), overwrite: true);
        }

        File.WriteAllText(Path.Combine(output, "REPORT.md"), Markdown(run, Path.GetFileName(input), hasTable));
        File.WriteAllText(Path.Combine(output, "Peers.svg"), Svg(run));
        Console.WriteLine($"wrote {Path.Combine(output, "REPORT.md")} and {Path.Combine(output, "Peers.svg")} ({run.Results.Count} results)");
        return 0;
    }

    /// <summary>A run: the machine, and mean / standard deviation in ns per call by (distribution, method).</summary>
    private sealed record PeersRun(string Machine, string Job, IReadOnlyList<string> Distributions, Dictionary<(string Distribution, string Method), (double Mean, double StdDev)> Results)
    {
        public double? Mean(string distribution, string method) =>
            Results.TryGetValue((distribution, method), out var r) ? r.Mean : null;
    }

    private static PeersRun Read(string path)
    {
        using var document = JsonDocument.Parse(File.ReadAllText(path));
        var root = document.RootElement;
        var host = root.GetProperty("HostEnvironmentInfo");
        var machine = $"{host.GetProperty("ProcessorName").GetString()}, {host.GetProperty("LogicalCoreCount").GetInt32()} logical cores, " +
            $"{host.GetProperty("OsVersion").GetString()}, {host.GetProperty("RuntimeVersion").GetString()}, BenchmarkDotNet {host.GetProperty("BenchmarkDotNetVersion").GetString()}";
        var results = new Dictionary<(string, string), (double, double)>();
        var distributions = new List<string>();
        var job = "";
        foreach (var benchmark in root.GetProperty("Benchmarks").EnumerateArray())
        {
            if (benchmark.GetProperty("Type").GetString() != nameof(Peers))
            {
                continue;
            }

            var parameters = benchmark.GetProperty("Parameters").GetString() ?? "";
            var distribution = parameters.Split('&').Select(p => p.Split('=')).First(p => p[0] == nameof(Peers.Distribution))[1];
            if (!distributions.Contains(distribution))
            {
                distributions.Add(distribution);
            }

            if (benchmark.GetProperty("Statistics") is { ValueKind: JsonValueKind.Object } statistics)
            {
                results[(distribution, benchmark.GetProperty("Method").GetString()!)] =
                    (statistics.GetProperty("Mean").GetDouble(), statistics.GetProperty("StandardDeviation").GetDouble());
            }

            var display = benchmark.GetProperty("DisplayInfo").GetString() ?? "";
            // "Peers.Direct: DefaultJob [Distribution=Mono]": the job is between the colon and the parameters.
            var from = display.IndexOf(": ", StringComparison.Ordinal) + 2;
            var to = display.LastIndexOf(" [", StringComparison.Ordinal);
            job = from >= 2 && to > from ? display[from..to] : job;
        }

        if (results.Count == 0)
        {
            throw new InvalidOperationException("it holds no Peers result with statistics");
        }

        return new PeersRun(machine, job, distributions, results);
    }

    private static string Markdown(PeersRun run, string source, bool hasTable)
    {
        var md = new StringBuilder();
        md.AppendLine("# The engine against what users would pick instead");
        md.AppendLine();
        md.AppendLine(Invariant, $"Machine: {run.Machine}. Job: {run.Job}. Generated by `dotnet run -c Release --project bench -- report` from `{source}`.");
        md.AppendLine();
        md.AppendLine("Every peer runs the same loop, `acc = table[i % 4096](acc)`, over targets `x + 1` that are never inlined, for 2^23 calls per invocation; only the call differs. " +
            "`Phases` is 2^22 calls at 90 % / 10 % over targets 0 and 1, then 2^22 over 2 and 3 (gcc's profile and the static promotion see both halves). See `bench/Peers.cs`.");
        md.AppendLine();
        md.AppendLine("## Acceptance (issue 7)");
        md.AppendLine();
        md.AppendLine("| check | measured | goal | result |");
        md.AppendLine("|---|---:|---:|---|");
        foreach (var distribution in new[] { "Mono", "Bi90" })
        {
            Check(md, $"{distribution}: learned engine / gcc PGO", run.Mean(distribution, nameof(Peers.EngineLearned)), run.Mean(distribution, nameof(Peers.GccPgo)), 1.10, atMost: true);
            Check(md, $"{distribution}: gcc retpoline / learned engine (speed-up)", run.Mean(distribution, nameof(Peers.GccRetpoline)), run.Mean(distribution, nameof(Peers.EngineLearned)), 3.0, atMost: false);
        }

        Check(md, "Mega64: learned engine / gcc retpoline", run.Mean("Mega64", nameof(Peers.EngineLearned)), run.Mean("Mega64", nameof(Peers.GccRetpoline)), 1.05, atMost: true);
        md.AppendLine();
        md.AppendLine("## ns per call (ratio to the direct call)");
        md.AppendLine();
        md.Append("| peer |");
        foreach (var distribution in run.Distributions)
        {
            md.Append(Invariant, $" {distribution} |");
        }

        md.AppendLine();
        md.Append("|---|");
        md.AppendLine(string.Concat(run.Distributions.Select(_ => "---:|")));
        foreach (var (method, label, _) in PeerRows)
        {
            md.Append(Invariant, $"| {label} |");
            foreach (var distribution in run.Distributions)
            {
                var mean = run.Mean(distribution, method);
                var baseline = run.Mean(distribution, Baseline);
                md.Append(mean is null ? " - |" : baseline is > 0 ? string.Format(Invariant, " {0:F2} ({1:F2}x) |", mean, mean / baseline) : string.Format(Invariant, " {0:F2} |", mean));
            }

            md.AppendLine();
        }

        md.AppendLine();
        md.AppendLine(hasTable
            ? "BenchmarkDotNet's own table of this run, with errors and standard deviations: [Peers-bdn.md](Peers-bdn.md). The chart: [Peers.svg](Peers.svg)."
            : "Errors and standard deviations are in the run's JSON export. The chart: [Peers.svg](Peers.svg).");
        md.AppendLine();
        md.AppendLine("## The peers");
        md.AppendLine();
        foreach (var (_, label, description) in PeerRows)
        {
            md.AppendLine(Invariant, $"- **{label}**: {description}.");
        }

        return md.ToString();
    }

    private static void Check(StringBuilder md, string what, double? numerator, double? denominator, double goal, bool atMost)
    {
        if (numerator is not { } n || denominator is not { } d || d <= 0)
        {
            md.AppendLine(Invariant, $"| {what} | - | {(atMost ? "<=" : ">=")} {goal:F2}x | not measured |");
            return;
        }

        var ratio = n / d;
        var met = atMost ? ratio <= goal : ratio >= goal;
        var verdict = met ? "met" : atMost ? $"missed by {(ratio / goal) - 1:P1}" : $"missed by {1 - (ratio / goal):P1}";
        md.AppendLine(Invariant, $"| {what} | {ratio:F2}x | {(atMost ? "<=" : ">=")} {goal:F2}x | {verdict} |");
    }

    /// <summary>One panel per distribution, a horizontal bar per peer (ns per call), the direct call marked.</summary>
    private static string Svg(PeersRun run)
    {
        const int PanelWidth = 420, BarHeight = 14, Gap = 4, LabelWidth = 130, Columns = 2, Top = 40;
        var panelHeight = 30 + (PeerRows.Length * (BarHeight + Gap)) + 20;
        var rows = (run.Distributions.Count + Columns - 1) / Columns;
        var width = Columns * PanelWidth;
        var height = Top + (rows * panelHeight);
        var svg = new StringBuilder();
        svg.AppendLine(Invariant, $"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">""");
        svg.AppendLine(Invariant, $"""<rect width="{width}" height="{height}" fill="white"/>""");
        svg.AppendLine(Invariant, $"""<text x="10" y="20" font-size="14" font-weight="bold">ns per call, lower is better ({Escape(run.Machine.Split(',')[0])})</text>""");
        for (var p = 0; p < run.Distributions.Count; p++)
        {
            var distribution = run.Distributions[p];
            var x0 = (p % Columns) * PanelWidth;
            var y0 = Top + ((p / Columns) * panelHeight);
            var max = PeerRows.Select(r => run.Mean(distribution, r.Method) ?? 0).Max();
            var scale = max > 0 ? (PanelWidth - LabelWidth - 60) / max : 0;
            svg.AppendLine(Invariant, $"""<text x="{x0 + 10}" y="{y0 + 18}" font-size="13" font-weight="bold">{Escape(distribution)}</text>""");
            for (var i = 0; i < PeerRows.Length; i++)
            {
                var (method, label, _) = PeerRows[i];
                var y = y0 + 28 + (i * (BarHeight + Gap));
                svg.AppendLine(Invariant, $"""<text x="{x0 + LabelWidth - 4}" y="{y + BarHeight - 3}" text-anchor="end">{Escape(label)}</text>""");
                if (run.Mean(distribution, method) is { } mean)
                {
                    var length = Math.Max(1, mean * scale);
                    svg.AppendLine(Invariant, $"""<rect x="{x0 + LabelWidth}" y="{y}" width="{length:F1}" height="{BarHeight}" fill="{Colors[i]}"/>""");
                    svg.AppendLine(Invariant, $"""<text x="{x0 + LabelWidth + length + 3:F1}" y="{y + BarHeight - 3}">{mean:F2}</text>""");
                }
            }
        }

        svg.AppendLine("</svg>");
        return svg.ToString();
    }

    private static string Escape(string text) => text.Replace("&", "&amp;", StringComparison.Ordinal).Replace("<", "&lt;", StringComparison.Ordinal).Replace(">", "&gt;", StringComparison.Ordinal);
}
