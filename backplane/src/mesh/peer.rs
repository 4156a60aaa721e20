//! One peer as this node sees it: its bounded envelope queue and the drop policy (an
//! envelope refused for lack of room or for its size is counted and its recipients resynced,
//! never lost invisibly), the lanes that go ahead of the next batch outside the bound
//! (`NodeState` once per link and change, `Resync` for what was missed, `ChannelChanged`
//! coalesced per channel, presence), the envelope size
//! bound with the split of one delivery into envelopes under it, and the link's counters.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshchat_idgen::{ChannelId, NodeId};
use meshchat_proto::mesh::{self as pm, envelope};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::bounded::Bounded;

/// Users remembered per peer whose envelopes were dropped; past it the resync covers every
/// connection on the peer.
/// How often a link checks whether a datagram arrived from its peer.
pub(super) const HEARD_EVERY: Duration = Duration::from_millis(250);

pub(super) const MAX_MISSED_USERS: usize = 8_192;
/// Largest envelope a peer queue takes. A delivery to more recipients than fit is split into
/// several envelopes ([`deliver_envelopes`]); an envelope still larger (a push bigger than
/// this) is refused at the queue and its recipients resynced, so it can never make a batch
/// frame too large and take the batch's other envelopes with it.
pub(super) const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// Bytes of one recipient in a `Deliver` (a varint u64 is at most 10).
pub(super) const RECIPIENT_BYTES: usize = 10;

/// The `Deliver` envelopes of `push` to `recipients` (all on one peer): as many as it takes
/// to keep each under [`MAX_ENVELOPE_BYTES`]. A channel with 100k+ members on one node made
/// one envelope larger than a mesh frame, and the whole batch around it was dropped.
pub(super) fn deliver_envelopes(
    epoch: u64,
    hops: u32,
    recipients: Vec<u64>,
    push: &Bytes,
) -> impl Iterator<Item = pm::Envelope> + '_ {
    // Room for recipients once the push and the envelope's own fields are in.
    let per_envelope =
        (MAX_ENVELOPE_BYTES.saturating_sub(push.len() + 64) / RECIPIENT_BYTES).max(1);
    let chunks: Vec<Vec<u64>> = if recipients.len() <= per_envelope {
        vec![recipients]
    } else {
        recipients
            .chunks(per_envelope)
            .map(<[u64]>::to_vec)
            .collect()
    };
    chunks.into_iter().map(move |recipients| pm::Envelope {
        ring_epoch: epoch,
        hops,
        body: Some(envelope::Body::Deliver(pm::Deliver {
            recipients,
            push: push.clone(),
        })),
    })
}

/// Channels waiting on a peer's lane before one `ChannelChanged{all}` replaces them.
pub(super) const MAX_CHANGED_CHANNELS: usize = 4_096;

/// Member-list invalidations owed to a peer: a lane that is never dropped. Sent ahead of the
/// next batch, outside the queue's bound, coalesced per channel. (Through the droppable
/// queue, one lost invalidation left a stale fan-out list, or cost a resync of every user
/// on the peer.)
#[derive(Debug, Default)]
pub(super) struct Changed {
    channels: BTreeSet<u64>,
    all: bool,
}

impl Changed {
    pub(super) fn add(&mut self, channel: ChannelId) {
        if self.all {
            return;
        }
        self.channels.insert(channel.0);
        if self.channels.len() > MAX_CHANGED_CHANNELS {
            self.channels.clear();
            self.all = true;
        }
    }

    /// Puts back a change taken from the lane (its batch did not go out).
    pub(super) fn readd(&mut self, c: &pm::ChannelChanged) {
        if c.all {
            self.channels.clear();
            self.all = true;
        } else {
            self.add(ChannelId(c.channel_id));
        }
    }

    /// The envelopes owed, emptying the lane.
    pub(super) fn take(&mut self) -> Vec<pm::Envelope> {
        let c = std::mem::take(self);
        let changed = |channel_id, all| pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::ChannelChanged(pm::ChannelChanged {
                channel_id,
                all,
            })),
        };
        if c.all {
            vec![changed(0, true)]
        } else {
            c.channels
                .into_iter()
                .map(|id| changed(id, false))
                .collect()
        }
    }
}

