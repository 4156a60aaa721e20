//! A UDP relay that adds a fixed one-way delay in each direction, between clients on this
//! machine and one node: a stand-in for `tc qdisc ... netem delay` on kernels without the
//! netem qdisc (this project's build machines run one). Each datagram is held for the delay
//! and sent on in order; one upstream socket per client address, so the node sees each
//! client apart. Bounded: at most [`MAX_CLIENTS`] clients, and at most [`MAX_HELD_BYTES`]
//! held per direction and client (past it, datagrams are dropped, as a full link drops them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most clients one relay serves.
pub const MAX_CLIENTS: usize = 4096;
/// Most bytes held in one direction of one client.
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[error("delay relay: {0}")]
pub struct DelayError(#[from] std::io::Error);

/// A running relay; dropped, it stops.
#[derive(Debug)]
pub struct DelayRelay {
    /// Where clients send (`127.0.0.1:port`).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One datagram on its way, sent at `due`.
type Held = (Instant, Vec<u8>);

/// Sends what `rx` holds, each datagram at its time, through `send`.
async fn pace<F, Fut>(mut rx: mpsc::Receiver<Held>, send: F)
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while let Some((due, datagram)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        send(datagram).await;
    }
}

/// Starts a relay on `bind` to `node`, adding `one_way` in each direction (a round trip gains
/// twice that).
pub async fn start(
    bind: SocketAddr,
    node: SocketAddr,
    one_way: Duration,
) -> Result<DelayRelay, DelayError> {
    let front = Arc::new(UdpSocket::bind(bind).await?);
    let addr = front.local_addr()?;
    let task = tokio::spawn(async move {
        // Per client: the queue toward the node.
        let mut clients: HashMap<SocketAddr, mpsc::Sender<Held>> = HashMap::new();
        // The per-client tasks, stopped with this one (dropping the set aborts them).
        let mut tasks = tokio::task::JoinSet::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                return;
            };
            if !clients.contains_key(&from) {
                if clients.len() >= MAX_CLIENTS {
                    continue;
                }
                let Ok(back) = UdpSocket::bind(SocketAddr::new(node.ip(), 0)).await else {
                    continue;
                };
                if back.connect(node).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                // Datagrams of at least 1,200 bytes (QUIC): the byte bound as a count.
                let slots = (MAX_HELD_BYTES / 1_200).max(1);
                let (up_tx, up_rx) = mpsc::channel::<Held>(slots);
                let (down_tx, down_rx) = mpsc::channel::<Held>(slots);
                tasks.spawn(pace(up_rx, {
                    let back = back.clone();
                    move |d| {
                        let back = back.clone();
                        async move {
                            let _ = back.send(&d).await;
                        }
                    }
                }));
                tasks.spawn(pace(down_rx, {
                    let front = front.clone();
                    move |d| {
                        let front = front.clone();
                        async move {
                            let _ = front.send_to(&d, from).await;
                        }
                    }
                }));
                // The node's datagrams for this client, delayed on the way back.
                tasks.spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        let due = Instant::now() + one_way;
                        if down_tx.try_send((due, buf[..n].to_vec())).is_err()
                            && down_tx.is_closed()
                        {
                            return;
                        }
                    }
                });
                clients.insert(from, up_tx);
            }
            if let Some(up) = clients.get(&from) {
                let _ = up.try_send((Instant::now() + one_way, buf[..n].to_vec()));
            }
        }
    });
    Ok(DelayRelay { addr, task })
}
