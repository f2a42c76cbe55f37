using Optpoline.Cli;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary>A short, bounded <c>optpoline run</c>: every phase runs, every call is checked, the trace replays.</summary>
[NonParallelizable]
public sealed class RunCommandTests
{
    [Test]
    public void A_short_run_checks_every_call_and_leaves_a_trace_that_replays([Values(0, 2)] int inlineSlots)
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-run-test-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            using var output = new StringWriter();
            using var error = new StringWriter();
            var code = Program.Run(["run", "--seconds", "4", "--sites", "64", "--threads", "2", "--inline-slots", $"{inlineSlots}", "--trace", directory], output, error);
            var text = output.ToString();
            TestContext.Out.WriteLine(text + error);
            Assert.That(code, Is.EqualTo(ExitCodes.Ok));
            Assert.That(text, Does.Contain("0 wrong results"));
            foreach (var phase in new[] { "mono", "bimorphic", "megamorphic", "mono again" })
            {
                Assert.That(text, Does.Contain($"| {phase,-12} |"), $"the summary has the {phase} phase");
            }

            Assert.That(text, Does.Contain($"trace: {directory}"));
            var replay = TraceReplay.Open(directory);
            Assert.That(replay.Changes, Is.Not.Empty);
            Assert.That(replay.Verify(), Is.Empty, "the run's trace replays consistently");
        }
        finally
        {
            if (Directory.Exists(directory))
            {
                Directory.Delete(directory, recursive: true);
            }
        }
    }

    [TestCase("--threads", "0")]
    [TestCase("--seconds", "x")]
    [TestCase("--bogus", "1")]
    [TestCase("--inline-slots", "3")]
    public void Bad_options_fail_with_a_message(string option, string value)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        Assert.That(Program.Run(["run", option, value], output, error), Is.EqualTo(ExitCodes.Usage));
        Assert.That(error.ToString(), Does.StartWith("optpoline: run:"));
    }
}
