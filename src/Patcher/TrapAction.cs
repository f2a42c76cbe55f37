namespace Optpoline.Patcher;

/// <summary>What a thread that hits a patch's temporary int3 does instead of running the half-written bytes.</summary>
public readonly record struct TrapAction
{
    private TrapAction(bool emulateCall, ulong target, ulong returnAddress)
    {
        EmulatesCall = emulateCall;
        Target = target;
        ReturnAddress = returnAddress;
    }

    /// <summary>Whether the handler emulates <c>call Target</c> (pushing <see cref="ReturnAddress"/>) rather than jumping.</summary>
    public bool EmulatesCall { get; }

    /// <summary>Where the thread continues.</summary>
    public ulong Target { get; }

    /// <summary>For an emulated call, the return address pushed (the address after the patched call).</summary>
    public ulong ReturnAddress { get; }

    /// <summary>Continue at <paramref name="target"/>, an address equivalent to the patched instruction (for example a slot's miss path).</summary>
    public static TrapAction ContinueAt(ulong target) => new(false, target, 0);

    /// <summary>Behave as <c>call target</c> executed by the patched instruction, returning to <paramref name="returnAddress"/>.</summary>
    public static TrapAction EmulateCall(ulong target, ulong returnAddress) => new(true, target, returnAddress);
}
