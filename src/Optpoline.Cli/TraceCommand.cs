using System.Globalization;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Cli;

/// <summary><c>optpoline trace</c>: list, show and verify a trace directory written by an engine.</summary>
internal static class TraceCommand
{
    public static int Run(string[] args, TextWriter output, TextWriter error)
    {
        if (args.Length < 2)
        {
            return Program.Fail(error, "trace needs a sub-verb (list, show, verify) and a trace directory.");
        }

        TraceReplay replay;
        try
        {
            replay = TraceReplay.Open(args[1]);
        }
        catch (Exception e) when (e is TraceFormatException or IOException or UnauthorizedAccessException)
        {
            error.WriteLine($"optpoline: {e.Message}");
            return ExitCodes.BadTrace;
        }

        foreach (var warning in replay.Warnings)
        {
            error.WriteLine($"warning: {warning}");
        }

        try
        {
            return args[0] switch
            {
                "list" when args.Length == 2 => List(replay, output),
                "show" => Show(replay, args[2..], output, error),
                "verify" when args.Length == 2 => Verify(replay, output),
                _ => Program.Fail(error, $"trace {args[0]}: unknown sub-verb or wrong arguments."),
            };
        }
        catch (ArgumentException e)
        {
            error.WriteLine($"optpoline: {e.Message}");
            return ExitCodes.Usage;
        }
    }

    private static int List(TraceReplay replay, TextWriter output)
    {
        output.WriteLine($"trace {replay.Directory}: pid {replay.Start.Pid}, start {replay.Start.Time}, " +
                         (replay.End is { } end ? $"end {end.Time} (+{(end.Time - replay.Start.Time) / 1e6:F3} ms)" : "no end image"));
        foreach (var (start, size) in replay.Regions)
        {
            var committed = replay.Start.Regions.FirstOrDefault(r => r.Start == start)?.Bytes.Length;
            output.WriteLine($"region 0x{start:x} +0x{size:x}" + (committed is { } c ? $" ({c} bytes in the start image)" : " (reserved while tracing)"));
        }

        output.WriteLine($"{replay.Changes.Count} changes:");
        for (var i = 0; i < replay.Changes.Count; i++)
        {
            output.WriteLine($"#{i,-6} {replay.Describe(replay.Changes[i])}");
        }

        return ExitCodes.Ok;
    }

    private static int Show(TraceReplay replay, string[] args, TextWriter output, TextWriter error)
    {
        if (args.Length == 0)
        {
            return Program.Fail(error, "trace show needs WHERE (0xADDRESS[:LENGTH] or a block name).");
        }

        var time = replay.LastTime;
        var backward = false;
        for (var i = 1; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--at" when i + 1 < args.Length:
                    time = ParseTime(replay, args[++i]);
                    break;
                case "--backward":
                    backward = true;
                    break;
                default:
                    return Program.Fail(error, $"trace show: unexpected argument '{args[i]}'.");
            }
        }

        var (address, length) = ParseWhere(replay, args[0], time);
        var bytes = backward ? replay.ReadBackward(address, length, time) : replay.ReadForward(address, length, time);
        output.WriteLine($"0x{address:x} +{length} at {time} (+{((double)time - replay.Start.Time) / 1e6:F3} ms), {(backward ? "backwards from the end image" : "forwards from the start image")}" +
                         (replay.NameAt(address, time) is { } name ? $", in {name}" : string.Empty));
        foreach (var line in TraceReplay.Disassemble(address, bytes))
        {
            output.WriteLine(line);
        }

        return ExitCodes.Ok;
    }

    private static int Verify(TraceReplay replay, TextWriter output)
    {
        var mismatches = replay.Verify();
        foreach (var mismatch in mismatches)
        {
            output.WriteLine($"mismatch 0x{mismatch.Address:x} +{mismatch.Length}: {mismatch.What}");
        }

        output.WriteLine(mismatches.Count == 0
            ? $"ok: {replay.Changes.Count} changes replay consistently" + (replay.End is null ? " (no end image to compare with)" : " and end at the end image")
            : $"{mismatches.Count} mismatches: code changed without a record");
        return mismatches.Count == 0 ? ExitCodes.Ok : ExitCodes.Mismatch;
    }

    internal static ulong ParseTime(TraceReplay replay, string text)
    {
        switch (text)
        {
            case "start":
                return replay.Start.Time;
            case "end":
                return replay.LastTime;
        }

        if (text.StartsWith('#'))
        {
            if (int.TryParse(text[1..], NumberStyles.None, CultureInfo.InvariantCulture, out var index) && index < replay.Changes.Count)
            {
                return replay.Changes[index].Time;
            }

            throw new ArgumentException($"'{text}': there are changes #0 to #{replay.Changes.Count - 1}.");
        }

        if (text.StartsWith('+'))
        {
            var units = new (string Suffix, double Scale)[] { ("ns", 1), ("us", 1e3), ("ms", 1e6), ("s", 1e9) };
            foreach (var (suffix, scale) in units)
            {
                if (text.EndsWith(suffix, StringComparison.Ordinal) && double.TryParse(text[1..^suffix.Length], NumberStyles.Float, CultureInfo.InvariantCulture, out var value) && value >= 0)
                {
                    return replay.Start.Time + (ulong)(value * scale);
                }
            }

            throw new ArgumentException($"'{text}': a relative time is +N with a unit of ns, us, ms or s.");
        }

        if (ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var absolute))
        {
            return absolute;
        }

        throw new ArgumentException($"'{text}' is not a time: use start, end, nanoseconds, +N[ns|us|ms|s] or #K.");
    }

    internal static (ulong Address, int Length) ParseWhere(TraceReplay replay, string text, ulong time)
    {
        if (text.StartsWith("0x", StringComparison.OrdinalIgnoreCase))
        {
            var parts = text.Split(':');
            if (parts.Length <= 2 && ulong.TryParse(parts[0][2..], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var address))
            {
                var length = 64;
                if (parts.Length == 2 && !TryParseLength(parts[1], out length))
                {
                    throw new ArgumentException($"'{parts[1]}' is not a length (decimal or 0x hex, at least 1).");
                }

                return (address, length);
            }

            throw new ArgumentException($"'{text}' is not 0xADDRESS[:LENGTH].");
        }

        var load = replay.JitLoads.LastOrDefault(l => l.Name == text && l.Time <= time) ?? replay.JitLoads.FirstOrDefault(l => l.Name == text);
        return load is null
            ? throw new ArgumentException($"no block named '{text}' in the jitdump" + (replay.JitLoads.Count == 0 ? " (the trace has none)." : "."))
            : (load.Address, load.Code.Length);
    }

    private static bool TryParseLength(string text, out int length) =>
        (text.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? int.TryParse(text[2..], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out length)
            : int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out length)) && length > 0;
}
