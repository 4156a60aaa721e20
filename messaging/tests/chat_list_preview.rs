//! The chat list's preview of the newest message is cut to a bound, but never inside a
//! character: a client decoding it as UTF-8 must not get half an emoji.

mod common;

use common::TestNode;
use meshchat_idgen::ChatId;

/// The preview bound (node/mod.rs `CHAT_LIST_PREVIEW_BYTES`).
const PREVIEW: usize = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_list_preview_never_cuts_a_character() {
    let node = TestNode::start().await;
    let (alice, _ae, a) = node.user("alice").await;
    let (bob, _be, b) = node.user("bob").await;
    let chat = ChatId::direct(a.user, b.user);
    // The bound falls 1, 2 or 3 bytes into a 2-, 3- or 4-byte character.
    for (pad, c) in [
        (PREVIEW - 1, 'é'),
        (PREVIEW - 2, '中'),
        (PREVIEW - 1, '😀'),
        (PREVIEW - 3, '😀'),
    ] {
        let mut body = "a".repeat(pad);
        while body.len() < PREVIEW + 64 {
            body.push(c);
        }
        alice
            .send(chat, body.clone().into_bytes(), None)
            .await
            .expect("send");
        let list = bob.chat_list().await.expect("chat list");
        let newest = list[0].newest.as_ref().expect("newest");
        let preview = std::str::from_utf8(&newest.body)
            .unwrap_or_else(|e| panic!("{c:?} after {pad} bytes: preview is not UTF-8: {e}"));
        assert_eq!(preview, &body[..body.floor_char_boundary(PREVIEW)]);
    }
}
