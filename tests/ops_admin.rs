//! The admin endpoint as a probe and an operator see it: `/healthz`, `/readyz` (unready when
//! the database cannot take writes and while shutting down), `/status` (the JSON of
//! `pushdrop status --json`), plus the HTTP edges.

mod common;

use std::time::{Duration, Instant};

use common::inbox::APP;
use common::ops::{
    Ops, OpsOptions, device, get, http, notification, pushdrop_cmd, spawn_logged, token, wait_for,
};
use pushdrop::simulator::TokenScript;

/// The JSON with what moves by itself (ages) and what only the daemon knows (stuck files,
/// writes refused) taken out.
fn steady(mut v: serde_json::Value) -> serde_json::Value {
    let status = v.as_object_mut().expect("status is an object");
    status
        .remove("oldest_queued_age_s")
        .expect("oldest_queued_age_s is reported");
    let refused = status.remove("write_errors").expect("write_errors");
    assert!(
        refused.is_null() || refused == serde_json::json!([]),
        "{refused}"
    );
    let inbox = v["inbox"].as_object_mut().expect("inbox is reported");
    inbox.remove("oldest_waiting_s").expect("oldest_waiting_s");
    inbox.remove("stuck_files").expect("stuck_files");
    assert_eq!(inbox["error"], serde_json::Value::Null);
    v
}

