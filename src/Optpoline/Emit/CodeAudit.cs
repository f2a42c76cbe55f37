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
    public static IReadOnlyList<string> Check(ReadOnlySpan<byte> code, ulong address, bool allowIndirect = false)
    {
        var problems = new List<string>();
        var decoder = Decoder.Create(64, new ByteArrayCodeReader(code.ToArray()), address);
        var end = address + (ulong)code.Length;
        while (decoder.IP < end)
        {
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
