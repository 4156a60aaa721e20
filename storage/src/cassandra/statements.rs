//! Every CQL statement the store runs, built once per keyspace and prepared at connect.
//! Each is marked idempotent or not: the driver's default retry policy retries a timed-out
//! write only when it is idempotent, so lightweight transactions are never blindly retried.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::error::drv;
use super::rows::MESSAGE_COLUMNS;
use crate::error::StorageError;

macro_rules! statements {
    ($( $name:ident, $idempotent:expr, $text:expr; )*) => {
        /// Statement texts for one keyspace (`{ks}` filled in).
        #[derive(Debug, Clone)]
        pub(crate) struct Texts {
            $( pub(crate) $name: String, )*
        }

        impl Texts {
            /// Fills `{ks}` and `{cols}` into every statement.
            pub(crate) fn new(keyspace: &str) -> Self {
                Self {
                    $( $name: String::from($text)
                        .replace("{cols}", MESSAGE_COLUMNS)
                        .replace("{ks}", keyspace), )*
                }
            }

            /// (name, idempotent, text) of every statement.
            #[cfg(test)]
            pub(crate) fn all(&self) -> Vec<(&'static str, bool, &str)> {
                vec![ $( (stringify!($name), $idempotent, self.$name.as_str()), )* ]
            }
        }

        /// The prepared statements.
        #[derive(Debug)]
        pub(crate) struct Prepared {
            $( pub(crate) $name: PreparedStatement, )*
        }

        impl Prepared {
            /// Prepares every statement (the server checks them against the schema).
            pub(crate) async fn prepare(
                session: &Session,
                texts: &Texts,
            ) -> Result<Self, StorageError> {
                Ok(Self {
                    $( $name: {
                        let mut p = session
                            .prepare(texts.$name.as_str())
                            .await
                            .map_err(drv)?;
                        p.set_is_idempotent($idempotent);
                        p
                    }, )*
                })
            }
        }
    };
}

