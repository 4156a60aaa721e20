//! The Snowflake generator: layout, clock injection and the lock-free `next` path.
//!
//! ## Layout
//!
//! ```text
//!  63  62                         22 21        12 11          0
//! +---+-----------------------------+------------+-------------+
//! | 0 | ms since EPOCH_UNIX_MS (41) | worker (10)| sequence(12)|
//! +---+-----------------------------+------------+-------------+
//! ```
//!
//! ## How `next` works
//!
//! The generator keeps one `AtomicU64` holding `timestamp << 12 | sequence` of the last id it
//! issued (the worker bits are constant and added on the way out). `next` reads the clock and
//! CASes the state forward:
//!
//! - clock ahead of the last timestamp: take `(now, 0)`;
//! - same millisecond, or **the clock stepped back**: keep counting on the last timestamp,
//!   `(last, seq + 1)`. Ids stay unique and increasing; they carry the last timestamp until the
//!   clock catches up;
//! - the 4096 ids of that millisecond are used up: wait (spin, then yield) until the clock
//!   reaches the next millisecond. The generator never issues an id stamped later than the
//!   clock, so ids never run ahead of real time. If the clock is behind the last timestamp by
//!   more than [`Generator::max_backwards_wait_ms`], `next` returns
//!   [`IdError::ClockMovedBackwards`] instead of blocking the caller for that long.
//!
//! No mutex is taken: contending threads retry the CAS. The format's ceiling is 4,096,000 ids
//! per second per worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The custom epoch: 2024-01-01T00:00:00Z in Unix milliseconds. 41 bits of milliseconds
/// last about 69.7 years from here, until 2093.
pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;

const SEQUENCE_BITS: u32 = 12;
const WORKER_BITS: u32 = 10;
const TIMESTAMP_BITS: u32 = 41;
const TIMESTAMP_SHIFT: u32 = SEQUENCE_BITS + WORKER_BITS;

/// Largest sequence number within one millisecond (4095).
pub const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;
/// Largest worker id (1023).
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;
/// Largest timestamp (ms since the epoch) that fits in 41 bits.
const MAX_TIMESTAMP: u64 = (1 << TIMESTAMP_BITS) - 1;

/// Errors from the generator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The worker id does not fit in 10 bits.
    #[error("worker id {0} is out of range (0..=1023)")]
    WorkerOutOfRange(u16),
    /// The clock is before the custom epoch or after 2093.
    #[error("clock reads {unix_ms} ms since 1970, outside the id epoch range")]
    ClockOutOfRange {
        /// What the clock said.
        unix_ms: u64,
    },
    /// This millisecond's sequence is used up and the clock is behind the last issued
    /// timestamp by more than the generator will wait for.
    #[error("clock moved backwards by {behind_ms} ms; refusing to wait that long for new ids")]
    ClockMovedBackwards {
        /// How far the clock is behind the last issued timestamp.
        behind_ms: u64,
    },
}

/// A source of wall-clock time in Unix milliseconds. Injected so tests can step it.
pub trait Clock: Send + Sync {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_unix_ms(&self) -> u64;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        // A clock before 1970 reads as 0, which `next` reports as out of range.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `unix_ms`.
    pub fn new(unix_ms: u64) -> Self {
        Self(AtomicU64::new(unix_ms))
    }
    /// Sets the reading (forwards or backwards).
    pub fn set(&self, unix_ms: u64) {
        self.0.store(unix_ms, Ordering::SeqCst);
    }
    /// Moves the reading forwards by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_unix_ms(&self) -> u64 {
        (**self).now_unix_ms()
    }
}

/// The parts of a Snowflake id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Snowflake(pub u64);

