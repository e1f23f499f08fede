//! The sender end to end: the real daemon in-process, real files in a watched inbox, a real
//! SQLite file, HTTP/2 over TLS to the APNs simulator on loopback.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::inbox::{self, device, token, wait_for};
use common::world::{
    self, FAST_SENDER, World, drop_aged, drop_to_tokens, notification_to, paused_by_a_wrong_key_id,
};
use pushdrop::simulator::{SimOptions, TokenScript};

fn devices(range: std::ops::Range<u64>, user: &str) -> String {
    range.map(|n| device(n, user) + "\n").collect()
}

/// A `.jsonl` of one notification per token of `tokens`, with ids `<prefix><n>` counted from 0.
fn one_token_each(prefix: &str, tokens: std::ops::Range<u64>) -> String {
    tokens
        .enumerate()
        .map(|(i, t)| {
            notification_to(
                &format!("{prefix}{i}"),
                &format!(r#"{{"tokens":["{}"]}}"#, token(t)),
                "",
            ) + "\n"
        })
        .collect()
}

#[test]
fn broadcast_reaches_every_registered_device_exactly_once() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let daemon = w.env.start();
    w.env.drop_file("a-devices.jsonl", devices(0..300, "u"));
    wait_for("devices registered", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == 300
    });
    w.env.drop_file(
        "b-broadcast.json",
        notification_to("all-1", r#"{"all":true}"#, ""),
    );
    w.wait_idle("broadcast delivered");
    daemon.shutdown();

    let by_token = w.accepted_by_token();
    assert_eq!(by_token.len(), 300, "every device got it");
    assert!(by_token.values().all(|v| v.len() == 1), "exactly once each");
    let expected: HashSet<String> = (0..300).map(token).collect();
    assert_eq!(by_token.keys().cloned().collect::<HashSet<_>>(), expected);
    let ids: HashSet<&str> = by_token.values().map(|v| v[0].apns_id.as_str()).collect();
    assert_eq!(ids.len(), 300, "one apns-id per delivery");
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1"),
        300
    );
    let r = world::receipt(&w.env, "all-1");
    assert_eq!(r["counts"]["sent"], 300);
    assert!(
        r.get("sent_tokens").is_none(),
        "300 sent tokens are too many to list"
    );
}

#[test]
fn users_target_reaches_only_their_active_devices() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let daemon = w.env.start();
    let mut regs = devices(0..2, "alice") + &devices(2..3, "bob") + &devices(3..5, "carol");
    // carol's first device logs out.
    regs.push_str(&format!(
        "{{\"type\":\"device\",\"app\":\"{}\",\"token\":\"{}\",\"action\":\"unregister\"}}\n",
        inbox::APP,
        token(3)
    ));
    w.env.drop_file("a-devices.jsonl", regs);
    wait_for("devices registered", || {
        w.env.count("SELECT count(*) FROM devices") == 5
    });
    w.env.drop_file(
        "b-users.json",
        notification_to("u-1", r#"{"users":["alice","carol","nobody"]}"#, ""),
    );
    w.wait_idle("users notification delivered");
    daemon.shutdown();
    let got: HashSet<String> = w.accepted_by_token().into_keys().collect();
    let want: HashSet<String> = [token(0), token(1), token(4)].into_iter().collect();
    assert_eq!(got, want, "alice's two devices and carol's remaining one");
    let r = world::receipt(&w.env, "u-1");
    assert_eq!(r["counts"]["sent"], 3);
    assert_eq!(r["sent_tokens"].as_array().map(Vec::len), Some(3));
}

/// A 410 timestamp ahead of our clock counts as now: a registration written after the
/// answer re-activates the device instead of waiting for Apple's clock.
#[test]
fn a_410_timestamp_from_the_future_counts_as_now() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let t = token(8);
    w.script(
        &t,
        TokenScript::Unregistered {
            timestamp_ms: Some(pushdrop::model::now_ms() + 3600 * 1000),
        },
    );
    let daemon = w.env.start();
    w.env.drop_file(
        "a-n1.json",
        notification_to("n1", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
    );
    wait_for("invalidated", || {
        w.env
            .count("SELECT count(*) FROM devices WHERE invalidated_at IS NOT NULL")
            == 1
    });
    let at = w.env.count("SELECT invalidated_at FROM devices");
    assert!(at <= pushdrop::model::now_ms(), "not in the future: {at}");
    w.sim.clear_scripts();
    std::thread::sleep(Duration::from_millis(20));
    drop_aged(&w.env, "b-devices.jsonl", &device(8, "zed"), Duration::ZERO);
    wait_for("re-activated", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == 1
    });
    daemon.shutdown();
}

