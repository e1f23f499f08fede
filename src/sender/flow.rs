//! Shares of the window per app and environment, so that an APNs host that takes requests
//! and never answers cannot hold all of `max_in_flight` until `request_timeout_ms`.
//!
//! A flow is one app and environment: one APNs host, one connection pool. It is *answering*
//! while an answer (any HTTP status) came from it lately (within a second, or twice its
//! usual answer time if that is longer) and since its requests out began, and may then use
//! the whole window. A flow that is not (idle, even for a moment, just connected, or silent
//! with requests out) may have at most a share of the window in flight ([`Flows::new`]: an
//! eighth) until it answers; deliveries that waited for that answer go on from it. Apple
//! answers within milliseconds, so a healthy host proves itself within one round trip and
//! the cost is a pause of that long in a burst's ramp; a hung host holds its share while the
//! rest of the window serves the other flows.
//!
//! Deliveries beyond the share wait in the sender's memory (*parked*) until the flow answers.
//! While many are parked and the flow has waited longer than a healthy host takes
//! ([`CROWDED_AFTER`]), more of its deliveries go back to the queue for a moment
//! ([`CROWDED_HOLD`]) instead, so that the claims go on and reach the other flows' work.
//! A flow silent for [`PARK_LIMIT`] (or three times its usual answer time) is *stuck*: its
//! deliveries go back to the queue, unsent and their attempts not counted, until its
//! requests' timeout; once those end unanswered, it gets one request at a time, each
//! [`PROBE_GAP`] or more after the last ended unanswered, until one is answered (and the pause
//! for an unreachable APNs takes over, see the sender). The deliveries behind a try park for
//! its answer (up to [`PARK_LIMIT`]); those that come between tries go back to the queue until
//! the next try may go.
//!
//! Known limit: a flow that was answering and then hangs with the whole window out holds it
//! until those requests time out; this guards the start of every silence, not its middle.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::guard::env_index;
use crate::config::Environment;
use crate::model::now_ms;

/// How recent a flow's last answer must be (at least) for it to use the whole window.
const ANSWERING: Duration = Duration::from_secs(1);
/// How long a silent flow's deliveries may wait in memory for its first answer (at least)
/// before it counts as stuck: longer than a working host's round trip.
pub const PARK_LIMIT: Duration = Duration::from_secs(2);
/// The longest a stuck flow's delivery goes back to the queue for at a time (less when its
/// requests out time out sooner): a host that answers again is used again soon.
const HOLD_LIMIT: Duration = Duration::from_secs(5);
/// How long a silent flow's delivery goes back to the queue when too many of its deliveries
/// are parked already.
const CROWDED_HOLD: Duration = Duration::from_millis(250);
/// How long a flow must have waited for an answer (at least; twice its usual answer time if
/// that is longer) before its excess goes back to the queue rather than park: a healthy host
/// answers within this, and its deliveries held for [`CROWDED_HOLD`] would leave its window
/// empty (a probe's finding: a window of 16 against a 20 ms host locked into 130 deliveries
/// every 250 ms, 515/s of 800).
const CROWDED_AFTER: Duration = Duration::from_millis(100);
/// How soon after an answer a flow's next request must go out for the answer to count for
/// it: the deliveries that waited for that answer (parked) go out within this, and a flow
/// held to one request at a time (a small window's share) keeps the window it proved.
const CONTINUE_WITHIN: Duration = Duration::from_millis(100);
/// After a stuck flow's request ends unanswered, how long before it may try again: the
/// window is free meanwhile for the other flows (with `max_in_flight = 1`, a stuck host
/// would otherwise hold the only slot from one timeout to the next).
const PROBE_GAP: Duration = Duration::from_secs(1);

/// The shortest hold: its end must lie ahead.
const MIN_HOLD: Duration = Duration::from_millis(1);

/// What to do with a delivery that has a slot in the window.
#[derive(Debug, PartialEq, Eq)]
pub enum FlowAdmit {
    /// Send it; [`Flows::done`] must follow.
    Go,
    /// Its flow has its share out and no answer yet: keep it in memory a moment.
    Park,
    /// Back to the queue until `until_ms`: its flow is stuck, or has enough parked already.
    /// `announce` is set for the first such delivery of a stuck flow's silence: (requests
    /// waiting for an answer, silent for).
    Hold {
        until_ms: i64,
        announce: Option<(u32, Duration)>,
    },
}

