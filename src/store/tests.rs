//! Store behaviour against real SQLite files in temp dirs.

use super::*;
use crate::config::Environment;
use crate::model::{
    DeliveryState, DeviceAction, DeviceRecord, NotificationRecord, PushType, Record, Target,
};

fn tok(i: u32) -> String {
    format!("{i:08x}{}", "ab".repeat(28))
}

fn device(app: &str, i: u32, user: Option<&str>) -> Record {
    Record::Device(DeviceRecord {
        app: app.into(),
        token: tok(i),
        user: user.map(str::to_string),
        environment: Environment::Production,
        action: DeviceAction::Register,
    })
}

fn notification(id: Option<&str>, target: Target) -> Record {
    Record::Notification(NotificationRecord {
        app: "a".into(),
        id: id.map(str::to_string),
        target,
        payload: r#"{"aps":{"alert":"hi"}}"#.into(),
        push_type: PushType::Alert,
        priority: 10,
        topic: "com.example.a".into(),
        collapse_id: None,
        expiration: None,
        send_at_ms: None,
        environment: Environment::Production,
    })
}

fn file(name: &str, records: Vec<Record>) -> IngestFile {
    IngestFile {
        name: name.into(),
        size: 1,
        sha256: format!("sha-{name}"),
        ino: 1,
        mtime_ns: 1_000_000_000,
        records,
    }
}

/// `n` notifications with ids `n0`, `n1`…, each to its own token `tok(i)`.
fn one_token_each(n: u32) -> Vec<Record> {
    (0..n)
        .map(|i| notification(Some(&format!("n{i}")), Target::Tokens(vec![tok(i)])))
        .collect()
}

/// Ingests one file of `records` named `name`, which must commit.
fn ingest(store: &Store, name: &str, records: Vec<Record>) {
    store.ingest(vec![file(name, records)]).unwrap();
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db/p.db"), true).unwrap();
    (dir, store)
}

/// The id of the claimed delivery to token `t`.
fn delivery_to(claimed: &[ClaimedDelivery], t: u32) -> i64 {
    claimed
        .iter()
        .find(|c| c.device.token == tok(t))
        .unwrap()
        .delivery_id
}

/// A `sent` result (APNs echoed our apns-id).
fn sent(delivery_id: i64) -> DeliveryResult {
    DeliveryResult {
        delivery_id,
        kind: ResultKind::Sent { apns_id: None },
    }
}

/// One result per claimed delivery, chosen by its device's token.
fn answers(claimed: &[ClaimedDelivery], kind: impl Fn(&str) -> ResultKind) -> Vec<DeliveryResult> {
    claimed
        .iter()
        .map(|c| DeliveryResult {
            delivery_id: c.delivery_id,
            kind: kind(&c.device.token),
        })
        .collect()
}

/// Ingests `devices` (one file), then a broadcast `b` to app `a` (another), not fanned out yet.
fn registered_then_broadcast(store: &Store, devices: Vec<Record>) {
    ingest(store, "d.jsonl", devices);
    ingest(store, "b.json", vec![notification(Some("b"), Target::All)]);
}

/// Records results; the ids of the notifications they finished, sorted.
async fn record_finished(store: &Store, results: Vec<DeliveryResult>) -> Vec<String> {
    let mut ids: Vec<String> = store
        .record_results(results)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.ext_id)
        .collect();
    ids.sort();
    ids
}

/// Ends a delivery as `failed` through a connection of its own, as another process could
/// while the sender has it in flight.
fn fail_behind_senders_back(store: &Store, delivery_id: i64) {
    rusqlite::Connection::open(store.path())
        .unwrap()
        .execute(
            "UPDATE deliveries SET state = 2, finished_at = 1 WHERE id = ?1",
            [delivery_id],
        )
        .unwrap();
}

/// Each notification's id, pending count and whether it is finished, in id order.
fn progress(store: &Store) -> Vec<(String, i64, bool)> {
    query::Reader::open(store.path())
        .unwrap()
        .conn()
        .prepare(
            "SELECT n.ext_id, s.pending, s.finished_at IS NOT NULL
             FROM notifications n JOIN notification_status s ON s.id = n.id ORDER BY n.id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn second_exclusive_open_is_refused() {
    let (dir, _store) = open();
    match Store::open(&dir.path().join("db/p.db"), true) {
        // The refusal names the holder (this process here), as `status` does.
        Err(e @ StoreError::Locked { .. }) => assert!(
            e.to_string().contains(&format!(
                "another pushdrop process (pid {})",
                std::process::id()
            )),
            "{e}"
        ),
        other => panic!("expected Locked, got {:?}", other.err()),
    }
}

#[test]
fn a_second_daemon_reaching_the_database_through_a_link_is_refused() {
    let (dir, _store) = open();
    // A link to the file, and a link to its folder: each is the same database.
    let file_link = dir.path().join("link.db");
    std::os::unix::fs::symlink(dir.path().join("db/p.db"), &file_link).unwrap();
    let dir_link = dir.path().join("linked-dir");
    std::os::unix::fs::symlink(dir.path().join("db"), &dir_link).unwrap();
    for path in [file_link, dir_link.join("p.db")] {
        match Store::open(&path, true) {
            Err(StoreError::Locked { lock, .. }) => {
                assert_eq!(
                    std::fs::canonicalize(&lock).unwrap(),
                    std::fs::canonicalize(dir.path().join("db/p.db.lock")).unwrap(),
                    "the lock beside the real file"
                );
            }
            other => panic!("{}: expected Locked, got {:?}", path.display(), other.err()),
        }
    }
}

/// A link to a database not made yet: SQLite makes the file where the link points, and the
/// lock must be beside it, where a daemon given the real path looks.
#[test]
fn a_link_to_a_database_not_made_yet_locks_beside_its_target() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("real")).unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink("real/new.db", &link).unwrap();
    let _first = Store::open(&link, true).unwrap();
    assert!(dir.path().join("real/new.db").exists());
    match Store::open(&dir.path().join("real/new.db"), true) {
        Err(StoreError::Locked { .. }) => {}
        other => panic!("expected Locked, got {:?}", other.err()),
    }
}

#[test]
fn not_writable_names_the_read_only_database_files_this_user_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let shm = dir.path().join("p.db-shm");
    // No -wal: a missing file is not named (SQLite makes it when it can).
    for f in [&db, &shm] {
        std::fs::write(f, b"").unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let expected = if root { vec![] } else { vec![db.clone(), shm] };
    assert_eq!(not_writable(&db), expected);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(!not_writable(&db).contains(&db));
}

/// A database stopped cleanly, in a folder this user may not write, is read `immutable`
/// (SQLite would want to make its `-wal` and `-shm` files first): the read must find the
/// database through its URI, whatever characters its folder's name holds.
#[test]
fn a_database_is_read_immutable_through_its_uri() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a?b#c%d é");
    std::fs::create_dir(&odd).unwrap();
    let db = odd.join("p.db");
    let store = Store::open(&db, false).unwrap();
    ingest(&store, "d.jsonl", vec![device("a", 1, None)]);
    drop(store);
    // As a clean stop leaves it: everything in the database file.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let r = query::Reader::open_as(&db, true).unwrap();
    let n: i64 = r
        .conn()
        .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

/// SQLite's "attempt to write a readonly database" names no file: the store's refusal names
/// the database, and says where to look.
#[test]
fn a_read_only_refusal_names_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let refusal = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
        Some("attempt to write a readonly database".into()),
    );
    let text = super::named(&db, StoreError::Sqlite(refusal)).to_string();
    assert!(
        text.starts_with(&format!("cannot write database {}: ", db.display())),
        "{text}"
    );
    assert!(
        text.contains("attempt to write a readonly database"),
        "{text}"
    );
    // Other errors pass unchanged.
    let other = super::named(&db, StoreError::Closed);
    assert!(matches!(other, StoreError::Closed));
}

/// `status` counts devices by the state `devices` lists them in: a token only named in
/// `to.tokens` and then unregistered is unregistered in both.
#[test]
fn status_device_counts_agree_with_the_device_list() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            device("a", 1, None),
            device("a", 2, None),
            notification(Some("direct"), Target::Tokens(vec![tok(3), tok(4)])),
            unregister(2),
            unregister(4),
        ],
    );
    let r = query::Reader::open(store.path()).unwrap();
    let counts = &r.status().unwrap().devices["a"];
    let listed = r
        .devices(&query::DeviceQuery {
            app: None,
            user: None,
            invalid_only: false,
            limit: 10,
        })
        .unwrap();
    let listed = |state: &str| listed.iter().filter(|d| d.state == state).count() as i64;
    assert_eq!(counts.active, listed("active"));
    assert_eq!(counts.unregistered, listed("unregistered"));
    assert_eq!(counts.unregistered_tokens_only, listed("not registered"));
    assert_eq!(
        (
            counts.active,
            counts.unregistered,
            counts.unregistered_tokens_only
        ),
        (1, 2, 1)
    );
}

#[test]
fn status_counts_deliveries_scheduled_for_later() {
    let (_dir, store) = open();
    let mut later = notification(Some("later"), Target::Tokens(vec![tok(1), tok(2)]));
    if let Record::Notification(n) = &mut later {
        n.send_at_ms = Some(crate::model::now_ms() + 3_600_000);
    }
    let now = notification(Some("now"), Target::Tokens(vec![tok(3)]));
    ingest(&store, "n.json", vec![later, now]);
    let s = query::Reader::open(store.path()).unwrap().status().unwrap();
    assert_eq!((s.queued, s.queued_later), (3, 2));
    assert_eq!(
        s.scheduled_notifications, 0,
        "token targets fan out at ingest"
    );
}

