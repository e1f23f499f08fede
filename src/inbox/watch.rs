//! The watcher: one std thread that learns about files from kernel events (hints) and
//! directory scans (the truth), decides when a file is complete, and hands ready files to the
//! [`Ingestor`] in batches (group commit).
//!
//! When is a file complete? At once when it arrived by rename or its writer closed it, or when
//! its mtime is already `settle_ms` old; otherwise once its size and mtime have been stable for
//! `settle_ms`. A truncated `.json` (or a `.jsonl` whose last line has no newline yet) is
//! waited for until it has been unchanged for `settle_ms`, and only then rejected.
//!
//! With kernel events, a file written since its writer last closed it is still open for
//! writing: it waits for that close however long the writer pauses, since whatever the writer
//! wrote after the take would go to the moved (or deleted) file. Settling alone decides only
//! where no event can tell (polling, files written while pushdrop was stopped, and after an
//! event queue overflow).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use super::ingest::{self, Candidate, FileOutcome, Ingestor};
use crate::config::{Config, WatchMode};
use crate::store::Store;

/// At most this many files per `Store::ingest` call: big enough that one fsync serves
/// thousands of files a second, small enough to bound memory and latency.
const BATCH_FILES: usize = 1000;
/// At most this many bytes of files per batch.
const BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Retention of processed files is checked this often.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// A file open for writing this long without a change is logged once: its writer may hang.
const OPEN_WRITER_WARN: Duration = Duration::from_secs(60);
/// While the inbox folder is gone, how often pushdrop looks for it.
const MISSING_RECHECK: Duration = Duration::from_secs(1);
/// How often the watched folder is looked at (a stat) to see that it is still the inbox. The
/// kernel says nothing when it is deleted: the folder's lock holds it open, and a watched
/// folder's deletion is only reported once nothing holds it.
const PLACE_CHECK: Duration = Duration::from_secs(2);
/// Longest wait before retrying a file that could not be read, committed or moved.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After the first event of an idle spell, how long events must pause before the files are
/// looked at: a burst of drops (a script that renames files in one after another, a few
/// milliseconds apart: `mv` in a shell loop takes two, and five or more on a loaded machine)
/// is then taken in name order, as the contract asks, at the cost of `GATHER_QUIET` of
/// latency for a lone file. Once a burst shows its pace, the pause it must make is
/// `GATHER_PACE` times its longest gap so far (at most `GATHER_QUIET_MAX`): a loop slowed by
/// load is not cut in two at its next hiccup. A steady stream of drops is looked at every
/// `GATHER_MAX`.
const GATHER_QUIET: Duration = Duration::from_millis(8);
const GATHER_PACE: u32 = 3;
const GATHER_QUIET_MAX: Duration = Duration::from_millis(50);
const GATHER_MAX: Duration = Duration::from_millis(250);