struct Flow {
    in_flight: u32,
    last_answer: Option<Instant>,
    /// Since when the flow has had requests out and heard nothing: its last answer, or the
    /// moment a request went out after the ones before it were all answered.
    silent_since: Option<Instant>,
    /// Whether the last request that ended was answered (not a timeout, reset or refused
    /// connection): a flow whose requests end unanswered stays silent across them.
    last_end_answered: bool,
    /// A running average of its answers' times, so that a host slow by nature (far away,
    /// behind a proxy) is not taken for a stuck one.
    answer_time: Option<Duration>,
    /// Deliveries parked for it (the main loop's count, so that an answer knows whether
    /// anyone waits for it).
    parked: u32,
    /// When an answer came while deliveries of the flow were parked: the requests that follow
    /// it at once continue the answered ones, not a new start after a quiet moment.
    answered_with_parked: Option<Instant>,
    /// When a request last ended unanswered (a timeout, a reset).
    unanswered_at: Option<Instant>,
    /// When the last request of a stuck flow (one at a time) went out: a silence counts from
    /// it, not from before an idle stretch, and the pushes behind it wait for its answer.
    tried_at: Option<Instant>,
    /// The current silence was logged: since when it had lasted, as said then. Its end is
    /// said from there (a probe's finding: timed from the one push tried last, a 5 s silence
    /// "ended after 1 ms").
    announced: Option<Instant>,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            in_flight: 0,
            last_answer: None,
            silent_since: None,
            last_end_answered: true,
            answer_time: None,
            parked: 0,
            answered_with_parked: None,
            unanswered_at: None,
            tried_at: None,
            announced: None,
        }
    }
}

impl Flow {
    /// (how recent an answer keeps it answering, how long a silence makes it stuck).
    fn limits(&self, request_timeout: Duration) -> (Duration, Duration) {
        let usual = self.answer_time.unwrap_or(Duration::ZERO);
        (
            ANSWERING.max(usual * 2),
            PARK_LIMIT.max((usual * 3).min(request_timeout)),
        )
    }

    /// Since when the flow has waited for the answer it lacks: its silence, or, while it is
    /// tried one request at a time after requests ended unanswered, the try out now (an idle
    /// stretch between is no silence of the host's).
    fn waiting_since(&self) -> Option<Instant> {
        match (self.silent_since, self.tried_at) {
            (Some(s), Some(t)) if !self.last_end_answered => Some(s.max(t)),
            (s, _) => s,
        }
    }

