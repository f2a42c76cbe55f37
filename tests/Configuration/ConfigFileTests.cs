using Optpoline.Configuration;

namespace Optpoline.Tests.Configuration;

/// <summary>The config file: every key, defaults, and every kind of invalid file reported with its line and column.</summary>
public sealed class ConfigFileTests
{
    [Test]
    public void Every_key_is_read()
    {
        var config = ConfigFile.Parse("""
            // comments are allowed
            {
              "promotion": { "enabled": false, "mode": "static", "fallback": "indirect", "inlineSlots": 2, },
              "learning": { "background": false, "samplePeriod": 16, "epochMilliseconds": 20, "ringCapacity": 4096 },
              /* and block comments */
              "patching": { "suspended": true, "flushTimeoutMilliseconds": 250 },
              "sites": { "include": ["vm_*"], "exclude": ["vm_slow?", "*_cold"] },
              "tracing": { "directory": "traces", "textPokes": false, "jitDump": true },
            }
            """, "test.json");
        Assert.That(config.Promotion.Enabled, Is.False);
        Assert.That(config.Promotion.Mode, Is.EqualTo("static"));
        Assert.That(config.Promotion.Fallback, Is.EqualTo("indirect"));
        Assert.That(config.Promotion.InlineSlots, Is.EqualTo(2));
        Assert.That(config.Learning.Background, Is.False);
        Assert.That(config.Learning.SamplePeriod, Is.EqualTo(16));
        Assert.That(config.Learning.EpochMilliseconds, Is.EqualTo(20));
        Assert.That(config.Learning.RingCapacity, Is.EqualTo(4096));
        Assert.That(config.Patching.Suspended, Is.True);
        Assert.That(config.Patching.FlushTimeoutMilliseconds, Is.EqualTo(250));
        Assert.That(config.Sites.Include, Is.EqualTo(new[] { "vm_*" }));
        Assert.That(config.Sites.Exclude, Is.EqualTo(new[] { "vm_slow?", "*_cold" }));
        Assert.That(config.Tracing.Directory, Is.EqualTo("traces"));
        Assert.That(config.Tracing.TextPokes, Is.False);
    }

    [Test]
    public void An_empty_object_gives_the_defaults_and_the_sample_file_documents_them_all()
    {
        var defaults = ConfigFile.Parse("{}");
        Assert.That(ConfigFile.Serialize(defaults), Is.EqualTo(ConfigFile.Serialize(new OptpolineConfig())));
        var sample = Path.Combine(TestContext.CurrentContext.TestDirectory, "../../../../optpoline.json");
        var fromSample = ConfigFile.Load(sample);
        Assert.That(ConfigFile.Serialize(fromSample), Is.EqualTo(ConfigFile.Serialize(defaults)), "the sample holds the defaults");
        var text = File.ReadAllText(sample);
        foreach (var key in new[] { "enabled", "mode", "fallback", "inlineSlots", "background", "samplePeriod", "epochMilliseconds", "ringCapacity", "profile", "suspended", "flushTimeoutMilliseconds", "include", "exclude", "directory", "textPokes", "jitDump" })
        {
            Assert.That(text, Does.Contain($"\"{key}\""), $"the sample documents {key}");
        }
    }

    [TestCase("{\n  \"promotion\": { \"enabled\": true \"mode\": \"learn\" }\n}", 2, "syntax", TestName = "Syntax: missing comma")]
    [TestCase("{\n  \"promotion\": {\n    \"enabled\": true,\n    \"colour\": \"red\"\n  }\n}", 4, "promotion.colour: unknown key", TestName = "Unknown key")]
    [TestCase("{ \"promotions\": {} }", 1, "promotions: unknown key", TestName = "Unknown section")]
    [TestCase("{\n\n  \"learning\": { \"samplePeriod\": \"often\" }\n}", 3, "learning.samplePeriod: wrong type", TestName = "Wrong type: string for int")]
    [TestCase("{\n  \"promotion\": { \"enabled\": 1 }\n}", 2, "promotion.enabled: wrong type", TestName = "Wrong type: number for bool")]
    [TestCase("{\n  \"learning\": {\n    \"samplePeriod\": 0\n  }\n}", 3, "learning.samplePeriod: 0 is out of range", TestName = "Out of range: sample period")]
    [TestCase("{\n  \"promotion\": { \"inlineSlots\": 3 }\n}", 2, "promotion.inlineSlots: 3 is out of range", TestName = "Out of range: inline slots")]
    [TestCase("{\n  \"promotion\": {\n    \"mode\": \"sometimes\"\n  }\n}", 3, "promotion.mode: 'sometimes' is not one of", TestName = "Bad enumeration value")]
    [TestCase("{\n  \"patching\": { \"suspended\": true, \"suspended\": false }\n}", 2, "patching.suspended: the key appears twice", TestName = "Repeated key")]
    [TestCase("{\n  \"sites\": { \"exclude\": [\"a\", \"\"] }\n}", 2, "sites.exclude[1]: a site name pattern may not be empty", TestName = "Empty pattern")]
    [TestCase("[1, 2]", 1, "wrong type", TestName = "Not an object")]
    public void An_invalid_file_is_reported_with_path_line_and_column(string text, int line, string problem)
    {
        var e = Assert.Throws<ConfigException>(() => ConfigFile.Parse(text, "bad.json"))!;
        TestContext.Out.WriteLine(e.Message);
        Assert.That(e.Path, Is.EqualTo("bad.json"));
        Assert.That(e.Line, Is.EqualTo(line));
        Assert.That(e.Column, Is.GreaterThan(0));
        Assert.That(e.Message, Does.StartWith($"bad.json:{line}:{e.Column}: "));
        Assert.That(e.Problem, Does.Contain(problem));
    }

    [Test]
    public void The_column_points_at_the_key()
    {
        var e = Assert.Throws<ConfigException>(() => ConfigFile.Parse("{\n  \"learning\": {  \"samplePeriod\": 100000 }\n}", "c.json"))!;
        Assert.That((e.Line, e.Column), Is.EqualTo((2, 18)));
    }

    [Test]
    public void A_missing_file_is_a_config_error_naming_it()
    {
        var e = Assert.Throws<ConfigException>(() => ConfigFile.Load("/nonexistent/optpoline.json"))!;
        Assert.That(e.Message, Does.StartWith("/nonexistent/optpoline.json:0:0: cannot read the file"));
    }

    [Test]
    [NonParallelizable]
    public void The_path_comes_from_the_host_else_the_environment_else_none()
    {
        var saved = Environment.GetEnvironmentVariable(ConfigFile.EnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(ConfigFile.EnvironmentVariable, "/etc/from-env.json");
            Assert.That(ConfigFile.Resolve("/given.json"), Is.EqualTo("/given.json"));
            Assert.That(ConfigFile.Resolve(null), Is.EqualTo("/etc/from-env.json"));
            Environment.SetEnvironmentVariable(ConfigFile.EnvironmentVariable, null);
            Assert.That(ConfigFile.Resolve(null), Is.Null);
        }
        finally
        {
            Environment.SetEnvironmentVariable(ConfigFile.EnvironmentVariable, saved);
        }
    }
}
