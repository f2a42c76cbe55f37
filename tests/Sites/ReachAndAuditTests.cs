using System.Runtime.InteropServices;
using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Sites;
using Optpoline.Tests.Support;
using static Iced.Intel.AssemblerRegisters;

namespace Optpoline.Tests.Sites;

/// <summary>No promotion out of direct reach, and no indirect branch in emitted code outside the thunks.</summary>
public sealed class ReachAndAuditTests
{
    private OptpolineEngine _engine = null!;
    private ulong[] _targets = null!;

    [OneTimeSetUp]
    public void CreateEngine()
    {
        _engine = new OptpolineEngine();
        _targets = ChecksumCode.EmitTargets(_engine, 8);
    }

    [OneTimeTearDown]
    public void DisposeEngine() => _engine.Dispose();

    [TestCase(0)]
    [TestCase(1)]
    [TestCase(2)]
    public void A_far_target_is_refused_counted_and_leaves_the_site_unchanged(int slots)
    {
        var site = _engine.CreateInlineSite(Register.RAX, slots);
        var driver = ChecksumCode.EmitDriver(_engine, Register.RAX, site);
        site.Promote(_targets[..3]);
        var before = SiteBytes(site);
        var far = site.Address + (3UL << 30);

        // Far in an inline slot, and far in the outline chain.
        Assert.That(() => site.Promote([far, _targets[1]]), Throws.TypeOf<TargetOutOfReachException>()
            .With.Message.Contains($"0x{far:X}").And.Property(nameof(TargetOutOfReachException.Targets)).EqualTo(new[] { far }));
        Assert.That(site.TryPromote([.. _targets[..slots], far], out var error), Is.False);
        Assert.That(error, Does.Contain("cannot reach"));

        Assert.That(site.Targets, Is.EqualTo(_targets[..3]));
        Assert.That(SiteBytes(site), Is.EqualTo(before), "not a byte changed");
        Assert.That(site.UnreachableCount, Is.EqualTo(1));
        var (actual, expected) = ChecksumCode.Run(driver, Register.RAX, 1, _targets[1], new Random(1));
        Assert.That(actual, Is.EqualTo(expected));
    }

    [Test]
    public void Iced_would_turn_a_far_call_into_an_indirect_call_but_the_engine_encoder_refuses()
    {
        var rip = 0x5555_0000_0000UL;
        var far = rip + (4UL << 30);
        var asm = new Assembler(64);
        asm.call(far);
        var writer = new ArrayCodeWriter();
        asm.Assemble(writer, rip);
        Assert.That(CodeAudit.Check(writer.ToArray(), rip), Has.Some.Contains("indirect branch"), "Iced's default: call [rip+X]");
        Assert.That(() => X64.Encode(rip, [Instruction.CreateBranch(Code.Call_rel32_64, far)]), Throws.InvalidOperationException);
    }

    [Test]
    public void The_audit_finds_indirect_branches_and_garbage()
    {
        var rip = 0x1000UL;
        Assert.That(CodeAudit.Check([0xFF, 0xD0], rip), Has.Count.EqualTo(1), "call rax");
        Assert.That(CodeAudit.Check([0xFF, 0x25, 0, 0, 0, 0], rip), Has.Count.EqualTo(1), "jmp [rip]");
        Assert.That(CodeAudit.Check([0xFF, 0xE0], rip, allowIndirect: true), Is.Empty, "thunks may jmp R");
        Assert.That(CodeAudit.Check([0x0F, 0x0B, 0x0F], rip), Has.Some.Contains("past the end").Or.Some.Contains("undecodable"));
        Assert.That(CodeAudit.Check([0x49, 0xBB, 1, 2, 3, 4, 5, 6, 7, 8, 0xE8, 0, 0, 0, 0], rip), Is.Empty);
    }

    [Test]
    public void Every_emitted_byte_decodes_without_indirect_branches_outside_the_thunks()
    {
        var sites = new List<Site>();
        foreach (var register in SiteRegisters.All)
        {
            foreach (var slots in new[] { 0, 1, 2 })
            {
                var site = _engine.CreateInlineSite(register, slots);
                ChecksumCode.EmitDriver(_engine, register, site);
                sites.Add(site);
            }

            sites.Add(_engine.CreateOutlineSite(register));
        }

        Assert.That(_engine.AuditCode(), Is.Empty, "empty");
        foreach (var site in sites)
        {
            site.Promote(_targets[..Math.Min(site.MaxTargets, 1 + (site.InlineSlotCount * 2))]);
        }

        Assert.That(_engine.AuditCode(), Is.Empty, "promoted");
        foreach (var site in sites)
        {
            site.Promote(_targets[..site.MaxTargets]);
        }

        Assert.That(_engine.AuditCode(), Is.Empty, "full");
    }

