//! What happened to every message and connection: HDR latency histograms, counters, and the
//! ledger that proves delivery by message id.
//!
//! Every message the harness sends carries a nonce in its body (`lt:<nonce>:...`) and is
//! registered here, with the users who must receive it, before the send starts. The ack
//! gives its message id; each recipient's push must carry the same id (checked), and the
//! entry leaves the ledger once it is acked and every recipient has it. What is still in the
//! ledger at the end, acked but missing a recipient, is an *acked-undelivered* message: the
//! number that must be zero.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hdrhistogram::Histogram;
use meshchat_idgen::UserId;
use parking_lot::Mutex;
use serde::Serialize;

/// Highest latency the histograms hold, in microseconds (larger values are clamped).
const MAX_LATENCY_US: u64 = 120_000_000;

/// Prefix of every load-test message body.
pub const BODY_PREFIX: &str = "lt:";

/// The body of message `nonce`, padded to `len` bytes (at least the prefix and nonce).
pub fn body(nonce: u64, len: usize) -> Vec<u8> {
    let mut b = format!("{BODY_PREFIX}{nonce}:").into_bytes();
    if b.len() < len {
        b.resize(len, b'.');
    }
    b
}

/// The nonce in a load-test body; `None` for any other body.
pub fn nonce_of(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(BODY_PREFIX.as_bytes())?;
    let end = rest.iter().position(|&c| c == b':')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// A latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    // 3 significant figures from 1 µs to 120 s: a few tens of KiB.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds hdrhistogram accepts")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_LATENCY_US)
}

/// Percentiles of one histogram, in microseconds (the JSON report's latency block).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min_us: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// Summarises `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// The histograms: whole-run totals and the current interval (reset by the sampler).
#[derive(Debug)]
pub struct Histograms {
    /// Connect + TLS handshake + hello + authenticate (redirects included).
    pub handshake: Histogram<u64>,
    /// A planned reconnect: close, connect, authenticate.
    pub reconnect: Histogram<u64>,
    /// Node killed -> its client authenticated on another node (chaos).
    pub rehome: Histogram<u64>,
    /// Send -> processed ack.
    pub ack: Histogram<u64>,
    /// Send -> the last recipient received it.
    pub e2e: Histogram<u64>,
    /// Send -> one recipient received it (one sample per recipient).
    pub delivery: Histogram<u64>,
    /// `e2e` for the current interval.
    pub e2e_interval: Histogram<u64>,
    /// `ack` for the current interval.
    pub ack_interval: Histogram<u64>,
}

/// Counters, all monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections opened and authenticated.
    pub established: AtomicU64,
    /// Connections that failed to open or authenticate.
    pub connect_failed: AtomicU64,
    /// Messages whose send started.
    pub sent: AtomicU64,
    /// Messages acked (processed) by a node.
    pub acked: AtomicU64,
    /// Sends that failed after the client's retries.
    pub send_failed: AtomicU64,
    /// Pushes received that belong to a tracked message (one per recipient).
    pub delivered: AtomicU64,
    /// A recipient received the same message twice.
    pub duplicates: AtomicU64,
    /// The sender's own message pushed back to it: its retry went out on a new connection
    /// after the first one closed, so the push of the first attempt reached the new one.
    /// Right (it is the sender's "other device"), counted apart.
    pub own_echoes: AtomicU64,
    /// A push carried another message id than the ack of the same message.
    pub id_mismatches: AtomicU64,
    /// Pushes of load-test messages no ledger entry expected (sends that failed, or a
    /// message seen by a user who was not a recipient).
    pub unexpected: AtomicU64,
    /// Sends the generator skipped because too many were in flight (the node fell behind).
    pub generator_skipped: AtomicU64,
    /// Planned reconnects that succeeded / failed.
    pub reconnects_ok: AtomicU64,
    /// Planned reconnects that failed.
    pub reconnects_failed: AtomicU64,
    /// Connections that dropped without being asked to.
    pub unplanned_disconnects: AtomicU64,
    /// Redirect pushes followed.
    pub redirects: AtomicU64,
    /// Connections found silent (`Event::Silent`).
    pub silences: AtomicU64,
    /// Of those, sessions moved by an early re-home.
    pub early_rehomes: AtomicU64,
    /// Push sequence gaps reported by the client.
    pub gaps: AtomicU64,
    /// Errors the node pushed that answer no request.
    pub node_errors: AtomicU64,
    /// Clients connected to a node when it was killed.
    pub rehome_victims: AtomicU64,
    /// Of those, clients that were serving again on another node.
    pub rehomed: AtomicU64,
    /// Flood sends tried (chaos `flood:K`).
    pub flood_sent: AtomicU64,
    /// Of those, accepted (tracked as any message from then on).
    pub flood_acked: AtomicU64,
    /// Of those, refused with `RATE_LIMITED`.
    pub flood_rate_limited: AtomicU64,
    /// Of those, failed otherwise (an error code other than `RATE_LIMITED`, or no reply).
    pub flood_failed: AtomicU64,
    /// Flood sends not tried because 4,096 were in flight.
    pub flood_skipped: AtomicU64,
}

