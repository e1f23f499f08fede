//! Writers that write in place, slowly; many files at once; duplicate ids.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use common::inbox::{APP, Env, Options, device, notification, token, wait_for};
use pushdrop::inbox::{Candidate, FileOutcome, Ingestor};

/// Writes `content` into the inbox in place, in ~20 chunks over ~2 s, flushing each chunk and
/// keeping the file open (chunk boundaries fall mid-line and mid-record).
fn slow_write(path: PathBuf, content: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let bytes = content.as_bytes();
    let chunk = bytes.len().div_ceil(20);
    for part in bytes.chunks(chunk) {
        f.write_all(part).unwrap();
        f.flush().unwrap();
        f.sync_data().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn slow_writer_is_ingested_once(poll: bool) {
    let env = Env::with(Options {
        settle_ms: 1000,
        poll,
        ..Options::default()
    });
    let daemon = env.start();
    let jsonl: String = (0..200).map(|i| device(i, "slow") + "\n").collect();
    let json = format!(
        "[\n{}\n]\n",
        (0..50)
            .map(|i| notification(&format!("slow-{i}"), &token(i)))
            .collect::<Vec<_>>()
            .join(",\n")
    );
    let w1 = {
        let path = env.inbox.join("slow.jsonl");
        std::thread::spawn(move || slow_write(path, &jsonl))
    };
    slow_write(env.inbox.join("slow.json"), &json);
    w1.join().unwrap();
    wait_for("both slow files", || {
        env.processed_names() == ["slow.json", "slow.jsonl"]
    });
    // Give a wrong early take a chance to show up as a second copy or a rejection.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(env.processed_names(), ["slow.json", "slow.jsonl"]);
    assert!(
        env.rejected_names().is_empty(),
        "{:?}",
        env.rejected_names()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE user = 'slow'"),
        200
    );
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id LIKE 'slow-%'"),
        50
    );
    assert_eq!(env.count("SELECT count(*) FROM committed_files"), 2);
    daemon.shutdown();
}

#[test]
fn in_place_slow_writer_is_ingested_once_with_events() {
    slow_writer_is_ingested_once(false);
}

#[test]
fn in_place_slow_writer_is_ingested_once_when_polling() {
    slow_writer_is_ingested_once(true);
}

/// Polling slower than `scan_interval_s`: the inbox is still listed every `scan_interval_s`.
#[test]
fn polling_lists_the_inbox_at_least_every_scan_interval() {
    let env = Env::with(Options {
        poll: true,
        poll_interval_ms: 600_000,
        scan_interval_s: 1,
        ..Options::default()
    });
    let daemon = env.start();
    // After the start-up scan.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(env.inbox.join("late.jsonl"), device(1, "late") + "\n").unwrap();
    let dropped = std::time::Instant::now();
    wait_for("the file dropped after the first scan", || {
        env.processed_names() == ["late.jsonl"]
    });
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "{:?}",
        dropped.elapsed()
    );
    daemon.shutdown();
}

/// A writer that keeps its file open and pauses longer than `settle_ms` between records: the
/// file is taken once the writer closes it, with every record. Taken at the first settled
/// pause, the records written afterwards went to the moved file and were never ingested.
#[test]
fn a_file_held_open_is_taken_when_its_writer_closes_it() {
    let env = Env::with(Options {
        settle_ms: 200,
        ..Options::default()
    });
    let daemon = env.start();
    let path = env.inbox.join("held.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..4 {
        let line = notification(&format!("held-{i}"), &token(i)).replace('\n', "") + "\n";
        f.write_all(line.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(600));
        assert!(
            env.processed_names().is_empty(),
            "taken while its writer still had it open, after record {i}"
        );
    }
    drop(f);
    wait_for("the closed file", || {
        env.processed_names() == ["held.jsonl"]
    });
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id LIKE 'held-%'"),
        4
    );
    // Created, then nothing written for longer than settle_ms: not rejected as empty.
    let mut f = std::fs::File::create(env.inbox.join("late.jsonl")).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        env.rejected_names().is_empty(),
        "rejected before its writer wrote: {:?}",
        env.rejected_names()
    );
    let line = notification("late-0", &token(9)).replace('\n', "") + "\n";
    f.write_all(line.as_bytes()).unwrap();
    drop(f);
    wait_for("the late file", || {
        env.processed_names() == ["held.jsonl", "late.jsonl"]
    });
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'late-0'"),
        1
    );
    daemon.shutdown();
}

