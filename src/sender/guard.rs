//! The sender's two safety guards: app pauses (credential failures, `BadDeviceToken` bursts)
//! and the hold on `BadDeviceToken` answers that lets a burst be told from a dead phone
//! before anything is invalidated.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use crate::config::{Environment, SenderConfig};
use crate::metrics::{self, PauseLabel};
use crate::model::now_ms;
use crate::store::{ClaimedDelivery, DeliveryResult, ResultKind};

/// How long the burst detector looks back.
const WINDOW: Duration = Duration::from_secs(60);
/// Below this many `BadDeviceToken` answers a window is never a burst, whatever the ratio.
const MIN_BURST: u32 = 3;
/// `bad_token_burst` devices make a burst only when they are at least this share (percent)
/// of the window's answers: 25 dead tokens among 5,000 accepted pushes are dead phones, a
/// registry with a tenth of its tokens refused is a config (or registration) mistake.
const BURST_SHARE_PERCENT: u64 = 10;
/// This many times `bad_token_burst` devices refused, and not one push accepted in the window:
/// a burst at once, without waiting for the hold to end (a wrong environment refuses every
/// request, and the hold would let thousands more go out first).
const OVERWHELMING: u32 = 5;
/// How long a `BadDeviceToken` answer is held before its device is invalidated: long enough
/// for a burst (a wrong environment or topic answers every request that way at once) to show.
const HOLD_MS: u64 = 2000;
/// How long a probe (see [`Guards::admit`]) may stay unanswered before another may go: the
/// request's own timeout ends it well before, this only bounds a probe whose end was missed.
const PROBE_LIMIT: Duration = Duration::from_secs(30);
/// Longest pause after repeated credential failures or bursts.
pub const MAX_PAUSE_MS: u64 = 15 * 60 * 1000;

type Key = (String, Environment);

/// Both environments, in the order of [`env_index`].
const ENVS: [Environment; 2] = [Environment::Production, Environment::Sandbox];

pub(super) fn env_index(env: Environment) -> usize {
    match env {
        Environment::Production => 0,
        Environment::Sandbox => 1,
    }
}

/// Whether a delivery may go out now (see [`Guards::admit`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Go,
    /// The one request in flight for an app and environment a burst left in doubt.
    Probe,
    /// Another request is that probe: wait for its answer.
    Wait,
}

/// What to do with a `BadDeviceToken` answer.
pub enum BadTokenVerdict {
    /// Held for a moment; the guard reports it later (invalid, or released by a burst).
    Hold,
    /// The app and environment are paused (a burst, or its credentials): an answer now says
    /// nothing about the device (it was sent before the pause, under the config that caused
    /// it). The delivery waits for the pause to end, its attempt not counted.
    Paused { until_ms: i64 },
    /// A burst: the app and environment are paused until `until_ms`; `released` are the held
    /// answers handed back to the queue, not invalidated.
    Burst {
        until_ms: i64,
        released: Vec<Released>,
    },
}

struct Pause {
    until: Instant,
    until_ms: i64,
    level: u32,
    kind: String,
}

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    ok: u32,
    /// Distinct devices that answered `BadDeviceToken`: many devices, not many notifications
    /// to one dead device, make a burst.
    bad: std::collections::HashSet<i64>,
    held: Vec<Held>,
    /// A burst paused the app and environment, and no 200 has come since: its config is
    /// still in doubt, so a `BadDeviceToken` answer is more of the same burst, however long
    /// after it, not a dead device. Answers spaced wider than the hold (steady traffic to
    /// a wrong environment) otherwise found a fresh window after each pause and invalidated
    /// one device each.
    suspect: bool,
    /// While `suspect`: when the one request allowed in flight went out.
    probe: Option<Instant>,
    /// A push for the app and environment has been accepted since the start (kept as the
    /// window rolls): its config is right, so a few devices refused are dead devices, not a
    /// burst. Without it, three dead devices in an app of four made a burst at every try
    /// (each ended by the good device's next 200) and were never invalidated. Many devices
    /// (`bad_token_burst`, a tenth of the answers) are still a burst.
    proven: bool,
}

struct Held {
    /// The delivery as it was sent, for its log line when the hold ends.
    delivery: ClaimedDelivery,
    reason: String,
    at: Instant,
    at_ms: i64,
    latency_ms: f64,
}

