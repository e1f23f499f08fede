//! The pool under trouble: GOAWAY, dropped connections, the one-stream rule, slow answers,
//! unreachable hosts, a proxy, and a 10,000-push run over one connection.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::sim::*;
use pushdrop::apns::{ApnsClient, Outcome};
use pushdrop::simulator::{SimOptions, TokenScript};

/// Sends `n` pushes at once, each retried like the sender would, and returns every
/// outcome each one met, its final one last.
async fn blast_seen(client: &ApnsClient, n: u32) -> Vec<Vec<Outcome>> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        tasks.spawn(async move { deliver(&client, push(i)).await });
    }
    let mut seen = Vec::new();
    while let Some(r) = tasks.join_next().await {
        seen.push(r.unwrap());
    }
    seen
}

/// Sends `n` pushes at once (each retried like the sender would) and returns every final
/// outcome plus the number of `Retry` outcomes seen on the way.
async fn blast(client: &ApnsClient, n: u32) -> (Vec<Outcome>, usize) {
    let seen = blast_seen(client, n).await;
    let retries = seen
        .iter()
        .flatten()
        .filter(|o| o.kind() == "retry")
        .count();
    let finals = seen.iter().map(|s| s.last().unwrap().clone()).collect();
    (finals, retries)
}

/// Sends pushes `ids` at once, one request each (no retry), and returns their outcomes.
async fn send_at_once(client: &ApnsClient, ids: std::ops::Range<u32>) -> Vec<Outcome> {
    within(30, async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in ids {
            let client = client.clone();
            tasks.spawn(async move { client.send(&push(i)).await });
        }
        let mut outcomes = Vec::new();
        while let Some(r) = tasks.join_next().await {
            outcomes.push(r.unwrap());
        }
        outcomes
    })
    .await
}

fn assert_all_sent(finals: &[Outcome]) {
    let not_sent: Vec<_> = finals
        .iter()
        .filter(|o| !matches!(o, Outcome::Sent { .. }))
        .collect();
    assert!(
        not_sent.is_empty(),
        "{} not sent, e.g. {:?}",
        not_sent.len(),
        not_sent.first()
    );
}

