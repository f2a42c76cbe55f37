using System.Runtime.CompilerServices;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Learning;
using Optpoline.Platform;
using Optpoline.Memory;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;
using Optpoline.Sites;

namespace Optpoline;

/// <summary>
/// The engine a host runtime links: W^X code memory near the host's code, fallback thunks, and
/// optpoline call sites emitted into the host's code.
/// </summary>
/// <example>
/// <code>
/// using var engine = new OptpolineEngine();
/// var site = engine.CreateInlineSite(Register.RAX, inlineSlots: 1, "dispatch");
/// var asm = new Assembler(64);
/// asm.mov(rax, __qword_ptr[rdi]);   // target into RAX
/// site.Emit(asm);                   // instead of call rax
/// asm.ret();
/// var code = engine.Assemble(asm);  // placed in engine memory, site bound
/// site.Promote([hotTarget]);        // safe while other threads run the code
/// </code>
/// </example>
public sealed class OptpolineEngine : IDisposable
{
    private readonly ThunkTable _thunks;
    private readonly List<Site> _sites = [];
    private readonly ConditionalWeakTable<Assembler, List<(InlineSite Site, int Index)>> _pending = [];
    private readonly Lock _lock = new();
    private readonly Lock _learnLock = new();
    private readonly SampleBuffer? _samples;
    private readonly LearningStubs? _learningStubs;
    private readonly Learner? _learner;
    private readonly Dictionary<ulong, Site> _sitesByKey = [];
    private readonly List<Site> _sitesById = [];
    private readonly Thread? _learnThread;
    private readonly ManualResetEventSlim _stopLearning = new();
    private readonly Dictionary<ulong, (CodeBlock Block, string Name)> _published = [];
    private JitDumpWriter? _jitDump;
    private int _siteCounter;
    private long _learnFailures;
    private volatile bool _patchingSuspended;

    /// <summary>Creates an engine: reserves code memory near the anchor and emits the fallback thunks.</summary>
    /// <exception cref="ArgumentOutOfRangeException">An option is out of range.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No code memory within reach of the anchor.</exception>
    public OptpolineEngine(EngineOptions? options = null)
    {
        Options = options ?? new EngineOptions();
        if (!Enum.IsDefined(Options.Fallback))
        {
            throw new ArgumentOutOfRangeException(nameof(options), Options.Fallback, "Unknown FallbackKind.");
        }

        if (Options.SlotWindowPauses is < 0 or > 64)
        {
            throw new ArgumentOutOfRangeException(nameof(options), Options.SlotWindowPauses, "SlotWindowPauses must be between 0 and 64.");
        }

        var patcher = new LivePatcher(Options.Patching);
        Code = new CodeMemory(Options.Memory);
        try
        {
            _thunks = new ThunkTable(Code);
        }
        catch
        {
            Code.Dispose();
            throw;
        }

        Scheduler = new SiteScheduler(this, patcher, Options.UnsafeSkipGracePeriod);
        patcher.AfterApply = Republish;
        Publish(_thunks.Block, "optpoline_thunks");
        if (Options.Learning.Enabled)
        {
            _samples = new SampleBuffer(Options.Learning.SamplePeriod, Options.Learning.RingCapacity);
            _learningStubs = new LearningStubs(Code, _samples, register => GetFallback(register), LinuxOs.RseqCpuIdOffset());
            Publish(_learningStubs.Block, "optpoline_learning_stubs");
            _learner = new Learner(Options.Learning.Policy);
            if (Options.Learning.Background)
            {
                _learnThread = new Thread(LearnLoop) { IsBackground = true, Name = "optpoline learner" };
                _learnThread.Start();
            }
        }
    }

    /// <summary>Raised after every learning epoch (on the thread that ran it).</summary>
    public event EventHandler<LearningEpochEventArgs>? EpochCompleted;

    /// <summary>Whether the engine learns (<see cref="LearningOptions.Enabled"/>).</summary>
    public bool IsLearning => _learner is not null;

    /// <summary>
    /// Suspends all patching: the learner asks for no change (sampling and counting go on) and
    /// explicit requests are refused. A trace session that needs a stable text sets it.
    /// </summary>
    public bool PatchingSuspended
    {
        get => _patchingSuspended;
        set => _patchingSuspended = value;
    }

    /// <summary>Samples lost because a ring filled between two epochs.</summary>
    public long LostSamples => _samples?.Lost ?? 0;

    /// <summary>Learning epochs whose changes failed (for example a grace period that timed out; the sites were rolled back).</summary>
    public long LearningFailures => Interlocked.Read(ref _learnFailures);

