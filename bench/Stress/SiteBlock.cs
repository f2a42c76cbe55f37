using Iced.Intel;
using Optpoline.Sites;

namespace Optpoline.Stress;

/// <summary>Host code made of many inline sites in a row (for batch measurements and tests; never called).</summary>
public static class SiteBlock
{
    /// <summary>Emits <paramref name="count"/> one-slot inline sites on RAX into one block of engine code and binds them.</summary>
    public static List<InlineSite> Emit(OptpolineEngine engine, int count)
    {
        ArgumentNullException.ThrowIfNull(engine);
        var asm = new Assembler(64);
        var sites = new List<InlineSite>(count);
        for (var i = 0; i < count; i++)
        {
            var site = engine.CreateInlineSite(Register.RAX, 1);
            site.Emit(asm);
            sites.Add(site);
        }

        asm.ret();
        engine.Assemble(asm);
        return sites;
    }
}
