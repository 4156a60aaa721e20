//! Dynamic membership through Redis: the I/O driver of the sans-IO core
//! ([`crate::membership`]).
//!
//! Every `heartbeat` a node, in one round trip each:
//! 1. renews its Snowflake worker-id lease `<p>:worker:<w>` (SET NX, or PEXPIRE if its value
//!    is this process's random token: a second process with the same node id or worker id
//!    never "holds" it too), and records in `<p>:worker:<w>:hw` the wall-clock ms until
//!    which it may stamp ids. A process that takes over a worker id raises its generator's
//!    floor above the previous holder's mark, so ids stay unique across the handover even
//!    if its clock is behind; and, only while it holds the lease, refreshes its registration
//!    `<p>:node:<id>` (JSON: id, mesh and client addresses, weight) with a TTL of
//!    `member_ttl` (a process without its worker id never enters the ring), and its entry in
//!    the sorted set `<p>:nodes` (score: when the registration expires, Redis ms);
//! 2. runs the snapshot script: prunes `<p>:nodes` of expired entries and reads the
//!    registration of each remaining one (no `KEYS` scan of the keyspace on every heartbeat
//!    of every node); if the set differs from the
//!    last published one it bumps `<p>:epoch` and PUBLISHes it on `<p>:changes`. It returns
//!    (epoch, members, Redis's run id), the same answer for every node.
//!
//! The answer goes to the core; a `RingChanged` decision is applied to the mesh. A
//! subscriber on `<p>:changes` triggers an immediate read, so joins and leaves spread in one
//! round trip instead of one heartbeat. Expired registrations (a dead node) disappear from the
//! next snapshot: the survivors adopt a ring without it.
//!
//! Every outcome goes to the sans-IO core, which decides until when the lease is held
//! (`sent_at + ttl - margin` of the last good round, on the monotonic clock, see
//! [`crate::membership`]); the driver copies that deadline into the node's
//! [`LeaseGate`], which every id and every authentication checks against the clock.
//!
//! Redis unreachable: the core keeps the last ring (`KeepServing`) and the node keeps serving
//! while its lease lasts, retrying every heartbeat. When the lease runs out the core says
//! `Fenced`: by then Redis has expired the registration (the others re-homed its users) and
//! may give the worker id to another process, so the node stops issuing ids and refuses,
//! with `UNAVAILABLE`, authentication and every request that needs a new id (sends, channel
//! creation); reads, receipts and reactions are still served. What happens to its clients
//! depends on whether the cluster may be able to take them:
//! - some member is silent (its mesh link down, or no datagram for
//!   [`HOLD_WHILE_HEARD_WITHIN`]), or Redis answered and the lease is another process's:
//!   this node is the one cut off, and the others have re-homed its users. It closes every
//!   client connection with `UNAVAILABLE` (clients reconnect through another node, which
//!   redirects them to their new home);
//! - Redis is unreachable and every member is still heard: most likely the whole cluster
//!   lost Redis and every member fenced itself at about the same time, so there is no
//!   serving node to go to. Closing would send every client of the cluster into failover at
//!   once, a handshake storm that kept 10k clients from coming back after a 10 s outage
//!   (runs P, docs/RELIABILITY.md). The node keeps its clients connected instead (their
//!   refused requests are retryable) and closes them once a member goes silent or its link
//!   goes down (a member that still has Redis drops this node from its ring and closes the
//!   link: the case of a node cut off from Redis alone), once Redis answers that the lease is
//!   another process's, or after [`HOLD_AT_MOST`] (members that joined since may own its
//!   users, and they never link to a node they do not know).
//!
//! It serves again after its next successful round (`Unfenced`). A Redis that comes back empty (restarted without
//! persistence) would restart the epoch counter at 0, which every core would ignore as stale;
//! the script takes the caller's epoch as a floor, so epochs only grow.
//!
//! Redis restarted empty (or failed over with lost writes) also forgets the leases, the
//! high-water marks and the registrations (a failover may keep stale ones). A take that finds
//! no mark, or one written by another Redis instance (each mark is stored with the run id of
//! the Redis that wrote it), is reported as `no_history`, and the core keeps the node fenced
//! for a TTL unless this process held the lease throughout (any other previous holder has
//! fenced itself by then). The run id comes
//! with every snapshot: when it changes, the core defers snapshots that drop ring members for
//! a TTL, so the first node to re-register does not publish a one-node ring to itself and
//! the others (mass redirects, then back) while the rest re-register.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshchat_idgen::{Generator, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, warn};

