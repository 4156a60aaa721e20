//! The consistent-hash ring: who owns a user, given the member set.
//!
//! ## Scheme (chosen by measurement, see `docs/PERFORMANCE.md`)
//!
//! A ring of virtual nodes with a bucket index:
//!
//! - every member gets `vnodes_per_weight * weight` points on a 64-bit ring, at
//!   `mix(node_id, replica)`; a user is owned by the first point at or after `mix(user_id)`;
//! - the sorted points are indexed by their top bits (one bucket per ~point), so a lookup is a
//!   hash, one index read and a short forward scan: O(1) expected, no binary search;
//! - joins and leaves move only the arcs next to the joining/leaving member's points: about
//!   `weight / total_weight` of users, the minimum;
//! - balance is set by the number of points per member: with 8,192 points per unit of weight a
//!   member's share deviates by ~1.1% (1/sqrt(8192)) from its ideal, giving max/mean 1.010 at
//!   8 members and 1.032 at 64 over 1M users (measured; `examples/ring_balance.rs`). At 256
//!   members 1M users are only ~3,900 per member and their own hash scatter puts max/mean at
//!   1.056 even for a perfect partition of the hash space; the ring measures 1.063 there.
//!   Memory: ~14 bytes per point, ~29 MB for 256 members.
//!
//! Rendezvous (highest-random-weight) hashing, the other candidate, balances as well and moves
//! the minimum, but its lookup is O(members): ~6-7x slower at 64 members (measured side by side
//! in `benches/benches/ring.rs`).
//!
//! The ring is pure and deterministic: the same members (ids and weights) give the same ring on
//! every node and every build. The hash is a fixed function ([`mix`]), never a randomly seeded
//! hasher.

use std::collections::BTreeMap;

use meshchat_idgen::{NodeId, UserId};

/// Points per unit of weight. See the module docs for why.
pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 8_192;

/// A fixed 64-bit mixer (splitmix64's finaliser): bijective, well spread, the same everywhere.
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where a user's id lands on the ring.
#[inline]
pub fn user_point(user: UserId) -> u64 {
    // A distinct seed from vnode points, so user ids and node ids never collide by design.
    mix(user.0 ^ 0x5bd1_e995_u64.rotate_left(32))
}

fn vnode_point(node: NodeId, replica: u32) -> u64 {
    mix((u64::from(node.0) << 32) | u64::from(replica))
}

/// Errors building a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A member has weight 0.
    #[error("member {0} has weight 0")]
    ZeroWeight(NodeId),
    /// Too many points (members x weight x vnodes) for one ring.
    #[error("ring would have {0} points; the maximum is 2^26")]
    TooManyPoints(u64),
}

/// An immutable ring for one member set. Cheap to share (`Arc`); rebuilt on change.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Sorted point hashes.
    points: Vec<u64>,
    /// Owner (index into `nodes`) of each point.
    owners: Vec<u16>,
    /// Members, sorted by id.
    nodes: Vec<NodeId>,
    /// `index[b]` = first point whose hash >> shift >= b.
    index: Vec<u32>,
    shift: u32,
}

impl Ring {
    /// Builds the ring of `members` (id -> weight) with `vnodes_per_weight` points per unit.
    pub fn build(
        members: &BTreeMap<NodeId, u32>,
        vnodes_per_weight: u32,
    ) -> Result<Self, RingError> {
        let mut total: u64 = 0;
        for (&n, &w) in members {
            if w == 0 {
                return Err(RingError::ZeroWeight(n));
            }
            total += u64::from(w) * u64::from(vnodes_per_weight.max(1));
        }
        if total > 1 << 26 {
            return Err(RingError::TooManyPoints(total));
        }
        let nodes: Vec<NodeId> = members.keys().copied().collect();
        let mut pts: Vec<(u64, u16)> = Vec::with_capacity(total as usize);
        for (i, (&n, &w)) in members.iter().enumerate() {
            for r in 0..w * vnodes_per_weight.max(1) {
                pts.push((vnode_point(n, r), i as u16));
            }
        }
        // Ties (astronomically rare) break by member order: still deterministic.
        pts.sort_unstable();
        let points: Vec<u64> = pts.iter().map(|p| p.0).collect();
        let owners: Vec<u16> = pts.iter().map(|p| p.1).collect();
        // One bucket per point, rounded to a power of two.
        let buckets_log2 = (points.len().max(1))
            .next_power_of_two()
            .trailing_zeros()
            .max(1);
        let shift = 64 - buckets_log2;
        let mut index = vec![0u32; 1usize << buckets_log2];
        let mut p = 0usize;
        for (b, slot) in index.iter_mut().enumerate() {
            while p < points.len() && (points[p] >> shift) < b as u64 {
                p += 1;
            }
            *slot = p as u32;
        }
        Ok(Self {
            points,
            owners,
            nodes,
            index,
            shift,
        })
    }

