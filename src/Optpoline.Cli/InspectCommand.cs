using System.Globalization;
using System.Text.Json;
using Optpoline.Cli.Inspect;

namespace Optpoline.Cli;

/// <summary><c>optpoline inspect --pid N | --dump FILE [--json] [--no-code]</c>: the engines of a .NET host and their sites.</summary>
internal static class InspectCommand
{
    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        string? Value(string name) => Array.IndexOf(args, name) is var at and >= 0 && at + 1 < args.Length ? args[at + 1] : null;
        var pid = Value("--pid");
        var dump = Value("--dump");
        if ((pid is null) == (dump is null))
        {
            return Program.Fail(error, "inspect needs --pid N or --dump FILE.");
        }

        if (pid is not null && !int.TryParse(pid, NumberStyles.None, CultureInfo.InvariantCulture, out _))
        {
            return Program.Fail(error, $"--pid needs a process id, not '{pid}'.");
        }

        try
        {
            using var inspector = pid is not null ? EngineInspector.Attach(int.Parse(pid, CultureInfo.InvariantCulture)) : EngineInspector.LoadDump(dump!);
            var engines = inspector.Read();
            if (engines.Count == 0)
            {
                error.WriteLine($"optpoline: {inspector.Source} has no Optpoline engine on its heap.");
                return ExitCodes.NotFound;
            }

            var report = new InspectReport(inspector.Source, engines);
            if (args.Contains("--json"))
            {
                output.WriteLine(JsonSerializer.Serialize(report, InspectJsonContext.Default.InspectReport));
            }
            else
            {
                Print(report, output, withCode: !args.Contains("--no-code"));
            }

            return ExitCodes.Ok;
        }
        catch (InspectException e)
        {
            error.WriteLine($"optpoline: {e.Message}");
            return ExitCodes.NotFound;
        }
    }

    private static void Print(InspectReport report, TextWriter output, bool withCode)
    {
        foreach (var engine in report.Engines)
        {
            output.WriteLine($"engine {engine.Address} in {report.Source}: promotion {engine.Promotion}{(engine.PatchingSuspended ? ", patching suspended" : "")}, {engine.Sites.Count} sites");
            output.WriteLine($"  {"site",-24} {"kind",-7} {"reg",-4} {"state",-22} {"samples",10} {"patches",8} {"unreach",7}  targets");
            foreach (var site in engine.Sites)
            {
                var targets = site.Targets.Count == 0 ? "-" : string.Join(", ", site.Targets.Select(t => t.Name ?? t.Address));
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {site.Name,-24} {site.Kind,-7} {site.Register,-4} {site.State,-22} {site.Samples,10} {site.Patches,8} {site.Unreachable.Count,7}  {targets}"));
            }

            if (!withCode)
            {
                continue;
            }

            foreach (var site in engine.Sites)
            {
                output.WriteLine();
                output.WriteLine($"  {site.Name}:");
                if (site.Unreachable.Count > 0)
                {
                    output.WriteLine($"    out of direct reach: {string.Join(", ", site.Unreachable.Select(t => t.Name ?? t.Address))}");
                }

                foreach (var code in site.Code)
                {
                    output.WriteLine($"    {code.What} at {code.Address} ({code.Length} bytes)");
                    foreach (var line in code.Disassembly)
                    {
                        output.WriteLine($"      {line}");
                    }
                }
            }
        }
    }
}
