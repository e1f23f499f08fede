//! The CPU cost of one delivery log line: logs N outcome lines (default 200,000), field for
//! field as the sender's `log_outcome` writes a sent delivery, through the daemon's own
//! `pushdrop::logging` set-up (stdout layer included) into JSON files in a temporary directory,
//! once with tracing-subscriber's JSON layer and once with `JsonLines`. Each variant runs in a
//! child process of its own, since a process sets its global subscriber once; rounds alternate
//! the two so that both see the same machine. Prints CPU time per line, user + system, of the
//! whole process (the file-writing thread included) and of the logging thread alone; CPU time,
//! not wall time, because the machine is shared. Run:
//! `cargo bench --bench log_line [-- N [ROUNDS]]`.

use std::io::{BufRead as _, BufReader};
use std::process::Command;

use pushdrop::config::{Environment, LogConfig, LogFormat, Rotation};
use pushdrop::logging::JsonFormatter;
use pushdrop::sender::DELIVERY_TARGET;

const VARIANTS: [(&str, JsonFormatter); 2] = [
    (
        "tracing-subscriber json layer",
        JsonFormatter::TracingSubscriber,
    ),
    ("JsonLines", JsonFormatter::JsonLines),
];

/// User + system CPU time of the whole process, in nanoseconds.
fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    // SAFETY: clock_gettime only writes the struct it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the thread CPU clock always exists on the platforms we build for.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One variant in this process: prints `lines process_ns thread_ns`.
fn child(variant: usize, n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = LogConfig {
        dir: Some(dir.path().to_path_buf()),
        rotation: Rotation::Never,
        keep_files: 1,
        format: LogFormat::Json,
        level: "info".into(),
    };
    let guard =
        pushdrop::logging::init_with_json_formatter(&cfg, VARIANTS[variant].1).expect("logging");
    // Values as varied as the sender's, made before the clock starts.
    let ids: Vec<String> = (0..1024)
        .map(|i| format!("budget-2026-11-{i:04}"))
        .collect();
    let tokens: Vec<String> = (0..1024)
        .map(|i| format!("{:08x}", i * 2_654_435_761u64))
        .collect();
    let apns_ids: Vec<String> = (0..1024)
        .map(|i| format!("{i:08X}-89AB-CDEF-0123-456789ABCDEF"))
        .collect();
    let app = String::from("buxheti");
    let environment = Environment::Production;
    let log = |i: usize| {
        let token = tokens[i % 1024].as_str();
        let apns_id = apns_ids[i % 1024].as_str();
        let status = i64::from(200u16);
        let reason = "";
        let attempt = 1 + (i % 3) as u32;
        let latency_ms = 3.0 + (i % 1000) as f64 / 64.0;
        tracing::info!(
            target: DELIVERY_TARGET, event = "delivery", id = %ids[i % 1024], app = %app, token, environment = %environment,
            status = "sent", http_status = status, reason, apns_id, attempt, latency_ms, "delivered"
        );
    };
    let warm_up = 2_000;
    (0..warm_up).for_each(log);
    let (p0, t0) = (process_cpu_ns(), thread_cpu_ns());
    (0..n).for_each(log);
    let t1 = thread_cpu_ns();
    // Waits until the writer thread has written every line.
    drop(guard);
    let p1 = process_cpu_ns();
    let file = dir.path().join("pushdrop.log");
    let lines = BufReader::new(std::fs::File::open(&file).expect("log file"))
        .lines()
        .count();
    assert_eq!(lines, warm_up + n, "lines in {}", file.display());
    println!("{n} {} {}", p1 - p0, t1 - t0);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let variant = args[i + 1].parse().expect("variant");
        let n = args[i + 2].parse().expect("n");
        child(variant, n);
        return;
    }
    let mut numbers = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let n = numbers.next().unwrap_or(200_000);
    let rounds = numbers.next().unwrap_or(3).max(1);
    let exe = std::env::current_exe().expect("own path");
    let mut results = vec![Vec::new(); VARIANTS.len()];
    for _ in 0..rounds {
        for (variant, result) in results.iter_mut().enumerate() {
            let out = Command::new(&exe)
                .args(["--child", &variant.to_string(), &n.to_string()])
                .env_remove("RUST_LOG")
                .output()
                .expect("child");
            assert!(
                out.status.success(),
                "child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let v: Vec<u64> = text
                .split_whitespace()
                .map(|x| x.parse().expect("number"))
                .collect();
            let per_line = |ns: u64| ns as f64 / v[0] as f64 / 1_000.0;
            result.push((per_line(v[1]), per_line(v[2])));
        }
    }
    println!("{n} delivery lines per run, {rounds} runs each; CPU µs per line, median (min)");
    println!("{:<32} {:>16} {:>16}", "", "process", "logging thread");
    let mut medians = Vec::new();
    for ((name, _), result) in VARIANTS.iter().zip(&mut results) {
        let stat = |pick: fn(&(f64, f64)) -> f64, result: &mut Vec<(f64, f64)>| {
            let mut xs: Vec<f64> = result.iter().map(pick).collect();
            xs.sort_by(f64::total_cmp);
            (xs[xs.len() / 2], xs[0])
        };
        let (pm, pmin) = stat(|r| r.0, result);
        let (tm, tmin) = stat(|r| r.1, result);
        println!("{name:<32} {pm:>7.3} ({pmin:>6.3}) {tm:>7.3} ({tmin:>6.3})");
        medians.push((pm, tm));
    }
    println!(
        "JsonLines / json layer: process {:.2}, logging thread {:.2}",
        medians[1].0 / medians[0].0,
        medians[1].1 / medians[0].1
    );
}