use crate::lease::LeaseGate;
use crate::membership::{Decision, Event, LeaseConfig, Member, MemberState, Membership, Snapshot};
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
    /// Draining: still a member (links, lease), but on no ring, so its users move to their
    /// next homes. Written only when true, so a registration that is not draining reads the
    /// same as before this field existed (nodes without it see a draining node as Active).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// Lua that sets `run_id` to Redis's run id (it changes on every restart and failover), or
/// to '' where `INFO` is not allowed in scripts (then restarts go unnoticed: no shrink is
/// deferred, and no mark can be trusted: every take of a worker id waits a TTL, the safe side
/// where a restart or a failover to a stale replica cannot be told apart).
macro_rules! run_id_lua {
    () => {
        "local ok, info = pcall(redis.call, 'INFO', 'server')
local run_id = ok and string.match(info, 'run_id:(%w+)') or ''
"
    };
}

const SNAPSHOT: &str = concat!(
    run_id_lua!(),
    r#"
local prefix = ARGV[1]
local floor = tonumber(ARGV[2])
local set = prefix .. ':nodes'
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', set, '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local ids = redis.call('ZRANGE', set, 0, -1)
table.sort(ids)
local members = {}
local digest = ''
for _, id in ipairs(ids) do
  local v = redis.call('GET', prefix .. ':node:' .. id)
  if v then
    members[#members + 1] = v
    digest = digest .. v .. '\n'
  else
    redis.call('ZREM', set, id)
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
return {epoch, members, run_id}
"#
);

/// KEYS: the lease, its high-water mark, this node's registration, the set of registered
/// nodes, the run id of the Redis that wrote the mark. ARGV: this process's token, the TTL in
/// ms, the wall-clock ms until which this holder may stamp ids, the registration, this node's
/// id. Returns {2, mark, trusted} when the lease was just taken (mark: the previous holders'
/// high-water mark, which ids must stay above, 0 if there is none; trusted: 1 if this Redis
/// instance wrote it, 0 if it is missing or was written before a restart or failover, which
/// may have lost later marks and leases), {1, 0, 1} when renewed, {0, 0, 1} when another
/// process holds it. Only the holder writes the registration: a process that does not
/// hold its worker id (a twin with the same node id, or another node configured with the
/// same worker id) never enters the ring and never overwrites the holder's entry.
const LEASE: &str = concat!(
    run_id_lua!(),
    r#"
local state = 1
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  state = 2
elseif redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return {0, 0, 1}
end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), ARGV[5])
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local trusted = 0
if mark > 0 and run_id ~= '' and redis.call('GET', KEYS[5]) == run_id then
  trusted = 1
end
if tonumber(ARGV[3]) > mark then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', 86400000)
end
redis.call('SET', KEYS[5], run_id, 'PX', 86400000)
if state == 2 then return {2, mark, trusted} end
return {1, 0, 1}
"#
);

/// Graceful release. KEYS: the lease, its high-water mark, this node's registration, the set
/// of registered nodes, the run id of the Redis that wrote the mark. ARGV: this process's
/// token, the newest wall-clock ms it stamped, this node's id. Only the holder deregisters.
const RELEASE: &str = concat!(
    run_id_lua!(),
    r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2], 'PX', 86400000)
  redis.call('SET', KEYS[5], run_id, 'PX', 86400000)
