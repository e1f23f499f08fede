//! The README's guides, run for real: the droppers' snippets (docs/droppers/, the shell and
//! Python ones also verbatim in the README) drop files that a running daemon takes and
//! delivers; the Containerfile's HEALTHCHECK command answers by the daemon's state.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::ops::{APP, Ops, OpsOptions, device, wait_for};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo(p)).unwrap()
}

fn run_with_stdin(cmd: &mut Command, input: &str) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn notification_to_users(id: &str) -> String {
    format!(
        r#"{{"type":"notification","id":"{id}","app":"{APP}","to":{{"users":["guide"]}},"payload":{{"aps":{{"alert":"{id}"}}}}}}"#
    )
}

#[test]
fn readme_snippets_are_the_tested_files() {
    let readme = read("README.md");
    let sh = read("docs/droppers/drop.sh");
    assert!(
        readme.contains(&sh),
        "README's shell snippet = docs/droppers/drop.sh"
    );
    let py = read("docs/droppers/drop.py");
    let start = py.find("def drop(").unwrap();
    let end = py.find("\n\n\nif __name__").unwrap();
    assert!(
        readme.contains(&py[start..end]),
        "README's Python snippet = drop() of docs/droppers/drop.py"
    );
}

#[test]
fn dropper_snippets_feed_a_running_daemon() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let inbox = env.inbox.to_str().unwrap();

    let devices: String = (0..3).map(|n| device(n, "guide") + "\n").collect();
    run_with_stdin(
        Command::new("sh").args([
            repo("docs/droppers/drop.sh").to_str().unwrap(),
            inbox,
            "a-devices.jsonl",
        ]),
        &devices,
    );
    wait_for("devices ingested", || env.inbox_pending() == 0);
    let mut ids = vec!["from-python"];
    run_with_stdin(
        Command::new("python3").args([
            repo("docs/droppers/drop.py").to_str().unwrap(),
            inbox,
            "b-python.jsonl",
        ]),
        &(notification_to_users("from-python") + "\n"),
    );
    if has("java") {
        let status = Command::new("java")
            .arg(repo("docs/droppers/Drop.java"))
            .args([inbox, "c-java.jsonl", &notification_to_users("from-java")])
            .status()
            .unwrap();
        assert!(status.success());
        ids.push("from-java");
    } else {
        eprintln!("java not installed: Drop.java not run");
    }
    for id in &ids {
        let receipt = env.receipts.join(format!("{id}.json"));
        wait_for(&format!("receipt {id}"), || receipt.exists());
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&receipt).unwrap()).unwrap();
        assert_eq!(r["counts"]["sent"], 3, "{r}");
    }
    // Nothing was rejected, no temp file was left behind, and the files were group-readable.
    assert!(
        !env.inbox.join("rejected").exists()
            || std::fs::read_dir(env.inbox.join("rejected"))
                .unwrap()
                .next()
                .is_none()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&env.inbox)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    use std::os::unix::fs::PermissionsExt;
    for f in std::fs::read_dir(env.inbox.join("processed"))
        .unwrap()
        .flatten()
    {
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{:?}", f.file_name());
    }
    assert_eq!(env.sim.accepted_count(), 3 * ids.len() as u64);
    daemon.shutdown();
}

/// The `HEALTHCHECK` of deploy/Containerfile, with the daemon's port.
fn healthcheck(port: u16) -> bool {
    let file = read("deploy/Containerfile");
    let line = file
        .lines()
        .find(|l| l.trim_start().starts_with("CMD [\"bash\", \"-c\""))
        .expect("HEALTHCHECK CMD line");
    let args: Vec<String> =
        serde_json::from_str(line.trim_start().trim_start_matches("CMD ")).unwrap();
    assert_eq!(args[..2], ["bash", "-c"]);
    let script = args[2].replace("/9464", &format!("/{port}"));
    Command::new("bash")
        .args(["-c", &script])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn container_healthcheck_follows_the_daemon() {
    let env = Ops::new(OpsOptions::default());
    let daemon = env.start();
    let port = daemon.admin_addr().unwrap().port();
    assert!(healthcheck(port), "healthy while running");
    daemon.shutdown();
    assert!(!healthcheck(port), "unhealthy once stopped");
}
