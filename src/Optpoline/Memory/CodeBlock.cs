namespace Optpoline.Memory;

/// <summary>
/// A block of code memory: the address threads execute (<see cref="Address"/>) and a writable alias
/// of the same bytes. Valid until freed; a copy kept after <see cref="CodeMemory.Free(CodeBlock)"/>
/// must not be used.
/// </summary>
public readonly struct CodeBlock : IEquatable<CodeBlock>
{
    internal CodeBlock(ulong address, ulong writableAddress, int size)
    {
        Address = address;
        WritableAddress = writableAddress;
        Size = size;
    }

    /// <summary>Executable address of the first byte (read + execute view).</summary>
    public ulong Address { get; }

    /// <summary>Address of the same bytes in the writable view (read + write, never executable).</summary>
    public ulong WritableAddress { get; }

    /// <summary>Usable size in bytes (the request rounded up to 16).</summary>
    public int Size { get; }

    /// <summary>Whether this is the default (no block).</summary>
    public bool IsEmpty => Address == 0;

    /// <summary>
    /// The block's bytes through the writable view. Write code here before anything can run it; code
    /// that may be running must be changed through the engine's patcher instead.
    /// </summary>
    public unsafe Span<byte> GetWritableSpan() => new((void*)WritableAddress, Size);

    /// <summary>The block's bytes as executed (read through the executable view).</summary>
    public unsafe ReadOnlySpan<byte> GetExecutableSpan() => new((void*)Address, Size);

    /// <inheritdoc/>
    public bool Equals(CodeBlock other) => Address == other.Address && Size == other.Size;

    /// <inheritdoc/>
    public override bool Equals(object? obj) => obj is CodeBlock other && Equals(other);

    /// <inheritdoc/>
    public override int GetHashCode() => HashCode.Combine(Address, Size);

    /// <inheritdoc/>
    public override string ToString() => $"code 0x{Address:X} ({Size} bytes)";

    /// <summary>Equality by address and size.</summary>
    public static bool operator ==(CodeBlock left, CodeBlock right) => left.Equals(right);

    /// <summary>Inequality by address and size.</summary>
    public static bool operator !=(CodeBlock left, CodeBlock right) => !left.Equals(right);
}