/// A file cut short with `truncate(2)` by its path, with no descriptor: the kernel says it
/// was written (IN_MODIFY) but no close follows, since nobody had it open. It is taken once
/// settled, as the kernel (asked for a read lease) says no writer holds it; it used to wait
/// for that close until the next start, holding up every file named after it by
/// `settle_ms` (a probe's finding).
#[test]
fn a_file_truncated_by_its_path_is_taken_once_settled() {
    let env = Env::with(Options {
        settle_ms: 1500,
        ..Options::default()
    });
    let line = |i: u64| notification(&format!("cut-{i}"), &token(i)).replace('\n', "") + "\n";
    let text: String = (0..4).map(line).collect();
    let path = env.inbox.join("cut.jsonl");
    std::fs::write(&path, &text).unwrap();
    // Young at the start: the daemon waits for it to settle, and meanwhile it is cut.
    let daemon = env.start();
    let keep = line(0).len() + line(1).len();
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: truncate(2) on a path this test made.
    assert_eq!(
        unsafe { libc::truncate(c_path.as_ptr(), keep as libc::off_t) },
        0
    );
    env.drop_file("later.jsonl", line(9));
    wait_for("both files taken", || {
        env.processed_names() == ["cut.jsonl", "later.jsonl"]
    });
    assert_eq!(
        env.texts("SELECT ext_id FROM notifications ORDER BY id"),
        ["cut-0", "cut-1", "cut-9"]
    );
    daemon.shutdown();
}

/// Writers whose file is complete by every sign the inbox sees, and who still write on: one
/// that renamed its file in and writes through its old descriptor, and the second of two
/// appenders after the first closed. The kernel knows they hold it open for writing (a read
/// lease is refused), so nothing they write is left behind in the moved file.
fn writers_still_holding_the_file_lose_nothing(poll: bool) {
    let env = Env::with(Options {
        settle_ms: 200,
        poll,
        ..Options::default()
    });
    let daemon = env.start();
    let line = |id: &str, n: u64| notification(id, &token(n)).replace('\n', "") + "\n";
    // Renamed in, then written on.
    let outside = env.dir.path().join("renamed.jsonl");
    let mut renamed = std::fs::File::create(&outside).unwrap();
    renamed.write_all(line("renamed-0", 0).as_bytes()).unwrap();
    std::fs::rename(&outside, env.inbox.join("renamed.jsonl")).unwrap();
    // Two appenders: b writes and keeps the file; a writes and closes.
    let shared = env.inbox.join("shared.jsonl");
    let open_append = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&shared)
            .unwrap()
    };
    let mut b = open_append();
    b.write_all(line("shared-b0", 10).as_bytes()).unwrap();
    let mut a = open_append();
    a.write_all(line("shared-a0", 11).as_bytes()).unwrap();
    drop(a);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        env.processed_names().is_empty(),
        "taken while a writer still had it open: {:?}",
        env.processed_names()
    );
    renamed.write_all(line("renamed-1", 1).as_bytes()).unwrap();
    b.write_all(line("shared-b1", 12).as_bytes()).unwrap();
    drop(renamed);
    drop(b);
    wait_for("both files", || {
        env.processed_names() == ["renamed.jsonl", "shared.jsonl"]
    });
    assert_eq!(
        env.texts("SELECT ext_id FROM notifications ORDER BY ext_id"),
        [
            "renamed-0",
            "renamed-1",
            "shared-a0",
            "shared-b0",
            "shared-b1"
        ]
    );
    daemon.shutdown();
}

#[test]
fn writers_still_holding_the_file_lose_nothing_with_events() {
    writers_still_holding_the_file_lose_nothing(false);
}

#[test]
fn writers_still_holding_the_file_lose_nothing_when_polling() {
    writers_still_holding_the_file_lose_nothing(true);
}

#[test]
fn ten_thousand_files_are_ingested_exactly_once() {
    const N: usize = 10_000;
    let env = Env::new();
    let daemon = env.start();
    let tok = token(42);
    for i in 0..N {
        // No id: pushdrop assigns one, so a file taken twice would show as two rows.
        env.drop_file(&format!("n{i:05}.json"), notification("", &tok));
    }
    wait_for("all files processed", || {
        std::fs::read_dir(&env.processed)
            .map(|d| d.count())
            .unwrap_or(0)
            >= N
    });
    wait_for("inbox empty", || env.inbox_names().is_empty());
    assert_eq!(env.processed_names().len(), N);
    assert!(env.rejected_names().is_empty());
    assert_eq!(env.count("SELECT count(*) FROM notifications"), N as i64);
    assert_eq!(
        env.count("SELECT count(DISTINCT source_file) FROM notifications"),
        N as i64
    );
    assert_eq!(env.count("SELECT count(*) FROM deliveries"), N as i64);
    assert_eq!(env.count("SELECT count(*) FROM committed_files"), N as i64);
    daemon.shutdown();
}