/// A delivery's wait counts from its notification's due time, or from the `retry` that put it
/// back in the queue: an old notification retried now does not look stuck.
#[test]
fn a_retried_delivery_waits_since_its_retry() {
    let (_dir, store) = open();
    let mut old = notification(Some("old"), Target::Tokens(vec![tok(1)]));
    if let Record::Notification(n) = &mut old {
        n.send_at_ms = Some(crate::model::now_ms() - 3_600_000);
    }
    ingest(&store, "n.json", vec![old]);
    let age = || {
        query::Reader::open(store.path())
            .unwrap()
            .status()
            .unwrap()
            .oldest_queued_age_s
    };
    assert!(age() >= 3_600.0, "{}", age());
    let c = rusqlite::Connection::open(store.path()).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c.execute("UPDATE deliveries SET state = 2", []).unwrap();
    assert_eq!(age(), 0.0);
    assert_eq!(
        store
            .retry_failed_blocking(Some("old".into()), None)
            .unwrap()
            .deliveries,
        1
    );
    assert!(age() < 60.0, "{}", age());
}

#[test]
fn the_daemon_gives_back_the_disk_of_a_big_commits_wal() {
    let (dir, store) = open();
    ingest(&store, "big.json", one_token_each(3000));
    let wal = dir.path().join("db/p.db-wal");
    let size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(size() > 1024 * 1024, "the commit went through the WAL");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while size() > super::writer::WAL_KEEP {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL stays at {} bytes",
            size()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Nothing lost by it.
    let r = query::Reader::open(store.path()).unwrap();
    assert_eq!(r.queue_figures().unwrap().0["queued"], 3000);
}

#[test]
fn status_counts_each_apps_deliveries_with_one_app_or_several() {
    let (_dir, store) = open();
    ingest(&store, "a.json", one_token_each(3));
    ingest(&store, "d.json", vec![device("a", 20, None)]);
    // Queued deliveries and active devices by app.
    let by_app = |store: &Store| {
        let s = query::Reader::open(store.path()).unwrap().status().unwrap();
        let queued: Vec<_> = s
            .deliveries
            .iter()
            .map(|(app, states)| (app.clone(), states["queued"]))
            .collect();
        let active: Vec<_> = s
            .devices
            .iter()
            .map(|(app, c)| (app.clone(), c.active))
            .collect();
        (queued, active)
    };
    let a = |n| ("a".to_string(), n);
    let b = |n| ("b".to_string(), n);
    assert_eq!(by_app(&store), (vec![a(3)], vec![a(1)]));
    let of_b = |i| match notification(Some(&format!("b{i}")), Target::Tokens(vec![tok(i)])) {
        Record::Notification(n) => Record::Notification(NotificationRecord {
            app: "b".into(),
            ..n
        }),
        Record::Device(_) => unreachable!(),
    };
    ingest(
        &store,
        "b.json",
        vec![
            of_b(7),
            of_b(8),
            device("b", 21, None),
            device("b", 22, None),
        ],
    );
    assert_eq!(by_app(&store), (vec![a(3), b(2)], vec![a(1), b(2)]));
}

#[test]
fn a_scrape_reads_the_same_queue_figures_as_status() {
    let (_dir, store) = open();
    ingest(&store, "n.json", one_token_each(5));
    {
        let c = rusqlite::Connection::open(store.path()).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        c.execute("UPDATE deliveries SET state = 1 WHERE id <= 2", [])
            .unwrap();
        c.execute("UPDATE deliveries SET state = 4 WHERE id = 3", [])
            .unwrap();
    }
    let r = query::Reader::open(store.path()).unwrap();
    let s = r.status().unwrap();
    let (totals, oldest_age_s) = r.queue_figures().unwrap();
    assert_eq!(totals, s.totals);
    let want: Vec<(&str, i64)> = vec![
        ("expired", 0),
        ("failed", 0),
        ("invalid_token", 1),
        ("queued", 2),
        ("sent", 2),
    ];
    assert_eq!(totals.into_iter().collect::<Vec<_>>(), want);
    assert!(
        (oldest_age_s - s.oldest_queued_age_s).abs() < 1.0,
        "{oldest_age_s} against {}",
        s.oldest_queued_age_s
    );
}

#[test]
fn ingest_is_idempotent_for_the_same_file_and_reports_duplicate_ids() {
    let (_dir, store) = open();
    let f = file(
        "n.json",
        vec![
            device("a", 1, Some("alice")),
            notification(Some("x1"), Target::Tokens(vec![tok(1), tok(2), tok(1)])),
        ],
    );
    let out = store.ingest(vec![f.clone()]).unwrap();
    assert_eq!(out[0].notifications_queued, 1);
    assert_eq!(out[0].queued_names(), ["x1"], "one app: ids alone");
    assert_eq!(out[0].devices_registered, 1);
    let again = store.ingest(vec![f]).unwrap();
    assert!(again[0].already_committed);
    let dup = store
        .ingest(vec![file(
            "m.json",
            vec![notification(Some("x1"), Target::All)],
        )])
        .unwrap();
    assert_eq!(
        dup[0].duplicates,
        [super::Duplicate {
            record: 0,
            app: "a".into(),
            id: "x1".into()
        }]
    );
    assert_eq!(dup[0].notifications_queued, 0);
    assert_eq!(
        dup[0].apps,
        ["a"],
        "its log line names the app of the duplicates"
    );
    assert_eq!(dup[0].duplicate_names(10), ["x1"]);

    // A file of two apps: its duplicates are named with their app, which the id alone does
    // not say (app b may take the id x1 too).
    let of_b = || {
        let mut n = notification(Some("x1"), Target::Tokens(vec![tok(3)]));
        if let Record::Notification(n) = &mut n {
            n.app = "b".into();
        }
        n
    };
    let both = store
        .ingest(vec![file(
            "both.json",
            vec![notification(Some("x1"), Target::All), of_b()],
        )])
        .unwrap();
    assert_eq!(both[0].notifications_queued, 1, "b's x1 is new");
    assert_eq!(both[0].duplicate_names(10), ["a/x1"]);
    // So are the ids it queued, in its `ingested` line.
    assert_eq!(both[0].queued_names(), ["b/x1"]);
    assert_eq!(dup[0].queued_names(), Vec::<String>::new());
    let again = store
        .ingest(vec![file(
            "again.json",
            vec![of_b(), notification(Some("x1"), Target::All)],
        )])
        .unwrap();
    assert_eq!(again[0].duplicate_names(10), ["b/x1", "a/x1"]);
    assert_eq!(again[0].duplicate_names(1), ["b/x1"]);

    let r = query::Reader::open(store.path()).unwrap();
    let n: i64 = r
        .conn()
        .query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3, "one delivery per distinct token, and b's x1");
}

/// Tokens named in `to.tokens`, known and new in any order (the writer guesses which from the
/// token before), each end up with exactly one device row, and every delivery goes to the
/// device row of its own token.
#[test]
fn named_tokens_known_and_new_in_any_order_get_one_device_each() {
    let (_dir, store) = open();
    ingest(&store, "d.json", vec![device("a", 1, Some("alice"))]);
    // new, known, new, new, known, new again (in the same file), known again.
    let order = [2, 1, 3, 4, 1, 2, 1];
    let recs = order
        .iter()
        .map(|&i| notification(None, Target::Tokens(vec![tok(i)])))
        .collect();
    let out = store.ingest(vec![file("n.jsonl", recs)]).unwrap();
    assert_eq!(out[0].notifications_queued, order.len());

    let r = query::Reader::open(store.path()).unwrap();
    let devices: Vec<(String, Option<String>)> = r
        .conn()
        .prepare("SELECT token, user FROM devices ORDER BY token")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        devices,
        vec![
            (tok(1), Some("alice".to_string())),
            (tok(2), None),
            (tok(3), None),
            (tok(4), None),
        ],
        "one row per token; the registered one keeps its user"
    );
    let delivered: Vec<String> = r
        .conn()
        .prepare(
            "SELECT v.token FROM deliveries d JOIN devices v ON v.id = d.device_id
             ORDER BY d.notification_id",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<String> = order.iter().map(|&i| tok(i)).collect();
    assert_eq!(delivered, expected);
}

