//! A script file for `pushdrop simulate`: how the simulator should misbehave, for users whose
//! integration tests are not written in Rust and so cannot call [`Simulator::script`].
//!
//! The file is TOML, read at start (`--script FILE`) and again on SIGHUP, so a test harness
//! can change the scenario without restarting the server (and without new credentials):
//!
//! ```toml
//! latency_ms = 0                       # before every answer
//! goaway_after = 100                   # connections opened from now on: GOAWAY after N streams
//! drop_after = 50                      # ... or an abrupt close once N streams are answered (leave out: never)
//! streams_one_until_authorized = false # APNs' one stream until the first authorised request
//!
//! [tokens]
//! "789224b6…" = { status = 410, timestamp_ms = 1796000000000 }  # Unregistered as of then
//! "0a281d3d…" = { status = 400 }                                 # BadDeviceToken
//! "8c68b5de…" = { status = 503, first = 2 }                      # twice 503, then 200
//! "5f1ce9a0…" = { delay_ms = 2000 }                              # a slow answer
//! "77aa01bc…" = { status = 400, reason = "DeviceTokenNotForTopic" }
//! ```
//!
//! A reload replaces everything: token scripts not in the new file are dropped (and the
//! "first N tries" counts start again), connection settings not in it go back to their
//! defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Simulator, TokenScript};
use crate::config::{key_of_toml_error, line_of_offset};

/// A script that could not be used: the file, and every problem with its line.
#[derive(Debug, thiserror::Error)]
#[error("bad simulator script {}:{}", path.display(), render(.problems))]
pub struct ScriptError {
    pub path: PathBuf,
    pub problems: Vec<ScriptProblem>,
}

/// One problem of a script file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptProblem {
    /// 1-based; `None` when the problem is the whole file's (it cannot be read).
    pub line: Option<usize>,
    /// The dotted key, e.g. `tokens."8c68…".status`.
    pub key: String,
    pub message: String,
}

fn render(problems: &[ScriptProblem]) -> String {
    let mut s = String::new();
    for p in problems {
        match p.line {
            Some(l) => s.push_str(&format!("\n  line {l}: {}: {}", p.key, p.message)),
            None => s.push_str(&format!("\n  {}: {}", p.key, p.message)),
        }
    }
    s
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    latency_ms: Option<u64>,
    goaway_after: Option<u32>,
    drop_after: Option<u32>,
    streams_one_until_authorized: Option<bool>,
    #[serde(default)]
    tokens: BTreeMap<String, toml::Spanned<Entry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    status: Option<u16>,
    reason: Option<String>,
    timestamp_ms: Option<i64>,
    first: Option<u32>,
    delay_ms: Option<u64>,
}

/// What a script file asks for, checked and ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimScript {
    /// `None`: keep what the command line said (`--latency-ms`).
    pub latency: Option<Duration>,
    pub goaway_after: Option<u32>,
    pub drop_after: Option<u32>,
    pub streams_one_until_authorized: bool,
    /// Lower-case tokens and their behaviour.
    pub tokens: Vec<(String, TokenScript)>,
}

