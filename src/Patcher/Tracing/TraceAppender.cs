using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;
using Optpoline.Patcher.Platform;

namespace Optpoline.Patcher.Tracing;

/// <summary>
/// The growing end of a trace file. A submission is in the file (the page cache) when it returns, so a
/// crash of the process loses nothing that was submitted: it is copied into a shared mapping of the
/// file where the mapping reaches that far, and written with <c>pwrite</c> where it does not. A failed
/// write is kept: every later submission throws it, and nothing more is written, so a file never has a
/// gap in the middle. Submissions are serialized here; the owner keeps the order it needs with its own
/// lock.
/// </summary>
/// <remarks>
/// <para>
/// The whole <see cref="Reservation"/> is mapped onto the file at once, past its end; a background
/// thread (the extender) then prepares the part that records may be copied into: once the records come
/// within <see cref="LowWater"/> of its end, it takes it to <see cref="Headroom"/> ahead of them,
/// allocating the file there (<c>fallocate</c>, so that a full disk is an error there and never a
/// SIGBUS on a store), faulting the pages in and touching each once. It works only at quiet moments:
/// no records for <see cref="IdlePolls"/> polls and the host not busy (<see cref="HostBusy"/>; the engine
/// says so while a patch request is planned or applied), and it stops within a page when the host gets
/// busy. When records outrun it, as they do when batches come back to back, they are written with
/// <c>pwrite</c>, which puts new pages in a file at the least cost; the extender's work would only slow
/// the batches then (measured on a 2-vCPU VM,
/// bench/results/TraceCost.md: copying a 1000-site batch's 106 KB into the mapping took 8 us, writing
/// it 40 to 50 us; a page's first touch from user space cost 4 to 5 us on that VM's paging, and that
/// work on the other vCPU slowed a batch running meanwhile).
/// </para>
/// <para>
/// While a trace runs the file is longer than its records (up to <see cref="Headroom"/> of zeros after
/// them); <see cref="Dispose"/> cuts it back. After a crash the zeros stay, and the readers stop at
/// them (perf.data's size field counts only the records). A file truncated by somebody else while it is
/// mapped ends the process with SIGBUS, as for any mapped file. Past <see cref="Reservation"/> bytes,
/// and where a file cannot be mapped or allocated ahead, every record is written with <c>pwrite</c>.
/// </para>
/// </remarks>
internal sealed unsafe class TraceAppender : IDisposable
{
    /// <summary>How often the extender looks at the file while it refills the mapping.</summary>
    public static readonly TimeSpan Poll = TimeSpan.FromMicroseconds(500);

    /// <summary>How often it looks otherwise.</summary>
    public static readonly TimeSpan FullPoll = TimeSpan.FromMilliseconds(16);

    /// <summary>Polls in a row without a submission before the file counts as idle.</summary>
    public const int IdlePolls = 2;

    /// <summary>Bytes of the file mapped: the part of it that records can be copied into.</summary>
    public const long Reservation = 1L << 30;

    /// <summary>What the constructor maps, so that the first batches find room.</summary>
    public const long FirstExtent = 1 << 20;

    /// <summary>How far a refill takes the mapping ahead of the records.</summary>
    public const long Headroom = 4 << 20;

    /// <summary>How far ahead of the records the mapping may fall before it is refilled.</summary>
    public const long LowWater = 1 << 20;

    private const long Page = 4096;

    private readonly SafeFileHandle _file;
    private readonly int _fd;
    private readonly string _path;
    private readonly long _start;
    private readonly long _sizeField;
    private readonly Lock _lock = new();        // submissions
    private readonly Lock _mapLock = new();     // the mapping's growth and end; after _lock when both are held
    private readonly Thread? _extender;
    private readonly nint _base;                // the mapping of the file (Reservation bytes); 0 when there is none
    private long _mapped;                        // the file is allocated and its pages touched below this
    private long _end;
    private long _copied;
    private long _written;
    private IOException? _failure;
    private volatile bool _stopping;
    private bool _disposed;

