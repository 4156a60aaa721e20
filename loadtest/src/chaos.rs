//! Chaos faults on a spawned cluster, on a plan given on the command line
//! (`--fault kill:2@20 --fault restart:2@40 --fault redis-down@10 --fault redis-up@25`, times
//! in seconds from the start of the traffic), and what they did: a timeline of the faults and,
//! for every node killed or partitioned, how long each of its clients took to be serving
//! again on another node (the client library's liveness check and failover, no help from the
//! harness).
//!
//! The faults are real, not simulated: SIGKILL; a `redis-server` killed and started empty;
//! a partition made of network namespaces the harness creates (`cluster::Netns`: each node
//! in its own namespace on a bridge, traffic to the other nodes and Redis dropped in the
//! kernel); the embedded store's write lock held by another process (`storage-down`: every
//! node's writes wait, up to their busy timeout of 10 s, and then fail; reads go on); and users flooding at ten times their send rate limit
//! (`flood:K`: K users for [`FLOOD_SECS`], each send tried once, without the client
//! library's retries, as an abusive client would).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::warn;

use crate::cluster::Target;
use crate::fleet::Fleet;
use crate::tracker::{Counters, Tracker};

/// One fault of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// SIGKILL node N (1-based).
    Kill(usize),
    /// Start node N (1-based) again.
    Restart(usize),
    /// Drain node N (1-based): off the ring, its users redirected; done when it exited.
    Drain(usize),
    /// Kill the harness's Redis.
    RedisDown,
    /// Start it again, empty.
    RedisUp,
    /// Cut node N (1-based) off from the other nodes and Redis (its clients still reach it).
    Partition(usize),
    /// Heal node N's partition.
    Heal(usize),
    /// Hold the embedded store's write lock from another process: every write waits, up to
    /// the nodes' busy timeout (10 s), then fails.
    StorageDown,
    /// Release it.
    StorageUp,
    /// K users send at ten times the send rate limit for [`FLOOD_SECS`].
    Flood(usize),
}

/// How long a `drain:N` fault waits for the node to exit: its default drain timeout (2 min)
/// and shutdown grace (10 s), and some.
const DRAIN_WAIT: Duration = Duration::from_secs(150);

/// How long a `flood:K` fault lasts.
pub const FLOOD_SECS: u64 = 10;

/// A fault at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Seconds from the start of the traffic.
    pub at_secs: u64,
    /// What happens.
    pub action: Action,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (what, at) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected WHAT@SECONDS"))?;
        let at_secs = at
            .parse()
            .map_err(|_| format!("{s:?}: {at:?} is not a number of seconds"))?;
        let node = |n: &str| -> Result<usize, String> {
            match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{s:?}: node numbers start at 1")),
            }
        };
        let action = match what.split_once(':') {
            Some(("kill", n)) => Action::Kill(node(n)?),
            Some(("restart", n)) => Action::Restart(node(n)?),
            Some(("drain", n)) => Action::Drain(node(n)?),
            Some(("partition", n)) => Action::Partition(node(n)?),
            Some(("heal", n)) => Action::Heal(node(n)?),
            Some(("flood", k)) => match k.parse::<usize>() {
                Ok(k) if k >= 1 => Action::Flood(k),
                _ => return Err(format!("{s:?}: flood:K needs K >= 1 users")),
            },
            None if what == "redis-down" => Action::RedisDown,
            None if what == "redis-up" => Action::RedisUp,
            None if what == "storage-down" => Action::StorageDown,
            None if what == "storage-up" => Action::StorageUp,
            _ => {
                return Err(format!(
                    "{s:?}: faults are kill:N, restart:N, drain:N, partition:N, heal:N, redis-down, \
                     redis-up, storage-down, storage-up, flood:K"
                ));
            }
        };
        Ok(Self { at_secs, action })
    }
}

/// What a fault did, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    /// The fault.
    pub fault: Fault,
    /// Seconds from the start of the traffic when it was carried out.
    pub done_at_secs: f64,
    /// Whether it worked.
    pub ok: bool,
    /// Error, or a note.
    pub detail: String,
    /// For a kill: connections the node held at that moment.
    pub victims: usize,
}

/// What the faults act on besides the cluster.
#[derive(Debug, Clone, Copy)]
pub struct World<'a> {
    /// The connections.
    pub fleet: &'a Arc<Fleet>,
    /// Where results go.
    pub tracker: &'a Arc<Tracker>,
    /// Slots connected when the traffic started.
    pub live: &'a Arc<Vec<usize>>,
    /// Sends per second of each flooding user.
    pub flood_rate: f64,
    /// Message body size.
    pub body_bytes: usize,
    /// Seed of the random choices.
    pub seed: u64,
    /// When the traffic phase ends.
    pub traffic_until: tokio::time::Instant,
}

