namespace Optpoline.Memory;

/// <summary>
/// Bookkeeping for one region: which byte offsets are free and which are live blocks. It never touches
/// the memory it describes (it lives outside executable memory), so it is tested without mmap.
/// First fit over an address-ordered free list that coalesces on free.
/// </summary>
internal sealed class RegionAllocator
{
    /// <summary>Every block size and offset is a multiple of this.</summary>
    public const ulong Granule = 16;

    private readonly List<(ulong Start, ulong Length)> _free = [];
    private readonly SortedList<ulong, ulong> _live = [];

    public RegionAllocator(ulong capacity)
    {
        Capacity = capacity;
        _free.Add((0, capacity));
    }

    public ulong Capacity { get; }

    /// <summary>The highest end offset ever allocated: what must be committed.</summary>
    public ulong HighWater { get; private set; }

    public int LiveCount => _live.Count;

    public ulong LiveBytes { get; private set; }

    /// <summary>Rounds a request up to the granule.</summary>
    public static ulong RoundSize(ulong size) => (size + Granule - 1) & ~(Granule - 1);

    /// <summary>Finds room for <paramref name="size"/> bytes aligned to <paramref name="alignment"/>.</summary>
    public bool TryAllocate(ulong size, ulong alignment, out ulong offset)
    {
        size = RoundSize(size);
        for (var i = 0; i < _free.Count; i++)
        {
            var (start, length) = _free[i];
            var aligned = (start + alignment - 1) & ~(alignment - 1);
            if (aligned + size > start + length)
            {
                continue;
            }

            var end = start + length;
            _free.RemoveAt(i);
            if (aligned + size < end)
            {
                _free.Insert(i, (aligned + size, end - aligned - size));
            }

            if (aligned > start)
            {
                _free.Insert(i, (start, aligned - start));
            }

            _live.Add(aligned, size);
            LiveBytes += size;
            HighWater = Math.Max(HighWater, aligned + size);
            offset = aligned;
            return true;
        }

        offset = 0;
        return false;
    }

    /// <summary>How a free request was judged.</summary>
    public enum FreeResult
    {
        Freed,
        AlreadyFreed,
        NotABlockStart,
    }

    /// <summary>Frees the live block starting at <paramref name="offset"/>.</summary>
    public FreeResult Free(ulong offset, out ulong length)
    {
        if (!_live.Remove(offset, out length))
        {
            // Derived from the free list, so no history is kept: a start that lies in free memory was
            // freed already (or never handed out); anything else points into a live block.
            var at = LowerBound(offset + 1) - 1;
            var inFree = at >= 0 && offset < _free[at].Start + _free[at].Length;
            return inFree ? FreeResult.AlreadyFreed : FreeResult.NotABlockStart;
        }

        LiveBytes -= length;
        var index = LowerBound(offset);
        var start = offset;
        var end = offset + length;
        if (index < _free.Count && _free[index].Start == end)
        {
            end += _free[index].Length;
            _free.RemoveAt(index);
        }

        if (index > 0 && _free[index - 1].Start + _free[index - 1].Length == start)
        {
            start = _free[index - 1].Start;
            _free.RemoveAt(index - 1);
            index--;
        }

        _free.Insert(index, (start, end - start));
        return FreeResult.Freed;
    }

    /// <summary>The live block containing [offset, offset + length), if any.</summary>
    public bool TryFindBlock(ulong offset, ulong length, out ulong blockStart, out ulong blockLength)
    {
        var keys = _live.Keys;
        int lo = 0, hi = keys.Count - 1, found = -1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >>> 1;
            if (keys[mid] <= offset)
            {
                found = mid;
                lo = mid + 1;
            }
            else
            {
                hi = mid - 1;
            }
        }

        if (found >= 0)
        {
            blockStart = keys[found];
            blockLength = _live.Values[found];
            if (offset + length <= blockStart + blockLength)
            {
                return true;
            }
        }

        blockStart = blockLength = 0;
        return false;
    }

    /// <summary>The free ranges, in address order (for tests and statistics).</summary>
    public IReadOnlyList<(ulong Start, ulong Length)> FreeRanges => _free;

    private int LowerBound(ulong offset)
    {
        int lo = 0, hi = _free.Count;
        while (lo < hi)
        {
            var mid = (lo + hi) >>> 1;
            if (_free[mid].Start < offset)
            {
                lo = mid + 1;
            }
            else
            {
                hi = mid;
            }
        }

        return lo;
    }
}
