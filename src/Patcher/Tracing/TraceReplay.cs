using System.Globalization;
using System.Text;
using Iced.Intel;

namespace Optpoline.Patcher.Tracing;

/// <summary>A range where two reconstructions of the code disagree.</summary>
/// <param name="Address">First byte that differs.</param>
/// <param name="Length">Bytes in the range.</param>
/// <param name="What">Which reconstructions disagree, and the likely cause.</param>
public sealed record TraceMismatch(ulong Address, int Length, string What);

/// <summary>
/// The decoder side of a trace: from the starting image (<see cref="TraceFiles.StartSnapshot"/>) and
/// the text pokes (<see cref="TraceFiles.TextPokes"/>) it reconstructs the bytes of any range of engine
/// code at any time, forwards from the start or backwards from the ending image
/// (<see cref="TraceFiles.EndSnapshot"/>), and disassembles them. Committed memory outside live blocks
/// holds int3, so bytes no snapshot covers (pages committed later, regions reserved later) read as 0xCC.
/// </summary>
/// <remarks>
/// The bytes at time T are those after every change recorded at or before T. A change is recorded
/// after its tail is written and before its first byte is restored, and a whole batch shares one time;
/// so from T until the batch's last core sync a thread may still see int3 at the first byte of a change
/// (it traps and takes the equivalent path), never a mix of old and new instructions.
/// </remarks>
public sealed class TraceReplay
{
    private readonly List<(ulong Start, ulong Size)> _regions;

    private TraceReplay(string directory, CodeSnapshot start, CodeSnapshot? end, PerfDataReader pokes, JitDumpReader? jit, List<string> warnings)
    {
        Directory = directory;
        Start = start;
        End = end;
        Warnings = warnings;
        JitLoads = jit?.Loads ?? [];
        var all = pokes.TextPokes.ToList();
        // Stable by time: records of one batch keep their order, and records that two threads wrote in
        // the other order than their times are put back in time order.
        Changes = [.. all.Select((p, i) => (p, i)).OrderBy(x => x.p.Time).ThenBy(x => x.i).Select(x => x.p)];
        Mmaps = [.. pokes.Records.OfType<PerfMmap2>()];
        _regions = [.. start.Regions.Select(r => (r.Start, r.Size))];
        foreach (var region in Mmaps.Select(m => (m.Address, m.Length)).Concat(end?.Regions.Select(r => (r.Start, r.Size)) ?? []))
        {
            if (!_regions.Contains(region))
            {
                _regions.Add(region);
            }
        }

        _regions.Sort();
        foreach (var (regionStart, size) in _regions)
        {
            if (size == 0 || size > MaxRegionSize || regionStart + size < regionStart)
            {
                throw new TraceFormatException($"{directory}: a code region 0x{regionStart:X}+{size} is empty, larger than {MaxRegionSize >> 20} MiB or wraps around; the trace is damaged.");
            }
        }

        for (var i = 1; i < _regions.Count; i++)
        {
            if (_regions[i - 1].Start + _regions[i - 1].Size > _regions[i].Start)
            {
                throw new TraceFormatException($"{directory}: code regions 0x{_regions[i - 1].Start:X}+{_regions[i - 1].Size} and 0x{_regions[i].Start:X}+{_regions[i].Size} overlap (snapshots and MMAP2 records disagree); the trace is damaged.");
            }
        }

        var outside = Changes.Count(c => !_regions.Any(r => c.Address >= r.Start && c.Address - r.Start + (ulong)Math.Max(c.Old.Length, c.New.Length) <= r.Size));
        if (outside > 0)
        {
            throw new TraceFormatException($"{directory}: {outside} text pokes lie outside every code region of the trace (snapshots and MMAP2 records); the trace is damaged or incomplete.");
        }
    }

    /// <summary>The largest region a trace may describe (the engine's reach radius).</summary>
    public const ulong MaxRegionSize = 1UL << 30;

    /// <summary>The trace directory.</summary>
    public string Directory { get; }