/// Users waiting on a peer's presence lane before a full snapshot replaces them.
pub(super) const MAX_PRESENCE_USERS: usize = 65_536;
/// Entries in one presence envelope: a snapshot of 100k users goes in several batches.
pub(super) const PRESENCE_PER_ENVELOPE: usize = 8_192;
/// Most bytes of one `PresenceEntry` (three varints, their tags and the entry's own framing).
pub(super) const PRESENCE_ENTRY_BYTES: usize = 28;

/// Presence owed to a peer: a lane that is never dropped, coalesced per user (the latest
/// state wins). A full snapshot replaces it when the link comes up (the peer may have missed
/// anything before) or when too many users wait; the snapshot goes out in envelopes of
/// [`PRESENCE_PER_ENVELOPE`] entries, one per batch, before the changes made after it.
#[derive(Debug, Default)]
pub(super) struct PresenceLane {
    users: BTreeMap<u64, (bool, u64)>,
    /// A snapshot is owed: taken from the node at the next [`PresenceLane::take`].
    full: bool,
    /// The rest of a snapshot being sent.
    snapshot: VecDeque<pm::PresenceEntry>,
}

impl PresenceLane {
    pub(super) fn add(&mut self, c: &crate::delivery::PresenceChange) {
        if self.full {
            // The snapshot, taken later, has it.
            return;
        }
        self.users.insert(c.user.0, (c.online, c.at_ms));
        if self.users.len() > MAX_PRESENCE_USERS {
            self.set_full();
        }
    }

    /// Owes a full snapshot (a link came up, or a batch with presence did not go out).
    pub(super) fn set_full(&mut self) {
        self.users.clear();
        self.snapshot.clear();
        self.full = true;
    }

    /// The next envelope owed, if any: a snapshot's next part (the first marked `full`),
    /// else up to [`PRESENCE_PER_ENVELOPE`] changes. `snapshot` is asked only when one is owed.
    pub(super) fn take(
        &mut self,
        snapshot: impl FnOnce() -> Vec<crate::delivery::PresenceChange>,
    ) -> Option<pm::Envelope> {
        let entry = |user: u64, online: bool, at_unix_ms: u64| pm::PresenceEntry {
            user,
            online,
            at_unix_ms,
        };
        let full = std::mem::take(&mut self.full);
        if full {
            self.snapshot = snapshot()
                .into_iter()
                .map(|c| entry(c.user.0, c.online, c.at_ms))
                .collect();
        }
        let mut more = false;
        let entries: Vec<pm::PresenceEntry> = if full || !self.snapshot.is_empty() {
            let n = self.snapshot.len().min(PRESENCE_PER_ENVELOPE);
            let part = self.snapshot.drain(..n).collect();
            more = !self.snapshot.is_empty();
            part
        } else if !self.users.is_empty() {
            let mut rest = if self.users.len() > PRESENCE_PER_ENVELOPE {
                let split = *self.users.keys().nth(PRESENCE_PER_ENVELOPE)?;
                self.users.split_off(&split)
            } else {
                BTreeMap::new()
            };
            std::mem::swap(&mut rest, &mut self.users);
            rest.into_iter()
                .map(|(u, (online, at))| entry(u, online, at))
                .collect()
        } else {
            return None;
        };
        Some(pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::Presence(pm::PresenceUpdate {
                full,
                entries,
                more,
            })),
        })
    }
}

/// The envelope telling a peer this node's state.
pub(super) fn node_state(draining: bool, sees_your_drain: bool) -> pm::Envelope {
    pm::Envelope {
        ring_epoch: 0,
        hops: 0,
        body: Some(envelope::Body::NodeState(pm::NodeState {
            draining,
            sees_your_drain,
        })),
    }
}

/// What a peer missed because its queue was full: told to it ahead of the next batch.
#[derive(Debug, Default)]
pub(super) struct Missed {
    pub(super) users: BTreeSet<u64>,
    pub(super) all: bool,
}

impl Missed {
    pub(super) fn is_empty(&self) -> bool {
        !self.all && self.users.is_empty()
    }

