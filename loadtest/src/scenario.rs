//! Traffic: the `direct`, `channel` and `reconnect` scenarios, as open-loop generators.
//!
//! A generator issues messages on a fixed schedule (R per second, checked every
//! millisecond) whether or not earlier ones were acked, so a slow node shows up as latency
//! and as `generator_skipped` (sends not started because `max_inflight` were already in
//! flight), never as a quietly lower rate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meshchat_idgen::{ChannelId, ChatId, UserId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::warn;

use crate::fleet::Fleet;
use crate::tracker::{self, Counters, Tracker};

/// A scenario, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Hold the connections.
    Idle,
    /// 1:1 messages between random users (cross-node included).
    Direct,
    /// Channel messages, members spread over the nodes.
    Channel,
    /// Drop and re-establish a share of the connections, again and again.
    Reconnect,
    /// Direct + channel + reconnect.
    Mixed,
}

/// The scenarios to run, with `mixed` expanded.
pub fn expand(list: &[Scenario]) -> BTreeSet<Scenario> {
    let mut s = BTreeSet::new();
    for &x in list {
        if x == Scenario::Mixed {
            s.extend([Scenario::Direct, Scenario::Channel, Scenario::Reconnect]);
        } else {
            s.insert(x);
        }
    }
    if s.is_empty() {
        s.insert(Scenario::Idle);
    }
    s
}

/// Traffic settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Traffic {
    /// 1:1 messages per second (`direct`).
    pub direct_rate: f64,
    /// Channel messages per second (`channel`).
    pub channel_rate: f64,
    /// Channels to create (`channel`).
    pub channels: usize,
    /// Members per channel.
    pub channel_size: usize,
    /// Share of connections dropped and re-established per round (`reconnect`).
    pub reconnect_share: f64,
    /// Seconds between reconnect rounds.
    pub reconnect_every_secs: f64,
    /// Contacts per user in `direct`: each user writes to a fixed set of this many others,
    /// so chats repeat as they do in real use (0: any user, every message a new chat).
    pub contacts: usize,
    /// Message body size in bytes.
    pub body_bytes: usize,
    /// Sends in flight at once, per generator.
    pub max_inflight: usize,
    /// Seed of the random choices (same seed, same choices).
    pub seed: u64,
}

/// A channel made for the run.
#[derive(Debug, Clone)]
pub struct Channel {
    /// Its id.
    pub id: ChannelId,
    /// Fleet slots of its members.
    pub members: Vec<usize>,
}

/// Creates `t.channels` channels of `t.channel_size` random members among `live` slots:
/// the first member creates it, the rest join by name. Returns the channels that were made.
pub async fn setup_channels(
    fleet: &Arc<Fleet>,
    live: &[usize],
    t: &Traffic,
    tag: &str,
) -> Vec<Channel> {
    let mut rng = StdRng::seed_from_u64(t.seed ^ 0xC4A7);
    let size = t.channel_size.clamp(2, live.len().max(2));
    let mut out = Vec::new();
    if live.len() < 2 {
        return out;
    }
    let gate = Arc::new(Semaphore::new(64));
    for k in 0..t.channels {
        let mut members = BTreeSet::new();
        while members.len() < size.min(live.len()) {
            members.insert(live[rng.random_range(0..live.len())]);
        }
        let members: Vec<usize> = members.into_iter().collect();
        let name = format!("lt-{tag}-{k}");
        let Some(owner) = fleet.client(members[0]) else {
            continue;
        };
        let id = match owner.channel_create(&name).await {
            Ok(info) => ChannelId(info.channel_id),
            Err(e) => {
                fleet.note_error("channel create", &e);
                continue;
            }
        };
        let mut joins = JoinSet::new();
        for &m in &members[1..] {
            let (fleet, name, gate) = (fleet.clone(), name.clone(), gate.clone());
            joins.spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                let c = fleet.client(m)?;
                match c.channel_join(&name).await {
                    Ok(_) => Some(m),
                    Err(e) => {
                        fleet.note_error("channel join", &e);
                        None
                    }
                }
            });
        }
        let mut joined = vec![members[0]];
        while let Some(r) = joins.join_next().await {
            if let Ok(Some(m)) = r {
                joined.push(m);
            }
        }
        out.push(Channel {
            id,
            members: joined,
        });
    }
    out
}

