//! Whether a node has gone silent or dead: the liveness watch of every connection of this
//! process.
//!
//! - [`Judge`]: the verdict for one connection, a sans-IO state machine fed the time and the
//!   connection's counters (datagrams received, ack-eliciting frames sent, round-trip time);
//!   unit-tested with simulated time.
//! - [`watch`]: the checks of all the process's connections run on one thread (`mc-liveness`),
//!   each connection due at its own time in one heap. Not a timer and a task per connection:
//!   a load generator holding 100,000 connections had 100,000 tokio timers re-armed every
//!   5 s, and tokio's hierarchical timer wheel moves every timer due in the next 4.096 s block
//!   down a level at once when that block begins, a burst that stalled the generator's
//!   workers 10-30 ms every ~4 s (docs/PERFORMANCE.md, "The load generator's liveness
//!   checks on one thread"). The thread takes the due checks in batches at least
//!   [`GRANULE`] apart, so a check runs at most that much late.
//!
//! Everything the thread calls is synchronous (`quinn::Connection::stats`, `close`, a watch
//! channel's send, an event channel's `try_send`), so it needs no runtime. Should the thread
//! fail to start, each connection falls back to a tokio task of its own.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, watch as watch_channel};
use tracing::{debug, warn};

use crate::conn::Event;

/// The shortest time between two of the thread's batches of checks: how late a check may
/// run, and so how many checks one wake-up takes (~100 at 100,000 connections checked every
/// 5 s).
pub(crate) const GRANULE: Duration = Duration::from_millis(5);

/// A silence that begins with the RTT above 4x its lowest plus this is taken as a slowdown.
pub(crate) const SLOW_RTT_MARGIN: Duration = Duration::from_millis(100);

/// The `Disconnected` reason after the liveness watch closed the connection.
pub(crate) const DEAD_REASON: &str = "node silent: declared dead by the liveness check";

/// How long a node may stay silent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    /// Until the connection is closed as dead.
    pub timeout: Duration,
    /// Until the connection is marked silent; zero turns it off.
    pub suspect_after: Duration,
}

/// A connection's counters at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Datagrams received from the node so far.
    pub rx: u64,
    /// Ack-eliciting frames sent to the node so far.
    pub sent: u64,
    /// The smoothed round-trip time now.
    pub rtt: Duration,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The node has been silent for the whole timeout after something that needed an
    /// answer: close the connection as dead.
    Dead,
    /// Alive as far as is known; `silent` while the node is silent past `suspect_after`.
    Live {
        /// Whether the connection counts as silent now.
        silent: bool,
    },
}

/// Judges one connection: closed as dead when the node stays silent for `timeout` after
/// this side sent it an ack-eliciting frame (a request, or a keep-alive PING), silent from
/// `suspect_after` of such silence until the node is heard again. A datagram of any kind
/// from the node (an ACK suffices) proves it alive. Checked six times per `suspect_after`
/// (or timeout, if shorter). A check that runs late by more than a quarter of the timeout
/// means this process was not running (starved of CPU, suspended): received datagrams may
/// be waiting unread, so silence until then proves nothing and the clock starts again.
#[derive(Debug, Clone)]
pub(crate) struct Judge {
    timeout: Duration,
    suspect_after: Duration,
    period: Duration,
    last: Seen,
    /// Since when the node has been silent after this side sent it something.
    waiting_since: Option<Instant>,
    last_check: Instant,
    /// The round trip this connection can have (the lowest smoothed RTT seen).
    min_rtt: Duration,
    /// Whether the node was already slow when the silence began (its RTT well above the
    /// lowest): a busy node's clients go silent together, and each trying another node at
    /// once overloads the others in turn (10k load test: 7k early attempts, a storm); a node
    /// that dies was answering at its usual pace until then. A silence that follows a
    /// slowdown is left to the liveness timeout.
    slow_before: bool,
}