/// What the end of the holds decided: the answers let go (invalid devices, or back to the
/// queue), and the apps and environments a burst paused.
#[derive(Default)]
pub struct Due {
    pub released: Vec<Released>,
    pub bursts: Vec<(String, Environment)>,
}

/// A held `BadDeviceToken` answer whose hold passed without a burst: the device is invalid.
/// The sender logs and counts it like any other outcome.
pub struct Released {
    pub delivery: ClaimedDelivery,
    pub kind: ResultKind,
    pub latency_ms: f64,
}

/// Pauses and the `BadDeviceToken` hold, per app and environment.
pub struct Guards {
    pauses: Mutex<HashMap<Key, Pause>>,
    /// Whether `pauses` may hold anything: every delivery asks, almost always in vain.
    any_pause: AtomicBool,
    /// Whether any window is `suspect`: every delivery asks [`Guards::admit`].
    any_suspect: AtomicBool,
    /// Woken when a probe is answered (or a window is no longer in doubt).
    pub probe_done: tokio::sync::Notify,
    /// Per app (looked up by `&str`, no allocation per answer), per environment.
    windows: Mutex<HashMap<String, [Window; 2]>>,
    burst: u32,
    hold: Duration,
    pause_base_ms: u64,
    /// Woken when an answer is held, so the recorder needs no timer while nothing is.
    pub held_signal: tokio::sync::Notify,
}

impl Guards {
    pub fn new(cfg: &SenderConfig) -> Guards {
        Guards {
            pauses: Mutex::new(HashMap::new()),
            any_pause: AtomicBool::new(false),
            any_suspect: AtomicBool::new(false),
            probe_done: tokio::sync::Notify::new(),
            windows: Mutex::new(HashMap::new()),
            burst: cfg.bad_token_burst.max(MIN_BURST),
            hold: Duration::from_millis(HOLD_MS),
            pause_base_ms: cfg.retry_initial_ms.max(1000),
            held_signal: tokio::sync::Notify::new(),
        }
    }

    /// When the app and environment is paused, the moment it resumes (ms).
    pub fn paused_until(&self, app: &str, env: Environment) -> Option<i64> {
        if !self.any_pause.load(Ordering::Acquire) {
            return None;
        }
        let pauses = self.pauses.lock().ok()?;
        let p = pauses.get(&(app.to_string(), env))?;
        (p.until > Instant::now()).then_some(p.until_ms)
    }

    /// Pauses the app and environment (or keeps the running pause); returns when it resumes
    /// and whether this started a new pause. Each new pause doubles the previous one, up to
    /// `cap_ms`. `kind` names the cause in the `pushdrop_app_paused` metric.
    pub fn pause(&self, app: &str, env: Environment, kind: &str, cap_ms: u64) -> (i64, bool) {
        let now = Instant::now();
        let Ok(mut pauses) = self.pauses.lock() else {
            return (now_ms() + self.pause_base_ms as i64, false);
        };
        let key = (app.to_string(), env);
        if let Some(p) = pauses.get(&key)
            && p.until > now
        {
            return (p.until_ms, false);
        }
        let level = pauses.get(&key).map_or(0, |p| p.level + 1);
        let ms = self
            .pause_base_ms
            .saturating_mul(1u64 << level.min(20))
            .min(cap_ms.max(self.pause_base_ms));
        let until_ms = now_ms() + ms as i64;
        if let Some(old) = pauses.get(&key)
            && old.kind != kind
        {
            set_paused_metric(app, env, &old.kind, 0);
        }
        self.any_pause.store(true, Ordering::Release);
        pauses.insert(
            key,
            Pause {
                until: now + Duration::from_millis(ms),
                until_ms,
                level,
                kind: kind.to_string(),
            },
        );
        set_paused_metric(app, env, kind, 1);
        (until_ms, true)
    }

    /// Whether the app and environment's pause is the first of its run: no re-pause since
    /// the last success (or the start). A run of pauses is one incident for `status`.
    pub fn first_pause(&self, app: &str, env: Environment) -> bool {
        self.pauses
            .lock()
            .ok()
            .and_then(|p| p.get(&(app.to_string(), env)).map(|p| p.level == 0))
            .unwrap_or(true)
    }