/// Records of one file that differ in app, topic, push type, target kind and environment are
/// each written with their own values (the writer binds shared values only when they change).
#[test]
fn each_record_keeps_its_own_app_topic_and_push_type_within_a_file() {
    let (_dir, store) = open();
    let rec = |app: &str, topic: &str, push_type: PushType, target: Target, env| {
        Record::Notification(NotificationRecord {
            app: app.into(),
            topic: topic.into(),
            push_type,
            target,
            environment: env,
            ..match notification(None, Target::All) {
                Record::Notification(n) => n,
                Record::Device(_) => unreachable!(),
            }
        })
    };
    let (p, s) = (Environment::Production, Environment::Sandbox);
    let (alert, voip, bg) = (PushType::Alert, PushType::Voip, PushType::Background);
    let to = |i| Target::Tokens(vec![tok(i)]);
    let recs = vec![
        rec("a", "t.a", alert, to(1), p),
        rec("a", "t.a", alert, to(2), p),
        rec("b", "t.b", voip, to(1), s),
        rec("b", "t.b", voip, Target::Users(vec!["u".into()]), s),
        rec("a", "t.a2", bg, to(3), p),
    ];
    ingest(&store, "mixed.jsonl", recs);
    let r = query::Reader::open(store.path()).unwrap();
    let rows: Vec<(String, String, String, String)> = r
        .conn()
        .prepare("SELECT app, topic, push_type, target_kind FROM notifications ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let row = |a: &str, t: &str, p: &str, k: &str| (a.into(), t.into(), p.into(), k.into());
    assert_eq!(
        rows,
        vec![
            row("a", "t.a", "alert", "tokens"),
            row("a", "t.a", "alert", "tokens"),
            row("b", "t.b", "voip", "tokens"),
            row("b", "t.b", "voip", "users"),
            row("a", "t.a2", "background", "tokens"),
        ]
    );
    let devices: Vec<(String, String, String)> = r
        .conn()
        .prepare("SELECT app, token, environment FROM devices ORDER BY app, token")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let dev = |a: &str, i: u32, e: &str| (a.to_string(), tok(i), e.to_string());
    assert_eq!(
        devices,
        vec![
            dev("a", 1, "production"),
            dev("a", 2, "production"),
            dev("a", 3, "production"),
            dev("b", 1, "sandbox"),
        ]
    );
}

#[test]
fn broadcast_fans_out_to_active_devices_and_claims_once() {
    let (_dir, store) = open();
    let mut recs: Vec<Record> = (0..50).map(|i| device("a", i, None)).collect();
    recs.push(unregister(3));
    recs.push(device("other", 99, None));
    registered_then_broadcast(&store, recs);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        assert_eq!(store.fan_out_due(now, 1_000_000).await.unwrap().0, 49);
        let first = store.claim_due(now, 30).await.unwrap();
        assert_eq!(first.deliveries.len(), 30);
        assert!(first.finished.is_empty());
        assert_eq!(first.idle_until, None, "a full claim: more may be due");
        let rest = store.claim_due(now, 100).await.unwrap().deliveries;
        assert_eq!(rest.len(), 19, "claimed deliveries are not claimed twice");
        let claimed = first.deliveries;
        let all: Vec<_> = claimed.into_iter().chain(rest).collect();
        let results = all.iter().map(|c| sent(c.delivery_id)).collect();
        let fin = store.record_results(results).await.unwrap();
        assert_eq!(fin.len(), 1);
        assert_eq!(fin[0].ext_id, "b");
        let after = store.claim_due(now, 100).await.unwrap();
        assert!(after.deliveries.is_empty());
        assert_eq!(
            after.idle_until,
            Some(None),
            "nothing queued, nothing scheduled"
        );
    });
}

/// A fan-out that meets a device which already has the notification's delivery (made by an
/// older build, or by hand) leaves that one as it is and makes the rest: one delivery per
/// device, and the fan-out does not stop on it.
#[test]
fn fan_out_keeps_a_delivery_that_is_already_there() {
    let (_dir, store) = open();
    registered_then_broadcast(&store, (0..10).map(|i| device("a", i, None)).collect());
    let other = rusqlite::Connection::open(store.path()).unwrap();
    other
        .execute_batch(&format!(
            "INSERT INTO deliveries (notification_id, device_id, due_at, apns_id, updated_at)
             SELECT n.id, v.id, 0, 'F0A3C7B2-0000-4000-8000-000000000003', 0
             FROM notifications n, devices v WHERE n.ext_id = 'b' AND v.token = '{}';
             UPDATE notification_progress SET pending = pending + 1
             WHERE id = (SELECT id FROM notifications WHERE ext_id = 'b');",
            tok(3)
        ))
        .unwrap();
    drop(other);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        assert_eq!(store.fan_out_due(now, 1_000_000).await.unwrap().0, 9);
        let claimed = store.claim_due(now, 100).await.unwrap().deliveries;
        let mut tokens: Vec<String> = claimed.iter().map(|c| c.device.token.clone()).collect();
        tokens.sort();
        let mut want: Vec<String> = (0..10).map(tok).collect();
        want.sort();
        assert_eq!(tokens, want, "one delivery per device");
        let kept = claimed.iter().find(|c| c.device.token == tok(3)).unwrap();
        assert_eq!(kept.apns_id, "F0A3C7B2-0000-4000-8000-000000000003");
        let results = claimed.iter().map(|c| sent(c.delivery_id)).collect();
        assert_eq!(
            record_finished(&store, results).await,
            vec!["b".to_string()]
        );
    });
}

/// A broadcast to an app without active devices is final once its fan-out is done, and the
/// fan-out says so (its receipt is written then): nothing else would ever finish it.
#[test]
fn broadcast_to_no_device_finishes_at_fan_out() {
    let (_dir, store) = open();
    ingest(
        &store,
        "e.json",
        vec![notification(Some("empty"), Target::All)],
    );
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let (made, fin) = store.fan_out_due(now, 100).await.unwrap();
        assert_eq!(made, 0);
        assert_eq!(fin.len(), 1);
        assert_eq!(fin[0].ext_id, "empty");
        assert_eq!(store.fan_out_due(now, 100).await.unwrap(), (0, Vec::new()));
    });
    let r = query::Reader::open(store.path()).unwrap();
    let shown = r.show("empty", None, 10).unwrap().unwrap();
    assert!(shown.finished_at.is_some(), "{shown:?}");
}

#[test]
fn invalidation_respects_later_registration() {
    let (_dir, store) = open();
    // Registered with file mtime 1 s after the epoch.
    ingest(
        &store,
        "d.jsonl",
        vec![device("a", 1, None), device("a", 2, None)],
    );
    ingest(&store, "n.json", vec![notification(Some("n"), Target::All)]);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        store.fan_out_due(now, 100).await.unwrap();
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        let results = answers(&claimed, |token| ResultKind::InvalidToken {
            status: 410,
            reason: "Unregistered".into(),
            // device 1: Apple says dead since before its registration (500 ms) → stays;
            // device 2: dead since 2 s, after the registration → invalidated.
            invalidated_at_ms: if token == tok(1) { 500 } else { 2000 },
        });
        store.record_results(results).await.unwrap();
    });
    let r = query::Reader::open(store.path()).unwrap();
    let active: Vec<(String, i64)> = r
        .conn()
        .prepare("SELECT token, active FROM devices ORDER BY token")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(active, vec![(tok(1), 1), (tok(2), 0)]);
    // Both deliveries are `invalid_token`, as SPEC 4.3 says; the kept device's reason says
    // it was kept, so that a dropper reading the receipt keeps its token.
    let reasons: Vec<(String, String)> = r
        .conn()
        .prepare(
            "SELECT v.token, d.last_reason FROM deliveries d JOIN devices v ON v.id = d.device_id
             WHERE d.state = 4 ORDER BY v.token",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        reasons,
        vec![
            (tok(1), format!("Unregistered; {}", writer::DEVICE_KEPT)),
            (tok(2), "Unregistered".to_string())
        ]
    );

    // A registration written before the invalidation (file mtime 1.5 s) leaves the device
    // invalid, and the outcome says so (the inbox logs it for the dropper).
    let mut older = file("d1.jsonl", vec![device("a", 2, None), device("a", 1, None)]);
    older.mtime_ns = 1_500_000_000;
    let out = store.ingest(vec![older]).unwrap();
    assert_eq!(out[0].devices_registered, 2);
    assert_eq!(out[0].devices_still_invalid, 1);
    assert_eq!(
        out[0].still_invalid_tokens,
        vec![crate::model::token_prefix(&tok(2)).to_string()]
    );

    // A registration written after the invalidation re-activates; file mtime 3 s.
    let mut later = file("d2.jsonl", vec![device("a", 2, None)]);
    later.mtime_ns = 3_000_000_000;
    let out = store.ingest(vec![later]).unwrap();
    assert_eq!(out[0].devices_still_invalid, 0);
    let a: i64 = r
        .conn()
        .query_row(
            "SELECT active FROM devices WHERE token = ?1",
            [tok(2)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(a, 1);
}

#[test]
fn expired_and_invalid_deliveries_finish_at_claim_and_retry_requeues_failed() {
    let (_dir, store) = open();
    let mut n = notification(Some("old"), Target::Tokens(vec![tok(7)]));
    if let Record::Notification(n) = &mut n {
        n.expiration = Some(1);
    }
    ingest(&store, "e.json", vec![n]);
    ingest(
        &store,
        "f.json",
        vec![notification(Some("f"), Target::Tokens(vec![tok(8)]))],
    );
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claim = store.claim_due(now, 10).await.unwrap();
        let (claimed, fin) = (claim.deliveries, claim.finished);
        assert_eq!(
            fin.iter().map(|f| f.ext_id.as_str()).collect::<Vec<_>>(),
            vec!["old"]
        );
        assert_eq!(claimed.len(), 1);
        let fin = store
            .record_results(vec![DeliveryResult {
                delivery_id: claimed[0].delivery_id,
                kind: ResultKind::Failed {
                    status: Some(400),
                    reason: "BadTopic".into(),
                },
            }])
            .await
            .unwrap();
        assert_eq!(fin.len(), 1);
    });
    assert_eq!(
        store.retry_failed_blocking(Some("f".into()), None).unwrap(),
        super::Requeued {
            deliveries: 1,
            app: Some("a".into())
        },
        "the app is found by the id, for the log line"
    );
    assert_eq!(
        store.retry_failed_blocking(None, None).unwrap().deliveries,
        0
    );
    // Its device is found dead meanwhile: the requeued delivery ends unsent at its claim, and
    // the 400 of its earlier BadTopic answer is not left beside the new reason.
    let c = rusqlite::Connection::open(store.path()).unwrap();
    c.execute(
        "UPDATE devices SET invalidated_at = 1, invalid_reason = 'Unregistered', active = 0",
        [],
    )
    .unwrap();
    rt.block_on(async {
        let claim = store
            .claim_due(crate::model::now_ms() + 1, 10)
            .await
            .unwrap();
        assert!(claim.deliveries.is_empty());
        assert_eq!(claim.ended.len(), 1);
    });
    let (state, status, reason): (i64, Option<i64>, String) = c
        .query_row(
            "SELECT d.state, d.last_status, d.last_reason FROM deliveries d
             JOIN notifications n ON n.id = d.notification_id WHERE n.ext_id = 'f'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(state, DeliveryState::InvalidToken.code());
    assert_eq!(status, None, "{reason}");
}