    /// <summary>The options the engine was created with.</summary>
    public EngineOptions Options { get; }

    /// <summary>The engine's code memory; allocate the host's generated code here so sites and targets stay in reach.</summary>
    public CodeMemory Code { get; }

    /// <summary>Counters of the live patcher (batches, core syncs, flushes, traps).</summary>
    public PatcherStatistics PatchStatistics => Scheduler.Patcher.Statistics;

    /// <summary>Grace periods (thread flushes) completed for this engine's sites.</summary>
    public long GracePeriods => Scheduler.GracePeriods;

    /// <summary>Grace periods that timed out (their requests were rolled back).</summary>
    public long GracePeriodTimeouts => Scheduler.GraceTimeouts;

    /// <summary>Every site created so far.</summary>
    public IReadOnlyList<Site> Sites
    {
        get
        {
            lock (_lock)
            {
                return [.. _sites];
            }
        }
    }

    /// <summary>The thunk sites of <paramref name="register"/> fall back to (per <see cref="EngineOptions.Fallback"/>).</summary>
    public ulong GetFallback(Register register) => GetThunk(register, Options.Fallback);

    /// <summary>
    /// A shared thunk that behaves as <c>jmp R</c>: enter it with <c>call</c> for a hardened indirect call
    /// or with <c>jmp</c> for a hardened indirect tail jump.
    /// </summary>
    /// <exception cref="ArgumentException">The register cannot carry a target.</exception>
    public ulong GetThunk(Register register, FallbackKind kind)
    {
        SiteRegisters.Validate(register, nameof(register));
        return _thunks.Address(register, kind);
    }

    /// <summary>Creates an inline site (emit it with <see cref="InlineSite.Emit"/> or <see cref="InlineSite.Write"/>).</summary>
    /// <param name="register">Register that will hold the target: any 64-bit GPR but rsp and r11.</param>
    /// <param name="inlineSlots">Compare-and-call slots before the outline chain: 0, 1 or 2.</param>
    /// <param name="name">Name for statistics and traces; generated when null.</param>
    /// <exception cref="ArgumentException">Bad register or slot count.</exception>
    public InlineSite CreateInlineSite(Register register, int inlineSlots = 1, string? name = null)
    {
        SiteRegisters.Validate(register, nameof(register));
        if (inlineSlots is < 0 or > InlineSite.MaxInlineSlots)
        {
            throw new ArgumentOutOfRangeException(nameof(inlineSlots), inlineSlots, $"An inline site has 0 to {InlineSite.MaxInlineSlots} inline slots.");
        }

        return Add(new InlineSite(this, register, inlineSlots, NameOrDefault(name)));
    }

    /// <summary>Creates an outline-only site: the host emits <c>call site.Entry</c>.</summary>
    /// <exception cref="ArgumentException">Bad register.</exception>
    public OutlineSite CreateOutlineSite(Register register, string? name = null)
    {
        SiteRegisters.Validate(register, nameof(register));
        return Add(new OutlineSite(this, register, NameOrDefault(name)));
    }

    /// <summary>
    /// Assembles host code into a new block of engine memory and binds every site emitted into
    /// <paramref name="assembler"/>. Branches keep Iced's usual fixing for the host's own code; the
    /// sites' bytes are checked after assembly.
    /// </summary>
    /// <param name="assembler">The host code, with any sites emitted into it.</param>
    /// <param name="alignment">Alignment of the block.</param>
    /// <param name="name">The block's name in profiles (jitdump); null: <c>code_ADDRESS</c>.</param>
    /// <exception cref="InvalidOperationException">Assembly failed, or a site's bytes were rewritten.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No code memory within reach.</exception>
    public CodeBlock Assemble(Assembler assembler, int alignment = 16, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(assembler);
        // Measure at the anchor (in reach of everything the code names), then place at the real address;
        // if the encoding grows there, retry with room for it.
        var estimate = new ArrayCodeWriter();
        AssembleAt(assembler, estimate, Code.Anchor);
        var size = estimate.Length + 64;
        for (var attempt = 0; ; attempt++)
        {
            var block = Code.Allocate(size, alignment);
            var writer = new ArrayCodeWriter();
            AssemblerResult result;
            try
            {
                result = AssembleAt(assembler, writer, block.Address);
            }
            catch
            {
                Code.Free(block);
                throw;
            }

            if (writer.Length > block.Size)
            {
                Code.Free(block);
                size = writer.Length + 64;
                if (attempt > 2)
                {
                    throw new InvalidOperationException("Host code kept growing when placed; assemble it yourself into engine.Code and bind with InlineSite.Write.");
                }

                continue;
            }

            var bytes = writer.ToArray();
            bytes.CopyTo(block.GetWritableSpan());
            try
            {
                if (_pending.TryGetValue(assembler, out var sites))
                {
                    var offsets = result.Result[0].NewInstructionOffsets;
                    foreach (var (site, index) in sites)
                    {
                        var offset = (int)offsets[index];
                        site.Bind(block.Address + (ulong)offset, bytes.AsSpan(offset));
                    }

                    _pending.Remove(assembler);
                }
            }
            catch
            {
                Code.Free(block);
                throw;
            }

            Publish(block, name ?? $"code_{block.Address:x}");
            return block;
        }
    }

