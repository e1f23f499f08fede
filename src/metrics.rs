//! Process-wide Prometheus metrics. One registry for the whole daemon, reachable from every
//! stage through [`get`], because threading a handle through the inbox thread, the store
//! thread and every connection task would buy nothing but noise.

use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `reason` label of a delivery outcome or a retry: one of Apple's documented reasons
/// (such as `BadDeviceToken`; the part before a `;` that pushdrop may add), or `other` for
/// anything else: pushdrop's own descriptions (connection errors, timeouts, "expired before
/// it could be sent") and what a proxy or an unknown server says (a 502's `BadGateway`),
/// whose free text would open a new time series per message; a request APNs did not answer
/// in time is `timeout` (the commonest of pushdrop's own, worth its series). The log line
/// carries the whole text.
///
/// `status` is the HTTP status the reason came with: Apple's word under a status Apple does
/// not give it with (a proxy's 502 saying `BadDeviceToken`) is not Apple's. Without one (an
/// outcome pushdrop decided unsent, such as a delivery to a device invalidated before), the
/// reason it carries over is kept.
pub fn reason_label(status: Option<u16>, reason: &str) -> &str {
    let head = reason.split(';').next().unwrap_or_default().trim();
    let apples = match status.filter(|&s| s != 0) {
        Some(s) => crate::apns::outcome::apple_reasons(s).is_some_and(|rs| rs.contains(&head)),
        None => crate::apns::outcome::is_apple_reason(head),
    };
    if apples {
        head
    } else if status.is_none() && head.starts_with(crate::apns::TIMEOUT_REASON) {
        "timeout"
    } else {
        "other"
    }
}

/// Label set of one reason (rejection reason, APNs reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Label set of a record type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Label set of a delivery outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
    pub reason: String,
}

/// Label set of a queue state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// A label value that comes from outside (an app's name in the config may hold any
/// character): written with the exposition format's escapes for `\\`, `"` and line breaks.
/// prometheus-client writes a `String` label as it is, and one unescaped quote makes the
/// whole scrape unreadable, every series lost, not just this one.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelText(pub String);

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Label set of a paused app and environment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PauseLabel {
    pub app: LabelText,
    pub environment: String,
    /// `credentials`, `unreachable` or `bad_device_token_burst`.
    pub reason: String,
}

/// Label set of a kind of database write (`commit`, `results`, `claim`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub write: String,
}

/// Every metric pushdrop exports.
pub struct Metrics {
    pub files_ingested: Counter,
    pub files_rejected: Family<ReasonLabel, Counter>,
    pub records_ingested: Family<TypeLabel, Counter>,
    pub duplicates: Counter,
    pub deliveries: Family<OutcomeLabel, Counter>,
    pub retries: Family<ReasonLabel, Counter>,
    pub queue_depth: Family<StateLabel, Gauge>,
    pub oldest_queued_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub send_latency_seconds: Histogram,
    pub connections_open: Gauge,
    pub reconnects: Counter,
    pub jwt_refreshes: Counter,
    pub inbox_scan_duration_seconds: Histogram,
    pub inbox_stuck_files: Gauge,
    pub app_paused: Family<PauseLabel, Gauge>,
    pub store_write_failing: Family<WriteLabel, Gauge>,
    pub results_unwritten: Gauge,
}

