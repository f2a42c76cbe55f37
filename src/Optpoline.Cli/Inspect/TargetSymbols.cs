using System.Globalization;
using Microsoft.Diagnostics.Runtime;

namespace Optpoline.Cli.Inspect;

/// <summary>
/// Names addresses of the inspected process: the engine's own names for code it allocated (published
/// blocks), ClrMD's method lookup for managed code, and ELF symbols (.symtab, else .dynsym) of the
/// native module the address falls in, read from the module's file.
/// </summary>
internal sealed class TargetSymbols(DataTarget target, ClrRuntime runtime)
{
    private readonly List<(ulong Start, ulong End, string Name)> _blocks = [];
    private readonly Dictionary<string, ElfSymbols?> _elf = [];
    private List<ModuleInfo>? _modules;

    public void AddEngineBlock(ulong address, int size, string name) => _blocks.Add((address, address + (ulong)size, name));

    /// <summary>NAME or NAME+0xOFFSET, or null when nothing names the address.</summary>
    public string? Name(ulong address)
    {
        foreach (var (start, end, name) in _blocks)
        {
            if (address >= start && address < end)
            {
                return WithOffset(name, address - start);
            }
        }

        if (runtime.GetMethodByInstructionPointer(address) is { } method)
        {
            return WithOffset(method.Signature ?? method.Name ?? "managed method", address - method.NativeCode);
        }

        _modules ??= [.. target.EnumerateModules()];
        foreach (var module in _modules)
        {
            if (address < module.ImageBase || address >= module.ImageBase + (ulong)module.ImageSize || string.IsNullOrEmpty(module.FileName))
            {
                continue;
            }

            if (!_elf.TryGetValue(module.FileName, out var symbols))
            {
                symbols = ElfSymbols.TryRead(module.FileName);
                _elf[module.FileName] = symbols;
            }

            var file = Path.GetFileName(module.FileName);
            return symbols?.Find(address - module.ImageBase + symbols.FirstLoadAddress) is { } symbol
                ? $"{file}!{WithOffset(symbol.Name, symbol.Offset)}"
                : $"{file}+0x{address - module.ImageBase:x}";
        }

        return null;
    }

    private static string WithOffset(string name, ulong offset) =>
        offset == 0 ? name : string.Create(CultureInfo.InvariantCulture, $"{name}+0x{offset:x}");
}
