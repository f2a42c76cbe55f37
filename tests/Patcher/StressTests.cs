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
