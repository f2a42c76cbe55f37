using Optpoline.Platform;

namespace Optpoline.Memory;

/// <summary>
/// W^X code memory from a memfd mapped twice with MAP_SHARED: once read+execute (the view threads run)
/// and once read+write (the view the engine writes through). Neither mapping is ever writable and
/// executable at once. Address space is reserved up front with PROT_NONE; pages are mapped from the
/// memfd as they are committed, and the file grows with them.
/// </summary>
internal sealed class MemfdPageProvider : ICodePageProvider
{
    private const ulong ReserveAlignment = 64 * 1024;
    private const int Attempts = 8;

    /// <summary>The memfd's name.</summary>
    public const string MemfdName = "optpoline-code";

    /// <summary>How the executable view's file shows in /proc/PID/maps (and so in perf).</summary>
    public const string MapsName = "/memfd:" + MemfdName + " (deleted)";

    public int PageSize => Environment.SystemPageSize;

    public CodeReservation? TryReserve(ulong size, ulong low, ulong high, ulong anchor, out string? error)
    {
        var fd = LinuxOs.MemfdCreate(MemfdName, LinuxOs.MfdCloexec);
        if (fd < 0)
        {
            error = $"memfd_create failed: {LinuxOs.Describe(LinuxOs.LastErrno)}.";
            return null;
        }

        var rw = LinuxOs.Mmap(0, (nuint)size, LinuxOs.ProtNone, LinuxOs.MapPrivate | LinuxOs.MapAnonymous | LinuxOs.MapNoReserve, -1, 0);
        if (rw == LinuxOs.MapFailed)
        {
            error = $"Reserving {size} bytes for the writable view failed: {LinuxOs.Describe(LinuxOs.LastErrno)}.";
            LinuxOs.Close(fd);
            return null;
        }

        // The executable view must land inside the reach window: look for a gap in our own maps, then
        // claim it with MAP_FIXED_NOREPLACE (another thread may map there first; then look again).
        for (var attempt = 0; attempt < Attempts; attempt++)
        {
            var candidate = ProcMaps.FindFreeRange(ProcMaps.Read(), size, low, high, anchor, ReserveAlignment);
            if (candidate is null)
            {
                break;
            }

            var rx = LinuxOs.Mmap((nint)candidate.Value, (nuint)size, LinuxOs.ProtNone,
                LinuxOs.MapPrivate | LinuxOs.MapAnonymous | LinuxOs.MapNoReserve | LinuxOs.MapFixedNoReplace, -1, 0);
            if (rx == LinuxOs.MapFailed)
            {
                if (LinuxOs.LastErrno == LinuxOs.EEXIST)
                {
                    continue;
                }

                break;
            }

            if ((ulong)rx != candidate.Value)
            {
                // A kernel older than 4.17 treats MAP_FIXED_NOREPLACE as a hint and may put it elsewhere.
                LinuxOs.Munmap(rx, (nuint)size);
                continue;
            }

            error = null;
            return new CodeReservation((ulong)rx, (ulong)rw, size, fd);
        }

        LinuxOs.Munmap(rw, (nuint)size);
        LinuxOs.Close(fd);
        error = $"No free range of {size >> 20} MiB within [0x{low:X}, 0x{high:X}) around anchor 0x{anchor:X}.";
        return null;
    }

    public void Commit(CodeReservation reservation, ulong offset, ulong length)
    {
        var end = offset + length;
        if (end > reservation.FileSize)
        {
            if (LinuxOs.Ftruncate(reservation.Fd, (long)end) != 0)
            {
                throw new CodeMemoryExhaustedException($"Growing the code memfd to {end} bytes failed: {LinuxOs.Describe(LinuxOs.LastErrno)}.");
            }

            reservation.FileSize = end;
        }

        MapFixed(reservation.RxBase + offset, length, LinuxOs.ProtRead | LinuxOs.ProtExec, reservation.Fd, offset);
        MapFixed(reservation.RwBase + offset, length, LinuxOs.ProtRead | LinuxOs.ProtWrite, reservation.Fd, offset);
    }

    public void Release(CodeReservation reservation)
    {
        LinuxOs.Munmap((nint)reservation.RxBase, (nuint)reservation.Size);
        LinuxOs.Munmap((nint)reservation.RwBase, (nuint)reservation.Size);
        LinuxOs.Close(reservation.Fd);
    }

    private static void MapFixed(ulong address, ulong length, int protection, int fd, ulong offset)
    {
        // MAP_FIXED over our own PROT_NONE reservation: it replaces only pages we reserved.
        var result = LinuxOs.Mmap((nint)address, (nuint)length, protection, LinuxOs.MapShared | LinuxOs.MapFixed, fd, (long)offset);
        if (result == LinuxOs.MapFailed)
        {
            throw new CodeMemoryExhaustedException(
                $"Committing {length} bytes of code memory at 0x{address:X} failed: {LinuxOs.Describe(LinuxOs.LastErrno)}.");
        }
    }
}