    /// <param name="file">The file, open for reading and writing.</param>
    /// <param name="path">Its path, for messages.</param>
    /// <param name="end">Where the first record goes (the file's header is written already).</param>
    /// <param name="sizeField">Offset of a 64-bit field that holds the bytes of records after <paramref name="end"/>
    /// (perf.data's data size), rewritten after every submission; negative: none.</param>
    /// <param name="firstExtent">Bytes mapped at once (tests: 0 maps nothing, and no extender runs).</param>
    public TraceAppender(SafeFileHandle file, string path, long end, long sizeField, long firstExtent = FirstExtent)
    {
        _file = file;
        _fd = (int)file.DangerousGetHandle();
        _path = path;
        _start = end;
        _end = end;
        _sizeField = sizeField;
        if (firstExtent > 0 && TryMap(_fd, out _base))
        {
            if (TryExtend(RoundUp(end + firstExtent)))
            {
                _extender = new Thread(Extend) { IsBackground = true, Name = "optpoline trace extender" };
                _extender.Start();
            }
            else
            {
                _ = PatcherOs.Munmap(_base, (nuint)Reservation);
                _base = 0;
            }
        }
    }

    /// <summary>Test hook: runs before every write (it may throw to simulate a failing disk).</summary>
    internal Action? BeforeWrite { get; set; }

    /// <summary>
    /// Whether the host is busy (the engine: planning or applying a patch request, which submits records
    /// only at its end): the extender does not work meanwhile. Null: it judges by submissions alone.
    /// </summary>
    public Func<bool>? HostBusy { get; set; }

    /// <summary>Where the mapping ends (0 when nothing is mapped).</summary>
    public long MappedEnd => Volatile.Read(ref _mapped);

    /// <summary>Where the next record goes.</summary>
    public long End => Volatile.Read(ref _end);

    /// <summary>Submissions copied into the mapping, and written with <c>pwrite</c>.</summary>
    public (long Copied, long Written) Submissions => (Interlocked.Read(ref _copied), Interlocked.Read(ref _written));

    /// <summary>The failure that stopped writing, if any.</summary>
    public IOException? Failure => Volatile.Read(ref _failure);

    /// <summary>
    /// Appends the concatenation of <paramref name="parts"/>; it is in the file when this returns (one
    /// gathering write where the mapping does not reach).
    /// </summary>
    /// <exception cref="IOException">This write or an earlier one failed.</exception>
    /// <exception cref="ObjectDisposedException">The appender is disposed.</exception>
    public void Submit(params ReadOnlySpan<ReadOnlyMemory<byte>> parts)
    {
        lock (_lock)
        {
            Check();
            try
            {
                BeforeWrite?.Invoke();
                var length = 0;
                foreach (var part in parts)
                {
                    length = checked(length + part.Length);
                }

                if (TryRoom(length, out var into))
                {
                    foreach (var part in parts)
                    {
                        part.Span.CopyTo(into);
                        into = into[part.Length..];
                    }

                    _copied++;
                }
                else
                {
                    if (parts.Length == 1)
                    {
                        RandomAccess.Write(_file, parts[0].Span, _end);
                    }
                    else
                    {
                        RandomAccess.Write(_file, parts.ToArray(), _end);
                    }

                    _written++;
                }

                Advance(length);
            }
#pragma warning disable CA1031 // Any failure to write is kept and surfaces as an IOException.
            catch (Exception failure)
#pragma warning restore CA1031
            {
                throw Fail(failure);
            }
        }
    }