/// Carries out `plan` against `target` during the traffic phase, which started at `from`;
/// returns when the last fault is done (a flood is started and runs on by itself). Killed
/// and partitioned nodes' clients are watched until they are re-homed or `watch_until`
/// passes.
pub async fn run_plan(
    plan: &[Fault],
    target: &mut Target,
    world: World<'_>,
    from: Instant,
    watch_until: tokio::time::Instant,
) -> Vec<FaultEvent> {
    let World {
        fleet,
        tracker,
        live,
        ..
    } = world;
    let mut plan = plan.to_vec();
    plan.sort_by_key(|f| f.at_secs);
    let mut events = Vec::new();
    for fault in plan {
        let due = from + Duration::from_secs(fault.at_secs);
        tokio::time::sleep_until(due.into()).await;
        let mut victims = Vec::new();
        let result = match fault.action {
            // The node's clients must re-home elsewhere by themselves: watch them do it.
            Action::Kill(n) | Action::Partition(n) => {
                let addr = target.servers.get(n - 1).cloned().unwrap_or_default();
                victims = fleet.open_on(&addr);
                let r = tokio::task::block_in_place(|| match fault.action {
                    Action::Kill(_) => target.kill_node(n - 1),
                    _ => target.partition(n - 1),
                });
                if r.is_ok() {
                    watch_rehome(fleet.clone(), tracker.clone(), &victims, watch_until);
                }
                r
            }
            // Its clients are redirected and re-home by themselves: watch them do it.
            Action::Drain(n) => {
                let addr = target.servers.get(n - 1).cloned().unwrap_or_default();
                victims = fleet.open_on(&addr);
                watch_rehome(fleet.clone(), tracker.clone(), &victims, watch_until);
                target.drain_node(n - 1, DRAIN_WAIT).await
            }
            Action::Heal(n) => tokio::task::block_in_place(|| target.heal(n - 1)),
            Action::Restart(n) => tokio::task::block_in_place(|| target.restart_node(n - 1)),
            Action::RedisDown => target.redis_down(),
            Action::RedisUp => tokio::task::block_in_place(|| target.redis_up()),
            Action::StorageDown => tokio::task::block_in_place(|| target.storage_down()),
            Action::StorageUp => tokio::task::block_in_place(|| target.storage_up()),
            Action::Flood(k) => {
                // The first K connected users, spread over the nodes like everyone else. The
                // flood ends with the traffic at the latest: what it gets acked must have the
                // drain to be delivered.
                let flooders: Vec<usize> = live.iter().copied().take(k).collect();
                let left = world
                    .traffic_until
                    .saturating_duration_since(tokio::time::Instant::now());
                tokio::spawn(crate::scenario::flood(
                    fleet.clone(),
                    tracker.clone(),
                    flooders,
                    live.clone(),
                    world.flood_rate,
                    Duration::from_secs(FLOOD_SECS).min(left),
                    world.body_bytes,
                    world.seed ^ 0xF100D,
                ));
                Ok(())
            }
        };
        if let Err(e) = &result {
            warn!(?fault, error = %e, "fault failed");
        }
        events.push(FaultEvent {
            fault,
            done_at_secs: from.elapsed().as_secs_f64(),
            ok: result.is_ok(),
            detail: result.err().map(|e| e.to_string()).unwrap_or_default(),
            victims: victims.len(),
        });
    }
    events
}

/// Records, for each of `victims` (slots connected to the killed or partitioned node), the
/// time until its client is authenticated again on an open connection (at its new home, or
/// at the node itself once it is back and owns the user again) and has filled its gap (a gap fill that
/// started after the kill ran to the end), in the re-home histogram.
fn watch_rehome(
    fleet: Arc<Fleet>,
    tracker: Arc<Tracker>,
    victims: &[usize],
    until: tokio::time::Instant,
) {
    let killed = Instant::now();
    // Polled every 50 ms for thousands of clients while the nodes absorb the failover: only
    // counters are compared (cloning each session cost ~4% of the machine's CPU at 10k).
    let mut left: Vec<(usize, u64, u64)> = victims
        .iter()
        .filter_map(|&i| {
            let c = fleet.client(i)?;
            c.session()?;
            Some((i, c.authentications(), c.gap_fills()))
        })
        .collect();
    Counters::add(&tracker.counters.rehome_victims, left.len() as u64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !left.is_empty() && tokio::time::Instant::now() < until {
            tick.tick().await;
            left.retain(|(i, auths, fills)| {
                let done = fleet.client(*i).is_some_and(|c| {
                    c.gap_fills() > *fills
                        && c.authentications() > *auths
                        && c.conn().is_ok_and(|now| now.is_open())
                });
                if done {
                    tracker.rehomed(killed.elapsed());
                }
                !done
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_say_why() {
        assert_eq!(
            "kill:2@20".parse::<Fault>(),
            Ok(Fault {
                at_secs: 20,
                action: Action::Kill(2)
            })
        );
        assert_eq!(
            "redis-up@7".parse::<Fault>().map(|f| f.action),
            Ok(Action::RedisUp)
        );
        for bad in [
            "kill:0@1",
            "kill:2",
            "boom@3",
            "restart:x@1",
            "redis-down@soon",
        ] {
            let e = bad.parse::<Fault>().expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }
}
