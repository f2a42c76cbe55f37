using System.Buffers.Binary;

namespace Optpoline.Patcher.Tracing;

/// <summary>One code region in a snapshot: its executable address, reserved size, and the committed bytes (the rest holds int3).</summary>
public sealed record SnapshotRegion(ulong Start, ulong Size, byte[] Bytes);

/// <summary>
/// The bytes of every code region at one moment (CLOCK_MONOTONIC), the starting (and ending) image that
/// replay applies the text pokes to. Format, little endian: "OPTSNAP1", u32 version (1), u32 pid,
/// u64 time, u32 region count, u32 zero, then per region u64 start, u64 reserved size, u64 committed
/// length and that many bytes, zero-padded to 8.
/// </summary>
public sealed class CodeSnapshot
{
    private const int HeaderSize = 32;

    /// <summary>Creates a snapshot.</summary>
    public CodeSnapshot(int pid, ulong time, IReadOnlyList<SnapshotRegion> regions)
    {
        ArgumentNullException.ThrowIfNull(regions);
        Pid = pid;
        Time = time;
        Regions = regions;
    }

    /// <summary>The process whose code this is.</summary>
    public int Pid { get; }

    /// <summary>When the bytes were read (CLOCK_MONOTONIC ns).</summary>
    public ulong Time { get; }

    /// <summary>The regions, by address.</summary>
    public IReadOnlyList<SnapshotRegion> Regions { get; }

    /// <summary>Writes the snapshot to <paramref name="path"/>.</summary>
    public void Write(string path)
    {
        using var file = Create(path, Pid, Time, Regions.Count);
        foreach (var region in Regions)
        {
            WriteRegion(file, region.Start, region.Size, region.Bytes);
        }
    }

    /// <summary>
    /// Writes a snapshot of live memory straight to <paramref name="path"/>, reading each region's
    /// committed bytes at its (readable) executable address, without copying them first.
    /// </summary>
    public static unsafe void WriteLive(string path, int pid, ulong time, IReadOnlyList<(ulong Start, ulong Size, ulong Committed)> regions)
    {
        ArgumentNullException.ThrowIfNull(regions);
        var sorted = regions.OrderBy(r => r.Start).ToList();
        using var file = Create(path, pid, time, sorted.Count);
        foreach (var (start, size, committed) in sorted)
        {
            WriteRegion(file, start, size, new ReadOnlySpan<byte>((void*)start, checked((int)committed)));
        }
    }

    private static FileStream Create(string path, int pid, ulong time, int regions)
    {
        var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.Read);
        Span<byte> header = stackalloc byte[HeaderSize];
        header.Clear();
        "OPTSNAP1"u8.CopyTo(header);
        BinaryPrimitives.WriteUInt32LittleEndian(header[8..], 1);
        BinaryPrimitives.WriteInt32LittleEndian(header[12..], pid);
        BinaryPrimitives.WriteUInt64LittleEndian(header[16..], time);
        BinaryPrimitives.WriteInt32LittleEndian(header[24..], regions);
        file.Write(header);
        return file;
    }

    private static void WriteRegion(FileStream file, ulong start, ulong size, ReadOnlySpan<byte> bytes)
    {
        Span<byte> entry = stackalloc byte[24];
        BinaryPrimitives.WriteUInt64LittleEndian(entry, start);
        BinaryPrimitives.WriteUInt64LittleEndian(entry[8..], size);
        BinaryPrimitives.WriteUInt64LittleEndian(entry[16..], (ulong)bytes.Length);
        file.Write(entry);
        file.Write(bytes);
        Span<byte> pad = stackalloc byte[8];
        pad.Clear();
        file.Write(pad[..((8 - (bytes.Length % 8)) % 8)]);
    }

    /// <summary>Reads the snapshot at <paramref name="path"/>.</summary>
    /// <exception cref="TraceFormatException">Not a snapshot, or damaged.</exception>
    /// <exception cref="IOException">The file cannot be read.</exception>
    public static CodeSnapshot Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return Parse(File.ReadAllBytes(path), path);
    }

    /// <summary>Reads a snapshot image; <paramref name="name"/> names it in messages.</summary>
    /// <exception cref="TraceFormatException">Not a snapshot, or damaged.</exception>
    public static CodeSnapshot Parse(ReadOnlySpan<byte> file, string name = "snapshot")
    {
        if (file.Length < HeaderSize || !file[..8].SequenceEqual("OPTSNAP1"u8))
        {
            throw new TraceFormatException($"{name}: not a code snapshot (it must start with \"OPTSNAP1\" and a {HeaderSize}-byte header).");
        }

        var version = BinaryPrimitives.ReadUInt32LittleEndian(file[8..]);
        if (version != 1)
        {
            throw new TraceFormatException($"{name}: snapshot version {version} is not supported (1 is).");
        }

        var count = BinaryPrimitives.ReadInt32LittleEndian(file[24..]);
        if (count < 0 || count > (file.Length - HeaderSize) / 24)
        {
            throw new TraceFormatException($"{name}: region count {count} does not fit the file ({file.Length} bytes); the file is truncated or damaged.");
        }

        var regions = new List<SnapshotRegion>(count);
        var position = HeaderSize;
        for (var i = 0; i < count; i++)
        {
            if (file.Length - position < 24)
            {
                throw new TraceFormatException($"{name}: region {i} at offset {position} is cut short; the file is truncated.");
            }

            var start = BinaryPrimitives.ReadUInt64LittleEndian(file[position..]);
            var size = BinaryPrimitives.ReadUInt64LittleEndian(file[(position + 8)..]);
            var committed = BinaryPrimitives.ReadUInt64LittleEndian(file[(position + 16)..]);
            position += 24;
            var padded = (committed + 7) & ~7UL;
            if (committed > size || start + size < start || padded > (ulong)(file.Length - position))
            {
                throw new TraceFormatException($"{name}: region {i} (0x{start:X}, {size} bytes reserved, {committed} committed) does not fit the file or itself; the file is truncated or damaged.");
            }

            if (regions.Count > 0 && regions[^1].Start + regions[^1].Size > start)
            {
                throw new TraceFormatException($"{name}: region {i} at 0x{start:X} overlaps or precedes the one before; regions must be sorted and disjoint.");
            }

            regions.Add(new SnapshotRegion(start, size, file.Slice(position, (int)committed).ToArray()));
            position += (int)padded;
        }

        if (position != file.Length)
        {
            throw new TraceFormatException($"{name}: {file.Length - position} bytes follow the last region; the file is damaged.");
        }

        return new CodeSnapshot(BinaryPrimitives.ReadInt32LittleEndian(file[12..]), BinaryPrimitives.ReadUInt64LittleEndian(file[16..]), regions);
    }
}
