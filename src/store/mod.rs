//! The SQLite store: the only place pushdrop's state lives.
//!
//! One thread owns the write connection ([`writer`]); everything that changes the database is a
//! message to it, so there is never a `SQLITE_BUSY` between our own writers, and ingest
//! commits from many files share one fsync (group commit). Readers (`status`, `show`, the
//! admin endpoint) open their own read-only connections ([`query`]); WAL lets them run beside
//! the writer.
//!
//! The API is deliberately narrow — ingest a batch, fan out and claim due work, record
//! results, requeue, purge — so that a second backend could one day sit behind it.

pub mod query;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::Environment;
use crate::model::{PushType, Record};

use crate::inbox::fsutil::identity;

pub use schema::SCHEMA_VERSION;
pub use writer::{
    Claim, ClaimedDelivery, DEVICE_KEPT, DeliveryResult, EndedDelivery, FinishedNotification,
    HeldReleased, RecordFailed, ResultKind, kept_reason,
};

/// SQLite's error, with what a "database is locked" means here: every writer waits up to
/// 10 s for the write lock, so another process (the daemon, committing a big file, or
/// stopped while it held the lock) kept it longer than that.
fn sqlite_text(e: &rusqlite::Error) -> String {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
        format!(
            "{e} (another process (the daemon, a one-shot pushdrop command, a sqlite3 shell) held the database's write lock for more than 10 s; try again)"
        )
    } else {
        e.to_string()
    }
}

/// What a read-only refusal adds: the files this user may not write, or, when it may write
/// them all, where else the refusal comes from.
fn read_only_hint(blocked: &[PathBuf]) -> String {
    if blocked.is_empty() {
        " (the files are writable by this user: is the file system mounted read-only?)".into()
    } else {
        not_writable_text(blocked)
    }
}

/// "; not writable by this user: a, b": how a refusal names the files this user may not
/// write (see [`not_writable`]).
pub fn not_writable_text(blocked: &[PathBuf]) -> String {
    let names: Vec<String> = blocked.iter().map(|p| p.display().to_string()).collect();
    format!("; not writable by this user: {}", names.join(", "))
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {}", sqlite_text(.0))]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "cannot read database {path}: {} (this user needs read access to it and to the -wal and -shm files beside it)",
        sqlite_text(.cause)
    )]
    Unreadable {
        path: PathBuf,
        // Not a `source`: the message says it already, and SQLite's own error under it
        // would repeat it in other words.
        cause: rusqlite::Error,
    },
    /// A write SQLite refused as read-only, with the database's path and the files this
    /// user may not write: "attempt to write a readonly database" alone names neither.
    #[error("cannot write database {path}: {}{}", sqlite_text(.cause), read_only_hint(.blocked))]
    ReadOnly {
        path: PathBuf,
        blocked: Vec<PathBuf>,
        // Boxed: every `Result` of the store carries this enum's size.
        cause: Box<rusqlite::Error>,
    },
    #[error("cannot create folder {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot take the lock file {path}: {source} (the database's folder must be writable, on a filesystem with file locks)"
    )]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database {path} is in use by another pushdrop process{pid} (lock file {lock}); stop it first",
        pid = crate::lockfile::pid_text(*pid)
    )]
    Locked {
        path: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error(
        "no database at {path}, but a daemon{pid} holds its lock: the file was deleted or moved while the daemon ran; not creating another. Restart the daemon (it takes no drop files meanwhile; what it queued in the deleted file is lost when it stops)",
        pid = crate::lockfile::pid_text(*pid)
    )]
    GoneUnderDaemon { path: PathBuf, pid: Option<u32> },
    #[error(
        "the database file {path} was replaced while a daemon{pid} runs on the file it opened before: not writing to it (the daemon would never see it, and the next start may lose what is written). Restart the daemon first",
        pid = crate::lockfile::pid_text(*pid)
    )]
    ReplacedUnderDaemon { path: PathBuf, pid: Option<u32> },
    #[error(
        "database schema version {found} is newer than this pushdrop supports ({supported}); upgrade pushdrop"
    )]
    TooNew { found: i64, supported: i64 },
    #[error("database {path} is not writable: {source}")]
    Unwritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no notification with id {0:?}")]
    UnknownNotification(String),
    #[error("notification id {id:?} exists for apps {apps}: name one with --app")]
    AmbiguousId { id: String, apps: String },
    #[error("the store's writer thread has stopped")]
    Closed,
    #[error("the file's ingest was abandoned before its commit; nothing of it was kept")]
    Abandoned,
    /// Something the writer relies on did not hold (see the message); the transaction (a
    /// file's, or a batch of results') is rolled back rather than written on a guess.
    #[error("the store's writer found an inconsistency: {0}")]
    Inconsistent(&'static str),
}

