using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

namespace Optpoline.Sites;

/// <summary>
/// Outline chains as restartable windows. Chains of one register live in fixed 256-byte slots of
/// arena blocks; one rseq descriptor per block covers all its slots, with an abort handler that jumps
/// to the register's fallback thunk. Every chain starts by arming that descriptor, so a thread anywhere
/// in a chain past its first instruction is restarted at the thunk (same stack, same register, so the
/// same call) when it is preempted or signalled or when a fence runs. A chain's slot is reused after
/// the fence that follows its retirement, by another chain of the same register only: a thread the
/// kernel restarts later, from either chain, still belongs at that thunk.
/// </summary>
/// <remarks>
/// A thread may still be about to execute a reused slot's first instruction (the arm, the same bytes in
/// every chain of the arena): it was preempted there, before it armed. So a used slot is rewritten as a
/// live patch whose batch fences after its int3 (<see cref="LivePatch.FenceAfterArming"/>): such a
/// thread either traps at the int3 (and goes to the thunk) or armed before it and is restarted by the
/// fence. Blocks and descriptors are never freed: a thread keeps pointing at a descriptor until its next
/// return to user space, and the kernel reads it then.
/// </remarks>
internal sealed class ChainArena(CodeMemory memory, RestartableSequences rseq, Func<Register, ulong> fallback, Action<CodeBlock, string> publish)
{
    /// <summary>Bytes of one chain slot: the arm, <see cref="OutlineChain.MaxTargets"/> entries (test widening included), the tail jump.</summary>
    public const int SlotSize = 256;

    private const int SlotsPerBlock = 64;
    private const int AbortLength = 16;

    private readonly Lock _lock = new();
    private readonly Dictionary<Register, Stack<ChainSlot>> _free = [];
    private long _blocks;

    /// <summary>Arena blocks made so far (each 16 KiB and one descriptor, for the life of the engine).</summary>
    public long Blocks => Interlocked.Read(ref _blocks);

    /// <summary>Slots taken and not given back: live chains, and retired ones waiting for their grace period.</summary>
    public long SlotsInUse
    {
        get
        {
            lock (_lock)
            {
                return (Blocks * SlotsPerBlock) - _free.Values.Sum(f => f.Count);
            }
        }
    }

    /// <summary>The rseq registration the chains arm.</summary>
    public RestartableSequences Rseq => rseq;

    /// <summary>Where a thread restarted from a chain of <paramref name="register"/> goes.</summary>
    public ulong Fallback(Register register) => fallback(register);

    /// <summary>A slot for a chain of <paramref name="register"/>: fresh (never executed) or used (written live).</summary>
    public ChainSlot Take(Register register)
    {
        lock (_lock)
        {
            if (!_free.TryGetValue(register, out var free))
            {
                free = _free[register] = new Stack<ChainSlot>();
            }

            if (free.Count == 0)
            {
                Grow(register, free);
            }

            return free.Pop();
        }
    }

    /// <summary>
    /// Gives a slot back: after the fence that followed its chain's retirement, or at once for a chain
    /// that was never linked. Its bytes stay as they are (a valid chain of the same register).
    /// </summary>
    public void Return(ChainSlot slot, bool linked)
    {
        lock (_lock)
        {
            _free[slot.Register].Push(slot with { Used = slot.Used || linked });
        }
    }

    private void Grow(Register register, Stack<ChainSlot> free)
    {
        var size = (SlotsPerBlock * SlotSize) + AbortLength;
        var block = memory.Allocate(size, 64);
        var windows = SlotsPerBlock * SlotSize;
        var abortAt = block.Address + (ulong)windows;
        var abort = new List<Instruction> { Instruction.CreateDeclareDword(RestartableSequences.Signature) };
        abort.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, fallback(register)));
        var bytes = X64.Encode(abortAt, abort);
        // Nothing can run here yet: plain writes.
        bytes.CopyTo(block.GetWritableSpan()[windows..]);
        var descriptor = rseq.ReserveDescriptor();
        RestartableSequences.Describe(descriptor, block.Address, abortAt, abortAt + 4);
        publish(new CodeBlock(abortAt, block.WritableAddress + (ulong)windows, AbortLength), $"optpoline_chain_restart_{register.ToString().ToLowerInvariant()}");
        Interlocked.Increment(ref _blocks);
        for (var i = SlotsPerBlock - 1; i >= 0; i--)
        {
            var at = (ulong)(i * SlotSize);
            free.Push(new ChainSlot(register, block.Address + at, block.WritableAddress + at, descriptor, Used: false));
        }
    }
}

/// <summary>One chain slot of a <see cref="ChainArena"/>, with the descriptor its chain arms.</summary>
internal readonly record struct ChainSlot(Register Register, ulong Address, ulong WritableAddress, ulong Descriptor, bool Used)
{
    public CodeBlock Block(int length) => new(Address, WritableAddress, length);
}