    /// <summary>
    /// Changes the targets of many sites in one batch: all demotions and all promotions that need no
    /// grace period are applied with one INT3-protocol batch (3 core syncs) before this returns; the rest
    /// waits for one shared thread flush and one more batch. The task completes when every site is in
    /// its requested state; if the flush times out, the sites that waited for it are rolled back and the
    /// task fails with <see cref="PatchTimeoutException"/>. Safe while other threads run the sites.
    /// </summary>
    /// <exception cref="ArgumentException">Bad targets, a site twice, or a site of another engine.</exception>
    /// <exception cref="InvalidOperationException">A site is not bound yet.</exception>
    /// <exception cref="TargetOutOfReachException">A target is out of reach; no site was changed.</exception>
    /// <exception cref="CodeMemoryExhaustedException">No memory for an outline chain; no site was changed.</exception>
    public Task PromoteAsync(IReadOnlyList<SiteUpdate> updates)
    {
        ArgumentNullException.ThrowIfNull(updates);
        if (_patchingSuspended)
        {
            throw new InvalidOperationException("Patching is suspended (PatchingSuspended = true); no site can change until it is resumed.");
        }

        foreach (var update in updates)
        {
            if (update?.Site is { } site && !ReferenceEquals(site.Owner, this))
            {
                throw new ArgumentException($"Site '{site.Name}' belongs to another engine.", nameof(updates));
            }
        }

        return Scheduler.Request(updates);
    }

    /// <summary>
    /// Decodes every byte of engine code (thunks, stubs, outline chains) and every bound site in the
    /// host's code, and reports anything a site must never contain (an indirect branch outside the
    /// fallback thunks, undecodable bytes). Empty when clean.
    /// </summary>
    public IReadOnlyList<string> AuditCode()
    {
        var problems = new List<string>();
        problems.AddRange(Check(_thunks.Block, allowIndirect: true));
        if (_learningStubs is not null)
        {
            problems.AddRange(Check(_learningStubs.Block, allowIndirect: false).Select(p => $"learning stubs: {p}"));
        }

        foreach (var site in Sites)
        {
            if (!site.IsBound)
            {
                continue;
            }

            if (!site.Stub.IsEmpty)
            {
                problems.AddRange(Check(site.Stub, allowIndirect: false).Select(p => $"site '{site.Name}' stub: {p}"));
            }

            if (site.Chain is { } chain)
            {
                problems.AddRange(Check(chain.Block, allowIndirect: false).Select(p => $"site '{site.Name}' chain: {p}"));
            }

            if (site is InlineSite inline)
            {
                var bytes = new byte[inline.InlineLength];
                Code.Read(inline.Address, bytes);
                problems.AddRange(CodeAudit.Check(bytes, inline.Address).Select(p => $"site '{site.Name}': {p}"));
            }
        }

        return problems;
    }

    /// <summary>
    /// Stops the grace-period worker (requests still waiting fail) and releases all code memory. No
    /// thread may run engine or host code in it afterwards.
    /// </summary>
    public void Dispose()
    {
        StopPerfTrace();
        StopJitDump();
        _stopLearning.Set();
        _learnThread?.Join();
        Scheduler.Dispose();
        Code.Dispose();
        _samples?.Dispose();
        _stopLearning.Dispose();
    }

