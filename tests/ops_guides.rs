//! The README's guides, run for real: the droppers' snippets (docs/droppers/, the shell and
//! Python ones also verbatim in the README) drop files that a running daemon takes and
//! delivers; the Containerfile's HEALTHCHECK command answers by the daemon's state.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::ops::{APP, Ops, OpsOptions, device, spawn_logged, wait_for};

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
    let end = start + py[start..].find("\n\n\n").unwrap();
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
    let mut ids = vec![];
    if has("python3") {
        let drop_py = repo("docs/droppers/drop.py");
        run_with_stdin(
            Command::new("python3").args([drop_py.to_str().unwrap(), inbox, "b-python.jsonl"]),
            &(notification_to_users("from-python") + "\n"),
        );
        ids.push("from-python");
        // Run as a command, it refuses a duplicate key (json.loads would keep the last one
        // silently, past pushdrop's check) and drops nothing.
        let mut child = Command::new("python3")
            .args([drop_py.to_str().unwrap(), inbox, "b-dup.jsonl"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let line =
            r#"{"type":"device","token":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","user":"a","user":"b"}"#;
        writeln!(child.stdin.take().unwrap(), "{line}").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("stdin line 1: duplicate key 'user'"),
            "{out:?}"
        );
        assert!(!env.inbox.join("b-dup.jsonl").exists());
    } else {
        eprintln!("python3 not installed: drop.py not run");
    }
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

/// `pushdrop show ID --json` once the notification is finished: token → (state, attempts,
/// last reason).
fn finished(
    config: &Path,
    logs: &Path,
    id: &str,
) -> std::collections::HashMap<String, (String, i64, String)> {
    let mut shown = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while shown["finished_at"].is_null() {
        let out = common::ops::pushdrop_cmd(config)
            .args(["show", id, "--json"])
            .output()
            .unwrap();
        shown = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = ["simulate.log", "run.log"]
                .iter()
                .map(|f| std::fs::read_to_string(logs.join(f)).unwrap_or_default())
                .collect();
            panic!(
                "{id} not finished: {}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                logs[0],
                logs[1]
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    shown["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["token"].as_str().unwrap().to_string(),
                (
                    d["state"].as_str().unwrap().to_string(),
                    d["attempts"].as_i64().unwrap(),
                    d["last_reason"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// The `delivery` lines of notification `id` in the JSON log files of `dir`, in order.
fn delivery_lines(dir: &Path, id: &str) -> Vec<serde_json::Value> {
    log_lines(dir)
        .into_iter()
        .filter(|l| l["event"] == "delivery" && l["id"] == id)
        .collect()
}

/// Every line of the JSON log files of `dir`, in order.
fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A warning the config draws at `run` (a key file others may read) is in the rotating log,
/// where the README's operator looks, not only on the terminal that started the daemon (a
/// probe's finding: it went to stderr alone).
#[test]
fn run_logs_the_configs_warnings_in_its_rotating_log() {
    use std::os::unix::fs::PermissionsExt;
    let env = Ops::new(OpsOptions {
        admin: String::new(),
        ..OpsOptions::default()
    });
    std::fs::set_permissions(&env.creds.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _daemon = spawn_logged(
        common::ops::pushdrop_cmd(&env.config_path).arg("run"),
        &env.dir.path().join("run.out"),
    );
    wait_for("the warning in the log", || {
        std::fs::read_dir(&env.log).is_ok_and(|mut d| d.next().is_some())
            && log_lines(&env.log).iter().any(|l| {
                l["event"] == "config_warning"
                    && l["level"] == "WARN"
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("token.key_file") && m.contains("mode 644"))
            })
    });
}

#[test]
fn simulate_answers_as_its_script_says_and_rereads_it_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, flaky, wrong_topic, fine, bad, kept) = (
        "a1".repeat(16),
        "b2".repeat(16),
        "c3".repeat(16),
        "d4".repeat(16),
        "e5".repeat(16),
        "f6".repeat(16),
    );
    let script = dir.path().join("script.toml");
    std::fs::write(
        &script,
        format!(
            "[tokens]\n\
             \"{gone}\" = {{ status = 410, timestamp_ms = 1796000000000 }}\n\
             \"{flaky}\" = {{ status = 503, first = 2 }}\n\
             \"{wrong_topic}\" = {{ status = 400, reason = \"DeviceTokenNotForTopic\" }}\n\
             \"{bad}\" = {{ status = 400 }}\n\
             \"{kept}\" = {{ status = 410, timestamp_ms = 1796000000000 }}\n"
        ),
    )
    .unwrap();
    let sim_dir = dir.path().join("sim");
    let sim_log = dir.path().join("simulate.log");
    let sim = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_pushdrop"))
            .args(["simulate", "--listen", "127.0.0.1:0", "--dir"])
            .arg(&sim_dir)
            .arg("--script")
            .arg(&script),
        &sim_log,
    );
    let config = sim_dir.join("pushdrop-simulator.toml");
    wait_for("the simulator's config", || {
        std::fs::read_to_string(&sim_log).is_ok_and(|l| l.contains("Ctrl-C stops"))
    });
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[sender]\nretry_initial_ms = 20\n\n[log]\ndir = \"log\"\n");
    std::fs::write(&config, text).unwrap();
    let inbox = sim_dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let _daemon = spawn_logged(
        common::ops::pushdrop_cmd(&config).arg("run"),
        &dir.path().join("run.log"),
    );
    let drop = |name: &str, id: &str, tokens: &[&String]| {
        let line = serde_json::json!({"type": "notification", "id": id,
            "to": {"tokens": tokens}, "payload": {"aps": {"alert": "hi"}}});
        let tmp = dir.path().join(name);
        std::fs::write(&tmp, format!("{line}\n")).unwrap();
        std::fs::rename(&tmp, inbox.join(name)).unwrap();
    };

    // `kept` registers now, after the time its 410 names: APNs' answer is older news.
    let tmp = dir.path().join("0.jsonl");
    std::fs::write(&tmp, format!(r#"{{"type":"device","token":"{kept}"}}"#)).unwrap();
    std::fs::rename(&tmp, inbox.join("0.jsonl")).unwrap();
    wait_for("the registration", || {
        inbox.join("processed/0.jsonl").exists()
    });
    drop(
        "1.jsonl",
        "n1",
        &[&gone, &flaky, &wrong_topic, &fine, &bad, &kept],
    );
    let got = finished(&config, dir.path(), "n1");
    let kept_reason = format!("Unregistered; {}", pushdrop::store::DEVICE_KEPT);
    let want = |s: &str, a: i64, r: &str| (s.to_string(), a, r.to_string());
    assert_eq!(got[&gone], want("invalid_token", 1, "Unregistered"));
    assert_eq!(got[&flaky], want("sent", 3, ""));
    assert_eq!(
        got[&wrong_topic],
        want("failed", 1, "DeviceTokenNotForTopic")
    );
    assert_eq!(got[&fine], want("sent", 1, ""));
    // A lone BadDeviceToken is no burst: held a moment, then the device is invalid.
    assert_eq!(got[&bad], want("invalid_token", 1, "BadDeviceToken"));
    assert_eq!(got[&kept], want("invalid_token", 1, &kept_reason));

    // SPEC 4.4: every delivery outcome is one line of the log file, with the notification's
    // id, app, token prefix, status, reason, apns-id, attempt and latency.
    let ingested: Vec<serde_json::Value> = log_lines(&sim_dir.join("log"))
        .into_iter()
        .filter(|l| l["event"] == "ingested" && l["file"] == "1.jsonl")
        .collect();
    assert_eq!(ingested.len(), 1, "{ingested:#?}");
    assert_eq!(ingested[0]["status"], "accepted", "{ingested:#?}");
    assert_eq!(ingested[0]["id"], "n1", "{ingested:#?}");
    let lines = delivery_lines(&sim_dir.join("log"), "n1");
    let of = |t: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["token"] == t[..8]).collect()
    };
    let expect = [
        (&gone, vec![("invalid_token", 410, "Unregistered", 1)]),
        (
            &flaky,
            vec![
                ("retry", 503, "ServiceUnavailable", 1),
                ("retry", 503, "ServiceUnavailable", 2),
                ("sent", 200, "", 3),
            ],
        ),
        (
            &wrong_topic,
            vec![("failed", 400, "DeviceTokenNotForTopic", 1)],
        ),
        (&fine, vec![("sent", 200, "", 1)]),
        (&bad, vec![("invalid_token", 400, "BadDeviceToken", 1)]),
        // The line says what the receipt and `show` say: the device stays.
        (&kept, vec![("invalid_token", 410, kept_reason.as_str(), 1)]),
    ];
    assert_eq!(lines.len(), 8, "{lines:#?}");
    for (token, outcomes) in expect {
        let got = of(token);
        assert_eq!(got.len(), outcomes.len(), "{token}: {got:#?}");
        for (line, (status, http, reason, attempt)) in got.iter().zip(outcomes) {
            assert_eq!(line["app"], "simulated", "{line}");
            assert_eq!(line["status"], status, "{line}");
            assert_eq!(line["http_status"], http, "{line}");
            assert_eq!(line["reason"], reason, "{line}");
            assert_eq!(line["attempt"], attempt, "{line}");
            assert_eq!(line["apns_id"].as_str().map(str::len), Some(36), "{line}");
            assert!(
                line["latency_ms"].as_f64().is_some_and(|l| l > 0.0),
                "{line}"
            );
        }
    }
    // Stdout has the retries but not the sent lines, and says at start where those go.
    let stdout = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(
        stdout.contains("sent deliveries and finished notifications go to the log files in"),
        "{stdout}"
    );
    assert!(stdout.contains("status=\"retry\""), "{stdout}");
    assert!(!stdout.contains("status=\"sent\""), "{stdout}");

    // A new script replaces the old one: `fine` is now gone, `flaky` is well again.
    std::fs::write(
        &script,
        format!("[tokens]\n\"{fine}\" = {{ status = 410, reason = \"ExpiredToken\" }}\n"),
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &sim.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for("the script re-read", || {
        std::fs::read_to_string(&sim_log).is_ok_and(|l| l.contains("simulator script re-read"))
    });
    drop("2.jsonl", "n2", &[&flaky, &fine]);
    let got = finished(&config, dir.path(), "n2");
    assert_eq!(got[&flaky], want("sent", 1, ""));
    assert_eq!(got[&fine], want("invalid_token", 1, "ExpiredToken"));

    // The simulated team may push to its own bundle id only, as with Apple.
    let foreign = serde_json::json!({"type": "notification", "id": "n3",
        "to": {"tokens": [&flaky]}, "topic": "com.example.someone-else",
        "payload": {"aps": {"alert": "hi"}}});
    let tmp = dir.path().join("3.jsonl");
    std::fs::write(&tmp, format!("{foreign}\n")).unwrap();
    std::fs::rename(&tmp, inbox.join("3.jsonl")).unwrap();
    let got = finished(&config, dir.path(), "n3");
    assert_eq!(got[&flaky], want("failed", 1, "TopicDisallowed"));

    // A bad script is refused at start with the bad-config exit code, naming file and line.
    std::fs::write(
        &script,
        format!("[tokens]\n\"{fine}\" = {{ status = 200 }}\n"),
    )
    .unwrap();
    // Re-read by SIGHUP, it is refused on one log line, and the last good script stays.
    let hup = Command::new("kill")
        .args(["-HUP", &sim.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for("the script refused", || {
        std::fs::read_to_string(&sim_log).is_ok_and(|l| l.contains("previous script stays"))
    });
    let log = std::fs::read_to_string(&sim_log).unwrap();
    let refused = log
        .lines()
        .find(|l| l.contains("previous script stays"))
        .unwrap();
    assert!(
        refused.contains("script.toml: line 2: tokens.") && !refused.contains(":;"),
        "{refused}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .args(["simulate", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.path().join("sim2"))
        .arg("--script")
        .arg(&script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("script.toml") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn readme_simulator_script_is_a_valid_script() {
    let readme = read("README.md");
    let from = readme.find("`--script FILE` scripts").unwrap();
    let block = &readme[from..];
    let start = block.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + block[start..].find("```").unwrap();
    let script = pushdrop::simulator::SimScript::parse(&block[start..end]).unwrap();
    assert_eq!(script.tokens.len(), 7);
    assert_eq!(script.goaway_after, Some(100));
    // The slow 503 is a slow error answer, not a slow normal one.
    assert!(
        script
            .tokens
            .iter()
            .any(|(_, t)| matches!(t, pushdrop::simulator::TokenScript::Slow { .. })),
        "{:?}",
        script.tokens
    );
}

/// `simulate --help`'s script example is a valid script too: a user with the binary alone
/// can copy it.
#[test]
fn simulate_help_script_is_a_valid_script() {
    let out = Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .args(["simulate", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let from = help
        .find("--script FILE (TOML")
        .expect("the script format in --help");
    let text: String = help[from..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    let script = pushdrop::simulator::SimScript::parse(&text).unwrap();
    assert_eq!(script.tokens.len(), 5, "{text}");
    assert_eq!(script.goaway_after, Some(100));
    assert_eq!(script.drop_after, Some(50));
}

/// The README's first drop-file example is a valid `.jsonl` for the shipped config's app.
#[test]
fn readme_drop_file_example_is_a_valid_jsonl() {
    let readme = read("README.md");
    let from = readme.find("## Drop files").unwrap();
    let block = &readme[from..];
    let start = block.find("```json\n").unwrap() + "```json\n".len();
    let end = start + block[start..].find("```").unwrap();
    let cfg = pushdrop::config::Config::load(&repo("config/pushdrop.toml"))
        .unwrap()
        .0;
    let parsed = pushdrop::inbox::parse::parse_file(
        &block.as_bytes()[start..end],
        pushdrop::inbox::parse::FileKind::Jsonl,
        &cfg,
    )
    .unwrap_or_else(|r| panic!("{r:?}"));
    assert_eq!(parsed.records.len(), 2);
}

/// The README's first command: `pushdrop demo` tours the example files through the real
/// daemon and prints what happened, leaving nothing behind in its temp folder's place; a
/// reader that stops reading, and a Ctrl-C, end it cleanly too.
#[test]
fn the_demo_tours_the_examples_and_cleans_up_after_itself() {
    let bin = env!("CARGO_BIN_EXE_pushdrop");
    let tmp = tempfile::tempdir().unwrap();
    let demo = || {
        let mut c = Command::new(bin);
        c.arg("demo")
            .env("TMPDIR", tmp.path())
            .env_remove("PUSHDROP_CONFIG")
            .current_dir(tmp.path());
        c
    };
    // What the demo left in its TMPDIR (named, should a run leave something).
    let left_names = || -> Vec<_> {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    let left = || {
        let names = left_names();
        if !names.is_empty() {
            eprintln!("left in TMPDIR: {names:?}");
        }
        names.len()
    };

    let out = demo().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The built-in examples: 4 sent, 5 invalid (two scripted, three unregistered or not
    // active), the 503-twice device sent on its third attempt, broken.json rejected.
    assert!(
        text.contains("DELIVERIES  sent 4, invalid_token 5, failed 0"),
        "{text}"
    );
    assert!(text.contains("8c68b5de…  3 attempts, now sent"), "{text}");
    assert!(text.contains("broken.json            REJECTED"), "{text}");
    assert!(text.contains("built into pushdrop"), "{text}");
    assert_eq!(left(), 0, "the demo folder is removed");

    // `pushdrop demo | head -1`: the reader goes away; the tour ends as usual.
    let mut child = demo().stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("pushdrop demo"), "{first}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(left(), 0);

    // Ctrl-C while it runs: the daemon stops, the folder goes, exit 130.
    let child = demo()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the demo folder", || left() > 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Twice at once, as `timeout` sends it (to the child, then to its process group): one
    // stop, not the second Ctrl-C that ends it at once.
    for _ in 0..2 {
        // SAFETY: signals a child this test started.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    }
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(said.contains("interrupted"), "{said}");
    assert_eq!(left(), 0, "{said}");
}