/// One message to send: who sends it, where, and who must receive it.
struct Pick {
    sender: usize,
    chat: ChatId,
    recipients: Vec<UserId>,
}

/// Runs an open-loop generator at `rate` messages per second until `until`.
async fn generate(
    fleet: Arc<Fleet>,
    tracker: Arc<Tracker>,
    rate: f64,
    until: Instant,
    t: Traffic,
    mut pick: impl FnMut(&mut StdRng) -> Option<Pick> + Send + 'static,
    seed: u64,
) {
    if rate <= 0.0 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let gate = Arc::new(Semaphore::new(t.max_inflight.max(1)));
    let start = Instant::now();
    let mut issued: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= until {
            break;
        }
        let due = (rate * (now - start).as_secs_f64()) as u64;
        while issued < due {
            issued += 1;
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                Counters::inc(&tracker.counters.generator_skipped);
                continue;
            };
            let Some(p) = pick(&mut rng) else {
                continue;
            };
            let Some(client) = fleet.client(p.sender) else {
                continue;
            };
            let nonce = tracker.register(fleet.user(p.sender), p.recipients);
            let body = tracker::body(nonce, t.body_bytes);
            let (tracker, fleet) = (tracker.clone(), fleet.clone());
            tokio::spawn(async move {
                match client.send(p.chat, body, None).await {
                    Ok(ack) => tracker.acked(nonce, ack.message_id),
                    Err(e) => {
                        tracker.failed(nonce);
                        fleet.note_error("send", &e);
                    }
                }
                drop(permit);
            });
        }
    }
}

/// A flood (the chaos fault `flood:K`): each of `flooders` sends `per_user_rate` messages
/// per second, to random users of `live`, for `dur`. Each send is tried once on the
/// flooder's current connection, without the client library's retries (an abusive client
/// does not back off). Accepted messages are tracked like any other (they must be
/// delivered); refused ones are counted by the flood counters, not as failed sends.
#[allow(clippy::too_many_arguments)]
pub async fn flood(
    fleet: Arc<Fleet>,
    tracker: Arc<Tracker>,
    flooders: Vec<usize>,
    live: Arc<Vec<usize>>,
    per_user_rate: f64,
    dur: Duration,
    body_bytes: usize,
    seed: u64,
) {
    use meshchat_proto::client::{self as pb, ErrorCode, client_frame, server_frame};
    if flooders.is_empty() || live.len() < 2 || per_user_rate <= 0.0 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    // In flight at once: a refusal is cheap and quick, so this bound is only reached when
    // the node stops answering.
    let gate = Arc::new(Semaphore::new(4_096));
    let rate = per_user_rate * flooders.len() as f64;
    let start = Instant::now();
    let until = start + dur;
    let mut issued: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let c = &tracker.counters;
    while Instant::now() < until {
        tick.tick().await;
        let due = (rate * start.elapsed().as_secs_f64()) as u64;
        while issued < due {
            let s = flooders[(issued % flooders.len() as u64) as usize];
            issued += 1;
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                Counters::inc(&c.flood_skipped);
                continue;
            };
            let mut r = live[rng.random_range(0..live.len())];
            while r == s {
                r = live[rng.random_range(0..live.len())];
            }
            let Some(client) = fleet.client(s) else {
                Counters::inc(&c.flood_skipped);
                continue;
            };
            let (su, ru) = (fleet.user(s), fleet.user(r));
            let nonce = tracker.register(su, vec![ru]);
            let req = client_frame::Body::Send(pb::SendMessage {
                client_msg_id: format!("flood-{nonce}"),
                chat: Some(meshchat_proto::ids::chat_to_wire(ChatId::direct(su, ru))),
                body: tracker::body(nonce, body_bytes).into(),
                reply_to: 0,
            });
            Counters::inc(&c.flood_sent);
            let (tracker, fleet) = (tracker.clone(), fleet.clone());
            tokio::spawn(async move {
                let c = &tracker.counters;
                match client.request(req).await {
                    Ok(server_frame::Body::Processed(p)) => {
                        Counters::inc(&c.flood_acked);
                        tracker.acked(nonce, p.message_id);
                    }
                    Err(e) if e.code() == Some(ErrorCode::RateLimited) => {
                        Counters::inc(&c.flood_rate_limited);
                        tracker.refused(nonce);
                    }
                    other => {
                        Counters::inc(&c.flood_failed);
                        tracker.refused(nonce);
                        match other {
                            Err(e) => fleet.note_error("flood send", &e),
                            Ok(b) => fleet.note_error("flood send", &format!("{b:?}")),
                        }
                    }
                }
                drop(permit);
            });
        }
    }
}

