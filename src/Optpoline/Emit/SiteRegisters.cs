using Iced.Intel;

namespace Optpoline.Emit;

/// <summary>The registers a site can dispatch on: every 64-bit GPR except rsp and r11 (the site's scratch).</summary>
public static class SiteRegisters
{
    /// <summary>All usable registers, in encoding order.</summary>
    public static IReadOnlyList<Register> All { get; } =
    [
        Register.RAX, Register.RCX, Register.RDX, Register.RBX, Register.RBP, Register.RSI, Register.RDI,
        Register.R8, Register.R9, Register.R10, Register.R12, Register.R13, Register.R14, Register.R15,
    ];

    /// <summary>Whether <paramref name="register"/> can carry a site's target.</summary>
    public static bool IsValid(Register register) => All.Contains(register);

    /// <summary>Throws an actionable exception for a register a site cannot use.</summary>
    /// <exception cref="ArgumentException">The register is not a 64-bit GPR, or is rsp or r11.</exception>
    public static void Validate(Register register, string parameterName)
    {
        if (!IsValid(register))
        {
            throw new ArgumentException(
                $"{register} cannot carry a site's target: use a 64-bit general-purpose register other than RSP and R11 " +
                "(R11 is the site's scratch register, as in the kernel's retpoline ABI).", parameterName);
        }
    }

    internal static int IndexOf(Register register) => ((IList<Register>)All).IndexOf(register);
}
