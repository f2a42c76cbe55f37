using Optpoline.Memory;

namespace Optpoline.Tests.Memory;

public sealed class RegionAllocatorTests
{
    [Test]
    public void Random_allocations_and_frees_never_overlap_and_respect_alignment([Values(1, 2, 3)] int seed)
    {
        const ulong Capacity = 1 << 20;
        var allocator = new RegionAllocator(Capacity);
        var random = new Random(seed);
        var shadow = new SortedDictionary<ulong, ulong>();
        for (var step = 0; step < 20_000; step++)
        {
            if (shadow.Count > 0 && random.Next(3) == 0)
            {
                var victim = shadow.Keys.ElementAt(random.Next(shadow.Count));
                Assert.That(allocator.Free(victim, out var length), Is.EqualTo(RegionAllocator.FreeResult.Freed));
                Assert.That(length, Is.EqualTo(shadow[victim]));
                shadow.Remove(victim);
                continue;
            }

            var size = (ulong)random.Next(1, 3000);
            var alignment = 1UL << random.Next(0, 13);
            if (!allocator.TryAllocate(size, alignment, out var offset))
            {
                continue;
            }

            var rounded = RegionAllocator.RoundSize(size);
            Assert.That(offset % Math.Max(alignment, RegionAllocator.Granule), Is.Zero, "aligned");
            Assert.That(offset + rounded, Is.LessThanOrEqualTo(Capacity), "inside the region");
            var before = shadow.Where(kv => kv.Key < offset).Select(kv => (ulong?)(kv.Key + kv.Value)).LastOrDefault();
            var after = shadow.Keys.Where(k => k >= offset).Select(k => (ulong?)k).FirstOrDefault();
            Assert.That(before is null || before <= offset, "no overlap with the block below");
            Assert.That(after is null || offset + rounded <= after, "no overlap with the block above");
            shadow.Add(offset, rounded);
        }

        // Free space plus live space is the whole region, and the free list is coalesced.
        var free = allocator.FreeRanges;
        Assert.That(free.Aggregate(0UL, (sum, r) => sum + r.Length) + shadow.Values.Aggregate(0UL, (a, b) => a + b), Is.EqualTo(Capacity));
        for (var i = 1; i < free.Count; i++)
        {
            Assert.That(free[i - 1].Start + free[i - 1].Length, Is.LessThan(free[i].Start), "adjacent free ranges are merged");
        }

        foreach (var start in shadow.Keys.ToList())
        {
            allocator.Free(start, out _);
        }

        Assert.That(allocator.FreeRanges, Is.EqualTo(new[] { (0UL, Capacity) }), "everything coalesces back into one range");
    }

    [Test]
    public void Freeing_twice_or_inside_a_block_is_told_apart()
    {
        var allocator = new RegionAllocator(4096);
        Assert.That(allocator.TryAllocate(64, 16, out var a), Is.True);
        Assert.That(allocator.TryAllocate(64, 16, out _), Is.True);
        Assert.That(allocator.Free(a + 16, out _), Is.EqualTo(RegionAllocator.FreeResult.NotABlockStart));
        Assert.That(allocator.Free(a, out _), Is.EqualTo(RegionAllocator.FreeResult.Freed));
        Assert.That(allocator.Free(a, out _), Is.EqualTo(RegionAllocator.FreeResult.AlreadyFreed));
        Assert.That(allocator.LiveCount, Is.EqualTo(1));
    }
}
