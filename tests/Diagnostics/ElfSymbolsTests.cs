using System.Globalization;
using System.Runtime.InteropServices;
using Optpoline.Cli.Inspect;

namespace Optpoline.Tests.Diagnostics;

/// <summary>inspect names native code by the ELF symbols of its module: checked on this process's libc.</summary>
public sealed class ElfSymbolsTests
{
    [Test]
    public void A_libc_function_is_found_by_its_address_and_junk_is_refused()
    {
        var maps = File.ReadAllLines("/proc/self/maps").Select(l => l.Split(' ', 6, StringSplitOptions.RemoveEmptyEntries)).Where(p => p.Length == 6).ToList();
        var libc = maps.Select(p => p[5].Trim()).First(p => Path.GetFileName(p).StartsWith("libc.so", StringComparison.Ordinal));
        var imageBase = maps.Where(p => p[5].Trim() == libc).Min(p => ulong.Parse(p[0].Split('-')[0], NumberStyles.HexNumber, CultureInfo.InvariantCulture));
        var getpid = (ulong)NativeLibrary.GetExport(NativeLibrary.Load(libc), "getpid");

        var symbols = ElfSymbols.TryRead(libc);
        Assert.That(symbols, Is.Not.Null);
        var found = symbols!.Find(getpid - imageBase + symbols.FirstLoadAddress);
        Assert.That(found, Is.Not.Null);
        Assert.That(found!.Value.Name, Does.Contain("getpid"));
        Assert.That(found.Value.Offset, Is.Zero);
        Assert.That(symbols.Find(getpid - imageBase + symbols.FirstLoadAddress + 2)!.Value.Offset, Is.EqualTo(2UL));

        var junk = Path.GetTempFileName();
        try
        {
            File.WriteAllBytes(junk, [0x7F, (byte)'E', (byte)'L', (byte)'F', 2, 1, 1, 0, 0, 0]);
            Assert.That(ElfSymbols.TryRead(junk), Is.Null, "a truncated ELF header");
            Assert.That(ElfSymbols.TryRead("/no/such/file"), Is.Null);
        }
        finally
        {
            File.Delete(junk);
        }
    }
}
