namespace Optpoline.Patcher;

/// <summary>
/// The seam through which the patcher reads and writes code: a view of executable memory addressed
/// by the addresses that threads execute (the RX view), whose writes land through a separate
/// writable mapping. The code region allocator implements it; tests can implement it over an array.
/// </summary>
public interface ICodeView
{
    /// <summary>Copies the bytes currently at <paramref name="address"/> into <paramref name="destination"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside committed code memory.</exception>
    void Read(ulong address, Span<byte> destination);

    /// <summary>Writes <paramref name="bytes"/> at <paramref name="address"/> (an executable address).</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside one live code block.</exception>
    void Write(ulong address, ReadOnlySpan<byte> bytes);
}