/// Why the inbox could not start.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("cannot create inbox.{key} ({path}): {source}")]
    Dir {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inbox.{key} ({path}) must not be the inbox folder itself")]
    SameDir { key: &'static str, path: PathBuf },
    #[error("cannot start the inbox thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "inbox {dir} is watched by another pushdrop daemon{pid} (it holds the folder's lock); two daemons on one inbox would each take the same files and send them twice: stop it first, or give each daemon its own inbox",
        pid = crate::lockfile::pid_text(*pid)
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
}

/// Refuses an inbox another daemon holds, before this one opens (and so creates) its
/// database: a refused `run` with a database of its own left that file behind (a probe's
/// finding). The lock itself is taken when the inbox starts; this only asks who holds it.
pub fn check_not_taken(cfg: &Config) -> Result<(), InboxError> {
    match crate::lockfile::holder(&cfg.inbox.dir) {
        Some(crate::lockfile::Held::By(pid)) => Err(InboxError::Locked {
            dir: cfg.inbox.dir.clone(),
            pid,
        }),
        _ => Ok(()),
    }
}

/// The running inbox. Dropping it without [`InboxHandle::stop`] leaves the thread running
/// until the process ends.
pub struct InboxHandle {
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Msg>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InboxHandle {
    /// Stops taking files, lets the batch in hand finish (commit and move), joins the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Stop);
        // The loop owns the watcher: its notify thread ends with the loop.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the watcher thread is running and its folder exists (for `/readyz`).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// The liveness flag itself, for checks that outlive a borrow (the admin endpoint).
    pub fn liveness(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }
}

/// A daemon whose start fails after the inbox started (or a test that drops its handle) stops
/// the watcher too, its batch in hand finished and logged, rather than leave it taking files
/// while the process ends.
impl Drop for InboxHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

enum Msg {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// What an inbox message was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Stop,
    /// A drop file (or the folder, or a rescan): worth gathering the events after it for.
    DropFile,
    /// Another name: a dotfile, a `*.tmp`, a subfolder's entry.
    Other,
}

/// Starts watching `[inbox] dir`: adds the kernel watch, then scans (so files present at start
/// are taken), in a thread of its own.
pub fn start(cfg: Arc<Config>, store: Store) -> Result<InboxHandle, InboxError> {
    let inbox = cfg.inbox.dir.clone();
    for (key, dir) in [
        ("processed_dir", cfg.processed_dir()),
        ("rejected_dir", cfg.rejected_dir()),
    ] {
        if crate::config::same_folder(dir, &inbox) {
            return Err(InboxError::SameDir {
                key,
                path: dir.to_path_buf(),
            });
        }
    }
    let mut dirs = vec![
        ("dir", inbox.clone()),
        ("rejected_dir", cfg.rejected_dir().to_path_buf()),
    ];
    if cfg.inbox.keep_processed {
        dirs.push(("processed_dir", cfg.processed_dir().to_path_buf()));
    }
    for (key, d) in dirs {
        std::fs::create_dir_all(&d).map_err(|source| InboxError::Dir {
            key,
            path: d,
            source,
        })?;
    }
    let lock = lock_inbox(&inbox).map_err(|Taken| InboxError::Locked {
        dir: inbox.clone(),
        pid: crate::lockfile::holder_pid(&inbox),
    })?;

    let (tx, rx) = mpsc::channel();
    let mut poll = cfg.inbox.watch == WatchMode::Poll;
    let mut watcher = None;
    if !poll {
        match watch_inbox(&inbox, &tx) {
            Ok(w) => watcher = Some(w),
            Err(e) => {
                tracing::warn!(event = "watch_unavailable", dir = %inbox.display(), error = %e, "cannot watch the inbox for events; polling it instead");
                poll = true;
            }
        }
    }
    let watched = dir_ident(&inbox);

    let mut lp = Loop::new(cfg, store, rx);
    lp.poll_every = poll.then(|| Duration::from_millis(lp.cfg.inbox.poll_interval_ms));
    lp.events = watcher.map(|w| (w, tx.clone()));
    lp.watched = watched;
    lp.watch_on = watched;
    lp.lock = lock;
    let (stop, alive) = (lp.stop.clone(), lp.alive.clone());
    let alive_flag = alive.clone();
    let cfg_dir = lp.inbox.clone();
    let thread = std::thread::Builder::new()
        .name("pushdrop-inbox".into())
        .spawn(move || {
            let _alive = AliveGuard(alive_flag);
            // The loop holds the inbox's lock while it takes files, and lets it go when it
            // ends.
            lp.run();
        })
        .map_err(InboxError::Thread)?;
    tracing::info!(event = "inbox_started", dir = %cfg_dir.display(), mode = if poll { "poll" } else { "events" });
    Ok(InboxHandle {
        stop,
        tx,
        alive,
        thread: Some(thread),
    })
}

/// Another daemon holds the inbox folder's lock.
struct Taken;

/// One daemon per inbox, as per database: two daemons with databases of their own would both
/// ingest each file dropped. The lock is on the folder itself (every path to it, links
/// included, finds the same one), and puts no file of ours in it. `Ok(None)` where folders
/// cannot be locked (some network filesystems): said, and the daemon runs without the guard.
fn lock_inbox(dir: &Path) -> Result<Option<std::fs::File>, Taken> {
    match crate::lockfile::try_exclusive_dir(dir) {
        Ok(Some(file)) => Ok(Some(file)),
        Ok(None) => Err(Taken),
        Err(e) => {
            tracing::warn!(event = "inbox_unlocked", dir = %dir.display(), error = %e, "cannot lock the inbox folder (a network filesystem?): a second daemon on this inbox would not be refused");
            Ok(None)
        }
    }
}

/// A kernel watch on the inbox folder, its events sent to the loop.
fn watch_inbox(inbox: &Path, tx: &mpsc::Sender<Msg>) -> notify::Result<RecommendedWatcher> {
    let etx = tx.clone();
    let dir = inbox.to_path_buf();
    let mut w = RecommendedWatcher::new(
        move |ev: notify::Result<notify::Event>| {
            // The folder's own removal or move too: the loop then waits for it to come back.
            // (Not its other events: every scan's read of the folder is one.)
            let own = matches!(&ev, Ok(e)
                if matches!(e.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)))
                    && e.paths.iter().any(|p| p == &dir));
            if own || wanted(&ev) {
                let _ = etx.send(Msg::Event(ev));
            }
        },
        notify::Config::default(),
    )?;
    w.watch(inbox, RecursiveMode::NonRecursive)?;
    Ok(w)
}

/// Device and inode of a folder: a folder deleted and made again is another one, whose
/// events the old watch no longer reports.
fn dir_ident(p: &Path) -> Option<(u64, u64)> {
    super::fsutil::identity(p).ok()
}

/// Marks the inbox dead when its thread ends, even by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Events worth waking the loop for. Our own reads (open, close-nowrite) and moves out of the
/// inbox would otherwise wake it for every file it takes.
fn wanted(ev: &notify::Result<notify::Event>) -> bool {
    let Ok(ev) = ev else { return true };
    if ev.need_rescan() {
        return true;
    }
    match ev.kind {
        EventKind::Create(_) => true,
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Remove(_) => false,
        EventKind::Any | EventKind::Other => true,
    }
}

/// A name that would be a drop file's but for the case of its suffix (`A.JSON`, `b.JsonL`).
fn is_near_drop_name(name: &std::ffi::OsStr) -> bool {
    let lower = name.to_string_lossy().to_ascii_lowercase();
    !lower.starts_with('.') && (lower.ends_with(".json") || lower.ends_with(".jsonl"))
}

