using System.Runtime.InteropServices;
using Iced.Intel;
using static Optpoline.Tests.Support.ExternalProcess;

namespace Optpoline.Tests.Bench;

/// <summary>
/// The smoke variant of the Peers benchmark's C side: bench/native/peers.sh builds the three gcc peers
/// from a 90 % / 10 % table, each makes exactly the calls asked for, and each is the code it claims to
/// be: -O2 calls through the register, the retpoline build never does, and the profile-guided build
/// compares against the hot target and calls it directly (gcc promoted it from the training run).
/// </summary>
[NonParallelizable]
[Category("Native")]
public sealed unsafe class PeerBuildTests
{
    private const int TableLength = 4096;

    [Test]
    public void The_gcc_peers_build_run_and_are_what_they_claim()
    {
        Require("gcc", "the benchmark's C peers build with gcc");
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-peers-test-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(directory);
        var libraries = new List<nint>();
        try
        {
            // The table file the benchmark writes: phases, rounds, calls per phase, then the indices.
            var random = new Random(5);
            var indices = Enumerable.Range(0, TableLength).Select(_ => (byte)(random.Next(10) == 0 ? 1 : 0)).ToArray();
            var tables = Path.Combine(directory, "tables.bin");
            using (var writer = new BinaryWriter(File.Create(tables)))
            {
                writer.Write(1u);
                writer.Write(2u);
                writer.Write((ulong)(1 << 20));
                writer.Write(indices);
            }

            var build = Run("bash", $"\"{Path.Combine(Repository, "bench", "native", "peers.sh")}\" \"{directory}\" \"{tables}\"", TimeSpan.FromMinutes(2));
            Assert.That(build.Code, Is.Zero, build.Output);

            foreach (var name in new[] { "O2", "retpoline", "pgo" })
            {
                var library = NativeLibrary.Load(Path.Combine(directory, $"libpeers-{name}.so"));
                libraries.Add(library);
                var peerTargets = (delegate* unmanaged<void**, int, int>)NativeLibrary.GetExport(library, "peer_targets");
                var loopAddress = NativeLibrary.GetExport(library, "peer_loop");
                var loop = (delegate* unmanaged<ulong, ulong*, ulong>)loopAddress;
                var targets = new ulong[64];
                fixed (ulong* at = targets)
                {
                    Assert.That(peerTargets((void**)at, 64), Is.EqualTo(64));
                }

                Assert.That(targets.Distinct().Count(), Is.EqualTo(64), "gcc folded identical targets");
                var table = indices.Select(i => targets[i]).ToArray();
                fixed (ulong* t = table)
                {
                    Assert.That(loop(100_003, t), Is.EqualTo(100_003UL), $"{name}: every call adds one");
                }

                var calls = Calls(loopAddress);
                switch (name)
                {
                    case "O2":
                        Assert.That(calls.Any(c => c.IsIndirect), Is.True, $"O2 calls through the register: {string.Join("; ", calls)}");
                        break;
                    case "retpoline":
                        Assert.That(calls.Any(c => c.IsIndirect), Is.False, $"retpolines leave no indirect call: {string.Join("; ", calls)}");
                        break;
                    default:
                        Assert.That(calls.Any(c => c.IsIndirect), Is.False, $"the PGO build keeps retpolines: {string.Join("; ", calls)}");
                        Assert.That(calls.Any(c => c.Target == targets[0]), Is.True, $"gcc promoted the hot target 0x{targets[0]:X}: {string.Join("; ", calls)}");
                        break;
                }
            }
        }
        finally
        {
            libraries.ForEach(NativeLibrary.Free);
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>The calls in the first 512 bytes of the loop function, up to its first ret.</summary>
    private static List<(bool IsIndirect, ulong Target)> Calls(nint function)
    {
        var bytes = new byte[512];
        Marshal.Copy(function, bytes, 0, bytes.Length);
        var decoder = Decoder.Create(64, new ByteArrayCodeReader(bytes), (ulong)function);
        var calls = new List<(bool, ulong)>();
        while (decoder.IP < (ulong)function + (ulong)bytes.Length - 16)
        {
            var instruction = decoder.Decode();
            if (instruction.FlowControl == FlowControl.Call)
            {
                calls.Add((false, instruction.NearBranchTarget));
            }
            else if (instruction.FlowControl == FlowControl.IndirectCall)
            {
                calls.Add((true, 0));
            }
            else if (instruction.FlowControl == FlowControl.Return && calls.Count > 0)
            {
                break;
            }
        }

        return calls;
    }
}
