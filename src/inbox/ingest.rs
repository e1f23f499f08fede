//! From a file on disk to committed records: open safely, read, parse, commit (group commit
//! over many files), then move the file away. One path for the watcher and `pushdrop ingest`.
//!
//! Order matters for crash safety: records are durably committed before the file moves, and
//! the store remembers (name, sha256, inode, mtime) of every committed file, so a file found
//! again after a crash between commit and move is only moved, never ingested twice.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::fsutil;
use super::parse::{self, FileKind, Problem, RejectReason, Rejection};
use super::report::ErrorReport;
use crate::config::Config;
use crate::metrics::{self, ReasonLabel, TypeLabel};
use crate::store::{CommittedVersion, IngestFile, IngestOutcome, Store, StoreError};

/// A file to take.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub path: PathBuf,
    /// Whether the caller knows the file has not changed for `settle_ms` (always true for
    /// `pushdrop ingest`): a truncated file is then rejected instead of waited for.
    pub settled: bool,
    /// Name order: when a file before it in the same batch turns out to be still being
    /// written (open elsewhere, empty, ending early), it is not taken either, but left for
    /// the next look. False once it has waited `settle_ms` for the files before it, and for
    /// `pushdrop ingest`, which takes what it is given.
    pub waits_for_earlier: bool,
}

/// What became of one file.
#[derive(Debug)]
pub struct FileResult {
    pub path: PathBuf,
    /// The file name (lossy UTF-8), as logged and recorded in the store.
    pub name: String,
    pub outcome: FileOutcome,
}

/// The fate of a file after one attempt.
#[derive(Debug)]
pub enum FileOutcome {
    /// Committed (now or before a crash) and moved away.
    Accepted(Accepted),
    /// Moved to `rejected_dir` with a report.
    Rejected(Rejected),
    /// Still being written: left in place, to be tried again.
    InProgress(String),
    /// Not a drop file (a directory, a name without `.json`/`.jsonl`): left alone.
    Ignored(String),
    /// Gone before it could be read (another process took it).
    Vanished,
    /// Could not be read or committed (I/O or database trouble): left in place, try again.
    Failed(String),
}

/// An accepted file.
#[derive(Debug)]
pub struct Accepted {
    pub devices: usize,
    pub notifications: usize,
    /// What the store did; `already_committed` after a crash between commit and move.
    pub store: IngestOutcome,
    /// Where the file went (`None` when deleted because `keep_processed = false`, or when
    /// another process moved it first).
    pub moved_to: Option<PathBuf>,
    /// The records are committed but the file could not be moved: it is retried (and then
    /// recognised as already committed).
    pub move_error: Option<String>,
    pub elapsed: Duration,
}

/// A rejected file.
#[derive(Debug)]
pub struct Rejected {
    pub reason: RejectReason,
    /// Those listed in the report (see [`Rejected::problem_count`]).
    pub problems: Vec<Problem>,
    /// Problems beyond those listed.
    pub unlisted: usize,
    /// The notification ids the file named (see [`parse::NamedIds`]).
    pub ids: parse::NamedIds,
    pub moved_to: Option<PathBuf>,
    pub report: Option<PathBuf>,
    /// The file could not be moved to `rejected_dir`: it stays and is retried.
    pub move_error: Option<String>,
}

impl Rejected {
    /// How many problems the file has, those beyond the report's list too.
    pub fn problem_count(&self) -> usize {
        parse::problem_count(&self.problems, self.unlisted)
    }
}

impl FileOutcome {
    /// True when the file is done with: the watcher forgets it.
    pub fn is_final(&self) -> bool {
        match self {
            FileOutcome::Accepted(a) => a.move_error.is_none(),
            FileOutcome::Rejected(r) => r.move_error.is_none(),
            FileOutcome::Ignored(_) | FileOutcome::Vanished => true,
            FileOutcome::InProgress(_) | FileOutcome::Failed(_) => false,
        }
    }
}

/// A file read and parsed, ready to commit.
struct Ready {
    path: PathBuf,
    name: String,
    /// What was read and committed: the file as it was then, to tell whether the file moved
    /// afterwards is still that file, and still holds only what was read.
    read: Box<ReadIdentity>,
    devices: usize,
    notifications: usize,
    started: Instant,
}

/// The identity and content of a file as it was read: after its commit, what tells whether
/// the file about to leave the inbox is still that file and holds nothing more.
pub struct ReadIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    sha256: String,
    kind: FileKind,
}

/// What the file a committed name leads to is, compared with what was read.
enum AfterRead {
    /// The same file, unchanged (or on another file system, where this cannot be told).
    Same,
    /// Another file: a writer renamed a new one over the name.
    Replaced,
    /// The same file with other content: a writer wrote to it again after the read.
    Changed,
}

impl ReadIdentity {
    fn compare(&self, m: &std::fs::Metadata) -> AfterRead {
        if m.dev() != self.dev {
            AfterRead::Same
        } else if m.ino() != self.ino {
            AfterRead::Replaced
        } else if m.size() != self.size || mtime_ns(m) != self.mtime_ns {
            AfterRead::Changed
        } else {
            AfterRead::Same
        }
    }
}

/// The result of looking at one file without committing anything.
pub enum Examined {
    /// Parsed; counts of devices and notifications, and the file for the store.
    Ready {
        file: IngestFile,
        read: Box<ReadIdentity>,
        devices: usize,
        notifications: usize,
    },
    Reject(Rejection),
    InProgress(String),
    Ignored(String),
    Vanished,
    Failed(String),
}

/// The file name of a path as pushdrop names it in logs and the store.
pub fn display_name(path: &Path) -> String {
    fsutil::show_name(path.file_name().unwrap_or(path.as_os_str())).into_owned()
}

/// Looks at a file and parses it, never following symlinks and never opening anything but a
/// regular file. `settled`: see [`Candidate::settled`].
pub fn examine(path: &Path, cfg: &Config, settled: bool) -> Examined {
    match read_drop(path, cfg, settled) {
        Ok(read) => parse_read(read, cfg, None),
        Err(e) => e,
    }
}

/// [`examine`], the valid records handed to `sink` as they are parsed (see
/// [`parse::parse_file_streaming`]): `validate` looks at them once and keeps none, so a big
/// file is checked without all its records in memory at once. On [`Examined::Ready`], its
/// `file` holds the records not handed over yet.
pub fn examine_streaming(
    path: &Path,
    cfg: &Config,
    sink: &mut dyn FnMut(Vec<crate::model::Record>),
) -> Examined {
    match read_drop(path, cfg, true) {
        Ok(read) => parse_read(read, cfg, Some(sink)),
        Err(e) => e,
    }
}

/// A file at least this big is committed while it is parsed (see [`Store::begin_ingest`])
/// instead of after: its parsed records never all wait in memory at once.
const STREAM_MIN_BYTES: usize = 1 << 20;

/// A drop file read whole, with what identifies this copy of it.
struct ReadDrop {
    name: String,
    kind: FileKind,
    bytes: Vec<u8>,
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    /// When the file was made (ms since the epoch), where the file system says.
    born_ms: Option<i64>,
    /// Unchanged for `settle_ms` (or known to be complete).
    settled: bool,
}

impl ReadDrop {
    /// Big enough to be committed while it is parsed.
    fn is_streamed(&self) -> bool {
        self.bytes.len() >= STREAM_MIN_BYTES
    }

    /// A `.jsonl` file's last line without its newline yet is still being written.
    fn last_line_unfinished(&self) -> bool {
        self.kind == FileKind::Jsonl && !self.settled && self.bytes.last() != Some(&b'\n')
    }

    fn identity(&self, sha256: String) -> Box<ReadIdentity> {
        Box::new(ReadIdentity {
            dev: self.dev,
            ino: self.ino,
            size: self.bytes.len() as u64,
            mtime_ns: self.mtime_ns,
            sha256,
            kind: self.kind,
        })
    }

    fn ingest_file(&self, sha256: String, records: Vec<crate::model::Record>) -> IngestFile {
        IngestFile {
            name: self.name.clone(),
            size: self.bytes.len() as u64,
            sha256,
            ino: self.ino,
            mtime_ns: self.mtime_ns,
            records,
        }
    }
}

/// Why a file is not taken yet when the kernel says another process holds it open for
/// writing (see [`fsutil::open_for_writing_elsewhere`]).
pub(crate) const OPEN_ELSEWHERE: &str = "another process has it open for writing";
/// How a file left for a file named before it that is still being written is reported
/// (see [`Candidate::waits_for_earlier`]); the earlier file's name follows.
pub(crate) const WAITS_FOR_EARLIER: &str =
    "waits for a file named before it, still being written: ";

/// The checks before parsing, and the read: what [`examine`] does before it parses.
fn read_drop(path: &Path, cfg: &Config, settled: bool) -> Result<ReadDrop, Examined> {
    let name = display_name(path);
    let Some(kind) = FileKind::from_name(&name) else {
        return Err(Examined::Ignored(
            "the name does not end in .json or .jsonl".into(),
        ));
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Examined::Vanished),
        Err(e) => return Err(Examined::Failed(format!("cannot stat: {e}"))),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Examined::Ignored("a directory".into()));
    }
    if ft.is_symlink() {
        return Err(Examined::Reject(Rejection::file(
            RejectReason::Symlink,
            "is a symbolic link: pushdrop never follows links, so the link itself is rejected and its target is not read",
        )));
    }
    if !ft.is_file() {
        return Err(Examined::Reject(Rejection::file(
            RejectReason::NotRegular,
            format!(
                "is a {}, not a regular file: it was never opened",
                special_kind(&meta)
            ),
        )));
    }
    let max = cfg.inbox.max_file_bytes;
    let oversize = |size: u64| {
        Examined::Reject(Rejection::file(
            RejectReason::Oversize,
            format!("is {size} bytes; max_file_bytes is {max} (the file was not read)"),
        ))
    };
    if meta.size() > max {
        return Err(oversize(meta.size()));
    }
    let mut file = match fsutil::open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Examined::Vanished),
        // ELOOP: replaced by a symlink since the lstat; look again next time.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Examined::InProgress("replaced while being opened".into()));
        }
        Err(e) => return Err(Examined::Failed(format!("cannot open: {e}"))),
    };
    let before = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Err(Examined::Failed(format!("cannot stat: {e}"))),
    };
    if before.dev() != meta.dev() || before.ino() != meta.ino() || !before.file_type().is_file() {
        return Err(Examined::InProgress("replaced while being opened".into()));
    }
    if before.size() > max {
        return Err(oversize(before.size()));
    }
    if fsutil::open_for_writing_elsewhere(&file) == Some(true) {
        return Err(Examined::InProgress(OPEN_ELSEWHERE.into()));
    }
    let mut bytes = Vec::with_capacity(before.size() as usize + 1);
    if let Err(e) = (&mut file).take(max + 1).read_to_end(&mut bytes) {
        return Err(Examined::Failed(format!("cannot read: {e}")));
    }
    if bytes.len() as u64 > max {
        return Err(oversize(bytes.len() as u64));
    }
    let after = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Err(Examined::Failed(format!("cannot stat: {e}"))),
    };
    if after.size() != before.size()
        || after.mtime() != before.mtime()
        || after.mtime_nsec() != before.mtime_nsec()
        || after.size() != bytes.len() as u64
    {
        return Err(Examined::InProgress("changed while being read".into()));
    }
    drop(file);
    let mtime_ns = mtime_ns(&after);
    let settle = Duration::from_millis(cfg.inbox.settle_ms);
    let settled = settled || mtime_age(&after) >= settle;
    Ok(ReadDrop {
        name,
        kind,
        bytes,
        dev: after.dev(),
        ino: after.ino(),
        mtime_ns,
        born_ms: birth_ms(&after),
        settled,
    })
}

/// When a file was made (ms since the epoch), where the file system tells (statx).
fn birth_ms(meta: &std::fs::Metadata) -> Option<i64> {
    meta.created()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

/// The committed file that `read` is with lines appended, under the same name. A file
/// renamed in anew, or a copy, is a file of its own however it starts.
fn committed_part<'c>(
    committed: &'c [CommittedVersion],
    read: &ReadDrop,
) -> Option<&'c CommittedVersion> {
    if read.kind != FileKind::Jsonl {
        return None;
    }
    committed.iter().find(|v| {
        v.name == read.name && is_committed_prefix(v, read.ino, read.born_ms, &read.bytes)
    })
}

/// Whether `bytes`, the content of inode `ino` made at `born_ms`, are committed file `v`
/// with lines appended: the same inode, made before that commit (where the file system
/// tells: an inode number can be used again for a new file once the committed file is
/// deleted), and `v`'s bytes the start of them.
fn is_committed_prefix(v: &CommittedVersion, ino: u64, born_ms: Option<i64>, bytes: &[u8]) -> bool {
    v.ino == ino
        && born_ms.is_none_or(|b| b <= v.committed_at)
        && v.size < bytes.len() as u64
        && content_hash(&bytes[..v.size as usize]) == v.sha256
}

