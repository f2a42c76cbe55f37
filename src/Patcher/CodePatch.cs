namespace Optpoline.Patcher;

/// <summary>
/// One change to code: the bytes expected at <see cref="Address"/> now, and the bytes that replace
/// them. The expected bytes are checked before anything is written, so a patch built from a stale
/// view of the code is refused instead of corrupting it.
/// </summary>
public sealed class CodePatch
{
    /// <summary>Creates a patch; both byte arrays must have the same, non-zero length.</summary>
    /// <exception cref="ArgumentException">The lengths differ or are zero.</exception>
    public CodePatch(ulong address, byte[] expected, byte[] replacement)
    {
        ArgumentNullException.ThrowIfNull(expected);
        ArgumentNullException.ThrowIfNull(replacement);
        if (expected.Length == 0 || expected.Length != replacement.Length)
        {
            throw new ArgumentException(
                $"A patch at 0x{address:X} needs expected and replacement bytes of the same non-zero length " +
                $"(got {expected.Length} and {replacement.Length}).", nameof(replacement));
        }

        Address = address;
        Expected = (byte[])expected.Clone();
        Replacement = (byte[])replacement.Clone();
    }

    /// <summary>The executable address of the first byte.</summary>
    public ulong Address { get; }

    /// <summary>The bytes that must be at <see cref="Address"/> before the patch is applied.</summary>
    public ReadOnlyMemory<byte> Expected { get; }

    /// <summary>The bytes written by the patch.</summary>
    public ReadOnlyMemory<byte> Replacement { get; }

    /// <summary>Length in bytes.</summary>
    public int Length => Replacement.Length;

    /// <summary>Whether applying the patch would change nothing.</summary>
    public bool IsNoOp => Expected.Span.SequenceEqual(Replacement.Span);

    /// <inheritdoc/>
    public override string ToString() =>
        $"0x{Address:X}: [{Convert.ToHexString(Expected.Span)}] -> [{Convert.ToHexString(Replacement.Span)}]";
}
