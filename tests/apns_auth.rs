//! Token and certificate authentication against the simulator over real TLS.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use common::sim::*;
use common::world::paused_by_a_wrong_key_id;
use pushdrop::apns::{ApnsClient, Clock, Outcome, PushRequest};
use pushdrop::config::Environment;
use pushdrop::simulator::{SimOptions, Simulator, TokenScript};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn is_sent(o: &Outcome) -> bool {
    matches!(o, Outcome::Sent { .. })
}

#[tokio::test]
async fn token_auth_is_accepted_and_connection_reused() {
    let env = start(SimOptions::default()).await;
    let client = env.client("");
    within(60, async {
        for i in 0..20 {
            let o = client.send(&push(i)).await;
            assert!(is_sent(&o), "{o:?}");
        }
    })
    .await;
    let accepted = env.sim.accepted();
    assert_eq!(accepted.len(), 20);
    assert!(
        accepted
            .iter()
            .all(|a| a.key_id.as_deref() == Some(env.creds.key_id.as_str()))
    );
    assert_eq!(client.stats().connects, 1, "never a connection per request");
    assert_eq!(
        client.stats().jwt_mints,
        1,
        "one token shared by all requests"
    );
    assert_eq!(env.sim.connections(), 1);
}

#[tokio::test]
async fn wrong_key_kid_or_team_is_refused_with_apples_reason() {
    let env = start(SimOptions::default()).await;
    let foreign = foreign_p8(env.dir.path());
    let cases = [
        (
            "wrong key",
            token_app(
                "app",
                BUNDLE,
                &foreign,
                &env.creds.key_id,
                &env.creds.team_id,
            ),
        ),
        (
            "wrong kid",
            token_app(
                "app",
                BUNDLE,
                &env.creds.key_file,
                "ZZZZZZZZZZ",
                &env.creds.team_id,
            ),
        ),
        (
            "wrong team",
            token_app(
                "app",
                BUNDLE,
                &env.creds.key_file,
                &env.creds.key_id,
                "ZZZZZZZZZZ",
            ),
        ),
    ];
    for (what, app) in cases {
        let client = ApnsClient::new(&env.config("", &app)).unwrap();
        let o = within(30, client.send(&push(1))).await;
        assert_eq!(
            o,
            Outcome::PauseApp {
                status: Some(403),
                reason: "InvalidProviderToken".into()
            },
            "{what}"
        );
    }
    assert!(env.sim.accepted().is_empty());
}

#[tokio::test]
async fn fixed_key_file_is_picked_up_without_restart() {
    let env = start(SimOptions::default()).await;
    let key_path = env.dir.path().join("AuthKey_fixme.p8");
    std::fs::copy(foreign_p8(env.dir.path()), &key_path).unwrap();
    let app = token_app(
        "app",
        BUNDLE,
        &key_path,
        &env.creds.key_id,
        &env.creds.team_id,
    );
    let client = ApnsClient::new(&env.config("", &app)).unwrap();
    for i in 0..4 {
        let o = within(30, client.send(&push(1 + i))).await;
        assert_eq!(o.kind(), "pause_app", "{o:?}");
    }
    // Each refusal retires its connection, which is closed, not left open beside the next.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env.sim.open_connections() > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        env.sim.open_connections() <= 1,
        "{} open",
        env.sim.open_connections()
    );
    assert_eq!(env.sim.connections(), 4);
    // Many at once: an unauthorised connection carries one stream at a time, and the ones
    // waiting when the credentials are refused share that answer instead of each trying a
    // connection of its own.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = client.clone();
        tasks.spawn(async move { client.send(&push(100 + i)).await });
    }
    while let Some(o) = tasks.join_next().await {
        let o = o.unwrap();
        assert_eq!(o.kind(), "pause_app", "{o:?}");
    }
    let made = env.sim.connections();
    assert!(made <= 4 + 2, "{made} connections for 50 refused pushes");
    // The operator puts the right key in place; the next send uses it.
    std::fs::copy(&env.creds.key_file, &key_path).unwrap();
    let o = within(30, client.send(&push(2))).await;
    assert!(is_sent(&o), "{o:?}");
}

