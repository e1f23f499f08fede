//! `pushdrop backup DEST` against the real daemon binary while it sends: every copy is a
//! consistent SQLite database, whatever moment it was taken.

mod common;

use std::time::{Duration, Instant};

use common::ops::{APP, Ops, OpsOptions, device, open_ro, pushdrop_cmd, spawn_logged, wait_for};
use pushdrop::simulator::SimOptions;

const DEVICES: u64 = 2000;
const BROADCASTS: u64 = 2;
const TOTAL: i64 = (DEVICES * BROADCASTS) as i64;

/// What one copy holds.
#[derive(Debug)]
struct Copy {
    deliveries: i64,
    sent: i64,
}

fn check_copy(path: &std::path::Path) -> Copy {
    let db = open_ro(path);
    let one = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).expect(sql) };
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok", "{}", path.display());
    let mut fk = db.prepare("PRAGMA foreign_key_check").unwrap();
    assert_eq!(
        fk.query_map([], |_| Ok(())).unwrap().count(),
        0,
        "dangling references in {}",
        path.display()
    );
    assert_eq!(
        one("PRAGMA user_version"),
        pushdrop::store::SCHEMA_VERSION,
        "a copy opens with the same schema"
    );
    assert_eq!(one("SELECT count(*) FROM devices"), DEVICES as i64);
    assert_eq!(one("SELECT count(*) FROM notifications"), BROADCASTS as i64);
    let deliveries = one("SELECT count(*) FROM deliveries");
    assert!(deliveries <= TOTAL, "{deliveries}");
    // Every delivery belongs to a device and notification of the copy.
    assert_eq!(
        one(
            "SELECT count(*) FROM deliveries d LEFT JOIN devices v ON v.id = d.device_id LEFT JOIN notifications n ON n.id = d.notification_id WHERE v.id IS NULL OR n.id IS NULL"
        ),
        0
    );
    Copy {
        deliveries,
        sent: one("SELECT count(*) FROM deliveries WHERE state = 1"),
    }
}

#[test]
fn backup_while_sending_gives_consistent_copies() {
    // Slow enough an APNs that sending takes a few seconds.
    let env = Ops::new(OpsOptions {
        admin: String::new(),
        max_in_flight: 20,
        sim: SimOptions {
            latency: Duration::from_millis(20),
            ..SimOptions::default()
        },
        ..OpsOptions::default()
    });
    let mut daemon = spawn_logged(
        pushdrop_cmd(&env.config_path).arg("run"),
        &env.dir.path().join("daemon.out"),
    );
    let daemon_log = || std::fs::read_to_string(env.dir.path().join("daemon.out")).unwrap();

    let devices: String = (0..DEVICES).map(|n| device(n, "u") + "\n").collect();
    env.drop_file("a-devices.jsonl", devices);
    wait_for("devices ingested", || env.inbox_pending() == 0);
    for b in 0..BROADCASTS {
        env.drop_file(
            &format!("b-{b}.json"),
            format!(
                r#"{{"type":"notification","id":"all-{b}","app":"{APP}","to":{{"all":true}},"payload":{{"aps":{{"alert":"hi {b}"}}}}}}"#
            ),
        );
    }
    let sent_now = || env.count("SELECT count(*) FROM deliveries WHERE state = 1");
    wait_for("sending under way", || sent_now() > 0);

    // Backups one after another while the daemon sends, a bounded number of them.
    let mut copies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..6 {
        let dest = env.dir.path().join(format!("backup-{i}.db"));
        let out = env.pushdrop(&["backup", dest.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        copies.push(check_copy(&dest));
        if copies.last().unwrap().sent == TOTAL || Instant::now() > deadline {
            break;
        }
    }
    eprintln!("copies: {copies:?}");
    assert!(
        copies.iter().any(|c| c.sent > 0 && c.sent < TOTAL),
        "no copy was taken mid-send: {copies:?}"
    );
    assert!(
        copies
            .windows(2)
            .all(|w| w[0].sent <= w[1].sent && w[0].deliveries <= w[1].deliveries),
        "later copies never hold less: {copies:?}"
    );

    // A copy holds the device registry: its owner alone may read it, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.dir.path().join("backup-0.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // A backup never overwrites a file.
    let existing = env.dir.path().join("backup-0.db");
    let before = std::fs::read(&existing).unwrap();
    let out = env.pushdrop(&["backup", existing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    assert_eq!(std::fs::read(&existing).unwrap(), before);

    wait_for("everything sent", || sent_now() == TOTAL);
    assert_eq!(env.sim.accepted_count(), TOTAL as u64);
    let mut child = daemon.take();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", daemon_log());
    // The final state, copied after the daemon stopped, is complete.
    let dest = env.dir.path().join("backup-final.db");
    let out = env.pushdrop(&["backup", dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let last = check_copy(&dest);
    assert_eq!((last.deliveries, last.sent), (TOTAL, TOTAL));
}

/// A backup of a database that does not exist (a mistyped `store.path`, a daemon that never
/// ran) is refused instead of passing an empty copy off as one.
#[test]
fn a_backup_of_no_database_is_refused() {
    let env = Ops::new(OpsOptions {
        admin: String::new(),
        ..OpsOptions::default()
    });
    assert!(!env.db.exists());
    let dest = env.dir.path().join("copy.db");
    let out = env.pushdrop(&["backup", dest.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("nothing to back up"), "{said}");
    assert!(!dest.exists());
    assert!(!env.db.exists(), "no empty database made either");
}

/// A backup path that is not UTF-8 is refused, not written under another name: SQLite takes
/// the path as text, and a lossy one would leave the named file empty and the copy elsewhere.
#[test]
fn a_backup_path_that_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let env = Ops::new(OpsOptions {
        admin: String::new(),
        ..OpsOptions::default()
    });
    let file = env.dir.path().join("devices.jsonl");
    std::fs::write(&file, device(1, "u") + "\n").unwrap();
    let out = env.pushdrop(&["ingest", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let dest = env
        .dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"copy-\xe9.db"));
    let out = pushdrop_cmd(&env.config_path)
        .arg("backup")
        .arg(&dest)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("must be UTF-8"), "{said}");
    let names: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes().starts_with(b"copy-"))
        .collect();
    assert!(names.is_empty(), "no copy anywhere: {names:?}");
}