    /// <summary>
    /// Refuses further submissions, stops the extender, unmaps the file and cuts it back to its records
    /// (the owner closes it). Does not throw: see <see cref="Failure"/>.
    /// </summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            _stopping = true;
        }

        _extender?.Join();
        if (_base == 0)
        {
            return;
        }

        lock (_mapLock)
        {
            _ = PatcherOs.Munmap(_base, (nuint)Reservation);
            Volatile.Write(ref _mapped, 0);
            if (PatcherOs.Ftruncate(_fd, _end) != 0 && Failure is null)
            {
                Volatile.Write(ref _failure, new IOException(
                    $"Cutting the trace file {_path} back to its records failed: {PatcherOs.Describe(PatcherOs.LastErrno)}. " +
                    "Its records are complete; zeros follow them, which the readers stop at."));
            }
        }
    }

    private void Check()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (Volatile.Read(ref _failure) is { } failure)
        {
            throw failure;
        }
    }

    /// <summary>Under <see cref="_lock"/>: the mapped bytes for <paramref name="length"/> bytes at the end, if the mapping reaches that far.</summary>
    private bool TryRoom(int length, out Span<byte> into)
    {
        if (_end + length <= Volatile.Read(ref _mapped))
        {
            into = new Span<byte>((void*)(_base + (nint)_end), length);
            return true;
        }

        into = default;
        return false;
    }

    /// <summary>Under <see cref="_lock"/>, after a write: the new end, then the size field, so a reader never sees a size beyond the records.</summary>
    private void Advance(long length)
    {
        Volatile.Write(ref _end, _end + length);
        if (_sizeField < 0)
        {
            return;
        }

        var size = _end - _start;
        if (_sizeField + 8 <= Volatile.Read(ref _mapped))
        {
            Volatile.Write(ref *(long*)(_base + (nint)_sizeField), size);
        }
        else
        {
            Span<byte> bytes = stackalloc byte[8];
            BinaryPrimitives.WriteInt64LittleEndian(bytes, size);
            RandomAccess.Write(_file, bytes, _sizeField);
        }
    }

    private IOException Fail(Exception failure)
    {
        var kept = new IOException(
            $"Writing the trace file {_path} failed ({failure.Message}); it ends before the records of that write. " +
            "Stop tracing and start a new trace to record again.", failure);
        Volatile.Write(ref _failure, kept);
        return kept;
    }

    /// <summary>
    /// Maps the whole reservation onto the file at once, beyond its end (where a store would be a
    /// SIGBUS; records go only below <see cref="_mapped"/>): extending it later is then allocation and
    /// page faults only, never a change to the mapping, which would interrupt every thread of the process
    /// to flush its TLB (an IPI, tens of microseconds on a VM).
    /// </summary>
    private static bool TryMap(int fd, out nint mapping)
    {
        mapping = PatcherOs.Mmap(0, (nuint)Reservation, PatcherOs.ProtRead | PatcherOs.ProtWrite, PatcherOs.MapShared | PatcherOs.MapNoReserve, fd, 0);
        if (mapping == PatcherOs.MapFailed)
        {
            mapping = 0;
            return false;
        }

        return true;
    }

    /// <summary>
    /// Allocates the file up to <paramref name="to"/> (a page multiple within the reservation) and faults
    /// its new pages in. False, with the mapping as it was, when the file cannot be allocated.
    /// </summary>
    private bool TryExtend(long to, bool yieldToHost = false)
    {
        lock (_mapLock)
        {
            var from = _mapped;
            if (_stopping || to <= from)
            {
                return !_stopping;
            }

            // Allocating extends the file's size; bytes already written there (records past the mapping,
            // written with pwrite) keep their contents.
            if (PatcherOs.Fallocate(_fd, 0, from, to - from) != 0)
            {
                return false;
            }

            // Fault the pages in, then touch each once from user space: on some hypervisors a page's
            // first user access costs microseconds even when the kernel has mapped it. Pages that records
            // written with pwrite have filled already are left alone (nothing is copied there again).
            // The touch adds 0 atomically, so it cannot lose a record that a concurrent pwrite puts there.
            // The moment the host gets busy the extender stops (a thread running here when a batch syncs
            // the cores costs that batch an IPI); the pages touched so far count.
            var touch = Math.Max(from, End & ~(Page - 1));
            var reached = Math.Max(touch, from);
            if (touch < to)
            {
                _ = PatcherOs.Madvise(_base + (nint)touch, (nuint)(to - touch), PatcherOs.MadvPopulateWrite);
                for (; reached < to; reached += Page)
                {
                    if (yieldToHost && HostBusy?.Invoke() == true)
                    {
                        break;
                    }

                    _ = Interlocked.Add(ref *(int*)(_base + (nint)reached), 0);
                }
            }

            Volatile.Write(ref _mapped, Math.Min(reached, to));
            return true;
        }
    }

    /// <summary>
    /// Refills the mapping to <see cref="Headroom"/> ahead of the records once it is down to
    /// <see cref="LowWater"/>, at quiet moments only (no records for <see cref="IdlePolls"/> polls, the
    /// host not busy), stopping within a page when the host gets busy: the changes to the process's page
    /// tables come in a burst every few megabytes, not around every batch. Stops for good at the first
    /// failure (a full disk, say): records are then written with <c>pwrite</c>, which reports what is wrong.
    /// </summary>
    private void Extend()
    {
        var seen = End;
        var idle = 0;
        var filling = false;
        while (!_stopping)
        {
            PatcherOs.SleepMicroseconds((long)(filling ? Poll : FullPoll).TotalMicroseconds);
            var end = End;
            idle = end == seen ? idle + 1 : 0;
            seen = end;
            var mapped = MappedEnd;
            var ahead = mapped - end;
            filling = mapped < Reservation && (filling ? ahead < Headroom : ahead < LowWater);
            if (filling && idle >= IdlePolls && HostBusy?.Invoke() != true
                && !TryExtend(Math.Min(RoundUp(end + Headroom), Reservation), yieldToHost: true))
            {
                return;
            }
        }
    }

    private static long RoundUp(long bytes) => (bytes + Page - 1) & ~(Page - 1);
}