/// A file's content hash, as `committed_files` remembers it (SHA-256, lowercase hex).
fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What [`examine`] does after the read: parse, and decide.
fn parse_read(
    read: ReadDrop,
    cfg: &Config,
    sink: Option<&mut dyn FnMut(Vec<crate::model::Record>)>,
) -> Examined {
    let parsed = match sink {
        None => parse::parse_file(&read.bytes, read.kind, cfg),
        Some(sink) => parse::parse_file_streaming(&read.bytes, read.kind, cfg, sink),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(r) => return parse_failed(r, read.settled),
    };
    if read.last_line_unfinished() {
        return Examined::InProgress("last line has no newline yet".into());
    }
    let sha256 = content_hash(&read.bytes);
    Examined::Ready {
        read: read.identity(sha256.clone()),
        file: read.ingest_file(sha256, parsed.records),
        devices: parsed.devices,
        notifications: parsed.notifications,
    }
}

/// A file that did not parse: rejected, or, while it may still be being written, left for
/// later.
fn parse_failed(r: Rejection, settled: bool) -> Examined {
    match r.reason {
        RejectReason::Truncated if !settled => {
            Examined::InProgress("ends early: still being written?".into())
        }
        // `: > x.json; cat part >> x.json` closes an empty file first: wait for content.
        RejectReason::Empty if !settled => {
            Examined::InProgress("empty: still being written?".into())
        }
        _ => Examined::Reject(r),
    }
}

fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// A file's mtime in nanoseconds since the epoch: with its size and inode, what tells one
/// version of a file from the next.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// How long ago a file was last modified (zero when its mtime is in the future).
pub fn mtime_age(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or(Duration::ZERO)
}

/// Commits files and moves them; shared by the watcher and `pushdrop ingest`.
#[derive(Clone)]
pub struct Ingestor {
    cfg: Arc<Config>,
    store: Store,
    /// Files handled (committed or rejected) that could not be moved out of the inbox: they
    /// are looked at again at every scan, and `pushdrop_inbox_stuck_files` counts them so that
    /// a `processed_dir` or `rejected_dir` that takes no files does not go unnoticed.
    stuck: Arc<std::sync::Mutex<BTreeSet<PathBuf>>>,
    /// `.jsonl` files moved out of the inbox, to be looked at once more (the watcher's
    /// ingestor only: see [`Ingestor::watching`]).
    moved: Arc<std::sync::Mutex<Vec<Moved>>>,
    late_looks: bool,
}

/// A `.jsonl` file moved out of the inbox (into `processed_dir`, or to a hidden name to be
/// deleted) whose writer may still write into it: an appender that opens the file, writes a
/// line and closes it can have opened it just before the move, and what it writes lands in
/// the moved file, where nobody would read it. Looked at again a moment later (and for as
/// long as the kernel says a writer holds it open): lines found there come back into the
/// inbox as a file of their own, as for lines appended before the move.
struct Moved {
    path: PathBuf,
    inbox: PathBuf,
    fname: OsString,
    name: String,
    dev: u64,
    ino: u64,
    /// Bytes already taken (committed, or split off).
    taken: u64,
    due: Instant,
    looks: u32,
    /// To be deleted once looked at (`keep_processed = false`).
    delete: bool,
}

/// How long after a `.jsonl` file's move it is looked at again.
const LATE_LOOK_AFTER: Duration = Duration::from_millis(250);
/// Looks again while a writer holds a moved file open, at most this many times (10 s).
const LATE_LOOKS_MAX: u32 = 40;

impl Ingestor {
    pub fn new(cfg: Arc<Config>, store: Store) -> Ingestor {
        Ingestor {
            cfg,
            store,
            stuck: Arc::default(),
            moved: Default::default(),
            late_looks: false,
        }
    }

    /// The watcher's ingestor: it looks at the `.jsonl` files it moved out once more, a
    /// moment after the move ([`Ingestor::look_again`]). A one-shot `ingest` has no later.
    pub fn watching(mut self) -> Ingestor {
        self.late_looks = true;
        self
    }

    /// When the next moved file is due for its second look.
    pub fn next_look(&self) -> Option<Instant> {
        let moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
        moved.iter().map(|m| m.due).min()
    }

    /// Looks again at the moved `.jsonl` files that are due (all of them when `all`: the
    /// watcher is stopping, and nothing waits for a writer any more).
    pub fn look_again(&self, all: bool) {
        let now = Instant::now();
        let due: Vec<Moved> = {
            let mut moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
            if moved.is_empty() {
                return;
            }
            moved.extract_if(.., |m| all || m.due <= now).collect()
        };
        for m in due {
            if let Some(again) = self.look(m, all) {
                self.moved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(again);
            }
        }
    }

    /// One more look at a moved file: its complete lines written since what was taken go
    /// back into the inbox. `Some` when it must be looked at again (a writer holds it open).
    fn look(&self, mut m: Moved, last: bool) -> Option<Moved> {
        use std::io::Seek as _;
        let Ok(file) = fsutil::open_nofollow(&m.path) else {
            return None; // gone (an operator, or retention): nothing left to take
        };
        let Ok(meta) = file.metadata() else {
            return None;
        };
        if (meta.dev(), meta.ino()) != (m.dev, m.ino) {
            return None;
        }
        let writer = fsutil::open_for_writing_elsewhere(&file) == Some(true);
        if meta.size() > m.taken {
            let mut tail = Vec::new();
            let read = (&file)
                .seek(std::io::SeekFrom::Start(m.taken))
                .and_then(|_| {
                    (&file)
                        .take(self.cfg.inbox.max_file_bytes)
                        .read_to_end(&mut tail)
                });
            // Complete lines only: the rest is still being written.
            let end = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if read.is_ok() && end > 0 {
                match split_off(&tail[..end], &m.inbox, &m.fname) {
                    Ok(taken_as) => {
                        tracing::warn!(
                            event = "appended_after_read", file = m.name.as_str(), bytes = end as u64,
                            taken_as = %display_name(&taken_as), moved = true,
                            "lines were written into the file after it was moved out of the inbox (its writer had it open); they are taken as a file of their own"
                        );
                        m.taken += end as u64;
                    }
                    Err(e) => {
                        tracing::error!(event = "appended_after_read", file = m.name.as_str(), moved = %m.path.display(), error = %e, "lines were written into the file after it was moved out of the inbox, and cannot be taken: they are in the moved file");
                        return None;
                    }
                }
            }
        }
        if writer && !last && m.looks < LATE_LOOKS_MAX {
            m.looks += 1;
            m.due = Instant::now() + LATE_LOOK_AFTER;
            return Some(m);
        }
        if meta.size() > m.taken {
            tracing::warn!(event = "appended_after_read", file = m.name.as_str(), moved = %m.path.display(), bytes = meta.size() - m.taken, "a line written into the file after it was moved out of the inbox is unfinished: it stays in the moved file");
            return None;
        }
        if m.delete {
            let _ = std::fs::remove_file(&m.path);
        }
        None
    }

    /// Notes whether a handled file is stuck in the inbox; true when it was not stuck before.
    fn set_stuck(&self, path: &Path, stuck: bool) -> bool {
        let mut set = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        if !stuck && set.is_empty() {
            // The usual case, at every file: nothing stuck, nothing to update.
            return false;
        }
        let changed = if stuck {
            set.insert(path.to_path_buf())
        } else {
            set.remove(path)
        };
        if changed {
            // Not pruned here: a stat of every stuck file at every file's try made thousands
            // of stuck files cost millions of stats per retry round. The scan prunes.
            metrics::get().inbox_stuck_files.set(set.len() as i64);
        }
        changed
    }

    /// Stuck files that are gone (removed by hand) count no longer: asked at every scan, as
    /// no other file may come to update the count, with the drop files' names the scan found
    /// (no stat per stuck file: thousands of them, at every scan, cost a core).
    pub fn forget_gone(&self, present: &std::collections::HashSet<OsString>) {
        let mut set = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        if !set.is_empty() {
            set.retain(|p| p.file_name().is_some_and(|n| present.contains(n)));
            metrics::get().inbox_stuck_files.set(set.len() as i64);
        }
    }

    /// A handled file that stays in the inbox: counted, and listed in `status` once. True
    /// the first time: its log line is an error then, and a debug line at every later try
    /// (the metric keeps counting it), so that a thousand files stuck
    /// behind a `processed_dir` it may not write do not log a thousand errors a minute.
    fn stuck(&self, r: &FileResult, kind: &str, why: &str) -> bool {
        let new = self.set_stuck(&r.path, true);
        if new {
            self.store
                .note_event_blocking(kind, None, &format!("{}: {why}", r.name));
        }
        new
    }

    /// Whether a file in `folder` is already in `dest`, where it would be moved: only a
    /// one-shot `pushdrop ingest` of a file in `processed_dir` or `rejected_dir` (the watcher's
    /// inbox is neither; the config refuses that), which would otherwise move the file onto
    /// itself under a new name.
    fn in_its_own_folder(&self, folder: &Path, dest: &Path) -> bool {
        !self.late_looks && crate::config::same_folder(folder, dest)
    }

