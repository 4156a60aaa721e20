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
//!   is refused. Validated and unvalidated handshakes are counted apart: Initials forged in a
//!   victim's name fill only the unvalidated share, never keep the victim's real (validated)
//!   clients out;
//! - a validated client finding every slot taken waits for one (bounded by the caller's
//!   timeout, `handshake_queue_wait`) instead of being refused at once.
//!
//! The gate only counts; the accept loop applies its decisions to quinn's `Incoming`.
//!
//! Password attempts (`Register`, `Login`) are the other costly thing a stranger can ask for:
//! each costs an argon2id hash (~19 MiB, tens of ms) and a login is a guess. The
//! [`PasswordGate`] admits one before any hashing: a per-source rate, a per-account rate for
//! logins (whether or not the account exists, so the limit reveals nothing), and one hash at a
//! time per source, so the hashing queue serves sources in turn however many connections
//! each opens.

use std::net::IpAddr;
use std::sync::Arc;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::error::RequestError;

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

/// Changes the number of permits of `sem` from `from` to `to`: more at once; fewer as the
/// permits in use come back (a task takes the difference and forgets it), so nothing held
/// now is cut short.
pub(crate) fn resize(sem: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        sem.add_permits(to - from);
    } else if from > to {
        let sem = sem.clone();
        let mut left = from - to;
        tokio::spawn(async move {
            while left > 0 {
                let n = u32::try_from(left).unwrap_or(u32::MAX);
                // The semaphores resized here are never closed.
                let Ok(permits) = sem.acquire_many(n).await else {
                    return;
                };
                permits.forget();
                left -= n as usize;
            }
        });
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
    capacity: AtomicUsize,
    retry_above: AtomicUsize,
    per_source: AtomicU32,
    /// Handshakes per (source, validated).
    sources: Arc<DashMap<(IpAddr, bool), u32>>,
}

/// One source's share of the handshakes in progress (or waiting); released on drop.
#[derive(Debug)]
pub struct SourceShare {
    sources: Arc<DashMap<(IpAddr, bool), u32>>,
    key: (IpAddr, bool),
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
            capacity: AtomicUsize::new(capacity),
            retry_above: AtomicUsize::new(retry_above.min(capacity)),
            per_source: AtomicU32::new(per_source.max(1)),
            sources: Arc::new(DashMap::new()),
        }
    }

    /// Applies reloaded limits (the same arguments as [`HandshakeGate::new`]). Handshakes in
    /// progress keep their slots; a smaller capacity takes effect as they finish.
    pub fn set_limits(&self, capacity: usize, retry_above: usize, per_source: u32) {
        let capacity = capacity.max(1);
        let old = self.capacity.swap(capacity, Ordering::Relaxed);
        resize(&self.slots, old, capacity);
        self.retry_above
            .store(retry_above.min(capacity), Ordering::Relaxed);
        self.per_source.store(per_source.max(1), Ordering::Relaxed);
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.capacity
            .load(Ordering::Relaxed)
            .saturating_sub(self.slots.available_permits())
    }

    /// Sources holding a share.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Decides for a connection from `source`; `validated` says whether the client proved it
    /// owns the address (it answered a Retry).
    pub fn admit(&self, source: IpAddr, validated: bool) -> Admit {
        let key = (source_key(source), validated);
        let held = self.sources.get(&key).map_or(0, |n| *n);
        if held >= self.per_source.load(Ordering::Relaxed) {
            return if validated {
                Admit::Refuse
            } else {
                Admit::Retry
            };
        }
        if !validated && self.in_progress() >= self.retry_above.load(Ordering::Relaxed) {
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

    fn share(&self, key: (IpAddr, bool)) -> SourceShare {
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

/// Limits on password attempts, checked before any hashing.
#[derive(Debug, Clone, Copy)]
pub struct PasswordLimits {
    /// Sustained attempts (register and login) per source per minute.
    pub per_source_per_min: u32,
    /// Burst of attempts per source.
    pub source_burst: u32,
    /// Sustained logins per account name per minute (on this node).
    pub per_account_per_min: u32,
    /// Burst of logins per account name.
    pub account_burst: u32,
    /// How long an attempt waits for its source's turn at the hashing queue.
    pub queue_wait: Duration,
}

/// Admission of password attempts: rates per source and per account, and one hash in the
/// queue per source at a time.
pub struct PasswordGate {
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    per_account: DefaultKeyedRateLimiter<String>,
    turns: DashMap<IpAddr, Arc<Mutex<()>>>,
    queue_wait: Duration,
}

impl std::fmt::Debug for PasswordGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordGate")
            .field("sources_waiting", &self.turns.len())
            .finish()
    }
}

fn per_minute(n: u32, burst: u32) -> Quota {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(burst)
}

fn rate_limited<K: std::hash::Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), RequestError> {
    limiter.check_key(key).map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        RequestError::RateLimited {
            retry_after_ms: wait.as_millis() as u64 + 1,
        }
    })
}