#[test]
fn duplicate_notification_ids_are_reported_not_queued_twice() {
    let env = Env::new();
    let cfg = env.config();
    let store = pushdrop::store::Store::open(&cfg.store.path, false).unwrap();
    let ingestor = Ingestor::new(cfg, store);
    env.drop_file("first.json", notification("same-id", &token(1)));
    let second = format!(
        "{}\n{}\n",
        notification("same-id", &token(2)),
        notification("other-id", &token(2))
    );
    env.drop_file("second.jsonl", &second);
    let results = ingestor.process(vec![Candidate {
        path: env.inbox.join("first.json"),
        settled: true,
        waits_for_earlier: false,
    }]);
    assert!(
        matches!(&results[0].outcome, FileOutcome::Accepted(a) if a.store.duplicates.is_empty())
    );
    let results = ingestor.process(vec![Candidate {
        path: env.inbox.join("second.jsonl"),
        settled: true,
        waits_for_earlier: false,
    }]);
    let FileOutcome::Accepted(a) = &results[0].outcome else {
        panic!("{:?}", results[0].outcome)
    };
    assert_eq!(
        a.store.duplicates,
        [pushdrop::store::Duplicate {
            record: 0,
            app: APP.into(),
            id: "same-id".into()
        }]
    );
    assert_eq!(a.store.notifications_queued, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM notifications WHERE ext_id = 'same-id'"),
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 2);

    // The CLI says so too.
    env.drop_file("third.json", notification("same-id", &token(3)));
    let out = env.pushdrop(&["ingest", env.inbox.join("third.json").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("1 duplicate skipped: same-id"), "{stdout}");
    assert_eq!(
        env.processed_names(),
        ["first.json", "second.jsonl", "third.json"]
    );
}

/// Files renamed into the inbox while pushdrop was stopped carry no event: one younger than
/// settle_ms at start-up must settle first. A file named after it, already old enough, waits
/// for it, so that the files go in in name order (devices before the broadcast that needs
/// them), not oldest first.
#[test]
fn files_found_at_start_are_taken_in_name_order_not_oldest_first() {
    let env = Env::with(Options {
        settle_ms: 1000,
        ..Options::default()
    });
    env.drop_file("02-second.json", notification("second", &token(2)));
    std::thread::sleep(Duration::from_millis(1200));
    env.drop_file("01-first.json", notification("first", &token(1)));
    let daemon = env.start();
    wait_for("both files", || env.processed_names().len() == 2);
    daemon.shutdown();
    let order = env.texts("SELECT ext_id FROM notifications ORDER BY id");
    assert_eq!(order, ["first", "second"]);
}

/// Name order holds for files that turn out to be still being written when they are looked
/// at: one renamed in while its writer still has it open, and an empty one. The file named
/// after them waits for them (up to settle_ms) instead of going first: here the devices come
/// first and a notification to their user last, which, taken first, would reach nobody.
#[test]
fn files_still_being_written_keep_their_place_in_name_order() {
    let env = Env::with(Options {
        settle_ms: 1000,
        ..Options::default()
    });
    let daemon = env.start();
    let outside = env.dir.path().join("devices.tmp");
    let mut held = std::fs::File::create(&outside).unwrap();
    held.write_all((device(1, "order") + "\n").as_bytes())
        .unwrap();
    held.flush().unwrap();
    std::fs::rename(&outside, env.inbox.join("b1-devices.jsonl")).unwrap();
    env.drop_file("b2-empty.json", "");
    env.drop_file(
        "b3-note.json",
        format!(
            r#"{{"type":"notification","id":"to-user","app":"{APP}","to":{{"users":["order"]}},"payload":{{"aps":{{"alert":"hi"}}}}}}"#
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(held);
    wait_for("all three files", || {
        env.processed_names().len() == 2 && !env.rejected_names().is_empty()
    });
    daemon.shutdown();
    assert_eq!(env.processed_names(), ["b1-devices.jsonl", "b3-note.json"]);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
             WHERE n.ext_id = 'to-user'"
        ),
        1,
        "the notification was taken before the devices named before it"
    );
}