#[test]
fn health_status_and_readiness_follow_the_store() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");

    let h = get(admin, "/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let r = get(admin, "/readyz");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    assert_eq!(get(admin, "/nope").status, 404);
    assert_eq!(http(admin, "POST", "/readyz").status, 405);

    // Something to report: devices, a delivered notification, a rejected file.
    let devices: String = (0..3).map(|n| device(n, "u") + "\n").collect();
    env.drop_file("a.jsonl", devices);
    env.drop_file("b.json", notification("hello", &token(1)));
    env.drop_file("c.json", "{ not json");
    let receipt = env.receipts.join("hello.json");
    wait_for("receipt", || receipt.exists());
    wait_for("rejection noted", || {
        let s: serde_json::Value = serde_json::from_str(&get(admin, "/status").body).unwrap();
        s["recent_errors"].as_array().is_some_and(|e| !e.is_empty())
    });

    let s = get(admin, "/status");
    assert_eq!(s.status, 200);
    assert_eq!(s.content_type, "application/json");
    let from_admin: serde_json::Value = serde_json::from_str(&s.body).unwrap();
    let out = env.pushdrop(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let from_cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(steady(from_admin.clone()), steady(from_cli));
    assert_eq!(from_admin["totals"]["sent"], 1);
    assert_eq!(from_admin["devices"]["buxheti"]["active"], 3);
    assert_eq!(from_admin["recent_errors"][0]["kind"], "rejected");
    assert_eq!(from_admin["inbox"]["waiting_files"], 0);
    assert_eq!(from_admin["inbox"]["stuck_files"], 0);
    // The daemon (in this process) holds the database: both say so, with its pid.
    assert_eq!(
        from_admin["daemon"],
        serde_json::json!({"running": true, "pid": std::process::id()})
    );

    // The registry by app; a mistyped app is an error, not an empty list.
    let out = env.pushdrop(&["devices", "--app", "buxheti", "--user", "u"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 device(s)"),
        "{out:?}"
    );
    // A list cut at --limit says so (on stderr, so the table stays parseable).
    let out = env.pushdrop(&["devices", "--app", "buxheti", "--limit", "2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 device(s)"),
        "{out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("showing the first 2 devices; more match"),
        "{out:?}"
    );
    let out = env.pushdrop(&["devices", "--app", "buxheti", "--limit", "3"]);
    assert!(out.stderr.is_empty(), "{out:?}");
    let out = env.pushdrop(&["devices", "--app", "buxhet"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no app \"buxhet\""),
        "{out:?}"
    );

    // The database file is replaced under the running daemon (a restore done the wrong way,
    // a clean-up script): its writes would go to a file nobody will ever open again. This
    // holds as root too, where permissions stop nothing.
    let aside = env.db.with_extension("db.aside");
    std::fs::rename(&env.db, &aside).unwrap();
    let r = get(admin, "/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.starts_with("not ready: store not writable"), "{r:?}");
    assert!(r.body.contains("deleted"), "{r:?}");
    // `/status` cannot read its figures, and says so, with what only the daemon knows (a
    // probe's finding: a bare 500).
    let s = get(admin, "/status");
    assert_eq!(
        (s.status, s.content_type.as_str()),
        (503, "application/json"),
        "{s:?}"
    );
    let said: serde_json::Value = serde_json::from_str(&s.body).unwrap();
    assert!(
        said["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{said}"
    );
    assert_eq!(said["daemon"]["running"], true, "{said}");
    assert!(
        said["write_errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("store not writable") && e.contains("deleted")),
        "{said}"
    );
    // A file dropped meanwhile stays in the inbox: committed into the file the daemon still
    // has open, it would be lost at the next start.
    env.drop_file("d.json", notification("while-gone", &token(2)));
    wait_for("the commit refused", || {
        get(admin, "/metrics")
            .body
            .contains("pushdrop_store_write_failing{write=\"commit\"} 1")
    });
    assert!(env.inbox.join("d.json").exists());
    // A command does not make a new, empty database beside the running daemon.
    let elsewhere = env.staging.join("one-shot.json");
    std::fs::write(&elsewhere, notification("one-shot", &token(3))).unwrap();
    for args in [vec!["status"], vec!["ingest", elsewhere.to_str().unwrap()]] {
        let out = env.pushdrop(&args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("holds its lock"),
            "{out:?}"
        );
        assert!(!env.db.exists(), "{args:?} made a database");
    }
    assert!(elsewhere.exists());
    std::fs::copy(&aside, &env.db).unwrap();
    let r = get(admin, "/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("replaced"), "{r:?}");
    // Nor does a command write into the new file: the daemon would never see it, and the
    // next start would lose it (a probe's finding: a notification taken so was gone).
    let out = env.pushdrop(&["ingest", elsewhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was replaced while a daemon"),
        "{out:?}"
    );
    assert!(elsewhere.exists());
    assert_eq!(get(admin, "/healthz").status, 200, "alive, only not ready");
    // Put back, it is ready again once the file that waited is committed.
    std::fs::rename(&aside, &env.db).unwrap();
    wait_for("the file that waited", || {
        env.receipts.join("while-gone.json").exists()
    });
    wait_for("ready again", || get(admin, "/readyz").status == 200);
    // (Looked for until seen: the metric is the process's, and another test's daemon here
    // may set it from its own store for a moment.)
    wait_for("the commit metric back at 0", || {
        get(admin, "/metrics")
            .body
            .contains("pushdrop_store_write_failing{write=\"commit\"} 0")
    });

    daemon.shutdown();
    // Stopped: the figures stay, and `status` says nobody holds the database any more.
    let out = env.pushdrop(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("daemon        not running"),
        "{out:?}"
    );
    let out = env.pushdrop(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["daemon"],
        serde_json::json!({"running": false, "pid": null})
    );
}

/// A database that takes the heartbeat's one-row write but refuses a file's commit or a batch
/// of delivery results (a full disk, where a small write may still fit) is not ready, and
/// says what it refuses where an operator looks: `/readyz`, `/status`'s `write_errors`,
/// `/metrics`. (A probe's finding: all three said nothing while 1,708 pushes APNs had taken
/// were held unwritten, and still counted as queued.)
#[test]
fn writes_the_database_refuses_show_on_readyz_status_and_metrics() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    let refuse = |what: &str, on: &str| {
        let db = rusqlite::Connection::open(&env.db).unwrap();
        db.execute_batch(&format!(
            "CREATE TRIGGER refuse_{what} BEFORE {on} BEGIN
               SELECT RAISE(ABORT, 'database or disk is full');
             END;"
        ))
        .unwrap();
    };
    // Metrics are the process's, and the other tests' daemons in this process set
    // `store_write_failing` from their own stores at each scrape: a line may be theirs for a
    // moment, so it is looked for a few times.
    let metric = |line: &str| {
        (0..50).any(|_| {
            let found = get(admin, "/metrics").body.lines().any(|l| l == line);
            if !found {
                std::thread::sleep(Duration::from_millis(20));
            }
            found
        })
    };
    let refused = || -> Vec<String> {
        let s: serde_json::Value = serde_json::from_str(&get(admin, "/status").body).unwrap();
        serde_json::from_value(s["write_errors"].clone()).unwrap()
    };
    assert_eq!(refused(), Vec::<String>::new());
    assert!(metric(r#"pushdrop_store_write_failing{write="results"} 0"#));

    refuse("results", "UPDATE OF state ON deliveries");
    env.drop_file("a.json", notification("held", &token(1)));
    wait_for("the results refused", || {
        get(admin, "/readyz").status == 503
    });
    let r = get(admin, "/readyz");
    assert!(
        r.body.contains("1 delivery result cannot be written")
            && r.body.contains("database or disk is full"),
        "{r:?}"
    );
    assert!(metric(r#"pushdrop_store_write_failing{write="results"} 1"#));
    assert!(metric("pushdrop_results_unwritten 1"));

    refuse("commits", "INSERT ON committed_files");
    env.drop_file("b.json", notification("later", &token(2)));
    wait_for("the commit refused", || refused().len() == 2);
    assert!(
        refused()[0].starts_with("files cannot be committed"),
        "{:?}",
        refused()
    );
    assert!(metric(r#"pushdrop_store_write_failing{write="commit"} 1"#));
    assert!(env.inbox.join("b.json").exists());

    // Space again: everything goes through, and it is ready.
    let db = rusqlite::Connection::open(&env.db).unwrap();
    db.execute_batch("DROP TRIGGER refuse_results; DROP TRIGGER refuse_commits;")
        .unwrap();
    for id in ["held", "later"] {
        wait_for(id, || env.receipts.join(format!("{id}.json")).exists());
    }
    wait_for("ready again", || get(admin, "/readyz").status == 200);
    assert_eq!(refused(), Vec::<String>::new());
    assert!(metric(r#"pushdrop_store_write_failing{write="results"} 0"#));
    assert!(metric(r#"pushdrop_store_write_failing{write="commit"} 0"#));
    assert!(metric("pushdrop_results_unwritten 0"));

    // A broadcast whose fan-out is refused: nothing is queued, nothing sent, and it shows.
    env.drop_file("c.jsonl", device(7, "u") + "\n");
    wait_for("the device", || {
        env.inbox.join("processed/c.jsonl").exists()
    });
    refuse("fanout", "INSERT ON deliveries");
    env.drop_file(
        "d.json",
        r#"{"type":"notification","id":"all-1","to":{"all":true},"payload":{"aps":{"alert":"x"}}}"#,
    );
    wait_for("the fan-out refused", || {
        get(admin, "/readyz").status == 503
    });
    let r = get(admin, "/readyz");
    assert!(r.body.contains("due work cannot be claimed"), "{r:?}");
    assert!(metric(r#"pushdrop_store_write_failing{write="claim"} 1"#));
    let db = rusqlite::Connection::open(&env.db).unwrap();
    db.execute_batch("DROP TRIGGER refuse_fanout;").unwrap();
    wait_for("all-1", || env.receipts.join("all-1.json").exists());
    wait_for("ready again", || get(admin, "/readyz").status == 200);
    assert!(metric(r#"pushdrop_store_write_failing{write="claim"} 0"#));

    // Only `/readyz`'s own test write refused: `/status` and `/metrics` say so too, from
    // its last check on. (A probe's finding: 503 while `write_errors` was empty and every
    // `store_write_failing` 0.)
    assert!(metric(
        r#"pushdrop_store_write_failing{write="heartbeat"} 0"#
    ));
    refuse("heartbeat", "INSERT ON heartbeat");
    let r = get(admin, "/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.starts_with("not ready: store not writable"), "{r:?}");
    assert!(r.body.contains("database or disk is full"), "{r:?}");
    assert_eq!(refused().len(), 1, "{:?}", refused());
    assert!(
        refused()[0].starts_with("store not writable"),
        "{:?}",
        refused()
    );
    assert!(metric(
        r#"pushdrop_store_write_failing{write="heartbeat"} 1"#
    ));
    let db = rusqlite::Connection::open(&env.db).unwrap();
    db.execute_batch("DROP TRIGGER refuse_heartbeat;").unwrap();
    assert_eq!(get(admin, "/readyz").status, 200);
    assert_eq!(refused(), Vec::<String>::new());
    assert!(metric(
        r#"pushdrop_store_write_failing{write="heartbeat"} 0"#
    ));
    daemon.shutdown();
}

/// A local client that connects and sends nothing, or stops after a request, does not hold
/// its connection (a file descriptor) for ever: both are closed once the head of a request
/// is 10 s late, and an HTTP/2 connection that carries nothing for 10 s too. (Probes'
/// findings: connections that sent nothing, or only HTTP/2's preface, stayed open.)
#[test]
fn idle_admin_connections_are_closed() {
    use std::io::{Read, Write};
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    let silent = std::net::TcpStream::connect(admin).unwrap();
    let mut kept = std::net::TcpStream::connect(admin).unwrap();
    write!(kept, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame, then nothing.
    let mut h2 = std::net::TcpStream::connect(admin).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let started = Instant::now();
    for mut c in [silent, kept, h2] {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut seen = Vec::new();
        let end = c.read_to_end(&mut seen);
        assert!(end.is_ok(), "{end:?} after {:?}", started.elapsed());
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(25),
        "{took:?}"
    );
    assert_eq!(get(admin, "/healthz").status, 200);
    daemon.shutdown();
}

/// Files left in the inbox are what an operator looks for when nothing arrives: no daemon
/// takes them, or one cannot move them out. `status` counts them; the daemon's `/status` also
/// says how many it has handled and could not move.
#[test]
fn status_counts_the_files_waiting_in_the_inbox() {
    let env = Ops::new(OpsOptions::default());
    let inbox_of = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["inbox"].clone()
    };
    // No daemon: two drop files wait; a dotfile, a `.tmp` and a folder are not drops.
    env.drop_file("a.json", notification("a", &token(1)));
    env.drop_file("b.jsonl", device(2, "u") + "\n");
    std::fs::write(env.inbox.join(".c.json"), "{}").unwrap();
    std::fs::write(env.inbox.join("d.json.tmp"), "{}").unwrap();
    std::fs::create_dir(env.inbox.join("e.json")).unwrap();
    // A symlink and a FIFO are drops the daemon will reject: they wait too.
    std::os::unix::fs::symlink(env.dir.path().join("elsewhere"), env.inbox.join("f.json")).unwrap();
    let fifo = std::ffi::CString::new(env.inbox.join("g.json").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let i = inbox_of(env.pushdrop(&["status", "--json"]));
    assert_eq!(i["waiting_files"], 4, "{i}");
    assert_eq!(i["stuck_files"], serde_json::Value::Null, "{i}");
    let out = env.pushdrop(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("inbox         4 file(s) waiting in "),
        "{out:?}"
    );

    // A daemon takes them; then its `processed_dir` stops taking files (made a plain file),
    // and the next drop is committed but stays: waiting, and stuck.
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    wait_for("the two drops taken", || {
        inbox_of(env.pushdrop(&["status", "--json"]))["waiting_files"] == 0
    });

    let processed = env.inbox.join("processed");
    std::fs::remove_dir_all(&processed).unwrap();
    std::fs::write(&processed, "not a folder").unwrap();
    env.drop_file("f.json", notification("f", &token(3)));
    wait_for("f.json stuck", || {
        let s: serde_json::Value = serde_json::from_str(&get(admin, "/status").body).unwrap();
        s["inbox"]["stuck_files"] == 1
    });
    let s: serde_json::Value = serde_json::from_str(&get(admin, "/status").body).unwrap();
    assert_eq!(s["inbox"]["waiting_files"], 1, "{s}");
    daemon.shutdown();

    // No inbox folder: `status` says why it cannot count.
    std::fs::remove_dir_all(&env.inbox).unwrap();
    let i = inbox_of(env.pushdrop(&["status", "--json"]));
    assert_eq!(i["waiting_files"], serde_json::Value::Null, "{i}");
    assert!(
        i["error"]
            .as_str()
            .is_some_and(|e| e.contains("No such file")),
        "{i}"
    );
    let out = env.pushdrop(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("inbox         cannot read "),
        "{out:?}"
    );
}

/// A readiness probe must not loosen the daemon's hold on its database. SQLite's locks are
/// POSIX record locks, which a process loses on *any* close of the file: when `/readyz`
/// opened and closed the database file to test it for writing, the next command run beside
/// the daemon believed itself the database's last user, checkpointed it and deleted the WAL
/// the daemon was still writing to; what the daemon committed afterwards was gone at its next
/// start.
#[test]
fn readyz_probes_leave_commands_beside_the_daemon_harmless() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    env.drop_file("a.json", notification("before", &token(1)));
    wait_for("the first push", || env.sim.accepted_count() == 1);
    let wal = env.db.with_extension("db-wal");
    assert!(wal.exists(), "the daemon's WAL");
    // The daemon runs in this process: its SQLite connections' locks are this process's.
    let held = posix_locks_held(&env.db);
    assert!(held > 0, "the daemon holds SQLite's lock on its database");
    for _ in 0..3 {
        assert_eq!(get(admin, "/readyz").status, 200);
    }
    assert_eq!(
        posix_locks_held(&env.db),
        held,
        "/readyz released SQLite's locks on the database"
    );
    for args in [&["purge"][..], &["status"], &["retry", "--failed"]] {
        let out = env.pushdrop(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(wal.exists(), "`pushdrop {args:?}` deleted the daemon's WAL");
    }
    env.drop_file("b.json", notification("after", &token(2)));
    wait_for("the second push", || env.sim.accepted_count() == 2);
    wait_for("its receipt", || env.receipts.join("after.json").exists());
    daemon.shutdown();
    // What the daemon committed after the commands is in the database.
    let out = env.pushdrop(&["show", "after"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("sent"), "{out:?}");
    assert!(shown.contains(&token(2)), "the whole token: {shown}");

    // Read into a pipe that closes early (`| head -1`), a command ends quietly.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#""$0" --config "$1" show after | head -1; "$0" --config "$1" status | head -1"#)
        .arg(env!("CARGO_BIN_EXE_pushdrop"))
        .arg(&env.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "{out:?}"
    );
}

/// POSIX record locks this process holds on `path`'s file, from `/proc/locks`.
fn posix_locks_held(path: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino().to_string();
    let pid = std::process::id().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| {
            // "1: POSIX  ADVISORY  READ 6561 fe:00:11116584 1073741826 1073742335"
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"POSIX")
                && f.get(4) == Some(&pid.as_str())
                && f.get(5).and_then(|d| d.rsplit(':').next()) == Some(ino.as_str())
        })
        .count()
}

#[test]
fn readyz_is_unready_while_shutdown_lets_in_flight_requests_finish() {
    let env = Ops::new(OpsOptions {
        shutdown_grace_ms: 6_000,
        ..OpsOptions::default()
    });
    // One answer comes within the grace period, one long after it.
    let slow = token(1);
    let stuck = token(2);
    env.sim
        .script(&slow, TokenScript::Delay(Duration::from_secs(2)));
    env.sim
        .script(&stuck, TokenScript::Delay(Duration::from_secs(60)));
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    // A first push opens and authorises the connection (the client allows one stream on a
    // new connection until APNs accepted a request, as APNs itself does).
    env.drop_file("a.json", notification("warm-up", &token(3)));
    wait_for("the first push", || env.sim.accepted_count() == 1);
    env.drop_file(
        "n.jsonl",
        format!(
            "{}\n{}\n",
            notification("slow", &slow),
            notification("stuck", &stuck)
        ),
    );
    wait_for("both requests in flight", || env.sim.requests() >= 3);
    assert_eq!(get(admin, "/readyz").status, 200);

    let started = Instant::now();
    let stopping = std::thread::spawn(move || daemon.shutdown());
    // Unready at once, while the shutdown waits for the slow answer.
    let mut seen = None;
    wait_for("/readyz says shutting down", || {
        let r = get(admin, "/readyz");
        if r.status == 503 {
            seen = Some((r, stopping.is_finished()));
            true
        } else {
            false
        }
    });
    let (r, finished) = seen.unwrap();
    assert_eq!(r.body, "not ready: shutting down\n");
    assert!(
        !finished,
        "shutdown already over when /readyz first said 503"
    );
    assert_eq!(get(admin, "/healthz").status, 200);
    stopping.join().unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "shutdown waited for the 60 s answer: {took:?}"
    );

    // The slow one finished within the grace period; the stuck one stays queued for next time.
    assert_eq!(env.sim.accepted_count(), 2);
    let state = |id: &str| -> i64 {
        env.db()
            .query_row(
                "SELECT d.state FROM deliveries d JOIN notifications n ON n.id = d.notification_id WHERE n.ext_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(state("slow"), 1, "sent");
    assert_eq!(state("stuck"), 0, "queued");
    assert!(
        std::net::TcpStream::connect(admin).is_err(),
        "admin endpoint closed"
    );
}

#[test]
fn an_inbox_folder_deleted_and_made_again_is_watched_again() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");
    assert_eq!(get(admin, "/readyz").status, 200);

    std::fs::remove_dir_all(&env.inbox).unwrap();
    // The daemon itself notices (the kernel says nothing: the folder's lock holds it open),
    // not only `/readyz`'s own look at the folder.
    wait_for("the daemon notices the inbox is gone", || {
        let r = get(admin, "/readyz");
        r.status == 503 && r.body.contains("the inbox folder is gone")
    });
    std::fs::create_dir(&env.inbox).unwrap();
    wait_for("/readyz ready again", || {
        get(admin, "/readyz").status == 200
    });

    // A drop's receipt comes within 10 s: taken through the folder's events, not at the next
    // safety scan (30 s away).
    let taken_soon = |id: &str, n: u64| {
        let dropped = std::time::Instant::now();
        env.drop_file(&format!("{id}.json"), notification(id, &token(n)));
        let receipt = env.receipts.join(format!("{id}.json"));
        wait_for("receipt", || receipt.exists());
        assert!(
            dropped.elapsed() < std::time::Duration::from_secs(10),
            "took {:?}",
            dropped.elapsed()
        );
    };
    // The old watch went with the old folder: the new one is watched.
    taken_soon("after", 7);
    assert!(env.inbox.join("processed/after.json").exists());

    // Deleted and made again at once (a deploy script): the new folder is watched too.
    std::fs::remove_dir_all(&env.inbox).unwrap();
    std::fs::create_dir(&env.inbox).unwrap();
    taken_soon("again", 8);

    // And the new watch does not feed on the loop's own reads of the folder (each scan is an
    // event on it): the inbox threads sleep.
    let before = common::world::threads_cpu("pushdrop-inbox");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let spent = common::world::threads_cpu("pushdrop-inbox") - before;
    assert!(
        spent < std::time::Duration::from_millis(500),
        "{spent:?} in 2 s"
    );
    daemon.shutdown();
}

/// A daemon that cannot listen on its admin port (another process has it) fails to start
/// before it takes a file: the inbox keeps everything for the start that succeeds.
#[test]
fn an_admin_port_in_use_stops_the_start_before_any_file_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let env = Ops::new(OpsOptions {
        admin: format!("127.0.0.1:{port}"),
        ..OpsOptions::default()
    });
    env.drop_file("early.json", notification("early", &token(1)));
    let cfg = env.config();
    let err = match pushdrop::daemon::Daemon::start(cfg) {
        Ok(_) => panic!("started on a port in use"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&port.to_string()), "{err}");
    // Given time to (wrongly) take it, the file is still there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(env.inbox_pending(), 1);
    assert!(!env.inbox.join("processed/early.json").exists());

    drop(taken);
    let daemon = env.start();
    let receipt = env.receipts.join("early.json");
    wait_for("receipt", || receipt.exists());
    daemon.shutdown();
}

/// `devices` and `show` list everything by default: a registry of more than a thousand
/// devices, a notification to more than ten thousand (they stopped there, the JSON with no
/// sign of it). `--limit` cuts the list and says so.
#[test]
fn devices_and_show_list_every_row() {
    let env = Ops::new(OpsOptions::default());
    let n = 10_005u64;
    let devices: String = (0..1_005).map(|i| device(i, "u") + "\n").collect();
    let tokens: Vec<String> = (0..n).map(token).collect();
    let big = format!(
        r#"{{"type":"notification","id":"big","to":{{"tokens":{}}},"payload":{{"aps":{{}}}}}}"#,
        serde_json::to_string(&tokens).unwrap()
    );
    let (a, b) = (env.staging.join("a.jsonl"), env.staging.join("b.json"));
    std::fs::write(&a, devices).unwrap();
    std::fs::write(&b, big).unwrap();
    let out = env.pushdrop(&["ingest", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let json = |args: &[&str]| -> serde_json::Value {
        let out = env.pushdrop(args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Every token of the notification has a device row; the 1,005 registered ones too.
    let all = json(&["devices", "--json"]);
    assert_eq!(all.as_array().unwrap().len() as u64, n);
    let shown = json(&["show", "big", "--json"]);
    assert_eq!(shown["deliveries"].as_array().unwrap().len() as u64, n);
    // The text lists every delivery; its target line is cut (the JSON has it whole).
    let out = env.pushdrop(&["show", "big"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let target = text.lines().find(|l| l.starts_with("target")).unwrap();
    assert!(target.len() < 400, "{target}");
    assert!(target.contains("`show --json` has it whole"), "{target}");
    assert!(text.lines().count() as u64 > n, "every delivery listed");
    // An app not in the config is said as such, by `retry` as by `show`.
    for cmd in [
        &["show", "big", "--app", "gamma"][..],
        &["retry", "big", "--app", "gamma"],
    ] {
        let out = env.pushdrop(cmd);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("\"gamma\", which is not in the config"),
            "{out:?}"
        );
    }
    // An id the named app does not have is said with that app, by both too.
    for cmd in [
        &["show", "nope", "--app", APP][..],
        &["retry", "nope", "--app", APP],
    ] {
        let out = env.pushdrop(cmd);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(&format!(
                "no notification with id \"nope\" for app \"{APP}\""
            )),
            "{said}"
        );
    }
    let out = env.pushdrop(&["devices", "--user", "u"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.ends_with("1005 device(s)\n"),
        "{}",
        &table[table.len() - 80..]
    );
    assert!(out.stderr.is_empty(), "{out:?}");
    let out = env.pushdrop(&["devices", "--limit", "10"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.ends_with("10 device(s) shown; more match (--limit 10)\n"),
        "{table}"
    );
}

/// A local client that opens connections to the admin endpoint and holds them does not take
/// the daemon's file descriptors from ingest and SQLite: at most 64 admin connections are
/// open, one more is closed at once (said once, not per connection), a drop is still taken
/// meanwhile, and `/healthz` answers as soon as they are gone. (A tester's finding: 200 idle
/// connections to a daemon under `prlimit --nofile=120` left it unable to open drop files or
/// answer `/healthz`, and logged `admin_accept_error` every 100 ms.)
#[test]
fn admin_connections_are_capped_and_leave_descriptors_to_ingest() {
    use std::io::{Read, Write};
    /// `MAX_CONNECTIONS` in src/admin.rs.
    const CAP: usize = 64;
    /// Descriptors the daemon may open beside its admin connections while a drop is taken.
    const MARGIN: usize = 16;
    // The real binary, so that its descriptors are its own, not shared with the tests running
    // beside this one in the same process; its admin port is the one the system gave it.
    let env = Ops::new(OpsOptions::default());
    let out = env.dir.path().join("daemon.out");
    let daemon = spawn_logged(pushdrop_cmd(&env.config_path).arg("run"), &out);
    let daemon_log = || std::fs::read_to_string(&out).unwrap_or_default();
    let mut admin: Option<std::net::SocketAddr> = None;
    wait_for("the daemon's admin address", || {
        admin = daemon_log()
            .lines()
            .filter(|l| l.contains("admin_listening"))
            .find_map(|l| {
                let value = l.split_once("addr=")?.1.split_whitespace().next()?;
                value.trim_matches('"').parse().ok()
            });
        admin.is_some()
    });
    let admin = admin.unwrap();
    // What the daemon keeps open (its database, its APNs connection) is open once a first
    // drop has been sent.
    env.drop_file("first.json", notification("first", &token(1)));
    wait_for("the first receipt", || {
        env.receipts.join("first.json").exists()
    });
    let pid = daemon.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = fds();
    // The tester's squeeze: descriptors for what the daemon has open, the admin connections
    // and a margin, no more.
    let limit = (before + CAP + 2 * MARGIN) as libc::rlim_t;
    let squeeze = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit for a process this test spawned; the old value is not asked for.
    let set = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &squeeze,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

    // Twice the cap of idle connections (the kernel takes them whether or not the daemon
    // accepts them).
    let opened = Instant::now();
    let idle: Vec<std::net::TcpStream> = (0..2 * CAP)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok())
        .collect();
    assert_eq!(idle.len(), 2 * CAP, "connections the kernel took");
    // The daemon's descriptors, looked at for a second while it takes them, then while a
    // drop is taken: they stay within the cap and the margin.
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(fds());
        std::thread::sleep(Duration::from_millis(50));
    }
    env.drop_file("during.json", notification("during", &token(2)));
    let taken = env.inbox.join("processed/during.json");
    // Bounded by the idle connections' 10 s: the drop must be taken while they are held.
    while !taken.exists() && opened.elapsed() < Duration::from_secs(8) {
        most = most.max(fds());
        std::thread::sleep(Duration::from_millis(50));
    }
    most = most.max(fds());
    eprintln!(
        "daemon descriptors: {before} before, at most {most} with {} idle connections",
        2 * CAP
    );
    assert!(
        most <= before + CAP + MARGIN,
        "the daemon had {most} descriptors open, {before} before {} idle admin connections \
         (cap {CAP}, margin {MARGIN}); the drop taken meanwhile: {}",
        2 * CAP,
        taken.exists()
    );
    assert!(
        taken.exists(),
        "the drop was not taken within {:?} while the idle connections were held:\n{}",
        opened.elapsed(),
        daemon_log()
    );
    // The connections beyond the cap were closed at once; those within it are still held
    // (this is less than 10 s after they were opened).
    let mut closed = 0;
    for mut c in idle.iter() {
        c.set_nonblocking(true).unwrap();
        if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        CAP,
        "connections closed by the daemon {:?} after they were opened",
        opened.elapsed()
    );
    wait_for("the drop's receipt", || {
        env.receipts.join("during.json").exists()
    });
    // Said once, not per connection; and `accept` never ran out of descriptors.
    let said = daemon_log();
    let full: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("admin_connections_full"))
        .collect();
    assert_eq!(full.len(), 1, "{said}");
    assert!(full[0].contains("max_connections=64"), "{}", full[0]);
    assert!(!said.contains("admin_accept_error"), "{said}");
    assert!(!said.contains("Too many open files"), "{said}");

    // The idle connections gone, `/healthz` answers at once.
    drop(idle);
    let closed_at = Instant::now();
    let healthz = || -> Option<String> {
        let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    let mut answer = None;
    for _ in 0..20 {
        answer = healthz().filter(|a| a.starts_with("HTTP/1.1 200"));
        if answer.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        answer.is_some() && closed_at.elapsed() < Duration::from_secs(2),
        "/healthz did not answer 200 within {:?} of the idle connections' end",
        closed_at.elapsed()
    );
    // The cap bounds the connections open, not those over time: a new round is served.
    assert_eq!(get(admin, "/healthz").status, 200);
}

/// The daemon raises its soft limit on open files to the hard one, and says so when even
/// that is too few to work with. (A tester's finding: under a soft limit of 40 with a hard
/// limit of 20,000 it started, said `started`, and could open none of its drop files.)
#[test]
fn the_open_files_limit_is_raised_to_the_hard_one_and_a_low_one_is_said() {
    use std::os::unix::process::CommandExt;
    for (soft, hard, raised_to, said) in [(40, 4096, 4096, false), (100, 100, 100, true)] {
        let env = Ops::new(OpsOptions {
            admin: String::new(),
            ..OpsOptions::default()
        });
        let out = env.dir.path().join("daemon.out");
        let mut cmd = pushdrop_cmd(&env.config_path);
        cmd.arg("run");
        // SAFETY: setrlimit is async-signal-safe and only reads the struct on this stack.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let daemon = spawn_logged(&mut cmd, &out);
        let log = || std::fs::read_to_string(&out).unwrap_or_default();
        wait_for("started", || log().contains("started"));
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let soft_now: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert_eq!(soft_now, raised_to, "{line}");
        assert_eq!(log().contains("open_files_low"), said, "{}", log());
        // A drop is still taken.
        env.drop_file("a.json", notification("a", &token(1)));
        wait_for("the receipt", || env.receipts.join("a.json").exists());
    }
}
