//! The log files' writer: lines are appended to one shared buffer, and a background thread
//! writes that buffer out a few milliseconds after its first line, in one `write`.
//!
//! Why not tracing-appender's `NonBlocking`: it sends every line through a channel as a
//! `Vec` of its own, and its worker writes whenever the channel runs dry, which on a busy
//! daemon is every few lines (some 22,000 `write` calls and 26,000 `sched_yield`s of its
//! channel's spinning for 100,000 deliveries). Here a line costs a copy under a lock, and a
//! second of full-speed sending costs about a hundred writes. The price is that a line
//! reaches the file up to [`GATHER`] late, which nobody tailing a log notices.
//!
//! Never lossy: when the writer cannot keep up (a stalled disk), a producer waits once the
//! buffer holds [`MAX_BUFFER`] bytes, so the daemon slows down instead of dropping lines.
//!
//! A kill -9 loses what is still buffered. So that this never includes a line whose event is
//! already on record (a delivery result in the database, a file moved out of the inbox),
//! [`flush`] writes out every line logged so far before it returns: the sender's recorder calls
//! it before it commits results, the inbox after it logs a file's fate.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the writer waits after a batch's first line for more to join it.
const GATHER: Duration = Duration::from_millis(10);
/// A batch this big is written at once, without waiting out [`GATHER`].
const EARLY: usize = 256 * 1024;
/// Producers wait while the buffer holds this much (the writer is behind).
const MAX_BUFFER: usize = 8 * 1024 * 1024;
/// The spare buffer keeps at most this much capacity between batches.
const KEEP_CAPACITY: usize = 1024 * 1024;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    closing: bool,
    /// Bytes appended since the start, and bytes handed to the sink (written, or lost to a
    /// write error): a [`flush`] waits until the second reaches what the first was.
    appended: u64,
    handed: u64,
    /// The `appended` mark some [`flush`] waits for: the writer gathers no longer then.
    wanted: u64,
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for a first line, a big batch or the close.
    lines: Condvar,
    /// Producers wait here while the buffer is full.
    room: Condvar,
    /// [`flush`] waits here for a batch to be handed to the sink.
    handed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind, which stay writable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` of the log file layer; cheap to clone.
#[derive(Clone)]
pub struct Batched {
    shared: Arc<Shared>,
}

/// Writes what is buffered and stops the writer thread when dropped.
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer thread over `sink`.
pub fn batched<W: Write + Send + 'static>(
    sink: W,
    thread_name: &str,
) -> std::io::Result<(Batched, BatchGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        lines: Condvar::new(),
        room: Condvar::new(),
        handed: Condvar::new(),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || write_batches(&worker, sink))?;
    Ok((
        Batched {
            shared: shared.clone(),
        },
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write>(shared: &Shared, mut sink: W) {
    let mut batch = Vec::new();
    let mut failing = false;
    // A failed write may have put part of a line into the file (a full disk takes what
    // fits): the next write starts on a line of its own, or that line and the next one's
    // start would make one line that no JSON reader takes.
    let mut mid_line = false;
    // Lines of the batches that could not be written, said once writing works again.
    let mut lost_lines = 0u64;
    loop {
        let mut st = shared.lock();
        while st.buf.is_empty() && !st.closing {
            st = shared.lines.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.buf.is_empty() {
            return; // closing, and everything is written
        }
        let until = Instant::now() + GATHER;
        while !st.closing && st.buf.len() < EARLY && st.wanted <= st.handed {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = shared
                .lines
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::swap(&mut st.buf, &mut batch);
        let upto = st.appended;
        drop(st);
        shared.room.notify_all();
        match write_lines(&mut sink, &batch, &mut mid_line) {
            Ok(()) => {
                failing = false;
                if lost_lines > 0 {
                    // Into this log (the writer takes it like any line): the gap is on record.
                    tracing::warn!(
                        event = "log_lines_lost",
                        lines = lost_lines,
                        "log lines could not be written to the log file (a full disk, say) and are lost; stderr said when it began"
                    );
                    lost_lines = 0;
                }
            }
            // No log line can say so (this is the log): stderr, once per failing spell.
            Err(e) => {
                lost_lines += batch.iter().filter(|&&b| b == b'\n').count() as u64;
                if !failing {
                    failing = true;
                    eprintln!("pushdrop: cannot write the log file: {e}; lines are being lost");
                }
            }
        }
        batch.clear();
        batch.shrink_to(KEEP_CAPACITY);
        shared.lock().handed = upto;
        shared.handed.notify_all();
    }
}

/// Writes `batch` and flushes, keeping `mid_line` true while the file ends inside a line
/// (a write cut short), and starting with a line break when it did.
fn write_lines<W: Write>(sink: &mut W, batch: &[u8], mid_line: &mut bool) -> std::io::Result<()> {
    if *mid_line {
        sink.write_all(b"\n")?;
        *mid_line = false;
    }
    let mut rest = batch;
    while !rest.is_empty() {
        match sink.write(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *mid_line = rest[n - 1] != b'\n';
                rest = &rest[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    sink.flush()
}

impl Batched {
    /// Whether lines are waiting to be handed to the sink (what [`Batched::flush`] waits
    /// for); does not block.
    pub fn pending(&self) -> bool {
        let st = self.shared.lock();
        st.handed < st.appended && !st.closing
    }

    /// Returns once every line logged before the call is handed to the sink (written out of
    /// this process, so a kill -9 cannot lose it), without waiting for the batch to fill.
    /// At once when the writer is closing (it writes everything before it stops).
    pub fn flush(&self) {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let target = st.appended;
        if st.handed >= target || st.closing {
            return;
        }
        st.wanted = st.wanted.max(target);
        shared.lines.notify_one();
        while st.handed < target && !st.closing {
            st = shared.handed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.lines.notify_one();
        self.shared.handed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's writer: the formatted line is appended in one piece.
pub struct BatchedLine<'a>(&'a Shared);

impl Write for BatchedLine<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = self.0;
        let mut st = shared.lock();
        while st.buf.len() >= MAX_BUFFER && !st.closing {
            st = shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let first = st.buf.is_empty();
        st.buf.extend_from_slice(line);
        st.appended += line.len() as u64;
        let big = st.buf.len() >= EARLY && st.buf.len() - line.len() < EARLY;
        drop(st);
        // The writer sleeps until a batch begins, and gathers until it is big: only those two
        // moments wake it.
        if first || big {
            shared.lines.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Batched {
    type Writer = BatchedLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        BatchedLine(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that counts its writes and keeps what they wrote.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that takes `room` bytes, then fails like a full disk until given more.
    #[derive(Clone, Default)]
    struct FullDisk(Arc<Mutex<(Vec<u8>, usize)>>);
    impl Write for FullDisk {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            let n = b.len().min(s.1);
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            s.0.extend_from_slice(&b[..n]);
            s.1 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A probe's finding: a full disk took half a line, and the next line written once there
    /// was room again went on from that half, so `jq` stopped at the joined line. The line
    /// after a failed write now starts a line of its own.
    #[test]
    fn a_line_cut_by_a_full_disk_is_not_joined_to_the_next() {
        let (mut sink, mut mid) = (FullDisk::default(), false);
        sink.0.lock().unwrap().1 = 15;
        assert!(write_lines(&mut sink, b"{\"a\":\"first line\"}\n", &mut mid).is_err());
        assert!(mid);
        assert!(write_lines(&mut sink, b"{\"b\":1}\n", &mut mid).is_err());
        sink.0.lock().unwrap().1 = 1000;
        write_lines(&mut sink, b"{\"c\":2}\n", &mut mid).unwrap();
        assert!(!mid);
        let text = String::from_utf8(sink.0.lock().unwrap().0.clone()).unwrap();
        assert_eq!(text, "{\"a\":\"first lin\n{\"c\":2}\n");
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_in_few_writes_and_all_at_close() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone(), "test-log").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let line = format!("thread {t} line {i}\n");
                        w.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        // Each thread's lines whole and in its order.
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let want: Vec<String> = (0..5000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, want);
        }
        assert!(writes < 1000, "{writes} writes for 20,000 lines");
    }

    #[test]
    fn flush_returns_once_every_line_before_it_is_in_the_sink() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let (w, guard) = batched(sink.clone(), "test-log").unwrap();
        for round in 0..50 {
            let line = format!("line {round}\n");
            w.make_writer().write_all(line.as_bytes()).unwrap();
            w.flush();
            // Written before flush returned, not GATHER later.
            let text = String::from_utf8(sink.0.lock().unwrap().0.clone()).unwrap();
            assert!(text.ends_with(&line), "round {round}: {text:?}");
        }
        // Nothing to write: at once. Closing: at once, the close writes everything.
        w.flush();
        drop(guard);
        w.make_writer().write_all(b"after the close\n").unwrap();
        w.flush();
    }

    #[test]
    fn a_lone_line_reaches_the_sink_soon_without_a_close() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let (w, _guard) = batched(sink.clone(), "test-log").unwrap();
        w.make_writer().write_all(b"alone\n").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().0.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"alone\n");
    }
}
