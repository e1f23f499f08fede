//! The JSON log-file format, written by hand.
//!
//! [`JsonLines`] writes the same bytes as tracing-subscriber's JSON formatter configured as
//! `fmt::layer().json().flatten_event(true).with_current_span(false).with_span_list(false)`:
//!
//! ```text
//! {"timestamp":"2026-11-27T18:00:01.123456Z","level":"INFO","message":"delivered","event":"delivery","id":"budget-2026-11-27",…,"attempt":1,"latency_ms":3.12,"target":"pushdrop::delivery"}
//! ```
//!
//! that is `timestamp` (RFC 3339, UTC, microseconds, `Z`), `level`, then the event's fields in
//! the order of the callsite (the message is the field `message`), then `target`. Strings,
//! `%display` and `?debug` values are JSON strings; integers, floats (`null` when not finite)
//! and bools are bare; 128-bit integers, errors and byte slices are strings, as
//! tracing-subscriber writes them. Events from the `log` crate get their normalized level and
//! target and keep their `log.*` fields, like there.
//!
//! Why by hand: the generic formatter serializes through serde_json and formats the timestamp
//! from scratch into a new `String` on every line; this one builds the line in a reused
//! per-thread buffer, escapes strings by copying runs of safe bytes, and formats the date and
//! time once per second. The test module holds the proof that both write the same lines.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The hand-written JSON event formatter of the log files (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl JsonLines {
    /// The formatter; it has no options, the format is fixed.
    pub fn new() -> Self {
        JsonLines
    }
}

/// A line buffer that outgrew this stays allocated only until the next line.
const KEEP_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// The line being built: one buffer per thread, reused for every line.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// `YYYY-MM-DDTHH:MM:SS` of the second this thread last logged in.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                let result = format_line(&mut line, event, SystemTime::now())
                    .and_then(|()| writer.write_str(&line));
                if line.capacity() > KEEP_CAPACITY {
                    *line = String::new();
                }
                result
            }
            // Formatting a field logged another event on this thread: that one gets its own
            // buffer.
            Err(_) => {
                let mut line = String::new();
                format_line(&mut line, event, SystemTime::now())?;
                writer.write_str(&line)
            }
        })
    }
}

/// Appends the line of `event`, logged at `now`, newline included.
fn format_line(out: &mut String, event: &Event<'_>, now: SystemTime) -> fmt::Result {
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    out.push_str("{\"timestamp\":\"");
    push_timestamp(out, now);
    out.push_str("\",\"level\":\"");
    out.push_str(meta.level().as_str());
    out.push('"');
    let mut fields = FieldWriter {
        out,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.push_str(",\"target\":");
    push_str_value(out, meta.target());
    out.push_str("}\n");
    Ok(())
}

/// Writes each field as `,"name":value`. Kinds it does not override (`i128`, `u128`, errors,
/// byte slices) reach `record_debug` through `Visit`'s defaults, as in tracing-serde.
struct FieldWriter<'a> {
    out: &'a mut String,
    /// The first error of a `Debug`/`Display` implementation; the line is then not written.
    result: fmt::Result,
}