impl Snowflake {
    /// Builds an id from its parts. Out-of-range parts are masked.
    pub const fn from_parts(ms_since_epoch: u64, worker: u16, sequence: u64) -> Self {
        Self(
            ((ms_since_epoch & MAX_TIMESTAMP) << TIMESTAMP_SHIFT)
                | (((worker as u64) & MAX_WORKER as u64) << SEQUENCE_BITS)
                | (sequence & MAX_SEQUENCE),
        )
    }
    /// Milliseconds since [`EPOCH_UNIX_MS`].
    pub const fn ms_since_epoch(self) -> u64 {
        self.0 >> TIMESTAMP_SHIFT
    }
    /// Unix milliseconds at which the id was issued.
    pub const fn unix_ms(self) -> u64 {
        self.ms_since_epoch() + EPOCH_UNIX_MS
    }
    /// The worker id that issued it.
    pub const fn worker(self) -> u16 {
        ((self.0 >> SEQUENCE_BITS) & MAX_WORKER as u64) as u16
    }
    /// The sequence within its millisecond.
    pub const fn sequence(self) -> u64 {
        self.0 & MAX_SEQUENCE
    }
    /// The smallest id that can carry Unix time `unix_ms` (worker 0, sequence 0): every id
    /// issued at or after `unix_ms` is `>=` this one. Used for history cursors by time.
    /// Times before the epoch give id 0.
    pub const fn min_for_unix_ms(unix_ms: u64) -> Self {
        let ms = unix_ms.saturating_sub(EPOCH_UNIX_MS);
        Self::from_parts(ms, 0, 0)
    }
    /// The largest id that can carry Unix time `unix_ms`.
    pub const fn max_for_unix_ms(unix_ms: u64) -> Self {
        let ms = unix_ms.saturating_sub(EPOCH_UNIX_MS);
        Self::from_parts(ms, MAX_WORKER, MAX_SEQUENCE)
    }
}

/// A lock-free Snowflake generator for one worker id. Share it with `Arc`; `next` takes `&self`.
pub struct Generator<C: Clock = SystemClock> {
    /// `timestamp << 12 | sequence` of the last issued id.
    state: AtomicU64,
    worker_bits: u64,
    worker: u16,
    clock: C,
    max_backwards_wait: u64,
}