    pub(super) fn add(&mut self, env: &pm::Envelope) {
        match &env.body {
            Some(envelope::Body::Deliver(d)) => self.add_users(d.recipients.iter().copied()),
            Some(envelope::Body::Resync(r)) if !r.all => self.add_users(r.users.iter().copied()),
            // Channel changes, presence and the node's state have lanes of their own, and a
            // link that comes up drops the member cache and sends a presence snapshot and the
            // node's state: nothing to resync.
            Some(
                envelope::Body::ChannelChanged(_)
                | envelope::Body::Presence(_)
                | envelope::Body::NodeState(_),
            ) => {}
            // A move or a resync of everyone: which users it concerns is not listed here.
            _ => self.add_all(),
        }
    }

    pub(super) fn add_users(&mut self, users: impl IntoIterator<Item = u64>) {
        if self.all {
            return;
        }
        self.users.extend(users);
        if self.users.len() > MAX_MISSED_USERS {
            self.add_all();
        }
    }

    pub(super) fn add_all(&mut self) {
        self.users.clear();
        self.all = true;
    }

    /// Adds everything `other` names.
    pub(super) fn absorb(&mut self, other: Missed) {
        if other.all {
            self.add_all();
        } else {
            self.add_users(other.users);
        }
    }

    pub(super) fn take(&mut self) -> pm::Envelope {
        let m = std::mem::take(self);
        pm::Envelope {
            ring_epoch: 0,
            hops: 0,
            body: Some(envelope::Body::Resync(pm::Resync {
                users: m.users.into_iter().collect(),
                all: m.all,
            })),
        }
    }
}

/// Counters of one peer link.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Envelopes written to the link.
    pub envelopes_sent: AtomicU64,
    /// Batch frames written.
    pub frames_sent: AtomicU64,
    /// Envelopes received from the peer.
    pub envelopes_received: AtomicU64,
    /// Envelopes dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Times the link came up.
    pub connects: AtomicU64,
}

/// Snapshot of one peer link's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Envelopes written to the link.
    pub envelopes_sent: u64,
    /// Batch frames written.
    pub frames_sent: u64,
    /// Envelopes received from the peer.
    pub envelopes_received: u64,
    /// Envelopes dropped because the queue was full.
    pub dropped: u64,
    /// Times the link came up.
    pub connects: u64,
    /// Which `Peer` these counters belong to: a peer that leaves the member set and comes back
    /// starts a new one, with counters from zero (a metrics exporter adds the old totals).
    pub incarnation: u64,
    /// Envelopes queued for the peer now.
    pub queued: usize,
    /// Bytes of envelopes queued for the peer now.
    pub queued_bytes: usize,
    /// The link's current round-trip time estimate (QUIC's), while it is up.
    pub rtt: Option<std::time::Duration>,
}

/// Numbers every `Peer` made in this process, so no two share an incarnation.
static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One peer: its link state, its bounded queue and the lanes that go ahead of it.
pub(super) struct Peer {
    pub(super) id: NodeId,
    pub(super) addr: SocketAddr,
    /// Flipped when the peer leaves the member set: ends its dial loop and link.
    pub(super) gone: watch::Sender<bool>,
    /// Envelopes waiting for the link, each with its encoded length: bounded in both, so a
    /// peer that is down holds at most `capacity_bytes` of this node's memory.
    pub(super) queue: Mutex<Bounded<pm::Envelope>>,
    pub(super) ready: Notify,
    pub(super) up: AtomicBool,
    /// This `Peer`'s number ([`PeerCounters::incarnation`]).
    pub(super) incarnation: u64,
    /// The current link's connection (for its RTT), while it is up.
    pub(super) conn: Mutex<Option<quinn::Connection>>,
    /// When a datagram from the peer last arrived on its link (checked every
    /// [`HEARD_EVERY`]): a link can stay "up" for its idle timeout after the peer went silent.
    pub(super) heard: Mutex<Option<Instant>>,
    pub(super) stats: PeerStats,
    /// Bumped by every link that comes up; a link whose generation is no longer current
    /// (the peer said hello again) stops.
    pub(super) link: watch::Sender<u64>,
    /// Users whose envelopes the full queue dropped, for the resync ahead of the next batch.
    pub(super) missed: Mutex<Missed>,
    /// Channel member changes owed to the peer (never dropped).
    pub(super) changed: Mutex<Changed>,
    /// Presence owed to the peer (never dropped).
    pub(super) presence: Mutex<PresenceLane>,
    /// This node's `NodeState` is owed to the peer: set when a link comes up and when the
    /// state changes; sent first in the next batch (never dropped).
    pub(super) state_owed: AtomicBool,
    /// The peer said (in its `NodeState`, on the current link) that it took this draining
    /// node off its ring.
    pub(super) confirms_drain: AtomicBool,
}

