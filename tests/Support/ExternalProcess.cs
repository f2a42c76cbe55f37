using System.Diagnostics;

namespace Optpoline.Tests.Support;

/// <summary>Runs a tool (dotnet, gcc, a script) to completion for a test, with its output.</summary>
internal static class ExternalProcess
{
    /// <summary>The repository's root (the tests run from tests/bin/CONFIG/TFM).</summary>
    public static string Repository { get; } = Path.GetFullPath(Path.Combine(TestContext.CurrentContext.TestDirectory, "../../../.."));

    /// <summary>Runs <paramref name="file"/>; fails the test when it outlives <paramref name="timeout"/>. Output: stdout, then stderr.</summary>
    public static (int Code, string Output) Run(string file, string arguments, TimeSpan timeout)
    {
        var (code, output, error) = RunSeparately(file, [arguments], timeout, split: false);
        return (code, output + error);
    }

    /// <summary>Runs <paramref name="file"/> with <paramref name="arguments"/> (each one argument); its stdout and stderr apart.</summary>
    public static (int Code, string Output, string Error) Run(string file, string[] arguments, TimeSpan timeout) =>
        RunSeparately(file, arguments, timeout, split: true);

    private static (int Code, string Output, string Error) RunSeparately(string file, string[] arguments, TimeSpan timeout, bool split)
    {
        var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        if (split)
        {
            arguments.ToList().ForEach(start.ArgumentList.Add);
        }
        else
        {
            start.Arguments = arguments[0];
        }

        // A nested build must not inherit the test host's MSBuild settings.
        foreach (var key in start.Environment.Keys.Where(k => k.StartsWith("MSBUILD", StringComparison.OrdinalIgnoreCase) || k.StartsWith("VSTEST", StringComparison.OrdinalIgnoreCase)).ToList())
        {
            start.Environment.Remove(key);
        }

        using var process = Process.Start(start)!;
        var output = process.StandardOutput.ReadToEndAsync();
        var error = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(timeout))
        {
            process.Kill(entireProcessTree: true);
            Assert.Fail($"{file} {string.Join(' ', arguments)} did not finish within {timeout}.");
        }

        return (process.ExitCode, output.Result, error.Result);
    }

    /// <summary>Skips the test when <paramref name="tool"/> is missing (fails it under CI), with a hint.</summary>
    public static void Require(string tool, string why)
    {
        if (Run("sh", $"-c \"command -v {tool}\"", TimeSpan.FromSeconds(10)).Output.Trim().Length == 0)
        {
            var hint = $"{tool} is not installed: run scripts/install-prerequisites.sh ({why}).";
            if (Environment.GetEnvironmentVariable("CI") == "true")
            {
                Assert.Fail(hint);
            }

            Assert.Ignore(hint);
        }
    }
}
