//! Security checks a node makes before it serves anyone: secrets only its user can read,
//! created whole, and a mesh certificate that names the node.

mod common;

use std::os::unix::fs::PermissionsExt;

use meshchat_messaging::StartError;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

/// A node's first start writes its token key and the development CA keys owner-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_created_owner_only() {
    let node = common::TestNode::start().await;
    let dir = node.dir.path();
    for name in ["token.key", "ca.key"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    // The mesh CA is created with the first mesh identity.
    meshchat_messaging::tls::dev_mesh_identity(dir, 1).expect("mesh identity");
    assert_eq!(mode(&dir.join("mesh-ca.key")), 0o600);
    // Public halves stay readable.
    assert_eq!(mode(&dir.join("ca.pem")) & 0o044, 0o044);
}

/// Whoever can read the token key can mint a token for any account, and whoever can read a CA
/// key can sign a node: a node refuses to start on either when group or others can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_a_secret_others_can_read() {
    for secret in ["token.key", "ca.key"] {
        let dir = tempfile::tempdir().expect("dir");
        // Created by a first start, then exposed.
        let first = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect("first start");
        first.shutdown().await;
        let path = dir.path().join(secret);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("readable by group or others") && text.contains(secret),
            "{secret}: {text}"
        );
        // Owner-only again: it starts.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let again = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect("starts once private");
        again.shutdown().await;
    }
}

/// An operator's mesh certificate must name the node (`node-<id>`), and its key must be
/// private: a node refuses to start otherwise, naming the file and the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_certificate_that_does_not_name_the_node_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = tempfile::tempdir().expect("pki");
    // Node 3's certificate, from the mesh CA of `pki`.
    let three = meshchat_messaging::tls::dev_mesh_identity(pki.path(), 3).expect("cert");
    let cert = pki.path().join("node.pem");
    let key = pki.path().join("node.key");
    let pem = |der: &[u8], label: &str| pem::encode(&pem::Pem::new(label, der));
    std::fs::write(&cert, pem(three.chain[0].as_ref(), "CERTIFICATE")).expect("cert");
    std::fs::write(&key, pem(three.key.secret_der(), "PRIVATE KEY")).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let config = |id: u32| {
        let mut c = common::config_in(dir.path());
        c.node_id = id;
        c.cluster.mesh_listen = Some(
            format!("127.0.0.1:{}", common::free_udp_port())
                .parse()
                .expect("addr"),
        );
        c.cluster.redis = None;
        c.cluster.members = vec![meshchat_messaging::config::StaticMember {
            id,
            mesh_addr: c.cluster.mesh_listen.expect("mesh"),
            client_addr: "127.0.0.1:1".into(),
            weight: 1,
            worker_id: None,
        }];
        c.cluster.ca = Some(pki.path().join(meshchat_messaging::tls::DEV_MESH_CA_CERT));
        c.cluster.cert = Some(cert.clone());
        c.cluster.key = Some(key.clone());
        c
    };
    let err = meshchat_messaging::start(config(1))
        .await
        .expect_err("node 1 with node 3's certificate");
    assert!(
        matches!(err, StartError::Tls(_)) && err.to_string().contains("does not name node-1"),
        "{err}"
    );
    // The same files as node 3: it starts.
    let three = meshchat_messaging::start(config(3))
        .await
        .expect("node 3 starts with its own certificate");
    three.shutdown().await;

    // A mesh key others can read is refused too.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let err = meshchat_messaging::start(config(3))
        .await
        .expect_err("exposed key");
    assert!(
        err.to_string().contains("readable by group or others"),
        "{err}"
    );
}

/// A client of `node` whose packets come from `source` (any 127/8 address is this host).
async fn client_from(
    node: &common::TestNode,
    source: &str,
) -> (meshchat_client::Client, meshchat_client::Events) {
    let opts = node.options();
    let endpoint = meshchat_client::conn::client_endpoint(
        &opts,
        format!("{source}:0").parse().expect("source"),
    )
    .expect("endpoint");
    meshchat_client::Client::connect_with(endpoint, &node.addr(), opts)
        .await
        .expect("connect")
}

