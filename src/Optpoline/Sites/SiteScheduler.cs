using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

namespace Optpoline.Sites;

/// <summary>
/// Turns site requests into patch batches and shares grace periods among them (DESIGN.md invariant 5).
/// </summary>
/// <remarks>
/// Rules, each enforced here:
/// - Demoting a slot (<c>jmp MISS</c> over its first bytes) and swapping the rel32 that enters an
///   outline chain are applied at once: a thread already past them finishes on consistent old bytes.
/// - A demoted slot is dirty: a thread may sit between its compare and its call. Only the target its
///   call still encodes may be promoted into it, until a thread flush that started after the demotion
///   completes. Every other promotion waits for that flush.
/// - A retired outline chain is freed only after a flush that started after it was retired; the flush
///   moves a thread inside it to the register's fallback thunk (same stack, same behaviour).
/// - One background worker runs one flush for all pending work, outside the lock, so no host thread
///   and no batch waits for it. If the flush times out, every request that needed it is rolled back.
///   It also flushes when the patcher's retired batch tables pass their budget, so that they are freed
///   even when no promotion ever waits.
/// </remarks>
internal sealed class SiteScheduler : IDisposable
{
    private readonly OptpolineEngine _engine;
    private readonly ChainArena? _arena;
    private readonly List<RetiredChain> _retired = [];
    private readonly HashSet<Site> _pending = [];
    private readonly List<Slot> _dirty = [];
    private readonly AutoResetEvent _wake = new(false);
    private readonly Thread _worker;
    private long _epoch;
    private long _gracePeriods;
    private long _graceTimeouts;
    private volatile bool _stopping;

    public SiteScheduler(OptpolineEngine engine, LivePatcher patcher, bool skipGracePeriod)
    {
        _engine = engine;
        Patcher = patcher;
        SkipGracePeriod = skipGracePeriod;
        if (patcher.RestartableSequences is { } rseq)
        {
            _arena = new ChainArena(engine.Code, rseq, engine.GetFallback, engine.Publish);
        }

        _worker = new Thread(Work) { IsBackground = true, Name = "optpoline grace periods" };
        _worker.Start();
    }

    public Lock SyncRoot { get; } = new();

    public LivePatcher Patcher { get; }

    /// <summary>Test-only broken variant: promotions never wait for a grace period.</summary>
    public bool SkipGracePeriod { get; }

    public long GracePeriods => Interlocked.Read(ref _gracePeriods);

    public long GraceTimeouts => Interlocked.Read(ref _graceTimeouts);

    /// <summary>The chain arena (restartable windows), or null.</summary>
    internal ChainArena? Arena => _arena;

    /// <summary>Outline chains retired and not yet freed (each waits for a grace period).</summary>
    internal int RetiredChainCount
    {
        get
        {
            lock (SyncRoot)
            {
                return _retired.Count;
            }
        }
    }

