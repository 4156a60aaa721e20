//! The endpoint loop over real QUIC on loopback: quinn clients connect, each opens its
//! stream and gets its bytes echoed; the loop counts the connections it holds, and once the
//! clients close, their connections drain out of it. Every wait is for a condition, with a
//! deadline.

use std::time::Duration;

use meshchat_edge::tls::{client_config, self_signed, server_config};
use meshchat_edge::{Edge, EdgeStats, echo::Echo};

async fn wait_stats(
    stats: &mut tokio::sync::watch::Receiver<EdgeStats>,
    what: &str,
    cond: impl Fn(&EdgeStats) -> bool,
) {
    let met = tokio::time::timeout(Duration::from_secs(15), stats.wait_for(|s| cond(s)))
        .await
        .map(|r| r.map(|_| ()));
    match met {
        Ok(r) => r.expect("loop running"),
        Err(_) => panic!("{what}: not within 15 s ({:?})", *stats.borrow()),
    }
}

/// A loop serving `server` on a free loopback port, with the echo application: its address,
/// its counters, its stop switch and its task.
async fn serve(
    server: std::sync::Arc<quinn_proto::ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Receiver<EdgeStats>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<(), meshchat_edge::EdgeError>>,
) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let edge = Edge::new(server, Echo::default());
    let stats = edge.stats();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(edge.run(socket, stopped));
    (addr, stats, stop, task)
}

/// A client endpoint that trusts `cert`.
fn client_for(cert: rustls_pki_types::CertificateDer<'static>) -> quinn::Endpoint {
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    client.set_default_client_config(client_config(cert).expect("client config"));
    client
}

/// A connection of `client` to the loop at `addr`, handshake done.
async fn connected(client: &quinn::Endpoint, addr: std::net::SocketAddr) -> quinn::Connection {
    client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake")
}

/// A connection of `client` to `addr` with its stream open, whose first message (`hello i`)
/// came back.
async fn connected_and_echoed(
    client: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    i: u32,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = connected(client, addr).await;
    let (send, recv) = stream_echoing(&conn, &format!("hello {i}")).await;
    (conn, send, recv)
}

/// A new stream of `conn` on which `msg` was sent and came back.
async fn stream_echoing(
    conn: &quinn::Connection,
    msg: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(msg.as_bytes()).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    recv.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, msg.as_bytes());
    (send, recv)
}

/// A client connected to `addr` with quinn's default windows (1.25 MB per stream, far above
/// the node's), and its endpoint (kept alive with the connection).
async fn connected_with_quinn_windows(
    cert: rustls_pki_types::CertificateDer<'static>,
    addr: std::net::SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut config = client_config(cert).expect("client config");
    config.transport_config(std::sync::Arc::new(quinn::TransportConfig::default()));
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let conn = client
        .connect_with(config, addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    (client, conn)
}

/// Sends `len` bytes on a new stream of `conn` while reading the echo: it must come back
/// whole and in order, the stream finished after it.
async fn echoes_whole(conn: &quinn::Connection, len: u32) {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&sent).await.expect("write");
        send.finish().expect("finish");
        send
    });
    let back = tokio::time::timeout(Duration::from_secs(15), recv.read_to_end(16 << 20))
        .await
        .expect("echo within 15 s")
        .expect("read to the end");
    assert_eq!(back.len(), body.len());
    assert!(back == body, "the echo differs from what was sent");
    drop(writer.await.expect("writer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_get_their_bytes_echoed_and_drain_out_when_they_close() {
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let (addr, mut stats, stop, task) = serve(server).await;

    let client = client_for(cert);
    let mut conns = Vec::new();
    for i in 0..20u32 {
        let (conn, mut send, mut recv) = connected_and_echoed(&client, addr, i).await;
        // A second write on the same stream is echoed too.
        send.write_all(b"again").await.expect("write");
        let mut again = [0u8; 5];
        recv.read_exact(&mut again).await.expect("echo");
        assert_eq!(&again, b"again");
        conns.push((conn, send, recv));
    }
    wait_stats(&mut stats, "20 connections held", |s| {
        s.connections == 20 && s.accepted == 20
    })
    .await;

    for (conn, _, _) in &conns {
        conn.close(0u32.into(), b"bye");
    }
    wait_stats(&mut stats, "every connection drained", |s| {
        s.connections == 0
    })
    .await;
    stop.send(true).expect("stop");
    task.await.expect("loop task").expect("loop ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_silent_is_timed_out_by_the_loop() {
    let (cert, key) = self_signed().expect("certificate");
    let mut server = (*server_config(cert.clone(), key).expect("server config")).clone();
    let mut transport = meshchat_edge::tls::node_transport();
    transport.max_idle_timeout(Some(
        quinn_proto::IdleTimeout::try_from(Duration::from_millis(500)).expect("timeout"),
    ));
    server.transport_config(std::sync::Arc::new(transport));
    let (addr, mut stats, _stop, _task) = serve(std::sync::Arc::new(server)).await;

    let client = client_for(cert);
    let conn = connected(&client, addr).await;
    wait_stats(&mut stats, "one connection accepted", |s| s.accepted == 1).await;
    // The client sends nothing more (and no keep-alives): only the loop's idle timer ends the
    // connection. (Dropping the handle would close it with a frame instead.)
    wait_stats(&mut stats, "the silent connection timed out", |s| {
        s.connections == 0
    })
    .await;
    drop((conn, client));
}

/// Sessions that let go of rustls after the handshake ([`meshchat_edge::lean`]): every
/// connection lets go, streams still echo, and a key update the client asks for afterwards
/// (which needs the kept secrets) leaves the connection working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_sessions_let_go_of_rustls_and_still_update_keys() {
    let (cert, key) = self_signed().expect("certificate");
    let (server, released) =
        meshchat_edge::tls::lean_server_config(cert.clone(), key).expect("server config");
    let (addr, mut stats, _stop, _task) = serve(server).await;

    let client = client_for(cert);
    let mut conns = Vec::new();
    for i in 0..5u32 {
        let conn = connected(&client, addr).await;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        assert_eq!(alpn.as_deref(), Some(meshchat_edge::tls::ALPN));
        let (send, recv) = stream_echoing(&conn, &format!("lean {i}")).await;
        conns.push((conn, send, recv));
    }
    wait_stats(&mut stats, "5 connections held", |s| s.connections == 5).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while released.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 5 sessions let go of rustls",
            released.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::task::yield_now().await;
    }

    // Key updates after rustls is gone: twice in a row, each followed by an echo.
    for (conn, send, recv) in &mut conns {
        for round in 0..2u8 {
            conn.force_key_update();
            send.write_all(&[round; 3])
                .await
                .expect("write after a key update");
            let mut back = [0u8; 3];
            recv.read_exact(&mut back)
                .await
                .expect("echo after a key update");
            assert_eq!(back, [round; 3]);
        }
    }
    assert_eq!(stats.borrow().connections, 5, "no connection lost");
}