/// Whether the event says "this file is complete": it was renamed in, or its writer closed it.
fn completes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Modify(ModifyKind::Name(
            RenameMode::To | RenameMode::Both | RenameMode::Any
        )) | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// What kernel events said about a file's writer since the file was last closed or renamed
/// in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Nothing: settling decides (also polling, and after an event queue overflow).
    Unknown,
    /// Created and not closed since. While it is still empty its writer may not have
    /// written yet; a hard link made into the inbox is created too, but not empty.
    Created,
    /// Written (`IN_MODIFY`) since its last close: its writer has it open.
    Writing,
}

/// Whether the kernel says some process holds the file at `path` open for writing; true
/// also when it cannot tell (a file system without leases: then the events' word stands).
fn writer_still_open(path: &Path) -> bool {
    match crate::inbox::fsutil::open_nofollow(path) {
        Ok(file) => crate::inbox::fsutil::open_for_writing_elsewhere(&file) != Some(false),
        Err(_) => true,
    }
}

impl Writer {
    /// Whether the file waits for its writer's close, however long it has been unchanged.
    fn holds(self, size: u64) -> bool {
        match self {
            Writer::Unknown => false,
            Writer::Created => size == 0,
            Writer::Writing => true,
        }
    }
}

/// What the loop knows about a file in the inbox.
struct Cand {
    /// Renamed in or closed after writing since the last look: take it at once.
    hinted: bool,
    /// Its writer, as kernel events tell.
    writer: Writer,
    /// The long wait for the writer's close was logged.
    warned: bool,
    /// Since when the kernel has said another process holds it open for writing.
    open_elsewhere_since: Option<Instant>,
    /// (size, mtime_ns, ino) at the last look, and since when it has been so.
    seen: Option<(u64, i64, u64)>,
    stable_since: Instant,
    /// Do not look before this (back-off after a failure, or the settle deadline).
    check_at: Instant,
    /// Failed attempts in a row; such a file is retried alone so it cannot hold up others.
    failures: u32,
    /// The file as it was when it last failed ([`Cand::seen`]): an event that finds it
    /// unchanged is the daemon's own rename back after a move that failed, not a new file.
    failed_as: Option<(u64, i64, u64)>,
    /// Since when it has been ready while a file named before it was still settling.
    held_since: Option<Instant>,
}

/// What tells one version of a drop file from another: (size, mtime in ns, inode).
fn file_signature(meta: &std::fs::Metadata) -> (u64, i64, u64) {
    (meta.size(), ingest::mtime_ns(meta), meta.ino())
}

/// [`file_signature`] of the file at `path` now, not following a symlink.
fn signature(path: &Path) -> Option<(u64, i64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| file_signature(&m))
}

impl Cand {
    /// While it waits (to settle, or to be looked at again), until when it holds up the
    /// files named after it; never when it is backing off after a failure.
    fn holds_up_until(&self) -> Option<Instant> {
        (self.failures == 0).then_some(self.check_at)
    }