#[tokio::test]
async fn expired_token_is_refreshed_once_and_never_twice_within_20_minutes() {
    let env = start(SimOptions::default()).await;
    let offset = Arc::new(AtomicI64::new(0));
    let o2 = offset.clone();
    let clock: Clock = Arc::new(move || {
        let off = o2.load(Ordering::SeqCst);
        SystemTime::now() + Duration::from_secs(off as u64)
    });
    let cfg = env.config("", &env.token_app("app"));
    let client = ApnsClient::with_clock(&cfg, clock).unwrap();
    within(60, async {
        assert!(is_sent(&client.send(&push(1)).await));
        assert_eq!(client.stats().jwt_mints, 1);

        // Apple's clock says the token is over an hour old; ours says 21 minutes passed.
        env.sim.set_clock_skew(61 * 60);
        offset.store(21 * 60, Ordering::SeqCst);
        let outcomes = deliver(&client, push(2)).await;
        assert_eq!(
            outcomes.iter().map(Outcome::kind).collect::<Vec<_>>(),
            vec!["auth_refreshed", "sent"],
            "{outcomes:?}"
        );
        assert_eq!(client.stats().jwt_mints, 2, "exactly one refresh");

        // APNs keeps calling fresh tokens expired (a badly skewed clock): no new mint within
        // 20 minutes of the last, whatever happens.
        env.sim.set_clock_skew(10 * 3600);
        for i in 0..10 {
            let o = client.send(&push(10 + i)).await;
            assert_eq!(o.reason(), "ExpiredProviderToken", "{o:?}");
            // Never spends an attempt: a pause (or, for a request signed with the token
            // before, an immediate resend).
            assert!(
                matches!(o, Outcome::PauseApp { .. } | Outcome::AuthRefreshed { .. }),
                "{o:?}"
            );
        }
        assert_eq!(
            client.stats().jwt_mints,
            2,
            "no second mint within 20 minutes"
        );

        // Once 20 minutes have passed, one new token (which APNs then finds fresh).
        offset.store(41 * 60, Ordering::SeqCst);
        env.sim.set_clock_skew(90 * 60);
        let outcomes = deliver(&client, push(30)).await;
        assert!(is_sent(outcomes.last().unwrap()), "{outcomes:?}");
        assert_eq!(client.stats().jwt_mints, 3);
    })
    .await;
}

/// APNs keeps a provider token per connection and refuses a change within 20 minutes
/// (`TooManyProviderTokenUpdates`) unless it called the old token expired there. A token
/// minted at once for one connection's `ExpiredProviderToken` stays on that connection: the
/// other (here the sandbox pool's) keeps its token, and its pushes keep going out.
#[tokio::test]
async fn a_forced_refresh_is_not_pushed_onto_other_connections() {
    let env = start(SimOptions::default()).await;
    // The first token is two minutes old by APNs' clock, so the refresh is a change APNs sees.
    let offset = Arc::new(AtomicI64::new(-120));
    let o2 = offset.clone();
    let clock: Clock = Arc::new(move || {
        let now = SystemTime::now();
        let off = o2.load(Ordering::SeqCst);
        now - Duration::from_secs((-off).max(0) as u64)
    });
    let client = ApnsClient::with_clock(&env.config("", &env.token_app("app")), clock).unwrap();
    let sandbox = |i| PushRequest {
        environment: Environment::Sandbox,
        ..push(i)
    };
    within(60, async {
        assert!(is_sent(&client.send(&push(1)).await));
        assert!(is_sent(&client.send(&sandbox(2)).await));
        offset.store(0, Ordering::SeqCst);
        env.sim.script(
            &token(3),
            TokenScript::FailFirst {
                n: 1,
                status: 403,
                reason: "ExpiredProviderToken".into(),
            },
        );
        let outcomes = deliver(&client, push(3)).await;
        assert_eq!(
            outcomes.iter().map(Outcome::kind).collect::<Vec<_>>(),
            vec!["auth_refreshed", "sent"],
            "{outcomes:?}"
        );
        assert_eq!(client.stats().jwt_mints, 2);
        for i in 10..20 {
            for req in [push(i), sandbox(i + 100)] {
                let o = client.send(&req).await;
                assert!(is_sent(&o), "{:?}: {o:?}", req.environment);
            }
        }
        assert_eq!(client.stats().jwt_mints, 2);
    })
    .await;
}

#[tokio::test]
async fn token_is_refreshed_proactively_after_50_minutes() {
    let env = start(SimOptions::default()).await;
    let offset = Arc::new(AtomicI64::new(0));
    let o2 = offset.clone();
    let clock: Clock =
        Arc::new(move || SystemTime::now() + Duration::from_secs(o2.load(Ordering::SeqCst) as u64));
    let client = ApnsClient::with_clock(&env.config("", &env.token_app("app")), clock).unwrap();
    within(60, async {
        assert!(is_sent(&client.send(&push(1)).await));
        offset.store(49 * 60, Ordering::SeqCst);
        env.sim.set_clock_skew(49 * 60);
        assert!(is_sent(&client.send(&push(2)).await));
        assert_eq!(client.stats().jwt_mints, 1);
        offset.store(51 * 60, Ordering::SeqCst);
        env.sim.set_clock_skew(51 * 60);
        // Refreshed before Apple could complain: no ExpiredProviderToken round trip.
        assert!(is_sent(&client.send(&push(3)).await));
        assert_eq!(client.stats().jwt_mints, 2);
    })
    .await;
}

