using Iced.Intel;
using Optpoline.Memory;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;
using Optpoline.Sites;
using Optpoline.Stress;
using Optpoline.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary>
/// A trace taken while threads run patched sites replays exactly: the bytes at each record's time are
/// what the patcher wrote, the end is the live code, and forwards and backwards agree everywhere.
/// </summary>
[NonParallelizable]
public sealed class TraceReplayTests
{
    private string _directory = null!;

    [SetUp]
    public void CreateDirectory() => _directory = Path.Combine(Path.GetTempPath(), $"optpoline-replay-{Environment.ProcessId}-{Guid.NewGuid():N}");

    [TearDown]
    public void DeleteDirectory()
    {
        if (Directory.Exists(_directory))
        {
            Directory.Delete(_directory, recursive: true);
        }
    }

    [Test]
    public void Replay_reconstructs_every_change_and_the_live_end_forwards_and_backwards()
    {
        using var engine = new OptpolineEngine(new EngineOptions { Memory = new CodeMemoryOptions { RegionSize = 256UL << 10 } });
        using var workload = new LearningWorkload(engine, siteCount: 24, targetCount: 8);
        workload.SetPhase([(0, 0.4), (1, 0.3), (2, 0.2), (3, 0.1)], 1);
        var written = new List<(ulong Address, byte[] Bytes)>();
        engine.Scheduler.Patcher.BeforeVisible = patches =>
        {
            lock (written)
            {
                written.AddRange(patches.Select(p => (p.Address, p.Replacement.ToArray())));
            }
        };

        workload.Start(callerThreads: 2);
        try
        {
            engine.PromoteAsync([.. workload.Sites.Select((s, j) => new SiteUpdate(s, [workload.TargetFor(j, 0, 1)]))]).Wait();
            var regionsBefore = engine.Code.RegionCount;
            engine.StartTracing(new TracingOptions { Directory = _directory });

            // Patches of every kind: 2 slots, then chains (published), then back (chains freed after a grace period).
            engine.PromoteAsync([.. workload.Sites.Select((s, j) => new SiteUpdate(s, [workload.TargetFor(j, 1, 1), workload.TargetFor(j, 0, 1)]))]).Wait();
            engine.PromoteAsync([.. workload.Sites.Select((s, j) => new SiteUpdate(s, [.. Enumerable.Range(0, 5).Select(t => workload.TargetFor(j, t, 1))]))]).Wait();
            engine.PromoteAsync([.. workload.Sites.Take(12).Select(s => new SiteUpdate(s, []))]).Wait();

            // Host code published and freed while tracing, in a region reserved while tracing.
            var filler = engine.Code.Allocate(200 << 10);
            var big = engine.Code.RegionCount > regionsBefore ? filler : engine.Code.Allocate(200 << 10);   // no room for two in one region

            Assert.That(engine.Code.RegionCount, Is.GreaterThan(regionsBefore), "the big block needed a new region");
            new byte[] { 0x55, 0x48, 0x89, 0xE5, 0x5D, 0xC3 }.CopyTo(big.GetWritableSpan());
            engine.PublishCode(big, "host_big");
            engine.FreeCode(big);
            if (filler != big)
            {
                engine.FreeCode(filler);
            }
            var small = engine.Code.Allocate(64);
            new byte[] { 0x31, 0xC0, 0xC3 }.CopyTo(small.GetWritableSpan());
            engine.PublishCode(small, "host_small");
            engine.PromoteAsync([.. workload.Sites.Select((s, j) => new SiteUpdate(s, [workload.TargetFor(j, 2, 1)]))]).Wait();
            Assert.That(engine.StopTracing(), Is.Not.Null);
        }
        finally
        {
            workload.Stop();
        }

        Assert.That(workload.WrongCalls, Is.Zero);
        var live = engine.Code.CommittedRegions.Select(r => (r.Start, Bytes: Live(r.Start, (int)r.Committed))).ToList();

        var replay = TraceReplay.Open(_directory);
        Assert.That(replay.Warnings, Is.Empty);
        Assert.That(replay.Changes, Has.Count.GreaterThan(written.Count), "patches, publishes and frees");
        Assert.That(replay.Mmaps.Select(m => m.Address), Is.SupersetOf(live.Select(l => l.Start)), "an MMAP2 for every region, including the one reserved while tracing");

        // Every patch is recorded with the bytes the patcher wrote, and the replay shows them at that time.
        foreach (var (address, bytes) in written)
        {
            var change = replay.Changes.FirstOrDefault(c => c.Address == address && c.New.AsSpan().SequenceEqual(bytes));
            Assert.That(change, Is.Not.Null, $"a record of the patch at 0x{address:x}");
            Assert.That(replay.ReadForward(address, bytes.Length, change!.Time), Is.EqualTo(bytes));
        }

        // At every record's time, forwards and backwards agree on the bytes it changed.
        foreach (var change in replay.Changes)
        {
            var length = change.New.Length;
            var forward = replay.ReadForward(change.Address, length, change.Time);
            Assert.That(forward, Is.EqualTo(change.New), $"forward at change 0x{change.Address:x} time {change.Time}");
            Assert.That(replay.ReadBackward(change.Address, length, change.Time), Is.EqualTo(forward), $"backward at change 0x{change.Address:x}");
            Assert.That(replay.ReadBackward(change.Address, length, change.Time - 1), Is.EqualTo(replay.ReadForward(change.Address, length, change.Time - 1)), "just before it");
        }

        // At the end the replay is the live code, whole regions.
        foreach (var (start, bytes) in live)
        {
            Assert.That(replay.ReadForward(start, bytes.Length, replay.LastTime), Is.EqualTo(bytes), $"forward = live, region 0x{start:x}");
            Assert.That(replay.ReadBackward(start, bytes.Length, replay.Start.Time), Is.EqualTo(replay.ReadForward(start, bytes.Length, replay.Start.Time)), "backward to the start = the start image");
        }

        Assert.That(replay.Verify(), Is.Empty);
        Assert.That(replay.NameAt(((Optpoline.Sites.InlineSite)workload.Sites[0]).Address, replay.LastTime), Is.Not.Null, "sites' blocks are named from the jitdump");
    }

