using Microsoft.Diagnostics.Runtime;

namespace Optpoline.Cli.Inspect;

/// <summary>
/// Reads the engines of a .NET host, live or from a dump, with ClrMD: it finds every
/// <c>Optpoline.OptpolineEngine</c> on the heap and reads its sites' fields and their current bytes from
/// the target's memory. Nothing runs in the target; a live target is suspended while it is read.
/// </summary>
internal sealed class EngineInspector : IDisposable
{
    private const string EngineType = "Optpoline.OptpolineEngine";
    private static readonly TimeSpan AttachTimeout = TimeSpan.FromSeconds(30);
    private readonly DataTarget _target;
    private readonly ClrRuntime _runtime;

    private EngineInspector(DataTarget target, string source)
    {
        _target = target;
        Source = source;
        var clr = target.ClrVersions.FirstOrDefault()
            ?? throw new InspectException($"{source} is not a .NET process (no CLR in it).");
        _runtime = CreateRuntime(clr, source);
        Symbols = new TargetSymbols(target, _runtime);
    }

    public string Source { get; }

    public TargetSymbols Symbols { get; }

    /// <summary>Attaches to a live process (suspending it while attached).</summary>
    /// <exception cref="InspectException">No such process, no permission, or not .NET.</exception>
    public static EngineInspector Attach(int pid)
    {
        if (!File.Exists($"/proc/{pid}/status"))
        {
            throw new InspectException($"process {pid} does not exist.");
        }

        // Attaching stops every thread of the target; a thread that never reports stopped would hang it
        // for ever, so it gets a deadline (when this process exits, the kernel detaches and the target runs on).
        var attach = Task.Run(() => DataTarget.AttachToProcess(pid, suspend: true));
        DataTarget target;
        try
        {
            if (!attach.Wait(AttachTimeout))
            {
                throw new InspectException($"attaching to process {pid} did not complete within {AttachTimeout.TotalSeconds} s (a thread of it did not stop); try again, or inspect a dump of it.");
            }

            target = attach.Result;
        }
        catch (AggregateException e) when (e.InnerException is ClrDiagnosticsException or UnauthorizedAccessException or IOException or InvalidOperationException or ArgumentException)
        {
            throw new InspectException($"cannot attach to process {pid}: {e.InnerException.Message} (attaching needs ptrace rights over it: the same user and kernel.yama.ptrace_scope 0, or root).", e.InnerException);
        }

        return Open(target, $"process {pid}");
    }

    /// <summary>Opens a dump (createdump, or a core file of a .NET process).</summary>
    /// <exception cref="InspectException">No such file, or not a dump ClrMD can read.</exception>
    public static EngineInspector LoadDump(string path)
    {
        if (!File.Exists(path))
        {
            throw new InspectException($"{path} does not exist.");
        }

        DataTarget target;
        try
        {
            target = DataTarget.LoadDump(path);
        }
        catch (Exception e) when (e is ClrDiagnosticsException or InvalidDataException or IOException or UnauthorizedAccessException or NotSupportedException or InvalidOperationException or ArgumentException)
        {
            throw new InspectException($"{path} is not a dump ClrMD can read: {e.Message}", e);
        }

        return Open(target, path);
    }

    /// <summary>Every engine on the heap, with its sites.</summary>
    public List<EngineReport> Read()
    {
        var heap = _runtime.Heap;
        if (!heap.CanWalkHeap)
        {
            throw new InspectException($"{Source}: the GC heap cannot be walked (a dump without the heap: take one with createdump --withheap or --full).");
        }

        var engines = new List<EngineReport>();
        foreach (var engine in heap.EnumerateObjects().Where(o => o.Type?.Name == EngineType))
        {
            try
            {
                engines.Add(ReadEngine(engine));
            }
            catch (Exception e) when (e is InvalidOperationException or ArgumentException or NullReferenceException or IndexOutOfRangeException)
            {
                // A field this version of the tool does not know: another engine version, or a torn read.
                throw new InspectException($"{Source}: the engine at 0x{engine.Address:X} does not have the layout this tool reads ({e.Message}); use the optpoline tool of the host's engine version.", e);
            }
        }

        return engines;
    }