end
return 0
"#
);

/// What a round learned about the worker-id lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    /// Another process holds it.
    Lost,
    /// Ours, renewed.
    Renewed,
    /// Ours, just taken: ids must stay above the previous holders' mark (unix ms, 0: none).
    /// Not `trusted` (missing, or written before Redis restarted or failed over): the core
    /// waits out a TTL before serving.
    Taken { floor_unix_ms: u64, trusted: bool },
}

/// What one round learned.
#[derive(Debug)]
struct Round {
    epoch: u64,
    members: Vec<Registration>,
    lease: LeaseState,
    /// Redis's run id: changes when it restarts or fails over.
    instance: String,
}

/// Settings of the driver. Its `Debug` leaves the URL out (it may carry a password).
#[derive(Clone)]
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
    /// The node's drain: once claimed ([`RedisMembership::claim_drain`]), every round
    /// registers it as draining ([`Registration::draining`]).
    pub draining: Arc<DrainSwitch>,
}

/// A node's drain, shared by its membership driver and whoever starts the drain. A claim and
/// a heartbeat round never interleave: a round must not overwrite the draining registration a
/// claim just wrote with the flag it read before.
#[derive(Debug, Default)]
pub struct DrainSwitch {
    flag: std::sync::atomic::AtomicBool,
    rounds: tokio::sync::Mutex<()>,
}

impl DrainSwitch {
    /// Whether the node drains (a claim succeeded).
    pub fn is_set(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Why a drain was not claimed.
#[derive(Debug, thiserror::Error)]
pub enum DrainClaimError {
    /// No other active (registered, not draining) member: nobody could take the users. Two
    /// drains asked at once of the last two active nodes: one is refused this way.
    #[error("no other active node is registered to take this node's users")]
    NoOtherActive,
    /// This node is not registered (it does not hold its lease, or its registration lapsed).
    #[error("this node is not registered in Redis (lease not held)")]
    NotRegistered,
    /// Redis could not be asked.
    #[error("redis: {0}")]
    Redis(String),
}

/// Claims a drain. KEYS: this node's registration, the set of registered nodes. ARGV: the key
/// prefix, this node's id, its registration marked draining, the TTL in ms. Returns the
/// number of other active members after writing the draining registration, 0 (and writes
/// nothing) if there is none, -1 if this node is not registered. One script, so two drains
/// asked at once are serialized by Redis: the second sees the first one draining.
const CLAIM_DRAIN: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local others = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  if id ~= ARGV[2] then
    local v = redis.call('GET', ARGV[1] .. ':node:' .. id)
    if v then
      local ok, r = pcall(cjson.decode, v)
      if ok and r.draining ~= true then others = others + 1 end
    end
  end
end
if others == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return others
"#;

/// The node's client connections, as the driver needs them: closed when the node is fenced
/// and the cluster can take them (their clients reconnect through another node, which
/// redirects them to their new home).
pub trait ClientConnections: Send + Sync + 'static {
    /// Closes every client connection with `UNAVAILABLE` because this node is fenced;
    /// returns how many it closed.
    fn close_all_fenced(&self) -> usize;
}

/// What the driver drives besides the mesh: the node's id gate and generator, and the
/// connections to close when fenced.
#[derive(Clone)]
pub struct Fencing {
    /// The gate every id and authentication checks.
    pub gate: Arc<LeaseGate>,
    /// The generator whose floor is raised on taking over a worker id.
    pub ids: Arc<Generator>,
    /// Client connections, closed when the node is fenced.
    pub clients: Arc<dyn ClientConnections>,
}

impl std::fmt::Debug for RedisMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMembership")
            .field("prefix", &self.prefix)
            .field("me", &self.me)
            .field("worker", &self.worker)
            .field("heartbeat", &self.heartbeat)
            .field("ttl", &self.ttl)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Fencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fencing")
            .field("gate", &self.gate)
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

/// A fenced node keeps its clients while it has heard every other member within this: the
/// mesh sends a keep-alive every 2 s, so a live link is never silent for much longer than
/// that, and a member cut off is (a partitioned node releases its clients ~1 s after it
/// fences).
pub const HOLD_WHILE_HEARD_WITHIN: Duration = Duration::from_secs(4);

/// The longest a fenced node keeps its clients. A node that cannot reach Redis cannot know
/// the ring: members that joined since (and may own its users now) never link to it. Past
/// this, its clients go looking for a serving node, at the price of a handshake storm if
/// the whole cluster is still out (they back off to one try per 4 s).
pub const HOLD_AT_MOST: Duration = Duration::from_secs(120);

/// Runs while a fenced node keeps its clients: closes them once a member goes silent, or
/// after [`HOLD_AT_MOST`].
async fn release_when_a_member_goes_silent(
    mesh: Arc<Mesh>,
    clients: Arc<dyn ClientConnections>,
    epoch: u64,
) {
    let until = tokio::time::Instant::now() + HOLD_AT_MOST;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let silent = mesh.silent_peers(HOLD_WHILE_HEARD_WITHIN);
        let why = if !silent.is_empty() {
            "fenced: a member went silent; closing clients (the cluster re-homes them)"
        } else if tokio::time::Instant::now() >= until {
            "fenced for too long: closing clients (they look for a serving node)"
        } else {
            continue;
        };
        let closed = clients.close_all_fenced();
        warn!(epoch, closing = closed, ?silent, "{why}");
        return;
    }
}

