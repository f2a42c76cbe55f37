using static Optpoline.Tests.Support.ExternalProcess;

namespace Optpoline.Tests.Native;

/// <summary>
/// The C ABI end to end: <c>dotnet publish</c> builds liboptpoline.so with NativeAOT, gcc builds the C
/// sample host against optpoline.h, and the host JITs code into engine memory, calls it through both
/// kinds of site from several threads across phase changes, toggles promotion through the config
/// file, and checks every result and every error path.
/// </summary>
[NonParallelizable]
[Category("Native")]
public sealed class NativeHostTests
{
    private static readonly string NativeProject = Path.Combine(Repository, "src", "Optpoline.Native");

    [Test]
    public void The_C_sample_host_runs_on_the_NativeAOT_library()
    {
        Require("gcc", "the sample host builds with gcc");
        Require("clang", "NativeAOT links with clang");

        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-native-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(directory);
        try
        {
            var publish = Run("dotnet", $"publish \"{NativeProject}\" -c Release -r linux-x64 -o \"{directory}\" -nologo", TimeSpan.FromMinutes(10));
            Assert.That(publish.Code, Is.Zero, publish.Output);
            var library = Path.Combine(directory, "liboptpoline.so");
            Assert.That(File.Exists(library), Is.True, publish.Output);

            var host = Path.Combine(directory, "sample_host");
            var compile = Run("gcc", $"-std=c99 -O2 -Wall -Wextra -Werror -I \"{NativeProject}\" \"{Path.Combine(NativeProject, "sample_host.c")}\" -L \"{directory}\" -loptpoline -Wl,-rpath,\"{directory}\" -lpthread -o \"{host}\"", TimeSpan.FromMinutes(2));
            Assert.That(compile.Code, Is.Zero, compile.Output);

            var run = Run(host, $"\"{Path.Combine(directory, "optpoline.json")}\"", TimeSpan.FromMinutes(2));
            TestContext.Out.WriteLine(run.Output);
            Assert.That(run.Code, Is.Zero, run.Output);
            Assert.That(run.Output, Does.Contain("wrong=0 failures=0"));
            Assert.That(run.Output, Does.Not.Contain("FAILED"));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}
