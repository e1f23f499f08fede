//! What one push ended as, in the terms the sender acts on. Apple documents a status code and a
//! `reason` string per failure; the sender does not care about the twenty-odd reasons, only
//! about five consequences (invalidate the device, refresh the JWT, retry, pause the app, give
//! up). This module is the one place that maps the former onto the latter, so the table in the
//! spec (4.3) can be checked against a single function.

use std::time::Duration;

/// The result of one push attempt. Apple's reason is always kept verbatim for logs and
/// receipts; local failures (timeouts, resets, TLS) carry a plain-words reason instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200: APNs took the notification.
    Sent {
        /// The `apns-id` APNs answered with (ours, echoed, or one it assigned).
        apns_id: String,
        /// From writing the request to reading the answer.
        latency: Duration,
    },
    /// The device token is dead: 410 `Unregistered`/`ExpiredToken` (with the time APNs last
    /// knew it valid) or 400 `BadDeviceToken`.
    InvalidToken {
        status: u16,
        reason: String,
        /// Milliseconds since the epoch from the 410 body, when APNs gave one.
        timestamp_ms: Option<i64>,
    },
    /// 403 `ExpiredProviderToken`: a fresh JWT is in place (minted now, or minted by a
    /// concurrent request moments ago); resend at once, it does not count as an attempt.
    AuthRefreshed { reason: String },
    /// Try again later with back-off: 429, 5xx, `Shutdown`, `IdleTimeout`, timeouts, resets,
    /// GOAWAY. `unsent` is true when the request provably never reached APNs (refused before
    /// sending, above a GOAWAY's last stream id, no connection), so a resend cannot duplicate.
    Retry {
        status: Option<u16>,
        reason: String,
        unsent: bool,
    },
    /// The connection broke (reset, closed, no GOAWAY) under the request after it had
    /// answered others: the link failed, not the request, which is retried with back-off
    /// without counting an attempt (APNs may have taken it: at-least-once, the same
    /// `apns-id`). Counted, the streams in flight on a connection that drops every so often
    /// spent attempts until they failed, while every connection delivered.
    Cut { reason: String },
    /// The app's credentials or TLS setup are wrong: retrying other devices will fail the same
    /// way, so the sender pauses the app (with back-off) and says why.
    PauseApp { status: Option<u16>, reason: String },
    /// The notification itself is wrong (payload, topic, headers): no retry helps.
    Failed { status: u16, reason: String },
}

impl Outcome {
    /// A short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::InvalidToken { .. } => "invalid_token",
            Outcome::AuthRefreshed { .. } => "auth_refreshed",
            Outcome::Retry { .. } | Outcome::Cut { .. } => "retry",
            Outcome::PauseApp { .. } => "pause_app",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// The reason string (Apple's, or ours), empty for `Sent`.
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Sent { .. } => "",
            Outcome::InvalidToken { reason, .. }
            | Outcome::AuthRefreshed { reason }
            | Outcome::Retry { reason, .. }
            | Outcome::Cut { reason }
            | Outcome::PauseApp { reason, .. }
            | Outcome::Failed { reason, .. } => reason,
        }
    }
}

/// Apple's reasons that mean "the app's credentials are wrong", all 403.
pub const AUTH_PAUSE_REASONS: &[&str] = &[
    "InvalidProviderToken",
    "MissingProviderToken",
    "BadCertificate",
    "BadCertificateEnvironment",
    "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyIdInToken",
    "Forbidden",
];

/// What an APNs error answer asks of us, before the client acts on it (an
/// `ExpiredProviderToken` needs the token signer's help to become an [`Outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Classified {
    /// A final outcome.
    Done(Outcome),
    /// 403 `ExpiredProviderToken`.
    ExpiredToken,
}

