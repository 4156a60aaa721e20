//! Several loops on one UDP socket: which loop a datagram belongs to.
//!
//! Each loop has its own quinn-proto endpoint and connections. The connection ids a loop
//! issues carry its index in their first byte ([`LoopCids`]); one receiver reads the socket
//! and hands each datagram to the loop its destination connection id names ([`route`]). A
//! client's first Initial carries a connection id the client chose: it goes by a hash of
//! that id, the same for every packet that carries it, and the loop it reaches makes the
//! connection and issues ids of its own. Routing is by connection id, never by address, so a
//! client that migrates stays with its loop (plain SO_REUSEPORT would hash the new address
//! elsewhere; the kernel steering by id through a BPF program was measured against this
//! receiver and not kept: docs/PERFORMANCE.md, "A socket per loop, steered by the kernel").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, RandomConnectionIdGenerator};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::udp::{Datagram, RecvBatch, RecvHealth, Udp, is_icmp_report};

/// Length of the connection ids the loops issue (quinn-proto's default).
pub const CID_LEN: usize = 8;

/// Random connection ids whose first byte is the issuing loop's index.
#[derive(Debug)]
pub struct LoopCids {
    index: u8,
    random: RandomConnectionIdGenerator,
}

impl LoopCids {
    /// Ids of loop `index`.
    pub fn new(index: u8) -> Self {
        Self {
            index,
            random: RandomConnectionIdGenerator::new(CID_LEN),
        }
    }
}

impl ConnectionIdGenerator for LoopCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let random = self.random.generate_cid();
        let mut bytes = [0u8; CID_LEN];
        bytes.copy_from_slice(&random[..CID_LEN]);
        // One byte of the id says which loop: observers learn the loop, nothing that ties
        // two ids of one connection together (the other seven bytes are random).
        bytes[0] = self.index;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The loop (of `loops`) that datagram `data` belongs to, by its destination connection id.
/// Deterministic in the id alone: every packet carrying a given id reaches the same loop.
pub fn route(data: &[u8], loops: usize) -> usize {
    if loops <= 1 {
        return 0;
    }
    let dcid = match data.first() {
        // Long header: version (4 bytes), then the id's length and the id.
        Some(b) if b & 0x80 != 0 => {
            let len = data.get(5).map_or(0, |l| *l as usize);
            data.get(6..6 + len).unwrap_or(&[])
        }
        // Short header: the id right after the first byte, of the length the loops issue.
        Some(_) => data.get(1..1 + CID_LEN).unwrap_or(&[]),
        None => &[],
    };
    match dcid.first() {
        Some(&index) if dcid.len() == CID_LEN && (index as usize) < loops => index as usize,
        _ => {
            // FNV-1a: any deterministic spread will do.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in dcid {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            (h % loops as u64) as usize
        }
    }
}

/// Datagrams waiting for one loop of a group, at most: with the 1,500-byte datagrams of a
/// path without MTU discovery, ~1.5 MB (a full queue drops what comes, and QUIC resends).
pub const QUEUE_DATAGRAMS: usize = 1024;

/// The receiver of a group of loops: reads the group's socket `udp` in batches and hands each
/// datagram to its loop's queue (made with [`QUEUE_DATAGRAMS`]) until `done` turns true, counting in `dropped`
/// the datagrams a full queue did not take and reporting how its reads go to `health` (its
/// only reader). Run it until every loop has returned: a stopping loop still needs the
/// acknowledgements of its closes.
pub async fn dispatch(
    udp: Arc<Udp>,
    loops: Vec<mpsc::Sender<Datagram>>,
    mut done: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
    health: Arc<RecvHealth>,
) {
    let mut batch = RecvBatch::new(health);
    loop {
        tokio::select! {
            received = batch.recv(&udp) => {
                match received {
                    Ok(()) => {}
                    Err(e) if is_icmp_report(&e) => {
                        debug!(error = %e, "recv failed");
                        continue;
                    }
                    // The batch waits before it reads again.
                    Err(e) => {
                        if batch.errors().is_power_of_two() {
                            warn!(error = %e, errors = batch.errors(), "recv failed");
                        } else {
                            debug!(error = %e, "recv failed");
                        }
                        continue;
                    }
                }
                for (meta, data) in batch.datagrams() {
                    let k = route(data, loops.len());
                    if loops[k].try_send(Datagram::new(meta, data)).is_err() {
                        let dropped = dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        if dropped.is_power_of_two() {
                            debug!(dropped, "a loop's datagram queue was full: dropped");
                        }
                    }
                }
            }
            _ = done.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(cid: &[u8]) -> Vec<u8> {
        let mut d = vec![0x40];
        d.extend_from_slice(cid);
        d.extend_from_slice(&[0u8; 20]);
        d
    }

    fn long(cid: &[u8]) -> Vec<u8> {
        let mut d = vec![0xc0, 0, 0, 0, 1, cid.len() as u8];
        d.extend_from_slice(cid);
        d.extend_from_slice(&[0u8; 20]);
        d
    }

    #[test]
    fn ids_a_loop_issues_route_back_to_it_in_either_header() {
        for loops in 2..=8usize {
            for index in 0..loops {
                let mut ids = LoopCids::new(index as u8);
                for _ in 0..50 {
                    let cid = ids.generate_cid();
                    assert_eq!(cid.len(), CID_LEN);
                    assert_eq!(route(&short(&cid), loops), index);
                    assert_eq!(route(&long(&cid), loops), index);
                }
            }
        }
    }

    #[test]
    fn a_client_chosen_id_goes_to_one_loop_every_time_and_ids_spread() {
        let mut seen = [0usize; 4];
        // Ids as a client draws them (xorshift, fixed seed): 16 bytes, or 8 with a first byte
        // past the loops.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut byte = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for i in 0..400u32 {
            let cid: Vec<u8> = if i % 2 == 0 {
                (0..16).map(|_| byte()).collect()
            } else {
                let mut c = vec![200u8];
                c.extend((0..7).map(|_| byte()));
                c
            };
            let first = route(&long(&cid), 4);
            assert_eq!(route(&long(&cid), 4), first, "the same id, the same loop");
            seen[first] += 1;
        }
        assert!(
            seen.iter().all(|n| *n > 40),
            "spread over every loop: {seen:?}"
        );
    }

    #[test]
    fn truncated_or_empty_datagrams_route_without_panicking() {
        for d in [
            &[][..],
            &[0xc0][..],
            &[0xc0, 0, 0, 0, 1, 20, 1, 2][..],
            &[0x40, 1][..],
        ] {
            assert!(route(d, 3) < 3);
        }
        assert_eq!(route(&[0x40, 1], 1), 0);
    }
}
