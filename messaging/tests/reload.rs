//! Reloading a running node (`RunningNode::reload`, what SIGHUP calls):
//!
//! - Certificates rotate to a new PKI (new CAs, client-facing and mesh) without a restart:
//!   connected clients and the mesh link stay up; new clients need the new CA; a peer that
//!   comes back with only the new mesh certificates is accepted, which the old mesh CA would
//!   refuse.
//! - Limits apply to the next request, changed keys that need a restart are reported and left
//!   alone, and a reload with an unreadable certificate applies nothing.
//! - The token secret rotates in three reloads (new key listed; new key signing, old listed;
//!   old key dropped) with a client connected throughout; a missing secret file applies
//!   nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{code_of, config_in, free_udp_port, next_message, text, users_homed_at_each};
use meshchat_client::{Client, ConnectOptions};
use meshchat_idgen::{ChatId, NodeId};
use meshchat_messaging::certs::{self, NodeCerts};
use meshchat_messaging::{NodeConfig, RunningNode};
use meshchat_proto::client::{self as pb, ErrorCode, client_frame};

/// Makes a whole PKI (two CAs, node 1 and 2 leaves) in `dir`.
fn pki(dir: &Path) {
    let nodes: Vec<NodeCerts> = ["1=localhost,127.0.0.1", "2=localhost,127.0.0.1"]
        .iter()
        .map(|s| s.parse().expect("node spec"))
        .collect();
    certs::make(dir, &nodes, 30, false).expect("certificates made");
}

/// Copies every file of `from` over the file of the same name in `to` (an operator
/// installing new certificates where the config points).
fn install(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("pki dir") {
        let path = entry.expect("entry").path();
        let dest = to.join(path.file_name().expect("name"));
        std::fs::copy(&path, &dest).expect("copied");
    }
}

fn static_configs(data: &Path, pki: &Path) -> Vec<NodeConfig> {
    let members = common::static_members(2);
    (0..2usize)
        .map(|i| {
            let id = i as u32 + 1;
            let mut c = config_in(data);
            c.node_id = id;
            c.listen = members[i].client_addr.parse().expect("addr");
            c.tls.cert = Some(pki.join(format!("node-{id}.pem")));
            c.tls.key = Some(pki.join(format!("node-{id}.key")));
            c.cluster.mesh_listen = Some(members[i].mesh_addr);
            c.cluster.members = members.clone();
            c.cluster.ca = Some(pki.join("mesh-ca.pem"));
            c.cluster.cert = Some(pki.join(format!("mesh-node-{id}.pem")));
            c.cluster.key = Some(pki.join(format!("mesh-node-{id}.key")));
            c
        })
        .collect()
}

