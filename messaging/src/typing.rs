//! Typing indicators: which of a user's starts and stops are pushed, and the bounds that keep
//! them cheap. Nothing is stored and nothing is resent: an indicator expires at each recipient
//! by itself, [`TTL`] after its push, unless a newer start refreshes it.
//!
//! The bounds, in the order they are applied:
//! - per user, [`PER_USER_PER_SEC`] requests a second (burst [`PER_USER_BURST`]), over it
//!   `RATE_LIMITED`: toggling, or cycling through chats, cannot flood anyone;
//! - a chat of more than [`MAX_AUDIENCE`] other members has indicators off (`FORBIDDEN`);
//! - a start is pushed at most once per [`COALESCE`] per user and chat (a more frequent one is
//!   answered without a push: the recipients' indicator is still running), and a stop only
//!   while a pushed start may still be showing;
//! - per chat and node (the typist's home decides), [`CHAT_PUSHES_PER_SEC`] pushes a second,
//!   each indicator costing one push per recipient: in a channel of 500 members that is 4
//!   indicators a second from the typists homed on one node. Over it `RATE_LIMITED`, with the
//!   time to wait.
//!
//! Sans-IO over governor's clock: the tests drive it with a fake clock.

use std::num::NonZeroU32;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use meshchat_idgen::{ChatId, UserId};

use crate::error::RequestError;

/// How long an indicator shows at a recipient without a refresh (pushed as `expires_in_ms`).
pub const TTL: Duration = Duration::from_secs(6);
/// Clients refresh a running indicator at this interval.
pub const REFRESH: Duration = Duration::from_secs(3);
/// A start within this of the last pushed one is not pushed. Shorter than [`REFRESH`] by a
/// second of jitter, so a refresh that arrives a little early is still pushed: pushes are then
/// at most `COALESCE + REFRESH` (5 s) apart, inside [`TTL`].
pub const COALESCE: Duration = Duration::from_secs(2);
/// Typing requests per user per second.
pub const PER_USER_PER_SEC: u32 = 5;
/// Burst of typing requests per user.
pub const PER_USER_BURST: u32 = 10;
/// Typing pushes per chat per second, all typists and recipients together.
pub const CHAT_PUSHES_PER_SEC: u32 = 2_000;
/// Chats with more recipients than this have typing indicators off.
pub const MAX_AUDIENCE: usize = CHAT_PUSHES_PER_SEC as usize;

/// What to do with an admitted indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Push it to the recipients.
    Push,
    /// Nothing to push: a start within [`REFRESH`] of the last pushed one, a stop with no
    /// start showing, or no one else in the chat.
    Coalesced,
}

type Limiter<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The node's typing gate (one per node; cheap to share).
pub struct TypingGate<C: Clock = DefaultClock> {
    clock: C,
    /// When a start was last pushed, per user and chat; a pushed stop removes it.
    started: DashMap<(UserId, ChatId), C::Instant>,
    per_user: Limiter<UserId, C>,
    per_chat: Limiter<ChatId, C>,
}

impl std::fmt::Debug for TypingGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypingGate")
            .field("started", &self.started.len())
            .finish()
    }
}

impl Default for TypingGate {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

fn since<I: Reference>(now: I, then: I) -> Duration {
    now.duration_since(then).into()
}

impl<C: Clock + Clone> TypingGate<C> {
    /// A gate on `clock`.
    pub fn with_clock(clock: C) -> Self {
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        Self {
            per_user: RateLimiter::dashmap_with_clock(
                Quota::per_second(nz(PER_USER_PER_SEC)).allow_burst(nz(PER_USER_BURST)),
                clock.clone(),
            ),
            per_chat: RateLimiter::dashmap_with_clock(
                Quota::per_second(nz(CHAT_PUSHES_PER_SEC)),
                clock.clone(),
            ),
            started: DashMap::new(),
            clock,
        }
    }

    fn rate_limited(&self, earliest: Duration) -> RequestError {
        RequestError::RateLimited {
            retry_after_ms: earliest.as_millis() as u64 + 1,
        }
    }

    /// Counts one typing request of `user` against its rate: checked before anything else
    /// (authorisation reads storage).
    pub fn check_user(&self, user: UserId) -> Result<(), RequestError> {
        self.per_user
            .check_key(&user)
            .map_err(|n| self.rate_limited(n.wait_time_from(self.clock.now())))
    }

    /// Whether `user`'s start (`typing`) or stop in `chat` is pushed to its `recipients`
    /// other members. Records a pushed start or stop.
    pub fn admit(
        &self,
        user: UserId,
        chat: ChatId,
        typing: bool,
        recipients: usize,
    ) -> Result<Verdict, RequestError> {
        self.admit_then(user, chat, typing, recipients, || ())
    }

