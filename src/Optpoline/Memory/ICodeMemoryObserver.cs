namespace Optpoline.Memory;

/// <summary>What a trace needs to hear from code memory; called under the memory's lock, so it must not call back into it.</summary>
internal interface ICodeMemoryObserver
{
    /// <summary>A new region's executable view exists (its committed pages hold int3).</summary>
    void RegionReserved(ulong start, ulong size);

    /// <summary>The live block at <paramref name="address"/> is about to be freed; it holds <paramref name="code"/> and will hold int3.</summary>
    void BlockFreeing(ulong address, ReadOnlySpan<byte> code);
}
