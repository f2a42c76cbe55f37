using System.Diagnostics;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using BenchmarkDotNet.Attributes;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Sites;

namespace Optpoline.Bench;

/// <summary>
/// The engine against what users would pick instead, on the same target distributions, in one run.
/// Every peer runs the same loop, <c>acc = table[i % 4096](acc)</c> n times, over targets
/// <c>x + 1</c> that are never inlined; only the call differs:
/// <list type="bullet">
/// <item>Emitted by the engine's assembler: <c>Direct</c> (<c>call T0</c>, the baseline: the hottest
/// target called directly), <c>Indirect</c> (<c>call rax</c>), <c>Retpoline</c> (the engine's thunk).</item>
/// <item>gcc 12 on the same loop in C (<c>bench/native</c>): <c>GccO2</c> (<c>call *%rax</c>),
/// <c>GccRetpoline</c> (<c>-mindirect-branch=thunk</c>), <c>GccPgo</c> (the retpoline build with
/// <c>-fprofile-use</c> after a training run on this very table: gcc's indirect-call promotion).</item>
/// <item>.NET: a <c>Func&lt;ulong, ulong&gt;</c> delegate and a <c>delegate*</c>, each with tiered PGO
/// (the default: guarded devirtualization of delegates) and without (the loop is
/// <c>AggressiveOptimization</c>, so it is never instrumented).</item>
/// <item>The engine, on a two-slot inline site: <c>EngineStatic</c> (the host promotes the targets
/// with at least 5 % of the calls, at most 8, from the known distribution), <c>EngineLearned</c>
/// (sampling and promoting by itself, 10 ms epochs, measured after 1 s of warm-up and still learning),
/// <c>EngineFallback</c> (nothing promoted: every call takes the site's retpoline fallback).</item>
/// </list>
/// An invocation is 2^23 calls: <see cref="Distribution.Phases"/> runs 2^22 of one phase, then 2^22 of
/// the other (static promotion and gcc's profile see both).
/// Setup checks that every peer made exactly n calls. <c>bench -- report</c> turns the JSON export of
/// a run into <c>bench/results/REPORT.md</c> and <c>Peers.svg</c>.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engines.")]
[JsonExporterAttribute.Full]
public unsafe class Peers
{
    private const int Targets = 64;
    /// <summary>Calls per invocation (BenchmarkDotNet divides by it: the results are per call); Phases splits them in two.</summary>
    private const int Ops = 1 << 23;

    private readonly List<nint> _native = [];
    private OptpolineEngine _engine = null!;
    private OptpolineEngine? _learning;
    private byte[][] _phases = null!;
    private ulong _callsPerPhase;
    private ulong*[] _engineTables = null!;
    private ulong*[] _learningTables = null!;
    private ulong*[] _managedPointerTables = null!;
    private Func<ulong, ulong>[][] _delegateTables = null!;
    private readonly Dictionary<string, ulong*[]> _gccTables = [];
    private readonly Dictionary<string, nint> _gccLoops = [];
    private delegate* unmanaged<ulong, ulong*, ulong> _direct;
    private delegate* unmanaged<ulong, ulong*, ulong> _indirect;
    private delegate* unmanaged<ulong, ulong*, ulong> _retpoline;
    private delegate* unmanaged<ulong, ulong*, ulong> _static;
    private delegate* unmanaged<ulong, ulong*, ulong> _fallback;
    private delegate* unmanaged<ulong, ulong*, ulong> _learned;

    [Params(Distribution.Mono, Distribution.Bi90, Distribution.Uniform3, Distribution.Zipf16, Distribution.Mega64, Distribution.Phases)]
    public Distribution Distribution { get; set; }

    [GlobalSetup(Targets = [nameof(Direct), nameof(Indirect), nameof(Retpoline), nameof(GccO2), nameof(GccRetpoline), nameof(GccPgo),
        nameof(DelegatePgo), nameof(DelegateNoPgo), nameof(FunctionPointerPgo), nameof(FunctionPointerNoPgo), nameof(EngineStatic), nameof(EngineFallback)])]
    public void Setup()
    {
        SetPhases();

        _engine = new OptpolineEngine(new EngineOptions { Fallback = FallbackKind.Retpoline });
        var targets = LoopKernels.EmitIncrementTargets(_engine, Targets);
        _engineTables = Tables(targets);
        _direct = LoopKernels.EmitChained(_engine, asm => asm.call(targets[0]));
        _indirect = LoopKernels.EmitChained(_engine, asm => asm.call(AssemblerRegisters.rax));
        var thunk = _engine.GetThunk(Register.RAX, FallbackKind.Retpoline);
        _retpoline = LoopKernels.EmitChained(_engine, asm => asm.call(thunk));
        var staticSite = _engine.CreateInlineSite(Register.RAX, 2, "static");
        _static = LoopKernels.EmitChained(_engine, staticSite.Emit);
        staticSite.Promote([.. Hottest().Select(i => targets[i])]);
        var fallbackSite = _engine.CreateInlineSite(Register.RAX, 2, "fallback");
        _fallback = LoopKernels.EmitChained(_engine, fallbackSite.Emit);
        Audit(_engine);

        var methods = ManagedTargets.Methods(Targets);
        var delegates = methods.Select(m => m.CreateDelegate<Func<ulong, ulong>>()).ToArray();
        _delegateTables = [.. _phases.Select(phase => phase.Select(i => delegates[i]).ToArray())];
        _managedPointerTables = Tables([.. methods.Select(m => (ulong)m.MethodHandle.GetFunctionPointer())]);

        LoadGcc();
        Check();
    }