/// One accepted file's records, with what identifies this copy of the file so that a restart
/// after a crash between commit and move recognises it.
#[derive(Debug, Clone)]
pub struct IngestFile {
    /// The file name inside the inbox (or the path given to `pushdrop ingest`).
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub ino: u64,
    pub mtime_ns: i64,
    pub records: Vec<Record>,
}

impl IngestFile {
    /// When the dropper wrote the file (its mtime, never later than now): the time of its
    /// device registrations, compared with APNs invalidation timestamps.
    pub fn written_at_ms(&self) -> i64 {
        (self.mtime_ns / 1_000_000).min(crate::model::now_ms())
    }
}

/// Notification ids an [`IngestOutcome`] keeps for the log: the `ingested` line of a file is
/// one line, however many notifications it holds.
pub const LOGGED_IDS: usize = 20;
/// Tokens an [`IngestOutcome`] keeps for the log, likewise.
pub const LOGGED_TOKENS: usize = 10;

/// What the commit of one file did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The same file (name, content, inode, mtime) was committed before a crash: nothing was
    /// inserted again; the caller only has to move it.
    pub already_committed: bool,
    pub devices_registered: usize,
    pub devices_unregistered: usize,
    /// Registrations that left their device invalid: the file was written (its mtime) no
    /// later than APNs invalidated the token. The dropper should hear of it.
    pub devices_still_invalid: usize,
    /// The first [`LOGGED_TOKENS`] of those tokens, shortened, for the log.
    pub still_invalid_tokens: Vec<String>,
    pub notifications_queued: usize,
    /// The apps and ids of the first [`LOGGED_IDS`] notifications queued (assigned ids
    /// included), for the file's `ingested` log line ([`IngestOutcome::queued_names`]).
    pub queued_ids: Vec<(String, String)>,
    /// The apps the file's records named, each once.
    pub apps: Vec<String>,
    /// Notifications skipped because their app already had their id.
    pub duplicates: Vec<Duplicate>,
}

/// A notification of a file not queued: its app already had a notification with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// Its index among the file's records.
    pub record: usize,
    pub app: String,
    pub id: String,
}

impl IngestOutcome {
    /// The ids of the first `n` duplicates, as the log and `pushdrop ingest` name them: the
    /// id alone when the file named one app, `app/id` (as in a receipt's path) when it named
    /// more, where an id alone would not say which notification it is.
    pub fn duplicate_names(&self, n: usize) -> Vec<String> {
        self.duplicates
            .iter()
            .take(n)
            .map(|d| self.qualified(&d.app, &d.id))
            .collect()
    }

    /// The queued notifications' ids for the log, `app/id` when the file named more than
    /// one app (an id is unique within its app only).
    pub fn queued_names(&self) -> Vec<String> {
        self.queued_ids
            .iter()
            .map(|(app, id)| self.qualified(app, id))
            .collect()
    }

    fn qualified(&self, app: &str, id: &str) -> String {
        if self.apps.len() > 1 {
            format!("{app}/{id}")
        } else {
            id.to_string()
        }
    }
}

/// A file committed earlier, as `committed_files` remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedVersion {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub ino: u64,
    /// When it was committed (ms since the epoch).
    pub committed_at: i64,
}

/// What `pushdrop retry` put back in the queue, for its output and log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub deliveries: usize,
    /// The app of the notification named (found by its id when the operator named no app),
    /// or the app the operator named for all failed deliveries; `None` for every app.
    pub app: Option<String>,
}

/// A handle to the store; cheap to clone, usable from threads and async tasks.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<writer::Command>,
    path: PathBuf,
    new_work: Arc<Notify>,
    /// Device and inode of the database file the write connection opened, so that
    /// [`Store::check_writable`] notices a file deleted or replaced under the daemon.
    ident: Option<(u64, u64)>,
    trouble: Arc<WriteTrouble>,
    _lock: Arc<Option<LockFile>>,
}

/// The kinds of write whose failure the daemon must show while it lasts.
#[derive(Debug, Clone, Copy)]
enum WriteKind {
    /// `/readyz`'s own test write (the heartbeat row), with its checks of the file.
    Heartbeat,
    /// A drop file's commit.
    Commit,
    /// A batch of delivery results.
    Results,
    /// A claim of due work (it writes the fan-out's deliveries, and the leases).
    Claim,
}

