//! The node's chat service: every request handler, independent of the transport.
//!
//! A connection task ([`crate::session`]) decodes frames and calls [`Node::handle`] with the
//! connection's verified identity; the handler validates, talks to storage, pushes events via
//! the [`Router`], and returns the reply body. Auth requests (`register`, `login`,
//! `authenticate`) are handled by [`Node::authenticate_request`] because they change the
//! connection's state.
//!
//! [`Node::handle`] dispatches by request family, one module each: `messages` (send, receipts,
//! history, the chat list), `events` (reactions, typing), `channels` (creation, membership,
//! roles, lists) and `directory` (users, homes, the cluster, contacts' presence). A chat
//! request handled here that changes something passes one shared step before any storage
//! read, `Node::rate_then_authorise`: the user's rate, then their membership of the chat it
//! names. (Password changes, logout and presence changes are the session's.)

use std::num::NonZeroU32;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use meshchat_backplane::lease::LeaseGate;
use meshchat_idgen::{ChannelId, ChatId, Generator, MessageId, UserId};
use meshchat_proto::client::{self as pb, ErrorCode, client_frame, push, server_frame};
use meshchat_storage::{Direction, NewMessage, PageQuery, ReceiptKind, Storage, StorageError};
use prost::Message as _;
use tracing::debug;

use crate::admission::{PasswordGate, PasswordLimits};
use crate::auth::{Auth, Identity};
use crate::config::{LimitsConfig, NodeConfig};
use crate::convert::{self, chat_from, chat_to, message_id};
use crate::error::RequestError;
use crate::members::MemberCache;
use crate::registry::{ConnId, Registry};
use crate::router::{Home, Router};

mod channels;
mod directory;
mod events;
mod messages;

/// Which of a user's rate limits a request counts against.
#[derive(Debug, Clone, Copy)]
pub(super) enum Rate {
    /// `limits.send_rate_per_sec` and `send_burst`: messages.
    Send,
    /// Twice the send quota: receipts, reactions, channel changes.
    Event,
    /// The typing limiter (`typing.rs`), per user.
    Typing,
}

/// Longest client message id accepted.
const MAX_CLIENT_MSG_ID: usize = 64;
/// Entries kept in the user-name cache before it is cleared (names never change).
const NAME_CACHE_MAX: usize = 1_000_000;
/// Bytes of the newest message's body shown in a chat-list row.
const CHAT_LIST_PREVIEW_BYTES: usize = 512;

/// Entries of a member or channel list page when the request leaves `limit` at 0.
const DEFAULT_LIST_PAGE: u32 = 500;
/// Most entries of a member or channel list page (a page is also cut to fit one frame).
const MAX_LIST_PAGE: u32 = 1_000;

/// The page size a list request asked for, defaulted and capped.
fn list_limit(asked: u32) -> u32 {
    match asked {
        0 => DEFAULT_LIST_PAGE,
        n => n.min(MAX_LIST_PAGE),
    }
}

/// Cuts a list page read with one row more than `limit` to at most `limit` rows whose
/// encoding fits `budget` bytes (always at least one row, which fits: list rows are small).
/// Returns the rows and the cursor of the next page: the id of the last row kept when rows
/// were left, else 0.
fn fit_page<T: prost::Message>(
    rows: Vec<T>,
    limit: u32,
    budget: usize,
    id: impl Fn(&T) -> u64,
) -> (Vec<T>, u64) {
    let read = rows.len();
    let mut used = 0usize;
    let mut kept = Vec::with_capacity(read.min(limit as usize));
    for row in rows {
        // The field tag and length prefix of a repeated message: at most 1 + 5 bytes.
        let len = row.encoded_len() + 6;
        if kept.len() == limit as usize || (used + len > budget && !kept.is_empty()) {
            break;
        }
        used += len;
        kept.push(row);
    }
    let next = if kept.len() < read {
        kept.last().map(&id).unwrap_or(0)
    } else {
        0
    };
    (kept, next)
}