    /// <summary>The image when tracing started.</summary>
    public CodeSnapshot Start { get; }

    /// <summary>The image when tracing stopped; null when the trace did not end cleanly.</summary>
    public CodeSnapshot? End { get; }

    /// <summary>Every change, in time order.</summary>
    public IReadOnlyList<PerfTextPoke> Changes { get; }

    /// <summary>The MMAP2 records: the regions, including those reserved while tracing.</summary>
    public IReadOnlyList<PerfMmap2> Mmaps { get; }

    /// <summary>The jitdump's code loads (names of blocks over time); empty without a jitdump.</summary>
    public IReadOnlyList<JitCodeLoad> JitLoads { get; }

    /// <summary>What the readers warned of (a truncated last record, a missing end image).</summary>
    public IReadOnlyList<string> Warnings { get; }

    /// <summary>The code regions (executable address, reserved size).</summary>
    public IReadOnlyList<(ulong Start, ulong Size)> Regions => _regions;

    /// <summary>The time of the last thing known: the end image, else the last change, else the start.</summary>
    public ulong LastTime => End?.Time ?? Math.Max(Start.Time, Changes.Count > 0 ? Changes[^1].Time : 0);

    /// <summary>Opens the trace in <paramref name="directory"/>.</summary>
    /// <exception cref="TraceFormatException">A file is missing, not in its format, or damaged.</exception>
    public static TraceReplay Open(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        if (!System.IO.Directory.Exists(directory))
        {
            throw new TraceFormatException($"{directory}: no such trace directory.");
        }

        var startPath = Path.Combine(directory, TraceFiles.StartSnapshot);
        var pokesPath = Path.Combine(directory, TraceFiles.TextPokes);
        foreach (var needed in new[] { startPath, pokesPath })
        {
            if (!File.Exists(needed))
            {
                throw new TraceFormatException($"{needed}: missing; replay needs {TraceFiles.StartSnapshot} and {TraceFiles.TextPokes} (tracing with text pokes on).");
            }
        }

        var warnings = new List<string>();
        var start = CodeSnapshot.Read(startPath);
        var pokes = PerfDataReader.Read(pokesPath);
        warnings.AddRange(pokes.Warnings);
        var endPath = Path.Combine(directory, TraceFiles.EndSnapshot);
        CodeSnapshot? end = null;
        if (File.Exists(endPath))
        {
            end = CodeSnapshot.Read(endPath);
        }
        else
        {
            warnings.Add($"{endPath}: missing (tracing did not stop cleanly); only forward replay is possible.");
        }

        var jitPath = Path.Combine(directory, TraceFiles.JitDump(start.Pid));
        JitDumpReader? jit = null;
        if (File.Exists(jitPath))
        {
            jit = JitDumpReader.Read(jitPath);
            warnings.AddRange(jit.Warnings);
        }

        return new TraceReplay(directory, start, end, pokes, jit, warnings);
    }

    /// <summary>The bytes of [<paramref name="address"/>, +<paramref name="length"/>) at <paramref name="time"/>, from the start image forwards.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside one code region, or the time precedes the start.</exception>
    public byte[] ReadForward(ulong address, int length, ulong time)
    {
        CheckRange(address, length);
        if (time < Start.Time)
        {
            throw new ArgumentOutOfRangeException(nameof(time), time, $"Time {time} precedes the start of the trace ({Start.Time}).");
        }

        var bytes = Image(Start, address, length);
        foreach (var change in Changes)
        {
            if (change.Time > time)
            {
                break;
            }

            Overlay(bytes, address, change.Address, change.New);
        }

        return bytes;
    }

