using System.Diagnostics;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Tests.Patcher;

/// <summary>The perf.data that the patcher writes is read by the real perf.</summary>
[NonParallelizable]
public sealed class PerfDataTests
{
    [Test]
    public void Perf_script_lists_every_text_poke_with_its_address_and_bytes()
    {
        var path = Path.Combine(Path.GetTempPath(), $"optpoline-{Environment.ProcessId}-{Guid.NewGuid():N}.data");
        try
        {
            using (var writer = new PerfDataWriter(path))
            {
                var now = PerfDataWriter.Now();
                writer.Comm("optpoline-test", Environment.CurrentManagedThreadId, now);
                writer.Mmap2(0x5555_0000_0000, 1 << 20, "//anon", now);
                writer.TextPoke(0x5555_0000_1000, [0xE9, 1, 2, 3, 4], [0xCC, 1, 2, 3, 4], now + 1, 42);
                writer.TextPoke(0x5555_0000_2010, [0x49, 0xBB, 0, 0, 0, 0, 0, 0, 0, 0], [0x49, 0xBB, 1, 2, 3, 4, 5, 6, 7, 8], now + 2, 42);
                Assert.That(writer.Records, Is.EqualTo(4));
            }

            var output = Run("perf", $"script -i {path} --show-text-poke-events");
            TestContext.Out.WriteLine(output);
            Assert.That(output, Does.Contain("PERF_RECORD_TEXT_POKE 555500001000"));
            Assert.That(output, Does.Contain("Old bytes: e9 01 02 03 04").And.Contain("New bytes: cc 01 02 03 04"));
            Assert.That(output, Does.Contain("PERF_RECORD_TEXT_POKE 555500002010"));
            Assert.That(output, Does.Contain("New bytes: 49 bb 01 02 03 04 05 06 07 08"));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Test]
    public void An_engine_trace_records_every_patch_it_applies()
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-trace-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            using var engine = new OptpolineEngine();
            var targets = Support.ChecksumCode.EmitTargets(engine, 4);
            var site = engine.CreateInlineSite(Iced.Intel.Register.RAX, 1);
            Support.ChecksumCode.EmitDriver(engine, Iced.Intel.Register.RAX, site);
            engine.StartTracing(new Optpoline.Tracing.TracingOptions { Directory = directory, JitDump = false });
            var before = engine.PatchStatistics.Patches;
            site.Promote(targets[..3]);
            site.Promote([targets[3]]);
            site.Reset();
            var patches = engine.PatchStatistics.Patches - before;
            var summary = engine.StopTracing()!;

            var output = Run("perf", $"script -i {Path.Combine(directory, TraceFiles.TextPokes)} --show-text-poke-events --show-mmap-events --show-task-events");
            var pokes = output.Split('\n').Count(l => l.Contains("PERF_RECORD_TEXT_POKE", StringComparison.Ordinal));
            Assert.That(pokes, Is.EqualTo(summary.TextPokes), output);
            Assert.That(output, Does.Contain($"PERF_RECORD_TEXT_POKE {site.Slots[0].Start:x}"));
            Assert.That(output, Does.Contain("PERF_RECORD_COMM").And.Contain("PERF_RECORD_MMAP2"));
            Assert.That(patches, Is.GreaterThanOrEqualTo(5));
            // Every patch is there with its bytes, besides the chains published and freed on the way.
            var read = PerfDataReader.Read(Path.Combine(directory, TraceFiles.TextPokes));
            Assert.That(read.TextPokes.Count(p => p.Address == site.Slots[0].Start), Is.GreaterThanOrEqualTo(3));
            Assert.That(pokes, Is.GreaterThanOrEqualTo(patches));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void Perf_inject_names_the_samples_in_engine_code_including_after_repatching()
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-jit-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(directory);
        var data = Path.Combine(directory, "perf.data");
        var injected = Path.Combine(directory, "perf.jit.data");
        try
        {
            using var engine = new OptpolineEngine();
            using var workload = new Optpoline.Stress.LearningWorkload(engine, siteCount: 64);
            workload.SetPhase([(0, 0.5), (1, 0.5)], 1);
            engine.PromoteAsync([.. workload.Sites.Select((site, j) => new Optpoline.Sites.SiteUpdate(site, [workload.TargetFor(j, 0, 1)]))]).Wait();
            engine.StartTracing(new Optpoline.Tracing.TracingOptions { Directory = directory, TextPokes = false });

            using var perf = Process.Start(new ProcessStartInfo("perf", $"record -q -e cpu-clock -k mono -p {Environment.ProcessId} -o {data}") { RedirectStandardError = true })!;
            Thread.Sleep(700);
            var clock = Stopwatch.StartNew();
            var repatched = false;
            var firstIndexAfterRepatch = ulong.MaxValue;
            while (clock.Elapsed < TimeSpan.FromSeconds(1.5))
            {
                Assert.That(workload.Run(64), Is.Zero);
                if (!repatched && clock.Elapsed > TimeSpan.FromSeconds(0.7))
                {
                    // Repatch every site: the learned samples after this point belong to the new bytes.
                    firstIndexAfterRepatch = engine.JitDumpLoads;
                    engine.PromoteAsync([.. workload.Sites.Select((site, j) => new Optpoline.Sites.SiteUpdate(site, [workload.TargetFor(j, 1, 1), workload.TargetFor(j, 0, 1)]))]).Wait();
                    repatched = true;
                }
            }

            Run("kill", $"-INT {perf.Id}");
            Assert.That(perf.WaitForExit(TimeSpan.FromSeconds(30)), Is.True, "perf record stopped");
            engine.StopTracing();
            TestContext.Out.WriteLine(Run("perf", $"inject --jit -i {data} -o {injected}"));
            var report = Run("perf", $"report -i {injected} --stdio --sort dso --percent-limit 0");
            TestContext.Out.WriteLine(report);

            // Share of samples in engine code: jitted-PID-N.so (named) against the memfd (anonymous).
            double named = 0, unnamed = 0, afterRepatch = 0;
            foreach (var line in report.Split('\n'))
            {
                var parts = line.Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (parts.Length < 2 || !parts[0].EndsWith('%'))
                {
                    continue;
                }

                var share = double.Parse(parts[0].TrimEnd('%'), System.Globalization.CultureInfo.InvariantCulture);
                if (line.Contains("jitted-", StringComparison.Ordinal))
                {
                    named += share;
                    var index = ulong.Parse(parts[1].Split('-')[2].Split('.')[0], System.Globalization.CultureInfo.InvariantCulture);
                    if (index >= firstIndexAfterRepatch)
                    {
                        afterRepatch += share;
                    }
                }
                else if (line.Contains("memfd:optpoline", StringComparison.Ordinal))
                {
                    unnamed += share;
                }
            }

            Assert.That(named + unnamed, Is.GreaterThan(5), "the workload's samples fell in engine code");
            Assert.That(named / (named + unnamed), Is.GreaterThanOrEqualTo(0.9), "samples in engine code land on named blocks");
            Assert.That(afterRepatch, Is.GreaterThan(5), "samples after the repatch land on the blocks loaded again then (fresh code_index)");
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [SetUp]
    public void RequirePerf()
    {
        if (Run("sh", "-c \"command -v perf\"").Trim().Length > 0)
        {
            return;
        }

        const string Hint = "perf is not installed: run scripts/install-prerequisites.sh (Debian's linux-perf).";
        if (Environment.GetEnvironmentVariable("CI") == "true")
        {
            Assert.Fail(Hint);
        }

        Assert.Ignore(Hint);
    }

    private static string Run(string file, string arguments)
    {
        using var process = Process.Start(new ProcessStartInfo(file, arguments) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var output = process.StandardOutput.ReadToEnd() + process.StandardError.ReadToEnd();
        process.WaitForExit();
        return output;
    }
}
