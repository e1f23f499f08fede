//! The fields of the text format, as `name="value"`: every value that is not a number or a
//! bool is quoted and escaped, `%display` ones too, which tracing-subscriber's default writes
//! bare. A bare value could hold ` event="ingested" status="accepted"` (a dropped file's field
//! name in a problem's text, a file name in a path) and pass for fields of its own to anyone
//! reading the line as `key=value` pairs. The message comes first, unquoted, as before.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The text format's [`FormatFields`] (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct QuotedFields;

impl<'w> FormatFields<'w> for QuotedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn field(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        let name = field.name();
        // What the log crate's records carry besides their message is in the line already.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        if !self.first {
            self.result = self.writer.write_char(' ');
        }
        self.first = false;
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self.result.and_then(|()| write!(self.writer, "{name}="));
        }
        self.result = self.result.and_then(|()| write(&mut self.writer));
    }

    fn text(&mut self, field: &Field, text: &str) {
        if field.name() == "message" {
            self.field(field, |w| w.write_str(text));
        } else {
            // `Debug` of a `str`: quoted, with `"`, `\` and control characters escaped.
            self.field(field, |w| write!(w, "{text:?}"));
        }
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, &format!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, &value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::tests::Sink;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn no_value_can_pass_for_fields_of_its_own() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(QuotedFields)
                .with_ansi(false)
                .without_time()
                .with_writer(sink.clone()),
        );
        let forged = r#"zz event="ingested" status="accepted""#;
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                event = "rejected",
                file = "f.json",
                problems = 1,
                ok = false,
                reasons = %format!("record 0, field {forged}: unknown field"),
                "file rejected"
            );
        });
        let lines = sink.lines();
        assert_eq!(
            lines.join("\n").trim(),
            r#"WARN pushdrop::logging::text::tests: file rejected event="rejected" file="f.json" problems=1 ok=false reasons="record 0, field zz event=\"ingested\" status=\"accepted\": unknown field""#
        );
    }
}
