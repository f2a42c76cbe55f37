using Iced.Intel;
using Optpoline.Patcher.Platform;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Patcher.Native;

/// <summary>
/// The machine code that runs in signal context: the SIGTRAP handler, the flush handler, and a
/// self-test routine. No managed code ever runs inside a signal handler. All three are SysV functions
/// called as <c>handler(int sig, siginfo_t* info, ucontext_t* uc)</c>; they use only caller-saved
/// registers and raw syscalls.
/// </summary>
internal static class HandlerCode
{
    // ucontext_t: uc_mcontext.gregs at 40; REG_RSP = 15, REG_RIP = 16.
    private const int UcRsp = 40 + (15 * 8);
    private const int UcRip = 40 + (16 * 8);

    // siginfo_t.si_code; int3 reports SI_KERNEL.
    private const int SiCode = 8;
    private const int SiKernel = 128;

    // siginfo_t of a tgkill: si_code SI_TKILL, si_pid (the sender's) at 16.
    private const int SiTkill = -6;
    private const int SiPid = 16;

    private const int SysRtSigaction = 13;
    private const int SysGetpid = 39;
    private const int SysGettid = 186;
    private const int SysTgkill = 234;

    /// <summary>Entry points inside the assembled page.</summary>
    internal readonly record struct Entries(ulong TrapHandler, ulong FlushHandler, ulong SelfTest, ulong SelfTestTrap, ulong SelfTestRedirect, RseqTestEntries? Rseq);

    /// <summary>
    /// The rseq self-test: <see cref="Test"/> arms a critical section [<see cref="Start"/>, <see cref="End"/>)
    /// that holds an int3 at <see cref="Trap"/>. The kernel restarts it at <see cref="Abort"/> (returns 1)
    /// when it delivers the SIGTRAP; a trap table entry sends it to <see cref="NotRestarted"/> (returns 2) otherwise.
    /// </summary>
    internal readonly record struct RseqTestEntries(ulong Test, ulong Trap, ulong Start, ulong End, ulong Abort, ulong NotRestarted);

    /// <summary>Assembles the handler page at <paramref name="page"/>; with rseq, its self-test arms <paramref name="rseqTestDescriptor"/>.</summary>
    public static (byte[] Code, Entries Entries) Build(ulong page, ulong controlBlock, long? rseqCsOffset = null, ulong rseqTestDescriptor = 0)
    {
        var asm = new Assembler(64);
        var trap = asm.CreateLabel("trap");
        var flush = asm.CreateLabel("flush");
        var selfTest = asm.CreateLabel("selftest");
        var selfTestTrap = asm.CreateLabel("selftest_trap");
        var selfTestRedirect = asm.CreateLabel("selftest_redirect");
        var thunkRax = asm.CreateLabel("thunk_rax");

        EmitTrapHandler(asm, controlBlock, ref trap, thunkRax);
        Pad(asm);
        EmitFlushHandler(asm, controlBlock, ref flush);
        Pad(asm);

        // Self-test: returns 0 if the int3 falls through (no redirect), 1 if redirected.
        asm.Label(ref selfTest);
        asm.xor(eax, eax);
        asm.Label(ref selfTestTrap);
        asm.int3();
        asm.ret();
        asm.Label(ref selfTestRedirect);
        asm.mov(eax, 1);
        asm.ret();
        Pad(asm);

        var rseqTest = asm.CreateLabel("rseq_test");
        var rseqTrap = asm.CreateLabel("rseq_trap");
        var rseqEnd = asm.CreateLabel("rseq_end");
        var rseqAbort = asm.CreateLabel("rseq_abort");
        var rseqNotRestarted = asm.CreateLabel("rseq_not_restarted");
        if (rseqCsOffset is { } csOffset)
        {
            asm.Label(ref rseqTest);
            asm.xor(eax, eax);
            asm.AddInstruction(RestartableSequences.ArmInstruction(csOffset, rseqTestDescriptor));
            asm.Label(ref rseqTrap);
            asm.int3();
            asm.nop();
            asm.Label(ref rseqEnd);
            asm.ret();
            asm.Label(ref rseqNotRestarted);
            asm.mov(eax, 2);
            asm.ret();
            asm.dd(RestartableSequences.Signature);
            asm.Label(ref rseqAbort);
            asm.mov(eax, 1);
            asm.ret();
            Pad(asm);
        }

        // A retpoline to chain to the previous handler (jmp rax without consulting the BTB).
        var capture = asm.CreateLabel();
        var setup = asm.CreateLabel();
        asm.Label(ref thunkRax);
        asm.call(setup);
        asm.Label(ref capture);
        asm.pause();
        asm.lfence();
        asm.jmp(capture);
        asm.Label(ref setup);
        asm.mov(__qword_ptr[rsp], rax);
        asm.ret();

        var writer = new BytesWriter();
        var result = asm.Assemble(writer, page, BlockEncoderOptions.ReturnNewInstructionOffsets);
        ulong At(Label label) => result.GetLabelRIP(label);
        var rseqEntries = rseqCsOffset is null ? (RseqTestEntries?)null
            : new RseqTestEntries(At(rseqTest), At(rseqTrap), At(rseqTrap), At(rseqEnd), At(rseqAbort), At(rseqNotRestarted));
        return (writer.Bytes.ToArray(), new Entries(At(trap), At(flush), At(selfTest), At(selfTestTrap), At(selfTestRedirect), rseqEntries));
    }

