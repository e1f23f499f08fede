//! What goes on the wire, and what the simulator says about it: every push type's topic and
//! priority, Apple's header and payload checks, per-token scripts.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::sim::*;
use pushdrop::apns::Outcome;
use pushdrop::model::PushType;
use pushdrop::simulator::{SimOptions, TokenScript};

/// What to break in a push, and Apple's answer.
type Case = (
    &'static str,
    Box<dyn Fn(&mut pushdrop::apns::PushRequest)>,
    u16,
    &'static str,
);

#[tokio::test]
async fn every_push_type_carries_its_topic_suffix_and_priority() {
    let env = start(SimOptions {
        bundle_ids: vec![BUNDLE.into()],
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    within(60, async {
        for (i, pt) in PushType::ALL.into_iter().enumerate() {
            let mut req = push_for("app", &token(i as u32), pt);
            if pt == PushType::Mdm {
                req.topic = "com.apple.mgmt.External.test".into();
            }
            req.expiration = Some(1_900_000_000);
            req.collapse_id = Some(format!("c{i}"));
            let o = client.send(&req).await;
            assert!(matches!(o, Outcome::Sent { .. }), "{pt}: {o:?}");
        }
    })
    .await;
    let accepted = env.sim.accepted();
    assert_eq!(accepted.len(), PushType::ALL.len());
    for (i, pt) in PushType::ALL.into_iter().enumerate() {
        let a = accepted
            .iter()
            .find(|a| a.token == token(i as u32))
            .unwrap();
        assert_eq!(a.push_type, pt.as_str());
        if pt != PushType::Mdm {
            assert_eq!(a.topic, format!("{BUNDLE}{}", pt.topic_suffix()), "{pt}");
        }
        assert_eq!(a.priority, pt.default_priority(), "{pt}");
        assert_eq!(a.expiration, Some(1_900_000_000));
        assert_eq!(a.collapse_id.as_deref(), Some(format!("c{i}").as_str()));
        assert_eq!(&a.payload[..], br#"{"aps":{"alert":"hi"}}"#);
    }
    let expected_suffixes = [
        (PushType::Voip, ".voip"),
        (PushType::Complication, ".complication"),
        (PushType::Fileprovider, ".pushkit.fileprovider"),
        (PushType::Liveactivity, ".push-type.liveactivity"),
        (PushType::Pushtotalk, ".voip-ptt"),
    ];
    for (pt, suffix) in expected_suffixes {
        assert!(
            accepted
                .iter()
                .any(|a| a.push_type == pt.as_str() && a.topic.ends_with(suffix))
        );
    }
}

#[tokio::test]
async fn apns_id_is_kept_and_apples_checks_fail_bad_pushes() {
    let env = start(SimOptions {
        bundle_ids: vec![BUNDLE.into()],
        ..SimOptions::default()
    })
    .await;
    let client = env.client("");
    within(60, async {
        let req = push(1);
        let id = req.apns_id.clone();
        match client.send(&req).await {
            Outcome::Sent { apns_id, .. } => assert_eq!(apns_id, id),
            o => panic!("{o:?}"),
        }
        let cases: Vec<Case> = vec![
            (
                "background at 10",
                Box::new(|r| {
                    r.push_type = PushType::Background;
                    r.priority = 10
                }),
                400,
                "BadPriority",
            ),
            (
                "voip topic for alert",
                Box::new(|r| r.topic = format!("{BUNDLE}.voip")),
                400,
                "BadTopic",
            ),
            (
                "voip without suffix",
                Box::new(|r| r.push_type = PushType::Voip),
                400,
                "BadTopic",
            ),
            (
                "foreign bundle",
                Box::new(|r| r.topic = "com.other.app".into()),
                400,
                "TopicDisallowed",
            ),
            (
                "long collapse id",
                Box::new(|r| r.collapse_id = Some("x".repeat(65))),
                400,
                "BadCollapseId",
            ),
            (
                "apns-id not a UUID",
                Box::new(|r| r.apns_id = "not-a-uuid".into()),
                400,
                "BadMessageId",
            ),
            (
                "payload too large",
                Box::new(|r| {
                    r.payload =
                        Bytes::from(format!(r#"{{"aps":{{"alert":"{}"}}}}"#, "x".repeat(4100)))
                }),
                413,
                "PayloadTooLarge",
            ),
            (
                "empty payload",
                Box::new(|r| r.payload = Bytes::new()),
                400,
                "PayloadEmpty",
            ),
            (
                "payload not JSON",
                Box::new(|r| r.payload = Bytes::from_static(b"{nope")),
                400,
                "BadPayload",
            ),
            (
                "negative expiration",
                Box::new(|r| r.expiration = Some(-5)),
                400,
                "BadExpirationDate",
            ),
        ];
        for (what, change, status, reason) in cases {
            let mut req = push(2);
            change(&mut req);
            let o = client.send(&req).await;
            assert_eq!(
                o,
                Outcome::Failed {
                    status,
                    reason: reason.into()
                },
                "{what}"
            );
        }
        // A voip payload may be 5120 bytes.
        let mut req = push_for("app", &token(3), PushType::Voip);
        req.payload = Bytes::from(format!(r#"{{"aps":{{}},"x":"{}"}}"#, "y".repeat(5000)));
        assert!(matches!(client.send(&req).await, Outcome::Sent { .. }));
        // Token shape.
        let mut req = push(4);
        req.token = "abc".repeat(21);
        assert_eq!(
            client.send(&req).await,
            Outcome::InvalidToken {
                status: 400,
                reason: "BadDeviceToken".into(),
                timestamp_ms: None
            }
        );
    })
    .await;
}

#[tokio::test]
async fn token_scripts_drive_every_outcome() {
    let env = start(SimOptions::default()).await;
    let client = env.client("request_timeout_ms = 1000");
    let sim = &env.sim;
    sim.script(
        &token(1),
        TokenScript::Unregistered {
            timestamp_ms: Some(1_700_000_000_000),
        },
    );
    sim.script(&token(2), TokenScript::BadDeviceToken);
    sim.script(
        &token(3),
        TokenScript::FailFirst {
            n: 2,
            status: 503,
            reason: "ServiceUnavailable".into(),
        },
    );
    sim.script(
        &token(4),
        TokenScript::Reason {
            status: 400,
            reason: "DeviceTokenNotForTopic".into(),
        },
    );
    sim.script(
        &token(5),
        TokenScript::Reason {
            status: 429,
            reason: "TooManyRequests".into(),
        },
    );
    sim.script(
        &token(6),
        TokenScript::Reason {
            status: 500,
            reason: "InternalServerError".into(),
        },
    );
    sim.script(&token(7), TokenScript::Delay(Duration::from_millis(200)));
    sim.script(
        &token(8),
        TokenScript::Reason {
            status: 410,
            reason: "ExpiredToken".into(),
        },
    );
    within(60, async {
        assert_eq!(
            client.send(&push(1)).await,
            Outcome::InvalidToken {
                status: 410,
                reason: "Unregistered".into(),
                timestamp_ms: Some(1_700_000_000_000)
            }
        );
        assert_eq!(
            client.send(&push(2)).await,
            Outcome::InvalidToken {
                status: 400,
                reason: "BadDeviceToken".into(),
                timestamp_ms: None
            }
        );
        let seen = deliver(&client, push(3)).await;
        assert_eq!(
            seen.iter().map(Outcome::kind).collect::<Vec<_>>(),
            ["retry", "retry", "sent"],
            "{seen:?}"
        );
        assert_eq!(
            seen[0],
            Outcome::Retry {
                status: Some(503),
                reason: "ServiceUnavailable".into(),
                unsent: false
            }
        );
        assert_eq!(
            client.send(&push(4)).await,
            Outcome::Failed {
                status: 400,
                reason: "DeviceTokenNotForTopic".into()
            }
        );
        assert_eq!(client.send(&push(5)).await.kind(), "retry");
        assert_eq!(client.send(&push(6)).await.kind(), "retry");
        match client.send(&push(7)).await {
            Outcome::Sent { latency, .. } => assert!(latency >= Duration::from_millis(200)),
            o => panic!("{o:?}"),
        }
        assert_eq!(client.send(&push(8)).await.kind(), "invalid_token");
    })
    .await;
}

#[tokio::test]
async fn simulator_checks_what_apple_checks() {
    let env = start(SimOptions::default()).await;
    let jwt = format!("bearer {}", jwt(&env, now_s()));
    let old = format!("bearer {}", jwt_at(&env, now_s() - 3700));
    let mut c = RawConn::open(&env).await;
    let t = token(1);
    let path = format!("/3/device/{t}");
    let body = br#"{"aps":{}}"#;
    let ok: Vec<(&str, &str)> = vec![("authorization", &jwt), ("apns-topic", BUNDLE)];
    within(60, async {
        assert_eq!(
            c.request("POST", &path, &ok, body).await,
            (200, String::new())
        );
        assert_eq!(
            c.request("GET", &path, &ok, b"").await,
            (405, "MethodNotAllowed".into())
        );
        // The answer to a HEAD carries no body (RFC 9110), or a client sees a protocol error.
        assert_eq!(
            c.request("HEAD", &path, &ok, b"").await,
            (405, String::new())
        );
        // The scheme's name in any case.
        let shouted = jwt.replacen("bearer", "BEARER", 1);
        assert_eq!(
            c.request(
                "POST",
                &path,
                &[("authorization", &shouted), ("apns-topic", BUNDLE)],
                body
            )
            .await,
            (200, String::new())
        );
        assert_eq!(
            c.request("POST", "/3/other", &ok, body).await,
            (404, "BadPath".into())
        );
        assert_eq!(
            c.request("POST", &path, &[("apns-topic", BUNDLE)], body)
                .await,
            (403, "MissingProviderToken".into())
        );
        assert_eq!(
            c.request(
                "POST",
                &path,
                &[("authorization", "bearer x.y.z"), ("apns-topic", BUNDLE)],
                body
            )
            .await,
            (403, "InvalidProviderToken".into())
        );
        assert_eq!(
            c.request("POST", &path, &[("authorization", &jwt)], body)
                .await,
            (400, "MissingTopic".into())
        );
        let mut dup = ok.clone();
        dup.push(("apns-priority", "10"));
        dup.push(("apns-priority", "5"));
        assert_eq!(
            c.request("POST", &path, &dup, body).await,
            (400, "DuplicateHeaders".into())
        );
        // A second token, even a garbled one, is a repeated header like any other.
        let mut dup = ok.clone();
        dup.push(("authorization", "bearer x.y.z"));
        assert_eq!(
            c.request("POST", &path, &dup, body).await,
            (400, "DuplicateHeaders".into())
        );
        // Without `apns-push-type`, the topic's suffix says the kind: a VoIP push may be
        // 5120 bytes, and a plain topic is an alert's, which may not.
        let voip_topic = format!("{BUNDLE}.voip");
        let voip: Vec<(&str, &str)> = vec![("authorization", &jwt), ("apns-topic", &voip_topic)];
        let big = format!(r#"{{"aps":{{}},"x":"{}"}}"#, "y".repeat(5000));
        assert_eq!(
            c.request("POST", &path, &voip, big.as_bytes()).await,
            (200, String::new())
        );
        assert_eq!(
            c.request("POST", &path, &ok, big.as_bytes()).await,
            (413, "PayloadTooLarge".into())
        );
        // JSON whose string is not UTF-8 is not JSON.
        assert_eq!(
            c.request("POST", &path, &ok, b"{\"aps\":{},\"x\":\"\xff\"}")
                .await,
            (400, "BadPayload".into())
        );
        let mut bad = ok.clone();
        bad.push(("apns-push-type", "fax"));
        assert_eq!(
            c.request("POST", &path, &bad, body).await,
            (400, "InvalidPushType".into())
        );
        // Values that are not plain text are malformed, not absent; a collapse id is measured
        // in bytes.
        let long_id = format!("{}é", "c".repeat(63));
        for (name, value, reason) in [
            ("apns-push-type", "alerté", "InvalidPushType"),
            ("apns-priority", "1é", "BadPriority"),
            ("apns-expiration", "1é", "BadExpirationDate"),
            // Numbers spelled otherwise than plainly are not Apple's values either.
            ("apns-priority", "05", "BadPriority"),
            ("apns-priority", "+5", "BadPriority"),
            ("apns-expiration", "+100", "BadExpirationDate"),
            ("apns-expiration", "-1", "BadExpirationDate"),
            ("apns-id", "é", "BadMessageId"),
            ("apns-collapse-id", long_id.as_str(), "BadCollapseId"),
        ] {
            let mut bad = ok.clone();
            bad.push((name, value));
            assert_eq!(
                c.request("POST", &path, &bad, body).await,
                (400, reason.into()),
                "{name}: {value}"
            );
        }
        assert_eq!(
            c.request("POST", "/3/device/", &ok, body).await,
            (400, "MissingDeviceToken".into())
        );
        assert_eq!(
            c.request("POST", &format!("/3/device/{}", "zz".repeat(32)), &ok, body)
                .await,
            (400, "BadDeviceToken".into())
        );
    })
    .await;
    // A token over an hour old, on a fresh connection.
    let mut c2 = RawConn::open(&env).await;
    let old_h: Vec<(&str, &str)> = vec![("authorization", &old), ("apns-topic", BUNDLE)];
    assert_eq!(
        within(30, c2.request("POST", &path, &old_h, body)).await,
        (403, "ExpiredProviderToken".into())
    );
    // A connection is bound to the first key id it saw.
    let other = env.sim.add_token_key(env.dir.path()).unwrap();
    let other_jwt = format!(
        "bearer {}",
        jwt_with(&other.key_file, &other.key_id, &other.team_id, now_s())
    );
    let other_h: Vec<(&str, &str)> = vec![("authorization", &other_jwt), ("apns-topic", BUNDLE)];
    assert_eq!(
        within(30, c.request("POST", &path, &other_h, body)).await,
        (403, "UnrelatedKeyIdInToken".into())
    );
    // A new token on the same connection within 20 minutes of the last.
    let newer = format!("bearer {}", jwt_at(&env, now_s() + 60));
    let newer_h: Vec<(&str, &str)> = vec![("authorization", &newer), ("apns-topic", BUNDLE)];
    assert_eq!(
        within(30, c.request("POST", &path, &newer_h, body)).await,
        (429, "TooManyProviderTokenUpdates".into())
    );
    // Apple's "no more than once every 20 minutes", on a fresh connection: a token 20
    // minutes newer may replace the first one; then neither a still newer one within 20
    // minutes of that change, nor the older one again (two workers' tokens taking turns).
    let mut c3 = RawConn::open(&env).await;
    let at = |iat: u64| format!("bearer {}", jwt_at(&env, iat));
    let (first, second, third) = (at(now_s() - 3500), at(now_s() - 2200), at(now_s()));
    for (token, want) in [
        (&first, (200, String::new())),
        (&second, (200, String::new())),
        (&third, (429, "TooManyProviderTokenUpdates".to_string())),
        (&first, (429, "TooManyProviderTokenUpdates".to_string())),
        (&second, (200, String::new())),
    ] {
        let h: Vec<(&str, &str)> = vec![("authorization", token), ("apns-topic", BUNDLE)];
        assert_eq!(within(30, c3.request("POST", &path, &h, body)).await, want);
    }
}

/// Starts a push to each token of `tokens` on `c`, in that order, without waiting for answers.
async fn start_pushes(
    c: &mut RawConn,
    tokens: std::ops::Range<u32>,
    headers: &[(&str, &str)],
) -> Vec<h2::client::ResponseFuture> {
    let mut started = Vec::new();
    for i in tokens {
        let path = format!("/3/device/{}", token(i));
        started.push(c.start("POST", &path, headers, br#"{"aps":{}}"#).await);
    }
    started
}

/// Every started push answered 200.
async fn all_sent(started: Vec<h2::client::ResponseFuture>) {
    for (i, r) in started.into_iter().enumerate() {
        assert_eq!(
            RawConn::finish(r).await,
            Ok((200, String::new())),
            "stream {i}"
        );
    }
}

/// "One stream until the first authorised request" is said as APNs says it: the SETTINGS a
/// new connection gets allow one stream, and a SETTINGS frame raises the limit with the first
/// authorised answer. A client that honours SETTINGS (here `h2`'s) is never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_is_announced_until_an_authorised_answer_raises_the_limit() {
    let latency = Duration::from_millis(300);
    let env = start(SimOptions {
        streams_one_until_authorized: true,
        latency,
        ..SimOptions::default()
    })
    .await;
    let auth = format!("bearer {}", jwt(&env, now_s()));
    let mut c = RawConn::open(&env).await;
    let headers = [("authorization", auth.as_str()), ("apns-topic", BUNDLE)];
    within(60, async {
        while c.stream_limit() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let began = std::time::Instant::now();
        let started = start_pushes(&mut c, 0..4, &headers).await;
        all_sent(started).await;
        // The three others waited for the first answer, then went out together.
        assert!(began.elapsed() >= 2 * latency, "{:?}", began.elapsed());
        assert_eq!(c.stream_limit(), 1000);
        assert_eq!((env.sim.requests(), env.sim.accepted_count()), (4, 4));
        // A new connection starts at one again.
        let fresh = RawConn::open(&env).await;
        while fresh.stream_limit() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A client that opens more streams than the SETTINGS allow (here: the rule was switched on
/// after the connection opened and announced 1000) has the extra streams refused unprocessed
/// until an authorised answer has gone out.
// On a runtime with several workers, as `pushdrop simulate` runs: its scheduler starts the
// last task spawned first, which would have served the last of four streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_one_are_refused_until_an_authorised_answer_went_out() {
    let env = start(SimOptions {
        latency: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let auth = format!("bearer {}", jwt(&env, now_s()));
    let mut c = RawConn::open(&env).await;
    let headers = [("authorization", auth.as_str()), ("apns-topic", BUNDLE)];
    within(60, async {
        while c.stream_limit() != 1000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        env.sim.set_streams_one_until_authorized(true);
        // Four streams at once, in one go: the first is served, as under a limit of one,
        // and the others are refused while its (slow) answer is on its way.
        let started = start_pushes(&mut c, 0..4, &headers).await;
        let mut answers = Vec::new();
        for r in started {
            answers.push(RawConn::finish(r).await);
        }
        assert_eq!(answers[0], Ok((200, String::new())), "{answers:?}");
        for (i, a) in answers.iter().enumerate().skip(1) {
            assert_eq!(
                *a,
                Err(h2::Reason::REFUSED_STREAM),
                "stream {i}: {answers:?}"
            );
        }
        // Once an answer is out, many at once.
        let started = start_pushes(&mut c, 10..14, &headers).await;
        all_sent(started).await;
    })
    .await;
}

/// A scripted delay beside an error makes a slow error answer (a client's timeout meeting a
/// 503), not a slow 200.
#[tokio::test]
async fn a_slow_error_answer_comes_after_its_delay() {
    let env = start(SimOptions::default()).await;
    let t = token(7);
    env.sim.script(
        &t,
        TokenScript::Slow {
            delay: Duration::from_millis(400),
            then: Box::new(TokenScript::Reason {
                status: 503,
                reason: "ServiceUnavailable".into(),
            }),
        },
    );
    let auth = format!("bearer {}", jwt(&env, now_s()));
    let mut c = RawConn::open(&env).await;
    within(60, async {
        let headers = [("authorization", auth.as_str()), ("apns-topic", BUNDLE)];
        let began = std::time::Instant::now();
        let answer = c
            .request(
                "POST",
                &format!("/3/device/{t}"),
                &headers,
                br#"{"aps":{}}"#,
            )
            .await;
        assert_eq!(answer, (503, "ServiceUnavailable".into()));
        assert!(
            began.elapsed() >= Duration::from_millis(400),
            "{:?}",
            began.elapsed()
        );
    })
    .await;
}