impl Peer {
    /// A peer at `addr`, not linked yet, whose queue holds up to `capacity` envelopes and
    /// `capacity_bytes` bytes of them.
    pub(super) fn new(
        id: NodeId,
        addr: SocketAddr,
        capacity: usize,
        capacity_bytes: usize,
    ) -> Self {
        let (gone, _) = watch::channel(false);
        Self {
            id,
            addr,
            gone,
            queue: Mutex::new(Bounded::new(capacity, capacity_bytes)),
            ready: Notify::new(),
            up: AtomicBool::new(false),
            incarnation: INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            conn: Mutex::new(None),
            heard: Mutex::new(None),
            stats: PeerStats::default(),
            link: watch::channel(0).0,
            missed: Mutex::new(Missed::default()),
            changed: Mutex::new(Changed::default()),
            presence: Mutex::new(PresenceLane::default()),
            state_owed: AtomicBool::new(false),
            confirms_drain: AtomicBool::new(false),
        }
    }

    pub(super) fn enqueue(&self, env: pm::Envelope) {
        // Bounded on the way in: one envelope too large for a batch frame would otherwise
        // fail the encoding of the whole batch it lands in.
        let len = prost::Message::encoded_len(&env);
        if len > MAX_ENVELOPE_BYTES {
            self.drop_envelope(&env, "envelope over the size limit: dropping it");
            return;
        }
        let refused = self.queue.lock().try_push(len, env);
        if let Err((_, env)) = refused {
            self.drop_envelope(&env, "peer queue full: dropping envelopes");
            return;
        }
        self.ready.notify_one();
    }

