using System.Diagnostics;
using System.Globalization;
using Optpoline.Cli.Vm;
using Optpoline.Configuration;
using Optpoline.Tracing;

namespace Optpoline.Cli;

/// <summary>
/// <c>optpoline run</c>: the engine doing its job in a JIT-like host. A small object VM (<see cref="MiniVm"/>)
/// runs a program of 1000 virtual-call sites on several threads through four phases (monomorphic,
/// bimorphic, megamorphic, monomorphic again) while the engine learns and patches the live code. In
/// every phase the same program compiled with retpoline calls runs in the same process, in alternate
/// slices, as the baseline. Every call's result is checked.
/// </summary>
internal static unsafe class RunCommand
{
    private const int Classes = 64;

    private sealed record Phase(string Name, Func<int, int, int> ClassOf);

    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        var options = new Options();
        for (var i = 0; i < args.Length; i++)
        {
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value.");
            try
            {
                switch (args[i])
                {
                    case "--config": options.Config = Next(); break;
                    case "--threads": options.Threads = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                    case "--seconds": options.Seconds = double.Parse(Next(), CultureInfo.InvariantCulture); break;
                    case "--sites": options.Sites = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                    case "--trace": options.Trace = Next(); break;
                    case "--no-trace": options.Trace = null; options.NoTrace = true; break;
                    case "--promotion-off": options.PromotionOff = true; break;
                    case "--save-profile": options.SaveProfile = Next(); break;
                    case "--inline-slots": options.InlineSlots = int.Parse(Next(), CultureInfo.InvariantCulture); break;
                    default: return Program.Fail(error, $"run: unexpected argument '{args[i]}'.");
                }
            }
            catch (FormatException)
            {
                return Program.Fail(error, $"run: {args[i]} needs a number.");
            }
            catch (ArgumentException e)
            {
                return Program.Fail(error, $"run: {e.Message}");
            }
        }

        if (options.Threads is < 1 or > 64 || options.Seconds is < 4 or > 600 || options.Sites is < 1 or > 10000 || options.InlineSlots is < 0 or > 2)
        {
            return Program.Fail(error, "run: --threads is 1 to 64, --seconds 4 to 600, --sites 1 to 10000, --inline-slots 0 to 2.");
        }

        OptpolineEngine engine;
        try
        {
            engine = Create(options);
        }
        catch (ConfigException e)
        {
            error.WriteLine($"optpoline: {e.Message}");
            return ExitCodes.Usage;
        }