    /// The store files are committed to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes a batch of files in name order: the ready ones are committed together in ONE
    /// `Store::ingest` call (one fsync), then moved, except that a big file (of either kind)
    /// is committed on its own while it is parsed (the ready files named before it are
    /// committed first, so files still go in in name order); rejected ones are moved with
    /// their report; directories are synced once at the end. Logs one line per finished file
    /// and updates the metrics.
    pub fn process(&self, candidates: Vec<Candidate>) -> Vec<FileResult> {
        let mut results = Vec::with_capacity(candidates.len());
        let mut ready = Vec::new();
        let mut files = Vec::new();
        let mut dirty: BTreeSet<PathBuf> = BTreeSet::new();
        // The first file of the batch found still being written: the files after it that
        // wait for earlier ones are not taken before it (name order).
        let mut unfinished: Option<String> = None;
        let committed = self.committed_versions(&candidates);
        for c in candidates {
            let started = Instant::now();
            let name = display_name(&c.path);
            let read = match &unfinished {
                // Not even opened: it waits for the earlier file (name order).
                Some(earlier) if c.waits_for_earlier => Err(Examined::InProgress(format!(
                    "{WAITS_FOR_EARLIER}{earlier}"
                ))),
                _ => read_drop(&c.path, &self.cfg, c.settled),
            };
            if let Ok(r) = &read
                && let Some(part) = committed_part(&committed, r)
            {
                self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
                let r = self.appended_to_committed(r, part, c.path, started, &mut dirty);
                self.push_logged(&mut results, r);
                continue;
            }
            let examined = match read {
                Ok(read) if read.is_streamed() => {
                    self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
                    match self.stream(read, c.path.clone(), started, &mut dirty) {
                        Ok(r) => {
                            self.push_logged(&mut results, r);
                            // A big file takes a while: its line need not wait for the rest
                            // of the batch.
                            crate::logging::flush_files();
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Ok(read) => parse_read(read, &self.cfg, None),
                Err(e) => e,
            };
            let outcome = match examined {
                Examined::Ready {
                    file,
                    read,
                    devices,
                    notifications,
                } => {
                    ready.push(Ready {
                        path: c.path,
                        name,
                        read,
                        devices,
                        notifications,
                        started,
                    });
                    files.push(file);
                    continue;
                }
                Examined::Reject(r) => {
                    // Name order holds for what leaves the inbox too: the files named before
                    // it are committed and moved first.
                    self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
                    self.reject(&c.path, &name, r, &mut dirty)
                }
                Examined::InProgress(why) => {
                    unfinished.get_or_insert_with(|| name.clone());
                    FileOutcome::InProgress(why)
                }
                Examined::Ignored(why) => FileOutcome::Ignored(why),
                Examined::Vanished => FileOutcome::Vanished,
                Examined::Failed(why) => FileOutcome::Failed(why),
            };
            self.push_logged(
                &mut results,
                FileResult {
                    path: c.path,
                    name,
                    outcome,
                },
            );
        }
        self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
        for d in &dirty {
            if let Err(e) = fsutil::fsync_dir(d) {
                tracing::error!(event = "fsync_failed", dir = %d.display(), error = %e, "cannot sync directory");
            }
        }
        // The files are moved: their lines go to the file now, not a batch later (a kill -9
        // would lose them while nothing else would say what became of the files).
        crate::logging::flush_files();
        results
    }

    /// What the store remembers of the `.jsonl` files among `candidates`: a committed file
    /// may still be in the inbox (its move failed, or a crash came between commit and move),
    /// and lines may have been appended to it since. Its content is then new, but its
    /// committed part must not be ingested again (see [`committed_part`]). One round trip
    /// per batch. Nothing is asked for `.json` files: one written to after its commit is no
    /// longer one JSON document, and is rejected whole, not taken twice.
    fn committed_versions(&self, candidates: &[Candidate]) -> Vec<CommittedVersion> {
        let names: Vec<String> = candidates
            .iter()
            .map(|c| display_name(&c.path))
            .filter(|n| FileKind::from_name(n) == Some(FileKind::Jsonl))
            .collect();
        if names.is_empty() {
            return Vec::new();
        }
        match self.store.committed_versions_blocking(names) {
            Ok(v) => v,
            Err(e) => {
                // A store that cannot answer this will most likely not commit the files
                // either, and leaves them for the next look.
                tracing::warn!(event = "store_error", error = %e, "cannot look up the files committed earlier");
                Vec::new()
            }
        }
    }

    /// A committed `.jsonl` file found again in the inbox with lines appended: nothing is
    /// committed; it leaves the inbox as a file committed before, and the move splits the
    /// lines after its committed part off as a file of their own ([`Ingestor::take_appended`]),
    /// as for lines appended between a read and its move.
    fn appended_to_committed(
        &self,
        read: &ReadDrop,
        part: &CommittedVersion,
        path: PathBuf,
        started: Instant,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> FileResult {
        let ready = Ready {
            path,
            name: read.name.clone(),
            read: Box::new(ReadIdentity {
                dev: read.dev,
                ino: read.ino,
                size: part.size,
                mtime_ns: read.mtime_ns,
                sha256: part.sha256.clone(),
                kind: read.kind,
            }),
            devices: 0,
            notifications: 0,
            started,
        };
        let before = IngestOutcome {
            already_committed: true,
            ..IngestOutcome::default()
        };
        self.accepted(ready, Ok(before), dirty)
    }

    /// Each file's line goes out as soon as its fate is sealed (moved, or left), not after
    /// the whole batch: a kill -9 during a batch's moves would lose the lines of the files
    /// already moved (see `[log]` in the README).
    fn push_logged(&self, results: &mut Vec<FileResult>, r: FileResult) {
        self.log(&r);
        results.push(r);
    }

    /// Commits the ready files gathered so far in one transaction, and moves them.
    fn commit_ready(
        &self,
        ready: &mut Vec<Ready>,
        files: &mut Vec<IngestFile>,
        results: &mut Vec<FileResult>,
        dirty: &mut BTreeSet<PathBuf>,
    ) {
        if files.is_empty() {
            return;
        }
        match self.store.ingest(std::mem::take(files)) {
            Ok(outcomes) => {
                for (r, store) in ready.drain(..).zip(outcomes) {
                    self.push_logged(results, self.accepted(r, Ok(store), dirty));
                }
            }
            Err(e) => {
                for r in ready.drain(..) {
                    self.push_logged(results, self.accepted(r, Err(e.to_string()), dirty));
                }
            }
        }
    }

    /// A big file, committed while it is parsed (see [`Store::begin_ingest`]): the writer
    /// inserts each chunk of records while the next is parsed, in one transaction that
    /// commits only once the whole file parsed without a problem. The writer is engaged by
    /// the first clean chunk, not before: a file that fails early never holds it (a `.json`
    /// that ends early, still being written, fails its syntax pass before any record is
    /// looked at, at every look until it is complete). A file that did not parse (or could
    /// not start) comes back as what [`examine`] would have said.
    fn stream(
        &self,
        read: ReadDrop,
        path: PathBuf,
        started: Instant,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> Result<FileResult, Examined> {
        if read.last_line_unfinished() {
            return Err(Examined::InProgress("last line has no newline yet".into()));
        }
        let begin = || {
            self.store
                .begin_ingest(read.ingest_file(String::new(), Vec::new()))
        };
        let mut stream = None;
        let mut writer_gone = false;
        // The content hash is only needed for the commit: it is computed on a thread of its
        // own while the file is parsed, so the writer starts on the first chunk without
        // waiting for it (15 MB took about 9 ms to hash, on the path to the first insert).
        // Where no thread can be had, it is computed here after the parse.
        let (parsed, sha256) = std::thread::scope(|scope| {
            let hasher = std::thread::Builder::new()
                .name("pushdrop-hash".into())
                .spawn_scoped(scope, || content_hash(&read.bytes))
                .ok();
            let parsed =
                parse::parse_file_streaming(&read.bytes, read.kind, &self.cfg, &mut |chunk| {
                    // A writer that could not start or went away: said below, once the parse
                    // is done.
                    writer_gone = writer_gone
                        || match stream.get_or_insert_with(begin) {
                            Ok(s) => !s.send(chunk),
                            Err(_) => true,
                        };
                });
            let sha256 = hasher
                .and_then(|h| h.join().ok())
                .unwrap_or_else(|| content_hash(&read.bytes));
            (parsed, sha256)
        });
        let parsed = match parsed {
            Ok(p) => p,
            Err(r) => {
                if let Some(Ok(s)) = stream {
                    s.abandon();
                }
                return Err(parse_failed(r, read.settled));
            }
        };
        let stream = match stream.unwrap_or_else(begin) {
            Ok(s) => s,
            Err(e) => return Err(Examined::Failed(format!("cannot commit: {e}"))),
        };
        if !writer_gone {
            stream.send(parsed.records);
        }
        let identity = read.identity(sha256.clone());
        let committed = stream.commit(sha256).map_err(|e| e.to_string());
        let ready = Ready {
            path,
            name: read.name,
            read: identity,
            devices: parsed.devices,
            notifications: parsed.notifications,
            started,
        };
        Ok(self.accepted(ready, committed, dirty))
    }

    /// The result of a parsed file's commit: moved away once committed, left in place (to be
    /// tried again) when the commit failed.
    fn accepted(
        &self,
        r: Ready,
        committed: Result<IngestOutcome, String>,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> FileResult {
        let store = match committed {
            Ok(s) => s,
            Err(e) => {
                return FileResult {
                    path: r.path,
                    name: r.name,
                    outcome: FileOutcome::Failed(format!("cannot commit: {e}")),
                };
            }
        };
        let (moved_to, move_error) = self.finish_accepted(&r, dirty);
        FileResult {
            path: r.path,
            name: r.name,
            outcome: FileOutcome::Accepted(Accepted {
                devices: r.devices,
                notifications: r.notifications,
                store,
                moved_to,
                move_error,
                elapsed: r.started.elapsed(),
            }),
        }
    }

    /// Moves (or deletes) a committed file, making sure that what leaves the inbox is the file
    /// that was read and holds nothing more: a writer may have renamed a new file over the
    /// name, or written to the file again, since the read. The file is first moved out of the
    /// way (to `processed_dir`, or to a hidden name when it is to be deleted), then what was
    /// moved is compared with what was read: a new file goes back into the inbox, and lines
    /// appended to a `.jsonl` come back as a file of their own. Nothing unread is ever moved
    /// away or deleted.
    fn finish_accepted(
        &self,
        r: &Ready,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> (Option<PathBuf>, Option<String>) {
        let grown = match std::fs::symlink_metadata(&r.path) {
            Ok(m) => match r.read.compare(&m) {
                AfterRead::Replaced => {
                    tracing::warn!(
                        event = "replaced",
                        file = r.name.as_str(),
                        "file was replaced after it was read; the new file will be taken separately"
                    );
                    return (None, None);
                }
                AfterRead::Changed => true,
                AfterRead::Same => false,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, None),
            Err(e) => return (None, Some(format!("cannot stat: {e}"))),
        };
        let Some(inbox) = r.path.parent() else {
            return (None, Some("path has no folder".into()));
        };
        let Some(fname) = r.path.file_name() else {
            return (None, Some("path has no file name".into()));
        };
        let keep = self.cfg.inbox.keep_processed;
        // A `processed_dir` on another file system: the file is staged under a hidden name
        // in the inbox first, by a rename, so that what is compared below is the file that
        // was under the name at that instant, not a copy of whatever is there while copying.
        // It is copied over only once it is known to be the file that was read.
        let mut staged = false;
        let moved = if keep {
            let dir = self.cfg.processed_dir();
            if self.in_its_own_folder(inbox, dir) {
                // `pushdrop ingest processed/x.jsonl`: it is where it would go.
                return (Some(r.path.clone()), None);
            }
            if let Err(e) = fsutil::make_destination(dir) {
                return (None, Some(format!("cannot move to {}: {e}", dir.display())));
            }
            if !same_file_system(inbox, dir) {
                staged = true;
                stage(&r.path, inbox).map_err(|e| format!("cannot move: {e}"))
            } else if grown && r.read.kind == FileKind::Jsonl {
                // Under a hidden name in `processed_dir` first: the lines appended since the
                // read are split off while it is there, where a restart after a kill finds it
                // ([`Ingestor::recover_staged`]); moved straight under its name, a kill
                // before the split left those lines only in the processed copy. (One that
                // grows in the instant between the look and the move is staged after it.)
                staged = true;
                stage(&r.path, dir).map_err(|e| move_error(&r.path, dir, &e))
            } else {
                move_to_free_name(&r.path, dir, fname)
            }
        } else {
            // Deleted through a hidden name in the inbox (which the scan ignores), so that
            // the name's current file is never deleted unseen.
            stage(&r.path, inbox).map_err(|e| format!("cannot delete: {e}"))
        };
        let mut dest = match moved {
            Ok(Some(d)) => d,
            Ok(None) => return (None, None),
            // Nothing left the inbox: no folder to sync (a stuck file's every try did).
            Err(e) => return (None, Some(e)),
        };
        dirty.insert(inbox.to_path_buf());
        if keep {
            dirty.insert(self.cfg.processed_dir().to_path_buf());
        }
        let dest_meta = std::fs::symlink_metadata(&dest).ok();
        let after = match &dest_meta {
            Some(m) => r.read.compare(m),
            None => AfterRead::Same,
        };
        // What of the moved file has been taken: what was read, and lines split off below.
        let mut taken = r.read.size;
        match after {
            AfterRead::Same => {}
            AfterRead::Replaced => {
                put_back(
                    &dest,
                    inbox,
                    fname,
                    &r.name,
                    "file was replaced while being moved",
                );
                return (None, None);
            }
            AfterRead::Changed => {
                if keep && !staged && r.read.kind == FileKind::Jsonl {
                    // Grown in the instant since the look above: staged now, as it would
                    // have been (see there).
                    let dir = self.cfg.processed_dir();
                    if let Ok(Some(hidden)) = stage(&dest, dir) {
                        dest = hidden;
                        staged = true;
                    }
                }
                if let Some((t, split)) = self.take_appended(r, &dest, inbox, fname) {
                    taken = t;
                    dest = split;
                } else {
                    put_back(
                        &dest,
                        inbox,
                        fname,
                        &r.name,
                        "file changed after it was read and committed: the changed file is taken again (records without an id that it still holds will be sent again)",
                    );
                    return (None, None);
                }
            }
        }
        let (dest, dest_meta) = if staged {
            match move_to_free_name(&dest, self.cfg.processed_dir(), fname) {
                Ok(Some(d)) => {
                    let meta = std::fs::symlink_metadata(&d).ok();
                    (d, meta)
                }
                Ok(None) => return (None, None),
                Err(e) => {
                    // Back under its own name (it is committed): a later look moves it.
                    if let Err(back) = fsutil::rename_noreplace(&dest, &r.path) {
                        tracing::error!(event = "move_back_failed", file = r.name.as_str(), error = %back, dest = %dest.display(), "a committed file could not be put back under its name after its move failed; it stays under this hidden name");
                    }
                    return (None, Some(e));
                }
            }
        } else {
            (dest, dest_meta)
        };
        // Retention counts from the move: the file's mtime says when it came, where pushdrop
        // may set it (else the writer's mtime stays, and retention counts from that). Not on
        // a file with other links (a hard link dropped Maildir's way): its mtime is the
        // dropper's original's too.
        if keep && dest_meta.as_ref().is_none_or(|m| m.nlink() <= 1) {
            let _ = fsutil::touch_mtime(&dest);
        }
        if self.late_looks
            && r.read.kind == FileKind::Jsonl
            && let Some(meta) = &dest_meta
        {
            // Deleted (when not kept) after the second look.
            self.moved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Moved {
                    path: dest.clone(),
                    inbox: inbox.to_path_buf(),
                    fname: fname.to_os_string(),
                    name: r.name.clone(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                    taken,
                    due: Instant::now() + LATE_LOOK_AFTER,
                    looks: 0,
                    delete: !keep,
                });
            return (keep.then_some(dest), None);
        }
        if keep {
            return (Some(dest), None);
        }
        match std::fs::remove_file(&dest) {
            Ok(()) => (None, None),
            Err(e) => (None, Some(format!("cannot delete {}: {e}", dest.display()))),
        }
    }

    /// A `.jsonl` that grew after the read, its committed bytes untouched: the lines appended
    /// since go back into the inbox as a file of their own ([`hand_over`]), so the file
    /// itself can leave. `moved` is the file under its hidden name. The bytes of the file
    /// now taken and where the file is now; `None` when the change is anything else.
    fn take_appended(
        &self,
        r: &Ready,
        moved: &Path,
        inbox: &Path,
        fname: &std::ffi::OsStr,
    ) -> Option<(u64, PathBuf)> {
        if r.read.kind != FileKind::Jsonl {
            return None;
        }
        let mut bytes = Vec::new();
        let read = fsutil::open_nofollow(moved).and_then(|f| {
            f.take(self.cfg.inbox.max_file_bytes.saturating_add(1))
                .read_to_end(&mut bytes)
        });
        let size = r.read.size as usize;
        if read.is_err() || bytes.len() <= size || content_hash(&bytes[..size]) != r.read.sha256 {
            return None;
        }
        let mut tail = &bytes[size..];
        if self.late_looks {
            // Complete lines only: a writer may be between the two writes of a line, whose
            // rest then goes into the moved file, where the second look takes it whole.
            let end = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if end == 0 {
                return Some((size as u64, moved.to_path_buf()));
            }
            tail = &tail[..end];
        }
        match hand_over(moved, tail, inbox, fname) {
            Ok((split, taken_as)) => {
                tracing::warn!(
                    event = "appended_after_read", file = r.name.as_str(), bytes = tail.len() as u64,
                    taken_as = %display_name(&taken_as),
                    "lines were appended to the file after it was read and committed; they are taken as a file of their own"
                );
                Some(((size + tail.len()) as u64, split))
            }
            Err(e) => {
                tracing::error!(event = "appended_after_read", file = r.name.as_str(), error = %e, "lines were appended to the file after it was read, and cannot be split off; the file is taken again");
                None
            }
        }
    }

    /// Writes the report, then moves the file (or link, or FIFO — never opened) beside it.
    fn reject(
        &self,
        path: &Path,
        name: &str,
        rejection: Rejection,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> FileOutcome {
        let Rejection {
            reason,
            problems,
            ids,
            unlisted,
        } = rejection;
        let dir = self.cfg.rejected_dir();
        let mut rejected = Rejected {
            reason,
            problems: Vec::new(),
            unlisted,
            ids,
            moved_to: None,
            report: None,
            move_error: None,
        };
        let result = (|| -> Result<Option<(PathBuf, PathBuf)>, String> {
            fsutil::make_destination(dir)
                .map_err(|e| format!("cannot move to {}: {e}", dir.display()))?;
            let fname: OsString = path
                .file_name()
                .map(|n| n.to_os_string())
                .ok_or("path has no file name")?;
            if path
                .parent()
                .is_some_and(|p| self.in_its_own_folder(p, dir))
            {
                // `pushdrop ingest rejected/x.json`: it stays, and its report is written
                // anew (a report's name says which file it is about).
                let report = ErrorReport::new(name, reason, &problems);
                let report_path = fsutil::write_atomic(
                    dir,
                    &fsutil::report_name(&fname),
                    report.to_json().as_bytes(),
                )
                .map_err(|e| format!("cannot write report in {}: {e}", dir.display()))?;
                return Ok(Some((path.to_path_buf(), report_path)));
            }
            for n in 0..10_000 {
                let moved_name = fsutil::nth_name(&fname, n);
                let dest = dir.join(&moved_name);
                let report_name = fsutil::report_name(&moved_name);
                // Either name taken: a file dropped as `x.json.error.json` is no report, and
                // a report written over it would lose it.
                if std::fs::symlink_metadata(&dest).is_ok()
                    || std::fs::symlink_metadata(dir.join(&report_name)).is_ok()
                {
                    continue;
                }
                let mut report = ErrorReport::new(name, reason, &problems);
                // Whenever the report is not simply `<stored name>.error.json` (a name taken,
                // or one too long to take the suffix), it names the file it is about.
                let mut plain = moved_name.clone();
                plain.push(".error.json");
                if moved_name != fname || report_name != plain {
                    report.stored_as = Some(fsutil::show_name(&moved_name).into_owned());
                }
                let report_path =
                    fsutil::write_atomic(dir, &report_name, report.to_json().as_bytes())
                        .map_err(|e| format!("cannot write report in {}: {e}", dir.display()))?;
                match fsutil::move_noreplace(path, &dest) {
                    Ok(()) => return Ok(Some((dest, report_path))),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let _ = std::fs::remove_file(&report_path);
                        return Ok(None);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&report_path);
                        return Err(move_error(path, dir, &e));
                    }
                }
            }
            Err("no free name in rejected_dir".into())
        })();
        if let Ok(Some(_)) = &result {
            dirty.insert(dir.to_path_buf());
            if let Some(parent) = path.parent() {
                dirty.insert(parent.to_path_buf());
            }
        }
        match result {
            Ok(Some((moved, report))) => {
                rejected.moved_to = Some(moved);
                rejected.report = Some(report);
            }
            Ok(None) => return FileOutcome::Vanished,
            Err(e) => rejected.move_error = Some(e),
        }
        rejected.problems = problems;
        FileOutcome::Rejected(rejected)
    }

    /// One structured log line per file, metrics, and recent-error events for `status`.
    fn log(&self, r: &FileResult) {
        let m = metrics::get();
        match &r.outcome {
            FileOutcome::Accepted(a) => {
                let ms = a.elapsed.as_millis() as u64;
                if let Some(e) = &a.move_error {
                    // The records are committed (and said so below, once); the file stays.
                    let why = format!("committed but cannot be moved: {e}");
                    if self.stuck(r, "move_failed", &why) {
                        tracing::error!(event = "move_failed", file = r.name.as_str(), error = %e, "records committed but the file could not be moved; it stays in the inbox and the move is tried again with a back-off");
                    } else {
                        tracing::debug!(event = "move_failed", file = r.name.as_str(), error = %e, "the move failed again");
                    }
                    if a.store.already_committed {
                        return;
                    }
                } else if self.set_stuck(&r.path, false) && a.store.already_committed {
                    // Its `ingested` line was written when it committed. (A file stuck because
                    // it could not be read or committed is ingested now: logged below.)
                    tracing::info!(
                        event = "moved",
                        file = r.name.as_str(),
                        already_committed = true,
                        "file committed earlier could be moved at last"
                    );
                    return;
                }
                let dups = a.store.duplicates.len();
                if a.store.already_committed {
                    // A warning: after a crash this is the spool doing its job, but a dropper
                    // that drops the same file again (a cron job's fixed file) sends nothing.
                    tracing::warn!(
                        event = "ingested",
                        file = r.name.as_str(),
                        status = "already_committed",
                        already_committed = true,
                        devices = 0,
                        notifications = 0,
                        duplicates = 0,
                        ms,
                        "a file of this name and content was committed before (by this daemon before a restart, another pushdrop process, or a dropper that dropped it again); not ingested again, {}",
                        if self.cfg.inbox.keep_processed {
                            "moved to processed_dir"
                        } else {
                            "deleted"
                        }
                    );
                    return;
                }
                m.files_ingested.inc();
                let devs = (a.store.devices_registered + a.store.devices_unregistered) as u64;
                m.records_ingested
                    .get_or_create(&TypeLabel {
                        r#type: "device".into(),
                    })
                    .inc_by(devs);
                m.records_ingested
                    .get_or_create(&TypeLabel {
                        r#type: "notification".into(),
                    })
                    .inc_by(a.store.notifications_queued as u64);
                m.duplicates.inc_by(dups as u64);
                let (id, ids, app) = logged_names(&a.store);
                let (id, ids, app) = (id.as_deref(), ids.as_deref(), app.as_deref());
                if dups > 0 {
                    let dup_ids = a.store.duplicate_names(10);
                    tracing::warn!(
                        event = "ingested",
                        file = r.name.as_str(),
                        status = "accepted",
                        id,
                        ids,
                        app,
                        devices = a.devices,
                        notifications = a.store.notifications_queued,
                        duplicates = dups,
                        duplicate_ids = %dup_ids.join(","),
                        ms,
                        "duplicate notification ids were skipped (their app already has a notification with that id)"
                    );
                } else {
                    tracing::info!(
                        event = "ingested",
                        file = r.name.as_str(),
                        status = "accepted",
                        id,
                        ids,
                        app,
                        devices = a.devices,
                        notifications = a.store.notifications_queued,
                        duplicates = 0,
                        ms
                    );
                }
                if a.store.devices_still_invalid > 0 {
                    tracing::warn!(
                        event = "registration_not_newer",
                        file = r.name.as_str(),
                        count = a.store.devices_still_invalid,
                        tokens = %a.store.still_invalid_tokens.join(","),
                        "device registrations older than APNs' invalidation of their tokens left those devices invalid (a registration counts as made at its file's mtime: a copy that kept an old mtime, such as cp -p or rsync -t, is older)"
                    );
                }
            }
            // Not moved: the file stays in the inbox and is looked at again, so it is not
            // counted (or listed in `status`) as a rejection each time, only said to be stuck.
            FileOutcome::Rejected(Rejected {
                move_error: Some(e),
                reason,
                ..
            }) => {
                let why = format!("rejected but cannot be moved: {e}");
                if self.stuck(r, "move_failed", &why) {
                    tracing::error!(event = "move_failed", file = r.name.as_str(), reason = reason.code(), error = %e, "rejected file could not be moved to rejected_dir; it stays in the inbox and is tried again with a back-off");
                } else {
                    tracing::debug!(event = "move_failed", file = r.name.as_str(), reason = reason.code(), error = %e, "the move failed again");
                }
            }
            FileOutcome::Rejected(rej) => {
                self.set_stuck(&r.path, false);
                m.files_rejected
                    .get_or_create(&ReasonLabel {
                        reason: rej.reason.code().into(),
                    })
                    .inc();
                let first = rej
                    .problems
                    .first()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                const REASONS: usize = 5;
                let mut reasons: Vec<String> = rej
                    .problems
                    .iter()
                    .take(REASONS)
                    .map(|p| p.to_string())
                    .collect();
                let count = rej.problem_count();
                if count > REASONS {
                    // The report lists at most MAX_PROBLEMS of them.
                    let listed = if rej.unlisted > 0 {
                        format!(" (the report lists the first {})", parse::MAX_PROBLEMS)
                    } else {
                        " in the report".to_string()
                    };
                    reasons.push(format!("… and {} more{listed}", count - REASONS));
                }
                let (id, ids) = id_fields(rej.ids.first.clone(), rej.ids.total);
                // The apps its records name, or the one app records may leave out.
                let app = match (&rej.ids.apps[..], &self.cfg.apps[..]) {
                    ([], [only]) => Some(only.name.clone()),
                    ([], _) => None,
                    (named, _) => Some(named.join(",")),
                };
                tracing::warn!(
                    event = "rejected",
                    file = r.name.as_str(),
                    status = "rejected",
                    id,
                    ids = ids.as_deref(),
                    app = app.as_deref(),
                    reason = rej.reason.code(),
                    problems = count,
                    reasons = %reasons.join("; "),
                    report = %rej.report.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                );
                self.store.note_event_blocking(
                    "rejected",
                    None,
                    &format!("{}: {} ({first})", r.name, rej.reason.code()),
                );
            }
            FileOutcome::Failed(why) => {
                if self.late_looks {
                    // Stuck until it can be read and committed: counted and listed in
                    // `status` (once), not only logged at every try.
                    if self.stuck(r, "ingest_failed", why) {
                        tracing::error!(event = "ingest_failed", file = r.name.as_str(), error = %why, "the file is left in place (the daemon tries it again later)");
                    } else {
                        tracing::debug!(event = "ingest_failed", file = r.name.as_str(), error = %why, "the file failed again");
                    }
                } else {
                    tracing::error!(event = "ingest_failed", file = r.name.as_str(), error = %why, "the file is left in place, not ingested");
                }
            }
            FileOutcome::InProgress(why) => {
                tracing::debug!(event = "in_progress", file = r.name.as_str(), why = %why);
            }
            FileOutcome::Ignored(why) => {
                tracing::debug!(event = "ignored", file = r.name.as_str(), why = %why);
            }
            FileOutcome::Vanished => {
                self.set_stuck(&r.path, false);
                tracing::debug!(event = "vanished", file = r.name.as_str());
            }
        }
    }
}

/// What names a file's notifications in its `ingested` line: `id` when it queued one
/// notification, `ids` (the first [`crate::store::LOGGED_IDS`], comma-separated, `…` after
/// them when there were more) when it queued several, and its records' `app`(s).
fn logged_names(o: &IngestOutcome) -> (Option<String>, Option<String>, Option<String>) {
    let (id, ids) = id_fields(o.queued_names(), o.notifications_queued);
    let app = (!o.apps.is_empty()).then(|| o.apps.join(","));
    (id, ids, app)
}

/// `id` for the one notification of a file, or `ids` for several: the `first` of `total`,
/// comma-separated, `…` after them when there were more.
fn id_fields(first: Vec<String>, total: usize) -> (Option<String>, Option<String>) {
    match first.as_slice() {
        [] => (None, None),
        [one] if total == 1 => (Some(one.clone()), None),
        many => {
            let more = if total > many.len() { ",…" } else { "" };
            (None, Some(format!("{}{more}", many.join(","))))
        }
    }
}

/// Removes files in `processed_dir` older than `keep_processed_days` (0 keeps them forever).
/// Age counts from when the file was moved there (its ctime), not from when it was written.
/// Also removes pushdrop's own temporary files (`.pushdrop-*.tmp`) left in the inbox,
/// `rejected_dir` and `processed_dir` by a crash, once they are an hour old.
pub fn sweep_processed(cfg: &Config) -> usize {
    for dir in [
        cfg.inbox.dir.as_path(),
        cfg.rejected_dir(),
        cfg.processed_dir(),
    ] {
        // A file staged in the inbox on its way out is no litter: it may be the only copy of
        // a committed file ([`Ingestor::recover_staged`] moves it on).
        let litter = |name: &std::ffi::OsStr| is_temp_file(name) && staged(name).is_none();
        let left = sweep_dir(dir, TEMP_FILE_AGE, SystemTime::now(), litter);
        if left > 0 {
            tracing::info!(event = "retention", dir = %dir.display(), removed = left as u64, "removed temporary files a crash left behind");
        }
    }
    let days = cfg.inbox.keep_processed_days;
    if days == 0 {
        return 0;
    }
    let dir = cfg.processed_dir();
    // Drop files only (what the inbox moves there keeps its `.json`/`.jsonl` name): a
    // `processed_dir` shared with other files (the config's folder, say) loses none of them.
    let removed = sweep_dir(
        dir,
        Duration::from_secs(u64::from(days) * 86_400),
        SystemTime::now(),
        super::is_drop_name,
    );
    if removed > 0 {
        tracing::info!(event = "retention", dir = %dir.display(), removed, days, "removed old processed files");
    }
    removed
}

/// How old a `.pushdrop-*.tmp` file must be before the retention sweep takes it for a crash's
/// leftover.
const TEMP_FILE_AGE: Duration = Duration::from_secs(3600);

/// Whether `name` is one of pushdrop's temporary files (`.pushdrop-*.tmp`).
fn is_temp_file(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(b".pushdrop-") && name.ends_with(b".tmp")
}

/// The kind of a file staged on its way out of the inbox (one of [`STAGED_KINDS`]) and the
/// process that made it.
fn staged(name: &std::ffi::OsStr) -> Option<(&'static str, u32)> {
    STAGED_KINDS
        .into_iter()
        .find_map(|k| Some((k, fsutil::temp_name_pid(name, k)?)))
}

/// Whether process `pid` exists (one of another user counts).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Ingestor {
    /// Finishes the moves out of the inbox that a crash cut short. A committed file bound for
    /// a `processed_dir` on another file system, or to be deleted, is first renamed to a
    /// hidden name in the inbox ([`hidden_name`]), a `.jsonl` grown since its read to one in
    /// `processed_dir`, and moved on from there, so a kill before that leaves it only under
    /// that name. Each such file of a process no longer running is looked up among the
    /// committed files (content, inode and mtime, which the rename kept) and moved on under
    /// its own name, or deleted with `keep_processed = false`. One that is a committed
    /// `.jsonl` with lines appended (the kill came while they were handed over,
    /// [`hand_over`]) gets them handed over now, from where it stopped. One not known as
    /// committed (a file whose record retention dropped) goes to `rejected_dir` for a person
    /// to look at: taken again, it could send twice; removed, it could lose records. Lines a
    /// moved file's second look split off, written whole, go into the inbox. The daemon runs
    /// this at start and with the hourly sweep.
    pub fn recover_staged(&self) {
        let inbox = self.cfg.inbox.dir.as_path();
        let mut dirs = vec![inbox];
        if self.cfg.inbox.keep_processed {
            dirs.push(self.cfg.processed_dir());
        }
        let mut left: Vec<(&str, PathBuf)> = Vec::new();
        for dir in &dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            left.extend(entries.flatten().filter_map(|e| {
                let (kind, pid) = staged(&e.file_name())?;
                (pid != std::process::id() && !process_alive(pid)).then(|| (kind, e.path()))
            }));
        }
        if left.is_empty() {
            return;
        }
        // The files first: each takes up its own tail. Tails left after them are lines a
        // moved file's second look split off.
        left.sort_by_key(|(kind, _)| *kind == TAIL_KIND);
        for (kind, path) in left {
            match kind {
                TAIL_KIND => self.recover_tail(&path),
                _ => self.recover_file(&path, kind == SPLIT_KIND),
            }
        }
        for dir in dirs {
            let _ = fsutil::fsync_dir(dir);
        }
    }

    /// One file a crash left staged (see [`Ingestor::recover_staged`]); `split` when its
    /// appended lines were handed over already.
    fn recover_file(&self, path: &Path, split: bool) {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => m,
            _ => return,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(event = "move_failed", file = %path.display(), error = %err, "a file a crash left on its way out of the inbox cannot be read; it stays under its hidden name");
                return;
            }
        };
        let sha = content_hash(&bytes);
        let lookup_failed = |err: StoreError| {
            tracing::error!(event = "store_error", file = %path.display(), error = %err, "cannot look up a file a crash left on its way out of the inbox; tried again at the next sweep");
        };
        if !split {
            match self.store.committed_name_blocking(
                sha.clone(),
                meta.ino() as i64,
                mtime_ns(&meta),
            ) {
                Ok(Some(name)) => return self.finish_staged(path, &name, &sha, meta.len()),
                Ok(None) => {}
                Err(err) => return lookup_failed(err),
            }
        }
        // A committed `.jsonl` with lines appended after its read.
        let born_ms = birth_ms(&meta);
        let versions = match self.store.committed_by_inode_blocking(meta.ino()) {
            Ok(v) => v,
            Err(err) => return lookup_failed(err),
        };
        let Some(v) = versions
            .iter()
            .find(|v| is_committed_prefix(v, meta.ino(), born_ms, &bytes))
        else {
            return self.reject_staged(path, path.file_name().unwrap_or_default());
        };
        let inbox = self.cfg.inbox.dir.as_path();
        let fname = OsStr::new(&v.name);
        let tail = sibling(path, TAIL_KIND).map(|t| inbox.join(t));
        let handed = if split {
            // Its lines are in its tail file, or in the inbox already.
            match tail.filter(|t| t.exists()) {
                Some(t) => move_to_free_name(&t, inbox, fname)
                    .map(|to| to.map(|to| (path.to_path_buf(), to)))
                    .map_err(std::io::Error::other),
                None => Ok(None),
            }
        } else {
            // A tail file of its own may be whole or not: it is written again.
            if let Some(t) = tail {
                let _ = std::fs::remove_file(t);
            }
            hand_over(path, &bytes[v.size as usize..], inbox, fname).map(Some)
        };
        let path = match handed {
            Ok(Some((split, taken_as))) => {
                tracing::warn!(
                    event = "appended_after_read", file = v.name.as_str(), bytes = bytes.len() as u64 - v.size,
                    taken_as = %display_name(&taken_as), recovered = true,
                    "lines appended to a committed file, being split off when a crash came, are taken as a file of their own"
                );
                split
            }
            Ok(None) => path.to_path_buf(),
            Err(err) => {
                tracing::error!(event = "appended_after_read", file = v.name.as_str(), error = %err, "lines appended to a committed file, being split off when a crash came, cannot be split off; the file stays under its hidden name {} and is tried again at the next sweep", path.display());
                return;
            }
        };
        self.finish_staged(&path, &v.name, &sha, bytes.len() as u64);
    }

    /// Lines a moved file's second look split off and wrote whole, not yet renamed into the
    /// inbox when a crash came: renamed in now (as `pushdrop-tail-<pid>-<n>.jsonl`: their
    /// file's name is not known).
    fn recover_tail(&self, path: &Path) {
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('.')?.strip_suffix(".tmp"))
        else {
            return;
        };
        if !path.exists() {
            return; // taken up by its file
        }
        let inbox = self.cfg.inbox.dir.as_path();
        match move_to_free_name(path, inbox, OsStr::new(&format!("{stem}.jsonl"))) {
            Ok(Some(taken_as)) => tracing::warn!(
                event = "appended_after_read", taken_as = %display_name(&taken_as), recovered = true,
                "lines written into a moved file, being split off when a crash came, are taken as a file of their own"
            ),
            Ok(None) => {}
            Err(err) => {
                tracing::error!(event = "appended_after_read", file = %path.display(), error = %err, "lines written into a moved file, being split off when a crash came, cannot be taken; tried again at the next sweep")
            }
        }
    }

    /// A committed file found under its hidden name: on to `processed_dir` under `name` (or
    /// deleted). A copy already there (the kill came after the copy, before the removal)
    /// makes the hidden one redundant.
    fn finish_staged(&self, path: &Path, name: &str, sha: &str, size: u64) {
        if !self.cfg.inbox.keep_processed {
            if std::fs::remove_file(path).is_ok() {
                tracing::info!(
                    event = "moved",
                    file = name,
                    recovered = true,
                    "a committed file a crash left on its way out of the inbox (under a hidden name) is deleted, as keep_processed = false asks"
                );
            }
            return;
        }
        let dir = self.cfg.processed_dir();
        let there = dir.join(name);
        let copied = std::fs::symlink_metadata(&there)
            .is_ok_and(|m| m.is_file() && m.len() == size)
            && std::fs::read(&there).is_ok_and(|b| content_hash(&b) == sha);
        if copied {
            if std::fs::remove_file(path).is_ok() {
                tracing::info!(event = "moved", file = name, dest = %there.display(), recovered = true, "a committed file a crash left on its way out of the inbox was in processed_dir already; its hidden copy in the inbox is removed");
            }
            return;
        }
        let moved = fsutil::make_destination(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| move_to_free_name(path, dir, std::ffi::OsStr::new(name)));
        match moved {
            Ok(Some(dest)) => {
                let _ = fsutil::fsync_dir(dir);
                tracing::info!(event = "moved", file = name, dest = %dest.display(), recovered = true, "a committed file a crash left on its way out of the inbox (under a hidden name) is moved to processed_dir");
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(event = "move_failed", file = name, error = %err, "a committed file a crash left on its way out of the inbox cannot be moved on; it stays under its hidden name {} and is tried again at the next sweep", path.display());
            }
        }
    }

    /// A hidden file of the inbox's own making that no committed file matches: to
    /// `rejected_dir` as `<name>.leftover` (no drop file's suffix), said loudly.
    fn reject_staged(&self, path: &Path, hidden: &std::ffi::OsStr) {
        let dir = self.cfg.rejected_dir();
        let stem = hidden.to_string_lossy();
        let stem = stem
            .trim_start_matches('.')
            .trim_end_matches(".tmp")
            .to_string();
        let moved = fsutil::make_destination(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                move_to_free_name(path, dir, std::ffi::OsStr::new(&format!("{stem}.leftover")))
            });
        let message = match &moved {
            Ok(Some(dest)) => format!(
                "a crash left {} on its way out of the inbox, and no committed file has its content: moved to {} (if its records were not sent, drop them again)",
                path.display(),
                dest.display()
            ),
            Ok(None) => return,
            Err(err) => format!(
                "a crash left {} on its way out of the inbox, and no committed file has its content; it cannot be moved to rejected_dir ({err}) and stays",
                path.display()
            ),
        };
        tracing::warn!(event = "crash_leftover", file = %path.display(), "{message}");
        self.store
            .note_event_blocking("crash_leftover", None, &message);
    }
}

