//! Mapping between CQL values and the model: id and bucket arithmetic, message rows,
//! receipt-mark kinds, and lightweight-transaction (`IF NOT EXISTS`) results.

use std::collections::BTreeMap;

use bytes::Bytes;
use meshchat_idgen::{ChatId, MessageId, UserId};
use scylla::DeserializeRow;
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row};

use super::error::{CassandraError, drv};
use crate::error::StorageError;
use crate::model::{Reaction, ReceiptKind, StoredMessage};

/// Ids are u64 in the model and `bigint` in CQL; Snowflakes never set the sign bit, other
/// values round-trip by bit pattern (as in the embedded store).
pub(crate) fn i(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`i`].
pub(crate) fn u(v: i64) -> u64 {
    v as u64
}

/// The history bucket of a message id: its Snowflake millisecond divided by the bucket
/// width. Monotonic in the id, so buckets are ordered like the ids they hold.
pub fn bucket_of(id: MessageId, width_ms: u64) -> i32 {
    let width = width_ms.max(1);
    i32::try_from(id.snowflake().ms_since_epoch() / width).unwrap_or(i32::MAX)
}

/// The text key of a chat (`d:<low>:<high>` or `c:<channel>`).
pub(crate) fn chat_key(chat: ChatId) -> String {
    chat.to_string()
}

/// Parses a stored chat key.
pub(crate) fn parse_chat(s: &str) -> Result<ChatId, StorageError> {
    s.parse::<ChatId>()
        .map_err(|e| CassandraError::Data(e.to_string()).into())
}

/// The `kind` column of `receipt_marks`.
pub(crate) fn mark_kind(kind: ReceiptKind) -> i8 {
    match kind {
        ReceiptKind::Delivered => 1,
        ReceiptKind::Seen => 2,
    }
}

/// One `messages` row, as selected by [`MESSAGE_COLUMNS`].
#[derive(Debug, Clone, PartialEq, Eq, DeserializeRow)]
pub(crate) struct MessageRow {
    pub(crate) id: i64,
    pub(crate) sender: i64,
    pub(crate) client_msg_id: Option<String>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) reply_to: Option<i64>,
    pub(crate) reactions: Option<BTreeMap<i64, String>>,
}

/// The columns every message query selects, in [`MessageRow`] order.
pub(crate) const MESSAGE_COLUMNS: &str = "id, sender, client_msg_id, body, reply_to, reactions";

impl MessageRow {
    /// The model message, reactions ordered by user id.
    pub(crate) fn into_message(self, chat: ChatId) -> StoredMessage {
        let mut reactions: Vec<Reaction> = self
            .reactions
            .unwrap_or_default()
            .into_iter()
            .map(|(user, emoji)| Reaction {
                user: UserId(u(user)),
                emoji,
            })
            .collect();
        reactions.sort();
        StoredMessage {
            id: MessageId(u(self.id)),
            chat,
            sender: UserId(u(self.sender)),
            client_msg_id: self.client_msg_id.unwrap_or_default(),
            body: Bytes::from(self.body.unwrap_or_default()),
            reply_to: self.reply_to.map(|r| MessageId(u(r))),
            reactions,
        }
    }
}

/// What a lightweight transaction did: applied, or not, with the row that stopped it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LwtOutcome {
    /// `[applied]`.
    pub(crate) applied: bool,
    /// The existing row's columns (only when not applied), by name.
    pub(crate) existing: BTreeMap<String, CqlValue>,
}

impl LwtOutcome {
    /// Builds the outcome from column names and values (the first column is `[applied]`).
    pub(crate) fn from_columns(
        names: &[String],
        values: Vec<Option<CqlValue>>,
    ) -> Result<Self, StorageError> {
        let mut applied = None;
        let mut existing = BTreeMap::new();
        for (name, value) in names.iter().zip(values) {
            if name == "[applied]" {
                applied = value.as_ref().and_then(CqlValue::as_boolean);
            } else if let Some(v) = value {
                existing.insert(name.clone(), v);
            }
        }
        let applied =
            applied.ok_or_else(|| CassandraError::Data("LWT result without [applied]".into()))?;
        Ok(Self { applied, existing })
    }

    /// A bigint column of the existing row.
    pub(crate) fn existing_bigint(&self, name: &str) -> Option<i64> {
        self.existing.get(name).and_then(CqlValue::as_bigint)
    }

    /// A text column of the existing row.
    #[cfg(test)]
    pub(crate) fn existing_text(&self, name: &str) -> Option<&str> {
        self.existing
            .get(name)
            .and_then(CqlValue::as_text)
            .map(String::as_str)
    }
}

/// Reads the result of an `INSERT ... IF NOT EXISTS` / `DELETE ... IF EXISTS`.
pub(crate) fn lwt_outcome(result: QueryResult) -> Result<LwtOutcome, StorageError> {
    let rows = result.into_rows_result().map_err(drv)?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(drv)?
        .ok_or_else(|| CassandraError::Data("LWT result without a row".into()))?;
    LwtOutcome::from_columns(&names, row.columns)
}

#[cfg(test)]
mod tests {
    use meshchat_idgen::{ChannelId, Snowflake};

    use super::*;

    const DAY: u64 = 86_400_000;

    fn id_at(ms: u64, seq: u64) -> MessageId {
        MessageId(Snowflake::from_parts(ms, 7, seq).0)
    }