    /// <summary>The bytes of [<paramref name="address"/>, +<paramref name="length"/>) at <paramref name="time"/>, from the end image backwards.</summary>
    /// <exception cref="InvalidOperationException">The trace has no end image.</exception>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside one code region, or the time follows the end.</exception>
    public byte[] ReadBackward(ulong address, int length, ulong time)
    {
        var end = End ?? throw new InvalidOperationException($"{Directory}: the trace has no end image ({TraceFiles.EndSnapshot}); read forwards.");
        CheckRange(address, length);
        if (time > end.Time)
        {
            throw new ArgumentOutOfRangeException(nameof(time), time, $"Time {time} follows the end of the trace ({end.Time}).");
        }

        var bytes = Image(end, address, length);
        for (var i = Changes.Count - 1; i >= 0 && Changes[i].Time > time; i--)
        {
            var change = Changes[i];
            // A change with no old bytes created code where there was none: before it, the background (int3).
            var old = change.Old.Length > 0 ? change.Old : Enumerable.Repeat((byte)0xCC, change.New.Length).ToArray();
            Overlay(bytes, address, change.Address, old);
        }

        return bytes;
    }

    /// <summary>
    /// Checks the trace against itself: every change's old bytes against the forward image just before
    /// it, and the forward image at the end against the end image. Each disagreement means code changed
    /// without a record (written through the RW view outside the engine, or before it was published).
    /// </summary>
    public IReadOnlyList<TraceMismatch> Verify()
    {
        var mismatches = new List<TraceMismatch>();
        var images = _regions.ToDictionary(r => r.Start, r => (Size: r.Size, Bytes: Image(Start, r.Start, (int)Math.Min(r.Size, Extent(r)))));
        foreach (var change in Changes)
        {
            if (!TryLocate(images, change.Address, Math.Max(change.Old.Length, change.New.Length), out var bytes, out var offset))
            {
                mismatches.Add(new TraceMismatch(change.Address, change.New.Length, $"change at time {change.Time} lies outside every code region"));
                continue;
            }

            if (change.Old.Length > 0 && !bytes.AsSpan(offset, change.Old.Length).SequenceEqual(change.Old))
            {
                mismatches.Add(new TraceMismatch(change.Address, change.Old.Length, $"change at time {change.Time}: its old bytes differ from the replayed bytes before it"));
            }

            change.New.CopyTo(bytes.AsSpan(offset));
        }

        if (End is { } end)
        {
            foreach (var region in end.Regions)
            {
                var replayed = images[region.Start].Bytes;
                var expected = region.Bytes;
                var length = Math.Max(replayed.Length, expected.Length);
                var first = -1;
                for (var i = 0; i <= length; i++)
                {
                    var differs = i < length && (i < replayed.Length ? replayed[i] : (byte)0xCC) != (i < expected.Length ? expected[i] : (byte)0xCC);
                    if (differs && first < 0)
                    {
                        first = i;
                    }
                    else if (!differs && first >= 0)
                    {
                        mismatches.Add(new TraceMismatch(region.Start + (ulong)first, i - first, "the forward replay at the end differs from the end image"));
                        first = -1;
                    }
                }
            }
        }

        return mismatches;
    }

    /// <summary>The name of the block that held <paramref name="address"/> at <paramref name="time"/>, from the jitdump (null: unknown).</summary>
    public string? NameAt(ulong address, ulong time)
    {
        string? name = null;
        foreach (var load in JitLoads)
        {
            if (load.Time > time)
            {
                break;
            }

            if (address >= load.Address && address - load.Address < (ulong)load.Code.Length)
            {
                name = load.Name;
            }
        }

        return name;
    }

    /// <summary>Disassembles <paramref name="code"/> as placed at <paramref name="address"/>: one line per instruction, address, bytes, and Intel syntax.</summary>
    public static IReadOnlyList<string> Disassemble(ulong address, ReadOnlySpan<byte> code)
    {
        var decoder = Iced.Intel.Decoder.Create(64, new ByteArrayCodeReader(code.ToArray()), address);
        var formatter = new IntelFormatter();
        formatter.Options.FirstOperandCharIndex = 8;
        var output = new StringOutput();
        var lines = new List<string>();
        while (decoder.IP < address + (ulong)code.Length)
        {
            var offset = (int)(decoder.IP - address);
            decoder.Decode(out var instruction);
            formatter.Format(instruction, output);
            var length = Math.Min(instruction.Length, code.Length - offset);
            var hex = Convert.ToHexString(code.Slice(offset, length)).ToLowerInvariant();
            var text = instruction.IsInvalid || offset + instruction.Length > code.Length ? "(bad)" : output.ToStringAndReset();
            output.Reset();
            lines.Add(string.Create(CultureInfo.InvariantCulture, $"{instruction.IP:x16}  {hex,-30} {text}"));
        }

        return lines;
    }

