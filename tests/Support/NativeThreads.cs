using System.Runtime.InteropServices;

namespace Optpoline.Tests.Support;

/// <summary>Signal-mask control for tests that need a thread that never acknowledges a flush.</summary>
internal static unsafe partial class NativeThreads
{
    private const int SigBlock = 0;
    private const int SigUnblock = 1;

    [LibraryImport("libc.so.6", EntryPoint = "pthread_sigmask")]
    private static partial int PthreadSigmask(int how, ulong* set, ulong* oldSet);

    public static void Block(int signal) => Change(SigBlock, signal);

    public static void Unblock(int signal) => Change(SigUnblock, signal);

    private static void Change(int how, int signal)
    {
        var set = stackalloc ulong[16];
        new Span<ulong>(set, 16).Clear();
        set[0] = 1UL << (signal - 1);
        var result = PthreadSigmask(how, set, null);
        Assert.That(result, Is.Zero, "pthread_sigmask");
    }
}