/// Maps a non-200 answer onto what the sender does. Unknown reasons fall back on the status
/// class (403 → pause, 4xx → failed, 5xx/429 → retry) and are logged, so a new reason from
/// Apple degrades gracefully instead of being dropped.
pub(crate) fn classify(status: u16, reason: &str, timestamp_ms: Option<i64>) -> Classified {
    let reason_s = if reason.is_empty() {
        format!("HTTP {status}")
    } else {
        reason.to_string()
    };
    let done = Classified::Done;
    match (status, reason) {
        (410, _) | (400, "BadDeviceToken") => done(Outcome::InvalidToken {
            status,
            reason: reason_s,
            timestamp_ms,
        }),
        (403, "ExpiredProviderToken") => Classified::ExpiredToken,
        (403, r) => {
            if !AUTH_PAUSE_REASONS.contains(&r) {
                tracing::warn!(
                    event = "apns_unknown_reason",
                    status,
                    reason = r,
                    "unknown APNs reason; pausing the app as for any 403"
                );
            }
            done(Outcome::PauseApp {
                status: Some(status),
                reason: reason_s,
            })
        }
        // Connection-level conditions that Apple reports on a stream now and then.
        (_, "IdleTimeout" | "Shutdown" | "ServiceUnavailable" | "InternalServerError")
        | (429 | 500 | 502 | 503 | 504, _) => done(Outcome::Retry {
            status: Some(status),
            reason: reason_s,
            unsent: false,
        }),
        (400..=499, r) => {
            if !apple_reasons(status).is_some_and(|known| known.contains(&r)) {
                tracing::warn!(
                    event = "apns_unknown_reason",
                    status,
                    reason = r,
                    "unknown APNs reason; failing the delivery as for any 4xx"
                );
            }
            done(Outcome::Failed {
                status,
                reason: reason_s,
            })
        }
        _ => {
            tracing::warn!(
                event = "apns_unexpected_status",
                status,
                reason,
                "unexpected APNs status; will retry"
            );
            done(Outcome::Retry {
                status: Some(status),
                reason: reason_s,
                unsent: false,
            })
        }
    }
}

/// Apple's documented reasons for a status; `None` for the statuses Apple documents none for
/// (a proxy's 502, say). The simulator's scripts are checked against it, and an answer with
/// a reason Apple does not list for its status is logged as unknown.
pub fn apple_reasons(status: u16) -> Option<&'static [&'static str]> {
    Some(match status {
        400 => &[
            "BadCollapseId",
            "BadDeviceToken",
            "BadExpirationDate",
            "BadMessageId",
            "BadPriority",
            "BadTopic",
            "DeviceTokenNotForTopic",
            "DuplicateHeaders",
            "IdleTimeout",
            "InvalidPushType",
            "MissingDeviceToken",
            "MissingTopic",
            "PayloadEmpty",
            "TopicDisallowed",
        ],
        403 => &[
            "BadCertificate",
            "BadCertificateEnvironment",
            "BadEnvironmentKeyInToken",
            "ExpiredProviderToken",
            "Forbidden",
            "InvalidProviderToken",
            "MissingProviderToken",
            "UnrelatedKeyIdInToken",
        ],
        404 => &["BadPath"],
        405 => &["MethodNotAllowed"],
        410 => &["ExpiredToken", "Unregistered"],
        413 => &["PayloadTooLarge"],
        429 => &["TooManyProviderTokenUpdates", "TooManyRequests"],
        500 => &["InternalServerError"],
        503 => &["ServiceUnavailable", "Shutdown"],
        _ => return None,
    })
}

/// Whether `reason` is one of Apple's documented reasons, for any status.
pub fn is_apple_reason(reason: &str) -> bool {
    [400, 403, 404, 405, 410, 413, 429, 500, 503]
        .into_iter()
        .filter_map(apple_reasons)
        .any(|rs| rs.contains(&reason))
}

/// The JSON body of an APNs error answer.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    pub reason: String,
    pub timestamp: Option<i64>,
}

