//! Prints the ring's balance and movement for several virtual-node counts, next to the
//! floor set by the users' own hash scatter (`user_point % N`, a perfect partition of the
//! hash space). `cargo run --release -p meshchat-backplane --example ring_balance`
#![allow(clippy::print_stdout, missing_docs)]

use std::collections::{BTreeMap, HashMap};

use meshchat_backplane::ring::{Ring, user_point};
use meshchat_idgen::{NodeId, UserId};

const USERS: u64 = 1_000_000;

fn users() -> impl Iterator<Item = UserId> {
    (0..USERS).map(|u| UserId(u * 7_919 + 13))
}

fn max_over_mean(counts: &HashMap<u32, u64>, n: u32) -> f64 {
    let max = *counts.values().max().unwrap_or(&0) as f64;
    max / (USERS as f64 / f64::from(n))
}

fn main() {
    println!(
        "| members | vnodes/weight | max/mean (1M users) | moved on join (x ideal 1/N) | moved on leave (x ideal) | hash-mod-N floor |"
    );
    println!("|---|---|---|---|---|---|");
    for n in [8u32, 64, 256] {
        let mut floor: HashMap<u32, u64> = HashMap::new();
        for u in users() {
            *floor
                .entry((user_point(u) % u64::from(n)) as u32)
                .or_insert(0) += 1;
        }
        for v in [1_024u32, 4_096, 8_192, 16_384] {
            let members: BTreeMap<NodeId, u32> = (1..=n).map(|i| (NodeId(i), 1)).collect();
            let ring = Ring::build(&members, v).expect("ring");
            let mut joined_m = members.clone();
            joined_m.insert(NodeId(n + 1), 1);
            let joined = Ring::build(&joined_m, v).expect("ring");
            let mut left_m = members.clone();
            left_m.remove(&NodeId(1));
            let left = Ring::build(&left_m, v).expect("ring");
            let mut counts: HashMap<u32, u64> = HashMap::new();
            let (mut mj, mut ml) = (0u64, 0u64);
            for u in users() {
                let o = ring.owner(u).expect("owner");
                *counts.entry(o.0).or_insert(0) += 1;
                if joined.owner(u) != Some(o) {
                    mj += 1;
                }
                if left.owner(u) != Some(o) {
                    ml += 1;
                }
            }
            println!(
                "| {n} | {v} | {:.4} | {:.3} | {:.3} | {:.4} |",
                max_over_mean(&counts, n),
                mj as f64 / (USERS as f64 / f64::from(n + 1)),
                ml as f64 / (USERS as f64 / f64::from(n)),
                max_over_mean(&floor, n)
            );
        }
    }
}
