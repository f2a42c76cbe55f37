namespace Optpoline.Cli;

/// <summary>The <c>optpoline</c> command: one verb per job.</summary>
internal static class Program
{
    internal const string Usage = """
        usage: optpoline <verb> ...

          run [--seconds N] [--threads N] [--sites N] [--config FILE] [--trace DIR | --no-trace] [--promotion-off]
              [--inline-slots 0..2] [--save-profile FILE]
                                                 a JIT-like VM with 1000 virtual-call sites on several threads,
                                                 through four phases, against its retpoline twin; 40 s

          trace list   DIR                       the regions and every change, in time order
          trace show   DIR WHERE [--at TIME] [--backward]
                                                 the bytes of WHERE at TIME, disassembled
          trace verify DIR                       replay forwards and backwards and check them against
                                                 each other and the end image

          inspect --pid N | --dump FILE [--json] [--no-code]
                                                 the engines in a live .NET host or its dump (ClrMD): every site,
                                                 its state, targets by name, and its current code disassembled

          scan ASSEMBLY... [--merge CONFIG]      [PromoteCalls] / [NeverPromote] members (read from metadata,
                                                 nothing loaded) as sites.include / sites.exclude patterns;
                                                 --merge adds them to a config file, keeping the rest of it

          profile merge -o OUT IN...              add up saved profiles (of several runs or machines)
          profile show  FILE                     every site's targets, hottest first

        WHERE: 0xADDRESS[:LENGTH] (LENGTH decimal or 0x hex; default 64) or a block name from the jitdump
        TIME:  start | end | NANOSECONDS (CLOCK_MONOTONIC) | +N[ns|us|ms|s] from the start | #K (the time of change K)
        exit:  0 done, 1 wrong results or a trace that does not replay, 2 usage, 3 unreadable trace,
               4 unreadable input (profile, assembly, config), 5 no such process or dump, or no engine in it
        """;

    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    internal static int Run(string[] args, TextWriter output, TextWriter error)
    {
        if (args.Length == 0 || args[0] is "-h" or "--help" or "help")
        {
            output.WriteLine(Usage);
            return args.Length == 0 ? ExitCodes.Usage : ExitCodes.Ok;
        }

        return args[0] switch
        {
            "trace" => TraceCommand.Run(args[1..], output, error),
            "run" => RunCommand.Run(args[1..], output, error),
            "profile" => ProfileCommand.Run(args[1..], output, error),
            "scan" => ScanCommand.Run(args[1..], output, error),
            "inspect" => InspectCommand.Run(args[1..], output, error),
            _ => Fail(error, $"unknown verb '{args[0]}'."),
        };
    }

    internal static int Fail(TextWriter error, string message)
    {
        error.WriteLine($"optpoline: {message}");
        error.WriteLine(Usage);
        return ExitCodes.Usage;
    }
}

/// <summary>Process exit codes.</summary>
internal static class ExitCodes
{
    public const int Ok = 0;
    public const int Mismatch = 1;
    public const int Usage = 2;
    public const int BadTrace = 3;
    public const int BadInput = 4;
    public const int NotFound = 5;
}
