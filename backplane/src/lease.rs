//! The lease gate: the one switch between the membership driver and the id generator.
//!
//! The membership core (`meshchat_backplane::membership`) decides until when this process
//! holds its Snowflake worker id; the driver copies that deadline here after every event.
//! [`LeaseGate::allows`] compares it with the process's monotonic clock on every id and
//! every authentication, so a stalled driver (or a Redis round that never returns) cannot
//! stretch a lease past its end: the node stops by itself, before Redis can give the worker
//! id to another process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Until when this process may issue ids and serve clients.
#[derive(Debug)]
pub struct LeaseGate {
    origin: Instant,
    /// Inclusive start in ms since `origin`: 0 unless the lease was taken from a source with
    /// no record of earlier holders and the node waits out a TTL.
    valid_from_ms: AtomicU64,
    /// Exclusive deadline in ms since `origin`; `u64::MAX`: no lease (static cluster).
    valid_until_ms: AtomicU64,
}

impl LeaseGate {
    /// A gate that is always open: a static cluster, whose worker ids are checked at start-up.
    pub fn unbounded() -> Self {
        Self::with_deadline(u64::MAX)
    }

    /// A gate that is closed until the driver's first successful round.
    pub fn closed() -> Self {
        Self::with_deadline(0)
    }

    fn with_deadline(ms: u64) -> Self {
        Self {
            origin: Instant::now(),
            valid_from_ms: AtomicU64::new(0),
            valid_until_ms: AtomicU64::new(ms),
        }
    }

    /// The monotonic clock the deadline is on, in ms since the gate was made.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The `Instant` of a deadline in this gate's ms.
    pub fn instant_of(&self, ms: u64) -> Instant {
        self.origin + std::time::Duration::from_millis(ms)
    }

    /// Sets the deadline (the membership core's `lease_valid_until_ms`).
    pub fn set_valid_until(&self, ms: u64) {
        self.valid_until_ms.store(ms, Ordering::SeqCst);
    }

    /// Sets the window (the membership core's `serve_from_ms` and `lease_valid_until_ms`).
    /// The start is stored first: a reader between the two stores sees the later start with
    /// the earlier deadline, never the reverse, so a wait is never skipped.
    pub fn set_window(&self, from_ms: u64, until_ms: u64) {
        self.valid_from_ms.store(from_ms, Ordering::SeqCst);
        self.set_valid_until(until_ms);
    }

    /// The start of the window, in this gate's ms.
    pub fn valid_from_ms(&self) -> u64 {
        self.valid_from_ms.load(Ordering::SeqCst)
    }

    /// The deadline, in this gate's ms.
    pub fn valid_until_ms(&self) -> u64 {
        self.valid_until_ms.load(Ordering::SeqCst)
    }

    /// Whether the lease is held now.
    pub fn allows(&self) -> bool {
        let now = self.now_ms();
        self.valid_from_ms() <= now && now < self.valid_until_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_until_set_and_closed_again_past_the_deadline() {
        let g = LeaseGate::closed();
        assert!(!g.allows());
        g.set_valid_until(g.now_ms() + 60_000);
        assert!(g.allows());
        g.set_valid_until(g.now_ms());
        assert!(!g.allows(), "the deadline is exclusive");
        assert!(LeaseGate::unbounded().allows());
    }

    #[test]
    fn closed_before_the_start_of_its_window() {
        let g = LeaseGate::closed();
        let now = g.now_ms();
        g.set_window(now + 60_000, now + 120_000);
        assert!(!g.allows());
        g.set_window(now, now + 120_000);
        assert!(g.allows());
    }
}