    [TestCase(false, ExpectedResult = "none", Description = "every record is in the file before the first byte of its patch is restored")]
    [TestCase(true, ExpectedResult = "every batch", Description = "broken variant: the records are written after the first bytes")]
    public string Every_patch_is_on_file_before_its_first_byte_makes_it_visible(bool recordAfterVisible)
    {
        using var engine = new OptpolineEngine();
        var targets = Support.ChecksumCode.EmitTargets(engine, 3);
        var site = engine.CreateInlineSite(Register.RAX, 2, "visible_site");
        Support.ChecksumCode.EmitDriver(engine, Register.RAX, site);
        engine.StartTracing(new TracingOptions { Directory = _directory, JitDump = false });
        engine.Scheduler.Patcher.RecordAfterVisible = recordAfterVisible;
        var checkedBatches = 0;
        var late = 0;
        engine.Scheduler.Patcher.BeforeVisible = patches =>
        {
            // The last step has not run: every first byte is still int3. The file must already hold each patch.
            var onFile = PerfDataReader.Read(Path.Combine(_directory, TraceFiles.TextPokes)).TextPokes.ToList();
            foreach (var patch in patches)
            {
                Assert.That(Live(patch.Address, 1)[0], Is.EqualTo(0xCC), "still in the int3 window");
            }

            late += patches.Any(patch => !onFile.Any(r => r.Address == patch.Address && r.New.AsSpan().SequenceEqual(patch.Replacement.Span) && r.Old.AsSpan().SequenceEqual(patch.Expected.Span))) ? 1 : 0;
            checkedBatches++;
        };

        site.Promote([targets[0], targets[1]]);
        site.Promote([targets[2]]);
        site.Reset();
        engine.Scheduler.Patcher.BeforeVisible = null;
        engine.Scheduler.Patcher.RecordAfterVisible = false;
        var summary = engine.StopTracing()!;
        Assert.That(checkedBatches, Is.GreaterThanOrEqualTo(3));
        Assert.That(PerfDataReader.Read(Path.Combine(_directory, TraceFiles.TextPokes)).TextPokes.Count(), Is.EqualTo(summary.TextPokes), "at the stop every record is on file, either way");

        // The batches whose records were not on file before their changes could be seen.
        return late == 0 ? "none" : late == checkedBatches ? "every batch" : $"{late} of {checkedBatches} batches";
    }

