using BenchmarkDotNet.Attributes;
using Optpoline.Patcher;
using Optpoline.Patcher.Native;

namespace Optpoline.Bench;

/// <summary>
/// What a thread pays when it arrives at a patch in flight: the int3 traps, the kernel delivers
/// SIGTRAP, the emitted handler looks the address up and redirects, sigreturn resumes. Baseline: a
/// plain call of the code the trap redirects to.
/// </summary>
public unsafe class TrapCost
{
    private PatchRuntime _runtime = null!;

    [GlobalSetup]
    public void Setup() => _runtime = PatchRuntime.Get(new LivePatcher().FlushSignal);

    /// <summary>Calling the redirect target directly: the cost without a trap.</summary>
    [Benchmark(Baseline = true)]
    public int DirectCall() => ((delegate* unmanaged<int>)_runtime.Entries.SelfTestRedirect)();

    /// <summary>A call through an int3 that the trap handler redirects (what a thread pays during a patch).</summary>
    [Benchmark]
    public int TrappedCall()
    {
        var runtime = _runtime;
        var table = stackalloc ulong[5];
        table[0] = 1;
        table[1] = runtime.Entries.SelfTestTrap;
        table[2] = 0;
        table[3] = runtime.Entries.SelfTestRedirect;
        table[4] = 0;
        lock (runtime.PatchLock)
        {
            runtime.PublishTrapTable((nint)table);
            var result = ((delegate* unmanaged<int>)runtime.Entries.SelfTest)();
            runtime.PublishTrapTable(0);
            return result;
        }
    }
}
