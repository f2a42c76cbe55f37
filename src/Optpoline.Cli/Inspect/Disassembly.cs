using Iced.Intel;

namespace Optpoline.Cli.Inspect;

/// <summary>Iced disassembly of bytes read from the target, branch targets named.</summary>
internal static class Disassembly
{
    public static List<string> Lines(byte[] bytes, ulong address, TargetSymbols symbols)
    {
        var formatter = new IntelFormatter(new Resolver(symbols));
        formatter.Options.FirstOperandCharIndex = 8;
        var decoder = Decoder.Create(64, new ByteArrayCodeReader(bytes), address);
        var output = new StringOutput();
        var lines = new List<string>();
        var end = address + (ulong)bytes.Length;
        while (decoder.IP < end)
        {
            var instruction = decoder.Decode();
            if (instruction.Code == Code.Int3)
            {
                // A run of int3 (unused bytes) is one line.
                var run = 1;
                while (decoder.IP < end && bytes[(int)(decoder.IP - address)] == 0xCC)
                {
                    decoder.Decode();
                    run++;
                }

                lines.Add($"{instruction.IP:X16}  {"cc",-24} int3{(run > 1 ? $" (x{run})" : "")}");
                continue;
            }

            formatter.Format(instruction, output);
            var raw = bytes.AsSpan((int)(instruction.IP - address), Math.Min(instruction.Length, (int)(end - instruction.IP)));
            lines.Add($"{instruction.IP:X16}  {Convert.ToHexString(raw).ToLowerInvariant(),-24} {output.ToStringAndReset()}");
        }

        return lines;
    }

    private sealed class Resolver(TargetSymbols symbols) : ISymbolResolver
    {
        public bool TryGetSymbol(in Instruction instruction, int operand, int instructionOperand, ulong address, int addressSize, out SymbolResult symbol)
        {
            // Branch targets, and a slot's compared target (movabs r11, T).
            var named = instruction.FlowControl is FlowControl.Call or FlowControl.UnconditionalBranch or FlowControl.ConditionalBranch
                ? instruction.NearBranchTarget == address
                : instruction.Code == Code.Mov_r64_imm64 && instruction.GetImmediate(1) == address;
            if (named && symbols.Name(address) is { } name)
            {
                symbol = new SymbolResult(address, name);
                return true;
            }

            symbol = default;
            return false;
        }
    }
}
