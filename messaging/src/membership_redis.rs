//! Dynamic membership through Redis: the I/O driver of the sans-IO core
//! (`meshchat_backplane::membership`).
//!
//! Every `heartbeat` a node, in one round trip each:
//! 1. refreshes its registration `<p>:node:<id>` (JSON: id, mesh and client addresses,
//!    weight) with a TTL of `member_ttl`;
//! 2. renews its Snowflake worker-id lease `<p>:worker:<w>` (SET NX, or PEXPIRE if it is
//!    ours). A node that cannot hold its lease stops issuing ids (sends fail with
//!    `OVERLOADED`) until it holds it again, so no two live nodes share a worker id;
//! 3. runs the snapshot script: reads every live registration; if the set differs from the
//!    last published one it bumps `<p>:epoch` and PUBLISHes it on `<p>:changes`. It returns
//!    (epoch, members), the same answer for every node.
//!
//! The answer goes to the core; a `RingChanged` decision is applied to the mesh. A
//! subscriber on `<p>:changes` triggers an immediate read, so joins and leaves spread in one
//! round trip instead of one heartbeat. Expired registrations (a dead node) disappear from the
//! next snapshot: the survivors adopt a ring without it.
//!
//! Redis unreachable: the core keeps the last ring (`KeepServing`), the node keeps serving, and
//! the driver retries every heartbeat. A Redis that comes back empty (restarted without
//! persistence) would restart the epoch counter at 0, which every core would ignore as stale;
//! the script takes the caller's epoch as a floor, so epochs only grow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshchat_backplane::membership::{Decision, Event, Member, MemberState, Membership, Snapshot};
use meshchat_idgen::NodeId;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::mesh::{Mesh, MeshMember};

/// One registration as stored in Redis. Field order is fixed: the snapshot script compares
/// the concatenated JSON to detect changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    /// Node id.
    pub id: u32,
    /// Mesh address.
    pub mesh: String,
    /// Client address.
    pub client: String,
    /// Ring weight.
    pub weight: u32,
}