/// A node with the shipped password-attempt limits (the test helpers raise them).
async fn node_with_default_password_limits() -> common::TestNode {
    common::TestNode::start_with(|c| {
        let d = meshchat_messaging::config::AuthConfig::default();
        c.auth.attempts_per_source_per_min = d.attempts_per_source_per_min;
        c.auth.attempts_per_source_burst = d.attempts_per_source_burst;
        c.auth.logins_per_account_per_min = d.logins_per_account_per_min;
        c.auth.logins_per_account_burst = d.logins_per_account_burst;
    })
    .await
}

/// A guesser pipelining wrong passwords for one account on many connections from one address
/// gets a handful of guesses hashed (the account's burst), is told `RATE_LIMITED` for the rest
/// before any hashing, and does not keep anyone else from logging in meanwhile, nor the
/// victim's devices from authenticating with their tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_gets_a_few_guesses_and_locks_nobody_else_out() {
    use meshchat_proto::client::ErrorCode;
    use std::collections::BTreeMap;
    let node = node_with_default_password_limits().await;
    let (v, _ve) = client_from(&node, "127.0.0.11").await;
    let victim = v
        .register("victim", "the-real-password")
        .await
        .expect("victim");
    let (c, _ce) = client_from(&node, "127.0.0.12").await;
    c.register("carol", "carols-password").await.expect("carol");

    let stop = tokio::time::Instant::now() + std::time::Duration::from_secs(6);
    let mut guessers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (g, _ge) = client_from(&node, "127.0.0.66").await;
        let g = std::sync::Arc::new(g);
        for t in 0..8 {
            let g = g.clone();
            guessers.spawn(async move {
                let mut seen: BTreeMap<String, u32> = BTreeMap::new();
                let mut n = 0u32;
                while tokio::time::Instant::now() < stop {
                    n += 1;
                    let outcome = match g.login("victim", &format!("guess-{t}-{n}")).await {
                        Ok(_) => "logged in".to_owned(),
                        Err(e) => match e.code() {
                            Some(code) => format!("{code:?}"),
                            // The node closed this connection: this guesser is done.
                            None => {
                                *seen.entry("closed".into()).or_default() += 1;
                                break;
                            }
                        },
                    };
                    *seen.entry(outcome).or_default() += 1;
                }
                seen
            });
        }
    }

    // Meanwhile: carol logs in from her own address, and the victim's device authenticates
    // with its token, each five times on fresh connections.
    let mut carol_logins = 0;
    let mut victim_tokens = 0;
    for _ in 0..5 {
        let (c, _ce) = client_from(&node, "127.0.0.12").await;
        c.login("carol", "carols-password")
            .await
            .expect("carol logs in");
        carol_logins += 1;
        let (d, _de) = client_from(&node, "127.0.0.11").await;
        d.authenticate(&victim.token)
            .await
            .expect("the victim's token works");
        victim_tokens += 1;
    }

    let mut totals: BTreeMap<String, u32> = BTreeMap::new();
    while let Some(seen) = guessers.join_next().await {
        for (k, n) in seen.expect("guesser") {
            *totals.entry(k).or_default() += n;
        }
    }
    let hashed = totals
        .get(&format!("{:?}", ErrorCode::BadCredentials))
        .copied()
        .unwrap_or(0);
    let limited = totals
        .get(&format!("{:?}", ErrorCode::RateLimited))
        .copied()
        .unwrap_or(0);
    assert!(!totals.contains_key("logged in"), "{totals:?}");
    // The account's burst (5) and at most one more from its rate (6 a minute) in 6 s.
    assert!(hashed <= 6, "guesses hashed: {hashed} ({totals:?})");
    assert!(
        limited > 0,
        "the rest were refused before hashing: {totals:?}"
    );
    assert_eq!((carol_logins, victim_tokens), (5, 5));
}