    public Task Request(IReadOnlyList<SiteUpdate> updates)
    {
        var seen = new HashSet<Site>();
        foreach (var update in updates)
        {
            ArgumentNullException.ThrowIfNull(update);
            if (!seen.Add(update.Site))
            {
                throw new ArgumentException($"Site '{update.Site.Name}' appears twice in one request.", nameof(updates));
            }

            if (update.Site.Validate(update.Targets) is { } unreachable)
            {
                throw unreachable;
            }
        }

        var tasks = new List<Task>();
        bool retired;
        lock (SyncRoot)
        {
            var retiredBefore = _retired.Count;
            ObjectDisposedException.ThrowIf(_stopping, _engine);
            var created = new List<OutlineChain>();
            var plan = new Plan();
            try
            {
                foreach (var update in updates)
                {
                    var (site, targets) = update;
                    var desired = targets.ToArray();
                    if (update.DirectCall != 0)
                    {
                        plan.Direct[site] = update.DirectCall;
                    }

                    var outline = desired.Skip(site.InlineSlotCount).ToArray();
                    var chain = site.Chain;
                    if (!(chain?.Targets ?? []).SequenceEqual(outline))
                    {
                        chain = outline.Length == 0 ? null : CreateChain(site, outline);
                        if (chain is not null)
                        {
                            created.Add(chain);
                            if (chain.Write is { } write)
                            {
                                plan.Patches.Add(write);
                            }
                        }
                    }

                    plan.Sites.Add((site, desired, chain));
                    plan.OldTargets[site] = AppliedTargets(site);
                    plan.OldChains[site] = site.Chain;
                }

                foreach (var (site, desired, chain) in plan.Sites)
                {
                    PlanLink(site, chain, plan);
                    plan.StillPending[site] = PlanSlots(site, desired, plan);
                }

                Apply(plan);
            }
            catch
            {
                foreach (var chain in created)
                {
                    Free(chain, linked: false);
                }

                throw;
            }

            foreach (var (site, desired, _) in plan.Sites)
            {
                if (plan.StillPending[site])
                {
                    // The rollback point is the state before the first request that had to wait.
                    site.Pending ??= new PendingRequest(plan.OldTargets[site], plan.OldChains[site], _epoch);
                    _pending.Add(site);
                    tasks.Add(site.Pending.Completion.Task);
                }
                else if (site.Pending is { } done)
                {
                    // A later request made the waiting part unnecessary (for example a reset).
                    _pending.Remove(site);
                    site.Pending = null;
                    done.Completion.TrySetResult();
                }

                site.Desired = desired;
            }

            retired = _retired.Count > retiredBefore;
            if (retired && _arena is not null)
            {
                // Restartable chains: the fence that proves no thread is (or will resume) in the chains
                // retired so far costs microseconds, so it runs now and their slots are reused at once,
                // instead of piling up until the worker's next grace period.
                FreeRetiredChains();
            }
        }

        if (tasks.Count > 0 || Patcher.FlushDue)
        {
            _wake.Set();
        }

        return tasks.Count == 0 ? Task.CompletedTask : Task.WhenAll(tasks);
    }

    /// <summary>Whether a request is being planned or applied now (its lock is held): the trace's extender stays out of its way.</summary>
    internal bool Busy => SyncRoot.IsHeld();

    public void Dispose()
    {
        lock (SyncRoot)
        {
            if (_stopping)
            {
                return;
            }

            _stopping = true;
        }

        _wake.Set();
        _worker.Join();
        _wake.Dispose();
        lock (SyncRoot)
        {
            foreach (var site in _pending)
            {
                site.Pending?.Completion.TrySetException(new ObjectDisposedException(nameof(OptpolineEngine), "The engine was disposed while a site change waited for a grace period."));
                site.Pending = null;
            }

            _pending.Clear();
        }
    }

    private OutlineChain CreateChain(Site site, ulong[] outline)
    {
        var chain = (_arena is null
            ? OutlineChain.TryCreate(_engine.Code, site.Register, outline, site.Tail, out var unreachable)
            : OutlineChain.TryCreate(_arena, _engine.Code, site.Register, outline, site.Tail, out unreachable))
            ?? throw site.Unreachable(unreachable);
        if (chain.Write is null)
        {
            _engine.Publish(chain.Block, $"{site.Name}_chain");
        }
        else
        {
            _engine.PublishBeforeWrite(chain.Block, $"{site.Name}_chain");
        }

        return chain;
    }

    /// <summary>
    /// Swaps the rel32 that enters the outline chain; the old chain is retired. A site without inline
    /// slots that is to be direct links straight to its direct call target instead of its tail (a rel32
    /// swap of one call or jump: safe at once, whatever a thread before it did).
    /// </summary>
    private void PlanLink(Site site, OutlineChain? chain, Plan plan)
    {
        var link = site.OutLink!;
        var direct = site.InlineSlotCount == 0 && chain is null ? plan.Direct.GetValueOrDefault(site) : 0;
        var target = chain?.Entry ?? (direct != 0 ? direct : site.Tail);
        if (target == link.Target)
        {
            if (site.DirectLink != (direct != 0))
            {
                plan.Effects.Add(() => site.DirectLink = direct != 0);
            }

            return;
        }

        var onTrap = link.Opcode == X64.CallRel32
            ? TrapAction.EmulateCall(target, link.Address + X64.Rel32Length)
            : TrapAction.ContinueAt(target);
        plan.Patches.Add(new LivePatch(new CodePatch(link.Address, X64.Rel32(link.Opcode, link.Address, link.Target), X64.Rel32(link.Opcode, link.Address, target)), onTrap));
        plan.Effects.Add(() =>
        {
            link.Target = target;
            site.DirectLink = direct != 0;
            if (site.Chain is { } old && old != chain)
            {
                _retired.Add(new RetiredChain(old, _epoch, site.Fallback));
            }

            site.Chain = chain;
        });
    }

