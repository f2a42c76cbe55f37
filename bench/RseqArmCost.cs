using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Bench;

/// <summary>
/// The per-call price of the rseq alternative to thread flushes. With rseq, every call through a slot
/// first arms a restartable sequence (stores the address of a per-slot <c>struct rseq_cs</c> into the
/// thread's <c>rseq.rseq_cs</c>, glibc's registration), so that preemption or a signal between the
/// compare and the call restarts the slot instead of resuming inside it; a patcher would then use
/// <c>MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ</c> instead of waiting for every thread to acknowledge.
/// Same loop as <see cref="CallCost"/> on one target: Direct, the plain inline hit, and the inline hit
/// with a real, kernel-checked rseq critical section (start at the movabs, commit at the call,
/// abort handler restarting at the arming store).
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "BenchmarkDotNet owns the lifetime: [GlobalCleanup] disposes the engine.")]
public unsafe class RseqArmCost
{
    private const int Calls = 1 << 16;
    private const uint RseqSignature = 0x53053053;

    private OptpolineEngine _engine = null!;
    private ulong* _table;
    private delegate* unmanaged<ulong, ulong*, void> _direct;
    private delegate* unmanaged<ulong, ulong*, void> _inlineHit;
    private delegate* unmanaged<ulong, ulong*, void> _inlineHitRseq;

    [GlobalSetup]
    public void Setup()
    {
        _engine = new OptpolineEngine();
        var target = LoopKernels.EmitTargets(_engine, 1)[0];
        _table = LoopKernels.Pin(LoopKernels.Sequence(Distribution.Mono, [target]));
        _direct = LoopKernels.Emit(_engine, asm => asm.call(target));
        _inlineHit = LoopKernels.EmitSite(_engine, 1, out var site);
        site.Promote([target]);

        var rseqOffset = Marshal.ReadInt64(NativeLibrary.GetExport(NativeLibrary.Load("libc.so.6"), "__rseq_offset"));
        var rseqSize = (uint)Marshal.ReadInt32(NativeLibrary.GetExport(NativeLibrary.Load("libc.so.6"), "__rseq_size"));
        if (rseqSize == 0)
        {
            throw new InvalidOperationException("glibc did not register rseq for this thread (glibc.pthread.rseq=0?).");
        }

        // struct rseq_cs { u32 version, flags; u64 start_ip, post_commit_offset, abort_ip; }, 32-byte aligned.
        var descriptor = _engine.Code.Allocate(32, 32);
        var abortStub = _engine.Code.Allocate(32, 16);
        ulong armAddress = 0, startAddress = 0, commitEnd = 0;
        _inlineHitRseq = LoopKernels.Emit(_engine, asm =>
        {
            // arm: lea r11, [descriptor]; mov fs:[rseq_offset + 8], r11 ; then the slot itself
            asm.AddInstruction(Instruction.Create(Code.Mov_r64_imm64, Register.R11, descriptor.Address));
            asm.AddInstruction(Instruction.Create(Code.Mov_rm64_r64,
                new MemoryOperand(Register.None, Register.None, 1, rseqOffset + 8, 4, false, Register.FS), Register.R11));
            asm.AddInstruction(Instruction.Create(Code.Mov_r64_imm64, Register.R11, target));
            asm.AddInstruction(Instruction.Create(Code.Cmp_rm64_r64, Register.RAX, Register.R11));
            asm.AddInstruction(Instruction.CreateBranch(Code.Jne_rel32_64, abortStub.Address + 16));
            asm.AddInstruction(Instruction.CreateBranch(Code.Call_rel32_64, target));
        });

        // Locate the armed slot in the emitted loop by decoding it.
        var loopBytes = new byte[256];
        _engine.Code.Read((ulong)_inlineHitRseq, loopBytes);
        var finder = Decoder.Create(64, new ByteArrayCodeReader(loopBytes), (ulong)_inlineHitRseq);
        var found = new List<Instruction>();
        while (finder.IP < (ulong)_inlineHitRseq + 200)
        {
            found.Add(finder.Decode());
        }

        var armIndex = found.FindIndex(i => i.Code == Code.Mov_r64_imm64 && i.Immediate64 == descriptor.Address);
        armAddress = found[armIndex].IP;
        startAddress = found[armIndex + 2].IP;
        commitEnd = found[armIndex + 5].NextIP;

        // Abort handler: the signature, then restart at the arming store. Miss path (+16): never taken here.
        var abort = abortStub.GetWritableSpan();
        BitConverter.TryWriteBytes(abort, RseqSignature);
        var abortIp = abortStub.Address + 4;
        abort[4] = 0xE9;
        BitConverter.TryWriteBytes(abort[5..], (int)(armAddress - (abortIp + 5)));
        abort[16] = 0x0F;
        abort[17] = 0x0B;   // ud2: the miss path is unused with one target

        var cs = descriptor.GetWritableSpan();
        cs.Clear();
        BitConverter.TryWriteBytes(cs[8..], startAddress);
        BitConverter.TryWriteBytes(cs[16..], commitEnd - startAddress);
        BitConverter.TryWriteBytes(cs[24..], abortIp);

        Verify(armAddress, startAddress);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        NativeMemory.AlignedFree(_table);
        _engine.Dispose();
    }

    [Benchmark(Baseline = true, OperationsPerInvoke = Calls)]
    public void Direct() => _direct(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void InlineHit() => _inlineHit(Calls, _table);

    [Benchmark(OperationsPerInvoke = Calls)]
    public void InlineHitRseqArmed() => _inlineHitRseq(Calls, _table);

    private void Verify(ulong arm, ulong start)
    {
        var bytes = new byte[40];
        _engine.Code.Read(arm, bytes);
        var decoder = Decoder.Create(64, new ByteArrayCodeReader(bytes), arm);
        var armMov = decoder.Decode();
        var armStore = decoder.Decode();
        var slot = decoder.Decode();
        if (armMov.Code != Code.Mov_r64_imm64 || armStore.SegmentPrefix != Register.FS || slot.IP != start || slot.Code != Code.Mov_r64_imm64)
        {
            throw new InvalidOperationException($"The rseq loop layout is not as expected: {armMov}; {armStore}; {slot}");
        }
    }
}
