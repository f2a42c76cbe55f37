using Iced.Intel;

namespace Optpoline.Emit;

/// <summary>
/// Decodes machine code and reports what a site must never contain: undecodable bytes, indirect
/// calls or jumps (including <c>call [rip+X]</c>, which Iced emits silently for far targets), and
/// instructions that run past the end of the range.
/// </summary>
public static class CodeAudit
{
    /// <summary>
    /// Decodes <paramref name="code"/> (placed at <paramref name="address"/>) linearly and returns one
    /// line per problem; empty when the code is clean.
    /// </summary>
    /// <param name="code">The bytes.</param>
    /// <param name="address">Where they execute.</param>
    /// <param name="allowIndirect">True only for fallback thunks, whose whole purpose is the one indirect branch.</param>
    public static IReadOnlyList<string> Check(ReadOnlySpan<byte> code, ulong address, bool allowIndirect = false) =>
        Check(code, address, allowIndirect, []);

    /// <summary>
    /// As <see cref="Check(ReadOnlySpan{byte}, ulong, bool)"/>, where the 4 bytes at each address of
    /// <paramref name="rseqSignatures"/> are the rseq signature before an abort handler (data, never
    /// executed) and must hold exactly that.
    /// </summary>
    internal static IReadOnlyList<string> Check(ReadOnlySpan<byte> code, ulong address, bool allowIndirect, IReadOnlyCollection<ulong> rseqSignatures)
    {
        var problems = new List<string>();
        var reader = new ByteArrayCodeReader(code.ToArray());
        var decoder = Decoder.Create(64, reader, address);
        var end = address + (ulong)code.Length;
        while (decoder.IP < end)
        {
            if (rseqSignatures.Contains(decoder.IP))
            {
                var at = (int)(decoder.IP - address);
                if (at + 4 > code.Length || BitConverter.ToUInt32(code[at..(at + 4)]) != Patcher.RestartableSequences.Signature)
                {
                    problems.Add($"0x{decoder.IP:X}: the rseq signature before an abort handler is damaged");
                    break;
                }

                reader.Position = at + 4;
                decoder.IP += 4;
                continue;
            }

            decoder.Decode(out var instruction);
            if (instruction.IsInvalid)
            {
                problems.Add($"0x{instruction.IP:X}: undecodable bytes");
                break;
            }

            if (instruction.NextIP > end)
            {
                problems.Add($"0x{instruction.IP:X}: {instruction} runs past the end of the code (0x{end:X})");
                break;
            }

            var flow = instruction.FlowControl;
            if (!allowIndirect && flow is FlowControl.IndirectBranch or FlowControl.IndirectCall)
            {
                problems.Add($"0x{instruction.IP:X}: indirect branch '{instruction}'");
            }
        }

        return problems;
    }
}
