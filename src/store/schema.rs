//! The database schema and its migrations. `PRAGMA user_version` holds the number of
//! migrations applied; each migration runs once, in its own transaction, in order. Never edit a
//! migration that has shipped: add the next one.

use rusqlite::Connection;

/// Every migration, oldest first. Index + 1 is the `user_version` after it ran.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE devices (
        id              INTEGER PRIMARY KEY,
        app             TEXT NOT NULL,
        token           TEXT NOT NULL,
        user            TEXT,
        environment     TEXT NOT NULL,
        -- 1 once a device record registered it; 0 for tokens only named in `to.tokens`.
        registered      INTEGER NOT NULL DEFAULT 0,
        registered_at   INTEGER,
        unregistered_at INTEGER,
        -- APNs' timestamp (ms) of the 410 or the time of the 400; NULL while valid.
        invalidated_at  INTEGER,
        invalid_reason  TEXT,
        -- registered, not unregistered, not invalidated: the devices `users`/`all` reach.
        active          INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        UNIQUE (app, token)
    );
    CREATE INDEX devices_active ON devices (app, id) WHERE active = 1;
    CREATE INDEX devices_user ON devices (app, user) WHERE user IS NOT NULL;

    CREATE TABLE notifications (
        id            INTEGER PRIMARY KEY,
        app           TEXT NOT NULL,
        ext_id        TEXT NOT NULL,
        target_kind   TEXT NOT NULL,
        -- JSON array of tokens or users; empty for `all`.
        target        TEXT NOT NULL,
        payload       TEXT NOT NULL,
        push_type     TEXT NOT NULL,
        priority      INTEGER NOT NULL,
        topic         TEXT NOT NULL,
        collapse_id   TEXT,
        expiration    INTEGER,
        send_at       INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,
        source_file   TEXT,
        -- 0 until every delivery exists; fan-out walks devices by id from fanout_cursor.
        fanned_out    INTEGER NOT NULL DEFAULT 0,
        fanout_cursor INTEGER NOT NULL DEFAULT 0,
        finished_at   INTEGER,
        UNIQUE (app, ext_id)
    );
    CREATE INDEX notifications_fanout ON notifications (send_at) WHERE fanned_out = 0;
    CREATE INDEX notifications_unfinished ON notifications (id) WHERE finished_at IS NULL;

    CREATE TABLE deliveries (
        id              INTEGER PRIMARY KEY,
        notification_id INTEGER NOT NULL REFERENCES notifications (id),
        device_id       INTEGER NOT NULL REFERENCES devices (id),
        -- 0 queued, 1 sent, 2 failed, 3 expired, 4 invalid_token
        state           INTEGER NOT NULL DEFAULT 0,
        attempts        INTEGER NOT NULL DEFAULT 0,
        -- when a queued delivery is next due; while leased, when the lease ends.
        due_at          INTEGER NOT NULL,
        leased          INTEGER NOT NULL DEFAULT 0,
        apns_id         TEXT NOT NULL,
        last_status     INTEGER,
        last_reason     TEXT,
        updated_at      INTEGER NOT NULL,
        finished_at     INTEGER,
        UNIQUE (notification_id, device_id)
    );
    CREATE INDEX deliveries_due ON deliveries (due_at) WHERE state = 0;
    CREATE INDEX deliveries_leased ON deliveries (id) WHERE leased = 1;
    CREATE INDEX deliveries_notification ON deliveries (notification_id, state);
    CREATE INDEX deliveries_device ON deliveries (device_id) WHERE state = 0;
    CREATE INDEX deliveries_finished ON deliveries (finished_at) WHERE state <> 0;

    -- Files whose records are committed: a restart after a crash between commit and move
    -- recognises them (same name and content) and only moves them.
    CREATE TABLE committed_files (
        name         TEXT NOT NULL,
        sha256       TEXT NOT NULL,
        size         INTEGER NOT NULL,
        ino          INTEGER NOT NULL,
        mtime_ns     INTEGER NOT NULL,
        committed_at INTEGER NOT NULL,
        PRIMARY KEY (name, sha256, ino, mtime_ns)
    ) WITHOUT ROWID;
    CREATE INDEX committed_files_age ON committed_files (committed_at);

    -- One row, rewritten by /readyz: proof that the database takes writes.
    CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);

    -- Recent problems for `pushdrop status`: rejections, pauses, credential errors.
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,
        kind    TEXT NOT NULL,
        app     TEXT,
        message TEXT NOT NULL
    );
    "#,
    // 2: in-memory claims and a pending count per notification. The sender's claims live in
    // the daemon's memory (a crash forgets them, which makes the deliveries due again), so no
    // lease is written per delivery; a notification counts its queued deliveries, so recording
    // a result needs no per-notification index probe. Indexes that only served leases, the
    // device's queued deliveries and the purge by delivery are dropped: each cost an index
    // update per delivery. Purge now goes by the notification's `finished_at`.
    r#"
    ALTER TABLE notifications ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    UPDATE notifications SET pending =
        (SELECT count(*) FROM deliveries WHERE notification_id = notifications.id AND state = 0);
    UPDATE deliveries SET leased = 0,
        due_at = min(due_at, CAST(unixepoch('subsec') * 1000 AS INTEGER))
        WHERE leased = 1;
    DROP INDEX deliveries_leased;
    DROP INDEX deliveries_device;
    DROP INDEX deliveries_finished;
    DROP INDEX deliveries_notification;
    DROP INDEX notifications_unfinished;
    CREATE INDEX notifications_finished ON notifications (finished_at)
        WHERE finished_at IS NOT NULL;
    "#,
    // 3: a notification's progress in a narrow table of its own. Recording a result used to
    // rewrite the whole notification row (payload, target, topic: some 300 bytes) to lower its
    // pending count; the narrow row costs a fraction of that in pages written per commit.
    // `pending` also counts the fan-out itself (1 until `fanned_out`), so a notification is
    // finished exactly when its pending count reaches 0.
    r#"
    CREATE TABLE notification_progress (
        -- notifications.id
        id          INTEGER PRIMARY KEY,
        -- queued deliveries, plus 1 while the fan-out has not made them all
        pending     INTEGER NOT NULL,
        finished_at INTEGER
    );
    INSERT INTO notification_progress (id, pending, finished_at)
        SELECT id, pending + (1 - fanned_out), finished_at FROM notifications;
    CREATE INDEX notification_progress_finished ON notification_progress (finished_at)
        WHERE finished_at IS NOT NULL;
    DROP INDEX notifications_finished;
    ALTER TABLE notifications DROP COLUMN pending;
    ALTER TABLE notifications DROP COLUMN finished_at;
    "#,
    // 4: no index on finish times. Only the hourly purge asks for finished notifications,
    // and a scan of this narrow table costs it little; the index cost an insert per finished
    // notification on the sending path.
    r#"
    DROP INDEX notification_progress_finished;
    "#,
    // 5: a notification with exactly one delivery, made at ingest (one token named), keeps no
    // progress row: its delivery's state is its progress, and recording the delivery's result
    // no longer pays for a second row. This view is where readers find any notification's
    // pending count and finish time, with or without a row. Older builds would never see such
    // a notification finish, so the version rises and they refuse the database.
    r#"
    CREATE VIEW notification_status AS
    SELECT n.id AS id,
           CASE WHEN p.id IS NOT NULL THEN p.pending
                ELSE (SELECT count(*) FROM deliveries d
                      WHERE d.notification_id = n.id AND d.state = 0) END AS pending,
           CASE WHEN p.id IS NOT NULL THEN p.finished_at
                ELSE (SELECT CASE WHEN min(d.state) > 0 THEN max(d.finished_at) END
                      FROM deliveries d WHERE d.notification_id = n.id) END AS finished_at
    FROM notifications n LEFT JOIN notification_progress p ON p.id = n.id;
    "#,
    // 6: a queued delivery put back without spending an attempt (its app paused, or a request
    // that was never sent) is `held`: it waits for the daemon's own state, not for APNs, and
    // the next start, which lifts every pause, makes it due at once.
    // Of the queued deliveries an older build left, those with an answer but no attempt spent
    // can only have been held that way.
    r#"
    ALTER TABLE deliveries ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    UPDATE deliveries SET held = 1 WHERE state = 0 AND attempts = 0 AND last_reason IS NOT NULL;
    "#,
    // 7: when `pushdrop retry` last put a failed delivery back in the queue. Its wait (in
    // `status` and `pushdrop_oldest_queued_age_seconds`) counts from then, not from its
    // notification's due time, which may be days before: a requeued old notification must
    // not look stuck at once.
    r#"
    ALTER TABLE deliveries ADD COLUMN requeued_at INTEGER;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`SCHEMA_VERSION`]; refuses a database from a newer build.
