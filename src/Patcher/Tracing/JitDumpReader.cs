using System.Buffers.Binary;
using System.Text;

namespace Optpoline.Patcher.Tracing;

/// <summary>A JIT_CODE_LOAD of a jitdump file: the code of a named block as it was at <paramref name="Time"/>.</summary>
public sealed record JitCodeLoad(long Offset, ulong Time, int Pid, int Tid, ulong Address, ulong CodeIndex, string Name, byte[] Code);

/// <summary>
/// Reads a jitdump file (tools/perf/Documentation/jitdump-specification.txt, version 1, little endian):
/// JIT_CODE_LOAD records are decoded, others (move, debug info, unwinding info, close) are skipped by
/// their size. A cut-short last record, and zeros after the last record (a writer that did not finish
/// leaves the space it allocated ahead), are ignored with a warning; anything else not well formed is
/// refused with a <see cref="TraceFormatException"/>.
/// </summary>
public sealed class JitDumpReader
{
    private const uint Magic = 0x4A695444;
    private const uint SwappedMagic = 0x4454694A;

    private JitDumpReader(int pid, ulong time, List<JitCodeLoad> loads, List<string> warnings, bool closed)
    {
        Pid = pid;
        Time = time;
        Loads = loads;
        Warnings = warnings;
        Closed = closed;
    }

    /// <summary>The process that wrote the dump.</summary>
    public int Pid { get; }

    /// <summary>Header time (when the dump was created).</summary>
    public ulong Time { get; }

    /// <summary>The JIT_CODE_LOAD records in file order.</summary>
    public IReadOnlyList<JitCodeLoad> Loads { get; }

    /// <summary>What was wrong but readable.</summary>
    public IReadOnlyList<string> Warnings { get; }

    /// <summary>Whether the dump ends with JIT_CODE_CLOSE (the writer finished).</summary>
    public bool Closed { get; }

    /// <summary>Reads the dump at <paramref name="path"/>.</summary>
    /// <exception cref="TraceFormatException">Not a jitdump, or damaged.</exception>
    /// <exception cref="IOException">The file cannot be read.</exception>
    public static JitDumpReader Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return Parse(File.ReadAllBytes(path), path);
    }

    /// <summary>Reads a jitdump image; <paramref name="name"/> names it in messages.</summary>
    /// <exception cref="TraceFormatException">Not a jitdump, or damaged.</exception>
    public static JitDumpReader Parse(ReadOnlySpan<byte> file, string name = "jitdump")
    {
        if (file.Length < 40)
        {
            throw new TraceFormatException($"{name}: {file.Length} bytes is shorter than a jitdump header (40); the file is truncated or not a jitdump.");
        }

        var magic = BinaryPrimitives.ReadUInt32LittleEndian(file);
        if (magic == SwappedMagic)
        {
            throw new TraceFormatException($"{name}: a big-endian jitdump; only little-endian (x86-64) dumps are supported.");
        }

        if (magic != Magic)
        {
            throw new TraceFormatException($"{name}: not a jitdump (magic 0x{magic:X8}, expected 0x{Magic:X8}).");
        }

        var version = BinaryPrimitives.ReadUInt32LittleEndian(file[4..]);
        var headerSize = BinaryPrimitives.ReadUInt32LittleEndian(file[8..]);
        if (version != 1)
        {
            throw new TraceFormatException($"{name}: jitdump version {version} is not supported (1 is).");
        }

        if (headerSize < 40 || headerSize > file.Length)
        {
            throw new TraceFormatException($"{name}: header size {headerSize} is out of range (40..{file.Length}).");
        }

        var pid = BinaryPrimitives.ReadInt32LittleEndian(file[20..]);
        var time = BinaryPrimitives.ReadUInt64LittleEndian(file[24..]);
        var warnings = new List<string>();
        var loads = new List<JitCodeLoad>();
        var closed = false;
        var position = (int)headerSize;
        while (position < file.Length)
        {
            var rest = file.Length - position;
            if (!file[position..].ContainsAnyExcept((byte)0))
            {
                warnings.Add($"{name}: {rest} bytes of zeros follow the last record at offset {position} (space the writer allocated ahead; it did not finish); ignored.");
                break;
            }

            if (rest < 16)
            {
                warnings.Add($"{name}: the last record at offset {position} is cut short ({rest} of 16 header bytes); ignored.");
                break;
            }

            var id = BinaryPrimitives.ReadUInt32LittleEndian(file[position..]);
            var size = BinaryPrimitives.ReadUInt32LittleEndian(file[(position + 4)..]);
            if (size < 16)
            {
                throw new TraceFormatException($"{name}: record at offset {position} (id {id}) has size {size}, less than its own header; the file is damaged.");
            }

            if (size > rest)
            {
                warnings.Add($"{name}: the last record at offset {position} (id {id}) is cut short ({rest} of {size} bytes); ignored.");
                break;
            }

            var record = file.Slice(position, (int)size);
            if (id == 0)
            {
                loads.Add(DecodeLoad(record, position, name));
            }
            else if (id == 3)
            {
                closed = true;
            }

            position += (int)size;
        }

        return new JitDumpReader(pid, time, loads, warnings, closed);
    }

    private static JitCodeLoad DecodeLoad(ReadOnlySpan<byte> record, long offset, string name)
    {
        if (record.Length < 56 + 1)
        {
            throw new TraceFormatException($"{name}: JIT_CODE_LOAD at offset {offset} is {record.Length} bytes, too short for its fixed fields.");
        }

        var codeSize = BinaryPrimitives.ReadUInt64LittleEndian(record[40..]);
        var text = record[56..];
        var end = text.IndexOf((byte)0);
        if (end < 0)
        {
            throw new TraceFormatException($"{name}: JIT_CODE_LOAD at offset {offset} has a name without its terminating NUL.");
        }

        if (codeSize != (ulong)(text.Length - end - 1))
        {
            throw new TraceFormatException($"{name}: JIT_CODE_LOAD at offset {offset} claims {codeSize} code bytes but holds {text.Length - end - 1}.");
        }

        return new JitCodeLoad(offset,
            BinaryPrimitives.ReadUInt64LittleEndian(record[8..]),
            BinaryPrimitives.ReadInt32LittleEndian(record[16..]),
            BinaryPrimitives.ReadInt32LittleEndian(record[20..]),
            BinaryPrimitives.ReadUInt64LittleEndian(record[32..]),
            BinaryPrimitives.ReadUInt64LittleEndian(record[48..]),
            Encoding.UTF8.GetString(text[..end]),
            text[(end + 1)..].ToArray());
    }
}