/// A connection that fails to authenticate five times is closed: a guesser pays a new
/// handshake every few tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_after_five_failed_authentications() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start().await;
    let (c, mut events) = node.client().await;
    for _ in 0..4 {
        assert_eq!(
            common::code_of(c.authenticate("not-a-token").await),
            ErrorCode::TokenInvalid
        );
    }
    assert_eq!(
        common::code_of(c.authenticate("not-a-token").await),
        ErrorCode::TokenInvalid
    );
    let code = common::next_matching(&mut events, |e| match e {
        meshchat_client::Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::BadCredentials as u64);
    // The next request finds the connection closed.
    assert!(
        c.authenticate("not-a-token")
            .await
            .expect_err("closed")
            .code()
            .is_none()
    );
}

/// A live connection does not outlive its token: when the token the node last gave it
/// expires, the node says `TOKEN_EXPIRED` and closes it with that code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connection_is_closed_when_its_token_expires() {
    use meshchat_proto::client::ErrorCode;
    let node =
        common::TestNode::start_with(|c| c.auth.token_ttl = std::time::Duration::from_secs(2))
            .await;
    let (c, mut events, s) = node.user("shortlived").await;
    let left = s.expires_unix_ms.saturating_sub(now_ms());
    assert!(left <= 2_000, "a 2 s token: {left} ms left");
    let code = common::next_matching_within(
        &mut events,
        std::time::Duration::from_millis(left + 5_000),
        |e| match e {
            meshchat_client::Event::Disconnected { code, .. } => Some(code),
            _ => None,
        },
    )
    .await;
    assert_eq!(code, ErrorCode::TokenExpired as u64);
    // Reconnecting with the expired token is refused the same way.
    let (d, _de) = node.client().await;
    assert_eq!(
        common::code_of(d.authenticate(&s.token).await),
        ErrorCode::TokenExpired
    );
    drop(c);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Refreshing keeps a connection open past its first token, but never past the login's hard
/// end: then the refresh is refused with `TOKEN_EXPIRED`, and the connection closes. A token
/// of another user cannot be used to refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_extend_a_connection_until_the_logins_hard_end() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start_with(|c| {
        c.auth.token_ttl = std::time::Duration::from_secs(3);
        c.auth.max_login_lifetime = std::time::Duration::from_secs(6);
    })
    .await;
    let (_o, _oe, other) = node.user("someone-else").await;
    let (c, mut events, first) = node.user("refresher").await;
    let login_ms = now_ms();
    assert_eq!(
        common::code_of(
            c.request(meshchat_proto::client::client_frame::Body::Authenticate(
                meshchat_proto::client::Authenticate {
                    token: other.token.clone()
                }
            ))
            .await
        ),
        ErrorCode::InvalidArgument
    );
    // Refresh a second before each token runs out, until a refresh no longer extends it:
    // the login's hard end (6 s after it) is reached.
    let mut expires = first.expires_unix_ms;
    let mut refreshes = 0;
    loop {
        let wait = expires.saturating_sub(now_ms()).saturating_sub(1_000);
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        let s = c
            .refresh_token()
            .await
            .expect("refresh before the hard end");
        refreshes += 1;
        assert!(
            s.expires_unix_ms <= login_ms + 7_000,
            "past the hard end: {s:?}"
        );
        if s.expires_unix_ms <= expires {
            break;
        }
        expires = s.expires_unix_ms;
    }
    assert!(refreshes >= 2, "the token was extended at least once");
    assert!(expires > first.expires_unix_ms);
    // At the hard end the connection closes, and its last token opens nothing.
    let code =
        common::next_matching_within(
            &mut events,
            std::time::Duration::from_secs(8),
            |e| match e {
                meshchat_client::Event::Disconnected { code, .. } => Some(code),
                _ => None,
            },
        )
        .await;
    assert_eq!(code, ErrorCode::TokenExpired as u64);
    assert!(
        now_ms() + 1_000 >= expires,
        "closed at its last token's expiry"
    );
    let last = c.session().expect("session").token;
    let (d, _de) = node.client().await;
    assert_eq!(
        common::code_of(d.authenticate(&last).await),
        ErrorCode::TokenExpired
    );
}