#[tokio::test]
async fn several_apps_with_their_own_keys_and_teams() {
    let env = start(SimOptions::default()).await;
    let other = env.sim.add_token_key(env.dir.path()).unwrap();
    let apps = env.token_app("one")
        + "\n"
        + &token_app(
            "two",
            BUNDLE,
            &other.key_file,
            &other.key_id,
            &other.team_id,
        );
    let client = ApnsClient::new(&env.config("", &apps)).unwrap();
    within(60, async {
        for i in 0..5 {
            assert!(is_sent(
                &client
                    .send(&push_for(
                        "one",
                        &token(i),
                        pushdrop::model::PushType::Alert
                    ))
                    .await
            ));
            assert!(is_sent(
                &client
                    .send(&push_for(
                        "two",
                        &token(i),
                        pushdrop::model::PushType::Alert
                    ))
                    .await
            ));
        }
    })
    .await;
    let kids: std::collections::BTreeSet<_> = env
        .sim
        .accepted()
        .into_iter()
        .filter_map(|a| a.key_id)
        .collect();
    assert_eq!(kids.len(), 2, "each app signs with its own key: {kids:?}");
    assert_eq!(client.stats().jwt_mints, 2);
    assert_eq!(client.stats().connects, 2, "one connection per key");
}

#[tokio::test]
async fn certificate_auth_with_a_client_cert_signed_by_the_ca() {
    let env = start(SimOptions {
        require_client_cert: true,
        ..SimOptions::default()
    })
    .await;
    let c = &env.creds;
    for app in [
        cert_app("app", &c.client_cert_file, Some(&c.client_key_file)),
        // The key inside the certificate file.
        cert_app("app", &c.client_combined_file, None),
    ] {
        let client = ApnsClient::new(&env.config("", &app)).unwrap();
        let o = within(30, client.send(&push(1))).await;
        assert!(is_sent(&o), "{o:?}");
    }
    let accepted = env.sim.accepted();
    assert_eq!(accepted.len(), 2);
    assert!(
        accepted.iter().all(|a| a.key_id.is_none()),
        "no JWT with certificate auth"
    );
    // The simulator's certificate covers several topics (the app, `.voip`, …), as Apple's
    // universal certificates do: a request must name its topic.
    let mut raw = RawConn::open_as(&env, Some((&c.client_cert_file, &c.client_key_file))).await;
    let path = format!("/3/device/{}", token(1));
    let body = br#"{"aps":{}}"#;
    assert_eq!(
        within(30, raw.request("POST", &path, &[], body)).await,
        (400, "MissingTopic".into())
    );
    assert_eq!(
        within(
            30,
            raw.request("POST", &path, &[("apns-topic", BUNDLE)], body)
        )
        .await,
        (200, String::new())
    );
}

/// A `.p12` bundle (what Keychain exports) with a password from `password_file`.
#[tokio::test]
async fn certificate_auth_with_a_pkcs12_file_and_its_password() {
    let env = start(SimOptions {
        require_client_cert: true,
        ..SimOptions::default()
    })
    .await;
    let c = &env.creds;
    let pem = std::fs::read(&c.client_cert_file).unwrap();
    let certs: Vec<p12_keystore::Certificate> = CertificateDer::pem_slice_iter(&pem)
        .map(|c| p12_keystore::Certificate::from_der(c.unwrap().as_ref()).unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&c.client_key_file).unwrap();
    let key = p12_keystore::PrivateKey::from_der(key.secret_der()).unwrap();
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(
        "push",
        p12_keystore::KeyStoreEntry::PrivateKeyChain(p12_keystore::PrivateKeyChain::new(
            b"push".as_slice(),
            key,
            certs,
        )),
    );
    let p12 = env.dir.path().join("push.p12");
    std::fs::write(&p12, store.writer("s3cret pass").write().unwrap()).unwrap();
    let pass = env.dir.path().join("push.pass");
    std::fs::write(&pass, "s3cret pass\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&p12, &pass] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let app = format!(
        "[[apps]]\nname = \"app\"\nbundle_id = \"{}\"\ncertificate = {{ cert_file = \"{}\", password_file = \"{}\" }}\n",
        common::sim::BUNDLE,
        p12.display(),
        pass.display()
    );
    let client = ApnsClient::new(&env.config("", &app)).unwrap();
    let o = within(30, client.send(&push(1))).await;
    assert!(is_sent(&o), "{o:?}");

    // The wrong password is a start-up error naming the file.
    std::fs::write(&pass, "wrong\n").unwrap();
    let Err(err) = ApnsClient::new(&env.config("", &app)) else {
        panic!("a wrong PKCS#12 password must be refused");
    };
    assert!(err.to_string().contains("push.p12"), "{err}");
}

