//! Channel fan-out planning: which recipients of one push are served on this node and which
//! go to which peer node, one envelope per peer.
//!
//! Pure: the caller passes the ring lookup and the "connected here" test as closures, so the
//! plan is testable and benchable without a registry or sockets. This is what the mesh's
//! send path uses; [`Membership::plan`](crate::membership::Membership::plan) is the membership
//! core's own grouping (deduplicated, no local/remote split) and is not on that path.
//!
//! ## Grouping
//!
//! Remote recipients are grouped in one `Vec<(NodeId, Vec<u64>)>` kept sorted by node id and
//! searched by binary search. A fan-out meets at most the cluster's node count of distinct
//! owners (3..256), so the `Vec` stays within a few KiB (in L1), an insert into it happens at
//! most once per node, and a lookup is a handful of compares with no pointer chasing. Sorted
//! order keeps the envelopes in the node-id order the `BTreeMap<NodeId, Vec<u64>>` this
//! replaced iterated in; that map is the baseline in `benches/benches/fanout.rs` (numbers in
//! `docs/perf/benches-fanout-registry.md`).
//!
//! Below ~1k recipients the cost is allocation, not search: one list per destination node is
//! unavoidable (each becomes an envelope), but growing it 4 -> 8 -> 16 is not. A new list
//! starts at its fair share of the recipients over the nodes seen so far, capped at 64, so a
//! small list is allocated once, no list reserves more than 512 bytes it may not use, and a
//! large one grows by doubling from there, as before. An uncapped share over-allocates the first lists by up to
//! the whole fan-out, and that memory would sit in the peer queue with the envelope.

use meshchat_idgen::{NodeId, UserId};

/// Where one push goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FanoutPlan {
    /// Recipients served from this node's connections: those it owns, and those owned
    /// elsewhere that are still connected here (before re-homing), in input order.
    pub local: Vec<UserId>,
    /// One entry per destination node, sorted by node id, each with its recipients (raw ids,
    /// as the mesh envelope carries them) in input order. Never holds `me` or an empty list.
    pub remote: Vec<(NodeId, Vec<u64>)>,
}

/// Plans the fan-out of one push from node `me` to `recipients`.
///
/// `owner` is the ring lookup (the caller decides what an empty ring means); `online_here`
/// says whether a user has a live connection on this node. A user owned elsewhere but still
/// online here goes to both `local` and their owner: this node serves the connection it has,
/// the owner serves the user's other devices.
pub fn plan(
    me: NodeId,
    recipients: &[UserId],
    owner: impl Fn(UserId) -> NodeId,
    online_here: impl Fn(UserId) -> bool,
) -> FanoutPlan {
    let mut local = Vec::new();
    let mut remote: Vec<(NodeId, Vec<u64>)> = Vec::new();
    for &u in recipients {
        let node = owner(u);
        if node == me || online_here(u) {
            local.push(u);
        }
        if node == me {
            continue;
        }
        let i = match remote.binary_search_by_key(&node, |e| e.0) {
            Ok(i) => i,
            Err(i) => {
                // See the module docs for the capacity.
                let share = (recipients.len() / (remote.len() + 1)).clamp(4, 64);
                remote.insert(i, (node, Vec::with_capacity(share)));
                i
            }
        };
        remote[i].1.push(u.0);
    }
    FanoutPlan { local, remote }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = NodeId(2);

    /// Owner by id modulo 4 (nodes 0..=3), so tests can say who owns whom.
    fn owner(u: UserId) -> NodeId {
        NodeId((u.0 % 4) as u32)
    }

    fn users(ids: impl IntoIterator<Item = u64>) -> Vec<UserId> {
        ids.into_iter().map(UserId).collect()
    }

    #[test]
    fn groups_remote_recipients_by_owner_in_input_order() {
        let r = users([7, 1, 2, 4, 5, 3, 0, 6, 9, 11]);
        let p = plan(ME, &r, owner, |_| false);
        assert_eq!(p.local, users([2, 6]));
        assert_eq!(
            p.remote,
            vec![
                (NodeId(0), vec![4, 0]),
                (NodeId(1), vec![1, 5, 9]),
                (NodeId(3), vec![7, 3, 11]),
            ]
        );
    }

    #[test]
    fn one_entry_per_node_and_every_remote_recipient_once() {
        // Many recipients over few nodes, owners in scrambled order.
        let r: Vec<UserId> = (0..10_000u64)
            .map(|i| UserId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7))
            .collect();
        let p = plan(ME, &r, owner, |_| false);
        let dests: Vec<NodeId> = p.remote.iter().map(|e| e.0).collect();
        assert_eq!(dests, vec![NodeId(0), NodeId(1), NodeId(3)]);
        let mut planned: Vec<u64> = p.remote.iter().flat_map(|e| e.1.clone()).collect();
        planned.extend(p.local.iter().map(|u| u.0));
        planned.sort_unstable();
        let mut all: Vec<u64> = r.iter().map(|u| u.0).collect();
        all.sort_unstable();
        assert_eq!(planned, all, "each recipient planned exactly once");
        for (node, list) in &p.remote {
            assert!(list.iter().all(|&u| owner(UserId(u)) == *node));
        }
    }

    #[test]
    fn lists_are_not_reserved_far_beyond_their_length() {
        // The lists become queued envelopes: slack in them is memory held per peer.
        let r: Vec<UserId> = (0..100_000u64).map(UserId).collect();
        let p = plan(ME, &r, owner, |_| false);
        for (node, list) in &p.remote {
            assert!(
                list.capacity() <= (2 * list.len()).max(64),
                "node {node:?}: {} reserved for {}",
                list.capacity(),
                list.len()
            );
        }
    }

    #[test]
    fn a_user_owned_elsewhere_but_online_here_goes_both_ways() {
        // 5 is owned by node 1 and still connected here; 9 (node 1) is not; 6 is ours
        // whether or not it is online.
        let r = users([5, 9, 6]);
        let p = plan(ME, &r, owner, |u| u.0 == 5);
        assert_eq!(p.local, users([5, 6]));
        assert_eq!(p.remote, vec![(NodeId(1), vec![5, 9])]);
    }

    #[test]
    fn users_owned_here_never_go_remote() {
        let r = users([2, 6, 10]);
        let p = plan(ME, &r, owner, |_| true);
        assert_eq!(p.local, r);
        assert!(p.remote.is_empty());
    }

    #[test]
    fn empty_input_plans_nothing() {
        let p = plan(ME, &[], owner, |_| true);
        assert_eq!(p, FanoutPlan::default());
    }
}