impl<C: Clock> std::fmt::Debug for Generator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("worker", &self.worker)
            .field("last", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl Generator<SystemClock> {
    /// A generator on the system clock.
    pub fn new(worker: u16) -> Result<Self, IdError> {
        Self::with_clock(worker, SystemClock)
    }
}

impl<C: Clock> Generator<C> {
    /// Default for [`Self::max_backwards_wait_ms`]: NTP slews and small steps (under a
    /// second) are waited out; anything larger is reported.
    pub const DEFAULT_MAX_BACKWARDS_WAIT_MS: u64 = 1_000;

    /// A generator for `worker` reading time from `clock`.
    pub fn with_clock(worker: u16, clock: C) -> Result<Self, IdError> {
        if worker > MAX_WORKER {
            return Err(IdError::WorkerOutOfRange(worker));
        }
        Ok(Self {
            state: AtomicU64::new(0),
            worker_bits: (worker as u64) << SEQUENCE_BITS,
            worker,
            clock,
            max_backwards_wait: Self::DEFAULT_MAX_BACKWARDS_WAIT_MS,
        })
    }

    /// Sets how far behind the last timestamp the clock may be for `next` to still wait
    /// when a millisecond's sequence is used up (default 1000 ms).
    pub fn max_backwards_wait_ms(mut self, ms: u64) -> Self {
        self.max_backwards_wait = ms;
        self
    }

    /// This generator's worker id.
    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// The clock reading in ms since the epoch.
    fn now(&self) -> Result<u64, IdError> {
        let unix_ms = self.clock.now_unix_ms();
        match unix_ms.checked_sub(EPOCH_UNIX_MS) {
            Some(ms) if ms <= MAX_TIMESTAMP => Ok(ms),
            _ => Err(IdError::ClockOutOfRange { unix_ms }),
        }
    }

    /// Makes every later id's timestamp exceed `unix_ms` (never lowers the floor). A new
    /// holder of a worker id calls it with the previous holder's deadline, so that ids stay
    /// unique across the handover even when this host's clock is behind the previous one's.
    /// Until the clock passes the floor, ids keep counting on the millisecond after it (as
    /// after a clock step back: 4,095 ids, then [`IdError::ClockMovedBackwards`] if the floor
    /// is over [`Self::max_backwards_wait_ms`] ahead, else a short wait for the clock).
    pub fn raise_floor(&self, unix_ms: u64) {
        let ms = unix_ms.saturating_sub(EPOCH_UNIX_MS).min(MAX_TIMESTAMP - 1);
        // "Last issued: (ms + 1, sequence 0)": the next id is (ms + 1, 1) or later, above every
        // id stamped at `ms`, whatever its sequence.
        self.state
            .fetch_max((ms + 1) << SEQUENCE_BITS, Ordering::AcqRel);
    }

    /// The wall-clock ms of the newest id issued (or of the floor), 0 before any.
    pub fn last_unix_ms(&self) -> u64 {
        match self.state.load(Ordering::Acquire) >> SEQUENCE_BITS {
            0 => 0,
            ms => ms + EPOCH_UNIX_MS,
        }
    }

    /// Issues the next id. Strictly greater than every id this generator issued before.
    pub fn next_id(&self) -> Result<Snowflake, IdError> {
        let mut now = self.now()?;
        let mut cur = self.state.load(Ordering::Relaxed);
        let mut wait_started: Option<Instant> = None;
        loop {
            let last_ts = cur >> SEQUENCE_BITS;
            let next = if now > last_ts {
                now << SEQUENCE_BITS
            } else if cur & MAX_SEQUENCE < MAX_SEQUENCE {
                // Same millisecond, or the clock stepped back: keep counting on `last_ts`.
                cur + 1
            } else {
                // Sequence used up at `last_ts`: wait for the clock to pass it.
                let behind = last_ts - now;
                if behind > self.max_backwards_wait {
                    return Err(IdError::ClockMovedBackwards { behind_ms: behind });
                }
                let started = *wait_started.get_or_insert_with(Instant::now);
                if started.elapsed() < Duration::from_micros(50) {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                now = self.now()?;
                cur = self.state.load(Ordering::Relaxed);
                continue;
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let ts = next >> SEQUENCE_BITS;
                    let seq = next & MAX_SEQUENCE;
                    return Ok(Snowflake((ts << TIMESTAMP_SHIFT) | self.worker_bits | seq));
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn manual(at_ms_since_epoch: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock::new(EPOCH_UNIX_MS + at_ms_since_epoch))
    }

    #[test]
    fn parts_round_trip() {
        let id = Snowflake::from_parts(123_456, 789, 4000);
        assert_eq!(id.ms_since_epoch(), 123_456);
        assert_eq!(id.worker(), 789);
        assert_eq!(id.sequence(), 4000);
        assert_eq!(id.unix_ms(), EPOCH_UNIX_MS + 123_456);
        assert!(id.0 < (1 << 63), "the sign bit stays clear");
    }

    #[test]
    fn issued_ids_carry_clock_time_and_worker() {
        let clock = manual(5_000);
        let g = Generator::with_clock(42, clock.clone()).expect("worker in range");
        let id = g.next_id().expect("id");
        assert_eq!(id.unix_ms(), EPOCH_UNIX_MS + 5_000);
        assert_eq!(id.worker(), 42);
        assert_eq!(id.sequence(), 0);
    }

    #[test]
    fn worker_out_of_range_is_rejected() {
        assert_eq!(
            Generator::new(1024).err(),
            Some(IdError::WorkerOutOfRange(1024))
        );
    }

    #[test]
    fn clock_before_epoch_is_an_error_not_a_panic() {
        let g = Generator::with_clock(1, Arc::new(ManualClock::new(1_000))).expect("gen");
        assert!(matches!(
            g.next_id(),
            Err(IdError::ClockOutOfRange { unix_ms: 1_000 })
        ));
    }

    #[test]
    fn monotonic_per_generator() {
        let clock = manual(10);
        let g = Generator::with_clock(3, clock.clone()).expect("gen");
        let mut prev = g.next_id().expect("id");
        for i in 0..50_000u64 {
            if i % 1000 == 0 {
                clock.advance(1);
            }
            let id = g.next_id().expect("id");
            assert!(id > prev, "{id:?} after {prev:?}");
            prev = id;
        }
    }

    #[test]
    fn clock_regression_keeps_counting_on_last_timestamp() {
        let clock = manual(1_000);
        let g = Generator::with_clock(7, clock.clone()).expect("gen");
        let before = g.next_id().expect("id");
        clock.set(EPOCH_UNIX_MS + 400); // step back 600 ms
        let mut prev = before;
        for _ in 0..100 {
            let id = g.next_id().expect("id during regression");
            assert!(id > prev);
            assert_eq!(id.ms_since_epoch(), 1_000, "stays on the last timestamp");
            prev = id;
        }
        clock.set(EPOCH_UNIX_MS + 1_001);
        let after = g.next_id().expect("id");
        assert_eq!(after.ms_since_epoch(), 1_001);
        assert!(after > prev);
    }

    #[test]
    fn large_regression_with_exhausted_sequence_reports_instead_of_blocking() {
        let clock = manual(100_000);
        let g = Generator::with_clock(7, clock.clone())
            .expect("gen")
            .max_backwards_wait_ms(10);
        // Use up the millisecond.
        for _ in 0..=MAX_SEQUENCE {
            g.next_id().expect("id");
        }
        clock.set(EPOCH_UNIX_MS + 50_000);
        assert_eq!(
            g.next_id(),
            Err(IdError::ClockMovedBackwards { behind_ms: 50_000 })
        );
        // Once the clock is past the last timestamp, ids flow again and are still larger.
        clock.set(EPOCH_UNIX_MS + 100_001);
        let id = g.next_id().expect("id");
        assert_eq!(id.ms_since_epoch(), 100_001);
        assert_eq!(id.sequence(), 0);
    }

    #[test]
    fn sequence_exhaustion_moves_to_the_next_millisecond() {
        let clock = manual(2_000);
        let g = Arc::new(Generator::with_clock(1, clock.clone()).expect("gen"));
        for seq in 0..=MAX_SEQUENCE {
            let id = g.next_id().expect("id");
            assert_eq!((id.ms_since_epoch(), id.sequence()), (2_000, seq));
        }
        // The 4097th id must wait for the clock; advance it from another thread.
        let g2 = g.clone();
        let waiter = std::thread::spawn(move || g2.next_id());
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "must not issue an id ahead of the clock"
        );
        clock.advance(1);
        let id = waiter.join().expect("thread").expect("id");
        assert_eq!((id.ms_since_epoch(), id.sequence()), (2_001, 0));
    }

    #[test]
    fn ids_after_a_raised_floor_are_above_it() {
        let clock = manual(5_000);
        let g = Generator::with_clock(7, clock.clone()).expect("id");
        let before = g.next_id().expect("id");
        // A previous holder of worker 7 stamped up to 5,400 ms on a clock ahead of ours.
        g.raise_floor(EPOCH_UNIX_MS + 5_400);
        g.raise_floor(EPOCH_UNIX_MS + 10); // never lowers
        let after = g.next_id().expect("id");
        assert!(after > before);
        assert_eq!(after.ms_since_epoch(), 5_401);
        // Once the clock passes the floor, ids follow the clock again.
        clock.advance(1_000);
        assert_eq!(g.next_id().expect("id").ms_since_epoch(), 6_000);
    }

    #[test]
    fn unique_across_threads() {
        let g = Arc::new(Generator::new(9).expect("gen"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut v = Vec::with_capacity(20_000);
                    let mut prev = Snowflake(0);
                    for _ in 0..20_000 {
                        let id = g.next_id().expect("id");
                        assert!(id > prev, "monotonic within a thread too");
                        prev = id;
                        v.push(id);
                    }
                    v
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for id in t.join().expect("thread") {
                assert!(all.insert(id), "duplicate id {id:?}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn min_for_time_bounds_every_id_of_that_time() {
        let clock = manual(77_000);
        let g = Generator::with_clock(1023, clock.clone()).expect("gen");
        let id = g.next_id().expect("id");
        let t = EPOCH_UNIX_MS + 77_000;
        assert!(Snowflake::min_for_unix_ms(t) <= id);
        assert!(Snowflake::max_for_unix_ms(t) >= id);
        assert!(Snowflake::max_for_unix_ms(t - 1) < id);
        assert!(Snowflake::min_for_unix_ms(t + 1) > id);
        assert_eq!(Snowflake::min_for_unix_ms(0), Snowflake(0));
    }
}
