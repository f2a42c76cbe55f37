using BenchmarkDotNet.Running;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>
/// Entry point: BenchmarkDotNet over every benchmark class (e.g. <c>--filter *CallCost*</c>), or
/// <c>stress [--seconds N] [--threads N] [--sites N] [--patches N] [--window N]</c> for the long
/// concurrency run outside the unit suite.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        if (args.Length > 0 && args[0] == "stress")
        {
            return Stress(args[1..]);
        }

        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }

    private static int Stress(string[] args)
    {
        int Option(string name, int fallback)
        {
            var at = Array.IndexOf(args, name);
            return at >= 0 && at + 1 < args.Length && int.TryParse(args[at + 1], out var value) ? value : fallback;
        }

        var seconds = Option("--seconds", 60);
        var threads = Option("--threads", 4);
        var sites = Option("--sites", 256);
        var patches = Option("--patches", 1_000_000);
        var window = Option("--window", 0);
        using var engine = new OptpolineEngine(new EngineOptions { SlotWindowPauses = window });
        using var workload = new StressWorkload(engine, sites);
        Console.WriteLine($"stress: {threads} caller threads, {sites} sites, up to {seconds} s or {patches:N0} patches, window {window} pauses");
        var result = workload.Run(threads, TimeSpan.FromSeconds(seconds), patches);
        Console.WriteLine(result);
        var audit = engine.AuditCode();
        foreach (var problem in audit)
        {
            Console.WriteLine($"audit: {problem}");
        }

        return result.WrongCalls == 0 && audit.Count == 0 ? 0 : 1;
    }
}