    /// Equal weights: every member weight 1.
    pub fn uniform(members: impl IntoIterator<Item = NodeId>) -> Result<Self, RingError> {
        let m: BTreeMap<NodeId, u32> = members.into_iter().map(|n| (n, 1)).collect();
        Self::build(&m, DEFAULT_VNODES_PER_WEIGHT)
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The members, sorted by id.
    pub fn members(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The owner of `user`, or `None` for an empty ring.
    #[inline]
    pub fn owner(&self, user: UserId) -> Option<NodeId> {
        if self.points.is_empty() {
            return None;
        }
        let h = user_point(user);
        let mut i = self.index[(h >> self.shift) as usize] as usize;
        while i < self.points.len() && self.points[i] < h {
            i += 1;
        }
        if i == self.points.len() {
            i = 0; // wrap around
        }
        Some(self.nodes[self.owners[i] as usize])
    }
}

/// Most points a ring may have.
pub const MAX_POINTS: u64 = 1 << 26;

/// The ring input the cluster builds for `weights` (members of weight 0 are not on the
/// ring): the weights and the points per unit of weight, lowered from the default only when
/// the default would pass [`MAX_POINTS`]; weights so large that even one point per unit
/// would pass it are flattened to 1. A function of `weights` alone, so every node (and a
/// client predicting its home) derives the same.
pub fn params(weights: &BTreeMap<NodeId, u32>) -> (BTreeMap<NodeId, u32>, u32) {
    let weights: BTreeMap<NodeId, u32> = weights
        .iter()
        .filter(|(_, w)| **w > 0)
        .map(|(&n, &w)| (n, w))
        .collect();
    let total: u64 = weights.values().map(|&w| u64::from(w)).sum();
    let default = u64::from(DEFAULT_VNODES_PER_WEIGHT);
    if total.saturating_mul(default) <= MAX_POINTS {
        return (weights, DEFAULT_VNODES_PER_WEIGHT);
    }
    let per_weight = MAX_POINTS / total.max(1);
    if per_weight >= 1 {
        // per_weight < default here, so it fits in u32.
        return (weights, per_weight as u32);
    }
    // Weights this large are a misconfiguration; an even split beats no ring.
    let flat: BTreeMap<NodeId, u32> = weights.keys().map(|&id| (id, 1)).collect();
    let per_weight = (MAX_POINTS / (flat.len().max(1) as u64)).min(default) as u32;
    (flat, per_weight)
}

/// The owner of `user` on the cluster's ring for `weights` ([`params`] then [`Ring::build`]),
/// without building it: one pass over the points, no allocation. O(points) per call (~25k
/// mixes for three members of weight 1): for a client that predicts its home once per
/// failover, where building a ring (sorting every point) would cost ~50x more. `None` for no
/// members.
pub fn owner_among(weights: &BTreeMap<NodeId, u32>, user: UserId) -> Option<NodeId> {
    let (members, vnodes_per_weight) = params(weights);
    owner_scan(&members, vnodes_per_weight, user)
}

/// [`owner_among`] for given points per weight (the weights already within [`MAX_POINTS`]).
fn owner_scan(
    members: &BTreeMap<NodeId, u32>,
    vnodes_per_weight: u32,
    user: UserId,
) -> Option<NodeId> {
    let h = user_point(user);
    // The first point at or after `h`, else (wrapping) the first point of all; ties go to
    // the member first in id order, as in `Ring::build`'s sort.
    let mut after: Option<(u64, NodeId)> = None;
    let mut first: Option<(u64, NodeId)> = None;
    for (&n, &w) in members {
        for r in 0..w.saturating_mul(vnodes_per_weight.max(1)) {
            let p = vnode_point(n, r);
            if p >= h && after.is_none_or(|(a, _)| p < a) {
                after = Some((p, n));
            }
            if first.is_none_or(|(f, _)| p < f) {
                first = Some((p, n));
            }
        }
    }
    after.or(first).map(|(_, n)| n)
}

/// Rendezvous (highest random weight) hashing: the measured alternative. Weighted with the
/// logarithmic method (score = -weight / ln(u)), O(members) per lookup.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    members: Vec<(NodeId, f64)>,
}

impl Rendezvous {
    /// Over `members` (id -> weight).
    pub fn new(members: &BTreeMap<NodeId, u32>) -> Self {
        Self {
            members: members.iter().map(|(&n, &w)| (n, f64::from(w))).collect(),
        }
    }

