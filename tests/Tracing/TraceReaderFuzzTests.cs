using Iced.Intel;
using Optpoline.Patcher.Tracing;
using Optpoline.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary>
/// The trace readers take any bytes: a well-formed file is read, a cut-short last record is read up
/// to it with a warning, and everything else fails with a <see cref="TraceFormatException"/> that
/// names the file, never another exception.
/// </summary>
[NonParallelizable]
public sealed class TraceReaderFuzzTests
{
    private static readonly Lazy<(byte[] Perf, byte[] Jit, byte[] Snapshot)> Sample = new(MakeSample);

    public delegate void Parse(byte[] file);

    private static IEnumerable<TestCaseData> Formats()
    {
        yield return new TestCaseData("perf.data", (Parse)(f => PerfDataReader.Parse(f, "fuzz.data")), (Func<byte[]>)(() => Sample.Value.Perf)).SetName("perf.data");
        yield return new TestCaseData("jitdump", (Parse)(f => JitDumpReader.Parse(f, "fuzz.dump")), (Func<byte[]>)(() => Sample.Value.Jit)).SetName("jitdump");
        yield return new TestCaseData("snapshot", (Parse)(f => CodeSnapshot.Parse(f, "fuzz.bin")), (Func<byte[]>)(() => Sample.Value.Snapshot)).SetName("snapshot");
    }

    [TestCaseSource(nameof(Formats))]
    public void Random_and_mutated_inputs_are_read_or_refused_with_a_clear_error(string format, Parse parse, Func<byte[]> sample)
    {
        var valid = sample();
        Assert.That(() => parse(valid), Throws.Nothing, $"the sample {format} is valid");
        var random = new Random(20261126);
        int refused = 0, read = 0;
        for (var i = 0; i < 3000; i++)
        {
            var input = Mutate(valid, random);
            try
            {
                parse(input);
                read++;
            }
            catch (TraceFormatException e)
            {
                Assert.That(e.Message, Does.StartWith("fuzz."), "the message names the file");
                refused++;
            }
            catch (Exception e)
            {
                Assert.Fail($"{format} mutation {i} ({input.Length} bytes) threw {e.GetType().Name}: {e.Message}");
            }
        }

        TestContext.Out.WriteLine($"{format}: {read} read, {refused} refused");
        Assert.That(refused, Is.GreaterThan(100), "mutations are refused");
        Assert.That(read, Is.GreaterThan(100), "harmless mutations (in code bytes) still read");
    }

    [Test]
    public void A_perf_data_file_cut_anywhere_in_its_records_reads_with_a_warning()
    {
        var valid = Sample.Value.Perf;
        var full = PerfDataReader.Parse(valid, "cut.data");
        Assert.That(full.Warnings, Is.Empty);
        for (var length = valid.Length - 1; length >= PerfDataWriter.DataOffset; length -= 7)
        {
            var cut = PerfDataReader.Parse(valid.AsSpan(0, length), "cut.data");
            Assert.That(cut.Records, Has.Count.LessThan(full.Records.Count));
            Assert.That(cut.Warnings, Is.Not.Empty, $"cut at {length}");
            Assert.That(cut.Records, Is.EqualTo(full.Records.Take(cut.Records.Count)).Using<PerfRecord>((a, b) => a.Offset == b.Offset && a.Type == b.Type));
        }

        for (var length = 0; length < PerfDataWriter.DataOffset; length += 5)
        {
            Assert.That(() => PerfDataReader.Parse(valid.AsSpan(0, length), "cut.data"), Throws.TypeOf<TraceFormatException>().With.Message.Contains("cut.data"));
        }
    }

    [Test]
    public void A_jitdump_cut_in_its_last_record_reads_with_a_warning()
    {
        var valid = Sample.Value.Jit;
        var full = JitDumpReader.Parse(valid, "cut.dump");
        Assert.That(full.Closed, Is.True);
        Assert.That(full.Warnings, Is.Empty);
        var cut = JitDumpReader.Parse(valid.AsSpan(0, valid.Length - 20), "cut.dump");
        Assert.That(cut.Warnings.Single(), Does.Contain("cut short"));
        Assert.That(cut.Loads, Has.Count.EqualTo(full.Loads.Count - 1), "the close record (16 bytes) and the last load's tail are gone");
        Assert.That(() => JitDumpReader.Parse(valid.AsSpan(0, 39), "cut.dump"), Throws.TypeOf<TraceFormatException>().With.Message.Contains("shorter than a jitdump header"));
    }