impl SimScript {
    /// Reads and checks a script file.
    pub fn load(path: &Path) -> Result<SimScript, ScriptError> {
        let fail = |problems| ScriptError {
            path: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![ScriptProblem {
                line: None,
                key: "(file)".into(),
                message: format!("cannot read it: {e}"),
            }])
        })?;
        SimScript::parse(&text).map_err(fail)
    }

    /// Checks a script's text; every problem found, each with its line.
    pub fn parse(text: &str) -> Result<SimScript, Vec<ScriptProblem>> {
        let file: File = toml::from_str(text).map_err(|e| {
            vec![ScriptProblem {
                line: e.span().map(|s| line_of_offset(text, s.start)),
                key: key_of_toml_error(text, &e),
                message: e.message().trim().to_string(),
            }]
        })?;
        let mut problems = Vec::new();
        let mut tokens = Vec::new();
        // Tokens match in any case: two spellings of one token would script it twice.
        let mut spelled: std::collections::HashMap<String, &str> = Default::default();
        // In the order of the file (the map's is the keys'), so that a repeat is said at the
        // later line.
        let mut entries: Vec<_> = file.tokens.iter().collect();
        entries.sort_by_key(|(_, entry)| entry.span().start);
        for (token, entry) in entries {
            let line = Some(line_of_offset(text, entry.span().start));
            let mut bad = |field: &str, message: String| {
                problems.push(ScriptProblem {
                    line,
                    key: if field.is_empty() {
                        format!("tokens.\"{token}\"")
                    } else {
                        format!("tokens.\"{token}\".{field}")
                    },
                    message,
                })
            };
            // The rule drop files follow, so a token pushdrop accepts can be scripted.
            let token_text = token;
            let token = match crate::inbox::parse::check_token(token) {
                Ok(t) => t,
                Err(why) => {
                    bad("", why);
                    continue;
                }
            };
            if let Some(first) = spelled.insert(token.clone(), token_text) {
                bad(
                    "",
                    format!("the same token as \"{first}\" (tokens match in any case)"),
                );
                continue;
            }
            match entry_script(entry.get_ref()) {
                Ok(s) => tokens.push((token, s)),
                Err((field, why)) => bad(field, why),
            }
        }
        if file.latency_ms.is_some_and(|ms| ms > MAX_DELAY_MS) {
            problems.push(top_level(text, "latency_ms", &too_long()));
        }
        if file.goaway_after == Some(0) {
            problems.push(top_level(
                text,
                "goaway_after",
                "must be at least 1 (leave it out for never)",
            ));
        }
        if file.drop_after == Some(0) {
            problems.push(top_level(
                text,
                "drop_after",
                "must be at least 1 (leave it out for never)",
            ));
        }
        if !problems.is_empty() {
            // In the order of the file.
            problems.sort_by_key(|p| p.line);
            return Err(problems);
        }
        Ok(SimScript {
            latency: file.latency_ms.map(Duration::from_millis),
            goaway_after: file.goaway_after,
            drop_after: file.drop_after,
            streams_one_until_authorized: file.streams_one_until_authorized.unwrap_or(false),
            tokens,
        })
    }

    /// Makes the simulator behave as the script says, replacing any earlier script.
    /// `default_latency` is what applies when the script names no `latency_ms`.
    pub fn apply(&self, sim: &Simulator, default_latency: Duration) {
        sim.clear_scripts();
        for (token, s) in &self.tokens {
            sim.script(token, s.clone());
        }
        sim.set_latency(self.latency.unwrap_or(default_latency));
        sim.set_goaway_after(self.goaway_after);
        sim.set_drop_after(self.drop_after);
        sim.set_streams_one_until_authorized(self.streams_one_until_authorized);
    }
}

/// The longest latency or delay a script (or `--latency-ms`) may ask for: an hour. Longer is
/// a unit mix-up, and far beyond any client's timeout.
pub const MAX_DELAY_MS: u64 = 3_600_000;

fn too_long() -> String {
    format!("at most {MAX_DELAY_MS} (an hour)")
}