    [Test]
    public void A_failed_trace_write_refuses_later_batches_until_the_trace_stops()
    {
        using var engine = new OptpolineEngine();
        var (site, targets) = DrivenSite(engine, 2, "failing_site", targetCount: 2);
        engine.StartTracing(new TracingOptions { Directory = _directory });
        site.Promote([targets[0]]);
        var trace = engine.Scheduler.Patcher.Trace!;
        var onFile = trace.TextPokeRecords;
        trace.Appender.BeforeWrite = () => throw new IOException("No space left on device (test)");
        var before = Live(site.Address, site.InlineLength);

        // The batch whose records cannot be written is undone (no change without its record)...
        Assert.That(() => site.Promote([targets[0], targets[1]]), Throws.InstanceOf<PatchRejectedException>().With.InnerException.Message.Contains("No space left on device (test)"));
        Assert.That(Live(site.Address, site.InlineLength), Is.EqualTo(before), "the armed patches are restored");
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[0] }));
        Assert.That(engine.AuditCode(), Is.Empty, "the engine's view follows the bytes");

        // ...and later batches are refused before they write anything.
        trace.Appender.BeforeWrite = null;
        Assert.That(() => site.Reset(), Throws.InstanceOf<PatchRejectedException>().With.Message.Contains("No space left on device (test)").And.Message.Contains("Stop tracing"));
        Assert.That(Live(site.Address, site.InlineLength), Is.EqualTo(before), "a refused batch writes nothing");
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[0] }));
        Assert.That(() => engine.StopTracing(), Throws.InstanceOf<IOException>().With.Message.Contains("stopped but incomplete"));
        Assert.That(engine.TraceDirectory, Is.Null);

        // The file ends before the failed write and reads cleanly; without a trace, patching works again.
        Assert.That(PerfDataReader.Read(Path.Combine(_directory, TraceFiles.TextPokes)).TextPokes.Count(), Is.EqualTo(onFile));
        site.Reset();
        Assert.That(site.Targets, Is.Empty);
    }

    [Test]
    public void The_trace_files_are_mapped_ahead_only_while_the_engine_has_no_request_or_batch_in_flight()
    {
        using var engine = new OptpolineEngine();
        engine.StartTracing(new TracingOptions { Directory = _directory });
        Assert.That(engine.Tracing!.Pokes!.HostBusy is not null && engine.Tracing.Jit!.HostBusy is not null, Is.True, "the engine tells both writers");
        foreach (var busy in new[] { engine.Tracing.Pokes.HostBusy!, engine.Tracing.Jit!.HostBusy! })
        {
            Assert.That(busy(), Is.False, "idle engine");
            lock (engine.Scheduler.SyncRoot)
            {
                Assert.That(Task.Run(() => busy()).Result, Is.True, "a request being planned or applied");
            }

            engine.Scheduler.Patcher.BetweenBatches(() => Assert.That(Task.Run(() => busy()).Result, Is.True, "a batch being applied"));
            Assert.That(busy(), Is.False);
        }

        engine.StopTracing();
    }

    [Test]
    public void A_jitdump_write_failing_after_a_batch_is_applied_leaves_the_engine_consistent()
    {
        using var engine = new OptpolineEngine();
        var (site, targets) = DrivenSite(engine, 2, "after_site", targetCount: 2);
        engine.StartTracing(new TracingOptions { Directory = _directory });
        engine.Tracing!.Jit!.Appender.BeforeWrite = () => throw new IOException("No space left on device (test)");

        // The batch is applied; its jitdump reload fails after that. The engine's view must follow the bytes.
        site.Promote([targets[0], targets[1]]);
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[0], targets[1] }));
        Assert.That(engine.AuditCode(), Is.Empty, "the slots the engine believes in are the bytes in memory");
        Assert.That(() => site.Reset(), Throws.InstanceOf<PatchRejectedException>());
        Assert.That(() => engine.StopTracing(), Throws.InstanceOf<IOException>().With.Message.Contains("No space left on device (test)"));
        site.Reset();
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void A_promotion_that_waited_for_a_grace_period_fails_cleanly_when_the_trace_cannot_write()
    {
        using var engine = new OptpolineEngine();
        var (site, targets) = DrivenSite(engine, 1, "waiting_site", targetCount: 2);
        engine.StartTracing(new TracingOptions { Directory = _directory });
        site.Promote([targets[0]]);
        var trace = engine.Scheduler.Patcher.Trace!;
        var writes = 0;
        trace.Appender.BeforeWrite = () =>
        {
            // The demotion's records are written; the next write (the grace worker's batch) fails.
            if (++writes > 1)
            {
                throw new IOException("No space left on device (test)");
            }
        };

        // The slot is demoted at once; the promotion into it waits for a grace period, and the grace
        // worker's batch is refused: the request fails (it must not take the process down).
        var waiting = site.PromoteAsync([targets[1]]);
        Assert.That(() => waiting.Wait(TimeSpan.FromSeconds(10)), Throws.InstanceOf<AggregateException>().With.InnerException.InstanceOf<PatchRejectedException>()
            .And.InnerException.Message.Contains("waited for a grace period"));
        Assert.That(site.Targets, Is.Empty, "the site keeps the demoted slot it has");
        Assert.That(() => engine.StopTracing(), Throws.InstanceOf<IOException>());
        site.Promote([targets[1]]);
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[1] }));
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void Verify_reports_code_written_without_a_record()
    {
        using var engine = new OptpolineEngine();
        var block = engine.Code.Allocate(64);
        new byte[] { 0x31, 0xC0, 0xC3 }.CopyTo(block.GetWritableSpan());
        engine.PublishCode(block, "host_code");
        engine.StartTracing(new TracingOptions { Directory = _directory, JitDump = false });
        // The broken variant: the host rewrites published code behind the engine's back.
        block.GetWritableSpan()[1] = 0xD2;
        engine.StopTracing();

        var mismatches = TraceReplay.Open(_directory).Verify();
        Assert.That(mismatches, Has.Count.EqualTo(1));
        Assert.That(mismatches[0].Address, Is.EqualTo(block.Address + 1));
        Assert.That(mismatches[0].Length, Is.EqualTo(1));
    }

    [Test]
    public void Tracing_set_in_the_options_runs_from_the_start_and_can_be_restarted()
    {
        var first = Path.Combine(_directory, "a");
        var second = Path.Combine(_directory, "b");
        using var engine = new OptpolineEngine(new EngineOptions { Tracing = new TracingOptions { Directory = first } });
        Assert.That(engine.TraceDirectory, Is.EqualTo(Path.GetFullPath(first)));
        var targets = Support.ChecksumCode.EmitTargets(engine, 2);
        var site = engine.CreateInlineSite(Register.RAX, 1, "restart_site");
        Support.ChecksumCode.EmitDriver(engine, Register.RAX, site);
        site.Promote([targets[0]]);
        engine.StartTracing(new TracingOptions { Directory = second, JitDump = false });
        site.Promote([targets[1]]);
        var summary = engine.StopTracing()!;
        Assert.That(engine.TraceDirectory, Is.Null);
        Assert.That(engine.StopTracing(), Is.Null, "stopping twice is harmless");
        Assert.That(summary.Files.Select(Path.GetFileName), Is.EquivalentTo(new[] { TraceFiles.TextPokes, TraceFiles.StartSnapshot, TraceFiles.EndSnapshot }));

        var a = TraceReplay.Open(first);
        var b = TraceReplay.Open(second);
        Assert.That(a.JitLoads.Select(l => l.Name), Does.Contain("optpoline_thunks").And.Contain("restart_site_miss"));
        Assert.That(a.Changes.Any(c => c.Address == site.Slots[0].Start), Is.True);
        Assert.That(a.Verify(), Is.Empty);
        Assert.That(b.Verify(), Is.Empty);
        Assert.That(b.ReadForward(site.Slots[0].Start, 2, b.Start.Time), Is.EqualTo(a.ReadForward(site.Slots[0].Start, 2, a.LastTime)), "the second trace starts where the first ended");
    }

    [Test]
    public void Bad_tracing_options_are_refused_before_anything_is_written()
    {
        using var engine = new OptpolineEngine();
        Assert.That(() => engine.StartTracing(new TracingOptions { Directory = " " }), Throws.ArgumentException.With.Message.Contains("Directory"));
        Assert.That(() => engine.StartTracing(new TracingOptions { Directory = _directory, TextPokes = false, JitDump = false }), Throws.ArgumentException.With.Message.Contains("no output"));
        Assert.That(Directory.Exists(_directory), Is.False);
        Assert.That(() => engine.PublishCode(new CodeBlock(), "x"), Throws.ArgumentException.With.Message.Contains("not a live block"));
    }

    /// <summary>An inline site on RAX with a driver that calls through it, and targets for it.</summary>
    private static (InlineSite Site, ulong[] Targets) DrivenSite(OptpolineEngine engine, int slots, string name, int targetCount)
    {
        var targets = Support.ChecksumCode.EmitTargets(engine, targetCount);
        var site = engine.CreateInlineSite(Register.RAX, slots, name);
        Support.ChecksumCode.EmitDriver(engine, Register.RAX, site);
        return (site, targets);
    }

    private static unsafe byte[] Live(ulong address, int length) => new ReadOnlySpan<byte>((void*)address, length).ToArray();
}
