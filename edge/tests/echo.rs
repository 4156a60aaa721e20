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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_get_their_bytes_echoed_and_drain_out_when_they_close() {
    let (cert, key) = self_signed().expect("certificate");
    let server = server_config(cert.clone(), key).expect("server config");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let edge = Edge::new(server, Echo::default());
    let mut stats = edge.stats();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(edge.run(socket, stopped));

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    client.set_default_client_config(client_config(cert).expect("client config"));
    let mut conns = Vec::new();
    for i in 0..20u32 {
        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let msg = format!("hello {i}");
        send.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        recv.read_exact(&mut back).await.expect("echo");
        assert_eq!(back, msg.as_bytes());
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
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let edge = Edge::new(std::sync::Arc::new(server), Echo::default());
    let mut stats = edge.stats();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(edge.run(socket, stopped));

    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let conn = client
        .connect_with(
            client_config(cert).expect("client config"),
            addr,
            "localhost",
        )
        .expect("connect")
        .await
        .expect("handshake");
    wait_stats(&mut stats, "one connection held", |s| s.connections == 1).await;
    // The client sends nothing more (and no keep-alives): only the loop's idle timer ends the
    // connection. (Dropping the handle would close it with a frame instead.)
    wait_stats(&mut stats, "the silent connection timed out", |s| {
        s.connections == 0
    })
    .await;
    drop((conn, client));
}
