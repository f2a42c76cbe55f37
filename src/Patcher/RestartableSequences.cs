using Iced.Intel;
using Optpoline.Patcher.Platform;

namespace Optpoline.Patcher;

/// <summary>
/// Restartable sequences (rseq) as the grace period for windows of patched code: a window (a slot's
/// compare to the end of its call) is a critical section the thread arms on entry, and
/// <see cref="Fence"/> (<c>membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)</c>) makes the kernel
/// restart every thread of the process that is inside one, at its abort handler, before it executes
/// another instruction of it. The kernel applies the restart to the interrupted user context itself:
/// at preemption, at the delivery of the first signal (so a thread inside another signal handler was
/// restarted before that handler ran), and by IPI for threads running now. No thread list, no signal,
/// no acknowledgement: nesting, blocked signals, exiting threads and a full signal queue cannot fool it.
/// </summary>
/// <remarks>
/// Requirements, checked once per process: glibc registered rseq for its threads (2.35 and later,
/// unless <c>glibc.pthread.rseq=0</c>), the kernel has the membarrier command (Linux 5.10), and a
/// self-test in which the kernel restarts an armed sequence at a trap succeeded. A thread that glibc
/// did not create (a raw <c>clone</c>) or that unregistered its rseq area is not covered: such a
/// thread must not execute sites (DESIGN.md, host contract).
/// <para>
/// Descriptors (<c>struct rseq_cs</c>) live in pages mapped below 2 GiB, so that arming is one
/// instruction, <c>mov qword fs:[rseq_cs], imm32</c>, with no register and no intermediate state. They
/// are never freed or rewritten once armed: a thread that armed one keeps pointing at it until its next
/// return to user space, and the kernel reads it then (and kills the thread if it is invalid).
/// </para>
/// </remarks>
public sealed unsafe class RestartableSequences
{
    /// <summary>The signature glibc registers on x86 (<c>RSEQ_SIG</c>); the 4 bytes before every abort handler.</summary>
    public const uint Signature = 0x53053053;

    /// <summary>Bytes of one descriptor (<c>struct rseq_cs</c>, 32-byte aligned).</summary>
    public const int DescriptorSize = 32;

    private const int PageSize = 4096;

    private readonly Lock _lock = new();
    private byte* _page;
    private int _used = PageSize;
    private long _descriptors;
    private long _fences;

    internal RestartableSequences(long rseqOffset)
    {
        CsFieldOffset = rseqOffset + 8;
    }

    /// <summary>Offset of this thread's <c>rseq.rseq_cs</c> field from the thread pointer (<c>fs</c>).</summary>
    public long CsFieldOffset { get; }

    /// <summary>Bytes of the arming store, <see cref="Arm"/>.</summary>
    public const int ArmLength = 13;

    /// <summary>
    /// The instruction that arms <paramref name="descriptor"/> on entry to its window:
    /// <c>mov qword fs:[rseq_cs], imm32</c> (13 bytes), the address sign-extended.
    /// </summary>
    public Instruction Arm(ulong descriptor) => ArmInstruction(CsFieldOffset, descriptor);

    internal static Instruction ArmInstruction(long csFieldOffset, ulong descriptor)
    {
        if (descriptor >= 0x8000_0000UL)
        {
            throw new ArgumentOutOfRangeException(nameof(descriptor), $"rseq descriptor 0x{descriptor:X} is not below 2 GiB.");
        }

        return Instruction.Create(Code.Mov_rm64_imm32,
            new MemoryOperand(Register.None, Register.None, 1, csFieldOffset, 8, false, Register.FS), (int)descriptor);   // displSize 8: 64-bit addressing, no 0x67 prefix
    }

    /// <summary>Descriptors handed out (each 32 bytes, for the life of the process).</summary>
    public long Descriptors => Interlocked.Read(ref _descriptors);

    /// <summary>Fences run.</summary>
    public long Fences => Interlocked.Read(ref _fences);

    /// <summary>
    /// A new descriptor, all zero (a valid empty critical section) until <see cref="Describe"/> fills it.
    /// Its address is below 2 GiB.
    /// </summary>
    /// <exception cref="InvalidOperationException">No page below 2 GiB could be mapped.</exception>
    public ulong ReserveDescriptor()
    {
        lock (_lock)
        {
            if (_used == PageSize)
            {
                var page = PatcherOs.Mmap(0, PageSize, PatcherOs.ProtRead | PatcherOs.ProtWrite, PatcherOs.MapPrivate | PatcherOs.MapAnonymous | PatcherOs.MapThirtyTwoBit, -1, 0);
                if (page == PatcherOs.MapFailed)
                {
                    throw new InvalidOperationException($"Mapping a page for rseq descriptors below 2 GiB failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
                }

                _page = (byte*)page;
                _used = 0;
            }

            var descriptor = (ulong)(_page + _used);
            _used += DescriptorSize;
            Interlocked.Increment(ref _descriptors);
            return descriptor;
        }
    }

    /// <summary>
    /// Fills a reserved descriptor: the critical section is [<paramref name="start"/>,
    /// <paramref name="end"/>) and the kernel restarts a thread inside it at <paramref name="abort"/>,
    /// whose 4 preceding bytes must be <see cref="Signature"/>. Call it before any thread can arm it.
    /// </summary>
    /// <exception cref="ArgumentException">The range is empty, or the abort handler lies inside it.</exception>
    public static void Describe(ulong descriptor, ulong start, ulong end, ulong abort)
    {
        if (end <= start || (abort >= start && abort < end))
        {
            throw new ArgumentException($"An rseq critical section must be non-empty with its abort handler outside: [0x{start:X}, 0x{end:X}), abort 0x{abort:X}.");
        }

        var cs = (ulong*)descriptor;
        cs[0] = 0;              // version 0, flags 0
        cs[1] = start;          // start_ip
        cs[2] = end - start;    // post_commit_offset
        cs[3] = abort;          // abort_ip
    }

    /// <summary>
    /// Restarts every thread of the process that is inside an armed window: running threads now (by
    /// IPI), the others before they run again. Windows changed before this call can no longer be
    /// resumed in the middle with values compared against their old bytes.
    /// </summary>
    /// <exception cref="InvalidOperationException">The membarrier call failed.</exception>
    public void Fence()
    {
        if (PatcherOs.Membarrier(PatcherOs.MembarrierPrivateExpeditedRseq) != 0)
        {
            throw new InvalidOperationException($"membarrier(PRIVATE_EXPEDITED_RSEQ) failed: {PatcherOs.Describe(PatcherOs.LastErrno)}.");
        }

        Interlocked.Increment(ref _fences);
    }
}
