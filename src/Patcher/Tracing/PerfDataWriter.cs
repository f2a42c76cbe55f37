using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Optpoline.Patcher.Tracing;

/// <summary>
/// Writes a perf.data file (the format <c>perf report</c> and <c>perf script</c> read) that holds one
/// dummy software event with <c>text_poke</c> set and a PERF_RECORD_TEXT_POKE for every change to
/// code, with old and new bytes, CLOCK_MONOTONIC time, pid and tid (<c>perf record -k mono</c> uses the
/// same clock). Records are written in the order they are submitted, with one write per submission (a
/// patch batch is one) on the submitting thread, each followed by the header's data size, so a crash of
/// the process loses none of them. Thread safe.
/// </summary>
/// <remarks>
/// Layout (tools/perf/Documentation/perf.data-file-format.txt): a 104-byte header ("PERFILE2", size,
/// attr_size, attrs, data, event_types, feature bitmap), one attribute (perf_event_attr of 112 bytes,
/// which perf 6.1 accepts, then an empty id section), then the records. perf applies TEXT_POKE only to
/// kernel text; for user code the records are for display and for replay, while jitdump carries the
/// bytes that perf uses for symbols.
/// </remarks>
public sealed class PerfDataWriter : IDisposable
{
    /// <summary>PERF_RECORD_COMM.</summary>
    public const uint RecordComm = 3;

    /// <summary>PERF_RECORD_MMAP2.</summary>
    public const uint RecordMmap2 = 10;

    /// <summary>PERF_RECORD_TEXT_POKE.</summary>
    public const uint RecordTextPoke = 20;

    internal const int HeaderSize = 104;
    internal const int AttrSize = 112;
    internal const int AttrEntrySize = AttrSize + 16;
    internal const long DataOffset = HeaderSize + AttrEntrySize;

    private readonly FileStream _file;
    private readonly Lock _lock = new();
    private readonly TraceAppender _appender;
    private readonly int _pid = Environment.ProcessId;
    private byte[]? _spare;     // the last batch's buffer, for the next one (still in this core's cache)
    private bool _disposed;

    /// <summary>
    /// Creates (or truncates) <paramref name="path"/> and writes the header and the attribute. Every
    /// record is in the file when the call that submits it returns.
    /// </summary>
    /// <exception cref="IOException">The file cannot be created or written.</exception>
    public PerfDataWriter(string path)
        : this(path, TraceAppender.FirstExtent)
    {
    }