    /// [`TypingGate::admit`], calling `push` when the verdict is [`Verdict::Push`], with the
    /// decision, its record and the push under the lock of the (user, chat) entry: a start and
    /// a stop of one user in one chat racing each other (two devices, or requests pipelined on
    /// one connection) are pushed in the order they were decided, so a stop never overtakes
    /// its start and leaves an indicator showing until it expires. `push` must not block (it
    /// holds up other typists of the same map shard while it runs: a push to at most
    /// [`MAX_AUDIENCE`] recipients, queued, not written).
    pub fn admit_then(
        &self,
        user: UserId,
        chat: ChatId,
        typing: bool,
        recipients: usize,
        push: impl FnOnce(),
    ) -> Result<Verdict, RequestError> {
        use dashmap::mapref::entry::Entry;
        if recipients > MAX_AUDIENCE {
            return Err(RequestError::Forbidden(format!(
                "typing indicators are off in chats of more than {MAX_AUDIENCE} members"
            )));
        }
        let Some(n) = NonZeroU32::new(recipients as u32) else {
            return Ok(Verdict::Coalesced);
        };
        let now = self.clock.now();
        let entry = self.started.entry((user, chat));
        let showing = match &entry {
            Entry::Occupied(o) => Some(since(now, *o.get())),
            Entry::Vacant(_) => None,
        };
        let pushes = match (typing, showing) {
            (true, Some(age)) if age < COALESCE => false,
            (true, _) => true,
            (false, Some(age)) => age < TTL,
            (false, None) => false,
        };
        if !pushes {
            if let (false, Entry::Occupied(o)) = (typing, entry) {
                o.remove();
            }
            return Ok(Verdict::Coalesced);
        }
        match self.per_chat.check_key_n(&chat, n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(self.rate_limited(not_until.wait_time_from(now)));
            }
            // `recipients` <= MAX_AUDIENCE = the quota's burst, so this cannot happen; refuse
            // rather than push past the bound.
            Err(_) => {
                return Err(RequestError::Forbidden(format!(
                    "typing indicators are off in chats of more than {MAX_AUDIENCE} members"
                )));
            }
        }
        match (typing, entry) {
            (true, entry) => {
                let _held = entry.insert(now);
                push();
            }
            (false, Entry::Occupied(o)) => {
                push();
                o.remove();
            }
            // Cannot happen (a stop pushes only while its start is recorded): nothing shows.
            (false, Entry::Vacant(_)) => return Ok(Verdict::Coalesced),
        }
        Ok(Verdict::Push)
    }

    /// Forgets starts that expired everywhere and idle rate states (call periodically).
    pub fn housekeeping(&self) {
        let now = self.clock.now();
        self.started.retain(|_, at| since(now, *at) < TTL);
        self.started.shrink_to_fit();
        self.per_user.retain_recent();
        self.per_user.shrink_to_fit();
        self.per_chat.retain_recent();
        self.per_chat.shrink_to_fit();
    }

