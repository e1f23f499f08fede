//! The writer thread: the one owner of the database's write connection.
//!
//! Commands arrive over a channel. Ingest commands waiting together are committed in one
//! transaction with `synchronous = FULL` (group commit: one fsync for many files); everything
//! else (claims, results, fan-out) commits with `synchronous = NORMAL`, because losing a result
//! to a power cut only means a resend, which APNs' `apns-id` makes harmless, while losing an
//! accepted file's records would break the inbox's promise.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::path::Path;
use std::sync::Arc;

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{DeviceInfo, IngestFile, IngestOutcome, NotificationInfo, PurgeCounts, StoreError};
use crate::config::Environment;
use crate::logging::{SAY_LASTING_EVERY, Throttle};
use crate::model::{
    DeliveryState, DeviceAction, DeviceRecord, NotificationRecord, PushType, Record, Target, now_ms,
};

/// Work for the writer thread.
pub(super) type Job = Box<dyn FnOnce(&mut Writer) + Send>;

pub(super) enum Command {
    Ingest {
        files: Vec<IngestFile>,
        reply: oneshot::Sender<Result<Vec<IngestOutcome>, StoreError>>,
    },
    /// One big file whose records arrive in chunks while it is still being parsed; committed
    /// alone, in one transaction, only on [`StreamMsg::Commit`].
    IngestStream {
        file: IngestFile,
        chunks: std::sync::mpsc::Receiver<StreamMsg>,
        reply: oneshot::Sender<Result<IngestOutcome, StoreError>>,
    },
    Run(Job),
}

/// What the parser of a streamed file sends the writer.
pub(super) enum StreamMsg {
    /// The next records, in file order.
    Records(Vec<Record>),
    /// The file parsed without a problem: commit it. Its content hash, known only now.
    Commit { sha256: String },
}

/// Rows added per fan-out transaction: big enough to be fast, small enough that the sender's
/// claims are not held up behind a million-row broadcast.
const FANOUT_CHUNK: usize = 20_000;

/// Page size of databases this version creates.
const PAGE_SIZE: i64 = 8192;

/// The page cache (in KiB, as `PRAGMA cache_size` takes it when negative) for claims, results
/// and fan-out. Small on purpose: when a B-tree page splits, SQLite parks a page under a
/// sentinel page number far past the end of the file, and the commit then sweeps the *whole*
/// page cache to drop pages past the end; with a big cache that sweep costs more than the
/// rest of a small transaction. Measured with `cargo bench --bench store_cycle`.
const SMALL_CACHE_KIB: i64 = -8192;

/// The page cache while committing files. A big file's transaction (100,000 notifications
/// dirty some 55 MiB) spills pages to the WAL before its commit; its B-trees grow at their
/// right edges, so a spilled page is rarely wanted again. A cache that held the whole
/// transaction (64 MiB, until December 2026) took longer: every page of it was memory fresh
/// from the kernel (page faults, 15% of the commit), given back after the commit and faulted
/// in again by the next big file. `scripts/bench-send`: ingest 0.36–0.44 s against
/// 0.42–0.51 s. Back to [`SMALL_CACHE_KIB`] afterwards.
const INGEST_CACHE_KIB: i64 = -16384;

/// Notifications whose shared data the writer keeps at hand for claims.
const NOTIFICATION_CACHE: usize = 4096;

/// Deliveries the writer holds for the sender at most (see [`Writer::handoff`]), about 700
/// bytes each with their notification's data. When a file commits deliveries that are due
/// now, the writer has everything a send needs in hand: keeping it saves the claim that would
/// read it back from SQLite (some 11,000 instructions per delivery, a tenth of the daemon's
/// work end to end). Beyond this many, the rest of a big file waits in the queue as before.
/// The hand-offs are made while the file's transaction fills the big ingest page cache, so
/// they add to the daemon's peak memory: 65,536 of them took a 100,000-notification file's
/// peak RSS from 129 to 177 MB, which would put a 64 MiB file past 200 MB.
/// The store's unit tests cross it with a few hundred deliveries.
pub(super) const HANDOFF_MAX: usize = if cfg!(test) { 200 } else { 32_768 };

/// An `INSERT` of several rows: `INSERT OR IGNORE INTO $rest`. Every `INSERT` of the writer
/// that may write more than one row goes through this, for one reason: a statement of several
/// rows that may stop half-way (any constraint left at `ABORT`, `NOT NULL` included) makes
/// SQLite copy every page it is about to change into a statement journal, so that it can undo
/// that statement alone. With every constraint at `IGNORE` it cannot stop half-way, and the
/// copies go (they were 8% of an ingest's writer instructions, `benches/store_cycle`). Each
/// caller checks that what `IGNORE` may skip is what it meant to skip.
macro_rules! insert_many {
    ($rest:literal) => {
        concat!("INSERT OR IGNORE INTO ", $rest)
    };
}

/// Marks the deliveries `$which` selects sent at `?2`, those still queued only: one
/// delivery (`id = ?1`) or a run of them (`id BETWEEN ?1 AND ?3`).
macro_rules! mark_sent_sql {
    ($which:literal) => {
        concat!(
            "UPDATE deliveries SET state = 1, attempts = attempts + 1,
             last_status = 200, last_reason = NULL, updated_at = ?2, finished_at = ?2
             WHERE ",
            $which,
            " AND state = 0"
        )
    };
}

/// A delivery handed to the sender; the writer will not hand it out again until its result
/// is recorded (or the process restarts).
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Fixed when the delivery was created, so a resend carries the same id.
    pub apns_id: String,
    pub device: DeviceInfo,
    pub notification: Arc<NotificationInfo>,
}

/// A delivery a claim ended without sending it.
#[derive(Debug, Clone)]
pub struct EndedDelivery {
    pub delivery: ClaimedDelivery,
    /// `Expired`, `InvalidToken`, or `Failed` (its device unregistered).
    pub state: DeliveryState,
    pub reason: String,
}

/// Why a claim ends a delivery whose expiration passed.
const EXPIRED_UNSENT: &str = "expired before it could be delivered";
/// The reason of a queued delivery whose device a device record unregistered after the
/// notification was made: the user signed out, the app was removed; it is not sent.
pub(super) const UNREGISTERED_UNSENT: &str = "device unregistered before it could be sent";

/// What happened to a claimed delivery.
#[derive(Debug, Clone)]
pub struct DeliveryResult {
    pub delivery_id: i64,
    pub kind: ResultKind,
}

/// The sender's verdict on one attempt; the store only writes it down.
#[derive(Debug, Clone)]
pub enum ResultKind {
    /// APNs accepted it (200).
    Sent { apns_id: Option<String> },
    /// Try again at `due_at_ms`; `count_attempt` is false for answers that are not the
    /// delivery's fault (expired provider token, GOAWAY before the stream started, shutdown).
    Retry {
        due_at_ms: i64,
        status: Option<u16>,
        reason: String,
        count_attempt: bool,
    },
    /// Final failure with Apple's reason.
    Failed { status: Option<u16>, reason: String },
    /// The expiration passed before it could be sent (again); `status` and `count_attempt`
    /// describe the attempt just made, if one was.
    Expired {
        status: Option<u16>,
        reason: String,
        count_attempt: bool,
    },
    /// The token is dead (410 or 400 `BadDeviceToken`); the device is invalidated as of
    /// `invalidated_at_ms` unless it registered again after that.
    InvalidToken {
        status: u16,
        reason: String,
        invalidated_at_ms: i64,
    },
}

impl ResultKind {
    /// Back to the queue until `due_at_ms` without costing an attempt: the answer was not the
    /// delivery's fault (a paused app, an unreachable APNs, a `BadDeviceToken` burst).
    pub fn held_until(due_at_ms: i64, status: Option<u16>, reason: String) -> ResultKind {
        ResultKind::Retry {
            due_at_ms,
            status,
            reason,
            count_attempt: false,
        }
    }
}

/// Results that could not be written (the database full, or failing), handed back with the
/// error: their deliveries stay claimed, so they are not sent again while the results wait.
#[derive(Debug)]
pub struct RecordFailed {
    pub error: StoreError,
    pub results: Vec<DeliveryResult>,
}

/// What [`Writer::release_held`] made due.
#[derive(Debug, Default)]
pub struct HeldReleased {
    pub deliveries: usize,
    /// The apps and environments some of whose deliveries a `BadDeviceToken` burst held: their
    /// config was in doubt when the last run stopped, and still is until a 200.
    pub bursts: Vec<(String, Environment)>,
}

/// A notification whose deliveries are all final: time for its receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedNotification {
    pub notification_id: i64,
    pub app: String,
    pub ext_id: String,
}

/// The writer's state: the connection, a small cache of notification data, and what the
/// sender holds.
pub struct Writer {
    conn: Connection,
    notifications: HashMap<i64, Arc<NotificationInfo>>,
    /// Deliveries handed to the sender whose result is not written yet. Claims skip them.
    /// This is the lease, kept in memory rather than written per delivery: one process owns
    /// the database (the daemon's lock file), so only it could claim, and a crash forgets the
    /// set, which leaves those deliveries queued and due: sent again, at least once. Each
    /// maps to its notification, which a `sent` result then need not read back.
    in_flight: HashMap<i64, i64>,
    /// Where the next claim continues in `(due_at, id)` order, so that a busy queue is not
    /// re-read past the deliveries already in flight on every claim. `None`: from the start.
    cursor: Option<(i64, i64)>,
    /// SQLite's `data_version` at the last [`Writer::changed_elsewhere`], once asked.
    data_version: Option<i64>,
    /// Deliveries a file just committed, due now, for the next claims.
    handoff: HandOffQueue,
    /// The wall clock at the last claim, beside the monotonic clock then: what tells a step
    /// of the system clock backwards (see [`Writer::clock_went_back`]).
    last_claim: Option<(i64, std::time::Instant)>,
    /// Deliveries given a new due time since the last claim: maybe at a clock already
    /// stepped back, so a step found now leaves them as they are.
    retried_since_claim: Vec<rusqlite::types::Value>,
}

/// A backwards step smaller than this is left alone (the sender's `now` is read a moment
/// before the claim).
const CLOCK_STEP_MIN_MS: i64 = 1000;

/// Deliveries a file just committed, due now, handed to the sender by the next claims
/// without reading them back (see [`HANDOFF_MAX`]). Each is in the writer's `in_flight`
/// already, so claims that walk the queue skip it.
#[derive(Default)]
struct HandOffQueue {
    /// At most this many wait ([`HANDOFF_MAX`], or 0 in a store no sender claims from).
    max: usize,
    deliveries: std::collections::VecDeque<HandedOff>,
    /// Devices invalidated or unregistered while deliveries wait here: a hand-off to one of
    /// them is given back to the queue, where the claim ends it unsent.
    gone: HashSet<i64>,
    /// The earliest due time of a delivery that went back to the queue while deliveries
    /// wait here: once it is due, claims walk the queue before taking hand-offs, so a retry
    /// does not wait behind a big file.
    queued_behind: Option<i64>,
}

impl HandOffQueue {
    /// How many more deliveries a commit may hand over.
    fn room(&self) -> usize {
        self.max.saturating_sub(self.deliveries.len())
    }

    /// A delivery went (back) to the queue, due at `due_at`.
    fn queued(&mut self, due_at: i64) {
        if !self.deliveries.is_empty() {
            self.queued_behind = Some(self.queued_behind.map_or(due_at, |d| d.min(due_at)));
        }
    }

    /// A device was invalidated or unregistered.
    fn device_gone(&mut self, device_id: i64) {
        if !self.deliveries.is_empty() {
            self.gone.insert(device_id);
        }
    }

    /// Whether the queue's walk should come before the hand-offs at `now`.
    fn queue_first(&self, now: i64) -> bool {
        self.queued_behind.is_some_and(|due| due <= now)
    }

    /// Takes deliveries into `out` until it holds `limit`. One that expired meanwhile, or
    /// whose device was invalidated or unregistered since, goes back to the queue (out of
    /// `in_flight`), where the claim's walk ends it as a claim of it would have.
    fn take(
        &mut self,
        now: i64,
        limit: usize,
        out: &mut Vec<ClaimedDelivery>,
        taken: &mut Vec<i64>,
        in_flight: &mut HashMap<i64, i64>,
        notifications: &mut HashMap<i64, Arc<NotificationInfo>>,
    ) {
        while out.len() < limit {
            let Some(h) = self.deliveries.pop_front() else {
                break;
            };
            let d = h.delivery;
            let info = &d.notification;
            if info.expiration.is_some_and(|e| e > 0 && e * 1000 <= now)
                || self.gone.contains(&d.device.id)
            {
                in_flight.remove(&d.delivery_id);
                continue;
            }
            // As a claim does: results and receipts find the notification's names here.
            if notifications.len() >= NOTIFICATION_CACHE {
                notifications.clear();
            }
            notifications.insert(h.notification_id, info.clone());
            taken.push(d.delivery_id);
            out.push(d);
        }
        if self.deliveries.is_empty() {
            self.gone.clear();
            self.queued_behind = None;
        }
    }
}

/// A delivery in [`Writer::handoff`], with its notification's row id.
struct HandedOff {
    notification_id: i64,
    delivery: ClaimedDelivery,
}

