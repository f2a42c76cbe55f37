using Optpoline.Sites;
using Optpoline.Tracing;

namespace Optpoline.Configuration;

/// <summary>What a config reload did.</summary>
public sealed class ConfigChangedEventArgs(OptpolineConfig config, string? error, IReadOnlyList<string> warnings) : EventArgs
{
    /// <summary>The config in force now (the new one, or the last good one after a rejection).</summary>
    public OptpolineConfig Config { get; } = config;

    /// <summary>Why the file was rejected (PATH:LINE:COLUMN: ...), or null when it was applied.</summary>
    public string? Error { get; } = error;

    /// <summary>Keys that were valid but could not take effect live (they need a new engine).</summary>
    public IReadOnlyList<string> Warnings { get; } = warnings;
}

/// <summary>
/// An engine's config: applies it, watches its file and applies every valid change without a restart;
/// an invalid change is reported and the last good config stays in force.
/// </summary>
internal sealed class ConfigBinding : IDisposable
{
    private static readonly TimeSpan Debounce = TimeSpan.FromMilliseconds(50);
    private readonly OptpolineEngine _engine;
    private readonly FileSystemWatcher? _watcher;
    private readonly Timer _timer;
    private readonly Lock _lock = new();
    private bool _disposed;
    private string? _profile;

    public ConfigBinding(OptpolineEngine engine, string? path, OptpolineConfig config)
    {
        _engine = engine;
        Path = path;
        Current = config;
        _timer = new Timer(_ => FileChanged());
        if (path is not null)
        {
            _watcher = new FileSystemWatcher(System.IO.Path.GetDirectoryName(path)!, System.IO.Path.GetFileName(path))
            {
                NotifyFilter = NotifyFilters.LastWrite | NotifyFilters.FileName | NotifyFilters.Size | NotifyFilters.CreationTime,
            };
            _watcher.Changed += (_, _) => Poke();
            _watcher.Created += (_, _) => Poke();
            _watcher.Renamed += (_, _) => Poke();
            _watcher.EnableRaisingEvents = true;
        }
    }

    public string? Path { get; }

    public OptpolineConfig Current { get; private set; }

    public string? LastError { get; private set; }

    public IReadOnlyList<string> Warnings { get; private set; } = [];

    public event EventHandler<ConfigChangedEventArgs>? Changed;

    /// <summary>Reads the file again and applies it; throws when it is invalid (the last good config stays).</summary>
    public void Reload()
    {
        if (Path is null)
        {
            throw new InvalidOperationException("This engine has no config file to reload (created without a path and without OPTPOLINE_CONFIG).");
        }

        OptpolineConfig config;
        try
        {
            config = ConfigFile.Load(Path);
        }
        catch (ConfigException e)
        {
            lock (_lock)
            {
                LastError = e.Message;
            }

            Changed?.Invoke(_engine, new ConfigChangedEventArgs(Current, e.Message, Warnings));
            throw;
        }

        Apply(config);
    }

    /// <summary>Applies a config (valid by construction) to the engine.</summary>
    public void Apply(OptpolineConfig config)
    {
        IReadOnlyList<string> warnings;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            warnings = ApplyLocked(config);
            Current = config;
            LastError = null;
            Warnings = warnings;
        }