    fn new(now: Instant) -> Cand {
        Cand {
            hinted: false,
            writer: Writer::Unknown,
            warned: false,
            open_elsewhere_since: None,
            seen: None,
            stable_since: now,
            check_at: now,
            failures: 0,
            failed_as: None,
            held_since: None,
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

struct Loop {
    cfg: Arc<Config>,
    ingestor: Ingestor,
    inbox: PathBuf,
    rx: mpsc::Receiver<Msg>,
    stop: Arc<AtomicBool>,
    settle: Duration,
    poll_every: Option<Duration>,
    scan_every: Duration,
    sweep: bool,
    cands: BTreeMap<OsString, Cand>,
    /// Directories and the like already seen (not re-examined on every scan).
    ignored: HashSet<OsString>,
    /// Names that are drop files' but for the case of the suffix, already warned about.
    near_misses: HashSet<OsString>,
    scan_requested: bool,
    next_scan: Instant,
    next_sweep: Instant,
    /// When [`Loop::still_in_place`] looks next.
    next_place_check: Instant,
    last_scan_error: Option<String>,
    /// The kernel watch and the sender its events go to; `None` when polling.
    events: Option<(RecommendedWatcher, mpsc::Sender<Msg>)>,
    /// The folder the watch is on, as last made sure of (`None`: look again at the scan).
    watched: Option<(u64, u64)>,
    /// The folder the kernel watch was made on.
    watch_on: Option<(u64, u64)>,
    /// The inbox folder is gone; looked for every [`MISSING_RECHECK`].
    missing: bool,
    /// Cleared while the folder is gone, so `/readyz` says so.
    alive: Arc<AtomicBool>,
    /// The lock of the folder being watched (see [`start`]); `None` where folders cannot be
    /// locked.
    lock: Option<std::fs::File>,
    /// The folder there now is locked by another daemon: said once, looked at again every
    /// [`MISSING_RECHECK`].
    taken: bool,
    /// The last batch went ahead of a file due for a retry: the next one takes the retry
    /// first (see [`Loop::take_ready`]).
    retry_turn: bool,
}

impl Loop {
    /// A loop on `[inbox] dir` that takes messages from `rx`: polling off (no kernel watch
    /// yet), its first scan due at once. [`start`] adds the watch, the folder's lock and its
    /// identity.
    fn new(cfg: Arc<Config>, store: Store, rx: mpsc::Receiver<Msg>) -> Loop {
        let now = Instant::now();
        Loop {
            ingestor: Ingestor::new(cfg.clone(), store).watching(),
            settle: Duration::from_millis(cfg.inbox.settle_ms),
            poll_every: None,
            scan_every: Duration::from_secs(cfg.inbox.scan_interval_s),
            sweep: cfg.inbox.keep_processed,
            inbox: cfg.inbox.dir.clone(),
            cfg,
            rx,
            stop: Arc::new(AtomicBool::new(false)),
            cands: BTreeMap::new(),
            ignored: HashSet::new(),
            near_misses: HashSet::new(),
            scan_requested: true,
            next_scan: now,
            next_sweep: now,
            next_place_check: now + PLACE_CHECK,
            last_scan_error: None,
            events: None,
            watched: None,
            watch_on: None,
            missing: false,
            alive: Arc::new(AtomicBool::new(true)),
            lock: None,
            taken: false,
            retry_turn: false,
        }
    }

    fn run(&mut self) {
        self.ingestor.recover_staged();
        self.run_until_stopped();
        // Files moved out a moment ago get their second look now, with no writer waited for.
        self.ingestor.look_again(true);
        tracing::info!(event = "inbox_stopped");
    }

    fn run_until_stopped(&mut self) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            if self.sweep && now >= self.next_sweep {
                self.ingestor.recover_staged();
                ingest::sweep_processed(&self.cfg);
                self.next_sweep = now + SWEEP_EVERY;
            }
            if now >= self.next_place_check {
                self.next_place_check = now + PLACE_CHECK;
                if !self.still_in_place() {
                    self.scan_requested = true;
                }
            }
            if self.scan_requested || now >= self.next_scan {
                self.scan();
            }
            self.ingestor.look_again(false);
            let more = self.take_ready();
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // Sleep until an event, a deadline, or (with more ready files) not at all.
            let timeout = if more {
                Duration::ZERO
            } else {
                self.next_deadline()
                    .saturating_duration_since(Instant::now())
            };
            // Only an event about a drop file starts a gather (once per wake-up): a dropper
            // writing its next file under a temp name must not hold up the one it renamed.
            let mut gathered = more;
            match self.rx.recv_timeout(timeout) {
                Ok(msg) => match self.handle(msg) {
                    Handled::Stop => break,
                    Handled::DropFile => {
                        gathered = true;
                        if !self.gather() {
                            break;
                        }
                    }
                    Handled::Other => {}
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Only the handle's sender is left and it is gone: nobody can stop us.
                    break;
                }
            }
            // Drain what else has arrived, bounded so a storm cannot starve the work.
            for _ in 0..100_000 {
                match self.rx.try_recv() {
                    Ok(msg) => match self.handle(msg) {
                        Handled::Stop => return,
                        Handled::DropFile if !gathered => {
                            gathered = true;
                            if !self.gather() {
                                return;
                            }
                        }
                        _ => {}
                    },
                    Err(_) => break,
                }
            }
        }
    }

    /// Takes the events that follow the first one of an idle spell until events about drop
    /// files pause for [`GATHER_QUIET`], or [`GATHER_PACE`] times the burst's longest gap
    /// (at most [`GATHER_MAX`] in all), then asks for a listing of the inbox; false on stop.
    /// Events about other names (a temp file being written) do not keep it waiting.
    fn gather(&mut self) -> bool {
        let start = Instant::now();
        let until = start + GATHER_MAX;
        // Each gather starts from the lone file's pause: a dropper that drops one file at a
        // time, each once the one before is taken, must not pay a burst's pause for it.
        let mut longest = Duration::ZERO;
        let pace =
            |longest: Duration| (longest * GATHER_PACE).clamp(GATHER_QUIET, GATHER_QUIET_MAX);
        let mut last = start;
        let mut quiet_at = start + pace(longest);
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let msg = if now >= quiet_at {
                // This thread may have run late on a busy machine: what arrived meanwhile
                // belongs to the burst, and is no pause.
                match self.rx.try_recv() {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            } else {
                match self.rx.recv_timeout(quiet_at.min(until) - now) {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            };
            match self.handle(msg) {
                Handled::Stop => return false,
                Handled::DropFile => {
                    let now = Instant::now();
                    longest = longest.max(now - last);
                    (last, quiet_at) = (now, now + pace(longest));
                }
                Handled::Other => {}
            }
        }
        // The kernel's events may come late too (the watcher's own thread waits for a core):
        // a listing now finds every file renamed in so far, and one named before the others
        // holds them up until its event says it is complete (or it settles).
        self.scan_requested = true;
        true
    }

    /// Applies one message.
    fn handle(&mut self, msg: Msg) -> Handled {
        let ev = match msg {
            Msg::Stop => return Handled::Stop,
            Msg::Event(Ok(ev)) => ev,
            Msg::Event(Err(e)) => {
                tracing::warn!(event = "watch_error", error = %e, "inbox watch reported an error; rescanning");
                self.scan_requested = true;
                return Handled::DropFile;
            }
        };
        let mut handled = Handled::Other;
        if ev.need_rescan() {
            tracing::info!(
                event = "watch_overflow",
                "kernel event queue overflowed; rescanning the inbox"
            );
            self.scan_requested = true;
            handled = Handled::DropFile;
            // Closes may be among the lost events: settling decides again.
            for c in self.cands.values_mut() {
                c.writer = Writer::Unknown;
            }
        }
        let complete = completes(&ev.kind);
        let writer = match ev.kind {
            EventKind::Create(_) => Some(Writer::Created),
            EventKind::Modify(ModifyKind::Data(_)) => Some(Writer::Writing),
            _ => None,
        };
        for p in &ev.paths {
            if p == &self.inbox {
                // The folder itself changed (moved, deleted, permissions): look again.
                self.scan_requested = true;
                if matches!(
                    ev.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                ) {
                    // Gone: whatever folder has the name at the scan gets a new watch, even
                    // one made again at once under the old one's inode number (a file
                    // system may hand it out again), which the ident check takes for ours.
                    self.watched = None;
                }
                handled = Handled::DropFile;
                continue;
            }
            let Some(name) = p.file_name() else { continue };
            if p.parent() != Some(self.inbox.as_path()) || !super::is_drop_name(name) {
                continue;
            }
            handled = Handled::DropFile;
            // Something happened to the name: whatever it is now, look at it again.
            self.ignored.remove(name);
            let now = Instant::now();
            let c = self
                .cands
                .entry(name.to_os_string())
                .or_insert_with(|| Cand::new(now));
            if complete {
                c.hinted = true;
                c.writer = Writer::Unknown;
            } else if let Some(w) = writer {
                if w == Writer::Writing {
                    // Written again after a close: not complete.
                    c.hinted = false;
                }
                c.writer = w;
            }
            if c.failures == 0 {
                c.check_at = now;
            } else if complete && c.failed_as.is_none_or(|was| signature(p) != Some(was)) {
                // A file backing off after failures (one it could not read, say) that was
                // renamed in or written and closed again is another file now: look at once.
                // Not when it is the file that failed, unchanged: a move out of the inbox
                // that failed half-way (a copy to a full `processed_dir` on another file
                // system) renames it back in, and that event would end its back-off at once
                // (a probe's finding: the inbox thread spun at 60% of a core).
                c.failures = 0;
                c.failed_as = None;
                c.check_at = now;
            }
        }
        handled
    }

    fn next_deadline(&self) -> Instant {
        let mut d = self.next_scan;
        if self.events.is_some() && !self.missing {
            d = d.min(self.next_place_check);
        }
        if self.sweep {
            d = d.min(self.next_sweep);
        }
        for c in self.cands.values() {
            d = d.min(c.check_at);
        }
        if let Some(look) = self.ingestor.next_look() {
            d = d.min(look);
        }
        d
    }

    /// Whether the watched folder is still there under its name (its lock's file has links,
    /// and the name leads to it). When not, the watch and identity are dropped, so that the
    /// next scan watches whatever folder has the name, even one made again under the old
    /// one's inode number. Only with a kernel watch: polling lists the folder anyway.
    fn still_in_place(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.events.is_none() || self.missing {
            return true;
        }
        let unlinked = self
            .lock
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.nlink() == 0);
        if !unlinked && dir_ident(&self.inbox) == self.watched {
            return true;
        }
        self.watched = None;
        false
    }

    /// Lists the inbox: the truth about which files are there.
    fn scan(&mut self) {
        let started = Instant::now();
        self.scan_requested = false;
        // Polling lists the inbox every `poll_interval_ms`, and still at least every
        // `scan_interval_s` (SPEC 1) when the poll interval is the longer.
        self.next_scan = started
            + self
                .poll_every
                .map_or(self.scan_every, |p| p.min(self.scan_every));
        if !self.inbox_in_place() {
            self.next_scan = started + MISSING_RECHECK;
            return;
        }
        let entries = match std::fs::read_dir(&self.inbox) {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string();
                if self.last_scan_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(event = "scan_failed", dir = %self.inbox.display(), error = %msg, "cannot list the inbox");
                    // In `status`'s recent errors too: run as another user (root), `status`
                    // itself may list the folder well.
                    self.ingestor.store().note_event_blocking(
                        "scan_failed",
                        None,
                        &format!("cannot list the inbox {}: {msg}", self.inbox.display()),
                    );
                    self.last_scan_error = Some(msg);
                }
                return;
            }
        };
        self.last_scan_error = None;
        let mut present = HashSet::new();
        let mut near = HashSet::new();
        for e in entries.flatten() {
            let name = e.file_name();
            if !super::is_drop_name(&name) {
                // `X.JSON` (Windows tools): not taken, as SPEC names the suffixes; said once
                // per name, so that a dropper is not left wondering.
                if is_near_drop_name(&name) {
                    if !self.near_misses.contains(&name) {
                        tracing::warn!(
                            event = "ignored_name",
                            file = %super::fsutil::show_name(&name),
                            "a file whose name ends in .json or .jsonl in another case is not taken: rename it with a lower-case suffix"
                        );
                    }
                    near.insert(name);
                }
                continue;
            }
            present.insert(name.clone());
            if self.ignored.contains(&name) {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(true) {
                    continue;
                }
                // A directory replaced by a file of the same name.
                self.ignored.remove(&name);
            }
            self.cands.entry(name).or_insert_with(|| Cand::new(started));
        }
        self.cands.retain(|n, _| present.contains(n));
        self.ignored.retain(|n| present.contains(n));
        self.near_misses = near;
        // A stuck file removed by hand is stuck no longer.
        self.ingestor.forget_gone(&present);
        crate::metrics::get()
            .inbox_scan_duration_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether the inbox folder is there and watched. A folder deleted (and perhaps made
    /// again) is noticed at the next scan, which the folder's own removal event asks for:
    /// pushdrop says so, keeps looking every [`MISSING_RECHECK`], and once a folder is there
    /// again, watches that one. It does not make the folder itself: a deploy script's
    /// `mkdir` of its own would then fail.
    fn inbox_in_place(&mut self) -> bool {
        let now = dir_ident(&self.inbox);
        let Some(ident) = now else {
            if !self.missing {
                tracing::error!(event = "inbox_missing", dir = %self.inbox.display(), "the inbox folder is gone; no files are taken until it is back");
                self.missing = true;
                self.alive.store(false, Ordering::SeqCst);
            }
            return false;
        };
        if !self.missing && now == self.watched {
            return true;
        }
        // Looked at again (the old folder's late removal event, say), and it is the folder
        // watched already: nothing to do, nothing to say.
        if !self.missing && now == self.watch_on {
            self.watched = now;
            return true;
        }
        // Another folder under the name: its own lock, or another daemon's files. (Not a
        // second lock of the folder we hold: a second `flock` of ours would conflict with
        // the first.)
        let held = self
            .lock
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        if (now != self.watched || self.taken) && held != now {
            match lock_inbox(&self.inbox) {
                Ok(lock) => {
                    self.lock = lock;
                    self.taken = false;
                }
                Err(Taken) => {
                    if !self.taken {
                        tracing::error!(event = "inbox_taken", dir = %self.inbox.display(), "the inbox folder was made again and another pushdrop daemon holds it now; no files are taken from it until that one stops");
                        self.taken = true;
                    }
                    self.missing = true;
                    self.alive.store(false, Ordering::SeqCst);
                    return false;
                }
            }
        }
        if let Some((watcher, tx)) = self.events.take() {
            // A new watch for the new folder (the old one went with its folder).
            drop(watcher);
            match watch_inbox(&self.inbox, &tx) {
                Ok(w) => {
                    self.events = Some((w, tx));
                    self.watch_on = Some(ident);
                }
                Err(e) => {
                    tracing::warn!(event = "watch_unavailable", dir = %self.inbox.display(), error = %e, "cannot watch the inbox for events; polling it instead");
                    self.poll_every = Some(Duration::from_millis(self.cfg.inbox.poll_interval_ms));
                }
            }
        }
        tracing::info!(event = "inbox_back", dir = %self.inbox.display(), "the inbox folder is there again; taking files");
        self.watched = Some(ident);
        self.missing = false;
        self.alive.store(true, Ordering::SeqCst);
        true
    }

    /// Looks at candidates that are due, processes the ready ones (in name order, in batches);
    /// returns true when ready files remain for another round.
    fn take_ready(&mut self) -> bool {
        let now = Instant::now();
        let mut batch: Vec<(OsString, Candidate)> = Vec::new();
        let mut solo: Option<(OsString, Candidate)> = None;
        let mut bytes = 0u64;
        let mut more = false;
        let mut gone = Vec::new();
        // Name order: while a file named earlier is still settling (written in place, or
        // found at start-up younger than settle_ms, with no event to say it is complete), a
        // ready file named after it waits for it, up to settle_ms. Files renamed into an
        // inbox while pushdrop was stopped are thus taken in name order, not oldest first. A
        // file backing off after a failure holds nobody up.
        let mut settling_before: Option<Instant> = None;
        let retry_first = std::mem::take(&mut self.retry_turn);
        for (name, c) in self.cands.iter_mut() {
            if c.check_at > now {
                settling_before = earliest(settling_before, c.holds_up_until());
                continue;
            }
            if batch.len() >= BATCH_FILES || bytes >= BATCH_BYTES {
                more = true;
                break;
            }
            if c.failures > 0 && solo.is_some() {
                // Another retry due: a later call takes it. Not looked at now (a stat each,
                // at every call, made thousands of stuck files cost millions of stats).
                more = true;
                continue;
            }
            let path = self.inbox.join(name);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => {
                    gone.push(name.clone());
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                tracing::debug!(
                    event = "ignored",
                    file = &*super::fsutil::show_name(name),
                    "a directory"
                );
                self.ignored.insert(name.clone());
                gone.push(name.clone());
                continue;
            }
            let ready_now;
            let mut settled = true;
            if !ft.is_file() {
                // Symlinks, FIFOs, devices: rejected without being opened.
                ready_now = true;
            } else {
                let sig = file_signature(&meta);
                let age = ingest::mtime_age(&meta);
                if c.seen != Some(sig) {
                    c.seen = Some(sig);
                    c.stable_since = now;
                }
                let stable = now.duration_since(c.stable_since);
                settled = age >= self.settle || stable >= self.settle;
                if settled && c.writer == Writer::Writing && !writer_still_open(&path) {
                    // Written without being opened: `truncate(2)` by path sends IN_MODIFY
                    // with no open or close around it, so no close would ever come (a
                    // probe's file waited until the next start). The kernel, asked, says
                    // nobody holds it open for writing: settling decides.
                    c.writer = Writer::Unknown;
                }
                ready_now = c.hinted || (settled && !c.writer.holds(meta.size()));
                if !ready_now && settled {
                    // Settled, but its writer has it open: the close event wakes the loop;
                    // this look is only the safety net.
                    c.check_at = now + self.settle.max(Duration::from_secs(1));
                    if !c.warned && stable >= OPEN_WRITER_WARN {
                        c.warned = true;
                        tracing::warn!(
                            event = "open_for_writing",
                            file = &*super::fsutil::show_name(name),
                            unchanged_s = stable.as_secs(),
                            "a file in the inbox is still open for writing; it is taken once its writer closes it"
                        );
                    }
                } else if !ready_now {
                    let wait = self.settle.saturating_sub(age.max(stable));
                    c.check_at = now + wait.max(Duration::from_millis(10));
                }
            }
            if !ready_now {
                settling_before = earliest(settling_before, c.holds_up_until());
                continue;
            }
            if let Some(earlier) = settling_before {
                let until = *c.held_since.get_or_insert(now) + self.settle;
                if now < until {
                    c.check_at = earlier.min(until);
                    continue;
                }
            }
            bytes += meta.size();
            let cand = Candidate {
                path,
                settled,
                // Held up by an earlier file for settle_ms already: it goes now, whatever
                // the files before it in this batch turn out to be.
                waits_for_earlier: c.held_since.is_none_or(|h| now < h + self.settle),
            };
            // A file that failed before (it could not be read, committed or moved) is tried
            // on its own, so that it cannot fail a batch; the first one due waits here while
            // the files after it that were never tried go on. (Thousands of files stuck
            // behind a `processed_dir` pushdrop may not write, all due again at once, would
            // otherwise keep a new drop waiting through every one of their tries.) It goes
            // at the next call, which comes at once; a retry goes first when the previous
            // call let one wait, so a stream of new files does not starve the retries.
            if c.failures > 0 {
                solo = Some((name.clone(), cand));
                if retry_first && batch.is_empty() {
                    more = true;
                    break;
                }
                continue;
            }
            batch.push((name.clone(), cand));
        }
        for n in gone {
            self.cands.remove(&n);
        }
        if let Some(s) = solo {
            if batch.is_empty() {
                batch.push(s);
            } else {
                more = true;
                self.retry_turn = true;
            }
        }
        if batch.is_empty() {
            return more;
        }
        let (names, cands): (Vec<OsString>, Vec<Candidate>) = batch.into_iter().unzip();
        let mut results: BTreeMap<PathBuf, FileOutcome> = self
            .ingestor
            .process(cands)
            .into_iter()
            .map(|r| (r.path, r.outcome))
            .collect();
        let now = Instant::now();
        for name in names {
            let Some(r) = results.remove(&self.inbox.join(&name)) else {
                self.cands.remove(&name);
                continue;
            };
            if r.is_final() {
                self.cands.remove(&name);
                continue;
            }
            let Some(c) = self.cands.get_mut(&name) else {
                continue;
            };
            match r {
                // Left for a file named before it: looked at again with that file, as it
                // was (a file renamed in is still taken at once), for up to settle_ms.
                FileOutcome::InProgress(why) if why.starts_with(ingest::WAITS_FOR_EARLIER) => {
                    c.held_since.get_or_insert(now);
                    c.check_at = now + (self.settle / 4).max(Duration::from_millis(10));
                }
                FileOutcome::InProgress(why) => {
                    c.hinted = false;
                    // Look again once it has had time to settle.
                    c.seen = None;
                    c.check_at = now + (self.settle / 4).max(Duration::from_millis(10));
                    if why == ingest::OPEN_ELSEWHERE {
                        let since = *c.open_elsewhere_since.get_or_insert(now);
                        if !c.warned && now.duration_since(since) >= OPEN_WRITER_WARN {
                            c.warned = true;
                            tracing::warn!(
                                event = "open_for_writing",
                                file = &*super::fsutil::show_name(&name),
                                open_s = now.duration_since(since).as_secs(),
                                "a file in the inbox is still open for writing by another process; it is taken once its writer closes it"
                            );
                        }
                    } else {
                        c.open_elsewhere_since = None;
                    }
                }
                _ => {
                    c.hinted = false;
                    c.failures += 1;
                    c.failed_as = c.seen;
                    let backoff = Duration::from_millis(500)
                        .saturating_mul(1 << c.failures.min(7))
                        .min(MAX_BACKOFF);
                    c.check_at = now + backoff;
                }
            }
        }
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    /// The inbox loop `start` runs, without its thread and its kernel watch (each step by
    /// hand), over a temp folder's `inbox` whose `processed_dir` cannot be made: a file in
    /// the way of its parent, put there after the config's check. Committed files stay stuck.
    fn stuck_loop() -> (tempfile::TempDir, Loop, Store, mpsc::Sender<Msg>) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pushdrop.toml");
        std::fs::write(
            &path,
            "[inbox]\ndir = \"inbox\"\nprocessed_dir = \"blocker/processed\"\n\
             [store]\npath = \"pushdrop.db\"\n\
             [[apps]]\nname = \"a\"\nbundle_id = \"com.example.a\"\n\
             token = { key_file = \"k.p8\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" }\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("inbox")).unwrap();
        std::fs::write(d.path().join("k.p8"), "placeholder: nothing is sent").unwrap();
        let (cfg, _) = Config::load(&path).unwrap();
        let store = Store::open(&cfg.store.path, false).unwrap();
        std::fs::write(d.path().join("blocker"), "a file, not a folder").unwrap();
        let (tx, rx) = mpsc::channel();
        let mut lp = Loop::new(Arc::new(cfg), store.clone(), rx);
        lp.sweep = false;
        (d, lp, store, tx)
    }