    /// The owner of `user`.
    pub fn owner(&self, user: UserId) -> Option<NodeId> {
        let h = user_point(user);
        let mut best: Option<(f64, NodeId)> = None;
        for &(n, w) in &self.members {
            let x = mix(h ^ mix(u64::from(n.0)));
            // Uniform in (0, 1).
            let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -w / u.ln();
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, n));
            }
        }
        best.map(|b| b.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn nodes(n: u32) -> Vec<NodeId> {
        (1..=n).map(NodeId).collect()
    }

    fn load(ring: &Ring, users: u64) -> HashMap<NodeId, u64> {
        let mut m = HashMap::new();
        for u in 0..users {
            *m.entry(ring.owner(UserId(u * 7_919 + 13)).expect("owner"))
                .or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn same_members_same_ring_in_any_order() {
        let a = Ring::uniform([NodeId(3), NodeId(1), NodeId(2)]).expect("ring");
        let b = Ring::uniform([NodeId(2), NodeId(3), NodeId(1)]).expect("ring");
        for u in 0..10_000 {
            assert_eq!(a.owner(UserId(u)), b.owner(UserId(u)));
        }
    }

    #[test]
    fn owner_among_agrees_with_the_built_ring() {
        let sets: [&[(u32, u32)]; 4] = [
            &[(1, 1), (2, 1), (3, 1)],
            &[(1, 1), (3, 1)],
            &[(7, 2), (9, 1), (12, 3), (40, 1)],
            &[(5, 1)],
        ];
        for set in sets {
            let m: BTreeMap<NodeId, u32> = set.iter().map(|&(n, w)| (NodeId(n), w)).collect();
            let ring = Ring::build(&m, 64).expect("ring");
            for u in 0..20_000u64 {
                let user = UserId(mix(u));
                assert_eq!(owner_scan(&m, 64, user), ring.owner(user), "{set:?} {u}");
            }
            let (w, per) = params(&m);
            let full = Ring::build(&w, per).expect("ring");
            for u in 0..200u64 {
                let user = UserId(mix(u));
                assert_eq!(owner_among(&m, user), full.owner(user), "{set:?} {u}");
            }
        }
        assert_eq!(owner_among(&BTreeMap::new(), UserId(1)), None);
        // Weight 0 is off the ring; a weight too large for the default is scaled down.
        let m = BTreeMap::from([(NodeId(1), 0), (NodeId(2), 1)]);
        assert_eq!(owner_among(&m, UserId(77)), Some(NodeId(2)));
        let huge = BTreeMap::from([(NodeId(1), 1 << 20), (NodeId(2), 1 << 20)]);
        let (w, per) = params(&huge);
        assert!(
            per >= 1 && u64::from(per) * (2 << 20) <= MAX_POINTS,
            "{per} {w:?}"
        );
    }

    #[test]
    fn owners_are_members_and_empty_rings_own_nothing() {
        let r = Ring::uniform(nodes(5)).expect("ring");
        for u in 0..1000 {
            assert!(r.members().contains(&r.owner(UserId(u)).expect("owner")));
        }
        let empty = Ring::uniform([]).expect("ring");
        assert!(empty.is_empty());
        assert_eq!(empty.owner(UserId(1)), None);
        let one = Ring::uniform([NodeId(9)]).expect("ring");
        assert_eq!(one.owner(UserId(123)), Some(NodeId(9)));
    }

    #[test]
    fn the_index_agrees_with_a_binary_search() {
        let r = Ring::uniform(nodes(17)).expect("ring");
        for u in 0..50_000u64 {
            let h = user_point(UserId(u));
            let i = match r.points.binary_search(&h) {
                Ok(i) => i,
                Err(i) if i == r.points.len() => 0,
                Err(i) => i,
            };
            assert_eq!(r.owner(UserId(u)), Some(r.nodes[r.owners[i] as usize]));
        }
    }

    /// The balance goal (max/mean <= 1.05) over 1M users at 8 and 64 members. At 256 members
    /// the users' own sampling scatter is ~1.045 for a perfect partition (see module docs), so
    /// the bound there is that scatter plus the ring's ~1.1%.
    #[test]
    fn balance_over_a_million_users() {
        for (n, bound) in [(8u32, 1.05), (64, 1.05), (256, 1.08)] {
            let r = Ring::uniform(nodes(n)).expect("ring");
            let l = load(&r, 1_000_000);
            let mean = 1_000_000f64 / f64::from(n);
            let max = *l.values().max().expect("loads") as f64;
            assert!(
                max / mean <= bound,
                "{n} members: max/mean = {:.4}",
                max / mean
            );
        }
    }

    /// The movement goal (<= 1.1 x 1/N) when one member joins or leaves.
    #[test]
    fn a_join_or_leave_moves_about_one_nth() {
        for n in [8u32, 64] {
            let before = Ring::uniform(nodes(n)).expect("ring");
            let joined = Ring::uniform(nodes(n + 1)).expect("ring");
            let mut left_set = nodes(n);
            left_set.remove(3);
            let left = Ring::uniform(left_set).expect("ring");
            let users = 200_000u64;
            let (mut moved_join, mut moved_leave) = (0u64, 0u64);
            for u in 0..users {
                let id = UserId(u * 104_729 + 1);
                let o = before.owner(id);
                let j = joined.owner(id);
                if o != j {
                    moved_join += 1;
                    assert_eq!(
                        j,
                        Some(NodeId(n + 1)),
                        "a join only moves users to the new member"
                    );
                }
                let l = left.owner(id);
                if o != l {
                    moved_leave += 1;
                    assert_eq!(o, Some(NodeId(4)), "a leave only moves the leaver's users");
                }
            }
            let ideal_join = users as f64 / f64::from(n + 1);
            let ideal_leave = users as f64 / f64::from(n);
            assert!(
                moved_join as f64 <= 1.1 * ideal_join,
                "join moved {moved_join} (ideal {ideal_join:.0})"
            );
            assert!(
                moved_leave as f64 <= 1.1 * ideal_leave,
                "leave moved {moved_leave} (ideal {ideal_leave:.0})"
            );
        }
    }

    #[test]
    fn weights_give_proportional_load() {
        let mut m = BTreeMap::new();
        m.insert(NodeId(1), 1);
        m.insert(NodeId(2), 2);
        m.insert(NodeId(3), 1);
        let r = Ring::build(&m, DEFAULT_VNODES_PER_WEIGHT).expect("ring");
        let l = load(&r, 400_000);
        let share = l[&NodeId(2)] as f64 / 400_000.0;
        assert!(
            (share - 0.5).abs() < 0.02,
            "weight-2 member owns {share:.3}"
        );
        m.insert(NodeId(4), 0);
        assert_eq!(
            Ring::build(&m, 16).err(),
            Some(RingError::ZeroWeight(NodeId(4)))
        );
    }

    #[test]
    fn rendezvous_agrees_on_being_deterministic_and_balanced() {
        let m: BTreeMap<NodeId, u32> = nodes(8).into_iter().map(|n| (n, 1)).collect();
        let r = Rendezvous::new(&m);
        let mut l: HashMap<NodeId, u64> = HashMap::new();
        for u in 0..200_000u64 {
            *l.entry(r.owner(UserId(u)).expect("owner")).or_insert(0) += 1;
        }
        let max = *l.values().max().expect("loads") as f64;
        assert!(max / 25_000.0 < 1.05);
    }
}