/// What one claim hands the sender.
#[derive(Debug, Default)]
pub struct Claim {
    pub deliveries: Vec<ClaimedDelivery>,
    /// Notifications that became final while claiming (their last deliveries had expired or
    /// their devices were invalidated).
    pub finished: Vec<FinishedNotification>,
    /// Deliveries the claim ended without a send: expired, or to a device already
    /// invalidated. Each is an outcome to log and count like one APNs decided.
    pub ended: Vec<EndedDelivery>,
    /// Fewer than asked were due: the earliest moment a queued delivery or a scheduled fan-out
    /// becomes due, if any. `None` after a full claim (there may be more due right now).
    pub idle_until: Option<Option<i64>>,
}

/// How long the write connection waits for another process's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Switches the database to WAL. On a new file that takes an exclusive lock SQLite does not
/// wait for (the busy handler is not called), so when another process opens the same new
/// database at that moment (the daemon's first start and a `pushdrop status`), this tries
/// again for as long as any other lock would be waited for.
fn set_wal(conn: &Connection) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return Ok(r?),
        }
    }
}

/// Opens the write connection: WAL, foreign keys off (we keep our own invariants and want
/// bulk speed), a uuid function for set-based fan-out, then migrations.
pub(super) fn open_write_connection(path: &Path) -> Result<Connection, StoreError> {
    disable_memstatus();
    let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Every statement the writer runs stays prepared: rusqlite's default of 16 is fewer than
    // the ingest, claim, result and fan-out paths use together, and an evicted statement is
    // re-parsed on its next use.
    conn.set_prepared_statement_cache_capacity(64);
    // 8 KiB pages for a new database (an existing one keeps its size): shallower B-trees
    // make a file's commit some 6% cheaper (`scripts/bench-ingest`, `benches/store_cycle`),
    // and single-file commits stay as fast. Only possible before the file's first write.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    set_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", SMALL_CACHE_KIB)?;
    // The bundled SQLite enforces foreign keys by default: two more B-tree lookups for every
    // delivery written, and a scan of all deliveries for every device the purge deletes.
    conn.pragma_update(None, "foreign_keys", false)?;
    conn.create_scalar_function("pd_uuid", 0, FunctionFlags::SQLITE_UTF8, |_| {
        Ok(new_apns_id())
    })?;
    rusqlite::vtab::array::load_module(&conn)?;
    super::schema::migrate(&mut conn)?;
    Ok(conn)
}

/// Turns off SQLite's allocation statistics, which take a process-wide mutex around every
/// `malloc` and `free` inside SQLite (several per row written); pushdrop never reads them.
/// Only possible before SQLite initialises, i.e. before the process's first connection: the
/// daemon opens its store first. Later calls change nothing.
fn disable_memstatus() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config with an int argument, as SQLITE_CONFIG_MEMSTATUS documents;
        // after initialisation it only returns SQLITE_MISUSE.
        let _ = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
    });
}

/// A `to.tokens` list as the JSON array `target` stores. Tokens were checked to be hex at
/// parse time, so nothing needs escaping: written directly, which costs a fraction of
/// serde's escaping writer on a file's path (3% of the writer's time for single-token
/// notifications).
fn token_list_json(tokens: &[String]) -> String {
    if tokens
        .iter()
        .any(|t| !t.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return serde_json::to_string(tokens).unwrap_or_default();
    }
    let mut out = String::with_capacity(2 + tokens.iter().map(|t| t.len() + 3).sum::<usize>());
    out.push('[');
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(t);
        out.push('"');
    }
    out.push(']');
    out
}

/// A random (version 4) UUID from the thread's CSPRNG: `Uuid::new_v4` asks the kernel
/// (a `getrandom` system call) for every id, and ingest and fan-out make one per row.
fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// A fresh `apns-id`: a UUID in the upper-case form Apple uses.
pub fn new_apns_id() -> String {
    random_uuid()
        .hyphenated()
        .encode_upper(&mut uuid::Uuid::encode_buffer())
        .to_string()
}

/// The writer thread's loop; ends when every [`super::Store`] handle is dropped.
/// The writer thread's loop. `sends`: a sender claims from this store (the daemon), so
/// committed deliveries are worth handing over; a one-shot command's store keeps none.
pub(super) fn run(
    conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    new_work: Arc<Notify>,
    checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
    sends: bool,
) {
    let mut w = Writer {
        conn,
        notifications: HashMap::new(),
        in_flight: HashMap::new(),
        cursor: None,
        data_version: None,
        handoff: HandOffQueue {
            max: if sends { HANDOFF_MAX } else { 0 },
            ..HandOffQueue::default()
        },
        last_claim: None,
        retried_since_claim: Vec::new(),
    };
    // The baseline of `changed_elsewhere`: from here on, other processes' commits count.
    let _ = w.changed_elsewhere();
    let mut pending: Option<Command> = None;
    let mut changes = w.conn.total_changes();
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => match rx.blocking_recv() {
                Some(c) => c,
                None => break,
            },
        };
        match cmd {
            Command::Run(job) => job(&mut w),
            Command::IngestStream {
                file,
                chunks,
                reply,
            } => {
                let res = w.ingest_stream(file, chunks);
                if let Ok(o) = &res {
                    wake_if_queued(&new_work, [o]);
                }
                let _ = reply.send(res);
            }
            Command::Ingest { files, reply } => {
                let mut batch = vec![(files, reply)];
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(Command::Ingest { files, reply }) => batch.push((files, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                w.ingest_group(batch, &new_work);
            }
        }
        // Rows were written: the checkpointer copies them back in its own time (a full channel
        // means it already has a request waiting). Commands that only read (an idle sender's
        // claims and probes) leave it asleep.
        let now_changes = w.conn.total_changes();
        if now_changes != changes
            && let Some(c) = &checkpoints
        {
            let _ = c.try_send(());
        }
        changes = now_changes;
    }
}

/// The checkpointer's own connection to the database (see [`run_checkpoints`]).
pub(super) fn open_checkpoint_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Checkpoints after commits, at most every [`CHECKPOINT_EVERY`], so one checkpoint covers
/// many small commits; ends when the writer thread does. Passive checkpoints never block the
/// writer or readers; what they cannot copy yet is copied by a later one.
///
/// SQLite reuses the WAL file from its start once it is all copied, but never makes it
/// smaller: a big file's commit (some 200 MB of WAL for a 64 MiB drop) would keep that much
/// disk for good. So when a checkpoint copied everything and the WAL is over [`WAL_KEEP`],
/// the file is truncated (a `TRUNCATE` checkpoint, which then has nothing left to copy).
pub(super) fn run_checkpoints(
    conn: Connection,
    wal: std::path::PathBuf,
    requests: std::sync::mpsc::Receiver<()>,
) {
    // When a failed checkpoint was last said as a warning: a full disk fails one after
    // every commit, and the log would get a line a second for as long as it lasts.
    let mut warned = Throttle::new(SAY_LASTING_EVERY);
    while requests.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        // Requests that came in meanwhile are covered by this checkpoint.
        while requests.try_recv().is_ok() {}
        // (busy, frames in the WAL, frames copied)
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        if done.is_ok() {
            warned.reset();
        }
        match done {
            Ok((0, log, copied))
                if log == copied && std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_KEEP) =>
            {
                // A TRUNCATE checkpoint holds new writes back while it waits for readers: it
                // gets 10 ms, or it is left for a later round.
                let _ = conn.busy_timeout(std::time::Duration::from_millis(10));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                    tracing::debug!(event = "checkpoint_failed", error = %e, "the WAL could not be truncated now; tried again after the next commit");
                }
                let _ = conn.busy_timeout(BUSY_TIMEOUT);
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(unsaid) = warned.note() {
                    tracing::warn!(event = "checkpoint_failed", error = %e, failed_since_last_line = unsaid + 1, "WAL checkpoint failed; the next commit retries it (said once a minute while it fails)");
                } else {
                    tracing::debug!(event = "checkpoint_failed", error = %e, "WAL checkpoint failed again");
                }
            }
        }
    }
}

/// The WAL size the checkpointer leaves alone (see [`run_checkpoints`]): a few seconds of
/// sending's writes, which would only grow it again.
pub(super) const WAL_KEEP: u64 = if cfg!(test) {
    256 * 1024
} else {
    64 * 1024 * 1024
};

/// The least time between two WAL checkpoints of the daemon. A second, not less: while the
/// sender records results it rewrites the same pages (the queue index, the progress rows)
/// many times a second, and each checkpoint copies every page changed since the one before,
/// on the cores the sending needs. At 100 ms the end-to-end benchmark ran some 10% slower
/// (`scripts/bench-send`, three alternating pairs: ratio to h2load 0.40/0.40/0.44 against
/// 0.49/0.43/0.47). The WAL grows by at most a second of writes between checkpoints.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(1000);

type IngestReply = oneshot::Sender<Result<Vec<IngestOutcome>, StoreError>>;

/// Wakes the sender when a commit queued notifications (it may be sleeping until then).
fn wake_if_queued<'a>(new_work: &Notify, outcomes: impl IntoIterator<Item = &'a IngestOutcome>) {
    if outcomes.into_iter().any(|o| o.notifications_queued > 0) {
        new_work.notify_one();
    }
}

