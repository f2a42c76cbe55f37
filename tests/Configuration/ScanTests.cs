using Optpoline.Cli;
using Optpoline.Configuration;

namespace Optpoline.Tests.Configuration;

/// <summary>
/// <c>optpoline scan</c>: the engine's attributes are found in an assembly's metadata without loading it
/// (this test assembly carries them, on <see cref="Marked"/>), printed as config patterns or merged into
/// a config file whose other text stays as it was; anything that is not a .NET assembly is reported.
/// </summary>
public sealed class ScanTests
{
    private static readonly string Assembly = typeof(ScanTests).Assembly.Location;

    [Test]
    public void Attributes_are_found_in_metadata_with_their_patterns()
    {
        var found = ScanCommand.Scan(Assembly).Where(f => f.Member.Contains(nameof(Marked), StringComparison.Ordinal)).ToList();
        Assert.That(found, Is.EquivalentTo(new[]
        {
            ("Optpoline.Tests.Configuration.ScanTests.Marked.Dispatch", "Optpoline.Tests.Configuration.ScanTests.Marked.Dispatch*", true),
            ("Optpoline.Tests.Configuration.ScanTests.Marked.Dispatch", "vm.call.*", true),
            ("Optpoline.Tests.Configuration.ScanTests.Marked.Table", "Optpoline.Tests.Configuration.ScanTests.Marked.Table*", true),
            ("Optpoline.Tests.Configuration.ScanTests.Marked._handlers", "vm.handler.?", true),
            ("Optpoline.Tests.Configuration.ScanTests.Marked.Debugger", "vm.debug.*", false),
            ("Optpoline.Tests.Configuration.ScanTests.Marked..ctor", "Optpoline.Tests.Configuration.ScanTests.Marked..ctor*", false),
        }));
    }

    [Test]
    public void Merging_adds_the_patterns_and_keeps_the_rest_of_the_file()
    {
        const string Text = """
            {
              // my comment stays
              "promotion": { "mode": "learn" },
              "sites": {
                "include": ["vm.call.*"],   // already there
              },
            }
            """;
        var (added, merged) = ScanCommand.Merge(Text, "optpoline.json", ["vm.call.*", "a.*"], ["b.*"]);
        Assert.That(added, Is.EqualTo(2));
        Assert.That(merged, Does.Contain("// my comment stays").And.Contain("// already there").And.Contain("\"promotion\": { \"mode\": \"learn\" }"));
        var config = ConfigFile.Parse(merged);
        Assert.That(config.Sites.Include, Is.EqualTo(new[] { "vm.call.*", "a.*" }));
        Assert.That(config.Sites.Exclude, Is.EqualTo(new[] { "b.*" }));
        Assert.That(ScanCommand.Merge(merged, "optpoline.json", ["a.*"], ["b.*"]), Is.EqualTo((0, merged)), "merging again changes nothing");

        var (_, fromEmpty) = ScanCommand.Merge("{ /* empty */ }", "optpoline.json", ["a.*"], []);
        Assert.That(ConfigFile.Parse(fromEmpty).Sites.Include, Is.EqualTo(new[] { "a.*" }));
        Assert.That(fromEmpty, Does.Contain("/* empty */"));
        Assert.That(() => ScanCommand.Merge("{ \"sites\": ", "bad.json", ["a.*"], []), Throws.TypeOf<ConfigException>().With.Message.StartsWith("bad.json:1:"));
    }

    [Test]
    public void The_command_prints_or_merges_and_reports_what_is_not_an_assembly()
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-scan-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(directory);
        try
        {
            var config = Path.Combine(directory, "optpoline.json");
            File.WriteAllText(config, "{\n  // hand-written\n}\n");
            using var output = new StringWriter();
            using var error = new StringWriter();
            Assert.That(Program.Run(["scan", Assembly], output, error), Is.Zero, error.ToString());
            Assert.That(output.ToString(), Does.Contain("\"vm.call.*\"").And.Contain("\"vm.debug.*\""));
            Assert.That(Program.Run(["scan", Assembly, "--merge", config], output, error), Is.Zero, error.ToString());
            Assert.That(ConfigFile.Load(config).Sites.Exclude, Does.Contain("vm.debug.*"));
            Assert.That(File.ReadAllText(config), Does.Contain("// hand-written"));

            var text = Path.Combine(directory, "notes.txt");
            File.WriteAllText(text, "not a PE file");
            var truncated = Path.Combine(directory, "truncated.dll");
            File.WriteAllBytes(truncated, File.ReadAllBytes(Assembly)[..4096]);
            var native = Directory.GetFiles(Path.GetDirectoryName(typeof(object).Assembly.Location)!, "libcoreclr.so").Single();
            foreach (var bad in new[] { text, truncated, native, Path.Combine(directory, "missing.dll") })
            {
                using var badError = new StringWriter();
                Assert.That(Program.Run(["scan", bad], output, badError), Is.EqualTo(4), bad);
                Assert.That(badError.ToString(), Does.StartWith($"optpoline: {bad}: "));
            }
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>Members carrying the engine's attributes, as a host's would.</summary>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Performance", "CA1823", Justification = "Scanned from metadata.")]
    private sealed class Marked
    {
        [PromoteCalls("vm.handler.?")]
        private readonly int _handlers;

        [NeverPromote]
        public Marked() => _handlers = 0;

        [PromoteCalls]
        public static int Table { get; set; }

        public int Handlers => _handlers;

        [PromoteCalls]
        [PromoteCalls("vm.call.*")]
        public static void Dispatch()
        {
        }

        [NeverPromote("vm.debug.*")]
        public static void Debugger()
        {
        }
    }
}
