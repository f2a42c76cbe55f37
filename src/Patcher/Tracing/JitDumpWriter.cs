using System.Buffers.Binary;
using System.Text;
using Optpoline.Patcher.Platform;

namespace Optpoline.Patcher.Tracing;

/// <summary>
/// Writes <c>jit-&lt;pid&gt;.dump</c> (tools/perf/Documentation/jitdump-specification.txt) so that
/// <c>perf inject --jit</c> can give samples in generated code the names of their code blocks. Every
/// block gets a JIT_CODE_LOAD when it is published and again, with a fresh <c>code_index</c>, each
/// time it is patched, so that samples are attributed to the code as it was at their time. The file's
/// first page is mapped PROT_READ|PROT_EXEC, which is how <c>perf record</c> learns where the dump is.
/// Records are encoded when a load is submitted (time, code index and the code as it is then); they are
/// written in that order, write-through or write-behind (see <see cref="PerfDataWriter"/>). Thread safe.
/// </summary>
public sealed class JitDumpWriter : IDisposable
{
    private const uint Magic = 0x4A695444;
    private const uint RecordCodeLoad = 0;
    private const uint RecordCodeClose = 3;
    private const int HeaderSize = 40;

    private readonly FileStream _file;
    private readonly nint _marker;
    private readonly Lock _lock = new();
    private readonly TraceAppender _appender;
    private readonly int _pid = Environment.ProcessId;
    private ulong _codeIndex;

    /// <summary>The file name perf expects for process <paramref name="pid"/>.</summary>
    public static string FileName(int pid) => $"jit-{pid}.dump";
    private bool _disposed;

    /// <summary>Creates <c>jit-&lt;pid&gt;.dump</c> in <paramref name="directory"/> and maps its first page executable; records are written through.</summary>
    /// <exception cref="IOException">The file cannot be created or mapped.</exception>
    public JitDumpWriter(string directory)
        : this(directory, writeBehind: false)
    {
    }

