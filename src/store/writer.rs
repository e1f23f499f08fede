//! The writer thread: the one owner of the database's write connection.
//!
//! Commands arrive over a channel. Ingest commands waiting together are committed in one
//! transaction with `synchronous = FULL` (group commit: one fsync for many files); everything
//! else (claims, results, fan-out) commits with `synchronous = NORMAL`, because losing a result
//! to a power cut only means a resend, which APNs' `apns-id` makes harmless, while losing an
//! accepted file's records would break the inbox's promise.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{DeviceInfo, IngestFile, IngestOutcome, NotificationInfo, PurgeCounts, StoreError};
use crate::config::Environment;
use crate::model::{DeliveryState, DeviceAction, PushType, Record, Target, now_ms};

/// Work for the writer thread.
pub(super) type Job = Box<dyn FnOnce(&mut Writer) + Send>;

pub(super) enum Command {
    Ingest {
        files: Vec<IngestFile>,
        reply: oneshot::Sender<Result<Vec<IngestOutcome>, StoreError>>,
    },
    Run(Job),
}

/// Rows added per fan-out transaction: big enough to be fast, small enough that the sender's
/// claims are not held up behind a million-row broadcast.
const FANOUT_CHUNK: usize = 20_000;

/// Notifications whose shared data the writer keeps at hand for claims.
const NOTIFICATION_CACHE: usize = 4096;

/// A delivery handed to the sender, leased until it reports back.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub notification_id: i64,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Fixed when the delivery was created, so a resend carries the same id.
    pub apns_id: String,
    pub device: DeviceInfo,
    pub notification: Arc<NotificationInfo>,
}

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
    /// The expiration passed before it could be sent.
    Expired { reason: String },
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

/// A notification whose deliveries are all final: time for its receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedNotification {
    pub notification_id: i64,
    pub app: String,
    pub ext_id: String,
}

/// One due delivery as the claim query reads it: delivery id, notification id, attempts,
/// apns-id, device id, token, environment, invalidated_at, invalid_reason.
type DueRow = (
    i64,
    i64,
    u32,
    String,
    i64,
    String,
    String,
    Option<i64>,
    Option<String>,
);

/// The writer's state: the connection and a small cache of notification data.
pub struct Writer {
    conn: Connection,
    notifications: HashMap<i64, Arc<NotificationInfo>>,
    /// Delivery id → notification id of the deliveries this writer leased, so recording a
    /// result needs no lookup. A miss (more than [`LEASED_CACHE`] outstanding, or a lease
    /// from before a restart) falls back to the table.
    leased: HashMap<i64, i64>,
}

/// Outstanding leases remembered by the writer at most.
const LEASED_CACHE: usize = 200_000;

/// Opens the write connection: WAL, foreign keys off (we keep our own invariants and want
/// bulk speed), a uuid function for set-based fan-out, then migrations.
pub(super) fn open_write_connection(path: &Path) -> Result<Connection, StoreError> {
    disable_memstatus();
    let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement the writer runs stays prepared: rusqlite's default of 16 is fewer than
    // the ingest, claim, result and fan-out paths use together, and an evicted statement is
    // re-parsed on its next use.
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 64 MiB of page cache at most: a big file's transaction (100,000 notifications dirty some
    // 45 MiB) then commits without spilling pages to the WAL and reading them back, and the
    // daemon stays far below its RSS budget.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.create_scalar_function("pd_uuid", 0, FunctionFlags::SQLITE_UTF8, |_| {
        Ok(new_apns_id())
    })?;
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
pub(super) fn run(conn: Connection, mut rx: mpsc::Receiver<Command>, new_work: Arc<Notify>) {
    let mut w = Writer {
        conn,
        notifications: HashMap::new(),
        leased: HashMap::new(),
    };
    let mut pending: Option<Command> = None;
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
    }
}

type IngestReply = oneshot::Sender<Result<Vec<IngestOutcome>, StoreError>>;