impl Writer {
    /// Commits a group of callers' files in one durable transaction; if that fails, each caller
    /// is tried alone so one bad batch cannot fail the others.
    fn ingest_group(&mut self, batch: Vec<(Vec<IngestFile>, IngestReply)>, new_work: &Notify) {
        let all: Vec<&Vec<IngestFile>> = batch.iter().map(|(f, _)| f).collect();
        match self.ingest_durably(&all) {
            Ok(outcomes) => {
                wake_if_queued(new_work, outcomes.iter().flatten());
                for ((_, reply), out) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(_) if batch.len() > 1 => {
                for (files, reply) in batch {
                    let res = self.ingest_durably(&[&files]).map(|mut v| v.remove(0));
                    if let Ok(outcomes) = &res {
                        wake_if_queued(new_work, outcomes);
                    }
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                if let Some((_, reply)) = batch.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    fn ingest_durably(
        &mut self,
        groups: &[&Vec<IngestFile>],
    ) -> Result<Vec<Vec<IngestOutcome>>, StoreError> {
        let room = self.handoff.room();
        let (out, handoffs) = self.durably(|conn, earliest_due| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(groups.len());
            let mut handoffs = HandOffs::new(room);
            for files in groups {
                let mut outs = Vec::with_capacity(files.len());
                for f in files.iter() {
                    let (o, h) = ingest_file(&tx, f, earliest_due, handoffs.room)?;
                    outs.push(o);
                    handoffs.absorb(h);
                }
                out.push(outs);
            }
            tx.commit()?;
            Ok((out, handoffs))
        })?;
        self.take_handoffs(handoffs);
        Ok(out)
    }

    /// Holds the deliveries a commit handed over for the next claims.
    fn take_handoffs(&mut self, h: HandOffs) {
        // A registration in the same transaction may have changed a device after its
        // delivery was handed over (its environment): those go through the claim, which reads
        // the device as it is now.
        if !h.registered {
            for d in h.deliveries {
                self.in_flight
                    .insert(d.delivery.delivery_id, d.notification_id);
                self.handoff.deliveries.push_back(d);
            }
        }
        // Waiting hand-offs to a device unregistered since go back to the queue, whose claim
        // ends them unsent.
        for device_id in h.unregistered {
            self.handoff.device_gone(device_id);
        }
    }

    /// Runs a file commit as durability asks: `synchronous = FULL` and the big page cache
    /// for its transaction, both back to the everyday settings afterwards. `body` notes the
    /// earliest due time of the deliveries it queued; once it succeeded, a claim walk that is
    /// past that time starts again from the beginning.
    fn durably<R>(
        &mut self,
        body: impl FnOnce(&mut Connection, &mut Option<i64>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn
            .pragma_update(None, "cache_size", INGEST_CACHE_KIB)?;
        let mut earliest_due = None;
        let result = body(&mut self.conn, &mut earliest_due);
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.conn
            .pragma_update(None, "cache_size", SMALL_CACHE_KIB)?;
        if let (Ok(_), Some(due)) = (&result, earliest_due) {
            queued_at(&mut self.cursor, due);
        }
        result
    }

    /// See [`super::Store::begin_ingest`]: the transaction stays open while the chunks come
    /// in, and is rolled back unless the parser sends `Commit`.
    fn ingest_stream(
        &mut self,
        mut file: IngestFile,
        chunks: std::sync::mpsc::Receiver<StreamMsg>,
    ) -> Result<IngestOutcome, StoreError> {
        let room = self.handoff.room();
        let (out, handoffs) = self.durably(|conn, earliest_due| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut fw = FileWriter::new(&tx, &file, room)?;
            loop {
                match chunks.recv() {
                    Ok(StreamMsg::Records(records)) => fw.add_all(&records, earliest_due)?,
                    Ok(StreamMsg::Commit { sha256 }) => {
                        file.sha256 = sha256;
                        break;
                    }
                    // Rejected, still being written, or the parser gave up: nothing stays.
                    Err(_) => return Err(StoreError::Abandoned),
                }
            }
            // The content hash only arrives with `Commit`, so a file committed before a
            // crash is recognised only now; that rare case costs one rolled-back transaction.
            if already_committed(&tx, &file)? {
                *earliest_due = None;
                return Ok((committed_before(), HandOffs::new(0)));
            }
            let out = fw.finish(&file)?;
            tx.commit()?;
            Ok(out)
        })?;
        self.take_handoffs(handoffs);
        Ok(out)
    }

    /// See [`super::Store::fan_out_due`].
    pub fn fan_out_due(
        &mut self,
        now: i64,
        max_rows: usize,
    ) -> Result<(usize, Vec<FinishedNotification>), StoreError> {
        let due: Vec<(i64, String, String, String, i64, i64)> = {
            let mut st = self.conn.prepare_cached(
                "SELECT id, app, target_kind, target, send_at, fanout_cursor FROM notifications
                 WHERE fanned_out = 0 AND send_at <= ?1 ORDER BY send_at, id LIMIT 64",
            )?;
            st.query_map([now], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut made = 0usize;
        let mut finished = Vec::new();
        for (id, app, kind, target, send_at, mut cursor) in due {
            // Deliveries this notification's fan-out made, chunks before this call included
            // (a broadcast resumes at its cursor, which is past devices it reached).
            let mut reached = cursor > 0;
            loop {
                if made >= max_rows {
                    return Ok((made, finished));
                }
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                let ts = now_ms();
                let due_at = send_at;
                queued_at(&mut self.cursor, due_at);
                self.handoff.queued(due_at);
                // A device that already has this notification's delivery keeps it.
                let (inserted, next_cursor) = match kind.as_str() {
                    "users" => {
                        let mut st = tx.prepare_cached(insert_many!(
                            "deliveries (notification_id, device_id, due_at, apns_id, updated_at)
                             SELECT ?1, id, ?2, pd_uuid(), ?3 FROM devices
                             WHERE app = ?4 AND active = 1
                               AND user IN (SELECT value FROM json_each(?5))"
                        ))?;
                        let n = st.execute(params![id, due_at, ts, app, target])?;
                        // Users without an active device: a misspelt user id must not pass
                        // unseen (a receipt of zeros says little about why).
                        let nobody: Vec<String> = tx
                            .prepare_cached(
                                // One index probe (devices_user) per listed user, not a
                                // list of every user of the app.
                                "SELECT j.value FROM json_each(?2) j WHERE NOT EXISTS
                                   (SELECT 1 FROM devices
                                    WHERE app = ?1 AND user = j.value AND active = 1)",
                            )?
                            .query_map(params![app, target], |r| r.get(0))?
                            .collect::<Result<_, _>>()?;
                        if !nobody.is_empty() {
                            unreached(&tx, id, &app, &nobody, ts)?;
                        }
                        (n, None)
                    }
                    _ => {
                        let last: Option<i64> = tx
                            .prepare_cached(
                                "SELECT max(id) FROM (SELECT id FROM devices
                                 WHERE app = ?1 AND active = 1 AND id > ?2 ORDER BY id LIMIT ?3)",
                            )?
                            .query_row(params![app, cursor, FANOUT_CHUNK as i64], |r| r.get(0))?;
                        match last {
                            None => (0, None),
                            Some(last) => {
                                let mut st = tx.prepare_cached(insert_many!(
                                    "deliveries (notification_id, device_id, due_at, apns_id, updated_at)
                                     SELECT ?1, id, ?2, pd_uuid(), ?3 FROM devices
                                     WHERE app = ?4 AND active = 1 AND id > ?5 AND id <= ?6"
                                ))?;
                                let n = st.execute(params![id, due_at, ts, app, cursor, last])?;
                                (n, Some(last))
                            }
                        }
                    }
                };
                made += inserted;
                reached |= inserted > 0;
                if kind == "all" && next_cursor.is_none() && !reached {
                    unreached(&tx, id, &app, &[], ts)?;
                }
                // The new deliveries are pending; the fan-out's own pending item goes once
                // it has made them all.
                let mut finals = Finals::default();
                match next_cursor {
                    Some(c) => {
                        tx.prepare_cached(
                            "UPDATE notifications SET fanout_cursor = ?2 WHERE id = ?1",
                        )?
                        .execute(params![id, c])?;
                        finals.add_n(id, -(inserted as i64));
                        finals.settle(&tx, ts)?;
                        tx.commit()?;
                        cursor = c;
                    }
                    None => {
                        tx.prepare_cached("UPDATE notifications SET fanned_out = 1 WHERE id = ?1")?
                            .execute(params![id])?;
                        finals.add_n(id, 1 - inserted as i64);
                        let done = finals.settle(&tx, ts)?;
                        let done = named(&tx, &mut self.notifications, done)?;
                        tx.commit()?;
                        finished.extend(done);
                        break;
                    }
                }
            }
        }
        Ok((made, finished))
    }

    /// See [`super::Store::claim_due`].
    pub fn claim_due(&mut self, now: i64, limit: usize) -> Result<Claim, StoreError> {
        self.clock_went_back(now)?;
        let mut taken = Vec::new();
        let claim = self.claim(now, limit, &mut taken);
        if claim.is_err() {
            // Nothing reached the sender: the deliveries stay claimable.
            for id in taken {
                self.in_flight.remove(&id);
            }
        }
        claim
    }

    /// Due times are wall-clock times (they outlive the process), and a back-off or a pause's
    /// hold is set as now plus a wait. When the system clock steps backwards (a manual fix,
    /// NTP stepping a VM restored from a snapshot), those waits would last as long again as
    /// the step: an hour's step held due retries for an hour, with APNs up. So a claim that
    /// finds the wall clock behind where the monotonic clock says it should be moves the
    /// waits set before the step back by as much (never before now). Due times of `send_at`
    /// are what the dropper asked for, on the wall clock: they stay.
    fn clock_went_back(&mut self, now: i64) -> Result<(), StoreError> {
        let seen = self.last_claim.replace((now, std::time::Instant::now()));
        let since = std::mem::take(&mut self.retried_since_claim);
        let Some((then, at)) = seen else {
            return Ok(());
        };
        let expected = then.saturating_add(at.elapsed().as_millis() as i64);
        let back = expected - now;
        if back < CLOCK_STEP_MIN_MS {
            return Ok(());
        }
        // The waits set before the last claim were set before the step (one found then was
        // dealt with then); one set since may be at the stepped clock, and keeps its wait.
        let moved = self.conn.execute(
            "UPDATE deliveries SET due_at = max(?1, due_at - ?2)
             WHERE state = 0 AND due_at > ?1
               AND due_at <> (SELECT send_at FROM notifications n
                              WHERE n.id = deliveries.notification_id)
               AND id NOT IN rarray(?3)",
            params![now, back, std::rc::Rc::new(since)],
        )?;
        tracing::warn!(
            event = "clock_stepped_back",
            back_ms = back,
            deliveries = moved as u64,
            "the system clock went back; the retries and holds set before are moved back by as much"
        );
        queued_at(&mut self.cursor, now);
        self.handoff.queued(now);
        Ok(())
    }

    fn claim(&mut self, now: i64, limit: usize, taken: &mut Vec<i64>) -> Result<Claim, StoreError> {
        let mut claim = Claim::default();
        // Hand-offs first, unless a delivery went back to the queue due before now since they
        // were handed over (a retry): the queue's walk, in due order, goes first then.
        let queue_first = self.handoff.queue_first(now);
        if !queue_first {
            self.handoff.take(
                now,
                limit,
                &mut claim.deliveries,
                taken,
                &mut self.in_flight,
                &mut self.notifications,
            );
            if claim.deliveries.len() >= limit {
                // There may be more due right now: no idle time.
                return Ok(claim);
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Walk the queue from the cursor; if that comes back short and did not start at the
        // beginning, walk once more from the beginning: a delivery can become due behind the
        // cursor (a clock step backwards, a requeue by another process).
        let mut from = self.cursor.take();
        let mut next_due;
        // Ended on the way (expired, invalidated, unregistered): the walk skips them.
        let mut ending = HashSet::new();
        loop {
            let started_at_beginning = from.is_none();
            next_due = None;
            let (lo_due, lo_id) = from.unwrap_or((i64::MIN, i64::MIN));
            let mut st = tx.prepare_cached(
                "SELECT d.id, d.notification_id, d.attempts, d.apns_id, d.due_at,
                        v.id, v.token, v.environment, v.invalidated_at, v.invalid_reason,
                        n.app, n.ext_id, n.payload, n.push_type, n.priority, n.topic,
                        n.collapse_id, n.expiration, v.unregistered_at, n.created_at
                 FROM deliveries d
                 JOIN devices v ON v.id = d.device_id
                 JOIN notifications n ON n.id = d.notification_id
                 WHERE d.state = 0 AND d.due_at >= ?1 AND (d.due_at > ?1 OR d.id > ?2)
                 ORDER BY d.due_at, d.id",
            )?;
            let mut rows = st.query(params![lo_due, lo_id])?;
            let mut last = None;
            let mut full = false;
            while let Some(r) = rows.next()? {
                let did: i64 = r.get(0)?;
                let due: i64 = r.get(4)?;
                if due > now {
                    next_due = Some(due);
                    break;
                }
                last = Some((due, did));
                if self.in_flight.contains_key(&did) || ending.contains(&did) {
                    continue;
                }
                let nid: i64 = r.get(1)?;
                // The notification's shared data is read once and shared by its deliveries
                // (a broadcast's million deliveries carry one payload).
                let info = match self.notifications.get(&nid) {
                    Some(i) => i.clone(),
                    None => {
                        let push_type = r.get_ref(13)?.as_str().unwrap_or_default();
                        let payload: String = r.get(12)?;
                        let i = Arc::new(NotificationInfo {
                            app: r.get(10)?,
                            ext_id: r.get(11)?,
                            payload: bytes::Bytes::from(payload),
                            push_type: PushType::parse(push_type).unwrap_or(PushType::Alert),
                            priority: r.get(14)?,
                            topic: r.get(15)?,
                            collapse_id: r.get(16)?,
                            expiration: r.get(17)?,
                        });
                        if self.notifications.len() >= NOTIFICATION_CACHE {
                            self.notifications.clear();
                        }
                        self.notifications.insert(nid, i.clone());
                        i
                    }
                };
                let env = r.get_ref(7)?.as_str().unwrap_or_default();
                let delivery = super::ClaimedDelivery {
                    delivery_id: did,
                    attempts: r.get(2)?,
                    apns_id: r.get(3)?,
                    device: DeviceInfo {
                        id: r.get(5)?,
                        token: r.get(6)?,
                        environment: Environment::parse(env).unwrap_or_default(),
                    },
                    notification: info,
                };
                // Ended here without a request (finished below, once the walk is done).
                let end = if delivery
                    .notification
                    .expiration
                    .is_some_and(|e| e > 0 && e * 1000 <= now)
                {
                    Some((DeliveryState::Expired, EXPIRED_UNSENT.to_string()))
                } else if r.get::<_, Option<i64>>(8)?.is_some() {
                    let why: Option<String> = r.get(9)?;
                    Some((
                        DeliveryState::InvalidToken,
                        why.unwrap_or_else(|| "Unregistered".into()),
                    ))
                } else if r
                    .get::<_, Option<i64>>(18)?
                    .is_some_and(|at| at >= r.get::<_, i64>(19).unwrap_or(i64::MAX))
                {
                    // Unregistered after the notification was made (a later notification
                    // naming the token itself is sent: the dropper asked for it since).
                    Some((DeliveryState::Failed, UNREGISTERED_UNSENT.to_string()))
                } else {
                    None
                };
                match end {
                    Some((state, reason)) => {
                        ending.insert(did);
                        claim.ended.push(EndedDelivery {
                            delivery,
                            state,
                            reason,
                        });
                    }
                    None => {
                        self.in_flight.insert(did, nid);
                        taken.push(did);
                        claim.deliveries.push(delivery);
                    }
                }
                if claim.deliveries.len() + claim.ended.len() >= limit {
                    full = true;
                    break;
                }
            }
            if full {
                self.cursor = last;
                break;
            }
            if started_at_beginning {
                break;
            }
            from = None;
        }
        if queue_first {
            if self.cursor.is_none() {
                // Everything due in the queue is claimed.
                self.handoff.queued_behind = None;
            }
            let room = limit.saturating_sub(claim.ended.len());
            self.handoff.take(
                now,
                room,
                &mut claim.deliveries,
                taken,
                &mut self.in_flight,
                &mut self.notifications,
            );
        }
        let mut finals = Finals::default();
        for e in &claim.ended {
            finish(
                &tx,
                e.delivery.delivery_id,
                (e.state, false),
                None,
                Some(&e.reason),
                now,
                &mut finals,
            )?;
        }
        let done = finals.settle(&tx, now)?;
        claim.finished = named(&tx, &mut self.notifications, done)?;
        if self.cursor.is_none() && self.handoff.deliveries.is_empty() {
            let fan_out: Option<i64> = tx
                .prepare_cached("SELECT min(send_at) FROM notifications WHERE fanned_out = 0")?
                .query_row([], |r| r.get(0))?;
            claim.idle_until = Some(match (next_due, fan_out) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            });
        }
        tx.commit()?;
        Ok(claim)
    }

    /// See [`super::Store::release`].
    pub fn release(&mut self, delivery_ids: &[i64]) {
        for id in delivery_ids {
            self.in_flight.remove(id);
        }
    }

    /// See [`super::Store::record_results`].
    pub fn record_results(
        &mut self,
        results: Vec<DeliveryResult>,
    ) -> Result<Vec<FinishedNotification>, RecordFailed> {
        match self.record(&results) {
            Ok(finished) => {
                for r in &results {
                    self.in_flight.remove(&r.delivery_id);
                }
                Ok(finished)
            }
            // Still claimed, so not sent again while their results wait to be written.
            Err(error) => Err(RecordFailed { error, results }),
        }
    }

    fn record(
        &mut self,
        results: &[DeliveryResult],
    ) -> Result<Vec<FinishedNotification>, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut finals = Finals::default();
        let mut sent = tx.prepare_cached(mark_sent_sql!("id = ?1"))?;
        // `Sent` results for deliveries in flight (nearly all results), the only result for
        // their delivery in this batch, are written by runs of consecutive ids; the others
        // one by one, in order, below.
        let mut once: HashMap<i64, u32> = HashMap::with_capacity(results.len());
        for r in results {
            *once.entry(r.delivery_id).or_default() += 1;
        }
        let mut by_run = Vec::new();
        let mut rest = Vec::new();
        for r in results {
            if matches!(r.kind, ResultKind::Sent { apns_id: None })
                && once.get(&r.delivery_id) == Some(&1)
                && self.in_flight.contains_key(&r.delivery_id)
            {
                by_run.push(r.delivery_id);
            } else {
                rest.push(r);
            }
        }
        by_run.sort_unstable();
        for run in runs(&by_run) {
            if run.len() < MIN_RUN || !mark_run_sent(&tx, run, now, &self.in_flight, &mut finals)? {
                for &id in run {
                    mark_sent(&tx, &mut sent, id, now, &self.in_flight, &mut finals)?;
                }
            }
        }
        // Every statement below only changes a queued delivery (`state = 0`), so a stray
        // second result for a delivery that is already final changes nothing, and the
        // notification's pending count only drops for real transitions.
        for r in rest {
            match &r.kind {
                ResultKind::Sent { apns_id: None } => {
                    mark_sent(
                        &tx,
                        &mut sent,
                        r.delivery_id,
                        now,
                        &self.in_flight,
                        &mut finals,
                    )?;
                }
                // APNs named the push differently from the id it was sent with: keep Apple's.
                ResultKind::Sent {
                    apns_id: Some(apns_id),
                } => {
                    let nid = tx
                        .prepare_cached(
                            "UPDATE deliveries SET state = 1, attempts = attempts + 1,
                             last_status = 200, last_reason = NULL, updated_at = ?2,
                             finished_at = ?2, apns_id = ?3
                             WHERE id = ?1 AND state = 0 RETURNING notification_id",
                        )?
                        .query_row(params![r.delivery_id, now, apns_id], |r| r.get::<_, i64>(0))
                        .optional()?;
                    finals.add(nid);
                }
                &ResultKind::Retry {
                    due_at_ms,
                    status,
                    ref reason,
                    count_attempt,
                } => {
                    tx.prepare_cached(
                        "UPDATE deliveries SET attempts = attempts + ?2, due_at = ?3,
                         last_status = ?4, last_reason = ?5, updated_at = ?6, held = 1 - ?2
                         WHERE id = ?1 AND state = 0",
                    )?
                    .execute(params![
                        r.delivery_id,
                        count_attempt as i64,
                        due_at_ms,
                        status,
                        reason,
                        now
                    ])?;
                    queued_at(&mut self.cursor, due_at_ms);
                    self.handoff.queued(due_at_ms);
                    self.retried_since_claim
                        .push(rusqlite::types::Value::Integer(r.delivery_id));
                }
                &ResultKind::Failed { status, ref reason } => {
                    let nid = tx
                        .prepare_cached(
                            "UPDATE deliveries SET state = 2, attempts = attempts + 1,
                             last_status = ?2, last_reason = ?3, updated_at = ?4, finished_at = ?4
                             WHERE id = ?1 AND state = 0 RETURNING notification_id",
                        )?
                        .query_row(params![r.delivery_id, status, reason, now], |r| {
                            r.get::<_, i64>(0)
                        })
                        .optional()?;
                    finals.add(nid);
                }
                &ResultKind::Expired {
                    status,
                    ref reason,
                    count_attempt,
                } => {
                    finish(
                        &tx,
                        r.delivery_id,
                        (DeliveryState::Expired, count_attempt),
                        status,
                        Some(reason),
                        now,
                        &mut finals,
                    )?;
                }
                &ResultKind::InvalidToken {
                    status,
                    ref reason,
                    invalidated_at_ms,
                } => {
                    let row = tx
                        .prepare_cached(
                            "UPDATE deliveries SET state = 4, attempts = attempts + 1,
                             last_status = ?2, last_reason = ?3, updated_at = ?4, finished_at = ?4
                             WHERE id = ?1 AND state = 0 RETURNING notification_id, device_id",
                        )?
                        .query_row(params![r.delivery_id, status, reason, now], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                        })
                        .optional()?;
                    let Some((nid, device_id)) = row else {
                        continue;
                    };
                    finals.add(Some(nid));
                    // A registration after Apple's timestamp wins: the app got a fresh token
                    // report for this device since, so it is alive.
                    let invalidated = tx
                        .prepare_cached(
                            "UPDATE devices SET invalidated_at = ?2, invalid_reason = ?3, active = 0,
                             updated_at = ?4
                             WHERE id = ?1
                               AND invalidated_at IS NULL
                               AND (registered_at IS NULL OR registered_at <= ?2)",
                        )?
                        .execute(params![
                            device_id,
                            invalidated_at_ms,
                            // Apple's reason alone (the sender's "device kept" is not the
                            // device's reason).
                            apple_reason(reason),
                            now
                        ])?;
                    if invalidated > 0 || !kept(&tx, r.delivery_id, device_id, reason)? {
                        self.handoff.device_gone(device_id);
                    }
                }
            }
        }
        drop(sent);
        let done = finals.settle(&tx, now)?;
        let finished = named(&tx, &mut self.notifications, done)?;
        tx.commit()?;
        Ok(finished)
    }

    /// See [`super::Store::registered_after`].
    pub fn registered_after(&mut self, device_id: i64, at_ms: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT 1 FROM devices
                 WHERE id = ?1 AND invalidated_at IS NULL AND registered_at > ?2",
            )?
            .exists(params![device_id, at_ms])?)
    }

    /// See [`super::Store::committed_versions_blocking`].
    pub fn committed_versions(
        &mut self,
        names: &[String],
    ) -> Result<Vec<super::CommittedVersion>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT size, sha256, ino, committed_at FROM committed_files WHERE name = ?1
             ORDER BY committed_at",
        )?;
        let mut found = Vec::new();
        for name in names {
            let rows = st.query_map(params![name], |r| {
                Ok(super::CommittedVersion {
                    name: name.clone(),
                    size: r.get::<_, i64>(0)? as u64,
                    sha256: r.get(1)?,
                    ino: r.get::<_, i64>(2)? as u64,
                    committed_at: r.get(3)?,
                })
            })?;
            for v in rows {
                found.push(v?);
            }
        }
        Ok(found)
    }