impl Metrics {
    fn new() -> (Metrics, Registry) {
        let m = Metrics {
            files_ingested: Counter::default(),
            files_rejected: Family::default(),
            records_ingested: Family::default(),
            duplicates: Counter::default(),
            deliveries: Family::default(),
            retries: Family::default(),
            queue_depth: Family::default(),
            oldest_queued_age_seconds: Gauge::default(),
            send_latency_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            connections_open: Gauge::default(),
            reconnects: Counter::default(),
            jwt_refreshes: Counter::default(),
            inbox_scan_duration_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            inbox_stuck_files: Gauge::default(),
            app_paused: Family::default(),
            store_write_failing: Family::default(),
            results_unwritten: Gauge::default(),
        };
        // Every kind of write at 0 from the start, for an alert on `== 1`.
        for write in crate::store::write_labels() {
            let _ = m.store_write_failing.get_or_create(&WriteLabel {
                write: write.into(),
            });
        }
        // Every rejection reason is there at 0 from the start: a series that first appears
        // at 1 has an `increase()` of 0, and an alert on the first rejected file after a
        // start would never fire.
        for reason in crate::inbox::parse::RejectReason::ALL {
            let _ = m.files_rejected.get_or_create(&ReasonLabel {
                reason: reason.code().into(),
            });
        }
        let mut r = Registry::with_prefix("pushdrop");
        r.register(
            "files_ingested",
            "Drop files accepted and committed",
            m.files_ingested.clone(),
        );
        r.register(
            "files_rejected",
            "Drop files rejected, by reason",
            m.files_rejected.clone(),
        );
        r.register(
            "records_ingested",
            "Records committed, by type",
            m.records_ingested.clone(),
        );
        r.register(
            "duplicate_notifications",
            "Notifications skipped because their app and id were already queued",
            m.duplicates.clone(),
        );
        r.register(
            "deliveries",
            "Deliveries that reached a final state, by outcome and APNs reason",
            m.deliveries.clone(),
        );
        r.register(
            "retries",
            "Delivery attempts that will be retried, by reason",
            m.retries.clone(),
        );
        r.register("queue_depth", "Deliveries by state", m.queue_depth.clone());
        r.register(
            "oldest_queued_age_seconds",
            "Seconds the oldest queued delivery has waited since its notification was due",
            m.oldest_queued_age_seconds.clone(),
        );
        r.register(
            "send_latency_seconds",
            "Time from a push's request (a wait for a connection or stream included) to APNs' answer",
            m.send_latency_seconds.clone(),
        );
        r.register(
            "apns_connections_open",
            "Open HTTP/2 connections to APNs",
            m.connections_open.clone(),
        );
        r.register(
            "apns_reconnects",
            "HTTP/2 connections opened after the first",
            m.reconnects.clone(),
        );
        r.register(
            "jwt_refreshes",
            "Provider tokens minted",
            m.jwt_refreshes.clone(),
        );
        r.register(
            "inbox_scan_duration_seconds",
            "Time of one full inbox directory scan",
            m.inbox_scan_duration_seconds.clone(),
        );
        r.register(
            "inbox_stuck_files",
            "Files that stay in the inbox: committed or rejected but cannot be moved out, or cannot be read or committed",
            m.inbox_stuck_files.clone(),
        );
        r.register(
            "app_paused",
            "1 while an app and environment is paused, by reason",
            m.app_paused.clone(),
        );
        r.register(
            "store_write_failing",
            "1 while the database refuses this kind of write (/readyz's test write, a drop file's commit, a batch of delivery results, a claim of due work with its fan-out), until one goes through or none failed for 150 s",
            m.store_write_failing.clone(),
        );
        r.register(
            "results_unwritten",
            "Delivery results held in memory because the database refuses them (their deliveries still count as queued in queue_depth)",
            m.results_unwritten.clone(),
        );
        (m, r)
    }
}

static METRICS: OnceLock<(Metrics, Registry)> = OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS.get_or_init(Metrics::new).0
}

/// The OpenMetrics text exposition of every metric (what Prometheus asks for first).
pub fn encode() -> String {
    let (_, registry) = METRICS.get_or_init(Metrics::new);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The same in the Prometheus text format (0.0.4), for a scraper or person that does not ask
/// for OpenMetrics: a counter's `# HELP` and `# TYPE` lines name it with `_total` as its
/// samples do, and there is no `# UNIT` or `# EOF` line.
pub fn encode_prometheus() -> String {
    to_prometheus_text(&encode())
}

/// Rewrites an OpenMetrics exposition (as `prometheus_client` writes it: no exemplars, no
/// `_created` samples) in the Prometheus text format.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    /// Apple's reasons are labels; anything else, one word or not, is `other`.
    #[test]
    fn only_apples_reasons_become_labels() {
        for (status, reason, label) in [
            (Some(400), "BadDeviceToken", "BadDeviceToken"),
            (
                Some(410),
                "Unregistered; the device registered before",
                "Unregistered",
            ),
            (Some(429), "TooManyRequests", "TooManyRequests"),
            (Some(502), "BadGateway", "other"),
            // Apple's word from a server that is not Apple's (a proxy's 502).
            (Some(502), "BadDeviceToken", "other"),
            (Some(400), "InvalidProviderToken", "other"),
            (None, "no answer from APNs within 10000 ms", "timeout"),
            (None, "connection reset by peer", "other"),
            (None, "", "other"),
            // Decided unsent, carrying the device's invalidation.
            (None, "Unregistered", "Unregistered"),
            (Some(0), "Unregistered", "Unregistered"),
        ] {
            assert_eq!(
                super::reason_label(status, reason),
                label,
                "{status:?} {reason}"
            );
        }
    }

    #[test]
    fn an_app_name_with_quotes_backslashes_and_line_breaks_is_escaped_in_its_label() {
        super::get()
            .app_paused
            .get_or_create(&super::PauseLabel {
                app: super::LabelText("we\"ird\\app\nx".into()),
                environment: "sandbox".into(),
                reason: "credentials".into(),
            })
            .set(1);
        let text = super::encode_prometheus();
        let line = text
            .lines()
            .find(|l| l.starts_with("pushdrop_app_paused{") && l.contains("ird"))
            .unwrap();
        assert_eq!(
            line,
            r#"pushdrop_app_paused{app="we\"ird\\app\nx",environment="sandbox",reason="credentials"} 1"#
        );
    }

    #[test]
    fn the_prometheus_text_names_counters_with_total_and_has_no_eof() {
        let om = "# HELP a_files Files.\n# TYPE a_files counter\n# UNIT a_files files\n\
                  a_files_total 3\n# HELP b Depth.\n# TYPE b gauge\nb{state=\"x\"} 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP a_files_total Files.\n# TYPE a_files_total counter\na_files_total 3\n\
             # HELP b Depth.\n# TYPE b gauge\nb{state=\"x\"} 1\n"
        );
    }
}
