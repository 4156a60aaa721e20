//! The links: the mutual-TLS QUIC endpoint, the hello (the lower node id dials and retries
//! with jittered backoff, the higher accepts and checks that the dialer's certificate names
//! the id it claims, then cluster, version and membership), and
//! one established link: its reader hands envelopes to the view, its writer drains the
//! peer's lanes and queue into batch frames. When a link ends, the batch it was writing goes
//! back to the front of the queue and the recipients of what it wrote lately are resynced,
//! through the next link or, if the peer left the member set, through their new owners.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use meshchat_idgen::NodeId;
use meshchat_proto::codec::encode_into;
use meshchat_proto::mesh::{self as pm, envelope};
use meshchat_proto::{FrameCodec, MESH_ALPN, PROTOCOL_VERSION};
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::codec::{Framed, FramedParts, FramedRead};
use tracing::{debug, info, warn};

use super::Mesh;
use super::peer::{
    HEARD_EVERY, MAX_CHANGED_CHANNELS, MAX_ENVELOPE_BYTES, MAX_MISSED_USERS, Missed,
    PRESENCE_ENTRY_BYTES, PRESENCE_PER_ENVELOPE, Peer, RECIPIENT_BYTES, node_state,
};
use crate::tls::{self, Identity, TlsError};

/// Largest mesh frame (a batch).
const MAX_MESH_FRAME: usize = 1 << 20;
/// Most envelopes in one batch.
const BATCH_ENVELOPES: usize = 1_024;
/// Batch size at which the writer stops adding envelopes.
const BATCH_BYTES: usize = 64 * 1024;

// A batch stops adding envelopes once past BATCH_BYTES, so the largest batch is that, one
// largest envelope, a resync naming MAX_MISSED_USERS users, the channel-change lane, one
// presence envelope, the node's state, and the per-envelope framing: always under the frame
// limit.
const _: () = assert!(
    16 + BATCH_BYTES
        + MAX_ENVELOPE_BYTES
        + MAX_MISSED_USERS * RECIPIENT_BYTES
        + MAX_CHANGED_CHANNELS * 16
        + PRESENCE_PER_ENVELOPE * PRESENCE_ENTRY_BYTES
        + BATCH_ENVELOPES * 8
        < MAX_MESH_FRAME
);

/// A mesh handshake (and its hello) not finished in this time is dropped.
const MESH_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The mesh connection's idle timeout: a peer silent this long is declared dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a link remembers whom its written batches were for. A batch written into a
/// connection that stays alive this long after has been acknowledged (QUIC retransmits until
/// it is, and a path that delivers nothing ends the connection after [`IDLE_TIMEOUT`]), so
/// only batches written within this window of a link's end can have been lost with it.
const RESYNC_WINDOW: Duration = Duration::from_secs(IDLE_TIMEOUT.as_secs() + 2);

/// Whom one link's recently written batches were for, in case the link dies before the peer
/// has them (see the `mesh` module docs). Bounded: past [`MAX_MISSED_USERS`] users the oldest
/// batches are forgotten and "everyone" is remembered instead, for as long as they would have
/// been.
#[derive(Debug, Default)]
struct Written {
    /// When each batch was written, and its recipients.
    batches: VecDeque<(Instant, Vec<u64>)>,
    users: usize,
    /// The newest write whose recipients are not listed (forgotten past the bound, or an
    /// envelope that names none): until it leaves the window, a resync covers everyone.
    all_at: Option<Instant>,
}