    /// See [`super::Store::committed_by_inode_blocking`].
    pub fn committed_by_inode(
        &mut self,
        ino: u64,
    ) -> Result<Vec<super::CommittedVersion>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT name, size, sha256, committed_at FROM committed_files WHERE ino = ?1
             ORDER BY committed_at",
        )?;
        let rows = st.query_map(params![ino as i64], |r| {
            Ok(super::CommittedVersion {
                name: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                sha256: r.get(2)?,
                ino,
                committed_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// See [`super::Store::committed_name_blocking`].
    pub fn committed_name(
        &mut self,
        sha256: &str,
        ino: i64,
        mtime_ns: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT name FROM committed_files
                 WHERE sha256 = ?1 AND ino = ?2 AND mtime_ns = ?3 LIMIT 1",
            )?
            .query_row(params![sha256, ino, mtime_ns], |r| r.get(0))
            .optional()?)
    }

    /// See [`super::Store::retry_failed_blocking`].
    pub fn retry_failed(
        &mut self,
        id: Option<&str>,
        app: Option<&str>,
    ) -> Result<super::Requeued, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The one notification named, by its row id, and its app.
        let (only, app_of_id) = match id {
            None => (None, None),
            Some(id) => {
                let (nid, app) = super::query::notification_row_id(&tx, id, app)?
                    .ok_or_else(|| StoreError::UnknownNotification(id.to_string()))?;
                (Some(nid), Some(app))
            }
        };
        // All failed deliveries of one app (`--failed --app`): its notifications, by id.
        let of_app = if only.is_none() { app } else { None };
        // The notifications first (their pending counts grow by their failed deliveries),
        // then the deliveries themselves.
        tx.execute(
            "UPDATE notification_progress SET finished_at = NULL,
                pending = pending + (SELECT count(*) FROM deliveries
                                     WHERE notification_id = notification_progress.id AND state = 2)
             WHERE id IN (SELECT notification_id FROM deliveries WHERE state = 2)
               AND (?1 IS NULL OR id = ?1)
               AND (?2 IS NULL OR id IN (SELECT id FROM notifications WHERE app = ?2))",
            params![only, of_app],
        )?;
        let n = tx.execute(
            "UPDATE deliveries SET state = 0, attempts = 0, due_at = ?2, finished_at = NULL,
             updated_at = ?2, requeued_at = ?2
             WHERE state = 2 AND (?1 IS NULL OR notification_id = ?1)
               AND (?3 IS NULL OR notification_id IN (SELECT id FROM notifications WHERE app = ?3))",
            params![only, now, of_app],
        )?;
        tx.commit()?;
        queued_at(&mut self.cursor, now);
        self.handoff.queued(now);
        Ok(super::Requeued {
            deliveries: n,
            app: app_of_id.or_else(|| app.map(str::to_owned)),
        })
    }

    /// See [`super::Store::purge_blocking`]. Goes by notification: a finished notification's
    /// deliveries leave with it once it is past retention, so `show` and receipts never see
    /// half a notification.
    pub fn purge(
        &mut self,
        cutoff: i64,
        still_in_inbox: Option<&[String]>,
    ) -> Result<PurgeCounts, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // A notification with a single delivery has no progress row (schema 5): it finished
        // when its delivery did, and goes with it.
        let mut notifications = tx.execute(
            "DELETE FROM notifications WHERE id IN
                (SELECT d.notification_id FROM deliveries d
                 WHERE d.state <> 0 AND d.finished_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM notification_progress p
                                   WHERE p.id = d.notification_id))",
            [cutoff],
        )?;
        let mut deliveries = tx.execute(
            "DELETE FROM deliveries WHERE state <> 0 AND finished_at < ?1
               AND NOT EXISTS (SELECT 1 FROM notification_progress p
                               WHERE p.id = deliveries.notification_id)",
            [cutoff],
        )?;
        deliveries += tx.execute(
            "DELETE FROM deliveries WHERE notification_id IN
                (SELECT id FROM notification_progress WHERE finished_at < ?1)",
            [cutoff],
        )?;
        notifications += tx.execute(
            "DELETE FROM notifications
             WHERE id IN (SELECT id FROM notification_progress WHERE finished_at < ?1)
               AND NOT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = notifications.id)",
            [cutoff],
        )?;
        tx.execute(
            "DELETE FROM notification_progress WHERE finished_at < ?1
             AND NOT EXISTS (SELECT 1 FROM notifications WHERE id = notification_progress.id)",
            [cutoff],
        )?;
        // Invalid devices, and tokens only ever named in `to.tokens` (no device record
        // registered them) once no delivery is left for them: their row only served to
        // remember an invalidation, and naming the token again makes a new one. Without
        // this, a dropper that sends to tokens (which Apple changes over time) grew the
        // registry for good.
        let devices = tx.execute(
            "DELETE FROM devices WHERE updated_at < ?1
             AND ((invalidated_at IS NOT NULL AND active = 0)
                  OR (registered = 0 AND invalidated_at IS NULL AND unregistered_at IS NULL))
             AND id NOT IN (SELECT device_id FROM deliveries)",
            [cutoff],
        )?;
        // A committed file still in the inbox (its move failed: a full disk, a folder it may
        // not write) keeps its record however old: without it, the next look would take the
        // file as new and queue its notifications again.
        let committed_files = match still_in_inbox.map(serde_json::to_string) {
            Some(Ok(keep)) => tx.execute(
                "DELETE FROM committed_files WHERE committed_at < ?1
                   AND name NOT IN (SELECT value FROM json_each(?2))",
                params![cutoff, keep],
            )?,
            // The inbox could not be listed: no record goes this time.
            _ => 0,
        };
        tx.execute(
            "DELETE FROM events WHERE id <= (SELECT max(id) - 1000 FROM events)",
            [],
        )?;
        tx.commit()?;
        self.notifications.clear();
        Ok(PurgeCounts {
            deliveries,
            notifications,
            devices,
            committed_files,
        })
    }

    /// See [`super::Store::note_event`].
    pub fn note_event(
        &mut self,
        kind: &str,
        app: Option<&str>,
        message: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO events (at, kind, app, message) VALUES (?1, ?2, ?3, ?4)",
            params![now_ms(), kind, app, message],
        )?;
        Ok(())
    }

    /// See [`super::Store::release_held_blocking`].
    pub fn release_held(&mut self, now: i64) -> Result<HeldReleased, StoreError> {
        let bursts = self
            .conn
            .prepare(
                "SELECT DISTINCT n.app, v.environment FROM deliveries d
                 JOIN notifications n ON n.id = d.notification_id
                 JOIN devices v ON v.id = d.device_id
                 WHERE d.state = 0 AND d.held = 1 AND d.last_status = 400
                   AND d.last_reason = 'BadDeviceToken'",
            )?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .filter_map(|r| match r {
                Ok((app, env)) => Environment::parse(&env).map(|e| Ok((app, e))),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = self.conn.execute(
            "UPDATE deliveries SET due_at = ?1, held = 0
             WHERE state = 0 AND due_at > ?1 AND held = 1",
            [now],
        )?;
        if n > 0 {
            queued_at(&mut self.cursor, now);
            self.handoff.queued(now);
        }
        Ok(HeldReleased {
            deliveries: n,
            bursts,
        })
    }

    /// See [`super::Store::changed_elsewhere`]. A connection's `data_version` moves only
    /// with commits of *other* connections, so the daemon's own writes do not count.
    pub fn changed_elsewhere(&mut self) -> Result<bool, StoreError> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        Ok(self.data_version.replace(v).is_some_and(|old| old != v))
    }

    /// See [`super::Store::check_writable`].
    pub fn heartbeat(&mut self) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?1)",
            [now_ms()],
        )?;
        Ok(())
    }

    /// See [`super::Store::backup_blocking`].
    pub fn backup(&mut self, dest: &Path) -> Result<(), StoreError> {
        // SQLite takes the path as text: a lossy one would write somewhere else.
        let Some(text) = dest.to_str() else {
            return Err(StoreError::Open {
                path: dest.to_path_buf(),
                source: rusqlite::Error::InvalidPath(dest.to_path_buf()),
            });
        };
        self.conn.execute("VACUUM INTO ?1", [text])?;
        Ok(())
    }
}

