//! `pushdrop check-config` as an operator uses it, on the shipped configs (config/ and
//! deploy/, including the one inside deploy/kubernetes.yaml): exit 0 and "ok" on a good
//! config, a warning for a key others can read, exit 64 naming key and line on a bad one,
//! and exit 64 from every command when the config is bad.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn pushdrop(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run pushdrop")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A folder holding `text` as `pushdrop.toml` with the absolute folders of a deployment
/// (`/etc/pushdrop`, `/var/...`) moved inside it, and the `.p8` key it names (mode `mode`).
struct Deployed {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn deployed(text: &str, mode: u32) -> Deployed {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let etc = dir.path().join("etc/pushdrop");
    std::fs::create_dir_all(etc.join("keys")).unwrap();
    let text = text
        .replace("\"/etc/", &format!("\"{root}/etc/"))
        .replace("\"/var/", &format!("\"{root}/var/"));
    let config = etc.join("pushdrop.toml");
    std::fs::write(&config, &text).unwrap();
    // The key where the config says: relative to the config's folder or absolute.
    let key = text
        .lines()
        .find_map(|l| l.split("key_file = \"").nth(1))
        .and_then(|r| r.split('"').next())
        .expect("a key_file");
    let key = if key.starts_with('/') {
        PathBuf::from(key)
    } else {
        etc.join(key)
    };
    // A usable .p8: check-config reads the key, as `run` does.
    std::fs::copy(repo("config/AuthKey_ABC123DEFG.p8"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    Deployed { dir, config }
}

/// `check-config` passes; its (stdout, stderr): the verdict, and warnings (on stderr, as
/// every command gives them).
fn assert_ok(d: &Deployed) -> (String, String) {
    let out = pushdrop(&d.config, &["check-config"]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(": ok (1 app,"), "{stdout}");
    (stdout, stderr)
}

/// The `pushdrop.toml: |` block of the ConfigMap, unindented.
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "pushdrop.toml: |");
    lines.next().expect("a pushdrop.toml key in the ConfigMap");
    let mut out = String::new();
    for l in lines {
        if !l.is_empty() && !l.starts_with("    ") {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn shipped_configs_pass_check_config() {
    for (name, text) in [
        (
            "config/pushdrop.toml",
            std::fs::read_to_string(repo("config/pushdrop.toml")).unwrap(),
        ),
        (
            "deploy/pushdrop.toml",
            std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap(),
        ),
        (
            "deploy/kubernetes.yaml",
            configmap_toml(&std::fs::read_to_string(repo("deploy/kubernetes.yaml")).unwrap()),
        ),
    ] {
        let d = deployed(&text, 0o600);
        let (stdout, stderr) = assert_ok(&d);
        assert!(!stderr.contains("warning"), "{name}: {stderr}");
        assert!(
            stdout.contains(&d.dir.path().display().to_string()),
            "{name}: paths are resolved and shown: {stdout}"
        );
    }
}

#[test]
fn a_key_others_can_read_is_a_warning_not_an_error() {
    let text = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let d = deployed(&text, 0o644);
    let (_, stderr) = assert_ok(&d);
    assert!(
        stderr.contains(&format!("warning: {}: line ", d.config.display()))
            && stderr.contains(": apps[0].token.key_file:")
            && stderr.contains("mode 644")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[test]
fn bad_config_names_key_and_line_and_every_command_exits_64() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    // Two mistakes: a typo'd key and a wrong type.
    let bad = good
        .replace("settle_ms = 1000", "settle_msec = 1000")
        .replace("max_attempts = 8", "max_attempts = \"eight\"");
    let d = deployed(&bad, 0o600);
    let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let out = pushdrop(&d.config, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    // (Serde stops at the first unknown key, named without its table; see the report.)
    assert!(
        stdout.contains(&format!("line {}: ", line_of("settle_msec")))
            && stdout.contains("unknown field `settle_msec`"),
        "{stdout}"
    );
    assert!(stdout.contains(&d.config.display().to_string()), "{stdout}");

    // The type error alone (unknown keys may stop the parse before types are checked).
    let bad_type = good.replace("max_attempts = 8", "max_attempts = \"eight\"");
    let d2 = deployed(&bad_type, 0o600);
    let out = pushdrop(&d2.config, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    assert!(
        stdout.contains(&format!("line {}: ", line_of("max_attempts")))
            && stdout.contains("invalid type: string \"eight\""),
        "{stdout}"
    );

    // A missing key file is named too.
    std::fs::remove_file(d2.dir.path().join("etc/pushdrop/AuthKey_ABC123DEFG.p8")).unwrap();
    let fixed = pushdrop_with(&d2.config, &good, d2.dir.path());
    let out = pushdrop(&fixed, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    assert!(stdout.contains("apps[0].token.key_file"), "{stdout}");

    // Every command refuses a bad config with 64 (and says why on stderr).
    let dest = d.dir.path().join("copy.db");
    for args in [
        vec!["run"],
        vec!["status"],
        vec!["status", "--json"],
        vec!["show", "x"],
        vec!["devices"],
        vec!["retry", "--failed"],
        vec!["purge"],
        vec!["backup", dest.to_str().unwrap()],
    ] {
        let out = pushdrop(&d.config, &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(
            text(&out.stderr).contains("settle_msec"),
            "{args:?}: {out:?}"
        );
    }
    assert!(!dest.exists());
    assert!(
        !d.dir.path().join("var/lib/pushdrop/pushdrop.db").exists(),
        "no database is created from a bad config"
    );

    // `demo` and `simulate` need no config, but one that is named must be good.
    let sim_dir = d.dir.path().join("sim");
    for args in [
        vec!["demo"],
        vec![
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            sim_dir.to_str().unwrap(),
        ],
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
            .arg("--config")
            .arg(&d.config)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.and_then(|s| s.code()), Some(64), "{args:?}");
    }
}

/// Writes `text` (with the deployment folders moved under `root`) over `config`.
fn pushdrop_with(config: &Path, text: &str, root: &Path) -> PathBuf {
    let root = root.display().to_string();
    let text = text
        .replace("\"/etc/", &format!("\"{root}/etc/"))
        .replace("\"/var/", &format!("\"{root}/var/"));
    std::fs::write(config, text).unwrap();
    config.to_path_buf()
}

/// The key of a wrongly typed value is named as a dotted path.
#[test]
fn a_type_error_names_its_key() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let bad = good.replace("max_attempts = 8", "max_attempts = \"eight\"");
    let d = deployed(&bad, 0o600);
    let out = pushdrop(&d.config, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    assert!(stdout.contains(": sender.max_attempts: "), "{stdout}");
}

/// What `run` cannot use: a key file that holds no usable key or a CA file that holds no
/// certificate makes `run` and `check-config` alike exit 64 naming key and line (a check
/// that passed what the daemon refuses would let a deploy step pass a daemon that cannot
/// start); processed or rejected files kept in the inbox folder itself, or in a "folder" that
/// is a file, are a bad config.
#[test]
fn unusable_key_and_ca_files_and_an_inbox_inside_itself_are_named() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let d = deployed(&good, 0o600);
    let etc = d.dir.path().join("etc/pushdrop");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let named = |said: &str, key: &str, line: usize, why: &str| {
        said.contains(&format!("line {line}: {key}: ")) && said.contains(why)
    };

    std::fs::write(etc.join("AuthKey_ABC123DEFG.p8"), "not a key\n").unwrap();
    let key_line = line_of(&good, "key_file");
    let why = "not a PKCS#8 EC P-256 (.p8) private key";
    let out = pushdrop(&d.config, &["run"]);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(
        named(&said, "apps[0].token.key_file", key_line, why),
        "{said}"
    );
    // SPEC 3: every command exits 64 on a bad config, not only the two that send or check.
    for cmd in [&["check-config"][..], &["status"], &["validate", "x.json"]] {
        let out = pushdrop(&d.config, cmd);
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd:?}: {said}");
        assert!(
            named(&said, "apps[0].token.key_file", key_line, why),
            "{cmd:?}: {said}"
        );
    }
    std::fs::copy(
        repo("config/AuthKey_ABC123DEFG.p8"),
        etc.join("AuthKey_ABC123DEFG.p8"),
    )
    .unwrap();

    std::fs::write(etc.join("ca.pem"), "garbage\n").unwrap();
    let with_ca = good.replace("ca_file = \"\"", "ca_file = \"ca.pem\"");
    let config = pushdrop_with(&d.config, &with_ca, d.dir.path());
    let ca_line = line_of(&with_ca, "ca_file");
    let out = pushdrop(&config, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    assert!(
        named(&stdout, "apns.ca_file", ca_line, "holds no PEM certificate"),
        "{stdout}"
    );
    for cmd in ["run", "devices"] {
        let out = pushdrop(&config, &[cmd]);
        let said = text(&out.stdout) + &text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {said}");
        assert!(
            named(&said, "apns.ca_file", ca_line, "holds no PEM certificate"),
            "{cmd}: {said}"
        );
    }

    let inside = good.replace(
        "[inbox]\n",
        "[inbox]\nprocessed_dir = \"/var/spool/pushdrop/inbox\"\n",
    );
    let config = pushdrop_with(&d.config, &inside, d.dir.path());
    let out = pushdrop(&config, &["check-config"]);
    let stdout = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}");
    assert!(
        stdout.contains("inbox.processed_dir: must not be the inbox folder itself"),
        "{stdout}"
    );

    // A folder pushdrop would make, already taken by a file.
    let taken = d.dir.path().join("a-file");
    std::fs::write(&taken, "x").unwrap();
    let on_a_file = good.replace(
        "[inbox]\n",
        &format!("[inbox]\nprocessed_dir = \"{}\"\n", taken.display()),
    );
    let config = pushdrop_with(&d.config, &on_a_file, d.dir.path());
    for cmd in ["check-config", "run", "ingest"] {
        let out = pushdrop(
            &config,
            &[cmd, "x.json"][..if cmd == "ingest" { 2 } else { 1 }],
        );
        let said = text(&out.stdout) + &text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {said}");
        assert!(
            said.contains("inbox.processed_dir: ") && said.contains("exists and is not a folder"),
            "{cmd}: {said}"
        );
    }
    // The commands that only read the store still answer: `status` is what the operator
    // needs when the daemon cannot move files.
    let out = pushdrop(&config, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A database a newer pushdrop has migrated: every command refuses it, those that only read
/// too (a newer build's tables may mean something else).
#[test]
fn a_newer_database_is_refused_by_every_command() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let d = deployed(&good, 0o600);
    let out = pushdrop(&d.config, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let db = pushdrop::config::Config::load(&d.config)
        .unwrap()
        .0
        .store
        .path;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["show", "x"],
        &["devices"],
        &["retry", "--failed"],
        &["purge"],
    ] {
        let out = pushdrop(&d.config, args);
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains("schema version 99 is newer than this pushdrop supports"),
            "{args:?}: {said}"
        );
    }
}

/// Exit 2 is a bad command line, whatever the option; `PUSHDROP_CONFIG=` (empty) means the
/// default path, as an unset one does.
#[test]
fn a_bad_command_line_exits_2_and_an_empty_config_variable_means_the_default() {
    let bin = env!("CARGO_BIN_EXE_pushdrop");
    // A bundle id its own config would carry and check-config refuse. (Were it taken, the
    // folder it cannot write would end the simulator at once, with exit 1.)
    let bundle = |id| {
        let dir = ["--dir", "/proc/pushdrop-none"];
        [
            &["simulate", "--listen", "127.0.0.1:0"][..],
            &dir,
            &["--bundle-id", id],
        ]
        .concat()
    };
    for args in [
        vec!["simulate", "--listen", "nonsense"],
        bundle(""),
        bundle("has space"),
        vec!["no-such-command"],
        vec!["status", "--no-such-flag"],
    ] {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .arg("check-config")
        .env("PUSHDROP_CONFIG", "")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = text(&out.stdout) + &text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{said}");
    assert!(said.contains("config/pushdrop.toml"), "{said}");
}

/// A `RUST_LOG` that would log nothing of pushdrop's (a typo, or empty) does not silence it:
/// an empty one is unset, a bad one is set aside with a warning.
#[test]
fn a_bad_or_empty_rust_log_does_not_silence_the_log() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let d = deployed(&good, 0o600);
    for (value, warned) in [("inf", true), ("", false), ("warn,pushdrop=inf", true)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
            .arg("--config")
            .arg(&d.config)
            .arg("purge")
            .env("RUST_LOG", value)
            .output()
            .unwrap();
        let said = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{value:?}: {said}");
        assert!(
            said.contains("purged"),
            "{value:?}: the purge is logged: {said}"
        );
        assert_eq!(
            said.contains("warning: RUST_LOG"),
            warned,
            "{value:?}: {said}"
        );
    }
}

/// Output that cannot be written (a full disk behind `> file`) ends a command with one line
/// on stderr and exit 1, not a panic (exit 101).
#[test]
fn output_that_cannot_be_written_exits_1_with_a_line_on_stderr() {
    let d = deployed(
        &std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap(),
        0o600,
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .arg("--config")
        .arg(&d.config)
        .arg("check-config")
        .stdout(full)
        .output()
        .unwrap();
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot write the output"), "{said}");
    assert!(!said.contains("panicked"), "{said}");
}

/// `pushdrop simulate 2>&1 | grep -m1 listening`, a harness's way to wait until it is ready:
/// once the reader is gone, the banner's lines cannot be written, and the simulator goes on
/// serving (it aborted: its panic over stdout could not be said on stderr either). Here the
/// reader is gone from the start, so that every line meets a closed pipe.
#[test]
fn the_simulator_outlives_the_reader_of_its_banner() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pushdrop"))
        .args([
            "simulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(dir.path())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("pushdrop-simulator.toml").exists() {
        assert!(std::time::Instant::now() < deadline, "never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let alive = child.try_wait().unwrap();
    let connects = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(alive, None, "the simulator ended");
    assert!(connects, "nothing listens any more");
}

/// A client certificate that works today but not for long draws a warning from
/// `check-config` (Apple's push certificates last a year): expired, not yet valid, expiring
/// within 30 days; a `password_file` a PEM certificate leaves unused draws one too; an
/// encrypted PEM key is refused naming `key_file` and saying why.
#[test]
fn a_client_certificate_near_or_past_its_end_is_a_warning() {
    let good = std::fs::read_to_string(repo("deploy/pushdrop.toml")).unwrap();
    let d = deployed(&good, 0o600);
    let etc = d.dir.path().join("etc/pushdrop");
    let with_cert = |from: time::OffsetDateTime, until: time::OffsetDateTime| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["push".into()]).unwrap();
        params.not_before = from;
        params.not_after = until;
        let cert = params.self_signed(&key).unwrap();
        let (cert_file, key_file) = (etc.join("push.pem"), etc.join("push-key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token_line = good.lines().find(|l| l.starts_with("token = ")).unwrap();
        let text = good.replace(
            token_line,
            "certificate = { cert_file = \"push.pem\", key_file = \"push-key.pem\" }",
        );
        pushdrop_with(&d.config, &text, d.dir.path())
    };
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    for (from, until, said) in [
        (
            now - 400 * day,
            now - 35 * day,
            "the certificate expired on",
        ),
        (now + 10 * day, now + 300 * day, "is not valid before"),
        (now - 300 * day, now + 10 * day, "renew it"),
    ] {
        let config = with_cert(from, until);
        let out = pushdrop(&config, &["check-config"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains("warning: ")
                && stderr.contains("apps[0].certificate.cert_file: ")
                && stderr.contains(said),
            "{said}: {stderr}"
        );
    }
    let config = with_cert(now - day, now + 300 * day);
    let out = pushdrop(&config, &["check-config"]);
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    // A password file beside a PEM certificate is not read: said, not ignored in silence.
    let pass = etc.join("push.pass");
    std::fs::write(&pass, "secret\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_pass = std::fs::read_to_string(&config).unwrap().replace(
        "key_file = \"push-key.pem\" }",
        "key_file = \"push-key.pem\", password_file = \"push.pass\" }",
    );
    std::fs::write(&config, with_pass).unwrap();
    let out = pushdrop(&config, &["check-config"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("apps[0].certificate.password_file: is not used"),
        "{stderr}"
    );
    std::fs::write(
        etc.join("push-key.pem"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = pushdrop(&config, &["check-config"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("apps[0].certificate.key_file: ") && stderr.contains("encrypted"),
        "{stderr}"
    );
}
