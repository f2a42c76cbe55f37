namespace Optpoline.Memory;

/// <summary>Where and how much code memory the engine reserves.</summary>
public sealed class CodeMemoryOptions
{
    /// <summary>The largest <see cref="ReachRadius"/>: two addresses within it of one anchor are within rel32 reach of each other.</summary>
    public const ulong MaxReachRadius = 1UL << 30;

    /// <summary>
    /// The address every region stays near. Direct calls reach only +-2 GiB, so sites can promote only
    /// targets near them: name an address of your own code (a function of the host's executable or
    /// library) so that its functions are reachable. Null: the main executable's code.
    /// </summary>
    public ulong? Anchor { get; init; }

    /// <summary>
    /// Every region lies within this many bytes of <see cref="Anchor"/>. At most 1 GiB, so that any two
    /// addresses in the window, and the anchor, are within a rel32 call of each other.
    /// </summary>
    public ulong ReachRadius { get; init; } = MaxReachRadius;

    /// <summary>
    /// Address space reserved per region. Reservation costs no memory until pages are committed; a
    /// larger region means fewer regions, a smaller one fits into tighter gaps near the anchor.
    /// </summary>
    public ulong RegionSize { get; init; } = 64UL << 20;

    /// <summary>Regions reserved at most, so that a runaway host fails clearly instead of exhausting the window.</summary>
    public int MaxRegions { get; init; } = 16;

    /// <summary>Pages are committed in chunks of this many bytes, to keep mmap calls off the allocation path.</summary>
    public ulong CommitChunk { get; init; } = 64UL << 10;

    internal void Validate()
    {
        if (ReachRadius is 0 or > MaxReachRadius)
        {
            throw new ArgumentOutOfRangeException(nameof(ReachRadius), ReachRadius,
                $"ReachRadius must be between 1 and {MaxReachRadius} bytes (1 GiB) so that all code stays within rel32 reach.");
        }

        if (RegionSize < (64UL << 10) || RegionSize > ReachRadius || (RegionSize & 0xFFFF) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(RegionSize), RegionSize,
                "RegionSize must be a multiple of 64 KiB, at least 64 KiB and at most ReachRadius.");
        }

        if (MaxRegions < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxRegions), MaxRegions, "MaxRegions must be at least 1.");
        }

        if (CommitChunk == 0 || (CommitChunk & (CommitChunk - 1)) != 0 || CommitChunk > RegionSize)
        {
            throw new ArgumentOutOfRangeException(nameof(CommitChunk), CommitChunk,
                "CommitChunk must be a power of two no larger than RegionSize.");
        }
    }
}