#[test]
fn a_410_invalidates_as_of_its_timestamp_and_only_a_later_registration_reactivates() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let hour = Duration::from_secs(3600);
    let t = token(7);
    // Registered an hour ago; Apple says the app was deleted 30 minutes ago.
    w.script(
        &t,
        TokenScript::Unregistered {
            timestamp_ms: Some(pushdrop::model::now_ms() - 30 * 60 * 1000),
        },
    );
    let daemon = w.env.start();
    drop_aged(&w.env, "a-devices.jsonl", &device(7, "zoe"), hour);
    wait_for("registered", || {
        w.env.count("SELECT count(*) FROM devices") == 1
    });
    w.env.drop_file(
        "b-n1.json",
        notification_to("n1", r#"{"users":["zoe"]}"#, ""),
    );
    wait_for("invalidated", || {
        w.env
            .count("SELECT count(*) FROM devices WHERE invalidated_at IS NOT NULL")
            == 1
    });
    assert_eq!(w.state_of("n1", &t).0, 4, "delivery is invalid_token");
    w.wait_idle("n1 final");

    // A registration written 45 minutes ago (before Apple's timestamp) does not revive it.
    drop_aged(&w.env, "c-devices.jsonl", &device(7, "zoe"), hour * 3 / 4);
    wait_for("second registration ingested", || {
        w.env.processed_names().len() == 3
    });
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM devices WHERE active = 1 AND invalidated_at IS NULL"),
        0,
        "an older registration must not re-activate"
    );
    // Queued work for the dead device ends without a request.
    let before = w.sim.requests();
    w.env.drop_file(
        "d-n2.json",
        notification_to("n2", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
    );
    wait_for("n2 ingested", || {
        w.env.count("SELECT count(*) FROM notifications") == 2
    });
    w.wait_idle("n2 final");
    assert_eq!(w.state_of("n2", &t).0, 4);
    assert_eq!(
        w.sim.requests(),
        before,
        "no request for an invalidated device"
    );

    // A registration written now (after the timestamp) re-activates it.
    w.sim.clear_scripts();
    drop_aged(&w.env, "e-devices.jsonl", &device(7, "zoe"), Duration::ZERO);
    wait_for("re-activated", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == 1
    });
    w.env.drop_file(
        "f-n3.json",
        notification_to("n3", r#"{"users":["zoe"]}"#, ""),
    );
    wait_for("n3 ingested", || {
        w.env.count("SELECT count(*) FROM notifications") == 3
    });
    w.wait_idle("n3 delivered");
    daemon.shutdown();
    assert_eq!(w.state_of("n3", &t).0, 1, "sent after re-registration");
    let r = world::receipt(&w.env, "n1");
    assert_eq!(r["counts"]["invalid_token"], 1);
    assert_eq!(r["problems"][0]["reason"], "Unregistered");
    assert_eq!(r["problems"][0]["status"], 410);
}

