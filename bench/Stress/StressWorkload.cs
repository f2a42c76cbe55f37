using System.Diagnostics;
using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Sites;

namespace Optpoline.Stress;

/// <summary>
/// Caller threads run many sites in a tight native loop while a patcher thread changes their targets
/// at random (promote, repromote, reorder, demote, reset, outline swaps). Every target checks that the
/// register it was called through holds its own address and returns 1 otherwise, so a wrong call is
/// counted, never missed. Shared by the unit-suite smoke test and the long run of the bench CLI.
/// </summary>
public sealed unsafe class StressWorkload : IDisposable
{
    /// <summary>Registers the sites dispatch on (the loop keeps its own state in rbx and r12-r15).</summary>
    private static readonly Register[] SiteRegisterCycle =
    [
        Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.RDI, Register.R8, Register.R9, Register.R10, Register.RBP,
    ];

    private const int TableLength = 256;
    private readonly OptpolineEngine _engine;
    private readonly Site[] _sites;
    private readonly Dictionary<Register, ulong[]> _targets = [];
    private readonly ulong* _tables;
    private readonly delegate* unmanaged<ulong, ulong*, ulong*, void> _loop;

    /// <summary>Emits <paramref name="siteCount"/> sites (inline with 0, 1, 2 slots and outline-only, in turn) into one loop.</summary>
    public StressWorkload(OptpolineEngine engine, int siteCount, int targetsPerRegister = 10, int seed = 1)
    {
        ArgumentNullException.ThrowIfNull(engine);
        _engine = engine;
        foreach (var register in SiteRegisterCycle)
        {
            _targets[register] = [.. Enumerable.Range(0, targetsPerRegister).Select(_ => CheckingTarget.EmitTicketed(engine, register))];
        }

        var random = new Random(seed);
        _tables = (ulong*)NativeMemory.AlignedAlloc((nuint)(siteCount * TableLength * 8), 64);
        _sites = new Site[siteCount];
        for (var j = 0; j < siteCount; j++)
        {
            var targets = _targets[SiteRegisterCycle[j % SiteRegisterCycle.Length]];
            for (var k = 0; k < TableLength; k++)
            {
                // Skewed so that slots hit often, chains sometimes, and the fallback too.
                var pick = Math.Min(targets.Length - 1, (int)(Math.Pow(random.NextDouble(), 2) * targets.Length));
                _tables[(j * TableLength) + k] = targets[pick];
            }
        }

        _loop = SiteLoop.Emit(engine, siteCount, TableLength, j => SiteRegisterCycle[j % SiteRegisterCycle.Length], (asm, j) =>
        {
            var register = SiteRegisterCycle[j % SiteRegisterCycle.Length];
            if (j % 4 == 3)
            {
                var outline = engine.CreateOutlineSite(register, $"stress{j}");
                asm.call(outline.Entry);
                _sites[j] = outline;
            }
            else
            {
                var inline = engine.CreateInlineSite(register, j % 4, $"stress{j}");
                inline.Emit(asm);
                _sites[j] = inline;
            }
        });
    }

    /// <summary>The sites under test.</summary>
    public IReadOnlyList<Site> Sites => _sites;

