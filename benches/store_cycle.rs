//! The store's share of one delivery, without network: ingests one file of N single-token
//! notifications (default 100,000), then claims and records them as `sent` in batches the
//! way the sender does, and prints the writer's cost per delivery for each step. Run:
//! `cargo bench --bench store_cycle [-- N]`.

use std::time::{Duration, Instant};

use pushdrop::config::Environment;
use pushdrop::model::{NotificationRecord, PushType, Record, Target};
use pushdrop::store::{DeliveryResult, IngestFile, ResultKind, Store};

/// CPU time so far of this process's thread named `pushdrop-store`, in nanoseconds.
fn writer_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "pushdrop-store" {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            return stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// Device token number `i`: random-looking by default, as Apple's are (so each new device
/// lands somewhere in the token index), or in index order with `SEQUENTIAL=1`.
fn token(i: u64, sequential: bool) -> String {
    if sequential {
        format!("{i:064x}")
    } else {
        // A bijective scramble of i: distinct tokens, no order.
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5851_F42D_4C95_7F2D;
        format!("{h:016x}{i:048x}")
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let batch: usize = std::env::var("BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(125);
    let sequential = std::env::var_os("SEQUENTIAL").is_some();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db"), true).expect("open store");
    let records = (0..n)
        .map(|i| {
            Record::Notification(NotificationRecord {
                app: "bench".into(),
                id: None,
                target: Target::Tokens(vec![token(i as u64, sequential)]),
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
    let c = writer_cpu_ns();
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
    let ingest_cpu = writer_cpu_ns() - c;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut claim, mut record, mut done) = (Duration::ZERO, Duration::ZERO, 0usize);
    let (mut claim_cpu, mut record_cpu) = (0u64, 0u64);
    rt.block_on(async {
        loop {
            let t = Instant::now();
            let c = writer_cpu_ns();
            let claimed = store
                .claim_due(pushdrop::model::now_ms(), batch)
                .await
                .expect("claim")
                .deliveries;
            claim += t.elapsed();
            claim_cpu += writer_cpu_ns() - c;
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
            let c = writer_cpu_ns();
            store.record_results(results).await.expect("record");
            record += t.elapsed();
            record_cpu += writer_cpu_ns() - c;
        }
    });
    assert_eq!(done, n, "every delivery claimed once");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let cpu = |ns: u64| ns as f64 / 1e3 / n as f64;
    println!(
        "{n} single-token notifications ({} tokens), per delivery (batches of {batch}): \
         ingest {:.2} us (writer CPU {:.2}), claim {:.2} us (CPU {:.2}), record {:.2} us (CPU {:.2})",
        if sequential { "sequential" } else { "random" },
        per(ingest),
        cpu(ingest_cpu),
        per(claim),
        cpu(claim_cpu),
        per(record),
        cpu(record_cpu)
    );
}
