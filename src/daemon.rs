//! `pushdrop run`: wires the inbox, the store, the sender and the admin endpoint together and
//! shuts them down in order on SIGTERM/SIGINT.
//!
//! [`Daemon::start`] / [`Daemon::shutdown`] are the in-process shape (tests and `demo` use
//! it); [`run_blocking`] adds logging and signal handling around it for the binary. The inbox
//! runs on its own threads (blocking file-system work); the sender, the APNs connections and
//! the admin endpoint run on a small tokio runtime the daemon owns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::admin::{self, AdminError, AdminHandle, AdminState};
use crate::apns::{ApnsClient, ApnsError};
use crate::config::Config;
use crate::inbox::{self, InboxError, InboxHandle};
use crate::sender::{self, SenderHandle};
use crate::store::{Store, StoreError};

/// How often finished work past retention is purged while the daemon runs.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// A repeat of the stop signal this soon after it is the same stop, not a second one.
pub(crate) const SAME_SIGNAL_WINDOW: Duration = Duration::from_millis(250);
/// How often old log files are pruned while the daemon runs.
const LOG_PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Inbox(#[from] InboxError),
    #[error(transparent)]
    Apns(#[from] ApnsError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "the database {path} takes no writes{hint} (pushdrop would send without being able to record what it sent)"
    )]
    Unwritable {
        path: std::path::PathBuf,
        /// The files this process may not write, when that is why.
        hint: String,
        source: Box<StoreError>,
    },
}

/// The running parts of the daemon.
pub struct Daemon {
    cfg: Arc<Config>,
    store: Store,
    inbox: InboxHandle,
    sender: SenderHandle,
    admin: Option<AdminHandle>,
    purge: tokio::task::JoinHandle<()>,
    shutting_down: Arc<AtomicBool>,
    runtime: tokio::runtime::Runtime,
}

impl Daemon {
    /// Opens the store exclusively (a second daemon on the same database fails here), builds
    /// the APNs client (reading keys and certificates), and starts the inbox watcher, the
    /// sender and the admin endpoint. Call it outside any async context.
    pub fn start(cfg: Arc<Config>) -> Result<Daemon, DaemonError> {
        // One worker thread carries all the async work (every HTTP/2 connection, the sender's
        // requests, the admin endpoint): the store writer, the inbox and the log writer have
        // threads of their own, and blocking work goes to tokio's blocking pool. With a second
        // worker, each request's task and its connection's task would run on different
        // threads, wake each other across them and contend for h2's per-connection lock:
        // `scripts/bench-send` measured 16-18 us of daemon CPU per delivery with two workers
        // and 13-14 us with one, and 9-25% more deliveries/s, when the machine ran slow (no
        // difference when it ran fast). One thread sends far more than APNs takes from one
        // sender.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pushdrop-async")
            .enable_all()
            .build()
            .map_err(DaemonError::Runtime)?;
        // An inbox another daemon holds is refused before the database is opened (and made).
        inbox::check_not_taken(&cfg)?;
        // A database that opens but takes no writes (read-only file or folder) would have the
        // sender send every due delivery again and again, its results never recorded. Whether
        // the open or the first write finds that out, the refusal names what this user may not
        // write.
        let path = &cfg.store.path;
        let refuse = |source: StoreError, blocked: Vec<std::path::PathBuf>| {
            // A refusal SQLite made as read-only names the files already (`StoreError::ReadOnly`).
            let hint = if blocked.is_empty() || matches!(source, StoreError::ReadOnly { .. }) {
                String::new()
            } else {
                crate::store::not_writable_text(&blocked)
            };
            DaemonError::Unwritable {
                path: path.clone(),
                hint,
                source: Box::new(source),
            }
        };
        let store = match Store::open(path, true) {
            Ok(s) => s,
            Err(e @ StoreError::Locked { .. }) => return Err(e.into()),
            Err(e) => {
                let blocked = crate::store::not_writable(path);
                return Err(if blocked.is_empty() {
                    e.into()
                } else {
                    refuse(e, blocked)
                });
            }
        };
        store
            .heartbeat_blocking()
            .map_err(|e| refuse(e, crate::store::not_writable(path)))?;
        // Pauses live in the daemon's memory: a new start tries every app at once, so a pause
        // an earlier run noted for `status` is over, and what it held is due.
        let held = match store.release_held_blocking() {
            Ok(h) => {
                if h.deliveries > 0 {
                    tracing::info!(
                        event = "held_released",
                        deliveries = h.deliveries,
                        "deliveries held by a pause before the restart are due now"
                    );
                }
                h
            }
            Err(e) => {
                tracing::warn!(event = "held_released", error = %e, "could not make held deliveries due; they wait for their old back-off");
                Default::default()
            }
        };
        if let Ok(paused) = crate::store::query::Reader::open(path).and_then(|r| r.paused()) {
            for p in paused {
                store.note_event_blocking(
                    "resumed",
                    p.app.as_deref(),
                    &format!("{}: pause lifted by the restart", p.environment()),
                );
            }
        }
        let client = ApnsClient::new(&cfg)?;
        let shutting_down = Arc::new(AtomicBool::new(false));
        // Bound before the inbox takes a file: a start that fails on the port (in use) must
        // not have moved files away first.
        let admin_listener = if cfg.admin.listen.is_empty() {
            None
        } else {
            Some(admin::bind(&cfg.admin.listen)?)
        };
        let inbox = inbox::start(cfg.clone(), store.clone())?;
        let alive = inbox.liveness();
        let (sender, admin, purge) = runtime.block_on(async {
            let sender = sender::start(cfg.clone(), store.clone(), client, &held.bursts);
            let admin = match admin_listener {
                None => None,
                Some(listener) => {
                    let state = AdminState {
                        store: store.clone(),
                        inbox_alive: Arc::new(move || alive.load(Ordering::SeqCst)),
                        shutting_down: shutting_down.clone(),
                        inbox_dir: cfg.inbox.dir.clone(),
                    };
                    Some(admin::start(listener, state).await?)
                }
            };
            let purge = tokio::spawn(purge_loop(cfg.clone(), store.clone()));
            Ok::<_, DaemonError>((sender, admin, purge))
        })?;
        // Said where a reader of stdout sees it: with log files, the busiest lines are not
        // on stdout (a journal would drop or rate-limit them at full speed).
        let where_lines = match &cfg.log.dir {
            Some(dir) => format!(
                "; the lines of sent deliveries and finished notifications go to the log files in {} only, all others to stdout too",
                dir.display()
            ),
            None => String::new(),
        };
        tracing::info!(
            event = "started",
            version = env!("CARGO_PKG_VERSION"),
            inbox = %cfg.inbox.dir.display(),
            store = %cfg.store.path.display(),
            apps = cfg.apps.len(),
            admin = %admin.as_ref().map(|a| a.addr.to_string()).unwrap_or_else(|| "off".into()),
            "pushdrop started{where_lines}"
        );
        Ok(Daemon {
            cfg,
            store,
            inbox,
            sender,
            admin,
            purge,
            shutting_down,
            runtime,
        })
    }