    /// Ends the burst pauses whose time is up when nothing is left to send: no answer will
    /// come to end them (a 200) or renew them, and an app whose dead tokens the operator
    /// unregistered (the README's way out of a burst) would otherwise stay paused, alerting,
    /// until its next notification. A credentials or unreachable pause stays: its cause is
    /// not known to be gone (a wrong key is still wrong when the notifications it held have
    /// expired), so it still shows, and alerts, until a push goes through. Returns the apps
    /// and environments resumed.
    pub fn lapse_idle(&self) -> Vec<(String, Environment)> {
        if !self.any_pause.load(Ordering::Acquire) {
            return Vec::new();
        }
        let Ok(mut pauses) = self.pauses.lock() else {
            return Vec::new();
        };
        let now = Instant::now();
        let over: Vec<(Key, Pause)> = pauses
            .extract_if(|_, p| p.until <= now && p.kind == BURST)
            .collect();
        self.ended(
            &pauses,
            over.iter().map(|((app, env), p)| (app.as_str(), *env, p)),
        );
        for ((app, env), p) in &over {
            info!(
                event = "app_resumed",
                app,
                environment = %env,
                cause = %p.kind,
                "the pause is over with nothing left to send; the next notification goes out as usual"
            );
        }
        over.into_iter().map(|(key, _)| key).collect()
    }