/// Whether two folders are on one file system (a rename between them works); `true` when
/// either cannot be looked at, which the move then reports.
fn same_file_system(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => true,
    }
}

/// A unique hidden name (the scan ignores dotfiles and `*.tmp`) for a file on its way out of
/// the inbox.
fn hidden_name() -> OsString {
    fsutil::temp_name(HIDDEN_KIND).into()
}

/// The [`fsutil::temp_name`] kind of [`hidden_name`].
const HIDDEN_KIND: &str = "out";

/// A staged `.jsonl` whose appended lines are handed over ([`hand_over`]): they are in its
/// tail file or already in the inbox.
const SPLIT_KIND: &str = "split";

/// Lines appended to a committed `.jsonl`, written whole, on their way into the inbox.
const TAIL_KIND: &str = "tail";

/// The kinds of hidden file in the inbox that a crash may leave as the only copy of what
/// they hold: none is litter for the sweep ([`Ingestor::recover_staged`] finishes them).
const STAGED_KINDS: [&str; 3] = [HIDDEN_KIND, SPLIT_KIND, TAIL_KIND];

/// Why moving `from` into `dir` failed, naming the folder at fault: a rename needs write
/// access to both, and "permission denied" alone does not say which (a probe's inbox made
/// read-only was reported as its `processed_dir`).
fn move_error(from: &Path, dir: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::PermissionDenied
        && let Some(src) = from.parent()
        && fsutil::access(src, libc::W_OK | libc::X_OK).is_err()
    {
        return format!(
            "cannot move out of {}: {e} (pushdrop must be allowed to write in the folder files are taken from)",
            src.display()
        );
    }
    format!("cannot move to {}: {e}", dir.display())
}