    /// <summary>Runs callers and one patcher for <paramref name="duration"/> (or until <paramref name="patchLimit"/> patches, or the first wrong call when <paramref name="stopAtFirstWrong"/>).</summary>
    public StressResult Run(int callerThreads, TimeSpan duration, long patchLimit = long.MaxValue, bool stopAtFirstWrong = false, int seed = 7, HostileOptions? hostile = null)
    {
        var stop = 0;
        long calls = 0, wrong = 0;
        var tids = new List<int>();
        var callers = Enumerable.Range(0, callerThreads).Select(_ => new Thread(() =>
        {
            lock (tids)
            {
                tids.Add(Optpoline.Platform.LinuxOs.Gettid());
            }

            ulong w = 0;
            const ulong Iterations = 2_000;
            while (Volatile.Read(ref stop) == 0)
            {
                _loop(Iterations, _tables, &w);
                Interlocked.Add(ref calls, (long)Iterations * _sites.Length);
                if (w != 0)
                {
                    Interlocked.Add(ref wrong, (long)w);
                    if (stopAtFirstWrong)
                    {
                        Volatile.Write(ref stop, 1);
                    }
                }
            }
        }) { IsBackground = true }).ToList();

        var patchesBefore = _engine.PatchStatistics.Patches;
        var codeBefore = _engine.Code.LiveBytes;
        var descriptorsBefore = _engine.Rseq?.Descriptors ?? 0;
        var random = new Random(seed);
        var clock = Stopwatch.StartNew();
        callers.ForEach(t => t.Start());
        using var host = hostile is null ? null : new HostileHost(_engine, hostile, () =>
        {
            lock (tids)
            {
                return [.. tids];
            }
        });
        var requests = 0L;
        var rolledBack = 0L;
        Task last = Task.CompletedTask;
        try
        {
            while (clock.Elapsed < duration && Volatile.Read(ref stop) == 0 && _engine.PatchStatistics.Patches - patchesBefore < patchLimit)
            {
                // Mostly single-site requests, sometimes a batch over many sites.
                var batch = random.Next(8) == 0 ? random.Next(2, Math.Max(3, _sites.Length)) : 1;
                var updates = new List<SiteUpdate>();
                foreach (var site in _sites.OrderBy(_ => random.Next()).Take(batch))
                {
                    var pool = _targets[site.Register];
                    var count = random.Next(4) == 0 ? 0 : random.Next(1, site.MaxTargets + 1);
                    updates.Add(new SiteUpdate(site, [.. pool.OrderBy(_ => random.Next()).Take(count)]));
                }

                last = _engine.PromoteAsync(updates);
                requests++;
                if (random.Next(64) == 0)
                {
                    // Let a grace period through now and then, so promotions into reused slots land too.
                    rolledBack += Settle(last);
                }
            }
        }
        finally
        {
            // Whatever a request threw, the callers leave the engine's code before the engine can go.
            Volatile.Write(ref stop, 1);
            callers.ForEach(t => t.Join());
        }

        rolledBack += Settle(last);

        // Retired chains go back once the grace worker has run once more.
        SpinWait.SpinUntil(() => _engine.Scheduler.RetiredChainCount == 0, TimeSpan.FromSeconds(5));
        var stats = _engine.PatchStatistics;
        return new StressResult(callerThreads, _sites.Length, Interlocked.Read(ref calls), Interlocked.Read(ref wrong),
            requests, stats.Patches - patchesBefore, _engine.GracePeriods, rolledBack, stats.TrapHits, stats.StaleTraps, clock.Elapsed)
        {
            Host = host?.ToString(),
            CodeBytes = (codeBefore, _engine.Code.LiveBytes),
            NewDescriptors = (_engine.Rseq?.Descriptors ?? 0) - descriptorsBefore,
            ChainSlots = (_engine.Scheduler.Arena?.SlotsInUse ?? 0, _sites.Count(s => s.Chain is not null)),
            Fences = stats.Fences,
            RseqRestarts = stats.RseqRestarts,
        };
    }

    public void Dispose() => NativeMemory.AlignedFree(_tables);

    /// <summary>Waits for a request; a grace period that timed out (rolled back) is a legitimate outcome, counted.</summary>
    private static int Settle(Task request)
    {
        try
        {
            return request.Wait(TimeSpan.FromSeconds(10)) ? 0 : throw new TimeoutException("A site request did not settle within 10 s.");
        }
        catch (AggregateException e) when (e.InnerException is Optpoline.Patcher.PatchTimeoutException)
        {
            return 1;
        }
    }
}

/// <summary>What a stress run did.</summary>
public readonly record struct StressResult(
    int CallerThreads, int Sites, long Calls, long WrongCalls, long Requests, long Patches, long GracePeriods, long RolledBack, long TrapHits, long StaleTraps, TimeSpan Elapsed)
{
    /// <summary>What the hostile host did meanwhile (null: nothing).</summary>
    public string? Host { get; init; }

    /// <summary>Live code memory when the run started and when it ended (retired chains freed): what a leak would grow.</summary>
    public (long Before, long After) CodeBytes { get; init; }

    /// <summary>Chain arena slots in use at the end, against the sites that link a chain: equal when every retired chain came back.</summary>
    public (long InUse, int Linked) ChainSlots { get; init; }

    /// <summary>rseq descriptors created during the run (one per new chain arena block; never freed).</summary>
    public long NewDescriptors { get; init; }

    /// <summary>rseq fences run (grace periods of restartable windows).</summary>
    public long Fences { get; init; }

    /// <summary>Traps the kernel had already restarted inside a window.</summary>
    public long RseqRestarts { get; init; }

    public override string ToString() =>
        $"{CallerThreads} caller threads, {Sites} sites, {Calls:N0} calls, {WrongCalls} wrong, {Requests:N0} requests, {Patches:N0} patches, " +
        $"{GracePeriods:N0} grace periods ({Fences:N0} fences), {RolledBack} rolled back, {TrapHits:N0} trapped calls, {StaleTraps:N0} late traps, " +
        $"{RseqRestarts:N0} restarted traps, in {Elapsed.TotalSeconds:F1} s; code memory {CodeBytes.Before:N0} -> {CodeBytes.After:N0} bytes, " +
        $"{NewDescriptors} new rseq descriptors, chain slots in use {ChainSlots.InUse} for {ChainSlots.Linked} linked chains{(Host is null ? "" : $"; host: {Host}")}";
}
