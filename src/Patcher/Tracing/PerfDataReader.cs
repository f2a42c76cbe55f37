using System.Buffers.Binary;
using System.Text;

namespace Optpoline.Patcher.Tracing;

/// <summary>A record of a perf.data file: its type and where it starts in the file.</summary>
/// <param name="Type">PERF_RECORD_* type.</param>
/// <param name="Offset">Offset of the record in the file.</param>
/// <param name="Pid">Process id from the record's sample_id (-1: none).</param>
/// <param name="Tid">Thread id from the record's sample_id (-1: none).</param>
/// <param name="Time">Time from the record's sample_id (0: none).</param>
public record PerfRecord(uint Type, long Offset, int Pid, int Tid, ulong Time);

/// <summary>PERF_RECORD_TEXT_POKE: the bytes at <paramref name="Address"/> changed from <paramref name="Old"/> to <paramref name="New"/>.</summary>
public sealed record PerfTextPoke(long Offset, int Pid, int Tid, ulong Time, ulong Address, byte[] Old, byte[] New)
    : PerfRecord(PerfDataWriter.RecordTextPoke, Offset, Pid, Tid, Time);

/// <summary>PERF_RECORD_MMAP2: a mapping of <paramref name="Length"/> bytes at <paramref name="Address"/>.</summary>
public sealed record PerfMmap2(long Offset, int Pid, int Tid, ulong Time, ulong Address, ulong Length, uint Protection, string FileName)
    : PerfRecord(PerfDataWriter.RecordMmap2, Offset, Pid, Tid, Time);

/// <summary>PERF_RECORD_COMM: a thread's command name.</summary>
public sealed record PerfComm(long Offset, int Pid, int Tid, ulong Time, string Command)
    : PerfRecord(PerfDataWriter.RecordComm, Offset, Pid, Tid, Time);

/// <summary>
/// Reads the records of a perf.data file (the "PERFILE2" format that <see cref="PerfDataWriter"/> and
/// <c>perf record</c> write): TEXT_POKE, MMAP2 and COMM are decoded, other records are kept as their
/// type and offset. A file whose last record is cut short (a crash while writing), or whose records are
/// followed by zeros (space a writer that did not finish allocated ahead), is read up to there, with a
/// warning; anything else that is not well formed is refused with a <see cref="TraceFormatException"/>.
/// </summary>
public sealed class PerfDataReader
{
    private const ulong SampleTid = 1UL << 1;
    private const ulong SampleTime = 1UL << 2;
    private const ulong SampleId = 1UL << 6;
    private const ulong SampleCpu = 1UL << 7;
    private const ulong SampleStreamId = 1UL << 9;
    private const ulong SampleIdentifier = 1UL << 16;
    private const ulong SampleIdAll = 1UL << 18;

    private PerfDataReader(List<PerfRecord> records, List<string> warnings)
    {
        Records = records;
        Warnings = warnings;
    }

    /// <summary>The records, in file order.</summary>
    public IReadOnlyList<PerfRecord> Records { get; }

    /// <summary>What was wrong but readable (a truncated last record).</summary>
    public IReadOnlyList<string> Warnings { get; }

    /// <summary>The TEXT_POKE records, in file order.</summary>
    public IEnumerable<PerfTextPoke> TextPokes => Records.OfType<PerfTextPoke>();