    /// Files stuck in the inbox (committed, but `processed_dir` takes no files) and due for
    /// another try do not hold up a new drop: it goes first, and the retries after it, one
    /// at a time, taking turns with new files.
    #[test]
    fn a_new_drop_does_not_wait_for_the_retries_of_stuck_files() {
        let (d, mut lp, store, _tx) = stuck_loop();
        let inbox = d.path().join("inbox");
        let device = |n: u32| {
            format!(
                "{{\"type\":\"device\",\"token\":\"{}{n:04}\"}}\n",
                "ab".repeat(14)
            )
        };
        let committed = |name: &str| {
            let r = crate::store::query::Reader::open(store.path()).unwrap();
            let n: i64 = r
                .conn()
                .query_row(
                    "SELECT count(*) FROM committed_files WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
                .unwrap();
            n == 1
        };
        let hint_all = |lp: &mut Loop| {
            lp.scan();
            for c in lp.cands.values_mut() {
                c.hinted = true;
                c.check_at = Instant::now();
            }
        };
        for n in 0..5 {
            std::fs::write(inbox.join(format!("a{n}.jsonl")), device(n)).unwrap();
        }
        hint_all(&mut lp);
        while lp.take_ready() {}
        for n in 0..5 {
            assert!(committed(&format!("a{n}.jsonl")), "a{n} committed");
            assert_eq!(lp.cands[OsStr::new(&format!("a{n}.jsonl"))].failures, 1);
        }
        // All five are due again, and a new file arrives, named after them.
        std::fs::write(inbox.join("z.jsonl"), device(9)).unwrap();
        hint_all(&mut lp);
        assert!(lp.take_ready(), "more to do");
        assert!(committed("z.jsonl"), "the new file went first");
        assert_eq!(
            lp.cands[OsStr::new("a0.jsonl")].failures,
            1,
            "not tried yet"
        );
        // Then a retry, alone.
        assert!(lp.take_ready());
        assert_eq!(lp.cands[OsStr::new("a0.jsonl")].failures, 2, "tried again");
        assert_eq!(lp.cands[OsStr::new("a1.jsonl")].failures, 1);
    }

    /// A file whose move out failed half-way is renamed back into the inbox by the daemon
    /// itself: that event keeps its back-off (a probe's finding: a full `processed_dir` on
    /// another file system was tried every 9 ms), while a new version of the file under
    /// the name ends it.
    #[test]
    fn the_daemons_own_rename_back_keeps_a_failed_files_back_off() {
        let (d, mut lp, _store, _tx) = stuck_loop();
        let inbox = d.path().join("inbox");
        let file = inbox.join("a.jsonl");
        let record = format!(
            "{{\"type\":\"device\",\"token\":\"{}\"}}\n",
            "ab".repeat(16)
        );
        std::fs::write(&file, &record).unwrap();
        lp.scan();
        for c in lp.cands.values_mut() {
            c.hinted = true;
            c.check_at = Instant::now();
        }
        while lp.take_ready() {}
        let name = OsStr::new("a.jsonl");
        assert_eq!(lp.cands[name].failures, 1, "its move failed");
        let renamed_in = |lp: &mut Loop| {
            lp.handle(Msg::Event(Ok(notify::Event::new(EventKind::Modify(
                ModifyKind::Name(RenameMode::To),
            ))
            .add_path(file.clone()))));
        };
        // Out under a hidden name and back, as a failed copy across file systems does.
        let hidden = inbox.join(".pushdrop-out-1-0.tmp");
        std::fs::rename(&file, &hidden).unwrap();
        std::fs::rename(&hidden, &file).unwrap();
        renamed_in(&mut lp);
        let c = &lp.cands[name];
        assert_eq!(c.failures, 1, "still backing off");
        assert!(c.check_at > Instant::now(), "not looked at again at once");
        // A new file under the name is looked at at once.
        let new = inbox.join(".new.tmp");
        std::fs::write(&new, record.clone() + &record).unwrap();
        std::fs::rename(&new, &file).unwrap();
        renamed_in(&mut lp);
        assert_eq!(lp.cands[name].failures, 0, "another file now");
    }

    #[test]
    fn a_drop_suffix_in_another_case_is_a_near_miss() {
        for name in ["A.JSON", "b.JsonL", "c.Json"] {
            assert!(is_near_drop_name(OsStr::new(name)), "{name}");
        }
        // Not meant as drop files (the scan asks about names it does not take only).
        for name in [".A.JSON", "a.txt", "a.JSON.tmp"] {
            assert!(!is_near_drop_name(OsStr::new(name)), "{name}");
        }
    }
}
