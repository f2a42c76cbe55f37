using System.Reflection;
using System.Runtime.CompilerServices;

namespace Optpoline.Bench;

/// <summary>
/// Distinct managed targets <c>ulong f(ulong x) =&gt; x + 1</c> for the .NET peers: one generic method
/// instantiated over distinct value types (six nested bits), so that each has its own code and its
/// own address, as distinct methods would, without 64 copies in the source.
/// </summary>
internal static class ManagedTargets
{
    /// <summary>Static methods <c>ulong (ulong)</c>, distinct, never inlined.</summary>
    public static MethodInfo[] Methods(int count)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, 64);
        var methods = new MethodInfo[count];
        for (var i = 0; i < count; i++)
        {
            var type = typeof(End);
            for (var bit = 0; bit < 6; bit++)
            {
                type = ((i >> bit) & 1) == 0 ? typeof(Zero<>).MakeGenericType(type) : typeof(One<>).MakeGenericType(type);
            }

            methods[i] = typeof(Target<>).MakeGenericType(type).GetMethod(nameof(Target<End>.Call))!;
        }

        return methods;
    }

    private struct End;

    private struct Zero<T>;

    private struct One<T>;

    private static class Target<T>
        where T : struct
    {
        [MethodImpl(MethodImplOptions.NoInlining)]
        public static ulong Call(ulong x) => x + 1;
    }
}
