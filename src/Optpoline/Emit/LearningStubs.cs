using Iced.Intel;
using Optpoline.Learning;
using Optpoline.Memory;

namespace Optpoline.Emit;

/// <summary>
/// The sampling stubs a learning site falls back through, one pair per register. Each behaves as the
/// register's fallback thunk (it ends with <c>jmp thunk</c>) and, on 1 call in N per CPU, stores
/// <c>(key, R)</c> into the CPU's ring of the <see cref="SampleBuffer"/>. The key is the return address at
/// <c>[rsp]</c> (the site's unique miss-path call) or, for outline-only sites, r11 (loaded by the site).
/// Only r11 and flags are clobbered; two scratch registers are saved on the stack.
/// </summary>
/// <remarks>
/// <code>
/// push s1; push s2
/// mov s1d, fs:[rseq.cpu_id]        ; xor s1d, s1d without rseq: every thread shares ring 0
/// and s1d, rings-1; imul s1, s1, stride; movabs s2, base; add s1, s2
/// dec dword [s1+countdown]; jnz skip
/// imul s2d, [s1+rng], 1664525; add s2d, 1013904223; mov [s1+rng], s2d       ; jittered reload
/// shr s2d, 16; and s2d, [s1+mask]; add s2d, [s1+base]; mov [s1+countdown], s2d
/// mov s2, [s1+written]; and s2d, capacity-1; shl s2, 4; lea s2, [s1+s2+64]
/// mov r11, [rsp+16]                ; by-return-address stubs only
/// mov [s2], r11; mov [s2+8], R; inc qword [s1+written]
/// skip: pop s2; pop s1; jmp thunk_R
/// </code>
/// </remarks>
internal sealed class LearningStubs
{
    private readonly Dictionary<(Register, bool), ulong> _entries = [];

    public LearningStubs(CodeMemory memory, SampleBuffer samples, Func<Register, ulong> thunk, long? rseqCpuId)
    {
        const int Stride = 128;
        Block = memory.Allocate(SiteRegisters.All.Count * 2 * Stride, 64);
        var code = Block.GetWritableSpan();
        var at = Block.Address;
        foreach (var register in SiteRegisters.All)
        {
            foreach (var byKey in new[] { false, true })
            {
                var bytes = X64.Encode(at, Build(register, byKey, samples, thunk(register), rseqCpuId, at));
                if (bytes.Length > Stride)
                {
                    throw new InvalidOperationException($"Internal error: learning stub for {register} is {bytes.Length} bytes.");
                }

                bytes.CopyTo(code[(int)(at - Block.Address)..]);
                _entries[(register, byKey)] = at;
                at += Stride;
            }
        }
    }

    public CodeBlock Block { get; }

    /// <summary>The stub keyed by the return address at [rsp] (inline sites: their miss path calls it).</summary>
    public ulong ByReturnAddress(Register register) => _entries[(register, false)];

    /// <summary>The stub keyed by r11 (outline-only sites load their key first).</summary>
    public ulong ByKey(Register register) => _entries[(register, true)];

    private static List<Instruction> Build(Register r, bool byKey, SampleBuffer samples, ulong thunk, long? rseqCpuId, ulong at)
    {
        var scratch = new[] { Register.RAX, Register.RCX, Register.RDX }.Where(s => s != r).Take(2).ToArray();
        var (s1, s2) = (scratch[0], scratch[1]);
        var (s1d, s2d) = (Low32(s1), Low32(s2));
        var body = new List<Instruction>
        {
            Instruction.Create(Code.Push_r64, s1),
            Instruction.Create(Code.Push_r64, s2),
            rseqCpuId is { } offset
                ? Instruction.Create(Code.Mov_r32_rm32, s1d, new MemoryOperand(Register.None, Register.None, 1, offset, 4, false, Register.FS))
                : Instruction.Create(Code.Xor_r32_rm32, s1d, s1d),
            Instruction.Create(Code.And_rm32_imm32, s1d, samples.Rings - 1),
            Instruction.Create(Code.Imul_r64_rm64_imm32, s1, s1, samples.Stride),
            Instruction.Create(Code.Mov_r64_imm64, s2, samples.Base),
            Instruction.Create(Code.Add_r64_rm64, s1, s2),
            Instruction.Create(Code.Dec_rm32, new MemoryOperand(s1, SampleBuffer.CountdownOffset, 1)),
        };

        // The skip branch target is computed from the encoded length of what follows, so encode the tail first.
        var sample = new List<Instruction>
        {
            // Reload the countdown with jitter: rng = rng * 1664525 + 1013904223; countdown = base + ((rng >> 16) & mask).
            Instruction.Create(Code.Imul_r32_rm32_imm32, s2d, new MemoryOperand(s1, SampleBuffer.RngOffset, 1), 1664525),
            Instruction.Create(Code.Add_rm32_imm32, s2d, 1013904223),
            Instruction.Create(Code.Mov_rm32_r32, new MemoryOperand(s1, SampleBuffer.RngOffset, 1), s2d),
            Instruction.Create(Code.Shr_rm32_imm8, s2d, 16),
            Instruction.Create(Code.And_r32_rm32, s2d, new MemoryOperand(s1, SampleBuffer.JitterMaskOffset, 1)),
            Instruction.Create(Code.Add_r32_rm32, s2d, new MemoryOperand(s1, SampleBuffer.ReloadBaseOffset, 1)),
            Instruction.Create(Code.Mov_rm32_r32, new MemoryOperand(s1, SampleBuffer.CountdownOffset, 1), s2d),
            Instruction.Create(Code.Mov_r64_rm64, s2, new MemoryOperand(s1, (long)SampleBuffer.WrittenOffset, 1)),
            Instruction.Create(Code.And_rm32_imm32, s2d, samples.Capacity - 1),
            Instruction.Create(Code.Shl_rm64_imm8, s2, 4),
            Instruction.Create(Code.Lea_r64_m, s2, new MemoryOperand(s1, s2, 1, SampleBuffer.HeaderSize, 1)),
        };
        if (!byKey)
        {
            sample.Add(Instruction.Create(Code.Mov_r64_rm64, Register.R11, new MemoryOperand(Register.RSP, 16, 1)));
        }

        sample.Add(Instruction.Create(Code.Mov_rm64_r64, new MemoryOperand(s2), Register.R11));
        sample.Add(Instruction.Create(Code.Mov_rm64_r64, new MemoryOperand(s2, 8, 1), r));
        sample.Add(Instruction.Create(Code.Inc_rm64, new MemoryOperand(s1, (long)SampleBuffer.WrittenOffset, 1)));

        var headLength = X64.Encode(at, body).Length;
        var sampleLength = X64.Encode(at, sample).Length;
        var skip = at + (ulong)(headLength + X64.JccRel32Length + sampleLength);
        body.Add(Instruction.CreateBranch(Code.Jne_rel32_64, skip));
        body.AddRange(sample);
        body.Add(Instruction.Create(Code.Pop_r64, s2));
        body.Add(Instruction.Create(Code.Pop_r64, s1));
        body.Add(Instruction.CreateBranch(Code.Jmp_rel32_64, thunk));
        return body;
    }

    private static Register Low32(Register r) => r switch
    {
        Register.RAX => Register.EAX,
        Register.RCX => Register.ECX,
        _ => Register.EDX,
    };
}