    /// The bookkeeping of pauses just removed from `pauses`: their metric series back to 0,
    /// and the flag every delivery asks cleared when none is left.
    fn ended<'p>(
        &self,
        pauses: &HashMap<Key, Pause>,
        removed: impl IntoIterator<Item = (&'p str, Environment, &'p Pause)>,
    ) {
        for (app, env, p) in removed {
            set_paused_metric(app, env, &p.kind, 0);
        }
        if pauses.is_empty() {
            self.any_pause.store(false, Ordering::Release);
        }
    }

    /// A 200 for the app and environment: its credentials and config are fine.
    /// Returns whether this answer ended a pause.
    pub fn success(&self, app: &str, env: Environment) -> bool {
        let mut ended = false;
        if self.any_pause.load(Ordering::Acquire) {
            let key = (app.to_string(), env);
            if let Ok(mut pauses) = self.pauses.lock()
                && pauses.get(&key).is_some_and(|p| p.until <= Instant::now())
                && let Some(p) = pauses.remove(&key)
            {
                self.ended(&pauses, [(app, env, &p)]);
                info!(event = "app_resumed", app, environment = %env, "APNs accepts the app again");
                ended = true;
            }
        }
        if let Ok(mut w) = self.windows.lock() {
            let win = match w.get_mut(app) {
                Some(envs) => &mut envs[env_index(env)],
                None => &mut w.entry(app.to_string()).or_default()[env_index(env)],
            };
            roll(win);
            win.ok += 1;
            win.proven = true;
            if win.suspect {
                win.suspect = false;
                win.probe = None;
                let any = w.values().flatten().any(|win| win.suspect);
                self.any_suspect.store(any, Ordering::Release);
                self.probe_done.notify_waiters();
            }
        }
        ended
    }

    /// After a burst, until a 200, one request at a time goes out for the app and
    /// environment: a config still wrong when the pause ends is then refused once, and
    /// paused again, instead of once per request in flight (up to `max_in_flight`). Dead
    /// tokens of a real burst cost one round trip more, before full speed resumes.
    pub fn admit(&self, app: &str, env: Environment) -> Admit {
        if !self.any_suspect.load(Ordering::Acquire) {
            return Admit::Go;
        }
        let Ok(mut w) = self.windows.lock() else {
            return Admit::Go;
        };
        let Some(envs) = w.get_mut(app) else {
            return Admit::Go;
        };
        let win = &mut envs[env_index(env)];
        if !win.suspect {
            return Admit::Go;
        }
        // A probe refused a moment ago paused it again: no probe until the pause ends.
        if self.paused_until(app, env).is_some() {
            return Admit::Wait;
        }
        match win.probe {
            Some(since) if since.elapsed() < PROBE_LIMIT => Admit::Wait,
            _ => {
                win.probe = Some(Instant::now());
                Admit::Probe
            }
        }
    }

    /// The probe of [`Guards::admit`] has its answer (whatever it was): the next may go.
    pub fn probe_answered(&self, app: &str, env: Environment) {
        if let Ok(mut w) = self.windows.lock()
            && let Some(envs) = w.get_mut(app)
        {
            envs[env_index(env)].probe = None;
        }
        self.probe_done.notify_waiters();
    }

    /// Takes a `BadDeviceToken` for the app and environment as more of a burst until a 200:
    /// the last run stopped while a burst held some of its deliveries.
    pub fn suspect(&self, app: &str, env: Environment) {
        if let Ok(mut w) = self.windows.lock() {
            w.entry(app.to_string()).or_default()[env_index(env)].suspect = true;
            self.any_suspect.store(true, Ordering::Release);
        }
    }

    /// A 400 `BadDeviceToken` for claimed delivery `c`: held, or the proof of a burst.
    pub fn bad_device_token(
        &self,
        c: &ClaimedDelivery,
        reason: &str,
        latency_ms: f64,
    ) -> BadTokenVerdict {
        let (app, env) = (c.notification.app.as_str(), c.device.environment);
        if let Some(until_ms) = self.paused_until(app, env) {
            return BadTokenVerdict::Paused { until_ms };
        }
        let Ok(mut windows) = self.windows.lock() else {
            return BadTokenVerdict::Hold;
        };
        let win = &mut windows.entry(app.to_string()).or_default()[env_index(env)];
        roll(win);
        win.bad.insert(c.device.id);
        // Judged when the hold ends, on the answers that came meanwhile too: the first
        // answers of a broadcast are a small sample (its dead tokens may come first).
        let overwhelming = win.ok == 0 && win.bad.len() as u32 >= self.burst * OVERWHELMING;
        if !(win.suspect || overwhelming) {
            win.held.push(Held {
                delivery: c.clone(),
                reason: reason.to_string(),
                at: Instant::now(),
                at_ms: now_ms(),
                latency_ms,
            });
            self.held_signal.notify_one();
            return BadTokenVerdict::Hold;
        }
        let (until_ms, released) = self.burst(app, env, win);
        drop(windows);
        BadTokenVerdict::Burst { until_ms, released }
    }

    /// Whether the window's `BadDeviceToken` answers are a burst: `bad_token_burst` devices
    /// that are a tenth of the answers, or, before any push of the app and environment was
    /// accepted, at least 3 devices and more of them than accepted pushes.
    fn is_burst(&self, win: &Window) -> bool {
        let bad = win.bad.len() as u32;
        let share =
            u64::from(bad) * 100 >= BURST_SHARE_PERCENT * (u64::from(bad) + u64::from(win.ok));
        (bad >= MIN_BURST && bad > win.ok && !win.proven) || (bad >= self.burst && share)
    }

    /// Pauses the app and environment for a burst; the held answers go back to the queue
    /// (held until the pause ends), and the window starts afresh, in doubt until a 200.
    fn burst(&self, app: &str, env: Environment, win: &mut Window) -> (i64, Vec<Released>) {
        let held = std::mem::take(&mut win.held);
        *win = Window {
            suspect: true,
            proven: win.proven,
            ..Window::default()
        };
        self.any_suspect.store(true, Ordering::Release);
        // Paused before the window is let go: an answer of the same round taken next must
        // find the pause, not an empty window that would hold it as a lone dead device.
        let (until_ms, _) = self.pause(app, env, BURST, MAX_PAUSE_MS);
        let released = held
            .into_iter()
            .map(|h| Released {
                delivery: h.delivery,
                kind: ResultKind::held_until(until_ms, Some(400), h.reason),
                latency_ms: h.latency_ms,
            })
            .collect();
        (until_ms, released)
    }

    /// Whether any `BadDeviceToken` answer is waiting for its hold to pass.
    pub fn has_held(&self) -> bool {
        self.windows
            .lock()
            .is_ok_and(|w| w.values().flatten().any(|win| !win.held.is_empty()))
    }

    /// Held answers whose hold has passed, judged with every answer of the window (those
    /// that came during the hold too). A burst pauses the app and environment and hands
    /// every held answer back to the queue (the burst is in [`Due::bursts`], for the
    /// sender to say so loudly). Otherwise their devices are invalid; unless the app and
    /// environment are paused by then: the answers go back to the queue, as a burst would
    /// have sent them, and wait for the pause to end.
    pub fn release_due(&self) -> Due {
        let mut out = Due::default();
        let Ok(mut windows) = self.windows.lock() else {
            return out;
        };
        for (app, envs) in windows.iter_mut() {
            for (win, env) in envs.iter_mut().zip(ENVS) {
                if !win.held.iter().any(|h| h.at.elapsed() >= self.hold) {
                    continue;
                }
                roll(win);
                if self.paused_until(app, env).is_none() && self.is_burst(win) {
                    let (_, released) = self.burst(app, env, win);
                    out.released.extend(released);
                    out.bursts.push((app.clone(), env));
                    continue;
                }
                let (due, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut win.held)
                    .into_iter()
                    .partition(|h| h.at.elapsed() >= self.hold);
                win.held = keep;
                let paused = self.paused_until(app, env);
                out.released.extend(due.into_iter().map(|h| Released {
                    delivery: h.delivery,
                    kind: match paused {
                        Some(until_ms) => ResultKind::held_until(until_ms, Some(400), h.reason),
                        None => ResultKind::InvalidToken {
                            status: 400,
                            reason: h.reason,
                            invalidated_at_ms: h.at_ms,
                        },
                    },
                    latency_ms: h.latency_ms,
                }));
            }
        }
        out
    }

    /// On shutdown: every held answer goes back to the queue, undecided.
    pub fn release_all_held(&self) -> Vec<DeliveryResult> {
        let Ok(mut windows) = self.windows.lock() else {
            return Vec::new();
        };
        let now = now_ms();
        let mut out = Vec::new();
        for w in windows.values_mut().flatten() {
            for h in std::mem::take(&mut w.held) {
                // Held while a burst's doubt lasts: the next start keeps that doubt (it
                // looks for these answers). Held only for the moment that tells a burst from
                // a dead device: no verdict yet, so the next start sends it again and judges
                // it then (it used to take a lone dead device for a burst, and pause).
                let kind = if w.suspect {
                    ResultKind::held_until(now, Some(400), h.reason)
                } else {
                    ResultKind::held_until(now, None, HELD_AT_STOP.into())
                };
                out.push(DeliveryResult {
                    delivery_id: h.delivery.delivery_id,
                    kind,
                });
            }
        }
        out
    }
}