    /// <summary>
    /// Ends a learning epoch: drains the sample rings, lets the policy decide, and requests the changes
    /// (one batch; promotions into reused slots complete after the next grace period, see
    /// <see cref="LearningEpochEventArgs.Applied"/>). Called by the engine's learner thread, or by the host
    /// when <see cref="LearningOptions.Background"/> is false.
    /// </summary>
    /// <exception cref="InvalidOperationException">The engine does not learn.</exception>
    public LearningEpochEventArgs LearnEpoch()
    {
        if (_learner is null || _samples is null)
        {
            throw new InvalidOperationException("This engine does not learn: create it with EngineOptions.Learning.Enabled = true.");
        }

        LearningEpochEventArgs result;
        lock (_learnLock)
        {
            var dropped = 0;
            var drained = _samples.Drain((key, target) =>
            {
                if (_sitesByKey.TryGetValue(key, out var site))
                {
                    site.CountSample();
                    _learner.Record(site.LearningId, target);
                }
                else
                {
                    dropped++;
                }
            });

            _learner.Suspended = _patchingSuspended;
            var decisions = _learner.EndEpoch();
            var updates = new List<SiteUpdate>(decisions.Count);
            foreach (var decision in decisions)
            {
                var site = _sitesById[decision.Site];
                var reachable = new List<ulong>(decision.Targets.Count);
                foreach (var target in decision.Targets)
                {
                    // Conservative: a target is promoted only if every address of the code window reaches it.
                    if (X64.TryRel32(Code.WindowLow, target, out _) && X64.TryRel32(Code.WindowHigh, target, out _))
                    {
                        reachable.Add(target);
                    }
                    else
                    {
                        _learner.MarkUnreachable(decision.Site, target);
                        site.Unreachable([target]);
                    }
                }

                updates.Add(new SiteUpdate(site, reachable));
            }

            var applied = Task.CompletedTask;
            if (updates.Count > 0 && !_patchingSuspended)
            {
                try
                {
                    applied = Scheduler.Request(updates);
                }
                catch (Exception e) when (e is TargetOutOfReachException or CodeMemoryExhaustedException or PatchRejectedException)
                {
                    applied = Task.FromException(e);
                }
            }

            // A change that failed (a grace period timed out and the sites were rolled back) leaves the
            // learner believing in promotions that are not there: those sites learn again.
            var changed = updates.Select(u => u.Site.LearningId).ToArray();
            applied.ContinueWith(
                _ =>
                {
                    Interlocked.Increment(ref _learnFailures);
                    lock (_learnLock)
                    {
                        foreach (var id in changed)
                        {
                            _learner.Relearn(id);
                        }
                    }
                },
                CancellationToken.None,
                TaskContinuationOptions.OnlyOnFaulted,
                TaskScheduler.Default);
            result = new LearningEpochEventArgs(_learner.Epoch, drained, dropped, updates.Count, applied);
        }

        EpochCompleted?.Invoke(this, result);
        return result;
    }

    /// <summary>
    /// Starts recording every change to code into a perf.data file at <paramref name="path"/>
    /// (PERF_RECORD_TEXT_POKE with old and new bytes, CLOCK_MONOTONIC time), after a COMM record for the
    /// process and an MMAP2 record for each code region: <c>perf script --show-text-poke-events -i FILE</c>
    /// lists them. Replaces a trace already running.
    /// </summary>
    /// <exception cref="IOException">The file cannot be created.</exception>
    public void StartPerfTrace(string path)
    {
        var writer = new PerfDataWriter(path);
        var now = PerfDataWriter.Now();
        writer.Comm(Path.GetFileName(Environment.ProcessPath) ?? "dotnet", Environment.ProcessId, now);
        foreach (var (start, size) in Code.Regions)
        {
            writer.Mmap2(start, size, "/memfd:optpoline-code (deleted)", now);
        }

        var previous = Scheduler.Patcher.Trace;
        Scheduler.Patcher.Trace = writer;
        previous?.Dispose();
    }

    /// <summary>
    /// Starts writing <c>jit-PID.dump</c> into <paramref name="directory"/> for <c>perf inject --jit</c>:
    /// a JIT_CODE_LOAD for every code block now (host code, thunks, stubs, chains), for each block
    /// published later, and again with a fresh code_index for every block a patch batch changes, so that
    /// samples are attributed to the code as it was. Record with <c>perf record -k mono</c>.
    /// </summary>
    /// <exception cref="IOException">The file cannot be created or mapped.</exception>
    public void StartJitDump(string directory)
    {
        var writer = new JitDumpWriter(directory);
        lock (_published)
        {
            _jitDump?.Dispose();
            _jitDump = writer;
            foreach (var (block, name) in _published.Values)
            {
                Load(writer, block, name);
            }
        }
    }

    /// <summary>JIT_CODE_LOAD records written by the running jitdump (the next one gets this code_index).</summary>
    internal ulong JitDumpLoads
    {
        get
        {
            lock (_published)
            {
                return _jitDump?.Loads ?? 0;
            }
        }
    }