impl WriteKind {
    const ALL: [WriteKind; 4] = [
        WriteKind::Heartbeat,
        WriteKind::Commit,
        WriteKind::Results,
        WriteKind::Claim,
    ];

    fn label(self) -> &'static str {
        match self {
            WriteKind::Heartbeat => "heartbeat",
            WriteKind::Commit => "commit",
            WriteKind::Results => "results",
            WriteKind::Claim => "claim",
        }
    }

    /// What a failed write of this kind says, with its error; `None` for the writer's
    /// stopping (shutdown, which `/readyz` says already).
    fn failure(self, e: &StoreError) -> Option<String> {
        let what = match self {
            WriteKind::Heartbeat => "store not writable",
            WriteKind::Commit => "files cannot be committed",
            WriteKind::Results => "delivery results cannot be written",
            WriteKind::Claim => "due work cannot be claimed (nothing is sent)",
        };
        (!matches!(e, StoreError::Closed)).then(|| format!("{what}: {e}"))
    }
}

/// The labels of the kinds of write `store_write_failing` has, for its series at 0 from the
/// start.
pub fn write_labels() -> [&'static str; WriteKind::ALL.len()] {
    WriteKind::ALL.map(WriteKind::label)
}

/// The writes failing now, by kind, each until one of its kind succeeds, with when it last
/// failed. A database that takes the heartbeat's one-row write (`/readyz`) may still refuse a
/// file's commit or a batch of results (a full disk), and cannot record that it does: the
/// admin endpoint shows these instead ([`Store::write_trouble`]).
#[derive(Debug, Default)]
struct WriteTrouble([Mutex<Option<(String, std::time::Instant)>>; WriteKind::ALL.len()]);

