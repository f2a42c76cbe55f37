using System.Diagnostics.CodeAnalysis;
using Optpoline.Patcher;

namespace Optpoline.Memory;

/// <summary>
/// The engine's code memory: W^X regions reserved near an anchor, handing out aligned blocks to the
/// engine (thunks, stubs, outline chains) and to the host (its generated code, which then stays within
/// direct reach of every site and target). Thread safe.
/// </summary>
/// <remarks>
/// Every region lies within <see cref="CodeMemoryOptions.ReachRadius"/> (at most 1 GiB) of the anchor,
/// so any two addresses handed out are within a rel32 call of each other. Pages are committed on
/// demand and stay committed until the memory is disposed. Every committed byte outside a live block
/// holds int3 (0xCC): pages are filled when committed and blocks when freed, so a stray jump traps,
/// and a trace can describe the memory as its live blocks over a background of int3.
/// </remarks>
public sealed class CodeMemory : ICodeView, IDisposable
{
    private const ulong UserSpaceLow = 1UL << 20;
    private const ulong UserSpaceHigh = 0x7FFF_FFFF_0000;

    private readonly ICodePageProvider _provider;
    private readonly CodeMemoryOptions _options;
    private readonly List<Region> _regions = [];
    private readonly Lock _lock = new();
    private bool _disposed;
    private ICodeMemoryObserver? _observer;

    /// <summary>Creates code memory backed by a memfd dual mapping.</summary>
    /// <exception cref="ArgumentOutOfRangeException">An option is out of range.</exception>
    public CodeMemory(CodeMemoryOptions? options = null)
        : this(new MemfdPageProvider(), options ?? new CodeMemoryOptions())
    {
    }

    internal CodeMemory(ICodePageProvider provider, CodeMemoryOptions options)
    {
        options.Validate();
        _provider = provider;
        _options = options;
        Anchor = options.Anchor ?? ProcMaps.MainExecutableCode() ?? (ulong)typeof(CodeMemory).TypeHandle.Value;
        WindowLow = Math.Max(Anchor > options.ReachRadius ? Anchor - options.ReachRadius : 0, UserSpaceLow);
        WindowHigh = Math.Min(Anchor + options.ReachRadius, UserSpaceHigh);
    }

    /// <summary>The address all regions stay near.</summary>
    public ulong Anchor { get; }

    /// <summary>Lowest address a region may use.</summary>
    public ulong WindowLow { get; }

    /// <summary>End (exclusive) of the addresses a region may use.</summary>
    public ulong WindowHigh { get; }

    /// <summary>Number of regions reserved so far.</summary>
    public int RegionCount
    {
        get
        {
            lock (_lock)
            {
                return _regions.Count;
            }
        }
    }

    /// <summary>Bytes in live blocks.</summary>
    public long LiveBytes
    {
        get
        {
            lock (_lock)
            {
                return _regions.Sum(r => (long)r.Allocator.LiveBytes);
            }
        }
    }

    /// <summary>The executable view of every region: (start, reserved bytes).</summary>
    public IReadOnlyList<(ulong Start, ulong Size)> Regions
    {
        get
        {
            lock (_lock)
            {
                return [.. _regions.Select(r => (r.Reservation.RxBase, r.Reservation.Size))];
            }
        }
    }