impl FieldWriter<'_> {
    fn key(&mut self, field: &Field) {
        self.out.push(',');
        push_str_value(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for FieldWriter<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.key(field);
            push_str_value(self.out, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.key(field);
            self.out.push('"');
            self.result = write!(Escaping(self.out), "{value:?}");
            self.out.push('"');
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.key(field);
            if value < 0 {
                self.out.push('-');
            }
            push_u64(self.out, value.unsigned_abs());
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.key(field);
            push_u64(self.out, value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.key(field);
            self.out.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.result.is_ok() {
            self.key(field);
            push_f64(self.out, value);
        }
    }
}

/// Appends `value` in decimal.
fn push_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for &d in &digits[start..] {
        out.push(char::from(d));
    }
}

/// Appends a float exactly as serde_json writes it (shortest round-trip text; `null` when not
/// finite): serde_json itself formats it, into a stack buffer.
fn push_f64(out: &mut String, value: f64) {
    let mut text = [0u8; 40];
    let mut rest = &mut text[..];
    let written = serde_json::to_writer(&mut rest, &value).map(|()| 40 - rest.len());
    match written
        .ok()
        .and_then(|n| std::str::from_utf8(&text[..n]).ok())
    {
        Some(s) => out.push_str(s),
        // Not reached (the longest float text is 24 bytes), but never lose the value.
        None => out.push_str(&serde_json::to_string(&value).unwrap_or_else(|_| "null".into())),
    }
}

/// Appends `s` as a JSON string: quoted and escaped.
fn push_str_value(out: &mut String, s: &str) {
    out.push('"');
    push_escaped(out, s);
    out.push('"');
}

/// Marks the bytes of `word` (8 bytes, little-endian) that must be escaped in a JSON string,
/// in the high bit of each. Those are `"`, `\` and the control characters below 0x20: the set
/// serde_json escapes (it leaves DEL and all non-ASCII text as it is). The marks come from the
/// bit tricks for "has a byte less than n / equal to n": bytes above a marked one may be
/// marked wrongly (a borrow runs upwards), but the lowest mark is always right, and no byte
/// that needs escaping goes unmarked.
const fn escape_marks(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const fn zero_bytes(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGHS
    }
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    below_space | zero_bytes(word ^ (ONES * b'"' as u64)) | zero_bytes(word ^ (ONES * b'\\' as u64))
}

/// The index of the first byte at or after `from` that must be escaped, or `bytes.len()`.
/// Looks at 8 bytes at a time; the last, partial word is read overlapping the one before it
/// (whose bytes were found safe), and only text shorter than a word goes byte by byte.
fn next_escape(bytes: &[u8], from: usize) -> usize {
    let word_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        escape_marks(u64::from_le_bytes(word))
    };
    let mut at = from;
    while at + 8 <= bytes.len() {
        let marks = word_at(at);
        if marks != 0 {
            return at + (marks.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    if at == bytes.len() {
        return at;
    }
    if let Some(last) = bytes.len().checked_sub(8).filter(|&last| last >= from) {
        return match word_at(last) {
            0 => bytes.len(),
            marks => last + (marks.trailing_zeros() / 8) as usize,
        };
    }
    bytes[at..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .map_or(bytes.len(), |i| at + i)
}

/// Appends `s` escaped as JSON string content: runs of safe bytes are copied whole.
fn push_escaped(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut run_start = 0;
    loop {
        let at = next_escape(bytes, run_start);
        // `at` is an ASCII byte or the end: always a char boundary.
        out.push_str(&s[run_start..at]);
        let Some(&b) = bytes.get(at) else {
            return;
        };
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        run_start = at + 1;
    }
}

/// A `fmt::Write` that escapes what `Debug`/`Display` implementations write into it.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_escaped(self.0, s);
        Ok(())
    }
}

/// Appends `now` as tracing-subscriber's `SystemTime` timer writes it:
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, microseconds truncated. The part up to the seconds is
/// formatted once per second (per thread) and reused.
fn push_timestamp(out: &mut String, now: SystemTime) {
    let (secs, nanos) = split_epoch(now);
    SECOND.with(|cell| match cell.try_borrow_mut() {
        Ok(mut cached) => {
            if cached.0 != secs {
                cached.1.clear();
                push_date_time(&mut cached.1, secs);
                cached.0 = secs;
            }
            out.push_str(&cached.1);
        }
        Err(_) => push_date_time(out, secs),
    });
    out.push('.');
    let micros = nanos / 1_000;
    let mut div = 100_000;
    while div > 0 {
        out.push(char::from(b'0' + ((micros / div) % 10) as u8));
        div /= 10;
    }
    out.push('Z');
}

/// Whole seconds since the epoch (negative before it) and the nanoseconds after them: one
/// reading, so the second and its fraction always belong together.
fn split_epoch(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// Appends `YYYY-MM-DDTHH:MM:SS` (UTC) of `secs` since the epoch; years past 9999 get a `+`,
/// years before 0 a `-` and at least four digits, like tracing-subscriber's timer.
fn push_date_time(out: &mut String, secs: i64) {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let _ = if year > 9999 {
        write!(out, "+{year}")
    } else if year < 0 {
        write!(out, "{year:05}")
    } else {
        write!(out, "{year:04}")
    };
    let _ = write!(
        out,
        "-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    );
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01): the usual
/// era-of-400-years conversion.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1, 0..=365
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tracing_subscriber::layer::SubscriberExt as _;

    use crate::logging::tests::Sink;

    #[derive(Debug)]
    #[allow(dead_code)] // read through Debug only
    struct Nested {
        name: &'static str,
        list: Vec<Option<u8>>,
        text: String,
    }

    #[derive(Debug)]
    struct Failure;

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("disk \"full\"\n\tretry later")
        }
    }

    impl std::error::Error for Failure {}

    /// Logs every kind of field, message and level this formatter must handle.
    fn log_samples() {
        use tracing::{debug, error, info, trace, warn};
        let id = String::from("budget-2026-11-27");
        let app = String::from("buxheti");
        let token = "5f1c0a9b";
        let environment = crate::config::Environment::Production;
        // The delivery outcome line, field for field as the sender writes it.
        info!(
            target: crate::sender::DELIVERY_TARGET, event = "delivery", id = %id, app = %app, token,
            environment = %environment, status = "sent", http_status = 200i64, reason = "",
            apns_id = "01234567-89ab-cdef-0123-456789abcdef", attempt = 1u32,
            latency_ms = 12.345f64, "delivered"
        );
        warn!(
            target: crate::sender::DELIVERY_TARGET, event = "delivery", id = %id, app = %app, token,
            environment = %environment, status = "retry", http_status = 0i64,
            reason = "connect: Connection refused (os error 111)", apns_id = "x", attempt = 3u32,
            latency_ms = 0.0f64, retry_in_ms = -5i64, "will retry"
        );
        info!(target: crate::sender::DELIVERY_TARGET, event = "notification_finished", id = %id, app = %app, "all deliveries final");
        info!(
            event = "ingested",
            file = "a \"quoted\" name.jsonl",
            devices = 3u64,
            notifications = 0u64,
            duplicates = 0u64,
            ms = 125u64,
            "ingested"
        );
        // Integers at the edges.
        info!(
            a = 0i64,
            b = -1i64,
            c = i64::MIN,
            d = i64::MAX,
            e = u64::MAX,
            f = 0u64,
            g = 7u8,
            h = -7i32,
            i = u128::MAX,
            j = i128::MIN
        );
        // Floats at the edges.
        info!(
            a = 0.0f64,
            b = -0.0f64,
            c = 1.0f64,
            d = 0.1f64,
            e = 1e300f64,
            f = 1e-300f64,
            g = f64::NAN,
            h = f64::INFINITY,
            i = f64::NEG_INFINITY,
            j = 123456789.125f64,
            k = 1e16f64,
            l = 1e15f64,
            m = 2.5e-7f64,
            n = f64::MIN_POSITIVE,
            o = 1.5f32
        );
        info!(yes = true, no = false, "bools");
        // Options and other Debug values.
        let none: Option<&str> = None;
        info!(some = ?Some("x\"y"), none = ?none, unit = ?(), nested = ?Nested { name: "n", list: vec![Some(1), None], text: "tab\there".into() }, "debug values");
        info!(pretty = ?format_args!("{:#?}", Nested { name: "p", list: vec![], text: String::new() }));
        info!(shown = %Failure, debugged = ?Failure, error = &Failure as &(dyn std::error::Error + 'static), bytes = &b"\x00\x01ab"[..], "errors and bytes");
        // Messages with everything that needs escaping, and some that must not be escaped.
        info!("quotes \" and backslashes \\ and slash /");
        info!("newline\nreturn\rtab\tbackspace\u{8}formfeed\u{c}nul\u{0}unit\u{1f}del\u{7f}");
        info!(
            "unicode: ünïcödé, 日本語, emoji 🚀, line sep \u{2028}, bom \u{feff}, replacement \u{fffd}"
        );
        info!("");
        info!("{} formatted {:?} {:>6}|", "args", "debug", 42);
        info!(message = "explicit message field", other = 1u64);
        info!(message = %format_args!("display message {}", 7));
        // No message at all.
        info!(event = "no_message", n = 5u64);
        // Odd field names and targets.
        info!(target: "weird \"target\"\n", naïve = "é", "odd target");
        info!(
            dotted.name = 2u64,
            "quoted \"name\"" = 1u64,
            "dotted field names"
        );
        info!(r#type = "raw identifier");
        // Many fields.
        info!(f01 = 1u64, f02 = "2", f03 = %3, f04 = ?4, f05 = 5.5f64, f06 = true, f07 = -7i64, f08 = "8", f09 = 9u64, f10 = "ten", f11 = 11u64, f12 = "12", f13 = 13u64, f14 = "14", f15 = 15u64, f16 = "16", f17 = 17u64, f18 = "18", f19 = 19u64, f20 = "20", f21 = 21u64, f22 = "22", f23 = 23u64, f24 = "24", f25 = 25u64, f26 = "26", f27 = 27u64, f28 = "28", f29 = 29u64, f30 = "30", f31 = 31u64, "thirty-one fields");
        // A long value, longer than any line buffer starts with.
        let long = "abc\"def\\".repeat(5_000);
        info!(long = %long, "long");
        // Every level.
        trace!("trace");
        debug!("debug");
        warn!("warn");
        error!(event = "store_error", error = %Failure, "cannot record delivery results; they stay leased and will be resent");
        // Spans are not part of the lines (`with_current_span(false)`, `with_span_list(false)`).
        let span = tracing::info_span!("outer", conn = 3u64);
        span.in_scope(|| info!(inside = true, "in a span"));
        // A record of the `log` crate, as the LogTracer forwards it (rustls logs this way).
        tracing_log::format_trace(
            &tracing_log::log::Record::builder()
                .args(format_args!("Sending warning alert {:?}", "CloseNotify"))
                .level(tracing_log::log::Level::Warn)
                .target("rustls::common_state")
                .module_path_static(Some("rustls::common_state"))
                .file_static(Some("src/common_state.rs"))
                .line(Some(512))
                .build(),
        )
        .unwrap();
        tracing_log::format_trace(
            &tracing_log::log::Record::builder()
                .args(format_args!("no location"))
                .level(tracing_log::log::Level::Info)
                .target("notify")
                .build(),
        )
        .unwrap();
    }

    /// The timestamp value of a line and the line without it.
    fn split_timestamp(line: &str) -> (&str, String) {
        let head = "{\"timestamp\":\"";
        assert!(line.starts_with(head), "{line}");
        let end = line[head.len()..].find('"').unwrap() + head.len();
        let ts = &line[head.len()..end];
        (ts, format!("{head}{}", &line[end..]))
    }

    fn parse_rfc3339(ts: &str) -> time::OffsetDateTime {
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{ts}: {e}"))
    }

    /// The proof that the formats match: the same events through tracing-subscriber's JSON
    /// layer (as the daemon configured it before) and through [`JsonLines`], side by side in
    /// one subscriber, give the same lines, byte for byte but for the instant in the timestamp.
    #[test]
    fn lines_equal_tracing_subscribers_json_layer() {
        let (reference, ours) = (Sink::default(), Sink::default());
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(reference.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines::new())
                    .with_writer(ours.clone()),
            );
        tracing::subscriber::with_default(subscriber, log_samples);
        let (reference, ours) = (reference.lines(), ours.lines());
        assert_eq!(reference.len(), 30);
        assert_eq!(reference.len(), ours.len());
        for (want, got) in reference.iter().zip(&ours) {
            let (want_ts, want_rest) = split_timestamp(want);
            let (got_ts, got_rest) = split_timestamp(got);
            assert_eq!(got_rest, want_rest);
            // Same shape (4-digit year, microseconds, Z) and the same moment give or take the
            // time between the two layers' clock readings.
            assert_eq!(
                got_ts.len(),
                "2026-11-27T18:00:01.123456Z".len(),
                "{got_ts}"
            );
            assert_eq!(want_ts.len(), got_ts.len(), "{want_ts} {got_ts}");
            assert!(
                got_ts.ends_with('Z') && got_ts.as_bytes()[19] == b'.',
                "{got_ts}"
            );
            let gap = parse_rfc3339(got_ts) - parse_rfc3339(want_ts);
            assert!(gap.abs() < time::Duration::seconds(5), "{want_ts} {got_ts}");
            // Each line is one JSON object.
            serde_json::from_str::<serde_json::Value>(got).unwrap();
        }
    }

    /// The timestamp text against the `time` crate's rendering of the same instant, across
    /// second, day, month, year and leap-day boundaries.
    #[test]
    fn timestamps_match_the_time_crate() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut instants: Vec<i64> = vec![
            0,
            1,
            59,
            60,
            86_399,
            86_400,
            951_782_399, // 2000-02-28T23:59:59
            951_868_799, // 2000-02-29T23:59:59
            4_107_542_399,
            1_798_761_599, // 2026-12-31T23:59:59
            1_798_761_600,
            253_402_300_799, // 9999-12-31T23:59:59
            -1,
            -86_401,
            -62_135_596_800, // 0001-01-01T00:00:00
        ];
        let mut s: i64 = 1_700_000_000;
        while s < 1_900_000_000 {
            instants.push(s);
            s += 3_599_999; // about every 42 days, at ever-changing times of day
        }
        for secs in instants {
            for nanos in [0u32, 999, 1_000, 123_456_789, 999_999_999] {
                let t = if secs >= 0 {
                    UNIX_EPOCH + Duration::new(secs as u64, nanos)
                } else {
                    UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
                        + Duration::from_nanos(u64::from(nanos))
                };
                let mut ours = String::new();
                push_timestamp(&mut ours, t);
                let theirs = time::OffsetDateTime::from(t).format(&format).unwrap();
                assert_eq!(ours, theirs, "{secs} s {nanos} ns");
                // A second formatting of the same instant comes from the cache.
                let mut again = String::new();
                push_timestamp(&mut again, t);
                assert_eq!(again, ours);
            }
        }
    }

    /// Years outside 0..=9999, which `time` cannot format by default: as tracing-subscriber
    /// writes them.
    #[test]
    fn timestamps_of_odd_years() {
        let mut s = String::new();
        push_date_time(&mut s, 253_402_300_800);
        assert_eq!(s, "+10000-01-01T00:00:00");
        s.clear();
        push_date_time(&mut s, -62_135_596_801);
        assert_eq!(s, "0000-12-31T23:59:59");
        s.clear();
        push_date_time(&mut s, -62_167_219_201);
        assert_eq!(s, "-0001-12-31T23:59:59");
    }

    #[test]
    fn escaping_matches_serde_json() {
        let mut all = String::new();
        for c in (0u32..0x80).chain([0xe9, 0x2028, 0x1f680]) {
            all.push(char::from_u32(c).unwrap());
        }
        let mut samples: Vec<String> = ["", "plain", "\"", "\\\\", "end\n", "ü\u{1}ü"]
            .map(String::from)
            .into();
        samples.push(all);
        // Each special byte, and neighbours that need no escape, at every offset of strings
        // long enough for the 8-byte scan, among ASCII and multi-byte text.
        for len in 0..26 {
            for at in 0..len {
                for c in [
                    '\0', '\u{1f}', '"', '\\', '\n', ' ', '!', '#', '[', ']', '\u{7f}', 'é',
                ] {
                    for fill in ['a', 'ü'] {
                        let mut s: String = std::iter::repeat_n(fill, len).collect();
                        let byte_at = s.char_indices().nth(at).unwrap().0;
                        s.replace_range(
                            byte_at..byte_at + fill.len_utf8(),
                            c.encode_utf8(&mut [0; 4]),
                        );
                        samples.push(s);
                    }
                }
            }
        }
        for s in &samples {
            let mut ours = String::new();
            push_str_value(&mut ours, s);
            assert_eq!(ours, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn numbers_match_serde_json() {
        for v in [
            0u64,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut ours = String::new();
            push_u64(&mut ours, v);
            assert_eq!(ours, serde_json::to_string(&v).unwrap());
        }
        for v in [
            0.0,
            -0.0,
            0.5,
            1.0,
            1e21,
            -1e-7,
            12.345,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
        ] {
            let mut ours = String::new();
            push_f64(&mut ours, v);
            assert_eq!(ours, serde_json::to_string(&v).unwrap());
        }
    }
}
