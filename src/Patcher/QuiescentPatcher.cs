namespace Optpoline.Patcher;

/// <summary>
/// Applies a batch of patches to code that no thread is executing: a plain copy, after validation.
/// It is correct only while the caller guarantees quiescence (code not yet published, or every
/// thread that could run it stopped); live code needs the INT3 protocol instead.
/// </summary>
/// <remarks>
/// Validation happens for the whole batch before the first write, so a rejected batch leaves the code
/// exactly as it was:
/// 1. every patch's expected bytes are what the code holds now;
/// 2. no two patches overlap;
/// 3. patches that change nothing are dropped.
/// </remarks>
public static class QuiescentPatcher
{
    /// <summary>Validates and applies <paramref name="patches"/>; returns how many changed bytes.</summary>
    /// <exception cref="PatchRejectedException">Validation failed; nothing was written.</exception>
    public static int Apply(ICodeView code, IReadOnlyList<CodePatch> patches)
    {
        ArgumentNullException.ThrowIfNull(code);
        ArgumentNullException.ThrowIfNull(patches);
        var effective = Validate(code, patches);
        foreach (var patch in effective)
        {
            code.Write(patch.Address, patch.Replacement.Span);
        }

        return effective.Count;
    }

    /// <summary>
    /// Checks a batch against the current code and returns the patches that change something, sorted
    /// by address.
    /// </summary>
    /// <exception cref="PatchRejectedException">A patch's expected bytes differ from the code, or two patches overlap.</exception>
    public static IReadOnlyList<CodePatch> Validate(ICodeView code, IReadOnlyList<CodePatch> patches)
    {
        ArgumentNullException.ThrowIfNull(code);
        ArgumentNullException.ThrowIfNull(patches);
        var sorted = patches.OrderBy(p => p.Address).ToList();
        for (var i = 1; i < sorted.Count; i++)
        {
            if (sorted[i - 1].Address + (ulong)sorted[i - 1].Length > sorted[i].Address)
            {
                throw new PatchRejectedException(
                    $"Patches overlap: {sorted[i - 1]} and {sorted[i]}. Merge them into one patch; nothing was written.");
            }
        }

        var effective = new List<CodePatch>(sorted.Count);
        Span<byte> current = stackalloc byte[64];
        foreach (var patch in sorted)
        {
            var now = patch.Length <= current.Length ? current[..patch.Length] : new byte[patch.Length];
            code.Read(patch.Address, now);
            if (!now.SequenceEqual(patch.Expected.Span))
            {
                throw new PatchRejectedException(
                    $"Code at 0x{patch.Address:X} holds [{Convert.ToHexString(now)}], not the expected " +
                    $"[{Convert.ToHexString(patch.Expected.Span)}]; the patch was built from a stale view. Nothing was written.");
            }

            if (!patch.IsNoOp)
            {
                effective.Add(patch);
            }
        }

        return effective;
    }
}
