using BenchmarkDotNet.Attributes;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Patcher;

namespace Optpoline.Bench;

/// <summary>
/// What restartable windows cost per call, on one target (<see cref="Distribution.Mono"/>), in one run:
/// sites whose slots and chains arm an rseq critical section (the default where the process supports
/// it) against the same sites without the arming store (<see cref="PatcherOptions.UseRestartableSequences"/>
/// off), a direct call (the baseline) and the retpoline thunk. Same loop and layouts as <see cref="CallCost"/>.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engines.")]
public unsafe class WindowCost
{
    private const int Calls = 1 << 16;

    private OptpolineEngine _armed = null!;
    private OptpolineEngine _unarmed = null!;
    private ulong* _table;
    private delegate* unmanaged<ulong, ulong*, void> _direct;
    private delegate* unmanaged<ulong, ulong*, void> _retpoline;
    private delegate* unmanaged<ulong, ulong*, void> _inlineHit;
    private delegate* unmanaged<ulong, ulong*, void> _inlineHitUnarmed;
    private delegate* unmanaged<ulong, ulong*, void> _outlineHit;
    private delegate* unmanaged<ulong, ulong*, void> _outlineHitUnarmed;
    private delegate* unmanaged<ulong, ulong*, void> _miss;
    private delegate* unmanaged<ulong, ulong*, void> _missUnarmed;

    [GlobalSetup]
    public void Setup()
    {
        // One engine's code memory holds the targets and the baselines, so every loop calls the same functions.
        _armed = new OptpolineEngine(new EngineOptions { Fallback = FallbackKind.Retpoline });
        if (_armed.Scheduler.Patcher.RestartableSequences is null)
        {
            throw new InvalidOperationException($"Restartable sequences are not available here: {_armed.Scheduler.Patcher.RestartableSequencesUnavailable}.");
        }

        _unarmed = new OptpolineEngine(new EngineOptions
        {
            Fallback = FallbackKind.Retpoline,
            Patching = new PatcherOptions { UseRestartableSequences = false },
        });
        var targets = LoopKernels.EmitTargets(_armed, 2);
        _table = LoopKernels.Pin(LoopKernels.Sequence(Distribution.Mono, targets));
        _direct = LoopKernels.Emit(_armed, asm => asm.call(targets[0]));
        var thunk = _armed.GetThunk(Register.RAX, FallbackKind.Retpoline);
        _retpoline = LoopKernels.Emit(_armed, asm => asm.call(thunk));
        var armed = EmitSites(_armed, targets);
        _inlineHit = (delegate* unmanaged<ulong, ulong*, void>)armed[0];
        _outlineHit = (delegate* unmanaged<ulong, ulong*, void>)armed[1];
        _miss = (delegate* unmanaged<ulong, ulong*, void>)armed[2];
        var unarmed = EmitSites(_unarmed, targets);
        _inlineHitUnarmed = (delegate* unmanaged<ulong, ulong*, void>)unarmed[0];
        _outlineHitUnarmed = (delegate* unmanaged<ulong, ulong*, void>)unarmed[1];
        _missUnarmed = (delegate* unmanaged<ulong, ulong*, void>)unarmed[2];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        System.Runtime.InteropServices.NativeMemory.AlignedFree(_table);
        _unarmed.Dispose();
        _armed.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Calls)]
    public void Direct() => _direct(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void Retpoline() => _retpoline(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void InlineHit() => _inlineHit(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void InlineHitUnarmed() => _inlineHitUnarmed(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void OutlineHit() => _outlineHit(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void OutlineHitUnarmed() => _outlineHitUnarmed(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void Miss() => _miss(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void MissUnarmed() => _missUnarmed(Calls, _table);

    /// <summary>The inline-hit, outline-hit and miss loops of <paramref name="engine"/>, as addresses.</summary>
    private static nint[] EmitSites(OptpolineEngine engine, ulong[] targets)
    {
        var inlineHit = LoopKernels.EmitSite(engine, 2, out var inline);
        inline.Promote([targets[0]]);
        var outlineHit = LoopKernels.EmitSite(engine, 0, out var outline);
        outline.Promote([targets[0]]);
        var miss = LoopKernels.EmitSite(engine, 1, out var missing);
        missing.Promote([targets[1]]);
        if (engine.AuditCode() is { Count: > 0 } problems)
        {
            throw new InvalidOperationException(string.Join(Environment.NewLine, problems));
        }

        return [(nint)inlineHit, (nint)outlineHit, (nint)miss];
    }
}
