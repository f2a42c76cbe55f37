using System.Runtime.InteropServices;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Support;

/// <summary>
/// A host's own signal handler, as a runtime or profiler installs one: native code, <c>sa_mask</c>
/// empty (as CoreCLR installs every handler), so any other signal, the engine's included, can nest in
/// it. It parks the thread while the interrupted context's RIP lies in one of two ranges, until
/// <see cref="Release"/>: the way a sampling profiler's stack walk, or a handler that takes a lock,
/// keeps a thread inside a handler for as long as it likes. Dispose restores the previous action.
/// </summary>
internal sealed unsafe partial class HostSignal : IDisposable
{
    private const int SaSiginfo = 4;
    private const int SaOnStack = 0x08000000;
    private const int SaRestart = 0x10000000;
    private const int UcRip = 40 + (16 * 8);

    private readonly byte* _previous;
    private readonly int* _state;   // [0] parked, [1] release

    public HostSignal(OptpolineEngine engine, int signal, (ulong Start, ulong End) first, (ulong Start, ulong End) second)
    {
        Signal = signal;
        _state = (int*)NativeMemory.AllocZeroed(64);
        var asm = new Assembler(64);
        var check2 = asm.CreateLabel();
        var park = asm.CreateLabel();
        var spin = asm.CreateLabel();
        var done = asm.CreateLabel();
        asm.mov(rax, __qword_ptr[rdx + UcRip]);
        asm.mov(rcx, first.Start);
        asm.cmp(rax, rcx);
        asm.jb(check2);
        asm.mov(rcx, first.End);
        asm.cmp(rax, rcx);
        asm.jb(park);
        asm.Label(ref check2);
        asm.mov(rcx, second.Start);
        asm.cmp(rax, rcx);
        asm.jb(done);
        asm.mov(rcx, second.End);
        asm.cmp(rax, rcx);
        asm.jae(done);
        asm.Label(ref park);
        asm.mov(rcx, (ulong)_state);
        asm.mov(__dword_ptr[rcx], 1);
        asm.Label(ref spin);
        asm.pause();
        asm.cmp(__dword_ptr[rcx + 4], 0);
        asm.je(spin);
        asm.mov(__dword_ptr[rcx], 0);
        asm.Label(ref done);
        asm.ret();
        var handler = engine.Assemble(asm, name: "host_signal_handler");

        var action = stackalloc byte[152];
        new Span<byte>(action, 152).Clear();
        *(ulong*)action = handler.Address;
        *(int*)(action + 136) = SaSiginfo | SaOnStack | SaRestart;
        _previous = (byte*)NativeMemory.AllocZeroed(152);
        Assert.That(Sigaction(signal, action, _previous), Is.Zero, "sigaction");
    }

    public int Signal { get; }

    public bool Parked => Volatile.Read(ref _state[0]) != 0;

    /// <summary>Sends the signal to <paramref name="tid"/> until the handler parks there (false after <paramref name="timeout"/>).</summary>
    public bool ParkThread(int tid, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!Parked && DateTime.UtcNow < deadline)
        {
            _ = Tgkill(Getpid(), tid, Signal);
            Thread.Sleep(2);
        }

        return Parked;
    }

    public void Release() => Volatile.Write(ref _state[1], 1);

    public void Dispose()
    {
        Release();
        // Instances still queued (sent while the thread was parked) are discarded, not delivered to the
        // previous action, whose default terminates the process.
        Optpoline.Stress.HostileHost.IgnoreThenRestore(Signal, _previous);
        NativeMemory.Free(_previous);
        // The state block stays: a handler still returning reads it.
    }

    [LibraryImport("libc.so.6", EntryPoint = "sigaction")]
    private static partial int Sigaction(int signal, byte* action, byte* previous);

    [LibraryImport("libc.so.6", EntryPoint = "tgkill")]
    private static partial int Tgkill(int tgid, int tid, int signal);

    [LibraryImport("libc.so.6", EntryPoint = "getpid")]
    private static partial int Getpid();

    [LibraryImport("libc.so.6", EntryPoint = "gettid")]
    internal static partial int Gettid();

    [LibraryImport("libc.so.6", EntryPoint = "__libc_current_sigrtmin")]
    internal static partial int SigRtMin();
}