impl Counters {
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Entry {
    sent: Instant,
    sender: UserId,
    /// Message id from the ack.
    acked: Option<u64>,
    /// Message id the first push carried (checked against the ack).
    pushed_id: Option<u64>,
    /// Recipients still to receive it.
    remaining: Vec<UserId>,
    /// When the last recipient received it.
    last: Option<Instant>,
}

/// The ledger and the measurements.
#[derive(Debug)]
pub struct Tracker {
    ledger: DashMap<u64, Entry>,
    next_nonce: AtomicU64,
    /// Histograms (short critical sections; sampled once a second).
    pub hist: Mutex<Histograms>,
    /// Counters.
    pub counters: Counters,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

/// What was still open in the ledger at the end.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outstanding {
    /// Acked messages some recipient never received. Must be 0.
    pub acked_undelivered: u64,
    /// Up to 20 of their message ids.
    pub acked_undelivered_ids: Vec<u64>,
    /// For the same (up to 20): the message id, its sender and the recipients it missed.
    pub acked_undelivered_missing: Vec<(u64, UserId, Vec<UserId>)>,
    /// Sends neither acked nor failed when the run ended.
    pub unresolved_sends: u64,
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self {
            ledger: DashMap::new(),
            next_nonce: AtomicU64::new(1),
            hist: Mutex::new(Histograms {
                handshake: histogram(),
                reconnect: histogram(),
                rehome: histogram(),
                ack: histogram(),
                e2e: histogram(),
                delivery: histogram(),
                e2e_interval: histogram(),
                ack_interval: histogram(),
            }),
            counters: Counters::default(),
        }
    }

    /// Registers a message `sender` is about to send to `recipients`; returns its nonce.
    pub fn register(&self, sender: UserId, recipients: Vec<UserId>) -> u64 {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        self.ledger.insert(
            nonce,
            Entry {
                sent: Instant::now(),
                sender,
                acked: None,
                pushed_id: None,
                remaining: recipients,
                last: None,
            },
        );
        Counters::inc(&self.counters.sent);
        nonce
    }

    /// The node acked message `nonce` with `id`.
    pub fn acked(&self, nonce: u64, id: u64) {
        let now = Instant::now();
        Counters::inc(&self.counters.acked);
        let Some(mut e) = self.ledger.get_mut(&nonce) else {
            return;
        };
        let ack = micros(now - e.sent);
        e.acked = Some(id);
        if e.pushed_id.is_some_and(|p| p != id) {
            Counters::inc(&self.counters.id_mismatches);
        }
        let done = e
            .remaining
            .is_empty()
            .then(|| micros(e.last.unwrap_or(now) - e.sent));
        drop(e);
        let mut h = self.hist.lock();
        let _ = h.ack.record(ack);
        let _ = h.ack_interval.record(ack);
        if let Some(e2e) = done {
            self.complete(h, nonce, e2e);
        }
    }

    /// Message `nonce` is acked and with every recipient: records its end-to-end time and
    /// takes it out of the ledger (histogram lock released first).
    fn complete(&self, mut h: parking_lot::MutexGuard<'_, Histograms>, nonce: u64, e2e: u64) {
        let _ = h.e2e.record(e2e);
        let _ = h.e2e_interval.record(e2e);
        drop(h);
        self.ledger.remove(&nonce);
    }

    /// The send of `nonce` failed for good (after the client's retries).
    pub fn failed(&self, nonce: u64) {
        Counters::inc(&self.counters.send_failed);
        self.ledger.remove(&nonce);
    }

