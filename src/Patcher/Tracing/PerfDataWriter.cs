using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace Optpoline.Patcher.Tracing;

/// <summary>
/// Writes a perf.data file (the format <c>perf report</c> and <c>perf script</c> read) that holds one
/// dummy software event with <c>text_poke</c> set and a PERF_RECORD_TEXT_POKE for every change to
/// code, with old and new bytes, CLOCK_MONOTONIC time, pid and tid (<c>perf record -k mono</c> uses the
/// same clock). Each record is flushed and the header's data size updated as it is written (one write per
/// patch batch), so a crash loses at most the batch in flight. Thread safe.
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
    private readonly ArrayBufferWriter<byte> _scratch = new(64 << 10);   // records are built here, under the lock, then written at once
    private readonly int _pid = Environment.ProcessId;
    private long _dataSize;
    private bool _disposed;

    /// <summary>Creates (or truncates) <paramref name="path"/> and writes the header and the attribute.</summary>
    public PerfDataWriter(string path)
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
    }

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
            _scratch.ResetWrittenCount();
            var records = AddTextPoke(_scratch, address, oldBytes, newBytes, time, tid);
            Append(_scratch.WrittenSpan, records, records);
        }
    }

    /// <summary>
    /// Appends one PERF_RECORD_TEXT_POKE per patch with one write, all with the same time (one patch
    /// batch): a crash loses the batch in flight or nothing.
    /// </summary>
    public void TextPokes(IReadOnlyList<CodePatch> patches, ulong time, int tid)
    {
        ArgumentNullException.ThrowIfNull(patches);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _scratch.ResetWrittenCount();

            // Patches are small (at most a few dozen bytes): size the buffer once and lay the records
            // out in it directly. This runs inside the batch's int3 window, so it is kept lean.
            var total = 0;
            var small = true;
            for (var i = 0; i < patches.Count; i++)
            {
                var length = patches[i].Length;
                small &= length <= MaxPokeBytes;
                total += PokeSize(length, length);
            }

            var records = 0;
            if (small)
            {
                var span = _scratch.GetSpan(total);
                var sampleId = SampleIdOf(tid);
                var at = 0;
                for (var i = 0; i < patches.Count; i++)
                {
                    var patch = patches[i];
                    var length = patch.Length;
                    var size = PokeSize(length, length);
                    EncodePoke(span.Slice(at, size), patch.Address, patch.Expected.Span, patch.Replacement.Span, sampleId, time);
                    at += size;
                }

                _scratch.Advance(total);
                records = patches.Count;
            }
            else
            {
                for (var i = 0; i < patches.Count; i++)
                {
                    var patch = patches[i];
                    records += AddTextPoke(_scratch, patch.Address, patch.Expected.Span, patch.Replacement.Span, time, tid);
                }
            }

            Append(_scratch.WrittenSpan, records, records);
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

    private int AddTextPoke(ArrayBufferWriter<byte> buffer, ulong address, ReadOnlySpan<byte> oldBytes, ReadOnlySpan<byte> newBytes, ulong time, int tid)
    {
        var records = 0;
        var offset = 0;
        do
        {
            var oldPart = oldBytes.Length == newBytes.Length ? oldBytes.Slice(offset, Math.Min(MaxPokeBytes, oldBytes.Length - offset)) : oldBytes;
            var newPart = oldBytes.Length == newBytes.Length ? newBytes.Slice(offset, oldPart.Length) : newBytes;
            var size = PokeSize(oldPart.Length, newPart.Length);
            EncodePoke(buffer.GetSpan(size)[..size], address + (ulong)offset, oldPart, newPart, SampleIdOf(tid), time);
            buffer.Advance(size);
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
        Append(record);
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
        Append(record);
    }

    /// <summary>Finishes the file.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (!_disposed)
            {
                _disposed = true;
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

    private void Append(byte[] record) => Append(record, 1, 0);

    private void Append(ReadOnlySpan<byte> records, int count, int pokes)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            // Records first, then the header's data size: a reader never sees a size beyond the records.
            RandomAccess.Write(_file.SafeFileHandle, records, DataOffset + _dataSize);
            _dataSize += records.Length;
            Span<byte> size = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(size, (ulong)_dataSize);
            RandomAccess.Write(_file.SafeFileHandle, size, 48);
            Records += count;
            TextPokeRecords += pokes;
        }
    }
}
