//! Read-only queries for `status`, `show`, `devices`, receipts and the admin endpoint. They
//! open their own connection, so they never wait behind the writer thread.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// `path` as an SQLite `file:` URI: every byte but unreserved ones and `/` percent-encoded
/// (a `?`, `#` or `%` in a folder's name would otherwise end or garble the path).
fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// A read-only connection to the database.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    /// Opens the database read-only; it must exist.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        match Reader::open_as(path, false) {
            // A database stopped cleanly has no `-wal` and `-shm` files, and a user who may
            // not write its folder cannot make them, which SQLite wants before it reads a
            // WAL database. Nothing writes it then (a daemon would have made them), so it is
            // read as it is on disk: `immutable`.
            Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.extended_code == rusqlite::ffi::SQLITE_READONLY_DIRECTORY =>
            {
                Reader::open_as(path, true)
            }
            r => r,
        }
    }

    pub(super) fn open_as(path: &Path, immutable: bool) -> Result<Reader, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let opened = if immutable {
            Connection::open_with_flags(
                format!("{}?immutable=1", file_uri(path)),
                flags | OpenFlags::SQLITE_OPEN_URI,
            )
        } else {
            Connection::open_with_flags(path, flags)
        };
        let conn = opened.map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // SQLite opens lazily: a database whose `-wal`/`-shm` files this user may not read
        // (a restore that left them the owner's only) fails at the first query, with a
        // message that names no file. Asked here, the failure names it.
        conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
            .map_err(|source| {
                if source.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen) {
                    StoreError::Unreadable {
                        path: path.to_path_buf(),
                        cause: source,
                    }
                } else {
                    StoreError::Sqlite(source)
                }
            })?;
        Ok(Reader { conn })
    }

    /// The underlying connection, for queries not wrapped here yet.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::model::{DeliveryState, now_ms};

use super::FinishedNotification;