/// Key rotation: a node whose current secret is new and whose previous secret is the old one
/// accepts tokens signed with either; the tokens it mints name the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_previous_secret_are_accepted_after_rotation() {
    let keys = tempfile::tempdir().expect("keys");
    let old = keys.path().join("token.key.old");
    let old_secret = meshchat_messaging::auth::Auth::load_or_create_secret(&old).expect("old");
    let node = common::TestNode::start_with(|c| {
        c.auth.secret_file = Some(keys.path().join("token.key"));
        c.auth.previous_secret_files = vec![old.clone()];
    })
    .await;
    let (_u, _ue, s) = node.user("rotated").await;
    let old_auth =
        meshchat_messaging::auth::Auth::new(&old_secret, std::time::Duration::from_secs(60), 1);
    let (old_token, _) = old_auth.mint(s.user, "rotated").expect("mint");
    let (c, _ce) = node.client().await;
    let again = c
        .authenticate(&old_token)
        .await
        .expect("an old-key token still works");
    let new_kid = meshchat_messaging::auth::key_id(
        &meshchat_messaging::auth::Auth::load_secret(&keys.path().join("token.key")).expect("new"),
    );
    assert_ne!(new_kid, old_auth.kid());
    // What it hands back is signed with the current key.
    let kid = jsonwebtoken::decode_header(&again.token)
        .expect("header")
        .kid;
    assert_eq!(kid.as_deref(), Some(new_kid.as_str()));
    let (d, _de) = node.client().await;
    let fresh = d.authenticate(&again.token).await.expect("fresh token");
    assert_eq!(fresh.user, s.user);
}

/// One user's connections on a node are capped: past `max_connections_per_user` another
/// authentication is refused `OVERLOADED`, and a slot freed by a close is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cannot_open_connections_past_the_cap() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start_with(|c| c.limits.max_connections_per_user = 3).await;
    let (first, _fe, s) = node.user("capped").await;
    let (second, _se) = node.device(&s).await;
    let (_third, _te) = node.device(&s).await;
    let (extra, _ee) = node.client().await;
    assert_eq!(
        code_overloaded(extra.authenticate(&s.token).await),
        ErrorCode::Overloaded
    );
    // Another user is not affected.
    let (_other, _oe, _os) = node.user("not-capped").await;
    // A device leaves: its slot is free again once the node has seen the close.
    second.close();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (c, _e) = node.client().await;
        match c.authenticate(&s.token).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::Overloaded) => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    drop(first);
}

fn code_overloaded<T: std::fmt::Debug>(
    r: Result<T, meshchat_client::ClientError>,
) -> meshchat_proto::client::ErrorCode {
    common::code_of(r)
}

/// The node's budget of request bytes in progress is shared by every connection: with the
/// store's write lock held by another process, two sends that together pass the budget cannot
/// both be in progress; one is refused `OVERLOADED` at once, the other completes when the lock
/// is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_in_progress_are_bounded_across_connections() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start_with(|c| {
        c.limits.max_frame_bytes = 2048;
        c.limits.max_body_bytes = 1024;
        c.limits.max_inflight_bytes = 2048;
    })
    .await;
    let (a, _ae, sa) = node.user("budget-a").await;
    let (b, _be, sb) = node.user("budget-b").await;
    let chat = meshchat_idgen::ChatId::direct(sa.user, sb.user);
    // Hold the write lock: sends wait in the store.
    let db = node.dir.path().join(meshchat_storage::embedded::DB_FILE);
    let lock = rusqlite::Connection::open(&db).expect("sqlite");
    lock.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy");
    lock.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    // Straight requests: the library's send would retry an OVERLOADED.
    let send = |c: std::sync::Arc<meshchat_client::Client>, n: u32| async move {
        c.request(meshchat_proto::client::client_frame::Body::Send(
            meshchat_proto::client::SendMessage {
                client_msg_id: format!("budget-{n}"),
                chat: Some(meshchat_proto::ids::chat_to_wire(chat)),
                body: "x".repeat(1000).into(),
                reply_to: 0,
            },
        ))
        .await
    };
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let mut sends = tokio::task::JoinSet::new();
    sends.spawn(send(a.clone(), 1));
    sends.spawn(send(b.clone(), 2));
    // Whichever was admitted first holds the budget and waits for the store: the other is
    // refused at once, and is the first to finish.
    let first = sends.join_next().await.expect("a send").expect("task");
    assert_eq!(common::code_of(first), ErrorCode::Overloaded);
    // The lock released, the admitted one completes.
    lock.execute_batch("ROLLBACK").expect("unlock");
    let second = sends.join_next().await.expect("a send").expect("task");
    assert!(second.is_ok(), "{second:?}");
}