impl Writer {
    /// Commits a group of callers' files in one durable transaction; if that fails, each caller
    /// is tried alone so one bad batch cannot fail the others.
    fn ingest_group(&mut self, batch: Vec<(Vec<IngestFile>, IngestReply)>, new_work: &Notify) {
        let all: Vec<&Vec<IngestFile>> = batch.iter().map(|(f, _)| f).collect();
        match self.ingest_durably(&all) {
            Ok(outcomes) => {
                if outcomes
                    .iter()
                    .flatten()
                    .any(|o| o.notifications_queued > 0)
                {
                    new_work.notify_one();
                }
                for ((_, reply), out) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(_) if batch.len() > 1 => {
                for (files, reply) in batch {
                    let res = self.ingest_durably(&[&files]).map(|mut v| v.remove(0));
                    if matches!(&res, Ok(o) if o.iter().any(|o| o.notifications_queued > 0)) {
                        new_work.notify_one();
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
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut out = Vec::with_capacity(groups.len());
            for files in groups {
                let mut outs = Vec::with_capacity(files.len());
                for f in files.iter() {
                    outs.push(ingest_file(&tx, f)?);
                }
                out.push(outs);
            }
            tx.commit()?;
            Ok(out)
        })();
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        result
    }

    /// See [`super::Store::release_stale_leases`].
    pub fn release_leases(&mut self) -> Result<usize, StoreError> {
        self.leased.clear();
        let n = self.conn.execute(
            "UPDATE deliveries SET leased = 0, due_at = ?1 WHERE leased = 1 AND state = 0",
            [now_ms()],
        )?;
        self.conn
            .execute("UPDATE deliveries SET leased = 0 WHERE leased = 1", [])?;
        Ok(n)
    }

    /// See [`super::Store::fan_out_due`].
    pub fn fan_out_due(&mut self, now: i64, max_rows: usize) -> Result<usize, StoreError> {
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
        for (id, app, kind, target, send_at, mut cursor) in due {
            loop {
                if made >= max_rows {
                    return Ok(made);
                }
                let tx = self.conn.transaction()?;
                let ts = now_ms();
                let (inserted, next_cursor) = match kind.as_str() {
                    "users" => {
                        let n = tx.prepare_cached(
                            "INSERT INTO deliveries (notification_id, device_id, due_at, apns_id, updated_at)
                             SELECT ?1, id, ?2, pd_uuid(), ?3 FROM devices
                             WHERE app = ?4 AND active = 1
                               AND user IN (SELECT value FROM json_each(?5))",
                        )?
                        .execute(params![id, send_at, ts, app, target])?;
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
                                let n = tx.prepare_cached(
                                    "INSERT INTO deliveries (notification_id, device_id, due_at, apns_id, updated_at)
                                     SELECT ?1, id, ?2, pd_uuid(), ?3 FROM devices
                                     WHERE app = ?4 AND active = 1 AND id > ?5 AND id <= ?6",
                                )?
                                .execute(params![id, send_at, ts, app, cursor, last])?;
                                (n, Some(last))
                            }
                        }
                    }
                };
                made += inserted;
                match next_cursor {
                    Some(c) => {
                        tx.execute(
                            "UPDATE notifications SET fanout_cursor = ?2 WHERE id = ?1",
                            params![id, c],
                        )?;
                        tx.commit()?;
                        cursor = c;
                    }
                    None => {
                        tx.execute(
                            "UPDATE notifications SET fanned_out = 1 WHERE id = ?1",
                            [id],
                        )?;
                        finish_if_done(&tx, id, ts)?;
                        tx.commit()?;
                        break;
                    }
                }
            }
        }
        Ok(made)
    }

    /// See [`super::Store::claim_due`].
    pub fn claim_due(
        &mut self,
        now: i64,
        limit: usize,
        lease_ms: i64,
    ) -> Result<(Vec<super::ClaimedDelivery>, Vec<FinishedNotification>), StoreError> {
        let tx = self.conn.transaction()?;
        let rows: Vec<DueRow> = {
            let mut st = tx.prepare_cached(
                "SELECT d.id, d.notification_id, d.attempts, d.apns_id, v.id, v.token, v.environment,
                        v.invalidated_at, v.invalid_reason
                 FROM deliveries d JOIN devices v ON v.id = d.device_id
                 WHERE d.state = 0 AND d.due_at <= ?1 ORDER BY d.due_at LIMIT ?2",
            )?;
            st.query_map(params![now, limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })?
            .collect::<Result<_, _>>()?
        };
        let mut claimed = Vec::with_capacity(rows.len());
        let mut touched = HashSet::new();
        let mut leased_ids = Vec::with_capacity(rows.len());
        let lease_end = now + lease_ms;
        for (did, nid, attempts, apns_id, dev_id, token, env, invalidated, reason) in rows {
            let info = match self.notifications.get(&nid) {
                Some(i) => i.clone(),
                None => {
                    let i = Arc::new(load_notification(&tx, nid)?);
                    if self.notifications.len() >= NOTIFICATION_CACHE {
                        self.notifications.clear();
                    }
                    self.notifications.insert(nid, i.clone());
                    i
                }
            };
            if info.expiration.is_some_and(|e| e > 0 && e * 1000 <= now) {
                finish(
                    &tx,
                    did,
                    DeliveryState::Expired,
                    None,
                    Some("expired before it could be sent"),
                    now,
                )?;
                touched.insert(nid);
                continue;
            }
            if invalidated.is_some() {
                let why = reason.unwrap_or_else(|| "Unregistered".into());
                finish(&tx, did, DeliveryState::InvalidToken, None, Some(&why), now)?;
                touched.insert(nid);
                continue;
            }
            leased_ids.push(did);
            if self.leased.len() < LEASED_CACHE {
                self.leased.insert(did, nid);
            }
            claimed.push(super::ClaimedDelivery {
                delivery_id: did,
                notification_id: nid,
                attempts,
                apns_id,
                device: DeviceInfo {
                    id: dev_id,
                    token,
                    environment: Environment::parse(&env).unwrap_or_default(),
                },
                notification: info,
            });
        }
        if !leased_ids.is_empty() {
            tx.prepare_cached(
                "UPDATE deliveries SET due_at = ?2, leased = 1
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )?
            .execute(params![json_ids(&leased_ids), lease_end])?;
        }
        let finished = finish_all_done(&tx, &touched, now)?;
        tx.commit()?;
        Ok((claimed, finished))
    }

    /// See [`super::Store::record_results`].
    pub fn record_results(
        &mut self,
        results: Vec<DeliveryResult>,
    ) -> Result<Vec<FinishedNotification>, StoreError> {
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let mut touched: HashSet<i64> = HashSet::new();
        // Prepared once per batch, not looked up in the statement cache per result.
        let mut find = tx.prepare_cached("SELECT notification_id FROM deliveries WHERE id = ?1")?;
        // `Sent` results (nearly all of them) are written by one statement per batch; a
        // result for a delivery already waiting in it writes the batch first, so results for
        // the same delivery still apply in order.
        let mut sent = SentBatch::default();
        for r in results {
            if sent.ids.contains(&r.delivery_id) {
                sent.flush(&tx, now)?;
            }
            // The notification of a delivery this writer leased is known; others (leased
            // before a restart, or results for deliveries purged since) are looked up.
            let nid = match self.leased.remove(&r.delivery_id) {
                Some(nid) => Some(nid),
                None => find
                    .query_row([r.delivery_id], |row| row.get(0))
                    .optional()?,
            };
            let Some(nid) = nid else { continue };
            match r.kind {
                ResultKind::Sent { apns_id } => {
                    sent.ids.insert(r.delivery_id);
                    sent.rows.push((r.delivery_id, apns_id));
                    touched.insert(nid);
                }
                ResultKind::Retry {
                    due_at_ms,
                    status,
                    reason,
                    count_attempt,
                } => {
                    tx.prepare_cached(
                        "UPDATE deliveries SET state = 0, attempts = attempts + ?2, leased = 0,
                         due_at = ?3, last_status = ?4, last_reason = ?5, updated_at = ?6
                         WHERE id = ?1",
                    )?
                    .execute(params![
                        r.delivery_id,
                        count_attempt as i64,
                        due_at_ms,
                        status,
                        reason,
                        now
                    ])?;
                }
                ResultKind::Failed { status, reason } => {
                    tx.prepare_cached(
                        "UPDATE deliveries SET state = 2, attempts = attempts + 1, leased = 0,
                         last_status = ?2, last_reason = ?3, updated_at = ?4, finished_at = ?4
                         WHERE id = ?1",
                    )?
                    .execute(params![r.delivery_id, status, reason, now])?;
                    touched.insert(nid);
                }
                ResultKind::Expired { reason } => {
                    finish(
                        &tx,
                        r.delivery_id,
                        DeliveryState::Expired,
                        None,
                        Some(&reason),
                        now,
                    )?;
                    touched.insert(nid);
                }
                ResultKind::InvalidToken {
                    status,
                    reason,
                    invalidated_at_ms,
                } => {
                    tx.prepare_cached(
                        "UPDATE deliveries SET state = 4, attempts = attempts + 1, leased = 0,
                         last_status = ?2, last_reason = ?3, updated_at = ?4, finished_at = ?4
                         WHERE id = ?1",
                    )?
                    .execute(params![r.delivery_id, status, reason, now])?;
                    // A registration after Apple's timestamp wins: the app got a fresh token
                    // report for this device since, so it is alive.
                    tx.prepare_cached(
                        "UPDATE devices SET invalidated_at = ?2, invalid_reason = ?3, active = 0,
                         updated_at = ?4
                         WHERE id = (SELECT device_id FROM deliveries WHERE id = ?1)
                           AND invalidated_at IS NULL
                           AND (registered_at IS NULL OR registered_at <= ?2)",
                    )?
                    .execute(params![
                        r.delivery_id,
                        invalidated_at_ms,
                        reason,
                        now
                    ])?;
                    touched.insert(nid);
                }
            }
        }
        drop(find);
        sent.flush(&tx, now)?;
        let finished = finish_all_done(&tx, &touched, now)?;
        tx.commit()?;
        Ok(finished)
    }

    /// See [`super::Store::next_due_ms`].
    pub fn next_due_ms(&mut self) -> Result<Option<i64>, StoreError> {
        let d: Option<i64> = self.conn.query_row(
            "SELECT min(due_at) FROM deliveries WHERE state = 0",
            [],
            |r| r.get(0),
        )?;
        let n: Option<i64> = self.conn.query_row(
            "SELECT min(send_at) FROM notifications WHERE fanned_out = 0",
            [],
            |r| r.get(0),
        )?;
        Ok(match (d, n) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// See [`super::Store::retry_failed_blocking`].
    pub fn retry_failed(&mut self, id: Option<&str>) -> Result<usize, StoreError> {
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let n = match id {
            Some(id) => {
                tx.execute(
                    "UPDATE notifications SET finished_at = NULL WHERE ext_id = ?1
                     AND id IN (SELECT notification_id FROM deliveries WHERE state = 2)",
                    [id],
                )?;
                tx.execute(
                    "UPDATE deliveries SET state = 0, attempts = 0, due_at = ?2, leased = 0,
                     finished_at = NULL, updated_at = ?2
                     WHERE state = 2 AND notification_id IN (SELECT id FROM notifications WHERE ext_id = ?1)",
                    params![id, now],
                )?
            }
            None => {
                tx.execute(
                    "UPDATE notifications SET finished_at = NULL
                     WHERE id IN (SELECT notification_id FROM deliveries WHERE state = 2)",
                    [],
                )?;
                tx.execute(
                    "UPDATE deliveries SET state = 0, attempts = 0, due_at = ?1, leased = 0,
                     finished_at = NULL, updated_at = ?1 WHERE state = 2",
                    [now],
                )?
            }
        };
        tx.commit()?;
        Ok(n)
    }

    /// See [`super::Store::purge_blocking`].
    pub fn purge(&mut self, cutoff: i64) -> Result<PurgeCounts, StoreError> {
        let tx = self.conn.transaction()?;
        let deliveries = tx.execute(
            "DELETE FROM deliveries WHERE state <> 0 AND finished_at < ?1",
            [cutoff],
        )?;
        let notifications = tx.execute(
            "DELETE FROM notifications WHERE finished_at IS NOT NULL AND finished_at < ?1
             AND NOT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = notifications.id)",
            [cutoff],
        )?;
        let devices = tx.execute(
            "DELETE FROM devices WHERE invalidated_at IS NOT NULL AND active = 0 AND updated_at < ?1
             AND NOT EXISTS (SELECT 1 FROM deliveries WHERE device_id = devices.id)",
            [cutoff],
        )?;
        let committed_files = tx.execute(
            "DELETE FROM committed_files WHERE committed_at < ?1",
            [cutoff],
        )?;
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
        let dest = dest.to_string_lossy().to_string();
        self.conn.execute("VACUUM INTO ?1", [dest])?;
        Ok(())
    }
}

fn finish(
    tx: &Transaction<'_>,
    delivery_id: i64,
    state: DeliveryState,
    status: Option<u16>,
    reason: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE deliveries SET state = ?2, leased = 0, last_status = coalesce(?3, last_status),
         last_reason = ?4, updated_at = ?5, finished_at = ?5 WHERE id = ?1",
    )?
    .execute(params![delivery_id, state.code(), status, reason, now])?;
    Ok(())
}

/// A JSON array of ids, for `json_each`: one statement then covers a whole batch instead of
/// one execution per row.
fn json_ids(ids: &[i64]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(ids.len() * 8 + 2);
    s.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{id}");
    }
    s.push(']');
    s
}

