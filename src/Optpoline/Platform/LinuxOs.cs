using System.Runtime.InteropServices;

namespace Optpoline.Platform;

/// <summary>
/// The engine's whole OS surface (x86-64 Linux, glibc): mappings and the memfd behind the W^X dual
/// mapping. Nothing else in this project calls the OS.
/// </summary>
internal static partial class LinuxOs
{
    private const string Libc = "libc.so.6";

    public const int ProtNone = 0;
    public const int ProtRead = 1;
    public const int ProtWrite = 2;
    public const int ProtExec = 4;

    public const int MapShared = 0x01;
    public const int MapPrivate = 0x02;
    public const int MapFixed = 0x10;
    public const int MapAnonymous = 0x20;
    public const int MapNoReserve = 0x4000;
    public const int MapFixedNoReplace = 0x100000;

    public const uint MfdCloexec = 0x0001;

    public const int EEXIST = 17;

    public static readonly nint MapFailed = -1;

    [LibraryImport(Libc, EntryPoint = "mmap", SetLastError = true)]
    public static partial nint Mmap(nint address, nuint length, int protection, int flags, int fd, long offset);

    [LibraryImport(Libc, EntryPoint = "gettid")]
    public static partial int Gettid();

    [LibraryImport(Libc, EntryPoint = "munmap", SetLastError = true)]
    public static partial int Munmap(nint address, nuint length);

    [LibraryImport(Libc, EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int MemfdCreate(string name, uint flags);

    [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
    public static partial int Ftruncate(int fd, long length);

    [LibraryImport(Libc, EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    /// <summary>
    /// Offset of <c>rseq.cpu_id</c> from the thread pointer (fs base), or null when glibc did not register
    /// rseq (glibc older than 2.35, or the glibc.pthread.rseq tunable set to 0).
    /// </summary>
    public static long? RseqCpuIdOffset()
    {
        var libc = NativeLibrary.Load(Libc);
        if (!NativeLibrary.TryGetExport(libc, "__rseq_offset", out var offset) || !NativeLibrary.TryGetExport(libc, "__rseq_size", out var size))
        {
            return null;
        }

        // struct rseq: cpu_id_start @0, cpu_id @4.
        return Marshal.ReadInt32(size) == 0 ? null : Marshal.ReadInt64(offset) + 4;
    }

    /// <summary>The errno of the last call above, on this thread.</summary>
    public static int LastErrno => Marshal.GetLastPInvokeError();

    /// <summary>"strerror (errno N)" for messages.</summary>
    public static string Describe(int errno) => $"{Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})";
}