    /// A send that was refused and is not counted as a failure (a flood's refusals): the
    /// ledger forgets it.
    pub fn refused(&self, nonce: u64) {
        if self.ledger.remove(&nonce).is_some() {
            // Not a message: `sent` counts what a node could have acked.
            self.counters.sent.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `user` received a push of message `id` whose body is `body`.
    pub fn delivered(&self, user: UserId, id: u64, body: &[u8]) {
        let Some(nonce) = nonce_of(body) else {
            return;
        };
        let now = Instant::now();
        let Some(mut e) = self.ledger.get_mut(&nonce) else {
            Counters::inc(&self.counters.unexpected);
            return;
        };
        let Some(pos) = e.remaining.iter().position(|&u| u == user) else {
            let echo = user == e.sender;
            drop(e);
            Counters::inc(if echo {
                &self.counters.own_echoes
            } else {
                &self.counters.duplicates
            });
            return;
        };
        e.remaining.swap_remove(pos);
        Counters::inc(&self.counters.delivered);
        match (e.acked, e.pushed_id) {
            (Some(a), _) if a != id => Counters::inc(&self.counters.id_mismatches),
            (None, Some(p)) if p != id => Counters::inc(&self.counters.id_mismatches),
            (None, None) => e.pushed_id = Some(id),
            _ => {}
        }
        let one = micros(now - e.sent);
        e.last = Some(now);
        let done = (e.remaining.is_empty() && e.acked.is_some()).then_some(one);
        drop(e);
        let mut h = self.hist.lock();
        let _ = h.delivery.record(one);
        if let Some(e2e) = done {
            self.complete(h, nonce, e2e);
        }
    }

    /// Records a handshake (connect + authenticate) time.
    pub fn handshake(&self, d: Duration) {
        let _ = self.hist.lock().handshake.record(micros(d));
    }

    /// Records a planned reconnect time.
    pub fn reconnect(&self, d: Duration) {
        let _ = self.hist.lock().reconnect.record(micros(d));
    }

    /// A killed node's client serving again elsewhere, `d` after the kill.
    pub fn rehomed(&self, d: Duration) {
        Counters::inc(&self.counters.rehomed);
        let _ = self.hist.lock().rehome.record(micros(d));
    }

    /// Messages in the ledger (sent and not yet acked and delivered everywhere).
    pub fn in_flight(&self) -> usize {
        self.ledger.len()
    }

    /// Whether every acked message reached every recipient and no send is unresolved.
    pub fn settled(&self) -> bool {
        self.ledger.is_empty()
    }

    /// What is left in the ledger.
    pub fn outstanding(&self) -> Outstanding {
        let mut o = Outstanding::default();
        for e in self.ledger.iter() {
            match e.acked {
                Some(id) if !e.remaining.is_empty() => {
                    o.acked_undelivered += 1;
                    if o.acked_undelivered_ids.len() < 20 {
                        o.acked_undelivered_ids.push(id);
                        o.acked_undelivered_missing
                            .push((id, e.sender, e.remaining.clone()));
                    }
                }
                Some(_) => {}
                None => o.unresolved_sends += 1,
            }
        }
        o.acked_undelivered_ids.sort_unstable();
        o.acked_undelivered_missing.sort_unstable_by_key(|m| m.0);
        o
    }

    /// Takes the interval histograms' summaries (e2e, ack) and resets them.
    pub fn take_interval(&self) -> (Latency, Latency) {
        let mut h = self.hist.lock();
        let r = (Latency::of(&h.e2e_interval), Latency::of(&h.ack_interval));
        h.e2e_interval.reset();
        h.ack_interval.reset();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_nonce() {
        let b = body(42, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(nonce_of(&b), Some(42));
        assert_eq!(nonce_of(&body(7, 0)), Some(7));
        assert_eq!(nonce_of(b"hello"), None);
        assert_eq!(nonce_of(b"lt:x:"), None);
    }

    #[test]
    fn a_message_leaves_the_ledger_once_acked_and_delivered_in_either_order() {
        let t = Tracker::new();
        let (a, b) = (UserId(1), UserId(2));
        let n1 = t.register(UserId(9), vec![a, b]);
        t.delivered(a, 100, &body(n1, 0));
        t.acked(n1, 100);
        assert_eq!(t.outstanding().acked_undelivered, 1);
        t.delivered(b, 100, &body(n1, 0));
        assert!(t.settled());
        // Push before ack.
        let n2 = t.register(UserId(9), vec![a]);
        t.delivered(a, 200, &body(n2, 0));
        assert_eq!(t.outstanding().unresolved_sends, 1);
        t.acked(n2, 200);
        assert!(t.settled());
        let h = t.hist.lock();
        assert_eq!(h.e2e.len(), 2);
        assert_eq!(h.delivery.len(), 3);
        assert_eq!(h.ack.len(), 2);
    }

    #[test]
    fn wrong_ids_duplicates_and_losses_are_counted() {
        let t = Tracker::new();
        let n = t.register(UserId(9), vec![UserId(1), UserId(2)]);
        t.acked(n, 10);
        t.delivered(UserId(9), 10, &body(n, 0));
        assert_eq!(Counters::get(&t.counters.own_echoes), 1);
        assert_eq!(Counters::get(&t.counters.duplicates), 0);
        t.delivered(UserId(1), 11, &body(n, 0));
        assert_eq!(Counters::get(&t.counters.id_mismatches), 1);
        t.delivered(UserId(1), 10, &body(n, 0));
        assert_eq!(Counters::get(&t.counters.duplicates), 1);
        let o = t.outstanding();
        assert_eq!(o.acked_undelivered, 1);
        assert_eq!(o.acked_undelivered_ids, vec![10]);
        let f = t.register(UserId(9), vec![UserId(3)]);
        t.failed(f);
        t.delivered(UserId(3), 12, &body(f, 0));
        assert_eq!(Counters::get(&t.counters.unexpected), 1);
    }
}