        Changed?.Invoke(_engine, new ConfigChangedEventArgs(config, null, warnings));
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _disposed = true;
        }

        _watcher?.Dispose();
        _timer.Dispose();
    }

    /// <summary>The initial settings an engine is created with.</summary>
    public static EngineOptions Options(OptpolineConfig config) => new()
    {
        Fallback = config.Promotion.Fallback == "indirect" ? Emit.FallbackKind.Indirect : Emit.FallbackKind.Retpoline,
        Learning = new LearningOptions
        {
            // Always: so that promotion.mode can become "learn" while the host runs. With another mode the
            // sampling stubs still count (about the cost of the retpoline they end in) but nothing changes.
            Enabled = true,
            Background = false,   // started by Apply, which knows the mode
            EpochInterval = TimeSpan.FromMilliseconds(config.Learning.EpochMilliseconds),
            SamplePeriod = config.Learning.SamplePeriod,
            RingCapacity = config.Learning.RingCapacity,
        },
        Patching = new Patcher.PatcherOptions { FlushTimeout = TimeSpan.FromMilliseconds(config.Patching.FlushTimeoutMilliseconds) },
    };

    private List<string> ApplyLocked(OptpolineConfig config)
    {
        var warnings = new List<string>();
        var engine = _engine;
        var fallback = config.Promotion.Fallback == "indirect" ? Emit.FallbackKind.Indirect : Emit.FallbackKind.Retpoline;
        if (fallback != engine.Options.Fallback)
        {
            warnings.Add($"promotion.fallback \"{config.Promotion.Fallback}\" takes effect when an engine is created; this one keeps its {engine.Options.Fallback} fallback.");
        }

        if (engine.IsLearning && config.Learning.RingCapacity != engine.Options.Learning.RingCapacity)
        {
            warnings.Add($"learning.ringCapacity takes effect when an engine is created; this one keeps {engine.Options.Learning.RingCapacity}.");
        }

        if (config.Patching.FlushTimeoutMilliseconds != (int)engine.Options.Patching.FlushTimeout.TotalMilliseconds)
        {
            warnings.Add($"patching.flushTimeoutMilliseconds takes effect when an engine is created; this one keeps {engine.Options.Patching.FlushTimeout.TotalMilliseconds} ms.");
        }

        // Resume first, so that demotions below can be written; suspend last, after them.
        if (!config.Patching.Suspended)
        {
            engine.PatchingSuspended = false;
        }

        var mode = !config.Promotion.Enabled ? PromotionMode.Off : config.Promotion.Mode switch
        {
            "learn" => PromotionMode.Learn,
            "static" => PromotionMode.Static,
            _ => PromotionMode.Off,
        };
        if (mode == PromotionMode.Learn && !engine.IsLearning)
        {
            warnings.Add("promotion.mode \"learn\" needs an engine created with learning; this one promotes only on explicit requests (static).");
            mode = PromotionMode.Static;
        }

        var pending = new List<Task>();
        if (mode != engine.Promotion)
        {
            pending.Add(engine.SetPromotionAsync(mode));
        }

        var filter = engine.SiteFilter;
        if (!filter.Include.SequenceEqual(config.Sites.Include) || !filter.Exclude.SequenceEqual(config.Sites.Exclude))
        {
            pending.Add(engine.SetSiteFilterAsync(new SiteFilter(config.Sites.Include, config.Sites.Exclude)));
        }

        if (engine.IsLearning)
        {
            engine.SamplePeriod = config.Learning.SamplePeriod;
            engine.EpochInterval = TimeSpan.FromMilliseconds(config.Learning.EpochMilliseconds);
            engine.BackgroundLearning = config.Learning.Background;
            ApplyProfile(config.Learning.Profile, engine, warnings);
        }

        ApplyTracing(config.Tracing, Current.Tracing, engine);

        // Demotions are written before SetPromotionAsync/SetSiteFilterAsync return; wait briefly for the rest.
        try
        {
            if (!Task.WaitAll([.. pending], TimeSpan.FromSeconds(5)))
            {
                warnings.Add("some site changes still wait for a grace period (a thread may block the flush signal); they complete or roll back by themselves.");
            }
        }
        catch (AggregateException e)
        {
            warnings.Add($"some site changes failed and were rolled back: {e.InnerException?.Message}");
        }
        if (config.Patching.Suspended)
        {
            engine.PatchingSuspended = true;
        }

        return warnings;
    }

    /// <summary>Loads <c>learning.profile</c> when it names another file than the one loaded last.</summary>
    private void ApplyProfile(string? wanted, OptpolineEngine engine, List<string> warnings)
    {
        var target = wanted is null ? null : System.IO.Path.GetFullPath(wanted, System.IO.Path.GetDirectoryName(Path) ?? Environment.CurrentDirectory);
        if (target == _profile)
        {
            return;
        }

        _profile = target;
        if (target is not null && !engine.TryLoadProfile(target, out _, out var error))
        {
            warnings.Add($"learning.profile: {error}; learning starts from scratch.");
        }
    }

    private void ApplyTracing(TracingConfig wanted, TracingConfig previous, OptpolineEngine engine)
    {
        var running = engine.TraceDirectory;
        var target = wanted.Directory is null ? null : System.IO.Path.GetFullPath(wanted.Directory, System.IO.Path.GetDirectoryName(Path) ?? Environment.CurrentDirectory);
        var sameOutputs = wanted.TextPokes == previous.TextPokes && wanted.JitDump == previous.JitDump;
        if (running == target && (target is null || sameOutputs))
        {
            return;
        }

        engine.StopTracing();
        if (target is not null)
        {
            engine.StartTracing(new TracingOptions { Directory = target, TextPokes = wanted.TextPokes, JitDump = wanted.JitDump });
        }
    }

    private void Poke()
    {
        lock (_lock)
        {
            if (!_disposed)
            {
                _timer.Change(Debounce, Timeout.InfiniteTimeSpan);
            }
        }
    }

    private void FileChanged()
    {
        try
        {
            Reload();
        }
        catch (ConfigException)
        {
            // Reported through LastError and the Changed event; the last good config stays in force.
        }
        catch (ObjectDisposedException)
        {
            // The engine is going away.
        }
#pragma warning disable CA1031 // A timer callback must never take the host process down; the failure is reported instead.
        catch (Exception e)
#pragma warning restore CA1031
        {
            lock (_lock)
            {
                LastError = $"{Path}: applying the config failed: {e.Message}";
            }
        }
    }
}
