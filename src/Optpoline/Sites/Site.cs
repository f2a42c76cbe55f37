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
/// bytes, so promotion changes speed, never which function runs. In this version, changing a site's
/// targets is valid only while no thread executes it (before its code is published, or with every
/// caller stopped).
/// </remarks>
public abstract class Site
{
    private readonly Lock _lock = new();
    private readonly HashSet<ulong> _unreachable = [];
    private OutlineChain? _chain;
    private ulong[] _targets = [];
    private long _patches;

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

    /// <summary>Promoted targets in dispatch order: inline slots first, then the outline chain.</summary>
    public IReadOnlyList<ulong> Targets
    {
        get
        {
            lock (_lock)
            {
                return _targets;
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
            lock (_lock)
            {
                return _unreachable.Count;
            }
        }
    }

    /// <summary>The thunk that unmatched targets go to.</summary>
    public ulong Fallback => Engine.GetFallback(Register);

    private protected OptpolineEngine Engine { get; }

    private protected List<Slot> Slots { get; } = [];

    private protected Link? OutLink { get; set; }

    /// <summary>Where the site's engine-owned code lives (stubs), for audits.</summary>
    internal abstract CodeBlock Stub { get; }

    internal OutlineChain? Chain => _chain;

    /// <summary>
    /// Promotes <paramref name="targets"/> in order (hottest first): the first fill the inline slots,
    /// the rest an outline chain. An empty list resets the site to the fallback.
    /// </summary>
    /// <exception cref="ArgumentException">Too many, duplicate or zero targets.</exception>
    /// <exception cref="InvalidOperationException">The site's code has not been bound yet.</exception>
    /// <exception cref="TargetOutOfReachException">A target is out of direct reach; the site is unchanged.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No memory for the outline chain; the site is unchanged.</exception>
    public void Promote(IReadOnlyList<ulong> targets)
    {
        var failure = TryPromoteCore(targets);
        if (failure is not null)
        {
            throw failure;
        }
    }

    /// <summary>
    /// Like <see cref="Promote"/>, but returns false with the reason for the expected failures (a target
    /// out of reach, no code memory); the site is then unchanged. Invalid arguments still throw.
    /// </summary>
    public bool TryPromote(IReadOnlyList<ulong> targets, [NotNullWhen(false)] out string? error)
    {
        var failure = TryPromoteCore(targets);
        error = failure?.Message;
        return failure is null;
    }

    /// <summary>Demotes every target: all calls take the fallback.</summary>
    public void Reset() => Promote([]);

    /// <inheritdoc/>
    public override string ToString() => $"{Kind} site '{Name}' on {Register}: [{string.Join(", ", Targets.Select(t => $"0x{t:X}"))}]";

    private Exception? TryPromoteCore(IReadOnlyList<ulong> targets)
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

        lock (_lock)
        {
            if (OutLink is null)
            {
                throw new InvalidOperationException($"Site '{Name}' is not bound to code yet: assemble the host code with OptpolineEngine.Assemble (or InlineSite.Write) first.");
            }

            var inlineCount = Math.Min(InlineSlotCount, targets.Count);
            var unreachable = new List<ulong>();
            for (var i = 0; i < inlineCount; i++)
            {
                if (!X64.Reaches(Slots[i].Call, targets[i]))
                {
                    unreachable.Add(targets[i]);
                }
            }

            OutlineChain? chain = null;
            if (unreachable.Count == 0 && targets.Count > inlineCount)
            {
                try
                {
                    chain = OutlineChain.TryCreate(Engine.Code, Register, [.. targets.Skip(inlineCount)], Fallback, out unreachable);
                }
                catch (CodeMemoryExhaustedException e)
                {
                    return e;
                }
            }

            if (unreachable.Count > 0)
            {
                _unreachable.UnionWith(unreachable);
                return new TargetOutOfReachException(
                    $"Site '{Name}' at 0x{Slots.FirstOrDefault()?.Start ?? OutLink.Address:X} cannot reach {string.Join(", ", unreachable.Select(t => $"0x{t:X}"))} " +
                    "with a direct call (rel32, +-2 GiB); the site is unchanged. Allocate the target's code from engine.Code, or set CodeMemoryOptions.Anchor near it.")
                {
                    Targets = unreachable,
                };
            }

            var patches = new List<CodePatch>();
            for (var i = 0; i < Slots.Count; i++)
            {
                PlanSlot(Slots[i], i < inlineCount ? targets[i] : 0, patches);
            }

            var linkTarget = chain?.Entry ?? Fallback;
            if (linkTarget != OutLink.Target)
            {
                patches.Add(new CodePatch(OutLink.Address, X64.Rel32(OutLink.Opcode, OutLink.Address, OutLink.Target), X64.Rel32(OutLink.Opcode, OutLink.Address, linkTarget)));
            }

            int applied;
            try
            {
                applied = Engine.ApplyPatches(patches);
            }
            catch
            {
                if (chain is not null)
                {
                    Engine.Code.Free(chain.Block);
                }

                throw;
            }

            // The model follows the bytes only once they are written.
            for (var i = 0; i < Slots.Count; i++)
            {
                var target = i < inlineCount ? targets[i] : 0;
                Slots[i].Target = target;
                if (target != 0)
                {
                    Slots[i].CallTarget = target;
                }
            }

            OutLink.Target = linkTarget;
            if (_chain is not null)
            {
                // Quiescent in this version: no thread can be inside the retired chain.
                Engine.Code.Free(_chain.Block);
            }

            _chain = chain;
            _targets = [.. targets];
            Interlocked.Add(ref _patches, applied);
            return null;
        }
    }

    private static void PlanSlot(Slot slot, ulong target, List<CodePatch> patches)
    {
        if (target == slot.Target)
        {
            return;
        }

        var now = slot.Target == 0 ? X64.EmptySlot(slot.Start, slot.Miss) : X64.MovR11(slot.Target);
        var next = target == 0 ? X64.EmptySlot(slot.Start, slot.Miss) : X64.MovR11(target);
        patches.Add(new CodePatch(slot.Start, now, next));
        if (target != 0 && target != slot.CallTarget)
        {
            patches.Add(new CodePatch(slot.Call, X64.Rel32(X64.CallRel32, slot.Call, slot.CallTarget), X64.Rel32(X64.CallRel32, slot.Call, target)));
        }
    }
}
