//! Crash safety of the real binary: `pushdrop run` is SIGKILLed at random instants while files
//! keep arriving, and restarted. At the end every file is in processed/ or rejected/ exactly
//! once, every accepted record is in the database exactly once, and SQLite is intact.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::inbox::{Env, device, notification, token, wait_for};
use common::ops::{pushdrop_cmd, spawn_logged};

fn spawn(env: &Env) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.dir.path().join("run.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .arg("--config")
        .arg(&env.config_path)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn pushdrop run")
}

#[test]
fn sigkill_at_random_instants_loses_nothing_and_doubles_nothing() {
    const FILES: usize = 400;
    let env = Arc::new(Env::new());
    let done = Arc::new(AtomicBool::new(false));

    // The dropper: good notification files (no id, so a second ingest would show), device
    // files, and every 25th file bad.
    let feeder = {
        let env = env.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut names = Vec::new();
            for i in 0..FILES {
                let (name, content) = if i % 25 == 7 {
                    (
                        format!("f{i:04}.json"),
                        "{\"type\": \"nonsense\"}".to_string(),
                    )
                } else if i % 5 == 0 {
                    (
                        format!("f{i:04}.jsonl"),
                        (0..20)
                            .map(|k| device(i as u64 * 100 + k, "crash") + "\n")
                            .collect(),
                    )
                } else {
                    (format!("f{i:04}.json"), notification("", &token(i as u64)))
                };
                env.drop_file(&name, content);
                names.push(name);
                std::thread::sleep(Duration::from_millis(rand::random_range(0..10)));
            }
            done.store(true, Ordering::SeqCst);
            names
        })
    };

    let mut kills = 0;
    while kills < 5 {
        let mut child = spawn(&env);
        std::thread::sleep(Duration::from_millis(rand::random_range(80..600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let names = feeder.join().unwrap();
    assert!(done.load(Ordering::SeqCst));

    // A last, undisturbed run takes what is left; SIGTERM then stops it cleanly (exit 0).
    let mut child = spawn(&env);
    wait_for("the inbox to empty", || env.inbox_names().is_empty());
    // A marker taken proves the daemon is up (its signal handlers come first).
    env.drop_file("zz-marker.json", notification("marker", &token(999_999)));
    wait_for("the marker", || {
        env.processed_names()
            .contains(&"zz-marker.json".to_string())
    });
    // SIGHUP, SIGUSR1 and SIGUSR2 are ignored (each used to kill the daemon on the spot;
    // logrotate scripts send them to "reload" or "reopen logs").
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon survives signal {sig}"
        );
    }
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "clean stop on SIGTERM");

    let log = std::fs::read_to_string(env.dir.path().join("run.log")).unwrap_or_default();
    eprintln!(
        "runs: {}, files ingested: {}, recognised after a crash between commit and move: {}",
        log.matches("inbox_started").count(),
        log.matches("\"ingested\"").count(),
        log.matches("already_committed").count()
    );
    let processed: Vec<String> = env
        .processed_names()
        .into_iter()
        .filter(|n| n != "zz-marker.json")
        .collect();
    let rejected = env.rejected_names();
    let processed: Vec<&String> = processed.iter().filter(|n| !n.starts_with('.')).collect();
    let rejected: Vec<&String> = rejected.iter().filter(|n| !n.starts_with('.')).collect();
    let all: BTreeSet<&String> = processed.iter().chain(rejected.iter()).copied().collect();
    assert_eq!(
        processed.len() + rejected.len(),
        names.len(),
        "each file exactly once (a second copy would carry a ~N suffix): processed {processed:?} rejected {rejected:?}"
    );
    assert_eq!(all, names.iter().collect::<BTreeSet<_>>());
    for n in &rejected {
        let i: usize = n[1..5].parse().unwrap();
        assert_eq!(i % 25, 7, "only the bad files are rejected: {n}");
        assert_eq!(env.report(n)["reason"], "invalid");
    }

    let good_notifications = (0..FILES).filter(|i| i % 25 != 7 && i % 5 != 0).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id <> 'marker'"),
        good_notifications
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT source_file) FROM notifications WHERE ext_id <> 'marker'"),
        good_notifications,
        "one notification per file, none twice"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries"),
        good_notifications + 1,
        "one delivery per notification, plus the marker's"
    );
    let device_files = (0..FILES).filter(|i| i % 25 != 7 && i % 5 == 0).count() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE user = 'crash'"),
        device_files * 20
    );
    let integrity: String = env
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

