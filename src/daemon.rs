//! `pushdrop run`: wires the inbox, the store, the sender and the admin endpoint together and
//! shuts them down in order on SIGTERM/SIGINT.
//!
//! [`Daemon::start`] / [`Daemon::shutdown`] are the in-process shape (tests use it);
//! [`run_blocking`] adds logging and signal handling around it for the binary.

use std::sync::Arc;

use crate::config::Config;
use crate::inbox::{self, InboxError, InboxHandle};
use crate::store::{Store, StoreError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Inbox(#[from] InboxError),
}

/// The running parts of the daemon.
pub struct Daemon {
    cfg: Arc<Config>,
    store: Store,
    inbox: InboxHandle,
}

impl Daemon {
    /// Opens the store exclusively (a second daemon on the same database fails here) and
    /// starts the inbox watcher.
    pub fn start(cfg: Arc<Config>) -> Result<Daemon, DaemonError> {
        let store = Store::open(&cfg.store.path, true)?;
        let inbox = inbox::start(cfg.clone(), store.clone())?;
        tracing::info!(
            event = "started",
            version = env!("CARGO_PKG_VERSION"),
            inbox = %cfg.inbox.dir.display(),
            store = %cfg.store.path.display(),
            apps = cfg.apps.len(),
        );
        Ok(Daemon { cfg, store, inbox })
    }

    /// The store, for parts started beside the inbox.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Whether every part is running (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        self.inbox.is_alive()
    }

    /// Stops taking files (the batch in hand is finished: committed and moved), then lets the
    /// store's writer thread end.
    pub fn shutdown(self) {
        tracing::info!(event = "stopping");
        self.inbox.stop();
        drop(self.store);
        tracing::info!(event = "stopped");
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns the exit code (0 after a clean stop).
pub fn run_blocking(cfg: Config) -> anyhow::Result<i32> {
    let _log = crate::logging::init(&cfg.log)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Handlers first: a SIGTERM that arrives while the parts start is then a clean stop too.
    let signals = runtime.block_on(async { Signals::install() })?;
    let daemon = Daemon::start(Arc::new(cfg))?;
    let signal = runtime.block_on(signals.wait());
    tracing::info!(event = "signal", signal, "shutting down");
    daemon.shutdown();
    Ok(0)
}

/// SIGTERM and SIGINT, caught.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for one of them; returns its name.
    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
