using BenchmarkDotNet.Attributes;
using Iced.Intel;
using Optpoline.Emit;

namespace Optpoline.Bench;

/// <summary>
/// Cost of one call through each form, in one run, per target distribution. Every method runs the same
/// native loop (load the next target into RAX, call, repeat); only the call differs:
/// Direct <c>call T0</c> (the baseline: the hottest target, as a compiler would emit it),
/// Indirect <c>call rax</c>, Retpoline <c>call __x86_indirect_thunk_rax</c>,
/// InlineHit a site whose two inline slots hold the two hottest targets,
/// OutlineHit a site with no inline slot and the six hottest targets in its outline chain,
/// Miss a site whose one slot holds a target never called (every call takes the retpoline fallback).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
public unsafe class CallCost
{
    private const int Calls = 1 << 16;

    private OptpolineEngine _engine = null!;
    private ulong* _table;
    private delegate* unmanaged<ulong, ulong*, void> _direct;
    private delegate* unmanaged<ulong, ulong*, void> _indirect;
    private delegate* unmanaged<ulong, ulong*, void> _retpoline;
    private delegate* unmanaged<ulong, ulong*, void> _inlineHit;
    private delegate* unmanaged<ulong, ulong*, void> _outlineHit;
    private delegate* unmanaged<ulong, ulong*, void> _miss;

    [Params(Distribution.Mono, Distribution.Bi90, Distribution.Uniform3, Distribution.Mega64)]
    public Distribution Distribution { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _engine = new OptpolineEngine(new EngineOptions { Fallback = FallbackKind.Retpoline });
        var targets = LoopKernels.EmitTargets(_engine, 65);
        var hottest = targets.Take(6).ToArray();
        var never = targets[64];
        _table = LoopKernels.Pin(LoopKernels.Sequence(Distribution, targets));

        _direct = LoopKernels.Emit(_engine, asm => asm.call(hottest[0]));
        _indirect = LoopKernels.Emit(_engine, asm => asm.call(AssemblerRegisters.rax));
        var thunk = _engine.GetThunk(Register.RAX, FallbackKind.Retpoline);
        _retpoline = LoopKernels.Emit(_engine, asm => asm.call(thunk));

        _inlineHit = LoopKernels.EmitSite(_engine, 2, out var inline);
        inline.Promote(hottest[..2]);
        _outlineHit = LoopKernels.EmitSite(_engine, 0, out var outline);
        outline.Promote(hottest);
        _miss = LoopKernels.EmitSite(_engine, 1, out var miss);
        miss.Promote([never]);

        if (_engine.AuditCode() is { Count: > 0 } problems)
        {
            throw new InvalidOperationException(string.Join(Environment.NewLine, problems));
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        System.Runtime.InteropServices.NativeMemory.AlignedFree(_table);
        _engine.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Calls)]
    public void Direct() => _direct(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void Indirect() => _indirect(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void Retpoline() => _retpoline(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void InlineHit() => _inlineHit(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void OutlineHit() => _outlineHit(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void Miss() => _miss(Calls, _table);
}