async fn ping(
    c: &meshchat_client::Client,
) -> Result<meshchat_proto::client::server_frame::Body, meshchat_client::ClientError> {
    c.request(meshchat_proto::client::client_frame::Body::Ping(
        meshchat_proto::client::Ping { nonce: 7 },
    ))
    .await
}

/// The next `Disconnected` code within 5 s.
async fn disconnect_code(events: &mut meshchat_client::Events) -> u64 {
    common::next_matching(events, |e| match e {
        meshchat_client::Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await
}

/// Logging out everywhere signs out every login made so far: the user's other connections are
/// closed with `TOKEN_EXPIRED`, their tokens (and refreshes of them) are refused, and a new
/// login works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_everywhere_signs_out_every_login() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start().await;
    let (phone, mut phone_events, s) = node.user("leaver").await;
    let (laptop, mut laptop_events) = node.device(&s).await;
    let (_other, _oe, other) = node.user("stays").await;
    laptop.logout(true).await.expect("logout everywhere");
    assert_eq!(
        disconnect_code(&mut phone_events).await,
        ErrorCode::TokenExpired as u64
    );
    assert_eq!(
        disconnect_code(&mut laptop_events).await,
        0,
        "the asking one closes cleanly"
    );
    // The token of that login, and of any refresh of it, opens nothing now.
    let (c, _ce) = node.client().await;
    assert_eq!(
        common::code_of(c.authenticate(&s.token).await),
        ErrorCode::TokenExpired
    );
    // Another user is untouched; a new login works and its token opens connections.
    let (c, _ce) = node.client().await;
    c.authenticate(&other.token)
        .await
        .expect("another user's token");
    let (c, _ce) = node.client().await;
    let again = c
        .login("leaver", "password-123")
        .await
        .expect("log in again");
    let (d, _de) = node.client().await;
    d.authenticate(&again.token)
        .await
        .expect("the new login's token");
    drop(phone);
}

/// A plain logout closes only the asking connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_logout_closes_only_this_connection() {
    let node = common::TestNode::start().await;
    let (phone, mut phone_events, s) = node.user("one-device").await;
    let (laptop, _le) = node.device(&s).await;
    phone.logout(false).await.expect("logout");
    assert_eq!(disconnect_code(&mut phone_events).await, 0);
    ping(&laptop).await.expect("the other device stays");
    let (c, _ce) = node.client().await;
    c.authenticate(&s.token)
        .await
        .expect("the token stays valid");
}

/// Changing the password needs the old one, signs every other login out, and hands this
/// connection a fresh token; the old password stops working, the new one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_password_signs_out_every_other_login() {
    use meshchat_proto::client::ErrorCode;
    let node = common::TestNode::start().await;
    let (me, _me_events, s) = node.user("changer").await;
    let (thief, mut thief_events) = node.device(&s).await;
    assert_eq!(
        common::code_of(me.change_password("wrong-password", "new-password-1").await),
        ErrorCode::BadCredentials
    );
    assert_eq!(
        common::code_of(me.change_password("password-123", "short").await),
        ErrorCode::InvalidArgument
    );
    let fresh = me
        .change_password("password-123", "new-password-1")
        .await
        .expect("change");
    assert_eq!(
        disconnect_code(&mut thief_events).await,
        ErrorCode::TokenExpired as u64
    );
    ping(&me).await.expect("this connection stays");
    let (c, _ce) = node.client().await;
    assert_eq!(
        common::code_of(c.authenticate(&s.token).await),
        ErrorCode::TokenExpired
    );
    let (c, _ce) = node.client().await;
    c.authenticate(&fresh.token).await.expect("the fresh token");
    let (c, _ce) = node.client().await;
    assert_eq!(
        common::code_of(c.login("changer", "password-123").await),
        ErrorCode::BadCredentials
    );
    let (c, _ce) = node.client().await;
    c.login("changer", "new-password-1")
        .await
        .expect("new password");
    drop(thief);
}
