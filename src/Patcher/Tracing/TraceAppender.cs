using Microsoft.Win32.SafeHandles;
using Optpoline.Patcher.Platform;

namespace Optpoline.Patcher.Tracing;

/// <summary>
/// The growing end of a trace file. Records are submitted encoded (by the thread that takes them, while
/// the data they copy is still in its cache) and are written in submission order: at once
/// (write-through), or write-behind, so that the submitting thread pays for encoding, not for the write.
/// </summary>
/// <remarks>
/// Write-behind never wakes a thread: on this kind of VM waking an idle vCPU costs the waker 30 to
/// 60 us, as much as the write it would save. The writer thread polls on its own timer (every
/// <see cref="ActivePoll"/> while records keep coming, backing off to <see cref="IdlePoll"/>), and
/// <see cref="Flush"/> writes whatever the writer has not taken yet itself, so it never waits for a
/// poll. A failed write is kept: every later submission and <see cref="Flush"/> throws it, and nothing
/// more is written, so a file never has a gap in the middle. The owner serializes submissions that
/// must stay in order (its own lock); this class keeps the order it is given.
/// </remarks>
internal sealed class TraceAppender : IDisposable
{
    /// <summary>The writer's poll period while records keep coming.</summary>
    public static readonly TimeSpan ActivePoll = TimeSpan.FromMicroseconds(200);

    /// <summary>The longest poll period, after a while without records: the most a record waits on an idle host.</summary>
    public static readonly TimeSpan IdlePoll = TimeSpan.FromMilliseconds(10);

    private readonly SafeFileHandle _file;
    private readonly string _path;
    private readonly Action<SafeFileHandle, long>? _written;
    private readonly Lock _queueLock = new();
    private readonly Lock _writeLock = new();   // taken before _queueLock; held for a whole write
    private readonly Thread? _thread;
    private List<Chunk> _queue = [];
    private List<Chunk> _spare = [];
    private long _end;
    private IOException? _failure;
    private volatile bool _stopping;

    /// <param name="file">The file, open for writing.</param>
    /// <param name="path">Its path, for messages.</param>
    /// <param name="end">Where the first record goes.</param>
    /// <param name="writeBehind">Write on a background thread instead of in <see cref="Submit"/>.</param>
    /// <param name="written">Called after each write with the new end of the file (the perf header's data size).</param>
    public TraceAppender(SafeFileHandle file, string path, long end, bool writeBehind, Action<SafeFileHandle, long>? written)
    {
        _file = file;
        _path = path;
        _end = end;
        _written = written;
        if (writeBehind)
        {
            _thread = new Thread(Work) { IsBackground = true, Name = "optpoline trace writer" };
            _thread.Start();
        }
    }

    /// <summary>Test hook: runs before every write (it may throw to simulate a failing disk, or sleep to be slow).</summary>
    internal Action? BeforeWrite { get; set; }

    /// <summary>Whether records are written behind, by the writer thread or the next <see cref="Flush"/>.</summary>
    public bool WriteBehind => _thread is not null;

    /// <summary>The failure that stopped writing, if any.</summary>
    public IOException? Failure => Volatile.Read(ref _failure);

    /// <summary>
    /// Queues the first <paramref name="length"/> bytes of <paramref name="records"/> (write-behind) or
    /// writes them now; the caller must not touch the array after this call. Callers encode into a new
    /// array: the allocator clears it on this thread, so encoding writes to lines already in this core's
    /// cache (a recycled buffer, last read by the writer's core, costs twice the encoding on this VM).
    /// </summary>
    /// <exception cref="IOException">An earlier write failed (or, write-through, this one).</exception>
    /// <exception cref="ObjectDisposedException">The appender is disposed.</exception>
    public void Submit(byte[] records, int length)
    {
        ObjectDisposedException.ThrowIf(_stopping, this);
        ThrowIfFailed();
        lock (_queueLock)
        {
            _queue.Add(new Chunk(records, length));
        }

        if (_thread is null)
        {
            Flush();
        }
    }

    /// <summary>
    /// Returns once every record submitted before the call is in the file: what the writer has not
    /// taken yet is written here, on the calling thread.
    /// </summary>
    /// <exception cref="IOException">A write failed; the file ends before the records it held.</exception>
    public void Flush()
    {
        // The writer may be in the middle of a write: spin for it rather than sleep, since being woken
        // costs more than the rest of its write on a VM (a batch waits here for the one before).
        var spinner = default(SpinWait);
        while (!_writeLock.TryEnter())
        {
            spinner.SpinOnce(sleep1Threshold: -1);
        }

        try
        {
            WriteQueued();
        }
        finally
        {
            _writeLock.Exit();
        }

        ThrowIfFailed();
    }

    /// <summary>Writes what is queued and stops the writer thread. Does not throw: see <see cref="Failure"/>.</summary>
    public void Dispose()
    {
        if (_stopping)
        {
            return;
        }

        _stopping = true;
        _thread?.Join();
        lock (_writeLock)
        {
            WriteQueued();
        }
    }

    private void ThrowIfFailed()
    {
        if (Volatile.Read(ref _failure) is { } failure)
        {
            throw failure;
        }
    }

    /// <summary>Polls on its own timer: active while records come, backing off to <see cref="IdlePoll"/>.</summary>
    private void Work()
    {
        var poll = ActivePoll;
        while (!_stopping)
        {
            PatcherOs.SleepMicroseconds((long)poll.TotalMicroseconds);
            bool any;
            lock (_writeLock)
            {
                any = WriteQueued();
            }

            poll = any ? ActivePoll : TimeSpan.FromTicks(Math.Min(poll.Ticks * 2, IdlePoll.Ticks));
        }
    }

    /// <summary>Under the write lock: writes the queue with one (gathering) write. Returns whether there was any.</summary>
    private bool WriteQueued()
    {
        List<Chunk> work;
        lock (_queueLock)
        {
            if (_queue.Count == 0)
            {
                return false;
            }

            work = _queue;
            _queue = _spare;   // _spare is only touched under the write lock
        }

        try
        {
            Write(work);
        }
        finally
        {
            work.Clear();
            _spare = work;
        }

        return true;
    }

    /// <summary>Writes <paramref name="work"/>; a failure is kept and ends writing.</summary>
    private void Write(List<Chunk> work)
    {
        if (Volatile.Read(ref _failure) is not null)
        {
            return;
        }

        try
        {
            BeforeWrite?.Invoke();
            long length = 0;
            if (work.Count == 1)
            {
                RandomAccess.Write(_file, work[0].Records.AsSpan(0, work[0].Length), _end);
                length = work[0].Length;
            }
            else
            {
                var parts = new ReadOnlyMemory<byte>[work.Count];
                for (var i = 0; i < parts.Length; i++)
                {
                    parts[i] = work[i].Records.AsMemory(0, work[i].Length);
                    length += work[i].Length;
                }

                RandomAccess.Write(_file, parts, _end);
            }

            _end += length;
            _written?.Invoke(_file, _end);
        }
#pragma warning disable CA1031 // On the writer thread any failure must be kept, not end the process; it surfaces as an IOException.
        catch (Exception failure)
#pragma warning restore CA1031
        {
            Volatile.Write(ref _failure, new IOException(
                $"Writing the trace file {_path} failed ({failure.Message}); it ends before the records of that write. " +
                "Stop tracing and start a new trace to record again.", failure));
        }
    }

    private readonly record struct Chunk(byte[] Records, int Length);
}
