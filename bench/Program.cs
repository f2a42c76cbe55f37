using BenchmarkDotNet.Running;
using Optpoline.Stress;

namespace Optpoline.Bench;

/// <summary>
/// Entry point: BenchmarkDotNet over every benchmark class (e.g. <c>--filter *CallCost*</c>), or
/// <c>stress [--seconds N] [--threads N] [--sites N] [--patches N] [--window N]</c> for the long
/// concurrency run outside the unit suite, or <c>steady [--seconds N] [--sites N]</c> for the learning
/// no-thrash check (patches after convergence, with the engine's own learner thread), or
/// <c>report [--input JSON] [--output DIR]</c> for bench/results/REPORT.md from a run of Peers.
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

        if (args.Length > 0 && args[0] == "steady")
        {
            return Steady(args[1..]);
        }

        if (args.Length > 0 && args[0] == "report")
        {
            return PeersReport.Run(args[1..]);
        }

        if (args.Length > 0 && args[0] == "tracecost")
        {
            return TraceCostInterleaved(args[1..]);
        }

        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }

    /// <summary>
    /// What tracing adds to a 1000-site batch, measured interleaved in one process: rounds of untraced,
    /// traced (text pokes and jitdump), text pokes only and jitdump only, 96 batches each (promote and
    /// demote in turn, each timed on its own) after 16 for warm-up; each round's ratio to the untraced
    /// round next to it, and the median of those, which cancels the drift that separates
    /// BenchmarkDotNet's cases on a shared VM; also the engine's own count of the time spent recording on
    /// the batch's thread. <c>--gap MS</c> sleeps that long before each batch (latency, with idle time as
    /// a host has it; default 0: back to back), <c>--keep</c> keeps one trace running for the whole run
    /// instead of a fresh one each round, <c>--only MODE</c> runs one mode, <c>--verbose</c> prints every
    /// round (the first few are slower: tiering settles after about a thousand batches).
    /// </summary>
    private static int TraceCostInterleaved(string[] args)
    {
        var rounds = Option(args, "--rounds", 12);
        var gap = Option(args, "--gap", 0);
        var keep = args.Contains("--keep");
        var root = Environment.GetEnvironmentVariable("OPTPOLINE_BENCH_TRACE_DIR") ?? (Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath());
        var directory = Path.Combine(root, $"optpoline-tracecost-{Environment.ProcessId}");
        using var engine = new OptpolineEngine();
        var target = LoopKernels.EmitTargets(engine, 1)[0];
        var sites = SiteBlock.Emit(engine, 1000);
        List<Optpoline.Sites.SiteUpdate> promote = [.. sites.Select(s => new Optpoline.Sites.SiteUpdate(s, [target]))];
        List<Optpoline.Sites.SiteUpdate> demote = [.. sites.Select(s => new Optpoline.Sites.SiteUpdate(s, []))];
        var modes = new[] { "untraced", "both", "text pokes", "jitdump" };
        if (args.Contains("--only"))
        {
            modes = [args[Array.IndexOf(args, "--only") + 1]];
        }

        var wall = modes.ToDictionary(m => m, _ => new List<double>());
        var recording = modes.ToDictionary(m => m, _ => new List<double>());
        for (var round = 0; round < rounds; round++)
        {
            foreach (var mode in modes)
            {
                if (mode != "untraced" && (!keep || round == 0))
                {
                    engine.StartTracing(new Optpoline.Tracing.TracingOptions { Directory = directory, TextPokes = mode != "jitdump", JitDump = mode != "text pokes" });
                }

                GC.Collect();
                for (var i = 0; i < 8; i++)
                {
                    engine.PromoteAsync(promote).Wait();
                    engine.PromoteAsync(demote).Wait();
                }

                var before = engine.PatchStatistics;
                var elapsed = 0L;
                for (var i = 0; i < 96; i++)
                {
                    if (gap > 0)
                    {
                        Thread.Sleep(gap);
                    }

                    var start = System.Diagnostics.Stopwatch.GetTimestamp();
                    engine.PromoteAsync(i % 2 == 0 ? promote : demote).Wait();
                    elapsed += System.Diagnostics.Stopwatch.GetTimestamp() - start;
                }

                wall[mode].Add(elapsed * 1e6 / System.Diagnostics.Stopwatch.Frequency / 96);
                recording[mode].Add((engine.PatchStatistics.RecordTime - before.RecordTime).TotalMicroseconds / 96);
                if (!keep || round == rounds - 1)
                {
                    engine.StopTracing();
                }
            }
        }

        if (args.Contains("--verbose"))
        {
            foreach (var mode in modes)
            {
                Console.WriteLine(FormattableString.Invariant($"{mode}: {string.Join(' ', wall[mode].Select(v => v.ToString("F0", System.Globalization.CultureInfo.InvariantCulture)))}"));
            }
        }

        static double Median(List<double> values) => values.Order().ElementAt(values.Count / 2);
        // Each round's ratio to the untraced batches of the same round (minutes apart at most), then
        // the median of those: the machine's drift cancels in the pairs.
        static double Paired(List<double> mode, List<double> baseline) => Median([.. mode.Zip(baseline, (m, b) => m / b)]);
        Console.WriteLine($"| recording | batch (median of {rounds} rounds) | vs untraced (median of the rounds' ratios) | recording time per batch |");
        Console.WriteLine("|---|---:|---:|---:|");
        foreach (var mode in modes)
        {
            Console.WriteLine(FormattableString.Invariant($"| {mode} | {Median(wall[mode]):F0} us | {Paired(wall[mode], wall[modes[0]]):F3}x | {Median(recording[mode]):F0} us |"));
        }

        if (Directory.Exists(directory))
        {
            Directory.Delete(directory, recursive: true);
        }

        return 0;
    }

    /// <summary>
    /// The no-thrash check of the learning issue: 1000 sites, two caller threads, the engine's own
    /// learner thread at default settings; once a 90/10 phase has converged, count patches for N seconds.
    /// </summary>
    private static int Steady(string[] args)
    {
        var seconds = Option(args, "--seconds", 10);
        var sites = Option(args, "--sites", 1000);
        using var engine = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, RingCapacity = 1 << 18 } });
        using var workload = new LearningWorkload(engine, sites);
        workload.SetPhase([(10, 0.9), (20, 0.1)], 1);
        workload.Start(callerThreads: 2);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var epochs = 0L;
        engine.EpochCompleted += (_, e) => Interlocked.Exchange(ref epochs, e.Epoch);
        long lastPatches = -1;
        var quietSince = clock.Elapsed;
        while (clock.Elapsed < TimeSpan.FromSeconds(30))
        {
            Thread.Sleep(500);
            var patches = engine.PatchStatistics.Patches;
            if (patches != lastPatches)
            {
                lastPatches = patches;
                quietSince = clock.Elapsed;
            }
            else if (clock.Elapsed - quietSince > TimeSpan.FromSeconds(2))
            {
                break;
            }
        }

        var converged = clock.Elapsed;
        var before = engine.PatchStatistics.Patches;
        var epochsBefore = Interlocked.Read(ref epochs);
        Thread.Sleep(TimeSpan.FromSeconds(seconds));
        var after = engine.PatchStatistics.Patches;
        workload.Stop();
        var promoted = workload.Sites.Count(s => s.Targets.Count == 2);
        Console.WriteLine($"steady: {sites} sites, converged after {converged.TotalSeconds:F1} s ({epochsBefore} epochs, {before:N0} patches, {promoted} sites on 2 targets); " +
                          $"then {seconds} s / {Interlocked.Read(ref epochs) - epochsBefore} epochs: {after - before} patches; {workload.Calls:N0} calls, {workload.WrongCalls} wrong");
        return after == before && workload.WrongCalls == 0 ? 0 : 1;
    }

    internal static string Option(string[] args, string name, string fallback)
    {
        var at = Array.IndexOf(args, name);
        return at >= 0 && at + 1 < args.Length ? args[at + 1] : fallback;
    }

    private static int Option(string[] args, string name, int fallback)
    {
        var at = Array.IndexOf(args, name);
        return at >= 0 && at + 1 < args.Length && int.TryParse(args[at + 1], out var value) ? value : fallback;
    }

    private static int Stress(string[] args)
    {
        int Option(string name, int fallback) => Program.Option(args, name, fallback);

        var seconds = Option("--seconds", 60);
        var threads = Option("--threads", 4);
        var sites = Option("--sites", 256);
        var patches = Option("--patches", 1_000_000);
        var window = Option("--window", 0);
        var hostile = args.Contains("--hostile") ? HostileOptions.All : null;
        var sigpending = Option("--sigpending", -1);
        using var engine = new OptpolineEngine(new EngineOptions { SlotWindowPauses = window });
        using var workload = new StressWorkload(engine, sites);
        var grace = engine.Scheduler.Patcher.RestartableSequencesUnavailable is { } why ? $"thread flushes ({why})" : "restartable windows";
        Console.WriteLine($"stress: {threads} caller threads, {sites} sites, up to {seconds} s or {patches:N0} patches, window {window} pauses, grace periods by {grace}" +
            (hostile is null ? "" : ", hostile host (profiler signals, thread churn, a worker blocking every signal)") +
            (sigpending < 0 ? "" : $", RLIMIT_SIGPENDING {HostileHost.LimitQueuedSignals(sigpending)}"));
        var result = workload.Run(threads, TimeSpan.FromSeconds(seconds), patches, hostile: hostile);
        Console.WriteLine(result);
        var audit = engine.AuditCode();
        foreach (var problem in audit)
        {
            Console.WriteLine($"audit: {problem}");
        }

        return result.WrongCalls == 0 && audit.Count == 0 ? 0 : 1;
    }
}
