namespace Optpoline.Tests.Support;

/// <summary>Reads this process's mappings for W^X assertions.</summary>
internal static class ProcSelfMaps
{
    public static IReadOnlyList<string> WritableAndExecutable() =>
        File.ReadAllLines("/proc/self/maps")
            .Where(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries) is [_, var perms, ..] && perms.Contains('w', StringComparison.Ordinal) && perms.Contains('x', StringComparison.Ordinal))
            .ToList();

    public static string? PermissionsAt(ulong address)
    {
        foreach (var line in File.ReadLines("/proc/self/maps"))
        {
            var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            var range = parts[0].Split('-');
            var start = Convert.ToUInt64(range[0], 16);
            var end = Convert.ToUInt64(range[1], 16);
            if (address >= start && address < end)
            {
                return parts[1];
            }
        }

        return null;
    }
}