    /// Answered lately, and since its requests out began: a flow that goes quiet and then
    /// gets new work proves itself again (a probe's finding: a host that answered half a
    /// second before it hung took the whole window for a broadcast).
    fn answering(&self, now: Instant, request_timeout: Duration) -> bool {
        let (within, _) = self.limits(request_timeout);
        self.last_answer.is_some_and(|t| {
            now.saturating_duration_since(t) < within && self.silent_since.is_none_or(|s| t >= s)
        })
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
    /// `crowded`: the sender holds as many parked deliveries as it keeps.
    pub fn admit(&self, app: &str, env: Environment, crowded: bool) -> FlowAdmit {
        self.admit_at(app, env, crowded, Instant::now())
    }

    fn admit_at(&self, app: &str, env: Environment, crowded: bool, now: Instant) -> FlowAdmit {
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
        if f.in_flight == 0 && f.last_end_answered {
            // New work after the flow's requests were all answered starts a new wait for an
            // answer, unless this work was waiting for the last answer (see `CONTINUE_WITHIN`).
            let continues = f
                .answered_with_parked
                .take()
                .is_some_and(|t| now.saturating_duration_since(t) < CONTINUE_WITHIN);
            if !continues {
                f.silent_since = Some(now);
            }
        }
        let since = *f.silent_since.get_or_insert(now);
        let silent = now.saturating_duration_since(since);
        let (_, stuck_after) = f.limits(self.request_timeout);
        let stuck = silent >= stuck_after;
        // Requests ending unanswered for that long: one at a time finds out whether it is
        // back, rather than a share's worth spending their attempts on timeouts.
        // Right after such a try ended unanswered, none: the others have the window a moment.
        let trying = stuck && !f.last_end_answered;
        let cap = if trying {
            let just_tried = f
                .unanswered_at
                .is_some_and(|t| now.saturating_duration_since(t) < PROBE_GAP);
            u32::from(!just_tried)
        } else {
            self.share
        };
        if f.in_flight < cap || f.answering(now, self.request_timeout) {
            f.in_flight += 1;
            if trying {
                f.tried_at = Some(now);
            }
            return FlowAdmit::Go;
        }
        // How long the requests out have waited for an answer.
        let waited = f
            .waiting_since()
            .map_or(silent, |t| now.saturating_duration_since(t));
        if trying && f.in_flight > 0 && waited < stuck_after && !crowded {
            // A try is out (after an idle stretch, perhaps, when new work came): the pushes
            // behind it wait for its answer in memory, not for a hold (a probe's finding: a
            // healthy answer in 1 ms, and the burst behind it went out 2 s later).
            f.parked += 1;
            return FlowAdmit::Park;
        }
        if stuck {
            let wait = match f.unanswered_at {
                // Between tries (none out, the last ended unanswered a moment ago): until the
                // next may go, not longer (a probe's finding: a push that came within the gap
                // was held 2 s, though the host answered it at once when it went).
                Some(t) if trying && f.in_flight == 0 => {
                    (t + PROBE_GAP).saturating_duration_since(now).max(MIN_HOLD)
                }
                // Until the requests out time out, within bounds.
                _ => (self.request_timeout.saturating_sub(waited)).clamp(PARK_LIMIT, HOLD_LIMIT),
            };
            let announce = f.announced.is_none().then_some((f.in_flight, waited));
            f.announced
                .get_or_insert(now.checked_sub(waited).unwrap_or(now));
            return FlowAdmit::Hold {
                until_ms: now_ms() + wait.as_millis() as i64,
                announce,
            };
        }
        let usual = f.answer_time.unwrap_or(Duration::ZERO);
        if crowded && silent >= CROWDED_AFTER.max(usual * 2) {
            return FlowAdmit::Hold {
                until_ms: now_ms() + CROWDED_HOLD.as_millis() as i64,
                announce: None,
            };
        }
        f.parked += 1;
        FlowAdmit::Park
    }

    /// A request admitted by [`Flows::admit`] ended after `took`; `answered`: APNs gave an
    /// HTTP answer (any status), not a timeout, reset or refusal to connect. Returns how
    /// long the flow had been silent when this answer ends a silence that was said (see
    /// [`Flows::overdue`]): an operator who read "no answer" should read that it answers
    /// again.
    pub fn done(
        &self,
        app: &str,
        env: Environment,
        answered: bool,
        took: Duration,
    ) -> Option<Duration> {
        self.done_at(app, env, answered, took, Instant::now())
    }

    fn done_at(
        &self,
        app: &str,
        env: Environment,
        answered: bool,
        took: Duration,
        now: Instant,
    ) -> Option<Duration> {
        let mut ended_silence = None;
        let wake = {
            let Ok(mut flows) = self.flows.lock() else {
                return None;
            };
            let pair = flows.get_mut(app)?;
            let f = &mut pair[env_index(env)];
            f.in_flight = f.in_flight.saturating_sub(1);
            f.last_end_answered = answered;
            if answered {
                let was_answering = f.answering(now, self.request_timeout);
                // An eighth of each new answer time: steady, yet a change shows within a
                // few dozen answers.
                f.answer_time = Some(match f.answer_time {
                    Some(avg) => (avg * 7 + took) / 8,
                    None => took,
                });
                if let Some(since) = f.announced {
                    ended_silence = Some(now.saturating_duration_since(since));
                }
                f.last_answer = Some(now);
                f.silent_since = Some(now);
                f.announced = None;
                f.answered_with_parked = (f.parked > 0).then_some(now);
                f.parked > 0 && !was_answering
            } else {
                f.unanswered_at = Some(now);
                f.parked > 0 && f.in_flight < self.share
            }
        };
        if wake {
            self.changed.notify_one();
        }
        ended_silence
    }

    /// The flows silent with requests out for as long as makes them stuck and not yet said:
    /// (app, environment, requests out, silent for), each marked as said. For when the
    /// window is full and no admission comes to find them (a host that hung in the middle of
    /// a busy stretch, holding the whole window).
    pub fn overdue(&self) -> Vec<(String, Environment, u32, Duration)> {
        self.overdue_at(Instant::now())
    }

    fn overdue_at(&self, now: Instant) -> Vec<(String, Environment, u32, Duration)> {
        let Ok(mut flows) = self.flows.lock() else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (app, pair) in flows.iter_mut() {
            for (f, env) in pair
                .iter_mut()
                .zip([Environment::Production, Environment::Sandbox])
            {
                let Some(since) = f.waiting_since() else {
                    continue;
                };
                let silent = now.saturating_duration_since(since);
                if f.in_flight > 0
                    && f.announced.is_none()
                    && silent >= f.limits(self.request_timeout).1
                {
                    f.announced = Some(since);
                    found.push((app.clone(), env, f.in_flight, silent));
                }
            }
        }
        found
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
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_silent_flow_gets_its_share_then_parks_then_holds() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
        }
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Park);
        // The other environment and another app have their own shares.
        assert_eq!(flows.admit_at("a", S, false, t0), FlowAdmit::Go);
        assert_eq!(flows.admit_at("b", P, false, t0), FlowAdmit::Go);
        // Too many parked already, but the flow has waited less than a healthy host takes:
        // parked all the same, so that its answer finds them (a probe's finding: held, they
        // left a healthy host's window empty for 250 ms in every cycle).
        assert_eq!(flows.admit_at("a", P, true, t0 + 50 * MS), FlowAdmit::Park);
        // Waited longer: back to the queue for a moment, so the claims go on.
        let waited = t0 + CROWDED_AFTER;
        let FlowAdmit::Hold { until_ms, announce } = flows.admit_at("a", P, true, waited) else {
            panic!("a crowded park holds");
        };
        assert!(until_ms - now_ms() <= 250 && announce.is_none());
        let later = t0 + PARK_LIMIT + MS;
        let FlowAdmit::Hold { until_ms, announce } = flows.admit_at("a", P, false, later) else {
            panic!("a flow silent past the park limit holds");
        };
        assert_eq!(announce.map(|(n, _)| n), Some(2));
        let wait = until_ms - now_ms();
        assert!((4_000..=5_000).contains(&wait), "held for {wait} ms");
        let FlowAdmit::Hold { announce, .. } = flows.admit_at("a", P, false, later) else {
            panic!("still stuck");
        };
        assert_eq!(announce, None, "a silence is announced once");
    }

    #[test]
    fn an_answer_opens_the_whole_window_and_wakes_the_parked() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        flows.admit_at("a", P, false, t0);
        flows.admit_at("a", P, false, t0);
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Park);
        flows.done("a", P, true, 5 * MS);
        // The stored wake-up is there for the main loop.
        futures_ready(flows.changed.notified());
        flows.unpark_all();
        for _ in 0..20 {
            assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        }
    }

    /// A flow whose requests were all answered and that gets new work a moment later has its
    /// share, not the whole window, until an answer to the new work comes.
    #[test]
    fn new_work_after_a_quiet_moment_waits_for_a_new_answer() {
        let flows = Flows::new(16, Duration::from_secs(10));
        flows.admit("a", P, false);
        flows.done("a", P, true, 5 * MS);
        std::thread::sleep(2 * MS);
        assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        assert_eq!(flows.admit("a", P, false), FlowAdmit::Park);
        flows.done("a", P, true, 5 * MS);
        for _ in 0..14 {
            assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        }
    }

    /// With a small window the share is one request; the answer to it must open the whole
    /// window for the deliveries that waited for it (a probe's finding: windows of 2 to 15
    /// sent one request at a time, 46/s to a host answering in 20 ms).
    #[test]
    fn a_one_request_share_widens_once_its_flow_answers() {
        let flows = Flows::new(8, Duration::from_secs(10));
        assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        for _ in 0..7 {
            assert_eq!(flows.admit("a", P, false), FlowAdmit::Park);
        }
        flows.done("a", P, true, 20 * MS);
        futures_ready(flows.changed.notified());
        flows.unpark_all();
        for _ in 0..7 {
            assert_eq!(flows.admit("a", P, false), FlowAdmit::Go);
        }
    }

    /// A stuck flow's try that ended unanswered leaves the window to the others for a moment
    /// before the next try (a probe's finding: with `max_in_flight = 1`, a hung host took the
    /// only slot for ten timeouts in a row, and the healthy app waited 127 s).
    #[test]
    fn a_stuck_flow_leaves_the_window_between_its_tries() {
        let flows = Flows::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
        let timed_out = t0 + Duration::from_secs(10);
        flows.done_at("a", P, false, Duration::from_secs(10), timed_out);
        let FlowAdmit::Hold { until_ms, announce } = flows.admit_at("a", P, false, timed_out + MS)
        else {
            panic!("no try right after a timeout");
        };
        // Until the next try may go, a second after the timeout (a probe's finding: it was
        // 2 s at least, though the host might answer the next try at once).
        let held = until_ms - now_ms();
        assert!((900..=1_000).contains(&held), "held for {held} ms");
        assert_eq!(announce.map(|(n, _)| n), Some(0), "said once");
        assert_eq!(flows.admit_at("b", P, false, timed_out + MS), FlowAdmit::Go);
        let a_second_on = timed_out + PROBE_GAP + MS;
        assert_eq!(flows.admit_at("a", P, false, a_second_on), FlowAdmit::Go);
        // The next waits for that try's answer in memory (no slot held), then is held.
        assert_eq!(flows.admit_at("a", P, false, a_second_on), FlowAdmit::Park);
        assert!(matches!(
            flows.admit_at("a", P, false, a_second_on + PARK_LIMIT),
            FlowAdmit::Hold { .. }
        ));
    }

    /// New work for a host whose last requests timed out, after an idle stretch: one try goes,
    /// the pushes behind it wait for its answer in memory and go at once when it comes (a
    /// probe's finding: they were held 2 s although it answered in 1 ms). A try that stays
    /// unanswered is said with its own wait, not the idle stretch before it.
    #[test]
    fn a_try_after_an_idle_stretch_holds_back_nothing_once_answered() {
        let timeout = Duration::from_secs(2);
        for answers in [true, false] {
            let flows = Flows::new(1000, timeout);
            let t0 = Instant::now();
            assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
            flows.done_at("a", P, false, timeout, t0 + timeout);
            let t1 = t0 + Duration::from_secs(7);
            assert_eq!(flows.admit_at("a", P, false, t1), FlowAdmit::Go, "the try");
            for _ in 0..4 {
                assert_eq!(flows.admit_at("a", P, false, t1 + MS), FlowAdmit::Park);
            }
            if answers {
                assert_eq!(
                    flows.done_at("a", P, true, MS, t1 + MS),
                    None,
                    "nothing said"
                );
                // Said, a silence ends as long as the try waited, not counting the idle
                // stretch before it.
                let said = Flows::new(1000, timeout);
                assert_eq!(said.admit_at("a", P, false, t0), FlowAdmit::Go);
                said.done_at("a", P, false, timeout, t0 + timeout);
                assert_eq!(said.admit_at("a", P, false, t1), FlowAdmit::Go);
                assert_eq!(said.overdue_at(t1 + PARK_LIMIT).len(), 1);
                let ended = said.done_at("a", P, true, MS, t1 + PARK_LIMIT + MS);
                assert_eq!(ended, Some(PARK_LIMIT + MS));
                flows.unpark_all();
                for _ in 0..4 {
                    assert_eq!(flows.admit_at("a", P, false, t1 + 2 * MS), FlowAdmit::Go);
                }
            } else {
                let later = t1 + PARK_LIMIT + MS;
                let FlowAdmit::Hold { announce, .. } = flows.admit_at("a", P, false, later) else {
                    panic!("held once the try is as old as a stuck host's silence");
                };
                let (out, waited) = announce.expect("said");
                assert_eq!(out, 1);
                assert!(
                    waited >= PARK_LIMIT && waited < PARK_LIMIT + 10 * MS,
                    "{waited:?}: from the try, not from the last answer 9 s before"
                );
            }
        }
    }

    /// A host that stops answering with the whole window out is found without an admission
    /// (none comes while the window is full), once per silence (a probe's finding: it was
    /// said only as the requests timed out, 10.5 s after its last answer).
    #[test]
    fn a_silence_with_the_window_out_is_found_once() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
        }
        assert!(flows.overdue_at(t0 + Duration::from_secs(1)).is_empty());
        let later = t0 + PARK_LIMIT + MS;
        let found = flows.overdue_at(later);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.as_str(), found[0].1, found[0].2), ("a", P, 2));
        assert!(found[0].3 >= PARK_LIMIT);
        assert!(flows.overdue_at(later).is_empty(), "said once");
        // An admission finds it said already.
        let FlowAdmit::Hold { announce, .. } = flows.admit_at("a", P, false, later) else {
            panic!("stuck");
        };
        assert_eq!(announce, None);
        // Its answer ends the silence that was said, once; an answer nobody waited for
        // ends none.
        let ended = flows.done_at("a", P, true, 3 * MS, later + MS);
        assert!(ended.is_some_and(|d| d >= PARK_LIMIT), "{ended:?}");
        assert_eq!(flows.done_at("a", P, true, 3 * MS, later + 2 * MS), None);
        assert_eq!(flows.admit_at("b", P, false, later), FlowAdmit::Go);
        assert_eq!(flows.done_at("b", P, true, 3 * MS, later + MS), None);
    }

    /// The end of a silence that was said counts from its start as said, not from the one
    /// push tried last (a probe's finding: a 5 s silence "ended after 1 ms").
    #[test]
    fn a_silence_ends_counted_from_its_start_not_from_the_last_try() {
        let timeout = Duration::from_secs(2);
        let flows = Flows::new(16, timeout);
        let t0 = Instant::now();
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
        assert_eq!(flows.overdue_at(t0 + PARK_LIMIT + MS).len(), 1, "said");
        flows.done_at("a", P, false, timeout, t0 + timeout);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(flows.admit_at("a", P, false, t1), FlowAdmit::Go, "a try");
        let ended = flows.done_at("a", P, true, MS, t1 + MS);
        assert_eq!(ended, Some(Duration::from_secs(5) + MS));
    }

    /// Requests that time out leave the flow silent: its next try is one request, not a
    /// share (a probe's finding: 125 more went into a host that had just let 1,000 time
    /// out).
    #[test]
    fn after_timeouts_one_request_at_a_time_tries_the_host() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        flows.admit_at("a", P, false, t0);
        flows.admit_at("a", P, false, t0);
        flows.done("a", P, false, 10_000 * MS);
        flows.done("a", P, false, 10_000 * MS);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(flows.admit_at("a", P, false, later), FlowAdmit::Go);
        // The rest wait for its answer (in memory, then back in the queue), none goes.
        assert_eq!(flows.admit_at("a", P, false, later), FlowAdmit::Park);
        assert!(matches!(
            flows.admit_at("a", P, false, later + PARK_LIMIT),
            FlowAdmit::Hold { .. }
        ));
        // Before the silence is long, a timeout frees a slot of the share as usual.
        let flows = Flows::new(16, Duration::from_secs(10));
        flows.admit_at("a", P, false, t0);
        flows.admit_at("a", P, false, t0);
        flows.done("a", P, false, 100 * MS);
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Go);
        assert_eq!(flows.admit_at("a", P, false, t0), FlowAdmit::Park);
    }

    /// A host that answers, but slowly (2.5 s here), is not taken for a stuck one once its
    /// answer time is known (a probe's finding: it was held every cycle, at a twentieth of
    /// its throughput).
    #[test]
    fn a_slow_host_that_answers_keeps_the_window() {
        let flows = Flows::new(16, Duration::from_secs(10));
        let t0 = Instant::now();
        flows.admit_at("a", P, false, t0);
        flows.admit_at("a", P, false, t0);
        // One answered, one still out (a burst's steady state).
        flows.done("a", P, true, 2500 * MS);
        // Answered a moment ago: the whole window, and 2.5 s between waves is no silence.
        let t1 = Instant::now();
        for _ in 0..15 {
            assert_eq!(flows.admit_at("a", P, false, t1), FlowAdmit::Go);
        }
        let t2 = t1 + Duration::from_millis(4000);
        assert_eq!(flows.admit_at("a", P, false, t2), FlowAdmit::Go);
        let t3 = t1 + Duration::from_millis(5500);
        assert_eq!(flows.admit_at("a", P, false, t3), FlowAdmit::Park);
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
