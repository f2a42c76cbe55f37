using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Configuration;
using Optpoline.Memory;
using Optpoline.Patcher;
using Optpoline.Profiles;
using Optpoline.Sites;

namespace Optpoline.Native;

/// <summary>
/// The C ABI (optpoline.h). Every entry point catches everything: a .NET exception never crosses into
/// the host; it becomes a negative code and a message for <c>opt_last_error</c>. Handles are looked
/// up in tables, so a NULL, foreign or destroyed handle is refused instead of dereferenced.
/// </summary>
internal static unsafe class Exports
{
    private const int Ok = 0;
    private const int ErrArg = -1;
    private const int ErrState = -2;
    private const int ErrNoMem = -3;
    private const int ErrConfig = -4;
    private const int ErrReach = -5;
    private const int ErrTimeout = -6;
    private const int ErrSys = -7;
    private const int ErrProfile = -8;

    private static readonly ConcurrentDictionary<nint, EngineEntry> Engines = new();
    private static readonly byte* Empty = (byte*)NativeMemory.AllocZeroed(1);
    private static long _nextHandle = 0x1000;

    [ThreadStatic]
    private static byte* _lastError;

    [UnmanagedCallersOnly(EntryPoint = "opt_last_error")]
    public static byte* LastError() => _lastError is null ? Empty : _lastError;