/// Deliveries were queued (or requeued) due at `due_at`: if that is behind the claim cursor,
/// the next claim starts from the beginning, so the queue is still served in due order (the
/// walk skips what is in flight, at most `max_in_flight` rows).
fn queued_at(cursor: &mut Option<(i64, i64)>, due_at: i64) {
    if cursor.is_some_and(|(due, _)| due_at <= due) {
        *cursor = None;
    }
}

/// Ends a queued delivery in a final state other than `sent`. `status` is the HTTP status of
/// the answer that ended it, `None` when none did (ended unsent, or no answer at all): an
/// earlier attempt's status is not left beside this reason, which it would misdescribe.
fn finish(
    tx: &Transaction<'_>,
    delivery_id: i64,
    (state, attempted): (DeliveryState, bool),
    status: Option<u16>,
    reason: Option<&str>,
    now: i64,
    finals: &mut Finals,
) -> Result<(), StoreError> {
    let nid = tx
        .prepare_cached(
            "UPDATE deliveries SET state = ?2, last_status = ?3,
             last_reason = ?4, updated_at = ?5, finished_at = ?5, attempts = attempts + ?6
             WHERE id = ?1 AND state = 0
             RETURNING notification_id",
        )?
        .query_row(
            params![
                delivery_id,
                state.code(),
                status,
                reason,
                now,
                attempted as i64
            ],
            |r| r.get::<_, i64>(0),
        )
        .optional()?;
    finals.add(nid);
    Ok(())
}

/// Records one `sent` result (runs of them go through [`mark_run_sent`]). A delivery in
/// flight has its notification known from the claim, so the common case is an `UPDATE`
/// without `RETURNING` (which SQLite buffers in a temporary B-tree made for each execution);
/// the number of rows it changed says whether the delivery was still queued.
fn mark_sent(
    tx: &Transaction<'_>,
    st: &mut rusqlite::Statement<'_>,
    delivery_id: i64,
    now: i64,
    in_flight: &HashMap<i64, i64>,
    finals: &mut Finals,
) -> Result<(), StoreError> {
    if let Some(&nid) = in_flight.get(&delivery_id) {
        st.raw_bind_parameter(1, delivery_id)?;
        st.raw_bind_parameter(2, now)?;
        let changed = st.raw_execute()?;
        finals.add_n(nid, changed as i64);
    } else {
        let nid = tx
            .prepare_cached(concat!(
                mark_sent_sql!("id = ?1"),
                " RETURNING notification_id"
            ))?
            .query_row(params![delivery_id, now], |r| r.get::<_, i64>(0))
            .optional()?;
        finals.add(nid);
    }
    Ok(())
}

/// Runs shorter than this are written row by row: a run costs two statements.
const MIN_RUN: usize = 4;

/// Splits sorted ids into runs of consecutive ids.
fn runs(ids: &[i64]) -> impl Iterator<Item = &[i64]> {
    ids.chunk_by(|a, b| *b == a + 1)
}

/// Marks the deliveries `run` (consecutive ids, all in flight) sent by one statement, if all
/// of them are still queued; returns whether it did. Each statement has a fixed cost well
/// above that of a row (cursors opened and closed, the statement's end), and a run of ids is
/// a range, which SQLite walks and changes in one pass (`id IN (…)` would go through two
/// temporary B-trees). A delivery in flight is nearly always queued; if one is not (ended by
/// another process), the caller writes the run row by row instead.
fn mark_run_sent(
    tx: &Transaction<'_>,
    run: &[i64],
    now: i64,
    in_flight: &HashMap<i64, i64>,
    finals: &mut Finals,
) -> Result<bool, StoreError> {
    let (lo, hi) = (run[0], run[run.len() - 1]);
    let queued: i64 = tx
        .prepare_cached("SELECT count(*) FROM deliveries WHERE id BETWEEN ?1 AND ?2 AND state = 0")?
        .query_row([lo, hi], |r| r.get(0))?;
    if queued != run.len() as i64 {
        return Ok(false);
    }
    let changed = tx
        .prepare_cached(mark_sent_sql!("id BETWEEN ?1 AND ?3"))?
        .execute([lo, now, hi])?;
    if changed != run.len() {
        return Err(StoreError::Inconsistent(
            "a run of queued deliveries changed in the middle of a transaction",
        ));
    }
    for id in run {
        if let Some(&nid) = in_flight.get(id) {
            finals.add_n(nid, 1);
        }
    }
    Ok(true)
}

/// How many items of each notification stopped being pending in one transaction: deliveries
/// that became final (positive), or deliveries a fan-out made (negative).
#[derive(Default)]
struct Finals(HashMap<i64, i64>);

impl Finals {
    fn add(&mut self, notification_id: Option<i64>) {
        if let Some(nid) = notification_id {
            self.add_n(nid, 1);
        }
    }

    fn add_n(&mut self, notification_id: i64, k: i64) {
        *self.0.entry(notification_id).or_default() += k;
    }

    /// Lowers the notifications' pending counts and returns the ids of those that became
    /// final; the order is unspecified.
    ///
    /// A notification without a progress row has a single delivery (schema 5): it became
    /// final with that delivery, which is why it is here, and nothing is written for it.
    ///
    /// Notifications with one item less each (nearly all: one delivery per notification)
    /// are lowered by one statement per run of consecutive ids, as in [`mark_run_sent`];
    /// the others by one statement each (`RETURNING` would buffer its rows in a temporary
    /// B-tree, dearer than a statement): the first ends the notification if this brings its
    /// count to zero, and only when it changed nothing does the second lower it; when that
    /// changes nothing either, there is no row.
    fn settle(&self, tx: &Transaction<'_>, now: i64) -> Result<Vec<i64>, StoreError> {
        // Nearly every claim settles nothing.
        if self.0.is_empty() {
            return Ok(Vec::new());
        }
        let mut finished = Vec::new();
        let mut ones: Vec<i64> = Vec::new();
        let mut others: Vec<(i64, i64)> = Vec::new();
        for (&nid, &k) in &self.0 {
            if k == 1 {
                ones.push(nid);
            } else {
                others.push((nid, k));
            }
        }
        ones.sort_unstable();
        // Every run, however short, goes by range: two statements, where notifications without
        // a progress row would each cost two one by one.
        for run in runs(&ones) {
            let (lo, hi) = (run[0], run[run.len() - 1]);
            // Every notification in the range is in the run: each has one item less.
            tx.prepare_cached(
                "UPDATE notification_progress SET pending = pending - 1,
                    finished_at = CASE WHEN finished_at IS NULL AND pending <= 1
                                       THEN ?3 ELSE finished_at END
                 WHERE id BETWEEN ?1 AND ?2",
            )?
            .execute([lo, hi, now])?;
            // Those it ended: their count reached zero now (a notification ended before has
            // no queued item left to end again); and those without a row, which ended with
            // their one delivery. A run of those alone finds no row here at all.
            let mut st = tx.prepare_cached(
                "SELECT id, pending = 0 AND finished_at = ?3 FROM notification_progress
                 WHERE id BETWEEN ?1 AND ?2 ORDER BY id",
            )?;
            let mut rows = st.query([lo, hi, now])?;
            let mut next = lo;
            while let Some(r) = rows.next()? {
                let (id, ended): (i64, bool) = (r.get(0)?, r.get(1)?);
                finished.extend(next..id);
                if ended {
                    finished.push(id);
                }
                next = id + 1;
            }
            finished.extend(next..=hi);
        }
        if others.is_empty() {
            return Ok(finished);
        }
        let mut finish = tx.prepare_cached(
            "UPDATE notification_progress SET pending = pending - ?2, finished_at = ?3
             WHERE id = ?1 AND pending - ?2 <= 0 AND finished_at IS NULL",
        )?;
        let mut lower = tx.prepare_cached(
            "UPDATE notification_progress SET pending = pending - ?2 WHERE id = ?1",
        )?;
        finish.raw_bind_parameter(3, now)?;
        for (nid, k) in others {
            finish.raw_bind_parameter(1, nid)?;
            finish.raw_bind_parameter(2, k)?;
            if finish.raw_execute()? == 1 {
                finished.push(nid);
            } else {
                lower.raw_bind_parameter(1, nid)?;
                lower.raw_bind_parameter(2, k)?;
                if lower.raw_execute()? == 0 && k > 0 {
                    finished.push(nid);
                }
            }
        }
        Ok(finished)
    }
}

/// Says (log line and an `unreached` event for `status`) that notification `id`'s fan-out
/// found no active device for the `users` listed, or, with none listed, for its app at all.
fn unreached(
    tx: &Transaction<'_>,
    id: i64,
    app: &str,
    users: &[String],
    now: i64,
) -> Result<(), StoreError> {
    let ext_id: String = tx
        .prepare_cached("SELECT ext_id FROM notifications WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let message = if users.is_empty() {
        format!("notification {ext_id}: app {app} has no active device; it reached nobody")
    } else {
        const SHOWN: usize = 10;
        // Quoted and escaped as JSON strings: a user id is the dropper's text, and in a text
        // log line it must not pass for fields (`event="delivery"`) of its own.
        let mut named: Vec<String> = users
            .iter()
            .take(SHOWN)
            .map(|u| serde_json::to_string(u).unwrap_or_default())
            .collect();
        if users.len() > SHOWN {
            named.push("…".into());
        }
        format!(
            "notification {ext_id}: no active device for user{} {} (not registered, unregistered or invalidated)",
            if users.len() == 1 { "" } else { "s" },
            named.join(", ")
        )
    };
    tracing::warn!(event = "unreached", id = %ext_id, app, "{message}");
    tx.prepare_cached(
        "INSERT INTO events (at, kind, app, message) VALUES (?1, 'unreached', ?2, ?3)",
    )?
    .execute(params![now, app, message])?;
    Ok(())
}

/// Names the notifications that became final, from the claim cache where it has them (and
/// drops them from it: nothing will be claimed for them again), else from their rows.
fn named(
    tx: &Transaction<'_>,
    cache: &mut HashMap<i64, Arc<NotificationInfo>>,
    ids: Vec<i64>,
) -> Result<Vec<FinishedNotification>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for nid in ids {
        let (app, ext_id) = match cache.remove(&nid) {
            Some(info) => (info.app.clone(), info.ext_id.clone()),
            None => {
                match tx
                    .prepare_cached("SELECT app, ext_id FROM notifications WHERE id = ?1")?
                    .query_row([nid], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
                {
                    Some(names) => names,
                    None => continue,
                }
            }
        };
        out.push(FinishedNotification {
            notification_id: nid,
            app,
            ext_id,
        });
    }
    Ok(out)
}

/// Writes one file's records inside the group's transaction.
fn ingest_file(
    tx: &Transaction<'_>,
    f: &IngestFile,
    earliest_due: &mut Option<i64>,
    handoff_room: usize,
) -> Result<(IngestOutcome, HandOffs), StoreError> {
    if already_committed(tx, f)? {
        return Ok((committed_before(), HandOffs::new(0)));
    }
    let mut fw = FileWriter::new(tx, f, handoff_room)?;
    fw.add_all(&f.records, earliest_due)?;
    fw.finish(f)
}

/// Deliveries of a transaction to hand to the sender once it commits (see
/// [`Writer::handoff`]).
struct HandOffs {
    deliveries: Vec<HandedOff>,
    /// How many more may be added.
    room: usize,
    /// A device record registered a device in the transaction.
    registered: bool,
    /// Devices device records unregistered in the transaction.
    unregistered: Vec<i64>,
}

