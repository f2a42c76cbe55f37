using Optpoline.Patcher;

namespace Optpoline.Tests.Patcher;

public sealed class QuiescentPatcherTests
{
    private sealed class ArrayView(int size) : ICodeView
    {
        public byte[] Bytes { get; } = new byte[size];

        public int Writes { get; private set; }

        public void Read(ulong address, Span<byte> destination) => Bytes.AsSpan((int)address, destination.Length).CopyTo(destination);

        public void Write(ulong address, ReadOnlySpan<byte> bytes)
        {
            Writes++;
            bytes.CopyTo(Bytes.AsSpan((int)address));
        }
    }

    [Test]
    public void Applies_validated_patches_and_skips_no_ops()
    {
        var view = new ArrayView(32);
        var applied = QuiescentPatcher.Apply(view, [new CodePatch(0, [0, 0], [1, 2]), new CodePatch(8, [0], [0])]);
        Assert.That(applied, Is.EqualTo(1));
        Assert.That(view.Writes, Is.EqualTo(1));
        Assert.That(view.Bytes[..2], Is.EqualTo(new byte[] { 1, 2 }));
    }

    [Test]
    public void A_stale_expectation_rejects_the_whole_batch_before_writing()
    {
        var view = new ArrayView(32);
        view.Bytes[8] = 0xCC;
        Assert.That(() => QuiescentPatcher.Apply(view, [new CodePatch(0, [0], [1]), new CodePatch(8, [0], [2])]),
            Throws.TypeOf<PatchRejectedException>().With.Message.Contains("0x8").And.Message.Contains("stale"));
        Assert.That(view.Writes, Is.Zero);
    }

    [Test]
    public void Overlapping_patches_are_rejected()
    {
        var view = new ArrayView(32);
        Assert.That(() => QuiescentPatcher.Apply(view, [new CodePatch(0, [0, 0, 0], [1, 1, 1]), new CodePatch(2, [0], [2])]),
            Throws.TypeOf<PatchRejectedException>().With.Message.Contains("overlap"));
        Assert.That(view.Writes, Is.Zero);
    }

    [Test]
    public void Patches_need_equal_non_empty_lengths()
    {
        Assert.That(() => new CodePatch(0, [], []), Throws.ArgumentException);
        Assert.That(() => new CodePatch(0, [1], [1, 2]), Throws.ArgumentException);
    }
}
