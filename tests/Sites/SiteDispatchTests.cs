using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Sites;

/// <summary>
/// Every register x every slot count x every site state calls the function whose address was in the
/// register, with all other registers and the stack arguments unchanged (invariant 1, guarded).
/// </summary>
[TestFixture(FallbackKind.Retpoline, false)]
[TestFixture(FallbackKind.Indirect, false)]
[TestFixture(FallbackKind.Retpoline, true)]
public sealed class SiteDispatchTests(FallbackKind fallback, bool learning)
{
    private const int TargetCount = 12;
    private OptpolineEngine _engine = null!;
    private ulong[] _targets = null!;

    public static IEnumerable<Register> Registers => SiteRegisters.All;

    [OneTimeSetUp]
    public void CreateEngine()
    {
        // With learning on and a sample period of 1, every fallback call runs the sampling stub's sample path.
        _engine = new OptpolineEngine(new EngineOptions
        {
            Fallback = fallback,
            Learning = new LearningOptions { Enabled = learning, Background = false, SamplePeriod = 1 },
        });
        _targets = ChecksumCode.EmitTargets(_engine, TargetCount);
    }

    [OneTimeTearDown]
    public void DisposeEngine() => _engine.Dispose();

    [Test]
    public void Inline_site_calls_the_register_target_in_every_state(
        [ValueSource(nameof(Registers))] Register register, [Values(0, 1, 2)] int slots)
    {
        var site = _engine.CreateInlineSite(register, slots, $"inline-{register}-{slots}");
        var driver = ChecksumCode.EmitDriver(_engine, register, site);
        var random = new Random(register.GetHashCode() * 7 + slots);

        // Empty: every target takes the fallback.
        AssertAllTargetsDispatch(driver, register, random, "empty");

        // Inline hit (slots in use), outline hit (chain), miss (everything else), and every mix.
        var promotedCounts = new[] { 1, slots, slots + 1, slots + 6 }.Where(n => n > 0).Distinct();
        foreach (var count in promotedCounts)
        {
            site.Promote(_targets[..count]);
            Assert.That(site.Targets, Is.EqualTo(_targets[..count]));
            AssertAllTargetsDispatch(driver, register, random, $"promoted {count}");
        }

        // Reordered (swaps slots and chain), then reset.
        site.Promote([.. _targets[2..(2 + slots + 2)].Reverse()]);
        AssertAllTargetsDispatch(driver, register, random, "reordered");
        site.Reset();
        Assert.That(site.Targets, Is.Empty);
        AssertAllTargetsDispatch(driver, register, random, "reset");
        Assert.That(_engine.AuditCode(), Is.Empty);
        if (learning)
        {
            _engine.LearnEpoch();
            Assert.That(site.SampleCount, Is.GreaterThan(0), "the stub recorded this site's fallback calls");
        }
    }

    [Test]
    public void Outline_site_calls_the_register_target_in_every_state([ValueSource(nameof(Registers))] Register register)
    {
        var site = _engine.CreateOutlineSite(register, $"outline-{register}");
        var driver = ChecksumCode.EmitDriver(_engine, register, site: null, site.Entry);
        var random = new Random(register.GetHashCode());
        AssertAllTargetsDispatch(driver, register, random, "empty");
        foreach (var count in new[] { 1, 3, 6 })
        {
            site.Promote(_targets[..count]);
            AssertAllTargetsDispatch(driver, register, random, $"promoted {count}");
        }

        site.Reset();
        AssertAllTargetsDispatch(driver, register, random, "reset");
        Assert.That(_engine.AuditCode(), Is.Empty);
    }

    private void AssertAllTargetsDispatch(Optpoline.Memory.CodeBlock driver, Register register, Random random, string state)
    {
        for (var k = 0; k < _targets.Length; k++)
        {
            var (actual, expected) = ChecksumCode.Run(driver, register, k, _targets[k], random);
            Assert.That(actual, Is.EqualTo(expected), $"{state}: target {k} through {register}");
        }
    }
}
