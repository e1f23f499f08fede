//! The APNs client (placeholder API until the client lands; replaced wholesale).

use std::sync::Arc;
use std::time::Duration;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    #[error("{0}")]
    Other(String),
}

/// One push to send.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub app: Arc<str>,
    pub environment: crate::config::Environment,
    pub token: String,
    pub apns_id: String,
    pub topic: String,
    pub push_type: crate::model::PushType,
    pub priority: u8,
    pub expiration: Option<i64>,
    pub collapse_id: Option<String>,
    pub payload: bytes::Bytes,
}

/// What APNs said, classified by what the sender must do.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sent {
        apns_id: String,
        latency: Duration,
    },
    InvalidToken {
        status: u16,
        reason: String,
        timestamp_ms: Option<i64>,
    },
    AuthRefreshed {
        reason: String,
    },
    Retry {
        status: Option<u16>,
        reason: String,
        unsent: bool,
    },
    PauseApp {
        status: Option<u16>,
        reason: String,
    },
    Failed {
        status: u16,
        reason: String,
    },
}

/// The client.
#[derive(Clone)]
pub struct ApnsClient;

impl ApnsClient {
    /// Builds the client.
    pub fn new(_cfg: &crate::config::Config) -> Result<ApnsClient, ApnsError> {
        Ok(ApnsClient)
    }

    /// Sends one push.
    pub async fn send(&self, _req: PushRequest) -> Outcome {
        Outcome::Retry {
            status: None,
            reason: "not built".into(),
            unsent: true,
        }
    }
}
