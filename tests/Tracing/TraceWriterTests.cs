using System.Runtime.InteropServices;
using Optpoline.Patcher;
using Optpoline.Patcher.Tracing;

namespace Optpoline.Tests.Tracing;

/// <summary>
/// The trace writers, copying into the file's mapping, writing with pwrite, and both in one file: every
/// record submitted is in the file when the call returns, in the order it was submitted, byte for byte
/// what the reader gives back, whatever the patch lengths and however many threads submit.
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

    /// <summary>How a test's writer puts records in its file.</summary>
    public enum Way
    {
        /// <summary>Copied into the mapping (it reaches far enough for the whole test).</summary>
        Mapped,

        /// <summary>Nothing mapped: every record through pwrite.</summary>
        Written,

        /// <summary>A one-page mapping: records outrun it into pwrite, and the extender maps over them while the file is idle.</summary>
        Both,
    }

    private static long FirstExtent(Way way) => way switch { Way.Mapped => 64 << 20, Way.Written => 0, _ => 4096 };

    [TestCase(Way.Mapped)]
    [TestCase(Way.Written)]
    [TestCase(Way.Both)]
    public void Batches_of_patches_of_every_length_read_back_exactly(Way way)
    {
        var random = new Random(2611);
        var batches = new List<(List<CodePatch> Patches, ulong Time)>();
        var path = Path.Combine(_directory, "pokes.data");
        using (var writer = new PerfDataWriter(path, FirstExtent(way)))
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

                // Written records are in the file at once, wherever they went.
                Assert.That(PerfDataReader.Read(path).TextPokes.Count(), Is.EqualTo(writer.TextPokeRecords), $"batch {b}");
                if (way == Way.Both && b % 8 == 0)
                {
                    Thread.Sleep(10);   // idle: the extender maps over what was written
                }
            }

            Assert.That(writer.Failure, Is.Null);
            var (copied, written) = writer.Appender.Submissions;
            Assert.That((copied > 0, written > 0), Is.EqualTo(way switch { Way.Mapped => (true, false), Way.Written => (false, true), _ => (true, true) }), "the ways the records took");
        }

        Assert.That(new FileInfo(path).Length, Is.EqualTo(PerfDataWriter.DataOffset + (long)PerfDataReader.Read(path).TextPokes.Sum(r => PokeBytes(r.Old.Length))), "the file is cut back to its records");

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
    public void Records_from_many_threads_all_arrive_in_the_order_they_were_taken()
    {
        var path = Path.Combine(_directory, "threads.data");
        const int Threads = 4;
        const int PerThread = 300;
        var order = new List<ulong>();
        using (var writer = new PerfDataWriter(path, 8192))
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
                        Thread.Sleep(5);
                    }
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
            Assert.That(writer.TextPokeRecords, Is.EqualTo(Threads * PerThread));
        }

        var read = PerfDataReader.Read(path).TextPokes.Select(r => r.Address).ToList();
        Assert.That(read, Is.EqualTo(order), "in the order taken, across the mapping and pwrite");
    }

    [TestCase(Way.Mapped)]
    [TestCase(Way.Written)]
    [TestCase(Way.Both)]
    public unsafe void Jitdump_loads_hold_the_code_as_it_was_when_they_were_taken(Way way)
    {
        var code = (byte*)NativeMemory.Alloc(256);
        try
        {
            var loads = new List<byte[]>();
            using (var writer = new JitDumpWriter(_directory, FirstExtent(way)))
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

    [TestCase(Way.Mapped)]
    [TestCase(Way.Written)]
    public void A_failed_write_throws_and_is_kept_and_the_file_keeps_what_was_written(Way way)
    {
        var path = Path.Combine(_directory, "failing.data");
        using var writer = new PerfDataWriter(path, FirstExtent(way));
        writer.TextPoke(0x1000, [0x90], [0xCC], 1, 1);
        writer.Appender.BeforeWrite = () => throw new IOException("disk full (test)");
        Assert.That(() => writer.TextPoke(0x2000, [0x90], [0xCC], 2, 1), Throws.InstanceOf<IOException>().With.Message.Contains("disk full (test)").And.Message.Contains(path));
        writer.Appender.BeforeWrite = null;
        Assert.That(() => writer.TextPoke(0x3000, [0x90], [0xCC], 3, 1), Throws.InstanceOf<IOException>(), "nothing is written after a failure");
        Assert.That(writer.Failure, Is.Not.Null);
        Assert.That(PerfDataReader.Read(path).TextPokes.Select(r => r.Address), Is.EqualTo(new[] { 0x1000UL }));
    }

    [Test]
    public unsafe void A_writer_that_never_finished_leaves_zeros_after_its_records_which_the_readers_stop_at()
    {
        // A crash: the files are read while their writers are open, mapped ahead of their records.
        var path = Path.Combine(_directory, "open.data");
        var code = (byte*)NativeMemory.Alloc(64);
        try
        {
            new Span<byte>(code, 64).Fill(0xC3);
            using var pokes = new PerfDataWriter(path);
            using var jit = new JitDumpWriter(_directory);
            pokes.TextPoke(0x1000, [0x90, 0x90], [0xCC, 0xC3], 7, 1);
            jit.CodeLoads([((ulong)code, 64, "open_block")], 1, 7);
            Assert.That(new FileInfo(path).Length, Is.GreaterThan(pokes.Appender.End), "mapped ahead: zeros follow the records");
            Assert.That(new FileInfo(jit.Path).Length, Is.GreaterThan(jit.Appender.End));

            var perf = PerfDataReader.Read(path);
            Assert.That(perf.TextPokes.Select(r => r.Address), Is.EqualTo(new[] { 0x1000UL }));
            Assert.That(perf.Warnings, Is.Empty, "the header's size counts the records only");
            var dump = JitDumpReader.Read(jit.Path);
            Assert.That(dump.Loads.Select(l => l.Name), Is.EqualTo(new[] { "open_block" }));
            Assert.That(dump.Warnings, Has.Some.Contains("zeros follow the last record"));

            // A perf.data whose size field was never written (a crash before the first record's end).
            var bare = File.ReadAllBytes(path);
            bare.AsSpan(48, 8).Clear();
            File.WriteAllBytes(path + ".bare", bare);
            var unsized = PerfDataReader.Read(path + ".bare");
            Assert.That(unsized.TextPokes.Select(r => r.Address), Is.EqualTo(new[] { 0x1000UL }));
            Assert.That(unsized.Warnings, Has.Some.Contains("zeros follow the last record"));
        }
        finally
        {
            NativeMemory.Free(code);
        }
    }

    [Test]
    public void The_mapping_grows_ahead_only_while_the_host_is_quiet_and_then_takes_the_records()
    {
        var path = Path.Combine(_directory, "quiet.data");
        var busy = true;
        using var writer = new PerfDataWriter(path, 4096) { HostBusy = () => Volatile.Read(ref busy) };
        var appender = writer.Appender;
        var first = appender.MappedEnd;
        for (var i = 0; i < 200; i++)
        {
            writer.TextPoke(0x1000 + ((ulong)i * 16), [0x90, 0x90, 0x90, 0x90, 0x90], [0xE8, 1, 2, 3, 4], (ulong)i, 1);
        }

        Assert.That(appender.End, Is.GreaterThan(first), "the records outran the first page");
        Thread.Sleep(50);
        Assert.That(appender.MappedEnd, Is.EqualTo(first), "no growth while the host is busy, however long the file is idle");

        Volatile.Write(ref busy, false);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (appender.MappedEnd < appender.End + TraceAppender.LowWater && clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            Thread.Sleep(5);
        }

        Assert.That(appender.MappedEnd, Is.GreaterThanOrEqualTo(appender.End + TraceAppender.LowWater), "a quiet host: the mapping grows past the records");
        var (copiedBefore, _) = appender.Submissions;
        writer.TextPoke(0x9000, [0x90], [0xCC], 999, 1);
        Assert.That(appender.Submissions.Copied, Is.EqualTo(copiedBefore + 1), "the next record is copied into the mapping");
        Assert.That(PerfDataReader.Read(path).TextPokes.Count(), Is.EqualTo(201));
    }

    [Test]
    public unsafe void A_jitdump_batch_of_more_blocks_than_one_gathering_write_takes_is_written_whole()
    {
        // 700 blocks are 1400 parts, more than IOV_MAX (1024) for one pwritev.
        var code = (byte*)NativeMemory.Alloc(700 * 16);
        try
        {
            for (var i = 0; i < 700; i++)
            {
                new Span<byte>(code + (i * 16), 16).Fill((byte)i);
            }

            using (var writer = new JitDumpWriter(_directory, 0))
            {
                writer.CodeLoads([.. Enumerable.Range(0, 700).Select(i => ((ulong)code + (ulong)(i * 16), 16, $"b{i}"))], 1, 9);
            }

            var read = JitDumpReader.Read(Path.Combine(_directory, JitDumpWriter.FileName(Environment.ProcessId)));
            Assert.That(read.Loads, Has.Count.EqualTo(700));
            Assert.That(read.Loads.Select(l => l.Code[0]), Is.EqualTo(Enumerable.Range(0, 700).Select(i => (byte)i)));
            Assert.That(read.Warnings, Is.Empty);
        }
        finally
        {
            NativeMemory.Free(code);
        }
    }

    /// <summary>Bytes of a TEXT_POKE record with equal lengths: header, address, lengths, bytes padded to 8, sample_id.</summary>
    private static long PokeBytes(int length) => 8 + ((12 + (2 * length) + 7) & ~7) + 16;

    private static IEnumerable<(ulong Address, byte[] Old, byte[] New)> Split(CodePatch patch)
    {
        for (var offset = 0; offset < patch.Length; offset += PerfDataWriter.MaxPokeBytes)
        {
            var length = Math.Min(PerfDataWriter.MaxPokeBytes, patch.Length - offset);
            yield return (patch.Address + (ulong)offset, patch.Expected.Slice(offset, length).ToArray(), patch.Replacement.Slice(offset, length).ToArray());
        }
    }
}
