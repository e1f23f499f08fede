//! Shares of the window per app and environment, so that an APNs host that takes requests
//! and never answers cannot hold all of `max_in_flight` until `request_timeout_ms`.
//!
//! A flow is one app and environment: one APNs host, one connection pool. It is *answering*
//! while an answer (any HTTP status) came from it within [`ANSWERING`], and may then use the
//! whole window. A flow that is not (idle for a while, just connected, or silent with requests
//! out) may have at most a share of the window in flight ([`Flows::new`]: an eighth) until it
//! answers. Apple answers within milliseconds, so a healthy host proves itself within one
//! round trip and the cost is a pause of that long in a burst's ramp; a hung host holds its
//! share while the rest of the window serves the other flows.
//!
//! Deliveries beyond the share wait in the sender's memory (*parked*) for up to
//! [`PARK_LIMIT`]. A flow still silent then is *stuck*: its deliveries go back to the queue,
//! unsent and their attempts not counted, until its requests' timeout, when the requests out
//! end (and the pause for an unreachable APNs takes over, see the sender).
//!
//! Known limit: a flow that was answering and then hangs with the whole window out holds it
//! until those requests time out; this guards the start of every silence, not its middle.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Environment;
use crate::model::now_ms;

/// How recent a flow's last answer must be for it to use the whole window.
const ANSWERING: Duration = Duration::from_secs(1);
/// How long deliveries beyond a silent flow's share wait in memory for its first answer
/// before they go back to the queue: longer than any round trip of a working host.
pub const PARK_LIMIT: Duration = Duration::from_secs(2);
/// The longest a stuck flow's delivery goes back to the queue for at a time (less when its
/// requests out time out sooner): a host that answers again is used again soon.
const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// What to do with a delivery that has a slot in the window.
#[derive(Debug, PartialEq, Eq)]
pub enum FlowAdmit {
    /// Send it; [`Flows::done`] must follow.
    Go,
    /// Its flow has its share out and no answer yet: keep it in memory a moment.
    Park,
    /// Its flow is stuck: back to the queue until `until_ms`. `announce` is set for the
    /// first such delivery of a silence: (requests out, silent for).
    Hold {
        until_ms: i64,
        announce: Option<(u32, Duration)>,
    },
}

#[derive(Default)]
struct Flow {
    in_flight: u32,
    last_answer: Option<Instant>,
    /// The later of the last answer and the moment the flow's requests out went from none
    /// to one: how long it has had requests out and heard nothing.
    silent_since: Option<Instant>,
    /// Deliveries parked for it (the main loop's count, so that an answer knows whether
    /// anyone waits for it).
    parked: u32,
    /// The current silence was logged.
    announced: bool,
}

impl Flow {
    fn answering(&self, now: Instant) -> bool {
        self.last_answer
            .is_some_and(|t| now.saturating_duration_since(t) < ANSWERING)
    }
}

/// The flows' counts. One short lock per delivery start and end.
pub struct Flows {
    flows: Mutex<HashMap<String, [Flow; 2]>>,
    share: u32,
    request_timeout: Duration,
    /// Woken when a flow with parked deliveries may take them.
    pub changed: tokio::sync::Notify,
}

fn env_index(env: Environment) -> usize {
    match env {
        Environment::Production => 0,
        Environment::Sandbox => 1,
    }
}