#[test]
fn retries_back_off_then_succeed_fail_after_max_attempts_or_expire() {
    let w = World::new(
        SimOptions::default(),
        // Back-offs of at least 200 + 400 + 400 ms: the 4th attempt always comes after
        // `late`'s expiration, the next whole second (at most 1 s away).
        "[sender]\nretry_initial_ms = 400\nretry_max_ms = 800\nmax_attempts = 4\n\n[receipts]\ndir = \"../var/receipts\"\n",
    );
    let (ok, dead, late) = (token(1), token(2), token(3));
    w.script(
        &ok,
        TokenScript::FailFirst {
            n: 3,
            status: 503,
            reason: "ServiceUnavailable".into(),
        },
    );
    for t in [&dead, &late] {
        w.script(
            t,
            TokenScript::Reason {
                status: 429,
                reason: "TooManyRequests".into(),
            },
        );
    }
    let daemon = w.env.start();
    let started = Instant::now();
    let exp = pushdrop::model::now_ms() / 1000 + 1;
    let file = [
        notification_to("ok", &format!(r#"{{"tokens":["{ok}"]}}"#), ""),
        notification_to("dead", &format!(r#"{{"tokens":["{dead}"]}}"#), ""),
        notification_to(
            "late",
            &format!(r#"{{"tokens":["{late}"]}}"#),
            &format!(r#","expiration":{exp}"#),
        ),
    ]
    .join("\n");
    w.env.drop_file("n.jsonl", file);
    wait_for("ok delivered", || w.sim.accepted_count() == 1);
    let took = started.elapsed();
    w.wait_idle("all final");
    daemon.shutdown();

    let (state, attempts, _) = w.state_of("ok", &ok);
    assert_eq!((state, attempts), (1, 4), "sent on the 4th attempt");
    // Three back-offs of at least half of 400, 800, 800 ms.
    assert!(took >= Duration::from_millis(1000), "backed off: {took:?}");
    let (state, attempts, reason) = w.state_of("dead", &dead);
    assert_eq!((state, attempts), (2, 4), "failed after max_attempts");
    assert_eq!(reason.as_deref(), Some("TooManyRequests"));
    let (state, _, reason) = w.state_of("late", &late);
    assert_eq!(state, 3, "expired during back-off: {reason:?}");
    assert_eq!(w.accepted_by_token().len(), 1);

    // `pushdrop retry ID` requeues the failed one; it fails again on its own schedule.
    w.sim.clear_scripts();
    let out = w.env.pushdrop(&["retry", "dead"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("requeued 1"));
    let daemon = w.env.start();
    w.wait_idle("retried delivery final");
    daemon.shutdown();
    assert_eq!(w.state_of("dead", &dead).0, 1, "sent after pushdrop retry");
}

#[test]
fn permanent_rejections_fail_at_once_with_apples_reason() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let t = token(9);
    w.script(
        &t,
        TokenScript::Reason {
            status: 400,
            reason: "DeviceTokenNotForTopic".into(),
        },
    );
    // Two reasons Apple does not list (one metrics label, "other"), told apart in status.
    let (t2, t3) = (token(10), token(11));
    for (tok, reason) in [(&t2, "I am a teapot"), (&t3, "Kettle is off")] {
        w.script(
            tok,
            TokenScript::Reason {
                status: 418,
                reason: reason.into(),
            },
        );
    }
    let daemon = w.env.start();
    // Two failing the same way: status lists the kind once.
    w.env.drop_file(
        "n.jsonl",
        format!(
            "{}\n{}\n{}\n{}\n",
            notification_to("p", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
            notification_to("q", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
            notification_to("r", &format!(r#"{{"tokens":["{t2}"]}}"#), ""),
            notification_to("s", &format!(r#"{{"tokens":["{t3}"]}}"#), "")
        ),
    );
    w.wait_idle("final");
    wait_for("noted for status", || {
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'failed'")
            >= 3
    });
    daemon.shutdown();
    let (state, attempts, reason) = w.state_of("p", &t);
    assert_eq!((state, attempts), (2, 1));
    assert_eq!(reason.as_deref(), Some("DeviceTokenNotForTopic"));
    assert_eq!(w.sim.requests(), 4, "no retry");
    let status = w.env.status_json();
    let errors = status["recent_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors.iter().all(|e| e["kind"] == "failed"), "{errors:?}");
    for said in [
        "400 DeviceTokenNotForTopic",
        "418 I am a teapot",
        "418 Kettle is off",
    ] {
        let n = errors
            .iter()
            .filter(|e| e["message"].as_str().unwrap().contains(said))
            .count();
        assert_eq!(n, 1, "{said}: {errors:?}");
    }
}

/// `n` registered devices whose tokens all answer `BadDeviceToken`, and a broadcast `id` to
/// them dropped into the running daemon.
fn broadcast_to_dead_tokens(
    id: &str,
    n: u64,
    extra_toml: &str,
) -> (World, pushdrop::daemon::Daemon) {
    let w = World::new(SimOptions::default(), extra_toml);
    for i in 0..n {
        w.script(&token(i), TokenScript::BadDeviceToken);
    }
    let daemon = w.env.start();
    w.env.drop_file("a-devices.jsonl", devices(0..n, "u"));
    wait_for("registered", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == n as i64
    });
    w.env
        .drop_file("b-all.json", notification_to(id, r#"{"all":true}"#, ""));
    (w, daemon)
}

/// 30 registered devices whose tokens all answer `BadDeviceToken`, a broadcast `id` to
/// them, and the app paused for the burst.
fn paused_by_a_burst(id: &str) -> (World, pushdrop::daemon::Daemon) {
    paused_by_a_burst_with(id, FAST_SENDER)
}

fn paused_by_a_burst_with(id: &str, extra_toml: &str) -> (World, pushdrop::daemon::Daemon) {
    let (w, daemon) = broadcast_to_dead_tokens(id, 30, extra_toml);
    wait_for("pause recorded", || {
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'paused'")
            >= 1
    });
    (w, daemon)
}

#[test]
fn a_burst_of_bad_device_tokens_pauses_the_app_and_invalidates_nothing() {
    let (w, daemon) = paused_by_a_burst("wrong-env");
    // Longer than a lone BadDeviceToken is held (2 s): answers that came in after the burst,
    // while the app was paused, must not be taken for lone dead devices when their hold ends.
    std::thread::sleep(Duration::from_millis(3000));
    daemon.shutdown();
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM devices WHERE invalidated_at IS NOT NULL"),
        0,
        "nothing invalidated"
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 4"),
        0
    );
    assert_eq!(w.queued(), 30, "everything still queued");
    // Every answer went back to the queue as a retry, and was counted as one (the metrics
    // are the process's: another test here meets BadDeviceToken too, so at least these).
    let retries = pushdrop::metrics::get()
        .retries
        .get_or_create(&pushdrop::metrics::ReasonLabel {
            reason: "BadDeviceToken".into(),
        })
        .get();
    assert!(retries >= w.sim.requests() as u64, "{retries}");
    let status = w.env.pushdrop(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("BadDeviceToken"), "status says why: {text}");
    assert!(
        text.contains("\npaused "),
        "status says it is paused now: {text}"
    );
    // Pauses live in the daemon's memory: a restart lifts them, and says so.
    w.sim.clear_scripts();
    let daemon = w.env.start();
    w.wait_idle("sent after the restart");
    daemon.shutdown();
    let s = w.env.status_json();
    assert_eq!(s["paused"], serde_json::json!([]), "{s}");
    assert!(s.to_string().contains("pause lifted by the restart"), "{s}");
}

/// A connection that APNs closes every so often (here after 20 streams, no GOAWAY) takes the
/// requests in flight on it down with it: they are sent again, without spending an attempt,
/// since the connection worked until it broke. (A probe's finding: each drop spent an
/// attempt of every stream in flight, and with a window bigger than a connection's life,
/// deliveries failed while every connection delivered.)
#[test]
fn requests_a_dropped_connection_took_down_spend_no_attempt() {
    let w = World::new(
        SimOptions {
            drop_after: Some(20),
            ..SimOptions::default()
        },
        "[sender]\nmax_attempts = 3\nretry_initial_ms = 50\nretry_max_ms = 200\n",
    );
    let daemon = w.env.start();
    drop_to_tokens(&w, "dropped", 300);
    w.wait_idle("every delivery final");
    daemon.shutdown();
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1"),
        300,
        "all sent, none failed"
    );
    assert_eq!(w.accepted_by_token().len(), 300);
    assert!(w.sim.connections() >= 15, "{}", w.sim.connections());
}

/// A lone `BadDeviceToken` answer still in its hold (up to 2 s) when the daemon stops is
/// sent again after the restart and judged then: a dead device, not a burst. (A probe's
/// finding: the restart took it for one, paused the app, and paused again at every probe,
/// until another push's 200, for up to 15 minutes.)
#[test]
fn a_lone_bad_device_token_held_at_a_stop_is_no_burst_after_the_restart() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    w.script(&token(0), TokenScript::BadDeviceToken);
    let daemon = w.env.start();
    w.env.drop_file(
        "a.json",
        notification_to("lone", &format!(r#"{{"tokens":["{}"]}}"#, token(0)), ""),
    );
    wait_for("answered", || w.sim.requests() == 1);
    daemon.shutdown();
    assert_eq!(
        w.env.count(
            "SELECT count(*) FROM deliveries WHERE state = 0 AND held = 1 AND last_status IS NULL"
        ),
        1,
        "back in the queue, undecided"
    );
    let daemon = w.env.start();
    w.wait_idle("judged after the restart");
    daemon.shutdown();
    assert_eq!(w.sim.requests(), 2, "sent again once");
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 4"),
        1,
        "invalid_token"
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'paused'"),
        0,
        "no pause"
    );
}

/// A small app with three dead devices of four (SPEC 4.3's burst is many devices): the good
/// device's 200 shows the config is right, so the three are invalidated, the broadcast
/// finishes, and nothing pauses. (They used to make a burst at every try, never ending.)
#[test]
fn three_dead_devices_of_four_are_invalidated_not_a_burst() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    for i in 1..4 {
        w.script(&token(i), TokenScript::BadDeviceToken);
    }
    let daemon = w.env.start();
    w.env.drop_file("a-devices.jsonl", devices(0..4, "u"));
    wait_for("registered", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == 4
    });
    w.env.drop_file(
        "b-all.json",
        notification_to("small", r#"{"all":true}"#, ""),
    );
    w.wait_idle("the broadcast finished");
    daemon.shutdown();
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 4"),
        3
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1"),
        1
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'paused'"),
        0,
        "no pause"
    );
}

/// When a burst's pause ends, one request goes out first: a config that is still wrong (here
/// every token refused) costs one refused request per pause, not one per queued delivery.
#[test]
fn after_a_bursts_pause_one_request_probes_before_the_rest_go() {
    let (w, daemon) = broadcast_to_dead_tokens("probe", 300, FAST_SENDER);
    wait_for("every delivery answered and held", || {
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 0 AND held = 1")
            == 300
    });
    let first_round = w.sim.requests();
    assert!(first_round <= 300, "{first_round}");
    // The pauses of 1 s and 2 s end in this time, each followed by its probe.
    std::thread::sleep(Duration::from_millis(3500));
    let probes = w.sim.requests() - first_round;
    assert!(
        (1..=3).contains(&probes),
        "{probes} requests after the first pause"
    );
    // A probe answered 200 ends the doubt: the rest go out at once.
    w.sim.clear_scripts();
    w.wait_idle("sent once the tokens are accepted");
    daemon.shutdown();
    assert_eq!(w.accepted_by_token().len(), 300);
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM devices WHERE invalidated_at IS NOT NULL"),
        0
    );
}

/// A restart lifts the pauses and makes what they held due at once: after an operator
/// restarted to fix the config, the held deliveries do not wait out the old pause (here
/// 10 minutes).
#[test]
fn a_restart_sends_what_a_pause_held_at_once() {
    let (w, daemon) = paused_by_a_burst_with("held", "[sender]\nretry_initial_ms = 600000\n");
    wait_for("every delivery answered and held", || {
        w.env.count(
            "SELECT count(*) FROM deliveries WHERE state = 0 AND held = 1
               AND due_at > CAST(unixepoch('subsec') * 1000 AS INTEGER) + 60000",
        ) == 30
    });
    daemon.shutdown();
    w.sim.clear_scripts();
    let daemon = w.env.start();
    w.wait_idle("sent after the restart");
    daemon.shutdown();
    assert_eq!(w.accepted_by_token().len(), 30);
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE held = 1"),
        0
    );
}

/// The README's way out of a burst of tokens that really are dead: unregister them. Their
/// deliveries end unsent, and with nothing left to send the pause ends by itself instead of
/// waiting, alerting, for the app's next notification.
#[test]
fn unregistering_a_bursts_dead_tokens_ends_their_deliveries_and_then_the_pause() {
    let (w, daemon) = paused_by_a_burst("dead");
    // A notification scheduled years ahead is queued, not left to send now.
    w.env.drop_file(
        "b-later.json",
        format!(
            r#"{{"type":"notification","app":"{}","id":"later","to":{{"tokens":["{}"]}},"payload":{{"aps":{{}}}},"send_at":"2030-01-01T00:00:00Z"}}"#,
            inbox::APP,
            token(99)
        ),
    );
    let gone: String = (0..30)
        .map(|n| {
            format!(
                "{{\"type\":\"device\",\"app\":\"{}\",\"token\":\"{}\",\"action\":\"unregister\"}}\n",
                inbox::APP,
                token(n)
            )
        })
        .collect();
    w.env.drop_file("c-gone.jsonl", gone);
    wait_for("deliveries ended", || {
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 2")
            == 30
    });
    wait_for("pause over", || {
        w.env.status_json()["paused"] == serde_json::json!([])
    });
    daemon.shutdown();
    let s = w.env.status_json();
    assert!(
        s.to_string().contains("nothing left to send"),
        "status says why: {s}"
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM devices WHERE invalidated_at IS NOT NULL"),
        0
    );
}

#[test]
fn apns_down_at_start_then_up_delivers_everything_without_burning_cpu() {
    let port = world::free_port();
    let w = World::with_url(
        SimOptions::default(),
        "[sender]\nretry_initial_ms = 200\nretry_max_ms = 1000\n",
        Some(format!("https://127.0.0.1:{port}")),
    );
    // The real binary: its CPU is its own, not shared with the tests running beside this one
    // in the same process.
    let mut cmd = common::ops::pushdrop_cmd(&w.env.config_path);
    cmd.arg("run");
    let log = w.env.dir.path().join("run.log");
    let mut daemon = common::ops::spawn_logged(&mut cmd, &log);
    wait_for("the daemon's start", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("event=\"started\""))
    });
    let tokens: String = (0..200)
        .map(|n| {
            notification_to(
                &format!("d{n}"),
                &format!(r#"{{"tokens":["{}"]}}"#, token(n)),
                "",
            ) + "\n"
        })
        .collect();
    w.env.drop_file("n.jsonl", tokens);
    wait_for("queued", || {
        w.env.count("SELECT count(*) FROM deliveries") == 200
    });
    // Nothing listens: the sender must wait quietly, not spin.
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = world::process_cpu(daemon.id());
    std::thread::sleep(Duration::from_secs(3));
    let spent = world::process_cpu(daemon.id()) - cpu0;
    assert!(
        spent < Duration::from_millis(600),
        "waiting for APNs used {spent:?} of CPU in 3 s"
    );
    assert_eq!(w.queued(), 200);
    assert_eq!(
        w.env.count("SELECT max(attempts) FROM deliveries"),
        0,
        "an unreachable APNs costs no attempts"
    );
    // `status` shows how long the queue has waited, pauses and all.
    let s = w.env.status_json();
    let age = s["oldest_queued_age_s"].as_f64().unwrap();
    assert!(
        age >= 3.0,
        "oldest queued age {age} s during the outage: {s}"
    );
    // A longer outage: the pool's own connect back-off (which alone would grow to tens of
    // seconds by now) must not outlast the sender's pauses, which are capped by
    // retry_max_ms here.
    std::thread::sleep(Duration::from_secs(6));
    // Once the requests gave up waiting for a connection, the app is paused: `status` lists
    // the outage once.
    let paused = || {
        let s = w.env.status_json();
        s["paused"].as_array().map_or(0, |p| p.len())
    };
    wait_for("the outage listed in status", || paused() == 1);
    // APNs comes up.
    let up = Instant::now();
    world::forward(&w.rt, port, w.sim.addr());
    w.wait_idle("delivered once APNs is up");
    let took = up.elapsed();
    let mut daemon = daemon.take();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGTERM);
    }
    daemon.wait().unwrap();
    assert_eq!(w.accepted_by_token().len(), 200);
    let s = w.env.status_json();
    assert_eq!(
        s["paused"],
        serde_json::json!([]),
        "the outage's end is noted: {s}"
    );
    assert!(
        took < Duration::from_secs(4),
        "the queue went out {took:?} after APNs came up (pauses last at most 1 s)"
    );
}

#[test]
fn a_dropped_file_reaches_an_idle_daemon_quickly() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let daemon = w.env.start();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    w.env.drop_file(
        "n.json",
        notification_to("fast", &format!(r#"{{"tokens":["{}"]}}"#, token(1)), ""),
    );
    wait_for("delivered", || w.sim.accepted_count() == 1);
    let took = t0.elapsed();
    daemon.shutdown();
    // Functional bound only (the latency goal is measured by scripts/bench-send): no polling
    // interval or settle delay stands between a renamed file and APNs.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn work_queued_beside_a_running_daemon_goes_out_without_waiting_for_the_idle_recheck() {
    // `pushdrop ingest` and `pushdrop retry` commit from another process: the idle daemon
    // notices their commits (SQLite's data_version) instead of finding them at its 5 s
    // backstop. The bound below is three times the probe's period, most of the backstop.
    let quick = Duration::from_secs(3);
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let (t1, t2) = (token(31), token(32));
    w.script(
        &t2,
        TokenScript::Reason {
            status: 400,
            reason: "DeviceTokenNotForTopic".into(),
        },
    );
    let daemon = w.env.start();
    // Idle for a moment, so the sender sleeps.
    std::thread::sleep(Duration::from_millis(600));
    let staged = w.env.dir.path().join("beside.jsonl");
    std::fs::write(
        &staged,
        [
            notification_to("beside-1", &format!(r#"{{"tokens":["{t1}"]}}"#), ""),
            notification_to("beside-2", &format!(r#"{{"tokens":["{t2}"]}}"#), ""),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = w.env.pushdrop(&["ingest", staged.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let ingested = Instant::now();
    wait_for("ingested beside the daemon: sent", || {
        w.sim.accepted_count() == 1
    });
    assert!(ingested.elapsed() < quick, "took {:?}", ingested.elapsed());
    w.wait_idle("both final");
    assert_eq!(w.state_of("beside-2", &t2).0, 2, "failed");

    std::thread::sleep(Duration::from_millis(600));
    w.sim.clear_scripts();
    let out = w.env.pushdrop(&["retry", "beside-3"]);
    assert_eq!(out.status.code(), Some(1), "an unknown id: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no notification with id \"beside-3\""));
    let out = w.env.pushdrop(&["retry", "beside-2"]);
    assert!(out.status.success(), "{out:?}");
    let retried = Instant::now();
    wait_for("retried beside the daemon: sent", || {
        w.sim.accepted_count() == 2
    });
    assert!(retried.elapsed() < quick, "took {:?}", retried.elapsed());
    daemon.shutdown();
    assert_eq!(
        w.state_of("beside-2", &t2).0,
        1,
        "sent after pushdrop retry"
    );
}

/// SPEC 4.2/4.3 on a daemon just started: APNs calls its token expired; a new token is made
/// at once and the push resent with it at once, no attempt spent, no pause.
#[test]
fn expired_provider_token_is_answered_with_a_new_token_and_an_immediate_resend() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let t = token(8);
    w.script(
        &t,
        TokenScript::FailFirst {
            n: 1,
            status: 403,
            reason: "ExpiredProviderToken".into(),
        },
    );
    let daemon = w.env.start();
    let metric = |name: &str| {
        pushdrop::metrics::encode()
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    let mints = || metric("pushdrop_jwt_refreshes_total ");
    // The answer has its `retry` line (SPEC 4.4), which the retries counter counts.
    let expired_answers = || metric("pushdrop_retries_total{reason=\"ExpiredProviderToken\"} ");
    let before = mints();
    let answers_before = expired_answers();
    let dropped = Instant::now();
    w.env.drop_file(
        "n.json",
        notification_to("fresh", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
    );
    wait_for("delivered", || w.sim.accepted_count() == 1);
    let took = dropped.elapsed();
    w.wait_idle("final");
    daemon.shutdown();
    let (state, attempts, _) = w.state_of("fresh", &t);
    assert_eq!((state, attempts), (1, 1), "sent, the refusal not counted");
    assert_eq!(w.sim.requests(), 2);
    // Well under a pause's second (the back-off of a paused app).
    assert!(took < Duration::from_millis(900), "{took:?}");
    assert!(mints() > before, "a new token was minted");
    assert!(expired_answers() > answers_before, "the answer was logged");
    let s = w.env.status_json();
    assert_eq!(s["recent_errors"], serde_json::json!([]), "no pause: {s}");
}

/// SPEC 4.3: `ExpiredProviderToken` is never counted as an attempt, even when the token a
/// refresh just made is called expired too (the app then pauses briefly instead).
#[test]
fn expired_provider_token_spends_no_attempt() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let t = token(7);
    w.script(
        &t,
        TokenScript::FailFirst {
            n: 2,
            status: 403,
            reason: "ExpiredProviderToken".into(),
        },
    );
    let daemon = w.env.start();
    w.env.drop_file(
        "n.json",
        notification_to("clock", &format!(r#"{{"tokens":["{t}"]}}"#), ""),
    );
    wait_for("delivered", || w.sim.accepted_count() == 1);
    w.wait_idle("final");
    daemon.shutdown();
    let (state, attempts, _) = w.state_of("clock", &t);
    assert_eq!((state, attempts), (1, 1), "sent, the refusals not counted");
    assert_eq!(w.sim.requests(), 3);
    // The pause is over, and status says so.
    let s = w.env.status_json();
    assert_eq!(s["paused"], serde_json::json!([]), "{s}");
    let kinds: Vec<&str> = s["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"resumed"), "{s}");
    assert!(kinds[1..].iter().all(|k| *k == "paused"), "{s}");
}

/// Streams APNs refuses unprocessed (here: a GOAWAY every 5 streams, and one stream on
/// each new connection until its first authorised request) are sent again at once: no
/// reason to pause the app as if APNs were unreachable.
#[test]
fn refused_streams_are_sent_again_without_pausing_the_app() {
    let w = World::new(
        SimOptions {
            streams_one_until_authorized: true,
            goaway_after: Some(5),
            ..SimOptions::default()
        },
        FAST_SENDER,
    );
    let daemon = w.env.start();
    let n = 40u64;
    w.env
        .drop_file("n.jsonl", one_token_each("r", 100..100 + n));
    wait_for("all sent", || w.sim.accepted_count() >= n);
    w.wait_idle("all final");
    daemon.shutdown();
    assert!(
        w.sim.requests() > n as usize,
        "the simulator refused some streams: {} requests",
        w.sim.requests()
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'paused'"),
        0,
        "no pause for refused streams"
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1 AND attempts = 1"),
        n as i64
    );
}

/// SPEC 4.5 at a stop: requests on the wire are finished; those still waiting for a stream
/// (here behind a fresh connection's one-stream rule and slow answers) are not sent during
/// the grace period, so a stop that might not wait for their answers cannot send them twice.
#[test]
fn a_stop_sends_nothing_that_had_not_gone_out() {
    let w = World::new(
        SimOptions {
            latency: Duration::from_millis(1500),
            streams_one_until_authorized: true,
            ..SimOptions::default()
        },
        FAST_SENDER,
    );
    let daemon = w.env.start();
    w.env.drop_file("n.jsonl", one_token_each("s", 60..80));
    wait_for("the first request out", || w.sim.requests() >= 1);
    let stopped = Instant::now();
    daemon.shutdown();
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(w.sim.requests(), 1, "only the request on the wire went out");
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1"),
        1
    );
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 0 AND attempts = 0"),
        19,
        "the rest queued, no attempt spent"
    );
    let s = w.env.status_json();
    assert_eq!(
        s["paused"],
        serde_json::json!([]),
        "a stop is no outage: {s}"
    );
}

/// An `expiration` before `send_at` is accepted; the deliveries end `expired` at the
/// expiration, without a request (SPEC 4.3: never sent after the expiration), to named
/// tokens and to a broadcast alike. (A probe's finding: they showed as queued until the
/// `send_at`, years later for one scheduled years ahead.)
#[test]
fn an_expiration_before_send_at_ends_expired_unsent_at_the_expiration() {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let daemon = w.env.start();
    w.env.drop_file("a-devices.jsonl", devices(3..5, "u"));
    wait_for("registered", || {
        w.env.count("SELECT count(*) FROM devices WHERE active = 1") == 2
    });
    let now_s = pushdrop::model::now_ms() / 1000;
    let when = format!(r#","send_at":{},"expiration":{}"#, now_s + 3600, now_s + 2);
    let to_token = format!(r#"{{"tokens":["{}"]}}"#, token(3));
    w.env.drop_file(
        "b.jsonl",
        format!(
            "{}\n{}\n",
            notification_to("too-late", &to_token, &when),
            notification_to("too-late-all", r#"{"all":true}"#, &when)
        ),
    );
    wait_for("ended", || {
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 3")
            == 3
    });
    daemon.shutdown();
    assert_eq!(w.sim.requests(), 0, "never sent");
    assert_eq!(world::receipt(&w.env, "too-late")["counts"]["expired"], 1);
    assert_eq!(
        world::receipt(&w.env, "too-late-all")["counts"]["expired"],
        2
    );
}

/// The set-up of the tests of a database that refuses writes: answers after 300 ms, 50 in
/// flight (`[sender]` `extra` beside), a notification `id` to 200 tokens being sent.
fn sending_slowly(id: &str, extra: &str) -> (World, pushdrop::daemon::Daemon) {
    let w = World::new(
        SimOptions {
            latency: Duration::from_millis(300),
            ..SimOptions::default()
        },
        &format!("[sender]\nmax_in_flight = 50\n{extra}"),
    );
    let daemon = w.env.start();
    drop_to_tokens(&w, id, 200);
    wait_for("sending", || w.sim.accepted_count() >= 20);
    (w, daemon)
}

/// Results that cannot be written (here another process holds the database's write lock
/// for longer than a writer waits, as a full disk also refuses them) are kept and written
/// once the database takes them: their deliveries are not sent again meanwhile, and no new
/// request starts. Before, each failed write sent its deliveries again.
#[test]
fn results_that_cannot_be_written_are_kept_not_sent_again() {
    let (w, daemon) = sending_slowly("locked", "");
    let mut holder = w.env.db_rw();
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    // Longer than the writer's 10 s wait for the lock.
    std::thread::sleep(Duration::from_secs(12));
    tx.commit().unwrap();
    drop(holder);
    w.wait_idle("everything recorded");
    daemon.shutdown();
    let by_token = w.accepted_by_token();
    assert_eq!(by_token.len(), 200);
    let twice: Vec<_> = by_token.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(twice.is_empty(), "{} tokens got it twice", twice.len());
}

/// Credentials APNs refuses (here a key id it does not know) pause the app; the requests
/// that were waiting for the refused connection were never sent, and go back to the queue
/// quietly: no retry line or count for an answer that never came (there were up to
/// `max_in_flight` of them at each pause), and no attempt spent.
#[test]
fn a_credentials_pause_counts_only_the_answers_apns_gave() {
    let (w, daemon, _) = paused_by_a_wrong_key_id("refused", 300);
    // Which environment is paused is a field of its own, not only the message's first word.
    let paused = w.env.status_json()["paused"].clone();
    assert_eq!(paused[0]["environment"], "production", "{paused}");
    // Pauses of 1 s and 2 s end meanwhile, each with its refused try.
    std::thread::sleep(Duration::from_millis(3500));
    daemon.shutdown();
    let retries = pushdrop::metrics::get()
        .retries
        .get_or_create(&pushdrop::metrics::ReasonLabel {
            reason: "InvalidProviderToken".into(),
        })
        .get();
    let answered = w.sim.requests() as u64;
    assert!(
        retries <= answered,
        "{retries} retries counted, {answered} answers"
    );
    assert_eq!(w.queued(), 300);
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM deliveries WHERE attempts > 0"),
        0,
        "no attempt spent"
    );
}

/// A stop while results cannot be written (the write lock held elsewhere for long) ends
/// within the grace period and a couple of lock waits (10 s each), not when the database
/// takes writes again: what could not be written is given up, sent again after the restart.
#[test]
fn a_stop_while_results_cannot_be_written_does_not_wait_for_the_database() {
    let (w, daemon) = sending_slowly("stop", "shutdown_grace_ms = 2000\n");
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let mut holder = w.env.db_rw();
    let lock = std::thread::spawn(move || {
        let tx = holder
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release.recv_timeout(Duration::from_secs(90));
        tx.commit().unwrap();
    });
    locked.recv().unwrap();
    // Past the first failed write (10 s waiting for the lock).
    std::thread::sleep(Duration::from_secs(12));
    let began = Instant::now();
    daemon.shutdown();
    let took = began.elapsed();
    release_tx.send(()).unwrap();
    lock.join().unwrap();
    // The lock is held for up to 90 s: the stop does not wait for it. (A write under way at
    // the stop, and one more of the shutdown, each wait up to 10 s for the lock.)
    assert!(took < Duration::from_secs(25), "the stop took {took:?}");
}

/// A host that takes requests and never answers holds only a share of `max_in_flight`: a
/// push for another app or environment goes out at once, not after `request_timeout_ms`.
/// Here every production token is scripted to answer after a minute (a hung host), with a
/// broadcast's worth queued for it, and one sandbox device is healthy. Before, the hung
/// host's requests took the whole window and the sandbox push waited for their timeout.
#[test]
fn a_host_that_never_answers_leaves_the_window_to_the_others() {
    let w = World::new(
        SimOptions::default(),
        "[sender]\nmax_in_flight = 64\nshutdown_grace_ms = 500\n",
    );
    let text = std::fs::read_to_string(&w.env.config_path).unwrap();
    std::fs::write(
        &w.env.config_path,
        text.replacen("[apns]\n", "[apns]\nrequest_timeout_ms = 40000\n", 1),
    )
    .unwrap();
    for i in 0..300 {
        w.script(&token(i), TokenScript::Delay(Duration::from_secs(60)));
    }
    let daemon = w.env.start();
    drop_to_tokens(&w, "hung", 300);
    wait_for("the hung host has requests", || w.sim.requests() > 0);
    std::thread::sleep(Duration::from_millis(300));
    let healthy = token(1000);
    w.env.drop_file(
        "b.jsonl",
        format!(
            "{{\"type\":\"device\",\"app\":\"{}\",\"token\":\"{healthy}\",\"environment\":\"sandbox\"}}\n{}\n",
            inbox::APP,
            notification_to("healthy", &format!(r#"{{"tokens":["{healthy}"]}}"#), "")
        ),
    );
    let dropped = Instant::now();
    wait_for("the sandbox push is sent", || {
        w.env.count(
            "SELECT count(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE n.ext_id = 'healthy' AND d.state = 1",
        ) == 1
    });
    let took = dropped.elapsed();
    let hung_requests = w.sim.requests() - 1;
    daemon.shutdown();
    assert!(
        took < Duration::from_secs(15),
        "the healthy push took {took:?} (the hung host's timeout is 40 s)"
    );
    assert!(
        hung_requests < 64,
        "{hung_requests} requests went to the hung host: it took the whole window"
    );
}

/// A host silent past the 2 s with a request out is said to be unanswered (in the log and
/// among `status`'s recent errors); when it answers, that is said too, so an operator does
/// not read the last word as "still silent". Here a new host takes 3 s over its first answer
/// with the window (`max_in_flight = 1`) out to it.
#[test]
fn a_host_that_answers_after_a_silence_is_said_to_answer_again() {
    let w = World::new(SimOptions::default(), "[sender]\nmax_in_flight = 1\n");
    w.script(&token(0), TokenScript::Delay(Duration::from_secs(3)));
    let daemon = w.env.start();
    drop_to_tokens(&w, "late", 1);
    wait_for("the late answer is recorded", || {
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'answering'")
            == 1
            && w.state_of("late", &token(0)).0 == 1
    });
    daemon.shutdown();
    let status = w.env.status_json();
    let kinds: Vec<(&str, &str)> = status["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["environment"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The test config's app sends to production; newest first.
    let env = "production";
    assert_eq!(
        kinds,
        vec![("answering", env), ("unanswered", env)],
        "{status}"
    );
    let said = status["recent_errors"][0]["message"].as_str().unwrap();
    assert!(said.contains("answers again after"), "{said}");
    assert_eq!(w.state_of("late", &token(0)).1, 1, "sent once, one attempt");
}

/// A host whose last request timed out gets new work after an idle moment: one push tries
/// it, and the others wait for that answer, not for a hold of two seconds, and nothing
/// claims the host is silent (a probe's finding: the burst went out 2 s after the try was
/// answered in 1 ms, with an `unanswered` warning counting the idle moment as silence).
#[test]
fn a_burst_after_a_timeout_follows_the_answered_try_at_once() {
    let w = World::new(SimOptions::default(), "[sender]\nmax_attempts = 1\n");
    let text = std::fs::read_to_string(&w.env.config_path).unwrap();
    std::fs::write(
        &w.env.config_path,
        text.replacen("[apns]\n", "[apns]\nrequest_timeout_ms = 1000\n", 1),
    )
    .unwrap();
    w.script(&token(0), TokenScript::Delay(Duration::from_secs(3)));
    let daemon = w.env.start();
    drop_to_tokens(&w, "slow", 1);
    // Deliveries of notification `id` in `state`; none until its file is ingested.
    let in_state = |id: &str, state: i64| {
        w.env.count(&format!(
            "SELECT count(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE n.ext_id = '{id}' AND d.state = {state}"
        ))
    };
    wait_for("the slow push failed", || in_state("slow", 2) == 1);
    // Past the gap between a stuck host's tries.
    std::thread::sleep(Duration::from_millis(1200));
    let tokens: Vec<String> = (1..6).map(token).collect();
    let to = format!(
        r#"{{"tokens":{}}}"#,
        serde_json::to_string(&tokens).unwrap()
    );
    w.env.drop_file("b.json", notification_to("burst", &to, ""));
    let dropped = Instant::now();
    wait_for("the burst is sent", || in_state("burst", 1) == 5);
    let took = dropped.elapsed();
    daemon.shutdown();
    let said = w
        .env
        .count("SELECT count(*) FROM events WHERE kind = 'unanswered'");
    assert_eq!(said, 0, "an answering host was called silent");
    assert!(took < Duration::from_secs(2), "the burst took {took:?}");
}