/// What an authentication request led to.
#[derive(Debug)]
pub enum AuthOutcome {
    /// The connection is now this user's.
    Authenticated(Identity, pb::AuthOk),
    /// The user's home is another node: reconnect there with the token inside.
    Redirect(pb::Redirect),
}

/// The per-user rate limiters, built from `[limits]`.
struct Rates {
    /// Sends per user.
    send: DefaultKeyedRateLimiter<UserId>,
    /// Other mutating requests (receipts, reactions, joins, creates) per user.
    event: DefaultKeyedRateLimiter<UserId>,
}

impl Rates {
    fn new(l: &LimitsConfig) -> Self {
        let per_sec = NonZeroU32::new(l.send_rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.send_burst).unwrap_or(NonZeroU32::MIN);
        let two = NonZeroU32::MIN.saturating_add(1);
        Self {
            send: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
            // Receipts and reactions are cheaper than sends and come in bursts (one per read
            // message): twice the send quota.
            event: RateLimiter::keyed(
                Quota::per_second(per_sec.saturating_mul(two))
                    .allow_burst(burst.saturating_mul(two)),
            ),
        }
    }
}

/// The chat service of one node.
pub struct Node {
    pub(crate) config: NodeConfig,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) ids: Arc<Generator>,
    pub(crate) auth: Auth,
    pub(crate) registry: Arc<Registry>,
    pub(crate) router: Arc<dyn Router>,
    /// The limits in force: `config.limits` at start, replaced by [`Node::set_limits`] on a
    /// reload. Read once per request (and once per connection for per-connection bounds).
    limits: ArcSwap<LimitsConfig>,
    /// Per-user rates, rebuilt when a reload changes them.
    rates: ArcSwap<Rates>,
    names: DashMap<UserId, Arc<str>>,
    members: Arc<MemberCache>,
    /// Whether this process holds its Snowflake worker-id lease (always, in a static
    /// cluster). Without it the node is fenced: no ids, no authentication.
    lease: Arc<LeaseGate>,
    /// Admission of password attempts (rates per source and account, turns per source).
    passwords: PasswordGate,
    /// Requests read from 0-RTT early data: [served, refused TOO_EARLY].
    early: [std::sync::atomic::AtomicU64; 2],
    /// Which typing indicators are pushed (rates per user and chat).
    typing: crate::typing::TypingGate,
    /// Presence changes pushed to contacts (a user's cluster-wide state flipped), since start.
    presence_pushes: std::sync::atomic::AtomicU64,
    /// Presence ticks completed since start.
    presence_ticks: std::sync::atomic::AtomicU64,
    /// Bytes of requests being handled, all connections together.
    inflight_bytes: Arc<tokio::sync::Semaphore>,
    /// This node's metrics handle (`node` label).
    pub(crate) metrics: crate::metrics::NodeMetrics,
    /// Whether and how this node drains (Redis membership, or a static cluster's mesh).
    pub(crate) drain: Arc<crate::drain::Drain>,
    /// When the client-facing and the mesh certificate in use expire (Unix seconds; 0:
    /// unknown or none).
    cert_expiry: [std::sync::atomic::AtomicI64; 2],
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.config.node_id)
            .finish()
    }
}

/// Encodes a push event once, without its sequence number (each connection adds its own).
pub fn encode_push(event: push::Event) -> Bytes {
    Bytes::from(
        pb::Push {
            seq: 0,
            event: Some(event),
        }
        .encode_to_vec(),
    )
}

/// A user's presence on the wire.
fn presence_to(user: UserId, s: crate::presence::State) -> pb::PresenceState {
    pb::PresenceState {
        user_id: user.0,
        online: s.online,
        last_seen_unix_ms: s.last_seen_ms,
        changed_unix_ms: s.changed_ms,
    }
}