    /// The store, for parts started beside the daemon.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Where the admin endpoint listens, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// Whether every part is running (what `/readyz` reports, minus the store write check).
    pub fn is_ready(&self) -> bool {
        self.inbox.is_alive() && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// Stops in order: `/readyz` turns unready, the inbox stops taking files (the batch in
    /// hand is committed and moved), the sender finishes in-flight requests within the grace
    /// period and hands the rest back to the queue, then the admin endpoint closes.
    pub fn shutdown(self) {
        tracing::info!(event = "stopping");
        self.shutting_down.store(true, Ordering::SeqCst);
        self.inbox.stop();
        let Daemon {
            sender,
            admin,
            purge,
            runtime,
            store,
            ..
        } = self;
        runtime.block_on(async {
            sender.shutdown().await;
            purge.abort();
            if let Some(a) = admin {
                a.stop().await;
            }
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        drop(store);
        tracing::info!(event = "stopped");
    }
}

/// Purges finished work past `[store] keep_finished_days`, at start and hourly, and prunes
/// old log files every few minutes (a rotation makes one more).
async fn purge_loop(cfg: Arc<Config>, store: Store) {
    let keep_ms = cfg.keep_finished_ms();
    let mut next_purge = tokio::time::Instant::now();
    loop {
        let log = cfg.log.clone();
        let _ = tokio::task::spawn_blocking(move || crate::logging::prune_logs(&log)).await;
        if tokio::time::Instant::now() < next_purge {
            tokio::time::sleep(LOG_PRUNE_EVERY).await;
            continue;
        }
        next_purge = tokio::time::Instant::now() + PURGE_EVERY;
        let inbox = cfg.inbox.dir.clone();
        let in_inbox = tokio::task::spawn_blocking(move || crate::inbox::drop_names(&inbox))
            .await
            .ok()
            .flatten();
        match store
            .purge(crate::model::now_ms() - keep_ms, in_inbox)
            .await
        {
            Ok(c) if c.deliveries + c.notifications + c.devices > 0 => tracing::info!(
                event = "purged",
                deliveries = c.deliveries,
                notifications = c.notifications,
                devices = c.devices,
                committed_files = c.committed_files
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(event = "store_error", error = %e, "purge failed"),
        }
        tokio::time::sleep(LOG_PRUNE_EVERY).await;
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns the exit code (0 after a clean stop).
/// `warnings`: what loading the config found wrong but bearable (a key file others may
/// read), logged first.
pub fn run_blocking(cfg: Config, warnings: &crate::config::ConfigWarnings) -> anyhow::Result<i32> {
    no_huge_pages();
    let open_files = raise_open_files_limit();
    // Shared with the thread that handles a second signal, which flushes it before it exits.
    let log = Arc::new(std::sync::Mutex::new(Some(crate::logging::init(&cfg.log)?)));
    if let Some(limit) = open_files.filter(|&l| l < FEW_OPEN_FILES) {
        tracing::warn!(
            event = "open_files_low",
            limit,
            "this process may open only {limit} files (its hard limit, RLIMIT_NOFILE): each APNs and admin connection, drop file being read and database file takes one, and at its limit files cannot be opened or connections made; raise it (LimitNOFILE= in a systemd unit, ulimit -n)"
        );
    }
    for w in warnings {
        tracing::warn!(
            event = "config_warning",
            config = %cfg.source.display(),
            "{w}"
        );
    }
    let signal_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Handlers first: a SIGTERM that arrives while the parts start is then a clean stop too.
    let mut signals = signal_rt.block_on(async { Signals::install() })?;
    let daemon = Daemon::start(Arc::new(cfg))?;
    let signal = signal_rt.block_on(signals.wait());
    let first_at = std::time::Instant::now();
    tracing::info!(event = "signal", signal, "shutting down");
    // A second SIGTERM or SIGINT during the grace period (Ctrl-C twice) stops at once, with
    // the exit status of a process the signal killed. Nothing is lost by it: a request in
    // flight stays queued and goes out again at the next start (at-least-once).
    let log_for_exit = log.clone();
    let _ = std::thread::Builder::new()
        .name("pushdrop-signals".into())
        .spawn(move || {
            let second = loop {
                let second = signal_rt.block_on(signals.wait());
                // The same signal again at once is one stop sent twice (`timeout` signals
                // its child and then the child's process group), not an operator's second
                // Ctrl-C.
                if second == signal && first_at.elapsed() < SAME_SIGNAL_WINDOW {
                    tracing::info!(event = "signal_repeated", signal = second, "the same signal again at once: taken as one stop");
                    continue;
                }
                break second;
            };
            tracing::warn!(
                event = "signal",
                signal = second,
                "second signal: stopping at once; requests in flight stay queued and are sent again at the next start"
            );
            if let Ok(mut guard) = log_for_exit.lock() {
                drop(guard.take());
            }
            std::process::exit(if second == "SIGINT" { 130 } else { 143 });
        });
    daemon.shutdown();
    // The last lines reach the files (the signal thread holds the other handle).
    if let Ok(mut guard) = log.lock() {
        drop(guard.take());
    }
    Ok(0)
}

/// Turns transparent huge pages off for this process. The allocator asks the kernel for
/// them, and the first touch of a 2 MiB page makes the kernel clear all of it at once. A
/// big file's commit touches much fresh memory (the file read, its parsed records, the
/// writer's page cache): `perf` found the kernel clearing huge pages in a quarter of the
/// inbox's and the writer's time on the path of a 100,000-notification file, and the
/// commit took less time without them (see the README's benchmark notes). Peak memory is
/// lower too. Best effort: where the kernel refuses, nothing changes.
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// Below this many open files the daemon warns at start: a few APNs connections, the admin
/// endpoint's, SQLite's files and a burst of drop files need more.
const FEW_OPEN_FILES: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit (at most 65,536), as
/// daemons do: every APNs connection, admin connection, drop file being read and database
/// file takes a descriptor, and the usual soft limit (1,024) is kept low for old programs
/// that use `select`, not as a budget for a daemon (a probe's daemon under a soft limit of
/// 40, with a hard limit of 20,000, could open none of its files). Returns the limit in
/// effect; `None` when the system does not tell.
fn raise_open_files_limit() -> Option<u64> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        return None;
    }
    let want = now.rlim_max.min(65_536);
    if want > now.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: now.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(want);
        }
    }
    Some(now.rlim_cur)
}

/// SIGTERM and SIGINT, caught; SIGHUP, SIGUSR1 and SIGUSR2, caught and ignored.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; returns its name. SIGHUP, SIGUSR1 and SIGUSR2, each of
    /// which killed the daemon on the spot (a closed terminal; logrotate `postrotate` habits
    /// of "reload" or "reopen your logs"), are logged and ignored: there is nothing to
    /// reload, and the log files rotate, and are reopened when moved away, by themselves.
    async fn wait(&mut self) -> &'static str {
        loop {
            let signal = tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => "SIGHUP",
                _ = self.usr1.recv() => "SIGUSR1",
                _ = self.usr2.recv() => "SIGUSR2",
            };
            tracing::info!(
                event = "signal_ignored",
                signal,
                "{signal} ignored: nothing to reload (a config change needs a restart) and logs rotate and reopen by themselves; SIGTERM stops pushdrop"
            );
        }
    }
}
