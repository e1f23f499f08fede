//! The real binary killed while sending, and stopped with SIGTERM: nothing is lost, resends
//! carry the same `apns-id`, duplicates stay within the in-flight window.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::inbox::{Env, token, wait_for};
use common::world::{World, notification_to};
use pushdrop::simulator::SimOptions;

const MAX_IN_FLIGHT: usize = 100;

fn spawn(env: &Env) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .arg("--config")
        .arg(&env.config_path)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pushdrop run")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "pushdrop did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn notifications(n: u64) -> String {
    (0..n)
        .map(|i| {
            notification_to(
                &format!("c{i}"),
                &format!(r#"{{"tokens":["{}"]}}"#, token(i)),
                "",
            ) + "\n"
        })
        .collect()
}

/// A simulator answering after `latency_ms`, and a daemon config with `shutdown_grace_ms`:
/// the set-up of the stop tests.
fn stopping_world(latency_ms: u64, grace_ms: u64) -> World {
    World::new(
        SimOptions {
            latency: Duration::from_millis(latency_ms),
            ..SimOptions::default()
        },
        &format!("[sender]\nmax_in_flight = {MAX_IN_FLIGHT}\nshutdown_grace_ms = {grace_ms}\n"),
    )
}

#[test]
fn sigkill_while_sending_then_restart_delivers_everything_with_the_same_apns_ids() {
    let n = 1500u64;
    let w = World::new(
        SimOptions {
            latency: Duration::from_millis(20),
            ..SimOptions::default()
        },
        &format!(
            "[sender]\nmax_in_flight = {MAX_IN_FLIGHT}\nretry_initial_ms = 100\nretry_max_ms = 400\n"
        ),
    );
    let mut child = spawn(&w.env);
    w.env.drop_file("n.jsonl", notifications(n));
    let mut kills = 0;
    for threshold in [200, 700] {
        wait_for("some sent", || w.sim.accepted_count() >= threshold);
        signal(&child, libc::SIGKILL);
        wait_exit(&mut child, Duration::from_secs(10));
        kills += 1;
        child = spawn(&w.env);
    }
    assert_eq!(kills, 2);
    w.wait_idle("everything final after restarts");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());

    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1"),
        n as i64,
        "every delivery ends sent"
    );
    let by_token = w.accepted_by_token();
    let want: HashSet<String> = (0..n).map(token).collect();
    assert_eq!(
        by_token.keys().cloned().collect::<HashSet<_>>(),
        want,
        "each token got at least one push"
    );
    let mut duplicates = 0;
    for (t, got) in &by_token {
        let ids: HashSet<&str> = got.iter().map(|a| a.apns_id.as_str()).collect();
        assert_eq!(ids.len(), 1, "resends to {t} carry the same apns-id");
        duplicates += got.len() - 1;
    }
    assert!(
        duplicates <= kills * MAX_IN_FLIGHT,
        "{duplicates} duplicates exceed the in-flight window of {kills} kills"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_loses_nothing() {
    let n = 400u64;
    let w = stopping_world(300, 3000);
    let mut child = spawn(&w.env);
    w.env.drop_file("n.jsonl", notifications(n));
    wait_for("sending under way", || w.sim.accepted_count() >= 50);
    let t0 = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped within the grace period: {:?}",
        t0.elapsed()
    );
    // Everything is either sent or back in the queue, nothing left leased.
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1 OR (state = 0 AND leased = 0)"),
        n as i64
    );
    let sent_before = w
        .env
        .count("SELECT count(*) FROM deliveries WHERE state = 1");
    assert!(sent_before >= 50);

    let mut child = spawn(&w.env);
    w.wait_idle("the rest delivered after restart");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    let by_token = w.accepted_by_token();
    assert_eq!(by_token.len(), n as usize, "nothing lost");
    assert!(
        by_token.values().all(|v| v.len() == 1),
        "a graceful stop sends nothing twice"
    );
}

/// A second signal during the grace period (Ctrl-C twice) stops at once, with the status of a
/// process the signal killed; what was in flight goes out after the restart.
#[test]
fn a_second_signal_stops_at_once_and_loses_nothing() {
    use std::os::unix::process::ExitStatusExt;
    let n = 50u64;
    let w = stopping_world(3000, 20000);
    let mut child = spawn(&w.env);
    w.env.drop_file("n.jsonl", notifications(n));
    wait_for("requests in flight", || w.sim.requests() >= 10);
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    signal(&child, libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?} {:?}", status.signal());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    let mut child = spawn(&w.env);
    w.wait_idle("everything delivered after the restart");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    assert_eq!(w.accepted_by_token().len(), n as usize, "nothing lost");
}

/// One stop sent twice at once (`timeout` signals its child, then the child's process group)
/// is one clean stop, not "Ctrl-C twice".
#[test]
fn the_same_signal_twice_at_once_is_one_clean_stop() {
    let w = stopping_world(1000, 20000);
    let mut child = spawn(&w.env);
    w.env.drop_file("n.jsonl", notifications(20));
    wait_for("requests in flight", || w.sim.requests() >= 1);
    signal(&child, libc::SIGTERM);
    // Far enough apart that the first is taken before the second (two pending ones merge).
    std::thread::sleep(Duration::from_millis(40));
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// The log's promise under a kill -9: every outcome the database holds has its line in the
/// log file (lines are written out before their results are committed). The kill comes as
/// soon as results are on record, sooner than the log writer's 10 ms of gathering.
#[test]
fn after_a_sigkill_every_outcome_on_record_has_its_log_line() {
    let n = 3000u64;
    let w = World::new(
        SimOptions::default(),
        &format!("[sender]\nmax_in_flight = {MAX_IN_FLIGHT}\n"),
    );
    let text = std::fs::read_to_string(&w.env.config_path)
        .unwrap()
        .replace("[log]\n", "[log]\ndir = \"../var/log\"\n")
        .replace("format = \"text\"", "format = \"json\"");
    std::fs::write(&w.env.config_path, text).unwrap();
    let mut child = spawn(&w.env);
    w.env.drop_file("n.jsonl", notifications(n));
    wait_for("the database", || w.env.db.exists());
    let db = w.env.db();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent: i64 = db
            .query_row("SELECT count(*) FROM deliveries WHERE state = 1", [], |r| {
                r.get(0)
            })
            .unwrap_or(0);
        if sent >= 300 {
            break;
        }
        assert!(Instant::now() < deadline, "no results recorded");
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(&child, libc::SIGKILL);
    wait_exit(&mut child, Duration::from_secs(10));

    let recorded: HashSet<String> = w
        .env
        .texts(
            "SELECT n.ext_id FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.state = 1",
        )
        .into_iter()
        .collect();
    let mut logged = HashSet::new();
    for e in std::fs::read_dir(w.env.dir.path().join("var/log")).unwrap() {
        for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line cut by the kill
            };
            if v["event"] == "delivery" && v["status"] == "sent" {
                logged.insert(v["id"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(recorded.len() >= 300, "{} on record", recorded.len());
    let missing: Vec<&String> = recorded.difference(&logged).collect();
    assert!(
        missing.is_empty(),
        "{} of {} sent deliveries on record have no log line, e.g. {:?}",
        missing.len(),
        recorded.len(),
        missing.iter().take(3).collect::<Vec<_>>()
    );
}
