//! Bad drop files against the running daemon (in-process, real temp dirs and SQLite): each is
//! rejected with a clear reason (or ignored), the daemon keeps going, and a good file dropped
//! afterwards is still ingested.

mod common;

use std::os::unix::fs::FileTypeExt;

use common::inbox::{Env, Options, notification, token, wait_for};

enum Expect {
    /// Rejected with this reason code and a problem whose field (or message) contains this.
    Rejected(&'static str, &'static str),
    Accepted,
}

fn alert_payload(size: usize) -> String {
    // {"aps":{"alert":"…"}} is 20 bytes around the text.
    format!(r#"{{"aps":{{"alert":"{}"}}}}"#, "x".repeat(size - 20))
}

fn notif_with(extra: &str, payload: &str) -> String {
    format!(
        r#"{{"type":"notification","to":{{"tokens":["{}"]}},"payload":{payload}{extra}}}"#,
        token(1)
    )
}

#[test]
fn bad_files_are_rejected_with_reasons_and_the_daemon_keeps_going() {
    let env = Env::with(Options {
        max_file_bytes: 20_000,
        ..Options::default()
    });
    let good_alert = alert_payload(100);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty.json", vec![], Expect::Rejected("empty", "empty")),
        (
            "latin1.jsonl",
            b"{\"type\":\"device\",\"user\":\"Ren\xe9\"}\n".to_vec(),
            Expect::Rejected("not_utf8", "UTF-8"),
        ),
        (
            "bom.json",
            [&b"\xEF\xBB\xBF"[..], notification("bom-1", &token(1)).as_bytes()].concat(),
            Expect::Accepted,
        ),
        (
            "syntax.json",
            br#"{"type": "device", "token" "ab"}"#.to_vec(),
            Expect::Rejected("parse", "syntax"),
        ),
        (
            "wrong-type.json",
            br#"{"type":"device","token":12345678}"#.to_vec(),
            Expect::Rejected("invalid", "token"),
        ),
        (
            "unknown-field.json",
            format!(r#"{{"type":"device","token":"{}","usr":"bob"}}"#, token(2)).into_bytes(),
            Expect::Rejected("invalid", "usr"),
        ),
        (
            "duplicate-key.json",
            format!(
                r#"{{"type":"device","token":"{}","user":"a","user":"b"}}"#,
                token(2)
            )
            .into_bytes(),
            Expect::Rejected("invalid", "user"),
        ),
        (
            "duplicate-payload-key.json",
            notif_with("", r#"{"aps":{"alert":"a","badge":1,"badge":2}}"#).into_bytes(),
            Expect::Rejected("invalid", "payload.aps.badge"),
        ),
        (
            "bad-token.jsonl",
            b"{\"type\":\"device\",\"token\":\"not-a-hex-token-at-all-not-a-hex-token\"}\n".to_vec(),
            Expect::Rejected("invalid", "token"),
        ),
        (
            "alert-4097.json",
            notif_with("", &alert_payload(4097)).into_bytes(),
            Expect::Rejected("invalid", "payload"),
        ),
        (
            "voip-5121.json",
            notif_with(r#","push_type":"voip""#, &alert_payload(5121)).into_bytes(),
            Expect::Rejected("invalid", "payload"),
        ),
        (
            "voip-4097.json",
            notif_with(r#","push_type":"voip""#, &alert_payload(4097)).into_bytes(),
            Expect::Accepted,
        ),
        (
            "two-targets.json",
            format!(
                r#"{{"type":"notification","to":{{"all":true,"users":["a"]}},"payload":{good_alert}}}"#
            )
            .into_bytes(),
            Expect::Rejected("invalid", "to"),
        ),
        (
            "unknown-app.json",
            format!(r#"{{"type":"device","app":"nope","token":"{}"}}"#, token(3)).into_bytes(),
            Expect::Rejected("invalid", "app"),
        ),
        (
            "background-10.json",
            notif_with(
                r#","push_type":"background","priority":10"#,
                r#"{"aps":{"content-available":1}}"#,
            )
            .into_bytes(),
            Expect::Rejected("invalid", "priority"),
        ),
        (
            "huge.json",
            format!(
                r#"{{"type":"device","token":"{}","user":"{}"}}"#,
                token(4),
                "u".repeat(30_000)
            )
            .into_bytes(),
            Expect::Rejected("oversize", "max_file_bytes"),
        ),
    ];

    let daemon = env.start();
    for (name, content, _) in &cases {
        env.drop_file(name, content);
    }
    // Special entries: a directory, a FIFO, a symlink to a file outside the inbox.
    std::fs::create_dir(env.inbox.join("x.json")).unwrap();
    let fifo = env.inbox.join("fifo.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let outside = env.dir.path().join("secret.json");
    let secret = notification("from-symlink", &token(9));
    std::fs::write(&outside, &secret).unwrap();
    std::os::unix::fs::symlink(&outside, env.inbox.join("link.json")).unwrap();

    // Everything but the directory leaves the inbox.
    wait_for("the inbox to empty", || env.inbox_names() == ["x.json"]);

    for (name, _, expect) in &cases {
        match expect {
            Expect::Accepted => {
                assert!(
                    env.processed_names().contains(&name.to_string()),
                    "{name} accepted"
                );
            }
            Expect::Rejected(reason, field) => {
                assert!(
                    env.rejected_names().contains(&name.to_string()),
                    "{name} rejected; processed: {:?}",
                    env.processed_names()
                );
                let report = env.report(name);
                assert_eq!(report["file"], *name);
                assert_eq!(report["reason"], *reason, "{name}: {report:#}");
                let problems = report["problems"].as_array().unwrap();
                assert!(!problems.is_empty());
                assert!(
                    problems.iter().any(|p| {
                        p["field"].as_str().unwrap_or("").contains(field)
                            || p["message"].as_str().unwrap_or("").contains(field)
                    }),
                    "{name}: no problem names {field}: {report:#}"
                );
                // Never more than an excerpt of the file.
                assert!(
                    report.to_string().len() < 2000,
                    "{name}: report too long: {report}"
                );
            }
        }
    }

    // The directory is ignored: still there, no report.
    assert!(env.inbox.join("x.json").is_dir());
    assert!(!env.rejected.join("x.json.error.json").exists());

    // The FIFO was moved, not opened (opening it would have blocked the watcher), and is still a
    // FIFO.
    let m = std::fs::symlink_metadata(env.rejected.join("fifo.json")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(env.report("fifo.json")["reason"], "not_regular");

    // The symlink itself was moved; its target was neither read nor moved.
    let link = env.rejected.join("link.json");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), outside);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), secret);
    assert_eq!(env.report("link.json")["reason"], "symlink");
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'from-symlink'"),
        0
    );

    // Still alive: a good file dropped now is ingested.
    assert!(daemon.is_ready());
    env.drop_file("after.json", notification("after-1", &token(5)));
    wait_for("after.json", || {
        env.processed_names().contains(&"after.json".to_string())
    });
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id IN ('after-1', 'bom-1')"),
        2
    );
    daemon.shutdown();
}

/// `processed` and `rejected` sit in the inbox, whose droppers may rename them away and put
/// links to folders elsewhere in their place: nothing is moved through such a link (a probe
/// put a forged receipt into the receipts folder that way). The files wait in the inbox,
/// the accepted one committed once, and move on once the folders are real again.
#[test]
fn drop_files_are_never_moved_through_a_link_put_in_place_of_processed_or_rejected() {
    let env = Env::new();
    let _daemon = env.start();
    env.drop_file("first.json", notification("n-0", &token(1)));
    wait_for("the first file processed", || {
        env.processed_names() == ["first.json"]
    });
    let elsewhere = env.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let (processed, rejected) = (env.inbox.join("processed"), env.inbox.join("rejected"));
    std::fs::create_dir_all(&rejected).unwrap();
    let (processed_old, rejected_old) =
        (env.dir.path().join("p.old"), env.dir.path().join("r.old"));
    std::fs::rename(&processed, &processed_old).unwrap();
    std::fs::rename(&rejected, &rejected_old).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &processed).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &rejected).unwrap();
    env.drop_file("order-1.json", notification("n-1", &token(2)));
    env.drop_file("bad.json", "{\"type\":\"nope\"}");
    wait_for("the good file committed", || {
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'n-1'") == 1
    });
    // Several looks at both (a stuck file is looked at again with a back-off).
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        Env::names(&elsewhere),
        Vec::<String>::new(),
        "nothing moved through the links"
    );
    assert_eq!(env.inbox_names(), ["bad.json", "order-1.json"]);
    // Real folders again: the files move on, the committed one not ingested twice.
    std::fs::remove_file(&processed).unwrap();
    std::fs::remove_file(&rejected).unwrap();
    std::fs::rename(&processed_old, &processed).unwrap();
    std::fs::rename(&rejected_old, &rejected).unwrap();
    wait_for("both files moved on", || env.inbox_names().is_empty());
    assert_eq!(env.processed_names(), ["first.json", "order-1.json"]);
    assert!(env.rejected_names().contains(&"bad.json".to_string()));
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'n-1'"),
        1
    );
}

