using Optpoline.Stress;

namespace Optpoline.Tests.Patcher;

/// <summary>
/// Invariants 1 and 5 under concurrency: more caller threads than cores run many sites while a patcher
/// thread changes them continuously. The broken variant (no grace period before reusing a slot), with
/// a widened compare-to-call window, must be caught by the same test.
/// </summary>
[NonParallelizable]
public sealed class StressTests
{
    [Test]
    public void Callers_never_reach_the_wrong_target_while_sites_are_repatched([Values(0, 24)] int windowPauses)
    {
        using var engine = new OptpolineEngine(new EngineOptions { SlotWindowPauses = windowPauses });
        using var workload = new StressWorkload(engine, siteCount: 64);
        var result = workload.Run(callerThreads: 4, TimeSpan.FromSeconds(3));
        TestContext.Out.WriteLine(result);
        Assert.That(result.WrongCalls, Is.Zero);
        Assert.That(result.Patches, Is.GreaterThan(10_000));
        Assert.That(result.GracePeriods, Is.GreaterThan(10));
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void Callers_never_reach_the_wrong_target_while_a_hostile_host_runs()
    {
        // Short form of `bench -- stress --hostile`: profiler-like signals whose handler (empty mask)
        // keeps callers ~20 µs wherever they are, threads that start and exit all the time, and a
        // worker that blocks every signal, while the sites are repatched with a widened window.
        // The worker that blocks every signal runs no site (the default BlockedTraps = Ignore).
        using var engine = new OptpolineEngine(new EngineOptions { SlotWindowPauses = 24 });
        using var workload = new StressWorkload(engine, siteCount: 64);
        var result = workload.Run(callerThreads: 4, TimeSpan.FromSeconds(3), hostile: HostileOptions.All);
        TestContext.Out.WriteLine(result);
        Assert.That(result.WrongCalls, Is.Zero);
        Assert.That(result.RolledBack, Is.Zero, "no grace period waits for a thread (none times out)");
        Assert.That(result.Patches, Is.GreaterThan(10_000));
        Assert.That(result.Host, Does.Not.StartWith("0 host signals"));
        Assert.That(result.ChainSlots.InUse, Is.EqualTo(result.ChainSlots.Linked), "every retired chain's slot came back to the arena");
        Assert.That(engine.AuditCode(), Is.Empty);
    }

    [Test]
    public unsafe void The_loop_counts_a_call_that_skips_or_repeats_its_target_on_any_register()
    {
        // The ticket check can fail: targets that do not consume the ticket (as if the site skipped the
        // call) are counted on every site, whatever its register, and so are targets that consume it twice.
        using var engine = new OptpolineEngine();
        var registers = new[] { Iced.Intel.Register.RAX, Iced.Intel.Register.RCX, Iced.Intel.Register.R9 };
        var untaken = registers.Select(r => CheckingTarget.Emit(engine, r)).ToArray();
        var twice = registers.Select(r => CheckingTarget.EmitTicketed(engine, r)).ToArray();
        var table = stackalloc ulong[registers.Length];
        foreach (var (targets, name) in new[] { (untaken, "no ticket"), (twice, "two tickets") })
        {
            for (var j = 0; j < registers.Length; j++)
            {
                table[j] = targets[j];
            }

            var loop = SiteLoop.Emit(engine, registers.Length, 1, j => registers[j], (asm, j) =>
            {
                asm.call(targets[j]);
                if (name == "two tickets")
                {
                    asm.call(targets[j]);
                }
            });
            ulong wrong = 0;
            loop(10, table, &wrong);
            // One per site and iteration; the rax site's second call also sees rax overwritten by the
            // first one's verdict, and says so.
            Assert.That(wrong, Is.EqualTo(name == "no ticket" ? 30UL : 40UL), name);
        }
    }

    [Test]
    public void AuditCode_never_reads_a_batch_in_flight()
    {
        // The audit decodes live sites; a batch's int3 window (int3 + new tail) is undecodable on purpose,
        // so an audit that read one would report a site as corrupt while nothing is wrong.
        using var engine = new OptpolineEngine();
        using var workload = new StressWorkload(engine, siteCount: 64);
        var problems = new List<string>();
        var audits = 0;
        var stop = 0;
        var auditor = new Thread(() =>
        {
            while (Volatile.Read(ref stop) == 0 && problems.Count == 0)
            {
                problems.AddRange(engine.AuditCode());
                audits++;
            }
        });
        auditor.Start();
        var result = workload.Run(callerThreads: 1, TimeSpan.FromSeconds(2));
        Volatile.Write(ref stop, 1);
        auditor.Join();
        TestContext.Out.WriteLine($"{result}; {audits:N0} audits");
        Assert.That(audits, Is.GreaterThan(10));
        Assert.That(problems, Is.Empty);
        Assert.That(result.WrongCalls, Is.Zero);
    }

    [Test]
    public void The_same_stress_test_catches_a_patcher_without_grace_periods()
    {
        // Restartable windows off: the kernel would restart most of the threads the missing grace period
        // leaves in a window, so this variant is the thread-flush design without its flush.
        using var engine = new OptpolineEngine(new EngineOptions
        {
            SlotWindowPauses = 24,
            UnsafeSkipGracePeriod = true,
            Patching = new Optpoline.Patcher.PatcherOptions { UseRestartableSequences = false },
        });
        using var workload = new StressWorkload(engine, siteCount: 64);
        var result = workload.Run(callerThreads: 4, TimeSpan.FromSeconds(20), stopAtFirstWrong: true);
        TestContext.Out.WriteLine(result);
        Assert.That(result.WrongCalls, Is.GreaterThan(0), "the broken variant must be caught");
    }
}
