//! The files of inbox-example/ against the real binary: all valid except broken.json, whose
//! report names record, line and field; `pushdrop ingest` moves files like the watcher does.

mod common;

use std::path::{Path, PathBuf};

use common::inbox::{Env, notification, token, wait_for};

/// One example file, by name.
fn example(name: &str) -> PathBuf {
    examples()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("no inbox-example/{name}"))
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("inbox-example");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| pushdrop::inbox::is_drop_name(p.file_name().unwrap()))
        .collect();
    v.sort();
    assert!(v.len() >= 6, "{v:?}");
    v
}

fn check_broken_report(report: &serde_json::Value) {
    assert_eq!(report["file"], "broken.json");
    assert_eq!(report["reason"], "invalid");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{report:#}");
    assert_eq!(problems[0]["record"], 1);
    assert_eq!(problems[0]["line"], 3);
    assert_eq!(problems[0]["field"], "token");
    assert_eq!(problems[1]["record"], 2);
    assert_eq!(problems[1]["line"], 5);
    assert_eq!(problems[1]["field"], "prio");
    assert!(report["rejected_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn validate_accepts_every_example_but_broken() {
    let env = Env::new();
    for f in examples() {
        let out = env.pushdrop(&["validate", f.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if f.ends_with("broken.json") {
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            check_broken_report(&serde_json::from_str(&stdout).expect("report on stdout"));
        } else {
            assert_eq!(out.status.code(), Some(0), "{}: {stdout}", f.display());
            assert!(stdout.contains(": ok ("), "{stdout}");
        }
    }
    // Nothing was ingested or moved.
    assert!(!env.db.exists());
    assert!(examples().iter().all(|p| p.exists()));
}

/// A file that repeats a notification id is valid (ingest skips the repeat), and `validate`
/// says which record repeats which.
#[test]
fn validate_notes_an_id_a_file_repeats() {
    let env = Env::new();
    let t = token(7);
    let file = env.dir.path().join("dup.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n{}\n",
            notification("x", &t),
            notification("y", &t),
            notification("x", &t)
        ),
    )
    .unwrap();
    let out = env.pushdrop(&["validate", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("note: record 2 repeats the id \"x\" of record 0"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");

    // Far apart in a big file, whose records validate looks at in chunks as they are parsed:
    // the indices still count from the file's start.
    let lines: String = (0..5000)
        .map(|i| {
            let id = if i == 4321 {
                "n17".to_string()
            } else {
                format!("n{i}")
            };
            notification(&id, &t) + "\n"
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let out = env.pushdrop(&["validate", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("note: record 4321 repeats the id \"n17\" of record 17"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
}

/// A dropper chooses the bytes `ingest` quotes back (field names, values): an escape
/// sequence in them must reach the operator's terminal as text, not as a command.
#[test]
fn ingest_writes_control_characters_of_a_file_as_escapes() {
    let env = Env::new();
    let file = env.dir.path().join("esc.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"type":"device","token":"{}","\u001b[31mRED":1,"environment":"\u001b]0;title\u0007"}}"#,
            token(1)
        ),
    )
    .unwrap();
    let out = env.pushdrop(&["ingest", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(['\u{1b}', '\u{7}']), "{stdout:?}");
    assert!(
        stdout.contains("unknown field \"\\u{1b}[31mRED\""),
        "{stdout}"
    );
    assert!(stdout.contains("\\u{1b}]0;title\\u{7}"), "{stdout}");
}

#[test]
fn bad_config_exits_64() {
    let env = Env::new();
    std::fs::write(&env.config_path, "[inbox]\ndir = \"x\"\nsettle = 5\n").unwrap();
    let f = examples()[0].clone();
    for cmd in ["validate", "ingest"] {
        let out = env.pushdrop(&[cmd, f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{cmd}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("settle"));
    }
}

/// `pushdrop ingest` of copies of the examples, made in a staging folder outside the inbox
/// (`pushdrop ingest` takes any path); the folder and the command's output.
fn ingest_examples(env: &Env) -> (std::path::PathBuf, std::process::Output) {
    let staging = env.dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let mut args = vec!["ingest".to_string()];
    for f in examples() {
        let dest = staging.join(f.file_name().unwrap());
        std::fs::copy(&f, &dest).unwrap();
        args.push(dest.to_str().unwrap().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (staging, env.pushdrop(&args))
}

#[test]
fn ingest_command_commits_and_moves_like_the_watcher() {
    let env = Env::new();
    let (staging, out) = ingest_examples(&env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "broken.json makes it exit 1: {stdout}"
    );
    assert!(
        stdout.contains("broken.json: rejected (invalid, 2 problems)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0-devices.jsonl: accepted (6 device records"),
        "{stdout}"
    );

    assert_eq!(
        env.processed_names(),
        [
            "0-devices.jsonl",
            "broadcast.json",
            "scheduled.json",
            "to-users.json",
            "voip.json"
        ]
    );
    assert_eq!(env.rejected_names(), ["broken.json"]);
    check_broken_report(&env.report("broken.json"));
    assert!(Env::names(&staging).is_empty());

    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE registered = 1"),
        5
    );
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE active = 1"),
        4
    );
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE environment = 'sandbox'"),
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 5);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM notifications WHERE ext_id = 'call-7f3a'
             AND push_type = 'voip' AND topic = 'info.buxheti.shkoder.voip'"
        ),
        1
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM notifications WHERE ext_id = 'refresh-bob'
             AND push_type = 'background' AND priority = 5"
        ),
        1
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM notifications WHERE ext_id = 'new-year-2030'
             AND send_at = 1893484800000"
        ),
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE user = 'erin'"),
        0,
        "a rejected file is rejected whole"
    );

    // The same file again (same name and content): committed before, only moved.
    let again = staging.join("broadcast.json");
    std::fs::copy(example("broadcast.json"), &again).unwrap();
    let out = env.pushdrop(&["ingest", again.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("already committed earlier"), "{stdout}");
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 5);
    assert!(
        env.processed_names()
            .contains(&"broadcast~1.json".to_string())
    );
    // A file already in processed_dir or rejected_dir, given to `ingest` again: it stays
    // under its name (not moved onto itself as `x~1`); a rejected one gets its report anew.
    let processed = env.processed.join("voip.json");
    let rejected = env.rejected.join("broken.json");
    let out = env.pushdrop(&[
        "ingest",
        processed.to_str().unwrap(),
        rejected.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("already committed earlier"), "{stdout}");
    assert!(
        stdout.contains("broken.json: rejected (invalid, 2 problems)"),
        "{stdout}"
    );
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 5);
    assert!(processed.exists() && rejected.exists());
    assert!(!env.processed_names().contains(&"voip~1.json".to_string()));
    assert_eq!(env.rejected_names(), ["broken.json"]);
    check_broken_report(&env.report("broken.json"));

    // The same content under another name: a new file, whose notification ids are
    // duplicates: nothing queued twice. Named twice (by two paths), it is taken once: the
    // second name neither reports it moved nor logs a second `ingested` line.
    let renamed = staging.join("broadcast-again.json");
    std::fs::copy(example("broadcast.json"), &renamed).unwrap();
    let twice = staging.join(".").join("broadcast-again.json");
    let out = env.pushdrop(&["ingest", renamed.to_str().unwrap(), twice.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("duplicate skipped: budget-2026-11-27"),
        "{stdout}"
    );
    assert!(
        stdout.contains("broadcast-again.json: the same file as"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 5);

    // A dotfile is not taken, as the watcher does not take it (a dropper's file still being
    // written under its staging name; a probe's finding: it was, and its processed copy was
    // never removed by retention). `validate` still checks one (before its rename).
    let staged = staging.join(".staged.json");
    std::fs::copy(example("voip.json"), &staged).unwrap();
    let out = env.pushdrop(&["ingest", staged.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(".staged.json: not ingested: a dotfile"),
        "{stdout}"
    );
    assert!(staged.exists());
    assert!(!env.processed_names().iter().any(|n| n.starts_with('.')));
    let out = env.pushdrop(&["validate", staged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// SPEC 4.4: every ingest is a line in the rotating log, also one made by `pushdrop ingest`
/// while (or without) the daemon runs; so are `retry` and `purge`.
#[test]
fn one_shot_commands_write_their_lines_to_the_rotating_log() {
    let env = Env::new();
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text = text.replace(
        "[log]\n",
        "[log]\ndir = \"../var/log\"\nformat = \"json\"\n",
    );
    let text = text.replace("format = \"text\"\n", "");
    std::fs::write(&env.config_path, text).unwrap();
    let (_, out) = ingest_examples(&env);
    assert_eq!(out.status.code(), Some(1), "broken.json is rejected");
    let out = env.pushdrop(&["retry", "--failed"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Their output cannot be written (a full disk): they did their work, and their log lines
    // say so, though they exit 1.
    for cmd in [&["retry", "budget-2026-11-27"][..], &["purge"][..]] {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
            .arg("--config")
            .arg(&env.config_path)
            .args(cmd)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1), "{cmd:?}");
    }
    let log_dir = env.dir.path().join("var/log");
    let mut lines = String::new();
    for e in std::fs::read_dir(&log_dir).unwrap() {
        lines.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let with = |event: &str, file: &str| {
        events
            .iter()
            .any(|e| e["event"] == event && (file.is_empty() || e["file"] == file))
    };
    assert!(with("ingested", "0-devices.jsonl"), "{lines}");
    assert!(with("rejected", "broken.json"), "{lines}");
    // SPEC 4.4's `app`, on a rejection too: the app the records of broken.json name.
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "rejected" && e["app"] == common::inbox::APP),
        "{lines}"
    );
    assert!(with("requeued", ""), "{lines}");
    // `retry ID` without `--app` names the notification's app, as every line about it does.
    assert!(
        events.iter().any(|e| e["event"] == "requeued"
            && e["id"] == "budget-2026-11-27"
            && e["app"] == common::inbox::APP),
        "{lines}"
    );
    assert!(with("purged", ""), "{lines}");

    // Run as root (`sudo pushdrop purge`) in a log folder the daemon's user owns, a command
    // that makes the period's file gives it to that user, who could not write it otherwise.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::MetadataExt;
        for e in std::fs::read_dir(&log_dir).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        std::os::unix::fs::chown(&log_dir, Some(65534), Some(65534)).unwrap();
        assert_eq!(env.pushdrop(&["purge"]).status.code(), Some(0));
        let files: Vec<_> = std::fs::read_dir(&log_dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let m = files[0].metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{files:?}");
        // No log folder yet: the one the command makes is the parent folder owner's too.
        std::fs::remove_dir_all(&log_dir).unwrap();
        let var = log_dir.parent().unwrap();
        std::os::unix::fs::chown(var, Some(65534), Some(65534)).unwrap();
        assert_eq!(env.pushdrop(&["purge"]).status.code(), Some(0));
        let m = std::fs::metadata(&log_dir).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        let files: Vec<_> = std::fs::read_dir(&log_dir).unwrap().flatten().collect();
        let m = files[0].metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{files:?}");
    } else {
        eprintln!("not root: the hand-over of a log file root made is not tested");
    }
}

/// `sudo pushdrop status` (or `purge`) before the daemon's first start, in a deployment
/// the daemon's user owns: the folders, database and log file it makes are that user's, so
/// the daemon can still write them.
#[test]
fn a_root_command_gives_what_it_makes_to_the_deployments_owner() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing to give away");
        return;
    }
    let env = Env::new();
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text = text.replace("[log]\n", "[log]\ndir = \"../var/log\"\n");
    std::fs::write(&env.config_path, text).unwrap();
    let var = env.dir.path().join("var");
    std::fs::remove_dir_all(&var).unwrap();
    std::os::unix::fs::chown(env.dir.path(), Some(65534), Some(65534)).unwrap();
    assert_eq!(env.pushdrop(&["purge"]).status.code(), Some(0));
    let log = var.join("log");
    let log_file = std::fs::read_dir(&log)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for p in [var.clone(), var.join("pushdrop.db"), log, log_file] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p:?}");
    }
}

#[test]
fn the_daemon_takes_the_examples() {
    let env = Env::new();
    let daemon = env.start();
    for f in examples() {
        let name = f.file_name().unwrap().to_str().unwrap();
        env.drop_file(name, std::fs::read(&f).unwrap());
    }
    wait_for("examples taken", || env.inbox_names().is_empty());
    assert_eq!(env.processed_names().len(), 5);
    assert_eq!(env.rejected_names(), ["broken.json"]);
    check_broken_report(&env.report("broken.json"));
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 5);
    daemon.shutdown();
}

/// `pushdrop ingest` beside another writer (the daemon committing a big file) waits for the
/// database's write lock instead of failing with "database is locked".
#[test]
fn one_shot_ingest_waits_for_the_write_lock() {
    let env = Env::new();
    // The database exists (ingest made it); another connection now holds its write lock.
    let first = env.dir.path().join("first.jsonl");
    std::fs::write(&first, notification("first", &token(1)) + "\n").unwrap();
    assert_eq!(
        env.pushdrop(&["ingest", first.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let db = env.db.clone();
    let holder = std::thread::spawn(move || {
        let mut c = rusqlite::Connection::open(db).unwrap();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        tx.commit().unwrap();
    });
    locked_rx.recv().unwrap();
    let second = env.dir.path().join("second.jsonl");
    std::fs::write(&second, notification("second", &token(2)) + "\n").unwrap();
    let out = env.pushdrop(&["ingest", second.to_str().unwrap()]);
    holder.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 2);
}
