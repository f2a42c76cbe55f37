using System.Diagnostics.CodeAnalysis;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

namespace Optpoline.Sites;

/// <summary>
/// An optpoline call site: the host loads a target into <see cref="Register"/> and runs the site
/// instead of <c>call R</c>. Promoted targets are compared and called directly; anything else takes
/// the fallback (a retpoline by default). Only r11 is clobbered before the target runs.
/// </summary>
/// <remarks>
/// Invariant (guarded): a direct call to T is only reached after <c>R == T</c> was compared in the same
/// consistently patched bytes, so promotion changes speed, never which function runs. Targets can be
/// changed from any thread while other threads run the site: demotions take effect at once; putting a
/// new target into a slot a thread may still be inside waits for the engine's next shared grace
/// period (see <see cref="PromoteAsync"/>).
/// </remarks>
public abstract class Site
{
    private readonly HashSet<ulong> _unreachable = [];
    private long _patches;
    private long _samples;

    private protected Site(OptpolineEngine engine, Register register, int inlineSlots, string name)
    {
        Engine = engine;
        Register = register;
        InlineSlotCount = inlineSlots;
        Name = name;
    }

    /// <summary>The host's name for the site (for statistics, traces and config patterns).</summary>
    public string Name { get; }

    /// <summary>The register holding the target when the site runs.</summary>
    public Register Register { get; }

    /// <summary>How the site is laid out.</summary>
    public abstract SiteKind Kind { get; }

    /// <summary>Compare-and-call slots before the outline chain (0 to 2).</summary>
    public int InlineSlotCount { get; }

    /// <summary>Targets the site can promote at once: inline slots plus an outline chain of up to 6.</summary>
    public int MaxTargets => InlineSlotCount + OutlineChain.MaxTargets;

    /// <summary>Whether the site's code exists at its final address (emitted sites are bound by <see cref="OptpolineEngine.Assemble"/>).</summary>
    public bool IsBound => OutLink is not null;

    /// <summary>The targets last requested, in dispatch order (inline slots first, then the outline chain).</summary>
    public IReadOnlyList<ulong> Targets
    {
        get
        {
            lock (Engine.Scheduler.SyncRoot)
            {
                return Desired;
            }
        }
    }

    /// <summary>Whether part of the last request waits for a grace period.</summary>
    public bool IsPending
    {
        get
        {
            lock (Engine.Scheduler.SyncRoot)
            {
                return Pending is not null;
            }
        }
    }

    /// <summary>Byte patches applied to this site's code.</summary>
    public long PatchCount => Interlocked.Read(ref _patches);

    /// <summary>Distinct targets refused because a direct call from the site cannot reach them.</summary>
    public int UnreachableCount
    {
        get
        {
            lock (_unreachable)
            {
                return _unreachable.Count;
            }
        }
    }

    /// <summary>The thunk that unmatched targets go to.</summary>
    public ulong Fallback => Engine.GetFallback(Register);

    /// <summary>Fallback calls of this site sampled by the learning stubs.</summary>
    public long SampleCount => Interlocked.Read(ref _samples);

    /// <summary>
    /// Where the site's miss path and outline chains end: the register's sampling stub while the engine
    /// learns, else the fallback thunk itself (so learning off costs nothing).
    /// </summary>
    internal ulong Tail { get; private protected set; }

    /// <summary>The learner's id for the site (-1 when the engine does not learn).</summary>
    internal int LearningId { get; set; } = -1;

    internal void CountSample() => Interlocked.Increment(ref _samples);

    private protected OptpolineEngine Engine { get; }

    internal OptpolineEngine Owner => Engine;

    internal List<Slot> Slots { get; } = [];

    /// <summary>Addresses of the rseq signatures in the stub (4 data bytes before each slot's abort handler).</summary>
    internal IReadOnlyCollection<ulong> RseqSignatures => [.. Slots.Where(s => s.Restart != 0).Select(s => s.Restart - 4)];

    internal Link? OutLink { get; private protected set; }

    internal OutlineChain? Chain { get; set; }

    internal ulong[] Desired { get; set; } = [];

    /// <summary>Learning epochs the first slot stays direct at a time (4, 8, then 16 while the site stays megamorphic).</summary>
    internal int DirectSpan { get; set; }

    /// <summary>The epoch at which a direct first slot samples again (for one epoch).</summary>
    internal long DirectUntil { get; set; }

    /// <summary>
    /// A site without inline slots is direct: its out link goes to the fallback thunk, unsampled (or,
    /// while the learner checks it, to the sampling stub again, as when it is not direct).
    /// </summary>
    internal bool DirectLink { get; set; }

    internal PendingRequest? Pending { get; set; }

    /// <summary>Where the site's engine-owned code lives (stubs), for audits.</summary>
    internal abstract CodeBlock Stub { get; }

    /// <summary>
    /// Promotes <paramref name="targets"/> in order (hottest first): the first fill the inline slots,
    /// the rest an outline chain. An empty list resets the site to the fallback. Blocks until the
    /// change is complete, which can include the engine's next grace period; prefer
    /// <see cref="PromoteAsync"/> on threads that must not wait.
    /// </summary>
    /// <exception cref="ArgumentException">Too many, duplicate or zero targets.</exception>
    /// <exception cref="InvalidOperationException">The site's code has not been bound yet.</exception>
    /// <exception cref="TargetOutOfReachException">A target is out of direct reach; the site is unchanged.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No memory for the outline chain; the site is unchanged.</exception>
    /// <exception cref="PatchTimeoutException">The grace period timed out; the site was rolled back to its previous targets.</exception>
    public void Promote(IReadOnlyList<ulong> targets) => PromoteAsync(targets).GetAwaiter().GetResult();