impl Written {
    fn record(&mut self, now: Instant, envelopes: &[pm::Envelope]) {
        self.forget_before(now);
        let mut users = Vec::new();
        for env in envelopes {
            match &env.body {
                Some(envelope::Body::Deliver(d)) => users.extend_from_slice(&d.recipients),
                Some(envelope::Body::Resync(r)) if !r.all => users.extend_from_slice(&r.users),
                // Covered without a resync: a link that comes up drops the member cache and
                // sends the node's state, and every link that ends owes the peer a presence
                // snapshot.
                Some(
                    envelope::Body::ChannelChanged(_)
                    | envelope::Body::Presence(_)
                    | envelope::Body::NodeState(_),
                ) => {}
                _ => self.all_at = Some(now),
            }
        }
        self.users += users.len();
        self.batches.push_back((now, users));
        while self.users > MAX_MISSED_USERS {
            let Some((at, users)) = self.batches.pop_front() else {
                break;
            };
            self.users -= users.len();
            self.all_at = self.all_at.max(Some(at));
        }
    }

    fn forget_before(&mut self, now: Instant) {
        let old = |at: &Instant| now.duration_since(*at) > RESYNC_WINDOW;
        while self.batches.front().is_some_and(|(at, _)| old(at)) {
            if let Some((_, users)) = self.batches.pop_front() {
                self.users -= users.len();
            }
        }
        if self.all_at.as_ref().is_some_and(old) {
            self.all_at = None;
        }
    }

    /// Adds the users of the batches still within the window at `now` to `missed`; returns
    /// whether there were any.
    fn resync_into(mut self, now: Instant, missed: &mut Missed) -> bool {
        self.forget_before(now);
        if self.all_at.is_some() {
            missed.add_all();
        }
        for (_, users) in &self.batches {
            missed.add_users(users.iter().copied());
        }
        self.all_at.is_some() || !self.batches.is_empty()
    }
}

fn quic_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t
}

/// The mesh's TLS, both ways: the server side (peers that dial us must present a certificate
/// chaining to `roots`) and the client side (we present ours when we dial). Built at start and
/// again on a reload of the certificates.
pub(super) fn mesh_crypto(
    identity: &Identity,
    roots: &[CertificateDer<'static>],
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let store = Arc::new(store);
    let provider = tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Quic(format!("client verifier: {e}")))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    server.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    client.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let transport = Arc::new(quic_transport());
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    sc.transport_config(transport.clone());
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    cc.transport_config(transport);
    Ok((sc, cc))
}

/// The mesh endpoint on `socket`, serving `server`. Dials pass their client config each time
/// (the mesh keeps the current one), so a reload reaches the next dial.
pub(super) fn mesh_endpoint(
    listen: SocketAddr,
    server: quinn::ServerConfig,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, TlsError> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| TlsError::Socket {
        addr: listen,
        source: e,
    })
}

/// Writes one handshake frame (a `PeerHello` or its answer).
async fn write_frame<M: prost::Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    encode_into(msg, 4096, &mut buf).map_err(|e| e.to_string())?;
    send.write_all(&buf).await.map_err(|e| e.to_string())
}

/// The TLS name a node's certificate carries for the mesh.
pub fn mesh_name(id: NodeId) -> String {
    format!("node-{}", id.0)
}

/// Whether the peer's certificate names node `id`.
fn certified_as(conn: &quinn::Connection, id: NodeId) -> bool {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .is_some_and(|chain| chain.first().is_some_and(|leaf| tls::names_node(leaf, id)))
}

pub(super) async fn accept_loop(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let mesh = mesh.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let remote = inc.remote_address();
                    // A deadline, as on the client port: a handshake that does not finish
                    // (a peer without a mesh certificate, a spoofed Initial) is dropped.
                    let conn = match tokio::time::timeout(MESH_HANDSHAKE_TIMEOUT, inc).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            // Includes peers without a valid cluster certificate.
                            warn!(%remote, error = %e, "mesh handshake refused");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "mesh handshake timed out");
                            return;
                        }
                    };
                    if let Err(e) = accept_peer(mesh, conn, stop).await {
                        debug!(%remote, error = %e, "mesh link ended");
                    }
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"node stopping");
}