    /// Drops an envelope, not invisibly: its recipients are told ahead of the next batch
    /// (the writer is woken: the queue may be empty).
    fn drop_envelope(&self, env: &pm::Envelope, why: &'static str) {
        self.missed.lock().add(env);
        self.ready.notify_one();
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(peer = self.id.0, dropped = n, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed_of(env: &pm::Envelope) -> (u64, bool) {
        match &env.body {
            Some(envelope::Body::ChannelChanged(c)) => (c.channel_id, c.all),
            other => panic!("not a channel change: {other:?}"),
        }
    }

    #[test]
    fn channel_changes_coalesce_per_channel_then_into_all() {
        let mut c = Changed::default();
        for id in [7, 3, 7, 7] {
            c.add(ChannelId(id));
        }
        let out: Vec<_> = c.take().iter().map(changed_of).collect();
        assert_eq!(out, vec![(3, false), (7, false)]);
        assert!(c.take().is_empty(), "taking empties the lane");
        for id in 1..=MAX_CHANGED_CHANNELS as u64 + 1 {
            c.add(ChannelId(id));
        }
        let out: Vec<_> = c.take().iter().map(changed_of).collect();
        assert_eq!(out, vec![(0, true)]);
    }

    fn presence_of(env: &pm::Envelope) -> (bool, Vec<(u64, bool, u64)>) {
        match &env.body {
            Some(envelope::Body::Presence(p)) => (
                p.full,
                p.entries
                    .iter()
                    .map(|e| (e.user, e.online, e.at_unix_ms))
                    .collect(),
            ),
            other => panic!("not presence: {other:?}"),
        }
    }

    fn more_of(env: &pm::Envelope) -> bool {
        matches!(&env.body, Some(envelope::Body::Presence(p)) if p.more)
    }

    fn change(user: u64, online: bool, at: u64) -> crate::delivery::PresenceChange {
        crate::delivery::PresenceChange {
            user: meshchat_idgen::UserId(user),
            online,
            at_ms: at,
        }
    }

    #[test]
    fn presence_coalesces_per_user_and_a_snapshot_goes_first_in_parts() {
        let mut lane = PresenceLane::default();
        let none = Vec::new;
        assert!(lane.take(none).is_none(), "nothing owed");
        lane.add(&change(5, true, 0));
        lane.add(&change(3, true, 0));
        lane.add(&change(5, false, 77));
        let env = lane.take(none).expect("changes");
        assert_eq!(
            presence_of(&env),
            (false, vec![(3, true, 0), (5, false, 77)]),
            "the latest state of each user, once"
        );
        assert!(lane.take(none).is_none(), "taking empties the lane");
        // A link comes up: a snapshot of everyone online, in parts, then later changes.
        lane.add(&change(9, true, 0));
        lane.set_full();
        lane.add(&change(10, true, 0));
        let online = PRESENCE_PER_ENVELOPE as u64 + 2;
        let snap = || (1..=online).map(|u| change(u, true, 0)).collect();
        let part = lane.take(snap).expect("snapshot");
        let (full, first) = presence_of(&part);
        assert!(full);
        assert!(more_of(&part), "more parts follow");
        assert_eq!(first.len(), PRESENCE_PER_ENVELOPE);
        lane.add(&change(1, false, 99));
        let part = lane.take(none).expect("the rest");
        let (full, rest) = presence_of(&part);
        assert!(!full);
        assert!(!more_of(&part), "the last part");
        assert_eq!(rest.len(), 2);
        assert_eq!(
            presence_of(&lane.take(none).expect("after the snapshot")),
            (false, vec![(1, false, 99)])
        );
        assert!(lane.take(none).is_none());
        // An empty snapshot still says "forget what I told you".
        lane.set_full();
        assert_eq!(
            presence_of(&lane.take(none).expect("empty")),
            (true, vec![])
        );
        // Too many users waiting: a snapshot instead.
        for u in 0..=MAX_PRESENCE_USERS as u64 {
            lane.add(&change(u, true, 0));
        }
        let (full, _) = presence_of(&lane.take(|| vec![change(1, true, 0)]).expect("snap"));
        assert!(full);
        // Changes past one envelope go in several.
        for u in 0..PRESENCE_PER_ENVELOPE as u64 + 1 {
            lane.add(&change(u, true, 0));
        }
        assert_eq!(
            presence_of(&lane.take(none).expect("one")).1.len(),
            PRESENCE_PER_ENVELOPE
        );
        assert_eq!(presence_of(&lane.take(none).expect("two")).1.len(), 1);
    }

    #[test]
    fn a_presence_envelope_fits_its_byte_bound() {
        let entries = (0..PRESENCE_PER_ENVELOPE as u64)
            .map(|i| pm::PresenceEntry {
                user: u64::MAX - i,
                online: true,
                at_unix_ms: u64::MAX,
            })
            .collect();
        let env = pm::Envelope {
            ring_epoch: u64::MAX,
            hops: u32::MAX,
            body: Some(envelope::Body::Presence(pm::PresenceUpdate {
                full: true,
                entries,
                more: true,
            })),
        };
        assert!(prost::Message::encoded_len(&env) <= PRESENCE_PER_ENVELOPE * PRESENCE_ENTRY_BYTES);
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_and_what_it_drops_is_resynced() {
        let push = Bytes::from(vec![7u8; 1_000]);
        let env = |user: u64| {
            deliver_envelopes(1, 0, vec![user], &push)
                .next()
                .expect("an envelope")
        };
        let one = prost::Message::encoded_len(&env(1));
        // Room for three envelopes by bytes, a hundred by count.
        let p = Peer::new(
            NodeId(2),
            "127.0.0.1:1".parse().expect("addr"),
            100,
            3 * one + 10,
        );
        for user in 1..=5 {
            p.enqueue(env(user));
        }
        {
            let q = p.queue.lock();
            assert_eq!((q.len(), q.bytes()), (3, 3 * one));
        }
        assert_eq!(p.stats.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(
            p.missed.lock().users.iter().copied().collect::<Vec<_>>(),
            vec![4, 5]
        );
        // Bytes leave with what the writer takes and come back with what it puts back.
        let mut q = p.queue.lock();
        let (len, first) = q.pop_front().expect("first");
        assert_eq!((len, q.bytes()), (one, 2 * one));
        q.push_front(len, first);
        assert_eq!(q.bytes(), 3 * one);
        assert_eq!(q.take_all().len(), 3);
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }
}