impl WriteTrouble {
    /// Notes how a write of `kind` went: `Some(error)` when it failed.
    fn set(&self, kind: WriteKind, failed: Option<String>) {
        let mut slot = self.0[kind as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if slot.is_some() || failed.is_some() {
            *slot = failed.map(|error| (error, std::time::Instant::now()));
        }
    }

    /// Notes a write of `kind` by its result.
    fn note<T>(&self, kind: WriteKind, done: &Result<T, StoreError>) {
        self.set(kind, done.as_ref().err().and_then(|e| kind.failure(e)));
    }
}

/// How long a failed write counts without failing again. Results are written again every
/// second and a file that failed is tried again at least every minute, so a failure that
/// lasts is renewed well within this; one whose file was removed by hand (nothing left to
/// try) is forgotten after it.
const WRITE_TROUBLE_FOR: std::time::Duration = std::time::Duration::from_secs(150);

/// Whether this process may write `path`, asked with `access(2)`: the database file must
/// never be opened and closed outside SQLite. SQLite's locks are POSIX record locks, and a
/// process loses all of them on a file when it closes *any* descriptor of it; a command run
/// beside the daemon would then take itself for the database's last user, checkpoint it and
/// delete the WAL the daemon still writes to.
fn writable(path: &Path) -> std::io::Result<()> {
    crate::inbox::fsutil::access(path, libc::W_OK)
}

impl Store {
    /// Opens (creating if needed) and migrates the database, and starts its writer thread.
    /// With `exclusive` (the daemon), only one process may hold the database: a second
    /// exclusive `open` fails with [`StoreError::Locked`]. One-shot commands open it shared
    /// and rely on SQLite's own locking.
    pub fn open(path: &Path, exclusive: bool) -> Result<Store, StoreError> {
        let folder = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = folder {
            // Run as root, folders made go to the daemon's user (see `ownership`).
            crate::ownership::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let lock = if exclusive {
            Some(LockFile::acquire(path)?)
        } else {
            None
        };
        let new = !path.exists();
        if new
            && !exclusive
            && let Some(d) = daemon_state(path)
            && d.running
        {
            // Deleted (or moved) under a running daemon, which still writes to the file it
            // opened: a new one here would be a second, empty database beside it, which the
            // daemon's next start would take for its own.
            return Err(StoreError::GoneUnderDaemon {
                path: path.to_path_buf(),
                pid: d.pid,
            });
        }
        if !new
            && !exclusive
            && let Some(theirs) = LockFile::database_of(path)
            && identity(path).is_ok_and(|now| now != theirs)
            && let Some(d) = daemon_state(path)
            && d.running
        {
            // Replaced (a restore, a copy moved over it) under a running daemon, which still
            // writes to the file it opened: what a command wrote here would be lost to it.
            return Err(StoreError::ReplacedUnderDaemon {
                path: path.to_path_buf(),
                pid: d.pid,
            });
        }
        let conn = writer::open_write_connection(path).map_err(|e| named(path, e))?;
        if new && let Some(dir) = folder {
            // A database a `sudo pushdrop status` made before the daemon's first start is the
            // daemon user's (SQLite, run as root, gives its -wal and -shm the database's owner).
            crate::ownership::give_to_owner_of(
                dir,
                [
                    path.to_path_buf(),
                    beside(path, "-wal"),
                    beside(path, "-shm"),
                ],
            );
        }
        let ident = identity(path).ok();
        if let (Some(lock), Some(ident)) = (&lock, ident) {
            lock.note_database(ident);
        }
        let spawn_failed = |e| StoreError::Dir {
            path: path.to_path_buf(),
            source: e,
        };
        // The daemon checkpoints the WAL on a thread of its own, beside the writer (WAL lets
        // a checkpoint run during writes), instead of inside whichever commit crosses SQLite's
        // threshold: copying a big file's 45 MiB back into the database then delays no claim.
        // One-shot commands keep SQLite's automatic checkpoints.
        let checkpoints = if exclusive {
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            let ckpt = writer::open_checkpoint_connection(path)?;
            let wal = beside(path, "-wal");
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("pushdrop-ckpt".into())
                .spawn(move || writer::run_checkpoints(ckpt, wal, rx))
                .map_err(spawn_failed)?;
            Some(tx)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(1024);
        let new_work = Arc::new(Notify::new());
        let notify = new_work.clone();
        std::thread::Builder::new()
            .name("pushdrop-store".into())
            .spawn(move || writer::run(conn, rx, notify, checkpoints, exclusive))
            .map_err(spawn_failed)?;
        Ok(Store {
            tx,
            path: path.to_path_buf(),
            new_work,
            ident,
            trouble: Arc::default(),
            _lock: Arc::new(lock),
        })
    }

    /// The writes that fail now (`/readyz`'s test write, a file's commit, a batch of
    /// delivery results, a claim), each with its error, until one of the same kind
    /// succeeds: what `/readyz` and `/status` say while the database refuses them. Sets the `store_write_failing` metric to match (the
    /// admin endpoint asks before it encodes the metrics).
    pub fn write_trouble(&self) -> Vec<String> {
        let mut now = Vec::new();
        for kind in WriteKind::ALL {
            let slot = self.trouble.0[kind as usize]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let failing = slot
                .as_ref()
                .filter(|(_, at)| at.elapsed() < WRITE_TROUBLE_FOR)
                .map(|(error, _)| error.clone());
            crate::metrics::get()
                .store_write_failing
                .get_or_create(&crate::metrics::WriteLabel {
                    write: kind.label().into(),
                })
                .set(i64::from(failing.is_some()));
            now.extend(failing);
        }
        now
    }

    /// Refuses a write into a database file that was deleted or replaced since the daemon
    /// opened it: what is written there is lost at the next start.
    fn check_identity(&self) -> Result<(), StoreError> {
        let unwritable = |source| StoreError::Unwritable {
            path: self.path.clone(),
            source,
        };
        let Some(ident) = self.ident else {
            return Ok(());
        };
        match identity(&self.path) {
            Ok(now) if now == ident => Ok(()),
            Ok(_) => Err(unwritable(std::io::Error::other(
                "the database file was replaced since pushdrop opened it; restart pushdrop",
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(unwritable(std::io::Error::other(
                    "the database file was deleted since pushdrop opened it; restart pushdrop",
                )))
            }
            Err(e) => Err(unwritable(e)),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Woken whenever an ingest queued notifications, so the sender can sleep without polling.
    pub fn new_work(&self) -> Arc<Notify> {
        self.new_work.clone()
    }

    /// Commits files' records durably (fsync'd) before returning, in one transaction that may be
    /// shared with other callers' files (group commit). Blocking; not for async contexts.
    pub fn ingest(&self, files: Vec<IngestFile>) -> Result<Vec<IngestOutcome>, StoreError> {
        let committed = self.check_identity().and_then(|()| {
            let (reply, rx) = oneshot::channel();
            self.tx
                .blocking_send(writer::Command::Ingest { files, reply })
                .map_err(|_| StoreError::Closed)?;
            answer(&self.path, rx.blocking_recv())
        });
        self.trouble.note(WriteKind::Commit, &committed);
        committed
    }

    /// Starts committing one big file whose records are still being parsed: the writer
    /// inserts each chunk as it comes, inside one transaction that commits only on
    /// [`IngestStream::commit`] (and is rolled back if the stream is dropped instead). The
    /// parse and the inserts overlap; the file is still accepted whole or not at all.
    /// `file.records` and `file.sha256` are ignored (they come later). Blocking.
    pub fn begin_ingest(&self, file: IngestFile) -> Result<IngestStream, StoreError> {
        if let Err(e) = self.check_identity() {
            self.trouble
                .set(WriteKind::Commit, WriteKind::Commit.failure(&e));
            return Err(e);
        }
        let (chunks, rx) = std::sync::mpsc::sync_channel(4);
        let (reply, reply_rx) = oneshot::channel();
        self.tx
            .blocking_send(writer::Command::IngestStream {
                file,
                chunks: rx,
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        Ok(IngestStream {
            chunks,
            reply: reply_rx,
            path: self.path.clone(),
            trouble: self.trouble.clone(),
        })
    }

    /// Runs `f` on the writer thread (blocking caller).
    fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut writer::Writer) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (cmd, rx) = job(f);
        self.tx.blocking_send(cmd).map_err(|_| StoreError::Closed)?;
        answer(&self.path, rx.blocking_recv())
    }

    /// Runs `f` on the writer thread (async caller).
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut writer::Writer) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (cmd, rx) = job(f);
        self.tx.send(cmd).await.map_err(|_| StoreError::Closed)?;
        answer(&self.path, rx.await)
    }

    /// Expands due `users`/`all` notifications into deliveries, at most about `max_rows`
    /// deliveries per call (in chunks, each its own transaction). Returns how many were made,
    /// and the notifications that became final (a broadcast that reached no device).
    pub async fn fan_out_due(
        &self,
        now_ms: i64,
        max_rows: usize,
    ) -> Result<(usize, Vec<FinishedNotification>), StoreError> {
        let made = self.call(move |w| w.fan_out_due(now_ms, max_rows)).await;
        // A failure only: the claim after it says when claiming works again.
        if let Some(failed) = made
            .as_ref()
            .err()
            .and_then(|e| WriteKind::Claim.failure(e))
        {
            self.trouble.set(WriteKind::Claim, Some(failed));
        }
        made
    }

    /// Claims up to `limit` due deliveries for the sender. A claimed delivery is not handed
    /// out again until its result is recorded; the claim is kept in memory only, so after a
    /// crash it is simply due again. Deliveries that can no longer be sent (past expiration,
    /// invalidated device) are finished here instead of being returned.
    pub async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claim, StoreError> {
        let claimed = self.call(move |w| w.claim_due(now_ms, limit)).await;
        self.trouble.note(WriteKind::Claim, &claimed);
        claimed
    }

    /// Hands claimed deliveries back unsent (the sender is stopping): claimable again.
    pub async fn release(&self, delivery_ids: Vec<i64>) {
        let _ = self
            .call(move |w| {
                w.release(&delivery_ids);
                Ok(())
            })
            .await;
    }

    /// Whether another process committed to the database since the last call (`pushdrop
    /// ingest`, `retry` or `purge` beside the running daemon), so the idle sender looks for
    /// their work only when there is some. Counts from the store's opening. Costs a read of
    /// the WAL index, no query of any table.
    pub async fn changed_elsewhere(&self) -> bool {
        self.call(|w| w.changed_elsewhere()).await.unwrap_or(false)
    }

    /// Records outcomes in one transaction and releases the deliveries' claims; returns the
    /// notifications that became final. If the transaction fails, the results come back with
    /// the error and their deliveries stay claimed, so that the caller can write them again
    /// later and nothing is sent twice meanwhile (a closed store gives none back).
    pub async fn record_results(
        &self,
        results: Vec<DeliveryResult>,
    ) -> Result<Vec<FinishedNotification>, RecordFailed> {
        let recorded = match self.call(move |w| Ok(w.record_results(results))).await {
            Ok(recorded) => recorded,
            Err(error) => Err(RecordFailed {
                error,
                results: Vec::new(),
            }),
        };
        let failed = recorded.as_ref().err().map(|f| {
            let n = f.results.len();
            let (noun, verb) = if n == 1 {
                ("result", "its delivery still shows")
            } else {
                ("results", "their deliveries still show")
            };
            format!(
                "{n} delivery {noun} cannot be written ({verb} as queued): {}",
                f.error
            )
        });
        let held = recorded.as_ref().err().map_or(0, |f| f.results.len());
        crate::metrics::get().results_unwritten.set(held as i64);
        self.trouble.set(WriteKind::Results, failed);
        recorded
    }

    /// Whether a device still valid registered again after `at_ms` (APNs' time for its
    /// token's end), so that a 410 leaves it active (SPEC 4.3): the sender asks before it
    /// logs the delivery's line, which then says "device kept". Rare (410 answers only), so
    /// a round trip of its own; a failed read answers false (the store still decides).
    pub async fn registered_after(&self, device_id: i64, at_ms: i64) -> bool {
        self.call(move |w| w.registered_after(device_id, at_ms))
            .await
            .unwrap_or(false)
    }

    /// The versions of files committed under these names (within retention): a file of one
    /// of these names found in the inbox again may be one of them with lines appended after
    /// its commit, whose committed part must not be ingested again.
    pub fn committed_versions_blocking(
        &self,
        names: Vec<String>,
    ) -> Result<Vec<CommittedVersion>, StoreError> {
        self.call_blocking(move |w| w.committed_versions(&names))
    }

    /// The files committed with this inode number (within retention): a crash while the
    /// lines appended to a committed `.jsonl` were split off leaves it, grown, under a
    /// hidden name, and the restart finds which file it is by its inode and committed bytes.
    /// Scans the table: a restart's rare case.
    pub fn committed_by_inode_blocking(
        &self,
        ino: u64,
    ) -> Result<Vec<CommittedVersion>, StoreError> {
        self.call_blocking(move |w| w.committed_by_inode(ino))
    }

    /// The name a file with this content, inode and mtime was committed under: a crash in
    /// the middle of moving a committed file out of the inbox (across file systems) leaves it
    /// under a hidden name, and the restart finishes the move under its own name.
    pub fn committed_name_blocking(
        &self,
        sha256: String,
        ino: i64,
        mtime_ns: i64,
    ) -> Result<Option<String>, StoreError> {
        self.call_blocking(move |w| w.committed_name(&sha256, ino, mtime_ns))
    }

    /// Requeues failed deliveries: of notification `id` (of `app`, which must be named when
    /// two apps use the id: [`StoreError::AmbiguousId`]) or, with `None`, all of them (of
    /// `app` only, when named). An `id`
    /// no notification has is [`StoreError::UnknownNotification`], not "0 requeued".
    pub fn retry_failed_blocking(
        &self,
        id: Option<String>,
        app: Option<String>,
    ) -> Result<Requeued, StoreError> {
        self.call_blocking(move |w| w.retry_failed(id.as_deref(), app.as_deref()))
    }

    /// Deletes finished deliveries and notifications, invalid devices and committed-file
    /// records older than `cutoff_ms`, except the records of files named in
    /// `still_in_inbox` (the drop files in the inbox now: see [`crate::inbox::drop_names`];
    /// `None`, an inbox that could not be listed, keeps every record), which keep a committed
    /// file whose move failed from being taken again.
    pub fn purge_blocking(
        &self,
        cutoff_ms: i64,
        still_in_inbox: Option<Vec<String>>,
    ) -> Result<PurgeCounts, StoreError> {
        self.call_blocking(move |w| w.purge(cutoff_ms, still_in_inbox.as_deref()))
    }

    /// Async form of [`Store::purge_blocking`].
    pub async fn purge(
        &self,
        cutoff_ms: i64,
        still_in_inbox: Option<Vec<String>>,
    ) -> Result<PurgeCounts, StoreError> {
        self.call(move |w| w.purge(cutoff_ms, still_in_inbox.as_deref()))
            .await
    }

    /// Makes the held deliveries due now: those an earlier run put back without spending an
    /// attempt, for a pause (credentials, unreachable APNs, a `BadDeviceToken` burst) or a
    /// request it never sent. Pauses live in the daemon's memory, so a start lifts them; the
    /// deliveries they held would otherwise wait out the old back-off (up to 15 minutes)
    /// after an operator restarted to fix the cause. Says how many, and which apps and
    /// environments a `BadDeviceToken` burst was holding.
    pub fn release_held_blocking(&self) -> Result<HeldReleased, StoreError> {
        self.call_blocking(|w| w.release_held(crate::model::now_ms()))
    }

    /// Remembers a problem for `pushdrop status` (rejections, pauses, auth failures).
    pub fn note_event_blocking(&self, kind: &str, app: Option<&str>, message: &str) {
        let (kind, app, message) = (
            kind.to_string(),
            app.map(str::to_string),
            message.to_string(),
        );
        let _ = self.call_blocking(move |w| w.note_event(&kind, app.as_deref(), &message));
    }

    /// Async form of [`Store::note_event_blocking`].
    pub async fn note_event(&self, kind: &str, app: Option<&str>, message: &str) {
        let (kind, app, message) = (
            kind.to_string(),
            app.map(str::to_string),
            message.to_string(),
        );
        let _ = self
            .call(move |w| w.note_event(&kind, app.as_deref(), &message))
            .await;
    }

    /// Proves the database still takes writes: the file is where it was (the same file, not
    /// one deleted or replaced under us, whose writes would vanish at the next start),
    /// writable, and a tiny committed write succeeds. For `/readyz`.
    /// Its failure is noted with the other refused writes, so that `/status` and
    /// `/metrics` say what `/readyz` says.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let checked = async {
            self.check_identity()?;
            writable(&self.path).map_err(|source| StoreError::Unwritable {
                path: self.path.clone(),
                source,
            })?;
            self.call(|w| w.heartbeat()).await
        }
        .await;
        self.trouble.note(WriteKind::Heartbeat, &checked);
        checked
    }

    /// One small write (the heartbeat row): proof, before the daemon sends anything, that the
    /// database takes writes.
    pub fn heartbeat_blocking(&self) -> Result<(), StoreError> {
        self.call_blocking(|w| w.heartbeat())
    }

    /// Writes a consistent copy of the database to `dest` (`VACUUM INTO`), safe while sending.
    pub fn backup_blocking(&self, dest: &Path) -> Result<(), StoreError> {
        let dest = dest.to_path_buf();
        self.call_blocking(move |w| w.backup(&dest))
    }
}

/// A file being committed while it is parsed; see [`Store::begin_ingest`].
pub struct IngestStream {
    chunks: std::sync::mpsc::SyncSender<writer::StreamMsg>,
    reply: oneshot::Receiver<Result<IngestOutcome, StoreError>>,
    path: PathBuf,
    trouble: Arc<WriteTrouble>,
}

impl IngestStream {
    /// Hands the writer the next records (in file order). False once the writer has given
    /// up on the file (a database error): [`IngestStream::commit`] then says why.
    pub fn send(&self, records: Vec<Record>) -> bool {
        self.chunks
            .send(writer::StreamMsg::Records(records))
            .is_ok()
    }

    /// Commits the file, now that all of it parsed; `sha256` identifies its content (see
    /// [`IngestFile`]). Returns once the commit is durable.
    pub fn commit(self, sha256: String) -> Result<IngestOutcome, StoreError> {
        let _ = self.chunks.send(writer::StreamMsg::Commit { sha256 });
        let committed = answer(&self.path, self.reply.blocking_recv());
        self.trouble.note(WriteKind::Commit, &committed);
        committed
    }

    /// Drops everything sent so far (the file is rejected or still being written), once the
    /// writer has rolled it back.
    pub fn abandon(self) {
        drop(self.chunks);
        let _ = self.reply.blocking_recv();
    }
}

/// The writer's answer: [`StoreError::Closed`] when it went away without one, and a
/// read-only refusal with the database named ([`named`]).
fn answer<R>(
    path: &Path,
    reply: Result<Result<R, StoreError>, oneshot::error::RecvError>,
) -> Result<R, StoreError> {
    reply
        .map_err(|_| StoreError::Closed)?
        .map_err(|e| named(path, e))
}

/// Names the database (and what this user may not write) in a read-only refusal.
fn named(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(source)
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::ReadOnly) =>
        {
            StoreError::ReadOnly {
                path: path.to_path_buf(),
                blocked: not_writable(path),
                cause: Box::new(source),
            }
        }
        e => e,
    }
}

/// Wraps `f` as a command for the writer thread, with the channel its answer comes back on.
fn job<R: Send + 'static>(
    f: impl FnOnce(&mut writer::Writer) -> Result<R, StoreError> + Send + 'static,
) -> (writer::Command, oneshot::Receiver<Result<R, StoreError>>) {
    let (reply, rx) = oneshot::channel();
    let job: writer::Job = Box::new(move |w| {
        let _ = reply.send(f(w));
    });
    (writer::Command::Run(job), rx)
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeCounts {
    pub deliveries: usize,
    pub notifications: usize,
    pub devices: usize,
    pub committed_files: usize,
}

/// Data every delivery of a notification shares, looked up once per notification.
#[derive(Debug, Clone)]
pub struct NotificationInfo {
    pub app: String,
    pub ext_id: String,
    pub payload: bytes::Bytes,
    pub push_type: PushType,
    pub priority: u8,
    pub topic: String,
    pub collapse_id: Option<String>,
    pub expiration: Option<i64>,
}

/// The device of a claimed delivery.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: i64,
    pub token: String,
    pub environment: Environment,
}

