//! Admission to the handshake: which new connections get a handshake slot now, which wait
//! for one, which are asked to prove their address first (QUIC Retry), and which are refused.
//!
//! The threat is a flood of Initial packets from spoofed sources: each one the node answers
//! with a full handshake costs a slot until the handshake gives up. So:
//!
//! - once more than `retry_above` handshakes are in progress, a client whose address is not
//!   validated gets a Retry (stateless on the node, one round trip for the client); a spoofed
//!   source never answers, so a flood holds at most `retry_above` slots, and only for
//!   `handshake_timeout`;
//! - a source (an IPv4 address, or an IPv6 /64) holds at most `per_source` slots, counting
//!   those waiting for one: past that an unvalidated client gets a Retry and a validated one
//!   is refused;
//! - a validated client finding every slot taken waits for one (bounded by the caller's
//!   timeout, `handshake_queue_wait`) instead of being refused at once.
//!
//! The gate only counts; the accept loop applies its decisions to quinn's `Incoming`.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The key a source is counted under: an IPv4 address, or the /64 of an IPv6 one (a host
/// often owns a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What to do with a new connection.
#[derive(Debug)]
pub enum Admit {
    /// Handshake now, holding this slot until the handshake ends.
    Now(HandshakeSlot),
    /// Every slot is taken: wait for one with [`HandshakeGate::wait`] (the source's share is
    /// already held).
    Wait(SourceShare),
    /// Ask the client to validate its address (QUIC Retry).
    Retry,
    /// Refuse the connection.
    Refuse,
}

/// The handshake slots of one node.
#[derive(Debug)]
pub struct HandshakeGate {
    slots: Arc<Semaphore>,
    capacity: usize,
    retry_above: usize,
    per_source: u32,
    sources: Arc<DashMap<IpAddr, u32>>,
}

/// One source's share of the handshakes in progress (or waiting); released on drop.
#[derive(Debug)]
pub struct SourceShare {
    sources: Arc<DashMap<IpAddr, u32>>,
    key: IpAddr,
}

impl Drop for SourceShare {
    fn drop(&mut self) {
        self.sources.remove_if_mut(&self.key, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// A handshake slot and its source's share; both released on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    _permit: OwnedSemaphorePermit,
    _share: SourceShare,
}

impl HandshakeGate {
    /// A gate with `capacity` slots that asks unvalidated clients to retry once more than
    /// `retry_above` are taken, and lets one source hold at most `per_source`.
    pub fn new(capacity: usize, retry_above: usize, per_source: u32) -> Self {
        let capacity = capacity.max(1);
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            retry_above: retry_above.min(capacity),
            per_source: per_source.max(1),
            sources: Arc::new(DashMap::new()),
        }
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Sources holding a share.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Decides for a connection from `source`; `validated` says whether the client proved it
    /// owns the address (it answered a Retry).
    pub fn admit(&self, source: IpAddr, validated: bool) -> Admit {
        let key = source_key(source);
        let held = self.sources.get(&key).map_or(0, |n| *n);
        if held >= self.per_source {
            return if validated {
                Admit::Refuse
            } else {
                Admit::Retry
            };
        }
        if !validated && self.in_progress() >= self.retry_above {
            return Admit::Retry;
        }
        let share = self.share(key);
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Admit::Now(HandshakeSlot {
                _permit: permit,
                _share: share,
            }),
            Err(_) if validated => Admit::Wait(share),
            Err(_) => Admit::Retry,
        }
    }

    fn share(&self, key: IpAddr) -> SourceShare {
        *self.sources.entry(key).or_insert(0) += 1;
        SourceShare {
            sources: self.sources.clone(),
            key,
        }
    }

    /// Waits for a slot for a client that was told to [`Admit::Wait`]. The caller bounds the
    /// wait.
    pub async fn wait(&self, share: SourceShare) -> HandshakeSlot {
        // The semaphore is never closed.
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("handshake semaphore closed"));
        HandshakeSlot {
            _permit: permit,
            _share: share,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn unvalidated_clients_retry_once_past_the_threshold() {
        let g = HandshakeGate::new(8, 2, 100);
        let a = g.admit(ip("10.0.0.1"), false);
        let b = g.admit(ip("10.0.0.2"), false);
        assert!(matches!(a, Admit::Now(_)) && matches!(b, Admit::Now(_)));
        // Two in progress: the next unvalidated one proves its address first.
        assert!(matches!(g.admit(ip("10.0.0.3"), false), Admit::Retry));
        // Having answered the Retry, it gets a slot.
        let c = g.admit(ip("10.0.0.3"), true);
        assert!(matches!(c, Admit::Now(_)));
        assert_eq!(g.in_progress(), 3);
        drop((a, b, c));
        assert_eq!(g.in_progress(), 0);
        assert_eq!(g.sources(), 0, "shares are released with their slots");
        assert!(matches!(g.admit(ip("10.0.0.4"), false), Admit::Now(_)));
    }

    #[test]
    fn one_source_holds_at_most_its_share() {
        let g = HandshakeGate::new(100, 100, 2);
        let held: Vec<_> = (0..2).map(|_| g.admit(ip("10.0.0.1"), true)).collect();
        assert!(held.iter().all(|a| matches!(a, Admit::Now(_))));
        assert!(matches!(g.admit(ip("10.0.0.1"), true), Admit::Refuse));
        // Unvalidated: could be spoofed in the victim's name, so it is asked to prove it.
        assert!(matches!(g.admit(ip("10.0.0.1"), false), Admit::Retry));
        assert!(matches!(g.admit(ip("10.0.0.2"), true), Admit::Now(_)));
        // An IPv6 host counts per /64.
        let v6: Vec<_> = ["2001:db8::1", "2001:db8::2"]
            .iter()
            .map(|a| g.admit(ip(a), true))
            .collect();
        assert!(v6.iter().all(|a| matches!(a, Admit::Now(_))));
        assert!(matches!(g.admit(ip("2001:db8::3"), true), Admit::Refuse));
        assert!(matches!(
            g.admit(ip("2001:db8:0:1::3"), true),
            Admit::Now(_)
        ));
    }

    #[tokio::test]
    async fn validated_clients_wait_for_a_slot_when_all_are_taken() {
        let g = Arc::new(HandshakeGate::new(1, 1, 10));
        let first = g.admit(ip("10.0.0.1"), true);
        assert!(matches!(first, Admit::Now(_)));
        // Unvalidated: retry; validated: wait.
        assert!(matches!(g.admit(ip("10.0.0.2"), false), Admit::Retry));
        let Admit::Wait(share) = g.admit(ip("10.0.0.2"), true) else {
            panic!("a validated client waits");
        };
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.wait(share).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        let slot = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("slot freed")
            .expect("task");
        assert_eq!(g.in_progress(), 1);
        drop(slot);
        assert_eq!(g.sources(), 0);
    }
}
