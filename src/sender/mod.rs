//! The sender: from the queue in SQLite to APNs and back.
//!
//! One loop claims due deliveries in batches, a little ahead of free slots (the claim lives in
//! the daemon's memory, so a crash mid-send leaves them queued and due again: at-least-once),
//! starts one task per delivery while keeping at most `max_in_flight` in flight, and sleeps
//! until the next due time or until the inbox commits new work — never a polling loop. Each task sends through the [`ApnsClient`] and turns the
//! classified [`Outcome`] into a [`ResultKind`]; a recorder task writes results in batched
//! transactions and writes receipts for notifications that became final.
//!
//! Two guards stand between APNs' answers and the device registry and queue:
//! - a credential failure pauses the app and environment with back-off instead of burning every
//!   delivery's attempts (the client re-reads the key or certificate on the next try);
//! - a burst of `BadDeviceToken` across many devices means a wrong environment or topic in the
//!   config, not dead phones: those answers are held briefly, and if they turn out to be a
//!   burst, the app and environment pause and nothing is invalidated.
//!
//! And one share: an app and environment whose host has not answered lately gets part of the
//! window, not all of it, so a host that takes requests and never answers cannot hold every
//! slot until the requests time out (see `flow`).

mod flow;
mod guard;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

use crate::apns::{ApnsClient, Outcome, PushRequest};
use crate::config::{Config, Environment};
use crate::logging::{SAY_LASTING_EVERY, Throttle};
use crate::metrics::{self, OutcomeLabel, ReasonLabel};
use crate::model::{DeliveryState, now_ms, token_prefix};
use crate::receipts::Receipts;
use crate::store::{
    Claim, ClaimedDelivery, DeliveryResult, EndedDelivery, FinishedNotification, RecordFailed,
    ResultKind, Store, StoreError,
};

use flow::{FlowAdmit, Flows};
use guard::{Admit, BadTokenVerdict, Guards};

/// The `tracing` target of the one line per delivery outcome and per finished notification
/// (SPEC 4.4). With `[log] dir` set, its `info` lines go to the files only, not to stdout: at
/// tens of thousands of deliveries a second, stdout (often journald) is no place for them.
pub const DELIVERY_TARGET: &str = "pushdrop::delivery";

/// How often a request waiting for its app's probe (see [`Guards::admit`]) looks again on
/// its own, beside being woken when the probe is answered.
const PROBE_RECHECK: Duration = Duration::from_secs(1);
/// How soon results that could not be written are tried again.
const RECORD_RETRY: Duration = Duration::from_secs(1);
/// Deliveries claimed per store round trip.
const CLAIM_BATCH: usize = 1000;
/// Deliveries claimed per round trip at least, whatever `max_in_flight`.
const MIN_CLAIM: usize = 64;
/// Deliveries fanned out per loop round, so claims keep flowing during a huge broadcast.
const FANOUT_ROWS_PER_ROUND: usize = 50_000;
/// The longest idle sleep. The inbox wakes the sender at once, and [`EXTERNAL_PROBE`] notices
/// another process's commits; this recheck is the backstop behind both. One indexed query per
/// interval costs nothing measurable.
const IDLE_RECHECK_MS: i64 = 5_000;
/// While idle, how often the sender asks whether another process committed to the database
/// (`pushdrop ingest`, `pushdrop retry` beside the running daemon): work queued that way
/// goes out within this, not after the idle recheck. The probe reads SQLite's WAL index, but
/// waking two threads for it cost some 0.3 ms of CPU per probe on a 2-core VM: once a second
/// keeps an idle daemon at about 0.04% of a core (4 a second: 0.13%).
const EXTERNAL_PROBE: Duration = Duration::from_secs(1);
/// While busy sending, due fan-outs are looked for this often.
const FANOUT_EVERY: Duration = Duration::from_millis(100);
/// Results written per transaction at most.
const RECORD_BATCH: usize = 2000;
/// Results worth a transaction without waiting for more.
const RECORD_ENOUGH: usize = 500;
/// How long the recorder waits for more results before writing a small batch.
const RECORD_PATIENCE: Duration = Duration::from_millis(5);

/// The least a shutdown waits for receipts being written, even once the grace period is over.
/// Receipts are small local files; a second covers hundreds.
const RECEIPTS_AT_LEAST: Duration = Duration::from_secs(1);

/// A running sender.
pub struct SenderHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    receipts: Option<Arc<ReceiptWork>>,
    grace: Duration,
}

impl SenderHandle {
    /// Stops claiming, gives in-flight requests up to `[sender] shutdown_grace_ms` to finish,
    /// records their results and hands everything else back to the queue; then waits for the
    /// receipts of the notifications that finished, so that each has its receipt and its
    /// `notification_finished` line before the process exits. That wait ends with the grace
    /// period too, but gets at least [`RECEIPTS_AT_LEAST`] (the in-flight requests may have
    /// used it all); a receipt still missing then is written at the next start. The start-up
    /// sweep, if still running, stops between two receipts (the next start resumes it).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.grace;
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(work) = self.receipts {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            work.wait(left.max(RECEIPTS_AT_LEAST)).await;
        }
    }
}

/// Receipt work waiting for one of the [`RECEIPT_TASKS`] tasks.
type ReceiptJob = Box<dyn FnOnce(&ReceiptWork) + Send>;

#[derive(Default)]
struct ReceiptQueue {
    /// Not started yet.
    jobs: std::collections::VecDeque<ReceiptJob>,
    /// Tasks taking them, at most [`RECEIPT_TASKS`].
    tasks: usize,
}

/// Receipt writing under way (blocking tasks), so that a shutdown can wait for it.
struct ReceiptWork {
    receipts: Receipts,
    tasks: std::sync::Mutex<JoinSet<()>>,
    queue: std::sync::Mutex<ReceiptQueue>,
    /// Asks the start-up sweep to stop (shutdown).
    stop_sweep: AtomicBool,
    /// Receipts that could not be written (a full disk, a read-only folder), tried again
    /// every [`RECEIPT_RETRY_EVERY`]; beyond [`RECEIPT_RETRY_MAX`], the next start's sweep.
    failed: std::sync::Mutex<Vec<FinishedNotification>>,
    /// When such a failure was last noted for `status`: once a minute at most.
    noted_at: std::sync::Mutex<Throttle>,
    /// The start-up sweep's span (since, until) when it could not finish: run again with
    /// the failed receipts, not only at the next start, since droppers wait for them.
    sweep_failed: std::sync::Mutex<Option<(i64, i64)>>,
}

/// Blocking tasks writing receipts at once. Each receipt waits for an fsync, so a few run
/// side by side; a task per batch of finished notifications, as before, took 50,000
/// receipts' daemon from 11 to 91 threads.
const RECEIPT_TASKS: usize = 4;

/// How often receipts that could not be written are tried again.
const RECEIPT_RETRY_EVERY: Duration = Duration::from_secs(10);
/// The most failed receipts remembered for that (the start-up sweep writes any others).
const RECEIPT_RETRY_MAX: usize = 100_000;