/// Why a `BadDeviceToken` answer still held when the daemon stopped, before any burst, is
/// back in the queue.
const HELD_AT_STOP: &str =
    "stopped while its BadDeviceToken answer was held; sent again and judged after the restart";

/// The cause of a pause for a burst of `BadDeviceToken` answers.
const BURST: &str = "bad_device_token_burst";

/// The causes a pause names in `pushdrop_app_paused`.
const PAUSE_KINDS: [&str; 3] = ["credentials", "unreachable", BURST];

/// Every app's `pushdrop_app_paused` series at 0 from the start, each environment and cause:
/// a dashboard shows "not paused" rather than no data, and an alert sees its series change.
pub fn paused_metric_at_zero<'a>(apps: impl IntoIterator<Item = &'a str>) {
    for app in apps {
        for env in [Environment::Production, Environment::Sandbox] {
            for kind in PAUSE_KINDS {
                let _ = metrics::get().app_paused.get_or_create(&PauseLabel {
                    app: metrics::LabelText(app.to_string()),
                    environment: env.to_string(),
                    reason: kind.to_string(),
                });
            }
        }
    }
}

fn set_paused_metric(app: &str, env: Environment, kind: &str, v: i64) {
    debug_assert!(PAUSE_KINDS.contains(&kind), "{kind}");
    metrics::get()
        .app_paused
        .get_or_create(&PauseLabel {
            app: metrics::LabelText(app.to_string()),
            environment: env.to_string(),
            reason: kind.to_string(),
        })
        .set(v);
}

