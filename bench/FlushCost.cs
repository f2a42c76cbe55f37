using BenchmarkDotNet.Attributes;
using Optpoline.Patcher;

namespace Optpoline.Bench;

/// <summary>
/// The two grace periods against the number of other threads in the process, idle (blocked) or busy
/// (runnable and spinning: more of them than cores makes scheduler latency show): a thread flush (the
/// fallback) and an rseq fence (restartable windows, the default where the process supports it).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the event.")]
public class FlushCost
{
    private readonly List<Thread> _threads = [];
    private LivePatcher _patcher = null!;
    private volatile bool _stop;
    private ManualResetEventSlim _park = null!;

    [Params(0, 4, 16, 64)]
    public int Threads { get; set; }

    [Params(false, true)]
    public bool Busy { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _patcher = new LivePatcher();
        _park = new ManualResetEventSlim();
        for (var i = 0; i < Threads; i++)
        {
            var thread = new Thread(() =>
            {
                if (Busy)
                {
                    while (!_stop)
                    {
                        Thread.SpinWait(1000);
                    }
                }
                else
                {
                    _park.Wait();
                }
            }) { IsBackground = true };
            thread.Start();
            _threads.Add(thread);
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _stop = true;
        _park.Set();
        _threads.ForEach(t => t.Join());
        _park.Dispose();
    }

    /// <summary>A thread flush with no ranges: signal every thread, wait for every acknowledgement.</summary>
    [Benchmark]
    public bool Flush() => _patcher.Flush([]);

    /// <summary>An rseq fence: <c>membarrier(PRIVATE_EXPEDITED_RSEQ)</c>, whatever the threads do.</summary>
    [Benchmark]
    public void Fence() => _patcher.RestartWindows();
}