    [UnmanagedCallersOnly(EntryPoint = "opt_engine_create")]
    public static int EngineCreate(byte* configPath, nint* engine) => Run(() =>
    {
        Require(engine != null, "engine (the out pointer) is NULL.");
        *engine = 0;
        var created = OptpolineEngine.FromConfig(configPath == null ? null : Marshal.PtrToStringUTF8((nint)configPath));
        var handle = (nint)Interlocked.Add(ref _nextHandle, 16);
        Engines[handle] = new EngineEntry(created);
        *engine = handle;
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_engine_destroy")]
    public static int EngineDestroy(nint engine) => Run(() =>
    {
        Require(Engines.TryRemove(engine, out var entry), NotAnEngine(engine));
        entry!.Gate.EnterWriteLock();   // waits for calls in flight on this engine
        try
        {
            entry.Engine.Dispose();
            entry.Sites.Clear();
        }
        finally
        {
            entry.Gate.ExitWriteLock();
        }
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_reload_config")]
    public static int ReloadConfig(nint engine) => With(engine, e => e.Engine.ReloadConfig());

    [UnmanagedCallersOnly(EntryPoint = "opt_code_alloc")]
    public static int CodeAlloc(nint engine, nuint size, void** rx, void** rw) => With(engine, e =>
    {
        Require(rx != null && rw != null, "rx and rw (the out pointers) must not be NULL.");
        Require(size > 0 && size <= int.MaxValue, $"size {size} is not between 1 and {int.MaxValue}.");
        var block = e.Engine.Code.Allocate((int)size);
        *rx = (void*)block.Address;
        *rw = (void*)block.WritableAddress;
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_code_publish")]
    public static int CodePublish(nint engine, void* rx, byte* name) => With(engine, e =>
    {
        Require(name != null, "name is NULL.");
        e.Engine.PublishCode(BlockAt(e.Engine, (ulong)rx), Marshal.PtrToStringUTF8((nint)name)!);
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_code_free")]
    public static int CodeFree(nint engine, void* rx) => With(engine, e => e.Engine.FreeCode(BlockAt(e.Engine, (ulong)rx)));

    [UnmanagedCallersOnly(EntryPoint = "opt_site_create")]
    public static int SiteCreate(nint engine, byte* name, int reg, nint* site, void** entry) => With(engine, e =>
    {
        Require(site != null && entry != null, "site and entry (the out pointers) must not be NULL.");
        *site = 0;
        *entry = null;
        var created = e.Engine.CreateOutlineSite(RegisterOf(reg), NameOf(name));
        *site = e.Add(created);
        *entry = (void*)created.Entry;
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_site_emit")]
    public static int SiteEmit(nint engine, byte* name, int reg, void* rw, void* rx, nuint capacity, nuint* length, nint* site) => With(engine, e =>
    {
        Require(length != null && site != null, "length and site (the out pointers) must not be NULL.");
        *site = 0;
        var register = RegisterOf(reg);
        var slots = e.Engine.Config?.Promotion.InlineSlots ?? 1;
        var needed = InlineSite.LengthFor(e.Engine, slots);
        *length = (nuint)needed;
        Require(capacity >= (nuint)needed, $"capacity {capacity} is too small: an inline site with {slots} slots needs {needed} bytes (*length).");
        var block = BlockContaining(e.Engine, (ulong)rx, needed);
        Require((ulong)rw == block.WritableAddress + ((ulong)rx - block.Address),
            $"rw 0x{(ulong)rw:X} is not the writable address of rx 0x{(ulong)rx:X} (expected 0x{block.WritableAddress + ((ulong)rx - block.Address):X}).");
        var created = e.Engine.CreateInlineSite(register, slots, NameOf(name));
        var written = created.Write(block, (int)((ulong)rx - block.Address));
        *length = (nuint)written;
        *site = e.Add(created);
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_site_promote")]
    public static int SitePromote(nint engine, nint site, ulong* targets, nuint count) => With(engine, e =>
    {
        var found = e.SiteOf(site);
        Require(count == 0 || targets != null, "targets is NULL but count is not 0.");
        Require(count <= (nuint)found.MaxTargets, $"count {count} exceeds the {found.MaxTargets} targets site '{found.Name}' holds.");
        var list = new ulong[(int)count];
        for (var i = 0; i < list.Length; i++)
        {
            list[i] = targets[i];
        }

        found.Promote(list);
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_site_reset")]
    public static int SiteReset(nint engine, nint site) => With(engine, e => e.SiteOf(site).Reset());

    [UnmanagedCallersOnly(EntryPoint = "opt_site_get_stats")]
    public static int SiteGetStats(nint engine, nint site, SiteStats* stats) => With(engine, e =>
    {
        Require(stats != null, "stats is NULL.");
        var found = e.SiteOf(site);
        var targets = found.Targets;
        *stats = default;
        stats->Samples = (ulong)found.SampleCount;
        stats->Patches = (ulong)found.PatchCount;
        stats->TargetCount = (uint)Math.Min(targets.Count, 8);
        stats->Unreachable = (uint)found.UnreachableCount;
        for (var i = 0; i < (int)stats->TargetCount; i++)
        {
            stats->Targets[i] = targets[i];
        }
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_learn_epoch")]
    public static int LearnEpoch(nint engine) => With(engine, e => e.Engine.LearnEpoch());

    [UnmanagedCallersOnly(EntryPoint = "opt_save_profile")]
    public static int SaveProfile(nint engine, byte* path) => With(engine, e =>
    {
        Require(path != null, "path is NULL.");
        e.Engine.SaveProfile(Marshal.PtrToStringUTF8((nint)path)!);
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_load_profile")]
    public static int LoadProfile(nint engine, byte* path) => With(engine, e =>
    {
        Require(path != null, "path is NULL.");
        e.Engine.LoadProfile(Marshal.PtrToStringUTF8((nint)path)!);
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_set_promotion")]
    public static int SetPromotion(nint engine, int enabled) => With(engine, e =>
    {
        var configured = e.Engine.Config?.Promotion.Mode switch
        {
            "static" => PromotionMode.Static,
            "off" => PromotionMode.Off,
            _ => e.Engine.IsLearning ? PromotionMode.Learn : PromotionMode.Static,
        };
        if (!e.Engine.SetPromotionAsync(enabled != 0 ? configured : PromotionMode.Off).Wait(TimeSpan.FromSeconds(10)))
        {
            throw new PatchTimeoutException("Changing the promotion mode did not complete within 10 s.");
        }
    });

    [UnmanagedCallersOnly(EntryPoint = "opt_suspend_patching")]
    public static int SuspendPatching(nint engine, int suspended) => With(engine, e => e.Engine.PatchingSuspended = suspended != 0);

    private static int With(nint engine, Action<EngineEntry> action) => Run(() =>
    {
        Require(Engines.TryGetValue(engine, out var entry), NotAnEngine(engine));
        if (!entry!.Gate.TryEnterReadLock(0))
        {
            // Being destroyed (a writer holds or waits for the gate).
            throw new ObjectDisposedException("opt_engine", "The engine is being destroyed.");
        }

        try
        {
            Require(Engines.ContainsKey(engine), NotAnEngine(engine));
            action(entry);
        }
        finally
        {
            entry.Gate.ExitReadLock();
        }
    });

    private static int Run(Action action)
    {
        try
        {
            action();
            return Ok;
        }
        catch (Exception e)
        {
            var code = e switch
            {
                AggregateException { InnerException: { } inner } => CodeOf(inner),
                _ => CodeOf(e),
            };
            SetError(e is AggregateException { InnerException: { } i } ? i.Message : e.Message);
            return code;
        }
    }

    private static int CodeOf(Exception e) => e switch
    {
        ConfigException => ErrConfig,
        ProfileException => ErrProfile,
        TargetOutOfReachException => ErrReach,
        PatchTimeoutException => ErrTimeout,
        CodeMemoryExhaustedException or OutOfMemoryException or InsufficientExecutionStackException => ErrNoMem,
        ArgumentException => ErrArg,
        ObjectDisposedException or InvalidOperationException or PatchRejectedException => ErrState,
        _ => ErrSys,
    };

    private static void SetError(string message)
    {
        var old = _lastError;
        _lastError = (byte*)Marshal.StringToCoTaskMemUTF8(message);
        if (old != null)
        {
            Marshal.FreeCoTaskMem((nint)old);
        }
    }

    private static void Require([System.Diagnostics.CodeAnalysis.DoesNotReturnIf(false)] bool condition, string message)
    {
        if (!condition)
        {
            throw new ArgumentException(message);
        }
    }

    private static string NotAnEngine(nint engine) => $"0x{engine:X} is not an engine from opt_engine_create (NULL, foreign or destroyed).";

    private static string? NameOf(byte* name) => name == null ? null : Marshal.PtrToStringUTF8((nint)name);

    private static Register RegisterOf(int reg) => reg switch
    {
        0 => Register.RAX,
        1 => Register.RCX,
        2 => Register.RDX,
        3 => Register.RBX,
        5 => Register.RBP,
        6 => Register.RSI,
        7 => Register.RDI,
        >= 8 and <= 15 and not 11 => Register.R8 + (reg - 8),
        _ => throw new ArgumentException($"reg {reg} is not a site register: use the x86 encoding 0-3, 5-10 or 12-15 (4 is rsp, 11 is r11, the site's scratch)."),
    };

    /// <summary>The live block that starts at <paramref name="rx"/>.</summary>
    private static CodeBlock BlockAt(OptpolineEngine engine, ulong rx)
    {
        var block = BlockContaining(engine, rx, 1);
        Require(block.Address == rx, $"0x{rx:X} is inside a code block but not its start (0x{block.Address:X}); pass the rx that opt_code_alloc returned.");
        return block;
    }

    private static CodeBlock BlockContaining(OptpolineEngine engine, ulong rx, int length)
    {
        Require(engine.Code.TryGetBlock(rx, out var block), $"0x{rx:X} is not inside a live block of this engine's code memory (use opt_code_alloc).");
        Require(rx + (ulong)length <= block.Address + (ulong)block.Size, $"0x{rx:X}+{length} runs past the end of its block (0x{block.Address:X}, {block.Size} bytes).");
        return block;
    }

    /// <summary>opt_site_stats, as laid out in optpoline.h.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct SiteStats
    {
        public ulong Samples;
        public ulong Patches;
        public uint TargetCount;
        public uint Unreachable;
        public InlineTargets Targets;
    }

    /// <summary>const void *targets[8].</summary>
    [InlineArray(8)]
    public struct InlineTargets
    {
        private ulong _element;
    }

    private sealed class EngineEntry(OptpolineEngine engine)
    {
        private long _next = 0x10;

        public OptpolineEngine Engine { get; } = engine;

        public ConcurrentDictionary<nint, Site> Sites { get; } = new();

        public ReaderWriterLockSlim Gate { get; } = new(LockRecursionPolicy.NoRecursion);

        /// <summary>Site handles are small numbers unique to the engine: never pointers, so never dereferenced.</summary>
        public nint Add(Site site)
        {
            var handle = (nint)Interlocked.Increment(ref _next);
            Sites[handle] = site;
            return handle;
        }

        public Site SiteOf(nint handle) =>
            Sites.TryGetValue(handle, out var site) ? site : throw new ArgumentException($"0x{handle:X} is not a site of this engine (NULL, foreign, or from another engine).");
    }
}
