using Iced.Intel;
using Optpoline.Tests.Support;

namespace Optpoline.Tests.Learning;

/// <summary>The engine's learning switches: suspend, and learning off.</summary>
[NonParallelizable]
public sealed class EngineLearningTests
{
    [Test]
    public void Suspended_patching_refuses_requests_and_learns_without_changing_sites()
    {
        using var engine = new OptpolineEngine(new EngineOptions
        {
            Learning = new LearningOptions { Enabled = true, Background = false, SamplePeriod = 1 },
        });
        var targets = ChecksumCode.EmitTargets(engine, 2);
        var site = engine.CreateInlineSite(Register.RAX, 1);
        var driver = ChecksumCode.EmitDriver(engine, Register.RAX, site);
        engine.PatchingSuspended = true;
        Assert.That(() => site.Promote([targets[0]]), Throws.InvalidOperationException.With.Message.Contains("suspended"));

        var random = new Random(5);
        for (var i = 0; i < 100; i++)
        {
            ChecksumCode.Run(driver, Register.RAX, 0, targets[0], random);
        }

        var patches = engine.PatchStatistics.Patches;
        var epoch = engine.LearnEpoch();
        Assert.That(epoch.Samples, Is.EqualTo(100), "sampling goes on");
        Assert.That(epoch.Changes, Is.Zero);
        Assert.That(engine.PatchStatistics.Patches, Is.EqualTo(patches));

        engine.PatchingSuspended = false;
        for (var i = 0; i < 100; i++)
        {
            ChecksumCode.Run(driver, Register.RAX, 0, targets[0], random);
        }

        var resumed = engine.LearnEpoch();
        Assert.That(resumed.Changes, Is.EqualTo(1));
        Assert.That(resumed.Applied.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(site.Targets, Is.EqualTo(new[] { targets[0] }));
    }

    [Test]
    public void An_engine_that_does_not_learn_has_no_epochs_and_its_sites_fall_back_to_the_thunk()
    {
        using var engine = new OptpolineEngine();
        Assert.That(engine.IsLearning, Is.False);
        Assert.That(() => engine.LearnEpoch(), Throws.InvalidOperationException.With.Message.Contains("Learning.Enabled"));
        var site = engine.CreateOutlineSite(Register.RCX);
        var entry = new byte[5];
        engine.Code.Read(site.Entry, entry);
        Assert.That(entry[0], Is.EqualTo(0xE9));
        Assert.That((ulong)((long)site.Entry + 5 + BitConverter.ToInt32(entry, 1)), Is.EqualTo(site.Fallback), "learning off costs nothing: straight to the thunk");
    }
}