    [Test]
    public void Thunks_and_a_promoted_slot_have_the_documented_bytes()
    {
        var thunk = _engine.GetThunk(Register.R12, FallbackKind.Retpoline);
        var bytes = new byte[17];
        _engine.Code.Read(thunk, bytes);
        Assert.That(Convert.ToHexString(bytes), Is.EqualTo(
            "E807000000" +   // call 1f
            "F390" +         // 2: pause
            "0FAEE8" +       // lfence
            "EBF9" +         // jmp 2b
            "4C892424" +     // 1: mov [rsp], r12
            "C3"));          // ret
        var indirect = new byte[3];
        _engine.Code.Read(_engine.GetThunk(Register.R12, FallbackKind.Indirect), indirect);
        Assert.That(Convert.ToHexString(indirect), Is.EqualTo("41FFE4"), "jmp r12");

        var site = _engine.CreateInlineSite(Register.RBX, 1);
        var block = _engine.Code.Allocate(64);
        site.Write(block, 0);

        // The arming store: mov qword fs:[rseq_cs], imm32 (the slot's rseq descriptor, below 2 GiB).
        var rseq = _engine.Rseq;
        Assert.That(rseq, Is.Not.Null, _engine.Scheduler.Patcher.RestartableSequencesUnavailable);
        var arm = new byte[13];
        _engine.Code.Read(site.Address, arm);
        Assert.That(Convert.ToHexString(arm[..5]), Is.EqualTo("6448C70425"), "mov qword fs:[disp32], imm32");
        Assert.That(BitConverter.ToInt32(arm, 5), Is.EqualTo(rseq!.CsFieldOffset), "fs:[__rseq_offset + 8]: rseq.rseq_cs");
        var descriptor = (nint)BitConverter.ToInt32(arm, 9);
        var slot = site.Address + 13;

        var empty = new byte[24];
        _engine.Code.Read(slot, empty);
        Assert.That(Convert.ToHexString(empty[..13]), Does.StartWith("E9").And.EndWith("CCCCCCCCCC4C39DB"), "jmp MISS; int3 x5; cmp rbx, r11");
        site.Promote([0x1000UL + block.Address]);
        var promoted = new byte[24];
        _engine.Code.Read(slot, promoted);
        var hex = Convert.ToHexString(promoted);
        Assert.That(hex[..4], Is.EqualTo("49BB"), "movabs r11, T");
        Assert.That(BitConverter.ToUInt64(promoted, 2), Is.EqualTo(0x1000UL + block.Address));
        Assert.That(hex.Substring(20, 6), Is.EqualTo("4C39DB"), "cmp rbx, r11");
        Assert.That(hex.Substring(26, 4), Is.EqualTo("0F85"), "jne rel32 MISS");
        Assert.That(promoted[19], Is.EqualTo(0xE8), "call rel32");
        Assert.That(slot + 24 + BitConverter.ToUInt32(promoted, 20), Is.EqualTo(0x1000UL + block.Address));

        // struct rseq_cs { u32 version, flags; u64 start_ip, post_commit_offset, abort_ip }: the window is
        // the compare to the end of the call; the abort handler (signature, then jmp back to the arm) is in the stub.
        Assert.That(Marshal.ReadInt64(descriptor), Is.Zero, "version 0, flags 0");
        Assert.That((ulong)Marshal.ReadInt64(descriptor, 8), Is.EqualTo(slot + 10), "start_ip: the cmp");
        Assert.That(Marshal.ReadInt64(descriptor, 16), Is.EqualTo(14), "post_commit_offset: cmp, jne rel32, call");
        var abort = (ulong)Marshal.ReadInt64(descriptor, 24);
        Assert.That(abort, Is.EqualTo(site.Slots[0].Restart));
        var handler = new byte[9];
        _engine.Code.Read(abort - 4, handler);
        Assert.That(Convert.ToHexString(handler[..5]), Is.EqualTo("53300553E9"), "RSEQ_SIG, jmp rel32");
        Assert.That(abort + 5 + (ulong)(long)BitConverter.ToInt32(handler, 5), Is.EqualTo(site.Address), "the abort handler restarts at the arm");
    }

    private byte[] SiteBytes(InlineSite site)
    {
        var bytes = new byte[site.InlineLength];
        _engine.Code.Read(site.Address, bytes);
        var stub = site.Stub.IsEmpty ? [] : site.Stub.GetExecutableSpan().ToArray();
        return [.. bytes, .. stub];
    }
}
