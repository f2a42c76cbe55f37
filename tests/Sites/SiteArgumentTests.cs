using Iced.Intel;
using Optpoline.Sites;
using Optpoline.Tests.Support;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Sites;

/// <summary>Bad input to sites and the engine gives actionable exceptions and changes nothing.</summary>
public sealed class SiteArgumentTests
{
    private OptpolineEngine _engine = null!;

    [OneTimeSetUp]
    public void CreateEngine() => _engine = new OptpolineEngine();

    [OneTimeTearDown]
    public void DisposeEngine() => _engine.Dispose();

    [TestCase(Register.RSP)]
    [TestCase(Register.R11)]
    [TestCase(Register.EAX)]
    [TestCase(Register.None)]
    [TestCase(Register.XMM0)]
    public void Registers_that_cannot_carry_a_target_are_refused(Register register)
    {
        Assert.That(() => _engine.CreateInlineSite(register), Throws.ArgumentException.With.Message.Contains("R11"));
        Assert.That(() => _engine.CreateOutlineSite(register), Throws.ArgumentException);
    }

    [TestCase(-1)]
    [TestCase(3)]
    public void Slot_counts_outside_zero_to_two_are_refused(int slots) =>
        Assert.That(() => _engine.CreateInlineSite(Register.RAX, slots), Throws.TypeOf<ArgumentOutOfRangeException>());

    [Test]
    public void Bad_target_lists_are_refused_before_any_change()
    {
        var site = _engine.CreateOutlineSite(Register.RCX);
        var target = _engine.Code.Allocate(16).Address;
        Assert.That(() => site.Promote([target, target]), Throws.ArgumentException.With.Message.Contains("duplicates"));
        Assert.That(() => site.Promote([0UL]), Throws.ArgumentException.With.Message.Contains("is 0"));
        Assert.That(() => site.Promote(Enumerable.Range(1, 7).Select(i => target + (ulong)i).ToList()), Throws.ArgumentException.With.Message.Contains("at most 6"));
        Assert.That(site.Targets, Is.Empty);
        Assert.That(site.PatchCount, Is.Zero);
    }

    [Test]
    public void An_unbound_site_cannot_be_promoted_or_emitted_twice()
    {
        var site = _engine.CreateInlineSite(Register.RDX);
        Assert.That(() => site.Promote([0x1000UL]), Throws.InvalidOperationException.With.Message.Contains("not bound"));
        var asm = new Assembler(64);
        site.Emit(asm);
        Assert.That(() => site.Emit(new Assembler(64)), Throws.InvalidOperationException.With.Message.Contains("emitted already"));
    }

    [Test]
    public void Site_bytes_rewritten_by_the_assembler_are_rejected_at_bind()
    {
        var site = _engine.CreateInlineSite(Register.RAX, 1);
        var block = _engine.Code.Allocate(64);
        var bogus = new byte[24];
        bogus.AsSpan().Fill(0x90);
        var first = _engine.Rseq is null ? "expected 'movabs r11" : "expected 'mov qword fs:[rseq_cs]";
        Assert.That(() => site.Bind(block.Address, bogus), Throws.InvalidOperationException.With.Message.Contains(first));
        Assert.That(site.IsBound, Is.False);
    }

    [Test]
    public void Sites_outside_engine_memory_are_rejected_at_bind()
    {
        var site = _engine.CreateInlineSite(Register.RAX, 0);
        Assert.That(() => site.Bind(0x10000, new byte[5]), Throws.InvalidOperationException.With.Message.Contains("not inside engine code memory"));
    }

    [Test]
    public void Assemble_binds_every_site_emitted_into_the_assembler()
    {
        var a = _engine.CreateInlineSite(Register.RAX, 1);
        var b = _engine.CreateInlineSite(Register.R9, 0);
        var asm = new Assembler(64);
        asm.mov(rax, rdi);
        a.Emit(asm);
        asm.mov(r9, rsi);
        b.Emit(asm);
        asm.ret();
        var code = _engine.Assemble(asm);
        Assert.That(a.IsBound && b.IsBound, Is.True);
        Assert.That(a.Address, Is.EqualTo(code.Address + 3));
        // Iced may shorten the jne to rel8 when the stub is near; the bound layout follows what it chose.
        var arm = _engine.Rseq is null ? 0UL : 13UL;
        Assert.That(b.Address - a.Address - 3 - arm, Is.EqualTo(20).Or.EqualTo(24));
        Assert.That(_engine.AuditCode(), Is.Empty);
    }

    [Test]
    public void Write_checks_that_the_site_fits()
    {
        var site = _engine.CreateInlineSite(Register.RAX, 1);
        var length = _engine.Rseq is null ? 24 : 37;   // the arming store is 13 bytes
        Assert.That(InlineSite.LengthFor(_engine, 1), Is.EqualTo(length));
        var block = _engine.Code.Allocate(length + 8);
        Assert.That(() => site.Write(block, block.Size - length + 1), Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains($"{length} bytes"));
        Assert.That(site.Write(block, block.Size - length), Is.EqualTo(length));
    }
}
