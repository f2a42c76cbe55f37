using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;
using Optpoline.Patcher;

namespace Optpoline.Sites;

/// <summary>
/// A site whose first slot lives in the host's code. Emitted as
/// <code>
/// S:  movabs r11, T0     ; patchable (an empty slot starts with jmp MISS instead)
///     cmp    R, r11
///     jne    MISS        ; to this site's stub in engine memory
///     call   T0          ; patchable; falls through to the host's next instruction
/// </code>
/// The hit path takes no branch. The stub holds the second slot (if any), then
/// <c>call OUT; jmp DONE</c> where OUT is an outline chain or the fallback. With no inline slot the
/// site is a single patchable <c>call OUT</c> in the host's code.
/// </summary>
public sealed class InlineSite : Site
{
    /// <summary>Inline slots a site can have at most.</summary>
    public const int MaxInlineSlots = 2;


    private readonly CodeBlock _stub;
    private readonly List<ulong> _doneJumps = [];
    private readonly Link? _pendingLink;
    private ulong _address;
    private int _boundLength;
    private readonly int _pauses;
    private readonly RestartableSequences? _rseq;
    private readonly ulong[] _descriptors = [];
    private readonly ulong[] _aborts = [];

    /// <summary>One abort handler: the rseq signature, <c>jmp arm</c>, int3 padding.</summary>
    private const int AbortLength = 16;
    private Assembler? _emittedInto;