    [GlobalSetup(Target = nameof(EngineLearned))]
    public void SetupLearned()
    {
        SetPhases();
        _learning = new OptpolineEngine(new EngineOptions
        {
            Fallback = FallbackKind.Retpoline,
            Learning = new LearningOptions { Enabled = true, EpochInterval = TimeSpan.FromMilliseconds(10) },
        });
        var targets = LoopKernels.EmitIncrementTargets(_learning, Targets);
        _learningTables = Tables(targets);
        var site = _learning.CreateInlineSite(Register.RAX, 2, "learned");
        _learned = LoopKernels.EmitChained(_learning, site.Emit);
        var warmUp = Stopwatch.StartNew();
        while (warmUp.Elapsed < TimeSpan.FromSeconds(1))
        {
            EngineLearned();
        }

        Audit(_learning);
        if (EngineLearned() != Ops)
        {
            throw new InvalidOperationException($"{nameof(EngineLearned)} made {EngineLearned()} calls, not {Ops}.");
        }

        Console.WriteLine($"// learned site after warm-up: {site}, {site.PatchCount} patches, {site.SampleCount} samples");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var tables in new[] { _engineTables, _learningTables, _managedPointerTables }.Concat(_gccTables.Values))
        {
            for (var i = 0; i < (tables?.Length ?? 0); i++)
            {
                NativeMemory.AlignedFree(tables![i]);
            }
        }

