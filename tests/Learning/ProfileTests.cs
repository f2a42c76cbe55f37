using Iced.Intel;
using Optpoline.Cli;
using Optpoline.Configuration;
using Optpoline.Profiles;
using Optpoline.Sites;
using Optpoline.Stress;

namespace Optpoline.Tests.Learning;

/// <summary>
/// Profiles: what one engine learned, saved by site and target name, makes a restarted host promote in
/// its first epoch (before it samples anything); stale entries are ignored one by one and counted;
/// merging adds counts and does not depend on grouping or order; damaged files are refused by path.
/// </summary>
[NonParallelizable]
public sealed unsafe class ProfileTests
{
    private const int SiteCount = 8;
    private const int TableLength = 256;
    private string _directory = null!;

    [SetUp]
    public void CreateDirectory()
    {
        _directory = Path.Combine(Path.GetTempPath(), $"optpoline-profile-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(_directory);
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    [Test]
    public void A_restarted_host_promotes_from_a_saved_profile_in_its_first_epoch()
    {
        var path = Path.Combine(_directory, "learned.profile");
        using (var first = new Host())
        {
            first.Run(iterations: 4000);
            for (var epoch = 0; epoch < 20 && !first.Promoted(); epoch++)
            {
                first.Run(iterations: 4000);
                Assert.That(first.Engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
            }

            Assert.That(first.Promoted(), Is.True, "the first run learns every site");
            var (saved, unnamed) = first.Engine.SaveProfile(path);
            Assert.That((saved, unnamed), Is.EqualTo((SiteCount, 0)));
        }

        // A new engine: new code memory, so every target is somewhere else; nothing has been sampled yet.
        using var second = new Host();
        var status = second.Engine.LoadProfile(path);
        Assert.That(status, Is.EqualTo(new ProfileStatus(path, SiteCount, SiteCount, 0, (SiteCount / 2 * 1) + (SiteCount / 2 * 2), 0)));
        Assert.That(second.Promoted(), Is.False);
        Assert.That(second.Engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(second.Promoted(), Is.True, "every site promotes at the first epoch, from the profile alone");
        Assert.That(second.Run(iterations: 1000), Is.Zero, "and every call is right");
        Assert.That(second.Engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void Sites_that_share_a_name_add_up_in_the_profile_and_all_get_it_back()
    {
        // Two copies of each call site (say, code compiled twice): one entry per name, both copies seeded.
        static string Shared(int j) => $"shared{j % 2}";
        var path = Path.Combine(_directory, "shared.profile");
        using (var first = new Host(Shared))
        {
            for (var epoch = 0; epoch < 20 && !first.Promoted(); epoch++)
            {
                first.Run(iterations: 4000);
                Assert.That(first.Engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
            }

            Assert.That(first.Promoted(), Is.True);
            Assert.That(first.Engine.SaveProfile(path), Is.EqualTo((2, 0)));
        }

        var saved = LearnedProfile.Load(path);
        Assert.That(saved.Sites.Keys, Is.EqualTo(new[] { "shared0", "shared1" }));
        Assert.That(saved.Sites["shared0"].Select(t => t.Block), Is.EqualTo(new[] { "target0" }), "even sites call target0 only");

        using var second = new Host(Shared);
        Assert.That(second.Engine.LoadProfile(path), Is.EqualTo(new ProfileStatus(path, 2, 2, 0, 3, 0)));
        Assert.That(second.Engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(second.Promoted(), Is.True, "every copy is seeded");
    }

    [Test]
    public void Stale_entries_are_ignored_one_by_one_and_counted()
    {
        using var host = new Host();
        var profile = new LearnedProfile();
        profile.Sites["site0"] = [Block("target0", 10), Block("no_such_block", 50), new ProfileTarget { Module = "/no/such/module.so", Offset = 16, Count = 5 }];
        profile.Sites["site1"] = [new ProfileTarget { Block = "target1", Offset = 1 << 20, Count = 9 }];   // past the block's end
        profile.Sites["no_such_site"] = [Block("target0", 7)];
        var path = Path.Combine(_directory, "stale.profile");
        profile.Save(path);

        var status = host.Engine.LoadProfile(path);
        Assert.That(status, Is.EqualTo(new ProfileStatus(path, 3, 2, 1, 5, 3)));
        Assert.That(status.ToString(), Does.Contain("1 unmatched").And.Contain("3/5 targets stale"));
        Assert.That(host.Engine.LearnEpoch().Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(host.Sites[0].Targets, Is.EqualTo(new[] { host.Targets[0] }), "the entry that still fits is used");
        Assert.That(host.Sites[1].Targets, Is.Empty, "a site whose every target is stale learns from scratch");
    }

    [Test]
    public void Merging_adds_counts_and_neither_grouping_nor_order_matters()
    {
        var random = new Random(11);
        LearnedProfile RandomProfile()
        {
            var profile = new LearnedProfile();
            for (var s = 0; s < random.Next(1, 6); s++)
            {
                profile.Sites[$"site{random.Next(8)}"] = [.. Enumerable.Range(0, random.Next(1, 5)).Select(_ => random.Next(2) == 0
                    ? Block($"fn{random.Next(4)}", random.Next(1, 1000))
                    : new ProfileTarget { Module = $"/lib/m{random.Next(2)}.so", Offset = random.Next(3) * 16, Count = random.Next(1, 1000) })
                    .DistinctBy(t => t.ToString())];
            }

            return profile;
        }

        string Text(LearnedProfile p)
        {
            var file = Path.Combine(_directory, "merged.profile");
            p.Save(file);
            return File.ReadAllText(file);
        }

        for (var trial = 0; trial < 200; trial++)
        {
            var (a, b, c) = (RandomProfile(), RandomProfile(), RandomProfile());
            var left = LearnedProfile.Merge([LearnedProfile.Merge([a, b]), c]);
            var right = LearnedProfile.Merge([a, LearnedProfile.Merge([b, c])]);
            var shuffled = LearnedProfile.Merge([c, a, b]);
            Assert.That(Text(left), Is.EqualTo(Text(right)), $"trial {trial}: associative");
            Assert.That(Text(shuffled), Is.EqualTo(Text(left)), $"trial {trial}: commutative");
            Assert.That(left.Sites.Values.SelectMany(t => t).Sum(t => t.Count),
                Is.EqualTo(new[] { a, b, c }.SelectMany(p => p.Sites.Values).SelectMany(t => t).Sum(t => t.Count)), "counts add up");
        }
    }

    [TestCase("not json at all", ":1:", TestName = "Not JSON")]
    [TestCase("{ \"format\": \"something-else\", \"version\": 1, \"sites\": {} }", "not an Optpoline profile", TestName = "Another format")]
    [TestCase("{ \"format\": \"optpoline-profile\", \"version\": 7, \"sites\": {} }", "version 7", TestName = "Another version")]
    [TestCase("{ \"format\": \"optpoline-profile\", \"version\": 1, \"sites\": { \"s\": [ { \"block\": \"b\", \"offset\": 0, \"count\": -1 } ] } }", "non-negative count", TestName = "Negative count")]
    [TestCase("{ \"format\": \"optpoline-profile\", \"version\": 1, \"sites\": { \"s\": [ { \"block\": \"b\", \"module\": \"/m\", \"offset\": 0, \"count\": 1 } ] } }", "exactly one of", TestName = "Block and module")]
    [TestCase("{ \"format\": \"optpoline-profile\", \"version\": 1,\n \"sites\": { \"s\": [ { \"colour\": 1 } ] } }", ":2:", TestName = "Unknown key")]
    public void Damaged_profiles_are_refused_with_their_path_and_nothing_changes(string text, string expected)
    {
        var path = Path.Combine(_directory, "damaged.profile");
        File.WriteAllText(path, text);
        Assert.That(() => LearnedProfile.Load(path), Throws.TypeOf<ProfileException>().With.Message.StartsWith(path).And.Message.Contains(expected));
        using var host = new Host();
        Assert.That(host.Engine.TryLoadProfile(path, out var status, out var error), Is.False);
        Assert.That(error, Does.StartWith(path));
        Assert.That(status, Is.EqualTo(ProfileStatus.None));
        Assert.That(host.Engine.TryLoadProfile(Path.Combine(_directory, "missing.profile"), out _, out error), Is.False);
        Assert.That(error, Does.Contain("cannot read"));
    }

    [Test]
    public void The_config_key_loads_a_profile_and_a_missing_one_is_a_warning()
    {
        var profile = new LearnedProfile();
        profile.Sites["site0"] = [Block("target0", 100)];
        profile.Save(Path.Combine(_directory, "start.profile"));
        var config = Path.Combine(_directory, "optpoline.json");
        File.WriteAllText(config, """{ "learning": { "background": false, "profile": "start.profile" } }""");
        using (var engine = OptpolineEngine.FromConfig(config))
        {
            Assert.That(engine.Profile.Path, Is.EqualTo(Path.Combine(_directory, "start.profile")));
            Assert.That(engine.Profile.Sites, Is.EqualTo(1));
            Assert.That(engine.ConfigWarnings, Is.Empty);
        }

        File.WriteAllText(config, """{ "learning": { "background": false, "profile": "missing.profile" } }""");
        using var second = OptpolineEngine.FromConfig(config);
        Assert.That(second.ConfigWarnings, Has.One.Contains("learning.profile").And.Contains("cannot read"));
        Assert.That(second.Profile, Is.EqualTo(ProfileStatus.None));
    }

    [Test]
    public void The_cli_merges_and_shows_profiles_and_refuses_a_damaged_one()
    {
        var a = new LearnedProfile();
        a.Sites["s"] = [Block("f", 3), Block("g", 1)];
        var b = new LearnedProfile();
        b.Sites["s"] = [Block("g", 5)];
        a.Save(Path.Combine(_directory, "a.profile"));
        b.Save(Path.Combine(_directory, "b.profile"));
        var merged = Path.Combine(_directory, "merged.profile");
        using var output = new StringWriter();
        using var error = new StringWriter();
        Assert.That(Program.Run(["profile", "merge", "-o", merged, Path.Combine(_directory, "a.profile"), Path.Combine(_directory, "b.profile")], output, error), Is.Zero, error.ToString());
        Assert.That(Program.Run(["profile", "show", merged], output, error), Is.Zero, error.ToString());
        var lines = output.ToString().Split('\n').Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries))).ToList();
        Assert.That(lines, Has.Member("s: 9 samples"));
        Assert.That(lines.IndexOf("66.7 % 6 g+0x0"), Is.GreaterThan(0).And.LessThan(lines.IndexOf("33.3 % 3 f+0x0")), output.ToString());

        File.WriteAllText(Path.Combine(_directory, "bad.profile"), "{");
        Assert.That(Program.Run(["profile", "show", Path.Combine(_directory, "bad.profile")], output, error), Is.EqualTo(4));
        Assert.That(error.ToString(), Does.Contain("bad.profile"));
    }

    private static ProfileTarget Block(string name, long count) => new() { Block = name, Offset = 0, Count = count };

    /// <summary>
    /// A small host: named targets target0..target3, and sites site0..site7 (two inline slots) in one
    /// loop; even sites call target0 only, odd sites target1 (90 %) and target2 (10 %).
    /// </summary>
    private sealed class Host : IDisposable
    {
        private readonly ulong* _tables;
        private readonly delegate* unmanaged<ulong, ulong*, ulong*, void> _loop;

        public Host(Func<int, string>? siteName = null)
        {
            siteName ??= j => $"site{j}";
            Engine = new OptpolineEngine(new EngineOptions { Learning = new LearningOptions { Enabled = true, Background = false } });
            Targets = [.. Enumerable.Range(0, 4).Select(i => CheckingTarget.EmitTicketed(Engine, Register.RAX, $"target{i}"))];
            var sites = new List<InlineSite>();
            _loop = SiteLoop.Emit(Engine, SiteCount, TableLength, _ => Register.RAX, (asm, j) =>
            {
                var site = Engine.CreateInlineSite(Register.RAX, 2, siteName(j));
                site.Emit(asm);
                sites.Add(site);
            });
            Sites = sites;
            _tables = (ulong*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(SiteCount * TableLength * 8, 64);
            for (var j = 0; j < SiteCount; j++)
            {
                for (var k = 0; k < TableLength; k++)
                {
                    _tables[(j * TableLength) + k] = j % 2 == 0 ? Targets[0] : k % 10 == 0 ? Targets[2] : Targets[1];
                }
            }
        }

        public OptpolineEngine Engine { get; }

        public ulong[] Targets { get; }

        public List<InlineSite> Sites { get; }

        public bool Promoted() => Sites.Select((s, j) => s.Targets.SequenceEqual(j % 2 == 0 ? [Targets[0]] : [Targets[1], Targets[2]])).All(x => x);

        public ulong Run(int iterations)
        {
            ulong wrong = 0;
            _loop((ulong)iterations, _tables, &wrong);
            return wrong;
        }

        public void Dispose()
        {
            Engine.Dispose();
            System.Runtime.InteropServices.NativeMemory.AlignedFree(_tables);
        }
    }
}
