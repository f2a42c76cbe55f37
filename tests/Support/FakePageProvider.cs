using Optpoline.Memory;

namespace Optpoline.Tests.Support;

/// <summary>
/// Hands out address ranges without mmap, so allocator bookkeeping is tested alone. Executable
/// addresses are simulated (the next free spot of the window); the writable view is ordinary native
/// heap memory, since fresh blocks are filled with int3 through it.
/// </summary>
internal sealed unsafe class FakePageProvider(int maxReservations = int.MaxValue) : ICodePageProvider
{
    private ulong _next;

    public int PageSize => 4096;

    public List<CodeReservation> Reservations { get; } = [];

    public List<(CodeReservation Reservation, ulong Offset, ulong Length)> Commits { get; } = [];

    public int Released { get; private set; }

    public CodeReservation? TryReserve(ulong size, ulong low, ulong high, ulong anchor, out string? error)
    {
        if (_next == 0)
        {
            _next = low;
        }

        if (Reservations.Count >= maxReservations || _next + size > high)
        {
            error = "the simulated window is full.";
            return null;
        }

        var writable = (ulong)System.Runtime.InteropServices.NativeMemory.Alloc((nuint)size);
        var reservation = new CodeReservation(_next, writable, size, -1);
        _next += size + 0x10000;
        Reservations.Add(reservation);
        error = null;
        return reservation;
    }

    public void Commit(CodeReservation reservation, ulong offset, ulong length)
    {
        Assert.That(offset % (ulong)PageSize, Is.Zero, "commit offset is page aligned");
        Assert.That(length % (ulong)PageSize, Is.Zero, "commit length is page aligned");
        Assert.That(offset + length, Is.LessThanOrEqualTo(reservation.Size), "commit stays inside the reservation");
        Commits.Add((reservation, offset, length));
    }

    public void Release(CodeReservation reservation)
    {
        System.Runtime.InteropServices.NativeMemory.Free((void*)reservation.RwBase);
        Released++;
    }
}