async fn accept_peer(
    mesh: Arc<Mesh>,
    conn: quinn::Connection,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FramedRead::new(
        recv,
        FrameCodec::<pm::PeerHello, pm::PeerHelloOk>::new(4096),
    );
    let hello = match reader.next().await {
        Some(Ok(h)) => h,
        other => return Err(format!("no hello: {other:?}")),
    };
    let peer = mesh.peer(NodeId(hello.node_id));
    let refuse = if !certified_as(&conn, NodeId(hello.node_id)) {
        // The handshake proved the certificate chains to the cluster CA; the id it claims
        // must be the one its certificate names, or any node could speak as any other.
        Some("certificate does not name the node id in the hello")
    } else if hello.cluster_id != mesh.cluster_id {
        Some("wrong cluster")
    } else if hello.protocol_version != PROTOCOL_VERSION {
        Some("protocol version mismatch")
    } else if peer.is_none() || hello.node_id >= mesh.me.0 {
        Some("not a member that dials this node")
    } else {
        None
    };
    if let Some(why) = refuse {
        warn!(peer = hello.node_id, why, "mesh peer refused");
        conn.close(1u32.into(), why.as_bytes());
        return Err(why.into());
    }
    let Some(peer) = peer else {
        return Err("unknown peer".into());
    };
    write_frame(
        &mut send,
        &pm::PeerHelloOk {
            node_id: mesh.me.0,
            protocol_version: PROTOCOL_VERSION,
            ring_epoch: mesh.current_epoch(),
        },
    )
    .await?;
    if hello.ring_epoch != mesh.current_epoch() {
        warn!(
            peer = hello.node_id,
            theirs = hello.ring_epoch,
            ours = mesh.current_epoch(),
            "ring epochs differ"
        );
    }
    // Bytes read past the hello stay with the link (the dialer waits for the reply before it
    // writes, but the link must not depend on that).
    let parts = reader.into_parts();
    run_link(mesh, peer, conn, send, (parts.io, parts.read_buf), stop).await;
    Ok(())
}