    /// <summary>
    /// Sets who is told of region reservations and of blocks about to be freed, under this memory's
    /// lock (tracing); <paramref name="underLock"/> sees the regions and their committed sizes at that
    /// moment, atomically with the change (no block is freed and no page committed meanwhile).
    /// </summary>
    internal void Observe(ICodeMemoryObserver? observer, Action<IReadOnlyList<(ulong Start, ulong Size, ulong Committed)>>? underLock = null)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            underLock?.Invoke([.. _regions.Select(r => (r.Reservation.RxBase, r.Reservation.Size, r.Committed))]);
            _observer = observer;
        }
    }

    /// <summary>The executable view of every region: (start, reserved bytes, committed bytes).</summary>
    internal IReadOnlyList<(ulong Start, ulong Size, ulong Committed)> CommittedRegions
    {
        get
        {
            lock (_lock)
            {
                return [.. _regions.Select(r => (r.Reservation.RxBase, r.Reservation.Size, r.Committed))];
            }
        }
    }

    /// <summary>Allocates a block of at least <paramref name="size"/> bytes, filled with int3 (0xCC).</summary>
    /// <param name="size">Bytes wanted; rounded up to 16.</param>
    /// <param name="alignment">A power of two up to the page size; blocks are always 16-aligned.</param>
    /// <exception cref="ArgumentOutOfRangeException">Size or alignment is invalid.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No memory within reach of the anchor.</exception>
    public CodeBlock Allocate(int size, int alignment = 16)
    {
        if (!TryAllocate(size, alignment, out var block, out var error))
        {
            throw new CodeMemoryExhaustedException(error);
        }

        return block;
    }

    /// <summary>
    /// Allocates a block, or returns false with the reason when no memory within reach can be had.
    /// Invalid arguments still throw.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">Size or alignment is invalid.</exception>
    public bool TryAllocate(int size, int alignment, out CodeBlock block, [NotNullWhen(false)] out string? error)
    {
        if (size <= 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), size, "A code block needs a positive size.");
        }

        if ((ulong)size > _options.RegionSize)
        {
            throw new ArgumentOutOfRangeException(nameof(size), size,
                $"A code block cannot exceed the region size ({_options.RegionSize} bytes); raise CodeMemoryOptions.RegionSize.");
        }

        if (alignment <= 0 || (alignment & (alignment - 1)) != 0 || alignment > _provider.PageSize)
        {
            throw new ArgumentOutOfRangeException(nameof(alignment), alignment,
                $"Alignment must be a power of two between 1 and the page size ({_provider.PageSize}).");
        }

        var align = Math.Max((ulong)alignment, RegionAllocator.Granule);
        try
        {
            return TryAllocateLocked((ulong)size, align, out block, out error);
        }
        catch (CodeMemoryExhaustedException e)
        {
            // The OS refused to commit pages: an expected failure for the Try form.
            block = default;
            error = e.Message;
            return false;
        }
    }

    private bool TryAllocateLocked(ulong size, ulong align, out CodeBlock block, [NotNullWhen(false)] out string? error)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            foreach (var region in _regions)
            {
                if (TryAllocateIn(region, size, align, out block))
                {
                    error = null;
                    return true;
                }
            }

            if (_regions.Count >= _options.MaxRegions)
            {
                block = default;
                error = $"All {_regions.Count} code regions are full and MaxRegions is {_options.MaxRegions}; " +
                        "free unused code or raise CodeMemoryOptions.MaxRegions / RegionSize.";
                return false;
            }

            var reservation = _provider.TryReserve(_options.RegionSize, WindowLow, WindowHigh, Anchor, out var reason);
            if (reservation is null)
            {
                block = default;
                error = $"No new code region of {_options.RegionSize >> 20} MiB fits within {_options.ReachRadius >> 20} MiB " +
                        $"of anchor 0x{Anchor:X}: {reason} Choose an anchor with free address space nearby, or a smaller RegionSize.";
                return false;
            }

            var fresh = new Region(reservation);
            _regions.Add(fresh);
            _observer?.RegionReserved(reservation.RxBase, reservation.Size);
            if (!TryAllocateIn(fresh, size, align, out block))
            {
                throw new InvalidOperationException("A fresh region could not hold a block smaller than the region.");
            }

            error = null;
            return true;
        }
    }

    /// <summary>Frees a block and fills it with int3. No thread may run in it any more.</summary>
    /// <exception cref="ArgumentException">The block is not live in this memory (foreign, interior, or already freed).</exception>
    public void Free(CodeBlock block) => Free(block.Address);

    /// <summary>Frees the block that starts at executable address <paramref name="address"/> and fills it with int3.</summary>
    /// <exception cref="ArgumentException">No live block of this memory starts there (foreign, interior, or already freed).</exception>
    public unsafe void Free(ulong address)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var region = FindRegion(address, 1)
                ?? throw new ArgumentException(
                    $"0x{address:X} is not in any region of this code memory; it was not allocated here.", nameof(address));
            var offset = address - region.Reservation.RxBase;
            if (region.Allocator.TryFindBlock(offset, 1, out var start, out var length) && start == offset)
            {
                var writable = new Span<byte>((void*)(region.Reservation.RwBase + offset), checked((int)length));
                _observer?.BlockFreeing(address, writable);
                writable.Fill(0xCC);
            }

            var result = region.Allocator.Free(offset, out _);
            switch (result)
            {
                case RegionAllocator.FreeResult.Freed:
                    return;
                case RegionAllocator.FreeResult.AlreadyFreed:
                    throw new ArgumentException($"Code block 0x{address:X} is not live: it was already freed (double free).", nameof(address));
                default:
                    throw new ArgumentException(
                        $"0x{address:X} points into a live code block but is not its start; pass the address Allocate returned.",
                        nameof(address));
            }
        }
    }

    /// <summary>Whether [address, address + length) lies inside one live block.</summary>
    public bool IsLive(ulong address, int length)
    {
        lock (_lock)
        {
            var region = FindRegion(address, (ulong)Math.Max(length, 1));
            return region is not null && region.Allocator.TryFindBlock(address - region.Reservation.RxBase, (ulong)length, out _, out _);
        }
    }

    /// <summary>The live block that contains <paramref name="address"/> (its executable address), if any.</summary>
    public bool TryGetBlock(ulong address, out CodeBlock block)
    {
        lock (_lock)
        {
            var region = FindRegion(address, 1);
            if (region is not null && region.Allocator.TryFindBlock(address - region.Reservation.RxBase, 1, out var offset, out var length))
            {
                block = new CodeBlock(region.Reservation.RxBase + offset, region.Reservation.RwBase + offset, (int)length);
                return true;
            }

            block = default;
            return false;
        }
    }

    /// <summary>The start of the live block containing <paramref name="address"/>, if any.</summary>
    internal bool TryFindBlockStart(ulong address, out ulong start) => TryFindBlock(address, out start, out _);

    /// <summary>The start and length of the live block containing <paramref name="address"/>, if any.</summary>
    internal bool TryFindBlock(ulong address, out ulong start, out ulong length)
    {
        var found = TryGetBlock(address, out var block);
        (start, length) = (block.Address, (ulong)block.Size);
        return found;
    }

    /// <inheritdoc/>
    public unsafe void Read(ulong address, Span<byte> destination)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var region = FindRegion(address, (ulong)destination.Length);
            if (region is null || address + (ulong)destination.Length > region.Reservation.RxBase + region.Committed)
            {
                throw new ArgumentOutOfRangeException(nameof(address), $"0x{address:X}+{destination.Length} is not committed code memory of this engine.");
            }

            new ReadOnlySpan<byte>((void*)address, destination.Length).CopyTo(destination);
        }
    }

    /// <inheritdoc/>
    public unsafe void Write(ulong address, ReadOnlySpan<byte> bytes)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var region = FindRegion(address, (ulong)bytes.Length);
            if (region is null || !region.Allocator.TryFindBlock(address - region.Reservation.RxBase, (ulong)bytes.Length, out _, out _))
            {
                throw new ArgumentOutOfRangeException(nameof(address),
                    $"0x{address:X}+{bytes.Length} is not inside one live code block of this engine; refusing to write.");
            }

            var writable = region.Reservation.RwBase + (address - region.Reservation.RxBase);
            bytes.CopyTo(new Span<byte>((void*)writable, bytes.Length));
        }
    }

    /// <summary>Unmaps every region. Code in them must no longer run.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            foreach (var region in _regions)
            {
                _provider.Release(region.Reservation);
            }

            _regions.Clear();
        }
    }

    private unsafe bool TryAllocateIn(Region region, ulong size, ulong alignment, out CodeBlock block)
    {
        if (!region.Allocator.TryAllocate(size, alignment, out var offset))
        {
            block = default;
            return false;
        }

        var rounded = RegionAllocator.RoundSize(size);
        var needed = offset + rounded;
        if (needed > region.Committed)
        {
            var target = Math.Min(ProcMaps.AlignUp(needed, _options.CommitChunk), region.Reservation.Size);
            try
            {
                _provider.Commit(region.Reservation, region.Committed, target - region.Committed);
                new Span<byte>((void*)(region.Reservation.RwBase + region.Committed), checked((int)(target - region.Committed))).Fill(0xCC);
            }
            catch
            {
                region.Allocator.Free(offset, out _);
                throw;
            }

            region.Committed = target;
        }

        block = new CodeBlock(region.Reservation.RxBase + offset, region.Reservation.RwBase + offset, (int)rounded);

        // Fresh blocks hold int3 only: a stray jump into code not yet written traps instead of running
        // whatever a freed block left behind, and padding after code decodes cleanly.
        block.GetWritableSpan().Fill(0xCC);
        return true;
    }

    private Region? FindRegion(ulong address, ulong length)
    {
        foreach (var region in _regions)
        {
            var r = region.Reservation;
            if (address >= r.RxBase && address - r.RxBase < r.Size && length <= r.Size - (address - r.RxBase))
            {
                return region;
            }
        }

        return null;
    }

    private sealed class Region(CodeReservation reservation)
    {
        public CodeReservation Reservation { get; } = reservation;

        public RegionAllocator Allocator { get; } = new(reservation.Size);

        public ulong Committed { get; set; }
    }
}