/// What the generators work on.
#[derive(Debug, Clone)]
pub struct World {
    /// The connections.
    pub fleet: Arc<Fleet>,
    /// Where results go.
    pub tracker: Arc<Tracker>,
    /// Slots that are connected.
    pub live: Arc<Vec<usize>>,
    /// Channels made for the run.
    pub channels: Arc<Vec<Channel>>,
}

/// Starts the generators of `scenarios` on `set`; they stop by themselves at `until`.
pub fn start(
    set: &mut JoinSet<()>,
    scenarios: &BTreeSet<Scenario>,
    w: World,
    t: &Traffic,
    until: Instant,
) {
    let World {
        fleet,
        tracker,
        live,
        channels,
    } = w;
    let (fleet, tracker) = (&fleet, &tracker);
    if scenarios.contains(&Scenario::Direct) && live.len() >= 2 {
        let (fleet2, live) = (fleet.clone(), live.clone());
        // Contact k of the user at position p is the user at p + offsets[k] (mod n).
        let n = live.len();
        let mut orng = StdRng::seed_from_u64(t.seed ^ 0xC0_47AC);
        let offsets: Vec<usize> = (0..t.contacts.min(n - 1))
            .map(|_| orng.random_range(1..n))
            .collect();
        let pick = move |rng: &mut StdRng| {
            let p = rng.random_range(0..n);
            let s = live[p];
            let r = if offsets.is_empty() {
                let mut r = live[rng.random_range(0..n)];
                while r == s {
                    r = live[rng.random_range(0..n)];
                }
                r
            } else {
                live[(p + offsets[rng.random_range(0..offsets.len())]) % n]
            };
            let (su, ru) = (fleet2.user(s), fleet2.user(r));
            Some(Pick {
                sender: s,
                chat: ChatId::direct(su, ru),
                recipients: vec![ru],
            })
        };
        set.spawn(generate(
            fleet.clone(),
            tracker.clone(),
            t.direct_rate,
            until,
            t.clone(),
            pick,
            t.seed,
        ));
    }
    if scenarios.contains(&Scenario::Channel) && !channels.is_empty() {
        let fleet2 = fleet.clone();
        let pick = move |rng: &mut StdRng| {
            let ch = &channels[rng.random_range(0..channels.len())];
            if ch.members.len() < 2 {
                return None;
            }
            let s = ch.members[rng.random_range(0..ch.members.len())];
            Some(Pick {
                sender: s,
                chat: ChatId::Channel(ch.id),
                recipients: ch
                    .members
                    .iter()
                    .filter(|&&m| m != s)
                    .map(|&m| fleet2.user(m))
                    .collect(),
            })
        };
        set.spawn(generate(
            fleet.clone(),
            tracker.clone(),
            t.channel_rate,
            until,
            t.clone(),
            pick,
            t.seed.wrapping_add(1),
        ));
    }
    if scenarios.contains(&Scenario::Reconnect) && !live.is_empty() {
        let fleet = fleet.clone();
        let t = t.clone();
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(t.seed.wrapping_add(2));
            let every = Duration::from_secs_f64(t.reconnect_every_secs.max(0.1));
            let gate = Arc::new(Semaphore::new(256));
            let mut round = JoinSet::new();
            loop {
                tokio::time::sleep(every).await;
                if Instant::now() + Duration::from_secs(1) >= until {
                    break;
                }
                let k = ((live.len() as f64) * t.reconnect_share).ceil() as usize;
                for _ in 0..k.min(live.len()) {
                    let i = live[rng.random_range(0..live.len())];
                    let (fleet, gate) = (fleet.clone(), gate.clone());
                    round.spawn(async move {
                        let Ok(_permit) = gate.acquire_owned().await else {
                            return;
                        };
                        fleet.reconnect(i).await;
                    });
                }
                while round.try_join_next().is_some() {}
            }
            if tokio::time::timeout(Duration::from_secs(30), async {
                while round.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                warn!("reconnects still running 30 s after the run");
            }
        });
    }
}
