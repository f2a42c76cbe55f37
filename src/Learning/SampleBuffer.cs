using System.Numerics;
using System.Runtime.InteropServices;

namespace Optpoline.Learning;

/// <summary>
/// Per-CPU rings that the emitted learning stubs write samples into, and the managed side that drains
/// them. This class owns the layout; the stub emitter embeds the offsets below.
/// </summary>
/// <remarks>
/// Ring <c>i</c> starts at <c>Base + i * Stride</c>:
/// <code>
/// +0   u64 written     samples written so far (the stub stores the entry first, then increments)
/// +8   u32 countdown   decremented by every fallback call; a sample is taken when it reaches 0
/// +12  u32 reloadBase  smallest reload value
/// +16  u32 jitterMask  the reload adds (rng >> 16) &amp; jitterMask: uniform in [base, base + mask]
/// +20  u32 rng         the ring's LCG state (x = x * 1664525 + 1013904223)
/// +24  u64 read        the drain's position (managed only)
/// +64  {u64 key, u64 target}[Capacity]
/// </code>
/// The reload is jittered around the sample period because a fixed countdown aliases with loops that
/// call their sites in a fixed order: measured here, with 1000 sites called in turn and a period of 64,
/// only the sites at every 8th position were ever sampled.
/// A stub picks its ring by the rseq <c>cpu_id</c> of the thread (glibc registers rseq for every
/// thread), masked to the ring count, so rings are written without atomics. Two threads on one CPU can
/// interleave (preemption between the entry store and the increment): a torn sample is harmless, since a
/// wrong guess only ever costs a failed compare, and a key that names no site is dropped.
/// </remarks>
public sealed unsafe class SampleBuffer : IDisposable
{
    /// <summary>u64: samples written so far.</summary>
    public const int WrittenOffset = 0;

    /// <summary>u32: calls left until the next sample.</summary>
    public const int CountdownOffset = 8;

    /// <summary>u32: the smallest reload value.</summary>
    public const int ReloadBaseOffset = 12;

    /// <summary>u32: the mask applied to the random part of a reload.</summary>
    public const int JitterMaskOffset = 16;

    /// <summary>u32: the ring's random state.</summary>
    public const int RngOffset = 20;

    /// <summary>u64: the drain's position.</summary>
    public const int ReadOffset = 24;

    /// <summary>Bytes of a ring header (one cache line).</summary>
    public const int HeaderSize = 64;

    /// <summary>Bytes of one entry: u64 key, u64 target.</summary>
    public const int EntrySize = 16;

    private readonly byte* _base;
    private long _lost;
    private int _period;
    private bool _disposed;

    /// <summary>Allocates rings for the CPUs of this machine.</summary>
    /// <param name="samplePeriod">Take 1 sample every this many fallback calls (per CPU).</param>
    /// <param name="capacity">Entries per ring, a power of two; samples beyond it between two drains are lost (counted).</param>
    /// <param name="rings">Ring count (a power of two); 0: the CPU count rounded up.</param>
    public SampleBuffer(int samplePeriod, int capacity = 4096, int rings = 0)
    {
        if (samplePeriod < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(samplePeriod), samplePeriod, "The sample period is at least 1 (every call).");
        }

        if (capacity < 16 || (capacity & (capacity - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "Ring capacity is a power of two, at least 16.");
        }

        rings = rings == 0 ? (int)BitOperations.RoundUpToPowerOf2((uint)Environment.ProcessorCount) : rings;
        if (rings < 1 || (rings & (rings - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(rings), rings, "The ring count is a power of two.");
        }

        Capacity = capacity;
        Rings = rings;
        Stride = HeaderSize + (capacity * EntrySize);
        _base = (byte*)NativeMemory.AlignedAlloc((nuint)(Stride * rings), 64);
        new Span<byte>(_base, Stride * rings).Clear();
        for (var i = 0; i < rings; i++)
        {
            *(uint*)(_base + (i * Stride) + RngOffset) = (uint)((i * 0x9E3779B9L) + 1);
        }

        SamplePeriod = samplePeriod;
    }

    /// <summary>Address of ring 0 (embedded in the stubs).</summary>
    public ulong Base => (ulong)_base;

    /// <summary>Bytes from one ring to the next.</summary>
    public int Stride { get; }

    /// <summary>Entries per ring.</summary>
    public int Capacity { get; }

    /// <summary>Number of rings (stubs mask the CPU number with <c>Rings - 1</c>).</summary>
    public int Rings { get; }

    /// <summary>Samples overwritten before a drain could read them.</summary>
    public long Lost => Interlocked.Read(ref _lost);

    /// <summary>
    /// 1 sample in this many fallback calls on average (each reload is uniform within +-half the largest
    /// power of two not above it); can be changed while stubs run (takes effect at each ring's next reload).
    /// </summary>
    public int SamplePeriod
    {
        get => _period;
        set
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(value, 1);
            _period = value;
            var mask = (int)Math.Min(BitOperations.RoundUpToPowerOf2((uint)value + 1) / 2, 1 << 16) - 1;
            var reloadBase = value - ((mask + 1) / 2);
            for (var i = 0; i < Rings; i++)
            {
                var ring = _base + (i * Stride);
                Volatile.Write(ref *(int*)(ring + ReloadBaseOffset), Math.Max(1, reloadBase));
                Volatile.Write(ref *(int*)(ring + JitterMaskOffset), mask);
                if (Volatile.Read(ref *(int*)(ring + CountdownOffset)) == 0)
                {
                    Volatile.Write(ref *(int*)(ring + CountdownOffset), value);
                }
            }
        }
    }

    /// <summary>Hands every sample written since the last drain to <paramref name="sink"/> (key, target); returns how many.</summary>
    public int Drain(Action<ulong, ulong> sink)
    {
        ArgumentNullException.ThrowIfNull(sink);
        ObjectDisposedException.ThrowIf(_disposed, this);
        var count = 0;
        for (var i = 0; i < Rings; i++)
        {
            var ring = _base + (i * Stride);
            var written = Volatile.Read(ref *(ulong*)(ring + WrittenOffset));
            var read = *(ulong*)(ring + ReadOffset);
            if (written - read > (ulong)Capacity)
            {
                Interlocked.Add(ref _lost, (long)(written - read - (ulong)Capacity));
                read = written - (ulong)Capacity;
            }

            var entries = (ulong*)(ring + HeaderSize);
            for (; read < written; read++)
            {
                var entry = entries + ((read & (ulong)(Capacity - 1)) * 2);
                sink(entry[0], entry[1]);
                count++;
            }

            *(ulong*)(ring + ReadOffset) = read;
        }

        return count;
    }

    /// <summary>Frees the rings. No stub may run against them afterwards.</summary>
    public void Dispose()
    {
        if (!_disposed)
        {
            _disposed = true;
            NativeMemory.AlignedFree(_base);
        }
    }
}