/// An answer larger than the client's stream window (128 KiB): the loop writes what the window
/// allows and the rest as the client reads (`Writable`), in order, then finishes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_larger_than_the_window_arrives_whole_and_in_order() {
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let (addr, _stats, _stop, _task) = serve(server).await;

    let client = client_for(cert);
    let conn = connected(&client, addr).await;
    echoes_whole(&conn, 200 * 1024).await;
}

/// The same with a client whose windows are quinn's defaults (1.25 MB per stream): the loop's
/// writes are cut by its own 256 KiB send window instead of the stream's, and the answer
/// still arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_by_the_send_window_arrives_whole() {
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let (addr, _stats, _stop, _task) = serve(server).await;
    let (_client, conn) = connected_with_quinn_windows(cert, addr).await;
    echoes_whole(&conn, 600 * 1024).await;
}

/// A long answer on a fast path: the congestion window grows past what one UDP send carries
/// (64 KiB), and the loop's GSO sends must stay under it (a larger one is refused by the
/// kernel and all its datagrams lost). 8 MiB echoed whole, with no failed send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_goes_out_in_sends_the_kernel_takes() {
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let (addr, stats, _stop, _task) = serve(server).await;
    let (_client, conn) = connected_with_quinn_windows(cert, addr).await;
    echoes_whole(&conn, 8 << 20).await;
    let s = *stats.borrow();
    assert_eq!(s.send_failed, 0, "sends the kernel refused: {s:?}");
}

/// Two loops sharing one socket, as a group (`meshchat_edge::spread`): a receiver hands each
/// datagram to the loop its connection id names. 64 clients connect and get their echoes;
/// each loop holds some of them (64 random Initial ids all hashing to one of two loops has a
/// chance of 2^-63), and the group's count is the sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_loops_share_a_socket_and_each_serves_its_own_connections() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let socket = Arc::new(meshchat_edge::udp::Udp::new(socket).expect("socket state"));
    let held = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (mut queues, mut stats, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..2u8 {
        let edge = Edge::new(server.clone(), Echo::default()).in_group(k, held.clone());
        stats.push(edge.stats());
        let (tx, rx) = tokio::sync::mpsc::channel(meshchat_edge::spread::QUEUE_DATAGRAMS);
        queues.push(tx);
        tasks.push(tokio::spawn(edge.run_fed(
            socket.clone(),
            rx,
            stopped.clone(),
        )));
    }
    let (done, until) = tokio::sync::watch::channel(false);
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let receiver = tokio::spawn(meshchat_edge::spread::dispatch(
        socket,
        queues,
        until,
        dropped,
        Default::default(),
    ));

    let client = client_for(cert);
    let mut conns = Vec::new();
    for i in 0..64u32 {
        conns.push(connected_and_echoed(&client, addr, i).await);
    }
    let held_by = |s: &tokio::sync::watch::Receiver<EdgeStats>| s.borrow().connections;
    assert_eq!(held_by(&stats[0]) + held_by(&stats[1]), 64);
    assert!(
        held_by(&stats[0]) > 0 && held_by(&stats[1]) > 0,
        "both loops serve"
    );
    assert_eq!(held.load(std::sync::atomic::Ordering::Relaxed), 64);

    // The group stops: every loop returns once its connections drained.
    drop(conns);
    stop.send(true).expect("stop");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("a loop stops within 15 s")
            .expect("loop task")
            .expect("loop ends cleanly");
    }
    done.send(true).expect("done");
    receiver.await.expect("receiver");
}