    public void Dispose()
    {
        _runtime.Dispose();
        _target.Dispose();
    }

    /// <summary>
    /// The DAC that matches the target's runtime: ClrMD's own lookup, else the one installed beside the
    /// target's libcoreclr.so (the same runtime on this machine, as for a live process or a local dump).
    /// </summary>
    private static ClrRuntime CreateRuntime(ClrInfo clr, string source)
    {
        try
        {
            return clr.CreateRuntime();
        }
        catch (Exception e) when (e is FileNotFoundException or InvalidOperationException or ClrDiagnosticsException)
        {
            var beside = Path.Combine(Path.GetDirectoryName(clr.ModuleInfo.FileName) ?? "", "libmscordaccore.so");
            if (!File.Exists(beside))
            {
                throw new InspectException($"{source}: no DAC for its runtime {clr.Version} ({e.Message}); install that .NET runtime here.", e);
            }

            return clr.CreateRuntime(beside, ignoreMismatch: true);
        }
    }

    private static EngineInspector Open(DataTarget target, string source)
    {
        try
        {
            return new EngineInspector(target, source);
        }
        catch
        {
            target.Dispose();
            throw;
        }
    }

    private EngineReport ReadEngine(ClrObject engine)
    {
        // Names the engine gave its code: published blocks (address -> (block, name)).
        foreach (var entry in DictionaryValues(engine.ReadObjectField("_published")))
        {
            var block = entry.Value.ReadValueTypeField("Item1");
            // Item2 is a string behind the shared generic instantiation (__Canon).
            var name = (string?)entry.Value.ReadObjectField("Item2");
            if (name is not null)
            {
                Symbols.AddEngineBlock(block.ReadField<ulong>("<Address>k__BackingField"), block.ReadField<int>("<Size>k__BackingField"), name);
            }
        }

        var sites = new List<SiteReport>();
        foreach (var site in ListItems(engine.ReadObjectField("_sites")))
        {
            sites.Add(ReadSite(site));
        }

        var promotion = engine.ReadField<int>("_promotion") switch
        {
            0 => "learn",
            1 => "static",
            2 => "off",
            var other => other.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        return new EngineReport($"0x{engine.Address:X}", promotion, engine.ReadField<bool>("_patchingSuspended"), sites);
    }

    private SiteReport ReadSite(ClrObject site)
    {
        var kind = site.Type?.Name?.EndsWith("InlineSite", StringComparison.Ordinal) == true ? "inline" : "outline";
        var register = ((Iced.Intel.Register)site.ReadField<int>("<Register>k__BackingField")).ToString().ToLowerInvariant();
        var desired = ArrayValues<ulong>(site.ReadObjectField("<Desired>k__BackingField"));
        var slots = ListItems(site.ReadObjectField("<Slots>k__BackingField")).ToList();
        var direct = (slots.Count > 0 && slots[0].ReadField<bool>("<Direct>k__BackingField")) || site.ReadField<bool>("<DirectLink>k__BackingField");
        var outLink = site.ReadObjectField("<OutLink>k__BackingField");
        var pending = !site.ReadObjectField("<Pending>k__BackingField").IsNull;
        var state = outLink.IsNull ? "unbound"
            : desired.Length > 0 ? "promoted"
            : direct ? "direct (megamorphic)"
            : "fallback";
        if (pending)
        {
            state += ", pending";
        }

        var unreachable = SetValues(site.ReadObjectField("_unreachable")).Order().ToList();
        var code = new List<CodeReport>();
        if (kind == "inline" && site.ReadField<ulong>("_address") is var address and not 0)
        {
            code.Add(Code("host code", address, site.ReadField<int>("_boundLength")));
        }

        var stub = site.ReadValueTypeField("_stub");
        if (stub.ReadField<ulong>("<Address>k__BackingField") is var stubAddress and not 0)
        {
            code.Add(Code(kind == "inline" ? "miss path" : "entry", stubAddress, stub.ReadField<int>("<Size>k__BackingField")));
        }

        var chain = site.ReadObjectField("<Chain>k__BackingField");
        if (!chain.IsNull)
        {
            var block = chain.ReadValueTypeField("<Block>k__BackingField");
            code.Add(Code("outline chain", block.ReadField<ulong>("<Address>k__BackingField"), block.ReadField<int>("<Size>k__BackingField")));
        }

        return new SiteReport(
            site.ReadStringField("<Name>k__BackingField") ?? "",
            kind,
            register,
            state,
            [.. desired.Select(t => new TargetReport($"0x{t:X}", Symbols.Name(t)))],
            site.ReadField<long>("_samples"),
            site.ReadField<long>("_patches"),
            [.. unreachable.Select(t => new TargetReport($"0x{t:X}", Symbols.Name(t)))],
            code);
    }

    private CodeReport Code(string what, ulong address, int length)
    {
        var bytes = new byte[Math.Clamp(length, 0, 4096)];
        var read = _target.DataReader.Read(address, bytes);
        return new CodeReport(what, $"0x{address:X}", length, read == bytes.Length ? Disassembly.Lines(bytes, address, Symbols)
            : [$"(only {read} of {bytes.Length} bytes are readable in {Source}: engine code is a shared mapping, which only a full dump holds for sure: createdump --full)"]);
    }

    private IEnumerable<ClrObject> ListItems(ClrObject list)
    {
        if (list.IsNull)
        {
            yield break;
        }

        var items = list.ReadObjectField("_items");
        var count = list.ReadField<int>("_size");
        for (var i = 0; i < count; i++)
        {
            yield return _runtime.Heap.GetObject(_target.DataReader.ReadPointer(items.Type!.GetArrayElementAddress(items.Address, i)));
        }
    }

    private static T[] ArrayValues<T>(ClrObject array)
        where T : unmanaged =>
        array.IsNull || array.AsArray().Length == 0 ? [] : array.AsArray().ReadValues<T>(0, array.AsArray().Length) ?? [];

    /// <summary>The values of a <c>HashSet&lt;ulong&gt;</c>.</summary>
    private static IEnumerable<ulong> SetValues(ClrObject set) =>
        LiveEntries(set, "Next").Select(entry => entry.ReadField<ulong>("Value"));

    private static IEnumerable<(ulong Key, ClrValueType Value)> DictionaryValues(ClrObject dictionary) =>
        LiveEntries(dictionary, "next").Select(entry => (entry.ReadField<ulong>("key"), entry.ReadValueTypeField("value")));

    /// <summary>
    /// The used entries of a <c>Dictionary</c> or <c>HashSet</c>: the first <c>_count</c> of <c>_entries</c>
    /// whose next link (named <paramref name="next"/>) is at least -1; freed entries hold -3 and below.
    /// </summary>
    private static IEnumerable<ClrValueType> LiveEntries(ClrObject table, string next)
    {
        if (table.IsNull || table.ReadObjectField("_entries") is not { IsNull: false } entries)
        {
            yield break;
        }

        var count = table.ReadField<int>("_count");
        var entryType = entries.Type!.ComponentType!;
        for (var i = 0; i < count; i++)
        {
            var entry = ClrValueType.FromAddress(entries.Type.GetArrayElementAddress(entries.Address, i), entryType);
            if (entry.ReadField<int>(next) >= -1)
            {
                yield return entry;
            }
        }
    }
}

/// <summary>The target cannot be inspected; the message says why, for the user.</summary>
internal sealed class InspectException : Exception
{
    public InspectException(string message)
        : base(message)
    {
    }

    public InspectException(string message, Exception inner)
        : base(message, inner)
    {
    }
}
