//! Load generator for the APNs client, used by `scripts/bench-apns` (not part of the CLI).
//!
//!     bench_apns CONFIG [N] [IN_FLIGHT]   sends N pushes (default 100000) with IN_FLIGHT
//!                                         concurrent requests (default 1000) for the first app
//!     bench_apns CONFIG --jwt             prints a provider token for the first app (h2load)

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pushdrop::apns::{ApnsClient, Outcome, PushRequest};
use pushdrop::config::Config;
use pushdrop::model::PushType;

/// User + system CPU time of this process so far, in microseconds: on a shared machine a
/// steadier figure than wall-clock rates.
fn process_cpu_us() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
    us(ru.ru_utime) + us(ru.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        anyhow::bail!("usage: bench_apns CONFIG [N] [IN_FLIGHT] | CONFIG --jwt");
    };
    let (cfg, _) = Config::load(std::path::Path::new(path))?;
    let app = cfg
        .apps
        .first()
        .ok_or_else(|| anyhow::anyhow!("no app"))?
        .clone();
    if args.get(1).map(String::as_str) == Some("--jwt") {
        let t = app
            .token
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("app uses certificates"))?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&t.key_file)?)?;
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(t.key_id.clone());
        let iat = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = serde_json::json!({"iss": t.team_id, "iat": iat});
        println!("{}", jsonwebtoken::encode(&h, &claims, &key)?);
        return Ok(());
    }
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let in_flight: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = ApnsClient::new(&cfg)?;
        let app_name: Arc<str> = Arc::from(app.name.as_str());
        let payload = Bytes::from_static(br#"{"aps":{"alert":"benchmark"}}"#);
        let (environment, topic) = (app.environment, app.bundle_id.clone());
        let make = move |i: usize| PushRequest {
            app: app_name.clone(),
            environment,
            token: format!("{i:08x}{}", "ab".repeat(28)),
            apns_id: uuid::Uuid::new_v4().to_string(),
            topic: topic.clone(),
            push_type: PushType::Alert,
            priority: 10,
            expiration: None,
            collapse_id: None,
            payload: payload.clone(),
        };
        // Warm up: open the connection and lift the one-stream limit.
        match client.send(&make(0)).await {
            Outcome::Sent { .. } => {}
            o => anyhow::bail!("warm-up push failed: {o:?}"),
        }
        let started = Instant::now();
        let cpu0 = process_cpu_us();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
            let (client, next) = (client.clone(), next.clone());
            let make = make.clone();
            workers.spawn(async move {
                let mut sent = 0usize;
                let mut other = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return (sent, other);
                    }
                    match client.send(&make(i + 1)).await {
                        Outcome::Sent { .. } => sent += 1,
                        _ => other += 1,
                    }
                }
            });
        }
        let (mut sent, mut other) = (0, 0);
        while let Some(r) = workers.join_next().await {
            let (s, o) = r?;
            sent += s;
            other += o;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu_us = (process_cpu_us() - cpu0) as f64 / n as f64;
        println!(
            "client: {n} requests in {secs:.2} s = {:.0} req/s ({sent} sent, {other} other), {} connection(s), {cpu_us:.1} us CPU per request",
            n as f64 / secs,
            client.stats().connects
        );
        Ok(())
    })
}
