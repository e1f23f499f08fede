//! The whole system for sender tests: the APNs simulator on its own tokio runtime, a deployment
//! directory (`inbox::Env`) whose config points at it, and helpers to read what happened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use pushdrop::simulator::{Accepted, SimOptions, Simulator, TokenScript};

use super::inbox::{self, Apns, Env, Options};

/// A running simulator plus a deployment directory configured for it.
pub struct World {
    pub rt: tokio::runtime::Runtime,
    pub sim: Simulator,
    pub env: Env,
    _creds: tempfile::TempDir,
}

/// Extra config for fast tests: short back-off, receipts on.
pub const FAST_SENDER: &str = "[sender]\nretry_initial_ms = 100\nretry_max_ms = 400\n\n[receipts]\ndir = \"../var/receipts\"\n";

impl World {
    /// A simulator with `opts` and a config for it with `extra_toml` appended.
    pub fn new(opts: SimOptions, extra_toml: &str) -> World {
        World::with_url(opts, extra_toml, None)
    }

    /// Like [`World::new`], but the config sends to `url` instead of the simulator's own.
    pub fn with_url(opts: SimOptions, extra_toml: &str, url: Option<String>) -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sim = rt
            .block_on(Simulator::start(SimOptions {
                bundle_ids: vec![inbox::BUNDLE.to_string()],
                ..opts
            }))
            .expect("simulator starts");
        let creds_dir = tempfile::tempdir().unwrap();
        let creds = sim.write_credentials(creds_dir.path()).unwrap();
        let env = Env::with(Options {
            settle_ms: 200,
            apns: Some(Apns {
                url: url.unwrap_or_else(|| sim.url()),
                ca_file: creds.ca_file.clone(),
                key_file: creds.key_file.clone(),
                key_id: creds.key_id.clone(),
                team_id: creds.team_id.clone(),
            }),
            extra_toml: extra_toml.to_string(),
            ..Options::default()
        });
        World {
            rt,
            sim,
            env,
            _creds: creds_dir,
        }
    }

    pub fn script(&self, token: &str, s: TokenScript) {
        self.sim.script(token, s);
    }

    /// How many 200s each token got at the simulator.
    ///
    /// The simulator notes a push once its 200 is on its way, so the daemon can hold (and
    /// record) a 200 a moment before the simulator's task has noted it: this first waits until
    /// the simulator has noted at least as many pushes as the database says were sent.
    pub fn accepted_by_token(&self) -> HashMap<String, Vec<Accepted>> {
        let sent = self
            .env
            .count("SELECT count(*) FROM deliveries WHERE state = 1");
        inbox::wait_for(
            "the simulator noted every push the daemon has a 200 for",
            || self.sim.accepted_count() >= sent as u64,
        );
        let mut m: HashMap<String, Vec<Accepted>> = HashMap::new();
        for a in self.sim.accepted() {
            m.entry(a.token.clone()).or_default().push(a);
        }
        m
    }

    /// Deliveries not yet final.
    pub fn queued(&self) -> i64 {
        self.env
            .count("SELECT count(*) FROM deliveries WHERE state = 0")
    }

    /// Waits until nothing due is left: no queued delivery, no due notification waiting for
    /// its fan-out, and at least one notification exists.
    pub fn wait_idle(&self, what: &str) {
        inbox::wait_for(what, || {
            let now = pushdrop::model::now_ms();
            let pending: i64 = self
                .env
                .db()
                .query_row(
                    "SELECT (SELECT count(*) FROM deliveries WHERE state = 0)
                          + (SELECT count(*) FROM notifications WHERE fanned_out = 0 AND send_at <= ?1)
                          + (SELECT count(*) = 0 FROM notifications)",
                    [now],
                    |r| r.get(0),
                )
                .unwrap_or(1);
            pending == 0
        });
    }

    /// The state name of the delivery of notification `id` to `token`.
    pub fn state_of(&self, id: &str, token: &str) -> (i64, i64, Option<String>) {
        self.env
            .db()
            .query_row(
                "SELECT d.state, d.attempts, d.last_reason FROM deliveries d
                 JOIN notifications n ON n.id = d.notification_id
                 JOIN devices v ON v.id = d.device_id
                 WHERE n.ext_id = ?1 AND v.token = ?2",
                [id, token],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("delivery exists")
    }
}

