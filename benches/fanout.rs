//! Broadcast fan-out benchmark: registers N devices (default 1,000,000), queues one broadcast,
//! and times the expansion into deliveries; prints peak RSS. Run:
//! `cargo bench --bench fanout [-- N]`.

use std::time::Instant;

use pushdrop::config::Environment;
use pushdrop::model::{DeviceAction, DeviceRecord, NotificationRecord, PushType, Record, Target};
use pushdrop::store::{IngestFile, Store};

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db"), true).expect("open store");
    let t = Instant::now();
    let chunk = 100_000;
    for start in (0..n).step_by(chunk) {
        let records = (start..(start + chunk as u32).min(n))
            .map(|i| {
                Record::Device(DeviceRecord {
                    app: "bench".into(),
                    token: format!("{i:016x}{}", "cd".repeat(24)),
                    user: Some(format!("user{}", i % 1000)),
                    environment: Environment::Production,
                    action: DeviceAction::Register,
                })
            })
            .collect();
        store
            .ingest(vec![IngestFile {
                name: format!("devices-{start}.jsonl"),
                size: 0,
                sha256: format!("{start}"),
                ino: start as u64,
                mtime_ns: 0,
                records,
            }])
            .expect("ingest");
    }
    let reg = t.elapsed();
    println!(
        "registered {n} devices in {:.2} s ({:.0}/s)",
        reg.as_secs_f64(),
        n as f64 / reg.as_secs_f64()
    );
    store
        .ingest(vec![IngestFile {
            name: "broadcast.json".into(),
            size: 0,
            sha256: "b".into(),
            ino: 0,
            mtime_ns: 0,
            records: vec![Record::Notification(NotificationRecord {
                app: "bench".into(),
                id: Some("broadcast".into()),
                target: Target::All,
                payload: r#"{"aps":{"alert":"hello"}}"#.into(),
                push_type: PushType::Alert,
                priority: 10,
                topic: "com.example.bench".into(),
                collapse_id: None,
                expiration: None,
                send_at_ms: None,
                environment: Environment::Production,
            })],
        }])
        .expect("ingest broadcast");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t = Instant::now();
    let made = rt.block_on(async {
        let mut made = 0;
        loop {
            let m = store
                .fan_out_due(pushdrop::model::now_ms() + 1, 50_000)
                .await
                .expect("fan out")
                .0;
            if m == 0 {
                break made;
            }
            made += m;
        }
    });
    let fan = t.elapsed();
    println!(
        "fanned out a broadcast to {made} devices in {:.2} s ({:.0} deliveries/s); peak RSS {:.0} MB",
        fan.as_secs_f64(),
        made as f64 / fan.as_secs_f64(),
        peak_rss_mb()
    );
}
