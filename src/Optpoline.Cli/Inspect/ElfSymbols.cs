using System.Buffers.Binary;
using System.Text;

namespace Optpoline.Cli.Inspect;

/// <summary>
/// The function symbols of an ELF64 little-endian file (.symtab, else .dynsym), by address. Reads the
/// file, not the process: a stripped module names only its exports.
/// </summary>
internal sealed class ElfSymbols
{
    private readonly (ulong Start, ulong Size, string Name)[] _symbols;

    private ElfSymbols((ulong, ulong, string)[] symbols, ulong firstLoadAddress)
    {
        _symbols = symbols;
        FirstLoadAddress = firstLoadAddress;
    }

    /// <summary>The virtual address of the first PT_LOAD segment: a module's load base maps to it.</summary>
    public ulong FirstLoadAddress { get; }

    /// <summary>Reads the symbols, or null when the file is missing or not an ELF64 little-endian file.</summary>
    public static ElfSymbols? TryRead(string path)
    {
        try
        {
            return Parse(File.ReadAllBytes(path));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentOutOfRangeException or IndexOutOfRangeException)
        {
            return null;
        }
    }

    /// <summary>The symbol whose range holds <paramref name="address"/> (a link-time address), and the offset into it.</summary>
    public (string Name, ulong Offset)? Find(ulong address)
    {
        var low = 0;
        var high = _symbols.Length - 1;
        var best = -1;
        while (low <= high)
        {
            var middle = (low + high) / 2;
            if (_symbols[middle].Start <= address)
            {
                best = middle;
                low = middle + 1;
            }
            else
            {
                high = middle - 1;
            }
        }

        if (best < 0)
        {
            return null;
        }

        var (start, size, name) = _symbols[best];
        return address < start + Math.Max(size, 1) ? (name, address - start) : null;
    }

    private static ElfSymbols? Parse(byte[] file)
    {
        ReadOnlySpan<byte> data = file;
        if (data.Length < 64 || !data[..4].SequenceEqual((ReadOnlySpan<byte>)[0x7F, (byte)'E', (byte)'L', (byte)'F']) || data[4] != 2 || data[5] != 1)
        {
            return null;
        }

        var programHeaders = BinaryPrimitives.ReadUInt64LittleEndian(data[32..]);
        var sectionHeaders = BinaryPrimitives.ReadUInt64LittleEndian(data[40..]);
        var programSize = BinaryPrimitives.ReadUInt16LittleEndian(data[54..]);
        var programCount = BinaryPrimitives.ReadUInt16LittleEndian(data[56..]);
        var sectionSize = BinaryPrimitives.ReadUInt16LittleEndian(data[58..]);
        var sectionCount = BinaryPrimitives.ReadUInt16LittleEndian(data[60..]);

        var firstLoad = ulong.MaxValue;
        for (var i = 0; i < programCount; i++)
        {
            var header = data[(int)(programHeaders + (ulong)(i * programSize))..];
            if (BinaryPrimitives.ReadUInt32LittleEndian(header) == 1)
            {
                firstLoad = Math.Min(firstLoad, BinaryPrimitives.ReadUInt64LittleEndian(header[16..]) & ~0xFFFUL);
            }
        }

        var sections = new (uint Type, ulong Offset, ulong Size, uint Link, ulong EntrySize)[sectionCount];
        for (var i = 0; i < sectionCount; i++)
        {
            var header = data[(int)(sectionHeaders + (ulong)(i * sectionSize))..];
            sections[i] = (BinaryPrimitives.ReadUInt32LittleEndian(header[4..]), BinaryPrimitives.ReadUInt64LittleEndian(header[24..]),
                BinaryPrimitives.ReadUInt64LittleEndian(header[32..]), BinaryPrimitives.ReadUInt32LittleEndian(header[40..]),
                BinaryPrimitives.ReadUInt64LittleEndian(header[56..]));
        }

        // SHT_SYMTAB (2) when not stripped, else SHT_DYNSYM (11).
        var table = sections.Where(s => s.Type == 2).Concat(sections.Where(s => s.Type == 11)).FirstOrDefault();
        if (table.EntrySize < 24 || table.Link >= sections.Length)
        {
            return new ElfSymbols([], firstLoad == ulong.MaxValue ? 0 : firstLoad);
        }

        var strings = sections[table.Link];
        var symbols = new List<(ulong, ulong, string)>();
        for (ulong at = table.Offset; at + table.EntrySize <= table.Offset + table.Size; at += table.EntrySize)
        {
            var entry = data[(int)at..];
            var type = entry[4] & 0xF;
            var value = BinaryPrimitives.ReadUInt64LittleEndian(entry[8..]);
            if (type != 2 || value == 0)
            {
                continue;   // functions only (STT_FUNC), defined ones
            }

            var nameAt = (int)(strings.Offset + BinaryPrimitives.ReadUInt32LittleEndian(entry));
            var end = data[nameAt..].IndexOf((byte)0);
            symbols.Add((value, BinaryPrimitives.ReadUInt64LittleEndian(entry[16..]), Encoding.UTF8.GetString(data.Slice(nameAt, end))));
        }

        return new ElfSymbols([.. symbols.OrderBy(s => s.Item1)], firstLoad == ulong.MaxValue ? 0 : firstLoad);
    }
}