    /// <summary>Formats a change for listing: time, address, block name, old and new bytes.</summary>
    public string Describe(PerfTextPoke change)
    {
        ArgumentNullException.ThrowIfNull(change);
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"{change.Time,20} +{(change.Time - Start.Time) / 1e6,12:F3} ms  0x{change.Address:x}");
        var name = NameAt(change.Address, change.Time);
        if (name is not null)
        {
            text.Append(CultureInfo.InvariantCulture, $" {name}");
        }

        text.Append(CultureInfo.InvariantCulture, $"  tid {change.Tid}  {Hex(change.Old)} -> {Hex(change.New)}");
        return text.ToString();
    }

    private static string Hex(byte[] bytes) => bytes.Length == 0 ? "(none)"
        : bytes.Length <= 16 ? Convert.ToHexString(bytes).ToLowerInvariant()
        : $"{Convert.ToHexString(bytes.AsSpan(0, 16)).ToLowerInvariant()}... ({bytes.Length} bytes)";

    private ulong Extent((ulong Start, ulong Size) region)
    {
        ulong extent = 0;
        foreach (var r in Start.Regions.Concat(End?.Regions ?? []))
        {
            if (r.Start == region.Start)
            {
                extent = Math.Max(extent, (ulong)r.Bytes.Length);
            }
        }

        foreach (var change in Changes)
        {
            if (change.Address >= region.Start && change.Address - region.Start < region.Size)
            {
                extent = Math.Max(extent, change.Address - region.Start + (ulong)Math.Max(change.Old.Length, change.New.Length));
            }
        }

        return extent;
    }

    private static bool TryLocate(Dictionary<ulong, (ulong Size, byte[] Bytes)> images, ulong address, int length, out byte[] bytes, out int offset)
    {
        foreach (var (start, (size, image)) in images)
        {
            if (address >= start && address - start + (ulong)length <= (ulong)image.Length)
            {
                bytes = image;
                offset = (int)(address - start);
                return true;
            }
        }

        bytes = [];
        offset = 0;
        return false;
    }

    private void CheckRange(ulong address, int length)
    {
        if (length <= 0 || length > 1 << 26)
        {
            throw new ArgumentOutOfRangeException(nameof(length), length, "Length must be between 1 and 64 MiB.");
        }

        foreach (var (start, size) in _regions)
        {
            if (address >= start && address - start < size && (ulong)length <= size - (address - start))
            {
                return;
            }
        }

        throw new ArgumentOutOfRangeException(nameof(address), $"0x{address:X}+{length} is not inside one code region of the trace ({string.Join(", ", _regions.Select(r => $"0x{r.Start:X}+{r.Size}"))}).");
    }

    private static byte[] Image(CodeSnapshot snapshot, ulong address, int length)
    {
        var bytes = new byte[length];
        bytes.AsSpan().Fill(0xCC);
        foreach (var region in snapshot.Regions)
        {
            Overlay(bytes, address, region.Start, region.Bytes);
        }

        return bytes;
    }

    /// <summary>Copies the part of <paramref name="source"/> (placed at <paramref name="sourceAddress"/>) that falls inside the window.</summary>
    private static void Overlay(byte[] window, ulong windowAddress, ulong sourceAddress, byte[] source)
    {
        var from = Math.Max(windowAddress, sourceAddress);
        var to = Math.Min(windowAddress + (ulong)window.Length, sourceAddress + (ulong)source.Length);
        if (from < to)
        {
            source.AsSpan((int)(from - sourceAddress), (int)(to - from)).CopyTo(window.AsSpan((int)(from - windowAddress)));
        }
    }
}