statements! {
    // History. `reply_to` is bound as an unset value when there is none (a bound null would
    // write a tombstone cell per message).
    insert_message, true,
        "INSERT INTO {ks}.messages (chat, bucket, id, sender, client_msg_id, body, reply_to) \
         VALUES (?, ?, ?, ?, ?, ?, ?)";
    message_by_id, true,
        "SELECT {cols} FROM {ks}.messages WHERE chat = ? AND bucket = ? AND id = ?";
    page_backward, true,
        "SELECT {cols} FROM {ks}.messages WHERE chat = ? AND bucket = ? AND id < ? \
         ORDER BY id DESC LIMIT ?";
    page_forward, true,
        "SELECT {cols} FROM {ks}.messages WHERE chat = ? AND bucket = ? AND id > ? \
         ORDER BY id ASC LIMIT ?";
    senders_after, true,
        "SELECT id, sender FROM {ks}.messages WHERE chat = ? AND bucket = ? AND id > ? \
         AND id < ? LIMIT ?";
    insert_bucket, true,
        "INSERT INTO {ks}.chat_buckets (chat, bucket) VALUES (?, ?)";
    buckets_down, true,
        "SELECT bucket FROM {ks}.chat_buckets WHERE chat = ? AND bucket <= ? \
         ORDER BY bucket DESC LIMIT ?";
    buckets_up, true,
        "SELECT bucket FROM {ks}.chat_buckets WHERE chat = ? AND bucket >= ? \
         ORDER BY bucket ASC LIMIT ?";
    set_latest, true,
        "UPDATE {ks}.chat_latest USING TIMESTAMP ? SET last_id = ? WHERE chat = ?";
    latest, true,
        "SELECT last_id FROM {ks}.chat_latest WHERE chat = ?";
    claim_idempotency, false,
        "INSERT INTO {ks}.idempotency (sender, chat, client_msg_id, message_id) \
         VALUES (?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
    set_reaction, true,
        "UPDATE {ks}.messages SET reactions[?] = ? WHERE chat = ? AND bucket = ? AND id = ?";
    delete_reaction, true,
        "DELETE reactions[?] FROM {ks}.messages WHERE chat = ? AND bucket = ? AND id = ?";
    // Chat lists and receipt marks.
    add_user_chat, true,
        "INSERT INTO {ks}.user_chats (user_id, chat) VALUES (?, ?)";
    remove_user_chat, true,
        "DELETE FROM {ks}.user_chats WHERE user_id = ? AND chat = ?";
    user_chats, true,
        "SELECT chat FROM {ks}.user_chats WHERE user_id = ?";
    insert_mark, true,
        "INSERT INTO {ks}.receipt_marks (user_id, chat, kind, id) VALUES (?, ?, ?, ?)";
    prune_marks, true,
        "DELETE FROM {ks}.receipt_marks WHERE user_id = ? AND chat = ? AND kind = ? AND id < ?";
    read_mark, true,
        "SELECT id FROM {ks}.receipt_marks WHERE user_id = ? AND chat = ? AND kind = ? LIMIT 1";
    clear_marks, true,
        "DELETE FROM {ks}.receipt_marks WHERE user_id = ? AND chat = ?";
    // Users.
    claim_user_name, false,
        "INSERT INTO {ks}.users_by_name (name, id, password_hash) VALUES (?, ?, ?) IF NOT EXISTS";
    insert_user, true,
        "INSERT INTO {ks}.users (id, name) VALUES (?, ?)";
    delete_user, true,
        "DELETE FROM {ks}.users WHERE id = ?";
    user_by_name, true,
        "SELECT id, name, password_hash FROM {ks}.users_by_name WHERE name = ?";
    user_by_id, true,
        "SELECT name FROM {ks}.users WHERE id = ?";
    set_password_hash, false,
        "UPDATE {ks}.users_by_name SET password_hash = ? WHERE name = ? \
         IF id = ? AND password_hash = ?";
    signed_out_before, true,
        "SELECT before FROM {ks}.user_sign_outs WHERE id = ? LIMIT 1";
    sign_out_before, true,
        "INSERT INTO {ks}.user_sign_outs (id, before) VALUES (?, ?)";
    // Channels.
    claim_channel_name, false,
        "INSERT INTO {ks}.channels_by_name (name, id) VALUES (?, ?) IF NOT EXISTS";
    mark_private, true,
        "INSERT INTO {ks}.private_channels (id) VALUES (?)";
    unmark_private, true,
        "DELETE FROM {ks}.private_channels WHERE id = ?";
    is_private, true,
        "SELECT id FROM {ks}.private_channels WHERE id = ?";
    add_admin, true,
        "INSERT INTO {ks}.channel_admins (channel_id, user_id) VALUES (?, ?)";
    remove_admin, true,
        "DELETE FROM {ks}.channel_admins WHERE channel_id = ? AND user_id = ?";
    is_admin, true,
        "SELECT user_id FROM {ks}.channel_admins WHERE channel_id = ? AND user_id = ?";
    insert_channel, true,
        "INSERT INTO {ks}.channels (id, name, owner) VALUES (?, ?, ?)";
    delete_channel, true,
        "DELETE FROM {ks}.channels WHERE id = ?";
    channel_by_id, true,
        "SELECT name, owner FROM {ks}.channels WHERE id = ?";
    channel_id_by_name, true,
        "SELECT id FROM {ks}.channels_by_name WHERE name = ?";
    add_member, false,
        "INSERT INTO {ks}.channel_members (channel_id, user_id) VALUES (?, ?) IF NOT EXISTS";
    remove_member, false,
        "DELETE FROM {ks}.channel_members WHERE channel_id = ? AND user_id = ? IF EXISTS";
    member, true,
        "SELECT user_id FROM {ks}.channel_members WHERE channel_id = ? AND user_id = ?";
    members, true,
        "SELECT user_id FROM {ks}.channel_members WHERE channel_id = ?";
    member_count, true,
        "SELECT COUNT(*) FROM {ks}.channel_members WHERE channel_id = ?";
    add_channel_of_user, true,
        "INSERT INTO {ks}.channels_by_user (user_id, channel_id) VALUES (?, ?)";
    remove_channel_of_user, true,
        "DELETE FROM {ks}.channels_by_user WHERE user_id = ? AND channel_id = ?";
    channel_of_user, true,
        "SELECT channel_id FROM {ks}.channels_by_user WHERE user_id = ? AND channel_id = ?";
    channels_of_user, true,
        "SELECT channel_id FROM {ks}.channels_by_user WHERE user_id = ?";
    // Pages: ids above the cursor, in clustering (ascending id) order.
    members_after, true,
        "SELECT user_id FROM {ks}.channel_members WHERE channel_id = ? AND user_id > ? LIMIT ?";
    channels_of_user_after, true,
        "SELECT channel_id FROM {ks}.channels_by_user WHERE user_id = ? AND channel_id > ? \
         LIMIT ?";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_keyspace_and_nothing_is_left_unfilled() {
        let t = Texts::new("ks_test");
        let all = t.all();
        assert!(all.len() > 30);
        for (name, _, text) in &all {
            assert!(text.contains("ks_test."), "{name} misses the keyspace");
            assert!(!text.contains('{') && !text.contains('}'), "{name}: {text}");
            assert!(!text.contains(';'), "{name} ends with ';'");
            assert!(
                text.contains('?'),
                "{name} binds nothing: values must be bound"
            );
        }
        assert!(
            t.message_by_id
                .starts_with("SELECT id, sender, client_msg_id, body, reply_to, reactions FROM")
        );
    }

    #[test]
    fn only_blind_writes_and_reads_are_idempotent() {
        for (name, idempotent, text) in Texts::new("k").all() {
            // Conditional writes: IF [NOT] EXISTS, or a compare-and-set (`... IF <column> =`).
            let lwt = text.contains(" IF NOT EXISTS")
                || text.contains(" IF EXISTS")
                || text.contains(" IF id =");
            assert_eq!(
                idempotent, !lwt,
                "{name}: LWTs are never retried, the rest are"
            );
        }
    }

    #[test]
    fn partition_keys_are_bound_in_every_history_query() {
        let t = Texts::new("k");
        for text in [
            &t.message_by_id,
            &t.page_backward,
            &t.page_forward,
            &t.senders_after,
        ] {
            assert!(text.contains("chat = ? AND bucket = ?"), "{text}");
        }
        assert!(t.page_backward.contains("id < ?") && t.page_backward.contains("DESC"));
        assert!(t.page_forward.contains("id > ?") && t.page_forward.contains("ASC"));
        // Every read of a history or bucket partition is bounded.
        for text in [
            &t.page_backward,
            &t.page_forward,
            &t.senders_after,
            &t.buckets_down,
            &t.buckets_up,
            &t.members_after,
            &t.channels_of_user_after,
        ] {
            assert!(text.ends_with("LIMIT ?"), "{text}");
        }
        assert!(t.claim_idempotency.contains("chat, client_msg_id"));
        assert!(t.claim_idempotency.ends_with("USING TTL ?"));
    }
}