/// The row id and app of notification `id` of `app` (of any app when `None`): `None` when
/// there is none, [`StoreError::AmbiguousId`] when no app is named and two apps use the id
/// (`show` and `retry` must not pick one of them).
pub(super) fn notification_row_id(
    conn: &rusqlite::Connection,
    id: &str,
    app: Option<&str>,
) -> Result<Option<(i64, String)>, StoreError> {
    let found: Vec<(i64, String)> = conn
        .prepare_cached(
            "SELECT id, app FROM notifications
             WHERE ext_id = ?1 AND (?2 IS NULL OR app = ?2) ORDER BY app",
        )?
        .query_map(params![id, app], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => Err(StoreError::AmbiguousId {
            id: id.to_string(),
            apps: many
                .iter()
                .map(|(_, a)| a.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `pushdrop status` and `/status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    /// Deliveries by state, all apps together.
    pub totals: BTreeMap<&'static str, i64>,
    /// Deliveries by app and state.
    pub deliveries: BTreeMap<String, BTreeMap<&'static str, i64>>,
    /// Deliveries still queued, all apps together.
    pub queued: i64,
    /// Seconds the oldest queued delivery has been waiting since its notification was due (0
    /// when none): back-offs and pauses count, a `send_at` still ahead does not.
    pub oldest_queued_age_s: f64,
    /// Queued deliveries not due yet: a `send_at` ahead, a retry's back-off, a paused app.
    pub queued_later: i64,
    /// Notifications waiting for their `send_at` or still fanning out (broadcasts and
    /// `users` targets, whose deliveries are made at fan-out).
    pub scheduled_notifications: i64,
    /// Devices by app: active, invalid, unregistered.
    pub devices: BTreeMap<String, DeviceCounts>,
    /// Invalidated devices, all apps together.
    pub invalid_devices: i64,
    /// Apps and environments paused now, as the daemon last said (its `paused` event with
    /// no `resumed` after it), oldest first.
    pub paused: Vec<EventRow>,
    /// The latest problems (rejections, pauses, credential errors), newest first.
    pub recent_errors: Vec<EventRow>,
    /// Whether a daemon holds the database (see [`super::daemon_state`]); `null` when this
    /// system cannot tell.
    pub daemon: Option<DaemonState>,
    /// Drop files in the inbox folder now (see [`InboxState`]).
    pub inbox: Option<InboxState>,
    /// Writes the daemon's database refuses now (a drop file's commit, a batch of delivery
    /// results), with the error: in `/status` only, the daemon's own knowledge (the database
    /// cannot record them); `null` elsewhere.
    pub write_errors: Option<Vec<String>>,
}

/// The drop files still in the inbox folder: a file waiting there for minutes means no
/// daemon takes files, or one cannot move them out (a `processed_dir` that takes no files),
/// which the queue's figures do not show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboxState {
    pub dir: String,
    /// Entries with a drop name (`*.json`, `*.jsonl`, not dotfiles) that are not folders:
    /// regular files, and the symlinks and FIFOs the daemon will reject. `null` when the
    /// folder cannot be read (`error` says why).
    pub waiting_files: Option<u64>,
    /// Seconds since the oldest of them was last changed (0 when none).
    pub oldest_waiting_s: Option<f64>,
    /// Why the folder cannot be read (missing, not a folder, no permission).
    pub error: Option<String>,
    /// Files the daemon has handled but could not move out, and retries: only the running
    /// daemon knows them (`/status`), so `null` in `pushdrop status`.
    pub stuck_files: Option<i64>,
}

/// Whether a daemon runs on the database.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DaemonState {
    pub running: bool,
    pub pid: Option<u32>,
}

/// Device counts of one app.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    pub active: i64,
    pub invalid: i64,
    pub unregistered: i64,
    /// Tokens only named in `to.tokens`, never registered (nor unregistered: an unregister
    /// record counts in `unregistered`, as `devices` lists it).
    pub unregistered_tokens_only: i64,
}

/// One remembered problem.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub at: String,
    pub kind: String,
    pub app: Option<String>,
    /// The environment an event of an app and environment is about (`paused`, `resumed`,
    /// `unanswered`, `answering`): its message starts with it, and a script reading
    /// `status --json` should not have to take the message apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<&'static str>,
    pub message: String,
}

impl EventRow {
    /// The environment a `paused` or `resumed` event is about (see `environment`).
    pub fn environment(&self) -> &str {
        self.environment.unwrap_or("")
    }
}

/// The environment a message starts with (`production: InvalidProviderToken`), if any.
fn environment_of(message: &str) -> Option<&'static str> {
    let first = message.split(':').next()?;
    ["production", "sandbox"].into_iter().find(|e| *e == first)
}

/// An `events` row read as `SELECT at, kind, app, message`.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    let app: Option<String> = r.get(2)?;
    let message: String = r.get(3)?;
    Ok(EventRow {
        at: rfc3339_ms(r.get(0)?),
        kind: r.get(1)?,
        environment: app.as_ref().and_then(|_| environment_of(&message)),
        app,
        message,
    })
}

/// A notification and its deliveries, for `pushdrop show`.
#[derive(Debug, Clone, Serialize)]
pub struct ShowNotification {
    pub id: String,
    pub app: String,
    /// For people: `all`, `tokens: [...]`, `users: [...]`.
    pub target: String,
    /// For scripts: the record's `to`, as JSON (`{"tokens": [...]}`, `{"users": [...]}`,
    /// `{"all": true}`).
    pub to: serde_json::Value,
    pub push_type: String,
    pub priority: i64,
    pub topic: String,
    pub collapse_id: Option<String>,
    /// RFC 3339, as every time `show` prints (the record may have given UNIX seconds).
    pub expiration: Option<String>,
    pub send_at: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub source_file: Option<String>,
    /// The payload exactly as stored and sent (SPEC §2: "sent as is"), not re-serialised:
    /// key order, number spelling and escapes stay the dropper's.
    pub payload: Box<serde_json::value::RawValue>,
    pub counts: BTreeMap<&'static str, i64>,
    pub deliveries: Vec<DeliveryRow>,
}

/// One delivery of a notification.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub token: String,
    pub environment: String,
    pub state: &'static str,
    pub attempts: i64,
    pub apns_id: String,
    pub last_status: Option<i64>,
    pub last_reason: Option<String>,
    pub updated_at: String,
}

/// One device of the registry.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub app: String,
    pub token: String,
    pub user: Option<String>,
    pub environment: String,
    pub state: &'static str,
    pub registered_at: Option<String>,
    pub invalidated_at: Option<String>,
    pub invalid_reason: Option<String>,
}

/// What a receipt reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptData {
    pub id: String,
    pub app: String,
    pub finished_at: String,
    pub counts: BTreeMap<&'static str, i64>,
    /// Failed, expired and invalid tokens with their reasons.
    pub problems: Vec<ReceiptProblem>,
    /// Sent tokens, when there are few enough.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_tokens: Option<Vec<String>>,
    /// Whether every delivery is final now (false for a notification `pushdrop retry`
    /// requeued since it finished). Not part of the receipt.
    #[serde(skip)]
    pub finished: bool,
}

/// A token that did not get the push.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptProblem {
    pub token: String,
    pub state: &'static str,
    pub status: Option<i64>,
    pub reason: Option<String>,
}

/// Filters for [`Reader::devices`].
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    pub app: Option<String>,
    pub user: Option<String>,
    pub invalid_only: bool,
    pub limit: usize,
}

/// RFC 3339 of a millisecond timestamp, in UTC with always three decimals
/// (`2026-11-30T22:13:14.500Z`): the well-known format drops trailing zeros, which made
/// columns of times in `status`, `show` and `devices` ragged.
pub fn rfc3339_ms(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn state_name(code: i64) -> &'static str {
    DeliveryState::from_code(code).map_or("unknown", DeliveryState::as_str)
}

impl Reader {
    /// Queue and registry figures.
    pub fn status(&self) -> Result<Status, StoreError> {
        let mut s = Status::default();
        for st in DeliveryState::ALL {
            s.totals.insert(st.as_str(), 0);
        }
        // One snapshot for all the figures: a file committed between two of these queries
        // must not be counted by one and missed by another.
        let _snapshot = self.conn.unchecked_transaction()?;
        for (app, state, n) in self.deliveries_by_app()? {
            let e = s.deliveries.entry(app).or_default();
            for st in DeliveryState::ALL {
                e.entry(st.as_str()).or_insert(0);
            }
            *e.entry(state_name(state)).or_insert(0) += n;
            *s.totals.entry(state_name(state)).or_insert(0) += n;
            if state == 0 {
                s.queued += n;
            }
        }
        let now = now_ms();
        s.oldest_queued_age_s = self.oldest_queued_age_s(now)?;
        s.queued_later = self.conn.query_row(
            "SELECT count(*) FROM deliveries d WHERE d.state = 0 AND d.due_at > ?1",
            [now],
            |r| r.get(0),
        )?;
        s.scheduled_notifications = self.conn.query_row(
            "SELECT count(*) FROM notifications WHERE fanned_out = 0",
            [],
            |r| r.get(0),
        )?;
        // In table order, never by the `(app, token)` index: that order fetches each row from
        // a random page (682 ms instead of 57 with 200,000 devices).
        const SUMS: &str = "sum(active = 1),
                    sum(invalidated_at IS NOT NULL),
                    sum(unregistered_at IS NOT NULL AND invalidated_at IS NULL),
                    sum(registered = 0 AND unregistered_at IS NULL AND invalidated_at IS NULL)";
        let only = self.only_app("devices")?;
        let mut st = self.conn.prepare(&match only {
            Some(_) => format!("SELECT ?1, {SUMS} FROM devices"),
            None => format!("SELECT app, {SUMS} FROM devices NOT INDEXED GROUP BY app"),
        })?;
        let rows = st.query_map(rusqlite::params_from_iter(only.iter()), |r| {
            Ok((
                r.get::<_, String>(0)?,
                DeviceCounts {
                    active: r.get(1)?,
                    invalid: r.get(2)?,
                    unregistered: r.get(3)?,
                    unregistered_tokens_only: r.get(4)?,
                },
            ))
        })?;
        for row in rows {
            let (app, c) = row?;
            s.invalid_devices += c.invalid;
            s.devices.insert(app, c);
        }
        s.paused = self.paused()?;
        let mut st = self
            .conn
            .prepare("SELECT at, kind, app, message FROM events ORDER BY id DESC LIMIT 10")?;
        for row in st.query_map([], event_row)? {
            s.recent_errors.push(row?);
        }
        Ok(s)
    }

    /// Deliveries counted by app and state. Usually one app has notifications: then one pass
    /// over the deliveries counts them, as a scrape does, instead of looking up every
    /// delivery's notification for its app (twice the work and more).
    fn deliveries_by_app(&self) -> Result<Vec<(String, i64, i64)>, StoreError> {
        if let Some(only) = self.only_app("notifications")? {
            return Ok(self
                .by_state()?
                .into_iter()
                .map(|(state, n)| (only.clone(), state, n))
                .collect());
        }
        let mut st = self.conn.prepare(
            "SELECT n.app, d.state, count(*) FROM deliveries d
             JOIN notifications n ON n.id = d.notification_id GROUP BY n.app, d.state",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The app every row of `table` names, when there are rows and they all name the same
    /// one: two probes of the table's index that starts with `app`.
    fn only_app(&self, table: &str) -> Result<Option<String>, StoreError> {
        let app = |f: &str| {
            self.conn
                .query_row(&format!("SELECT {f}(app) FROM {table}"), [], |r| {
                    r.get::<_, Option<String>>(0)
                })
        };
        let (first, last) = (app("min")?, app("max")?);
        Ok(first.filter(|f| last.as_ref() == Some(f)))
    }

    /// Deliveries counted by state code, in one pass.
    fn by_state(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT state, count(*) FROM deliveries GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What `/metrics` reads at every scrape: deliveries by state and the oldest queued
    /// delivery's wait. Cheaper than [`Reader::status`], which a scrape used to run: one pass
    /// over the deliveries without looking up each one's notification, and nothing of the
    /// device registry (a scrape cost 1.8 s of CPU with 320,000 deliveries and 479,000
    /// devices kept, a tenth of that now).
    pub fn queue_figures(&self) -> Result<(BTreeMap<&'static str, i64>, f64), StoreError> {
        let mut totals: BTreeMap<&'static str, i64> = DeliveryState::ALL
            .iter()
            .map(|st| (st.as_str(), 0))
            .collect();
        for (state, n) in self.by_state()? {
            *totals.entry(state_name(state)).or_insert(0) += n;
        }
        Ok((totals, self.oldest_queued_age_s(now_ms())?))
    }

    /// Seconds the oldest queued delivery has waited since its notification was due (its
    /// `send_at`, or its ingest), or since `retry` put it back in the queue: a back-off or a
    /// pause moves a delivery's own due time on, and must not hide that it waits. 0 when
    /// none waits.
    fn oldest_queued_age_s(&self, now: i64) -> Result<f64, StoreError> {
        let oldest: Option<i64> = self.conn.query_row(
            "SELECT min(max(n.send_at, coalesce(d.requeued_at, 0)))
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.state = 0 AND n.send_at <= ?1",
            [now],
            |r| r.get(0),
        )?;
        Ok(oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0))
    }

    /// The apps and environments paused, as the daemon last said: each one's last `paused`
    /// or `resumed` event (its message starts with the environment) is a `paused` one.
    pub fn paused(&self) -> Result<Vec<EventRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT at, kind, app, message FROM events
             WHERE kind IN ('paused', 'resumed') AND app IS NOT NULL ORDER BY id",
        )?;
        let mut last: BTreeMap<(String, String), EventRow> = BTreeMap::new();
        for row in st.query_map([], event_row)? {
            let row = row?;
            let key = (
                row.app.clone().unwrap_or_default(),
                row.environment().to_string(),
            );
            last.insert(key, row);
        }
        let mut paused: Vec<EventRow> = last.into_values().filter(|e| e.kind == "paused").collect();
        paused.sort_by(|a, b| a.at.cmp(&b.at));
        Ok(paused)
    }

    /// A notification by its id (and app, when ids repeat across apps).
    pub fn show(
        &self,
        id: &str,
        app: Option<&str>,
        max_deliveries: usize,
    ) -> Result<Option<ShowNotification>, StoreError> {
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<i64>,
            i64,
            i64,
            Option<i64>,
            Option<String>,
        );
        let Some((nid, _)) = notification_row_id(&self.conn, id, app)? else {
            return Ok(None);
        };
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT n.id, app, target_kind, target, payload, push_type, priority, topic, collapse_id,
                        expiration, send_at, created_at, s.finished_at, source_file
                 FROM notifications n JOIN notification_status s ON s.id = n.id
                 WHERE n.id = ?1",
                [nid],
                |r| {
                    Ok((
                        r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?,
                        r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?, r.get(13)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            nid,
            app,
            kind,
            target,
            payload,
            push_type,
            priority,
            topic,
            collapse_id,
            expiration,
            send_at,
            created_at,
            finished_at,
            source_file,
        )) = row
        else {
            return Ok(None);
        };
        let counts = self.counts(nid)?;
        let mut st = self.conn.prepare(
            "SELECT v.token, v.environment, d.state, d.attempts, d.apns_id, d.last_status, d.last_reason, d.updated_at
             FROM deliveries d JOIN devices v ON v.id = d.device_id
             WHERE d.notification_id = ?1 ORDER BY d.id LIMIT ?2",
        )?;
        let deliveries = st
            .query_map(params![nid, max_deliveries as i64], |r| {
                Ok(DeliveryRow {
                    token: r.get(0)?,
                    environment: r.get(1)?,
                    state: state_name(r.get(2)?),
                    attempts: r.get(3)?,
                    apns_id: r.get(4)?,
                    last_status: r.get(5)?,
                    last_reason: r.get(6)?,
                    updated_at: rfc3339_ms(r.get(7)?),
                })
            })?
            .collect::<Result<_, _>>()?;
        let to = match kind.as_str() {
            "all" => serde_json::json!({ "all": true }),
            k => {
                let list = serde_json::from_str(&target)
                    .unwrap_or_else(|_| serde_json::Value::String(target.clone()));
                serde_json::json!({ k: list })
            }
        };
        Ok(Some(ShowNotification {
            id: id.to_string(),
            app,
            to,
            target: if kind == "all" {
                "all".into()
            } else {
                format!("{kind}: {target}")
            },
            push_type,
            priority,
            topic,
            collapse_id,
            expiration: expiration.map(|e: i64| rfc3339_ms(e.saturating_mul(1000))),
            send_at: rfc3339_ms(send_at),
            created_at: rfc3339_ms(created_at),
            finished_at: finished_at.map(rfc3339_ms),
            source_file,
            payload: raw_payload(payload),
            counts,
            deliveries,
        }))
    }

    fn counts(&self, nid: i64) -> Result<BTreeMap<&'static str, i64>, StoreError> {
        let mut counts: BTreeMap<&'static str, i64> =
            DeliveryState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut st = self.conn.prepare_cached(
            "SELECT state, count(*) FROM deliveries WHERE notification_id = ?1 GROUP BY state",
        )?;
        for row in st.query_map([nid], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
            let (s, n) = row?;
            *counts.entry(state_name(s)).or_insert(0) += n;
        }
        Ok(counts)
    }

    /// The device registry, filtered.
    pub fn devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT app, token, user, environment, active, registered, unregistered_at, registered_at,
                    invalidated_at, invalid_reason
             FROM devices
             WHERE (?1 IS NULL OR app = ?1) AND (?2 IS NULL OR user = ?2)
               AND (?3 = 0 OR invalidated_at IS NOT NULL)
             ORDER BY app, user, token LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![q.app, q.user, q.invalid_only as i64, q.limit as i64],
            |r| {
                let active: i64 = r.get(4)?;
                let registered: i64 = r.get(5)?;
                let unregistered: Option<i64> = r.get(6)?;
                let invalidated: Option<i64> = r.get(8)?;
                let state = if invalidated.is_some() {
                    "invalid"
                } else if active == 1 {
                    "active"
                } else if unregistered.is_some() {
                    "unregistered"
                } else if registered == 0 {
                    "not registered"
                } else {
                    "inactive"
                };
                Ok(DeviceRow {
                    app: r.get(0)?,
                    token: r.get(1)?,
                    user: r.get(2)?,
                    environment: r.get(3)?,
                    state,
                    registered_at: r.get::<_, Option<i64>>(7)?.map(rfc3339_ms),
                    invalidated_at: invalidated.map(rfc3339_ms),
                    invalid_reason: r.get(9)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What a finished notification's receipt says.
    pub fn receipt(
        &self,
        notification_id: i64,
        max_sent_tokens: usize,
    ) -> Result<Option<ReceiptData>, StoreError> {
        let row: Option<(String, String, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT ext_id, app, s.finished_at
                 FROM notifications n JOIN notification_status s ON s.id = n.id
                 WHERE n.id = ?1",
                [notification_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((id, app, finished_at)) = row else {
            return Ok(None);
        };
        let counts = self.counts(notification_id)?;
        let mut st = self.conn.prepare_cached(
            "SELECT v.token, d.state, d.last_status, d.last_reason
             FROM deliveries d JOIN devices v ON v.id = d.device_id
             WHERE d.notification_id = ?1 AND d.state IN (2, 3, 4) ORDER BY d.id",
        )?;
        let problems = st
            .query_map([notification_id], |r| {
                Ok(ReceiptProblem {
                    token: r.get(0)?,
                    state: state_name(r.get(1)?),
                    // No answer from APNs (ended unsent, or no request could be made): null,
                    // never a made-up 0.
                    status: r.get::<_, Option<i64>>(2)?.filter(|s| *s != 0),
                    reason: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let sent = counts.get("sent").copied().unwrap_or(0);
        let sent_tokens = if sent as usize <= max_sent_tokens {
            let mut st = self.conn.prepare_cached(
                "SELECT v.token FROM deliveries d JOIN devices v ON v.id = d.device_id
                 WHERE d.notification_id = ?1 AND d.state = 1 ORDER BY d.id",
            )?;
            Some(
                st.query_map([notification_id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        Ok(Some(ReceiptData {
            id,
            app,
            finished_at: rfc3339_ms(finished_at.unwrap_or_else(now_ms)),
            counts,
            problems,
            sent_tokens,
            finished: finished_at.is_some(),
        }))
    }

    /// One page of the notifications that finished between `since_ms` and `until_ms`
    /// (inclusive), in (app, id) order: at most `limit` of them, those after `after` (the
    /// app and id of the previous page's last one). A page is one short read, so walking a
    /// large window holds no read transaction open between pages (and no checkpoint waits
    /// for the walk). The walk follows the (app, id) index and reads no notification row;
    /// each finish time is one lookup by id. (The finish time is the one of the
    /// `notification_status` view, spelled out: joining the view would read every
    /// notification's row.)
    pub fn finished_between(
        &self,
        since_ms: i64,
        until_ms: i64,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<FinishedNotification>, StoreError> {
        let (after_app, after_id) = after.unwrap_or(("", ""));
        let mut st = self.conn.prepare_cached(
            "SELECT n.id, n.app, n.ext_id
             FROM notifications n LEFT JOIN notification_progress p ON p.id = n.id
             WHERE (n.app, n.ext_id) > (?1, ?2)
               AND CASE WHEN p.id IS NOT NULL THEN p.finished_at
                        ELSE (SELECT CASE WHEN min(d.state) > 0 THEN max(d.finished_at) END
                              FROM deliveries d WHERE d.notification_id = n.id) END
                   BETWEEN ?3 AND ?4
             ORDER BY n.app, n.ext_id LIMIT ?5",
        )?;
        let rows = st.query_map(
            params![after_app, after_id, since_ms, until_ms, limit as i64],
            |r| {
                Ok(FinishedNotification {
                    notification_id: r.get(0)?,
                    app: r.get(1)?,
                    ext_id: r.get(2)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A stored payload as raw JSON. Ingest only stores valid JSON; should a row hold anything
/// else, it is shown as a JSON string rather than hidden.
fn raw_payload(text: String) -> Box<serde_json::value::RawValue> {
    if serde_json::from_str::<&serde_json::value::RawValue>(&text).is_err() {
        return serde_json::value::to_raw_value(&text).unwrap_or_default();
    }
    serde_json::value::RawValue::from_string(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::rfc3339_ms;

    /// Every time has its three decimals, so times line up in a column; each still parses
    /// as RFC 3339.
    #[test]
    fn times_always_carry_milliseconds() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_500, "1970-01-01T00:00:01.500Z"),
            (1_796_073_194_424, "2026-11-30T21:13:14.424Z"),
            (1_796_073_194_400, "2026-11-30T21:13:14.400Z"),
        ] {
            assert_eq!(rfc3339_ms(ms), text);
            let parsed =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .unwrap();
            assert_eq!(parsed.unix_timestamp_nanos() / 1_000_000, ms as i128);
        }
    }
}