const SNAPSHOT: &str = r#"
local prefix = ARGV[1]
local floor = tonumber(ARGV[2])
local keys = redis.call('KEYS', prefix .. ':node:*')
table.sort(keys)
local members = {}
local digest = ''
for _, k in ipairs(keys) do
  local v = redis.call('GET', k)
  if v then
    members[#members + 1] = v
    digest = digest .. v .. '\n'
  end
end
local epoch = tonumber(redis.call('GET', prefix .. ':epoch') or '0')
if epoch < floor then
  redis.call('SET', prefix .. ':epoch', floor)
  redis.call('DEL', prefix .. ':digest')
  epoch = floor
end
if redis.call('GET', prefix .. ':digest') ~= digest then
  redis.call('SET', prefix .. ':digest', digest)
  epoch = redis.call('INCR', prefix .. ':epoch')
  redis.call('PUBLISH', prefix .. ':changes', epoch)
end
return {epoch, members}
"#;

const LEASE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct RedisMembership {
    /// Redis URL.
    pub url: String,
    /// Key prefix (`meshchat:<cluster_id>`).
    pub prefix: String,
    /// This node's registration.
    pub me: Registration,
    /// Snowflake worker id to lease.
    pub worker: u16,
    /// Refresh period.
    pub heartbeat: Duration,
    /// Registration and lease TTL.
    pub ttl: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn to_member(r: &Registration) -> Member {
    Member {
        id: NodeId(r.id),
        mesh_addr: r.mesh.clone(),
        client_addr: r.client.clone(),
        weight: r.weight,
        state: MemberState::Active,
    }
}

fn mesh_members(core: &Membership) -> Vec<MeshMember> {
    core.members()
        .filter_map(|m| {
            Some(MeshMember {
                id: m.id,
                mesh_addr: m.mesh_addr.parse().ok()?,
                client_addr: m.client_addr.clone(),
                weight: m.weight,
            })
        })
        .collect()
}

impl RedisMembership {
    /// One heartbeat: register, renew the lease, read the snapshot.
    async fn round(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        floor: u64,
    ) -> redis::RedisResult<(u64, Vec<Registration>, bool)> {
        let ttl = self.ttl.as_millis() as u64;
        let me = serde_json::to_string(&self.me).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "encoding", e.to_string()))
        })?;
        redis::cmd("SET")
            .arg(format!("{}:node:{}", self.prefix, self.me.id))
            .arg(me)
            .arg("PX")
            .arg(ttl)
            .query_async::<()>(conn)
            .await?;
        let lease: i64 = redis::Script::new(LEASE)
            .key(format!("{}:worker:{}", self.prefix, self.worker))
            .arg(self.me.id)
            .arg(ttl)
            .invoke_async(conn)
            .await?;
        let (epoch, raw): (u64, Vec<String>) = redis::Script::new(SNAPSHOT)
            .arg(&self.prefix)
            .arg(floor)
            .invoke_async(conn)
            .await?;
        let members = raw
            .iter()
            .filter_map(|j| serde_json::from_str::<Registration>(j).ok())
            .collect();
        Ok((epoch, members, lease == 1))
    }

    /// Runs until `stop` flips: heartbeats, feeds the core, applies ring changes to `mesh`,
    /// and keeps `ids_allowed` in step with the worker-id lease. On stop it deregisters (a
    /// graceful leave is seen at once, not after the TTL).
    pub async fn run(
        self,
        mesh: Arc<Mesh>,
        ids_allowed: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let client = match redis::Client::open(self.url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "bad redis url; membership stays empty");
                return;
            }
        };
        let changed = Arc::new(Notify::new());
        tokio::spawn(subscribe(
            client.clone(),
            format!("{}:changes", self.prefix),
            changed.clone(),
            stop.clone(),
        ));
        let mut core = Membership::new(NodeId(self.me.id));
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut down = false;
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
                _ = changed.notified() => {}
            }
            if conn.is_none() {
                conn =
                    tokio::time::timeout(self.heartbeat, client.get_multiplexed_async_connection())
                        .await
                        .ok()
                        .and_then(Result::ok);
            }
            let result = match conn.as_mut() {
                Some(c) => tokio::time::timeout(self.heartbeat * 2, self.round(c, core.epoch()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                    }),
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "not connected",
                ))),
            };
            match result {
                Ok((epoch, regs, lease)) => {
                    if down {
                        down = false;
                        core.handle(Event::SourceUp { now_ms: now_ms() });
                        info!("redis reachable again");
                    }
                    if ids_allowed.swap(lease, Ordering::SeqCst) != lease {
                        if lease {
                            info!(worker = self.worker, "worker id lease held");
                        } else {
                            warn!(
                                worker = self.worker,
                                "worker id lease lost: not issuing ids"
                            );
                        }
                    }
                    let decisions = core.handle(Event::Snapshot(Snapshot {
                        epoch,
                        members: regs.iter().map(to_member).collect(),
                    }));
                    for d in decisions {
                        if let Decision::RingChanged {
                            epoch,
                            joined,
                            left,
                        } = d
                        {
                            info!(epoch, ?joined, ?left, "ring changed");
                        }
                    }
                    // Adopt every newer epoch, not only those that changed the ring: a node
                    // whose first snapshot after a Redis restart already holds its old member
                    // set (the others re-registered first) otherwise kept its old epoch while
                    // the cluster moved on (seen once in CI), and an address change with
                    // unchanged weights was never applied.
                    if core.epoch() > mesh.current_epoch() {
                        mesh.apply(core.epoch(), core.ring(), &mesh_members(&core));
                    }
                }
                Err(e) => {
                    conn = None;
                    down = true;
                    for d in core.handle(Event::SourceDown { now_ms: now_ms() }) {
                        if let Decision::KeepServing { epoch } = d {
                            warn!(error = %e, epoch, "redis unreachable: serving on the last ring");
                        }
                    }
                    debug!(error = %e, "membership round failed");
                }
            }
        }
        // Graceful leave: drop the registration and the lease now.
        if let Some(c) = conn.as_mut() {
            let _ = redis::cmd("DEL")
                .arg(format!("{}:node:{}", self.prefix, self.me.id))
                .query_async::<()>(c)
                .await;
            let _ = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 0",
            )
            .key(format!("{}:worker:{}", self.prefix, self.worker))
            .arg(self.me.id)
            .invoke_async::<i64>(c)
            .await;
            // Let the others see the change now.
            let _ = redis::Script::new(SNAPSHOT)
                .arg(&self.prefix)
                .arg(core.epoch())
                .invoke_async::<(u64, Vec<String>)>(c)
                .await;
        }
    }
}

/// Wakes the driver whenever the member set changes.
async fn subscribe(
    client: redis::Client,
    channel: String,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    use futures::StreamExt;
    loop {
        let session = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.into_on_message();
            while messages.next().await.is_some() {
                changed.notify_one();
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::select! {
            _ = stop.changed() => return,
            r = session => {
                if let Err(e) = r {
                    debug!(error = %e, "change subscription failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
