using Iced.Intel;
using Optpoline.Emit;
using Optpoline.Memory;

namespace Optpoline.Sites;

/// <summary>
/// A site that lives entirely in engine memory, for hosts whose JIT cannot embed the engine's bytes:
/// the host emits <c>call Entry</c> with the target in <see cref="Site.Register"/>. <c>Entry</c> is a
/// patchable <c>jmp</c> to an outline chain or to the fallback.
/// </summary>
public sealed class OutlineSite : Site
{
    private readonly CodeBlock _stub;

    internal OutlineSite(OptpolineEngine engine, Register register, string name)
        : base(engine, register, 0, name)
    {
        // Entry: jmp OUT. While learning, OUT starts as the site's own tail right behind it, which loads
        // the site's key (its entry address) into r11 for the shared sampling stub:
        // +0 jmp tail | +5 movabs r11, entry | +15 jmp learn_by_key_R.
        var learning = engine.LearningTail(register, byKey: true);
        _stub = engine.Code.Allocate(learning is null ? 16 : 32, 16);
        var code = _stub.GetWritableSpan();
        if (learning is { } stub)
        {
            Tail = _stub.Address + X64.Rel32Length;
            X64.MovR11(_stub.Address).CopyTo(code[X64.Rel32Length..]);
            X64.Rel32(X64.JmpRel32, Tail + X64.MovAbsLength, stub).CopyTo(code[(X64.Rel32Length + X64.MovAbsLength)..]);
        }
        else
        {
            Tail = engine.GetFallback(register);
        }

        X64.Rel32(X64.JmpRel32, _stub.Address, Tail).CopyTo(code);
        OutLink = new Link(_stub.Address, X64.JmpRel32, Tail);
        engine.Publish(_stub, $"{name}_entry");
        engine.SiteBound(this, _stub.Address);
    }

    /// <inheritdoc/>
    public override SiteKind Kind => SiteKind.Outline;

    /// <summary>The address the host calls (<c>call Entry</c>) with the target in <see cref="Site.Register"/>.</summary>
    public ulong Entry => _stub.Address;

    internal override CodeBlock Stub => _stub;
}