/// The database's files (and its folder) this process may not write, so that a refusal can
/// name them: SQLite gives the `-wal` and `-shm` files it creates the database file's mode,
/// so after a start on a read-only database they stay read-only when the database itself is
/// made writable again.
pub fn not_writable(db: &Path) -> Vec<PathBuf> {
    let mut paths = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        paths.push(beside(db, suffix));
    }
    if let Some(dir) = db.parent() {
        paths.push(if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        });
    }
    paths
        .into_iter()
        // A missing file is not reported (SQLite creates it when it can).
        .filter(|p| p.exists() && writable(p).is_err())
        .collect()
}

/// Whether a daemon (`pushdrop run`) holds the database now, and its pid: `None` when this
/// system cannot tell. For `status`, whose figures and pauses are otherwise the same whether
/// the daemon runs or stopped an hour ago.
pub fn daemon_state(db: &Path) -> Option<query::DaemonState> {
    use crate::lockfile::Held;
    Some(match crate::lockfile::holder(&beside(db, ".lock"))? {
        Held::By(pid) => query::DaemonState { running: true, pid },
        Held::Free => query::DaemonState {
            running: false,
            pid: None,
        },
    })
}

/// An advisory lock (`flock`) on `<db>.lock`: two daemons on one database would each think
/// they own the leases, and send everything twice.
///
/// The lock sits beside the database's real file, symbolic links resolved: a second daemon
/// that reaches the same database through a link (to the file or to a folder on its path)
/// must find the same lock. (SQLite resolves links too, so both would share one database and
/// one WAL.) Hard links are two names of one file that nothing can tell apart by name: the
/// README says not to use them.
struct LockFile {
    _file: std::fs::File,
}