        _engine?.Dispose();
        _learning?.Dispose();
        _native.ForEach(NativeLibrary.Free);
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Ops)]
    public ulong Direct() => Run(_direct, _engineTables);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong Indirect() => Run(_indirect, _engineTables);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong Retpoline() => Run(_retpoline, _engineTables);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong GccO2() => Run((delegate* unmanaged<ulong, ulong*, ulong>)_gccLoops["O2"], _gccTables["O2"]);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong GccRetpoline() => Run((delegate* unmanaged<ulong, ulong*, ulong>)_gccLoops["retpoline"], _gccTables["retpoline"]);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong GccPgo() => Run((delegate* unmanaged<ulong, ulong*, ulong>)_gccLoops["pgo"], _gccTables["pgo"]);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong DelegatePgo() => Run(_delegateTables, &DelegateLoop);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong DelegateNoPgo() => Run(_delegateTables, &DelegateLoopNoPgo);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong FunctionPointerPgo() => Run(_managedPointerTables, &FunctionPointerLoop);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong FunctionPointerNoPgo() => Run(_managedPointerTables, &FunctionPointerLoopNoPgo);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong EngineStatic() => Run(_static, _engineTables);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong EngineLearned() => Run(_learned, _learningTables);

    [Benchmark(OperationsPerInvoke = Ops)]
    public ulong EngineFallback() => Run(_fallback, _engineTables);

    private static ulong DelegateLoop(ulong n, Func<ulong, ulong>[] table)
    {
        ulong acc = 0;
        for (ulong i = 0; i < n; i++)
        {
            acc = table[(int)(i & (LoopKernels.TableLength - 1))](acc);
        }

        return acc;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static ulong DelegateLoopNoPgo(ulong n, Func<ulong, ulong>[] table)
    {
        ulong acc = 0;
        for (ulong i = 0; i < n; i++)
        {
            acc = table[(int)(i & (LoopKernels.TableLength - 1))](acc);
        }

        return acc;
    }

    private static ulong FunctionPointerLoop(ulong n, ulong* table)
    {
        ulong acc = 0;
        for (ulong i = 0; i < n; i++)
        {
            acc = ((delegate*<ulong, ulong>)table[i & (LoopKernels.TableLength - 1)])(acc);
        }

        return acc;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static ulong FunctionPointerLoopNoPgo(ulong n, ulong* table)
    {
        ulong acc = 0;
        for (ulong i = 0; i < n; i++)
        {
            acc = ((delegate*<ulong, ulong>)table[i & (LoopKernels.TableLength - 1)])(acc);
        }

        return acc;
    }

    private static void Audit(OptpolineEngine engine)
    {
        if (engine.AuditCode() is { Count: > 0 } problems)
        {
            throw new InvalidOperationException(string.Join(Environment.NewLine, problems));
        }
    }

    private ulong Run(delegate* unmanaged<ulong, ulong*, ulong> loop, ulong*[] tables)
    {
        ulong acc = 0;
        foreach (var table in tables)
        {
            acc += loop(_callsPerPhase, table);
        }

        return acc;
    }

    // The managed loops differ only in their attributes, so each is its own method; one call per phase.
    private ulong Run(ulong*[] tables, delegate*<ulong, ulong*, ulong> loop)
    {
        ulong acc = 0;
        foreach (var table in tables)
        {
            acc += loop(_callsPerPhase, table);
        }

        return acc;
    }

    private ulong Run(Func<ulong, ulong>[][] tables, delegate*<ulong, Func<ulong, ulong>[], ulong> loop)
    {
        ulong acc = 0;
        foreach (var table in tables)
        {
            acc += loop(_callsPerPhase, table);
        }

        return acc;
    }

    /// <summary><see cref="Distribution.Phases"/>: the table, then the same with targets 2 and 3 for 0 and 1; else one table.</summary>
    private void SetPhases()
    {
        var first = LoopKernels.Indices(Distribution);
        _phases = Distribution == Distribution.Phases ? [first, [.. first.Select(i => (byte)(i + 2))]] : [first];
        _callsPerPhase = (ulong)(Ops / _phases.Length);
    }

    /// <summary>One native table per phase, mapping its target indices to <paramref name="targets"/>.</summary>
    private ulong*[] Tables(ulong[] targets)
    {
        var tables = new ulong*[_phases.Length];
        for (var p = 0; p < tables.Length; p++)
        {
            tables[p] = LoopKernels.Pin([.. _phases[p].Select(i => targets[i])]);
        }

        return tables;
    }

    /// <summary>What a host that knows the distribution promotes: targets with at least 5 % of all calls, at most 8, hottest first.</summary>
    private int[] Hottest() =>
        [.. _phases.SelectMany(p => p).GroupBy(i => (int)i)
            .Where(g => g.Count() >= 0.05 * _phases.Length * LoopKernels.TableLength)
            .OrderByDescending(g => g.Count()).ThenBy(g => g.Key).Take(8).Select(g => g.Key)];

    /// <summary>
    /// Builds the C peers (cached by content: sources, script and table) with bench/native/peers.sh,
    /// which trains gcc's profile on this run's own tables, and loads them.
    /// </summary>
    private void LoadGcc()
    {
        var source = Path.Combine(AppContext.BaseDirectory, "native");
        using var tableFile = new MemoryStream();
        using (var writer = new BinaryWriter(tableFile, System.Text.Encoding.UTF8, leaveOpen: true))
        {
            writer.Write((uint)_phases.Length);
            writer.Write(2u);   // rounds: the training runs two invocations' worth
            writer.Write(_callsPerPhase);
            foreach (var phase in _phases)
            {
                writer.Write(phase);
            }
        }

        var hash = SHA256.HashData([
            .. File.ReadAllBytes(Path.Combine(source, "peers.c")), .. File.ReadAllBytes(Path.Combine(source, "train.c")),
            .. File.ReadAllBytes(Path.Combine(source, "peers.sh")), .. tableFile.ToArray()]);
        var output = Path.Combine(Path.GetTempPath(), "optpoline-peers", Convert.ToHexString(hash)[..16]);
        if (!File.Exists(Path.Combine(output, "libpeers-pgo.so")))
        {
            var staging = $"{output}.{Environment.ProcessId}";
            Directory.CreateDirectory(staging);
            var tables = Path.Combine(staging, "tables.bin");
            File.WriteAllBytes(tables, tableFile.ToArray());
            var build = Process.Start(new ProcessStartInfo("bash", [Path.Combine(source, "peers.sh"), staging, tables]) { RedirectStandardError = true })!;
            var errors = build.StandardError.ReadToEnd();
            build.WaitForExit();
            if (build.ExitCode != 0)
            {
                throw new InvalidOperationException($"bench/native/peers.sh failed ({build.ExitCode}): {errors}");
            }

            Directory.Move(staging, output);
        }

        foreach (var name in new[] { "O2", "retpoline", "pgo" })
        {
            var library = NativeLibrary.Load(Path.Combine(output, $"libpeers-{name}.so"));
            _native.Add(library);
            var peerTargets = (delegate* unmanaged<void**, int, int>)NativeLibrary.GetExport(library, "peer_targets");
            var addresses = new ulong[Targets];
            fixed (ulong* at = addresses)
            {
                if (peerTargets((void**)at, Targets) != Targets)
                {
                    throw new InvalidOperationException($"libpeers-{name}.so has fewer than {Targets} targets.");
                }
            }

            _gccTables[name] = Tables(addresses);
            _gccLoops[name] = NativeLibrary.GetExport(library, "peer_loop");
        }
    }

    /// <summary>Every peer makes exactly the calls asked for (each target adds 1 to the chained value).</summary>
    private void Check()
    {
        var expected = (ulong)_phases.Length * _callsPerPhase;
        foreach (var method in GetType().GetMethods().Where(m => m.GetCustomAttribute<BenchmarkAttribute>() is not null && m.Name != nameof(EngineLearned)))
        {
            var result = (ulong)method.Invoke(this, null)!;
            if (result != expected)
            {
                throw new InvalidOperationException($"{method.Name} made {result} calls, not {expected}.");
            }
        }
    }
}
