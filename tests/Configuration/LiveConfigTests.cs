using Optpoline.Configuration;
using Optpoline.Stress;

namespace Optpoline.Tests.Configuration;

/// <summary>
/// A config file toggled while threads call the sites: each valid change applies without a restart,
/// each invalid one is reported with its line and column while the last good config keeps working.
/// </summary>
[NonParallelizable]
public sealed class LiveConfigTests
{
    private string _directory = null!;
    private string _path = null!;

    [SetUp]
    public void CreateDirectory()
    {
        _directory = Path.Combine(Path.GetTempPath(), $"optpoline-config-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(_directory);
        _path = Path.Combine(_directory, "optpoline.json");
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    [Test]
    public void Promotion_toggles_live_while_threads_call_and_bad_files_keep_the_last_good_config()
    {
        Write("""{ "learning": { "epochMilliseconds": 20 } }""");
        using var engine = OptpolineEngine.FromConfig(_path);
        Assert.That(engine.Promotion, Is.EqualTo(PromotionMode.Learn));
        Assert.That(engine.BackgroundLearning, Is.True);
        using var workload = new LearningWorkload(engine, siteCount: 32, targetCount: 8);
        workload.SetPhase([(0, 1.0)], 1);
        workload.Start(callerThreads: 2);
        try
        {
            WaitFor(() => workload.Sites.All(s => s.Targets.Count > 0), "the learner promotes every site");

            // Off: every site is demoted through the patcher while the threads run.
            ApplyFile("""{ "promotion": { "enabled": false }, "learning": { "epochMilliseconds": 20 } }""", engine);
            Assert.That(engine.Promotion, Is.EqualTo(PromotionMode.Off));
            WaitFor(() => workload.Sites.All(s => s.Targets.Count == 0), "every site is back on the fallback");
            Assert.That(() => workload.Sites[0].Promote([workload.Targets[0]]), Throws.TypeOf<PromotionRefusedException>());
            Thread.Sleep(100);
            Assert.That(workload.Sites.All(s => s.Targets.Count == 0), Is.True, "and the learner leaves them there");

            // Invalid files: each is reported with line and column; promotion stays off, calls stay right.
            foreach (var (text, line) in new[]
            {
                ("{\n  \"promotion\": { \"enabled\": true,, }\n}", 2),
                ("{\n  \"promotion\": {\n    \"enabled\": true,\n    \"speed\": 11\n  }\n}", 4),
                ("{\n  \"learning\": { \"samplePeriod\": true }\n}", 2),
                ("{\n\n  \"learning\": { \"samplePeriod\": -5 }\n}", 3),
            })
            {
                var error = RejectFile(text, engine);
                Assert.That(error, Does.StartWith($"{_path}:{line}:"), error);
                Assert.That(engine.LastConfigError, Is.EqualTo(error));
                Assert.That(engine.Promotion, Is.EqualTo(PromotionMode.Off), "the last good config stays in force");
                Assert.That(engine.Config!.Promotion.Enabled, Is.False);
            }

            // Back on: the learner promotes again.
            ApplyFile("""{ "learning": { "epochMilliseconds": 20 } }""", engine);
            Assert.That(engine.LastConfigError, Is.Null);
            WaitFor(() => workload.Sites.All(s => s.Targets.Count > 0), "learning resumes");

            // Exclude half the sites by name: they are demoted and stay there; the others stay promoted.
            ApplyFile("""{ "sites": { "exclude": ["learn1*"] }, "learning": { "epochMilliseconds": 20 } }""", engine);
            var excluded = workload.Sites.Where(s => s.Name.StartsWith("learn1", StringComparison.Ordinal)).ToList();
            WaitFor(() => excluded.All(s => s.Targets.Count == 0), "excluded sites are demoted");
            Thread.Sleep(100);
            Assert.That(excluded.All(s => s.Targets.Count == 0), Is.True);
            Assert.That(workload.Sites.Except(excluded).All(s => s.Targets.Count > 0), Is.True);

            // Suspended: no change at all, even on request.
            ApplyFile("""{ "patching": { "suspended": true } }""", engine);
            Assert.That(engine.PatchingSuspended, Is.True);
            Assert.That(() => excluded[0].Reset(), Throws.InvalidOperationException.With.Message.Contains("suspended"));
        }
        finally
        {
            workload.Stop();
        }

        Assert.That(workload.WrongCalls, Is.Zero);
        Assert.That(workload.Calls, Is.GreaterThan(0));
    }

    [Test]
    public void Learning_and_tracing_settings_apply_live()
    {
        Write("""{ "learning": { "background": false, "samplePeriod": 32 } }""");
        using var engine = OptpolineEngine.FromConfig(_path);
        Assert.That(engine.BackgroundLearning, Is.False);
        Assert.That(engine.SamplePeriod, Is.EqualTo(32));
        Assert.That(engine.LearnEpoch().Epoch, Is.EqualTo(1), "the host drives epochs");
        ApplyFile("""{ "learning": { "background": true, "samplePeriod": 8, "epochMilliseconds": 10 }, "promotion": { "mode": "static" }, "tracing": { "directory": "trace" } }""", engine);
        Assert.That(engine.BackgroundLearning, Is.True);
        Assert.That(engine.SamplePeriod, Is.EqualTo(8));
        Assert.That(engine.EpochInterval, Is.EqualTo(TimeSpan.FromMilliseconds(10)));
        Assert.That(engine.Promotion, Is.EqualTo(PromotionMode.Static));
        Assert.That(engine.TraceDirectory, Is.EqualTo(Path.Combine(_directory, "trace")), "relative to the config file");
        ApplyFile("""{ "promotion": { "fallback": "indirect" } }""", engine);
        Assert.That(engine.TraceDirectory, Is.Null, "tracing stops");
        Assert.That(File.Exists(Path.Combine(_directory, "trace", Optpoline.Patcher.Tracing.TraceFiles.EndSnapshot)), Is.True);
        Assert.That(engine.ConfigWarnings.Single(), Does.Contain("promotion.fallback"));
    }

    [Test]
    public void An_invalid_file_at_creation_is_an_error_with_its_place()
    {
        Write("{\n  \"tracing\": { \"directory\": 7 }\n}");
        var e = Assert.Throws<ConfigException>(() => OptpolineEngine.FromConfig(_path))!;
        Assert.That(e.Message, Does.StartWith($"{_path}:2:"));
        Assert.That(() => new OptpolineEngine().ReloadConfig(), Throws.InvalidOperationException.With.Message.Contains("FromConfig"));
    }

    private void Write(string text)
    {
        // As editors do: a new file renamed over the old one.
        var temporary = _path + ".tmp";
        File.WriteAllText(temporary, text);
        File.Move(temporary, _path, overwrite: true);
    }

    private void ApplyFile(string text, OptpolineEngine engine) => Assert.That(WriteAndWait(text, engine, rejected: false), Is.Null);

    private string RejectFile(string text, OptpolineEngine engine) => WriteAndWait(text, engine, rejected: true)!;

    /// <summary>Writes the file and waits for the engine's watcher to apply it (or reject it); returns the error.</summary>
    private string? WriteAndWait(string text, OptpolineEngine engine, bool rejected)
    {
        string? error = null;
        using var reported = new ManualResetEventSlim();
        void OnChanged(object? sender, ConfigChangedEventArgs e)
        {
            if ((e.Error is not null) == rejected)
            {
                error = e.Error;
                reported.Set();
            }
        }

        engine.ConfigChanged += OnChanged;
        try
        {
            Write(text);
            Assert.That(reported.Wait(TimeSpan.FromSeconds(10)), Is.True, rejected ? "the watcher reported the bad file" : "the watcher applied the change");
        }
        finally
        {
            engine.ConfigChanged -= OnChanged;
        }

        return error;
    }

    private static void WaitFor(Func<bool> condition, string what)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!condition())
        {
            Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(15)), what);
            Thread.Sleep(10);
        }
    }
}