/// A `sent` result only counts for a delivery that was still queued: one that something else
/// ended while it was in flight, or a second result for a delivery already recorded, leaves
/// its notification's pending count alone, whether its run of ids is written at once or row by
/// row.
#[test]
fn sent_results_count_only_deliveries_still_queued() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("one"), Target::Tokens(vec![tok(1)])),
            notification(Some("two"), Target::Tokens(vec![tok(2)])),
            notification(Some("three"), Target::Tokens(vec![tok(3), tok(4)])),
        ],
    );
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 4);
        let id = |t: u32| delivery_to(&claimed, t);
        // Delivery 1 ends behind the sender's back while it is in flight.
        fail_behind_senders_back(&store, id(1));
        let sent_all =
            |ids: &[i64]| -> Vec<DeliveryResult> { ids.iter().map(|&d| sent(d)).collect() };
        let fin = record_finished(&store, sent_all(&[id(1), id(2), id(3)])).await;
        assert_eq!(fin, vec!["two"], "`one` was not queued any more");
        // A second result for delivery 2, which is no longer in flight, beside a real one.
        let fin = record_finished(&store, sent_all(&[id(2), id(4)])).await;
        assert_eq!(fin, vec!["three"]);
    });
    let progress = progress(&store);
    let r = query::Reader::open(store.path()).unwrap();
    // `one` is over too, though no result ended it: its single delivery was ended behind the
    // sender's back, and that delivery's state is its progress.
    assert_eq!(
        progress,
        vec![
            ("one".to_string(), 0, true),
            ("two".to_string(), 0, true),
            ("three".to_string(), 0, true),
        ]
    );
    let state: i64 = r
        .conn()
        .query_row(
            "SELECT state FROM deliveries d JOIN devices v ON v.id = d.device_id
             WHERE v.token = ?1",
            [tok(1)],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, 2, "the sent result did not overwrite it");
}

#[test]
fn batched_results_apply_in_order_per_delivery() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("one"), Target::Tokens(vec![tok(1), tok(2)])),
            notification(Some("two"), Target::Tokens(vec![tok(3)])),
        ],
    );
    let rt = rt();
    let (d, fin) = rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 3);
        let again = store.claim_due(now, 10).await.unwrap().deliveries;
        assert!(again.is_empty(), "all three are in flight");
        let id = |t: u32| delivery_to(&claimed, t);
        let (d1, d2, d3) = (id(1), id(2), id(3));
        let results = vec![
            // d1: sent with Apple's id, then a stray retry for it: a final delivery stays
            // final. d2: a retry, so `one` is not finished.
            DeliveryResult {
                delivery_id: d1,
                kind: ResultKind::Sent {
                    apns_id: Some("A\"B".into()),
                },
            },
            DeliveryResult {
                delivery_id: d2,
                kind: ResultKind::Retry {
                    due_at_ms: now + 5,
                    status: Some(500),
                    reason: "InternalServerError".into(),
                    count_attempt: true,
                },
            },
            DeliveryResult {
                delivery_id: d1,
                kind: ResultKind::Retry {
                    due_at_ms: now + 5,
                    status: Some(500),
                    reason: "InternalServerError".into(),
                    count_attempt: true,
                },
            },
            sent(d3),
        ];
        let fin = store.record_results(results).await.unwrap();
        ((d1, d2, d3), fin)
    });
    let fin: Vec<&str> = fin.iter().map(|f| f.ext_id.as_str()).collect();
    assert_eq!(fin, vec!["two"], "`one` still has a queued delivery");
    let r = query::Reader::open(store.path()).unwrap();
    let row = |id: i64| -> (i64, i64, Option<i64>, Option<String>, String) {
        r.conn()
            .query_row(
                "SELECT state, attempts, last_status, last_reason, apns_id
                 FROM deliveries WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap()
    };
    let (s1, a1, st1, r1, apns1) = row(d.0);
    assert_eq!((s1, a1, st1, r1), (1, 1, Some(200), None));
    assert_eq!(apns1, "A\"B");
    let (s2, a2, st2, r2, apns2) = row(d.1);
    assert_eq!((s2, a2, st2), (0, 1, Some(500)));
    assert_eq!(r2.as_deref(), Some("InternalServerError"));
    assert_eq!(apns2.len(), 36, "no apns-id from Apple keeps ours");
    let (s3, _, _, _, apns3) = row(d.2);
    assert_eq!(s3, 1);
    assert_eq!(apns3.len(), 36);
}

#[test]
fn purge_takes_finished_notifications_whole_and_dead_devices_nobody_refers_to() {
    let (_dir, store) = open();
    // tok(5) is registered by a device record; the other tokens are only named in `to`.
    ingest(&store, "d.jsonl", vec![device("a", 5, Some("u"))]);
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("done"), Target::Tokens(vec![tok(1)])),
            notification(Some("half"), Target::Tokens(vec![tok(2), tok(3)])),
            notification(Some("dead"), Target::Tokens(vec![tok(4)])),
            notification(Some("pair"), Target::Tokens(vec![tok(5), tok(6)])),
            notification(Some("later"), Target::Tokens(vec![tok(7)])),
        ],
    );
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 7);
        let results = answers(&claimed, |token| {
            // `half` and `later` keep one delivery queued: they are not finished.
            if token == tok(3) || token == tok(7) {
                ResultKind::Retry {
                    due_at_ms: now + 60_000,
                    status: Some(503),
                    reason: "ServiceUnavailable".into(),
                    count_attempt: true,
                }
            } else if token == tok(4) {
                ResultKind::InvalidToken {
                    status: 410,
                    reason: "Unregistered".into(),
                    invalidated_at_ms: now,
                }
            } else {
                ResultKind::Sent { apns_id: None }
            }
        });
        let fin = record_finished(&store, results).await;
        assert_eq!(fin, vec!["dead", "done", "pair"]);
    });
    // Nothing is old enough yet.
    let none = store
        .purge_blocking(crate::model::now_ms() - 60_000, Some(Vec::new()))
        .unwrap();
    assert_eq!(
        (none.deliveries, none.notifications, none.devices),
        (0, 0, 0)
    );
    let n = store
        .purge_blocking(crate::model::now_ms() + 1, Some(Vec::new()))
        .unwrap();
    assert_eq!(
        n.deliveries, 4,
        "`done`, `dead` and `pair` with their deliveries"
    );
    assert_eq!(n.notifications, 3);
    assert_eq!(
        n.devices, 3,
        "the invalidated device, and the tokens only named in `to` (1, 6), once nothing refers to them"
    );
    let r = query::Reader::open(store.path()).unwrap();
    let count = |sql: &str| -> i64 { r.conn().query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT count(*) FROM notifications WHERE ext_id IN ('half', 'later')"),
        2
    );
    assert_eq!(
        count("SELECT count(*) FROM deliveries"),
        3,
        "`half` whole, and `later`"
    );
    let left: String = r
        .conn()
        .query_row(
            "SELECT group_concat(substr(token, 1, 8), ' ')
             FROM (SELECT token FROM devices ORDER BY id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        left, "00000005 00000002 00000003 00000007",
        "the registered device stays, and those with deliveries left"
    );
    assert_eq!(
        count("SELECT count(*) FROM notification_progress"),
        1,
        "`half`'s; `pair`'s left with it"
    );
}

