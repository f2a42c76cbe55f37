using BenchmarkDotNet.Attributes;
using Iced.Intel;
using Optpoline.Emit;

namespace Optpoline.Bench;

/// <summary>
/// What learning costs on the fallback path, in one run: the same native loop as <see cref="CallCost"/>
/// on one target, through a plain retpoline call (the baseline), and through a site whose only slot holds
/// a target never called (every call misses) on an engine that does not learn (the miss path calls the
/// thunk) and on one that does (the miss path calls the sampling stub, 1 sample in 64 calls).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engines.")]
public unsafe class Learning
{
    private const int Calls = 1 << 16;

    private OptpolineEngine _plain = null!;
    private OptpolineEngine _learning = null!;
    private ulong* _table;
    private delegate* unmanaged<ulong, ulong*, void> _retpoline;
    private delegate* unmanaged<ulong, ulong*, void> _missLearningOff;
    private delegate* unmanaged<ulong, ulong*, void> _missLearningOn;

    [GlobalSetup]
    public void Setup()
    {
        _plain = new OptpolineEngine();
        _learning = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, Background = false } });
        var plainTargets = LoopKernels.EmitTargets(_plain, 2);
        var learningTargets = LoopKernels.EmitTargets(_learning, 2);

        // Every form reaches the called target through a thunk, so any target will do for the table.
        _table = LoopKernels.Pin(LoopKernels.Sequence(Distribution.Mono, learningTargets));
        _retpoline = LoopKernels.Emit(_plain, asm => asm.call(_plain.GetThunk(Register.RAX, FallbackKind.Retpoline)));
        _missLearningOff = LoopKernels.EmitSite(_plain, 1, out var off);
        off.Promote([plainTargets[1]]);
        _missLearningOn = LoopKernels.EmitSite(_learning, 1, out var on);
        on.Promote([learningTargets[1]]);

        // No epoch runs during the measurement (the learner would promote the target and end the misses);
        // the rings just wrap, at the same cost per sample for the stub.
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        System.Runtime.InteropServices.NativeMemory.AlignedFree(_table);
        _plain.Dispose();
        _learning.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Calls)]
    public void Retpoline() => _retpoline(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void FallbackLearningOff() => _missLearningOff(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void FallbackLearningOn() => _missLearningOn(Calls, _table);
}
