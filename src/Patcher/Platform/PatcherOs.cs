using System.Runtime.InteropServices;

namespace Optpoline.Patcher.Platform;

/// <summary>
/// The patcher's whole OS surface (x86-64 Linux, glibc): core serialisation (membarrier), signal
/// actions, signalling threads, and the one private page that holds the signal handlers' code.
/// </summary>
internal static unsafe partial class PatcherOs
{
    private const string Libc = "libc.so.6";

    public const long SysMembarrier = 324;
    public const int MembarrierQuery = 0;
    public const int MembarrierPrivateExpeditedSyncCore = 32;
    public const int MembarrierRegisterPrivateExpeditedSyncCore = 64;
    public const int MembarrierPrivateExpeditedRseq = 128;
    public const int MembarrierRegisterPrivateExpeditedRseq = 256;

    public const int SigTrapNumber = 5;
    public const int SaSiginfo = 4;
    public const int SaOnStack = 0x08000000;
    public const int SaRestart = 0x10000000;

    /// <summary>glibc's <c>struct sigaction</c>: handler @0, mask @8 (128 bytes), flags @136, restorer @144.</summary>
    public const int SigactionSize = 152;
    public const int SigactionMaskOffset = 8;
    public const int SigactionFlagsOffset = 136;

    public const int ProtRead = 1;
    public const int ProtWrite = 2;
    public const int ProtExec = 4;
    public const int MapShared = 0x01;
    public const int MapPrivate = 0x02;
    public const int MapAnonymous = 0x20;
    public const int MapThirtyTwoBit = 0x40;
    public const int MapNoReserve = 0x4000;
    public const int MadvPopulateWrite = 23;

    public const int ESRCH = 3;
    public const int EINVAL = 22;

    public static readonly nint MapFailed = -1;

    [LibraryImport(Libc, EntryPoint = "syscall", SetLastError = true)]
    private static partial long Syscall3(long number, long a, long b, long c);

    [LibraryImport(Libc, EntryPoint = "sigaction", SetLastError = true)]
    public static partial int Sigaction(int signal, byte* action, byte* oldAction);

    [LibraryImport(Libc, EntryPoint = "tgkill", SetLastError = true)]
    public static partial int Tgkill(int tgid, int tid, int signal);

    [LibraryImport(Libc, EntryPoint = "getpid")]
    public static partial int Getpid();

    [LibraryImport(Libc, EntryPoint = "gettid")]
    public static partial int Gettid();

    [LibraryImport(Libc, EntryPoint = "mmap", SetLastError = true)]
    public static partial nint Mmap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [LibraryImport(Libc, EntryPoint = "munmap", SetLastError = true)]
    public static partial int Munmap(nint address, nuint length);

    [LibraryImport(Libc, EntryPoint = "mprotect", SetLastError = true)]
    public static partial int Mprotect(nint address, nuint length, int protection);

    [LibraryImport(Libc, EntryPoint = "madvise", SetLastError = true)]
    public static partial int Madvise(nint address, nuint length, int advice);

    [LibraryImport(Libc, EntryPoint = "fallocate", SetLastError = true)]
    public static partial int Fallocate(int fd, int mode, long offset, long length);

    [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int Ftruncate(int fd, long length);

    [LibraryImport(Libc, EntryPoint = "nanosleep")]
    private static partial int Nanosleep(long* request, long* remaining);

    [LibraryImport(Libc, EntryPoint = "__libc_current_sigrtmin")]
    public static partial int SigRtMin();

    [LibraryImport(Libc, EntryPoint = "__libc_current_sigrtmax")]
    public static partial int SigRtMax();

    public static long Membarrier(int command) => Syscall3(SysMembarrier, command, 0, 0);

    /// <summary>
    /// glibc's rseq registration (2.35 and later register every thread they create): the offset of this
    /// thread's <c>struct rseq</c> from the thread pointer and its size, or null when glibc exports
    /// neither, or registered nothing (size 0: <c>glibc.pthread.rseq=0</c>, or a kernel without rseq).
    /// </summary>
    public static (long Offset, int Size)? RseqRegistration()
    {
        var libc = NativeLibrary.Load(Libc);
        if (!NativeLibrary.TryGetExport(libc, "__rseq_offset", out var offset) || !NativeLibrary.TryGetExport(libc, "__rseq_size", out var size))
        {
            return null;
        }

        var bytes = Marshal.ReadInt32(size);
        return bytes == 0 ? null : (Marshal.ReadInt64(offset), bytes);
    }

    /// <summary>Sleeps for about <paramref name="microseconds"/> (a timer on this thread's CPU: nobody has to wake it).</summary>
    public static void SleepMicroseconds(long microseconds)
    {
        var request = stackalloc long[2] { microseconds / 1_000_000, microseconds % 1_000_000 * 1000 };
        _ = Nanosleep(request, null);   // EINTR (a flush signal) only ends the sleep early
    }

    public static int LastErrno => Marshal.GetLastPInvokeError();

    public static string Describe(int errno) => $"{Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";

    /// <summary>Thread ids of this process (<c>/proc/self/task</c>); threads may come and go meanwhile.</summary>
    public static List<int> ThreadIds()
    {
        var ids = new List<int>();
        foreach (var path in Directory.EnumerateDirectories("/proc/self/task"))
        {
            if (int.TryParse(Path.GetFileName(path), out var tid))
            {
                ids.Add(tid);
            }
        }

        return ids;
    }

    public static bool ThreadExists(int tid) => Directory.Exists($"/proc/self/task/{tid}");

    /// <summary>
    /// Threads of this process whose signal mask blocks <paramref name="signal"/> now (<c>SigBlk</c> in
    /// <c>/proc/self/task/TID/status</c>). A thread that exits meanwhile is skipped.
    /// </summary>
    public static List<int> ThreadsBlocking(int signal)
    {
        var bit = 1UL << (signal - 1);
        var found = new List<int>();
        foreach (var tid in ThreadIds())
        {
            try
            {
                foreach (var line in File.ReadLines($"/proc/self/task/{tid}/status"))
                {
                    if (line.StartsWith("SigBlk:", StringComparison.Ordinal))
                    {
                        if ((ulong.Parse(line.AsSpan(7).Trim(), System.Globalization.NumberStyles.HexNumber, System.Globalization.CultureInfo.InvariantCulture) & bit) != 0)
                        {
                            found.Add(tid);
                        }

                        break;
                    }
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The thread exited while we looked.
            }
        }

        return found;
    }
}