/// A notification with one delivery keeps no progress row: its delivery's state is its
/// progress. It finishes with that delivery (reported once, shown with the delivery's finish
/// time), and `retry` makes it unfinished again until its next result.
#[test]
fn a_single_delivery_is_its_notifications_progress() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("single"), Target::Tokens(vec![tok(1)])),
            notification(Some("twice"), Target::Tokens(vec![tok(2), tok(2)])),
            notification(Some("pair"), Target::Tokens(vec![tok(3), tok(4)])),
            notification(Some("users"), Target::Users(vec!["u".into()])),
        ],
    );
    let r = query::Reader::open(store.path()).unwrap();
    let rows: Vec<String> = r
        .conn()
        .prepare(
            "SELECT n.ext_id FROM notification_progress p JOIN notifications n USING (id)
             ORDER BY n.id",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec!["pair", "users"],
        "a token named twice is one delivery"
    );
    let finished_at = |id: &str| r.show(id, None, 10).unwrap().unwrap().finished_at;
    assert_eq!(finished_at("single"), None);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 4);
        let results = answers(&claimed, |token| {
            if token == tok(1) {
                ResultKind::Failed {
                    status: Some(400),
                    reason: "BadTopic".into(),
                }
            } else {
                ResultKind::Sent { apns_id: None }
            }
        });
        let fin = record_finished(&store, results).await;
        assert_eq!(fin, vec!["pair", "single", "twice"]);
    });
    assert!(finished_at("single").is_some());
    assert_eq!(
        progress(&store),
        vec![
            ("single".to_string(), 0, true),
            ("twice".to_string(), 0, true),
            ("pair".to_string(), 0, true),
            ("users".to_string(), 1, false),
        ]
    );
    assert_eq!(
        store
            .retry_failed_blocking(Some("single".into()), None)
            .unwrap()
            .deliveries,
        1
    );
    assert_eq!(finished_at("single"), None);
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 1);
        let fin = record_finished(&store, vec![sent(claimed[0].delivery_id)]).await;
        assert_eq!(fin, vec!["single"], "finished again, once");
        let fin = record_finished(&store, vec![sent(claimed[0].delivery_id)]).await;
        assert!(fin.is_empty(), "a second result for it finishes nothing");
    });
    assert!(finished_at("single").is_some());
}

#[test]
fn new_databases_use_8_kib_pages() {
    let (_dir, store) = open();
    let r = query::Reader::open(store.path()).unwrap();
    let size: i64 = r
        .conn()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(size, 8192);
}

#[test]
fn claims_follow_due_order_even_behind_the_cursor() {
    let (_dir, store) = open();
    let recs = one_token_each(10);
    ingest(&store, "n.jsonl", recs);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let first = store.claim_due(now, 4).await.unwrap().deliveries;
        assert_eq!(first.len(), 4);
        // One of them is requeued due a second ago: behind the cursor, which stands after the
        // fourth delivery.
        let back = first[1].delivery_id;
        store
            .record_results(vec![DeliveryResult {
                delivery_id: back,
                kind: ResultKind::held_until(now - 1000, None, "test".into()),
            }])
            .await
            .unwrap();
        let next = store.claim_due(now, 6).await.unwrap().deliveries;
        assert_eq!(next.len(), 6);
        assert_eq!(
            next[0].delivery_id, back,
            "the earliest due comes first, though the walk had passed it"
        );
        // Ten claimed in all, nine of them distinct: only the requeued one came twice.
        let claimed: std::collections::HashSet<i64> =
            first.iter().chain(&next).map(|c| c.delivery_id).collect();
        assert_eq!(claimed.len(), 9, "nothing in flight is claimed twice");
        let last = store.claim_due(now, 6).await.unwrap();
        assert_eq!(last.deliveries.len(), 1, "the tenth");
        assert!(!claimed.contains(&last.deliveries[0].delivery_id));
    });
}

/// What the tables say about an ingest, without times, file names or assigned ids (which
/// differ from run to run): notifications with their progress, devices, deliveries.
fn dump(store: &Store) -> Vec<String> {
    let r = query::Reader::open(store.path()).unwrap();
    let mut out = Vec::new();
    let mut rows = |sql: &str| {
        let mut st = r.conn().prepare(sql).unwrap();
        let n = st.column_count();
        let got: Vec<String> = st
            .query_map([], |row| {
                let cols: Vec<String> = (0..n)
                    .map(|i| match row.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Null => "NULL".to_string(),
                        rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                        rusqlite::types::ValueRef::Text(t) => {
                            let t = String::from_utf8_lossy(t).into_owned();
                            // An assigned id: a UUID.
                            if uuid::Uuid::parse_str(&t).is_ok() {
                                "<uuid>".to_string()
                            } else {
                                t
                            }
                        }
                        other => format!("{other:?}"),
                    })
                    .collect();
                Ok(cols.join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        out.extend(got);
    };
    rows(
        "SELECT n.id, app, ext_id, target_kind, target, payload, push_type, priority, topic,
                collapse_id, expiration, fanned_out, s.pending, s.finished_at IS NULL
         FROM notifications n JOIN notification_status s USING (id) ORDER BY n.id",
    );
    rows(
        "SELECT id, app, token, user, environment, registered, active, invalidated_at
         FROM devices ORDER BY id",
    );
    rows(
        "SELECT id, notification_id, device_id, state, attempts, length(apns_id)
         FROM deliveries ORDER BY id",
    );
    out
}

/// Long runs of notifications are written a batch at a time (one statement for many rows),
/// everything else record by record. Both must leave the same tables and report the same
/// duplicates: here one file of 230 records, with the ids it gives repeating within a batch
/// and across files, a batch of new tokens and one of known and new ones, tokens repeated
/// within a notification, two apps, every kind of target and device records cutting the
/// runs, against the same records ingested one file each (always record by record).
#[test]
fn batched_ingest_writes_what_record_by_record_ingest_writes() {
    let recs: Vec<Record> = (0..230u32)
        .map(|i| {
            if i % 100 == 7 {
                return device("a", 1000 + i, Some("u1"));
            }
            let id = match i {
                // Twice within one batch.
                20 | 50 => Some("twice".to_string()),
                _ => (i % 3 == 0).then(|| format!("id{}", i % 37)),
            };
            let target = if i % 11 == 0 {
                Target::Users(vec!["u1".into()])
            } else if i % 13 == 0 {
                Target::All
            } else {
                // The first full batch (records 8 to 71) names new tokens only, the second
                // (from 108) known and new ones; record 2 a registered one.
                let t = match i {
                    2 => 5,
                    0..108 => 100 + i,
                    _ => 40 + i,
                };
                if i % 4 == 0 {
                    Target::Tokens(vec![tok(t), tok(t + 5000), tok(t), tok(t + 6000)])
                } else {
                    Target::Tokens(vec![tok(t)])
                }
            };
            let Record::Notification(n) = notification(id.as_deref(), target) else {
                unreachable!()
            };
            let sandbox = i % 7 == 0;
            Record::Notification(NotificationRecord {
                app: if sandbox { "b" } else { "a" }.into(),
                environment: if sandbox {
                    Environment::Sandbox
                } else {
                    Environment::Production
                },
                payload: format!(r#"{{"aps":{{"alert":"n {i}"}}}}"#),
                ..n
            })
        })
        .collect();
    let before = || {
        let mut pre: Vec<Record> = (0..20).map(|i| device("a", i, Some("u1"))).collect();
        pre.push(notification(Some("id5"), Target::Tokens(vec![tok(3)])));
        file("pre.json", pre)
    };

    let (_d1, batched) = open();
    batched.ingest(vec![before()]).unwrap();
    let out = batched
        .ingest(vec![file("all.jsonl", recs.clone())])
        .unwrap();
    let (_d2, single) = open();
    single.ingest(vec![before()]).unwrap();
    let mut queued = 0;
    let mut duplicates = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let o = single
            .ingest(vec![file(&format!("r{i:03}.json"), vec![r.clone()])])
            .unwrap();
        queued += o[0].notifications_queued;
        duplicates.extend(o[0].duplicates.iter().map(|d| (i, d.id.clone())));
    }
    assert_eq!(out[0].notifications_queued, queued);
    let found: Vec<(usize, String)> = out[0]
        .duplicates
        .iter()
        .map(|d| (d.record, d.id.clone()))
        .collect();
    assert_eq!(found, duplicates);
    assert!(duplicates.len() > 10, "the ids repeat: {duplicates:?}");
    assert!(
        duplicates.contains(&(153, "id5".to_string())),
        "taken before"
    );
    assert!(
        duplicates.contains(&(50, "twice".to_string())),
        "taken in the batch"
    );
    assert_eq!(dump(&batched), dump(&single));
}

/// Results for runs of consecutive deliveries are written a run at a time, and so are the
/// pending counts of runs of notifications: a run with a delivery ended behind the sender's
/// back is written row by row instead, and a notification with a delivery still in flight
/// inside a run of finished ones stays unfinished.
#[test]
fn runs_of_sent_results_count_like_single_ones() {
    let (_dir, store) = open();
    let mut recs = one_token_each(11);
    recs.insert(
        5,
        notification(Some("multi"), Target::Tokens(vec![tok(20), tok(21)])),
    );
    ingest(&store, "n.jsonl", recs);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claimed = store.claim_due(now, 20).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 13);
        let id = |t: u32| delivery_to(&claimed, t);
        fail_behind_senders_back(&store, id(8));
        let all_but_21: Vec<DeliveryResult> = claimed
            .iter()
            .filter(|c| c.device.token != tok(21))
            .map(|c| sent(c.delivery_id))
            .collect();
        let fin = record_finished(&store, all_but_21).await;
        let mut want: Vec<String> = (0..11)
            .filter(|&i| i != 8)
            .map(|i| format!("n{i}"))
            .collect();
        want.sort();
        assert_eq!(fin, want, "n8 was not queued any more; multi has one to go");
        let fin = store.record_results(vec![sent(id(21))]).await.unwrap();
        assert_eq!(fin[0].ext_id, "multi");
    });
    // Every notification is over now: n8's one delivery was ended behind the sender's back,
    // and a single delivery's state is its notification's progress (no progress row).
    let progress = progress(&store);
    let r = query::Reader::open(store.path()).unwrap();
    assert_eq!(progress.len(), 12);
    for (ext_id, pending, finished) in progress {
        assert_eq!((pending, finished), (0, true), "{ext_id}");
    }
    let states: Vec<i64> = r
        .conn()
        .prepare("SELECT state FROM deliveries ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(states.iter().filter(|&&s| s == 1).count(), 12);
    assert_eq!(
        states.iter().filter(|&&s| s == 2).count(),
        1,
        "n8's not overwritten"
    );
}