/// `Sent` results waiting to be written together.
#[derive(Default)]
struct SentBatch {
    ids: HashSet<i64>,
    rows: Vec<(i64, Option<String>)>,
}

impl SentBatch {
    fn flush(&mut self, tx: &Transaction<'_>, now: i64) -> Result<(), StoreError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        // `[[delivery id, apns-id or null], ...]`; serde escapes the ids Apple sent back.
        let json = serde_json::to_string(&self.rows).map_err(|e| {
            StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
        })?;
        tx.prepare_cached(
            "UPDATE deliveries SET state = 1, attempts = attempts + 1, leased = 0,
             last_status = 200, last_reason = NULL, updated_at = ?2, finished_at = ?2,
             apns_id = coalesce(j.apns_id, deliveries.apns_id)
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS apns_id FROM json_each(?1)) AS j
             WHERE deliveries.id = j.id",
        )?
        .execute(params![json, now])?;
        self.rows.clear();
        self.ids.clear();
        Ok(())
    }
}

/// [`finish_if_done`] for many notifications with one statement; the order of the returned
/// list is unspecified (it came from a `HashSet` before too).
fn finish_all_done(
    tx: &Transaction<'_>,
    nids: &HashSet<i64>,
    now: i64,
) -> Result<Vec<FinishedNotification>, StoreError> {
    if nids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = nids.iter().copied().collect();
    let mut st = tx.prepare_cached(
        "UPDATE notifications SET finished_at = ?2
         WHERE id IN (SELECT value FROM json_each(?1))
           AND fanned_out = 1 AND finished_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM deliveries
                           WHERE notification_id = notifications.id AND state = 0)
         RETURNING id, app, ext_id",
    )?;
    let rows = st.query_map(params![json_ids(&ids), now], |r| {
        Ok(FinishedNotification {
            notification_id: r.get(0)?,
            app: r.get(1)?,
            ext_id: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Marks a fully fanned-out notification with no queued delivery left as finished.
fn finish_if_done(
    tx: &Transaction<'_>,
    nid: i64,
    now: i64,
) -> Result<Option<FinishedNotification>, StoreError> {
    Finisher::new(tx)?.run(nid, now)
}

/// [`finish_if_done`] with its statements prepared once, for batches.
struct Finisher<'c> {
    check: rusqlite::CachedStatement<'c>,
    mark: rusqlite::CachedStatement<'c>,
}

impl<'c> Finisher<'c> {
    fn new(tx: &'c Transaction<'_>) -> Result<Finisher<'c>, StoreError> {
        Ok(Finisher {
            check: tx.prepare_cached(
                "SELECT app, ext_id FROM notifications n
                 WHERE id = ?1 AND fanned_out = 1 AND finished_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = ?1 AND state = 0)",
            )?,
            mark: tx.prepare_cached("UPDATE notifications SET finished_at = ?2 WHERE id = ?1")?,
        })
    }

    fn run(&mut self, nid: i64, now: i64) -> Result<Option<FinishedNotification>, StoreError> {
        let row: Option<(String, String)> = self
            .check
            .query_row([nid], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((app, ext_id)) = row else {
            return Ok(None);
        };
        self.mark.execute(params![nid, now])?;
        Ok(Some(FinishedNotification {
            notification_id: nid,
            app,
            ext_id,
        }))
    }
}

fn load_notification(tx: &Transaction<'_>, nid: i64) -> Result<NotificationInfo, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT app, ext_id, payload, push_type, priority, topic, collapse_id, expiration
             FROM notifications WHERE id = ?1",
        )?
        .query_row([nid], |r| {
            let push_type: String = r.get(3)?;
            let payload: String = r.get(2)?;
            Ok(NotificationInfo {
                app: r.get(0)?,
                ext_id: r.get(1)?,
                payload: bytes::Bytes::from(payload),
                push_type: PushType::parse(&push_type).unwrap_or(PushType::Alert),
                priority: r.get(4)?,
                topic: r.get(5)?,
                collapse_id: r.get(6)?,
                expiration: r.get(7)?,
            })
        })?)
}

