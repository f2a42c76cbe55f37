using Optpoline.Memory;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Memory;

/// <summary>Invariant 2 (W^X) on the real memfd dual mapping.</summary>
public sealed class DualMappingTests
{
    [Test]
    public void Writes_through_the_writable_view_appear_in_the_executable_view()
    {
        using var memory = new CodeMemory();
        var block = memory.Allocate(256);
        Assert.That(block.WritableAddress, Is.Not.EqualTo(block.Address));
        var pattern = Enumerable.Range(0, 256).Select(i => (byte)(i * 7)).ToArray();
        pattern.CopyTo(block.GetWritableSpan());
        Assert.That(block.GetExecutableSpan().ToArray(), Is.EqualTo(pattern));
    }

    [Test]
    public unsafe void Committed_memory_outside_live_blocks_holds_int3()
    {
        using var memory = new CodeMemory();
        var first = memory.Allocate(256);
        var second = memory.Allocate(256);
        new byte[256].CopyTo(first.GetWritableSpan());
        new byte[256].CopyTo(second.GetWritableSpan());
        memory.Free(first);
        Assert.That(new ReadOnlySpan<byte>((void*)first.Address, 256).ToArray(), Is.All.EqualTo(0xCC), "a freed block");
        var (start, _, committed) = memory.CommittedRegions.Single();
        var tail = new ReadOnlySpan<byte>((void*)(second.Address + 256), (int)(start + committed - second.Address - 256)).ToArray();
        Assert.That(tail, Is.Not.Empty.And.All.EqualTo(0xCC), "committed pages never handed out");
    }

    [Test]
    public void Views_are_read_execute_and_read_write_and_no_page_is_both_writable_and_executable()
    {
        using var engine = new OptpolineEngine();
        var block = engine.Code.Allocate(1 << 20);
        Assert.That(ProcSelfMaps.PermissionsAt(block.Address), Does.StartWith("r-x"));
        Assert.That(ProcSelfMaps.PermissionsAt(block.WritableAddress), Does.StartWith("rw-"));
        Assert.That(ProcSelfMaps.WritableAndExecutable(), Is.Empty);
    }

    [Test]
    public void Regions_lie_within_reach_of_the_anchor()
    {
        using var memory = new CodeMemory(new CodeMemoryOptions { RegionSize = 1 << 20 });
        var blocks = Enumerable.Range(0, 5).Select(_ => memory.Allocate(1 << 20)).ToList();
        Assert.That(memory.RegionCount, Is.EqualTo(5));
        foreach (var block in blocks)
        {
            var distance = (long)(block.Address - memory.Anchor);
            Assert.That(Math.Abs(distance), Is.LessThan(1L << 30), $"{block} vs anchor 0x{memory.Anchor:X}");
        }
    }

    [Test]
    public void Writes_outside_live_blocks_are_refused()
    {
        using var memory = new CodeMemory();
        var block = memory.Allocate(64);
        Assert.That(() => memory.Write(block.Address + 60, new byte[8]), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("refusing"));
        memory.Free(block);
        Assert.That(() => memory.Write(block.Address, new byte[1]), Throws.TypeOf<ArgumentOutOfRangeException>());
        Assert.That(() => memory.Read(0x1000, new byte[1]), Throws.TypeOf<ArgumentOutOfRangeException>());
    }

    [Test]
    public void Disposed_memory_refuses_use()
    {
        var memory = new CodeMemory();
        memory.Allocate(16);
        memory.Dispose();
        Assert.That(() => memory.Allocate(16), Throws.TypeOf<ObjectDisposedException>());
    }
}
