namespace Optpoline.Memory;

/// <summary>
/// Where code memory comes from. The real provider reserves a memfd dual mapping; tests use one that
/// hands out addresses without mapping anything, so the allocator's bookkeeping is testable alone.
/// </summary>
internal interface ICodePageProvider
{
    /// <summary>Page size that commits are rounded to.</summary>
    int PageSize { get; }

    /// <summary>
    /// Reserves <paramref name="size"/> bytes of address space whose executable view lies entirely in
    /// [<paramref name="low"/>, <paramref name="high"/>), as close to <paramref name="anchor"/> as
    /// possible. Returns null (with a reason) when no such range is free.
    /// </summary>
    CodeReservation? TryReserve(ulong size, ulong low, ulong high, ulong anchor, out string? error);

    /// <summary>Makes [offset, offset + length) usable in both views; page aligned.</summary>
    void Commit(CodeReservation reservation, ulong offset, ulong length);

    /// <summary>Unmaps both views and releases the backing memory.</summary>
    void Release(CodeReservation reservation);
}
