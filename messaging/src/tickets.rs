//! The node's store of TLS session tickets for 0-RTT resumption: single use, bounded in bytes.
//!
//! rustls gives 0-RTT only to tickets kept on the server (RFC 8446 section 8.1: a stateless
//! ticket can be replayed, so rustls 0.23 never lets one carry early data). Each ticket is an
//! entry here until the client uses it ([`TicketStore::take`]: once, so a copied 0-RTT flight
//! is accepted at most once, on this node), it expires, or the store is full and it is the
//! oldest. The store holds at most [`TicketStore::budget`] bytes
//! (`transport.ticket_store_bytes`, default 16 MiB: about 47,000 tickets at ~354 bytes each,
//! as `meshchat-resume` reports).
//! A client whose ticket was evicted, or that comes back to another node, makes a full
//! handshake, and the requests it sent early are sent again.
//!
//! A ticket is counted at its id and state plus [`ENTRY_OVERHEAD`], and its slot in the
//! eviction order at its id plus [`ORDER_OVERHEAD`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long rustls tells clients a stored ticket lives (fixed in rustls 0.23 for stored
/// tickets); older entries are dropped.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Bytes a held ticket costs beyond its id and state: its map slot and allocation headers.
pub const ENTRY_OVERHEAD: usize = 96;
/// Bytes a slot of the eviction order costs beyond the id it copies.
pub const ORDER_OVERHEAD: usize = 48;

/// Single-use session tickets, oldest evicted first once the byte budget is reached.
#[derive(Debug)]
pub struct TicketStore {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Ticket id -> (its place in `order`, when it was stored, the resumption state).
    map: HashMap<Vec<u8>, (u64, Instant, Vec<u8>)>,
    /// Ids in the order they were stored. A taken id stays until it reaches the front (its
    /// slot, not its state, still counted).
    order: VecDeque<(u64, Vec<u8>)>,
    next: u64,
    bytes: usize,
}

fn held_cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

fn order_cost(key: &[u8]) -> usize {
    key.len() + ORDER_OVERHEAD
}

impl TicketStore {
    /// A store of at most `budget` bytes (0: no tickets, so no 0-RTT).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Tickets held and the bytes the store is counted at.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.map.len(), inner.bytes)
    }

    fn put_at(&self, key: Vec<u8>, value: Vec<u8>, now: Instant) -> bool {
        let cost = held_cost(&key, &value) + order_cost(&key);
        if cost > self.budget {
            return false;
        }
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        // From the front: slots of taken tickets, expired tickets, and the oldest while
        // there is no room.
        while let Some((seq, front)) = inner.order.front() {
            let live = inner
                .map
                .get(front)
                .filter(|(s, ..)| s == seq)
                .map(|(_, at, v)| (*at, v.len()));
            if let Some((at, _)) = live
                && now.saturating_duration_since(at) < LIFETIME
                && inner.bytes + cost <= self.budget
            {
                break;
            }
            let Some((_, front)) = inner.order.pop_front() else {
                break;
            };
            inner.bytes -= order_cost(&front);
            if let Some((_, len)) = live {
                inner.map.remove(&front);
                inner.bytes -= front.len() + len + ENTRY_OVERHEAD;
            }
        }
        let seq = inner.next;
        inner.next += 1;
        inner.bytes += cost;
        let key_len = key.len();
        inner.order.push_back((seq, key.clone()));
        if let Some((_, _, old)) = inner.map.insert(key, (seq, now, value)) {
            // The same id twice (rustls draws 32 random bytes: never in practice).
            inner.bytes -= key_len + old.len() + ENTRY_OVERHEAD;
        }
        true
    }

    fn take_at(&self, key: &[u8], now: Instant) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock();
        let (_, at, value) = inner.map.remove(key)?;
        inner.bytes -= held_cost(key, &value);
        // An expired ticket is never handed out.
        (now.saturating_duration_since(at) < LIFETIME).then_some(value)
    }
}

impl rustls::server::StoresServerSessions for TicketStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.put_at(key, value, Instant::now())
    }

    /// TLS 1.2 only (never negotiated here): tickets are single use.
    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.take_at(key, Instant::now())
    }

    fn can_cache(&self) -> bool {
        self.budget > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Vec<u8> {
        vec![i; 32]
    }

    #[test]
    fn a_ticket_is_taken_once() {
        let s = TicketStore::new(1 << 20);
        let t = Instant::now();
        assert!(s.put_at(key(1), b"state".to_vec(), t));
        assert_eq!(s.take_at(&key(1), t).as_deref(), Some(&b"state"[..]));
        assert_eq!(s.take_at(&key(1), t), None, "a second use (a replay)");
        assert_eq!(s.take_at(&key(2), t), None, "never stored (another node's)");
    }

    #[test]
    fn the_oldest_go_first_when_the_budget_is_reached() {
        let cost = 32 + 100 + ENTRY_OVERHEAD + 32 + ORDER_OVERHEAD;
        let s = TicketStore::new(cost * 3);
        let t = Instant::now();
        for i in 0..5 {
            assert!(s.put_at(key(i), vec![i; 100], t));
            assert!(s.usage().1 <= s.budget());
        }
        assert_eq!(s.usage(), (3, cost * 3));
        assert_eq!(s.take_at(&key(0), t), None);
        assert_eq!(s.take_at(&key(1), t), None);
        for i in 2..5 {
            assert_eq!(s.take_at(&key(i), t), Some(vec![i; 100]));
        }
        // Taken: only their order slots still count, until they reach the front.
        assert_eq!(s.usage(), (0, 3 * (32 + ORDER_OVERHEAD)));
        assert!(s.put_at(key(9), vec![9; 100], t));
        assert_eq!(s.usage(), (1, cost), "the taken tickets' slots went first");
    }

    #[test]
    fn an_expired_ticket_is_not_handed_out_and_goes_at_the_next_put() {
        let s = TicketStore::new(1 << 20);
        let t = Instant::now();
        assert!(s.put_at(key(1), b"a".to_vec(), t));
        assert!(s.put_at(key(2), b"b".to_vec(), t));
        let later = t + LIFETIME;
        assert_eq!(s.take_at(&key(1), later), None);
        assert!(s.put_at(key(3), b"c".to_vec(), later));
        assert_eq!(s.usage().0, 1, "key 2 expired and dropped");
        assert_eq!(s.take_at(&key(3), later).as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn no_budget_no_tickets() {
        let s = TicketStore::new(0);
        assert!(!rustls::server::StoresServerSessions::can_cache(&s));
        assert!(!s.put_at(key(1), b"x".to_vec(), Instant::now()));
        assert_eq!(s.usage(), (0, 0));
    }
}