impl HandOffs {
    /// Delivery `id`, just written, if it was promised a hand-off.
    fn add(&mut self, id: i64, d: &mut NewDelivery) {
        if let Some((device, notification)) = d.handoff.take() {
            self.deliveries.push(HandedOff {
                notification_id: d.notification_id,
                delivery: ClaimedDelivery {
                    delivery_id: id,
                    attempts: 0,
                    // Written by `encode_upper`: ASCII.
                    apns_id: String::from_utf8_lossy(&d.apns_id).into_owned(),
                    device,
                    notification,
                },
            });
        }
    }

    fn new(room: usize) -> HandOffs {
        HandOffs {
            deliveries: Vec::new(),
            room,
            registered: false,
            unregistered: Vec::new(),
        }
    }

    /// Adds the hand-offs of the transaction's next file, which started with this `room`.
    fn absorb(&mut self, other: HandOffs) {
        self.room = other.room;
        self.registered |= other.registered;
        self.unregistered.extend(other.unregistered);
        self.deliveries.extend(other.deliveries);
    }
}

/// The outcome for a file that [`already_committed`]: nothing written, only to be moved.
fn committed_before() -> IngestOutcome {
    IngestOutcome {
        already_committed: true,
        ..IngestOutcome::default()
    }
}

/// Whether a file of this name and content was committed before (within retention): a crash
/// came between its commit and its move, or the file was put back into the inbox. SPEC 1:
/// pushdrop remembers the names and content hashes of the files it committed and never
/// ingests one twice; a copy (a new inode, a new mtime) is the same file by that rule.
fn already_committed(tx: &Transaction<'_>, f: &IngestFile) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM committed_files WHERE name = ?1 AND sha256 = ?2)",
        )?
        .query_row(params![f.name, f.sha256], |r| r.get(0))?)
}

/// Writes one file's records, in order, inside a transaction; the statements are prepared
/// once per file, not looked up in the statement cache per record.
struct FileWriter<'t> {
    tx: &'t Transaction<'t>,
    insert_notification: rusqlite::CachedStatement<'t>,
    find_device: rusqlite::CachedStatement<'t>,
    insert_token_device: rusqlite::CachedStatement<'t>,
    insert_delivery: rusqlite::CachedStatement<'t>,
    /// The batch forms of the statements above, made at the file's first batch: a file of
    /// one record (the common small drop) never needs them.
    batches: Option<Batches<'t>>,
    /// Deliveries not yet written: they go in [`DELIVERY_BATCH`] rows per statement.
    deliveries: Vec<NewDelivery>,
    /// Whether the last token named was new to the registry: then the next one is inserted
    /// first and only looked up if it exists (see [`FileWriter::resolve_device`]).
    last_token_new: bool,
    /// The shared text last bound to `insert_notification`, `find_device` and
    /// `insert_token_device`.
    bound_notification: BoundSlots,
    bound_find: BoundSlots,
    bound_device: BoundSlots,
    /// Progress rows go in together at the end of the file, one statement per pending count
    /// (nearly always one: single-token notifications), not one statement per notification.
    progress: HashMap<i64, Vec<rusqlite::types::Value>>,
    source_file: String,
    now: i64,
    written: i64,
    index: usize,
    out: IngestOutcome,
    /// Deliveries due now, for the sender once the transaction commits; `room` counts down
    /// as deliveries are promised one, before their ids are known.
    handoff: HandOffs,
}

/// The text a statement's parameters had when last bound, by parameter index, for the
/// parameters that the records of a file nearly always share (app, topic, push type,
/// environment…). Binding text copies it into SQLite, and SQLite keeps a statement's bindings
/// between executions, so these are bound again only when they change.
#[derive(Default)]
struct BoundSlots(Vec<Option<String>>);

impl BoundSlots {
    fn bind(
        &mut self,
        st: &mut rusqlite::Statement<'_>,
        index: usize,
        value: &str,
    ) -> rusqlite::Result<()> {
        if index >= self.0.len() {
            self.0.resize(index + 1, None);
        }
        let slot = &mut self.0[index];
        if slot.as_deref() != Some(value) {
            st.raw_bind_parameter(index, value)?;
            *slot = Some(value.to_owned());
        }
        Ok(())
    }
}