    /// <summary>Stops the jitdump, if one runs, and closes its file.</summary>
    public void StopJitDump()
    {
        lock (_published)
        {
            _jitDump?.Dispose();
            _jitDump = null;
        }
    }

    /// <summary>A block of code exists now under <paramref name="name"/> (for profiles).</summary>
    internal void Publish(CodeBlock block, string name)
    {
        lock (_published)
        {
            _published[block.Address] = (block, name);
            if (_jitDump is { } writer)
            {
                Load(writer, block, name);
            }
        }
    }

    /// <summary>A published block is about to be freed.</summary>
    internal void Unpublish(CodeBlock block)
    {
        lock (_published)
        {
            _published.Remove(block.Address);
        }
    }

    /// <summary>After a batch: every changed block is loaded again, as it is now.</summary>
    private void Republish(IReadOnlyList<CodePatch> patches)
    {
        lock (_published)
        {
            if (_jitDump is not { } writer)
            {
                return;
            }

            var done = new HashSet<ulong>();
            foreach (var patch in patches)
            {
                if (Code.TryFindBlockStart(patch.Address, out var start) && done.Add(start) && _published.TryGetValue(start, out var entry))
                {
                    Load(writer, entry.Block, entry.Name);
                }
            }
        }
    }

    private static void Load(JitDumpWriter writer, CodeBlock block, string name) =>
        writer.CodeLoad(block.Address, block.GetExecutableSpan(), name, Environment.CurrentManagedThreadId);

    /// <summary>Stops the perf.data trace, if one runs, and closes its file.</summary>
    public void StopPerfTrace()
    {
        var writer = Scheduler.Patcher.Trace;
        Scheduler.Patcher.Trace = null;
        writer?.Dispose();
    }

    /// <summary>The learning state of a site, or null when the engine does not learn.</summary>
    public SiteLearningState? GetLearningState(Site site)
    {
        ArgumentNullException.ThrowIfNull(site);
        lock (_learnLock)
        {
            return _learner is null || site.LearningId < 0 ? null : _learner.GetState(site.LearningId);
        }
    }

    /// <summary>The sampling stub of <paramref name="register"/>, or null when the engine does not learn.</summary>
    internal ulong? LearningTail(Register register, bool byKey) =>
        _learningStubs is null ? null : byKey ? _learningStubs.ByKey(register) : _learningStubs.ByReturnAddress(register);

    /// <summary>A site's code exists: while learning, its samples (keyed by <paramref name="key"/>) start counting.</summary>
    internal void SiteBound(Site site, ulong key)
    {
        if (_learner is null)
        {
            return;
        }

        lock (_learnLock)
        {
            site.LearningId = _sitesById.Count;
            _sitesById.Add(site);
            _sitesByKey.Add(key, site);
            _learner.AddSite(site.LearningId, site.MaxTargets);
        }
    }

    private void LearnLoop()
    {
        while (!_stopLearning.Wait(Options.Learning.EpochInterval))
        {
            try
            {
                LearnEpoch();
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (InvalidOperationException)
            {
                Interlocked.Increment(ref _learnFailures);
            }
        }
    }

    internal SiteScheduler Scheduler { get; }

    /// <summary>Writes code that no thread can run yet (a site being bound before its code is returned to the host).</summary>
    internal int ApplyUnpublished(IReadOnlyList<CodePatch> patches) => QuiescentPatcher.Apply(Code, patches);

    internal void AddPendingSite(Assembler assembler, InlineSite site, int index)
    {
        lock (_lock)
        {
            _pending.GetOrAdd(assembler, _ => []).Add((site, index));
        }
    }

    private static IEnumerable<string> Check(CodeBlock block, bool allowIndirect) =>
        CodeAudit.Check(block.GetExecutableSpan(), block.Address, allowIndirect);

    private static AssemblerResult AssembleAt(Assembler assembler, CodeWriter writer, ulong rip)
    {
        if (!assembler.TryAssemble(writer, rip, out var error, out var result, BlockEncoderOptions.ReturnNewInstructionOffsets))
        {
            throw new InvalidOperationException($"Assembling host code at 0x{rip:X} failed: {error}");
        }

        return result;
    }

    private T Add<T>(T site)
        where T : Site
    {
        lock (_lock)
        {
            _sites.Add(site);
        }

        return site;
    }

    private string NameOrDefault(string? name) =>
        string.IsNullOrWhiteSpace(name) ? $"site{Interlocked.Increment(ref _siteCounter)}" : name;
}