    /// <summary>Plans the slots towards <paramref name="desired"/>; returns whether part of it must wait for a grace period.</summary>
    private bool PlanSlots(Site site, ulong[] desired, Plan plan)
    {
        var pending = false;
        for (var i = 0; i < site.Slots.Count; i++)
        {
            var slot = site.Slots[i];
            var want = i < desired.Length ? desired[i] : 0;
            var directCall = i == 0 && desired.Length == 0 && site is InlineSite ? plan.Direct.GetValueOrDefault(site) : 0;
            var wantDirect = directCall != 0;
            if (slot.Target == want && slot.Direct == wantDirect && (!wantDirect || slot.CallTarget == directCall))
            {
                continue;
            }

            var target = slot.Target;
            var direct = slot.Direct;
            var call = slot.CallTarget;
            var demoted = false;

            // Leaving a promoted or direct slot: a thread may sit before its call, past the compare (or
            // jumped there directly), so the call may only change after a grace period.
            if ((target != 0 || direct) && !SkipGracePeriod)
            {
                target = 0;
                direct = false;
                demoted = true;
            }

            if (wantDirect)
            {
                // Always safe, at once: the call goes to the fallback thunk (or the sampling stub that ends
                // in it), which jumps to the register, whatever a thread before it compared or skipped.
                target = 0;
                direct = true;
                call = directCall;
                demoted = false;
            }
            else if (want == 0)
            {
                target = 0;
                direct = false;
            }
            else if (want == slot.CallTarget || SkipGracePeriod || (slot.DirtyEpoch == Slot.Clean && !demoted))
            {
                // Safe now: either no thread can be between the compare and the call, or the call already
                // goes to `want`, which is what a thread stuck there compared against.
                target = want;
                direct = false;
                call = want;
            }
            else
            {
                pending = true;
            }

            if (target != slot.Target || direct != slot.Direct)
            {
                plan.Patches.Add(new LivePatch(new CodePatch(slot.Start, SlotBytes(slot, slot.Target, slot.Direct), SlotBytes(slot, target, direct)), TrapAction.ContinueAt(slot.Miss)));
            }

            if (call != slot.CallTarget)
            {
                plan.Patches.Add(new LivePatch(new CodePatch(slot.Call, X64.Rel32(X64.CallRel32, slot.Call, slot.CallTarget), X64.Rel32(X64.CallRel32, slot.Call, call)), TrapAction.ContinueAt(slot.Arm)));
            }

            var (newTarget, newDirect, newCall) = (target, direct, call);
            plan.Effects.Add(() =>
            {
                slot.Target = newTarget;
                slot.Direct = newDirect;
                slot.CallTarget = newCall;
                if (demoted)
                {
                    if (slot.DirtyEpoch == Slot.Clean)
                    {
                        _dirty.Add(slot);
                    }

                    slot.DirtyEpoch = _epoch;
                }
            });
            plan.PatchCounts[site] = plan.PatchCounts.GetValueOrDefault(site) + (target != slot.Target || direct != slot.Direct ? 1 : 0) + (call != slot.CallTarget ? 1 : 0);
        }

        return pending;
    }

    /// <summary>
    /// A slot's first bytes. A direct slot jumps to just after its <c>jne</c>: its call, or the test-only
    /// pauses before it (which widen the window a grace period must cover).
    /// </summary>
    private static byte[] SlotBytes(Slot slot, ulong target, bool direct) =>
        direct ? X64.DirectSlot(slot.Start, slot.DirectLanding)
        : target == 0 ? X64.EmptySlot(slot.Start, slot.Miss) : X64.MovR11(target);

    private void Apply(Plan plan)
    {
        if (plan.Patches.Count > 0)
        {
            Patcher.Apply(_engine.Code, plan.Patches);
        }

        foreach (var effect in plan.Effects)
        {
            effect();
        }

        foreach (var (site, count) in plan.PatchCounts)
        {
            site.CountPatches(count);
        }
    }