fn distinct_tokens(env: &SimEnv) -> usize {
    env.sim
        .accepted()
        .into_iter()
        .map(|a| a.token)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_after_n_streams_drains_and_reconnects() {
    // With 20 streams at most in flight, each connection carries about 100 streams before
    // the client sees the GOAWAY and moves on.
    let env = start(SimOptions {
        goaway_after: Some(100),
        max_concurrent_streams: 20,
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    let (finals, _) = within(120, blast(&client, 1000)).await;
    assert_all_sent(&finals);
    assert_eq!(distinct_tokens(&env), 1000, "none lost");
    assert!(client.stats().connects >= 8, "{:?}", client.stats());
    let per_conn = env.sim.accepted().into_iter().fold(
        std::collections::HashMap::<u64, usize>::new(),
        |mut m, a| {
            *m.entry(a.connection).or_default() += 1;
            m
        },
    );
    // Streams the client sent before it saw the GOAWAY are refused unprocessed: the client
    // sends them again on a new connection.
    assert!(
        per_conn.values().all(|&n| n <= 100),
        "no stream answered after the 100th: {per_conn:?}"
    );
    assert_eq!(env.sim.accepted().len(), 1000, "nothing answered twice");
    // With 20 in flight, each connection has streams on the wire when its GOAWAY comes
    // (about 50 refusals in all per run): the resend path was taken.
    assert!(
        env.sim.requests() > 1000,
        "refused streams were sent again: {} requests",
        env.sim.requests()
    );
}

/// SPEC 4.3: GOAWAY'd streams are resent on a new connection, spending no attempt, also
/// with several connections churning at once. A server that closed its socket while the
/// client's next requests were still arriving had the kernel reset the connection, which
/// threw away its last answers and its GOAWAY unread: those pushes came back as
/// "connection reset" (an attempt spent), and an answered one was sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaways_on_several_connections_spend_no_attempt_and_answer_nothing_twice() {
    let env = start(SimOptions {
        goaway_after: Some(50),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 3");
    let n = 6000;
    let seen = within(120, blast_seen(&client, n)).await;
    let spent: Vec<&str> = seen
        .iter()
        .flatten()
        .filter(|o| matches!(o, Outcome::Retry { unsent: false, .. }))
        .map(|o| o.reason())
        .collect();
    let finals: Vec<Outcome> = seen.iter().map(|s| s.last().unwrap().clone()).collect();
    assert_all_sent(&finals);
    assert!(
        spent.is_empty(),
        "{} pushes spent an attempt, e.g. {:?}",
        spent.len(),
        spent.first()
    );
    assert_eq!(
        env.sim.accepted().len(),
        n as usize,
        "nothing answered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_drops_are_retried_and_the_pool_recovers() {
    let env = start(SimOptions {
        drop_after: Some(150),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    let (finals, retries) = within(120, blast(&client, 1000)).await;
    assert_all_sent(&finals);
    assert_eq!(distinct_tokens(&env), 1000, "none lost");
    assert!(retries > 0, "drops surface as Retry");
    assert!(client.stats().connects >= 6, "{:?}", client.stats());
    // After the storm, a healthy server gets plain sends.
    env.sim.set_drop_after(None);
    let client2 = env.client("");
    assert!(matches!(
        within(30, client2.send(&push(5000))).await,
        Outcome::Sent { .. }
    ));
}

/// `drop_after = N` counts like `goaway_after`: a connection answers its N streams, then
/// dies on the next one, also when the streams arrive together (as a client's do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_n_streams_answers_those_n() {
    let env = start(SimOptions {
        drop_after: Some(3),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    let (finals, _) = within(120, blast(&client, 60)).await;
    assert_all_sent(&finals);
    assert_eq!(distinct_tokens(&env), 60, "none lost");
    let conns = env.sim.connections();
    assert!(conns <= 40, "{conns} connections for 60 pushes at 3 each");
}

/// A connection that carried its N streams goes away once they are answered, also when
/// the client sends nothing more (an idle connection dying is what `drop_after` is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_after_n_streams_goes_away_idle_too() {
    let env = start(SimOptions {
        drop_after: Some(1),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    let o = within(30, client.send(&push(1))).await;
    assert!(matches!(o, Outcome::Sent { .. }), "{o:?}");
    within(30, async {
        while env.sim.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_until_authorised_then_many() {
    let env = start(SimOptions {
        streams_one_until_authorized: true,
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    let (finals, retries) = within(120, blast(&client, 2000)).await;
    assert_all_sent(&finals);
    assert_eq!(retries, 0);
    // The client never opened a second stream before the first answer: the simulator
    // refused nothing (refusals would count as requests without an acceptance).
    assert_eq!(env.sim.requests(), 2000);
    assert_eq!(client.stats().connects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_time_out_as_retry_and_others_go_on() {
    // The latency histogram's sum (process-wide: other tests add their short answers).
    let latency_sum = || -> f64 {
        pushdrop::metrics::encode()
            .lines()
            .find_map(|l| l.strip_prefix("pushdrop_send_latency_seconds_sum "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    let sum_before = latency_sum();
    let env = start(SimOptions::default()).await;
    let client = env.client("request_timeout_ms = 300");
    for i in 0..20 {
        env.sim
            .script(&token(i), TokenScript::Delay(Duration::from_secs(3)));
    }
    within(60, async {
        // The first answer lifts the one-stream limit of a fresh connection.
        assert!(matches!(client.send(&push(99)).await, Outcome::Sent { .. }));
        let mut slow = tokio::task::JoinSet::new();
        for i in 0..20 {
            let c = client.clone();
            slow.spawn(async move {
                let t = std::time::Instant::now();
                (c.send(&push(i)).await, t.elapsed())
            });
        }
        // Fast pushes share the connection meanwhile.
        for i in 100..150 {
            let o = client.send(&push(i)).await;
            assert!(matches!(o, Outcome::Sent { .. }), "{o:?}");
        }
        while let Some(r) = slow.join_next().await {
            let (o, took) = r.unwrap();
            match &o {
                Outcome::Retry {
                    status: None,
                    reason,
                    unsent: false,
                } => {
                    assert!(reason.contains("300 ms"), "{reason}")
                }
                other => panic!("expected a timeout Retry, got {other:?}"),
            }
            assert!(
                took < Duration::from_secs(3),
                "timed out at the request timeout, not the answer"
            );
        }
        // A timed-out request is in the latency histogram, at the timeout.
        let timed = latency_sum() - sum_before;
        assert!(timed >= 20.0 * 0.3, "{timed}");
        // The connection survived (PING answered), and the slow tokens go through once fast.
        env.sim.clear_scripts();
        for i in 0..20 {
            assert!(matches!(client.send(&push(i)).await, Outcome::Sent { .. }));
        }
    })
    .await;
    assert_eq!(client.stats().connects, 1);
}

/// A server that accepts TCP and hangs up at once, counting connection attempts, and a
/// client of it (`request_timeout_ms = 200`). The simulator is only there for its credentials.
async fn hang_up_server() -> (
    ApnsClient,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
    SimEnv,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let env = start(SimOptions::default()).await;
    let cfg = config_for(
        &format!("https://{addr}"),
        &env.creds.ca_file,
        env.dir.path(),
        "request_timeout_ms = 200",
        &env.token_app("app"),
    );
    let client = ApnsClient::new(&cfg).unwrap();
    (client, attempts, server, env)
}

#[tokio::test]
async fn unreachable_host_is_retry_unsent_without_a_connect_storm() {
    let (client, attempts, server, _env) = hang_up_server().await;
    let started = std::time::Instant::now();
    let outcomes = within(60, async {
        let mut v = Vec::new();
        for i in 0..200 {
            v.push(client.send(&push(i)).await);
        }
        v
    })
    .await;
    for o in &outcomes {
        assert!(matches!(o, Outcome::Retry { unsent: true, .. }), "{o:?}");
    }
    // 200 sends within a few seconds, but only a handful of connection attempts (back-off).
    let n = attempts.load(Ordering::SeqCst);
    assert!(
        n <= 15,
        "{n} connection attempts in {:?}",
        started.elapsed()
    );
    server.abort();
}

/// The sender pauses an unreachable APNs and decides when to try again: `connect_by` makes
/// the pool connect then, however long its own back-off has grown (a long outage would
/// otherwise keep failing on the old error, without a connect, long after APNs is back).
#[tokio::test]
async fn connect_by_cuts_the_pools_back_off_short() {
    let (client, attempts, server, _env) = hang_up_server().await;
    // Fail until the pool backs off for longer than a request may wait.
    within(60, async {
        let mut i = 0;
        loop {
            let before = attempts.load(Ordering::SeqCst);
            let o = client.send(&push(i)).await;
            assert!(matches!(o, Outcome::Retry { unsent: true, .. }), "{o:?}");
            i += 1;
            if before > 3 && attempts.load(Ordering::SeqCst) == before {
                break;
            }
        }
    })
    .await;
    let n = attempts.load(Ordering::SeqCst);
    let o = client.send(&push(1000)).await;
    assert!(matches!(o, Outcome::Retry { unsent: true, .. }), "{o:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), n, "still backing off");
    client.connect_by(
        "app",
        pushdrop::config::Environment::Production,
        std::time::Instant::now(),
    );
    within(10, client.send(&push(1001))).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        n + 1,
        "a connect right after connect_by"
    );
    server.abort();
}

#[tokio::test]
async fn connection_refused_is_retry_unsent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let env = start(SimOptions::default()).await;
    let cfg = config_for(
        &format!("https://127.0.0.1:{port}"),
        &env.creds.ca_file,
        env.dir.path(),
        "",
        &env.token_app("app"),
    );
    let client = ApnsClient::new(&cfg).unwrap();
    match within(30, client.send(&push(1))).await {
        Outcome::Retry {
            unsent: true,
            reason,
            ..
        } => assert!(reason.contains("connect"), "{reason}"),
        o => panic!("{o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_go_through_an_http_connect_proxy() {
    let env = start(SimOptions::default()).await;
    let proxy = connect_proxy().await;
    let client = env.client(&format!("proxy = \"{}\"", proxy.url));
    within(60, async {
        for i in 0..50 {
            assert!(matches!(client.send(&push(i)).await, Outcome::Sent { .. }));
        }
    })
    .await;
    assert_eq!(
        proxy.tunnels.load(Ordering::SeqCst),
        1,
        "one tunnel, one connection"
    );
    assert_eq!(env.sim.accepted().len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pushes_over_one_connection_with_1000_in_flight() {
    let env = start(SimOptions {
        record_limit: 20_000,
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 1");
    let sem = Arc::new(tokio::sync::Semaphore::new(1000));
    let peak = Arc::new(AtomicUsize::new(0));
    let now_in = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    within(120, async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10_000u32 {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (c, peak, now_in) = (client.clone(), peak.clone(), now_in.clone());
            tasks.spawn(async move {
                let n = now_in.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                let o = c.send(&push(i)).await;
                now_in.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                o
            });
        }
        let mut sent = 0;
        while let Some(r) = tasks.join_next().await {
            let o = r.unwrap();
            assert!(matches!(o, Outcome::Sent { .. }), "{o:?}");
            sent += 1;
        }
        assert_eq!(sent, 10_000);
    })
    .await;
    eprintln!("10,000 pushes in {:?}", started.elapsed());
    assert_eq!(env.sim.accepted_count(), 10_000);
    assert_eq!(distinct_tokens(&env), 10_000);
    assert_eq!(env.sim.connections(), 1);
    assert_eq!(client.stats().connects, 1);
    assert!(peak.load(Ordering::SeqCst) >= 900, "1000 in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_share_the_load() {
    let env = start(SimOptions {
        streams_one_until_authorized: true,
        max_concurrent_streams: 50,
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 3");
    let (finals, _) = within(120, blast(&client, 600)).await;
    assert_all_sent(&finals);
    let conns: std::collections::HashSet<_> = env
        .sim
        .accepted()
        .into_iter()
        .map(|a| a.connection)
        .collect();
    assert_eq!(
        conns.len(),
        3,
        "the load spreads over the configured connections"
    );
    assert_eq!(client.stats().connects, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_found_by_ping_and_replaced() {
    let env = start(SimOptions::default()).await;
    let proxy = connect_proxy().await;
    let client = env.client(&format!(
        "proxy = \"{}\"\nping_interval_s = 1\nrequest_timeout_ms = 1000",
        proxy.url
    ));
    within(60, async {
        assert!(matches!(client.send(&push(1)).await, Outcome::Sent { .. }));
        // The network path goes silent: no FIN, no RST, nothing.
        proxy.frozen.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        proxy.frozen.store(false, Ordering::SeqCst);
        // The idle PING went unanswered, so the connection was dropped: this push opens a
        // new one instead of waiting on the dead one.
        let o = deliver(&client, push(2)).await;
        assert!(matches!(o.last(), Some(Outcome::Sent { .. })), "{o:?}");
    })
    .await;
    assert_eq!(proxy.tunnels.load(Ordering::SeqCst), 2);
    assert_eq!(client.stats().connects, 2);
}

/// APNs may cap a connection's streams (one until it authorises a token, its SETTINGS after)
/// and answer slowly. A request waiting for a stream is not timed out for that wait: each
/// push has the timeout from when it goes out, so none is retried, and none is sent twice
/// (a request timed out while APNs had it would be sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_free_stream_is_not_a_timeout() {
    let env = start(SimOptions {
        max_concurrent_streams: 1,
        latency: Duration::from_millis(200),
        ..SimOptions::default()
    })
    .await;
    // Six pushes one after another take 1.2 s, twice the timeout.
    let client = env.client("connections = 1\nrequest_timeout_ms = 600");
    let outcomes = send_at_once(&client, 0..6).await;
    assert_all_sent(&outcomes);
    assert_eq!(env.sim.accepted_count(), 6, "each push went out once");
    assert_eq!(distinct_tokens(&env), 6);
}

/// But a connection on which APNs stops answering is not one to queue behind: once no answer
/// came within the timeout, the requests waiting for its streams give up (unsent, their
/// attempts kept; the sender pauses the app as unreachable) instead of going out one by one,
/// each waiting out the timeout of the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_do_not_queue_behind_a_connection_that_stopped_answering() {
    let env = start(SimOptions {
        max_concurrent_streams: 1,
        latency: Duration::from_secs(30),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 1\nrequest_timeout_ms = 400");
    let started = std::time::Instant::now();
    let outcomes = send_at_once(&client, 0..8).await;
    // One by one, eight would take 3.2 s.
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2000), "{took:?}");
    let unsent = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Retry { unsent: true, .. }))
        .count();
    assert!(unsent >= 5, "{outcomes:?}");
}

/// A server whose SETTINGS allow no stream at all takes no request: nothing is handed to a
/// connection that cannot carry it (where it would wait unsent until its timeout and spend an
/// attempt); each push ends unsent, its attempt kept, as with an unreachable APNs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_allowing_no_stream_gets_no_request() {
    let env = start(SimOptions {
        max_concurrent_streams: 0,
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 1\nrequest_timeout_ms = 300");
    for i in 0..2 {
        let o = within(10, client.send(&push(i))).await;
        assert!(matches!(o, Outcome::Retry { unsent: true, .. }), "{o:?}");
    }
    assert_eq!(env.sim.requests(), 0);
}

/// A connection that sat idle longer than the timeout is not taken for a hanging one when a
/// batch arrives: the requests waiting for its one stream go out as the answers come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_after_an_idle_spell_waits_for_the_streams_it_needs() {
    let env = start(SimOptions {
        max_concurrent_streams: 1,
        latency: Duration::from_millis(100),
        ..SimOptions::default()
    })
    .await;
    let client = env.client("connections = 1\nrequest_timeout_ms = 300");
    assert!(matches!(
        within(10, client.send(&push(0))).await,
        Outcome::Sent { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Eight at 100 ms each: the last waits more than twice the timeout for its stream.
    let outcomes = send_at_once(&client, 1..9).await;
    assert_all_sent(&outcomes);
    assert_eq!(env.sim.accepted_count(), 9);
    assert_eq!(env.sim.connections(), 1);
}

/// A connection on which a request gets no answer at all within the timeout hangs: it is
/// replaced, and the requests behind it go out on a new connection instead of each spending
/// an attempt on the silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_answers_nothing_is_replaced() {
    let env = start(SimOptions {
        max_concurrent_streams: 1,
        ..SimOptions::default()
    })
    .await;
    env.sim
        .script(&token(0), TokenScript::Delay(Duration::from_secs(30)));
    let client = env.client("connections = 1\nrequest_timeout_ms = 300");
    let outcomes = within(30, async {
        let mut tasks = tokio::task::JoinSet::new();
        let c = client.clone();
        tasks.spawn(async move { (0, c.send(&push(0)).await) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 1..5 {
            let client = client.clone();
            tasks.spawn(async move { (i, deliver(&client, push(i)).await.pop().unwrap()) });
        }
        let mut outcomes = Vec::new();
        while let Some(r) = tasks.join_next().await {
            outcomes.push(r.unwrap());
        }
        outcomes
    })
    .await;
    for (i, o) in &outcomes {
        if *i == 0 {
            assert!(matches!(o, Outcome::Retry { unsent: false, .. }), "{o:?}");
        } else {
            assert!(matches!(o, Outcome::Sent { .. }), "push {i}: {o:?}");
        }
    }
    assert_eq!(env.sim.accepted_count(), 4, "each of the others once");
    assert!(env.sim.connections() >= 2);
}

/// A process that did not run for a while (stopped with SIGSTOP, its VM paused) finds its
/// timeouts' timers late, with answers unread in its socket: those answers count, and the
/// push APNs accepted is not sent again.
#[test]
fn a_stalled_process_reads_the_answers_that_came_before_timing_out() {
    // The simulator on a runtime of its own, which goes on while the client's stalls.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let env = sim_rt.block_on(start(SimOptions {
        latency: Duration::from_millis(1000),
        ..SimOptions::default()
    }));
    let client = env.client("request_timeout_ms = 1500");
    // One worker, as the daemon's.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A connection first, so that the next request goes out at once.
        let c = client.clone();
        let o = tokio::spawn(async move { c.send(&push(1)).await })
            .await
            .unwrap();
        assert!(matches!(o, Outcome::Sent { .. }), "{o:?}");
        let c = client.clone();
        let pending = tokio::spawn(async move { c.send(&push(2)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The worker stops for 3 s: the answer (1 s after the request) waits in the socket;
        // the 1.5 s timeout's timer runs 1.7 s late.
        tokio::spawn(async { std::thread::sleep(Duration::from_secs(3)) })
            .await
            .unwrap();
        let o = pending.await.unwrap();
        assert!(matches!(o, Outcome::Sent { .. }), "{o:?}");
    });
    assert_eq!(env.sim.requests(), 2, "nothing sent twice");
    drop(rt);
    sim_rt.block_on(env.sim.shutdown());
}

/// A proxy that refuses (407: it wants credentials pushdrop does not send) or never answers
/// CONNECT is named in the reason, with what to do about a 407; a proxy that hangs at CONNECT
/// and a tunnel that hangs after it are told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_or_hangs_is_named_in_the_reason() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start(SimOptions::default()).await;
    for (answer, said) in [
        (
            Some("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"),
            "no proxy credentials",
        ),
        (
            None,
            "took over 500 ms: the proxy took the connection but did not answer CONNECT",
        ),
        // Tunnel granted, then nothing comes through it.
        (
            Some("HTTP/1.1 200 Connection established\r\n\r\n"),
            "took over 500 ms: the TLS handshake did not finish",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a.as_bytes()).await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        let client = env.client(&format!("proxy = \"{url}\"\nconnect_timeout_ms = 500"));
        match within(30, client.send(&push(1))).await {
            Outcome::Retry { reason, .. } => {
                assert!(reason.contains(&format!("proxy {addr}")), "{reason}");
                assert!(reason.contains(said), "{reason}");
            }
            o => panic!("{o:?}"),
        }
    }
    // Nothing listening where the proxy should be: said as the proxy's refusal, not APNs'.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = env.client(&format!(
        "proxy = \"http://{addr}\"\nconnect_timeout_ms = 500"
    ));
    match within(30, client.send(&push(1))).await {
        Outcome::Retry { reason, .. } => assert!(
            reason.contains(&format!(
                "through proxy {addr}: the proxy itself cannot be reached"
            )),
            "{reason}"
        ),
        o => panic!("{o:?}"),
    }
}