    /// <summary>Reads the file at <paramref name="path"/>.</summary>
    /// <exception cref="TraceFormatException">The file is not a perf.data file or is damaged.</exception>
    /// <exception cref="IOException">The file cannot be read.</exception>
    public static PerfDataReader Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return Parse(File.ReadAllBytes(path), path);
    }

    /// <summary>Reads a perf.data image; <paramref name="name"/> names it in messages.</summary>
    /// <exception cref="TraceFormatException">The image is not a perf.data file or is damaged.</exception>
    public static PerfDataReader Parse(ReadOnlySpan<byte> file, string name = "perf.data")
    {
        var warnings = new List<string>();
        if (file.Length < PerfDataWriter.HeaderSize)
        {
            throw new TraceFormatException($"{name}: {file.Length} bytes is shorter than a perf.data header ({PerfDataWriter.HeaderSize}); the file is truncated or not perf.data.");
        }

        if (!file[..8].SequenceEqual("PERFILE2"u8))
        {
            throw new TraceFormatException($"{name}: not a perf.data file (magic is not \"PERFILE2\"; big-endian and pipe-mode files are not supported).");
        }

        var headerSize = U64(file, 8);
        var attrSize = U64(file, 16);
        var attrsOffset = U64(file, 24);
        var attrsSize = U64(file, 32);
        var dataOffset = U64(file, 40);
        var dataSize = U64(file, 48);
        var length = (ulong)file.Length;
        if (headerSize != PerfDataWriter.HeaderSize)
        {
            throw new TraceFormatException($"{name}: header size {headerSize} is not {PerfDataWriter.HeaderSize}.");
        }

        if (attrSize < 8 + 64 + 16 || attrSize > 4096)
        {
            throw new TraceFormatException($"{name}: attribute entry size {attrSize} is out of range (80..4096).");
        }

        if (attrsSize == 0 || attrsSize % attrSize != 0 || attrsOffset > length || attrsSize > length - attrsOffset)
        {
            throw new TraceFormatException($"{name}: the attribute section [{attrsOffset}, +{attrsSize}) does not fit the file ({length} bytes) or is not a whole number of {attrSize}-byte entries; the file is truncated or damaged.");
        }

        if (dataOffset < headerSize || dataOffset > length)
        {
            throw new TraceFormatException($"{name}: the data section offset {dataOffset} lies outside the file ({length} bytes).");
        }

        // Every attribute must agree on what sample_id carries, or records cannot be split (perf demands the same).
        var sampleType = U64(file, (int)attrsOffset + 24);
        var flags = U64(file, (int)attrsOffset + 40);
        for (var a = attrsOffset + attrSize; a < attrsOffset + attrsSize; a += attrSize)
        {
            if (U64(file, (int)a + 24) != sampleType || (U64(file, (int)a + 40) & SampleIdAll) != (flags & SampleIdAll))
            {
                throw new TraceFormatException($"{name}: the attributes disagree on sample_type or sample_id_all; records cannot be decoded.");
            }
        }

        var trailer = (flags & SampleIdAll) == 0 ? 0 : SampleIdSize(sampleType);
        if (dataSize > length - dataOffset)
        {
            warnings.Add($"{name}: the header promises {dataSize} data bytes but the file holds {length - dataOffset}; reading what is there.");
            dataSize = length - dataOffset;
        }
        else if (dataSize == 0 && length > dataOffset)
        {
            warnings.Add($"{name}: the header's data size is 0 (the writer stopped early); reading records up to the end of the file.");
            dataSize = length - dataOffset;
        }

        var records = new List<PerfRecord>();
        var data = file.Slice((int)dataOffset, (int)dataSize);
        var position = 0;
        while (position < data.Length)
        {
            var offset = (long)dataOffset + position;
            if (data.Length - position < 8)
            {
                warnings.Add($"{name}: the last record at offset {offset} is cut short ({data.Length - position} of 8 header bytes); ignored.");
                break;
            }

            var type = BinaryPrimitives.ReadUInt32LittleEndian(data[position..]);
            var size = BinaryPrimitives.ReadUInt16LittleEndian(data[(position + 6)..]);
            if (size == 0 && !data[position..].ContainsAnyExcept((byte)0))
            {
                warnings.Add($"{name}: {data.Length - position} bytes of zeros follow the last record at offset {offset} (space the writer allocated ahead; it did not finish); ignored.");
                break;
            }

            if (size < 8)
            {
                throw new TraceFormatException($"{name}: record at offset {offset} (type {type}) has size {size}, less than its own header; the file is damaged.");
            }

            if (size > data.Length - position)
            {
                warnings.Add($"{name}: the last record at offset {offset} (type {type}) is cut short ({data.Length - position} of {size} bytes); ignored.");
                break;
            }

            records.Add(Decode(data.Slice(position, size), type, offset, trailer, sampleType, name));
            position += size;
        }

        return new PerfDataReader(records, warnings);
    }

    private static PerfRecord Decode(ReadOnlySpan<byte> record, uint type, long offset, int trailer, ulong sampleType, string name)
    {
        // Records of type >= PERF_RECORD_USER_TYPE_START (64) are perf's own and carry no sample_id.
        var hasTrailer = trailer > 0 && type < 64 && type != 9;   // PERF_RECORD_SAMPLE (9) carries the full sample instead.
        if (hasTrailer && record.Length < 8 + trailer)
        {
            throw new TraceFormatException($"{name}: record at offset {offset} (type {type}) is {record.Length} bytes, too short for its {trailer}-byte sample_id.");
        }

        var body = record[8..(hasTrailer ? record.Length - trailer : record.Length)];
        int pid = -1, tid = -1;
        ulong time = 0;
        if (hasTrailer)
        {
            var id = record[^trailer..];
            var at = 0;
            if ((sampleType & SampleTid) != 0)
            {
                pid = BinaryPrimitives.ReadInt32LittleEndian(id[at..]);
                tid = BinaryPrimitives.ReadInt32LittleEndian(id[(at + 4)..]);
                at += 8;
            }

            if ((sampleType & SampleTime) != 0)
            {
                time = BinaryPrimitives.ReadUInt64LittleEndian(id[at..]);
            }
        }

        switch (type)
        {
            case PerfDataWriter.RecordTextPoke:
                {
                    if (body.Length < 12)
                    {
                        throw new TraceFormatException($"{name}: TEXT_POKE at offset {offset} has a {body.Length}-byte body, too short for address and lengths.");
                    }

                    var address = BinaryPrimitives.ReadUInt64LittleEndian(body);
                    var oldLength = BinaryPrimitives.ReadUInt16LittleEndian(body[8..]);
                    var newLength = BinaryPrimitives.ReadUInt16LittleEndian(body[10..]);
                    if (12 + oldLength + newLength > body.Length)
                    {
                        throw new TraceFormatException($"{name}: TEXT_POKE at offset {offset} claims {oldLength} old and {newLength} new bytes, more than its {body.Length - 12}-byte payload.");
                    }

                    return new PerfTextPoke(offset, pid, tid, time, address, body.Slice(12, oldLength).ToArray(), body.Slice(12 + oldLength, newLength).ToArray());
                }

            case PerfDataWriter.RecordMmap2:
                {
                    if (body.Length < 64)
                    {
                        throw new TraceFormatException($"{name}: MMAP2 at offset {offset} has a {body.Length}-byte body, too short.");
                    }

                    return new PerfMmap2(offset, BinaryPrimitives.ReadInt32LittleEndian(body), BinaryPrimitives.ReadInt32LittleEndian(body[4..]), time,
                        BinaryPrimitives.ReadUInt64LittleEndian(body[8..]), BinaryPrimitives.ReadUInt64LittleEndian(body[16..]),
                        BinaryPrimitives.ReadUInt32LittleEndian(body[56..]), CString(body[64..], name, offset));
                }

            case PerfDataWriter.RecordComm:
                {
                    if (body.Length < 8)
                    {
                        throw new TraceFormatException($"{name}: COMM at offset {offset} has a {body.Length}-byte body, too short.");
                    }

                    return new PerfComm(offset, BinaryPrimitives.ReadInt32LittleEndian(body), BinaryPrimitives.ReadInt32LittleEndian(body[4..]), time, CString(body[8..], name, offset));
                }

            default:
                return new PerfRecord(type, offset, pid, tid, time);
        }
    }

    private static string CString(ReadOnlySpan<byte> bytes, string name, long offset)
    {
        var end = bytes.IndexOf((byte)0);
        if (end < 0)
        {
            throw new TraceFormatException($"{name}: record at offset {offset} has a string without its terminating NUL.");
        }

        return Encoding.UTF8.GetString(bytes[..end]);
    }

    private static int SampleIdSize(ulong sampleType)
    {
        var size = 0;
        foreach (var bit in new[] { SampleTid, SampleTime, SampleId, SampleStreamId, SampleCpu, SampleIdentifier })
        {
            size += (sampleType & bit) != 0 ? 8 : 0;
        }

        return size;
    }

    private static ulong U64(ReadOnlySpan<byte> file, int offset) => BinaryPrimitives.ReadUInt64LittleEndian(file[offset..]);
}