/// The behaviour one `[tokens]` entry asks for, or the field at fault and why.
fn entry_script(e: &Entry) -> Result<TokenScript, (&'static str, String)> {
    if let Some(ms) = e.delay_ms {
        if ms > MAX_DELAY_MS {
            return Err(("delay_ms", too_long()));
        }
        let delay = Duration::from_millis(ms);
        if e.status.is_none() && e.reason.is_none() && e.first.is_none() && e.timestamp_ms.is_none()
        {
            return Ok(TokenScript::Delay(delay));
        }
        // A slow error answer: the rest of the entry says which.
        let rest = Entry {
            delay_ms: None,
            reason: e.reason.clone(),
            ..*e
        };
        return Ok(TokenScript::Slow {
            delay,
            then: Box::new(entry_script(&rest)?),
        });
    }
    let Some(status) = e.status else {
        // `first`, `reason` and `timestamp_ms` say something about an error answer: they
        // need its status, whatever else the entry gives.
        let about: Vec<&str> = [
            ("first", e.first.is_some()),
            ("reason", e.reason.is_some()),
            ("timestamp_ms", e.timestamp_ms.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, given)| given.then_some(k))
        .collect();
        return Err((
            "status",
            if about.is_empty() {
                "missing: give an error status (400, 410, 429, 500, 503, …) or delay_ms".into()
            } else {
                format!(
                    "missing: {} needs an error status (400, 410, 429, 500, 503, …)",
                    about.join(" and ")
                )
            },
        ));
    };
    if !(400..=599).contains(&status) {
        return Err((
            "status",
            format!("{status} is not an error answer (400 to 599)"),
        ));
    }
    let reason = match (&e.reason, default_reason(status)) {
        // A status Apple does not document (a proxy's 502) takes any text, as a proxy's would.
        (Some(r), _) if r.trim().is_empty() || r.chars().any(char::is_control) => {
            return Err((
                "reason",
                format!("{r:?} is not a reason such as \"BadDeviceToken\" (text on one line)"),
            ));
        }
        (Some(r), _) => match crate::apns::outcome::apple_reasons(status) {
            // A typo would otherwise be answered as if Apple said it.
            Some(known) if !known.contains(&r.as_str()) => {
                return Err((
                    "reason",
                    format!(
                        "{r:?} is not one of Apple's reasons for a {status}: {}",
                        known.join(", ")
                    ),
                ));
            }
            _ => r.clone(),
        },
        (None, Some(r)) => r.to_string(),
        (None, None) => {
            return Err((
                "reason",
                format!("missing: status {status} has no default reason; give Apple's"),
            ));
        }
    };
    if e.timestamp_ms.is_some() && status != 410 {
        return Err(("timestamp_ms", "only a 410 carries a timestamp".into()));
    }
    if let Some(ts) = e.timestamp_ms
        && ts < 0
    {
        return Err((
            "timestamp_ms",
            format!("{ts} is before 1970: give milliseconds since the epoch"),
        ));
    }
    if status == 410 {
        if e.first.is_some() {
            return Err(("first", "a 410 is for good: the device is gone".into()));
        }
        // None: the moment of each answer.
        let timestamp_ms = e.timestamp_ms;
        return Ok(match reason.as_str() {
            "Unregistered" => TokenScript::Unregistered { timestamp_ms },
            "ExpiredToken" => TokenScript::ExpiredToken { timestamp_ms },
            other => {
                return Err((
                    "reason",
                    format!("{other:?}: a 410 is \"Unregistered\" or \"ExpiredToken\""),
                ));
            }
        });
    }
    Ok(match e.first {
        Some(0) => {
            return Err((
                "first",
                "must be at least 1 (leave it out for always)".into(),
            ));
        }
        Some(n) => TokenScript::FailFirst { n, status, reason },
        None if status == 400 && reason == "BadDeviceToken" => TokenScript::BadDeviceToken,
        None => TokenScript::Reason { status, reason },
    })
}

/// Apple's reason for the statuses that have an obvious one.
fn default_reason(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "BadDeviceToken",
        410 => "Unregistered",
        429 => "TooManyRequests",
        500 => "InternalServerError",
        503 => "ServiceUnavailable",
        _ => return None,
    })
}

