using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Diagnostics;

/// <summary>
/// <c>optpoline inspect</c> on a real host: the test starts <c>optpoline run</c> (a .NET host with 16
/// sites), inspects it live with ClrMD (from another process, as a user would) and through a dump that
/// createdump writes, and
/// checks the site list, the names of the promoted targets and the disassembled site code; then the
/// error cases: no such process, no such file, a file that is not a dump, a .NET process (and a dump of
/// one) without an engine.
/// </summary>
[NonParallelizable]
[Category("Native")]
public sealed class InspectTests
{
    private static readonly string CliPath = Path.Combine(TestContext.CurrentContext.TestDirectory, "Optpoline.Cli.dll");
    private static readonly string CreateDump = Path.Combine(RuntimeEnvironment.GetRuntimeDirectory(), "createdump");
    private string _directory = null!;

    [SetUp]
    public void CreateDirectory()
    {
        _directory = Path.Combine(Path.GetTempPath(), $"optpoline-inspect-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(_directory);
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    [Test]
    public void A_live_host_and_its_dump_show_every_site_with_named_targets_and_code()
    {
        using var host = Start("run", "--seconds", "120", "--sites", "16", "--threads", "1", "--no-trace", "--inline-slots", "2");
        try
        {
            // Live: wait until the host's learner promoted every site (its first phase is monomorphic).
            // (Until the host has created its engine, inspect says it has none.)
            var clock = Stopwatch.StartNew();
            var pid = host.Id.ToString(System.Globalization.CultureInfo.InvariantCulture);
            JsonElement? engine = null;
            while (clock.Elapsed < TimeSpan.FromSeconds(30) && !(engine?.GetProperty("sites") is { } found && found.GetArrayLength() == 16 && found.EnumerateArray().All(s => s.GetProperty("state").GetString() == "promoted")))
            {
                Thread.Sleep(500);
                Assert.That(host.HasExited, Is.False, "the host runs");
                var (status, json, error) = Cli("inspect", "--pid", pid, "--json");
                Assert.That(status, Is.Zero.Or.EqualTo(5), error);
                engine = status == 0 ? JsonDocument.Parse(json).RootElement.GetProperty("engines")[0].Clone() : null;
            }

            Assert.That(engine, Is.Not.Null, "the host's engine was found");
            Check(engine!.Value);

            // The text form: a table row per site and the code.
            var (code, text, _) = Cli("inspect", "--pid", host.Id.ToString(System.Globalization.CultureInfo.InvariantCulture));
            Assert.That(code, Is.Zero);
            Assert.That(text, Does.Contain("vm_call15").And.Contain("host code at 0x").And.Contain("call    vm_class"));

            // A dump of it, read without the process.
            var dump = Path.Combine(_directory, "host.dmp");
            var written = ExternalProcess.Run(CreateDump, $"--full -f \"{dump}\" {host.Id}", TimeSpan.FromMinutes(1));
            Assert.That(written.Code, Is.Zero, written.Output);
            var fromDump = Inspect("--dump", dump);
            Check(fromDump);
            Assert.That(fromDump.GetProperty("sites").GetArrayLength(), Is.EqualTo(engine.Value.GetProperty("sites").GetArrayLength()));
        }
        finally
        {
            host.Kill();
            host.WaitForExit();
        }
    }

    [Test]
    public void Missing_processes_files_that_are_no_dumps_and_hosts_without_an_engine_are_reported()
    {
        var (code, _, error) = Cli("inspect", "--pid", "999999999");
        Assert.That((code, error), Is.EqualTo((5, "optpoline: process 999999999 does not exist.\n")));
        (code, _, error) = Cli("inspect", "--dump", Path.Combine(_directory, "missing.dmp"));
        Assert.That(code, Is.EqualTo(5));
        Assert.That(error, Does.Contain("missing.dmp does not exist"));
        var garbage = Path.Combine(_directory, "garbage.dmp");
        File.WriteAllText(garbage, "not a dump");
        (code, _, error) = Cli("inspect", "--dump", garbage);
        Assert.That(code, Is.EqualTo(5));
        Assert.That(error, Does.Contain("garbage.dmp is not a dump"));
        (code, _, error) = Cli("inspect");
        Assert.That(code, Is.EqualTo(2));
        Assert.That(error, Does.Contain("--pid N or --dump FILE"));

        // A .NET process without an engine: the CLI blocked opening a FIFO nobody writes.
        var fifo = Path.Combine(_directory, "fifo");
        Assert.That(ExternalProcess.Run("mkfifo", $"\"{fifo}\"", TimeSpan.FromSeconds(10)).Code, Is.Zero);
        using var idle = Start("scan", fifo);
        try
        {
            Thread.Sleep(1500);
            (code, _, error) = Cli("inspect", "--pid", idle.Id.ToString(System.Globalization.CultureInfo.InvariantCulture));
            Assert.That(code, Is.EqualTo(5), error);
            Assert.That(error, Does.Contain($"process {idle.Id} has no Optpoline engine"));

            // And a dump of it.
            var dump = Path.Combine(_directory, "idle.dmp");
            var written = ExternalProcess.Run(CreateDump, $"--withheap -f \"{dump}\" {idle.Id}", TimeSpan.FromMinutes(1));
            Assert.That(written.Code, Is.Zero, written.Output);
            (code, _, error) = Cli("inspect", "--dump", dump);
            Assert.That(code, Is.EqualTo(5), error);
            Assert.That(error, Does.Contain("idle.dmp has no Optpoline engine"));
        }
        finally
        {
            idle.Kill();
            idle.WaitForExit();
        }
    }

    [Test]
    public void Targets_out_of_direct_reach_are_listed_with_their_native_names()
    {
        // This test process is the host: a libc function is far from engine memory, so promoting it is
        // refused and counted; inspect (a child process) finds the site on this heap and names the target.
        using var engine = new OptpolineEngine();
        var site = engine.CreateOutlineSite(Iced.Intel.Register.RAX, "inspect_unreachable_site");
        var getpid = (ulong)NativeLibrary.GetExport(NativeLibrary.Load("libc.so.6"), "getpid");
        Assume.That(site.TryPromote([getpid], out _), Is.False, "libc is out of rel32 reach of engine memory here");
        var (code, output, error) = Cli("inspect", "--pid", Environment.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json", "--no-code");
        Assert.That(code, Is.Zero, error);
        var found = JsonDocument.Parse(output).RootElement.GetProperty("engines").EnumerateArray()
            .SelectMany(e => e.GetProperty("sites").EnumerateArray())
            .Single(s => s.GetProperty("name").GetString() == "inspect_unreachable_site");
        Assert.That(found.GetProperty("kind").GetString(), Is.EqualTo("outline"));
        Assert.That(found.GetProperty("state").GetString(), Is.EqualTo("fallback"));
        var unreachable = found.GetProperty("unreachable").EnumerateArray().Single();
        Assert.That(unreachable.GetProperty("address").GetString(), Is.EqualTo($"0x{getpid:X}"));
        Assert.That(unreachable.GetProperty("name").GetString(), Does.Match("^libc\\.so\\.6!.*getpid$"));
        GC.KeepAlive(site);
    }

    private static void Check(JsonElement engine)
    {
        var sites = engine.GetProperty("sites").EnumerateArray().ToList();
        Assert.That(sites.Select(s => s.GetProperty("name").GetString()).ToList(), Is.EqualTo(Enumerable.Range(0, 16).Select(i => $"vm_call{i}").ToList()));
        foreach (var site in sites)
        {
            Assert.That(site.GetProperty("kind").GetString(), Is.EqualTo("inline"));
            Assert.That(site.GetProperty("state").GetString(), Is.EqualTo("promoted"), site.ToString());
            var targets = site.GetProperty("targets").EnumerateArray().Select(t => t.GetProperty("name").GetString()).ToList();
            Assert.That(targets, Is.Not.Empty.And.All.Match("^vm_class[0-9]+_method$"), site.ToString());
            var code = site.GetProperty("code").EnumerateArray().First().GetProperty("disassembly").EnumerateArray().Select(l => l.GetString()).ToList();
            Assert.That(code, Has.Some.Contains($"call    {targets[0]}"), "the slot calls its promoted target");
            Assert.That(site.GetProperty("samples").GetInt64(), Is.GreaterThan(0));
            Assert.That(site.GetProperty("patches").GetInt64(), Is.GreaterThan(0));
        }
    }

    private static JsonElement Inspect(params string[] target)
    {
        var (code, output, error) = Cli(["inspect", .. target, "--json"]);
        Assert.That(code, Is.Zero, error);
        var engines = JsonDocument.Parse(output).RootElement.GetProperty("engines");
        Assert.That(engines.GetArrayLength(), Is.EqualTo(1));
        return engines[0].Clone();
    }

    /// <summary>The CLI in a process of its own, as users run it (a hung attach cannot stop the test run).</summary>
    private static (int Code, string Output, string Error) Cli(params string[] args) =>
        ExternalProcess.Run("dotnet", [CliPath, .. args], TimeSpan.FromSeconds(90));

    private static Process Start(params string[] args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(CliPath);
        foreach (var arg in args)
        {
            start.ArgumentList.Add(arg);
        }

        var process = Process.Start(start)!;
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }
}