#[tokio::test]
async fn certificate_not_from_the_ca_pauses_the_app_naming_the_file() {
    let env = start(SimOptions {
        require_client_cert: true,
        ..SimOptions::default()
    })
    .await;
    let (cert, key) = foreign_client_cert(env.dir.path());
    let client = ApnsClient::new(&env.config("", &cert_app("app", &cert, Some(&key)))).unwrap();
    let o = within(30, client.send(&push(1))).await;
    match &o {
        Outcome::PauseApp { reason, .. } => {
            assert!(reason.contains(&cert.display().to_string()), "{reason}");
            assert!(reason.contains("client certificate"), "{reason}");
        }
        other => panic!("expected PauseApp, got {other:?}"),
    }
    // A token app against a server that wants a certificate: also a clear pause.
    let client = env.client("");
    let o = within(30, client.send(&push(1))).await;
    match &o {
        Outcome::PauseApp { reason, .. } => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("expected PauseApp, got {other:?}"),
    }
    // Requests during the back-off fail fast with the same reason (no connect storm).
    let started = std::time::Instant::now();
    let o = within(30, client.send(&push(2))).await;
    assert_eq!(o.kind(), "pause_app");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(env.sim.accepted().is_empty());
}

/// A server certificate this side does not trust is TLS trouble on the way, not the app's
/// credentials: unsent, as for an unreachable APNs (the sender then pauses quietly and lists
/// the reason in `status`), with the hint to set `ca_file`.
#[tokio::test]
async fn untrusted_server_certificate_is_unreachable_with_a_hint() {
    let env = start(SimOptions::default()).await;
    // No ca_file: the simulator's CA is not among the web PKI roots.
    let text = format!(
        "[inbox]\ndir = \"inbox\"\n[apns]\nproduction_url = \"{}\"\n\n{}",
        env.sim.url(),
        env.token_app("app")
    );
    let dir = env.dir.path();
    let (cfg, _) = pushdrop::config::Config::from_toml(&text, &dir.join("p.toml"), dir).unwrap();
    let client = ApnsClient::new(&cfg).unwrap();
    let o = within(30, client.send(&push(1))).await;
    match &o {
        Outcome::Retry {
            status: None,
            reason,
            unsent: true,
        } => assert!(reason.contains("ca_file"), "{reason}"),
        other => panic!("expected an unsent Retry, got {other:?}"),
    }
}