#[test]
fn processes_opening_a_new_database_at_once_migrate_it_once() {
    // The daemon's first start and an operator's `pushdrop status` may create the database
    // together; before migrations took the write lock first, one of them failed with "table
    // devices already exists" about every other time.
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let path = dir.path().join(format!("race-{round}.db"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    writer::open_write_connection(&path).map(|_| ())
                })
            })
            .collect();
        for o in openers {
            o.join().unwrap().unwrap();
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::SCHEMA_VERSION);
    }
}

#[test]
fn a_purge_by_another_process_does_not_leave_the_daemon_a_stale_notification() {
    // `pushdrop purge` beside the daemon deletes every finished notification; SQLite then
    // hands the next notification the id of the last one purged. The daemon's writer keeps
    // the shared data of notifications it claimed, and must not send the old payload: it
    // drops a notification's entry when the notification finishes, and only finished ones
    // are purged.
    let (dir, store) = open();
    let with_payload = |id: &str, alert: &str| {
        let mut n = notification(Some(id), Target::Tokens(vec![tok(1)]));
        if let Record::Notification(r) = &mut n {
            r.payload = format!(r#"{{"aps":{{"alert":"{alert}"}}}}"#);
        }
        n
    };
    ingest(&store, "old.json", vec![with_payload("old", "old news")]);
    let rt = rt();
    let now = crate::model::now_ms() + 1;
    let old = rt.block_on(store.claim_due(now, 10)).unwrap().deliveries;
    assert_eq!(
        &old[0].notification.payload[..],
        br#"{"aps":{"alert":"old news"}}"#
    );
    rt.block_on(store.record_results(vec![sent(old[0].delivery_id)]))
        .unwrap();
    let old_nid: i64 = rusqlite::Connection::open(dir.path().join("db/p.db"))
        .unwrap()
        .query_row(
            "SELECT id FROM notifications WHERE ext_id = 'old'",
            [],
            |r| r.get(0),
        )
        .unwrap();

    // Another process (its own connection) purges everything finished.
    let cli = Store::open(&dir.path().join("db/p.db"), false).unwrap();
    let purged = cli
        .purge_blocking(crate::model::now_ms() + 60_000, Some(Vec::new()))
        .unwrap();
    assert_eq!(purged.notifications, 1);
    drop(cli);

    ingest(&store, "new.json", vec![with_payload("new", "fresh")]);
    // The id was indeed reused.
    let ro = rusqlite::Connection::open(dir.path().join("db/p.db")).unwrap();
    let nid: i64 = ro
        .query_row(
            "SELECT id FROM notifications WHERE ext_id = 'new'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(nid, old_nid);
    let new = rt
        .block_on(store.claim_due(crate::model::now_ms() + 1, 10))
        .unwrap()
        .deliveries;
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].notification.ext_id, "new");
    assert_eq!(
        &new[0].notification.payload[..],
        br#"{"aps":{"alert":"fresh"}}"#
    );
}

/// The first column of `sql`'s rows, as text, read through a connection of its own.
fn texts(store: &Store, sql: &str) -> Vec<String> {
    query::Reader::open(store.path())
        .unwrap()
        .conn()
        .prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The state of the delivery of notification `ext_id` (single-token notifications).
fn delivery_state(store: &Store, ext_id: &str) -> i64 {
    query::Reader::open(store.path())
        .unwrap()
        .conn()
        .query_row(
            "SELECT d.state FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE n.ext_id = ?1",
            [ext_id],
            |r| r.get(0),
        )
        .unwrap()
}

/// Deliveries a file commits are handed to the sender without a read back; one whose device
/// Apple declares dead in the meantime must still end `invalid_token` unsent, as a claim from
/// the queue would end it.
#[test]
fn a_handed_off_delivery_to_a_device_invalidated_meanwhile_is_not_sent() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("first"), Target::Tokens(vec![tok(1)])),
            notification(Some("second"), Target::Tokens(vec![tok(1)])),
            notification(Some("other"), Target::Tokens(vec![tok(2)])),
        ],
    );
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let first = store.claim_due(now, 1).await.unwrap().deliveries;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].device.token, tok(1));
        store
            .record_results(answers(&first, |_| ResultKind::InvalidToken {
                status: 410,
                reason: "Unregistered".into(),
                invalidated_at_ms: now,
            }))
            .await
            .unwrap();
        let claim = store.claim_due(now, 10).await.unwrap();
        let tokens: Vec<&str> = claim
            .deliveries
            .iter()
            .map(|c| c.device.token.as_str())
            .collect();
        assert_eq!(tokens, vec![tok(2)], "nothing more for the dead token");
        let finished: Vec<&str> = claim.finished.iter().map(|f| f.ext_id.as_str()).collect();
        assert_eq!(finished, vec!["second"]);
    });
    assert_eq!(
        delivery_state(&store, "second"),
        DeliveryState::InvalidToken as i64
    );
}

/// A fan-out that finds no active device for a listed user, or none at all for a broadcast,
/// says so (a log line and an `unreached` event in `status`): a misspelt user id does not
/// pass unseen.
#[test]
fn a_fan_out_that_reaches_nobody_says_so() {
    let (_dir, store) = open();
    ingest(&store, "d.jsonl", vec![device("a", 1, Some("alice"))]);
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(
                Some("users"),
                Target::Users(vec![
                    "alice".into(),
                    "ghost".into(),
                    r#"zz event="delivery""#.into(),
                ]),
            ),
            notification(Some("known"), Target::Users(vec!["alice".into()])),
        ],
    );
    let events = |store: &Store| {
        texts(
            store,
            "SELECT message FROM events WHERE kind = 'unreached' ORDER BY id",
        )
    };
    let rt = rt();
    let now = crate::model::now_ms() + 1;
    assert_eq!(rt.block_on(store.fan_out_due(now, 1000)).unwrap().0, 2);
    let said = events(&store);
    assert_eq!(said.len(), 1, "{said:?}");
    // Each user quoted: a user id cannot pass for a field of the text log line.
    assert!(
        said[0].contains("notification users")
            && said[0].contains(r#"users "ghost", "zz event=\"delivery\"" (not"#),
        "{said:?}"
    );
    // An app with no active device at all: a broadcast reaches nobody.
    let (_dir2, empty) = open();
    ingest(&empty, "b.json", vec![notification(Some("b"), Target::All)]);
    let now = crate::model::now_ms() + 1;
    assert_eq!(rt.block_on(empty.fan_out_due(now, 1000)).unwrap().0, 0);
    let said = events(&empty);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("no active device"), "{said:?}");
}

/// A committed file still in the inbox (its move failed) keeps its record through a purge
/// however old, or the next look would take it again as a new file; so does every record
/// when the inbox could not be listed.
#[test]
fn the_purge_keeps_the_record_of_a_committed_file_still_in_the_inbox() {
    let (_dir, store) = open();
    store
        .ingest(vec![
            file("stuck.json", vec![device("a", 1, None)]),
            file("moved.json", vec![device("a", 2, None)]),
        ])
        .unwrap();
    let records = |store: &Store| texts(store, "SELECT name FROM committed_files ORDER BY name");
    let later = crate::model::now_ms() + 60_000;
    let n = store.purge_blocking(later, None).unwrap();
    assert_eq!(n.committed_files, 0, "an unlisted inbox keeps every record");
    let n = store
        .purge_blocking(later, Some(vec!["stuck.json".into()]))
        .unwrap();
    assert_eq!(n.committed_files, 1);
    assert_eq!(records(&store), vec!["stuck.json"]);
}

fn unregister(i: u32) -> Record {
    Record::Device(DeviceRecord {
        app: "a".into(),
        token: tok(i),
        user: None,
        environment: Environment::Production,
        action: DeviceAction::Unregister,
    })
}

/// A device record that unregisters a device ends the deliveries queued for it before, also
/// those handed to the sender and waiting: `failed`, unsent (the user signed out; an operator
/// can stop sends to a dead token). A notification naming the token after that is sent.
#[test]
fn deliveries_queued_for_a_device_unregistered_since_are_not_sent() {
    let (_dir, store) = open();
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("before"), Target::Tokens(vec![tok(1)])),
            notification(Some("other"), Target::Tokens(vec![tok(2)])),
        ],
    );
    // Later than the notifications' creation, at millisecond resolution.
    std::thread::sleep(std::time::Duration::from_millis(5));
    ingest(&store, "gone.jsonl", vec![unregister(1)]);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let claim = store.claim_due(now, 10).await.unwrap();
        let tokens: Vec<&str> = claim
            .deliveries
            .iter()
            .map(|c| c.device.token.as_str())
            .collect();
        assert_eq!(tokens, vec![tok(2)], "nothing for the unregistered device");
        let ended: Vec<(&str, DeliveryState, &str)> = claim
            .ended
            .iter()
            .map(|e| {
                (
                    e.delivery.notification.ext_id.as_str(),
                    e.state,
                    e.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ended,
            vec![("before", DeliveryState::Failed, writer::UNREGISTERED_UNSENT)]
        );
    });
    assert_eq!(
        delivery_state(&store, "before"),
        DeliveryState::Failed as i64
    );
    ingest(
        &store,
        "again.jsonl",
        vec![notification(Some("after"), Target::Tokens(vec![tok(1)]))],
    );
    let claimed = rt
        .block_on(store.claim_due(crate::model::now_ms() + 1, 10))
        .unwrap()
        .deliveries;
    assert_eq!(claimed.len(), 1, "named since the unregistration: sent");
    assert_eq!(claimed[0].notification.ext_id, "after");
}

