//! `/metrics` after a real end-to-end run (daemon in-process, simulator over HTTP/2 + TLS)
//! tells the same story as the simulator and the database, and is valid OpenMetrics.
//!
//! Metrics are process-wide, so this file holds exactly one test: its counters start at 0.

mod common;

use std::time::{Duration, SystemTime};

use common::ops::{
    self, APP, Ops, OpsOptions, device, family_type, get, notification, sample, sum, token,
    wait_for,
};
use openmetrics_parser::OpenMetricsType;
use pushdrop::model::{DeliveryState, now_ms};
use pushdrop::simulator::TokenScript;

const DEVICES: u64 = 20;

#[test]
fn metrics_match_what_the_simulator_and_the_database_saw() {
    let env = Ops::new(OpsOptions::default());
    // One device of each interesting kind; only one BadDeviceToken, so it is not a burst.
    let gone = token(1);
    let bad = token(2);
    let flaky = token(3);
    env.sim.script(
        &gone,
        TokenScript::Unregistered {
            timestamp_ms: Some(now_ms() - 30 * 60 * 1000),
        },
    );
    env.sim.script(&bad, TokenScript::BadDeviceToken);
    env.sim.script(
        &flaky,
        TokenScript::FailFirst {
            n: 2,
            status: 503,
            reason: "ServiceUnavailable".into(),
        },
    );

    let daemon = env.start();
    let admin = daemon.admin_addr().expect("admin endpoint");

    // Devices registered an hour ago (before Apple's 410 timestamp), then the notifications.
    let devices: String = (0..DEVICES).map(|n| device(n, "u") + "\n").collect();
    env.drop_file_written_at(
        "a-devices.jsonl",
        devices,
        SystemTime::now() - Duration::from_secs(3600),
    );
    wait_for("devices ingested", || env.inbox_pending() == 0);
    env.drop_file(
        "b-broadcast.json",
        format!(
            r#"{{"type":"notification","id":"all-1","app":"{APP}","to":{{"all":true}},"payload":{{"aps":{{"alert":"hi all"}}}}}}"#
        ),
    );
    // Two single-token notifications, one to a token never registered.
    env.drop_file(
        "c-singles.jsonl",
        format!(
            "{}\n{}\n",
            notification("one-5", &token(5)),
            notification("one-x", &token(1000))
        ),
    );
    env.drop_file("d-broken.json", r#"{"type":"notification","app":"#);
    env.drop_file("e-typo.json", r#"{"type":"device","tokn":"ab"}"#);

    for id in ["all-1", "one-5", "one-x"] {
        let receipt = env.receipts.join(format!("{id}.json"));
        wait_for(&format!("receipt {id}"), || receipt.exists());
    }
    wait_for("rejections", || env.inbox_pending() == 0);

    // The counters of a file move with its log line, just after the file left the inbox.
    let mut reply = ops::get_open_metrics(admin);
    wait_for("file counters", || {
        reply = ops::get_open_metrics(admin);
        let m = ops::parse_metrics(&reply.body);
        sum(&m, "pushdrop_files_rejected", &[]) == 2.0
            && sample(&m, "pushdrop_files_ingested", &[]) == Some(3.0)
    });
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        reply.content_type
    );
    assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);
    // Asked for nothing in particular (curl, an older scraper): the Prometheus text format,
    // whose counters' TYPE lines carry `_total` like their samples.
    let plain = get(admin, "/metrics");
    assert!(
        plain.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        plain.content_type
    );
    assert!(
        plain
            .body
            .contains("# TYPE pushdrop_files_ingested_total counter\n"),
        "{}",
        plain.body
    );
    assert!(!plain.body.contains("# EOF"), "{}", plain.body);
    let families = openmetrics_parser::prometheus::parse_prometheus(&plain.body)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}\n{}", plain.body));
    assert!(
        families.families.contains_key("pushdrop_deliveries_total"),
        "{:?}",
        families.families.keys().collect::<Vec<_>>()
    );
    let m = ops::parse_metrics(&reply.body);
    let count = |f: &str, l: &[(&str, &str)]| sample(&m, f, l).unwrap_or(0.0) as i64;
    // Not paused is a 0, not a missing series, for every app, environment and cause.
    for reason in ["credentials", "unreachable", "bad_device_token_burst"] {
        assert_eq!(
            sample(
                &m,
                "pushdrop_app_paused",
                &[("app", APP), ("environment", "sandbox"), ("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }

    // Counters are typed as counters (their samples carry `_total`).
    for f in [
        "pushdrop_files_ingested",
        "pushdrop_files_rejected",
        "pushdrop_deliveries",
        "pushdrop_retries",
        "pushdrop_jwt_refreshes",
    ] {
        assert_eq!(family_type(&m, f), OpenMetricsType::Counter, "{f}");
    }
    assert_eq!(
        family_type(&m, "pushdrop_send_latency_seconds"),
        OpenMetricsType::Histogram
    );
    assert_eq!(
        family_type(&m, "pushdrop_queue_depth"),
        OpenMetricsType::Gauge
    );

    // Files and records.
    assert_eq!(count("pushdrop_files_ingested", &[]), 3);
    assert_eq!(
        sum(&m, "pushdrop_files_rejected", &[]) as i64,
        2,
        "{}",
        reply.body
    );
    // A reason that never happened is there at 0 (an alert on increase() sees its first).
    assert_eq!(
        sample(&m, "pushdrop_files_rejected", &[("reason", "oversize")]),
        Some(0.0),
        "{}",
        reply.body
    );
    assert_eq!(
        count("pushdrop_records_ingested", &[("type", "device")]),
        DEVICES as i64
    );
    assert_eq!(
        count("pushdrop_records_ingested", &[("type", "notification")]),
        3
    );

    // Deliveries: what APNs accepted is what pushdrop counts as sent.
    let sent = sum(&m, "pushdrop_deliveries", &[("outcome", "sent")]) as u64;
    assert_eq!(sent, env.sim.accepted_count());
    assert_eq!(sent, DEVICES - 2 + 2);
    assert_eq!(
        count(
            "pushdrop_deliveries",
            &[("outcome", "invalid_token"), ("reason", "Unregistered")]
        ),
        1
    );
    assert_eq!(
        count(
            "pushdrop_deliveries",
            &[("outcome", "invalid_token"), ("reason", "BadDeviceToken")]
        ),
        1
    );
    assert_eq!(sum(&m, "pushdrop_deliveries", &[]) as u64, DEVICES + 2);
    assert_eq!(
        count("pushdrop_retries", &[("reason", "ServiceUnavailable")]),
        2
    );
    assert_eq!(sum(&m, "pushdrop_retries", &[]) as i64, 2);
    // Every answered request was timed: 200s, two 503s, the 410 and the 400.
    assert_eq!(
        sample(&m, "pushdrop_send_latency_seconds", &[]).unwrap() as usize,
        env.sim.requests()
    );
    assert_eq!(env.sim.requests() as u64, sent + 2 + 2);

    // Gauges read from the database at scrape time.
    for st in DeliveryState::ALL {
        let in_db = env.count(&format!(
            "SELECT count(*) FROM deliveries WHERE state = {}",
            st.code()
        ));
        assert_eq!(
            count("pushdrop_queue_depth", &[("state", st.as_str())]),
            in_db,
            "{st:?}"
        );
    }
    assert_eq!(count("pushdrop_queue_depth", &[("state", "queued")]), 0);
    assert_eq!(
        count("pushdrop_queue_depth", &[("state", "sent")]),
        sent as i64
    );
    assert_eq!(
        count("pushdrop_queue_depth", &[("state", "invalid_token")]),
        2
    );
    assert_eq!(
        sample(&m, "pushdrop_oldest_queued_age_seconds", &[]).unwrap(),
        0.0
    );

    // One connection, one provider token, nothing paused.
    assert_eq!(env.sim.connections(), 1);
    assert_eq!(count("pushdrop_apns_connections_open", &[]), 1);
    assert_eq!(count("pushdrop_apns_reconnects", &[]), 0);
    assert_eq!(count("pushdrop_jwt_refreshes", &[]), 1);
    assert_eq!(sum(&m, "pushdrop_app_paused", &[]), 0.0);

    // The same figures through `pushdrop status --json` (another process, same database).
    let out = env.pushdrop(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["totals"]["sent"], sent);
    assert_eq!(status["totals"]["invalid_token"], 2);
    assert_eq!(status["deliveries"][APP]["queued"], 0);

    // Outcomes decided without a request count as outcomes too: a notification to the token
    // Apple declared dead, one whose expiration passed before it could be sent, and one to a
    // device unregistered after it was made (`failed`, as `show` and the receipt say).
    let requests = env.sim.requests();
    let logged_out = format!(
        r#"{{"type":"device","app":"{APP}","token":"{}","action":"unregister"}}"#,
        token(7)
    );
    let too_late = format!(
        r#"{{"type":"notification","id":"too-late","app":"{APP}","to":{{"tokens":["{}"]}},"payload":{{"aps":{{"alert":"late"}}}},"expiration":{}}}"#,
        token(6),
        now_ms() / 1000 - 10
    );
    env.drop_file(
        "f-unsendable.jsonl",
        format!(
            "{}\n{too_late}\n{}\n{logged_out}\n",
            notification("dead-again", &gone),
            notification("logged-out", &token(7))
        ),
    );
    for id in ["dead-again", "too-late", "logged-out"] {
        let receipt = env.receipts.join(format!("{id}.json"));
        wait_for(&format!("receipt {id}"), || receipt.exists());
    }
    let m_text = ops::get_open_metrics(admin).body;
    let m = ops::parse_metrics(&m_text);
    let count = |f: &str, l: &[(&str, &str)]| sample(&m, f, l).unwrap_or(0.0) as i64;
    assert_eq!(
        count(
            "pushdrop_deliveries",
            &[("outcome", "invalid_token"), ("reason", "Unregistered")]
        ),
        2
    );
    assert_eq!(
        count(
            "pushdrop_deliveries",
            &[("outcome", "expired"), ("reason", "other")]
        ),
        1
    );
    assert_eq!(
        sum(&m, "pushdrop_deliveries", &[("outcome", "failed")]) as i64,
        1,
        "{}",
        m_text
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 2"),
        1
    );
    assert_eq!(
        sum(&m, "pushdrop_deliveries", &[]) as i64,
        env.count("SELECT count(*) FROM deliveries"),
        "every final delivery is counted once"
    );
    assert_eq!(env.sim.requests(), requests, "neither was sent");

    daemon.shutdown();
}