impl Judge {
    /// A judge for a connection whose counters at `now` are `seen`.
    pub(crate) fn new(liveness: Liveness, seen: Seen, now: Instant) -> Self {
        // Zero turns it off.
        let suspect_after = if liveness.suspect_after.is_zero() {
            Duration::MAX
        } else {
            liveness.suspect_after
        };
        // Fine enough that the tick adds little to either deadline (0.5 s at the defaults, a
        // sixth of the shorter one).
        let period = (liveness.timeout.min(suspect_after) / 6).max(Duration::from_millis(50));
        Self {
            timeout: liveness.timeout,
            suspect_after,
            period,
            last: seen,
            waiting_since: None,
            last_check: now,
            min_rtt: seen.rtt,
            slow_before: false,
        }
    }

    /// How often the connection is checked.
    pub(crate) fn period(&self) -> Duration {
        self.period
    }

    /// One check at `now`, with the connection's counters then.
    pub(crate) fn check(&mut self, now: Instant, seen: Seen) -> Verdict {
        let since_last = now.saturating_duration_since(self.last_check);
        if since_last > self.period + self.timeout / 4 && self.waiting_since.is_some() {
            debug!(
                late_ms = (since_last - self.period).as_millis() as u64,
                "liveness check ran late; its clock restarts"
            );
            self.waiting_since = Some(now);
        }
        self.last_check = now;
        self.min_rtt = self.min_rtt.min(seen.rtt);
        if seen.rx != self.last.rx {
            self.waiting_since = None;
        } else if seen.sent != self.last.sent && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
            self.slow_before = seen.rtt > self.min_rtt * 4 + SLOW_RTT_MARGIN;
        }
        self.last = seen;
        let silent_for = self.waiting_since.map(|t| now.saturating_duration_since(t));
        if silent_for.is_some_and(|s| s >= self.timeout) {
            return Verdict::Dead;
        }
        Verdict::Live {
            silent: !self.slow_before && silent_for.is_some_and(|s| s >= self.suspect_after),
        }
    }
}

/// Something the watch thread checks from time to time.
pub(crate) trait Watched: Send {
    /// Checks at `now`; the time until the next check, or `None` once the watch is over.
    fn check(&mut self, now: Instant) -> Option<Duration>;
}

/// The watch of one connection: its judge and what a verdict acts on.
pub(crate) struct ConnWatch {
    pub judge: Judge,
    pub conn: quinn::Connection,
    /// Set before the connection is closed as dead (its `Disconnected` event says so).
    pub dead: Arc<AtomicBool>,
    /// True while the node is silent.
    pub silent: Arc<watch_channel::Sender<bool>>,
    pub events: mpsc::Sender<Event>,
    /// While set, no `Silent` event is sent.
    pub muted: Arc<AtomicBool>,
}

/// The counters the judge needs, from a connection's QUIC statistics.
pub(crate) fn seen(conn: &quinn::Connection) -> Seen {
    let s = conn.stats();
    let f = &s.frame_tx;
    Seen {
        rx: s.udp_rx.datagrams,
        sent: f.stream + f.ping + f.max_data + f.max_stream_data,
        rtt: s.path.rtt,
    }
}

impl Watched for ConnWatch {
    fn check(&mut self, now: Instant) -> Option<Duration> {
        if self.conn.close_reason().is_some() {
            return None;
        }
        match self.judge.check(now, seen(&self.conn)) {
            Verdict::Dead => {
                debug!(remote = %self.conn.remote_address(), "node silent; closing the connection");
                self.dead.store(true, Ordering::SeqCst);
                self.conn.close(0u32.into(), DEAD_REASON.as_bytes());
                None
            }
            Verdict::Live { silent } => {
                if self
                    .silent
                    .send_if_modified(|s| std::mem::replace(s, silent) != silent)
                    && silent
                {
                    debug!(remote = %self.conn.remote_address(), "node silent");
                    if !self.muted.load(Ordering::SeqCst) {
                        // A hint: not sent if the event buffer is full.
                        let _ = self.events.try_send(Event::Silent);
                    }
                }
                Some(self.judge.period())
            }
        }
    }
}

/// Watches `w` until its check says it is over: on the process's watch thread, or, should
/// that thread fail to start, on a tokio task of its own (needs a runtime then).
pub(crate) fn watch(w: ConnWatch) {
    match thread() {
        Some(t) => {
            let at = Instant::now() + w.judge.period();
            t.add(Box::new(w), at);
        }
        None => {
            tokio::spawn(watch_on_task(w));
        }
    }
}

