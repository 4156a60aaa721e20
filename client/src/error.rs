//! Client errors.

use meshchat_proto::client::ErrorCode;

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Local setup failed (bad address, bad CA file, TLS config).
    #[error("setup: {0}")]
    Setup(String),
    /// Could not connect to the node.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection is gone.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// No reply in time.
    #[error("request timed out")]
    Timeout,
    /// The node refused the request.
    #[error("{message} ({code:?})")]
    Server {
        /// Protocol error code.
        code: ErrorCode,
        /// The node's readable message.
        message: String,
    },
    /// The node answered with something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Not logged in.
    #[error("not logged in")]
    NotLoggedIn,
}

impl ClientError {
    /// The protocol code, for server errors.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying the same request (same client message id) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Disconnected(_) | ClientError::Timeout | ClientError::Connect(_) => true,
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::RateLimited
                    | ErrorCode::Overloaded
                    | ErrorCode::Unavailable
                    | ErrorCode::Internal
            ),
            _ => false,
        }
    }
}