/// Moves `from` into `dir` under `name`, or `stem~n.ext` when taken; `None` if `from` is
/// gone.
fn move_to_free_name(
    from: &Path,
    dir: &Path,
    name: &std::ffi::OsStr,
) -> Result<Option<PathBuf>, String> {
    for n in 0..10_000 {
        let dest = dir.join(fsutil::nth_name(name, n));
        match fsutil::move_noreplace(from, &dest) {
            Ok(()) => return Ok(Some(dest)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(move_error(from, dir, &e)),
        }
    }
    Err(format!("no free name in {}", dir.display()))
}

/// Renames `from` to a [`hidden_name`] in `dir`, on the way out of the inbox; `None` when it
/// is gone.
fn stage(from: &Path, dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let hidden = dir.join(hidden_name());
    match fsutil::rename_noreplace(from, &hidden) {
        Ok(()) => Ok(Some(hidden)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Lines written to a moved file after what was taken of it: into the inbox as a file of
/// their own (written atomically under a tail name, which a restart after a kill renames in,
/// then renamed to `fname` or `stem~n.ext`).
fn split_off(tail: &[u8], inbox: &Path, fname: &std::ffi::OsStr) -> std::io::Result<PathBuf> {
    let tmp = fsutil::write_atomic(inbox, OsStr::new(&fsutil::temp_name(TAIL_KIND)), tail)?;
    match move_to_free_name(&tmp, inbox, fname) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(std::io::Error::other("vanished")),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(std::io::Error::other(e))
        }
    }
}

/// Hands the lines appended to a committed `.jsonl`, staged under its hidden name (in the
/// inbox or `processed_dir`), over to the inbox as a file of their own, in steps a kill may
/// cut anywhere without losing or doubling them (the restart's
/// [`Ingestor::recover_staged`] goes on from where they stopped): the lines are written
/// whole under the file's tail name in the inbox (`.pushdrop-tail-<pid>-<n>.tmp`), the file
/// is renamed to its split name (`.pushdrop-split-…`: its lines are handed over), and the
/// tail is renamed to `fname` (or `stem~n.ext`). The file's split name and the tail's name
/// in the inbox.
fn hand_over(
    hidden: &Path,
    tail: &[u8],
    inbox: &Path,
    fname: &OsStr,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let (Some(tail_name), Some(split_name), Some(dir)) = (
        sibling(hidden, TAIL_KIND),
        sibling(hidden, SPLIT_KIND),
        hidden.parent(),
    ) else {
        return Err(std::io::Error::other("not a staged file's name"));
    };
    let tail_path = fsutil::write_atomic(inbox, &tail_name, tail)?;
    let split = dir.join(split_name);
    if let Err(e) = fsutil::rename_noreplace(hidden, &split) {
        let _ = std::fs::remove_file(&tail_path);
        return Err(e);
    }
    // Both on disk before the tail becomes a drop file: after a power cut the restart finds
    // the split file with its tail, or the tail already in the inbox.
    for d in [inbox, dir] {
        let _ = fsutil::fsync_dir(d);
    }
    let moved = move_to_free_name(&tail_path, inbox, fname);
    match moved {
        Ok(Some(taken_as)) => Ok((split, taken_as)),
        other => {
            let _ = std::fs::remove_file(&tail_path);
            let _ = fsutil::rename_noreplace(&split, hidden);
            Err(std::io::Error::other(match other {
                Err(e) => e,
                _ => "vanished".into(),
            }))
        }
    }
}

/// The name of the file of another kind that belongs with staged file `path`
/// (`.pushdrop-<kind>-<pid>-<n>.tmp`, the same `<pid>-<n>`).
fn sibling(path: &Path, kind: &str) -> Option<OsString> {
    let name = path.file_name()?.to_str()?.strip_prefix(".pushdrop-")?;
    let rest = STAGED_KINDS
        .iter()
        .find_map(|k| name.strip_prefix(k)?.strip_prefix('-'))?;
    Some(format!(".pushdrop-{kind}-{rest}").into())
}

/// Puts a file that must not leave the inbox unread back into it, under its name or, when a
/// writer has dropped another file there meanwhile, the next free `stem~n.ext`.
fn put_back(moved: &Path, inbox: &Path, fname: &std::ffi::OsStr, name: &str, why: &str) {
    match move_to_free_name(moved, inbox, fname) {
        Ok(Some(back)) => {
            tracing::warn!(
                event = "replaced",
                file = name,
                taken_as = display_name(&back).as_str(),
                "{why}; putting it back to be taken separately"
            )
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(event = "move_back_failed", file = name, error = %e, dest = %moved.display(), "a file that was not ingested could not be put back into the inbox; drop it again")
        }
    }
}

/// Removes the regular files of `dir` whose name `matches` and that were last changed (moved
/// or written) more than `max_age` before `now`; returns how many.
pub fn sweep_dir(
    dir: &Path,
    max_age: Duration,
    now: SystemTime,
    matches: impl Fn(&std::ffi::OsStr) -> bool,
) -> usize {
    // Never through a link: see [`fsutil::make_destination`] (the move that fails there
    // says why).
    if fsutil::is_symlink(dir) {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        if !matches(&e.file_name()) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        if !m.file_type().is_file() {
            continue;
        }
        // The mtime, which the move into processed_dir sets: an operator can age a file with
        // `touch -d`, and a `chmod` or a restore (which change the ctime) does not make an
        // old file young again.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(m.mtime().max(0) as u64);
        if now.duration_since(at).unwrap_or(Duration::ZERO) > max_age
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        let _ = fsutil::fsync_dir(dir);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ingestor on a temp dir: inbox `inbox/`, database `pushdrop.db`, one app.
    fn ingestor(dir: &Path, keep_processed: bool) -> Ingestor {
        ingestor_with(dir, &format!("keep_processed = {keep_processed}"))
    }

    /// [`ingestor`] with more `[inbox]` settings.
    fn ingestor_with(dir: &Path, inbox: &str) -> Ingestor {
        let path = dir.join("pushdrop.toml");
        std::fs::write(
            &path,
            format!(
                "[inbox]\ndir = \"inbox\"\n{inbox}\n\
                 [store]\npath = \"pushdrop.db\"\n\
                 [[apps]]\nname = \"a\"\nbundle_id = \"com.example.a\"\n\
                 token = {{ key_file = \"k.p8\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" }}\n"
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("inbox")).unwrap();
        std::fs::write(dir.join("k.p8"), "placeholder: nothing is sent").unwrap();
        let (cfg, _) = Config::load(&path).unwrap();
        let store = Store::open(&cfg.store.path, false).unwrap();
        Ingestor::new(Arc::new(cfg), store)
    }

    fn line(id: &str) -> String {
        format!(
            "{{\"type\":\"notification\",\"id\":\"{id}\",\"to\":{{\"tokens\":[\"{}\"]}},\"payload\":{{\"aps\":{{}}}}}}\n",
            "ab".repeat(16)
        )
    }

    /// The inbox's entries but its `processed` folder.
    fn inbox_entries(inbox: &Path) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(inbox)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "processed")
            .collect()
    }

    /// A writer's descriptor on `path`, in append mode.
    fn appender(path: &Path) -> std::fs::File {
        std::fs::OpenOptions::new().append(true).open(path).unwrap()
    }

    /// A writer appends `text` to `path` in place, and closes it.
    fn append(path: &Path, text: &str) {
        std::io::Write::write_all(&mut appender(path), text.as_bytes()).unwrap();
    }

    /// `path` as the one candidate of a batch, settled (as `pushdrop ingest` gives files).
    fn only(path: &Path) -> Vec<Candidate> {
        vec![Candidate {
            path: path.to_path_buf(),
            settled: true,
            waits_for_earlier: false,
        }]
    }

    /// Waits for the watcher's second look at the files it moved, and takes it.
    fn second_look(ing: &Ingestor) {
        let due = ing.next_look().expect("a second look is due");
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        ing.look_again(false);
    }

    /// Reads, parses and commits `path` as the watcher does, without moving it yet.
    fn commit_unmoved(ing: &Ingestor, path: &Path) -> Ready {
        let read = read_drop(path, &ing.cfg, true).unwrap_or_else(|_| panic!("read"));
        let Examined::Ready {
            file,
            read,
            devices,
            notifications,
        } = parse_read(read, &ing.cfg, None)
        else {
            panic!("not ready")
        };
        let r = Ready {
            path: path.to_path_buf(),
            name: display_name(path),
            read,
            devices,
            notifications,
            started: Instant::now(),
        };
        ing.store.ingest(vec![file]).unwrap();
        r
    }

    /// `column` (an SQL expression) of every notification, in the order they were queued.
    fn of_notifications(ing: &Ingestor, column: &str) -> Vec<String> {
        let c = rusqlite::Connection::open(&ing.cfg.store.path).unwrap();
        let mut st = c
            .prepare(&format!("SELECT {column} FROM notifications ORDER BY id"))
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn ext_ids(ing: &Ingestor) -> Vec<String> {
        of_notifications(ing, "ext_id")
    }

    /// Lines appended to a `.jsonl` after it was read and committed are not moved away unread:
    /// they come back into the inbox as a file of their own, which the next look ingests.
    #[test]
    fn lines_appended_after_the_read_are_taken_as_a_file_of_their_own() {
        for keep in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let ing = ingestor(d.path(), keep);
            let inbox = d.path().join("inbox");
            let path = inbox.join("a.jsonl");
            std::fs::write(&path, line("n1") + &line("n2")).unwrap();
            let r = commit_unmoved(&ing, &path);
            // A writer appends (the same file, in place) before the move.
            append(&path, &line("n3"));
            let mut dirty = BTreeSet::new();
            let (moved, err) = ing.finish_accepted(&r, &mut dirty);
            assert_eq!(err, None);
            assert_eq!(moved.is_some(), keep);
            // Under the name itself, free again once the file left.
            let tail = inbox.join("a.jsonl");
            assert_eq!(std::fs::read_to_string(&tail).unwrap(), line("n3"));
            assert_eq!(inbox_entries(&inbox), ["a.jsonl"], "keep {keep}");
            ing.process(only(&tail));
            assert_eq!(ext_ids(&ing), ["n1", "n2", "n3"], "keep {keep}");
        }
    }

    /// A notification line without an id (one is assigned), told apart by its alert.
    fn line_without_id(alert: &str) -> String {
        format!(
            "{{\"type\":\"notification\",\"to\":{{\"tokens\":[\"{}\"]}},\"payload\":{{\"aps\":{{\"alert\":\"{alert}\"}}}}}}\n",
            "ab".repeat(16)
        )
    }

    fn alerts(ing: &Ingestor) -> Vec<String> {
        of_notifications(ing, "payload ->> '$.aps.alert'")
    }

    /// A committed `.jsonl` that stayed in the inbox (a crash between its commit and its
    /// move, or a move that failed) and had a line appended since: its committed lines are
    /// not taken again (records without an id would be sent twice); it leaves the inbox, and
    /// the new line comes back as a file of its own, as when appended before a move.
    #[test]
    fn a_committed_file_left_in_the_inbox_and_appended_to_is_not_taken_again() {
        for keep in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let ing = ingestor(d.path(), keep);
            let inbox = d.path().join("inbox");
            let path = inbox.join("a.jsonl");
            std::fs::write(&path, line_without_id("n1") + &line_without_id("n2")).unwrap();
            let _crashed_before_the_move = commit_unmoved(&ing, &path);
            append(&path, &line_without_id("n3"));
            let r = ing.process(only(&path));
            let FileOutcome::Accepted(a) = &r[0].outcome else {
                panic!("{:?}", r[0].outcome)
            };
            assert!(a.store.already_committed && a.move_error.is_none(), "{a:?}");
            assert_eq!(alerts(&ing), ["n1", "n2"], "keep {keep}");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                line_without_id("n3")
            );
            ing.process(only(&path));
            assert_eq!(alerts(&ing), ["n1", "n2", "n3"], "keep {keep}");
            assert!(!path.exists());
            if !keep {
                // The committed file's inode is free and may be the new file's: told apart
                // only where the file system records when a file was made (see below).
                continue;
            }
            // A file renamed in anew under the name is a file of its own, however it starts.
            let tmp = d.path().join("new.tmp");
            std::fs::write(
                &tmp,
                line_without_id("n1") + &line_without_id("n2") + &line_without_id("n4"),
            )
            .unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            ing.process(only(&path));
            assert_eq!(
                alerts(&ing),
                ["n1", "n2", "n3", "n1", "n2", "n4"],
                "keep {keep}"
            );
        }
    }

    /// A committed `.jsonl` whose move fails, appended to while it waits in the inbox: it is
    /// never committed again, and the appended line is taken once the move works (it waits
    /// for it: split off before the move, it would be split off again at every try).
    #[test]
    fn a_committed_file_that_cannot_be_moved_is_not_taken_again_when_appended_to() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor_with(d.path(), "processed_dir = \"blocker/processed\"");
        std::fs::write(d.path().join("blocker"), "a file, not a folder").unwrap();
        let path = d.path().join("inbox/n.jsonl");
        std::fs::write(&path, line_without_id("n1") + &line_without_id("n2")).unwrap();
        let stuck = |r: &[FileResult]| matches!(&r[0].outcome, FileOutcome::Accepted(a) if a.move_error.is_some());
        assert!(stuck(&ing.process(only(&path))));
        for n in ["n3", "n4"] {
            append(&path, &line_without_id(n));
            let r = ing.process(only(&path));
            assert!(stuck(&r), "{r:?}");
            assert_eq!(alerts(&ing), ["n1", "n2"]);
        }
        std::fs::remove_file(d.path().join("blocker")).unwrap();
        let r = ing.process(only(&path));
        assert!(matches!(&r[0].outcome, FileOutcome::Accepted(a) if a.move_error.is_none()));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            line_without_id("n3") + &line_without_id("n4")
        );
        ing.process(only(&path));
        assert_eq!(alerts(&ing), ["n1", "n2", "n3", "n4"]);
    }

    /// A processed file's mtime is set at its move (retention counts from it), but not a
    /// hard link's: its mtime is the dropper's original's too.
    #[test]
    fn the_move_leaves_the_mtime_of_a_hard_linked_file_alone() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true);
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        let original = d.path().join("original.json");
        let plain = d.path().join("inbox/plain.json");
        for (i, p) in [&original, &plain].into_iter().enumerate() {
            std::fs::write(p, line(&format!("n{i}"))).unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let linked = d.path().join("inbox/linked.json");
        std::fs::hard_link(&original, &linked).unwrap();
        ing.process([only(&linked), only(&plain)].concat());
        let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(mtime(&original), old, "the dropper's file keeps its mtime");
        assert_eq!(mtime(&d.path().join("inbox/processed/linked.json")), old);
        assert!(mtime(&d.path().join("inbox/processed/plain.json")) > old);
        assert_eq!(ext_ids(&ing), ["n0", "n1"]);
    }

    /// The committed part is found by name, inode, birth and the hash of its bytes: a file
    /// made after the commit under a used inode number is not it.
    #[test]
    fn a_committed_part_is_the_same_file_made_before_its_commit() {
        let bytes = (line_without_id("n1") + &line_without_id("n2")).into_bytes();
        let first = line_without_id("n1").len();
        let v = CommittedVersion {
            name: "a.jsonl".into(),
            size: first as u64,
            sha256: content_hash(&bytes[..first]),
            ino: 7,
            committed_at: 1_000,
        };
        let read = |name: &str, ino: u64, born_ms: Option<i64>, bytes: &[u8]| ReadDrop {
            name: name.into(),
            kind: FileKind::from_name(name).unwrap(),
            bytes: bytes.to_vec(),
            dev: 1,
            ino,
            mtime_ns: 0,
            born_ms,
            settled: true,
        };
        let found = |r: &ReadDrop| committed_part(std::slice::from_ref(&v), r).is_some();
        assert!(found(&read("a.jsonl", 7, Some(999), &bytes)));
        assert!(found(&read("a.jsonl", 7, Some(1_000), &bytes)));
        assert!(found(&read("a.jsonl", 7, None, &bytes)), "no birth time");
        assert!(
            !found(&read("a.jsonl", 7, Some(1_001), &bytes)),
            "made later"
        );
        assert!(
            !found(&read("a.jsonl", 8, Some(999), &bytes)),
            "another inode"
        );
        assert!(
            !found(&read("b.jsonl", 7, Some(999), &bytes)),
            "another name"
        );
        assert!(
            !found(&read("a.jsonl", 7, Some(999), &bytes[..first])),
            "not grown"
        );
        let mut other = bytes.clone();
        other[3] = b' ';
        assert!(
            !found(&read("a.jsonl", 7, Some(999), &other)),
            "other bytes"
        );
    }

    /// A writer that opened a `.jsonl` before its move and writes after it (an appender that
    /// opens, writes a line and closes, caught between) writes into the moved file: the
    /// watcher's second look takes the line back into the inbox, and only then is a file
    /// that is not kept deleted.
    #[test]
    fn a_line_written_into_the_moved_file_is_taken_at_the_second_look() {
        for keep in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let ing = ingestor(d.path(), keep).watching();
            let inbox = d.path().join("inbox");
            let path = inbox.join("a.jsonl");
            std::fs::write(&path, line("n1")).unwrap();
            let r = commit_unmoved(&ing, &path);
            let mut f = appender(&path);
            let (moved, err) = ing.finish_accepted(&r, &mut BTreeSet::new());
            assert_eq!(err, None);
            assert_eq!(moved.is_some(), keep);
            assert!(!path.exists());
            std::io::Write::write_all(&mut f, line("n2").as_bytes()).unwrap();
            drop(f);
            second_look(&ing);
            assert_eq!(ing.next_look(), None, "keep {keep}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), line("n2"));
            assert_eq!(inbox_entries(&inbox), ["a.jsonl"], "keep {keep}");
            ing.process(only(&path));
            assert_eq!(ext_ids(&ing), ["n1", "n2"], "keep {keep}");
        }
    }

    /// A line written in two writes, the first before the move and the second after it (an
    /// unbuffered writer, or a line longer than its buffer): taken whole at the second look,
    /// not cut in two files that would each be rejected.
    #[test]
    fn a_line_written_in_two_writes_around_the_move_is_taken_whole() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true).watching();
        let path = d.path().join("inbox/a.jsonl");
        std::fs::write(&path, line("n1")).unwrap();
        let r = commit_unmoved(&ing, &path);
        let mut f = appender(&path);
        let n2 = line("n2");
        let (head, rest) = n2.split_at(10);
        // A whole line and half of the next before the move, the other half after it.
        std::io::Write::write_all(&mut f, (line("n3") + head).as_bytes()).unwrap();
        let (moved, err) = ing.finish_accepted(&r, &mut BTreeSet::new());
        assert_eq!(err, None);
        assert!(moved.is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("n3"));
        ing.process(only(&path));
        std::io::Write::write_all(&mut f, rest.as_bytes()).unwrap();
        drop(f);
        second_look(&ing);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), n2);
        ing.process(only(&path));
        // In the order they were written whole.
        assert_eq!(ext_ids(&ing), ["n1", "n3", "n2"]);
    }

    /// A `.json` rewritten in place after the read goes back into the inbox whole.
    #[test]
    fn a_file_rewritten_after_the_read_is_taken_again() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true);
        let path = d.path().join("inbox/a.json");
        std::fs::write(&path, line("n1")).unwrap();
        let r = commit_unmoved(&ing, &path);
        std::fs::write(&path, line("n2")).unwrap();
        let (moved, err) = ing.finish_accepted(&r, &mut BTreeSet::new());
        assert_eq!((moved, err), (None, None));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("n2"));
        ing.process(only(&path));
        assert_eq!(ext_ids(&ing), ["n1", "n2"]);
        assert!(!path.exists());
    }

    /// A file renamed over the name after the read stays in the inbox, unread and unmoved.
    #[test]
    fn a_file_renamed_over_the_name_after_the_read_stays() {
        for keep in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let ing = ingestor(d.path(), keep);
            let path = d.path().join("inbox/a.jsonl");
            std::fs::write(&path, line("n1")).unwrap();
            let r = commit_unmoved(&ing, &path);
            let tmp = d.path().join("new.tmp");
            std::fs::write(&tmp, line("n2")).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            let (moved, err) = ing.finish_accepted(&r, &mut BTreeSet::new());
            assert_eq!((moved, err), (None, None));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), line("n2"));
        }
    }

    /// Put back under the next free name when a writer dropped another file under the name.
    #[test]
    fn put_back_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        let moved = d.path().join("moved.jsonl");
        std::fs::write(&moved, "old").unwrap();
        std::fs::write(inbox.join("a.jsonl"), "newer").unwrap();
        put_back(
            &moved,
            &inbox,
            std::ffi::OsStr::new("a.jsonl"),
            "a.jsonl",
            "test",
        );
        assert_eq!(
            std::fs::read_to_string(inbox.join("a.jsonl")).unwrap(),
            "newer"
        );
        assert_eq!(
            std::fs::read_to_string(inbox.join("a~1.jsonl")).unwrap(),
            "old"
        );
        assert!(!moved.exists());
    }

    /// A rejected file named like another's report (`x.json.error.json`) is never overwritten
    /// by that report: the later file takes the next free name, and both stay.
    #[test]
    fn a_report_never_overwrites_a_rejected_file_of_that_name() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true);
        let reject = |name: &str, body: &str| {
            let path = d.path().join("inbox").join(name);
            std::fs::write(&path, body).unwrap();
            let r = ing.process(only(&path));
            assert!(matches!(&r[0].outcome, FileOutcome::Rejected(_)), "{r:?}");
        };
        reject("c.json.error.json", r#"{"type":"devise","n":1}"#);
        reject("c.json", r#"{"type":"devise","n":2}"#);
        let rejected = d.path().join("inbox/rejected");
        let first = std::fs::read_to_string(rejected.join("c.json.error.json")).unwrap();
        assert!(
            first.contains(r#""n":1"#),
            "the first file is intact: {first}"
        );
        let second = std::fs::read_to_string(rejected.join("c~1.json")).unwrap();
        assert!(second.contains(r#""n":2"#), "{second}");
        let report = std::fs::read_to_string(rejected.join("c~1.json.error.json")).unwrap();
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["file"], "c.json");
        assert_eq!(
            report["stored_as"], "c~1.json",
            "which copy the report is of"
        );
        // A name that fits, but not with `.error.json`: its report's name is cut, so the
        // report says which file it is about.
        let long = format!("{}.json", "r".repeat(250));
        reject(&long, "{");
        let reports: Vec<String> = std::fs::read_dir(&rejected)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("rrr") && n.ends_with(".error.json"))
            .collect();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(rejected.join(&long).exists());
        let report = std::fs::read_to_string(rejected.join(&reports[0])).unwrap();
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["stored_as"], long.as_str());
    }

    /// A rejected file that cannot be moved stays in the inbox, and is not counted as a new
    /// rejection (nor listed in `status`) at every look.
    #[test]
    fn a_rejection_that_cannot_be_moved_is_not_counted_again_and_again() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor_with(d.path(), "rejected_dir = \"blocker/rejected\"");
        // After the config's check: a file where the folder's parent should be.
        std::fs::write(d.path().join("blocker"), "a file, not a folder").unwrap();
        let path = d.path().join("inbox/bad.json");
        std::fs::write(&path, r#"{"type":"device","tokn":"ab"}"#).unwrap();
        for _ in 0..3 {
            let r = ing.process(only(&path));
            assert!(
                matches!(&r[0].outcome, FileOutcome::Rejected(rej) if rej.move_error.is_some()),
                "{r:?}"
            );
        }
        assert!(path.exists(), "stays in the inbox");
        let c = rusqlite::Connection::open(&ing.cfg.store.path).unwrap();
        let listed: i64 = c
            .query_row(
                "SELECT count(*) FROM events WHERE kind = 'rejected'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(listed, 0);
        assert_eq!(events(&ing, "move_failed"), 1, "noted once for status");
        assert_eq!(ing.stuck.lock().unwrap().len(), 1);
    }

    /// A file the daemon cannot read (or commit) is tried again and again: it counts as
    /// stuck, and `status` lists it once, until it goes through or goes away.
    #[test]
    fn a_file_that_fails_again_and_again_counts_as_stuck_and_is_listed_once() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true).watching();
        std::fs::write(d.path().join("inbox/locked.jsonl"), "").unwrap();
        let failed = || FileResult {
            path: d.path().join("inbox/locked.jsonl"),
            name: "locked.jsonl".into(),
            outcome: FileOutcome::Failed("cannot open: Permission denied".into()),
        };
        for _ in 0..3 {
            ing.log(&failed());
        }
        assert_eq!(events(&ing, "ingest_failed"), 1, "noted once for status");
        assert_eq!(ing.stuck.lock().unwrap().len(), 1);
        // Removed by hand: the next scan finds it gone.
        std::fs::remove_file(d.path().join("inbox/locked.jsonl")).unwrap();
        ing.forget_gone(&Default::default());
        assert!(ing.stuck.lock().unwrap().is_empty());
        std::fs::write(d.path().join("inbox/locked.jsonl"), "").unwrap();
        ing.log(&failed());
        ing.log(&FileResult {
            outcome: FileOutcome::Vanished,
            ..failed()
        });
        assert!(ing.stuck.lock().unwrap().is_empty());
    }

    fn events(ing: &Ingestor, kind: &str) -> i64 {
        let c = rusqlite::Connection::open(&ing.cfg.store.path).unwrap();
        c.query_row("SELECT count(*) FROM events WHERE kind = ?1", [kind], |r| {
            r.get(0)
        })
        .unwrap()
    }

    #[test]
    fn a_committed_file_that_cannot_be_moved_counts_as_stuck_until_it_moves() {
        let d = tempfile::tempdir().unwrap();
        let blocker = d.path().join("blocker");
        let ing = ingestor_with(d.path(), "processed_dir = \"blocker/processed\"");
        // After the config's check: a file where the folder's parent should be.
        std::fs::write(&blocker, "a file, not a folder").unwrap();
        let path = d.path().join("inbox/n.jsonl");
        std::fs::write(&path, line("n1")).unwrap();
        let take = || {
            let r = ing.process(only(&path));
            match r.into_iter().next().map(|r| r.outcome) {
                Some(FileOutcome::Accepted(a)) => a,
                other => panic!("{other:?}"),
            }
        };
        let first = take();
        assert!(first.move_error.is_some() && !first.store.already_committed);
        assert_eq!(first.store.notifications_queued, 1);
        for _ in 0..2 {
            let again = take();
            assert!(again.move_error.is_some() && again.store.already_committed);
        }
        assert!(path.exists(), "stays in the inbox");
        assert_eq!(events(&ing, "move_failed"), 1, "noted once for status");
        assert_eq!(ing.stuck.lock().unwrap().len(), 1);
        assert_eq!(ext_ids(&ing), ["n1"], "committed once");
        // The folder can be made: the file moves and is stuck no longer.
        std::fs::remove_file(&blocker).unwrap();
        let moved = take();
        assert!(moved.move_error.is_none() && moved.store.already_committed);
        assert!(!path.exists());
        assert!(d.path().join("blocker/processed/n.jsonl").exists());
        assert!(ing.stuck.lock().unwrap().is_empty());
    }

    /// A file stuck behind a `processed_dir` that takes no files logs one error; its later
    /// failed tries log at debug level only (thousands of stuck files would otherwise log
    /// thousands of errors at every retry round).
    #[test]
    fn a_stuck_file_logs_its_error_once() {
        #[derive(Clone, Default)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor_with(d.path(), "processed_dir = \"blocker/processed\"");
        std::fs::write(d.path().join("blocker"), "a file, not a folder").unwrap();
        let path = d.path().join("inbox/n.jsonl");
        std::fs::write(&path, line("n1")).unwrap();
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                ing.process(only(&path));
            }
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("event=\"move_failed\""))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("ERROR"), "{text}");
        assert!(lines[1..].iter().all(|l| l.contains("DEBUG")), "{text}");
    }

    #[test]
    fn only_old_pushdrop_temp_files_are_swept() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            ".pushdrop-1-0.tmp",
            ".pushdrop-out-1-0.tmp",
            "a.tmp",
            ".other.tmp",
        ] {
            std::fs::write(d.path().join(n), "x").unwrap();
        }
        assert_eq!(
            sweep_dir(d.path(), TEMP_FILE_AGE, SystemTime::now(), is_temp_file),
            0
        );
        let later = SystemTime::now() + 2 * TEMP_FILE_AGE;
        assert_eq!(sweep_dir(d.path(), TEMP_FILE_AGE, later, is_temp_file), 2);
        assert!(d.path().join("a.tmp").exists() && d.path().join(".other.tmp").exists());
    }

    #[test]
    fn retention_removes_only_old_drop_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), "{}").unwrap();
        std::fs::write(d.path().join("a~1.jsonl"), "{}").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        // What else an operator keeps in the folder stays, however old.
        let others = ["pushdrop.toml", "notes.txt", "AuthKey_X.p8", ".hidden.json"];
        for n in others {
            std::fs::write(d.path().join(n), "x").unwrap();
        }
        let week = Duration::from_secs(7 * 86_400);
        let sweep = |now| sweep_dir(d.path(), week, now, crate::inbox::is_drop_name);
        assert_eq!(sweep(SystemTime::now()), 0);
        assert!(d.path().join("a.json").exists());
        let later = SystemTime::now() + Duration::from_secs(8 * 86_400);
        assert_eq!(sweep(later), 2);
        assert!(!d.path().join("a.json").exists());
        assert!(d.path().join("sub").is_dir());
        for n in others {
            assert!(d.path().join(n).exists(), "{n} was removed");
        }
        // Aged the way an operator would (`touch -d "8 days ago"`).
        let old = d.path().join("old.json");
        std::fs::write(&old, "{}").unwrap();
        backdate(&old, Duration::from_secs(8 * 86_400));
        assert_eq!(sweep(SystemTime::now()), 1);
        assert!(!old.exists());
    }

    /// A `processed_dir` a dropper replaced with a link to a folder elsewhere: retention
    /// deletes nothing through the link (a probe's finding: it removed an old file there).
    #[test]
    fn retention_never_deletes_through_a_linked_folder() {
        let d = tempfile::tempdir().unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let precious = elsewhere.join("precious.json");
        std::fs::write(&precious, "{}").unwrap();
        backdate(&precious, Duration::from_secs(10 * 86_400));
        let link = d.path().join("processed");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(
            sweep_dir(&link, week, SystemTime::now(), crate::inbox::is_drop_name),
            0
        );
        assert!(precious.exists());
        assert_eq!(
            sweep_dir(
                &elsewhere,
                week,
                SystemTime::now(),
                crate::inbox::is_drop_name
            ),
            1,
            "the folder itself, named as it is, is swept"
        );
    }

    /// A `processed_dir` that is the config's own folder (a probe's setup): retention takes
    /// the old drop files there, and not the config, the key or the database.
    #[test]
    fn retention_in_a_shared_folder_spares_what_is_not_a_drop_file() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor_with(d.path(), "processed_dir = \".\"\nkeep_processed_days = 1");
        std::fs::write(d.path().join("done.json"), "{}").unwrap();
        let names = ["done.json", "pushdrop.toml", "k.p8", "pushdrop.db"];
        for n in names {
            backdate(&d.path().join(n), Duration::from_secs(3 * 86_400));
        }
        assert_eq!(sweep_processed(&ing.cfg), 1);
        assert!(!d.path().join("done.json").exists());
        for n in &names[1..] {
            assert!(d.path().join(n).exists(), "{n} was removed");
        }
    }

    /// A process id that has ended (a child waited for).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// A kill while a committed file was copied to a `processed_dir` on another file system
    /// left it only under its hidden staging name in the inbox (a probe's finding: the hour's
    /// sweep then removed it as litter). The next start moves it on under its own name,
    /// without taking it again; a hidden file no committed file matches goes to
    /// `rejected_dir`; neither is litter for the sweep.
    #[test]
    fn a_file_a_crash_left_on_its_way_out_is_moved_on_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true);
        let inbox = d.path().join("inbox");
        std::fs::write(inbox.join("n.jsonl"), line("n1")).unwrap();
        let written = std::fs::metadata(inbox.join("n.jsonl"))
            .unwrap()
            .modified()
            .unwrap();
        let r = ing.process(only(&inbox.join("n.jsonl")));
        assert!(matches!(r[0].outcome, FileOutcome::Accepted(_)));
        let processed = inbox.join("processed");
        // The state the kill left: the committed file staged, with its inode and mtime (the
        // move into processed_dir stamped it; the staging rename does not).
        let pid = dead_pid();
        let staged = inbox.join(format!(".pushdrop-out-{pid}-0.tmp"));
        std::fs::rename(processed.join("n.jsonl"), &staged).unwrap();
        let set_mtime = |f: &Path, t: SystemTime| {
            let file = std::fs::File::options().write(true).open(f).unwrap();
            file.set_modified(t).unwrap();
        };
        set_mtime(&staged, written);
        let unknown = inbox.join(format!(".pushdrop-out-{pid}-1.tmp"));
        std::fs::write(&unknown, line("n2")).unwrap();
        // Another process's file on its way out (ours here, alive) is left alone.
        let alive = inbox.join(format!(".pushdrop-out-{}-2.tmp", std::process::id()));
        std::fs::write(&alive, line("n3")).unwrap();
        for f in [&unknown, &alive] {
            backdate(f, Duration::from_secs(2 * 3600));
        }
        set_mtime(&staged, written - Duration::from_secs(2 * 3600));
        sweep_processed(&ing.cfg);
        assert!(
            staged.exists() && unknown.exists(),
            "the sweep took a staged file"
        );
        set_mtime(&staged, written);

        ing.recover_staged();
        assert!(!staged.exists());
        assert_eq!(
            std::fs::read_to_string(processed.join("n.jsonl")).unwrap(),
            line("n1")
        );
        assert!(!unknown.exists());
        let leftover = inbox.join(format!("rejected/pushdrop-out-{pid}-1.leftover"));
        assert_eq!(std::fs::read_to_string(&leftover).unwrap(), line("n2"));
        assert_eq!(events(&ing, "crash_leftover"), 1);
        assert!(alive.exists());
        assert_eq!(ext_ids(&ing), ["n1"], "nothing taken again");

        // Killed after the copy, before the removal: the copy in processed_dir stands.
        std::fs::hard_link(processed.join("n.jsonl"), &staged).unwrap();
        ing.recover_staged();
        assert!(!staged.exists());
        assert_eq!(
            std::fs::read_dir(&processed).unwrap().count(),
            1,
            "no n~1.jsonl"
        );
    }

    /// Lines appended to a committed `.jsonl` are split off in steps (the file staged under
    /// its hidden name, the lines written whole beside it, the file marked as split, the
    /// lines renamed into the inbox, the file moved on). A kill after any step loses no line
    /// and takes none twice: the next start goes on from there (a probe's finding: a kill
    /// between the file's move into `processed_dir` and the split left the lines only in
    /// the processed copy). So are lines a moved file's second look wrote whole.
    #[test]
    fn a_kill_while_appended_lines_are_split_off_loses_none_of_them() {
        for keep in [true, false] {
            for step in 0..4 {
                let d = tempfile::tempdir().unwrap();
                let ing = ingestor(d.path(), keep);
                let inbox = d.path().join("inbox");
                let path = inbox.join("a.jsonl");
                std::fs::write(&path, line("n1") + &line("n2")).unwrap();
                commit_unmoved(&ing, &path);
                append(&path, &line("n3"));
                // The state the kill left after `step` steps: the file staged in
                // `processed_dir` (in the inbox when it is not kept), its tail in the inbox.
                let pid = dead_pid();
                let stage = if keep {
                    inbox.join("processed")
                } else {
                    inbox.clone()
                };
                std::fs::create_dir_all(&stage).unwrap();
                let hidden = |kind: &str| {
                    let dir = if kind == "tail" { &inbox } else { &stage };
                    dir.join(format!(".pushdrop-{kind}-{pid}-7.tmp"))
                };
                std::fs::rename(&path, hidden("out")).unwrap();
                if step >= 1 {
                    std::fs::write(hidden("tail"), line("n3")).unwrap();
                }
                if step >= 2 {
                    std::fs::rename(hidden("out"), hidden("split")).unwrap();
                    for kind in ["split", "tail"] {
                        backdate(&hidden(kind), Duration::from_secs(2 * 3600));
                    }
                    sweep_processed(&ing.cfg);
                    assert!(hidden("split").exists() && hidden("tail").exists(), "swept");
                }
                if step >= 3 {
                    std::fs::rename(hidden("tail"), &path).unwrap();
                }
                // Lines a second look wrote whole, not yet renamed in.
                let late = inbox.join(format!(".pushdrop-tail-{pid}-9.tmp"));
                std::fs::write(&late, line("n4")).unwrap();

                ing.recover_staged();
                let mut left = inbox_entries(&inbox);
                left.sort();
                let recovered = format!("pushdrop-tail-{pid}-9.jsonl");
                assert_eq!(
                    left,
                    ["a.jsonl", recovered.as_str()],
                    "keep {keep}, step {step}"
                );
                assert_eq!(std::fs::read_to_string(&path).unwrap(), line("n3"));
                if keep {
                    let copy = inbox.join("processed/a.jsonl");
                    let whole = line("n1") + &line("n2") + &line("n3");
                    assert_eq!(std::fs::read_to_string(copy).unwrap(), whole);
                }
                ing.process(only(&path));
                ing.process(only(&inbox.join(&recovered)));
                assert_eq!(
                    ext_ids(&ing),
                    ["n1", "n2", "n3", "n4"],
                    "keep {keep}, step {step}"
                );
                assert_eq!(events(&ing, "crash_leftover"), 0);
            }
        }
    }

    /// Sets a file's mtime `age` back, as `touch -d` does.
    fn backdate(path: &Path, age: Duration) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    /// The move into processed_dir stamps the file with the time it came, so retention counts
    /// from then, not from when its writer wrote it.
    #[test]
    fn a_processed_file_is_stamped_with_the_time_it_was_moved() {
        let d = tempfile::tempdir().unwrap();
        let ing = ingestor(d.path(), true);
        let path = d.path().join("inbox/n.jsonl");
        std::fs::write(&path, line("stamped") + "\n").unwrap();
        backdate(&path, Duration::from_secs(30 * 86_400));
        let results = ing.process(only(&path));
        assert!(
            matches!(results[0].outcome, FileOutcome::Accepted(_)),
            "{:?}",
            results[0].outcome
        );
        let moved = d.path().join("inbox/processed/n.jsonl");
        let age = SystemTime::now()
            .duration_since(std::fs::metadata(&moved).unwrap().modified().unwrap())
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{age:?}");
    }
}