    private void Work()
    {
        while (true)
        {
            _wake.WaitOne(TimeSpan.FromMilliseconds(100));
            if (_stopping)
            {
                return;
            }

            List<FlushRange> ranges;
            long epoch;
            var restartable = Patcher.RestartableSequences is not null;
            lock (SyncRoot)
            {
                if (_pending.Count == 0 && _retired.Count == 0 && !Patcher.FlushDue)
                {
                    continue;
                }

                epoch = ++_epoch;
                ranges = restartable ? [] : [.. _dirty.Where(s => s.DirtyEpoch < epoch).Select(s => s.CriticalRange)];
                ranges.AddRange(_retired.Where(r => r.Epoch < epoch && r.Chain.Slot is null).Select(r => new FlushRange(r.Chain.Block.Address, r.Chain.Block.Address + (ulong)r.Chain.Block.Size, r.Fallback)));
            }

            // Trap tables a handler was still reading when their batch ended.
            if (Patcher.FlushDue)
            {
                Patcher.ReclaimTables();
            }

            // Slots and chains are restartable windows: one fence is their grace period, and the kernel
            // guarantees it whatever the threads do (no signal, no thread list). Without rseq, a thread
            // flush; when it times out, what waited for it is rolled back.
            var slotsClean = false;
            var completed = false;
            var failure = (Exception?)null;
            try
            {
                if (restartable)
                {
                    Patcher.RestartWindows();
                    slotsClean = true;
                    completed = ranges.Count == 0 || Patcher.Flush(ranges);
                }
                else
                {
                    completed = Patcher.Flush(ranges);
                    slotsClean = completed;
                }
            }
            catch (InvalidOperationException fenceFailed)
            {
                failure = fenceFailed;
            }

            lock (SyncRoot)
            {
                try
                {
                    if (completed || slotsClean)
                    {
                        if (completed)
                        {
                            Interlocked.Increment(ref _gracePeriods);
                        }

                        Completed(epoch, slotsClean, completed);
                    }

                    if (!completed)
                    {
                        if (!slotsClean)
                        {
                            RollBack(epoch, failure);
                        }

                        // Counted once handled, so a reader of the counter sees the rollback's effects.
                        Interlocked.Increment(ref _graceTimeouts);
                    }
                }
                catch (PatchRejectedException rejected)
                {
                    // Nothing of that batch was written (a trace that cannot write refuses batches).
                    FailPending(rejected);
                }
            }
        }
    }

    /// <summary>After grace period <paramref name="epoch"/>: clean slots (when their windows are proven empty), free chains (when flushed), apply what waited.</summary>
    private void Completed(long epoch, bool slotsClean, bool chainsFlushed)
    {
        _dirty.RemoveAll(slot =>
        {
            if (!slotsClean || slot.DirtyEpoch >= epoch)
            {
                return false;
            }

            slot.DirtyEpoch = Slot.Clean;
            return true;
        });
        _retired.RemoveAll(retired =>
        {
            if (!chainsFlushed || retired.Epoch >= epoch)
            {
                return false;
            }

            Free(retired.Chain, linked: true);
            return true;
        });

        if (_engine.PatchingSuspended)
        {
            // No patch at all while suspended: the waiting promotions are applied after a flush once
            // patching resumes (the worker keeps flushing while they wait). The chains retired before
            // this grace period are gone now, so no rollback point may name one (review finding F4):
            // a waiting request would roll back to the bytes the site has now.
            if (chainsFlushed)
            {
                foreach (var site in _pending)
                {
                    site.Pending!.Restart(AppliedTargets(site), site.Chain, epoch);
                }
            }

            return;
        }

        var plan = new Plan();
        foreach (var site in _pending)
        {
            plan.Sites.Add((site, site.Desired, site.Chain));
            plan.StillPending[site] = PlanSlots(site, site.Desired, plan);
        }

        Apply(plan);
        foreach (var (site, _, _) in plan.Sites)
        {
            if (!plan.StillPending[site])
            {
                _pending.Remove(site);
                site.Pending!.Completion.TrySetResult();
                site.Pending = null;
            }
            else
            {
                // Still waiting (demoted again during the flush): what this flush made final is the new
                // rollback point, since the chains retired before it are gone now.
                site.Pending!.Restart(AppliedTargets(site), site.Chain, epoch);
            }
        }
    }

    /// <summary>
    /// A batch of waiting work was refused with nothing written: every waiting request fails with the
    /// reason, and its site keeps the (consistent) bytes it has; the dirty slots and retired chains stay
    /// for the next grace period.
    /// </summary>
    private void FailPending(PatchRejectedException failure)
    {
        foreach (var site in _pending)
        {
            site.Desired = AppliedTargets(site);
            site.Pending?.Completion.TrySetException(new PatchRejectedException(
                $"Site '{site.Name}': the change that waited for a grace period was not applied: {failure.Message}", failure));
            site.Pending = null;
        }

        _pending.Clear();
    }