/// A problem of a top-level key, on the line that sets it.
fn top_level(text: &str, key: &str, message: &str) -> ScriptProblem {
    let line = text.lines().position(|l| {
        l.trim_start()
            .strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with('='))
    });
    ScriptProblem {
        line: line.map(|l| l + 1),
        key: key.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "789224b6789224b6789224b6789224b6789224b6789224b6789224b6789224b6";
    const T2: &str = "0a281d3d0a281d3d0a281d3d0a281d3d";

    fn parse(text: &str) -> Result<SimScript, Vec<ScriptProblem>> {
        SimScript::parse(text)
    }

    #[test]
    fn every_kind_of_entry_becomes_its_script() {
        let s = parse(&format!(
            "latency_ms = 5\ngoaway_after = 10\nstreams_one_until_authorized = true\n\
             [tokens]\n\
             \"{T1}\" = {{ status = 410, timestamp_ms = 77 }}\n\
             \"{}\" = {{ status = 410 }}\n\
             \"{T2}\" = {{ status = 400 }}\n\
             \"{}\" = {{ status = 503, first = 2 }}\n\
             \"{}\" = {{ delay_ms = 250 }}\n\
             \"{}\" = {{ status = 400, reason = \"DeviceTokenNotForTopic\" }}\n\
             \"{}\" = {{ status = 410, reason = \"ExpiredToken\" }}\n\
             \"{}\" = {{ delay_ms = 300, status = 503, first = 1 }}\n",
            "11".repeat(16),
            "22".repeat(16),
            "33".repeat(16),
            "44".repeat(16),
            "AB".repeat(16),
            "55".repeat(16),
        ))
        .unwrap();
        assert_eq!(s.latency, Some(Duration::from_millis(5)));
        assert_eq!(s.goaway_after, Some(10));
        assert_eq!(s.drop_after, None);
        assert!(s.streams_one_until_authorized);
        let by: std::collections::HashMap<_, _> = s.tokens.into_iter().collect();
        assert_eq!(
            by[T1],
            TokenScript::Unregistered {
                timestamp_ms: Some(77)
            }
        );
        assert_eq!(
            by[&"11".repeat(16)],
            TokenScript::Unregistered { timestamp_ms: None }
        );
        assert_eq!(by[T2], TokenScript::BadDeviceToken);
        assert_eq!(
            by[&"22".repeat(16)],
            TokenScript::FailFirst {
                n: 2,
                status: 503,
                reason: "ServiceUnavailable".into()
            }
        );
        assert_eq!(
            by[&"33".repeat(16)],
            TokenScript::Delay(Duration::from_millis(250))
        );
        assert_eq!(
            by[&"44".repeat(16)],
            TokenScript::Reason {
                status: 400,
                reason: "DeviceTokenNotForTopic".into()
            }
        );
        // Tokens are matched in lower case, as pushdrop sends them.
        assert_eq!(
            by[&"ab".repeat(16)],
            TokenScript::ExpiredToken { timestamp_ms: None }
        );
        // A delay beside an answer makes that answer slow.
        let slow = &by[&"55".repeat(16)];
        assert_eq!(
            slow,
            &TokenScript::Slow {
                delay: Duration::from_millis(300),
                then: Box::new(TokenScript::FailFirst {
                    n: 1,
                    status: 503,
                    reason: "ServiceUnavailable".into()
                })
            }
        );
        assert_eq!(
            slow.answer(1),
            (
                Duration::from_millis(300),
                Err((503, "ServiceUnavailable".into(), None))
            )
        );
        assert_eq!(slow.answer(2), (Duration::from_millis(300), Ok(())));
    }

    /// A token scripted twice (in two cases) is said at its later line, naming the earlier
    /// spelling, whichever sorts first (a probe's finding: the first line was named).
    #[test]
    fn a_token_scripted_twice_is_said_at_its_second_line() {
        let (lower, upper) = (T2.replace('a', "b"), T2.replace('a', "B"));
        for (first, second) in [(&lower, &upper), (&upper, &lower)] {
            let problems = parse(&format!(
                "[tokens]\n\"{first}\" = {{ status = 400 }}\n\"{second}\" = {{ status = 400 }}\n"
            ))
            .unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].line, Some(3), "{problems:?}");
            assert_eq!(problems[0].key, format!("tokens.\"{second}\""));
            assert!(
                problems[0]
                    .message
                    .contains(&format!("the same token as \"{first}\"")),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn a_timestamp_before_1970_is_refused() {
        let problems = parse(&format!(
            "[tokens]\n\"{T1}\" = {{ status = 410, timestamp_ms = -5 }}\n"
        ))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, format!("tokens.\"{T1}\".timestamp_ms"));
        assert!(problems[0].message.contains("before 1970"), "{problems:?}");
    }

    #[test]
    fn a_latency_or_delay_over_an_hour_is_refused() {
        let problems = parse(&format!(
            "latency_ms = 3600001\n[tokens]\n\"{T1}\" = {{ delay_ms = 3600001 }}\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "latency_ms".to_string(),
                format!("tokens.\"{T1}\".delay_ms")
            ],
            "{problems:?}"
        );
        assert!(parse("latency_ms = 3600000\n").is_ok());
    }

    #[test]
    fn an_empty_file_is_a_well_behaved_apns() {
        let s = parse("").unwrap();
        assert!(s.tokens.is_empty());
        assert_eq!(
            (s.latency, s.goaway_after, s.drop_after),
            (None, None, None)
        );
    }

    #[test]
    fn every_bad_entry_is_named_with_its_line_and_field() {
        let text = format!(
            "drop_after = 0\n[tokens]\n\
             \"{T1}\" = {{ status = 200 }}\n\
             \"xyz\" = {{ status = 400 }}\n\
             \"{T2}\" = {{ status = 403 }}\n\
             \"{}\" = {{ delay_ms = 5, status = 200 }}\n\
             \"{}\" = {{ status = 410, first = 1 }}\n\
             \"{}\" = {{ reason = \"BadTopic\" }}\n",
            "11".repeat(16),
            "22".repeat(16),
            "33".repeat(16),
        );
        let problems = parse(&text).unwrap_err();
        let got: Vec<(Option<usize>, &str)> =
            problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        let k = |t: &str, f: &str| format!("tokens.\"{t}\".{f}");
        assert!(
            got.contains(&(Some(3), k(T1, "status").as_str())),
            "{problems:?}"
        );
        assert!(got.contains(&(Some(4), "tokens.\"xyz\"")), "{problems:?}");
        assert!(
            got.contains(&(Some(5), k(T2, "reason").as_str())),
            "{problems:?}"
        );
        assert!(
            got.contains(&(Some(6), k(&"11".repeat(16), "status").as_str())),
            "{problems:?}"
        );
        assert!(
            got.contains(&(Some(7), k(&"22".repeat(16), "first").as_str())),
            "{problems:?}"
        );
        assert!(
            got.contains(&(Some(8), k(&"33".repeat(16), "status").as_str())),
            "{problems:?}"
        );
        assert!(got.contains(&(Some(1), "drop_after")), "{problems:?}");
        assert_eq!(problems.len(), 7, "{problems:?}");
    }

    /// `first` (or `reason`, `timestamp_ms`) without a status names what needs it, beside a
    /// `delay_ms` too (which alone would be a slow 200).
    #[test]
    fn first_without_a_status_says_it_needs_one() {
        let text = format!("[tokens]\n\"{T1}\" = {{ delay_ms = 500, first = 1 }}\n");
        let problems = parse(&text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("first needs an error status"),
            "{problems:?}"
        );
    }

    /// A reason is checked against Apple's list for its status (a typo would otherwise be
    /// answered as Apple's word); a status Apple documents no reason for takes any.
    #[test]
    fn a_reason_must_be_apples_for_its_status() {
        let text = format!(
            "[tokens]\n\
             \"{T1}\" = {{ status = 400, reason = \"DeviceTokenNotForTpoic\" }}\n\
             \"{T2}\" = {{ status = 400, reason = \"Unregistered\" }}\n\
             \"{}\" = {{ status = 503, reason = \"Shutdown\" }}\n\
             \"{}\" = {{ status = 502, reason = \"BadGateway\" }}\n",
            "11".repeat(16),
            "22".repeat(16),
        );
        let problems = parse(&text).unwrap_err();
        let got: Vec<(Option<usize>, &str)> =
            problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(2), format!("tokens.\"{T1}\".reason").as_str()),
                (Some(3), format!("tokens.\"{T2}\".reason").as_str()),
            ],
            "{problems:?}"
        );
        assert!(
            problems[0].message.contains("DeviceTokenNotForTopic"),
            "lists Apple's: {problems:?}"
        );
        let ok = parse(&format!(
            "[tokens]\n\"{T2}\" = {{ status = 503, reason = \"Shutdown\" }}\n\
             \"{T1}\" = {{ status = 502, reason = \"Bad \\\"Gateway\\\"\" }}\n"
        ))
        .unwrap();
        assert_eq!(ok.tokens.len(), 2);
        assert!(
            parse(&format!(
                "[tokens]\n\"{T1}\" = {{ status = 502, reason = \" \" }}\n"
            ))
            .is_err()
        );
    }

    #[test]
    fn one_token_in_two_spellings_is_a_problem() {
        let upper = T2.to_uppercase();
        let problems = parse(&format!(
            "[tokens]\n\"{T2}\" = {{ status = 400 }}\n\"{upper}\" = {{ status = 410 }}\n"
        ))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].message.contains("tokens match in any case"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_typo_is_named_with_its_line() {
        let problems = parse(&format!("[tokens]\n\"{T1}\" = {{ stauts = 410 }}\n")).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(2));
        assert!(problems[0].message.contains("stauts"), "{problems:?}");
        let problems = parse("latency = 5\n").unwrap_err();
        assert_eq!(
            (problems[0].line, problems[0].key.as_str()),
            (Some(1), "latency")
        );
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let err = SimScript::load(Path::new("/nonexistent/script.toml")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/script.toml") && text.contains("cannot read"),
            "{text}"
        );
    }
}