/// The window the random kills may miss: records committed, then the process died before the
/// move. On restart the file is recognised (its name and content) and only moved.
#[test]
fn a_file_committed_before_a_crash_is_only_moved_on_restart() {
    use pushdrop::inbox::ingest::{Examined, examine};
    let env = Env::new();
    let cfg = env.config();
    env.drop_file("window.json", notification("", &token(1)));
    {
        let store = pushdrop::store::Store::open(&cfg.store.path, true).unwrap();
        let Examined::Ready { file, .. } = examine(&env.inbox.join("window.json"), &cfg, true)
        else {
            panic!("window.json should be ready");
        };
        let out = store.ingest(vec![file]).unwrap();
        assert!(!out[0].already_committed);
        // "Crash": the store goes away, the file stays in the inbox.
    }
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 1);
    let daemon = env.start();
    wait_for("window.json moved", || {
        env.processed_names() == ["window.json"]
    });
    daemon.shutdown();
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 1);
    assert!(env.inbox_names().is_empty());

    // The same file put back (a copy: new inode, new mtime), as a crash between commit and
    // move would leave it: only moved again, not ingested twice.
    std::fs::copy(
        env.inbox.join("processed/window.json"),
        env.inbox.join("window.json"),
    )
    .unwrap();
    let daemon = env.start();
    wait_for("the copy moved", || env.inbox_names().is_empty());
    daemon.shutdown();
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 1);
    std::fs::remove_file(env.inbox.join("processed/window~1.json")).unwrap();

    // Same name, new content: a new file, ingested.
    env.drop_file("window.json", notification("", &token(2)));
    let daemon = env.start();
    wait_for("second window.json", || {
        env.processed_names() == ["window.json", "window~1.json"]
    });
    daemon.shutdown();
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 2);
}

