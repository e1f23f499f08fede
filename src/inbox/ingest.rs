//! From a file on disk to committed records: open safely, read, parse, commit (group commit
//! over many files), then move the file away. One path for the watcher and `pushdrop ingest`.
//!
//! Order matters for crash safety: records are durably committed before the file moves, and
//! the store remembers (name, sha256, inode, mtime) of every committed file, so a file found
//! again after a crash between commit and move is only moved, never ingested twice.

use std::collections::BTreeSet;
use std::ffi::OsString;
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
use crate::store::{IngestFile, IngestOutcome, Store};

/// A file to take.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub path: PathBuf,
    /// Whether the caller knows the file has not changed for `settle_ms` (always true for
    /// `pushdrop ingest`): a truncated file is then rejected instead of waited for.
    pub settled: bool,
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
    pub problems: Vec<Problem>,
    pub moved_to: Option<PathBuf>,
    pub report: Option<PathBuf>,
    /// The file could not be moved to `rejected_dir`: it stays and is retried.
    pub move_error: Option<String>,
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
    dev: u64,
    ino: u64,
    devices: usize,
    notifications: usize,
    started: Instant,
}

/// The result of looking at one file without committing anything.
pub enum Examined {
    /// Parsed; counts of devices and notifications, and the file for the store.
    Ready {
        file: IngestFile,
        dev: u64,
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
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// Looks at a file and parses it, never following symlinks and never opening anything but a
/// regular file. `settled`: see [`Candidate::settled`].
pub fn examine(path: &Path, cfg: &Config, settled: bool) -> Examined {
    match read_drop(path, cfg, settled) {
        Ok(read) => parse_read(read, cfg),
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
    let mtime_ns = after.mtime() * 1_000_000_000 + after.mtime_nsec();
    let settle = Duration::from_millis(cfg.inbox.settle_ms);
    let settled = settled || mtime_age(&after) >= settle;
    Ok(ReadDrop {
        name,
        kind,
        bytes,
        dev: after.dev(),
        ino: after.ino(),
        mtime_ns,
        settled,
    })
}

/// What [`examine`] does after the read: parse, and decide.
fn parse_read(read: ReadDrop, cfg: &Config) -> Examined {
    let parsed = match parse::parse_file(&read.bytes, read.kind, cfg) {
        Ok(p) => p,
        Err(r) => return parse_failed(r, read.settled),
    };
    if read.last_line_unfinished() {
        return Examined::InProgress("last line has no newline yet".into());
    }
    Examined::Ready {
        file: read.ingest_file(hex::encode(Sha256::digest(&read.bytes)), parsed.records),
        dev: read.dev,
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
}

impl Ingestor {
    pub fn new(cfg: Arc<Config>, store: Store) -> Ingestor {
        Ingestor { cfg, store }
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
        for c in candidates {
            let started = Instant::now();
            let name = display_name(&c.path);
            let examined = match read_drop(&c.path, &self.cfg, c.settled) {
                Ok(read) if read.is_streamed() => {
                    self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
                    match self.stream(read, c.path.clone(), started, &mut dirty) {
                        Ok(r) => {
                            results.push(r);
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Ok(read) => parse_read(read, &self.cfg),
                Err(e) => e,
            };
            match examined {
                Examined::Ready {
                    file,
                    dev,
                    devices,
                    notifications,
                } => {
                    ready.push(Ready {
                        path: c.path,
                        name,
                        dev,
                        ino: file.ino,
                        devices,
                        notifications,
                        started,
                    });
                    files.push(file);
                }
                Examined::Reject(r) => {
                    let outcome = self.reject(&c.path, &name, r, &mut dirty);
                    results.push(FileResult {
                        path: c.path,
                        name,
                        outcome,
                    });
                }
                Examined::InProgress(why) => results.push(FileResult {
                    path: c.path,
                    name,
                    outcome: FileOutcome::InProgress(why),
                }),
                Examined::Ignored(why) => results.push(FileResult {
                    path: c.path,
                    name,
                    outcome: FileOutcome::Ignored(why),
                }),
                Examined::Vanished => results.push(FileResult {
                    path: c.path,
                    name,
                    outcome: FileOutcome::Vanished,
                }),
                Examined::Failed(why) => results.push(FileResult {
                    path: c.path,
                    name,
                    outcome: FileOutcome::Failed(why),
                }),
            }
        }
        self.commit_ready(&mut ready, &mut files, &mut results, &mut dirty);
        for d in &dirty {
            if let Err(e) = fsutil::fsync_dir(d) {
                tracing::error!(event = "fsync_failed", dir = %d.display(), error = %e, "cannot sync directory");
            }
        }
        for r in &results {
            self.log(r);
        }
        results
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
                    results.push(self.accepted(r, Ok(store), dirty));
                }
            }
            Err(e) => {
                for r in ready.drain(..) {
                    results.push(self.accepted(r, Err(e.to_string()), dirty));
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
        // Hashed before the writer is engaged: while the file's transaction is open, every
        // claim and result waits for it.
        let sha256 = hex::encode(Sha256::digest(&read.bytes));
        let begin = || {
            self.store
                .begin_ingest(read.ingest_file(String::new(), Vec::new()))
        };
        let mut stream = None;
        let mut writer_gone = false;
        let parsed = parse::parse_file_streaming(&read.bytes, read.kind, &self.cfg, &mut |chunk| {
            // A writer that could not start or went away: said below, once the parse is done.
            writer_gone = writer_gone
                || match stream.get_or_insert_with(begin) {
                    Ok(s) => !s.send(chunk),
                    Err(_) => true,
                };
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
        let committed = stream.commit(sha256).map_err(|e| e.to_string());
        let ready = Ready {
            path,
            name: read.name,
            dev: read.dev,
            ino: read.ino,
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

    /// Moves (or deletes) a committed file, making sure it is still the file that was read:
    /// a writer may have renamed a new file over the name since.
    fn finish_accepted(
        &self,
        r: &Ready,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> (Option<PathBuf>, Option<String>) {
        match std::fs::symlink_metadata(&r.path) {
            Ok(m) if m.dev() == r.dev && m.ino() == r.ino => {}
            Ok(_) => {
                tracing::warn!(event = "replaced", file = %r.name, "file was replaced after it was read; the new file will be taken separately");
                return (None, None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, None),
            Err(e) => return (None, Some(format!("cannot stat: {e}"))),
        }
        if let Some(parent) = r.path.parent() {
            dirty.insert(parent.to_path_buf());
        }
        if !self.cfg.inbox.keep_processed {
            return match std::fs::remove_file(&r.path) {
                Ok(()) => (None, None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                Err(e) => (None, Some(format!("cannot delete: {e}"))),
            };
        }
        let dir = self.cfg.processed_dir();
        if let Err(e) = std::fs::create_dir_all(dir) {
            return (None, Some(format!("cannot create {}: {e}", dir.display())));
        }
        dirty.insert(dir.to_path_buf());
        let Some(fname) = r.path.file_name() else {
            return (None, Some("path has no file name".into()));
        };
        for n in 0..10_000 {
            let dest = dir.join(fsutil::nth_name(fname, n));
            match fsutil::move_noreplace(&r.path, &dest) {
                Ok(()) => {
                    // Same-file check after the move closes the race with a writer that
                    // renamed a new file over the name between our stat and our rename.
                    match std::fs::symlink_metadata(&dest) {
                        Ok(m) if m.ino() != r.ino && m.dev() == r.dev => {
                            tracing::warn!(event = "replaced", file = %r.name, "file was replaced while being moved; putting the new one back");
                            if let Err(e) = fsutil::rename_noreplace(&dest, &r.path) {
                                tracing::error!(event = "move_back_failed", file = %r.name, error = %e, dest = %dest.display(), "a newly dropped file ended up in processed_dir without being ingested; drop it again");
                            }
                            return (None, None);
                        }
                        _ => return (Some(dest), None),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, None),
                Err(e) => return (None, Some(format!("cannot move to {}: {e}", dir.display()))),
            }
        }
        (None, Some("no free name in processed_dir".into()))
    }

    /// Writes the report, then moves the file (or link, or FIFO — never opened) beside it.
    fn reject(
        &self,
        path: &Path,
        name: &str,
        rejection: Rejection,
        dirty: &mut BTreeSet<PathBuf>,
    ) -> FileOutcome {
        let Rejection { reason, problems } = rejection;
        let report = ErrorReport::new(name, reason, &problems).to_json();
        let dir = self.cfg.rejected_dir();
        let mut rejected = Rejected {
            reason,
            problems: Vec::new(),
            moved_to: None,
            report: None,
            move_error: None,
        };
        let result = (|| -> Result<Option<(PathBuf, PathBuf)>, String> {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let fname: OsString = path
                .file_name()
                .map(|n| n.to_os_string())
                .ok_or("path has no file name")?;
            for n in 0..10_000 {
                let moved_name = fsutil::nth_name(&fname, n);
                let dest = dir.join(&moved_name);
                if std::fs::symlink_metadata(&dest).is_ok() {
                    continue;
                }
                let report_path =
                    fsutil::write_atomic(dir, &fsutil::report_name(&moved_name), report.as_bytes())
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
                        return Err(format!("cannot move to {}: {e}", dir.display()));
                    }
                }
            }
            Err("no free name in rejected_dir".into())
        })();
        dirty.insert(dir.to_path_buf());
        if let Some(parent) = path.parent() {
            dirty.insert(parent.to_path_buf());
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
                    tracing::error!(event = "move_failed", file = %r.name, error = %e, "records committed but the file could not be moved; will retry");
                    return;
                }
                let dups = a.store.duplicates.len();
                if a.store.already_committed {
                    tracing::info!(event = "ingested", file = %r.name, already_committed = true, devices = 0, notifications = 0, duplicates = 0, ms, "file was committed before a restart; moved it");
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
                let (id, ids, app) = (id, ids.as_deref(), app.as_deref());
                if dups > 0 {
                    let dup_ids: Vec<&str> = a
                        .store
                        .duplicates
                        .iter()
                        .take(10)
                        .map(|(_, id)| id.as_str())
                        .collect();
                    tracing::warn!(
                        event = "ingested",
                        file = %r.name,
                        id,
                        ids,
                        app,
                        devices = a.devices,
                        notifications = a.store.notifications_queued,
                        duplicates = dups,
                        duplicate_ids = %dup_ids.join(","),
                        ms,
                        "duplicate notification ids were skipped (already queued)"
                    );
                } else {
                    tracing::info!(
                        event = "ingested",
                        file = %r.name,
                        id,
                        ids,
                        app,
                        devices = a.devices,
                        notifications = a.store.notifications_queued,
                        duplicates = 0,
                        ms
                    );
                }
            }
            FileOutcome::Rejected(rej) => {
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
                let reasons: Vec<String> =
                    rej.problems.iter().take(5).map(|p| p.to_string()).collect();
                tracing::warn!(
                    event = "rejected",
                    file = %r.name,
                    reason = rej.reason.code(),
                    problems = rej.problems.len(),
                    reasons = %reasons.join("; "),
                    report = %rej.report.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                );
                if let Some(e) = &rej.move_error {
                    tracing::error!(event = "move_failed", file = %r.name, error = %e, "rejected file could not be moved to rejected_dir; will retry");
                }
                self.store.note_event_blocking(
                    "rejected",
                    None,
                    &format!("{}: {} ({first})", r.name, rej.reason.code()),
                );
            }
            FileOutcome::Failed(why) => {
                tracing::error!(event = "ingest_failed", file = %r.name, error = %why, "will retry");
            }
            FileOutcome::InProgress(why) => {
                tracing::debug!(event = "in_progress", file = %r.name, why = %why);
            }
            FileOutcome::Ignored(why) => {
                tracing::debug!(event = "ignored", file = %r.name, why = %why);
            }
            FileOutcome::Vanished => {
                tracing::debug!(event = "vanished", file = %r.name);
            }
        }
    }
}

/// What names a file's notifications in its `ingested` line: `id` when it queued one
/// notification, `ids` (the first [`crate::store::LOGGED_IDS`], comma-separated, `…` after
/// them when there were more) when it queued several, and its records' `app`(s).
fn logged_names(o: &IngestOutcome) -> (Option<&str>, Option<String>, Option<String>) {
    let (id, ids) = match o.queued_ids.as_slice() {
        [] => (None, None),
        [one] if o.notifications_queued == 1 => (Some(one.as_str()), None),
        many => {
            let more = if o.notifications_queued > many.len() {
                ",…"
            } else {
                ""
            };
            (None, Some(format!("{}{more}", many.join(","))))
        }
    };
    let app = (!o.apps.is_empty()).then(|| o.apps.join(","));
    (id, ids, app)
}

/// Removes files in `processed_dir` older than `keep_processed_days` (0 keeps them forever).
/// Age counts from when the file was moved there (its ctime), not from when it was written.
pub fn sweep_processed(cfg: &Config) -> usize {
    let days = cfg.inbox.keep_processed_days;
    if days == 0 {
        return 0;
    }
    let dir = cfg.processed_dir();
    let removed = sweep_dir(
        dir,
        Duration::from_secs(u64::from(days) * 86_400),
        SystemTime::now(),
    );
    if removed > 0 {
        tracing::info!(event = "retention", dir = %dir.display(), removed, days, "removed old processed files");
    }
    removed
}

/// Removes regular files of `dir` last changed (moved or written) more than `max_age` before
/// `now`; returns how many.
pub fn sweep_dir(dir: &Path, max_age: Duration, now: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if !m.file_type().is_file() {
            continue;
        }
        let newest = m.mtime().max(m.ctime());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(newest.max(0) as u64);
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

    #[test]
    fn retention_removes_only_old_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), "{}").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(sweep_dir(d.path(), week, SystemTime::now()), 0);
        assert!(d.path().join("a.json").exists());
        let later = SystemTime::now() + Duration::from_secs(8 * 86_400);
        assert_eq!(sweep_dir(d.path(), week, later), 1);
        assert!(!d.path().join("a.json").exists());
        assert!(d.path().join("sub").is_dir());
    }
}