async fn linked(nodes: &[&RunningNode]) {
    common::wait_for("the mesh link", Duration::from_secs(10), || {
        nodes.iter().all(|n| {
            let mesh = n.mesh.as_ref().expect("mesh");
            mesh.peer_up(NodeId(3 - mesh.me().0))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_to_a_new_pki_on_reload_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (live, old_pki, new_pki) = (
        dir.path().join("live"),
        dir.path().join("old"),
        dir.path().join("new"),
    );
    pki(&old_pki);
    pki(&new_pki);
    std::fs::create_dir_all(&live).expect("live dir");
    install(&old_pki, &live);
    let configs = static_configs(&dir.path().join("data"), &live);
    let mut nodes = Vec::new();
    for c in &configs {
        nodes.push(
            meshchat_messaging::start(c.clone())
                .await
                .expect("node starts"),
        );
    }
    linked(&[&nodes[0], &nodes[1]]).await;
    let homes: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let old_ca =
        ConnectOptions::new(meshchat_client::load_ca(&old_pki.join("ca.pem")).expect("ca"));
    let new_ca =
        ConnectOptions::new(meshchat_client::load_ca(&new_pki.join("ca.pem")).expect("ca"));
    let mut before = users_homed_at_each("b", &homes[0], &old_ca, &homes).await;

    let connects = |n: &RunningNode| {
        let mesh = n.mesh.as_ref().expect("mesh");
        mesh.peer_stats(NodeId(3 - mesh.me().0))
            .expect("peer")
            .connects
    };
    let links_before: Vec<u64> = nodes.iter().map(connects).collect();

    // The operator installs the new PKI's files where the configs point, and reloads.
    install(&new_pki, &live);
    for (n, c) in nodes.iter().zip(&configs) {
        let before = n.node.cert_expiry();
        let r = n.reload(c, None).expect("reloaded");
        assert!(r.applied.is_empty() && r.needs_restart.is_empty(), "{r:?}");
        // The expiry metric follows the certificates now in use (made a moment later).
        let after = n.node.cert_expiry();
        for ((_, b), (_, a)) in before.iter().zip(&after) {
            assert!(a.is_some() && a >= b, "{before:?} -> {after:?}");
        }
    }

    // Connected clients and the mesh link that is up are untouched.
    let to = ChatId::direct(before[0].2.user, before[1].2.user);
    before[0]
        .0
        .send(to, "after the rotation", None)
        .await
        .expect("send");
    assert_eq!(
        text(&next_message(&mut before[1].1).await),
        "after the rotation"
    );
    let links_after: Vec<u64> = nodes.iter().map(connects).collect();
    assert_eq!(links_before, links_after, "the mesh link was made again");
    // New handshakes get the new certificate: only the new CA verifies it.
    assert!(
        Client::connect(&homes[0], old_ca.clone()).await.is_err(),
        "the old CA must no longer verify node 1"
    );
    Client::connect(&homes[1], new_ca.clone())
        .await
        .expect("the new CA verifies node 2");

    // Node 2 comes back with only the new mesh certificates: node 1 accepts its link because
    // it reloaded its mesh CA (with the old one it would refuse the handshake).
    let second = nodes.pop().expect("node 2");
    second.shutdown().await;
    drop(before);
    nodes.push(
        meshchat_messaging::start(configs[1].clone())
            .await
            .expect("node 2 restarts"),
    );
    linked(&[&nodes[0], &nodes[1]]).await;
    let mut after = users_homed_at_each("a", &homes[0], &new_ca, &homes).await;
    let to = ChatId::direct(after[0].2.user, after[1].2.user);
    after[0]
        .0
        .send(to, "over the new mesh link", None)
        .await
        .expect("send");
    assert_eq!(
        text(&next_message(&mut after[1].1).await),
        "over the new mesh link"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reload_at_once_and_a_failed_reload_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_in(dir.path());
    let node = meshchat_messaging::start(config.clone())
        .await
        .expect("node starts");
    let ca = meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("dev CA");
    let (c, _events) = Client::connect(&node.addr.to_string(), ConnectOptions::new(ca.clone()))
        .await
        .expect("connect");
    let me = c.register("ann", "password-123").await.expect("register");
    let chat = ChatId::direct(me.user, me.user);
    c.send(chat, "twenty bytes of text", None)
        .await
        .expect("send");

    // Smaller bodies and one send per second: the connected client's next requests see them.
    let mut tight = config.clone();
    tight.limits.max_body_bytes = 10;
    tight.limits.send_rate_per_sec = 1;
    tight.limits.send_burst = 1;
    let r = node.reload(&tight, None).expect("reloaded");
    assert_eq!(
        r.applied,
        [
            "limits.max_body_bytes",
            "limits.send_burst",
            "limits.send_rate_per_sec"
        ]
    );
    assert!(r.needs_restart.is_empty(), "{r:?}");
    assert_eq!(
        code_of(c.send(chat, "twenty bytes of text", None).await),
        ErrorCode::MessageTooLarge
    );
    c.send(chat, "short", None)
        .await
        .expect("within the new limits");
    // A straight request: the high-level send waits and retries on RATE_LIMITED.
    let again = c
        .request(client_frame::Body::Send(pb::SendMessage {
            client_msg_id: "again".into(),
            chat: Some(meshchat_proto::ids::chat_to_wire(chat)),
            body: "again".into(),
            reply_to: 0,
        }))
        .await;
    assert_eq!(code_of(again), ErrorCode::RateLimited);

    // A key that needs a restart is reported and left as it is.
    let mut moved = tight.clone();
    moved.listen = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    moved.limits.max_frame_bytes /= 2;
    let r = node.reload(&moved, None).expect("reloaded");
    assert_eq!(r.needs_restart, ["limits.max_frame_bytes", "listen"]);
    assert!(r.applied.is_empty(), "{r:?}");
    // Still not applied, so reported again by the next reload of the same file.
    let r = node.reload(&moved, None).expect("reloaded");
    assert_eq!(r.needs_restart, ["limits.max_frame_bytes", "listen"]);

    // A body limit that fits the new frame size but not the running one: refused whole.
    let mut bigger = tight.clone();
    bigger.limits.max_frame_bytes = 256 * 1024;
    bigger.transport.stream_receive_window = 512 * 1024;
    bigger.transport.receive_window = 1024 * 1024;
    bigger.limits.max_body_bytes = 128 * 1024;
    let e = node
        .reload(&bigger, None)
        .expect_err("a body limit over the running frame size");
    assert!(e.to_string().contains("max_body_bytes"), "{e}");
    assert_eq!(node.node.limits().max_body_bytes, 10);
    assert_eq!(
        node.node.limits().max_frame_bytes,
        config.limits.max_frame_bytes
    );

    // A certificate that cannot be read fails the reload; the limits in it are not applied.
    let mut broken = tight.clone();
    broken.limits.max_body_bytes = 1_000;
    broken.tls.cert = Some(dir.path().join("missing.pem"));
    broken.tls.key = Some(dir.path().join("missing.key"));
    let e = node
        .reload(&broken, None)
        .expect_err("an unreadable certificate");
    assert!(e.to_string().contains("missing"), "{e}");
    assert_eq!(node.node.limits().max_body_bytes, 10);
    // The node still serves its certificate and its clients.
    Client::connect(&node.addr.to_string(), ConnectOptions::new(ca))
        .await
        .expect("connect after a failed reload");
    node.shutdown().await;
}

/// The key id a token names.
fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("a key id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_secret_rotates_in_three_reloads_without_a_restart() {
    use meshchat_messaging::auth::{Auth, key_id};
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = tempfile::tempdir().expect("keys");
    let (old_file, new_file) = (keys.path().join("old.key"), keys.path().join("new.key"));
    let old_secret = Auth::load_or_create_secret(&old_file).expect("old secret");
    let new_secret = Auth::load_or_create_secret(&new_file).expect("new secret");
    let (old_kid, new_kid) = (key_id(&old_secret), key_id(&new_secret));
    let mut config = config_in(dir.path());
    config.auth.secret_file = Some(old_file.clone());
    let node = meshchat_messaging::start(config.clone())
        .await
        .expect("node starts");
    let ca = meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("dev CA");
    let opts = ConnectOptions::new(ca);
    let (c, _events) = Client::connect(&node.addr.to_string(), opts.clone())
        .await
        .expect("connect");
    let first = c.register("rot", "password-123").await.expect("register");
    assert_eq!(kid_of(&first.token), old_kid);
    // Authenticates `token` on a new connection: the key id of the token it hands back.
    let auth_with = |token: String| {
        let (addr, opts) = (node.addr.to_string(), opts.clone());
        async move {
            let (c, _e) = Client::connect(&addr, opts).await.expect("connect");
            c.authenticate(&token).await.map(|s| s.token)
        }
    };

    // 1. The new secret listed for verification: tokens still signed with the old one.
    let mut step1 = config.clone();
    step1.auth.previous_secret_files = vec![new_file.clone()];
    let r = node.reload(&step1, None).expect("reloaded");
    assert_eq!(r.applied, ["auth.previous_secret_files"]);
    let t = auth_with(first.token.clone()).await.expect("old token");
    assert_eq!(kid_of(&t), old_kid);

    // 2. Signing with the new one, the old one listed: old tokens verify, new ones carry the
    //    new key.
    let mut step2 = config.clone();
    step2.auth.secret_file = Some(new_file.clone());
    step2.auth.previous_secret_files = vec![old_file.clone()];
    let r = node.reload(&step2, None).expect("reloaded");
    assert_eq!(
        r.applied,
        ["auth.previous_secret_files", "auth.secret_file"]
    );
    let renewed = auth_with(first.token.clone()).await.expect("old token");
    assert_eq!(kid_of(&renewed), new_kid);

    // A missing secret file: refused whole, the keys stay.
    let mut broken = step2.clone();
    broken.auth.previous_secret_files = vec![keys.path().join("missing.key")];
    let e = node
        .reload(&broken, None)
        .expect_err("a missing secret file");
    assert!(e.to_string().contains("missing.key"), "{e}");
    auth_with(first.token.clone())
        .await
        .expect("the old key still verifies");

    // 3. The old secret dropped: its tokens are refused, naming the key; new ones work; the
    //    client connected since before the rotation still sends.
    let mut step3 = config.clone();
    step3.auth.secret_file = Some(new_file.clone());
    node.reload(&step3, None).expect("reloaded");
    let refused = auth_with(first.token.clone()).await;
    assert_eq!(code_of(refused), ErrorCode::TokenInvalid);
    let t = auth_with(renewed).await.expect("a new-key token");
    assert_eq!(kid_of(&t), new_kid);
    c.send(ChatId::direct(first.user, first.user), "still here", None)
        .await
        .expect("the connected client is unaffected");
    node.shutdown().await;
}