/// The fallback: the same checks on a task of this connection's own.
async fn watch_on_task(mut w: ConnWatch) {
    let mut next = w.judge.period();
    loop {
        tokio::select! {
            _ = w.conn.closed() => return,
            _ = tokio::time::sleep(next) => {}
        }
        match w.check(Instant::now()) {
            Some(n) => next = n,
            None => return,
        }
    }
}

/// The process's watch thread, started by the first connection; `None` if it could not be
/// started.
fn thread() -> Option<&'static Sweeper> {
    static SWEEPER: OnceLock<Option<Sweeper>> = OnceLock::new();
    SWEEPER
        .get_or_init(|| match Sweeper::start("mc-liveness") {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "could not start the liveness thread; a task per connection instead");
                None
            }
        })
        .as_ref()
}

/// One entry of the heap: a watch due at `at` (`seq` breaks ties in order of arrival).
struct Due {
    at: Instant,
    seq: u64,
    watched: Box<dyn Watched>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Due>>,
    seq: u64,
    /// When the sleeping thread wakes by itself (`None`: only when woken), while it sleeps.
    asleep_until: Option<Option<Instant>>,
    /// Set when the [`Sweeper`] is dropped: the thread ends.
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// A thread that runs every watch when it falls due, in batches at least [`GRANULE`] apart.
/// The process's own is never dropped; dropping one stops its thread and drops its watches.
pub(crate) struct Sweeper {
    shared: Arc<Shared>,
}

impl Sweeper {
    /// Starts the thread.
    pub(crate) fn start(name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let on_thread = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(256 * 1024)
            .spawn(move || run(&on_thread))?;
        Ok(Self { shared })
    }

    /// Adds a watch, first checked at `at`.
    pub(crate) fn add(&self, watched: Box<dyn Watched>, at: Instant) {
        let mut q = self.shared.queue.lock();
        q.seq += 1;
        let seq = q.seq;
        q.heap.push(Reverse(Due { at, seq, watched }));
        // Wake the thread only if it sleeps past this one's time.
        if let Some(until) = q.asleep_until
            && until.is_none_or(|u| at < u)
        {
            q.asleep_until = None;
            self.shared.wake.notify_one();
        }
    }

    /// Watches not yet over.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shared.queue.lock().heap.len()
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.shared.queue.lock().stopped = true;
        self.shared.wake.notify_one();
    }
}