fn roll(win: &mut Window) {
    let now = Instant::now();
    match win.started {
        Some(s) if now.duration_since(s) < WINDOW => {}
        _ => {
            win.started = Some(now);
            win.ok = 0;
            win.bad.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(app: &str, env: Environment, device: i64, delivery: i64) -> ClaimedDelivery {
        ClaimedDelivery {
            delivery_id: delivery,
            attempts: 0,
            apns_id: "A".into(),
            device: crate::store::DeviceInfo {
                id: device,
                token: format!("{device:064x}"),
                environment: env,
            },
            notification: std::sync::Arc::new(crate::store::NotificationInfo {
                app: app.into(),
                ext_id: "n".into(),
                payload: bytes::Bytes::new(),
                push_type: crate::model::PushType::Alert,
                priority: 10,
                topic: "t".into(),
                collapse_id: None,
                expiration: None,
            }),
        }
    }

    fn cfg() -> SenderConfig {
        SenderConfig {
            bad_token_burst: 5,
            ..SenderConfig::default()
        }
    }

    #[test]
    fn a_lone_bad_token_is_held_then_invalidated() {
        let mut g = Guards::new(&cfg());
        g.hold = Duration::from_millis(100);
        for _ in 0..10 {
            g.success("a", Environment::Production);
        }
        assert!(matches!(
            g.bad_device_token(
                &claimed("a", Environment::Production, 70, 7),
                "BadDeviceToken",
                1.0
            ),
            BadTokenVerdict::Hold
        ));
        assert!(g.release_due().released.is_empty(), "held first");
        std::thread::sleep(Duration::from_millis(150));
        let r = g.release_due().released;
        assert_eq!(r.len(), 1);
        assert!(matches!(
            r[0].kind,
            ResultKind::InvalidToken { status: 400, .. }
        ));
        assert_eq!(g.paused_until("a", Environment::Production), None);
    }

    /// An answer during a pause proves nothing about its device: it waits for the pause to
    /// end. A held answer whose hold ends during a pause goes back to the queue too.
    #[test]
    fn answers_during_a_pause_invalidate_nothing() {
        let mut g = Guards::new(&cfg());
        g.hold = Duration::from_millis(50);
        let env = Environment::Production;
        for _ in 0..10 {
            g.success("a", env);
        }
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 1, 1), "BadDeviceToken", 1.0),
            BadTokenVerdict::Hold
        ));
        let (until, _) = g.pause("a", env, "credentials", MAX_PAUSE_MS);
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 2, 2), "BadDeviceToken", 1.0),
            BadTokenVerdict::Paused { until_ms } if until_ms == until
        ));
        std::thread::sleep(Duration::from_millis(80));
        let r = g.release_due().released;
        assert_eq!(r.len(), 1);
        assert!(
            matches!(r[0].kind, ResultKind::Retry { due_at_ms, count_attempt: false, .. } if due_at_ms == until),
            "{:?}",
            r[0].kind
        );
    }

    /// `bad_token_burst` dead devices among many accepted pushes are dead devices; as a
    /// tenth of the answers they are a burst. Judged when the hold ends, on every answer
    /// of the window: dead tokens that answer first are no burst when the pushes after them
    /// go through.
    #[test]
    fn a_few_dead_tokens_among_many_good_are_no_burst() {
        // The default `bad_token_burst` (20): 25 is well under the 100 that pause at once.
        let mut g = Guards::new(&SenderConfig::default());
        g.hold = Duration::from_millis(30);
        let env = Environment::Production;
        for d in 0..25 {
            assert!(
                matches!(
                    g.bad_device_token(&claimed("big", env, d, d), "BadDeviceToken", 1.0),
                    BadTokenVerdict::Hold
                ),
                "device {d}: the first answers"
            );
        }
        for _ in 0..5000 {
            g.success("big", env);
        }
        // The twentieth dead device among 180 accepted pushes is a tenth of the answers.
        for _ in 0..180 {
            g.success("mid", env);
        }
        for d in 0..20 {
            assert!(matches!(
                g.bad_device_token(&claimed("mid", env, d, d), "BadDeviceToken", 1.0),
                BadTokenVerdict::Hold
            ));
        }
        std::thread::sleep(Duration::from_millis(40));
        let due = g.release_due();
        assert_eq!(due.bursts, vec![("mid".to_string(), env)]);
        let invalid = |app: &str| {
            due.released
                .iter()
                .filter(|r| r.delivery.notification.app == app)
                .filter(|r| matches!(r.kind, ResultKind::InvalidToken { .. }))
                .count()
        };
        assert_eq!(invalid("big"), 25);
        assert_eq!(invalid("mid"), 0);
        assert!(g.paused_until("mid", env).is_some());
        assert!(g.paused_until("big", env).is_none());
    }

    /// In a small app, a few dead devices are dead devices once a push of the app and
    /// environment was accepted (its config is right), even when they outnumber the accepted
    /// pushes; before that, they are a burst.
    #[test]
    fn a_few_dead_devices_of_a_small_app_whose_config_works_are_invalidated() {
        let mut g = Guards::new(&cfg());
        g.hold = Duration::from_millis(30);
        let env = Environment::Production;
        g.success("small", env);
        for d in 1..=3 {
            for app in ["small", "unproven"] {
                assert!(matches!(
                    g.bad_device_token(&claimed(app, env, d, d), "BadDeviceToken", 1.0),
                    BadTokenVerdict::Hold
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(40));
        let due = g.release_due();
        assert_eq!(due.bursts, vec![("unproven".to_string(), env)]);
        let invalid: Vec<i64> = due
            .released
            .iter()
            .filter(|r| r.delivery.notification.app == "small")
            .filter(|r| matches!(r.kind, ResultKind::InvalidToken { status: 400, .. }))
            .map(|r| r.delivery.device.id)
            .collect();
        assert_eq!(invalid, [1, 2, 3]);
        assert_eq!(g.paused_until("small", env), None);
    }

    #[test]
    fn a_burst_pauses_and_invalidates_nothing() {
        let mut g = Guards::new(&cfg());
        g.hold = Duration::from_millis(30);
        let env = Environment::Sandbox;
        for (device, delivery) in [(10, 1), (20, 2), (20, 9), (30, 3)] {
            // The same device twice is no new evidence.
            assert!(matches!(
                g.bad_device_token(&claimed("a", env, device, delivery), "BadDeviceToken", 1.0),
                BadTokenVerdict::Hold
            ));
        }
        std::thread::sleep(Duration::from_millis(40));
        let due = g.release_due();
        assert_eq!(
            due.bursts,
            vec![("a".to_string(), env)],
            "3 of 3 answers bad"
        );
        assert_eq!(due.released.len(), 4);
        assert!(due.released.iter().all(|r| matches!(
            r.kind,
            ResultKind::Retry {
                count_attempt: false,
                ..
            }
        )));
        assert!(g.paused_until("a", env).is_some());
        // A straggler of the same round, answering after the burst, waits for the pause.
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 40, 4), "BadDeviceToken", 1.0),
            BadTokenVerdict::Paused { .. }
        ));
        assert_eq!(g.paused_until("a", Environment::Production), None);
        assert!(g.release_due().released.is_empty());
    }

    /// A wrong environment refuses every request: `5 × bad_token_burst` devices refused and
    /// none accepted is a burst at once, before the hold lets more requests go out.
    #[test]
    fn overwhelming_refusals_pause_at_once() {
        let g = Guards::new(&cfg());
        let env = Environment::Production;
        let verdicts: Vec<bool> = (0..30)
            .map(|d| {
                matches!(
                    g.bad_device_token(&claimed("a", env, d, d), "BadDeviceToken", 1.0),
                    BadTokenVerdict::Burst { .. }
                )
            })
            .collect();
        assert_eq!(verdicts.iter().position(|b| *b), Some(24), "{verdicts:?}");
        // One accepted push before them, and the hold decides instead.
        g.success("b", env);
        assert!((0..30).all(|d| matches!(
            g.bad_device_token(&claimed("b", env, d, d), "BadDeviceToken", 1.0),
            BadTokenVerdict::Hold
        )));
    }

    /// After a burst, until a 200, one request at a time goes out (a probe); the others wait
    /// for its answer, and a refused probe pauses again.
    #[test]
    fn after_a_burst_one_request_at_a_time_goes_out_until_a_success() {
        let mut g = Guards {
            pause_base_ms: 100,
            ..Guards::new(&cfg())
        };
        g.hold = Duration::from_millis(10);
        let (env, other) = (Environment::Production, Environment::Sandbox);
        assert_eq!(g.admit("a", env), Admit::Go, "no doubt before a burst");
        for device in 1..=3 {
            g.bad_device_token(&claimed("a", env, device, device), "BadDeviceToken", 1.0);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.release_due().bursts.len(), 1);
        assert_eq!(g.admit("a", env), Admit::Wait, "no probe during the pause");
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(g.admit("a", env), Admit::Probe);
        assert_eq!(g.admit("a", env), Admit::Wait, "one probe at a time");
        assert_eq!(
            g.admit("a", other),
            Admit::Go,
            "the other environment is no suspect"
        );
        assert_eq!(g.admit("b", env), Admit::Go, "nor is another app");
        // An answer that says nothing (a 503): the next request is the next probe.
        g.probe_answered("a", env);
        assert_eq!(g.admit("a", env), Admit::Probe);
        // A refused probe is the burst again: paused, and probed again after the pause.
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 4, 4), "BadDeviceToken", 1.0),
            BadTokenVerdict::Burst { .. }
        ));
        assert_eq!(g.admit("a", env), Admit::Wait, "no probe during the pause");
        g.probe_answered("a", env);
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(g.admit("a", env), Admit::Probe);
        // A 200 ends the doubt: full speed.
        g.success("a", env);
        assert_eq!(g.admit("a", env), Admit::Go);
        assert_eq!(g.admit("a", env), Admit::Go);
        // A start after a run that stopped during a burst begins with a probe.
        let restarted = Guards::new(&cfg());
        restarted.suspect("a", env);
        assert_eq!(restarted.admit("a", env), Admit::Probe);
        assert_eq!(restarted.admit("a", env), Admit::Wait);
    }

    /// After a burst, until a 200 shows the config is right, a `BadDeviceToken` is more of
    /// the burst however long after it: it pauses again, and invalidates nothing.
    #[test]
    fn after_a_burst_a_late_bad_token_pauses_again_until_a_success() {
        let mut g = Guards {
            pause_base_ms: 1,
            ..Guards::new(&cfg())
        };
        g.hold = Duration::from_millis(10);
        let env = Environment::Production;
        for (device, delivery) in [(1, 1), (2, 2), (3, 3)] {
            assert!(matches!(
                g.bad_device_token(&claimed("a", env, device, delivery), "BadDeviceToken", 1.0),
                BadTokenVerdict::Hold
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.release_due().bursts.len(), 1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(g.paused_until("a", env), None, "the 1 ms pause is over");
        // One device alone, after the pause: still the burst.
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 3, 4), "BadDeviceToken", 1.0),
            BadTokenVerdict::Burst { .. }
        ));
        std::thread::sleep(Duration::from_millis(5));
        // A 200 clears the doubt: a lone answer after it is a dead device again.
        g.success("a", env);
        assert!(matches!(
            g.bad_device_token(&claimed("a", env, 4, 5), "BadDeviceToken", 1.0),
            BadTokenVerdict::Hold
        ));
        // A start after a run that stopped during a burst begins in doubt.
        let restarted = Guards::new(&cfg());
        restarted.suspect("a", env);
        assert!(matches!(
            restarted.bad_device_token(&claimed("a", env, 3, 6), "BadDeviceToken", 1.0),
            BadTokenVerdict::Burst { .. }
        ));
    }

    /// With nothing left to send, a burst's pause whose time is up ends (its dead tokens were
    /// unregistered); a credentials or unreachable one stays until a push goes through.
    #[test]
    fn only_a_bursts_pause_lapses_when_idle() {
        let g = Guards {
            pause_base_ms: 1,
            ..Guards::new(&cfg())
        };
        let env = Environment::Production;
        g.pause("burst", env, BURST, MAX_PAUSE_MS);
        g.pause("key", env, "credentials", MAX_PAUSE_MS);
        g.pause("net", env, "unreachable", MAX_PAUSE_MS);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(g.lapse_idle(), vec![("burst".to_string(), env)]);
        assert_eq!(g.pauses.lock().unwrap().len(), 2);
        assert!(g.success("key", env), "a 200 ends it");
        assert!(g.lapse_idle().is_empty());
    }

    #[test]
    fn pauses_double() {
        let g = Guards {
            pause_base_ms: 1,
            ..Guards::new(&cfg())
        };
        let (a, new) = g.pause("a", Environment::Production, "credentials", MAX_PAUSE_MS);
        assert!(new);
        assert!(g.first_pause("a", Environment::Production));
        let (b, again) = g.pause("a", Environment::Production, "credentials", MAX_PAUSE_MS);
        assert!(!again);
        assert_eq!(a, b);
        std::thread::sleep(Duration::from_millis(5));
        let (_, new2) = g.pause("a", Environment::Production, "credentials", MAX_PAUSE_MS);
        assert!(new2);
        let level = g.pauses.lock().unwrap()[&("a".to_string(), Environment::Production)].level;
        assert_eq!(level, 1);
        // A re-pause is the same incident: `status` lists the first only.
        assert!(!g.first_pause("a", Environment::Production));
        assert!(
            g.first_pause("a", Environment::Sandbox),
            "not paused at all"
        );
    }
}
