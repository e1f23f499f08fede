//! Big files, which are committed while they are parsed: still accepted whole or rejected
//! whole, and never taken while their writer is still at work. `.jsonl` files and `.json`
//! arrays alike.

mod common;

use std::io::Write;
use std::time::Duration;

use common::inbox::{Env, Options, device, notification, token, wait_for};

/// `n` notifications without ids (so a second ingest would show) after a few device
/// registrations, one record per element: well over the 1 MiB from which files are streamed.
fn big_records(n: u64) -> Vec<String> {
    let mut records: Vec<String> = (0..10).map(|i| device(i, "big")).collect();
    records.extend((0..n).map(|i| notification("", &token(1_000 + i))));
    records
}

/// The records one per line (`.jsonl`).
fn jsonl(records: &[String]) -> String {
    let s = records.join("\n") + "\n";
    assert!(s.len() > 2 << 20, "big enough to be streamed: {}", s.len());
    s
}

/// The records as one JSON array (`.json`), an element per line.
fn json_array(records: &[String]) -> String {
    let s = format!("[\n{}\n]\n", records.join(",\n"));
    assert!(s.len() > 2 << 20, "big enough to be streamed: {}", s.len());
    s
}

fn big_file(n: u64) -> String {
    jsonl(&big_records(n))
}

/// What a big file of [`big_records`]`(12_000)` leaves once accepted.
fn assert_all_of_it_committed(env: &Env) {
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 12_000);
    assert_eq!(
        env.count("SELECT count(*) FROM devices WHERE user = 'big'"),
        10
    );
    assert_eq!(env.count("SELECT count(*) FROM committed_files"), 1);
    assert_eq!(env.count("SELECT count(*) FROM deliveries"), 12_000);
    assert_eq!(
        env.count("SELECT count(DISTINCT notification_id) FROM deliveries"),
        12_000
    );
    assert_eq!(env.count("SELECT count(*) FROM devices"), 12_010);
}

/// What a rejected big file leaves: nothing.
fn assert_none_of_it_stayed(env: &Env) {
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 0);
    assert_eq!(env.count("SELECT count(*) FROM devices"), 0);
    assert_eq!(env.count("SELECT count(*) FROM committed_files"), 0);
}

#[test]
fn a_big_file_is_accepted_whole_and_gets_every_delivery() {
    let env = Env::new();
    let daemon = env.start();
    env.drop_file("big.jsonl", big_file(12_000));
    wait_for("the big file", || env.processed_names() == ["big.jsonl"]);
    assert_all_of_it_committed(&env);
    daemon.shutdown();
}

#[test]
fn a_big_json_array_is_accepted_whole_and_gets_every_delivery() {
    let env = Env::new();
    let daemon = env.start();
    env.drop_file("big.json", json_array(&big_records(12_000)));
    wait_for("the big file", || env.processed_names() == ["big.json"]);
    assert_all_of_it_committed(&env);
    daemon.shutdown();
}

#[test]
fn a_big_file_with_a_bad_record_near_its_end_is_rejected_whole() {
    let env = Env::new();
    let daemon = env.start();
    let mut lines: Vec<String> = big_file(12_000).lines().map(str::to_string).collect();
    let bad = lines.len() - 5;
    lines[bad] = lines[bad].replace("\"notification\"", "\"notificaton\"");
    env.drop_file("bad.jsonl", lines.join("\n") + "\n");
    wait_for("the rejection", || {
        env.rejected_names().contains(&"bad.jsonl".to_string())
    });
    let report = env.report("bad.jsonl");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["line"], bad as u64 + 1, "{report}");
    // Everything the writer had taken before the bad line was found is gone again.
    assert_none_of_it_stayed(&env);
    // The daemon goes on.
    env.drop_file("after.json", notification("after", &token(1)));
    wait_for("the next file", || {
        env.processed_names().contains(&"after.json".to_string())
    });
    daemon.shutdown();
}

