using System.Runtime.InteropServices;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary>
/// The trace writers, written through and behind: every record submitted is in the file, in the order
/// it was submitted, byte for byte what the reader gives back, whatever the patch lengths and however
/// many threads submit.
/// </summary>
[NonParallelizable]
public sealed class TraceWriterTests
{
    private string _directory = null!;

    [SetUp]
    public void CreateDirectory()
    {
        _directory = Path.Combine(Path.GetTempPath(), $"optpoline-writer-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(_directory);
    }

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    [TestCase(false)]
    [TestCase(true)]
    public void Batches_of_patches_of_every_length_read_back_exactly(bool writeBehind)
    {
        var random = new Random(2611);
        var batches = new List<(List<CodePatch> Patches, ulong Time)>();
        var path = Path.Combine(_directory, "pokes.data");
        using (var writer = new PerfDataWriter(path, writeBehind))
        {
            for (var b = 0; b < 40; b++)
            {
                // Mostly the small patches the engine writes (1 to 16 bytes), some longer, one now and
                // then past the 16 KB a record holds (split into several records).
                var patches = Enumerable.Range(0, random.Next(1, 60)).Select(i =>
                {
                    var length = random.Next(10) switch { < 7 => random.Next(1, 17), < 9 => random.Next(17, 300), _ => random.Next(1, 3) == 1 ? PerfDataWriter.MaxPokeBytes + random.Next(1, 5000) : random.Next(1, 17) };
                    var expected = new byte[length];
                    var replacement = new byte[length];
                    random.NextBytes(expected);
                    random.NextBytes(replacement);
                    return new CodePatch(0x7000_0000_0000UL + (ulong)(b * 1_000_000) + ((ulong)i * 40_000), expected, replacement);
                }).ToList();
                var time = 1_000_000UL + (ulong)b;
                if (b % 2 == 0)
                {
                    writer.TextPokes(patches, time, 77);
                }
                else
                {
                    var prepared = writer.PrepareTextPokes(patches, 77);
                    writer.SubmitTextPokes(prepared, time);
                    Assert.That(() => writer.SubmitTextPokes(prepared, time), Throws.InvalidOperationException, "a prepared batch is submitted once");
                }

                batches.Add((patches, time));
            }

            writer.Flush();
            Assert.That(writer.Failure, Is.Null);
        }

        var read = PerfDataReader.Read(path).TextPokes.ToList();
        var expectedRecords = batches.SelectMany(b => b.Patches.SelectMany(p => Split(p).Select(part => (part.Address, part.Old, part.New, b.Time)))).ToList();
        Assert.That(read, Has.Count.EqualTo(expectedRecords.Count));
        for (var i = 0; i < read.Count; i++)
        {
            Assert.That(read[i].Address, Is.EqualTo(expectedRecords[i].Address), $"record {i}");
            Assert.That(read[i].Old, Is.EqualTo(expectedRecords[i].Old), $"record {i}");
            Assert.That(read[i].New, Is.EqualTo(expectedRecords[i].New), $"record {i}");
            Assert.That(read[i].Time, Is.EqualTo(expectedRecords[i].Time), $"record {i}");
            Assert.That(read[i].Tid, Is.EqualTo(77));
        }
    }

    [Test]
    public void Written_behind_records_from_many_threads_all_arrive_in_the_order_they_were_taken()
    {
        var path = Path.Combine(_directory, "threads.data");
        const int Threads = 4;
        const int PerThread = 300;
        var order = new List<ulong>();
        using (var writer = new PerfDataWriter(path, writeBehind: true))
        {
            var gate = new Lock();
            var threads = Enumerable.Range(0, Threads).Select(t => new Thread(() =>
            {
                for (var i = 0; i < PerThread; i++)
                {
                    var address = ((ulong)t << 32) | (uint)i;
                    lock (gate)
                    {
                        // The order the records are taken in: the file must keep it.
                        writer.TextPoke(address, [0xCC], [(byte)i], (ulong)i, t);
                        order.Add(address);
                    }

                    if (i % 50 == 0)
                    {
                        writer.Flush();
                    }
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
            Assert.That(writer.TextPokeRecords, Is.EqualTo(Threads * PerThread));
        }

        var read = PerfDataReader.Read(path).TextPokes.Select(r => r.Address).ToList();
        Assert.That(read, Is.EqualTo(order), "Dispose writes everything queued, in order");
    }

    [TestCase(false)]
    [TestCase(true)]
    public unsafe void Jitdump_loads_hold_the_code_as_it_was_when_they_were_taken(bool writeBehind)
    {
        var code = (byte*)NativeMemory.Alloc(256);
        try
        {
            var loads = new List<byte[]>();
            using (var writer = new JitDumpWriter(_directory, writeBehind))
            {
                for (var i = 0; i < 20; i++)
                {
                    new Span<byte>(code, 256).Fill((byte)i);
                    writer.CodeLoads([((ulong)code, 256, "block"), ((ulong)code + 64, 16, "inner")], 5, 1000UL + (ulong)i);
                    loads.Add(new ReadOnlySpan<byte>(code, 256).ToArray());
                    loads.Add(new ReadOnlySpan<byte>(code + 64, 16).ToArray());
                }

                // The bytes change right after each call: a writer that read them later would see these.
                new Span<byte>(code, 256).Fill(0xEE);
                Assert.That(writer.Loads, Is.EqualTo(40UL));
            }

            var read = JitDumpReader.Read(Path.Combine(_directory, JitDumpWriter.FileName(Environment.ProcessId))).Loads;
            Assert.That(read.Select(l => l.CodeIndex), Is.EqualTo(Enumerable.Range(0, 40).Select(i => (ulong)i)), "a fresh code_index for every load");
            Assert.That(read.Select(l => l.Code), Is.EqualTo(loads));
            Assert.That(read.Select(l => l.Name), Is.EqualTo(Enumerable.Repeat(new[] { "block", "inner" }, 20).SelectMany(n => n)));
        }
        finally
        {
            NativeMemory.Free(code);
        }
    }

    [Test]
    public void A_write_behind_failure_surfaces_at_the_next_submission_and_the_file_keeps_what_was_written()
    {
        var path = Path.Combine(_directory, "failing.data");
        using var writer = new PerfDataWriter(path, writeBehind: true);
        writer.TextPoke(0x1000, [0x90], [0xCC], 1, 1);
        writer.Flush();
        writer.BeforeWrite = () => throw new IOException("disk full (test)");
        writer.TextPoke(0x2000, [0x90], [0xCC], 2, 1);
        Assert.That(() => writer.Flush(), Throws.InstanceOf<IOException>().With.Message.Contains("disk full (test)").And.Message.Contains(path));
        Assert.That(() => writer.TextPoke(0x3000, [0x90], [0xCC], 3, 1), Throws.InstanceOf<IOException>());
        Assert.That(writer.Failure, Is.Not.Null);
        Assert.That(PerfDataReader.Read(path).TextPokes.Select(r => r.Address), Is.EqualTo(new[] { 0x1000UL }));
    }

    private static IEnumerable<(ulong Address, byte[] Old, byte[] New)> Split(CodePatch patch)
    {
        for (var offset = 0; offset < patch.Length; offset += PerfDataWriter.MaxPokeBytes)
        {
            var length = Math.Min(PerfDataWriter.MaxPokeBytes, patch.Length - offset);
            yield return (patch.Address + (ulong)offset, patch.Expected.Slice(offset, length).ToArray(), patch.Replacement.Slice(offset, length).ToArray());
        }
    }
}
