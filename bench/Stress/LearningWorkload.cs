using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Sites;

namespace Optpoline.Stress;

/// <summary>
/// Many sites on RAX in one native loop (inline with two slots, or as many as asked, or outline), run by caller threads, with the target
/// distribution of every site set per phase by rewriting the tables the loop reads. Every target checks
/// that RAX holds its own address, so a wrong call is counted. Shared by the learning tests and bench.
/// </summary>
public sealed unsafe class LearningWorkload : IDisposable
{
    /// <summary>Table entries per site; a phase's distribution is laid out over them.</summary>
    public const int TableLength = 1024;

    private readonly ulong* _tables;
    private readonly delegate* unmanaged<ulong, ulong*, ulong*, void> _loop;
    private readonly List<Thread> _callers = [];
    private long _calls;
    private long _wrong;
    private volatile bool _stop;

    public LearningWorkload(OptpolineEngine engine, int siteCount, int targetCount = 300, int inlineSlots = 2, bool outline = false)
    {
        ArgumentNullException.ThrowIfNull(engine);
        Targets = [.. Enumerable.Range(0, targetCount).Select(_ => CheckingTarget.Emit(engine, Register.RAX))];
        _tables = (ulong*)NativeMemory.AlignedAlloc((nuint)(siteCount * TableLength * 8), 64);
        var sites = new List<Site>(siteCount);
        _loop = SiteLoop.Emit(engine, siteCount, TableLength, _ => Register.RAX, (asm, j) =>
        {
            if (outline)
            {
                var entry = engine.CreateOutlineSite(Register.RAX, $"learn{j}");
                asm.call(entry.Entry);
                sites.Add(entry);
                return;
            }

            var site = engine.CreateInlineSite(Register.RAX, inlineSlots, $"learn{j}");
            site.Emit(asm);
            sites.Add(site);
        }, ticketed: false);
        Sites = sites;
    }

    /// <summary>The sites, in loop order.</summary>
    public IReadOnlyList<Site> Sites { get; }

    /// <summary>All targets the phases draw from.</summary>
    public IReadOnlyList<ulong> Targets { get; }

    /// <summary>Calls made so far.</summary>
    public long Calls => Interlocked.Read(ref _calls);

    /// <summary>Calls that reached the wrong function.</summary>
    public long WrongCalls => Interlocked.Read(ref _wrong);

    /// <summary>
    /// Lays out a phase for every site: <paramref name="weights"/> are (target index, share) pairs,
    /// offset per site by <paramref name="siteStride"/> target indices so sites differ.
    /// </summary>
    public void SetPhase(IReadOnlyList<(int Target, double Share)> weights, int siteStride = 0, int seed = 1)
    {
        ArgumentNullException.ThrowIfNull(weights);
        var random = new Random(seed);
        for (var j = 0; j < Sites.Count; j++)
        {
            var row = _tables + (j * TableLength);
            var k = 0;
            foreach (var (target, share) in weights)
            {
                var count = (int)Math.Round(share * TableLength);
                for (var n = 0; n < count && k < TableLength; n++)
                {
                    row[k++] = Targets[(target + (j * siteStride)) % Targets.Count];
                }
            }

            while (k < TableLength)
            {
                row[k++] = Targets[(weights[0].Target + (j * siteStride)) % Targets.Count];
            }

            // Shuffle so that the order of calls is not a pattern the branch predictor learns.
            for (var i = TableLength - 1; i > 0; i--)
            {
                var swap = random.Next(i + 1);
                (row[i], row[swap]) = (row[swap], row[i]);
            }
        }
    }

    /// <summary>The target a phase entry names for site <paramref name="site"/>.</summary>
    public ulong TargetFor(int site, int target, int siteStride = 0) => Targets[(target + (site * siteStride)) % Targets.Count];

    /// <summary>Runs the loop on this thread: every site, <paramref name="iterations"/> times; returns the wrong calls.</summary>
    public long Run(int iterations)
    {
        ulong wrong = 0;
        _loop((ulong)iterations, _tables, &wrong);
        return (long)wrong;
    }

    public void Start(int callerThreads)
    {
        for (var i = 0; i < callerThreads; i++)
        {
            var thread = new Thread(() =>
            {
                ulong wrong = 0;
                while (!_stop)
                {
                    _loop(TableLength, _tables, &wrong);
                    Interlocked.Add(ref _calls, (long)TableLength * Sites.Count);
                    if (wrong != 0)
                    {
                        Interlocked.Add(ref _wrong, (long)wrong);
                    }
                }
            }) { IsBackground = true, Name = "learning caller" };
            thread.Start();
            _callers.Add(thread);
        }
    }

    public void Stop()
    {
        _stop = true;
        _callers.ForEach(t => t.Join());
        _callers.Clear();
    }

    public void Dispose()
    {
        Stop();
        NativeMemory.AlignedFree(_tables);
    }
}