    /// Starts that may still be showing somewhere (for tests and the memory bound).
    pub fn tracked(&self) -> usize {
        self.started.len()
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;
    use meshchat_idgen::ChannelId;
    use meshchat_proto::client::ErrorCode;

    use super::*;

    const ALICE: UserId = UserId(1);
    const BOB: UserId = UserId(2);

    fn gate() -> (TypingGate<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (TypingGate::with_clock(clock.clone()), clock)
    }

    fn direct() -> ChatId {
        ChatId::direct(ALICE, BOB)
    }

    #[test]
    fn a_start_is_pushed_once_per_refresh_interval_and_a_stop_always_while_showing() {
        let (g, clock) = gate();
        assert_eq!(
            g.admit(ALICE, direct(), true, 1).expect("admitted"),
            Verdict::Push
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            g.admit(ALICE, direct(), true, 1).expect("admitted"),
            Verdict::Coalesced,
            "a refresh 1 s later: the recipient's indicator still runs"
        );
        clock.advance(COALESCE);
        assert_eq!(
            g.admit(ALICE, direct(), true, 1).expect("admitted"),
            Verdict::Push
        );
        assert_eq!(
            g.admit(ALICE, direct(), false, 1).expect("admitted"),
            Verdict::Push
        );
        assert_eq!(
            g.admit(ALICE, direct(), false, 1).expect("admitted"),
            Verdict::Coalesced,
            "a second stop: nothing is showing"
        );
        assert_eq!(
            g.admit(ALICE, direct(), true, 1).expect("admitted"),
            Verdict::Push,
            "a start right after a stop is pushed"
        );
    }

    #[test]
    fn the_push_runs_exactly_when_the_verdict_is_push() {
        let (g, clock) = gate();
        let pushed = std::cell::Cell::new(0);
        let push = || pushed.set(pushed.get() + 1);
        let mut verdicts = Vec::new();
        for typing in [true, true, false, false, true] {
            verdicts.push(
                g.admit_then(ALICE, direct(), typing, 1, push)
                    .expect("admitted"),
            );
            clock.advance(Duration::from_millis(100));
        }
        assert_eq!(
            verdicts,
            [
                Verdict::Push,
                Verdict::Coalesced,
                Verdict::Push,
                Verdict::Coalesced,
                Verdict::Push
            ]
        );
        assert_eq!(pushed.get(), 3);
        assert_eq!(g.tracked(), 1, "the last start is recorded");
    }

    #[test]
    fn a_stop_after_the_indicator_expired_is_not_pushed() {
        let (g, clock) = gate();
        assert_eq!(
            g.admit(ALICE, direct(), true, 1).expect("admitted"),
            Verdict::Push
        );
        clock.advance(TTL);
        assert_eq!(
            g.admit(ALICE, direct(), false, 1).expect("admitted"),
            Verdict::Coalesced
        );
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn no_recipient_no_push() {
        let (g, _) = gate();
        let notes = ChatId::direct(ALICE, ALICE);
        assert_eq!(
            g.admit(ALICE, notes, true, 0).expect("admitted"),
            Verdict::Coalesced
        );
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn a_user_toggling_is_rate_limited_with_a_wait() {
        let (g, clock) = gate();
        for _ in 0..PER_USER_BURST {
            g.check_user(ALICE).expect("within the burst");
        }
        let err = g.check_user(ALICE).expect_err("over the burst");
        assert_eq!(err.code(), ErrorCode::RateLimited);
        let RequestError::RateLimited { retry_after_ms } = err else {
            unreachable!()
        };
        assert!((1..=201).contains(&retry_after_ms), "{retry_after_ms}");
        g.check_user(BOB).expect("others are not affected");
        clock.advance(Duration::from_millis(retry_after_ms));
        g.check_user(ALICE).expect("after the wait");
    }

    #[test]
    fn a_large_channel_gets_few_indicators_a_second_and_a_huge_one_none() {
        let (g, clock) = gate();
        let ch = ChatId::Channel(ChannelId(7));
        // 500 recipients: 2,000 / 500 = 4 indicators from different typists, then a wait.
        for u in 10..14 {
            assert_eq!(
                g.admit(UserId(u), ch, true, 500).expect("admitted"),
                Verdict::Push
            );
        }
        let err = g
            .admit(UserId(14), ch, true, 500)
            .expect_err("a fifth indicator within the second");
        let RequestError::RateLimited { retry_after_ms } = err else {
            panic!("{err:?}")
        };
        assert!((1..=251).contains(&retry_after_ms), "{retry_after_ms}");
        assert_eq!(g.tracked(), 4, "the refused start is not recorded");
        clock.advance(Duration::from_millis(retry_after_ms));
        assert_eq!(
            g.admit(UserId(14), ch, true, 500).expect("admitted"),
            Verdict::Push
        );
        // Another chat has its own budget.
        let other = ChatId::Channel(ChannelId(8));
        assert_eq!(
            g.admit(UserId(10), other, true, 500).expect("admitted"),
            Verdict::Push
        );
        // Past the audience bound: off, whatever the budget.
        let huge = ChatId::Channel(ChannelId(9));
        let err = g
            .admit(ALICE, huge, true, MAX_AUDIENCE + 1)
            .expect_err("off");
        assert_eq!(err.code(), ErrorCode::Forbidden);
        assert_eq!(
            g.admit(ALICE, huge, true, MAX_AUDIENCE).expect("admitted"),
            Verdict::Push
        );
    }

    #[test]
    fn housekeeping_forgets_what_expired_everywhere() {
        let (g, clock) = gate();
        g.admit(ALICE, direct(), true, 1).expect("admitted");
        g.admit(BOB, direct(), true, 1).expect("admitted");
        clock.advance(Duration::from_secs(4));
        g.admit(BOB, direct(), true, 1).expect("admitted");
        clock.advance(Duration::from_secs(2));
        g.housekeeping();
        assert_eq!(
            g.tracked(),
            1,
            "alice's start expired, bob's refresh did not"
        );
    }
}
