//! The `<name>.error.json` report of a rejected file, also printed by `pushdrop validate`.

use serde::Serialize;

use super::parse::{Problem, RejectReason};

/// The report's JSON shape: the dropper's tooling may read it.
#[derive(Debug, Serialize)]
pub struct ErrorReport<'a> {
    /// The file's name as it was dropped.
    pub file: &'a str,
    /// The name it was moved to in `rejected_dir`, when that is not `file` (a name taken
    /// there already, or a name too long for the `~N` suffix): which copy this report is of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_as: Option<String>,
    /// RFC 3339, UTC.
    pub rejected_at: String,
    /// Short code: `parse`, `invalid`, `oversize`, `symlink`, …
    pub reason: &'static str,
    /// Every problem found (capped, see [`super::parse::MAX_PROBLEMS`]).
    pub problems: &'a [Problem],
}

impl<'a> ErrorReport<'a> {
    /// A report stamped now.
    pub fn new(file: &'a str, reason: RejectReason, problems: &'a [Problem]) -> ErrorReport<'a> {
        ErrorReport {
            file,
            stored_as: None,
            rejected_at: now_rfc3339(),
            reason: reason.code(),
            problems,
        }
    }

    /// Pretty JSON with a trailing newline, for people and programs alike.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// The current time as RFC 3339 UTC with second precision.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shape() {
        let problems = vec![Problem {
            record: Some(1),
            line: Some(2),
            field: Some("token".into()),
            message: "is not hex".into(),
        }];
        let r = ErrorReport::new("x.json", RejectReason::Invalid, &problems);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["file"], "x.json");
        assert_eq!(v["reason"], "invalid");
        assert_eq!(v["problems"][0]["record"], 1);
        assert_eq!(v["problems"][0]["line"], 2);
        assert_eq!(v["problems"][0]["field"], "token");
        let at = v["rejected_at"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }
}