    internal InlineSite(OptpolineEngine engine, Register register, int inlineSlots, string name)
        : base(engine, register, inlineSlots, name)
    {
        _pauses = engine.Options.SlotWindowPauses;
        _rseq = engine.Rseq;
        Tail = engine.LearningTail(register, byKey: false) ?? engine.GetFallback(register);
        if (inlineSlots == 0)
        {
            return;
        }

        // Stub: [arm 1 | slot 1: jmp MISS1+int3 | cmp | jne MISS1 | call MISS1 | jmp DONE] MISS1: call OUT | jmp DONE,
        // then, with rseq, one 16-byte abort handler per slot: the rseq signature, then jmp to the slot's arm.
        // The jmp DONE fields (and slot 0's abort jump) are int3 until the site is bound and DONE is known.
        var slotBlock = (inlineSlots - 1) * (ArmLength + SlotLength + X64.Rel32Length);
        var abortsAt = _rseq is null ? 0 : (slotBlock + (2 * X64.Rel32Length) + 15) & ~15;
        var length = _rseq is null ? slotBlock + (2 * X64.Rel32Length) : abortsAt + (inlineSlots * AbortLength);
        _stub = engine.Code.Allocate(length, 16);
        var at = _stub.Address;
        var code = new List<Instruction>();
        var lastMiss = at + (ulong)slotBlock;
        _aborts = _rseq is null ? [] : [.. Enumerable.Range(0, inlineSlots).Select(i => at + (ulong)(abortsAt + (i * AbortLength) + 4))];
        if (_rseq is not null)
        {
            _descriptors = [.. Enumerable.Range(0, inlineSlots).Select(_ => _rseq.ReserveDescriptor())];
        }

        if (inlineSlots == 2)
        {
            var start = at + (ulong)ArmLength;
            if (_rseq is not null)
            {
                code.Add(_rseq.Arm(_descriptors[1]));
            }

            code.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, lastMiss));
            AddInt3(code, X64.MovAbsLength - X64.Rel32Length);
            code.Add(Instruction.Create(Code.Cmp_rm64_r64, register, Register.R11));
            code.Add(Instruction.CreateBranch(Code.Jne_rel32_64, lastMiss));
            AddPauses(code);
            code.Add(Instruction.CreateBranch(Code.Call_rel32_64, lastMiss));
            AddInt3(code, X64.Rel32Length);
            var call = start + (ulong)(SlotLength - X64.Rel32Length);
            Slots.Add(new Slot(start, call, lastMiss, lastMiss, call - (ulong)WindowPadding, at, _rseq is null ? 0 : _aborts[1]));
            _doneJumps.Add(start + (ulong)SlotLength);
            if (_rseq is not null)
            {
                RestartableSequences.Describe(_descriptors[1], start + X64.MovAbsLength, call + X64.Rel32Length, _aborts[1]);
            }
        }

        code.Add(Instruction.CreateBranch(Code.Call_rel32_64, Tail));
        AddInt3(code, X64.Rel32Length);
        _doneJumps.Add(lastMiss + X64.Rel32Length);
        if (_rseq is not null)
        {
            AddInt3(code, abortsAt - (slotBlock + (2 * X64.Rel32Length)));
            for (var i = 0; i < inlineSlots; i++)
            {
                code.Add(Instruction.CreateDeclareDword(RestartableSequences.Signature));
                if (i == 1)
                {
                    code.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, at));
                }
                else
                {
                    AddInt3(code, X64.Rel32Length);   // jmp to slot 0's arm, written when the site is bound
                }

                AddInt3(code, AbortLength - 4 - X64.Rel32Length);
            }
        }

        X64.Encode(at, code).CopyTo(_stub.GetWritableSpan());
        _pendingLink = new Link(lastMiss, X64.CallRel32, Tail);
        engine.Publish(_stub, $"{name}_miss");
    }

    /// <summary>Bytes of a slot's arming store (<c>mov qword fs:[rseq_cs], imm32</c>), or 0 without rseq.</summary>
    private int ArmLength => _rseq is null ? 0 : RestartableSequences.ArmLength;

    /// <inheritdoc/>
    public override SiteKind Kind => SiteKind.Inline;

    private int SlotLength => X64.MovAbsLength + X64.CmpLength + X64.JccRel32Length + WindowPadding + X64.Rel32Length;

    /// <summary>Test-only bytes between a slot's <c>jne</c> and its call: the pauses, then the spin on the test flag.</summary>
    private int WindowPadding => (2 * _pauses) + (Engine.Options.SlotWindowSpinFlag != 0 ? SpinLength : 0);

    /// <summary><c>movabs r11, flag</c> (10), <c>cmp byte [r11], 0</c> (4), <c>jne</c> back to the cmp (2).</summary>
    private const int SpinLength = X64.MovAbsLength + 4 + 2;

    /// <summary>The bytes an inline site with <paramref name="inlineSlots"/> slots takes in host code (before it is bound).</summary>
    internal static int LengthFor(OptpolineEngine engine, int inlineSlots) =>
        inlineSlots == 0 ? X64.Rel32Length
        : (engine.Rseq is null ? 0 : RestartableSequences.ArmLength) + X64.MovAbsLength + X64.CmpLength + X64.JccRel32Length + X64.Rel32Length;

    /// <summary>
    /// Bytes the site occupies in the host's code: once bound, what the host's assembler produced (it
    /// may shorten the <c>jne</c>); before, what <see cref="Write"/> needs.
    /// </summary>
    public int InlineLength => _boundLength != 0 ? _boundLength : InlineSlotCount == 0 ? X64.Rel32Length : ArmLength + SlotLength;

    /// <summary>Address of the site in the host's code, once bound (0 before).</summary>
    public ulong Address => _address;

    internal override CodeBlock Stub => _stub;

    /// <summary>
    /// Emits the site at the assembler's current position. Assemble the host code with
    /// <see cref="OptpolineEngine.Assemble"/>, which places it in engine memory and binds the site.
    /// </summary>
    /// <exception cref="InvalidOperationException">The site was emitted already.</exception>
    public void Emit(Assembler assembler)
    {
        ArgumentNullException.ThrowIfNull(assembler);
        if (_emittedInto is not null || IsBound)
        {
            throw new InvalidOperationException($"Site '{Name}' was emitted already; create one site per call site.");
        }

        if (assembler.Bitness != 64)
        {
            throw new ArgumentException("Sites are x86-64 code: use a 64-bit Assembler.", nameof(assembler));
        }

        _emittedInto = assembler;
        Engine.AddPendingSite(assembler, this, assembler.Instructions.Count);
        foreach (var instruction in Template())
        {
            assembler.AddInstruction(instruction);
        }
    }

    /// <summary>
    /// Writes the site's bytes into <paramref name="block"/> at <paramref name="offset"/> (for hosts that
    /// emit raw bytes) and binds it. The block must not be running yet.
    /// </summary>
    /// <returns>The number of bytes written (<see cref="InlineLength"/>).</returns>
    /// <exception cref="ArgumentOutOfRangeException">The site does not fit at that offset.</exception>
    public int Write(CodeBlock block, int offset)
    {
        if (offset < 0 || offset > block.Size - InlineLength)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), offset, $"Site '{Name}' needs {InlineLength} bytes inside the {block.Size}-byte block.");
        }

        if (_emittedInto is not null || IsBound)
        {
            throw new InvalidOperationException($"Site '{Name}' was emitted already; create one site per call site.");
        }

        var address = block.Address + (ulong)offset;
        var bytes = X64.Encode(address, Template());
        bytes.CopyTo(block.GetWritableSpan()[offset..]);
        Bind(address, bytes);
        return bytes.Length;
    }

    /// <summary>
    /// Checks the assembled bytes at <paramref name="address"/> (the host's assembler may have chosen
    /// other encodings, or rewritten a far call to <c>call [rip+X]</c>), then writes the empty state.
    /// </summary>
    internal void Bind(ulong address, ReadOnlySpan<byte> code)
    {
        if (!Engine.Code.IsLive(address, InlineSlotCount == 0 ? X64.Rel32Length : 20))
        {
            throw new InvalidOperationException(
                $"Site '{Name}' at 0x{address:X} is not inside engine code memory; allocate host code from engine.Code so the engine can patch it.");
        }

        var decoder = Decoder.Create(64, new ByteArrayCodeReader(code.ToArray()), address);
        if (InlineSlotCount == 0)
        {
            var call = decoder.Decode();
            Expect(call.Code == Code.Call_rel32_64 && call.NearBranchTarget == Tail, call, "call rel32 to the fallback");
            OutLink = new Link(address, X64.CallRel32, Tail);
            _address = address;
            _boundLength = X64.Rel32Length;
            Engine.SiteBound(this, OutLink.Address + X64.Rel32Length);
            return;
        }

        if (_rseq is not null)
        {
            var arm = decoder.Decode();
            Expect(arm.Code == Code.Mov_rm64_imm32 && arm.MemorySegment == Register.FS && arm.MemoryDisplacement64 == (ulong)_rseq.CsFieldOffset
                && arm.Immediate32to64 == (long)_descriptors[0], arm, "mov qword fs:[rseq_cs], descriptor");
        }

        var mov = decoder.Decode();
        Expect(mov.Code == Code.Mov_r64_imm64 && mov.Op0Register == Register.R11, mov, "movabs r11, imm64");
        var cmp = decoder.Decode();
        Expect(cmp.Code == Code.Cmp_rm64_r64 && cmp.Op0Register == Register && cmp.Op1Register == Register.R11, cmp, $"cmp {Register}, r11");
        var jne = decoder.Decode();
        Expect(jne.Code is Code.Jne_rel32_64 or Code.Jne_rel8_64 && jne.NearBranchTarget == _stub.Address, jne, "jne to the site's stub");
        var callSlot = decoder.Decode();
        while (callSlot.Code == Code.Pause)
        {
            callSlot = decoder.Decode();
        }

        var landing = callSlot.IP;
        if (Engine.Options.SlotWindowSpinFlag != 0)
        {
            Expect(callSlot.Code == Code.Mov_r64_imm64 && callSlot.Immediate64 == Engine.Options.SlotWindowSpinFlag, callSlot, "movabs r11, spin flag");
            _ = decoder.Decode();
            _ = decoder.Decode();
            callSlot = decoder.Decode();
        }

        Expect(callSlot.Code == Code.Call_rel32_64, callSlot, "call rel32");

        var done = callSlot.NextIP;
        var start = mov.IP;
        var slot0 = new Slot(start, callSlot.IP, _stub.Address, callSlot.NearBranchTarget, landing - (ulong)(2 * _pauses), address, _rseq is null ? 0 : _aborts[0]);
        var patches = new List<Patcher.CodePatch>
        {
            new(start, code[ArmLength..(ArmLength + X64.MovAbsLength)].ToArray(), X64.EmptySlot(start, _stub.Address)),
        };
        if (_rseq is not null)
        {
            // The window: from the compare (past the movabs, the instruction a trap at the slot's start
            // stops at) to the end of the call; a thread inside it restarts at the arm.
            RestartableSequences.Describe(_descriptors[0], cmp.IP, callSlot.NextIP, _aborts[0]);
            patches.Add(new Patcher.CodePatch(_aborts[0], Int3s(X64.Rel32Length), X64.Rel32(X64.JmpRel32, _aborts[0], address)));
        }
        foreach (var jump in _doneJumps)
        {
            patches.Add(new Patcher.CodePatch(jump, Int3s(X64.Rel32Length), X64.Rel32(X64.JmpRel32, jump, done)));
        }

        // Not yet published: the host runs this code only after Assemble/Write returns.
        Engine.ApplyUnpublished(patches);
        Slots.Insert(0, slot0);
        OutLink = _pendingLink;
        _address = address;
        _boundLength = (int)(done - address);
        Engine.SiteBound(this, OutLink!.Address + X64.Rel32Length);

        // A direct first slot (megamorphic sites) calls the sampling stub from the host code itself.
        Engine.AddSampleKey(this, slot0.Call + X64.Rel32Length);
    }

    private static byte[] Int3s(int count) => Enumerable.Repeat(X64.Int3, count).ToArray();

    private void AddPauses(List<Instruction> code)
    {
        for (var i = 0; i < _pauses; i++)
        {
            code.Add(Instruction.Create(Code.Pause));
        }

        if (Engine.Options.SlotWindowSpinFlag is not 0 and var flag)
        {
            code.Add(Instruction.Create(Code.Mov_r64_imm64, Register.R11, flag));
            code.Add(Instruction.CreateDeclareByte(0x41, 0x80, 0x3B, 0x00, 0x75, 0xFA));   // L: cmp byte [r11], 0; jne L
        }
    }

    private static void AddInt3(List<Instruction> code, int count)
    {
        for (var i = 0; i < count; i++)
        {
            code.Add(Instruction.Create(Code.Int3));
        }
    }

    private void Expect(bool ok, in Instruction found, string wanted)
    {
        if (!ok)
        {
            throw new InvalidOperationException(
                $"Site '{Name}': expected '{wanted}' at 0x{found.IP:X} but found '{found}'. The site's bytes were changed after Emit " +
                "(a far call becomes call [rip+X]); assemble with OptpolineEngine.Assemble into engine memory.");
        }
    }

    private List<Instruction> Template()
    {
        if (InlineSlotCount == 0)
        {
            return [Instruction.CreateBranch(Code.Call_rel32_64, Tail)];
        }

        // The call's placeholder target is the stub: near, and dead while the slot is empty.
        var code = new List<Instruction>();
        if (_rseq is not null)
        {
            code.Add(_rseq.Arm(_descriptors[0]));
        }

        code.AddRange(new[]
        {
            Instruction.Create(Code.Mov_r64_imm64, Register.R11, 0UL),
            Instruction.Create(Code.Cmp_rm64_r64, Register, Register.R11),
            Instruction.CreateBranch(Code.Jne_rel32_64, _stub.Address),
        });
        AddPauses(code);
        code.Add(Instruction.CreateBranch(Code.Call_rel32_64, _stub.Address));
        return code;
    }
}