/// Checks a user or channel name: 1..=32 of `a-z 0-9 _ . -`, starting with a letter or digit.
pub fn valid_name(name: &str) -> Result<(), RequestError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(RequestError::InvalidArgument(format!(
            "name {:?} must be 1-32 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            crate::error::clip(name)
        )))
    }
}

impl Node {
    /// A node over `storage`, delivering through `router`.
    pub fn new(
        config: NodeConfig,
        storage: Arc<dyn Storage>,
        auth: Auth,
        registry: Arc<Registry>,
        router: Arc<dyn Router>,
        members: Arc<MemberCache>,
    ) -> Result<Self, RequestError> {
        let config_auth = config.auth.clone();
        let inflight_bytes = config.limits.max_inflight_bytes;
        let ids = Arc::new(
            Generator::new(config.worker_id())
                .map_err(|e| RequestError::Internal(e.to_string()))?,
        );
        Ok(Self {
            limits: ArcSwap::from_pointee(config.limits.clone()),
            rates: ArcSwap::from_pointee(Rates::new(&config.limits)),
            metrics: crate::metrics::NodeMetrics::new(config.node_id),
            drain: Arc::new(crate::drain::Drain::new(crate::drain::DrainVia::Nothing)),
            cert_expiry: Default::default(),
            config,
            storage,
            ids,
            auth,
            registry,
            router,
            names: DashMap::new(),
            members,
            lease: Arc::new(LeaseGate::unbounded()),
            inflight_bytes: Arc::new(tokio::sync::Semaphore::new(inflight_bytes)),
            typing: crate::typing::TypingGate::default(),
            presence_pushes: Default::default(),
            presence_ticks: Default::default(),
            early: Default::default(),
            passwords: PasswordGate::new(PasswordLimits {
                per_source_per_min: config_auth.attempts_per_source_per_min,
                source_burst: config_auth.attempts_per_source_burst,
                per_account_per_min: config_auth.logins_per_account_per_min,
                account_burst: config_auth.logins_per_account_burst,
                queue_wait: crate::auth::HASH_QUEUE_WAIT,
            }),
        })
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The connection registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The node's store (for inspection and tests).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Presence ticks completed since start (each one's pushes queued when it counts).
    pub fn presence_ticks(&self) -> u64 {
        self.presence_ticks
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Presence changes pushed to contacts since start (each queued when this counts it).
    pub fn presence_pushes(&self) -> u64 {
        self.presence_pushes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a request read from 0-RTT early data: served (replay-safe) or refused.
    pub(crate) fn early_request(&self, served: bool) {
        self.early[usize::from(!served)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.early_request(served);
    }

    /// Requests read from 0-RTT early data so far: (served, refused `TOO_EARLY`).
    pub fn early_requests(&self) -> (u64, u64) {
        let get = |i: usize| self.early[i].load(std::sync::atomic::Ordering::Relaxed);
        (get(0), get(1))
    }

    /// Drops rate-limiter state of users idle long enough to be back at a full burst.
    pub fn housekeeping(&self) {
        let rates = self.rates.load();
        for r in [&rates.send, &rates.event] {
            r.retain_recent();
            r.shrink_to_fit();
        }
        self.passwords.housekeeping();
        self.typing.housekeeping();
        self.registry.presence().housekeeping();
    }

    fn check_rate(
        limiter: &DefaultKeyedRateLimiter<UserId>,
        user: UserId,
    ) -> Result<(), RequestError> {
        limiter.check_key(&user).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            RequestError::RateLimited {
                retry_after_ms: wait.as_millis() as u64 + 1,
            }
        })
    }

    /// The step every chat request handled here that changes something takes before any
    /// storage read: the user's `rate` first (authorising reads storage, and a flood of
    /// requests about chats the user is not in must cost no more than requests about their
    /// own), then, when it names a `chat`, the user's membership of it (from storage, never
    /// the fan-out cache). Sends, receipts, reactions and typing call it once their arguments
    /// are parsed; channel requests call it first and authorise by role after it
    /// (`channels`). Refused here, the request changed nothing.
    pub(super) async fn rate_then_authorise(
        &self,
        me: &Identity,
        rate: Rate,
        chat: Option<ChatId>,
    ) -> Result<(), RequestError> {
        match rate {
            Rate::Send => Self::check_rate(&self.rates.load().send, me.user)?,
            Rate::Event => Self::check_rate(&self.rates.load().event, me.user)?,
            Rate::Typing => self.typing.check_user(me.user)?,
        }
        match chat {
            Some(chat) => self.require_member(me.user, chat).await,
            None => Ok(()),
        }
    }

    /// Drops the cached member list of `id` after a join or leave, here and on peers.
    fn members_changed(&self, id: ChannelId) {
        self.members.invalidate(id);
        self.router.channel_changed(id);
    }

    /// Bytes a reply body may use so the whole frame stays under `max_frame_bytes`.
    fn reply_budget(&self) -> usize {
        (self.config.limits.max_frame_bytes as usize).saturating_sub(1024)
    }

    /// Records when the certificates in use expire (Unix seconds), at start and on a reload;
    /// warns when one has less than 30 days left.
    pub fn set_cert_expiry(&self, client: Option<i64>, mesh: Option<i64>) {
        let now = crate::auth::now_secs() as i64;
        for (slot, (which, at)) in self
            .cert_expiry
            .iter()
            .zip([("client", client), ("mesh", mesh)])
        {
            slot.store(at.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
            if let Some(at) = at
                && at - now < 30 * 86_400
            {
                tracing::warn!(
                    cert = which,
                    days_left = (at - now) / 86_400,
                    "certificate expires soon: renew it (meshchat-node certs --renew) and reload"
                );
            }
        }
    }

    /// When the client-facing and the mesh certificate expire (Unix seconds), if known.
    pub fn cert_expiry(&self) -> [(&'static str, Option<i64>); 2] {
        let read = |i: usize| {
            Some(self.cert_expiry[i].load(std::sync::atomic::Ordering::Relaxed)).filter(|&t| t != 0)
        };
        [("client", read(0)), ("mesh", read(1))]
    }

    /// The limits in force (the config's at start, or the last reload's), for a short read
    /// (no shared reference count is touched).
    pub fn limits(&self) -> arc_swap::Guard<Arc<LimitsConfig>> {
        self.limits.load()
    }

    /// The limits in force, to keep (a connection's bounds for its lifetime).
    pub fn limits_snapshot(&self) -> Arc<LimitsConfig> {
        self.limits.load_full()
    }

    /// Applies reloaded limits: requests from now on see them; per-connection bounds
    /// (outbound queue, requests in flight, timeouts) apply to connections made from now on.
    /// New per-user rates start with full buckets. The caller keeps `max_frame_bytes` as it
    /// runs (connected clients read with it: `crate::reload` reports a change to it as
    /// needing a restart).
    pub fn set_limits(&self, new: LimitsConfig) {
        let new = Arc::new(new);
        let old = self.limits.swap(new.clone());
        if (old.send_rate_per_sec, old.send_burst) != (new.send_rate_per_sec, new.send_burst) {
            self.rates.store(Arc::new(Rates::new(&new)));
        }
        crate::admission::resize(
            &self.inflight_bytes,
            old.max_inflight_bytes,
            new.max_inflight_bytes,
        );
    }

    /// Lets the node drain through its Redis membership (which claims and publishes it) or
    /// its static cluster's mesh (which tells every peer).
    pub fn set_drain(&mut self, via: crate::drain::DrainVia) {
        self.drain = Arc::new(crate::drain::Drain::new(via));
    }

    /// The node's drain state.
    pub fn drain(&self) -> &Arc<crate::drain::Drain> {
        &self.drain
    }

    /// Replaces the lease gate (the Redis membership driver's, closed until its first round).
    pub fn set_lease_gate(&mut self, gate: Arc<LeaseGate>) {
        self.lease = gate;
    }

    /// The id generator (the membership driver raises its floor on taking over a worker id).
    pub fn id_generator(&self) -> Arc<Generator> {
        self.ids.clone()
    }

    /// The lease gate the membership driver keeps.
    pub fn lease_gate(&self) -> &Arc<LeaseGate> {
        &self.lease
    }

    /// Refuses while the node is fenced (its worker-id lease ran out or is another's).
    fn check_fence(&self) -> Result<(), RequestError> {
        if self.lease.allows() {
            Ok(())
        } else {
            Err(RequestError::Fenced)
        }
    }

    fn next_id(&self) -> Result<u64, RequestError> {
        self.check_fence()?;
        self.ids
            .next_id()
            .map(|s| s.0)
            .map_err(|e| RequestError::Overloaded(format!("id generator: {e}")))
    }

    /// The `HelloOk` this node answers with.
    pub fn hello_ok(&self) -> pb::HelloOk {
        let l = self.limits();
        pb::HelloOk {
            protocol_version: meshchat_proto::PROTOCOL_VERSION,
            node_id: self.config.node_id,
            ring_epoch: self.router.epoch(),
            max_frame_bytes: l.max_frame_bytes,
            max_body_bytes: l.max_body_bytes,
            max_page_size: l.max_page_size,
        }
    }

    /// Handles register / login / authenticate from a client at `source`: the identity the
    /// connection now has, or a redirect (with a fresh token) when the user's home is another
    /// node. Password attempts pass the [`PasswordGate`] before any hashing.
    pub async fn authenticate_request(
        &self,
        body: client_frame::Body,
        source: std::net::IpAddr,
    ) -> Result<AuthOutcome, RequestError> {
        self.check_fence()?;
        // The login's time is taken before the credentials are read: a password change that
        // lands while this login is checked signs it out (its floor is later than this).
        let login_ms = crate::auth::now_ms();
        let identity = match body {
            client_frame::Body::Register(r) => {
                valid_name(&r.user_name)?;
                if r.password.len() < 8 || r.password.len() > 1024 {
                    return Err(RequestError::InvalidArgument(
                        "password must be 8 to 1024 bytes".into(),
                    ));
                }
                let _turn = self.passwords.admit(source, None).await?;
                if self.storage.user_by_name(&r.user_name).await?.is_some() {
                    return Err(StorageError::UserExists(r.user_name).into());
                }
                let hash = self.auth.hash_password(r.password).await?;
                let id = UserId(self.next_id()?);
                let user = self.storage.create_user(id, &r.user_name, &hash).await?;
                Identity {
                    user: user.id,
                    name: user.name,
                    auth_time_ms: login_ms,
                }
            }
            client_frame::Body::Login(l) => {
                // A name that cannot exist is no account to protect, and must not become a
                // limiter key of any length: the source's limit alone applies to it.
                let account = valid_name(&l.user_name)
                    .is_ok()
                    .then_some(l.user_name.as_str());
                let _turn = self.passwords.admit(source, account).await?;
                let Some(creds) = self.storage.user_by_name(&l.user_name).await? else {
                    // Same answer, and the same hashing time, as a wrong password: neither
                    // reveals which names exist.
                    self.auth.verify_against_nothing(l.password).await?;
                    return Err(RequestError::BadCredentials);
                };
                if !self
                    .auth
                    .verify_password(l.password, creds.password_hash)
                    .await?
                {
                    return Err(RequestError::BadCredentials);
                }
                Identity {
                    user: creds.user.id,
                    name: creds.user.name,
                    auth_time_ms: login_ms,
                }
            }
            client_frame::Body::Authenticate(a) => self.verify_token(&a.token).await?,
            _ => return Err(RequestError::UnknownRequest),
        };
        // A password proves the user now; a token carries its login's time, and the fresh
        // token never outlives that login's hard end.
        let (token, expires_unix_ms) = self.auth.refresh(&identity)?;
        self.names
            .insert(identity.user, Arc::from(identity.name.as_str()));
        if let Home::Remote { node, addr, epoch } = self.router.home(identity.user) {
            return Ok(AuthOutcome::Redirect(pb::Redirect {
                node_id: node.0,
                address: addr,
                ring_epoch: epoch,
                token,
            }));
        }
        let ok = pb::AuthOk {
            user_id: identity.user.0,
            user_name: identity.name.clone(),
            token,
            expires_unix_ms,
        };
        Ok(AuthOutcome::Authenticated(identity, ok))
    }

    /// Takes `bytes` of the node's budget of request bytes in progress, for as long as the
    /// permit lives; `OVERLOADED` when the node is handling that much already.
    pub fn admit_request(
        &self,
        bytes: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, RequestError> {
        let n = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        self.inflight_bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                RequestError::Overloaded(
                    "this node is handling too many request bytes at once; retry".into(),
                )
            })
    }

    /// Handles `Authenticate` on a connection authenticated as `me`: with a valid token of the
    /// same user, a fresh token (never past its login's hard end) and the identity the
    /// connection has from now on; another user's token is refused (`INVALID_ARGUMENT`).
    pub async fn refresh_request(
        &self,
        me: &Identity,
        token: &str,
    ) -> Result<(Identity, pb::AuthOk), RequestError> {
        let who = self.verify_token(token).await?;
        if who.user != me.user {
            return Err(RequestError::AlreadyAuthenticated);
        }
        let (token, expires_unix_ms) = self.auth.refresh(&who)?;
        let ok = pb::AuthOk {
            user_id: who.user.0,
            user_name: who.name.clone(),
            token,
            expires_unix_ms,
        };
        Ok((who, ok))
    }

    /// Checks a token, and that its login was not signed out since (log out everywhere, a
    /// password change): one storage read per authentication, none per request.
    async fn verify_token(&self, token: &str) -> Result<Identity, RequestError> {
        let who = self.auth.verify(token)?;
        if who.auth_time_ms < self.storage.signed_out_before(who.user).await? {
            return Err(RequestError::TokenExpired);
        }
        Ok(who)
    }

    fn auth_ok(&self, who: &Identity) -> Result<pb::AuthOk, RequestError> {
        let (token, expires_unix_ms) = self.auth.refresh(who)?;
        Ok(pb::AuthOk {
            user_id: who.user.0,
            user_name: who.name.clone(),
            token,
            expires_unix_ms,
        })
    }

    /// Handles `ChangePassword` on connection `conn` of `me`, from `source`: the identity the
    /// connection has from now on and its `AuthOk`. Every earlier login is signed out and the
    /// user's other connections here are closed.
    pub async fn change_password(
        &self,
        me: &Identity,
        conn: ConnId,
        source: std::net::IpAddr,
        c: pb::ChangePassword,
    ) -> Result<(Identity, pb::AuthOk), RequestError> {
        self.check_fence()?;
        if c.new_password.len() < 8 || c.new_password.len() > 1024 {
            return Err(RequestError::InvalidArgument(
                "new_password must be 8 to 1024 bytes".into(),
            ));
        }
        // A guess at the old password is a login attempt: the same limits.
        let _turn = self.passwords.admit(source, Some(&me.name)).await?;
        let Some(creds) = self.storage.user_by_name(&me.name).await? else {
            return Err(RequestError::UnknownUser(me.name.clone()));
        };
        if creds.user.id != me.user
            || !self
                .auth
                .verify_password(c.old_password, creds.password_hash.clone())
                .await?
        {
            return Err(RequestError::BadCredentials);
        }
        let hash = self.auth.hash_password(c.new_password).await?;
        // Sign out first: if what follows fails, earlier logins are out anyway (this one
        // included), which fails safe.
        let now = crate::auth::now_ms();
        self.storage.sign_out_before(me.user, now).await?;
        if !self
            .storage
            .set_password_hash(me.user, &me.name, &creds.password_hash, &hash)
            .await?
        {
            // Another change from the same old password won.
            return Err(RequestError::BadCredentials);
        }
        self.registry.sign_out(
            me.user,
            now,
            Some(conn),
            ErrorCode::TokenExpired,
            b"signed out: the password changed",
        );
        // Never below the floor (a sign-out everywhere in this millisecond, a clock behind):
        // this connection's fresh token must stay valid.
        let floor = self.storage.signed_out_before(me.user).await?;
        let who = Identity {
            user: me.user,
            name: me.name.clone(),
            auth_time_ms: now.max(floor),
        };
        let ok = self.auth_ok(&who)?;
        Ok((who, ok))
    }

    /// Handles `Logout` on connection `conn` of `me`: with `everywhere`, signs out every login
    /// made up to now and closes the user's other connections here. The caller closes `conn`.
    pub async fn logout(
        &self,
        me: &Identity,
        conn: ConnId,
        everywhere: bool,
    ) -> Result<(), RequestError> {
        if everywhere {
            // Every login up to this millisecond, this connection's included.
            let at = crate::auth::now_ms() + 1;
            self.storage.sign_out_before(me.user, at).await?;
            self.registry.sign_out(
                me.user,
                at,
                Some(conn),
                ErrorCode::TokenExpired,
                b"signed out everywhere",
            );
        }
        Ok(())
    }

    /// Handles one request of an authenticated connection.
    pub async fn handle(
        self: Arc<Self>,
        me: Arc<Identity>,
        conn: ConnId,
        body: client_frame::Body,
    ) -> Result<server_frame::Body, RequestError> {
        use client_frame::Body as B;
        use server_frame::Body as R;
        match body {
            B::Send(s) => self.send(&me, conn, s).await.map(R::Processed),
            B::Receipt(r) => self
                .receipt(&me, conn, r)
                .await
                .map(|()| R::Done(pb::Done {})),
            B::React(r) => self.react(&me, conn, r).await,
            B::Unreact(r) => self.unreact(&me, conn, r).await,
            B::Typing(t) => self.typing(&me, t).await,
            B::History(q) => self.history(&me, q).await.map(R::HistoryPage),
            B::ChatList(_) => self.chat_list(&me).await.map(R::ChatList),
            B::ChannelCreate(c) => self.channel_create(&me, c).await,
            B::ChannelJoin(j) => self.channel_join(&me, j).await,
            B::ChannelLeave(l) => self.channel_leave(&me, conn, l).await,
            B::ChannelAdd(a) => self.channel_add(&me, a).await,
            B::ChannelRemove(r) => self.channel_remove(&me, r).await,
            B::ChannelSetAdmin(a) => self.channel_set_admin(&me, a).await,
            B::ChannelList(q) => self.channel_list(&me, q).await,
            B::ChannelMembers(m) => self.channel_members(&me, m).await,
            B::ResolveUser(r) => self.resolve_user(r).await,
            B::WhereIs(w) => self.where_is(w).await,
            B::Cluster(_) => self.cluster().await,
            B::Ping(p) => Ok(R::Pong(pb::Pong { nonce: p.nonce })),
            // The session handles these itself (Hello at any time; the others change the
            // connection).
            B::Hello(_) | B::ChangePassword(_) | B::Logout(_) | B::SetPresence(_) => Err(
                RequestError::Internal("session request reached the request handler".into()),
            ),
            B::Presence(_) => self.presence_of_contacts(&me).await.map(R::Presence),
            B::Register(_) | B::Login(_) | B::Authenticate(_) => {
                Err(RequestError::AlreadyAuthenticated)
            }
            B::PushAck(_) => Ok(R::Done(pb::Done {})),
        }
    }

    async fn name_of(&self, user: UserId) -> Result<Arc<str>, RequestError> {
        if let Some(n) = self.names.get(&user) {
            return Ok(n.clone());
        }
        // Only users that exist are cached (users are never deleted): an id unknown now may
        // be registered a moment later.
        let name: Arc<str> = match self.storage.user_by_id(user).await? {
            Some(u) => Arc::from(u.name.as_str()),
            None => return Ok(Arc::from("")),
        };
        if self.names.len() >= NAME_CACHE_MAX {
            self.names.clear();
        }
        self.names.insert(user, name.clone());
        Ok(name)
    }

    async fn require_member(&self, user: UserId, chat: ChatId) -> Result<(), RequestError> {
        let ok = match chat {
            ChatId::Direct { .. } => {
                if !chat.is_direct_member(user) {
                    false
                } else {
                    let peer = chat.peer_of(user).unwrap_or(user);
                    // From the name cache when it can: a storage read per 1:1 message was a
                    // blocking-pool round trip per send (the load test's profile).
                    if self.name_of(peer).await?.is_empty() {
                        return Err(RequestError::UnknownUser(peer.to_string()));
                    }
                    true
                }
            }
            ChatId::Channel(c) => {
                // Authoritative: storage, not the fan-out cache.
                if self.storage.is_member(user, chat).await? {
                    true
                } else if self.storage.channel(c).await?.is_none() {
                    return Err(StorageError::UnknownChannel(c).into());
                } else {
                    false
                }
            }
        };
        if ok {
            Ok(())
        } else {
            Err(RequestError::Forbidden(format!(
                "you are not a member of {chat}"
            )))
        }
    }

    /// Publishes the presence changes of this node's users that are due (see
    /// [`crate::presence`]) into the cluster view and to every peer; then pushes, to their
    /// contacts, the current state of each user homed here whose cluster-wide state flipped
    /// since the last tick, whatever flipped it (this node's change, a peer's, a node that
    /// left): one push each, through the router (one `Deliver` per node). Call every
    /// [`crate::presence::TICK`]; a tick's pushes are queued before the next tick starts, so
    /// a user's pushes reach their contacts in order.
    pub async fn presence_tick(&self) {
        use futures::StreamExt as _;
        let changes = self.registry.presence_due(std::time::Instant::now());
        let book = self.registry.presence();
        if !changes.is_empty() {
            let me = meshchat_idgen::NodeId(self.config.node_id);
            for c in &changes {
                book.apply(me, c);
            }
            self.router.presence_changed(&changes);
        }
        // Users homed elsewhere are their home's to push; past the per-tick bound, the rest
        // wait for the next ticks.
        let mut flips: Vec<UserId> = book
            .take_flipped()
            .into_iter()
            .filter(|u| matches!(self.router.home(*u), Home::Local))
            .collect();
        if flips.len() > crate::presence::MAX_PUSHES_PER_TICK {
            for u in flips.split_off(crate::presence::MAX_PUSHES_PER_TICK) {
                book.reflip(u);
            }
        }
        self.metrics.presence_changes(changes.len(), flips.len());
        // The first failed read stops this tick's reads: the store is likely down, and the
        // users wait for the next tick rather than each costing a failed read.
        let failed = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(flips)
            .for_each_concurrent(16, |user| {
                let failed = &failed;
                async move {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        book.reflip(user);
                        return;
                    }
                    match self.storage.direct_peers(user).await {
                        Ok(mut contacts) => {
                            contacts.truncate(crate::presence::MAX_FANOUT);
                            // The state now: a flip and its undo within one tick push it once.
                            let state = book.state(user);
                            let push = encode_push(push::Event::Presence(pb::PresenceEvent {
                                users: vec![presence_to(user, state)],
                            }));
                            self.router.deliver(&contacts, &push, None);
                            self.presence_pushes
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            // Retried at the next tick.
                            book.reflip(user);
                            if !failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::warn!(user = user.0, error = %e, "presence pushes wait: contacts unreadable");
                            }
                        }
                    }
                }
            })
            .await;
        self.presence_ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs [`Node::presence_tick`] every [`crate::presence::TICK`] until `stop`.
    pub async fn presence_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(crate::presence::TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => self.presence_tick().await,
            }
        }
    }
}
