namespace Optpoline.Memory;

/// <summary>One reserved range: its executable view, its writable view, and provider state.</summary>
internal sealed class CodeReservation(ulong rxBase, ulong rwBase, ulong size, int fd)
{
    /// <summary>Start of the view that threads execute (read + execute).</summary>
    public ulong RxBase { get; } = rxBase;

    /// <summary>Start of the view the engine writes through (read + write).</summary>
    public ulong RwBase { get; } = rwBase;

    /// <summary>Reserved bytes.</summary>
    public ulong Size { get; } = size;

    /// <summary>The memfd behind both views, or -1 for a provider that maps nothing.</summary>
    public int Fd { get; } = fd;

    /// <summary>Bytes of the backing file so far (committed high-water mark).</summary>
    public ulong FileSize { get; set; }
}
