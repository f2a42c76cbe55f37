using System.Runtime.InteropServices;

namespace Optpoline.Tests.Support;

/// <summary>Signal-mask control for tests that need a thread that never acknowledges a flush.</summary>
internal static unsafe partial class NativeThreads
{
    private const int SigBlock = 0;
    private const int SigUnblock = 1;

    [LibraryImport("libc.so.6", EntryPoint = "pthread_sigmask")]
    private static partial int PthreadSigmask(int how, ulong* set, ulong* oldSet);

    [LibraryImport("libc.so.6", EntryPoint = "tgkill")]
    public static partial int Tgkill(int tgid, int tid, int signal);

    public static void Block(int signal) => Change(SigBlock, signal);

    public static void Unblock(int signal) => Change(SigUnblock, signal);

    /// <summary>Blocks every signal on this thread (the server-worker idiom: sigfillset + pthread_sigmask); returns the old mask.</summary>
    public static ulong[] BlockAll()
    {
        var set = stackalloc ulong[16];
        var old = stackalloc ulong[16];
        new Span<ulong>(set, 16).Fill(ulong.MaxValue);
        Assert.That(PthreadSigmask(SigBlock, set, old), Is.Zero, "pthread_sigmask");
        return new Span<ulong>(old, 16).ToArray();
    }

    /// <summary>Sets this thread's mask back to <paramref name="mask"/> (from <see cref="BlockAll"/>).</summary>
    public static void Restore(ulong[] mask)
    {
        fixed (ulong* set = mask)
        {
            Assert.That(PthreadSigmask(2 /* SIG_SETMASK */, set, null), Is.Zero, "pthread_sigmask");
        }
    }

    private static void Change(int how, int signal)
    {
        var set = stackalloc ulong[16];
        new Span<ulong>(set, 16).Clear();
        set[0] = 1UL << (signal - 1);
        var result = PthreadSigmask(how, set, null);
        Assert.That(result, Is.Zero, "pthread_sigmask");
    }
}
