using Iced.Intel;

namespace Optpoline.Emit;

/// <summary>Collects encoded bytes in memory.</summary>
internal sealed class ArrayCodeWriter : CodeWriter
{
    private readonly List<byte> _bytes = [];

    public int Length => _bytes.Count;

    public override void WriteByte(byte value) => _bytes.Add(value);

    public byte[] ToArray() => [.. _bytes];
}