    /// <summary>
    /// Requests new targets without waiting for a grace period. Demotions and promotions into slots no
    /// thread can be inside are applied before this returns; the rest is applied after the engine's next
    /// shared thread flush, when the returned task completes. If that flush times out, the site is
    /// rolled back to its previous targets and the task fails with <see cref="PatchTimeoutException"/>.
    /// </summary>
    /// <exception cref="ArgumentException">Too many, duplicate or zero targets.</exception>
    /// <exception cref="InvalidOperationException">The site's code has not been bound yet.</exception>
    /// <exception cref="TargetOutOfReachException">A target is out of direct reach; the site is unchanged.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No memory for the outline chain; the site is unchanged.</exception>
    public Task PromoteAsync(IReadOnlyList<ulong> targets) => Engine.PromoteAsync([new SiteUpdate(this, targets)]);

    /// <summary>
    /// Like <see cref="Promote"/>, but returns false with the reason for the expected failures (a target
    /// out of reach, no code memory, a grace period that timed out); the site is then unchanged.
    /// Invalid arguments still throw.
    /// </summary>
    public bool TryPromote(IReadOnlyList<ulong> targets, [NotNullWhen(false)] out string? error)
    {
        try
        {
            Promote(targets);
            error = null;
            return true;
        }
        catch (Exception e) when (e is TargetOutOfReachException or CodeMemoryExhaustedException or PatchTimeoutException)
        {
            error = e.Message;
            return false;
        }
    }

    /// <summary>Demotes every target: all calls take the fallback. Never waits for a grace period.</summary>
    public void Reset() => Promote([]);

    /// <inheritdoc/>
    public override string ToString() => $"{Kind} site '{Name}' on {Register}: [{string.Join(", ", Targets.Select(t => $"0x{t:X}"))}]";

    /// <summary>Checks a request's arguments and reach; throws for bad arguments, returns the reach failure.</summary>
    internal TargetOutOfReachException? Validate(IReadOnlyList<ulong> targets)
    {
        ArgumentNullException.ThrowIfNull(targets);
        if (targets.Count > MaxTargets)
        {
            throw new ArgumentException($"Site '{Name}' holds at most {MaxTargets} targets ({InlineSlotCount} inline + {OutlineChain.MaxTargets} outline); got {targets.Count}.", nameof(targets));
        }

        if (targets.Any(t => t == 0))
        {
            throw new ArgumentException($"A target of site '{Name}' is 0; pass function addresses.", nameof(targets));
        }

        if (targets.Distinct().Count() != targets.Count)
        {
            throw new ArgumentException($"The targets of site '{Name}' contain duplicates; each target is promoted once.", nameof(targets));
        }

        if (OutLink is null)
        {
            throw new InvalidOperationException($"Site '{Name}' is not bound to code yet: assemble the host code with OptpolineEngine.Assemble (or InlineSite.Write) first.");
        }

        var unreachable = new List<ulong>();
        for (var i = 0; i < Math.Min(InlineSlotCount, targets.Count); i++)
        {
            if (!X64.Reaches(Slots[i].Call, targets[i]))
            {
                unreachable.Add(targets[i]);
            }
        }

        return unreachable.Count == 0 ? null : Unreachable(unreachable);
    }

    /// <summary>Records unreachable targets in the statistics and describes them.</summary>
    internal TargetOutOfReachException Unreachable(IReadOnlyList<ulong> targets)
    {
        lock (_unreachable)
        {
            _unreachable.UnionWith(targets);
        }

        return new TargetOutOfReachException(
            $"Site '{Name}' at 0x{Slots.FirstOrDefault()?.Start ?? OutLink?.Address ?? 0:X} cannot reach {string.Join(", ", targets.Select(t => $"0x{t:X}"))} " +
            "with a direct call (rel32, +-2 GiB); the site is unchanged. Allocate the target's code from engine.Code, or set CodeMemoryOptions.Anchor near it.")
        {
            Targets = [.. targets],
        };
    }

    internal void CountPatches(int count) => Interlocked.Add(ref _patches, count);
}

/// <summary>A request that waits for a grace period, with what rolling it back restores.</summary>
internal sealed class PendingRequest(ulong[] oldTargets, OutlineChain? oldChain, long epoch)
{
    /// <summary>Targets the site returns to if the grace period times out.</summary>
    public ulong[] OldTargets { get; private set; } = oldTargets;

    /// <summary>The chain it returns to (kept allocated until then).</summary>
    public OutlineChain? OldChain { get; private set; } = oldChain;

    /// <summary>The epoch the request was made in: a flush that starts later is the one it waits for.</summary>
    public long Epoch { get; private set; } = epoch;

    public TaskCompletionSource Completion { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public void Restart(ulong[] oldTargets, OutlineChain? oldChain, long epoch)
    {
        OldTargets = oldTargets;
        OldChain = oldChain;
        Epoch = epoch;
    }
}