    /// <summary>Tests: <paramref name="firstExtent"/> bytes mapped at first (0: none, every record goes through <c>pwrite</c>).</summary>
    internal PerfDataWriter(string path, long firstExtent)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        _file = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.Read, bufferSize: 0);
        Path = path;
        var head = new byte[DataOffset];
        var span = head.AsSpan();
        "PERFILE2"u8.CopyTo(span);
        BinaryPrimitives.WriteUInt64LittleEndian(span[8..], HeaderSize);
        BinaryPrimitives.WriteUInt64LittleEndian(span[16..], AttrEntrySize);
        BinaryPrimitives.WriteUInt64LittleEndian(span[24..], HeaderSize);          // attrs.offset
        BinaryPrimitives.WriteUInt64LittleEndian(span[32..], AttrEntrySize);       // attrs.size
        BinaryPrimitives.WriteUInt64LittleEndian(span[40..], (ulong)DataOffset);   // data.offset
        // data.size @48 is updated with every record; event_types @56 and the feature bitmap @72 stay 0.

        var attr = span[HeaderSize..];
        BinaryPrimitives.WriteUInt32LittleEndian(attr, 1);                 // PERF_TYPE_SOFTWARE
        BinaryPrimitives.WriteUInt32LittleEndian(attr[4..], AttrSize);
        BinaryPrimitives.WriteUInt64LittleEndian(attr[8..], 9);            // PERF_COUNT_SW_DUMMY
        BinaryPrimitives.WriteUInt64LittleEndian(attr[24..], 2 | 4);       // sample_type: TID | TIME
        const ulong SampleIdAll = 1UL << 18;
        const ulong UseClockId = 1UL << 25;
        const ulong TextPoke = 1UL << 33;
        BinaryPrimitives.WriteUInt64LittleEndian(attr[40..], SampleIdAll | UseClockId | TextPoke);
        BinaryPrimitives.WriteInt32LittleEndian(attr[92..], 1);            // clockid: CLOCK_MONOTONIC
        RandomAccess.Write(_file.SafeFileHandle, head, 0);
        _appender = new TraceAppender(_file.SafeFileHandle, path, DataOffset, sizeField: 48, firstExtent);
    }

    /// <summary>Tests: the file's appender (how records were written; its BeforeWrite hook simulates a failing disk).</summary>
    internal TraceAppender Appender => _appender;

    /// <summary>
    /// Whether the host is busy with work that a background thread should not slow (the engine: a patch
    /// request in flight). The thread that maps the file ahead of its records waits for a moment when
    /// this is false (and no records have come for a while). Null: it judges by the records alone.
    /// </summary>
    public Func<bool>? HostBusy
    {
        get => _appender.HostBusy;
        set => _appender.HostBusy = value;
    }

    /// <summary>The failure that stopped writing, if a write failed; the file ends before its records.</summary>
    public IOException? Failure => _appender.Failure;

    /// <summary>The file written.</summary>
    public string Path { get; }

    /// <summary>Records written so far.</summary>
    public long Records { get; private set; }

    /// <summary>PERF_RECORD_TEXT_POKE records written so far.</summary>
    public long TextPokeRecords { get; private set; }

    /// <summary>CLOCK_MONOTONIC now, in nanoseconds (.NET's Stopwatch reads that clock on Linux).</summary>
    public static ulong Now() => (ulong)(System.Diagnostics.Stopwatch.GetTimestamp() * (1_000_000_000.0 / System.Diagnostics.Stopwatch.Frequency));

    /// <summary>
    /// Appends a PERF_RECORD_TEXT_POKE: <paramref name="oldBytes"/> at <paramref name="address"/> become
    /// <paramref name="newBytes"/>. A change of equal lengths longer than <see cref="MaxPokeBytes"/> is
    /// split into consecutive records with the same time (a record's size field has 16 bits).
    /// </summary>
    /// <exception cref="ArgumentException">Lengths differ and one exceeds <see cref="MaxPokeBytes"/>.</exception>
    public void TextPoke(ulong address, ReadOnlySpan<byte> oldBytes, ReadOnlySpan<byte> newBytes, ulong time, int tid)
    {
        CheckLengths(oldBytes.Length, newBytes.Length);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var size = ChangeSize(oldBytes.Length, newBytes.Length);
            var records = new byte[size];
            var count = EncodeChange(records, address, oldBytes, newBytes, SampleIdOf(tid), time);
            Submit(records, size, count, count);
        }
    }

    /// <summary>
    /// Appends one PERF_RECORD_TEXT_POKE per patch with one write, all with the same time (one patch
    /// batch): a crash loses the batch in flight or nothing. Same as <see cref="PrepareTextPokes"/> and
    /// <see cref="SubmitTextPokes"/> at once.
    /// </summary>
    public void TextPokes(IReadOnlyList<CodePatch> patches, ulong time, int tid) => SubmitTextPokes(PrepareTextPokes(patches, tid), time);

    /// <summary>
    /// Encodes the records of a batch without their time, so that the patcher can do it before the int3
    /// window opens (encoding 1000 records takes tens of microseconds, which would keep the window open
    /// that much longer: every thread that arrives in it traps); <see cref="SubmitTextPokes"/> stamps the
    /// time and queues them.
    /// </summary>
    public PreparedTextPokes PrepareTextPokes(IReadOnlyList<CodePatch> patches, int tid)
    {
        ArgumentNullException.ThrowIfNull(patches);
        var size = 0;
        for (var i = 0; i < patches.Count; i++)
        {
            size += ChangeSize(patches[i].Length, patches[i].Length);
        }

        // Every byte of every record is written below, so a recycled buffer needs no clearing.
        var records = Interlocked.Exchange(ref _spare, null);
        if (records is null || records.Length < size)
        {
            records = new byte[size];
        }

        var sampleId = SampleIdOf(tid);
        var at = 0;
        var count = 0;
        for (var i = 0; i < patches.Count; i++)
        {
            var patch = patches[i];
            var length = patch.Length;
            if (length <= 16)
            {
                at += EncodeSmall(records.AsSpan(at, PokeSize(length, length)), patch, sampleId);
                count++;
            }
            else
            {
                count += EncodeChange(records.AsSpan(at), patch.Address, patch.Expected.Span, patch.Replacement.Span, sampleId, 0);
                at += ChangeSize(length, length);
            }
        }

        return new PreparedTextPokes(records, size, count);
    }

    /// <summary>
    /// <see cref="EncodePoke"/> for a patch of at most 16 bytes (nearly all of them), with whole-word
    /// stores: a batch encodes a thousand of these. Returns the record's size. Time is left 0.
    /// </summary>
    private static int EncodeSmall(Span<byte> record, CodePatch patch, ulong sampleId)
    {
        var length = patch.Length;
        var size = record.Length;   // PokeSize(length, length): a multiple of 8, at least 40
        ref var r = ref MemoryMarshal.GetReference(record);
        for (var offset = 16; offset < size - 16; offset += 8)
        {
            Unsafe.WriteUnaligned(ref Unsafe.Add(ref r, offset), 0UL);
        }

        Unsafe.WriteUnaligned(ref r, RecordTextPoke | ((ulong)size << 48));
        Unsafe.WriteUnaligned(ref Unsafe.Add(ref r, 8), patch.Address);
        Unsafe.WriteUnaligned(ref Unsafe.Add(ref r, 16), (uint)length | ((uint)length << 16));
        CopySmall(ref Unsafe.Add(ref r, 20), patch.Expected.Span);
        CopySmall(ref Unsafe.Add(ref r, 20 + length), patch.Replacement.Span);
        Unsafe.WriteUnaligned(ref Unsafe.Add(ref r, size - 16), sampleId);
        Unsafe.WriteUnaligned(ref Unsafe.Add(ref r, size - 8), 0UL);
        return size;
    }

    /// <summary>Copies 1 to 16 bytes with at most two overlapping loads and stores.</summary>
    private static void CopySmall(ref byte destination, ReadOnlySpan<byte> source)
    {
        ref var s = ref MemoryMarshal.GetReference(source);
        var n = source.Length;
        if (n >= 8)
        {
            Unsafe.WriteUnaligned(ref destination, Unsafe.ReadUnaligned<ulong>(ref s));
            Unsafe.WriteUnaligned(ref Unsafe.Add(ref destination, n - 8), Unsafe.ReadUnaligned<ulong>(ref Unsafe.Add(ref s, n - 8)));
        }
        else if (n >= 4)
        {
            Unsafe.WriteUnaligned(ref destination, Unsafe.ReadUnaligned<uint>(ref s));
            Unsafe.WriteUnaligned(ref Unsafe.Add(ref destination, n - 4), Unsafe.ReadUnaligned<uint>(ref Unsafe.Add(ref s, n - 4)));
        }
        else
        {
            for (var i = 0; i < n; i++)
            {
                Unsafe.Add(ref destination, i) = Unsafe.Add(ref s, i);
            }
        }
    }

    /// <summary>Stamps <paramref name="time"/> on prepared records and appends them with one write; they are in the file when this returns.</summary>
    /// <exception cref="InvalidOperationException">They were submitted already.</exception>
    public void SubmitTextPokes(PreparedTextPokes prepared, ulong time)
    {
        ArgumentNullException.ThrowIfNull(prepared);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var records = prepared.Take();
            var span = records.AsSpan(0, prepared.Length);
            for (var at = 0; at < span.Length;)
            {
                var size = BinaryPrimitives.ReadUInt16LittleEndian(span[(at + 6)..]);
                BinaryPrimitives.WriteUInt64LittleEndian(span[(at + size - 8)..], time);
                at += size;
            }

            Submit(records, prepared.Length, prepared.Count, prepared.Count);
            _spare = records;
        }
    }

    /// <summary>
    /// Lays out one PERF_RECORD_TEXT_POKE in <paramref name="record"/> (exactly <see cref="PokeSize"/>
    /// bytes): header, address, lengths, old and new bytes padded to 8, then sample_id (pid and tid, time).
    /// </summary>
    private static void EncodePoke(Span<byte> record, ulong address, ReadOnlySpan<byte> oldBytes, ReadOnlySpan<byte> newBytes, ulong sampleId, ulong time)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(record, RecordTextPoke | ((ulong)record.Length << 48));
        BinaryPrimitives.WriteUInt64LittleEndian(record[8..], address);
        BinaryPrimitives.WriteUInt32LittleEndian(record[16..], (uint)oldBytes.Length | ((uint)newBytes.Length << 16));
        oldBytes.CopyTo(record[20..]);
        newBytes.CopyTo(record[(20 + oldBytes.Length)..]);
        record[(20 + oldBytes.Length + newBytes.Length)..^16].Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(record[^16..], sampleId);
        BinaryPrimitives.WriteUInt64LittleEndian(record[^8..], time);
    }

    /// <summary>The first 8 bytes of sample_id: pid, then tid.</summary>
    private ulong SampleIdOf(int tid) => (uint)_pid | ((ulong)(uint)tid << 32);

    /// <summary>Bytes of a PERF_RECORD_TEXT_POKE record: header, address, lengths, bytes padded to 8, sample_id.</summary>
    private static int PokeSize(int oldLength, int newLength) => 8 + ((12 + oldLength + newLength + 7) & ~7) + 16;

    /// <summary>Most bytes one record carries on each side when a change is split.</summary>
    public const int MaxPokeBytes = 16 << 10;

    private static void CheckLengths(int oldLength, int newLength)
    {
        if (oldLength != newLength && Math.Max(oldLength, newLength) > MaxPokeBytes)
        {
            throw new ArgumentException($"A text poke of different lengths holds at most {MaxPokeBytes} bytes each side.", nameof(newLength));
        }
    }

    /// <summary>Bytes of the records of one change (split every <see cref="MaxPokeBytes"/> when the lengths are equal).</summary>
    private static int ChangeSize(int oldLength, int newLength)
    {
        if (oldLength != newLength || oldLength <= MaxPokeBytes)
        {
            return PokeSize(oldLength, newLength);
        }

        var full = oldLength / MaxPokeBytes;
        var rest = oldLength % MaxPokeBytes;
        return (full * PokeSize(MaxPokeBytes, MaxPokeBytes)) + (rest == 0 ? 0 : PokeSize(rest, rest));
    }

    /// <summary>Lays out the records of one change at the start of <paramref name="into"/>; returns how many.</summary>
    private static int EncodeChange(Span<byte> into, ulong address, ReadOnlySpan<byte> oldBytes, ReadOnlySpan<byte> newBytes, ulong sampleId, ulong time)
    {
        var records = 0;
        var offset = 0;
        var at = 0;
        do
        {
            var oldPart = oldBytes.Length == newBytes.Length ? oldBytes.Slice(offset, Math.Min(MaxPokeBytes, oldBytes.Length - offset)) : oldBytes;
            var newPart = oldBytes.Length == newBytes.Length ? newBytes.Slice(offset, oldPart.Length) : newBytes;
            var size = PokeSize(oldPart.Length, newPart.Length);
            EncodePoke(into.Slice(at, size), address + (ulong)offset, oldPart, newPart, sampleId, time);
            at += size;
            records++;
            offset += Math.Max(oldPart.Length, newPart.Length);
        }
        while (oldBytes.Length == newBytes.Length && offset < oldBytes.Length);
        return records;
    }

    /// <summary>Appends a PERF_RECORD_COMM naming this process.</summary>
    public void Comm(string name, int tid, ulong time)
    {
        ArgumentNullException.ThrowIfNull(name);
        var text = Encoding.UTF8.GetBytes(name);
        var padded = (8 + text.Length + 1 + 7) & ~7;
        var record = new byte[8 + padded + 16];
        var span = record.AsSpan();
        Header(span, RecordComm, record.Length);
        BinaryPrimitives.WriteInt32LittleEndian(span[8..], _pid);
        BinaryPrimitives.WriteInt32LittleEndian(span[12..], tid);
        text.CopyTo(span[16..]);
        SampleId(span[(8 + padded)..], tid, time);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            Submit(record, record.Length, 1, 0);
        }
    }

    /// <summary>Appends a PERF_RECORD_MMAP2 for an executable mapping (a code region's RX view).</summary>
    public void Mmap2(ulong address, ulong length, string file, ulong time)
    {
        ArgumentNullException.ThrowIfNull(file);
        var text = Encoding.UTF8.GetBytes(file);
        var fixedPart = 8 + 8 + 8 + 8 + 4 + 4 + 8 + 8 + 4 + 4;
        var padded = (fixedPart + text.Length + 1 + 7) & ~7;
        var record = new byte[8 + padded + 16];
        var span = record.AsSpan();
        Header(span, RecordMmap2, record.Length);
        BinaryPrimitives.WriteInt32LittleEndian(span[8..], _pid);
        BinaryPrimitives.WriteInt32LittleEndian(span[12..], _pid);
        BinaryPrimitives.WriteUInt64LittleEndian(span[16..], address);
        BinaryPrimitives.WriteUInt64LittleEndian(span[24..], length);
        // pgoff, maj, min, ino, ino_generation stay 0.
        BinaryPrimitives.WriteUInt32LittleEndian(span[64..], 5);           // prot: PROT_READ | PROT_EXEC
        BinaryPrimitives.WriteUInt32LittleEndian(span[68..], 1);           // flags: MAP_SHARED
        text.CopyTo(span[72..]);
        SampleId(span[(8 + padded)..], _pid, time);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            Submit(record, record.Length, 1, 0);
        }
    }

    /// <summary>
    /// Closes the file. Does not throw: a failed write is in <see cref="Failure"/>.
    /// </summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (!_disposed)
            {
                _disposed = true;
                _appender.Dispose();
                _file.Dispose();
            }
        }
    }

    private static void Header(Span<byte> span, uint type, int size)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(span, type);
        BinaryPrimitives.WriteUInt16LittleEndian(span[4..], 0);               // misc
        BinaryPrimitives.WriteUInt16LittleEndian(span[6..], checked((ushort)size));
    }

    private void SampleId(Span<byte> span, int tid, ulong time)
    {
        BinaryPrimitives.WriteInt32LittleEndian(span, _pid);
        BinaryPrimitives.WriteInt32LittleEndian(span[4..], tid);
        BinaryPrimitives.WriteUInt64LittleEndian(span[8..], time);
    }

    /// <summary>Under the lock: writes encoded records, in the order of these calls, and counts them.</summary>
    private void Submit(byte[] records, int length, int count, int pokes)
    {
        _appender.Submit(records.AsMemory(0, length));
        Records += count;
        TextPokeRecords += pokes;
    }
}

/// <summary>The encoded TEXT_POKE records of one batch, waiting for their time (<see cref="PerfDataWriter.PrepareTextPokes"/>).</summary>
public sealed class PreparedTextPokes
{
    private byte[]? _records;

    internal PreparedTextPokes(byte[] records, int length, int count)
    {
        _records = records;
        Length = length;
        Count = count;
    }

    /// <summary>Bytes of the records.</summary>
    public int Length { get; }

    /// <summary>Number of records.</summary>
    public int Count { get; }

    internal byte[] Take() => Interlocked.Exchange(ref _records, null) ?? throw new InvalidOperationException("These text pokes were submitted already.");
}