        using (engine)
        {
            return Execute(engine, options, output);
        }
    }

    private static OptpolineEngine Create(Options options)
    {
        var trace = options.NoTrace ? null : Path.GetFullPath(options.Trace ?? Path.Combine(Path.GetTempPath(), $"optpoline-run-{Environment.ProcessId}"));
        if (options.Config is not null)
        {
            var fromFile = OptpolineEngine.FromConfig(options.Config);
            if (trace is not null && fromFile.TraceDirectory is null)
            {
                fromFile.StartTracing(new TracingOptions { Directory = trace });
            }

            if (options.PromotionOff)
            {
                fromFile.SetPromotionAsync(PromotionMode.Off).Wait();
            }

            return fromFile;
        }

        var config = new OptpolineConfig();
        config.Promotion.Enabled = !options.PromotionOff;
        config.Tracing.Directory = trace;
        return OptpolineEngine.FromConfig(config);
    }

    private static int Execute(OptpolineEngine engine, Options options, TextWriter output)
    {
        output.WriteLine($"optpoline run: {options.Sites} virtual-call sites, {Classes} classes, {options.Threads} threads, {options.Seconds:F0} s; " +
                         $"promotion {(engine.Promotion == PromotionMode.Off ? "off" : engine.Promotion.ToString().ToLowerInvariant())}" +
                         (engine.TraceDirectory is { } t ? $", tracing to {t}" : ", no trace"));
        using var vm = new MiniVm(engine, Classes, options.Sites, options.InlineSlots);
        var random = new Random(2026);
        int Home(int site) => (site * 7) % Classes;
        var phases = new[]
        {
            new Phase("mono", (j, _) => Home(j)),
            new Phase("bimorphic", (j, r) => Hash(j, r) % 100 < 70 ? Home(j) : (Home(j) + 1) % Classes),
            new Phase("megamorphic", (j, r) => Hash(j, r) % Classes),
            new Phase("mono again", (j, _) => (Home(j) + 3) % Classes),
        };
        var layouts = phases.Select(p => vm.Layout(p.ClassOf)).ToArray();

        var state = new Shared(options.Threads);
        var threads = Enumerable.Range(0, options.Threads).Select(k => new Thread(() => Worker(vm, state, k)) { IsBackground = true, Name = $"vm thread {k}" }).ToList();
        state.Table = layouts[0];
        foreach (var thread in threads)
        {
            thread.Start();
        }

        var results = new List<(string Phase, double Engine, double Baseline, int Promoted, long Patches)>();
        var phaseLength = TimeSpan.FromSeconds(options.Seconds / phases.Length);
        var learn = TimeSpan.FromSeconds(Math.Min(2, phaseLength.TotalSeconds / 3));
        var slice = TimeSpan.FromMilliseconds(100);
        var clock = Stopwatch.StartNew();
        for (var p = 0; p < phases.Length; p++)
        {
            state.Table = layouts[p];
            state.UseBaseline = false;
            var start = clock.Elapsed;
            var patchesAtStart = engine.PatchStatistics.Patches;
            var nextReport = start + TimeSpan.FromSeconds(1);
            state.Reset();
            var baseline = false;
            while (clock.Elapsed - start < phaseLength)
            {
                var measuring = clock.Elapsed - start >= learn;
                if (measuring && !state.Measuring)
                {
                    state.Reset();
                    state.Measuring = true;
                }

                // After learning: alternate slices of the engine's program and the retpoline baseline.
                baseline = measuring && !baseline;
                state.UseBaseline = baseline;
                Thread.Sleep(slice);
                if (clock.Elapsed >= nextReport)
                {
                    nextReport += TimeSpan.FromSeconds(1);
                    output.WriteLine(Line(phases[p].Name, clock.Elapsed, state, engine, vm));
                }
            }

            state.Measuring = false;
            var (engineNs, baselineNs) = state.NanosecondsPerCall();
            results.Add((phases[p].Name, engineNs, baselineNs, vm.CallSites.Count(s => s.Targets.Count > 0), engine.PatchStatistics.Patches - patchesAtStart));
        }

        state.Stop = true;
        foreach (var thread in threads)
        {
            thread.Join();
        }

        var summary = engine.StopTracing();
        output.WriteLine();
        output.WriteLine("| phase        | engine ns/call | retpoline ns/call | speed-up | sites promoted | patches |");
        output.WriteLine("|--------------|---------------:|------------------:|---------:|---------------:|--------:|");
        foreach (var (phase, engineNs, baselineNs, promoted, patches) in results)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| {phase,-12} | {engineNs,14:F2} | {baselineNs,17:F2} | {baselineNs / engineNs,7:F2}x | {promoted,9}/{vm.Sites,-4} | {patches,7} |"));
        }

        var stats = engine.PatchStatistics;
        output.WriteLine();
        output.WriteLine($"calls: {state.TotalCalls:N0} checked, {state.Wrong} wrong results; patches {stats.Patches:N0} in {stats.Batches:N0} batches, " +
                         $"{stats.Flushes} grace periods, {stats.TrapHits} calls through a trap");
        if (options.SaveProfile is not null)
        {
            // What the last phase taught the learner: a config with learning.profile starts from it.
            var (saved, _) = engine.SaveProfile(options.SaveProfile);
            output.WriteLine($"profile: {saved} sites saved to {options.SaveProfile}");
        }

        if (engine.Profile.Path is not null)
        {
            output.WriteLine(engine.Profile.ToString());
        }

        if (summary is not null)
        {
            output.WriteLine($"trace: {summary.Directory} ({summary.TextPokes:N0} text pokes, {summary.JitLoads:N0} jitdump loads); " +
                             $"replay it with: dotnet run --project src/Optpoline.Cli -- trace list {summary.Directory}");
        }

        return state.Wrong == 0 ? ExitCodes.Ok : ExitCodes.Mismatch;
    }

    private static string Line(string phase, TimeSpan elapsed, Shared state, OptpolineEngine engine, MiniVm vm)
    {
        var (engineNs, baselineNs) = state.NanosecondsPerCall();
        var stats = engine.PatchStatistics;
        var ratio = engineNs > 0 && baselineNs > 0 ? $"{baselineNs / engineNs,5:F2}x" : "  -  ";
        return string.Create(CultureInfo.InvariantCulture,
            $"[{phase,-11}] {elapsed.TotalSeconds,5:F1} s  engine {Show(engineNs)} ns/call  retpoline {Show(baselineNs)} ns/call  {ratio}  " +
            $"promoted {vm.CallSites.Count(s => s.Targets.Count > 0),4}/{vm.Sites}  patches {stats.Patches,6}  trapped calls {stats.TrapHits,3}  wrong {state.Wrong}");
    }

    private static string Show(double ns) => ns > 0 ? ns.ToString("F2", CultureInfo.InvariantCulture).PadLeft(6) : "     -";

    private static int Hash(int a, int b)
    {
        var x = (uint)((a * 0x9E3779B1) ^ (b * 0x85EBCA77));
        x ^= x >> 15;
        x *= 0x2C1B3C6D;
        x ^= x >> 12;
        return (int)(x & 0x7FFFFFFF);
    }

    private static void Worker(MiniVm vm, Shared state, int index)
    {
        var row = (ulong)(index * 17 % MiniVm.Rows);
        while (!state.Stop)
        {
            var (table, expected) = state.Table;
            var baseline = state.UseBaseline;
            var measuring = state.Measuring;
            var program = baseline ? vm.Baseline : vm.Optimized;
            var started = Stopwatch.GetTimestamp();
            const int Calls = 16;
            var wrong = 0;
            for (var i = 0; i < Calls; i++)
            {
                var result = program((ulong*)table, row, row + MiniVm.IterationsPerCall);
                wrong += result == expected[row % MiniVm.Rows] ? 0 : 1;
                row = (row + MiniVm.IterationsPerCall) % MiniVm.Rows;
            }

            var ticks = Stopwatch.GetTimestamp() - started;
            state.Record(index, baseline, measuring, ticks, (long)Calls * MiniVm.IterationsPerCall * vm.Sites, wrong);
        }
    }

    private sealed class Options
    {
        public string? Config { get; set; }

        public int Threads { get; set; } = 2;

        public double Seconds { get; set; } = 40;

        public int Sites { get; set; } = 1000;

        public string? Trace { get; set; }

        public bool NoTrace { get; set; }

        public bool PromotionOff { get; set; }

        public string? SaveProfile { get; set; }

        public int InlineSlots { get; set; }
    }

    /// <summary>What the coordinator and the VM threads share.</summary>
    private sealed class Shared(int threads)
    {
        private readonly long[] _ticks = new long[threads * 2 * 8];
        private readonly long[] _iterations = new long[threads * 2 * 8];
        private long _wrong;
        private long _total;

        public volatile bool Stop;
        public volatile bool UseBaseline;
        public volatile bool Measuring;
        private (nint, ulong[]) _table;

        public (nint Table, ulong[] Expected) Table
        {
            get
            {
                lock (this)
                {
                    return _table;
                }
            }

            set
            {
                lock (this)
                {
                    _table = value;
                }
            }
        }

        public long Wrong => Interlocked.Read(ref _wrong);

        public long TotalCalls => Interlocked.Read(ref _total);

        public void Record(int thread, bool baseline, bool measuring, long ticks, long iterations, int wrong)
        {
            Interlocked.Add(ref _wrong, wrong);   // wrong program runs (each checks Sites x iterations calls)
            Interlocked.Add(ref _total, iterations);
            if (!measuring && Measuring)
            {
                return;   // begun in the learning part of a phase, ended in the measured part
            }

            var slot = ((thread * 2) + (baseline ? 1 : 0)) * 8;
            Interlocked.Add(ref _ticks[slot], ticks);
            Interlocked.Add(ref _iterations[slot], iterations);
        }

        public void Reset()
        {
            Array.Clear(_ticks);
            Array.Clear(_iterations);
        }

        /// <summary>Mean ns per call of the engine's program and of the baseline, over all threads, since the last reset.</summary>
        public (double Engine, double Baseline) NanosecondsPerCall()
        {
            double Of(int kind)
            {
                long ticks = 0, iterations = 0;
                for (var t = 0; t < _ticks.Length / 16; t++)
                {
                    ticks += Interlocked.Read(ref _ticks[((t * 2) + kind) * 8]);
                    iterations += Interlocked.Read(ref _iterations[((t * 2) + kind) * 8]);
                }

                return iterations == 0 ? 0 : ticks * (1e9 / Stopwatch.Frequency) / iterations;
            }

            return (Of(0), Of(1));
        }
    }
}