impl<'t> FileWriter<'t> {
    fn new(
        tx: &'t Transaction<'t>,
        f: &IngestFile,
        handoff_room: usize,
    ) -> Result<FileWriter<'t>, StoreError> {
        FileWriter {
            tx,
            insert_notification: tx.prepare_cached(
                "INSERT INTO notifications (app, ext_id, target_kind, target, payload, push_type,
                    priority, topic, collapse_id, expiration, send_at, created_at, source_file,
                    fanned_out)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (app, ext_id) DO NOTHING",
            )?,
            find_device: tx.prepare_cached(
                "SELECT id, environment, invalidated_at IS NULL FROM devices
                 WHERE app = ?1 AND token = ?2",
            )?,
            insert_token_device: tx.prepare_cached(
                "INSERT INTO devices (app, token, environment, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (app, token) DO NOTHING",
            )?,
            insert_delivery: tx.prepare_cached(
                "INSERT INTO deliveries (notification_id, device_id, due_at, apns_id, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?,
            batches: None,
            deliveries: Vec::with_capacity(DELIVERY_BATCH),
            last_token_new: false,
            bound_notification: BoundSlots::default(),
            bound_find: BoundSlots::default(),
            bound_device: BoundSlots::default(),
            progress: HashMap::new(),
            source_file: f.name.clone(),
            now: now_ms().max(INGEST_TIME_FLOOR.load(std::sync::atomic::Ordering::Relaxed)),
            written: f.written_at_ms(),
            index: 0,
            out: IngestOutcome::default(),
            handoff: HandOffs::new(handoff_room),
        }
        .with_file_constants()
    }

    /// Binds what is the same for every record of the file once: a statement keeps its
    /// bindings between executions (until it goes back to the statement cache).
    fn with_file_constants(mut self) -> Result<FileWriter<'t>, StoreError> {
        self.bind_file_constants()?;
        Ok(self)
    }

    fn bind_file_constants(&mut self) -> Result<(), StoreError> {
        let now = self.now;
        self.insert_notification.raw_bind_parameter(12, now)?;
        self.insert_notification
            .raw_bind_parameter(13, self.source_file.as_str())?;
        self.insert_token_device.raw_bind_parameter(4, now)?;
        self.insert_delivery.raw_bind_parameter(5, now)?;
        Ok(())
    }

    /// The file's next record.
    fn add(&mut self, rec: &Record, earliest_due: &mut Option<i64>) -> Result<(), StoreError> {
        let (tx, now) = (self.tx, self.now);
        let index = self.index;
        self.index += 1;
        match rec {
            Record::Device(d) => {
                self.note_app(&d.app);
                self.add_device(d)?;
            }
            Record::Notification(n) => {
                let p = PreparedNotification::new(n, now);
                // Parameters 12 (created_at) and 13 (source_file) are bound for the file.
                let st = &mut self.insert_notification;
                p.bind(st, &mut self.bound_notification, 0, 14)?;
                if st.raw_execute()? == 0 {
                    self.duplicate(index, &p);
                    return Ok(());
                }
                let nid = tx.last_insert_rowid();
                self.queue(&p, nid, earliest_due);
                let info = self.handoff_info(&p);
                for t in &p.tokens {
                    let device = self.resolve_device(&n.app, t, n.environment)?;
                    self.push_delivery(nid, device, t, p.send_at, info.as_ref())?;
                }
            }
        }
        Ok(())
    }

    /// A device record: registration (which re-activates a device invalidated before it) or
    /// removal.
    fn add_device(&mut self, d: &DeviceRecord) -> Result<(), StoreError> {
        let (tx, now) = (self.tx, self.now);
        match d.action {
            DeviceAction::Register => {
                tx.prepare_cached(
                    "INSERT INTO devices (app, token, user, environment, registered, registered_at,
                                          active, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, 1, ?6, ?6)
                     ON CONFLICT (app, token) DO UPDATE SET
                       -- A record without `user` keeps the device's, unless the device was
                       -- unregistered: registering again after that starts afresh, so a
                       -- phone signed out and registered anonymously (maybe by someone else)
                       -- is not the old user's any more.
                       user = CASE WHEN unregistered_at IS NULL THEN coalesce(excluded.user, user)
                                   ELSE excluded.user END,
                       environment = excluded.environment,
                       registered = 1,
                       registered_at = max(coalesce(registered_at, 0), excluded.registered_at),
                       unregistered_at = NULL,
                       invalid_reason = CASE WHEN invalidated_at IS NULL OR invalidated_at < excluded.registered_at
                                        THEN NULL ELSE invalid_reason END,
                       active = CASE WHEN invalidated_at IS NULL OR invalidated_at < excluded.registered_at
                                THEN 1 ELSE 0 END,
                       invalidated_at = CASE WHEN invalidated_at IS NULL OR invalidated_at < excluded.registered_at
                                        THEN NULL ELSE invalidated_at END,
                       updated_at = excluded.updated_at
                     RETURNING active",
                )?
                .query_row(
                    params![d.app, d.token, d.user, d.environment.as_str(), self.written, now],
                    |r| r.get::<_, bool>(0),
                )
                .map(|active| {
                    // Registered no later than APNs' invalidation (the file's mtime is older):
                    // the device stays invalid, which the dropper should hear of.
                    if !active {
                        let out = &mut self.out;
                        out.devices_still_invalid += 1;
                        if out.still_invalid_tokens.len() < super::LOGGED_TOKENS {
                            out.still_invalid_tokens
                                .push(crate::model::token_prefix(&d.token).to_string());
                        }
                    }
                })?;
                self.out.devices_registered += 1;
                self.handoff.registered = true;
            }
            DeviceAction::Unregister => {
                let id: Option<i64> = tx
                    .prepare_cached(
                        "UPDATE devices SET unregistered_at = ?3, active = 0, updated_at = ?3
                         WHERE app = ?1 AND token = ?2 RETURNING id",
                    )?
                    .query_row(params![d.app, d.token, now], |r| r.get(0))
                    .optional()?;
                self.handoff.unregistered.extend(id);
                self.out.devices_unregistered += 1;
                // What comes after this record (later in the file, later files) is made
                // after the removal: a notification naming the token then is sent, while one
                // made before it is not (the claim compares the two times). One millisecond
                // on keeps them apart within one transaction.
                self.now = now + 1;
                INGEST_TIME_FLOOR.fetch_max(self.now, std::sync::atomic::Ordering::Relaxed);
                self.bind_file_constants()?;
            }
        }
        Ok(())
    }

    /// The file's records, in order: runs of [`NOTIFICATION_BATCH`] notifications are written
    /// a batch at a time, everything else record by record.
    fn add_all(
        &mut self,
        records: &[Record],
        earliest_due: &mut Option<i64>,
    ) -> Result<(), StoreError> {
        let mut rest = records;
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take(NOTIFICATION_BATCH)
                .take_while(|r| matches!(r, Record::Notification(_)))
                .count();
            if run == NOTIFICATION_BATCH {
                self.add_notifications(&rest[..run], earliest_due)?;
                rest = &rest[run..];
            } else {
                self.add(first, earliest_due)?;
                rest = &rest[1..];
            }
        }
        Ok(())
    }

    /// [`NOTIFICATION_BATCH`] notification records, written by one statement for their rows,
    /// one per [`DEVICE_BATCH`] new tokens and one per [`DELIVERY_BATCH`] deliveries.
    ///
    /// SQLite gives the rows of one `INSERT` consecutive ids, one more than the largest before
    /// it, so the ids are known without reading them back. A notification whose id is taken
    /// (by an earlier file or an earlier record of the batch) is a duplicate, as record by
    /// record: the batch statement (`insert_many!`) skips it without using up an id.
    fn add_notifications(
        &mut self,
        records: &[Record],
        earliest_due: &mut Option<i64>,
    ) -> Result<(), StoreError> {
        let (tx, now) = (self.tx, self.now);
        let first_index = self.index;
        self.index += records.len();
        let prepared: Vec<PreparedNotification<'_>> = records
            .iter()
            .filter_map(|r| match r {
                Record::Notification(n) => Some(PreparedNotification::new(n, now)),
                Record::Device(_) => None,
            })
            .collect();
        let before = max_id(tx, MAX_NOTIFICATION_ID)?;
        let batches = self.batches()?;
        let (st, b) = (&mut batches.notifications, &mut batches.bound_notifications);
        for (i, p) in prepared.iter().enumerate() {
            p.bind(st, b, i * 12, i * 12 + 12)?;
        }
        let inserted = st.raw_execute()?;
        check_consecutive(tx, before, inserted)?;
        // Which rows went in: all of them, unless ids given in the file were taken.
        let mut ids: Vec<Option<i64>> = Vec::with_capacity(prepared.len());
        if inserted == prepared.len() {
            ids.extend((1..=inserted as i64).map(|k| Some(before + k)));
        } else {
            let mut find =
                tx.prepare_cached("SELECT id FROM notifications WHERE app = ?1 AND ext_id = ?2")?;
            let mut mine = HashSet::new();
            let mut next = before;
            for p in &prepared {
                // `insert_many!` skips a row for any constraint, not only the id: a row
                // skipped for something else (which the records' checks make impossible) is no
                // duplicate, and the file is not committed.
                let found: i64 = find
                    .query_row(params![p.record.app, p.ext_id.as_str()], |r| r.get(0))
                    .optional()?
                    .ok_or(StoreError::Inconsistent(
                        "a notification of the batch was not written, and its id is not taken",
                    ))?;
                // A row of this batch, and the first record of the batch with this id.
                let new = found > before && mine.insert(found);
                ids.push(if new {
                    next += 1;
                    Some(next)
                } else {
                    None
                });
            }
        }
        // The devices of the tokens named, each once, and then the deliveries.
        let named: usize = prepared.iter().map(|p| p.tokens.len()).sum();
        let mut device_of: HashMap<(&str, &str), Resolved> = HashMap::with_capacity(named);
        let mut tokens: Vec<(&str, &str, Environment)> = Vec::with_capacity(named);
        for (p, id) in prepared.iter().zip(&ids) {
            if id.is_none() {
                continue;
            }
            for t in &p.tokens {
                if let std::collections::hash_map::Entry::Vacant(e) =
                    device_of.entry((p.record.app.as_str(), t))
                {
                    e.insert((0, None));
                    tokens.push((&p.record.app, t, p.record.environment));
                }
            }
        }
        self.resolve_devices(&tokens, &mut device_of)?;
        for (i, (p, id)) in prepared.iter().zip(&ids).enumerate() {
            let Some(nid) = *id else {
                self.duplicate(first_index + i, p);
                continue;
            };
            self.queue(p, nid, earliest_due);
            let info = self.handoff_info(p);
            for t in &p.tokens {
                // Every token of the batch was resolved above.
                let device = device_of.get(&(p.record.app.as_str(), t)).copied().ok_or(
                    StoreError::Inconsistent("a token of the batch has no device"),
                )?;
                self.push_delivery(nid, device, t, p.send_at, info.as_ref())?;
            }
        }
        Ok(())
    }

    /// Bookkeeping for a notification row just written: its progress row (written at the
    /// end of the file), the earliest due time, the count. A notification with a single
    /// delivery gets no progress row (schema 5): that delivery's state is its progress.
    fn queue(&mut self, p: &PreparedNotification<'_>, nid: i64, earliest_due: &mut Option<i64>) {
        // Pending: its deliveries, or the fan-out still to come.
        let pending = if p.fanned_out {
            p.tokens.len() as i64
        } else {
            1
        };
        if !(p.fanned_out && pending == 1) {
            self.progress
                .entry(pending)
                .or_default()
                .push(rusqlite::types::Value::Integer(nid));
        }
        if !p.tokens.is_empty() {
            let due_at = p.send_at;
            *earliest_due = Some(earliest_due.map_or(due_at, |e: i64| e.min(due_at)));
        }
        self.out.notifications_queued += 1;
        if self.out.queued_ids.len() < super::LOGGED_IDS {
            self.out
                .queued_ids
                .push((p.record.app.clone(), p.ext_id.as_str().to_owned()));
        }
        self.note_app(&p.record.app);
    }

    /// Notes record `record`, a notification whose app already has its id: not queued. A
    /// file of duplicates only names its app too.
    fn duplicate(&mut self, record: usize, p: &PreparedNotification<'_>) {
        self.out.duplicates.push(super::Duplicate {
            record,
            app: p.record.app.clone(),
            id: p.ext_id.as_str().to_string(),
        });
        self.note_app(&p.record.app);
    }

    /// Remembers the app of a record for the outcome (files name one app, or a few).
    fn note_app(&mut self, app: &str) {
        if !self.out.apps.iter().any(|a| a == app) {
            self.out.apps.push(app.to_owned());
        }
    }

    /// The device row of a token named in `to.tokens`, made for a token not seen before (so
    /// that an invalidation is remembered).
    fn resolve_device(
        &mut self,
        app: &str,
        token: &str,
        environment: Environment,
    ) -> Result<Resolved, StoreError> {
        // A known token costs one index lookup, a new one its insert; finding out which it is
        // costs a second descent of the token index. Files tend to name either tokens the
        // registry knows (regular senders) or a run of new ones (a first import), so each
        // token is treated like the one before it: after a new one, the insert goes first (it
        // fails on a known token, which is then looked up); after a known one, the lookup goes
        // first. All writes go through this thread, so nobody can race a token in between.
        if self.last_token_new && self.insert_device(app, token, environment.as_str())? == 1 {
            return Ok((self.tx.last_insert_rowid(), Some(environment)));
        }
        match self.find_device(app, token)? {
            Some(found) => {
                self.last_token_new = false;
                Ok(found)
            }
            None => {
                self.insert_device(app, token, environment.as_str())?;
                self.last_token_new = true;
                Ok((self.tx.last_insert_rowid(), Some(environment)))
            }
        }
    }

    /// The device rows of `tokens` (app, token, environment; each once) into `device_of`.
    /// While tokens come new, [`DEVICE_BATCH`] of them go in by one statement; otherwise as
    /// [`FileWriter::resolve_device`] does.
    fn resolve_devices<'a>(
        &mut self,
        tokens: &[(&'a str, &'a str, Environment)],
        device_of: &mut HashMap<(&'a str, &'a str), Resolved>,
    ) -> Result<(), StoreError> {
        let mut rest = tokens;
        while !rest.is_empty() {
            if self.last_token_new && rest.len() >= DEVICE_BATCH {
                let (chunk, tail) = rest.split_at(DEVICE_BATCH);
                rest = tail;
                let before = max_id(self.tx, MAX_DEVICE_ID)?;
                let batches = self.batches()?;
                let (st, b) = (&mut batches.token_devices, &mut batches.bound_devices);
                for (i, &(app, token, environment)) in chunk.iter().enumerate() {
                    bind_token_device(st, b, i * 3, app, token, environment.as_str())?;
                }
                let inserted = st.raw_execute()?;
                check_consecutive(self.tx, before, inserted)?;
                if inserted == chunk.len() {
                    for (k, &(app, token, environment)) in chunk.iter().enumerate() {
                        device_of.insert((app, token), (before + 1 + k as i64, Some(environment)));
                    }
                    continue;
                }
                // Some were known: every token of the chunk has a row now.
                self.last_token_new = false;
                for (app, token, _) in chunk {
                    let id = self
                        .find_device(app, token)?
                        .ok_or(StoreError::Inconsistent(
                            "a token inserted or known has no device row",
                        ))?;
                    device_of.insert((app, token), id);
                }
            } else {
                let (app, token, environment) = rest[0];
                rest = &rest[1..];
                let id = self.resolve_device(app, token, environment)?;
                device_of.insert((app, token), id);
            }
        }
        Ok(())
    }

    fn find_device(&mut self, app: &str, token: &str) -> Result<Option<Resolved>, StoreError> {
        let (st, b) = (&mut self.find_device, &mut self.bound_find);
        b.bind(st, 1, app)?;
        st.raw_bind_parameter(2, token)?;
        Ok(match st.raw_query().next()? {
            Some(r) => {
                // An invalidated device's deliveries go through the claim, which ends them.
                let valid: bool = r.get(2)?;
                let environment = r.get_ref(1)?.as_str().ok().and_then(Environment::parse);
                Some((r.get(0)?, environment.filter(|_| valid)))
            }
            None => None,
        })
    }

    /// The data a send of `p` needs, when its deliveries can be handed to the sender at
    /// commit: due now, not expired, and room left.
    fn handoff_info(&self, p: &PreparedNotification<'_>) -> Option<Arc<NotificationInfo>> {
        let n = p.record;
        if self.handoff.room == 0
            || self.handoff.registered
            || p.send_at > self.now
            || n.expiration.is_some_and(|e| e * 1000 <= self.now)
        {
            return None;
        }
        Some(Arc::new(NotificationInfo {
            app: n.app.clone(),
            ext_id: p.ext_id.as_str().to_owned(),
            payload: bytes::Bytes::from(n.payload.clone()),
            push_type: n.push_type,
            priority: n.priority,
            topic: n.topic.clone(),
            collapse_id: n.collapse_id.clone(),
            expiration: n.expiration,
        }))
    }

    /// A delivery of notification `nid` to a device; written a batch at a time. With `info`
    /// (see [`FileWriter::handoff_info`]) and a valid device, it is also handed to the sender
    /// once the transaction commits.
    fn push_delivery(
        &mut self,
        nid: i64,
        (device_id, environment): Resolved,
        token: &str,
        due_at: i64,
        info: Option<&Arc<NotificationInfo>>,
    ) -> Result<(), StoreError> {
        let mut apns_id = [0u8; 36];
        random_uuid().hyphenated().encode_upper(&mut apns_id);
        let handoff = match (info, environment) {
            (Some(info), Some(environment)) if self.handoff.room > 0 => {
                self.handoff.room -= 1;
                Some((
                    DeviceInfo {
                        id: device_id,
                        token: token.to_owned(),
                        environment,
                    },
                    info.clone(),
                ))
            }
            _ => None,
        };
        self.deliveries.push(NewDelivery {
            notification_id: nid,
            device_id,
            due_at,
            apns_id,
            handoff,
        });
        if self.deliveries.len() == DELIVERY_BATCH {
            self.flush_deliveries()?;
        }
        Ok(())
    }

    /// The batch statements, prepared (and their values shared by the file bound) on first use.
    fn batches(&mut self) -> Result<&mut Batches<'t>, StoreError> {
        if self.batches.is_none() {
            let tx = self.tx;
            let mut b = Batches {
                notifications: tx.prepare_cached(&BATCH_INSERT_NOTIFICATIONS)?,
                token_devices: tx.prepare_cached(&BATCH_INSERT_TOKEN_DEVICES)?,
                deliveries: tx.prepare_cached(&BATCH_INSERT_DELIVERIES)?,
                bound_notifications: BoundSlots::default(),
                bound_devices: BoundSlots::default(),
            };
            let now = self.now;
            b.notifications
                .raw_bind_parameter(NOTIFICATION_BATCH * 12 + 1, now)?;
            b.notifications
                .raw_bind_parameter(NOTIFICATION_BATCH * 12 + 2, self.source_file.as_str())?;
            b.token_devices
                .raw_bind_parameter(DEVICE_BATCH * 3 + 1, now)?;
            b.deliveries
                .raw_bind_parameter(DELIVERY_BATCH * 4 + 1, now)?;
            self.batches = Some(b);
        }
        self.batches.as_mut().ok_or(StoreError::Inconsistent(
            "the batch statements were not prepared",
        ))
    }

    /// Writes the deliveries gathered so far: a full batch by one statement, a shorter one
    /// (the file's last) row by row.
    fn flush_deliveries(&mut self) -> Result<(), StoreError> {
        let tx = self.tx;
        let mut deliveries = std::mem::take(&mut self.deliveries);
        if deliveries.len() == DELIVERY_BATCH {
            // The ids of the rows are known only from the largest before them.
            let before = if deliveries.iter().any(|d| d.handoff.is_some()) {
                Some(max_id(tx, MAX_DELIVERY_ID)?)
            } else {
                None
            };
            let st = &mut self.batches()?.deliveries;
            for (i, d) in deliveries.iter().enumerate() {
                d.bind(st, i * 4)?;
            }
            // The last parameter (updated_at) is bound for the file. `insert_many!` would
            // skip a delivery silently; none can conflict (a new notification's tokens, each
            // once).
            if st.raw_execute()? != DELIVERY_BATCH {
                return Err(StoreError::Inconsistent(
                    "a delivery of the batch was not written",
                ));
            }
            if let Some(before) = before {
                check_consecutive(tx, before, DELIVERY_BATCH)?;
                for (k, d) in deliveries.iter_mut().enumerate() {
                    self.handoff.add(before + 1 + k as i64, d);
                }
            }
        } else {
            // Parameter 5 (updated_at) is bound for the file.
            let st = &mut self.insert_delivery;
            for d in deliveries.iter_mut() {
                d.bind(st, 0)?;
                st.raw_execute()?;
                self.handoff.add(tx.last_insert_rowid(), d);
            }
        }
        deliveries.clear();
        self.deliveries = deliveries;
        Ok(())
    }

    /// Inserts a device row for a token named in `to.tokens`, unless the token has one;
    /// returns the rows inserted.
    fn insert_device(
        &mut self,
        app: &str,
        token: &str,
        environment: &str,
    ) -> Result<usize, StoreError> {
        // Parameter 4 (created_at, updated_at) is bound for the file.
        let st = &mut self.insert_token_device;
        bind_token_device(st, &mut self.bound_device, 0, app, token, environment)?;
        Ok(st.raw_execute()?)
    }

    /// Writes what goes in at the end of the file and what identifies the file.
    fn finish(mut self, f: &IngestFile) -> Result<(IngestOutcome, HandOffs), StoreError> {
        self.flush_deliveries()?;
        let (tx, now) = (self.tx, self.now);
        for (pending, ids) in self.progress {
            let want = ids.len();
            let written = tx
                .prepare_cached(insert_many!(
                    "notification_progress (id, pending, finished_at)
                     SELECT value, ?2, CASE WHEN ?2 <= 0 THEN ?3 END FROM rarray(?1)"
                ))?
                .execute(params![std::rc::Rc::new(ids), pending, now])?;
            // Each is a notification this file just wrote: none has a row yet.
            if written != want {
                return Err(StoreError::Inconsistent(
                    "a notification written by this file already had a progress row",
                ));
            }
        }
        tx.prepare_cached(
            "INSERT OR IGNORE INTO committed_files (name, sha256, size, ino, mtime_ns, committed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            f.name,
            f.sha256,
            f.size as i64,
            f.ino as i64,
            f.mtime_ns,
            now
        ])?;
        Ok((self.out, self.handoff))
    }
}

