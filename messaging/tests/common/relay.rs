//! A UDP relay on 127.0.0.1 between one client and one node, whose node-to-client direction
//! can be held shut: while it is, the client's handshake cannot complete, so whatever the node
//! reads is early data, for certain (no race with the handshake on a fast loopback).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::watch;

/// Datagrams held while shut (the handshake flight and a few replies need far fewer).
const MAX_HELD: usize = 1024;

pub struct Relay {
    /// Where clients connect (`127.0.0.1:port`).
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to `node`, its node-to-client direction shut until [`Relay::open`].
    pub async fn shut(node: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay front"));
        let back = UdpSocket::bind("127.0.0.1:0").await.expect("relay back");
        back.connect(node).await.expect("relay connect");
        let addr = front.local_addr().expect("relay addr");
        let (open, mut is_open) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut held: VecDeque<Vec<u8>> = VecDeque::new();
            let mut up = vec![0u8; 65_536];
            let mut down = vec![0u8; 65_536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        let _ = back.send(&up[..n]).await;
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { return };
                        if *is_open.borrow() {
                            if let Some(to) = client {
                                let _ = front.send_to(&down[..n], to).await;
                            }
                        } else {
                            assert!(held.len() < MAX_HELD, "relay: too many datagrams held");
                            held.push_back(down[..n].to_vec());
                        }
                    }
                    changed = is_open.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if *is_open.borrow() && let Some(to) = client {
                            for d in held.drain(..) {
                                let _ = front.send_to(&d, to).await;
                            }
                        }
                    }
                }
            }
        });
        Self { addr, open, task }
    }

    /// Lets the node's datagrams through, those held first.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
