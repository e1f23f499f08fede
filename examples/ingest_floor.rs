//! The floor for `scripts/bench-ingest`: the same device rows of a `.jsonl` file through a
//! plain rusqlite INSERT loop, in one transaction, into a table shaped like pushdrop's
//! `devices` (same columns and indexes, same durability: WAL + synchronous=FULL). pushdrop's
//! own ingest does strictly more (validation, duplicate-key checks, file bookkeeping, moving the
//! file), so the ratio of the two says how much that costs.
//!
//! Usage: cargo run --release --example ingest_floor -- FILE.jsonl DB

use std::time::Instant;

#[derive(serde::Deserialize)]
struct Line<'a> {
    app: &'a str,
    token: &'a str,
    user: Option<&'a str>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (file, db) = match args.as_slice() {
        [_, f, d] => (f, d),
        _ => return Err("usage: ingest_floor FILE.jsonl DB".into()),
    };
    let started = Instant::now();
    let text = std::fs::read_to_string(file)?;
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS devices (
            id INTEGER PRIMARY KEY, app TEXT NOT NULL, token TEXT NOT NULL, user TEXT,
            environment TEXT NOT NULL, registered INTEGER NOT NULL DEFAULT 0,
            registered_at INTEGER, unregistered_at INTEGER, invalidated_at INTEGER,
            invalid_reason TEXT, active INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, UNIQUE (app, token));
         CREATE INDEX IF NOT EXISTS devices_active ON devices (app, id) WHERE active = 1;
         CREATE INDEX IF NOT EXISTS devices_user ON devices (app, user) WHERE user IS NOT NULL;",
    )?;
    let tx = conn.transaction()?;
    let mut n = 0u64;
    {
        let mut st = tx.prepare(
            "INSERT INTO devices (app, token, user, environment, registered, registered_at,
                                  active, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'production', 1, ?4, 1, ?4, ?4)
             ON CONFLICT (app, token) DO UPDATE SET user = excluded.user,
               updated_at = excluded.updated_at",
        )?;
        let now = 1_800_000_000_000i64;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let l: Line = serde_json::from_str(line)?;
            st.execute(rusqlite::params![l.app, l.token, l.user, now])?;
            n += 1;
        }
    }
    tx.commit()?;
    let s = started.elapsed().as_secs_f64();
    println!("floor: {n} rows in {s:.3} s = {:.0} rows/s", n as f64 / s);
    Ok(())
}