#[test]
fn truncated_json_waits_for_its_writer_then_is_rejected_when_it_stops() {
    let env = Env::with(Options {
        settle_ms: 1500,
        ..Options::default()
    });
    let daemon = env.start();
    let full = notification("completed-later", &token(1));
    let (head, tail) = full.split_at(full.len() / 2);

    // Written in place in two steps with a pause: the first half alone is truncated JSON, which
    // must be treated as "still being written", not rejected.
    let path = env.inbox.join("slow.json");
    std::fs::write(&path, head).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(tail.as_bytes()).unwrap();
    }
    wait_for("slow.json accepted", || {
        env.processed_names() == ["slow.json"]
    });
    assert!(env.rejected_names().is_empty());

    // A writer that stops half way: rejected as truncated once settle_ms has passed.
    std::fs::write(env.inbox.join("dead.json"), head).unwrap();
    wait_for("dead.json rejected", || {
        env.rejected_names() == ["dead.json"]
    });
    assert_eq!(env.report("dead.json")["reason"], "truncated");
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'completed-later'"),
        1
    );
    daemon.shutdown();
}

#[test]
fn odd_names_and_repeated_names_work() {
    let env = Env::new();
    let daemon = env.start();
    let long = format!("{}.json", "ü".repeat(120)); // 245 bytes: the report name must be shortened
    let names = [
        "with space.json".to_string(),
        "ünïcödé ✓.jsonl".to_string(),
        long.clone(),
    ];
    for (i, n) in names.iter().enumerate() {
        env.drop_file(n, notification(&format!("odd-{i}"), &token(i as u64)));
    }
    // The same name twice (accepted), and a bad long-named file twice (rejected).
    env.drop_file("again.json", notification("again-1", &token(7)));
    wait_for("first again.json", || {
        env.processed_names().contains(&"again.json".to_string())
    });
    env.drop_file("again.json", notification("again-2", &token(7)));
    env.drop_file(&long.replace(".json", ".bad.json"), "{");
    wait_for("all taken", || env.inbox_names().is_empty());
    let processed = env.processed_names();
    for n in &names {
        assert!(processed.contains(n), "{n} in {processed:?}");
    }
    assert!(
        processed.contains(&"again~1.json".to_string()),
        "{processed:?}"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM notifications WHERE ext_id LIKE 'again-%' OR ext_id LIKE 'odd-%'"
        ),
        5
    );
    let rejected = Env::names(&env.rejected);
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected.iter().all(|n| n.len() <= 255));
    assert!(rejected.iter().any(|n| n.ends_with(".error.json")));
    daemon.shutdown();
}