/// The file SQLite (or the daemon) keeps beside the database: its real path, links resolved,
/// and `suffix` (`-wal`, `-shm`, `.lock`).
fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut name = real_path(db).into_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The database's path with its symbolic links resolved: the file's own when it exists, else
/// its folder's (the file is about to be created there), following a link to a file not
/// made yet to where SQLite will make it. Unresolvable: the path as given.
fn real_path(db: &Path) -> PathBuf {
    let mut path = db.to_path_buf();
    // A link to a link to … a file not made yet: a few hops, not a loop.
    for _ in 0..40 {
        if let Ok(p) = std::fs::canonicalize(&path) {
            return p;
        }
        match std::fs::read_link(&path) {
            Ok(target) => {
                path = match path.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
            }
            Err(_) => break,
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path,
    }
}

impl LockFile {
    /// Writes the database file's device and inode into the lock file: a command run beside
    /// the daemon compares them with the file under the name ([`LockFile::database_of`]).
    fn note_database(&self, (dev, ino): (u64, u64)) {
        use std::io::Write as _;
        let mut file = &self._file;
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all(format!("{dev} {ino}\n").as_bytes()));
    }

    /// The device and inode of the database file the daemon holding (or last holding) the
    /// lock opened, as it wrote them.
    fn database_of(db: &Path) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(beside(db, ".lock")).ok()?;
        let (dev, ino) = text.trim().split_once(' ')?;
        Some((dev.parse().ok()?, ino.parse().ok()?))
    }

    fn acquire(db: &Path) -> Result<LockFile, StoreError> {
        let lock = beside(db, ".lock");
        match crate::lockfile::try_exclusive(&lock) {
            Ok(Some(file)) => Ok(LockFile { _file: file }),
            Ok(None) => Err(StoreError::Locked {
                path: db.to_path_buf(),
                pid: crate::lockfile::holder_pid(&lock),
                lock,
            }),
            Err(source) => Err(StoreError::LockFile { path: lock, source }),
        }
    }
}

#[cfg(test)]
mod tests;
