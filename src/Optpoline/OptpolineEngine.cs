using System.Runtime.CompilerServices;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Learning;
using Optpoline.Platform;
using Optpoline.Memory;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;
using Optpoline.Sites;
using Optpoline.Tracing;
using Optpoline.Configuration;

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
public sealed partial class OptpolineEngine : IDisposable
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
    private readonly Lock _backgroundLock = new();
    private Thread? _learnThread;
    private ManualResetEventSlim? _stopLearning;
    private TimeSpan _epochInterval;
    private readonly Dictionary<ulong, (CodeBlock Block, string Name)> _published = [];
    private TraceSession? _tracing;
    private int _siteCounter;
    private long _learnFailures;
    private volatile bool _patchingSuspended;
    private volatile PromotionMode _promotion;
    private volatile SiteFilter _siteFilter = SiteFilter.All;
    private ConfigBinding? _config;

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
        patcher.BeforeArm = BeforeArm;   // the patcher checks its own Trace (the text pokes)
        Publish(_thunks.Block, "optpoline_thunks");
        _promotion = Options.Learning.Enabled ? PromotionMode.Learn : PromotionMode.Static;
        _epochInterval = Options.Learning.EpochInterval;
        if (Options.Learning.Enabled)
        {
            _samples = new SampleBuffer(Options.Learning.SamplePeriod, Options.Learning.RingCapacity);
            _learningStubs = new LearningStubs(Code, _samples, register => GetFallback(register), LinuxOs.RseqCpuIdOffset());
            Publish(_learningStubs.Block, "optpoline_learning_stubs");
            _learner = new Learner(Options.Learning.Policy);
            if (Options.Learning.Background)
            {
                BackgroundLearning = true;
            }
        }

        if (Options.Tracing is { } tracing)
        {
            try
            {
                StartTracing(tracing);
            }
            catch
            {
                Dispose();
                throw;
            }
        }
    }

    /// <summary>
    /// Creates an engine from a config file: <paramref name="configPath"/>, else the file named by
    /// <c>OPTPOLINE_CONFIG</c>, else the defaults. The engine watches the file and applies every valid
    /// change while the host runs (see <see cref="ConfigChanged"/>); an invalid change is reported and
    /// the last good config stays in force. Such an engine always has sampling stubs, so that
    /// <c>promotion.mode</c> can become "learn" at any time.
    /// </summary>
    /// <exception cref="ConfigException">The file cannot be read or is invalid (PATH:LINE:COLUMN: what).</exception>
    public static OptpolineEngine FromConfig(string? configPath = null)
    {
        var path = ConfigFile.Resolve(configPath);
        var config = path is null ? new OptpolineConfig() : ConfigFile.Load(path);
        return Configure(path, config);
    }

    /// <summary>Creates an engine from a config built in code (no file to watch).</summary>
    /// <exception cref="ConfigException">The config is invalid.</exception>
    public static OptpolineEngine FromConfig(OptpolineConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return Configure(null, ConfigFile.Parse(ConfigFile.Serialize(config), "config object"));
    }

    private static OptpolineEngine Configure(string? path, OptpolineConfig config)
    {
        var engine = new OptpolineEngine(ConfigBinding.Options(config));
        try
        {
            engine._config = new ConfigBinding(engine, path, new OptpolineConfig());
            engine._config.Changed += (_, e) => engine.ConfigChanged?.Invoke(engine, e);
            engine._config.Apply(config);
            return engine;
        }
        catch
        {
            engine.Dispose();
            throw;
        }
    }

    /// <summary>The config in force (null: the engine was created from options, not from a config).</summary>
    public OptpolineConfig? Config => _config?.Current;

    /// <summary>The config file watched (null: none).</summary>
    public string? ConfigPath => _config?.Path;

    /// <summary>Why the last reload was rejected (PATH:LINE:COLUMN: what), or null after a good one.</summary>
    public string? LastConfigError => _config?.LastError;

    /// <summary>Keys of the config in force that could not take effect live (they need a new engine).</summary>
    public IReadOnlyList<string> ConfigWarnings => _config?.Warnings ?? [];

    /// <summary>Raised after every reload of the config file, applied or rejected (on the thread that reloaded it).</summary>
    public event EventHandler<ConfigChangedEventArgs>? ConfigChanged;

    /// <summary>Reads the config file again now and applies it (the engine also does so by itself when the file changes).</summary>
    /// <exception cref="ConfigException">The file is invalid; the last good config stays in force.</exception>
    /// <exception cref="InvalidOperationException">The engine has no config file.</exception>
    public void ReloadConfig() => (_config ?? throw new InvalidOperationException("This engine was not created from a config file; use OptpolineEngine.FromConfig.")).Reload();

    /// <summary>Like <see cref="ReloadConfig"/>, but returns false with the reason when the file is invalid.</summary>
    public bool TryReloadConfig([System.Diagnostics.CodeAnalysis.NotNullWhen(false)] out string? error)
    {
        try
        {
            ReloadConfig();
            error = null;
            return true;
        }
        catch (ConfigException e)
        {
            error = e.Message;
            return false;
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
    /// <exception cref="PromotionRefusedException">Promotion is off, or a site with targets is excluded by the site filter; no site was changed.</exception>
    public Task PromoteAsync(IReadOnlyList<SiteUpdate> updates)
    {
        ArgumentNullException.ThrowIfNull(updates);
        if (_patchingSuspended)
        {
            throw new InvalidOperationException("Patching is suspended (PatchingSuspended = true); no site can change until it is resumed.");
        }

        var filter = _siteFilter;
        foreach (var update in updates)
        {
            if (update?.Site is not { } site)
            {
                continue;
            }

            if (!ReferenceEquals(site.Owner, this))
            {
                throw new ArgumentException($"Site '{site.Name}' belongs to another engine.", nameof(updates));
            }

            if (update.Targets is { Count: > 0 })
            {
                if (_promotion == PromotionMode.Off)
                {
                    throw new PromotionRefusedException($"Promotion is off (PromotionMode.Off, or promotion.enabled = false in the config); site '{site.Name}' stays on the fallback.");
                }

                if (!filter.Allows(site.Name, out var reason))
                {
                    throw new PromotionRefusedException($"Site '{site.Name}' may not be promoted: {reason}.");
                }
            }
        }

        return Scheduler.Request(updates);
    }

    /// <summary>
    /// Whether the engine's own thread ends learning epochs (every <see cref="EpochInterval"/>); false:
    /// the host calls <see cref="LearnEpoch"/>. Can change while the host runs.
    /// </summary>
    /// <exception cref="InvalidOperationException">Set to true on an engine that does not learn.</exception>
    public bool BackgroundLearning
    {
        get
        {
            lock (_backgroundLock)
            {
                return _learnThread is not null;
            }
        }

        set
        {
            lock (_backgroundLock)
            {
                if (value && _learnThread is null)
                {
                    if (_learner is null)
                    {
                        throw new InvalidOperationException("This engine does not learn: create it with EngineOptions.Learning.Enabled = true.");
                    }

                    var stop = new ManualResetEventSlim();
                    _stopLearning = stop;
                    _learnThread = new Thread(() => LearnLoop(stop)) { IsBackground = true, Name = "optpoline learner" };
                    _learnThread.Start();
                }
                else if (!value && _learnThread is not null)
                {
                    _stopLearning!.Set();
                    if (_learnThread != Thread.CurrentThread)
                    {
                        _learnThread.Join();
                    }

                    _stopLearning.Dispose();
                    _learnThread = null;
                    _stopLearning = null;
                }
            }
        }
    }

    /// <summary>The background learner's epoch; can change while the host runs.</summary>
    /// <exception cref="ArgumentOutOfRangeException">Not between 1 ms and 1 minute.</exception>
    public TimeSpan EpochInterval
    {
        get => _epochInterval;
        set
        {
            if (value < TimeSpan.FromMilliseconds(1) || value > TimeSpan.FromMinutes(1))
            {
                throw new ArgumentOutOfRangeException(nameof(value), value, "The epoch interval is between 1 ms and 1 minute.");
            }

            _epochInterval = value;
        }
    }

    /// <summary>One sample per this many fallback calls per CPU (0 when the engine does not learn); can change while the host runs.</summary>
    /// <exception cref="ArgumentOutOfRangeException">Below 1 or above 65536.</exception>
    /// <exception cref="InvalidOperationException">Set on an engine that does not learn.</exception>
    public int SamplePeriod
    {
        get => _samples?.SamplePeriod ?? 0;
        set
        {
            if (value is < 1 or > 65536)
            {
                throw new ArgumentOutOfRangeException(nameof(value), value, "The sample period is between 1 and 65536.");
            }

            (_samples ?? throw new InvalidOperationException("This engine does not learn: create it with EngineOptions.Learning.Enabled = true.")).SamplePeriod = value;
        }
    }

    /// <summary>Who promotes targets into sites now (<see cref="SetPromotionAsync"/> changes it). Learn for an engine that learns, else Static.</summary>
    public PromotionMode Promotion => _promotion;

    /// <summary>Which sites may be promoted now (<see cref="SetSiteFilterAsync"/> changes it).</summary>
    public SiteFilter SiteFilter => _siteFilter;

    /// <summary>
    /// Changes who promotes, while the host runs. Off demotes every site to the fallback (one batch)
    /// and refuses promotions until it changes; Static leaves the sites as they are and stops the
    /// learner's changes; Learn lets the learner work again, starting every site afresh. The task
    /// completes when the sites are in their new state.
    /// </summary>
    /// <exception cref="InvalidOperationException">Learn on an engine created without learning, or patching is suspended while sites must be demoted.</exception>
    public Task SetPromotionAsync(PromotionMode mode)
    {
        if (!Enum.IsDefined(mode))
        {
            throw new ArgumentOutOfRangeException(nameof(mode), mode, "Unknown PromotionMode.");
        }

        if (mode == PromotionMode.Learn && _learner is null)
        {
            throw new InvalidOperationException("PromotionMode.Learn needs an engine that learns: create it with EngineOptions.Learning.Enabled = true.");
        }

        lock (_learnLock)
        {
            var previous = _promotion;
            _promotion = mode;
            if (mode == PromotionMode.Learn && previous != PromotionMode.Learn)
            {
                // Samples taken while the learner could not act describe the past: drop them, start afresh.
                _samples?.Drain(static (_, _) => { });
                RelearnAll();
            }
        }

        return mode == PromotionMode.Off ? DemoteWhere(_ => true) : Task.CompletedTask;
    }

    /// <summary>
    /// Changes which sites may be promoted, while the host runs: sites no longer allowed are demoted
    /// to the fallback (one batch) and the learner leaves them alone; sites allowed again are learned
    /// afresh.
    /// </summary>
    public Task SetSiteFilterAsync(SiteFilter filter)
    {
        ArgumentNullException.ThrowIfNull(filter);
        lock (_learnLock)
        {
            _siteFilter = filter;
            RelearnAll();
        }

        return DemoteWhere(site => !filter.Allows(site.Name, out _));
    }

    private Task DemoteWhere(Func<Site, bool> predicate)
    {
        var demote = Sites.Where(s => s.IsBound && s.Targets.Count > 0 && predicate(s)).Select(s => new SiteUpdate(s, [])).ToList();
        if (demote.Count == 0)
        {
            return Task.CompletedTask;
        }

        if (_patchingSuspended)
        {
            throw new InvalidOperationException($"Patching is suspended; {demote.Count} sites cannot be demoted until it is resumed.");
        }

        return Scheduler.Request(demote);
    }

    private void RelearnAll()
    {
        if (_learner is null)
        {
            return;
        }

        foreach (var site in _sitesById)
        {
            _learner.Relearn(site.LearningId);
        }
    }

    /// <summary>
    /// Decodes every byte of engine code (thunks, stubs, outline chains) and every bound site in the
    /// host's code, and reports anything a site must never contain (an indirect branch outside the
    /// fallback thunks, undecodable bytes). Empty when clean.
    /// </summary>
    public IReadOnlyList<string> AuditCode()
    {
        // A consistent image: no request is planned and no batch is in flight (a batch's int3 window is
        // undecodable on purpose), and no chain is retired or freed while it is read.
        var problems = new List<string>();
        lock (Scheduler.SyncRoot)
        {
            Scheduler.Patcher.BetweenBatches(() => AuditLocked(problems));
        }

        return problems;
    }

    private void AuditLocked(List<string> problems)
    {
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
                problems.AddRange(CodeAudit.Check(site.Stub.GetExecutableSpan(), site.Stub.Address, allowIndirect: false, site.RseqSignatures).Select(p => $"site '{site.Name}' stub: {p}"));
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
    }

    /// <summary>
    /// Stops the grace-period worker (requests still waiting fail) and releases all code memory. No
    /// thread may run engine or host code in it afterwards.
    /// </summary>
    public void Dispose()
    {
        // No reload may start tracing or learning again once they are stopped.
        _config?.Dispose();
        BackgroundLearning = false;
        try
        {
            StopTracing();
        }
        catch (IOException)
        {
            // The files are closed; what failed was reported to every batch since, and Dispose does not throw.
        }

        Scheduler.Dispose();
        Code.Dispose();
        _samples?.Dispose();
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

            ApplyProfileLocked();
            _learner.Suspended = _patchingSuspended || _promotion != PromotionMode.Learn;
            var decisions = _learner.EndEpoch();
            var updates = new List<SiteUpdate>(decisions.Count);
            var filter = _siteFilter;
            foreach (var decision in decisions)
            {
                var site = _sitesById[decision.Site];
                if (decision.Targets.Count > 0 && !filter.Allows(site.Name, out _))
                {
                    continue;   // excluded: stays on the fallback
                }

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

            if (_promotion == PromotionMode.Learn && !_patchingSuspended)
            {
                PlanDirectSlots(updates);
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

    /// <summary>The running trace (tests reach its writers).</summary>
    internal TraceSession? Tracing => _tracing;

    /// <summary>The running trace's directory, or null when the engine does not trace.</summary>
    public string? TraceDirectory
    {
        get
        {
            lock (_published)
            {
                return _tracing?.Directory;
            }
        }
    }

    /// <summary>
    /// Starts tracing into <see cref="TracingOptions.Directory"/> while the host runs: with text pokes,
    /// a start image of every region (<c>snapshot-start.bin</c>) and <c>text-poke.data</c>, a perf.data
    /// file with COMM and MMAP2 records and a PERF_RECORD_TEXT_POKE (old and new bytes, CLOCK_MONOTONIC
    /// time, pid and tid) for every change: each patch, written before it can be visible to another
    /// thread; each block published (int3 to code) and freed (code to int3); and an MMAP2 for each
    /// region reserved later. With a jitdump, <c>jit-PID.dump</c> gets a JIT_CODE_LOAD for every
    /// published block now and later, and again with a fresh code_index for every block a patch batch
    /// changes, so that <c>perf inject --jit</c> names samples by the code as it was. The start waits
    /// for a patch batch in flight. A trace already running is stopped first.
    /// </summary>
    /// <exception cref="ArgumentException">The options name no directory or no output.</exception>
    /// <exception cref="IOException">A trace file cannot be created or mapped.</exception>
    public void StartTracing(TracingOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        Scheduler.Patcher.BetweenBatches(() =>
        {
            lock (_published)
            {
                StopTracingLocked();
                var session = new TraceSession(options);
                try
                {
                    Code.Observe(session, session.Begin);
                    session.Existing([.. _published.Values.Where(e => IsCurrent(e.Block)).OrderBy(e => e.Block.Address)
                        .Select(e => (e.Block.Address, e.Block.Size, e.Name))]);

                    Scheduler.Patcher.Trace = session.Pokes;
                    session.HostBusy(() => Scheduler.Busy || Scheduler.Patcher.Busy);
                    _tracing = session;
                }
                catch
                {
                    Code.Observe(null);
                    session.Dispose();
                    throw;
                }
            }
        });
    }

    /// <summary>Before a batch: a jitdump that could not write refuses it (the patcher turns this into a <see cref="PatchRejectedException"/>).</summary>
    /// <summary>Before every batch arms an int3: the patcher knows every code region (late traps are ours only there), and a failed jitdump refuses the batch.</summary>
    private void BeforeArm()
    {
        var regions = Code.Regions;
        if (regions.Count != _registeredRegions)
        {
            foreach (var (start, size) in regions)
            {
                Scheduler.Patcher.AddCodeRegion(start, size);
            }

            _registeredRegions = regions.Count;
        }

        if (_tracing?.Jit?.Failure is { } failure)
        {
            throw failure;
        }
    }

    /// <summary>
    /// Stops the running trace, if any: writes the end image
    /// (<c>snapshot-end.bin</c>), and closes the files. Waits for a patch batch in flight. Returns what
    /// was written, or null when no trace ran.
    /// </summary>
    /// <exception cref="IOException">
    /// A trace file could not be written (the trace is stopped and its files are closed, but they end
    /// before the failed write; every patch batch since was refused).
    /// </exception>
    public TraceSummary? StopTracing()
    {
        TraceSummary? summary = null;
        Scheduler.Patcher.BetweenBatches(() =>
        {
            lock (_published)
            {
                summary = StopTracingLocked();
            }
        });
        return summary;
    }

    private TraceSummary? StopTracingLocked()
    {
        if (_tracing is not { } session)
        {
            return null;
        }

        _tracing = null;
        Scheduler.Patcher.Trace = null;
        try
        {
            Code.Observe(null, session.Finish);
        }
        finally
        {
            session.Dispose();
        }

        if (session.Failure is { } failure)
        {
            throw new IOException($"The trace in {session.Directory} is stopped but incomplete: {failure.Message}", failure);
        }

        return session.Summary();
    }

    /// <summary>JIT_CODE_LOAD records written by the running jitdump (the next one gets this code_index).</summary>
    internal ulong JitDumpLoads
    {
        get
        {
            lock (_published)
            {
                return _tracing?.Jit?.Loads ?? 0;
            }
        }
    }

    /// <summary>
    /// Declares a block of host code, written through its writable view, ready: from now on it is code
    /// named <paramref name="name"/> in profiles (jitdump) and traces (a text poke from the int3 it held
    /// to its bytes). Write a block completely before publishing it, and change it afterwards only
    /// through sites and the patcher; free it with <see cref="FreeCode"/>.
    /// </summary>
    /// <exception cref="ArgumentException">The block is not a live block of this engine's code memory, or the name is empty.</exception>
    public void PublishCode(CodeBlock block, string name)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        if (!IsCurrent(block))
        {
            throw new ArgumentException($"{block} is not a live block of this engine's code memory; allocate it with engine.Code.Allocate.", nameof(block));
        }

        Publish(block, name);
    }

    /// <summary>
    /// Frees a block of host code (published or not): it stops being named in profiles, is filled with
    /// int3, and a trace records the change. No thread may run in it any more.
    /// </summary>
    /// <exception cref="ArgumentException">The block is not live in this engine's code memory.</exception>
    public void FreeCode(CodeBlock block)
    {
        Unpublish(block);
        Code.Free(block);
    }

    /// <summary>A block of code exists now under <paramref name="name"/> (for profiles and traces).</summary>
    internal void Publish(CodeBlock block, string name)
    {
        lock (_published)
        {
            _published[block.Address] = (block, name);
            _tracing?.Published(block, name);
        }
    }

    /// <summary>
    /// Names a block whose bytes a patch batch is about to write (a chain in a reused arena slot): no
    /// record now, since the bytes are not there yet; the batch records them as a text poke, and the
    /// jitdump loads the block as it is after the batch (<see cref="Republish"/>).
    /// </summary>
    internal void PublishBeforeWrite(CodeBlock block, string name)
    {
        lock (_published)
        {
            _published[block.Address] = (block, name);
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

    /// <summary>After a batch: every changed block is loaded again into the jitdump, as it is now.</summary>
    private void Republish(IReadOnlyList<CodePatch> patches)
    {
        lock (_published)
        {
            if (_tracing?.Jit is null)
            {
                return;
            }

            // Patches come sorted by address, so most fall in the block found last.
            var blocks = new List<(ulong, int, string)>();
            ulong lastStart = 0, lastEnd = 0;
            foreach (var patch in patches)
            {
                if (patch.Address >= lastStart && patch.Address < lastEnd)
                {
                    continue;
                }

                if (Code.TryFindBlock(patch.Address, out var start, out var length))
                {
                    (lastStart, lastEnd) = (start, start + length);
                    if (_published.TryGetValue(start, out var entry) && entry.Block.Size == (int)length)
                    {
                        blocks.Add((start, entry.Block.Size, entry.Name));
                    }
                }
            }

            _tracing.Patched(blocks);
        }
    }

    /// <summary>Whether a published entry still describes a live block (the host may have freed it with Code.Free).</summary>
    private bool IsCurrent(CodeBlock block) =>
        Code.TryFindBlock(block.Address, out var start, out var length) && start == block.Address && length == (ulong)block.Size;

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
    /// <summary>Samples keyed by <paramref name="key"/> (another return address of the site's) count for <paramref name="site"/> too.</summary>
    internal void AddSampleKey(Site site, ulong key)
    {
        if (_learner is null)
        {
            return;
        }

        lock (_learnLock)
        {
            _sitesByKey.Add(key, site);
        }
    }

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

    /// <summary>
    /// Megamorphic sites skip their miss path: an inline site's first slot jumps straight to its own
    /// call, which goes to the fallback thunk unsampled; a site without inline slots links straight to
    /// the thunk. After 4, 8, then every 16 epochs, the call goes to
    /// the sampling stub instead for one epoch (a rel32 swap, safe at any time), so the learner sees
    /// whether the site is still megamorphic; a site it stops calling megamorphic leaves the direct state.
    /// </summary>
    private void PlanDirectSlots(List<SiteUpdate> updates)
    {
        var epoch = _learner!.Epoch;
        var changing = updates.Select(u => u.Site).ToHashSet();
        foreach (var site in _sitesById)
        {
            // Inline sites go direct through their first slot, sites without inline slots through their out link.
            var slotted = site.InlineSlotCount > 0;
            if (!site.IsBound || changing.Contains(site) || (slotted && (site is not InlineSite || site.Slots.Count == 0)))
            {
                continue;
            }

            var megamorphic = _learner.IsMegamorphic(site.LearningId) && site.Targets.Count == 0 && _siteFilter.Allows(site.Name, out _);
            var direct = slotted ? site.Slots[0].Direct : site.DirectLink;
            var sampling = direct && (slotted ? site.Slots[0].CallTarget : site.OutLink!.Target) == site.Tail;
            if (!megamorphic)
            {
                site.DirectSpan = 0;
                if (direct && !sampling)
                {
                    updates.Add(new SiteUpdate(site, []));
                }
                else if (sampling && epoch >= site.DirectUntil + 1)
                {
                    updates.Add(new SiteUpdate(site, []));   // the learner has not called it megamorphic again
                }
            }
            else if (!direct || (sampling && epoch >= site.DirectUntil + 1 && !_learner.IsDeciding(site.LearningId)))
            {
                // (A sampling site whose back-off ran out keeps sampling until the policy has decided:
                // going direct again would starve it of the samples it is deciding on.)
                site.DirectSpan = Math.Clamp(site.DirectSpan * 2, 4, 16);
                site.DirectUntil = epoch + site.DirectSpan;
                updates.Add(new SiteUpdate(site, []) { DirectCall = site.Fallback });
            }
            else if (!sampling && (epoch >= site.DirectUntil || _learner.IsDeciding(site.LearningId)))
            {
                // Sample when the direct span ends, or as soon as the policy's back-off has run out: it
                // decides from samples, and a direct site sends none.
                updates.Add(new SiteUpdate(site, []) { DirectCall = site.Tail });
            }
        }
    }

    private void LearnLoop(ManualResetEventSlim stop)
    {
        while (!stop.Wait(_epochInterval))
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

    /// <summary>Code regions the patcher has been told of (under its patch lock).</summary>
    private int _registeredRegions;

    /// <summary>Restartable sequences for slot windows (null: not in use; sites then rely on thread flushes).</summary>
    internal RestartableSequences? Rseq => Scheduler.Patcher.RestartableSequences;

    /// <summary>
    /// Writes code that no thread can run yet (a site being bound before its code is returned to the
    /// host). A trace records the changes to published blocks (the site's stub) all the same.
    /// </summary>
    internal int ApplyUnpublished(IReadOnlyList<CodePatch> patches)
    {
        lock (_published)
        {
            var effective = QuiescentPatcher.Validate(Code, patches);
            QuiescentPatcher.Apply(Code, effective);
            // Bytes in a block not yet published are recorded when it is (from int3 to all its bytes).
            if (_tracing?.Pokes is { } pokes)
            {
                var published = effective.Where(p => Code.TryFindBlockStart(p.Address, out var start) && _published.ContainsKey(start)).ToList();
                if (published.Count > 0)
                {
                    try
                    {
                        pokes.TextPokes(published, PerfDataWriter.Now(), LinuxOs.Gettid());
                    }
                    catch (IOException)
                    {
                        // The bytes are written: a failed trace is reported by the next batch and StopTracing.
                    }
                }
            }

            Republish(effective);
            return effective.Count;
        }
    }

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
