using Optpoline.Memory;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Memory;

/// <summary>CodeMemory over a provider that maps nothing: growth, limits and bad input.</summary>
public sealed class CodeMemoryBookkeepingTests
{
    private static readonly CodeMemoryOptions SmallRegions = new()
    {
        Anchor = 0x5555_0000_0000,
        RegionSize = 64 << 10,
        MaxRegions = 3,
        CommitChunk = 4096,
    };

    [Test]
    public void Grows_into_new_regions_inside_the_window_then_fails_clearly()
    {
        var provider = new FakePageProvider();
        using var memory = new CodeMemory(provider, SmallRegions);
        var blocks = new List<CodeBlock>();
        while (memory.TryAllocate(16 << 10, 16, out var block, out var error) || Record(error))
        {
            blocks.Add(block);
        }

        Assert.That(blocks, Has.Count.EqualTo(12), "3 regions of 4 blocks each");
        Assert.That(memory.RegionCount, Is.EqualTo(3));
        Assert.That(provider.Reservations.All(r => r.RxBase >= memory.WindowLow && r.RxBase + r.Size <= memory.WindowHigh), "regions stay inside the reach window");
        Assert.That(memory.WindowHigh - memory.WindowLow, Is.LessThanOrEqualTo(2UL << 30), "any two addresses of the window reach each other");
        Assert.That(_lastError, Does.Contain("MaxRegions"));
        Assert.That(() => memory.Allocate(16), Throws.TypeOf<CodeMemoryExhaustedException>().With.Message.Contains("MaxRegions"));

        // Commits cover exactly what was handed out, page by page.
        var committed = provider.Commits.GroupBy(c => c.Reservation).Select(g => g.Sum(c => (long)c.Length));
        Assert.That(committed, Is.All.EqualTo(64 << 10));
    }

    [Test]
    public void A_full_window_is_reported_with_the_anchor()
    {
        using var memory = new CodeMemory(new FakePageProvider(maxReservations: 1), SmallRegions);
        memory.Allocate(64 << 10);
        Assert.That(memory.TryAllocate(16, 16, out _, out var error), Is.False);
        Assert.That(error, Does.Contain("anchor 0x555500000000").And.Contain("window is full"));
    }

    [Test]
    public void Commits_pages_on_demand_only()
    {
        var provider = new FakePageProvider();
        using var memory = new CodeMemory(provider, SmallRegions);
        memory.Allocate(100);
        Assert.That(provider.Commits.Sum(c => (long)c.Length), Is.EqualTo(4096));
        memory.Allocate(5000);
        Assert.That(provider.Commits.Sum(c => (long)c.Length), Is.EqualTo(2 * 4096), "offset 112 + 5008 bytes ends inside the second page");
    }

    [TestCase(0)]
    [TestCase(-5)]
    [TestCase((64 << 10) + 1)]
    [TestCase(int.MaxValue)]
    public void Bad_sizes_throw_with_the_limit(int size)
    {
        using var memory = new CodeMemory(new FakePageProvider(), SmallRegions);
        Assert.That(() => memory.Allocate(size), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("size").IgnoreCase);
        Assert.That(memory.LiveBytes, Is.Zero);
    }

    [TestCase(0)]
    [TestCase(3)]
    [TestCase(48)]
    [TestCase(8192)]
    public void Bad_alignments_throw(int alignment)
    {
        using var memory = new CodeMemory(new FakePageProvider(), SmallRegions);
        Assert.That(() => memory.Allocate(16, alignment), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("power of two"));
    }

    [Test]
    public void Double_free_interior_and_foreign_pointers_are_refused_without_damage()
    {
        using var memory = new CodeMemory(new FakePageProvider(), SmallRegions);
        var a = memory.Allocate(64);
        var b = memory.Allocate(64);
        Assert.That(() => memory.Free(a.Address + 16), Throws.ArgumentException.With.Message.Contains("not its start"));
        Assert.That(() => memory.Free(0x1234), Throws.ArgumentException.With.Message.Contains("not in any region"));
        memory.Free(a);
        Assert.That(() => memory.Free(a), Throws.ArgumentException.With.Message.Contains("double free"));
        Assert.That(memory.IsLive(b.Address, 64), Is.True, "the other block is untouched");
        Assert.That(memory.LiveBytes, Is.EqualTo(64));
    }

    [Test]
    public void Options_out_of_range_are_refused()
    {
        Assert.That(() => new CodeMemory(new FakePageProvider(), new CodeMemoryOptions { ReachRadius = 3UL << 30 }), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("rel32"));
        Assert.That(() => new CodeMemory(new FakePageProvider(), new CodeMemoryOptions { RegionSize = 1000 }), Throws.TypeOf<ArgumentOutOfRangeException>());
        Assert.That(() => new CodeMemory(new FakePageProvider(), new CodeMemoryOptions { MaxRegions = 0 }), Throws.TypeOf<ArgumentOutOfRangeException>());
    }

    private string? _lastError;

    private bool Record(string? error)
    {
        _lastError = error;
        return false;
    }
}
