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
        _stub = engine.Code.Allocate(16, 16);
        var fallback = engine.GetFallback(register);
        X64.Rel32(X64.JmpRel32, _stub.Address, fallback).CopyTo(_stub.GetWritableSpan());
        OutLink = new Link(_stub.Address, X64.JmpRel32, fallback);
    }

    /// <inheritdoc/>
    public override SiteKind Kind => SiteKind.Outline;

    /// <summary>The address the host calls (<c>call Entry</c>) with the target in <see cref="Site.Register"/>.</summary>
    public ulong Entry => _stub.Address;

    internal override CodeBlock Stub => _stub;
}
