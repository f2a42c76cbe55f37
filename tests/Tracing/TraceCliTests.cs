using Iced.Intel;
using Optpoline.Cli;
using Optpoline.Patcher.Tracing;
using Optpoline.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary><c>optpoline trace</c>: list, show (forwards and backwards, by address or name, at any time) and verify.</summary>
[NonParallelizable]
public sealed class TraceCliTests
{
    private string _directory = null!;
    private ulong _site;
    private ulong[] _targets = null!;

    [OneTimeSetUp]
    public void Trace()
    {
        _directory = Path.Combine(Path.GetTempPath(), $"optpoline-cli-{Environment.ProcessId}-{Guid.NewGuid():N}");
        using var engine = new OptpolineEngine();
        _targets = Support.ChecksumCode.EmitTargets(engine, 3);
        var site = engine.CreateInlineSite(Register.RAX, 1, "cli_site");
        Support.ChecksumCode.EmitDriver(engine, Register.RAX, site);
        _site = site.Slots[0].Start;   // the slot's first patchable byte (after its rseq arming store, if any)
        site.Promote([_targets[0]]);
        engine.StartTracing(new TracingOptions { Directory = _directory });
        site.Promote([_targets[1]]);
        site.Reset();
        site.Promote([_targets[2]]);
        engine.StopTracing();
    }

    [OneTimeTearDown]
    public void Delete() => Directory.Delete(_directory, recursive: true);

    [Test]
    public void List_shows_the_regions_and_every_change()
    {
        var (code, output, _) = Run("trace", "list", _directory);
        Assert.That(code, Is.EqualTo(ExitCodes.Ok));
        Assert.That(output, Does.Contain("region 0x"));
        Assert.That(output, Does.Contain($"0x{_site:x}"));
        var changes = TraceReplay.Open(_directory).Changes.Count;
        Assert.That(output, Does.Contain($"{changes} changes:"));
        Assert.That(output.Split('\n').Count(l => l.StartsWith('#')), Is.EqualTo(changes));
        Assert.That(output.Split('\n').Where(l => l.Contains($"0x{_site:x}", StringComparison.Ordinal) && l.StartsWith('#')), Has.All.Contain(" code_"), "each change names its block, from the jitdump");
    }

    [Test]
    public void Show_disassembles_the_site_as_it_was_at_each_time_forwards_and_backwards()
    {
        var replay = TraceReplay.Open(_directory);
        var atStart = Run("trace", "show", _directory, $"0x{_site:x}:10", "--at", "start").Output;
        var atEnd = Run("trace", "show", _directory, $"0x{_site:x}:10", "--at", "end").Output;
        var atEndBackward = Run("trace", "show", _directory, $"0x{_site:x}:10", "--at", "end", "--backward").Output;
        TestContext.Out.WriteLine(atStart + atEnd);
        Assert.That(atStart, Does.Contain($"r11,{_targets[0]:X}h"), "promoted to target 0 before the trace");
        Assert.That(atEnd, Does.Contain($"r11,{_targets[2]:X}h"), "promoted to target 2 at the end");
        Assert.That(atEndBackward.Split('\n').Skip(1), Is.EqualTo(atEnd.Split('\n').Skip(1)), "the same instructions either way");
        Assert.That(atStart, Does.Contain("in code_"), "named from the jitdump from the first instant");

        // By change index and relative time; by block name.
        var firstChange = replay.Changes.First(c => c.Address == _site);
        var index = replay.Changes.ToList().IndexOf(firstChange);
        var atChange = Run("trace", "show", _directory, $"0x{_site:x}:1", "--at", $"#{index}");
        Assert.That(atChange.Code, Is.EqualTo(ExitCodes.Ok), atChange.Error);
        Assert.That(Run("trace", "show", _directory, $"0x{_site:x}", "--at", "+0.001ms").Code, Is.EqualTo(ExitCodes.Ok));
        var byName = Run("trace", "show", _directory, "cli_site_miss");
        Assert.That(byName.Code, Is.EqualTo(ExitCodes.Ok), byName.Error);
        Assert.That(byName.Output, Does.Contain("in cli_site_miss"));
    }

    [Test]
    public void Verify_passes_a_clean_trace()
    {
        var (code, output, _) = Run("trace", "verify", _directory);
        Assert.That(code, Is.EqualTo(ExitCodes.Ok));
        Assert.That(output, Does.StartWith("ok:"));
    }

    [TestCase(new[] { "trace" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "frobnicate", "DIR" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "show", "DIR", "0xZZ" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "show", "DIR", "0x1000:8" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "show", "DIR", "no_such_block" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "show", "DIR", "cli_site_miss", "--at", "yesterday" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "show", "DIR", "cli_site_miss", "--at", "#99999" }, ExitCodes.Usage)]
    [TestCase(new[] { "trace", "list", "/nonexistent/trace" }, ExitCodes.BadTrace)]
    [TestCase(new[] { "bogus" }, ExitCodes.Usage)]
    public void Bad_arguments_fail_with_a_message_and_a_code(string[] args, int expected)
    {
        var (code, _, error) = Run([.. args.Select(a => a == "DIR" ? _directory : a)]);
        Assert.That(code, Is.EqualTo(expected));
        Assert.That(error, Does.StartWith("optpoline: "));
    }

    [Test]
    public void A_damaged_trace_is_reported_not_crashed_on()
    {
        var copy = _directory + "-damaged";
        Directory.CreateDirectory(copy);
        try
        {
            foreach (var file in Directory.GetFiles(_directory))
            {
                File.Copy(file, Path.Combine(copy, Path.GetFileName(file)));
            }

            File.WriteAllBytes(Path.Combine(copy, TraceFiles.StartSnapshot), "OPTSNAP1 and then nonsense"u8.ToArray());
            var (code, _, error) = Run("trace", "list", copy);
            Assert.That(code, Is.EqualTo(ExitCodes.BadTrace));
            Assert.That(error, Does.Contain(TraceFiles.StartSnapshot));

            // A perf.data cut in its last record still lists, with a warning.
            File.Copy(Path.Combine(_directory, TraceFiles.StartSnapshot), Path.Combine(copy, TraceFiles.StartSnapshot), overwrite: true);
            var pokes = File.ReadAllBytes(Path.Combine(_directory, TraceFiles.TextPokes));
            File.WriteAllBytes(Path.Combine(copy, TraceFiles.TextPokes), pokes[..^5]);
            var cut = Run("trace", "list", copy);
            Assert.That(cut.Code, Is.EqualTo(ExitCodes.Ok));
            Assert.That(cut.Error, Does.Contain("warning:").And.Contain("cut short"));
        }
        finally
        {
            Directory.Delete(copy, recursive: true);
        }
    }

    private static (int Code, string Output, string Error) Run(params string[] args)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        var code = Program.Run(args, output, error);
        return (code, output.ToString(), error.ToString());
    }
}
