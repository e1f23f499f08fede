//! The store's share of one delivery, without network: ingests one file of N single-token
//! notifications (default 100,000), then claims and records them as `sent` in batches the
//! way the sender does, and prints the writer's cost per delivery for each step. Run:
//! `cargo bench --bench store_cycle [-- N]`.

use std::time::{Duration, Instant};

use pushdrop::config::Environment;
use pushdrop::model::{NotificationRecord, PushType, Record, Target};
use pushdrop::store::{DeliveryResult, IngestFile, ResultKind, Store};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let batch: usize = std::env::var("BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(125);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db"), true).expect("open store");
    let records = (0..n)
        .map(|i| {
            Record::Notification(NotificationRecord {
                app: "bench".into(),
                id: None,
                target: Target::Tokens(vec![format!("{i:064x}")]),
                payload: format!(r#"{{"aps":{{"alert":"bench {i}"}}}}"#),
                push_type: PushType::Alert,
                priority: 10,
                topic: "com.example.bench".into(),
                collapse_id: None,
                expiration: None,
                send_at_ms: None,
                environment: Environment::Production,
            })
        })
        .collect();
    let t = Instant::now();
    store
        .ingest(vec![IngestFile {
            name: "bench.jsonl".into(),
            size: 0,
            sha256: "x".into(),
            ino: 1,
            mtime_ns: 0,
            records,
        }])
        .expect("ingest");
    let ingest = t.elapsed();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut claim, mut record, mut done) = (Duration::ZERO, Duration::ZERO, 0usize);
    rt.block_on(async {
        loop {
            let t = Instant::now();
            let (claimed, _) = store
                .claim_due(pushdrop::model::now_ms(), batch, 60_000)
                .await
                .expect("claim");
            claim += t.elapsed();
            if claimed.is_empty() {
                break;
            }
            done += claimed.len();
            let results = claimed
                .into_iter()
                .map(|c| DeliveryResult {
                    delivery_id: c.delivery_id,
                    kind: ResultKind::Sent { apns_id: None },
                })
                .collect();
            let t = Instant::now();
            store.record_results(results).await.expect("record");
            record += t.elapsed();
        }
    });
    assert_eq!(done, n, "every delivery claimed once");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{n} single-token notifications: ingest {:.2} us, claim {:.2} us, record {:.2} us per delivery (batches of {batch})",
        per(ingest),
        per(claim),
        per(record)
    );
}