/// A random token that tells this process's lease from any other's.
fn process_token(node: u32) -> String {
    format!("{node}:{:016x}", rand::random::<u64>())
}

fn now_unix_ms() -> u64 {
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
        state: if r.draining {
            MemberState::Draining
        } else {
            MemberState::Active
        },
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
    /// Starts this node's drain: atomically in Redis, refused unless another active member
    /// remains to take its users; from then on every round registers it as draining. Returns
    /// the other active members, or `None` if the node was draining already (Redis is not
    /// asked again).
    pub async fn claim_drain(&self) -> Result<Option<usize>, DrainClaimError> {
        if self.draining.is_set() {
            return Ok(None);
        }
        let redis = |e: redis::RedisError| DrainClaimError::Redis(e.to_string());
        // Connected before the round lock is taken: a slow connect must not hold heartbeats
        // (the lease) back.
        let mut conn = tokio::time::timeout(Duration::from_secs(2), async {
            redis::Client::open(self.url.as_str())
                .map_err(redis)?
                .get_multiplexed_async_connection()
                .await
                .map_err(redis)
        })
        .await
        .map_err(|_| DrainClaimError::Redis("no connection within 2 s".into()))??;
        let me = Registration {
            draining: true,
            ..self.me.clone()
        };
        let me = serde_json::to_string(&me).map_err(|e| DrainClaimError::Redis(e.to_string()))?;
        let key = format!("{}:node:{}", self.prefix, self.me.id);
        // The script runs under the round lock, bounded well inside the lease's slack.
        let bound = (self.ttl.saturating_sub(self.heartbeat * 2) / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        let _round = self.draining.rounds.lock().await;
        if self.draining.is_set() {
            return Ok(None);
        }
        let script = redis::Script::new(CLAIM_DRAIN);
        let mut invocation = script.key(&key);
        invocation
            .key(format!("{}:nodes", self.prefix))
            .arg(&self.prefix)
            .arg(self.me.id)
            .arg(me)
            .arg(self.ttl.as_millis() as u64);
        let claim = invocation.invoke_async::<i64>(&mut conn);
        let others = match tokio::time::timeout(bound, claim).await {
            Ok(r) => r.map_err(redis)?,
            // No answer in time: the script may have run. What Redis holds decides, so the
            // next round does not undo a drain Redis already published.
            Err(_) => {
                let now: Option<String> = tokio::time::timeout(bound, async {
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await
                })
                .await
                .map_err(|_| DrainClaimError::Redis("no answer in time".into()))?
                .map_err(redis)?;
                let draining = now
                    .and_then(|j| serde_json::from_str::<Registration>(&j).ok())
                    .is_some_and(|r| r.draining);
                if draining {
                    1
                } else {
                    return Err(DrainClaimError::Redis("no answer in time".into()));
                }
            }
        };
        match others {
            -1 => Err(DrainClaimError::NotRegistered),
            0 => Err(DrainClaimError::NoOtherActive),
            n => {
                self.draining
                    .flag
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                info!(others = n, "drain claimed: registered as draining");
                Ok(Some(n as usize))
            }
        }
    }

    /// One heartbeat: register, renew the lease (stamping up to `mark_unix_ms`), read the
    /// snapshot.
    async fn round(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        floor: u64,
        token: &str,
        mark_unix_ms: u64,
    ) -> redis::RedisResult<Round> {
        let ttl = self.ttl.as_millis() as u64;
        let me = Registration {
            draining: self.draining.is_set(),
            ..self.me.clone()
        };
        let me = serde_json::to_string(&me).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "encoding", e.to_string()))
        })?;
        let (state, mark, trusted): (i64, u64, i64) = redis::Script::new(LEASE)
            .key(format!("{}:worker:{}", self.prefix, self.worker))
            .key(format!("{}:worker:{}:hw", self.prefix, self.worker))
            .key(format!("{}:node:{}", self.prefix, self.me.id))
            .key(format!("{}:nodes", self.prefix))
            .key(format!("{}:worker:{}:hw:run", self.prefix, self.worker))
            .arg(token)
            .arg(ttl)
            .arg(mark_unix_ms)
            .arg(me)
            .arg(self.me.id)
            .invoke_async(conn)
            .await?;
        let lease = match state {
            2 => LeaseState::Taken {
                floor_unix_ms: mark,
                trusted: trusted == 1,
            },
            1 => LeaseState::Renewed,
            _ => LeaseState::Lost,
        };
        let (epoch, raw, instance): (u64, Vec<String>, String) = redis::Script::new(SNAPSHOT)
            .arg(&self.prefix)
            .arg(floor)
            .invoke_async(conn)
            .await?;
        let members = raw
            .iter()
            .filter_map(|j| serde_json::from_str::<Registration>(j).ok())
            .collect();
        Ok(Round {
            epoch,
            members,
            lease,
            instance,
        })
    }

    /// Runs until `stop` flips: heartbeats, feeds the core, applies ring changes to `mesh`,
    /// keeps the lease gate in step with the core and closes every client when fenced. On
    /// stop it deregisters (a graceful leave is seen at once, not after the TTL).
    pub async fn run(self, mesh: Arc<Mesh>, fencing: Fencing, mut stop: watch::Receiver<bool>) {
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
        let token = process_token(self.me.id);
        let gate = &fencing.gate;
        let mut core = Membership::with_lease(
            NodeId(self.me.id),
            LeaseConfig::new(self.ttl.as_millis() as u64),
        );
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut down = false;
        // While fenced with every member heard: the watch that closes the clients once one
        // goes silent.
        let mut holding: Option<tokio::task::JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Wake at the lease deadline too, so fencing does not wait for a slow round, and
            // at the end of a wait after a take with no history, so serving does not either.
            let (from, until) = (gate.valid_from_ms(), gate.valid_until_ms());
            let wake = if core.is_fenced() {
                // Only a start still ahead: a past one (a lease that ran out while Redis was
                // away) would make this loop spin.
                (from > gate.now_ms() && from < until).then_some(from)
            } else {
                (until != u64::MAX).then_some(until)
            };
            let fence_at = async {
                match wake {
                    Some(ms) => tokio::time::sleep_until(gate.instant_of(ms).into()).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => break,
                _ = tick.tick() => {}
                _ = changed.notified() => {}
                _ = fence_at => {}
            }
            let mut decisions = core.handle(Event::Tick {
                now_ms: gate.now_ms(),
            });
            let sent_at = gate.now_ms();
            if conn.is_none() {
                conn =
                    tokio::time::timeout(self.heartbeat, client.get_multiplexed_async_connection())
                        .await
                        .ok()
                        .and_then(Result::ok);
            }
            // The wall-clock ms until which this holder may stamp ids if the round renews the
            // lease: the next holder's floor.
            // Above what this process already stamped too: after taking over with a floor
            // ahead of this host's clock, ids carry the floor's time, not the clock's.
            let mark = now_unix_ms().max(fencing.ids.last_unix_ms()) + self.ttl.as_millis() as u64;
            // Whether Redis was out before this round: a lease that ran out at this wake-up
            // ran out while it was, even if this very round reaches it (restarted empty).
            let was_down = down;
            let mut lost = false;
            // Never at the same time as a drain claim (which is bounded in time).
            let claim = self.draining.rounds.lock().await;
            let result = match conn.as_mut() {
                Some(c) => tokio::time::timeout(
                    self.heartbeat * 2,
                    self.round(c, core.epoch(), &token, mark),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                }),
                None => Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "not connected",
                ))),
            };
            drop(claim);
            let now = gate.now_ms();
            match result {
                Ok(Round {
                    epoch,
                    members: regs,
                    lease,
                    instance,
                }) => {
                    if down {
                        down = false;
                        decisions.extend(core.handle(Event::SourceUp { now_ms: now }));
                        info!("redis reachable again");
                    }
                    match lease {
                        LeaseState::Taken {
                            floor_unix_ms,
                            trusted,
                        } => {
                            // Before the gate opens: no id at or below the previous holders'.
                            fencing.ids.raise_floor(floor_unix_ms);
                            if trusted {
                                info!(worker = self.worker, floor_unix_ms, "worker id lease taken");
                            } else {
                                info!(
                                    worker = self.worker,
                                    floor_unix_ms,
                                    "worker id lease taken (untrusted mark: missing, or from \
                                     before a redis restart; ids wait a TTL unless held \
                                     throughout)"
                                );
                            }
                        }
                        LeaseState::Lost => {
                            lost = true;
                            warn!(
                                worker = self.worker,
                                "worker id lease held by another process: not issuing ids"
                            );
                            // Another process serves this worker id: keeping clients here
                            // (a hold begun while Redis was away) helps no one.
                            if let Some(h) = holding.take() {
                                h.abort();
                                let closed = fencing.clients.close_all_fenced();
                                warn!(closing = closed, "fenced: lease lost; closing clients");
                            }
                        }
                        LeaseState::Renewed => {}
                    }
                    decisions.extend(core.handle(Event::LeaseRound {
                        sent_at_ms: sent_at,
                        now_ms: now,
                        held: lease != LeaseState::Lost,
                        no_history: matches!(lease, LeaseState::Taken { trusted: false, .. }),
                    }));
                    decisions.extend(core.handle(Event::SourceInstance {
                        id: instance,
                        now_ms: now,
                    }));
                    decisions.extend(core.handle(Event::Snapshot(Snapshot {
                        epoch,
                        members: regs.iter().map(to_member).collect(),
                    })));
                    // Adopt every newer epoch, not only those that changed the ring: a node
                    // whose first snapshot after a Redis restart already holds its old member
                    // set (the others re-registered first) otherwise kept its old epoch while
                    // the cluster moved on (seen once in CI), and an address change with
                    // unchanged weights was never applied.
                    //
                    // Not while another process holds this worker id (a replacement started
                    // before the old node stopped, a twin): it would link to the peers as the
                    // same node id and supersede the holder's links over and over.
                    if core.epoch() > mesh.current_epoch() && lease != LeaseState::Lost {
                        mesh.apply(core.epoch(), core.ring(), &mesh_members(&core));
                    }
                }
                Err(e) => {
                    conn = None;
                    down = true;
                    decisions.extend(core.handle(Event::SourceDown { now_ms: now }));
                    debug!(error = %e, "membership round failed");
                }
            }
            gate.set_window(core.serve_from_ms(), core.lease_valid_until_ms());
            // A lease deadline reached just before a round that renewed it: fenced and
            // unfenced in one batch. Nothing to do with the clients then.
            let unfenced_at = decisions
                .iter()
                .rposition(|d| matches!(d, Decision::Unfenced { .. }));
            for (at, d) in decisions.into_iter().enumerate() {
                match d {
                    Decision::Fenced { epoch } if unfenced_at.is_some_and(|u| u > at) => {
                        debug!(epoch, "fenced and served again in one round: clients stay");
                    }
                    Decision::RingChanged {
                        epoch,
                        joined,
                        left,
                    } => info!(epoch, ?joined, ?left, "ring changed"),
                    Decision::KeepServing { epoch } => {
                        warn!(
                            epoch,
                            "redis unreachable: serving on the last ring while the lease lasts"
                        )
                    }
                    Decision::Fenced { epoch } => {
                        let silent = mesh.silent_peers(HOLD_WHILE_HEARD_WITHIN);
                        if (down || was_down) && !lost && silent.is_empty() {
                            warn!(
                                epoch,
                                "fenced: redis unreachable past the lease, every member still \
                                 heard; not issuing ids, keeping clients (requests refused \
                                 UNAVAILABLE) until the lease is back or a member goes silent"
                            );
                            if let Some(h) = holding.take() {
                                h.abort();
                            }
                            holding = Some(tokio::spawn(
                                release_when_a_member_goes_silent(
                                    mesh.clone(),
                                    fencing.clients.clone(),
                                    epoch,
                                )
                                .in_current_span(),
                            ));
                        } else {
                            let closed = fencing.clients.close_all_fenced();
                            warn!(
                                epoch,
                                closing = closed,
                                ?silent,
                                redis_down = down || was_down,
                                "fenced: worker-id lease lost; not issuing ids, closing clients"
                            );
                        }
                    }
                    Decision::Unfenced { epoch } => {
                        if let Some(h) = holding.take() {
                            h.abort();
                        }
                        info!(epoch, "lease held: serving")
                    }
                    Decision::ShrinkDeferred {
                        epoch,
                        missing,
                        until_ms,
                    } => info!(
                        epoch,
                        ?missing,
                        wait_ms = until_ms.saturating_sub(now),
                        "redis instance changed: keeping members that have not re-registered yet"
                    ),
                }
            }
        }
        if let Some(h) = holding.take() {
            h.abort();
        }
        // Graceful leave: drop the registration and the lease now.
        gate.set_valid_until(0);
        if let Some(c) = conn.as_mut() {
            // The gate is closed: nothing is stamped after now (or after the floor this
            // process counted on), so the next holder's floor can be that, not our deadline.
            let last = fencing.ids.last_unix_ms().max(now_unix_ms());
            let _ = redis::Script::new(RELEASE)
                .key(format!("{}:worker:{}", self.prefix, self.worker))
                .key(format!("{}:worker:{}:hw", self.prefix, self.worker))
                .key(format!("{}:node:{}", self.prefix, self.me.id))
                .key(format!("{}:nodes", self.prefix))
                .key(format!("{}:worker:{}:hw:run", self.prefix, self.worker))
                .arg(&token)
                .arg(last)
                .arg(self.me.id)
                .invoke_async::<i64>(c)
                .await;
            // Let the others see the change now.
            let _ = redis::Script::new(SNAPSHOT)
                .arg(&self.prefix)
                .arg(core.epoch())
                .invoke_async::<(u64, Vec<String>, String)>(c)
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