    /// <summary>The targets the site's bytes dispatch to directly now: filled slots in order, then its chain.</summary>
    private static ulong[] AppliedTargets(Site site) =>
        [.. site.Slots.Where(s => s.Target != 0).Select(s => s.Target), .. site.Chain?.Targets ?? []];

    /// <summary>Flush <paramref name="epoch"/> timed out (or its fence failed): every request that needed it returns to its old state.</summary>
    private void RollBack(long epoch, Exception? failure = null)
    {
        if (_engine.PatchingSuspended)
        {
            // Suspended means no site changes at all: the requests keep waiting, for a grace period
            // after patching resumes, or for the next timeout then.
            return;
        }

        var victims = _pending.Where(s => s.Pending!.Epoch < epoch).ToList();
        if (victims.Count == 0)
        {
            return;
        }

        var plan = new Plan();
        foreach (var site in victims)
        {
            var request = site.Pending!;
            var oldChain = request.OldChain;
            PlanLink(site, oldChain, plan);
            plan.Sites.Add((site, request.OldTargets, oldChain));
            plan.StillPending[site] = PlanSlots(site, request.OldTargets, plan);
        }

        Apply(plan);

        // The old chains are linked again (only now: a refused batch leaves them retired, to be freed).
        foreach (var site in victims)
        {
            if (site.Pending!.OldChain is { } oldChain)
            {
                _retired.RemoveAll(r => r.Chain == oldChain);
            }
        }

        foreach (var site in victims)
        {
            var request = site.Pending!;
            site.Desired = request.OldTargets;
            if (!plan.StillPending[site])
            {
                _pending.Remove(site);
                site.Pending = null;
            }

            request.Completion.TrySetException(failure is null
                ? new PatchTimeoutException(
                    $"Site '{site.Name}': a thread flush did not complete within {Patcher.Options.FlushTimeout.TotalMilliseconds} ms " +
                    "(a thread blocks the flush signal or is stopped); the site was rolled back to its previous targets.")
                : new PatchRejectedException($"Site '{site.Name}': the grace period failed ({failure.Message}); the site was rolled back to its previous targets.", failure));
        }
    }

    /// <summary>Fences, then frees every retired chain: each was unlinked (and its batch synced) before the fence.</summary>
    private void FreeRetiredChains()
    {
        try
        {
            Patcher.RestartWindows();
        }
        catch (InvalidOperationException)
        {
            return;   // they wait for the worker's next grace period
        }

        foreach (var retired in _retired)
        {
            Free(retired.Chain, linked: true);
        }

        _retired.Clear();

        // A waiting request may name one of them as its rollback point: it rolls back to what the site
        // links now instead (as in Completed while suspended, finding F4).
        foreach (var site in _pending)
        {
            site.Pending!.Restart(AppliedTargets(site), site.Chain, site.Pending.Epoch);
        }
    }

    /// <summary>A chain no thread can be inside of any more (or never linked) goes back to its arena or allocator.</summary>
    private void Free(OutlineChain chain, bool linked)
    {
        _engine.Unpublish(chain.Block);
        if (chain.Slot is { } slot)
        {
            _arena!.Return(slot, linked);
        }
        else
        {
            _engine.Code.Free(chain.Block);
        }
    }

    private sealed record RetiredChain(OutlineChain Chain, long Epoch, ulong Fallback);

    private sealed class Plan
    {
        public List<(Site Site, ulong[] Desired, OutlineChain? Chain)> Sites { get; } = [];

        public List<LivePatch> Patches { get; } = [];

        public List<Action> Effects { get; } = [];

        public Dictionary<Site, bool> StillPending { get; } = [];

        public Dictionary<Site, int> PatchCounts { get; } = [];

        public Dictionary<Site, ulong[]> OldTargets { get; } = [];

        public Dictionary<Site, OutlineChain?> OldChains { get; } = [];

        /// <summary>Sites whose first slot is to be direct, and where its call goes (their desired targets are empty).</summary>
        public Dictionary<Site, ulong> Direct { get; } = [];
    }
}