    /// <summary>
    /// Looks the int3 address up in the published trap table (binary search); on a hit either sets
    /// RIP to the entry's target (kind 0) or emulates <c>call target</c> from the patched instruction
    /// (kind 1: pushes the return address onto the interrupted stack, inside its red zone, which the
    /// signal frame skips). A trap at an address whose int3 is already gone is a late one of ours and
    /// re-executes the instruction. Anything else goes to the previous SIGTRAP action, same arguments.
    /// </summary>
    private static void EmitTrapHandler(Assembler asm, ulong cb, ref Label entry, Label thunkRax)
    {
        var search = asm.CreateLabel();
        var left = asm.CreateLabel();
        var found = asm.CreateLabel();
        var setRip = asm.CreateLabel();
        var chain = asm.CreateLabel();
        var ignore = asm.CreateLabel();
        var byDefault = asm.CreateLabel();
        var stale = asm.CreateLabel();

        var notRestarted = asm.CreateLabel();
        asm.Label(ref entry);
        asm.cmp(__dword_ptr[rsi + SiCode], SiKernel);
        asm.jne(chain);
        asm.mov(r9, __qword_ptr[rdx + UcRip]);

        // The trap came from inside an armed restartable window: the kernel has already moved the
        // context to the window's abort handler (the 4 bytes before it are the rseq signature), which
        // restarts the site from its arming store. Nothing to do. RIP-4 is read only when it lies in the
        // page of RIP-1, which is mapped (a trap's int3, or the second byte of `int $3`); neither of
        // those can be preceded by the signature, whose last byte is 0x53.
        asm.lea(rax, __[r9 - 1]);
        asm.and(eax, 0xFFF);
        asm.cmp(eax, 3);
        asm.jb(notRestarted);
        asm.cmp(__dword_ptr[r9 - 4], unchecked((int)RestartableSequences.Signature));
        asm.jne(notRestarted);
        asm.mov(rax, cb);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.RseqRestarts]);
        asm.ret();

        // A reader of the trap table from here to the end of the search: a retired table is freed only
        // when no reader is counted after it was unpublished (PatchRuntime.ReclaimRetired).
        // The generation is read before the table (kept in the red zone below rsp: this is a leaf until
        // it chains), so a batch that publishes a table and arms an int3 after this load is noticed.
        var retry = asm.CreateLabel();
        var parked = asm.CreateLabel();
        var searchStart = asm.CreateLabel();
        asm.Label(ref notRestarted);
        asm.dec(r9);
        asm.Label(ref retry);
        asm.mov(rax, cb);
        asm.mov(r10, __qword_ptr[rax + ControlBlock.TrapGeneration]);
        asm.mov(__qword_ptr[rsp - 8], r10);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.TrapReaders]);
        asm.mov(r8, __qword_ptr[rax + ControlBlock.TrapTable]);
        asm.cmp(__qword_ptr[rax + ControlBlock.TestPark], 0);
        asm.jne(parked);
        asm.Label(ref searchStart);
        asm.test(r8, r8);
        asm.jz(stale);
        asm.xor(ecx, ecx);
        asm.mov(r10, __qword_ptr[r8]);
        asm.Label(ref search);
        asm.cmp(rcx, r10);
        asm.jae(stale);
        asm.lea(r11, __[rcx + r10]);
        asm.shr(r11, 1);
        asm.mov(rax, r11);
        asm.shl(rax, 5);
        asm.lea(rax, __[r8 + rax + 8]);
        asm.cmp(r9, __qword_ptr[rax]);
        asm.je(found);
        asm.jb(left);
        asm.lea(rcx, __[r11 + 1]);
        asm.jmp(search);
        asm.Label(ref left);
        asm.mov(r10, r11);
        asm.jmp(search);

        // Not in the published batch. A thread can execute one of our int3s just before the batch
        // restores the first byte and reach this handler after the table is gone (membarrier does not
        // wait for a trap in flight). If the byte is no longer int3, it was ours: run the restored
        // instruction. If it still is, the int3 is someone else's.
        asm.Label(ref stale);
        asm.mov(rax, cb);
        asm.@lock.dec(__qword_ptr[rax + ControlBlock.TrapReaders]);
        var late = asm.CreateLabel();
        asm.cmp(__byte_ptr[r9], 0xCC);
        asm.jne(late);

        // Still int3 and not in the table we read: if a batch published a table since, its int3 may be
        // this one (finding F5); look again. Otherwise the int3 is someone else's.
        asm.mov(r10, __qword_ptr[rax + ControlBlock.TrapGeneration]);
        asm.cmp(r10, __qword_ptr[rsp - 8]);
        asm.jne(retry);
        asm.jmp(chain);

        // No longer int3: a late trap of ours, if it is one we can have armed (finding F11): inside an
        // engine code region (when the engine registered any), and not the `03` of a two-byte `int $3`
        // (CD 03), which reports the same si_code. Then the restored instruction runs again.
        asm.Label(ref late);
        var inRegion = asm.CreateLabel();
        var regionLoop = asm.CreateLabel();
        var notCd03 = asm.CreateLabel();
        asm.mov(r8, __qword_ptr[rax + ControlBlock.RegionTable]);
        asm.test(r8, r8);
        asm.jz(inRegion);
        asm.mov(rcx, __qword_ptr[r8]);
        asm.Label(ref regionLoop);
        asm.test(rcx, rcx);
        asm.jz(chain);
        asm.dec(rcx);
        asm.mov(r10, rcx);
        asm.shl(r10, 4);
        asm.cmp(r9, __qword_ptr[r8 + r10 + 8]);
        asm.jb(regionLoop);
        asm.cmp(r9, __qword_ptr[r8 + r10 + 16]);
        asm.jae(regionLoop);
        asm.Label(ref inRegion);
        asm.cmp(__byte_ptr[r9], 0x03);
        asm.jne(notCd03);
        asm.mov(r10, r9);
        asm.and(r10d, 0xFFF);
        asm.jz(notCd03);   // the previous byte is in another page: not read
        asm.cmp(__byte_ptr[r9 - 1], 0xCD);
        asm.je(chain);
        asm.Label(ref notCd03);
        asm.mov(__qword_ptr[rdx + UcRip], r9);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.StaleTraps]);
        asm.ret();

        // Test seam: wait here, the table pointer loaded, until the test lets go.
        asm.Label(ref parked);
        var parkSpin = asm.CreateLabel();
        asm.mov(__qword_ptr[rax + ControlBlock.TestPark], 2);
        asm.Label(ref parkSpin);
        asm.pause();
        asm.cmp(__qword_ptr[rax + ControlBlock.TestPark], 0);
        asm.jne(parkSpin);
        asm.jmp(searchStart);

        // Found: the entry's fields are read into registers before the table is let go.
        asm.Label(ref found);
        asm.mov(r9, __qword_ptr[rax + 16]);
        asm.mov(r10, __qword_ptr[rax + 8]);
        asm.mov(r11, __qword_ptr[rax + 24]);
        asm.mov(rax, cb);
        asm.@lock.dec(__qword_ptr[rax + ControlBlock.TrapReaders]);
        asm.test(r10, r10);
        asm.je(setRip);
        asm.mov(r10, __qword_ptr[rdx + UcRsp]);
        asm.sub(r10, 8);
        asm.mov(__qword_ptr[r10], r11);
        asm.mov(__qword_ptr[rdx + UcRsp], r10);
        asm.Label(ref setRip);
        asm.mov(__qword_ptr[rdx + UcRip], r9);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.TrapHits]);
        asm.ret();

        asm.Label(ref chain);
        asm.mov(rax, cb);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.ForeignTraps]);
        asm.mov(rax, __qword_ptr[rax + ControlBlock.PreviousTrapHandler]);
        asm.cmp(rax, 1);
        asm.je(ignore);
        asm.jb(byDefault);
        asm.jmp(thunkRax);
        asm.Label(ref ignore);
        asm.ret();

        // The previous action was SIG_DFL: restore it and re-raise. SIGTRAP is blocked while we run,
        // so the default action (core dump) happens as soon as this handler returns.
        asm.Label(ref byDefault);
        asm.mov(edi, PatcherOs.SigTrapNumber);
        asm.mov(rsi, cb + ControlBlock.DefaultAction);
        asm.xor(edx, edx);
        asm.mov(r10d, 8);
        asm.mov(eax, SysRtSigaction);
        asm.syscall();
        asm.mov(eax, SysGetpid);
        asm.syscall();
        asm.mov(r8, rax);
        asm.mov(eax, SysGettid);
        asm.syscall();
        asm.mov(rdi, r8);
        asm.mov(rsi, rax);
        asm.mov(edx, PatcherOs.SigTrapNumber);
        asm.mov(eax, SysTgkill);
        asm.syscall();
        asm.ret();
    }

    /// <summary>
    /// Moves the interrupted thread out of any published critical range (binary search over sorted,
    /// disjoint ranges), then acknowledges by writing the descriptor's generation into its own slot.
    /// </summary>
    private static void EmitFlushHandler(Assembler asm, ulong cb, ref Label entry)
    {
        var search = asm.CreateLabel();
        var right = asm.CreateLabel();
        var left = asm.CreateLabel();
        var ack = asm.CreateLabel();
        var scan = asm.CreateLabel();
        var next = asm.CreateLabel();
        var done = asm.CreateLabel();

        asm.Label(ref entry);
        asm.mov(rax, cb);
        asm.@lock.inc(__qword_ptr[rax + ControlBlock.FlushRuns]);

        // Only a tgkill from this process is a flush (or a core sync): a signal sent by another process,
        // or by kill(), moves nothing and acknowledges nothing (finding F10).
        asm.cmp(__dword_ptr[rsi + SiCode], SiTkill);
        asm.jne(done);
        asm.mov(eax, SysGetpid);
        asm.syscall();
        asm.cmp(eax, __dword_ptr[rsi + SiPid]);
        asm.jne(done);
        asm.mov(rax, cb);
        asm.mov(r8, __qword_ptr[rax + ControlBlock.FlushDescriptor]);
        asm.test(r8, r8);
        asm.jz(done);
        asm.mov(r9, __qword_ptr[rdx + UcRip]);
        asm.xor(ecx, ecx);
        asm.mov(r10, __qword_ptr[r8 + FlushDescriptor.RangeCount]);
        asm.Label(ref search);
        asm.cmp(rcx, r10);
        asm.jae(ack);
        asm.lea(r11, __[rcx + r10]);
        asm.shr(r11, 1);
        asm.lea(rax, __[r11 + r11 * 2]);
        asm.lea(rax, __[r8 + rax * 8 + FlushDescriptor.Ranges]);
        asm.cmp(r9, __qword_ptr[rax]);
        asm.jb(left);
        asm.cmp(r9, __qword_ptr[rax + 8]);
        asm.jae(right);
        asm.mov(rax, __qword_ptr[rax + 16]);
        asm.mov(__qword_ptr[rdx + UcRip], rax);
        asm.jmp(ack);
        asm.Label(ref right);
        asm.lea(rcx, __[r11 + 1]);
        asm.jmp(search);
        asm.Label(ref left);
        asm.mov(r10, r11);
        asm.jmp(search);

        asm.Label(ref ack);
        asm.mov(eax, SysGettid);
        asm.syscall();
        asm.mov(r9, __qword_ptr[r8 + FlushDescriptor.TidCount]);
        asm.mov(r10, __qword_ptr[r8 + FlushDescriptor.RangeCount]);
        asm.lea(r10, __[r10 + r10 * 2]);
        asm.lea(r10, __[r8 + r10 * 8 + FlushDescriptor.Ranges]);
        asm.lea(rcx, __[r10 + r9 * 4]);
        asm.mov(edi, __dword_ptr[r8 + FlushDescriptor.Generation]);
        asm.xor(esi, esi);
        asm.Label(ref scan);
        asm.cmp(rsi, r9);
        asm.jae(done);
        asm.cmp(eax, __dword_ptr[r10 + rsi * 4]);
        asm.jne(next);
        asm.mov(__dword_ptr[rcx + rsi * 4], edi);
        asm.jmp(done);
        asm.Label(ref next);
        asm.inc(rsi);
        asm.jmp(scan);
        asm.Label(ref done);
        asm.ret();
    }

    private static void Pad(Assembler asm)
    {
        // Entry points start on 16-byte boundaries for readability of dumps; padding is never executed.
        for (var i = 0; i < 16; i++)
        {
            asm.int3();
        }
    }

    private sealed class BytesWriter : CodeWriter
    {
        public List<byte> Bytes { get; } = [];

        public override void WriteByte(byte value) => Bytes.Add(value);
    }
}
