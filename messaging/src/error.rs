//! Request errors and the one place they become protocol error codes.
//!
//! Handlers return [`RequestError`]; [`RequestError::code`] maps each variant (and each storage
//! error) to an [`ErrorCode`]. Nothing else in the node picks codes, and no code is chosen by
//! matching on error text.

use meshchat_proto::client::{self, ErrorCode};
use meshchat_storage::StorageError;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The frame had no body we know.
    #[error("unknown request type")]
    UnknownRequest,
    /// The request needs an authenticated connection.
    #[error("authenticate first (register, login or authenticate)")]
    Unauthenticated,
    /// Already authenticated; a connection authenticates once.
    #[error("this connection is already authenticated")]
    AlreadyAuthenticated,
    /// A field is missing or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The body is over the node's maximum.
    #[error("message body of {len} bytes is over the maximum of {max}")]
    MessageTooLarge {
        /// Body length.
        len: usize,
        /// Configured maximum.
        max: u32,
    },
    /// A rate limit was hit (sends, other events, password attempts).
    #[error("rate limit exceeded; retry in {retry_after_ms} ms")]
    RateLimited {
        /// When a send would be accepted again.
        retry_after_ms: u64,
    },
    /// Unsupported protocol version.
    #[error("protocol version {got} is not supported (this node speaks {want})")]
    VersionMismatch {
        /// What the client asked for.
        got: u32,
        /// What we speak.
        want: u32,
    },
    /// Wrong user name or password.
    #[error("wrong user name or password")]
    BadCredentials,
    /// The token's signature or claims are wrong.
    #[error("invalid token: {0}")]
    TokenInvalid(String),
    /// The token has expired.
    #[error("token expired; log in again")]
    TokenExpired,
    /// Not a member of the chat or channel.
    #[error("{0}")]
    Forbidden(String),
    /// No user by that name or id.
    #[error("unknown user {}", clip(.0))]
    UnknownUser(String),
    /// No channel by that name.
    #[error("no channel named {:?}", clip(.0))]
    UnknownChannelName(String),
    /// A node-side bound was hit (hashing queue, id generator).
    #[error("{0}")]
    Overloaded(String),
    /// The node lost its worker-id lease (cut off from the cluster's membership for longer
    /// than the lease, or another process holds it): it serves nobody until it holds it again.
    #[error("this node is fenced (cut off from cluster membership); connect to another node")]
    Fenced,
    /// Storage refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A request that is not safe to replay came in 0-RTT early data.
    #[error(
        "this request came in 0-RTT early data and is not safe to replay: send it again once \
         the handshake is complete"
    )]
    TooEarly,
    /// Anything else that is the node's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// The protocol code for this error. The single mapping from error types to codes.
    pub fn code(&self) -> ErrorCode {
        use RequestError as E;
        match self {
            E::UnknownRequest => ErrorCode::UnknownRequest,
            E::Unauthenticated => ErrorCode::Unauthenticated,
            E::AlreadyAuthenticated | E::InvalidArgument(_) => ErrorCode::InvalidArgument,
            E::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            E::RateLimited { .. } => ErrorCode::RateLimited,
            E::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            E::BadCredentials => ErrorCode::BadCredentials,
            E::TokenInvalid(_) => ErrorCode::TokenInvalid,
            E::TokenExpired => ErrorCode::TokenExpired,
            E::Forbidden(_) => ErrorCode::Forbidden,
            E::UnknownUser(_) => ErrorCode::UnknownUser,
            E::UnknownChannelName(_) => ErrorCode::UnknownChannel,
            E::Overloaded(_) => ErrorCode::Overloaded,
            E::Fenced => ErrorCode::Unavailable,
            E::Internal(_) => ErrorCode::Internal,
            E::TooEarly => ErrorCode::TooEarly,
            E::Storage(s) => match s {
                StorageError::UserExists(_) => ErrorCode::UserExists,
                StorageError::ChannelExists(_) => ErrorCode::ChannelExists,
                StorageError::UnknownUser(_) => ErrorCode::UnknownUser,
                StorageError::UnknownChannel(_) => ErrorCode::UnknownChannel,
                StorageError::UnknownMessage { .. } => ErrorCode::UnknownMessage,
                StorageError::NotMember { .. } => ErrorCode::Forbidden,
                StorageError::InvalidArgument(_) => ErrorCode::InvalidArgument,
                StorageError::Overloaded { .. } => ErrorCode::Overloaded,
                StorageError::Closed => ErrorCode::Unavailable,
                StorageError::SchemaTooNew { .. } | StorageError::Backend(_) => ErrorCode::Internal,
            },
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> client::Error {
        let message = match self {
            // Do not leak engine internals to clients; they are in the node's log.
            RequestError::Storage(StorageError::Backend(_)) => "storage failure".to_owned(),
            other => other.to_string(),
        };
        client::Error {
            code: self.code() as i32,
            message,
        }
    }
}

/// Codes used to close QUIC connections (the application error code of CONNECTION_CLOSE).
/// They reuse the protocol's [`ErrorCode`] numbers so clients decode both the same way.
pub fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as i32 as u32)
}

/// Client input quoted in an error message, cut to 64 characters: an error always fits a
/// frame, however long the name a client sent.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => std::borrow::Cow::Borrowed(s),
        Some((cut, _)) => std::borrow::Cow::Owned(format!("{}...", &s[..cut])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshchat_idgen::{ChatId, MessageId, UserId};

    #[test]
    fn storage_errors_map_to_their_codes() {
        let chat = ChatId::direct(UserId(1), UserId(2));
        let cases = [
            (StorageError::UserExists("a".into()), ErrorCode::UserExists),
            (
                StorageError::UnknownMessage {
                    chat,
                    id: MessageId(3),
                },
                ErrorCode::UnknownMessage,
            ),
            (
                StorageError::NotMember {
                    user: UserId(9),
                    chat,
                },
                ErrorCode::Forbidden,
            ),
            (
                StorageError::Overloaded { waited_ms: 5 },
                ErrorCode::Overloaded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(RequestError::from(err).code(), code);
        }
    }

    #[test]
    fn backend_details_stay_in_the_log() {
        let e = RequestError::from(StorageError::backend(std::io::Error::other("disk on fire")));
        let p = e.to_proto();
        assert_eq!(p.code, ErrorCode::Internal as i32);
        assert!(!p.message.contains("disk on fire"));
    }

    #[test]
    fn quoted_input_is_clipped_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(100);
        let c = clip(&long);
        assert_eq!(c.chars().count(), 64 + 3);
        assert!(c.ends_with("..."));
        let e = RequestError::UnknownChannelName("\u{1}".repeat(20_000));
        assert!(e.to_string().len() < 500, "{}", e.to_string().len());
    }
}