impl Flows {
    pub fn new(max_in_flight: usize, request_timeout: Duration) -> Flows {
        Flows {
            flows: Mutex::new(HashMap::new()),
            share: (max_in_flight / 8).max(1) as u32,
            request_timeout,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether a delivery of `app` and `env` may go out now (see the module's comment).
    pub fn admit(&self, app: &str, env: Environment) -> FlowAdmit {
        self.admit_at(app, env, Instant::now())
    }

    fn admit_at(&self, app: &str, env: Environment, now: Instant) -> FlowAdmit {
        let Ok(mut flows) = self.flows.lock() else {
            return FlowAdmit::Go;
        };
        if !flows.contains_key(app) {
            flows.insert(app.to_string(), Default::default());
        }
        let Some(pair) = flows.get_mut(app) else {
            return FlowAdmit::Go;
        };
        let f = &mut pair[env_index(env)];
        if f.in_flight < self.share || f.answering(now) {
            if f.in_flight == 0 {
                f.silent_since = Some(now);
            }
            f.in_flight += 1;
            return FlowAdmit::Go;
        }
        let since = f.silent_since.unwrap_or(now);
        let silent = now.saturating_duration_since(since);
        if silent < PARK_LIMIT {
            f.parked += 1;
            return FlowAdmit::Park;
        }
        // Until the requests out time out, within bounds.
        let wait = (self.request_timeout.saturating_sub(silent)).clamp(PARK_LIMIT, HOLD_LIMIT);
        let announce = (!f.announced).then_some((f.in_flight, silent));
        f.announced = true;
        FlowAdmit::Hold {
            until_ms: now_ms() + wait.as_millis() as i64,
            announce,
        }
    }

    /// A request admitted by [`Flows::admit`] ended; `answered`: APNs gave an HTTP answer
    /// (any status), not a timeout, reset or refusal to connect.
    pub fn done(&self, app: &str, env: Environment, answered: bool) {
        let now = Instant::now();
        let wake = {
            let Ok(mut flows) = self.flows.lock() else {
                return;
            };
            let Some(pair) = flows.get_mut(app) else {
                return;
            };
            let f = &mut pair[env_index(env)];
            f.in_flight = f.in_flight.saturating_sub(1);
            if answered {
                let was_answering = f.answering(now);
                f.last_answer = Some(now);
                f.silent_since = Some(now);
                f.announced = false;
                f.parked > 0 && !was_answering
            } else {
                f.parked > 0 && f.in_flight < self.share
            }
        };
        if wake {
            self.changed.notify_one();
        }
    }

    /// The main loop took every parked delivery back to be admitted again.
    pub fn unpark_all(&self) {
        if let Ok(mut flows) = self.flows.lock() {
            for f in flows.values_mut().flat_map(|pair| pair.iter_mut()) {
                f.parked = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Environment = Environment::Production;
    const S: Environment = Environment::Sandbox;

    #[test]
    fn a_silent_flow_gets_its_share_then_parks_then_holds() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(flows.admit_at("a", P, t0), FlowAdmit::Go);
        }
        assert_eq!(flows.admit_at("a", P, t0), FlowAdmit::Park);
        // The other environment and another app have their own shares.
        assert_eq!(flows.admit_at("a", S, t0), FlowAdmit::Go);
        assert_eq!(flows.admit_at("b", P, t0), FlowAdmit::Go);
        let later = t0 + PARK_LIMIT + Duration::from_millis(1);
        let FlowAdmit::Hold { until_ms, announce } = flows.admit_at("a", P, later) else {
            panic!("a flow silent past the park limit holds");
        };
        assert_eq!(announce.map(|(n, _)| n), Some(2));
        let wait = until_ms - now_ms();
        assert!((4_000..=5_000).contains(&wait), "held for {wait} ms");
        let FlowAdmit::Hold { announce, .. } = flows.admit_at("a", P, later) else {
            panic!("still stuck");
        };
        assert_eq!(announce, None, "a silence is announced once");
    }

    #[test]
    fn an_answer_opens_the_whole_window_and_wakes_the_parked() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        flows.admit_at("a", P, t0);
        flows.admit_at("a", P, t0);
        assert_eq!(flows.admit_at("a", P, t0), FlowAdmit::Park);
        flows.done("a", P, true);
        // The stored wake-up is there for the main loop.
        let woken = flows.changed.notified();
        futures_ready(woken);
        flows.unpark_all();
        for _ in 0..20 {
            assert_eq!(flows.admit("a", P), FlowAdmit::Go);
        }
    }

    #[test]
    fn a_request_that_ends_unanswered_frees_its_share_only() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        flows.admit_at("a", P, t0);
        flows.admit_at("a", P, t0);
        flows.done("a", P, false);
        assert_eq!(flows.admit_at("a", P, t0), FlowAdmit::Go);
        assert_eq!(flows.admit_at("a", P, t0), FlowAdmit::Park);
    }

    /// Polls `f` once: a `Notify` with a stored permit is ready at once.
    fn futures_ready(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), f)
                .await
                .expect("woken")
        });
    }
}