/// Drops a file whose mtime says it was written `age` ago (a registration's time is its
/// file's mtime).
pub fn drop_aged(env: &Env, name: &str, content: &str, age: Duration) {
    let tmp = env.inbox.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
    drop(f);
    std::fs::rename(&tmp, env.inbox.join(name)).unwrap();
}

/// A notification to the given `to` JSON.
pub fn notification_to(id: &str, to: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"notification","id":"{id}","app":"{app}","to":{to},"payload":{{"aps":{{"alert":"hi {id}"}}}}{extra}}}"#,
        app = inbox::APP
    )
}

/// A loopback port free now, for a server started on it later (or started again on it):
/// picked below Linux's range of ephemeral ports (32768–60999 by default), which the other
/// tests' client sockets draw from, so that none of them takes it meanwhile, as one did to a
/// port the kernel had handed out (`AddrInUse` at the restart).
pub fn free_port() -> u16 {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// A TCP forwarder from `port` to `to`, started on `rt`: "APNs comes up" for a daemon
/// configured with `https://127.0.0.1:port` before anything listened there.
pub fn forward(rt: &tokio::runtime::Runtime, port: u16, to: SocketAddr) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("the reserved port is still free");
    rt.spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// CPU time (user + system) the process `pid` has used so far.
pub fn process_cpu(pid: u32) -> Duration {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// CPU time of this process's threads named `name` (every in-process daemon's).
pub fn threads_cpu(name: &str) -> Duration {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| stat_cpu(&stat))
        .sum()
}

/// User + system time of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Duration {
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Lines of a receipt file.
pub fn receipt(env: &Env, id: &str) -> serde_json::Value {
    let path = env
        .dir
        .path()
        .join("var/receipts")
        .join(format!("{id}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("receipt {} missing: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Whether a receipt exists yet.
pub fn has_receipt(env: &Env, id: &str) -> bool {
    Path::new(
        &env.dir
            .path()
            .join("var/receipts")
            .join(format!("{id}.json")),
    )
    .exists()
}

/// A notification `id` to the first `n` tokens, dropped as `a.json`: one file, `n` deliveries.
pub fn drop_to_tokens(w: &World, id: &str, n: u64) {
    let tokens: Vec<String> = (0..n).map(inbox::token).collect();
    let to = format!(
        r#"{{"tokens":{}}}"#,
        serde_json::to_string(&tokens).unwrap()
    );
    w.env.drop_file("a.json", notification_to(id, &to, ""));
}

/// A daemon whose config names a key id APNs does not know, a notification `id` to `n`
/// tokens, and the app paused for `InvalidProviderToken`; with the config's good text.
pub fn paused_by_a_wrong_key_id(id: &str, n: u64) -> (World, pushdrop::daemon::Daemon, String) {
    let w = World::new(SimOptions::default(), FAST_SENDER);
    let good = std::fs::read_to_string(&w.env.config_path).unwrap();
    let at = good.find("key_id = \"").unwrap() + "key_id = \"".len();
    let wrong = format!("{}ZZZZZZZZZZ{}", &good[..at], &good[at + 10..]);
    std::fs::write(&w.env.config_path, wrong).unwrap();
    let daemon = w.env.start();
    drop_to_tokens(&w, id, n);
    inbox::wait_for("paused", || {
        w.env.status_json()["paused"]
            .to_string()
            .contains("InvalidProviderToken")
    });
    (w, daemon, good)
}
