using Iced.Intel;

namespace Optpoline.Emit;

/// <summary>Byte-level facts and encoders for the few x86-64 forms the engine patches.</summary>
internal static class X64
{
    public const byte Int3 = 0xCC;
    public const byte CallRel32 = 0xE8;
    public const byte JmpRel32 = 0xE9;

    /// <summary><c>movabs r11, imm64</c>: REX.W+B, B8+3, imm64.</summary>
    public const int MovAbsLength = 10;

    /// <summary><c>cmp r64, r11</c>: REX, 39 /r.</summary>
    public const int CmpLength = 3;

    /// <summary><c>jcc rel32</c>: 0F 8x rel32.</summary>
    public const int JccRel32Length = 6;

    /// <summary><c>call rel32</c> / <c>jmp rel32</c>.</summary>
    public const int Rel32Length = 5;

    /// <summary>Whether a rel32 branch whose next instruction starts at <paramref name="next"/> reaches <paramref name="target"/>.</summary>
    public static bool TryRel32(ulong next, ulong target, out int displacement)
    {
        var delta = (long)(target - next);
        displacement = (int)delta;
        return delta is >= int.MinValue and <= int.MaxValue;
    }

    /// <summary>Whether a 5-byte rel32 call or jmp at <paramref name="at"/> reaches <paramref name="target"/>.</summary>
    public static bool Reaches(ulong at, ulong target) => TryRel32(at + Rel32Length, target, out _);

    /// <summary>Encodes <c>opcode rel32</c> at <paramref name="at"/>; the caller has checked reach.</summary>
    public static byte[] Rel32(byte opcode, ulong at, ulong target)
    {
        if (!TryRel32(at + Rel32Length, target, out var displacement))
        {
            throw new InvalidOperationException($"Internal error: 0x{target:X} is out of rel32 reach of 0x{at:X}.");
        }

        var bytes = new byte[Rel32Length];
        bytes[0] = opcode;
        BitConverter.TryWriteBytes(bytes.AsSpan(1), displacement);
        return bytes;
    }

    /// <summary><c>movabs r11, value</c>.</summary>
    public static byte[] MovR11(ulong value)
    {
        var bytes = new byte[MovAbsLength];
        bytes[0] = 0x49;
        bytes[1] = 0xBB;
        BitConverter.TryWriteBytes(bytes.AsSpan(2), value);
        return bytes;
    }

    /// <summary>
    /// A direct slot's first bytes: <c>jmp short landing</c> (over the compare, to the slot's own call,
    /// which then goes to the fallback thunk) then int3 over the rest of the movabs.
    /// </summary>
    public static byte[] DirectSlot(ulong at, ulong landing)
    {
        var distance = (long)landing - (long)(at + 2);
        if (distance is < MovAbsLength - 2 or > 127)
        {
            throw new ArgumentOutOfRangeException(nameof(landing), $"0x{landing:X} is not past the movabs and within a short jump of 0x{at:X}.");
        }

        var bytes = new byte[MovAbsLength];
        bytes[0] = 0xEB;
        bytes[1] = (byte)distance;
        bytes.AsSpan(2).Fill(Int3);
        return bytes;
    }

    /// <summary>An empty slot's first bytes: <c>jmp miss</c> then int3 over the rest of the movabs.</summary>
    public static byte[] EmptySlot(ulong at, ulong miss)
    {
        var bytes = new byte[MovAbsLength];
        Rel32(JmpRel32, at, miss).CopyTo(bytes, 0);
        bytes.AsSpan(Rel32Length).Fill(Int3);
        return bytes;
    }

    /// <summary>
    /// Encodes instructions at <paramref name="rip"/> exactly as given: no branch is shortened, and a
    /// branch out of reach is an error, never a silent <c>call [rip+X]</c>.
    /// </summary>
    public static byte[] Encode(ulong rip, IList<Instruction> instructions)
    {
        var writer = new ArrayCodeWriter();
        var block = new InstructionBlock(writer, instructions, rip);
        if (!BlockEncoder.TryEncode(64, block, out var error, out _, BlockEncoderOptions.DontFixBranches))
        {
            throw new InvalidOperationException($"Internal error: encoding engine code at 0x{rip:X} failed: {error}");
        }

        return writer.ToArray();
    }
}
