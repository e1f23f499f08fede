//! The domain types that travel from a drop file through the store to APNs: validated records,
//! push types and their rules, and delivery states. They live here, apart from any one stage,
//! so that the inbox, the store and the sender agree on them without depending on each other.

use std::fmt;

use crate::config::Environment;

/// Apple's `apns-push-type` values, with the rules Apple attaches to each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PushType {
    Alert,
    Background,
    Voip,
    Location,
    Complication,
    Fileprovider,
    Mdm,
    Liveactivity,
    Pushtotalk,
    Widgets,
    Controls,
}

impl PushType {
    /// Every push type, in the order of Apple's documentation.
    pub const ALL: [PushType; 11] = [
        PushType::Alert,
        PushType::Background,
        PushType::Voip,
        PushType::Location,
        PushType::Complication,
        PushType::Fileprovider,
        PushType::Mdm,
        PushType::Liveactivity,
        PushType::Pushtotalk,
        PushType::Widgets,
        PushType::Controls,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
            PushType::Voip => "voip",
            PushType::Location => "location",
            PushType::Complication => "complication",
            PushType::Fileprovider => "fileprovider",
            PushType::Mdm => "mdm",
            PushType::Liveactivity => "liveactivity",
            PushType::Pushtotalk => "pushtotalk",
            PushType::Widgets => "widgets",
            PushType::Controls => "controls",
        }
    }

    /// Parses the header value.
    pub fn parse(s: &str) -> Option<PushType> {
        PushType::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// What Apple requires after the bundle id in `apns-topic` for this push type.
    pub fn topic_suffix(self) -> &'static str {
        match self {
            PushType::Voip => ".voip",
            PushType::Complication => ".complication",
            PushType::Fileprovider => ".pushkit.fileprovider",
            PushType::Location => ".location-query",
            PushType::Liveactivity => ".push-type.liveactivity",
            PushType::Pushtotalk => ".voip-ptt",
            PushType::Widgets => ".push-type.widgets",
            PushType::Controls => ".push-type.controls",
            PushType::Alert | PushType::Background | PushType::Mdm => "",
        }
    }

    /// The `apns-priority` used when a record names none: Apple requires 5 for background
    /// pushes; 10 (immediate) otherwise.
    pub fn default_priority(self) -> u8 {
        match self {
            PushType::Background => 5,
            _ => 10,
        }
    }

    /// Whether Apple accepts this priority for this push type.
    pub fn allows_priority(self, p: u8) -> bool {
        match self {
            PushType::Background => p == 5 || p == 1,
            _ => matches!(p, 1 | 5 | 10),
        }
    }

    /// Apple's payload limit in bytes.
    pub fn max_payload_bytes(self) -> usize {
        match self {
            PushType::Voip => 5120,
            _ => 4096,
        }
    }
}

impl fmt::Display for PushType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a notification goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// These device tokens (lowercase hex), registered or not.
    Tokens(Vec<String>),
    /// Every active device of these users.
    Users(Vec<String>),
    /// Every active device of the app.
    All,
}

impl Target {
    /// `tokens`, `users` or `all`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Tokens(_) => "tokens",
            Target::Users(_) => "users",
            Target::All => "all",
        }
    }
}

/// What a device record asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    Register,
    Unregister,
}

/// A validated `{"type": "device", ...}` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The configured app (resolved when the file omitted it).
    pub app: String,
    /// Lowercase hex.
    pub token: String,
    /// The dropping system's user id, if any.
    pub user: Option<String>,
    /// The device's environment (the app's default when the record omitted it).
    pub environment: Environment,
    pub action: DeviceAction,
}

/// A validated `{"type": "notification", ...}` record, with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRecord {
    /// The configured app.
    pub app: String,
    /// Idempotency key; `None` when the file gave none (the store assigns one).
    pub id: Option<String>,
    pub target: Target,
    /// The payload JSON exactly as it appeared in the file.
    pub payload: String,
    pub push_type: PushType,
    pub priority: u8,
    /// `apns-topic`: the bundle id plus the push type's suffix, or the record's own `topic`.
    pub topic: String,
    pub collapse_id: Option<String>,
    /// UNIX seconds; never sent after it.
    pub expiration: Option<i64>,
    /// UNIX milliseconds; not sent before it.
    pub send_at_ms: Option<i64>,
    /// The app's environment: the one of tokens named in `to.tokens` that never registered.
    pub environment: Environment,
}

/// One record of a drop file, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Device(DeviceRecord),
    Notification(NotificationRecord),
}

/// Where a delivery stands. The last four are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    /// Waiting to be sent (or resent).
    Queued,
    Sent,
    Failed,
    Expired,
    InvalidToken,
}

impl DeliveryState {
    /// Every state, queued first.
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Queued,
        DeliveryState::Sent,
        DeliveryState::Failed,
        DeliveryState::Expired,
        DeliveryState::InvalidToken,
    ];

    /// The name in status output, receipts and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Sent => "sent",
            DeliveryState::Failed => "failed",
            DeliveryState::Expired => "expired",
            DeliveryState::InvalidToken => "invalid_token",
        }
    }

    /// The integer stored in SQLite.
    pub fn code(self) -> i64 {
        match self {
            DeliveryState::Queued => 0,
            DeliveryState::Sent => 1,
            DeliveryState::Failed => 2,
            DeliveryState::Expired => 3,
            DeliveryState::InvalidToken => 4,
        }
    }

    /// Inverse of [`DeliveryState::code`].
    pub fn from_code(c: i64) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|s| s.code() == c)
    }

    /// Whether nothing more will happen to the delivery (until `pushdrop retry`).
    pub fn is_final(self) -> bool {
        self != DeliveryState::Queued
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token shortened for logs: enough to find it, not enough to misuse it.
pub fn token_prefix(token: &str) -> &str {
    &token[..token.len().min(8)]
}

/// Milliseconds since the UNIX epoch, the one clock unit of the store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_types_round_trip_and_know_their_rules() {
        for p in PushType::ALL {
            assert_eq!(PushType::parse(p.as_str()), Some(p));
            assert!(p.allows_priority(p.default_priority()));
        }
        assert_eq!(PushType::Voip.topic_suffix(), ".voip");
        assert_eq!(
            PushType::Liveactivity.topic_suffix(),
            ".push-type.liveactivity"
        );
        assert!(!PushType::Background.allows_priority(10));
        assert_eq!(PushType::Voip.max_payload_bytes(), 5120);
        assert_eq!(PushType::Alert.max_payload_bytes(), 4096);
    }

    #[test]
    fn states_round_trip() {
        for s in DeliveryState::ALL {
            assert_eq!(DeliveryState::from_code(s.code()), Some(s));
        }
    }
}