/// Writes one file's records inside the group's transaction.
fn ingest_file(tx: &Transaction<'_>, f: &IngestFile) -> Result<IngestOutcome, StoreError> {
    let mut out = IngestOutcome::default();
    let seen: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM committed_files
             WHERE name = ?1 AND sha256 = ?2 AND ino = ?3 AND mtime_ns = ?4)",
        )?
        .query_row(params![f.name, f.sha256, f.ino as i64, f.mtime_ns], |r| {
            r.get(0)
        })?;
    if seen {
        out.already_committed = true;
        return Ok(out);
    }
    let now = now_ms();
    let written = f.written_at_ms();
    // Prepared once per file, not looked up in the statement cache per record.
    let mut insert_notification = tx.prepare_cached(
        "INSERT INTO notifications (app, ext_id, target_kind, target, payload, push_type,
            priority, topic, collapse_id, expiration, send_at, created_at, source_file,
            fanned_out)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (app, ext_id) DO NOTHING",
    )?;
    let mut find_device =
        tx.prepare_cached("SELECT id FROM devices WHERE app = ?1 AND token = ?2")?;
    let mut insert_token_device = tx.prepare_cached(
        "INSERT INTO devices (app, token, environment, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?4)",
    )?;
    let mut insert_delivery = tx.prepare_cached(
        "INSERT INTO deliveries (notification_id, device_id, due_at, apns_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (index, rec) in f.records.iter().enumerate() {
        match rec {
            Record::Device(d) => match d.action {
                DeviceAction::Register => {
                    tx.prepare_cached(
                        "INSERT INTO devices (app, token, user, environment, registered, registered_at,
                                              active, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, 1, ?5, 1, ?6, ?6)
                         ON CONFLICT (app, token) DO UPDATE SET
                           user = coalesce(excluded.user, user),
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
                           updated_at = excluded.updated_at",
                    )?
                    .execute(params![d.app, d.token, d.user, d.environment.as_str(), written, now])?;
                    out.devices_registered += 1;
                }
                DeviceAction::Unregister => {
                    tx.prepare_cached(
                        "UPDATE devices SET unregistered_at = ?3, active = 0, updated_at = ?3
                         WHERE app = ?1 AND token = ?2",
                    )?
                    .execute(params![d.app, d.token, now])?;
                    out.devices_unregistered += 1;
                }
            },
            Record::Notification(n) => {
                let ext_id = n.id.clone().unwrap_or_else(|| random_uuid().to_string());
                let (target_json, fanned_out) = match &n.target {
                    Target::Tokens(t) => (serde_json::to_string(t).unwrap_or_default(), true),
                    Target::Users(u) => (serde_json::to_string(u).unwrap_or_default(), false),
                    Target::All => (String::new(), false),
                };
                let send_at = n.send_at_ms.unwrap_or(now);
                let inserted = insert_notification.execute(params![
                    n.app,
                    ext_id,
                    n.target.kind(),
                    target_json,
                    n.payload,
                    n.push_type.as_str(),
                    n.priority,
                    n.topic,
                    n.collapse_id,
                    n.expiration,
                    send_at,
                    now,
                    f.name,
                    fanned_out as i64,
                ])?;
                if inserted == 0 {
                    out.duplicates.push((index, ext_id));
                    continue;
                }
                let nid = tx.last_insert_rowid();
                if let Target::Tokens(tokens) = &n.target {
                    let mut seen = HashSet::new();
                    let mut queued = 0usize;
                    for t in tokens {
                        if !seen.insert(t.as_str()) {
                            continue;
                        }
                        // Known devices are found with one index lookup; a new token gets its
                        // row (all writes go through this thread, so nobody can race it in).
                        let device_id = match find_device
                            .query_row(params![n.app, t], |r| r.get::<_, i64>(0))
                            .optional()?
                        {
                            Some(id) => id,
                            None => {
                                insert_token_device.execute(params![
                                    n.app,
                                    t,
                                    n.environment.as_str(),
                                    now
                                ])?;
                                tx.last_insert_rowid()
                            }
                        };
                        insert_delivery.execute(params![
                            nid,
                            device_id,
                            send_at,
                            new_apns_id(),
                            now
                        ])?;
                        queued += 1;
                    }
                    // With a delivery queued it cannot be finished yet.
                    if queued == 0 {
                        finish_if_done(tx, nid, now)?;
                    }
                }
                out.notifications_queued += 1;
                out.notification_ids.push(ext_id);
            }
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
    Ok(out)
}