impl ReceiptWork {
    /// Writes the receipt of `f` and logs it (`late`: not as its notification finished); the
    /// notification back with the error when it could not be written.
    fn write_one(
        &self,
        f: FinishedNotification,
        late: bool,
    ) -> Option<(FinishedNotification, crate::receipts::ReceiptError)> {
        match self.receipts.write(f.notification_id) {
            Ok(Some(path)) => log_receipt_written(&f, &path, late),
            // Purged meanwhile (a receipt that kept failing for longer than retention
            // keeps a finished notification): nothing to write it from, ever. Said, since
            // a dropper waits for it.
            Ok(None) => {
                log_finished(std::slice::from_ref(&f));
                warn!(
                    event = "receipt_lost",
                    id = f.ext_id.as_str(),
                    app = f.app.as_str(),
                    "no receipt will be written: the notification was purged before its receipt could be"
                );
            }
            Err(e) => return Some((f, e)),
        }
        None
    }

    /// A receipt that could not be written: kept to try again, and said in `status` (once a
    /// minute), since a dropper waiting for it sees nothing else.
    fn note_failed(&self, store: &Store, f: FinishedNotification, error: &str) {
        let message = format!(
            "cannot write the receipt of {}: {error}; tried again within 10 s",
            f.ext_id
        );
        let app = f.app.clone();
        {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.len() < RECEIPT_RETRY_MAX {
                failed.push(f);
            }
        }
        let mut noted = self.noted_at.lock().unwrap_or_else(|p| p.into_inner());
        if noted.note().is_some() {
            store.note_event_blocking("receipt_error", Some(&app), &message);
        }
    }

    /// Runs `f` on the blocking pool, tracked: on a task of its own while fewer than
    /// [`RECEIPT_TASKS`] run, else after the jobs queued before it.
    fn spawn(self: &Arc<Self>, f: impl FnOnce(&ReceiptWork) + Send + 'static) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.jobs.push_back(Box::new(f));
            if queue.tasks >= RECEIPT_TASKS {
                return;
            }
            queue.tasks += 1;
        }
        let work = self.clone();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Reap the tasks that are done, so the set holds only the running ones.
        while tasks.try_join_next().is_some() {}
        tasks.spawn_blocking(move || {
            loop {
                let job = {
                    let mut queue = work.queue.lock().unwrap_or_else(|p| p.into_inner());
                    match queue.jobs.pop_front() {
                        Some(job) => job,
                        None => {
                            queue.tasks -= 1;
                            return;
                        }
                    }
                };
                // A job that panics (none should) must not take this task's place with it:
                // the queue would wait for a task that is gone.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&work)));
            }
        });
    }

    /// Stops the sweep and waits up to `limit` for the receipts being written.
    async fn wait(&self, limit: Duration) {
        self.stop_sweep.store(true, Ordering::Relaxed);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let pending = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, pending).await.is_err() {
            warn!(
                event = "shutdown_receipts_pending",
                tasks = tasks.len(),
                "receipts were still being written when the grace period ended; the stop goes on without waiting, and any receipt left unwritten is written at the next start"
            );
        }
    }
}

