using BenchmarkDotNet.Running;

namespace Optpoline.Bench;

/// <summary>Entry point: every benchmark class of this assembly, selected with BenchmarkDotNet's arguments (e.g. --filter *CallCost*).</summary>
public static class Program
{
    public static void Main(string[] args) => BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}
