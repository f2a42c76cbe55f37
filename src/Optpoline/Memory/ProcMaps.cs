using System.Globalization;

namespace Optpoline.Memory;

/// <summary>Reads /proc/self/maps: the mapped ranges, and the main executable's code.</summary>
internal static class ProcMaps
{
    /// <summary>One line of /proc/self/maps (<paramref name="FileOffset"/>: where in the file it starts).</summary>
    internal readonly record struct Mapping(ulong Start, ulong End, string Permissions, string Path, ulong FileOffset = 0);

    public static List<Mapping> Read()
    {
        var result = new List<Mapping>();
        foreach (var line in File.ReadLines("/proc/self/maps"))
        {
            var parts = line.Split(' ', 6, StringSplitOptions.RemoveEmptyEntries);
            if (parts.Length < 5)
            {
                continue;
            }

            var dash = parts[0].IndexOf('-', StringComparison.Ordinal);
            var start = ulong.Parse(parts[0].AsSpan(0, dash), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            var end = ulong.Parse(parts[0].AsSpan(dash + 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            var offset = ulong.Parse(parts[2], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            result.Add(new Mapping(start, end, parts[1], parts.Length > 5 ? parts[5].Trim() : string.Empty, offset));
        }

        result.Sort((a, b) => a.Start.CompareTo(b.Start));
        return result;
    }

    /// <summary>Start of the main executable's first executable mapping, or null if not found.</summary>
    public static ulong? MainExecutableCode()
    {
        string exe;
        try
        {
            exe = new FileInfo("/proc/self/exe").ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? string.Empty;
        }
        catch (IOException)
        {
            return null;
        }

        var code = Read().FirstOrDefault(m => m.Path == exe && m.Permissions.Contains('x', StringComparison.Ordinal));
        return code.End == 0 ? null : code.Start;
    }

    /// <summary>
    /// The start of a free, <paramref name="alignment"/>-aligned range of <paramref name="size"/> bytes
    /// inside [low, high) nearest to <paramref name="anchor"/>, or null.
    /// </summary>
    public static ulong? FindFreeRange(IReadOnlyList<Mapping> maps, ulong size, ulong low, ulong high, ulong anchor, ulong alignment)
    {
        ulong? best = null;
        ulong bestDistance = ulong.MaxValue;
        ulong gapStart = 0;
        for (var i = 0; i <= maps.Count; i++)
        {
            var gapEnd = i < maps.Count ? maps[i].Start : ulong.MaxValue;
            var lo = AlignUp(Math.Max(gapStart, low), alignment);
            var hiEnd = Math.Min(gapEnd, high);
            if (hiEnd > lo && hiEnd - lo >= size)
            {
                var hi = AlignDown(hiEnd - size, alignment);
                var candidate = Math.Clamp(AlignDown(anchor > size / 2 ? anchor - (size / 2) : 0, alignment), lo, hi);
                var middle = candidate + (size / 2);
                var distance = middle > anchor ? middle - anchor : anchor - middle;
                if (distance < bestDistance)
                {
                    best = candidate;
                    bestDistance = distance;
                }
            }

            if (i < maps.Count)
            {
                gapStart = Math.Max(gapStart, maps[i].End);
            }
        }

        return best;
    }

    public static ulong AlignUp(ulong value, ulong alignment) => (value + alignment - 1) & ~(alignment - 1);

    public static ulong AlignDown(ulong value, ulong alignment) => value & ~(alignment - 1);
}