/// Parses an error body; a body that is not Apple's JSON yields an empty reason (the status
/// class then decides). Each field is read on its own: a `timestamp` of an odd shape (a
/// string, a fraction) must not cost the answer its `reason`.
pub(crate) fn parse_error_body(body: &[u8]) -> ErrorBody {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ErrorBody::default();
    };
    let timestamp = match v.get("timestamp") {
        Some(serde_json::Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    ErrorBody {
        reason: v
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .to_owned(),
        timestamp,
    }
}

/// Pulls Apple's `reason` out of the debug data of a GOAWAY, which h2 only shows through the
/// error's `Debug` text (`GoAway(b"{\"reason\":\"Shutdown\"}", NO_ERROR, Remote)`).
pub(crate) fn goaway_reason(debug: &str) -> Option<String> {
    let start = debug.find("reason")? + "reason".len();
    let rest = &debug[start..];
    let word_start = rest.find(|c: char| c.is_ascii_alphanumeric())?;
    let word: String = rest[word_start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!word.is_empty()).then_some(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(status: u16, reason: &str) -> Outcome {
        match classify(status, reason, None) {
            Classified::Done(o) => o,
            Classified::ExpiredToken => Outcome::AuthRefreshed {
                reason: reason.into(),
            },
        }
    }

    #[test]
    fn every_documented_reason_is_classified() {
        let table: &[(u16, &str, &str)] = &[
            (400, "BadCollapseId", "failed"),
            (400, "BadDeviceToken", "invalid_token"),
            (400, "BadExpirationDate", "failed"),
            (400, "BadMessageId", "failed"),
            (400, "BadPriority", "failed"),
            (400, "BadTopic", "failed"),
            (400, "DeviceTokenNotForTopic", "failed"),
            (400, "DuplicateHeaders", "failed"),
            (400, "IdleTimeout", "retry"),
            (400, "InvalidPushType", "failed"),
            (400, "MissingDeviceToken", "failed"),
            (400, "MissingTopic", "failed"),
            (400, "PayloadEmpty", "failed"),
            (400, "TopicDisallowed", "failed"),
            (403, "BadCertificate", "pause_app"),
            (403, "BadCertificateEnvironment", "pause_app"),
            (403, "ExpiredProviderToken", "auth_refreshed"),
            (403, "Forbidden", "pause_app"),
            (403, "InvalidProviderToken", "pause_app"),
            (403, "MissingProviderToken", "pause_app"),
            (403, "UnrelatedKeyIdInToken", "pause_app"),
            (403, "BadEnvironmentKeyIdInToken", "pause_app"),
            (404, "BadPath", "failed"),
            (405, "MethodNotAllowed", "failed"),
            (410, "ExpiredToken", "invalid_token"),
            (410, "Unregistered", "invalid_token"),
            (413, "PayloadTooLarge", "failed"),
            (429, "TooManyProviderTokenUpdates", "retry"),
            (429, "TooManyRequests", "retry"),
            (500, "InternalServerError", "retry"),
            (503, "ServiceUnavailable", "retry"),
            (503, "Shutdown", "retry"),
        ];
        for &(status, reason, kind) in table {
            let o = out(status, reason);
            assert_eq!(o.kind(), kind, "{status} {reason}: {o:?}");
            assert_eq!(o.reason(), reason, "Apple's reason is kept verbatim");
        }
    }

    #[test]
    fn unregistered_keeps_timestamp() {
        assert_eq!(
            classify(410, "Unregistered", Some(1_700_000_000_000)),
            Classified::Done(Outcome::InvalidToken {
                status: 410,
                reason: "Unregistered".into(),
                timestamp_ms: Some(1_700_000_000_000)
            })
        );
    }

    #[test]
    fn unknown_reasons_fall_back_on_status_class() {
        assert_eq!(out(400, "SomethingNew").kind(), "failed");
        assert_eq!(out(403, "SomethingNew").kind(), "pause_app");
        assert_eq!(out(502, "").kind(), "retry");
        assert_eq!(out(502, "").reason(), "HTTP 502");
        assert_eq!(out(302, "").kind(), "retry");
        assert_eq!(out(418, "").kind(), "failed");
    }

    #[test]
    fn error_bodies_parse_leniently() {
        let b = parse_error_body(br#"{"reason":"Unregistered","timestamp":1700000000000}"#);
        assert_eq!(b.reason, "Unregistered");
        assert_eq!(b.timestamp, Some(1_700_000_000_000));
        // An odd timestamp keeps the reason, and a number in a string is still read.
        let b = parse_error_body(br#"{"reason":"Unregistered","timestamp":"soon"}"#);
        assert_eq!((b.reason.as_str(), b.timestamp), ("Unregistered", None));
        let b = parse_error_body(br#"{"reason":"ExpiredToken","timestamp":"1700000000000"}"#);
        assert_eq!(
            (b.reason.as_str(), b.timestamp),
            ("ExpiredToken", Some(1_700_000_000_000))
        );
        let b = parse_error_body(b"<html>bad gateway</html>");
        assert_eq!(b.reason, "");
        assert_eq!(b.timestamp, None);
    }

    #[test]
    fn goaway_debug_reason_is_extracted() {
        assert_eq!(
            goaway_reason(r#"GoAway(b"{\"reason\":\"Shutdown\"}", NO_ERROR, Remote)"#),
            Some("Shutdown".into())
        );
        assert_eq!(goaway_reason(r#"GoAway(b"", NO_ERROR, Remote)"#), None);
    }
}