/// A simulator restarted on the folder an earlier start wrote its credentials to uses them
/// again (`pushdrop simulate --dir`): a client set up from the first start's files — CA, `.p8`
/// key, key and team ids, client certificate — is trusted by the second one, on the same
/// port, with nothing rewritten. Broken ones are made anew; a folder it did not write is
/// refused untouched.
#[tokio::test]
async fn a_simulator_restarted_on_its_folder_keeps_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let kept = SimOptions {
        kept_credentials: Some(dir.path().to_path_buf()),
        // Started again on it below: a port no client socket of another test may take.
        listen: ([127, 0, 0, 1], common::world::free_port()).into(),
        ..SimOptions::default()
    };
    let first = Simulator::start(kept.clone()).await.unwrap();
    assert!(!first.credentials_reused(), "nothing to keep yet");
    let creds = first.write_credentials(dir.path()).unwrap();
    let addr = first.addr();
    let ca_before = std::fs::read_to_string(&creds.ca_file).unwrap();
    first.shutdown().await;

    let second = Simulator::start(kept.clone()).await.unwrap();
    assert_eq!(second.addr(), addr);
    assert!(second.credentials_reused());
    assert_eq!(second.key_id(), creds.key_id);
    assert_eq!(second.team_id(), creds.team_id);
    let app = token_app(
        "app",
        BUNDLE,
        &creds.key_file,
        &creds.key_id,
        &creds.team_id,
    ) + &cert_app(
        "certapp",
        &creds.client_cert_file,
        Some(&creds.client_key_file),
    );
    let cfg = config_for(&second.url(), &creds.ca_file, dir.path(), "", &app);
    let client = ApnsClient::new(&cfg).unwrap();
    within(30, async {
        let o = client.send(&push(1)).await;
        assert!(is_sent(&o), "token auth: {o:?}");
        let o = client
            .send(&push_for(
                "certapp",
                &token(2),
                pushdrop::model::PushType::Alert,
            ))
            .await;
        assert!(is_sent(&o), "certificate auth: {o:?}");
    })
    .await;
    // Kept files are left as they are, not written again (a reader of one during a restart,
    // or a second simulator on the folder, would have found it emptied for a moment).
    let files = |d: &std::path::Path| -> Vec<(String, std::time::SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let modified = e.metadata().unwrap().modified().unwrap();
                (e.file_name().into_string().unwrap(), modified)
            })
            .collect();
        v.sort();
        v
    };
    let before = files(dir.path());
    // Longer than the file system's time stamps are coarse.
    tokio::time::sleep(Duration::from_millis(50)).await;
    second.write_credentials(dir.path()).unwrap();
    assert_eq!(std::fs::read_to_string(&creds.ca_file).unwrap(), ca_before);
    assert_eq!(
        files(dir.path()),
        before,
        "same files, unmodified, no temporary file"
    );
    second.shutdown().await;

    // Credentials that do not belong together (a CA key that did not sign the CA) are made
    // anew rather than used.
    std::fs::write(
        dir.path().join("ca-key.pem"),
        std::fs::read_to_string(&creds.client_key_file).unwrap(),
    )
    .unwrap();
    let third = Simulator::start(kept.clone()).await.unwrap();
    assert!(!third.credentials_reused());
    assert_eq!(
        third.credentials_not_kept(),
        Some("ca-key.pem is not the key of ca.pem")
    );
    // The first start's key is replaced, not left beside the new one.
    let new_creds = third.write_credentials(dir.path()).unwrap();
    assert!(new_creds.key_file.exists());
    assert!(!creds.key_file.exists(), "the replaced .p8 is still there");
    third.shutdown().await;

    // A missing file is named.
    std::fs::remove_file(dir.path().join("client.pem")).unwrap();
    let fourth = Simulator::start(kept.clone()).await.unwrap();
    assert!(!fourth.credentials_reused());
    let why = fourth
        .credentials_not_kept()
        .unwrap_or_default()
        .to_string();
    assert!(why.starts_with("client.pem: "), "{why}");
    fourth.write_credentials(dir.path()).unwrap();
    fourth.shutdown().await;

    // Without the ids file, nothing there is provably the simulator's: it refuses the folder
    // and touches nothing (a probe's finding: `--dir config` deleted the app's real .p8 key).
    std::fs::remove_file(dir.path().join("simulator-ids.toml")).unwrap();
    let before = files(dir.path());
    let Err(e) = Simulator::start(kept.clone()).await else {
        panic!("a folder without simulator-ids.toml was used");
    };
    let said = e.to_string();
    assert!(
        said.contains("ca.pem") && said.contains(".p8") && said.contains("--dir"),
        "{said}"
    );
    assert_eq!(files(dir.path()), before, "nothing replaced or removed");
    // A folder of someone else's key alone, a config folder say, is refused alike.
    let config = tempfile::tempdir().unwrap();
    let key = config.path().join("AuthKey_ABC123DEFG.p8");
    std::fs::write(&key, "the app's real key").unwrap();
    let elsewhere = SimOptions {
        kept_credentials: Some(config.path().to_path_buf()),
        ..kept
    };
    let Err(e) = Simulator::start(elsewhere).await else {
        panic!("a folder with a foreign .p8 was used");
    };
    assert!(e.to_string().contains("AuthKey_ABC123DEFG.p8"), "{e}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "the app's real key");
}

/// A key id APNs refuses, fixed in the config file while the daemon runs, is used from the
/// app's next try: no restart (SPEC 4.3: fixed credentials are picked up without a restart;
/// a probe's finding: only the `.p8` file was read again).
#[test]
fn a_key_id_fixed_in_the_config_file_is_picked_up_without_a_restart() {
    let (w, daemon, good) = paused_by_a_wrong_key_id("fixed", 5);
    std::fs::write(&w.env.config_path, good).unwrap();
    common::inbox::wait_for("all sent after the fix", || {
        w.env
            .count("SELECT count(*) FROM deliveries WHERE state = 1")
            == 5
    });
    daemon.shutdown();
    let status = w.env.status_json();
    assert_eq!(status["paused"], serde_json::json!([]), "{status}");
    assert_eq!(
        w.env
            .count("SELECT count(*) FROM events WHERE kind = 'resumed'"),
        1
    );
}