    /// <summary>
    /// Creates <c>jit-&lt;pid&gt;.dump</c> in <paramref name="directory"/> and maps its first page
    /// executable. With <paramref name="writeBehind"/>, records are written by a background thread in
    /// the order they were submitted; <see cref="Flush"/> waits for them.
    /// </summary>
    /// <exception cref="IOException">The file cannot be created or mapped.</exception>
    public JitDumpWriter(string directory, bool writeBehind)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        Directory.CreateDirectory(directory);
        Path = System.IO.Path.Combine(directory, FileName(_pid));
        _file = new FileStream(Path, FileMode.Create, FileAccess.ReadWrite, FileShare.Read, bufferSize: 0);
        var header = new byte[HeaderSize];
        BinaryPrimitives.WriteUInt32LittleEndian(header, Magic);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(4), 1);          // version
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(8), HeaderSize);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(12), 62);        // EM_X86_64
        BinaryPrimitives.WriteInt32LittleEndian(header.AsSpan(20), _pid);
        BinaryPrimitives.WriteUInt64LittleEndian(header.AsSpan(24), PerfDataWriter.Now());
        RandomAccess.Write(_file.SafeFileHandle, header, 0);

        // The marker mapping: perf record sees an executable mmap of jit-<pid>.dump and perf inject reads it.
        _marker = PatcherOs.Mmap(0, 4096, PatcherOs.ProtRead | PatcherOs.ProtExec, PatcherOs.MapPrivate, (int)_file.SafeFileHandle.DangerousGetHandle(), 0);
        if (_marker == PatcherOs.MapFailed)
        {
            var errno = PatcherOs.LastErrno;
            _file.Dispose();
            throw new IOException($"Mapping {Path} for perf failed: {PatcherOs.Describe(errno)}.");
        }

        _appender = new TraceAppender(_file.SafeFileHandle, Path, HeaderSize, writeBehind, written: null);
    }

    /// <summary>Whether records are written by a background thread (see <see cref="Flush"/>).</summary>
    public bool WriteBehind => _appender.WriteBehind;

    /// <summary>Test hook: runs before every write of records (it may throw to simulate a failing disk).</summary>
    internal Action? BeforeWrite
    {
        get => _appender.BeforeWrite;
        set => _appender.BeforeWrite = value;
    }

    /// <summary>The failure that stopped writing, if a write failed; the file ends before its records.</summary>
    public IOException? Failure => _appender.Failure;

    /// <summary>Waits until every record submitted so far is in the file (at once when written through).</summary>
    /// <exception cref="IOException">A write failed; the file ends before the records it held.</exception>
    public void Flush() => _appender.Flush();

    /// <summary>The dump file.</summary>
    public string Path { get; }

    /// <summary>JIT_CODE_LOAD records submitted (written, or queued to be written).</summary>
    public ulong Loads => Interlocked.Read(ref _codeIndex);

    /// <summary>Records the code of a block as it is now (at its executable address), at <paramref name="time"/> (null: now).</summary>
    public void CodeLoad(ulong address, ReadOnlySpan<byte> code, string name, int tid, ulong? time = null)
    {
        ArgumentNullException.ThrowIfNull(name);
        var at = time ?? PerfDataWriter.Now();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var size = LoadSize(name, code.Length);
            var records = new byte[size];
            AddCodeLoad(records, address, code, name, tid, at, _codeIndex);
            _appender.Submit(records, size);
            Interlocked.Increment(ref _codeIndex);
        }
    }

    /// <summary>
    /// Records the code of several live blocks, read at their executable addresses now, with one write
    /// (the blocks one patch batch changed), at <paramref name="time"/> (CLOCK_MONOTONIC ns; null: now).
    /// Every block must be mapped readable for the duration of the call.
    /// </summary>
    public unsafe void CodeLoads(IReadOnlyList<(ulong Address, int Length, string Name)> blocks, int tid, ulong? time = null)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        if (blocks.Count == 0)
        {
            return;
        }

        var at = time ?? PerfDataWriter.Now();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var size = 0;
            foreach (var (_, length, name) in blocks)
            {
                ArgumentNullException.ThrowIfNull(name);
                size += LoadSize(name, length);
            }

            // The code is copied once, straight into the records (a batch's blocks can be large).
            var records = new byte[size];
            var offset = 0;
            for (var i = 0; i < blocks.Count; i++)
            {
                var (address, length, name) = blocks[i];
                offset += AddCodeLoad(records.AsSpan(offset), address, new ReadOnlySpan<byte>((void*)address, length), name, tid, at, _codeIndex + (ulong)i);
            }

            _appender.Submit(records, size);
            Interlocked.Add(ref _codeIndex, (ulong)blocks.Count);
        }
    }

    /// <summary>Bytes of a JIT_CODE_LOAD record: header, pid, tid, vma, code_addr, code_size, code_index, name and NUL, code.</summary>
    private static int LoadSize(string name, int codeLength) => 16 + 8 + 32 + Encoding.UTF8.GetByteCount(name) + 1 + codeLength;

    /// <summary>Lays out one JIT_CODE_LOAD at the start of <paramref name="into"/>; returns its size.</summary>
    private int AddCodeLoad(Span<byte> into, ulong address, ReadOnlySpan<byte> code, string name, int tid, ulong time, ulong codeIndex)
    {
        var nameLength = Encoding.UTF8.GetByteCount(name);
        var size = 16 + 8 + 32 + nameLength + 1 + code.Length;
        var span = into[..size];
        BinaryPrimitives.WriteUInt32LittleEndian(span, RecordCodeLoad);
        BinaryPrimitives.WriteUInt32LittleEndian(span[4..], (uint)size);
        BinaryPrimitives.WriteUInt64LittleEndian(span[8..], time);
        BinaryPrimitives.WriteInt32LittleEndian(span[16..], _pid);
        BinaryPrimitives.WriteInt32LittleEndian(span[20..], tid);
        BinaryPrimitives.WriteUInt64LittleEndian(span[24..], address);         // vma
        BinaryPrimitives.WriteUInt64LittleEndian(span[32..], address);         // code_addr
        BinaryPrimitives.WriteUInt64LittleEndian(span[40..], (ulong)code.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(span[48..], codeIndex);       // fresh for every load
        Encoding.UTF8.GetBytes(name, span[56..]);
        span[56 + nameLength] = 0;
        code.CopyTo(span[(56 + nameLength + 1)..]);
        return size;
    }

    /// <summary>Writes JIT_CODE_CLOSE and unmaps the marker.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            var record = new byte[16];
            BinaryPrimitives.WriteUInt32LittleEndian(record, RecordCodeClose);
            BinaryPrimitives.WriteUInt32LittleEndian(record.AsSpan(4), 16);
            BinaryPrimitives.WriteUInt64LittleEndian(record.AsSpan(8), PerfDataWriter.Now());
            try
            {
                _appender.Submit(record, record.Length);
            }
            catch (IOException)
            {
                // An earlier write failed: the file ends before it (see Failure), and gets no close record.
            }

            _appender.Dispose();
            _file.Dispose();
            PatcherOs.Munmap(_marker, 4096);
        }
    }
}