/// [`FileWriter`]'s batch statements, with the shared text each last had bound.
struct Batches<'t> {
    notifications: rusqlite::CachedStatement<'t>,
    token_devices: rusqlite::CachedStatement<'t>,
    deliveries: rusqlite::CachedStatement<'t>,
    bound_notifications: BoundSlots,
    bound_devices: BoundSlots,
}

/// A notification record with what its row needs beyond the record itself.
struct PreparedNotification<'r> {
    record: &'r NotificationRecord,
    ext_id: ExtId<'r>,
    /// `to` as stored: the tokens or users as a JSON array, empty for `all`.
    target: String,
    /// Whether its deliveries are made here (named tokens) rather than by a fan-out.
    fanned_out: bool,
    send_at: i64,
    /// The tokens named, each once.
    tokens: Vec<&'r str>,
}

/// A notification's id: the file's, or one assigned here.
enum ExtId<'r> {
    Given(&'r str),
    Assigned([u8; 36]),
}

impl ExtId<'_> {
    fn as_str(&self) -> &str {
        match self {
            ExtId::Given(id) => id,
            // Written by `encode_lower`: ASCII.
            ExtId::Assigned(buf) => std::str::from_utf8(buf).unwrap_or_default(),
        }
    }
}

impl<'r> PreparedNotification<'r> {
    fn new(n: &'r NotificationRecord, now: i64) -> PreparedNotification<'r> {
        let ext_id = match &n.id {
            Some(id) => ExtId::Given(id),
            None => {
                let mut buf = [0u8; 36];
                time_ordered_uuid().hyphenated().encode_lower(&mut buf);
                ExtId::Assigned(buf)
            }
        };
        let (target, fanned_out) = match &n.target {
            Target::Tokens(t) => (token_list_json(t), true),
            Target::Users(u) => (serde_json::to_string(u).unwrap_or_default(), false),
            Target::All => (String::new(), false),
        };
        // A token named twice is one delivery.
        let tokens = match &n.target {
            Target::Tokens(t) if t.len() == 1 => vec![t[0].as_str()],
            Target::Tokens(t) => {
                let mut seen = HashSet::new();
                t.iter()
                    .map(String::as_str)
                    .filter(|t| seen.insert(*t))
                    .collect()
            }
            _ => Vec::new(),
        };
        PreparedNotification {
            record: n,
            ext_id,
            target,
            fanned_out,
            // One whose expiration comes first is never sent: it comes due (and ends
            // `expired`) at its expiration, not years later at its `send_at`.
            send_at: match (n.send_at_ms.unwrap_or(now), n.expiration) {
                (at, Some(e)) if e > 0 => at.min(e.saturating_mul(1000)),
                (at, _) => at,
            },
            tokens,
        }
    }

    /// Binds the notification's row to parameters `base + 1 ..= base + 11` (app, ext_id,
    /// target kind, target, payload, push type, priority, topic, collapse id, expiration,
    /// send_at) and `fanned_out_at`, the same for the one-row statement and each row of the
    /// batch one; the text a file's records share goes through `shared`.
    fn bind(
        &self,
        st: &mut rusqlite::Statement<'_>,
        shared: &mut BoundSlots,
        base: usize,
        fanned_out_at: usize,
    ) -> rusqlite::Result<()> {
        let n = self.record;
        shared.bind(st, base + 1, &n.app)?;
        st.raw_bind_parameter(base + 2, self.ext_id.as_str())?;
        shared.bind(st, base + 3, n.target.kind())?;
        st.raw_bind_parameter(base + 4, self.target.as_str())?;
        st.raw_bind_parameter(base + 5, n.payload.as_str())?;
        shared.bind(st, base + 6, n.push_type.as_str())?;
        st.raw_bind_parameter(base + 7, n.priority)?;
        shared.bind(st, base + 8, &n.topic)?;
        st.raw_bind_parameter(base + 9, n.collapse_id.as_deref())?;
        st.raw_bind_parameter(base + 10, n.expiration)?;
        st.raw_bind_parameter(base + 11, self.send_at)?;
        st.raw_bind_parameter(fanned_out_at, self.fanned_out as i64)
    }
}

/// Binds a token-only device (app, token, environment) to parameters `base + 1 ..= base + 3`
/// of the one-row or the batch insert.
fn bind_token_device(
    st: &mut rusqlite::Statement<'_>,
    shared: &mut BoundSlots,
    base: usize,
    app: &str,
    token: &str,
    environment: &str,
) -> rusqlite::Result<()> {
    shared.bind(st, base + 1, app)?;
    st.raw_bind_parameter(base + 2, token)?;
    shared.bind(st, base + 3, environment)
}

/// The largest row id of a table (0 when empty), by its query:
/// [`MAX_NOTIFICATION_ID`] or [`MAX_DEVICE_ID`].
fn max_id(tx: &Transaction<'_>, query: &str) -> Result<i64, StoreError> {
    Ok(tx.prepare_cached(query)?.query_row([], |r| r.get(0))?)
}

const MAX_NOTIFICATION_ID: &str = "SELECT coalesce(max(id), 0) FROM notifications";
const MAX_DEVICE_ID: &str = "SELECT coalesce(max(id), 0) FROM devices";
const MAX_DELIVERY_ID: &str = "SELECT coalesce(max(id), 0) FROM deliveries";

/// A device resolved at ingest: its row id, and its environment unless it is invalidated
/// (then its deliveries are not handed to the sender at commit).
type Resolved = (i64, Option<Environment>);

/// After an `INSERT` of several rows into a table whose largest id was `before`: SQLite
/// numbered the `inserted` rows `before + 1 ..= before + inserted`, as it does unless the
/// largest id ever reaches `i64::MAX`. Batch inserts rely on it.
fn check_consecutive(tx: &Transaction<'_>, before: i64, inserted: usize) -> Result<(), StoreError> {
    if inserted > 0 && tx.last_insert_rowid() != before + inserted as i64 {
        return Err(StoreError::Inconsistent(
            "new rows were not numbered one above the largest id (has an id reached i64::MAX?)",
        ));
    }
    Ok(())
}

/// The earliest time the next file's records may be given: one past the latest device
/// removal (see [`FileWriter::add_device`]), so that a file committed in the same
/// millisecond as a removal is still after it. (One writer thread per process.)
static INGEST_TIME_FLOOR: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Notifications written by one statement during an ingest (see [`DELIVERY_BATCH`]).
const NOTIFICATION_BATCH: usize = 64;

/// New token-only devices written by one statement during an ingest.
const DEVICE_BATCH: usize = 64;

/// `INSERT` of [`NOTIFICATION_BATCH`] notifications: twelve parameters per row, then
/// `created_at` and `source_file`.
static BATCH_INSERT_NOTIFICATIONS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(batch_insert_notifications_sql);
/// `INSERT` of [`DEVICE_BATCH`] token-only devices.
static BATCH_INSERT_TOKEN_DEVICES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(batch_insert_token_devices_sql);
/// What a delivery ended `invalid_token` for a device that registered again after APNs'
/// timestamp says after Apple's reason: the device stays active, so a dropper reading the
/// receipt must not drop the token from its own registry.
pub const DEVICE_KEPT: &str =
    "device kept: it registered again after the time APNs gives for the token's end";

/// The reason of a kept device's delivery: Apple's, then [`DEVICE_KEPT`].
pub fn kept_reason(apple: &str) -> String {
    format!("{apple}; {DEVICE_KEPT}")
}

/// Apple's own reason in a delivery's reason, without [`kept_reason`]'s addition.
fn apple_reason(reason: &str) -> &str {
    reason
        .strip_suffix(DEVICE_KEPT)
        .and_then(|r| r.strip_suffix("; "))
        .unwrap_or(reason)
}

/// After an `invalid_token` answer that invalidated nothing: whether the device is still
/// valid (it registered again after APNs' timestamp), in which case the delivery's reason
/// says so ([`DEVICE_KEPT`]) and a line is logged. False for a device already invalid.
fn kept(
    tx: &rusqlite::Transaction<'_>,
    delivery_id: i64,
    device_id: i64,
    reason: &str,
) -> Result<bool, StoreError> {
    let device: Option<(String, String)> = tx
        .prepare_cached("SELECT app, token FROM devices WHERE id = ?1 AND invalidated_at IS NULL")?
        .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((app, token)) = device else {
        return Ok(false);
    };
    // The sender may have said so already, in the delivery's log line (see
    // [`Writer::registered_after`]).
    if !reason.ends_with(DEVICE_KEPT) {
        tx.prepare_cached("UPDATE deliveries SET last_reason = ?2 WHERE id = ?1")?
            .execute(params![delivery_id, kept_reason(reason)])?;
    }
    tracing::info!(
        event = "device_kept",
        app = app.as_str(),
        token = crate::model::token_prefix(&token),
        reason,
        "APNs called the token dead as of a time before the device registered again: it stays active"
    );
    Ok(true)
}

/// `INSERT` of [`DELIVERY_BATCH`] deliveries.
static BATCH_INSERT_DELIVERIES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(batch_insert_deliveries_sql);

fn batch_insert_notifications_sql() -> String {
    let created = NOTIFICATION_BATCH * 12 + 1;
    let rows: Vec<String> = (0..NOTIFICATION_BATCH)
        .map(|i| {
            let p: Vec<String> = (1..=12).map(|k| format!("?{}", i * 12 + k)).collect();
            // p[11] is fanned_out; created_at and source_file are shared.
            format!(
                "({}, ?{created}, ?{}, {})",
                p[..11].join(", "),
                created + 1,
                p[11]
            )
        })
        .collect();
    format!(
        insert_many!(
            "notifications (app, ext_id, target_kind, target, payload, push_type,
                priority, topic, collapse_id, expiration, send_at, created_at, source_file,
                fanned_out)
             VALUES {}"
        ),
        rows.join(", ")
    )
}

/// `INSERT` of [`DEVICE_BATCH`] token-only devices: app, token and environment per row,
/// then `created_at` (also `updated_at`).
fn batch_insert_token_devices_sql() -> String {
    let now = DEVICE_BATCH * 3 + 1;
    let rows: Vec<String> = (0..DEVICE_BATCH)
        .map(|i| {
            let p = i * 3;
            format!("(?{}, ?{}, ?{}, ?{now}, ?{now})", p + 1, p + 2, p + 3)
        })
        .collect();
    format!(
        insert_many!("devices (app, token, environment, created_at, updated_at) VALUES {}"),
        rows.join(", ")
    )
}

/// Deliveries written by one statement during an ingest: each statement execution has a cost
/// of its own (cursors opened and closed, the statement's end), which many rows share.
const DELIVERY_BATCH: usize = 128;

/// A delivery gathered by [`FileWriter`] and not yet written.
struct NewDelivery {
    notification_id: i64,
    device_id: i64,
    due_at: i64,
    apns_id: [u8; 36],
    /// For the sender at commit (see [`Writer::handoff`]).
    handoff: Option<(DeviceInfo, Arc<NotificationInfo>)>,
}

impl NewDelivery {
    /// Binds the delivery to parameters `base + 1 ..= base + 4` (notification, device, due
    /// time, apns-id) of the one-row or the batch insert.
    fn bind(&self, st: &mut rusqlite::Statement<'_>, base: usize) -> rusqlite::Result<()> {
        st.raw_bind_parameter(base + 1, self.notification_id)?;
        st.raw_bind_parameter(base + 2, self.device_id)?;
        st.raw_bind_parameter(base + 3, self.due_at)?;
        // Written by `encode_upper`: ASCII.
        st.raw_bind_parameter(
            base + 4,
            std::str::from_utf8(&self.apns_id).unwrap_or_default(),
        )
    }
}

/// `INSERT` of [`DELIVERY_BATCH`] deliveries: four parameters per row, then `updated_at`.
fn batch_insert_deliveries_sql() -> String {
    let n = DELIVERY_BATCH * 4 + 1;
    let rows: Vec<String> = (0..DELIVERY_BATCH)
        .map(|i| {
            let p = i * 4;
            format!("(?{}, ?{}, ?{}, ?{}, ?{n})", p + 1, p + 2, p + 3, p + 4)
        })
        .collect();
    format!(
        insert_many!(
            "deliveries (notification_id, device_id, due_at, apns_id, updated_at) VALUES {}"
        ),
        rows.join(", ")
    )
}

/// A time-ordered (version 7) UUID with random bits from the thread's CSPRNG.
fn time_ordered_uuid() -> uuid::Uuid {
    let ms = now_ms().max(0) as u64;
    let mut b: [u8; 16] = rand::random();
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    uuid::Builder::from_custom_bytes(b)
        .with_version(uuid::Version::SortRand)
        .into_uuid()
}

#[cfg(test)]
mod tests {
    use super::token_list_json;

    #[test]
    fn a_token_list_is_the_json_serde_would_write() {
        let lists: [Vec<String>; 4] = [
            vec![],
            vec!["0a1b".into()],
            vec!["0a1b".into(), "ffee".into()],
            // Not hex (never after parsing): serde's escaping still applies.
            vec!["a\"b".into()],
        ];
        for list in lists {
            assert_eq!(
                token_list_json(&list),
                serde_json::to_string(&list).unwrap()
            );
        }
    }
}