#[test]
fn a_big_json_array_with_a_bad_record_near_its_end_is_rejected_whole() {
    let env = Env::new();
    let daemon = env.start();
    let mut records = big_records(12_000);
    let bad = records.len() - 5;
    records[bad] = records[bad].replace("\"notification\"", "\"notificaton\"");
    env.drop_file("bad.json", json_array(&records));
    wait_for("the rejection", || {
        env.rejected_names().contains(&"bad.json".to_string())
    });
    let report = env.report("bad.json");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["record"], bad as u64, "{report}");
    assert_none_of_it_stayed(&env);
    daemon.shutdown();
}

/// Written in place in three parts, a pause after each (mid-line): never taken early, taken
/// once when done.
#[test]
fn a_big_file_written_in_place_is_taken_once_complete() {
    let env = Env::with(Options {
        settle_ms: 1500,
        ..Options::default()
    });
    let daemon = env.start();
    let content = big_file(12_000);
    let bytes = content.as_bytes();
    let mut f = std::fs::File::create(env.inbox.join("slow.jsonl")).unwrap();
    for part in bytes.chunks(bytes.len().div_ceil(3) + 17) {
        f.write_all(part).unwrap();
        f.flush().unwrap();
        f.sync_data().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            env.rejected_names().is_empty(),
            "{:?}",
            env.rejected_names()
        );
    }
    drop(f);
    wait_for("the slow file", || env.processed_names() == ["slow.jsonl"]);
    assert_eq!(env.count("SELECT count(*) FROM notifications"), 12_000);
    assert_eq!(env.count("SELECT count(*) FROM committed_files"), 1);
    daemon.shutdown();
}

/// A `.json` array written in place: until its closing bracket it ends early, and it is
/// neither rejected nor partly taken meanwhile; once complete it goes in once.
#[test]
fn a_big_json_array_written_in_place_is_taken_once_complete() {
    let env = Env::with(Options {
        settle_ms: 1500,
        ..Options::default()
    });
    let daemon = env.start();
    let content = json_array(&big_records(12_000));
    let bytes = content.as_bytes();
    let mut f = std::fs::File::create(env.inbox.join("slow.json")).unwrap();
    for part in bytes.chunks(bytes.len().div_ceil(3) + 17) {
        f.write_all(part).unwrap();
        f.flush().unwrap();
        f.sync_data().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            env.rejected_names().is_empty(),
            "{:?}",
            env.rejected_names()
        );
        assert_eq!(env.count("SELECT count(*) FROM notifications"), 0);
    }
    drop(f);
    wait_for("the slow file", || env.processed_names() == ["slow.json"]);
    assert_all_of_it_committed(&env);
    daemon.shutdown();
}

/// Files are taken in name order, a streamed one too: a small file named before a big one is
/// committed before it (its notifications are queued first), one named after it, after it.
#[test]
fn a_big_file_is_committed_in_name_order_among_small_ones() {
    let env = Env::new();
    env.drop_file("a.json", notification("a-before", &token(1)));
    env.drop_file("b.jsonl", big_file(12_000));
    env.drop_file("c.json", notification("c-after", &token(2)));
    // Written long ago, so the first scan finds all three ready: one batch.
    for name in ["a.json", "b.jsonl", "c.json"] {
        std::fs::File::options()
            .write(true)
            .open(env.inbox.join(name))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }
    let daemon = env.start();
    wait_for("all three files", || env.processed_names().len() == 3);
    let order: Vec<(String, i64)> = env
        .db()
        .prepare(
            "SELECT ext_id, id FROM notifications WHERE ext_id IN ('a-before', 'c-after')
             ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let big: (i64, i64) = env
        .db()
        .query_row(
            "SELECT min(id), max(id) FROM notifications WHERE source_file = 'b.jsonl'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(
        order[0].0 == "a-before" && order[0].1 < big.0,
        "{order:?} {big:?}"
    );
    assert!(
        order[1].0 == "c-after" && order[1].1 > big.1,
        "{order:?} {big:?}"
    );
    daemon.shutdown();
}
