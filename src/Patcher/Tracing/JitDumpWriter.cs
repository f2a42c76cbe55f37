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
/// Every record is written, in the order submitted, before the call that submits it returns (see
/// <see cref="PerfDataWriter"/>). Thread safe.
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

    /// <summary>
    /// Creates <c>jit-&lt;pid&gt;.dump</c> in <paramref name="directory"/> and maps its first page
    /// executable. Every record is in the file when the call that submits it returns.
    /// </summary>
    /// <exception cref="IOException">The file cannot be created or mapped.</exception>
    public JitDumpWriter(string directory)
        : this(directory, TraceAppender.FirstExtent)
    {
    }

    /// <summary>Tests: <paramref name="firstExtent"/> bytes mapped at first (0: none, every record goes through <c>pwrite</c>).</summary>
    internal JitDumpWriter(string directory, long firstExtent)
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

        _appender = new TraceAppender(_file.SafeFileHandle, Path, HeaderSize, sizeField: -1, firstExtent);
    }

    /// <summary>Tests: the file's appender (how records were written; its BeforeWrite hook simulates a failing disk).</summary>
    internal TraceAppender Appender => _appender;

    /// <summary>Whether the host is busy: see <see cref="PerfDataWriter.HostBusy"/>.</summary>
    public Func<bool>? HostBusy
    {
        get => _appender.HostBusy;
        set => _appender.HostBusy = value;
    }

    /// <summary>The failure that stopped writing, if a write failed; the file ends before its records.</summary>
    public IOException? Failure => _appender.Failure;

    /// <summary>The dump file.</summary>
    public string Path { get; }

    /// <summary>JIT_CODE_LOAD records written.</summary>
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
            var header = LoadHeader(records, address, code.Length, name, tid, at, _codeIndex);
            code.CopyTo(records.AsSpan(header));
            _appender.Submit(records);
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
            var headerBytes = 0;
            foreach (var (_, length, name) in blocks)
            {
                ArgumentNullException.ThrowIfNull(name);
                ArgumentOutOfRangeException.ThrowIfNegative(length);
                headerBytes += LoadSize(name, 0);
            }

            // One gathering write: the headers from one buffer, the code straight from the blocks (a
            // batch's blocks can be large, and a copy would be a second pass over them).
            var headers = new byte[headerBytes];
            var parts = new ReadOnlyMemory<byte>[2 * blocks.Count];
            var offset = 0;
            for (var i = 0; i < blocks.Count; i++)
            {
                var (address, length, name) = blocks[i];
                var header = LoadHeader(headers.AsSpan(offset), address, length, name, tid, at, _codeIndex + (ulong)i);
                parts[2 * i] = headers.AsMemory(offset, header);
                parts[(2 * i) + 1] = new LiveCode((byte*)address, length).Memory;
                offset += header;
            }

            _appender.Submit(parts);
            Interlocked.Add(ref _codeIndex, (ulong)blocks.Count);
        }
    }

    /// <summary>Bytes of a JIT_CODE_LOAD record: header, pid, tid, vma, code_addr, code_size, code_index, name and NUL, code.</summary>
    private static int LoadSize(string name, int codeLength) => 16 + 8 + 32 + Encoding.UTF8.GetByteCount(name) + 1 + codeLength;

    /// <summary>
    /// Lays out the start of a JIT_CODE_LOAD for <paramref name="codeLength"/> bytes of code at the start
    /// of <paramref name="into"/>: everything up to the code, which follows it. Returns that length.
    /// </summary>
    private int LoadHeader(Span<byte> into, ulong address, int codeLength, string name, int tid, ulong time, ulong codeIndex)
    {
        var nameLength = Encoding.UTF8.GetByteCount(name);
        var header = 16 + 8 + 32 + nameLength + 1;
        var size = header + codeLength;
        var span = into[..header];
        BinaryPrimitives.WriteUInt32LittleEndian(span, RecordCodeLoad);
        BinaryPrimitives.WriteUInt32LittleEndian(span[4..], (uint)size);
        BinaryPrimitives.WriteUInt64LittleEndian(span[8..], time);
        BinaryPrimitives.WriteInt32LittleEndian(span[16..], _pid);
        BinaryPrimitives.WriteInt32LittleEndian(span[20..], tid);
        BinaryPrimitives.WriteUInt64LittleEndian(span[24..], address);         // vma
        BinaryPrimitives.WriteUInt64LittleEndian(span[32..], address);         // code_addr
        BinaryPrimitives.WriteUInt64LittleEndian(span[40..], (ulong)codeLength);
        BinaryPrimitives.WriteUInt64LittleEndian(span[48..], codeIndex);       // fresh for every load
        Encoding.UTF8.GetBytes(name, span[56..]);
        span[56 + nameLength] = 0;
        return header;
    }

    /// <summary>Live code as <see cref="Memory{T}"/>, for a gathering write that reads it in place.</summary>
    private sealed unsafe class LiveCode(byte* address, int length) : System.Buffers.MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(address, length);

        public override System.Buffers.MemoryHandle Pin(int elementIndex = 0) => new(address + elementIndex);

        public override void Unpin()
        {
        }

        protected override void Dispose(bool disposing)
        {
        }
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
                _appender.Submit(record);
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