/// A source's turn at the hashing queue; the next attempt from that source waits for it.
#[derive(Debug)]
pub struct PasswordTurn {
    _turn: OwnedMutexGuard<()>,
}

impl PasswordGate {
    /// A gate with these limits.
    pub fn new(limits: PasswordLimits) -> Self {
        Self {
            per_source: RateLimiter::keyed(per_minute(
                limits.per_source_per_min,
                limits.source_burst,
            )),
            per_account: RateLimiter::keyed(per_minute(
                limits.per_account_per_min,
                limits.account_burst,
            )),
            turns: DashMap::new(),
            queue_wait: limits.queue_wait,
        }
    }

    /// Admits a password attempt from `source`, a login for `account` if given: rate limits
    /// first (`RATE_LIMITED`, with the wait), then the source's turn (`OVERLOADED` if its
    /// earlier attempts do not finish within the queue wait). Hash while holding the turn.
    pub async fn admit(
        &self,
        source: IpAddr,
        account: Option<&str>,
    ) -> Result<PasswordTurn, RequestError> {
        let key = source_key(source);
        rate_limited(&self.per_source, &key)?;
        if let Some(name) = account {
            rate_limited(&self.per_account, &name.to_ascii_lowercase())?;
        }
        let turn = self
            .turns
            .entry(key)
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone();
        match tokio::time::timeout(self.queue_wait, turn.lock_owned()).await {
            Ok(guard) => Ok(PasswordTurn { _turn: guard }),
            Err(_) => Err(RequestError::Overloaded(
                "this address has password attempts waiting; retry".into(),
            )),
        }
    }

    /// Forgets idle sources and accounts (the housekeeping tick).
    pub fn housekeeping(&self) {
        self.per_source.retain_recent();
        self.per_source.shrink_to_fit();
        self.per_account.retain_recent();
        self.per_account.shrink_to_fit();
        // A source whose turn nobody holds or waits for (only the map's reference is left).
        self.turns.retain(|_, t| Arc::strong_count(t) > 1);
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
        // Unvalidated handshakes have a share of their own (they could be forged in the
        // source's name): not refused for the validated ones'.
        assert!(matches!(g.admit(ip("10.0.0.1"), false), Admit::Now(_)));
        assert!(matches!(g.admit(ip("10.0.0.2"), true), Admit::Now(_)));
        // Forged Initials in 10.0.0.2's name fill its unvalidated share only: its real
        // (validated) clients still get slots.
        let forged: Vec<_> = (0..2).map(|_| g.admit(ip("10.0.0.2"), false)).collect();
        assert!(forged.iter().all(|a| matches!(a, Admit::Now(_))));
        assert!(matches!(g.admit(ip("10.0.0.2"), false), Admit::Retry));
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

    fn password_gate() -> PasswordGate {
        PasswordGate::new(PasswordLimits {
            per_source_per_min: 60,
            source_burst: 3,
            per_account_per_min: 6,
            account_burst: 2,
            queue_wait: std::time::Duration::from_millis(200),
        })
    }

    #[tokio::test]
    async fn password_attempts_are_limited_per_source_and_per_account() {
        let g = password_gate();
        let a = ip("10.0.0.1");
        for _ in 0..2 {
            drop(g.admit(a, Some("Ada")).await.expect("within the burst"));
        }
        // The account's burst is spent, whatever the source and the name's case.
        let err = g
            .admit(ip("10.0.0.9"), Some("ada"))
            .await
            .expect_err("account");
        assert!(matches!(err, RequestError::RateLimited { retry_after_ms } if retry_after_ms > 0));
        // The source has one attempt left (a registration), then it is limited too.
        drop(g.admit(a, None).await.expect("third"));
        assert!(matches!(
            g.admit(a, Some("bob")).await,
            Err(RequestError::RateLimited { .. })
        ));
        // Other sources and accounts are untouched.
        drop(
            g.admit(ip("10.0.0.2"), Some("bob"))
                .await
                .expect("other source"),
        );
    }

    #[tokio::test]
    async fn a_source_has_one_attempt_in_the_hashing_queue_at_a_time() {
        let g = password_gate();
        let a = ip("10.0.0.1");
        let held = g.admit(a, None).await.expect("first");
        // The same source waits for its turn, and gives up after the queue wait.
        assert!(matches!(
            g.admit(a, None).await,
            Err(RequestError::Overloaded(_))
        ));
        // Another source is not behind it.
        let other = g.admit(ip("10.0.0.2"), None).await.expect("other source");
        drop((held, other));
        drop(g.admit(a, None).await.expect("its turn again"));
        g.housekeeping();
        assert_eq!(g.turns.len(), 0, "idle sources are forgotten");
    }
}