/// The thread: takes every watch due, checks each outside the lock, puts back those not over,
/// and sleeps until the next is due, but at least [`GRANULE`] after this batch began.
fn run(shared: &Shared) {
    let mut batch: Vec<Due> = Vec::new();
    let mut q = shared.queue.lock();
    let mut not_before = Instant::now();
    while !q.stopped {
        let now = Instant::now();
        if now >= not_before {
            while q.heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
                if let Some(Reverse(d)) = q.heap.pop() {
                    batch.push(d);
                }
            }
        }
        if batch.is_empty() {
            let until = q.heap.peek().map(|Reverse(d)| d.at.max(not_before));
            q.asleep_until = Some(until);
            match until {
                Some(at) => {
                    shared.wake.wait_until(&mut q, at);
                }
                None => shared.wake.wait(&mut q),
            }
            q.asleep_until = None;
            continue;
        }
        not_before = now + GRANULE;
        parking_lot::MutexGuard::unlocked(&mut q, || {
            batch.retain_mut(|d| match d.watched.check(now) {
                Some(next) => {
                    d.at = now + next;
                    true
                }
                None => false,
            });
        });
        for d in batch.drain(..) {
            q.heap.push(Reverse(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    const RTT: Duration = Duration::from_millis(1);

    fn liveness(timeout_ms: u64, suspect_ms: u64) -> Liveness {
        Liveness {
            timeout: Duration::from_millis(timeout_ms),
            suspect_after: Duration::from_millis(suspect_ms),
        }
    }

    fn seen(rx: u64, sent: u64) -> Seen {
        Seen { rx, sent, rtt: RTT }
    }

    /// Checks `judge` every period from `t0 + period` until `t0 + ms`, with counters from
    /// `counters(elapsed)`; the verdicts with their times.
    fn run_judge(
        judge: &mut Judge,
        t0: Instant,
        ms: u64,
        counters: impl Fn(Duration) -> Seen,
    ) -> Vec<(Duration, Verdict)> {
        let mut out = Vec::new();
        let mut t = judge.period();
        while t <= Duration::from_millis(ms) {
            out.push((t, judge.check(t0 + t, counters(t))));
            t += judge.period();
        }
        out
    }

    #[test]
    fn the_period_is_a_sixth_of_the_shorter_deadline_and_at_least_50_ms() {
        let t0 = Instant::now();
        let s = seen(0, 0);
        assert_eq!(
            Judge::new(liveness(5_000, 3_000), s, t0).period(),
            Duration::from_millis(500)
        );
        assert_eq!(
            Judge::new(liveness(30_000, 0), s, t0).period(),
            Duration::from_secs(5)
        );
        assert_eq!(
            Judge::new(liveness(120, 60), s, t0).period(),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_node_that_answers_is_never_silent() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(0, 0), t0);
        // Something sent and something heard between every two checks.
        let verdicts = run_judge(&mut j, t0, 20_000, |t| {
            let n = t.as_millis() as u64 / 500;
            seen(n, n)
        });
        assert!(
            verdicts
                .iter()
                .all(|(_, v)| *v == Verdict::Live { silent: false })
        );
    }

    #[test]
    fn an_idle_connection_that_sends_nothing_is_never_silent() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(7, 3), t0);
        let verdicts = run_judge(&mut j, t0, 60_000, |_| seen(7, 3));
        assert!(
            verdicts
                .iter()
                .all(|(_, v)| *v == Verdict::Live { silent: false })
        );
    }

    #[test]
    fn silence_after_a_send_is_silent_at_suspect_after_and_dead_at_the_timeout() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(10, 10), t0);
        // One request at 0.2 s, never answered.
        let verdicts = run_judge(&mut j, t0, 10_000, |t| {
            if t >= Duration::from_millis(200) {
                seen(10, 11)
            } else {
                seen(10, 10)
            }
        });
        // Noticed at the first check (0.5 s): silent from 3.5 s, dead at 5.5 s.
        let first_silent = verdicts
            .iter()
            .find(|(_, v)| *v == Verdict::Live { silent: true });
        assert_eq!(first_silent.map(|(t, _)| t.as_millis()), Some(3_500));
        let dead = verdicts.iter().find(|(_, v)| *v == Verdict::Dead);
        assert_eq!(dead.map(|(t, _)| t.as_millis()), Some(5_500));
    }

    #[test]
    fn a_node_heard_again_is_no_longer_silent() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(0, 0), t0);
        // Sent at 0.1 s, the answer (any datagram) at 4.2 s.
        let verdicts = run_judge(&mut j, t0, 8_000, |t| {
            let rx = u64::from(t >= Duration::from_millis(4_200));
            seen(rx, u64::from(t >= Duration::from_millis(100)))
        });
        let at = |ms: u128| {
            verdicts
                .iter()
                .find(|(t, _)| t.as_millis() == ms)
                .map(|(_, v)| *v)
        };
        assert_eq!(at(4_000), Some(Verdict::Live { silent: true }));
        assert_eq!(at(4_500), Some(Verdict::Live { silent: false }));
        assert!(!verdicts.iter().any(|(_, v)| *v == Verdict::Dead));
    }

    #[test]
    fn suspect_after_zero_turns_silence_off_but_not_death() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(3_000, 0), seen(0, 0), t0);
        let verdicts = run_judge(&mut j, t0, 5_000, |_| seen(0, 1));
        assert!(
            !verdicts
                .iter()
                .any(|(_, v)| *v == Verdict::Live { silent: true })
        );
        assert!(verdicts.iter().any(|(_, v)| *v == Verdict::Dead));
    }

    #[test]
    fn a_silence_that_follows_a_slowdown_is_left_to_the_timeout() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(0, 0), t0);
        // The RTT was 1 ms; the send goes out with the RTT at 500 ms (a busy node).
        let verdicts = run_judge(&mut j, t0, 10_000, |t| {
            if t >= Duration::from_millis(400) {
                Seen {
                    rx: 0,
                    sent: 1,
                    rtt: Duration::from_millis(500),
                }
            } else {
                seen(0, 0)
            }
        });
        assert!(
            !verdicts
                .iter()
                .any(|(_, v)| *v == Verdict::Live { silent: true })
        );
        assert!(verdicts.iter().any(|(_, v)| *v == Verdict::Dead));
    }

    #[test]
    fn a_check_that_runs_late_restarts_the_clock() {
        let t0 = Instant::now();
        let mut j = Judge::new(liveness(5_000, 3_000), seen(0, 0), t0);
        assert_eq!(
            j.check(t0 + Duration::from_millis(500), seen(0, 1)),
            Verdict::Live { silent: false }
        );
        // The process was stopped for 10 s: late by far more than a quarter of the timeout.
        let late = t0 + Duration::from_millis(10_500);
        assert_eq!(j.check(late, seen(0, 1)), Verdict::Live { silent: false });
        // The clock runs from the late check: silent 3 s after it, dead 5 s after it.
        let mut t = Duration::ZERO;
        let (mut first_silent, mut dead) = (None, None);
        while dead.is_none() && t < Duration::from_secs(20) {
            t += j.period();
            match j.check(late + t, seen(0, 1)) {
                Verdict::Dead => dead = Some(t),
                Verdict::Live { silent: true } if first_silent.is_none() => first_silent = Some(t),
                Verdict::Live { .. } => {}
            }
        }
        assert_eq!(first_silent, Some(Duration::from_secs(3)));
        assert_eq!(dead, Some(Duration::from_secs(5)));
    }

    /// Counts its checks; over after `limit`.
    struct Counted {
        checks: Arc<AtomicU32>,
        limit: u32,
        period: Duration,
        times: Arc<Mutex<Vec<Instant>>>,
    }

    impl Watched for Counted {
        fn check(&mut self, now: Instant) -> Option<Duration> {
            self.times.lock().push(now);
            let n = self.checks.fetch_add(1, Ordering::SeqCst) + 1;
            (n < self.limit).then_some(self.period)
        }
    }

    /// Waits (without sleeping for it) until `cond` holds, at most 10 s.
    fn wait_until(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_thread_checks_each_watch_at_its_period_until_it_is_over() {
        let sweeper = Sweeper::start("test-liveness").expect("thread");
        let start = Instant::now();
        let mut all = Vec::new();
        for i in 0..200u32 {
            let checks = Arc::new(AtomicU32::new(0));
            let times = Arc::new(Mutex::new(Vec::new()));
            let period = Duration::from_millis(20 + u64::from(i % 5) * 10);
            sweeper.add(
                Box::new(Counted {
                    checks: checks.clone(),
                    limit: 3,
                    period,
                    times: times.clone(),
                }),
                start + period,
            );
            all.push((checks, times, period));
        }
        wait_until(|| all.iter().all(|(c, _, _)| c.load(Ordering::SeqCst) == 3));
        // Over after their third check: none is left, none checked again.
        wait_until(|| sweeper.len() == 0);
        for (checks, times, period) in &all {
            assert_eq!(checks.load(Ordering::SeqCst), 3);
            let times = times.lock();
            // Never early: each check at least a period after the one before.
            assert!(times[0] >= start + *period);
            for w in times.windows(2) {
                assert!(
                    w[1] - w[0] >= *period,
                    "checked {:?} apart, period {period:?}",
                    w[1] - w[0]
                );
            }
        }
    }

    #[test]
    fn a_watch_added_while_the_thread_sleeps_long_is_checked_on_time() {
        let sweeper = Sweeper::start("test-liveness").expect("thread");
        let now = Instant::now();
        let far = Arc::new(AtomicU32::new(0));
        sweeper.add(
            Box::new(Counted {
                checks: far.clone(),
                limit: 1,
                period: Duration::ZERO,
                times: Arc::default(),
            }),
            now + Duration::from_secs(3_600),
        );
        // The thread now sleeps for an hour; a watch due at once must wake it.
        let soon = Arc::new(AtomicU32::new(0));
        sweeper.add(
            Box::new(Counted {
                checks: soon.clone(),
                limit: 1,
                period: Duration::ZERO,
                times: Arc::default(),
            }),
            Instant::now(),
        );
        wait_until(|| soon.load(Ordering::SeqCst) == 1);
        assert_eq!(far.load(Ordering::SeqCst), 0);
        assert_eq!(sweeper.len(), 1);
    }
}