///
/// Two processes may open a new database at the same moment (the daemon's first start and an
/// operator's `pushdrop status`). Each migration therefore reads the version *inside* an
/// `IMMEDIATE` transaction, which holds the write lock from its start: the second process
/// waits for the first, then finds the migration done, instead of running it again and
/// failing on tables that already exist.
pub fn migrate(conn: &mut Connection) -> Result<(), super::StoreError> {
    let version = |c: &Connection| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    let too_new = |found| super::StoreError::TooNew {
        found,
        supported: SCHEMA_VERSION,
    };
    // Up to date, the usual case: no write lock taken.
    match version(conn)? {
        v if v > SCHEMA_VERSION => return Err(too_new(v)),
        SCHEMA_VERSION => return Ok(()),
        _ => {}
    }
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current = version(&tx)?;
        if current > SCHEMA_VERSION {
            return Err(too_new(current));
        }
        let Some(sql) = MIGRATIONS.get(current as usize) else {
            // Done (by this process or another): nothing was written, the rollback is free.
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database left by a version with written leases: migration 2 counts each
    /// notification's queued deliveries and makes leased ones due at once.
    #[test]
    fn migration_2_counts_pending_and_frees_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.execute_batch(
                "INSERT INTO devices (id, app, token, environment, created_at, updated_at)
                 VALUES (1, 'a', 'aa', 'production', 0, 0), (2, 'a', 'bb', 'production', 0, 0);
                 INSERT INTO notifications (id, app, ext_id, target_kind, target, payload,
                     push_type, priority, topic, send_at, created_at, fanned_out)
                 VALUES (1, 'a', 'n', 'tokens', '[]', '{}', 'alert', 10, 't', 0, 0, 1);
                 INSERT INTO deliveries (notification_id, device_id, state, due_at, leased,
                     apns_id, updated_at)
                 VALUES (1, 1, 0, 9999999999999, 1, 'x', 0), (1, 2, 1, 0, 0, 'y', 0);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let pending: i64 = conn
            .query_row(
                "SELECT pending FROM notification_progress WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(pending, 1, "one queued delivery, one sent");
        let (leased, due): (i64, i64) = conn
            .query_row(
                "SELECT leased, due_at FROM deliveries WHERE device_id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(leased, 0);
        assert!(due <= crate::model::now_ms(), "due again at once: {due}");
    }

    /// Migration 6: the queued deliveries an older build put back without spending an attempt
    /// (an answer, no attempt) are marked held; one that spent an attempt, or never had an
    /// answer, is not.
    #[test]
    fn migration_6_marks_what_an_older_build_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            // Deliveries only: their notifications and devices do not matter here.
            conn.pragma_update(None, "foreign_keys", false).unwrap();
            let tx = conn.transaction().unwrap();
            for m in &MIGRATIONS[..5] {
                tx.execute_batch(m).unwrap();
            }
            tx.pragma_update(None, "user_version", 5).unwrap();
            tx.execute_batch(
                "INSERT INTO deliveries (id, notification_id, device_id, state, attempts, due_at,
                     apns_id, last_reason, updated_at)
                 VALUES (1, 1, 1, 0, 0, 99, 'a', 'app paused', 0),
                        (2, 1, 2, 0, 1, 99, 'b', 'ServiceUnavailable', 0),
                        (3, 1, 3, 0, 0, 99, 'c', NULL, 0),
                        (4, 1, 4, 1, 0, 99, 'd', 'app paused', 0);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        let held: Vec<i64> = conn
            .prepare("SELECT id FROM deliveries WHERE held = 1 ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(held, vec![1]);
    }

    /// Migration 3 moves each notification's pending count and finish time into
    /// `notification_progress`, counting a fan-out still under way as one pending item;
    /// migration 4 drops the index on finish times.
    #[test]
    fn migration_3_moves_progress_and_counts_unfinished_fan_outs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.execute_batch(MIGRATIONS[1]).unwrap();
            tx.pragma_update(None, "user_version", 2).unwrap();
            tx.execute_batch(
                "INSERT INTO notifications (id, app, ext_id, target_kind, target, payload,
                     push_type, priority, topic, send_at, created_at, fanned_out, pending,
                     finished_at)
                 VALUES (1, 'a', 'done', 'tokens', '[]', '{}', 'alert', 10, 't', 0, 0, 1, 0, 77),
                        (2, 'a', 'half', 'all', '', '{}', 'alert', 10, 't', 0, 0, 0, 5, NULL),
                        (3, 'a', 'queued', 'tokens', '[]', '{}', 'alert', 10, 't', 0, 0, 1, 2, NULL);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(i64, i64, Option<i64>)> = conn
            .prepare("SELECT id, pending, finished_at FROM notification_progress ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![(1, 0, Some(77)), (2, 6, None), (3, 2, None)]);
        let cols: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('notifications')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !cols.iter().any(|c| c == "pending" || c == "finished_at"),
            "{cols:?}"
        );
        // Migration 4 ran after it: the index on finish times is gone.
        let index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'notification_progress_finished'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 0);
    }
}