/// In one file (or files committed in the same millisecond), the order of the records is
/// the order of events: a notification before the removal is not sent, one after it is.
#[test]
fn a_removal_and_notifications_in_one_file_keep_their_order() {
    let (_dir, store) = open();
    ingest(
        &store,
        "one.jsonl",
        vec![
            device("a", 3, None),
            device("a", 4, None),
            notification(Some("early"), Target::Tokens(vec![tok(3)])),
            unregister(3),
            notification(Some("late"), Target::Tokens(vec![tok(3)])),
        ],
    );
    // No pause: the next file's transaction may fall in the same millisecond.
    ingest(&store, "gone.jsonl", vec![unregister(4)]);
    ingest(
        &store,
        "next.jsonl",
        vec![notification(Some("next"), Target::Tokens(vec![tok(4)]))],
    );
    let rt = rt();
    let claim = rt
        .block_on(store.claim_due(crate::model::now_ms() + 10, 10))
        .unwrap();
    let mut sent: Vec<&str> = claim
        .deliveries
        .iter()
        .map(|c| c.notification.ext_id.as_str())
        .collect();
    sent.sort_unstable();
    assert_eq!(sent, ["late", "next"]);
    let ended: Vec<&str> = claim
        .ended
        .iter()
        .map(|e| e.delivery.notification.ext_id.as_str())
        .collect();
    assert_eq!(ended, ["early"]);
}

/// A device registered in the same commit as a notification naming it, after that
/// notification: its delivery goes out to the environment the registration gave it.
#[test]
fn a_registration_after_a_notification_in_the_same_commit_decides_its_environment() {
    let (_dir, store) = open();
    let Record::Device(mut sandbox) = device("a", 5, None) else {
        unreachable!()
    };
    sandbox.environment = Environment::Sandbox;
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("n"), Target::Tokens(vec![tok(5)])),
            Record::Device(sandbox),
        ],
    );
    let claimed = rt()
        .block_on(store.claim_due(crate::model::now_ms() + 1, 10))
        .unwrap()
        .deliveries;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].device.environment, Environment::Sandbox);
}

/// A hand-off whose notification expires before the sender takes it ends `expired`, unsent.
#[test]
fn a_handed_off_delivery_that_expires_before_it_is_taken_ends_expired() {
    let (_dir, store) = open();
    let mut n = notification(Some("soon"), Target::Tokens(vec![tok(3)]));
    if let Record::Notification(n) = &mut n {
        n.expiration = Some(crate::model::now_ms() / 1000 + 2);
    }
    ingest(&store, "e.json", vec![n]);
    let claim = rt()
        .block_on(store.claim_due(crate::model::now_ms() + 5_000, 10))
        .unwrap();
    assert!(claim.deliveries.is_empty());
    assert_eq!(claim.finished.len(), 1);
    assert_eq!(
        delivery_state(&store, "soon"),
        DeliveryState::Expired as i64
    );
}

/// A file with more deliveries due than the writer hands over: the rest come from the queue,
/// each delivery is claimed once, and a retry due now comes before the waiting hand-offs.
#[test]
fn a_file_beyond_the_hand_off_limit_is_claimed_once_each_and_retries_come_first() {
    let (_dir, store) = open();
    let n = writer::HANDOFF_MAX as u32 + 150;
    let recs = one_token_each(n);
    ingest(&store, "big.jsonl", recs);
    let rt = rt();
    rt.block_on(async {
        let now = crate::model::now_ms() + 1;
        let mut seen = std::collections::HashSet::new();
        let first = store.claim_due(now, 50).await.unwrap().deliveries;
        assert_eq!(first.len(), 50);
        seen.extend(first.iter().map(|c| c.delivery_id));
        // One back to the queue, due before the file's deliveries; the rest sent.
        let back = first[7].delivery_id;
        let results = first
            .iter()
            .map(|c| match c.delivery_id {
                id if id == back => DeliveryResult {
                    delivery_id: id,
                    kind: ResultKind::held_until(now - 60_000, Some(503), "test".into()),
                },
                id => sent(id),
            })
            .collect();
        store.record_results(results).await.unwrap();
        let next = store.claim_due(now, 50).await.unwrap().deliveries;
        assert_eq!(next[0].delivery_id, back, "the retry before the hand-offs");
        let mut all = next;
        seen.remove(&back);
        loop {
            for c in &all {
                assert!(
                    seen.insert(c.delivery_id),
                    "claimed twice: {}",
                    c.delivery_id
                );
            }
            store
                .record_results(all.iter().map(|c| sent(c.delivery_id)).collect())
                .await
                .unwrap();
            all = store.claim_due(now, 50).await.unwrap().deliveries;
            if all.is_empty() {
                break;
            }
        }
        assert_eq!(seen.len(), n as usize);
    });
    assert!(
        progress(&store)
            .iter()
            .all(|(_, pending, done)| *pending == 0 && *done)
    );
}

/// The same id in two apps: `show` without an app says so instead of showing one of them.
#[test]
fn show_names_the_apps_of_an_id_that_two_apps_use() {
    let (_dir, store) = open();
    let mut other = notification(Some("same"), Target::Tokens(vec![tok(2)]));
    if let Record::Notification(n) = &mut other {
        n.app = "b".into();
    }
    ingest(
        &store,
        "n.jsonl",
        vec![
            notification(Some("same"), Target::Tokens(vec![tok(1)])),
            other,
        ],
    );
    let r = query::Reader::open(store.path()).unwrap();
    match r.show("same", None, 10) {
        Err(StoreError::AmbiguousId { apps, .. }) => assert_eq!(apps, "a, b"),
        other => panic!("{other:?}"),
    }
    let b = r.show("same", Some("b"), 10).unwrap().unwrap();
    assert_eq!(b.app, "b");
    // `retry` likewise: it needs the app, and then touches only that app's notification.
    match store.retry_failed_blocking(Some("same".into()), None) {
        Err(StoreError::AmbiguousId { apps, .. }) => assert_eq!(apps, "a, b"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.retry_failed_blocking(Some("same".into()), Some("c".into())),
        Err(StoreError::UnknownNotification(_))
    ));
    assert_eq!(
        store
            .retry_failed_blocking(Some("same".into()), Some("b".into()))
            .unwrap()
            .deliveries,
        0
    );
}

/// `retry --failed --app b`: only app b's failed deliveries go back to the queue.
#[test]
fn retry_of_all_failed_deliveries_may_be_limited_to_one_app() {
    let (_dir, store) = open();
    let mut records = Vec::new();
    for (app, id, tokens) in [
        ("a", "a-1", vec![tok(1)]),
        ("b", "b-1", vec![tok(2)]),
        ("b", "b-2", vec![tok(3), tok(4)]),
    ] {
        let mut n = notification(Some(id), Target::Tokens(tokens));
        if let Record::Notification(n) = &mut n {
            n.app = app.into();
        }
        records.push(n);
    }
    ingest(&store, "n.jsonl", records);
    rt().block_on(async {
        let claimed = store
            .claim_due(crate::model::now_ms() + 1, 10)
            .await
            .unwrap()
            .deliveries;
        assert_eq!(claimed.len(), 4);
        let failed = claimed
            .iter()
            .map(|c| DeliveryResult {
                delivery_id: c.delivery_id,
                kind: ResultKind::Failed {
                    status: Some(400),
                    reason: "BadTopic".into(),
                },
            })
            .collect();
        store.record_results(failed).await.unwrap();
    });
    assert_eq!(
        store
            .retry_failed_blocking(None, Some("b".into()))
            .unwrap()
            .deliveries,
        3
    );
    let c = rusqlite::Connection::open(store.path()).unwrap();
    let queued: Vec<String> = c
        .prepare(
            "SELECT n.ext_id FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.state = 0 ORDER BY d.id",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(queued, ["b-1", "b-2", "b-2"]);
    // b-2 is unfinished again, with both its deliveries pending.
    assert!(
        progress(&store)
            .iter()
            .any(|(_, pending, done)| *pending == 2 && !*done)
    );
    assert_eq!(
        store.retry_failed_blocking(None, None).unwrap().deliveries,
        1
    );
}

/// The start-up receipt sweep's query: finished notifications within a time window, single
/// deliveries (no progress row) and multi-delivery ones alike, page by page in (app, id)
/// order; unfinished ones and those finished before the window are left out.
#[test]
fn finished_between_pages_through_finished_notifications_of_a_window() {
    let (_dir, store) = open();
    let mut records: Vec<Record> = (0..7)
        .map(|i| notification(Some(&format!("one-{i}")), Target::Tokens(vec![tok(i)])))
        .collect();
    records.push(notification(
        Some("pair"),
        Target::Tokens(vec![tok(10), tok(11)]),
    ));
    records.push(notification(
        Some("open-pair"),
        Target::Tokens(vec![tok(12), tok(13)]),
    ));
    records.push(notification(Some("queued"), Target::Tokens(vec![tok(14)])));
    ingest(&store, "n.jsonl", records);
    let start = crate::model::now_ms();
    rt().block_on(async {
        let claimed = store
            .claim_due(crate::model::now_ms() + 1, 100)
            .await
            .unwrap()
            .deliveries;
        let results = claimed
            .iter()
            .filter(|c| c.device.token != tok(13) && c.device.token != tok(14))
            .map(|c| sent(c.delivery_id))
            .collect();
        record_finished(&store, results).await;
    });
    let end = crate::model::now_ms();
    // One of them finished long ago, before the window.
    rusqlite::Connection::open(store.path())
        .unwrap()
        .execute(
            "UPDATE deliveries SET finished_at = 5 WHERE notification_id =
                (SELECT id FROM notifications WHERE ext_id = 'one-6')",
            [],
        )
        .unwrap();
    let r = query::Reader::open(store.path()).unwrap();
    let mut seen = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let key = after.as_ref().map(|(a, i)| (a.as_str(), i.as_str()));
        let page = r.finished_between(start, end, key, 3).unwrap();
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|f| f.ext_id.clone()));
        match page.last() {
            Some(l) if page.len() == 3 => after = Some((l.app.clone(), l.ext_id.clone())),
            _ => break,
        }
    }
    assert_eq!(
        seen,
        ["one-0", "one-1", "one-2", "one-3", "one-4", "one-5", "pair"]
    );
    assert!(r.finished_between(0, start - 1, None, 10).unwrap().len() == 1);
}