    [Test]
    public void Replay_of_a_damaged_trace_directory_reads_or_refuses_it_clearly()
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-fuzzdir-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(directory);
        try
        {
            var random = new Random(11);
            var (perf, _, snapshot) = Sample.Value;
            for (var i = 0; i < 1000; i++)
            {
                File.WriteAllBytes(Path.Combine(directory, TraceFiles.TextPokes), i % 2 == 0 ? Mutate(perf, random) : perf);
                File.WriteAllBytes(Path.Combine(directory, TraceFiles.StartSnapshot), i % 2 == 1 ? Mutate(snapshot, random) : snapshot);
                try
                {
                    var replay = TraceReplay.Open(directory);
                    replay.Verify();
                    var (start, size) = replay.Regions[0];
                    replay.ReadForward(start, (int)Math.Min(size, 4096), replay.LastTime);
                    foreach (var change in replay.Changes.Take(5))
                    {
                        TraceReplay.Disassemble(change.Address, change.New);
                        replay.Describe(change);
                    }
                }
                catch (TraceFormatException)
                {
                }
                catch (Exception e)
                {
                    Assert.Fail($"damaged trace {i} threw {e.GetType().Name}: {e.Message}");
                }
            }
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void Garbage_is_refused_by_every_reader()
    {
        var random = new Random(7);
        for (var i = 0; i < 200; i++)
        {
            var garbage = new byte[random.Next(0, 4096)];
            random.NextBytes(garbage);
            Assert.That(() => PerfDataReader.Parse(garbage, "g.data"), Throws.TypeOf<TraceFormatException>());
            Assert.That(() => JitDumpReader.Parse(garbage, "g.dump"), Throws.TypeOf<TraceFormatException>());
            Assert.That(() => CodeSnapshot.Parse(garbage, "g.bin"), Throws.TypeOf<TraceFormatException>());
        }
    }

    private static byte[] Mutate(byte[] valid, Random random)
    {
        var input = (byte[])valid.Clone();
        switch (random.Next(6))
        {
            case 0:
                return input[..random.Next(input.Length)];
            case 1:
                for (var n = random.Next(1, 9); n > 0; n--)
                {
                    input[random.Next(input.Length)] = (byte)random.Next(256);
                }

                return input;
            case 2:
                {
                    // A size or length field made extreme: the 8 bytes at a random 8-aligned spot of the first 256.
                    var at = random.Next(Math.Min(input.Length, 256) / 8) * 8;
                    var value = random.Next(4) switch { 0 => 0UL, 1 => ulong.MaxValue, 2 => (ulong)random.Next(), _ => 1UL << random.Next(64) };
                    BitConverter.TryWriteBytes(input.AsSpan(at, Math.Min(8, input.Length - at)), value);
                    return input;
                }

            case 3:
                {
                    var at = random.Next(input.Length);
                    var garbage = new byte[random.Next(1, 64)];
                    random.NextBytes(garbage);
                    return [.. input[..at], .. garbage, .. input[at..]];
                }

            case 4:
                {
                    // One 16-bit field anywhere (record sizes and poke lengths are 16 bits).
                    var at = random.Next(input.Length - 1);
                    BitConverter.TryWriteBytes(input.AsSpan(at, 2), (ushort)random.Next(65536));
                    return input;
                }

            default:
                {
                    var garbage = new byte[random.Next(0, 512)];
                    random.NextBytes(garbage);
                    return garbage;
                }
        }
    }

    private static (byte[], byte[], byte[]) MakeSample()
    {
        var directory = Path.Combine(Path.GetTempPath(), $"optpoline-fuzz-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            using var engine = new OptpolineEngine();
            var targets = Support.ChecksumCode.EmitTargets(engine, 4);
            var site = engine.CreateInlineSite(Register.RAX, 1, "fuzz_site");
            Support.ChecksumCode.EmitDriver(engine, Register.RAX, site);
            engine.StartTracing(new TracingOptions { Directory = directory });
            site.Promote(targets[..3]);
            site.Promote([targets[3]]);
            site.Reset();
            engine.StopTracing();
            return (File.ReadAllBytes(Path.Combine(directory, TraceFiles.TextPokes)),
                    File.ReadAllBytes(Path.Combine(directory, TraceFiles.JitDump(Environment.ProcessId))),
                    File.ReadAllBytes(Path.Combine(directory, TraceFiles.StartSnapshot)));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}