    #[test]
    fn buckets_split_at_width_boundaries() {
        assert_eq!(bucket_of(MessageId(0), DAY), 0);
        assert_eq!(bucket_of(id_at(DAY - 1, 4095), DAY), 0);
        assert_eq!(bucket_of(id_at(DAY, 0), DAY), 1);
        assert_eq!(bucket_of(id_at(10 * DAY + 5, 0), DAY), 10);
        assert_eq!(bucket_of(id_at(3_600_000, 0), 3_600_000), 1);
        // The largest Snowflake timestamp stays in range at the smallest width.
        let max = MessageId(Snowflake::from_parts((1 << 41) - 1, 1023, 4095).0);
        let min = super::super::config::MIN_BUCKET_WIDTH_MS;
        assert_eq!(bucket_of(max, min), (((1u64 << 41) - 1) / min) as i32);
        assert!(bucket_of(max, min) < i32::MAX);
        assert_eq!(
            bucket_of(max, 1_024),
            i32::MAX,
            "1,024 ms is the narrowest that fits"
        );
        // Ids with the sign bit set (not Snowflakes) clamp instead of wrapping.
        assert_eq!(bucket_of(MessageId(u64::MAX), 1_024), i32::MAX);
    }

    #[test]
    fn buckets_order_like_ids() {
        let ids: Vec<MessageId> = (0..200u64)
            .map(|n| id_at(n * 7_777_777, n % 4096))
            .collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1]);
            assert!(bucket_of(w[0], DAY) <= bucket_of(w[1], DAY));
        }
        // Same millisecond, different workers and sequences: same bucket.
        let a = MessageId(Snowflake::from_parts(5 * DAY, 0, 0).0);
        let b = MessageId(Snowflake::from_parts(5 * DAY, 1023, 4095).0);
        assert_eq!(bucket_of(a, DAY), bucket_of(b, DAY));
    }

    #[test]
    fn ids_round_trip_through_bigint() {
        for v in [0, 1, u64::from(u32::MAX), (1 << 63) - 1, 1 << 63, u64::MAX] {
            assert_eq!(u(i(v)), v);
        }
    }

    #[test]
    fn message_rows_map_to_the_model() {
        let chat = ChatId::direct(UserId(5), UserId(3));
        let row = MessageRow {
            id: 42,
            sender: 3,
            client_msg_id: Some("c-1".into()),
            body: Some(b"hi".to_vec()),
            reply_to: Some(40),
            reactions: Some(BTreeMap::from([(9, "🎉".into()), (5, "👍".into())])),
        };
        let m = row.into_message(chat);
        assert_eq!(m.id, MessageId(42));
        assert_eq!(m.chat, chat);
        assert_eq!(m.sender, UserId(3));
        assert_eq!(m.client_msg_id, "c-1");
        assert_eq!(&m.body[..], b"hi");
        assert_eq!(m.reply_to, Some(MessageId(40)));
        assert_eq!(
            m.reactions,
            vec![
                Reaction {
                    user: UserId(5),
                    emoji: "👍".into()
                },
                Reaction {
                    user: UserId(9),
                    emoji: "🎉".into()
                },
            ]
        );
        // Null columns (an empty map is stored as null) map to empty values.
        let bare = MessageRow {
            id: 1,
            sender: 2,
            client_msg_id: None,
            body: None,
            reply_to: None,
            reactions: None,
        }
        .into_message(ChatId::Channel(ChannelId(8)));
        assert!(bare.reactions.is_empty() && bare.body.is_empty() && bare.reply_to.is_none());
    }

    #[test]
    fn chat_keys_round_trip() {
        for chat in [
            ChatId::direct(UserId(9), UserId(2)),
            ChatId::Channel(ChannelId(77)),
        ] {
            assert_eq!(parse_chat(&chat_key(chat)).expect("parses"), chat);
        }
        assert!(parse_chat("x:1").is_err());
    }

    #[test]
    fn lwt_results_are_read_by_name() {
        let names: Vec<String> = ["[applied]", "sender", "client_msg_id", "chat", "message_id"]
            .map(String::from)
            .to_vec();
        let not_applied = LwtOutcome::from_columns(
            &names,
            vec![
                Some(CqlValue::Boolean(false)),
                Some(CqlValue::BigInt(3)),
                Some(CqlValue::Text("c-1".into())),
                Some(CqlValue::Text("d:3:5".into())),
                Some(CqlValue::BigInt(99)),
            ],
        )
        .expect("outcome");
        assert!(!not_applied.applied);
        assert_eq!(not_applied.existing_bigint("message_id"), Some(99));
        assert_eq!(not_applied.existing_text("chat"), Some("d:3:5"));
        assert_eq!(not_applied.existing_bigint("missing"), None);
        let applied = LwtOutcome::from_columns(
            &["[applied]".to_owned()],
            vec![Some(CqlValue::Boolean(true))],
        )
        .expect("outcome");
        assert!(applied.applied && applied.existing.is_empty());
        assert!(LwtOutcome::from_columns(&names[1..], vec![Some(CqlValue::BigInt(1))]).is_err());
    }

    #[test]
    fn mark_kinds_are_distinct() {
        assert_ne!(
            mark_kind(ReceiptKind::Delivered),
            mark_kind(ReceiptKind::Seen)
        );
    }
}