/// `show` gives the payload as stored and sent (SPEC §2, "sent as is"): key order, number
/// spelling and escapes are the dropper's, not re-serialised.
#[test]
fn show_gives_the_payload_as_sent() {
    let (_dir, store) = open();
    let text = r#"{"z": 1, "aps": {"alert": "caf\u00e9 \/ x", "badge": 1.50}, "big": 12345678901234567890123}"#;
    let Record::Notification(mut n) = notification(Some("asis"), Target::Tokens(vec![tok(1)]))
    else {
        unreachable!()
    };
    n.payload = text.into();
    ingest(&store, "p.json", vec![Record::Notification(n)]);
    let r = query::Reader::open(store.path()).unwrap();
    let shown = r.show("asis", None, 10).unwrap().unwrap();
    assert_eq!(shown.payload.get(), text);
    // The target, structured for scripts.
    assert_eq!(shown.to, serde_json::json!({ "tokens": [tok(1)] }));
    let json = serde_json::to_string(&shown).unwrap();
    assert!(json.contains(text), "{json}");
}

/// Registering again without `user` keeps the device's user, but not after an unregister:
/// a phone that signed out and registered again anonymously is no longer the old user's.
#[test]
fn a_registration_without_user_keeps_it_unless_the_device_was_unregistered() {
    let (_dir, store) = open();
    ingest(
        &store,
        "reg.jsonl",
        vec![device("a", 1, Some("carol")), device("a", 2, Some("carol"))],
    );
    ingest(&store, "out.jsonl", vec![unregister(1)]);
    ingest(
        &store,
        "again.jsonl",
        vec![device("a", 1, None), device("a", 2, None)],
    );
    let carols: Vec<(String, &str)> = query::Reader::open(store.path())
        .unwrap()
        .devices(&query::DeviceQuery {
            app: None,
            user: Some("carol".into()),
            invalid_only: false,
            limit: 10,
        })
        .unwrap()
        .into_iter()
        .map(|d| (d.token, d.state))
        .collect();
    assert_eq!(carols, vec![(tok(2), "active")]);
}

/// A start makes the held deliveries due, says how many, and names the apps and environments
/// a `BadDeviceToken` burst was holding (their config is still in doubt). A retry that
/// spent an attempt keeps its back-off.
#[test]
fn release_held_makes_held_deliveries_due_and_names_bursts() {
    let (_dir, store) = open();
    let recs = one_token_each(3);
    ingest(&store, "n.jsonl", recs);
    let rt = rt();
    let later = crate::model::now_ms() + 600_000;
    rt.block_on(async {
        let claimed = store
            .claim_due(crate::model::now_ms() + 1, 3)
            .await
            .unwrap()
            .deliveries;
        let kinds = [
            ResultKind::held_until(later, Some(400), "BadDeviceToken".into()),
            ResultKind::held_until(later, Some(403), "InvalidProviderToken".into()),
            ResultKind::Retry {
                due_at_ms: later,
                status: Some(503),
                reason: "ServiceUnavailable".into(),
                count_attempt: true,
            },
        ];
        let results = claimed
            .iter()
            .zip(kinds)
            .map(|(c, kind)| DeliveryResult {
                delivery_id: c.delivery_id,
                kind,
            })
            .collect();
        store.record_results(results).await.unwrap();
    });
    let released = store.release_held_blocking().unwrap();
    assert_eq!(released.deliveries, 2);
    assert_eq!(
        released.bursts,
        vec![("a".to_string(), Environment::Production)]
    );
    let due = rt
        .block_on(store.claim_due(crate::model::now_ms() + 1, 10))
        .unwrap()
        .deliveries;
    assert_eq!(due.len(), 2, "the 503's back-off stands");
}

/// "database is locked" says what it means for pushdrop: another process held the write lock
/// longer than the 10 s every writer waits.
#[test]
fn a_locked_database_says_who_holds_it() {
    let busy = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error {
            code: rusqlite::ErrorCode::DatabaseBusy,
            extended_code: 5,
        },
        None,
    );
    let said = StoreError::Sqlite(busy).to_string();
    assert!(said.contains("locked"), "{said}");
    assert!(
        said.contains("held the database's write lock for more than 10 s"),
        "{said}"
    );
    let other = StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows).to_string();
    assert!(!other.contains("write lock"), "{other}");
}

/// A step of the system clock backwards does not make a retry wait as long again as the step:
/// the waits set before it move back by as much. A `send_at` stays where the dropper put it.
#[test]
fn a_clock_step_backwards_moves_the_waits_set_before_it() {
    let (_dir, store) = open();
    let now = crate::model::now_ms();
    let mut later = notification(Some("later"), Target::Tokens(vec![tok(2)]));
    if let Record::Notification(n) = &mut later {
        n.send_at_ms = Some(now + 7_200_000);
    }
    ingest(
        &store,
        "n.jsonl",
        vec![notification(Some("r"), Target::Tokens(vec![tok(1)])), later],
    );
    rt().block_on(async {
        let claimed = store.claim_due(now, 10).await.unwrap().deliveries;
        assert_eq!(claimed.len(), 1);
        let retry = ResultKind::Retry {
            due_at_ms: now + 60_000,
            status: Some(503),
            reason: "ServiceUnavailable".into(),
            count_attempt: true,
        };
        store
            .record_results(vec![DeliveryResult {
                delivery_id: claimed[0].delivery_id,
                kind: retry,
            }])
            .await
            .unwrap();
        // A claim with the clock as it was; then it steps an hour back: the retry is due a
        // minute from the new now.
        assert!(
            store
                .claim_due(now, 10)
                .await
                .unwrap()
                .deliveries
                .is_empty()
        );
        let stepped = now - 3_600_000;
        let c = store.claim_due(stepped, 10).await.unwrap();
        assert!(c.deliveries.is_empty());
        let next = c.idle_until.flatten().expect("something is due later");
        assert!(
            (stepped + 55_000..=stepped + 60_000).contains(&next),
            "{}",
            next - stepped
        );
        let c = store.claim_due(stepped + 61_000, 10).await.unwrap();
        assert_eq!(c.deliveries.len(), 1, "the retry, a minute later");
        // A small step (a minute back) counts as much; a wait set after the last claim, maybe
        // at the stepped clock already, is left as it is.
        let at = stepped + 61_000;
        let retry = |due| ResultKind::Retry {
            due_at_ms: due,
            status: Some(503),
            reason: "ServiceUnavailable".into(),
            count_attempt: true,
        };
        store
            .record_results(vec![DeliveryResult {
                delivery_id: c.deliveries[0].delivery_id,
                kind: retry(at + 5_000),
            }])
            .await
            .unwrap();
        let c = store.claim_due(at - 60_000, 10).await.unwrap();
        let next = c.idle_until.flatten().unwrap();
        assert_eq!(next, at + 5_000, "set since the last claim: kept");
        // Another minute back: now it was set before the last claim, and moves with it.
        let c = store.claim_due(at - 120_000, 10).await.unwrap();
        let next = c.idle_until.flatten().unwrap();
        assert!(
            (at - 56_000..=at - 55_000).contains(&next),
            "moved back a minute: {}",
            next - at
        );
    });
    let c = rusqlite::Connection::open(store.path()).unwrap();
    let due: i64 = c
        .query_row(
            "SELECT d.due_at FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE n.ext_id = 'later'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        due,
        now + 7_200_000,
        "send_at is the dropper's wall-clock time"
    );
}