struct Inner {
    cfg: Arc<Config>,
    store: Store,
    client: ApnsClient,
    /// Set at a stop: a request that could not go out is held, not a sign of an outage.
    stopping: AtomicBool,
    /// Results could not be written (the database full or failing): no request starts
    /// until they are, since each would be sent again for want of its record.
    results_unwritten: AtomicBool,
    /// Woken when results that could not be written have been.
    results_written: tokio::sync::Notify,
    /// The last pause message noted for `status`, per app and environment.
    pause_notes: std::sync::Mutex<std::collections::HashMap<(String, Environment), String>>,
    receipts: Option<Arc<ReceiptWork>>,
    guards: Guards,
    /// Each app and environment's share of the window (a hung host holds only its share).
    flows: Flows,
    /// The `sent` series of the deliveries counter, looked up once (on the first success, so
    /// it appears in /metrics when it has something to say), not per delivery.
    sent_counter: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
    /// When a `failed`/`expired` outcome of an (app, state, reason) was last noted for
    /// `pushdrop status`'s recent errors: at most one a minute each, so a config mistake that
    /// fails every delivery leaves one line there, not a million rows.
    noted_failures: std::sync::Mutex<
        std::collections::HashMap<(String, &'static str, String), std::time::Instant>,
    >,
}

/// While the window is full, how often the sender looks for a host that stopped answering.
const SILENCE_CHECK: Duration = Duration::from_secs(1);

/// How often one kind of failed delivery is noted among `status`'s recent errors.
const NOTE_FAILURES_EVERY: Duration = Duration::from_secs(60);
/// The most (app, state, reason) kinds remembered for that.
const NOTED_FAILURES_MAX: usize = 1024;

/// Starts the sender on the current tokio runtime.
/// `bursts`: the apps and environments a `BadDeviceToken` burst was holding when the last
/// run stopped; their answers stay in doubt until a 200 (see [`Guards::suspect`]).
pub fn start(
    cfg: Arc<Config>,
    store: Store,
    client: ApnsClient,
    bursts: &[(String, crate::config::Environment)],
) -> SenderHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (results_tx, results_rx) = mpsc::channel(cfg.sender.max_in_flight * 2 + RECORD_BATCH);
    let receipts = cfg.receipts.dir.as_deref().map(|d| {
        Arc::new(ReceiptWork {
            receipts: Receipts::new(d, &cfg.store.path, cfg.receipts.max_sent_tokens),
            tasks: std::sync::Mutex::new(JoinSet::new()),
            queue: std::sync::Mutex::default(),
            stop_sweep: AtomicBool::new(false),
            failed: std::sync::Mutex::new(Vec::new()),
            noted_at: std::sync::Mutex::new(Throttle::new(NOTE_FAILURES_EVERY)),
            sweep_failed: std::sync::Mutex::new(None),
        })
    });
    if let Some(work) = &receipts {
        // Everything this sender finishes is finished from now on and gets its receipt on
        // the normal path; the sweep covers what finished before, within retention.
        let until_ms = now_ms();
        let since_ms = until_ms - cfg.keep_finished_ms();
        work.spawn(move |work| recover_receipts(work, since_ms, until_ms));
    }
    let grace = Duration::from_millis(cfg.sender.shutdown_grace_ms);
    guard::paused_metric_at_zero(cfg.apps.iter().map(|a| a.name.as_str()));
    let guards = Guards::new(&cfg.sender);
    for (app, env) in bursts {
        guards.suspect(app, *env);
    }
    let inner = Arc::new(Inner {
        guards,
        flows: Flows::new(
            cfg.sender.max_in_flight,
            Duration::from_millis(cfg.apns.request_timeout_ms),
        ),
        receipts: receipts.clone(),
        cfg,
        store,
        client,
        sent_counter: std::sync::OnceLock::new(),
        noted_failures: std::sync::Mutex::new(std::collections::HashMap::new()),
        stopping: AtomicBool::new(false),
        results_unwritten: AtomicBool::new(false),
        results_written: tokio::sync::Notify::new(),
        pause_notes: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let task = tokio::spawn(main_loop(inner, results_tx, results_rx, stop_rx));
    SenderHandle {
        stop,
        task,
        receipts,
        grace,
    }
}

/// The start-up sweep: removes the temporary files a crash left in the receipts folder and
/// writes the receipts of notifications that finished between `since_ms` and `until_ms`
/// without one (the process stopped between the commit that finished them and their
/// receipt), each with its `notification_finished` line; then one `receipts_recovered` line.
fn recover_receipts(work: &ReceiptWork, since_ms: i64, until_ms: i64) {
    let started = std::time::Instant::now();
    let stale_temp_files = work.receipts.remove_stale_temp_files();
    let done = work
        .receipts
        .recover(since_ms, until_ms, &work.stop_sweep, |f, path| {
            log_receipt_written(f, path, true)
        });
    match done {
        Ok(done) => info!(
            event = "receipts_recovered",
            count = done.written,
            checked = done.checked,
            stale_temp_files,
            stopped = done.stopped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "receipts missing after the last stop written"
        ),
        Err(e) => {
            error!(
                event = "receipt_error",
                error = %e,
                stale_temp_files,
                "cannot write the receipts missing after the last stop; trying again in 10 s"
            );
            *work.sweep_failed.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((since_ms, until_ms));
        }
    }
}

/// The `notification_finished` line of a notification whose receipt was written (`late`:
/// by the start-up sweep, after a stop that came between its finish and its receipt).
fn log_receipt_written(f: &FinishedNotification, path: &std::path::Path, late: bool) {
    info!(
        target: DELIVERY_TARGET,
        event = "notification_finished",
        id = f.ext_id.as_str(),
        app = f.app.as_str(),
        receipt = %path.display(),
        late,
        "all deliveries final"
    );
}

async fn main_loop(
    inner: Arc<Inner>,
    results: mpsc::Sender<DeliveryResult>,
    results_rx: mpsc::Receiver<DeliveryResult>,
    mut stop: watch::Receiver<bool>,
) {
    let store = inner.store.clone();
    let max_in_flight = inner.cfg.sender.max_in_flight;
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let (stop_recorder, recorder_stop) = watch::channel(false);
    let recorder = tokio::spawn(recorder(inner.clone(), results_rx, recorder_stop));
    // Receipts that could not be written are tried again while the daemon runs, not only at
    // its next start: a dropper may be waiting for one.
    let receipt_retries = tokio::spawn({
        let inner = inner.clone();
        async move {
            loop {
                tokio::time::sleep(RECEIPT_RETRY_EVERY).await;
                inner.retry_receipts();
            }
        }
    });
    let new_work = store.new_work();
    // Claimed deliveries wait here for a free slot; a claim is on its way whenever this runs
    // low, so slots freed by answers are refilled at once instead of after a store round trip
    // (which may queue behind a large batch of results). A claim asks for enough to matter:
    // one per freed slot would cost a store round trip per delivery under full load. The
    // queue holds a whole window: with a quarter of one, the window fell to a few hundred
    // requests (at times a few dozen) whenever a claim waited behind a batch of results, and
    // 100,000 deliveries ran with some 640 in flight on average instead of some 910.
    // At least a few dozen even for a tiny window: a stuck app's queue must go back to the
    // store quickly for the claims to reach the others' work behind it (with a window of 2,
    // claims of 2 took some 10 s to pass a hung app's broadcast of 5,000).
    let prefetch = max_in_flight.clamp(MIN_CLAIM, CLAIM_BATCH);
    let mut ready: VecDeque<ClaimedDelivery> = VecDeque::with_capacity(prefetch);
    // Deliveries of an app and environment whose host has its share of the window out and
    // has not answered yet (see `flow`), and when the first of them was parked. They go back
    // to the front of `ready` when it answers, or after `flow::PARK_LIMIT`.
    let mut parked: VecDeque<ClaimedDelivery> = VecDeque::new();
    let mut parked_since = tokio::time::Instant::now();
    let mut claiming: Option<JoinHandle<Result<ClaimRound, StoreError>>> = None;
    // Set when the queue came back short: no claim until then, or until new work arrives.
    let mut idle_until: Option<tokio::time::Instant> = None;
    // When a failed claim was last logged as an error (then once a minute while they fail).
    let mut said_claim_failed = Throttle::new(SAY_LASTING_EVERY);
    // Fan-out is looked at when woken for new or due work, while a fan-out has more rows to
    // make, and every FANOUT_EVERY while busy; not on every claim.
    let mut fanout_pending = true;
    let mut last_fanout = tokio::time::Instant::now();
    // The next look for other processes' commits while idle (a deadline that other wake-ups
    // of this loop do not push back).
    let mut next_probe = tokio::time::Instant::now() + EXTERNAL_PROBE;
    // While the window is full, no delivery is admitted to find a host that stopped
    // answering with all of it out: this looks for one every `SILENCE_CHECK`.
    let silence_check = tokio::time::sleep(SILENCE_CHECK);
    tokio::pin!(silence_check);

    loop {
        if *stop.borrow() {
            break;
        }
        if claiming.is_none() && idle_until.is_none() && ready.len() <= prefetch / 2 {
            let fan_out = fanout_pending || last_fanout.elapsed() >= FANOUT_EVERY;
            if fan_out {
                last_fanout = tokio::time::Instant::now();
            }
            claiming = Some(tokio::spawn(claim_round(
                store.clone(),
                prefetch - ready.len(),
                fan_out,
            )));
        }
        let unwritten = inner.results_unwritten.load(Ordering::Acquire);
        tokio::select! {
            _ = stop.changed() => {}
            _ = inner.results_written.notified(), if unwritten => {}
            permit = slots.clone().acquire_owned(), if !ready.is_empty() && !unwritten => {
                let (Ok(permit), Some(c)) = (permit, ready.pop_front()) else {
                    break;
                };
                let crowded = parked.len() >= 2 * prefetch;
                if let Some(c) = inner.start(c, permit, &results, crowded).await {
                    if parked.is_empty() {
                        parked_since = tokio::time::Instant::now();
                    }
                    parked.push_back(c);
                }
            }
            _ = &mut silence_check, if slots.available_permits() == 0 => {
                silence_check
                    .as_mut()
                    .reset(tokio::time::Instant::now() + SILENCE_CHECK);
                for (app, env, out, silent) in inner.flows.overdue() {
                    inner.announce_unanswered(&app, env, out, silent, true);
                }
            }
            _ = inner.flows.changed.notified(), if !parked.is_empty() => {
                unpark(&inner.flows, &mut parked, &mut ready);
            }
            _ = tokio::time::sleep_until(parked_since + flow::PARK_LIMIT), if !parked.is_empty() => {
                unpark(&inner.flows, &mut parked, &mut ready);
            }
            round = async {
                match claiming.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            }, if claiming.is_some() => {
                claiming = None;
                if round.as_ref().is_ok_and(|r| r.is_ok()) && said_claim_failed.reset() {
                    info!(event = "store_recovered", "claims go through again; sending resumes");
                }
                match round {
                    Ok(Ok(round)) => {
                        fanout_pending = round.fanned_out >= FANOUT_ROWS_PER_ROUND;
                        inner.log_ended(&round.claim.ended);
                        inner.finished(round.claim.finished);
                        let n = round.claim.deliveries.len();
                        ready.extend(round.claim.deliveries);
                        // Nothing due, in flight or held (a notification scheduled for later
                        // may be queued): a pause whose time is up has no answer coming to end
                        // it.
                        if n == 0
                            && ready.is_empty()
                            && match round.claim.idle_until {
                                Some(None) => true,
                                Some(Some(next)) => next > now_ms(),
                                None => false,
                            }
                            && slots.available_permits() == max_in_flight
                            && !inner.guards.has_held()
                        {
                            for (app, env) in inner.guards.lapse_idle() {
                                inner.note(
                                    "resumed",
                                    &app,
                                    format!("{env}: the pause is over with nothing left to send"),
                                );
                            }
                        }
                        // Short of due work: sleep until the next due moment or new work.
                        if let (Some(next_due), false) = (round.claim.idle_until, fanout_pending) {
                            let ms = match next_due {
                                Some(t) => (t - now_ms()).clamp(0, IDLE_RECHECK_MS),
                                None => IDLE_RECHECK_MS,
                            };
                            let ms = if n == 0 { ms.max(2) } else { ms };
                            idle_until = Some(
                                tokio::time::Instant::now() + Duration::from_millis(ms as u64),
                            );
                        }
                    }
                    Ok(Err(e)) => {
                        // A full disk fails every claim (the fan-out writes): said at once,
                        // then once a minute; `/readyz` says it meanwhile.
                        if let Some(unsaid) = said_claim_failed.note() {
                            error!(event = "store_error", error = %e, failed_since_last_line = unsaid + 1, "claim failed; retrying every second (said once a minute while it lasts)");
                        } else {
                            debug!(event = "store_error", error = %e, "claim failed again");
                        }
                        idle_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                    Err(e) => {
                        error!(event = "store_error", error = %e, "claim task failed; retrying in 1 s");
                        idle_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            _ = async {
                match idle_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            }, if idle_until.is_some() => {
                idle_until = None;
                fanout_pending = true;
            }
            _ = new_work.notified(), if idle_until.is_some() => {
                idle_until = None;
                fanout_pending = true;
            }
            _ = tokio::time::sleep_until(next_probe), if idle_until.is_some() => {
                next_probe = tokio::time::Instant::now() + EXTERNAL_PROBE;
                if store.changed_elsewhere().await {
                    idle_until = None;
                    fanout_pending = true;
                }
            }
        }
    }

    // Claimed but never started: hand them back (nothing was written for them).
    if let Some(h) = claiming.take()
        && let Ok(Ok(round)) = h.await
    {
        ready.extend(round.claim.deliveries);
    }
    let unsent: Vec<i64> = ready
        .drain(..)
        .chain(parked.drain(..))
        .map(|c| c.delivery_id)
        .collect();
    // Claims live in memory, so this is tidiness, not safety: skipped while the database
    // refuses writes, which would hold the stop up for its lock wait.
    if !unsent.is_empty() && !inner.results_unwritten.load(Ordering::Acquire) {
        store.release(unsent).await;
    }

    receipt_retries.abort();
    // Requests not yet written stay queued, unsent: the grace period is for the answers to
    // those on the wire.
    inner.stopping.store(true, Ordering::SeqCst);
    inner.guards.probe_done.notify_waiters();
    inner.client.close_to_new_requests();
    // Shutdown: let in-flight requests finish within the grace period.
    let grace = Duration::from_millis(inner.cfg.sender.shutdown_grace_ms);
    let all = max_in_flight as u32;
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            event = "shutdown_grace_exceeded",
            in_flight = max_in_flight - slots.available_permits(),
            "requests still in flight after the grace period stay queued"
        );
    }
    for r in inner.guards.release_all_held() {
        let _ = results.send(r).await;
    }
    drop(results);
    let _ = stop_recorder.send(true);
    let _ = recorder.await;
}

/// Puts the parked deliveries back at the front of `ready`, in their order, to be admitted
/// again: their flows answered, or they waited long enough to be held instead.
fn unpark(
    flows: &Flows,
    parked: &mut VecDeque<ClaimedDelivery>,
    ready: &mut VecDeque<ClaimedDelivery>,
) {
    flows.unpark_all();
    while let Some(c) = parked.pop_back() {
        ready.push_front(c);
    }
}

/// What one trip to the store brought back.
struct ClaimRound {
    /// Deliveries the fan-out made (when it was asked to run).
    fanned_out: usize,
    claim: Claim,
}

/// Runs due fan-outs (when `fan_out`), then claims up to `limit` deliveries.
async fn claim_round(store: Store, limit: usize, fan_out: bool) -> Result<ClaimRound, StoreError> {
    let (fanned_out, finished) = if fan_out {
        store.fan_out_due(now_ms(), FANOUT_ROWS_PER_ROUND).await?
    } else {
        (0, Vec::new())
    };
    let mut claim = store.claim_due(now_ms(), limit).await?;
    claim.finished.extend(finished);
    Ok(ClaimRound { fanned_out, claim })
}

/// Writes results in batched transactions; releases held `BadDeviceToken` answers when their
/// window passes. On stop it drains what is buffered and ends, even if abandoned tasks (past
/// the grace period) still hold senders: their deliveries stay queued and are sent again.
async fn recorder(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<DeliveryResult>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let new_work = inner.store.new_work();
    let mut stopping = false;
    let mut said_unwritten = Throttle::new(SAY_LASTING_EVERY);
    loop {
        // A stop is noticed here too: while results kept from a failed write are tried again,
        // the wait below (which watches for it) is skipped.
        if !stopping && *stop.borrow() {
            rx.close();
            stopping = true;
        }
        // Waits for results, unless results kept from a failed write are to be tried again.
        if !stopping && batch.is_empty() {
            // The timer runs only while answers are held; idle, the recorder just waits.
            let holding = inner.guards.has_held();
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => batch.push(r),
                    None => stopping = true,
                },
                _ = tick.tick(), if holding => {
                    let due = inner.guards.release_due();
                    for (app, env) in &due.bursts {
                        inner.announce_burst(app, *env);
                    }
                    for r in due.released {
                        let d = &r.delivery;
                        inner.log_outcome(d, &r.kind, d.attempts + 1, r.latency_ms);
                        batch.push(DeliveryResult { delivery_id: d.delivery_id, kind: r.kind });
                    }
                }
                _ = inner.guards.held_signal.notified(), if !holding => {}
                _ = stop.changed() => {
                    rx.close();
                    stopping = true;
                }
            }
        }
        while batch.len() < RECORD_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Under load, a moment's patience makes for fewer, larger transactions (each commit
        // has a fixed cost); a lone result waits at most RECORD_PATIENCE. Nothing waits on a
        // result being written except its notification's receipt.
        if !stopping && !batch.is_empty() && batch.len() < RECORD_ENOUGH {
            let deadline = tokio::time::Instant::now() + RECORD_PATIENCE;
            while batch.len() < RECORD_ENOUGH {
                let room = RECORD_BATCH - batch.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                    Ok(0) => {
                        stopping = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        // Stopping while the database refuses writes: each try would hold the stop up for
        // its lock wait (10 s), so what is left is given up; those deliveries are sent again
        // after the restart.
        if stopping && inner.results_unwritten.load(Ordering::Acquire) && !batch.is_empty() {
            error!(
                event = "store_error",
                results = batch.len(),
                "stopping while delivery results cannot be written; those deliveries stay queued and will be sent again after the restart"
            );
            batch.clear();
        }
        if batch.is_empty() {
            if stopping {
                break;
            }
            continue;
        }
        let retries = batch
            .iter()
            .any(|r| matches!(r.kind, ResultKind::Retry { .. }));
        // Each result's log line was logged before the result came here: written out first,
        // so that a kill -9 after the commit cannot leave an outcome on record without its
        // line (one uncommitted is sent again, and logged again, after the restart).
        if crate::logging::files_pending() {
            let _ = tokio::task::spawn_blocking(crate::logging::flush_files).await;
        }
        match inner.store.record_results(std::mem::take(&mut batch)).await {
            Ok(finished) => {
                if inner.results_unwritten.swap(false, Ordering::AcqRel) {
                    info!(
                        event = "store_recovered",
                        "delivery results written again; sending resumes"
                    );
                    said_unwritten.reset();
                    inner.results_written.notify_one();
                }
                inner.finished(finished);
            }
            Err(RecordFailed { error, results }) => {
                // Kept and written again every RECORD_RETRY; their deliveries stay claimed
                // and no new request starts meanwhile: a request whose result cannot be
                // written would be sent again and again.
                inner.results_unwritten.store(true, Ordering::Release);
                if stopping || results.is_empty() {
                    error!(event = "store_error", error = %error, results = results.len(), "cannot record delivery results; those deliveries stay queued and will be sent again after the restart");
                } else {
                    if let Some(unsaid) = said_unwritten.note() {
                        error!(event = "store_error", error = %error, results = results.len(), failed_since_last_line = unsaid + 1, "cannot record delivery results; no request goes out until they are written (tried again every second; said once a minute while it lasts)");
                    }
                    batch = results;
                    tokio::time::sleep(RECORD_RETRY).await;
                }
                continue;
            }
        }
        if retries {
            new_work.notify_one();
        }
    }
}

fn log_finished(finished: &[FinishedNotification]) {
    for f in finished {
        info!(target: DELIVERY_TARGET, event = "notification_finished", id = f.ext_id.as_str(), app = f.app.as_str(), "all deliveries final");
    }
}

impl Inner {
    /// Logs finished notifications and writes their receipts (off the async threads).
    fn finished(&self, finished: Vec<FinishedNotification>) {
        if finished.is_empty() {
            return;
        }
        let Some(work) = &self.receipts else {
            log_finished(&finished);
            return;
        };
        // Tracked, so that a shutdown waits for these receipts.
        let store = self.store.clone();
        work.spawn(move |work| {
            for f in finished {
                if let Some((f, e)) = work.write_one(f, false) {
                    error!(event = "receipt_error", id = %f.ext_id, app = %f.app, error = %e, "cannot write receipt; tried again within 10 s, and at the next start");
                    work.note_failed(&store, f, &e.to_string());
                }
            }
        });
    }

    /// Tries the receipts that could not be written again, in order, up to the first that
    /// still fails (a disk still full is one error line per round, not one per receipt).
    fn retry_receipts(&self) {
        let Some(work) = &self.receipts else {
            return;
        };
        let sweep = work
            .sweep_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((since_ms, until_ms)) = sweep {
            work.spawn(move |work| recover_receipts(work, since_ms, until_ms));
        }
        let failed = std::mem::take(&mut *work.failed.lock().unwrap_or_else(|p| p.into_inner()));
        if failed.is_empty() {
            return;
        }
        work.spawn(move |work| {
            let mut rest = failed.into_iter();
            while let Some(f) = rest.next() {
                if let Some((f, e)) = work.write_one(f, true) {
                    error!(event = "receipt_error", id = %f.ext_id, app = %f.app, error = %e, "still cannot write receipts; tried again in 10 s");
                    let mut failed = work.failed.lock().unwrap_or_else(|p| p.into_inner());
                    failed.push(f);
                    failed.extend(rest);
                    break;
                }
            }
        });
    }

    /// Starts one claimed delivery on its own task, holding `permit` until it is done; a
    /// delivery of a paused app, or of a host stuck without answering, goes straight back to
    /// the queue instead. Returns the delivery when its host has its share of the window out
    /// and may answer any moment: the caller keeps it (parks it) for a moment.
    async fn start(
        self: &Arc<Self>,
        c: ClaimedDelivery,
        permit: tokio::sync::OwnedSemaphorePermit,
        results: &mpsc::Sender<DeliveryResult>,
        crowded: bool,
    ) -> Option<ClaimedDelivery> {
        let (app, env) = (c.notification.app.as_str(), c.device.environment);
        let held = match self.guards.paused_until(app, env) {
            Some(until_ms) => Some(ResultKind::held_until(until_ms, None, "app paused".into())),
            None => match self.flows.admit(app, env, crowded) {
                FlowAdmit::Go => None,
                FlowAdmit::Park => return Some(c),
                FlowAdmit::Hold { until_ms, announce } => {
                    if let Some((out, silent)) = announce {
                        self.announce_unanswered(app, env, out, silent, false);
                    }
                    Some(ResultKind::held_until(
                        until_ms,
                        None,
                        "APNs not answering".into(),
                    ))
                }
            },
        };
        if let Some(kind) = held {
            drop(permit);
            let _ = results
                .send(DeliveryResult {
                    delivery_id: c.delivery_id,
                    kind,
                })
                .await;
            return None;
        }
        let inner = self.clone();
        let results = results.clone();
        tokio::spawn(async move {
            let env = c.device.environment;
            let probe = match inner.guards.admit(&c.notification.app, env) {
                Admit::Go => false,
                Admit::Probe => true,
                Admit::Wait => match inner.wait_for_probe(&c).await {
                    Ok(probe) => probe,
                    Err(kind) => {
                        inner
                            .flows
                            .done(&c.notification.app, env, false, Duration::ZERO);
                        drop(permit);
                        let _ = results
                            .send(DeliveryResult {
                                delivery_id: c.delivery_id,
                                kind,
                            })
                            .await;
                        return;
                    }
                },
            };
            // The app's name kept for after the send only for a probe (rare): no allocation
            // per delivery.
            let probe_of = probe.then(|| c.notification.app.clone());
            inner.send_one(c, &results).await;
            if let Some(app) = probe_of {
                inner.guards.probe_answered(&app, env);
            }
            drop(permit);
        });
        None
    }

    /// Says once per silence that a host has requests out and no answer: its further
    /// deliveries go back to the queue so that the others keep the window. `window_full`:
    /// found with the whole window out, which its requests hold until they time out.
    fn announce_unanswered(
        &self,
        app: &str,
        env: Environment,
        out: u32,
        silent: Duration,
        window_full: bool,
    ) {
        let ms = silent.as_millis();
        let timeout = self.cfg.apns.request_timeout_ms;
        // None out: the requests ended unanswered (timed out) before the next push came.
        let message = if window_full {
            format!(
                "{env}: no answer for {ms} ms to the {out} requests out, which hold that much of the window until they time out (request_timeout_ms = {timeout}); meanwhile other apps and environments wait for free slots; then one push at a time tries it until it answers"
            )
        } else if out == 0 {
            format!(
                "{env}: no answer for {ms} ms, its requests ended unanswered; one push at a time tries it while the others wait in the queue (unsent, no attempt spent), so other apps and environments keep the window"
            )
        } else {
            format!(
                "{env}: no answer for {ms} ms to the {out} requests waiting for one (sent, or waiting for a connection or stream); further pushes wait in the queue (unsent, no attempt spent) until it answers or they time out, so other apps and environments keep the window"
            )
        };
        warn!(
            event = "apns_unanswered",
            app,
            environment = env.as_str(),
            in_flight = out,
            silent_ms = silent.as_millis() as u64,
            "{message}"
        );
        self.note("unanswered", app, message);
    }

    /// Ends what [`Inner::announce_unanswered`] said: the host answers again after `silent`.
    fn announce_answering(&self, app: &str, env: Environment, silent: Duration) {
        let message = format!(
            "{env}: APNs answers again after {} ms without an answer",
            silent.as_millis()
        );
        info!(
            event = "apns_answering",
            app,
            environment = env.as_str(),
            silent_ms = silent.as_millis() as u64,
            "{message}"
        );
        self.note("answering", app, message);
    }

    /// Waits while another request is the probe of its app and environment (see
    /// [`Guards::admit`]); then whether this one is the next probe. A pause that began
    /// meanwhile (the probe was refused), or the daemon stopping, sends it back to the queue
    /// unsent, its attempt not counted.
    async fn wait_for_probe(&self, c: &ClaimedDelivery) -> Result<bool, ResultKind> {
        let (app, env) = (c.notification.app.as_str(), c.device.environment);
        loop {
            let answered = self.guards.probe_done.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if self.stopping.load(Ordering::SeqCst) {
                return Err(ResultKind::held_until(now_ms(), None, "stopping".into()));
            }
            if let Some(until_ms) = self.guards.paused_until(app, env) {
                return Err(ResultKind::held_until(until_ms, None, "app paused".into()));
            }
            match self.guards.admit(app, env) {
                Admit::Go => return Ok(false),
                Admit::Probe => return Ok(true),
                Admit::Wait => {}
            }
            let _ = tokio::time::timeout(PROBE_RECHECK, answered).await;
        }
    }

    /// Sends one delivery and reports its result.
    async fn send_one(&self, c: ClaimedDelivery, results: &mpsc::Sender<DeliveryResult>) {
        let n = &c.notification;
        let attempt = c.attempts + 1;
        let req = PushRequest {
            app: Arc::from(n.app.as_str()),
            environment: c.device.environment,
            token: c.device.token.clone(),
            apns_id: c.apns_id.clone(),
            topic: n.topic.clone(),
            push_type: n.push_type,
            priority: n.priority,
            expiration: n.expiration,
            collapse_id: n.collapse_id.clone(),
            payload: n.payload.clone(),
        };
        let started = std::time::Instant::now();
        let mut outcome = self.client.send(&req).await;
        // ExpiredProviderToken: the client minted a fresh token; resend at once, uncounted.
        let mut refreshes = 0;
        while refreshes < 2
            && let Outcome::AuthRefreshed { reason } = &outcome
        {
            refreshes += 1;
            // APNs answered, so the answer gets its line (SPEC 4.4), as an uncounted retry.
            let answered = ResultKind::Retry {
                due_at_ms: now_ms(),
                status: Some(403),
                reason: reason.clone(),
                count_attempt: false,
            };
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.log_outcome(&c, &answered, attempt, latency_ms);
            outcome = self.client.send(&req).await;
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let answered = !matches!(
            outcome,
            Outcome::Retry { status: None, .. }
                | Outcome::Cut { .. }
                | Outcome::PauseApp { status: None, .. }
        );
        let env = c.device.environment;
        if let Some(silent) = self.flows.done(&n.app, env, answered, started.elapsed()) {
            self.announce_answering(&n.app, env, silent);
        }
        // No request went out (APNs unreachable, or the app's credentials refused before
        // it was sent): held quietly, as by a pause (see `verdict`), with no retry line or
        // count for an answer that never came.
        let unsent = matches!(
            outcome,
            Outcome::Retry {
                status: None,
                unsent: true,
                ..
            } | Outcome::PauseApp { status: None, .. }
        );
        let Some(mut kind) = self.verdict(&c, outcome, latency_ms, results) else {
            return; // held by the BadDeviceToken guard
        };
        // A dead token of a device that registered again after APNs' time: the store keeps
        // it active; the line says so, as the receipt and `show` will.
        if let ResultKind::InvalidToken {
            reason,
            invalidated_at_ms,
            ..
        } = &mut kind
            && self
                .store
                .registered_after(c.device.id, *invalidated_at_ms)
                .await
        {
            *reason = crate::store::kept_reason(reason);
        }
        if unsent {
            let n = &c.notification;
            debug!(target: DELIVERY_TARGET, event = "delivery_held", id = n.ext_id.as_str(), app = n.app.as_str(), token = token_prefix(&c.device.token), environment = c.device.environment.as_str(), apns_id = c.apns_id.as_str(), "not sent (APNs unreachable, or the app paused): back in the queue until the next try");
        } else {
            self.log_outcome(&c, &kind, attempt, latency_ms);
        }
        let _ = results
            .send(DeliveryResult {
                delivery_id: c.delivery_id,
                kind,
            })
            .await;
    }

    /// What an APNs outcome means for this delivery (SPEC 4.3).
    fn verdict(
        &self,
        c: &ClaimedDelivery,
        outcome: Outcome,
        latency_ms: f64,
        results: &mpsc::Sender<DeliveryResult>,
    ) -> Option<ResultKind> {
        let app = c.notification.app.as_str();
        let env = c.device.environment;
        let s = &self.cfg.sender;
        match outcome {
            Outcome::Sent { apns_id, .. } => {
                // A pause `status` lists (credentials, a burst, an outage) is said to be over
                // there too.
                if self.guards.success(app, env) {
                    self.note("resumed", app, format!("{env}: APNs accepts the app again"));
                }
                // APNs echoes the id it was sent with; only a different one is worth writing.
                Some(ResultKind::Sent {
                    apns_id: (!apns_id.eq_ignore_ascii_case(&c.apns_id)).then_some(apns_id),
                })
            }
            Outcome::InvalidToken { status, reason, .. } if status == 400 => {
                match self.guards.bad_device_token(c, &reason, latency_ms) {
                    BadTokenVerdict::Hold => None,
                    BadTokenVerdict::Paused { until_ms } => {
                        Some(ResultKind::held_until(until_ms, Some(status), reason))
                    }
                    BadTokenVerdict::Burst { until_ms, released } => {
                        self.announce_burst(app, env);
                        // The held answers go back to the queue, each with its line.
                        let released: Vec<DeliveryResult> = released
                            .into_iter()
                            .map(|r| {
                                let d = &r.delivery;
                                self.log_outcome(d, &r.kind, d.attempts + 1, r.latency_ms);
                                DeliveryResult {
                                    delivery_id: d.delivery_id,
                                    kind: r.kind,
                                }
                            })
                            .collect();
                        let results = results.clone();
                        tokio::spawn(async move {
                            for r in released {
                                let _ = results.send(r).await;
                            }
                        });
                        Some(ResultKind::held_until(until_ms, Some(status), reason))
                    }
                }
            }
            Outcome::InvalidToken {
                status,
                reason,
                timestamp_ms,
            } => Some(ResultKind::InvalidToken {
                status,
                reason,
                // Never later than now: a timestamp from a clock ahead of ours would keep
                // a device invalid through registrations made before it.
                invalidated_at_ms: timestamp_ms.map_or_else(now_ms, |t| t.min(now_ms())),
            }),
            Outcome::AuthRefreshed { reason } => {
                Some(self.retry_or_give_up(c, None, reason, false))
            }
            // No connection to APNs at all (refused, unreachable, TLS trouble): that is the
            // app and environment's problem, not this delivery's. Pause them quietly with
            // back-off instead of cycling every queued delivery through a dead pool; the pool
            // connects again when the pause ends, however long its own back-off.
            Outcome::Retry {
                status: None,
                reason,
                unsent: true,
            } if self.stopping.load(Ordering::SeqCst) => {
                Some(ResultKind::held_until(now_ms(), None, reason))
            }
            Outcome::Retry {
                status: None,
                reason,
                unsent: true,
            } => {
                let cap = s.retry_max_ms.min(60_000);
                let (until_ms, new) = self.guards.pause(app, env, "unreachable", cap);
                if new {
                    let wait = Duration::from_millis((until_ms - now_ms()).max(0) as u64);
                    self.client
                        .connect_by(app, env, std::time::Instant::now() + wait);
                    // In `status` (its `paused` list and recent errors) until the first 200
                    // notes its end.
                    self.note_pause(app, env, format!("{env}: APNs unreachable: {reason}"));
                    warn!(
                        event = "apns_unreachable",
                        app,
                        environment = %env,
                        reason = %reason,
                        resume_in_ms = until_ms - now_ms(),
                        "cannot reach APNs; holding this app's deliveries until the next try"
                    );
                }
                Some(ResultKind::held_until(until_ms, None, reason))
            }
            Outcome::Retry {
                status,
                reason,
                unsent,
            } => Some(self.retry_or_give_up(c, status, reason, !unsent)),
            Outcome::Cut { reason } => Some(self.retry_or_give_up(c, None, reason, false)),
            Outcome::PauseApp { status, reason } => {
                let (until_ms, new) =
                    self.guards
                        .pause(app, env, "credentials", guard::MAX_PAUSE_MS);
                if new {
                    // A token refused as expired while younger than 20 minutes: the key is
                    // fine, this machine's clock is not.
                    let hint = if reason.contains("ExpiredProviderToken") {
                        "APNs says the provider token expired, but it is younger than 20 minutes: check this machine's clock (NTP); pausing the app"
                    } else if reason.contains("InvalidProviderToken") {
                        "APNs refused the provider token: check the app's key_id, team_id and .p8 key file (the config file and the key are read again on the next try); pausing the app"
                    } else if reason.contains("BadCertificateEnvironment") {
                        "APNs says the certificate is for the other environment: check the app's environment in the config (a restart picks it up) or its certificate file (re-read on the next try); pausing the app"
                    } else {
                        // Refused by APNs, or unusable here (a certificate and key that do not
                        // match): the reason says which.
                        "the app's credentials were refused or cannot be used (see reason); pausing it (fix the key or certificate file: it is re-read on the next try)"
                    };
                    // The ids the token was made with, beside the reason (token auth only).
                    let ids = self
                        .client
                        .token_ids(app)
                        .map(|(key_id, team_id)| format!("key_id {key_id} team_id {team_id}"));
                    error!(
                        event = "app_paused",
                        app,
                        environment = %env,
                        reason = %reason,
                        token_ids = ids.as_deref(),
                        resume_in_ms = until_ms - now_ms(),
                        "{hint}"
                    );
                    self.note_pause(app, env, format!("{env}: {reason}"));
                }
                Some(ResultKind::held_until(until_ms, status, reason))
            }
            Outcome::Failed { status, reason } => Some(ResultKind::Failed {
                status: Some(status),
                reason,
            }),
        }
    }

    /// A burst of `BadDeviceToken` answers paused the app and environment: said loudly (the
    /// log's error, `status`), whether the answer that proved it or the end of a hold found it.
    fn announce_burst(&self, app: &str, env: Environment) {
        error!(
            event = "app_paused",
            app,
            environment = %env,
            reason = "BadDeviceToken burst",
            "many devices of this app answered BadDeviceToken at once: the app's environment or topic is probably wrong in the config; pausing it and invalidating nothing"
        );
        self.note_pause(app, env, format!("{env}: burst of BadDeviceToken answers; check the app's environment and bundle_id. Nothing was invalidated."));
    }

    /// A retryable failure: back off with jitter, unless attempts or the expiration run out.
    fn retry_or_give_up(
        &self,
        c: &ClaimedDelivery,
        status: Option<u16>,
        reason: String,
        count_attempt: bool,
    ) -> ResultKind {
        let s = &self.cfg.sender;
        let attempts = c.attempts + u32::from(count_attempt);
        if attempts >= s.max_attempts {
            return ResultKind::Failed { status, reason };
        }
        let Some(due) = retry_due(
            now_ms(),
            backoff_ms(s.retry_initial_ms, s.retry_max_ms, attempts) as i64,
            backoff_cap_ms(s.retry_initial_ms, s.retry_max_ms, attempts),
            c.notification.expiration,
        ) else {
            return ResultKind::Expired {
                status,
                reason: format!("{reason}; the next attempt would come after the expiration"),
                count_attempt,
            };
        };
        ResultKind::Retry {
            due_at_ms: due,
            status,
            reason,
            count_attempt,
        }
    }

    /// Deliveries the claim ended unsent (expired, to a device already invalidated, or to one
    /// unregistered since) are outcomes too: one line and one count each, with the attempts
    /// made before, and HTTP status and latency 0 (no request was made).
    fn log_ended(&self, ended: &[EndedDelivery]) {
        for e in ended {
            let kind = match e.state {
                DeliveryState::InvalidToken => ResultKind::InvalidToken {
                    status: 0,
                    reason: e.reason.clone(),
                    invalidated_at_ms: 0,
                },
                DeliveryState::Failed => ResultKind::Failed {
                    status: None,
                    reason: e.reason.clone(),
                },
                _ => ResultKind::Expired {
                    status: None,
                    reason: e.reason.clone(),
                    count_attempt: false,
                },
            };
            self.log_outcome(&e.delivery, &kind, e.delivery.attempts, 0.0);
        }
    }

    /// A failed or expired delivery among `status`'s recent errors, once a minute per (app,
    /// state, reason).
    fn note_failure(
        &self,
        c: &ClaimedDelivery,
        state: &'static str,
        status: Option<u16>,
        reason: &str,
    ) {
        let app = c.notification.app.as_str();
        let status = status.map(|s| format!("{s} ")).unwrap_or_default();
        let key = (app.to_string(), state, format!("{status}{reason}"));
        {
            let mut noted = self
                .noted_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if noted
                .get(&key)
                .is_some_and(|t| t.elapsed() < NOTE_FAILURES_EVERY)
            {
                return;
            }
            // Reasons are Apple's few, or pushdrop's own words; should some carry ever-new
            // text, the map still stays small.
            if noted.len() >= NOTED_FAILURES_MAX {
                noted.retain(|_, t| t.elapsed() < NOTE_FAILURES_EVERY);
                if noted.len() >= NOTED_FAILURES_MAX {
                    noted.clear();
                }
            }
            noted.insert(key, std::time::Instant::now());
        }
        let message = format!(
            "delivery {state}: {status}{reason} (notification {}, token {}…; more like it within a minute are not listed)",
            c.notification.ext_id,
            token_prefix(&c.device.token)
        );
        self.note(state, app, message);
    }

    /// An event among `status`'s recent errors, written off the sending path.
    fn note(&self, kind: &'static str, app: &str, message: String) {
        let (store, app) = (self.store.clone(), app.to_string());
        tokio::spawn(async move { store.note_event(kind, Some(&app), &message).await });
    }

    /// Notes a pause for `status`, until a `resumed` ends it: the first of a run of pauses (a
    /// re-pause after a failed try is the same incident), and a later one whose cause changed
    /// (a wrong key file replaced by an unreadable one), so that `status` shows the latest.
    fn note_pause(&self, app: &str, env: Environment, message: String) {
        let first = self.guards.first_pause(app, env);
        let changed = match self.pause_notes.lock() {
            Ok(mut noted) => {
                let key = (app.to_string(), env);
                let changed = noted.get(&key) != Some(&message);
                if changed {
                    noted.insert(key, message.clone());
                }
                changed
            }
            Err(_) => true,
        };
        if first || changed {
            self.note("paused", app, message);
        }
    }

    /// One line per outcome (SPEC 4.4). Text fields go in as `&str`, not `%Display`: the
    /// same JSON, without a trip through `core::fmt` for each (this runs once per delivery).
    fn log_outcome(&self, c: &ClaimedDelivery, kind: &ResultKind, attempt: u32, latency_ms: f64) {
        // To the microsecond: a clock reading's binary noise (2.6297870000000003) says nothing.
        let latency_ms = (latency_ms * 1000.0).round() / 1000.0;
        let n = &c.notification;
        let token = token_prefix(&c.device.token);
        let (state, status, reason, apns_id): (&str, Option<u16>, &str, &str) = match kind {
            ResultKind::Sent { apns_id } => (
                DeliveryState::Sent.as_str(),
                Some(200),
                "",
                apns_id.as_deref().unwrap_or(&c.apns_id),
            ),
            ResultKind::Retry { status, reason, .. } => ("retry", *status, reason, &c.apns_id),
            ResultKind::Failed { status, reason } => {
                (DeliveryState::Failed.as_str(), *status, reason, &c.apns_id)
            }
            ResultKind::Expired { status, reason, .. } => {
                (DeliveryState::Expired.as_str(), *status, reason, &c.apns_id)
            }
            ResultKind::InvalidToken { status, reason, .. } => (
                DeliveryState::InvalidToken.as_str(),
                Some(*status),
                reason,
                &c.apns_id,
            ),
        };
        if matches!(kind, ResultKind::Sent { .. }) {
            self.sent_counter
                .get_or_init(|| {
                    metrics::get()
                        .deliveries
                        .get_or_create(&OutcomeLabel {
                            outcome: state.to_string(),
                            reason: String::new(),
                        })
                        .clone()
                })
                .inc();
        } else if state == "retry" {
            // Every `retry` line counts, an answer held by a pause (credentials, a
            // BadDeviceToken burst) as much as a back-off. (A delivery held because APNs is
            // unreachable was not sent: `send_one` gives it no line.)
            metrics::get()
                .retries
                .get_or_create(&ReasonLabel {
                    reason: metrics::reason_label(status, reason).to_string(),
                })
                .inc();
        } else {
            let label = metrics::reason_label(status, reason);
            metrics::get()
                .deliveries
                .get_or_create(&OutcomeLabel {
                    outcome: state.to_string(),
                    reason: label.to_string(),
                })
                .inc();
            if matches!(kind, ResultKind::Failed { .. } | ResultKind::Expired { .. }) {
                self.note_failure(c, state, status, reason);
            }
        }
        let status = status.map(i64::from).unwrap_or(0);
        match kind {
            ResultKind::Sent { .. } => info!(
                target: DELIVERY_TARGET, event = "delivery", id = n.ext_id.as_str(), app = n.app.as_str(), token, environment = c.device.environment.as_str(),
                status = state, http_status = status, reason, apns_id, attempt, latency_ms, "delivered"
            ),
            ResultKind::Retry { due_at_ms, .. } => warn!(
                target: DELIVERY_TARGET, event = "delivery", id = n.ext_id.as_str(), app = n.app.as_str(), token, environment = c.device.environment.as_str(),
                status = state, http_status = status, reason, apns_id, attempt, latency_ms,
                retry_in_ms = due_at_ms - now_ms(), "will retry"
            ),
            _ => warn!(
                target: DELIVERY_TARGET, event = "delivery", id = n.ext_id.as_str(), app = n.app.as_str(), token, environment = c.device.environment.as_str(),
                status = state, http_status = status, reason, apns_id, attempt, latency_ms, "not delivered"
            ),
        }
    }
}

/// Exponential back-off with jitter: attempt n waits between half and all of
/// `initial * 2^(n-1)`, capped at `max`.
pub fn backoff_ms(initial: u64, max: u64, attempts: u32) -> u64 {
    let cap = backoff_cap_ms(initial, max, attempts);
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    ((cap as f64) * jitter) as u64
}

/// The back-off before jitter: `initial` doubled per attempt made, at most `max`.
fn backoff_cap_ms(initial: u64, max: u64, attempts: u32) -> i64 {
    let exp = initial.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
    exp.min(max).max(1).min(i64::MAX as u64) as i64
}

/// How long before a notification's expiration its last retry is made, when the back-off
/// would have passed it: time for the request to reach APNs before it expires.
const LAST_TRY_BEFORE_EXPIRATION_MS: i64 = 500;

/// When a retry is due (ms), `wait` (jittered, out of a back-off of `cap`) from `now`; `None`
/// when it would come after the notification's expiration (UNIX seconds; 0 or none: never).
/// A back-off that would pass the expiration leaves one last try just before it, where that
/// still waits the shortest the jitter could have drawn (half the back-off): the back-off is
/// kept, and the time left is used.
fn retry_due(now: i64, wait: i64, cap: i64, expiration_s: Option<i64>) -> Option<i64> {
    let due = now + wait;
    let Some(exp_ms) = expiration_s.filter(|&e| e > 0).map(|e| e * 1000) else {
        return Some(due);
    };
    if due <= exp_ms {
        return Some(due);
    }
    let last = exp_ms - LAST_TRY_BEFORE_EXPIRATION_MS;
    (last >= now + cap / 2).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_back_off_past_the_expiration_leaves_a_last_try_before_it() {
        // No expiration (or 0): the back-off as drawn.
        assert_eq!(retry_due(0, 900, 1000, None), Some(900));
        assert_eq!(retry_due(0, 900, 1000, Some(0)), Some(900));
        // Within the expiration: as drawn.
        assert_eq!(retry_due(0, 900, 1000, Some(1)), Some(900));
        // Past it: half a second before it, if that waits at least half the back-off.
        assert_eq!(retry_due(500, 1900, 2000, Some(2)), Some(1500));
        assert_eq!(retry_due(0, 3800, 4000, Some(3)), Some(2500));
        // Too close: the delivery expires.
        assert_eq!(retry_due(0, 2100, 4000, Some(2)), None);
        assert_eq!(retry_due(2000, 900, 1000, Some(2)), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let a = backoff_ms(100, 10_000, 1);
            assert!((50..=100).contains(&a), "{a}");
            let c = backoff_ms(100, 10_000, 3);
            assert!((200..=400).contains(&c), "{c}");
            let m = backoff_ms(100, 1000, 20);
            assert!((500..=1000).contains(&m), "{m}");
        }
    }
}