pub(super) async fn dial_loop(
    mesh: Arc<Mesh>,
    endpoint: quinn::Endpoint,
    peer: Arc<Peer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut gone = peer.gone.subscribe();
    loop {
        let attempt = async {
            let client = mesh.client_tls.read().clone();
            let conn = endpoint
                .connect_with(client, peer.addr, &mesh_name(peer.id))
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(
                &mut send,
                &pm::PeerHello {
                    cluster_id: mesh.cluster_id.clone(),
                    node_id: mesh.me.0,
                    protocol_version: PROTOCOL_VERSION,
                    ring_epoch: mesh.current_epoch(),
                },
            )
            .await?;
            let mut reader = FramedRead::new(
                recv,
                FrameCodec::<pm::PeerHelloOk, pm::PeerHello>::new(4096),
            );
            match reader.next().await {
                Some(Ok(ok)) if ok.node_id == peer.id.0 => {}
                other => return Err(format!("bad hello reply: {other:?}")),
            }
            // The peer writes its first batch right behind the hello reply: what the reader
            // took past the reply belongs to the link (dropping it lost that batch, found by
            // the load test's partition fault).
            let parts = reader.into_parts();
            Ok::<_, String>((conn, send, (parts.io, parts.read_buf)))
        };
        let result = tokio::select! {
            _ = stop.changed() => return,
            _ = gone.changed() => return,
            r = attempt => r,
        };
        match result {
            Ok((conn, send, recv)) => {
                backoff = Duration::from_millis(100);
                run_link(mesh.clone(), peer.clone(), conn, send, recv, stop.clone()).await;
                if *stop.borrow() || *gone.borrow() {
                    return;
                }
            }
            Err(e) => debug!(error = %e, "dial failed"),
        }
        // Jittered exponential backoff.
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = stop.changed() => return,
            _ = gone.changed() => return,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs an established link until either side fails or the node stops. `recv` is the
/// stream with the bytes already read from it past the hello.
async fn run_link(
    mesh: Arc<Mesh>,
    peer: Arc<Peer>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: (quinn::RecvStream, BytesMut),
    mut stop: watch::Receiver<bool>,
) {
    // This link replaces any older one of the same peer.
    // Subscribed before the bump: a link that bumps in between (a late dial completing beside
    // a redial) is seen as a change, so this link cannot miss its own replacement.
    let mut replaced = peer.link.subscribe();
    let mut generation = 0;
    peer.link.send_modify(|g| {
        *g += 1;
        generation = *g;
    });
    let replaced = async move {
        while replaced.changed().await.is_ok() {
            if *replaced.borrow() != generation {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    *peer.conn.lock() = Some(conn.clone());
    // Whether the peer took a drain of this node into account is heard again on this link
    // (the peer may have restarted): reset before the link counts as up.
    peer.confirms_drain.store(false, Ordering::SeqCst);
    peer.up.store(true, Ordering::SeqCst);
    peer.stats.connects.fetch_add(1, Ordering::Relaxed);
    // A `ChannelChanged` the peer wrote into the link this one replaces may never have
    // arrived: cached member lists are re-read from storage rather than trusted.
    mesh.local.invalidate_all_channels();
    // Presence written into the link this one replaces may never have arrived either: the
    // peer gets a snapshot of whom this node shows online, ahead of any later change.
    peer.presence.lock().set_full();
    // And this node's state (draining or not) goes first on every link.
    peer.state_owed.store(true, Ordering::SeqCst);
    peer.ready.notify_one();
    info!(peer = peer.id.0, generation, "mesh link up");
    let reader = {
        let mesh = mesh.clone();
        let peer = peer.clone();
        async move {
            let (recv, read) = recv;
            let mut parts = FramedParts::new::<pm::PeerBatch>(
                recv,
                FrameCodec::<pm::PeerBatch, pm::PeerBatch>::new(MAX_MESH_FRAME),
            );
            parts.read_buf = read;
            // `Framed` (not `FramedRead`) because only it is made from parts: it decodes what
            // was read already before it reads the stream again. Only its reading half is used.
            let mut frames = Framed::from_parts(parts);
            while let Some(frame) = frames.next().await {
                match frame {
                    Ok(batch) => {
                        peer.stats
                            .envelopes_received
                            .fetch_add(batch.envelopes.len() as u64, Ordering::Relaxed);
                        for env in batch.envelopes {
                            mesh.receive(peer.id, env);
                        }
                    }
                    Err(e) => {
                        warn!(peer = peer.id.0, error = %e, "bad mesh frame");
                        break;
                    }
                }
            }
        }
    };
    // The batch being written, put back at the front of the queue if the write does not
    // complete (this link's own: a replacing link has its own).
    let writing: Mutex<Vec<pm::Envelope>> = Mutex::new(Vec::new());
    // Whom the batches it wrote were for, resynced if the link ends before the peer has them.
    let written: Mutex<Written> = Mutex::new(Written::default());
    let writer = async {
        let mut buf = BytesMut::new();
        loop {
            if *peer.link.borrow() != generation {
                // Replaced: the new link takes the queue and the lanes (a presence snapshot
                // taken here would go into a dead connection). `replaced` ends this link.
                std::future::pending::<()>().await;
            }
            let batch: Vec<pm::Envelope> = {
                let mut out = Vec::new();
                // The node's state first: a peer learns of a drain before the pushes after it.
                if peer.state_owed.swap(false, Ordering::SeqCst) {
                    out.push(node_state(mesh.is_draining(), mesh.sees_drain_of(peer.id)));
                }
                {
                    let mut missed = peer.missed.lock();
                    if !missed.is_empty() {
                        out.push(missed.take());
                    }
                }
                // Member changes go before the pushes queued after them.
                out.extend(peer.changed.lock().take());
                let presence = peer.presence.lock().take(|| mesh.local.presence_snapshot());
                out.extend(presence);
                let mut q = peer.queue.lock();
                let mut bytes = 0usize;
                while out.len() < BATCH_ENVELOPES && bytes < BATCH_BYTES {
                    match q.pop_front() {
                        Some((len, e)) => {
                            bytes += len;
                            out.push(e);
                        }
                        None => break,
                    }
                }
                out
            };
            if batch.is_empty() {
                peer.ready.notified().await;
                continue;
            }
            let n = batch.len() as u64;
            buf.clear();
            let frame = pm::PeerBatch { envelopes: batch };
            if let Err(e) = encode_into(&frame, MAX_MESH_FRAME, &mut buf) {
                warn!(error = %e, "batch did not encode; dropped, its recipients resynced");
                peer.stats.dropped.fetch_add(n, Ordering::Relaxed);
                for env in &frame.envelopes {
                    match &env.body {
                        // Back on the lane that is never dropped, not a resync of everyone.
                        Some(envelope::Body::ChannelChanged(c)) => {
                            peer.changed.lock().readd(c);
                        }
                        Some(envelope::Body::Presence(_)) => peer.presence.lock().set_full(),
                        Some(envelope::Body::NodeState(_)) => {
                            peer.state_owed.store(true, Ordering::SeqCst);
                        }
                        _ => peer.missed.lock().add(env),
                    }
                }
                continue;
            }
            // Kept until the write completes: requeued if it fails or is cancelled.
            *writing.lock() = frame.envelopes;
            if send.write_all(&buf).await.is_err() {
                break;
            }
            let done = std::mem::take(&mut *writing.lock());
            written.lock().record(Instant::now(), &done);
            peer.stats.envelopes_sent.fetch_add(n, Ordering::Relaxed);
            peer.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        }
    };
    // When the peer was last heard from: any datagram (a batch, an ACK, its keep-alive) counts.
    let heard = async {
        let mut seen = conn.stats().udp_rx.datagrams;
        *peer.heard.lock() = Some(Instant::now());
        let mut every = tokio::time::interval(HEARD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let now = conn.stats().udp_rx.datagrams;
            if now != seen {
                seen = now;
                *peer.heard.lock() = Some(Instant::now());
            }
        }
    };
    let mut gone = peer.gone.subscribe();
    let superseded = tokio::select! {
        _ = heard => false,
        _ = reader => false,
        _ = writer => false,
        _ = stop.changed() => false,
        _ = gone.changed() => false,
        _ = conn.closed() => false,
        _ = replaced => true,
    };
    // What this link wrote lately may have died with it: the next link resyncs those users;
    // if the peer left the member set (it died), their new owners do. Nothing to do if this
    // node stops.
    if !*stop.borrow() && *gone.borrow() {
        let mut lost = Missed::default();
        let written = std::mem::take(&mut *written.lock());
        written.resync_into(Instant::now(), &mut lost);
        for env in std::mem::take(&mut *writing.lock()) {
            lost.add(&env);
        }
        mesh.retarget(lost);
    } else if !*stop.borrow() {
        let written = std::mem::take(&mut *written.lock());
        if written.resync_into(Instant::now(), &mut peer.missed.lock()) {
            debug!(
                peer = peer.id.0,
                "link ended: resyncing the recipients of its recent batches"
            );
            peer.ready.notify_one();
        }
    }
    // Presence this link wrote may not have arrived (and a snapshot owed to the link that
    // replaced it may have been taken here, in the moment between the two): the next link
    // sends a snapshot, whichever that is.
    if !*stop.borrow() {
        peer.presence.lock().set_full();
        // The same for this node's state: the replacing link may have set it owed after this
        // link's writer last looked, and this link taken it into its dying connection.
        peer.state_owed.store(true, Ordering::SeqCst);
        peer.ready.notify_one();
    }
    // A batch whose write did not complete goes back to the front of the queue.
    let unsent = std::mem::take(&mut *writing.lock());
    if !unsent.is_empty() {
        let mut q = peer.queue.lock();
        for env in unsent.into_iter().rev() {
            // Presence is not requeued: it would land after the next link's snapshot and
            // undo it. That link sends a snapshot instead (set above, and when it comes up).
            if matches!(env.body, Some(envelope::Body::Presence(_))) {
                continue;
            }
            // Nor the node's state: owed again, it goes first in the next batch.
            if matches!(env.body, Some(envelope::Body::NodeState(_))) {
                peer.state_owed.store(true, Ordering::SeqCst);
                continue;
            }
            q.push_front(prost::Message::encoded_len(&env), env);
        }
        drop(q);
        peer.ready.notify_one();
    }
    if !superseded {
        peer.up.store(false, Ordering::SeqCst);
        peer.confirms_drain.store(false, Ordering::SeqCst);
        *peer.conn.lock() = None;
    }
    conn.close(0u32.into(), b"link closed");
    info!(peer = peer.id.0, generation, superseded, "mesh link down");
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use std::collections::BTreeSet;

    use super::*;

    fn deliver(recipients: Vec<u64>) -> pm::Envelope {
        pm::Envelope {
            ring_epoch: 1,
            hops: 0,
            body: Some(envelope::Body::Deliver(pm::Deliver {
                recipients,
                push: Bytes::new(),
            })),
        }
    }

    #[test]
    fn a_dead_link_does_not_resync_everyone_for_a_channel_change_or_presence() {
        let t0 = Instant::now();
        let mut w = Written::default();
        let changed = pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::ChannelChanged(pm::ChannelChanged {
                channel_id: 9,
                all: false,
            })),
        };
        // Nor a presence update (every link's first batch has one: its snapshot).
        let presence = pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::Presence(pm::PresenceUpdate {
                full: true,
                entries: Vec::new(),
                more: false,
            })),
        };
        w.record(t0, &[changed, presence, deliver(vec![5])]);
        let mut missed = Missed::default();
        assert!(w.resync_into(t0, &mut missed));
        assert!(
            !missed.all,
            "a channel change or presence must not resync everyone"
        );
        assert_eq!(missed.users, BTreeSet::from([5]));
    }

    #[test]
    fn a_dead_link_resyncs_the_recipients_of_its_recent_batches_only() {
        let t0 = Instant::now();
        let mut w = Written::default();
        w.record(t0, &[deliver(vec![1, 2])]);
        w.record(t0 + Duration::from_secs(5), &[deliver(vec![3])]);
        // Ends within the window of the second batch only.
        let mut missed = Missed::default();
        let end = t0 + RESYNC_WINDOW + Duration::from_secs(1);
        assert!(w.resync_into(end, &mut missed));
        assert_eq!(missed.users, BTreeSet::from([3]));
        assert!(!missed.all);
    }

    #[test]
    fn past_the_bound_the_oldest_batches_become_everyone() {
        let t0 = Instant::now();
        let mut w = Written::default();
        let big: Vec<u64> = (0..MAX_MISSED_USERS as u64).collect();
        w.record(t0, &[deliver(big)]);
        w.record(t0, &[deliver(vec![u64::MAX])]);
        assert!(w.users <= MAX_MISSED_USERS);
        let mut missed = Missed::default();
        assert!(w.resync_into(t0, &mut missed));
        assert!(missed.all, "the forgotten list is resynced as everyone");

        // Once the forgotten batch is out of the window, "everyone" is forgotten too.
        let mut w = Written::default();
        w.record(t0, &[deliver((0..MAX_MISSED_USERS as u64).collect())]);
        w.record(t0 + Duration::from_secs(5), &[deliver(vec![u64::MAX])]);
        let mut missed = Missed::default();
        let end = t0 + RESYNC_WINDOW + Duration::from_secs(1);
        assert!(w.resync_into(end, &mut missed));
        assert!(!missed.all);
        assert_eq!(missed.users, BTreeSet::from([u64::MAX]));
        assert!(!Written::default().resync_into(end, &mut Missed::default()));
    }
}