/// A big `.jsonl` is committed while it is parsed, in one transaction: SIGKILLed at random
/// instants during that, the restarted daemon ends with each of its notifications exactly
/// once, and each with its delivery.
#[test]
fn sigkill_during_a_big_files_commit_loses_nothing_and_doubles_nothing() {
    const N: u64 = 40_000;
    let env = Env::new();
    let content: String = (0..N).map(|i| notification("", &token(i)) + "\n").collect();
    env.drop_file("big.jsonl", content);
    for _ in 0..4 {
        let mut child = spawn(&env);
        std::thread::sleep(Duration::from_millis(rand::random_range(50..700)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = spawn(&env);
    wait_for("the big file", || env.processed_names() == ["big.jsonl"]);
    wait_for("every delivery", || {
        env.count("SELECT count(*) FROM deliveries") == N as i64
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(env.count("SELECT count(*) FROM notifications"), N as i64);
    assert_eq!(
        env.count("SELECT count(DISTINCT notification_id) FROM deliveries"),
        N as i64
    );
    assert_eq!(env.count("SELECT count(*) FROM devices"), N as i64);
    let integrity: String = env
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

/// Two daemons on one inbox, each with a database of its own, would both ingest every file
/// and send it twice: the second is refused, and the first keeps taking files alone.
#[test]
fn a_second_daemon_on_the_same_inbox_is_refused_even_with_its_own_database() {
    let env = Env::new();
    let run = |config: &std::path::Path, log: &str| run_logged(&env, config, log);
    let said = |log: &str, what: &str| log_says(&env, log, what);
    let mut first = run(&env.config_path, "first.log");
    wait_for("the first daemon's start", || {
        said("first.log", "inbox_started")
    });
    // Its own database, the same inbox reached through a link to the folder.
    let link = env.dir.path().join("inbox-link");
    std::os::unix::fs::symlink(&env.inbox, &link).unwrap();
    let second_config = second_config(&env, Some(&link));
    let mut second = run(&second_config, "second.log").take();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            second.wait().unwrap();
            panic!("a second daemon on the same inbox kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(env.dir.path().join("second.log")).unwrap();
    assert_eq!(status.code(), Some(1), "refused: {log}");
    assert!(
        log.contains("watched by another pushdrop daemon") && log.contains("inbox-link"),
        "says why: {log}"
    );
    assert!(
        log.contains(&format!("(pid {})", first.id())),
        "names the daemon holding it: {log}"
    );
    // Refused before it made a database of its own, which would have been left behind.
    assert!(
        !env.dir.path().join("var/second.db").exists(),
        "no database left behind"
    );

    env.drop_file("a.jsonl", notification("only-once", &token(1)));
    wait_for("the file taken", || env.processed_names() == ["a.jsonl"]);
    assert!(env.inbox_names().is_empty(), "no lock file in the inbox");
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 1);
    let mut killed = first.take();
    killed.kill().unwrap();
    killed.wait().unwrap();
    // The lock goes with the process, however it ends: the next daemon starts.
    let _next = run(&env.config_path, "next.log");
    wait_for("a daemon starts after a kill -9", || {
        said("next.log", "inbox_started")
    });
}

/// `pushdrop run` on `config`, its output into `log` in `env`'s folder; killed when dropped.
fn run_logged(env: &Env, config: &std::path::Path, log: &str) -> common::ops::Spawned {
    let mut cmd = pushdrop_cmd(config);
    cmd.arg("run");
    spawn_logged(&mut cmd, &env.dir.path().join(log))
}

/// Whether `log` in `env`'s folder holds `what` yet.
fn log_says(env: &Env, log: &str, what: &str) -> bool {
    std::fs::read_to_string(env.dir.path().join(log)).is_ok_and(|l| l.contains(what))
}

/// The config of a second daemon beside `env`'s: a database of its own, and the inbox
/// through `inbox` when given.
fn second_config(env: &Env, inbox: Option<&std::path::Path>) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("../var/pushdrop.db", "../var/second.db");
    if let Some(inbox) = inbox {
        text = text.replace("../var/inbox", &inbox.display().to_string());
    }
    let path = env.dir.path().join("config/second.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An inbox folder deleted and made again under a running daemon is a new folder with a
/// lock of its own: a second daemon may take it, and then the first takes no files from it
/// (it says so), instead of both taking the same files.
#[test]
fn an_inbox_made_again_under_a_daemon_is_not_shared_with_the_daemon_that_took_it() {
    let env = Env::with(common::inbox::Options {
        scan_interval_s: 1,
        ..common::inbox::Options::default()
    });
    let run = |config: &std::path::Path, log: &str| run_logged(&env, config, log);
    let said = |log: &str, what: &str| log_says(&env, log, what);
    let _first = run(&env.config_path, "first.log");
    wait_for("the first daemon's start", || {
        said("first.log", "inbox_started")
    });
    std::fs::remove_dir_all(&env.inbox).unwrap();
    std::fs::create_dir_all(&env.inbox).unwrap();
    let _second = run(&second_config(&env, None), "second.log");
    wait_for("the second daemon's start", || {
        said("second.log", "inbox_started")
    });
    wait_for("the first daemon sees the folder is not its own", || {
        said("first.log", "inbox_taken")
    });
    env.drop_file("a.jsonl", notification("once", &token(1)));
    wait_for("the file taken", || env.processed_names() == ["a.jsonl"]);
    std::thread::sleep(Duration::from_millis(1500));
    let count = |db: &str| -> i64 {
        let c = rusqlite::Connection::open(env.dir.path().join("var").join(db)).unwrap();
        c.query_row("SELECT count(*) FROM notifications", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(
        (count("pushdrop.db"), count("second.db")),
        (0, 1),
        "only the daemon holding the new folder took the file"
    );
}
