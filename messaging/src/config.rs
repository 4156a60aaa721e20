//! Node configuration: plain data with documented defaults, read from a TOML file, then
//! `MESHCHAT_*` environment variables, then command-line flags (each overriding the last).
//!
//! Environment variables use `__` for nesting: `MESHCHAT_LIMITS__MAX_BODY_BYTES=8192`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use meshchat_storage::cassandra::consistency as scylla_consistency;
use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment did not parse.
    #[error("configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value is out of range.
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs to start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster (default 1).
    pub node_id: u32,
    /// Snowflake worker id (0..=1023). Default: `node_id % 1024`. With Redis membership it
    /// is leased instead (issue 5).
    pub worker_id: Option<u16>,
    /// UDP address the client endpoint binds (default `127.0.0.1:7400`). Port 0 binds any free
    /// port. An unspecified address (`0.0.0.0`, `[::]`) needs `advertise`.
    pub listen: SocketAddr,
    /// Address clients are told to dial for this node, `host:port` (redirects, `WhereIs`,
    /// Redis registration, the development certificate's name). Default: the listen address,
    /// with the port actually bound when it is 0. Required when `listen` is unspecified: a
    /// redirect to `0.0.0.0` sends the client to itself.
    pub advertise: Option<String>,
    /// Directory for the embedded store, the dev CA and the dev token key.
    pub data_dir: PathBuf,
    /// TLS material.
    pub tls: TlsConfig,
    /// Token settings.
    pub auth: AuthConfig,
    /// Bounds on everything a client can make the node hold or do.
    pub limits: LimitsConfig,
    /// QUIC transport sizing.
    pub transport: TransportSettings,
    /// How long a graceful shutdown may take before connections are cut (default 10 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The cluster this node belongs to. Without members, the node is alone and homes every
    /// user.
    pub cluster: ClusterConfig,
    /// Where state and history live.
    pub storage: StorageSettings,
    /// The admin HTTP listener (`/healthz`, `/readyz`, `/metrics`, `/cluster`).
    pub admin: AdminConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// The node's async runtime.
    pub runtime: RuntimeConfig,
}

/// `[log]`: how the node logs (to stderr; journald under systemd).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default: human lines) or `json` (one JSON object per line, with the span
    /// fields: node, conn, peer, ...).
    pub format: LogFormat,
    /// A `tracing` filter, as `RUST_LOG` takes it (default `info`; for example
    /// `info,meshchat_backplane=debug`). `RUST_LOG`, when set, wins at start. Re-read from
    /// the config file on SIGHUP.
    pub level: String,
    /// OTLP/HTTP endpoint the node's spans are exported to (protobuf over plain HTTP), for
    /// example `http://127.0.0.1:4318/v1/traces` (an OpenTelemetry Collector, Jaeger or
    /// Tempo; use a collector on the host or a private network: no TLS here). A URL with no
    /// path (`http://127.0.0.1:4318`) gets `/v1/traces`. Unset (the
    /// default): no export. Spans pass the same `level` filter as log lines.
    pub otlp_endpoint: Option<String>,
    /// Share of traces exported, 0.0..=1.0 (default 0.05). A trace is a request under its
    /// own `conn` span on the endpoint loop (the default), a whole connection with its
    /// requests on quinn's endpoint: kept or dropped together.
    pub otlp_sample_ratio: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            otlp_endpoint: None,
            otlp_sample_ratio: 0.05,
        }
    }
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[admin]`: the node's HTTP listener for operators and Prometheus (docs/OPERATIONS.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// TCP address of the admin listener, for example `127.0.0.1:9400`. Unset (the default):
    /// no listener. It has no authentication: keep it on loopback or a management network.
    /// Port 0 binds any free port (tests).
    pub listen: Option<SocketAddr>,
}

/// Which storage backend the node uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded SQLite store in `data_dir` (default).
    #[default]
    Embedded,
    /// Cassandra / ScyllaDB (`[storage.cassandra]`).
    Cassandra,
}

/// `[storage]`: the backend and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// `embedded` (default) or `cassandra`.
    pub backend: Backend,
    /// Cassandra / ScyllaDB settings (used when `backend = "cassandra"`).
    pub cassandra: CassandraSettings,
}

/// `[storage.cassandra]`, mapped onto `meshchat_storage::cassandra::CassandraConfig`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CassandraSettings {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace (default "meshchat").
    pub keyspace: String,
    /// Local datacenter (token- and DC-aware routing prefers it).
    pub local_dc: Option<String>,
    /// `local_quorum` (default), `quorum`, `local_one`, `one`, `all`, `each_quorum`.
    pub consistency: String,
    /// Per-request timeout (default 5 s).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Replication factor per datacenter, used when `migrate` creates the keyspace.
    pub replication: std::collections::BTreeMap<String, u32>,
}

impl Default for CassandraSettings {
    fn default() -> Self {
        let d = meshchat_storage::cassandra::CassandraConfig::default();
        Self {
            nodes: d.nodes,
            keyspace: d.keyspace,
            local_dc: d.local_dc,
            consistency: "local_quorum".into(),
            request_timeout: d.request_timeout,
            replication: d.replication,
        }
    }
}

impl CassandraSettings {
    /// The storage crate's config; an unknown consistency name is an error.
    pub fn to_config(&self) -> Result<meshchat_storage::cassandra::CassandraConfig, ConfigError> {
        use scylla_consistency::Consistency as C;
        let consistency = match self.consistency.to_ascii_lowercase().as_str() {
            "local_quorum" => C::LocalQuorum,
            "quorum" => C::Quorum,
            "each_quorum" => C::EachQuorum,
            "local_one" => C::LocalOne,
            "one" => C::One,
            "all" => C::All,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "storage.cassandra.consistency {other:?} is not one of local_quorum, quorum, each_quorum, local_one, one, all"
                )));
            }
        };
        let cfg = meshchat_storage::cassandra::CassandraConfig {
            nodes: self.nodes.clone(),
            keyspace: self.keyspace.clone(),
            local_dc: self.local_dc.clone(),
            consistency,
            request_timeout: self.request_timeout,
            replication: self.replication.clone(),
            ..meshchat_storage::cassandra::CassandraConfig::default()
        };
        cfg.validate()
            .map_err(|e| ConfigError::Invalid(format!("storage.cassandra: {e}")))?;
        Ok(cfg)
    }
}

/// Cluster membership and the node <-> node mesh. Static membership today; Redis
/// membership comes with the rest of the mesh issue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Name of the cluster; a peer with another name is refused (default "meshchat").
    pub cluster_id: String,
    /// UDP address of this node's mesh endpoint (default: none, no mesh).
    pub mesh_listen: Option<SocketAddr>,
    /// The mesh address peers dial for this node, published in its Redis registration.
    /// Default: `mesh_listen`. Required with `redis` when `mesh_listen` is unspecified
    /// (`0.0.0.0`, `[::]`) or has port 0. A static cluster dials the `mesh_addr` of each
    /// `members` entry instead; if set, it must equal this node's.
    pub mesh_advertise: Option<SocketAddr>,
    /// Every member, this node included.
    pub members: Vec<StaticMember>,
    /// Ring epoch of this static member list (raise it when the list changes).
    pub epoch: u64,
    /// Envelopes queued per peer before new ones are dropped (counted and logged;
    /// default 65,536).
    pub peer_queue: usize,
    /// Bytes of envelopes queued per peer before new ones are dropped the same way (default
    /// 64 MiB): what a peer that is down can hold of this node's memory.
    pub peer_queue_bytes: usize,
    /// CA that signs every node's mesh certificate (mutual TLS between nodes); keep it apart
    /// from the CA of the client-facing certificate. Goes with `cert` and `key`. Default: the
    /// development mesh CA in the data dir (`mesh-ca.pem`).
    pub ca: Option<PathBuf>,
    /// This node's mesh certificate (PEM chain, leaf first), signed by `ca`. It must carry the
    /// DNS name `node-<node_id>`: peers accept a node only as the id its certificate names.
    pub cert: Option<PathBuf>,
    /// The mesh certificate's private key (PEM; refused if group or others can read it).
    pub key: Option<PathBuf>,
    /// Redis URL for dynamic membership (`redis://host:port/`). Without it the static
    /// `members` list is the membership.
    pub redis: Option<String>,
    /// How often a node refreshes its registration and reads the member set (default 500 ms).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A member that has not refreshed for this long leaves the ring (default 3 s).
    #[serde(with = "humantime_serde")]
    pub member_ttl: Duration,
    /// This node's ring weight under dynamic membership (default 1).
    pub weight: u32,
    /// How long a drain (`POST /drain`, `meshchat-node drain`) waits for the node's users to
    /// move before it stops the node anyway (default 2 min; redirects go out at 400 a second).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// One member of a static cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticMember {
    /// Node id.
    pub id: u32,
    /// Its mesh address (UDP).
    pub mesh_addr: SocketAddr,
    /// The address its clients dial (redirects point here).
    pub client_addr: String,
    /// Relative capacity (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Its Snowflake worker id (default `id % 1024`). Checked unique across the list: a
    /// static cluster has no lease to keep two nodes from sharing one.
    #[serde(default)]
    pub worker_id: Option<u16>,
}

impl ClusterConfig {
    /// The mesh address peers are told to dial: `mesh_advertise`, else `mesh_listen`.
    pub fn mesh_advertised(&self) -> Option<SocketAddr> {
        self.mesh_advertise.or(self.mesh_listen)
    }
}

impl StaticMember {
    /// The worker id this member uses.
    pub fn worker(&self) -> u16 {
        self.worker_id.unwrap_or((self.id % 1024) as u16)
    }
}

fn one() -> u32 {
    1
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            cluster_id: "meshchat".into(),
            mesh_listen: None,
            mesh_advertise: None,
            members: Vec::new(),
            epoch: 1,
            peer_queue: 65_536,
            peer_queue_bytes: 64 * 1024 * 1024,
            ca: None,
            cert: None,
            key: None,
            redis: None,
            // A dead node leaves the ring within ~3 s, before its idle clients notice (5-7 s,
            // client liveness): they fail over once, straight home. Six rounds per TTL: a
            // node fences itself only after ~2.7 s without one good Redis round.
            heartbeat: Duration::from_millis(500),
            member_ttl: Duration::from_secs(3),
            weight: 1,
            drain_timeout: Duration::from_secs(120),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            worker_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            advertise: None,
            data_dir: PathBuf::from("./meshchat-data"),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            transport: TransportSettings::default(),
            shutdown_grace: Duration::from_secs(10),
            cluster: ClusterConfig::default(),
            storage: StorageSettings::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

/// `[runtime]`: the threads that run the node's tasks (requests, the endpoint loops, the mesh).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the node's tokio runtime. 0 (default): one per core the process may
    /// use (`std::thread::available_parallelism`, which honours CPU affinity and cgroup
    /// quotas), or `TOKIO_WORKER_THREADS` when that is set. Nodes that share a host can be
    /// given their share of its cores: measured, less CPU per message, but occasional
    /// seconds of a much higher p99 with one thread per node, cause not established
    /// (docs/PERFORMANCE.md, "Nodes that share a host: a thread each"). At most 1024. Not
    /// reloadable.
    pub worker_threads: usize,
}

/// TLS certificate and key. Without them the node generates (once) a development CA and a
/// node certificate in the data dir: `<data_dir>/ca.pem` is what clients trust.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this node.
    pub cert: Option<PathBuf>,
    /// PEM private key of this node.
    pub key: Option<PathBuf>,
}

/// Token settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the token signing secret (at least 32 bytes). Every node of a cluster
    /// must share it. Default: `<data_dir>/token.key`, generated if missing.
    pub secret_file: Option<PathBuf>,
    /// Other token secrets accepted for verification only (key rotation, in three rolling
    /// restarts: list the new secret here on every node; then make it `secret_file` and list
    /// the old one here; drop the old one after `token_ttl`). Each must be owner-only, like
    /// the current one.
    pub previous_secret_files: Vec<PathBuf>,
    /// How long a token is valid (default 7 days). A connection is closed with
    /// `TOKEN_EXPIRED` when the token it last got expires, unless the client refreshed it.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Hard end of a login: refreshed tokens are never valid longer than this after the user
    /// last gave their password (default 30 days).
    #[serde(with = "humantime_serde")]
    pub max_login_lifetime: Duration,
    /// Password hashes computed at once (argon2id costs ~19 MiB each; default 2).
    pub max_concurrent_hashes: usize,
    /// Password attempts (`Register` and `Login`) per source (an IPv4 address or an IPv6 /64)
    /// per minute, sustained (`RATE_LIMITED` beyond; default 30).
    pub attempts_per_source_per_min: u32,
    /// Burst of password attempts per source (default 10).
    pub attempts_per_source_burst: u32,
    /// Logins per account name per minute on one node, sustained, from any source
    /// (`RATE_LIMITED` beyond; default 6: a password guesser gets 6 guesses a minute per node).
    pub logins_per_account_per_min: u32,
    /// Burst of logins per account name (default 5).
    pub logins_per_account_burst: u32,
    /// Failed authentications (bad credentials, bad or expired token) after which a connection
    /// is closed, the last one's error first (default 5: the fifth failure closes it).
    pub max_auth_failures: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret_file: None,
            previous_secret_files: Vec::new(),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            max_login_lifetime: Duration::from_secs(30 * 24 * 3600),
            max_concurrent_hashes: 2,
            attempts_per_source_per_min: 30,
            attempts_per_source_burst: 10,
            logins_per_account_per_min: 6,
            logins_per_account_burst: 5,
            max_auth_failures: 5,
        }
    }
}

/// Bounds. Every one is a limit a client can hit, with the error code it gets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame a client may send, in bytes (`FRAME_TOO_LARGE`; default 64 KiB).
    pub max_frame_bytes: u32,
    /// Largest message body, in bytes (`MESSAGE_TOO_LARGE`; default 16 KiB).
    pub max_body_bytes: u32,
    /// Largest history page (larger requests are capped; default 200).
    pub max_page_size: u32,
    /// Page size when the client asks for 0 (default 50).
    pub default_page_size: u32,
    /// Most chats in a chat-list answer (default 500).
    pub max_chat_list: u32,
    /// Sustained sends per user per second (`RATE_LIMITED`; default 50).
    pub send_rate_per_sec: u32,
    /// Burst of sends per user above the sustained rate (default 100).
    pub send_burst: u32,
    /// Live client connections per node, handshaking or authenticated (beyond it a new
    /// connection is refused in the QUIC handshake, `CONNECTION_REFUSED`; default 200,000).
    pub max_connections: usize,
    /// TLS handshakes in progress at once (default 1,024). A client that proved its address
    /// (answered a QUIC Retry) waits up to `handshake_queue_wait` for a slot; others retry.
    pub max_concurrent_handshakes: usize,
    /// Past this many handshakes in progress, a client must prove its address with a QUIC
    /// Retry (one more round trip) before it gets a slot (default 256). Spoofed sources cannot
    /// answer a Retry, so a flood of Initials holds at most this many slots.
    pub retry_above_handshakes: usize,
    /// Handshakes in progress (or waiting) from one source: an IPv4 address or an IPv6 /64
    /// (default 64). Past it a validated client is refused.
    pub max_handshakes_per_source: u32,
    /// A handshake not finished in this time is dropped and its slot freed (default 5 s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a validated client waits for a handshake slot before it is refused (default
    /// 2 s).
    #[serde(with = "humantime_serde")]
    pub handshake_queue_wait: Duration,
    /// Time to authenticate after connecting (`AUTH_TIMEOUT`; default 10 s).
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// A connection with no traffic for this long is closed (default 60 s). Clients send
    /// QUIC keep-alives more often than this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Pushes queued per connection before it is cut off as a slow reader (`SLOW_READER`;
    /// default 256).
    pub outbound_queue: usize,
    /// Bytes of pushes queued per connection before it is cut off as a slow reader
    /// (`SLOW_READER`; default 4 MiB, at least 64 KiB). An empty queue always takes one push,
    /// whatever its size; with `max_frame_bytes` raised, raise this to a few frames.
    pub outbound_queue_bytes: usize,
    /// Authenticated connections one user may have on this node (`OVERLOADED` beyond;
    /// default 32): one stolen or shared token cannot take every slot of a node.
    pub max_connections_per_user: usize,
    /// Bytes of requests being handled at once on this node, all connections together
    /// (`OVERLOADED` beyond; default 256 MiB).
    pub max_inflight_bytes: usize,
    /// Requests one connection may have in progress at once; more wait (default 32).
    pub max_inflight_per_conn: usize,
    /// A write to a client blocked this long (the client stopped reading) closes the
    /// connection with `SLOW_READER` (default 10 s).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            max_page_size: 200,
            default_page_size: 50,
            max_chat_list: 500,
            send_rate_per_sec: 50,
            send_burst: 100,
            max_connections: 200_000,
            max_concurrent_handshakes: 1_024,
            retry_above_handshakes: 256,
            max_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(5),
            handshake_queue_wait: Duration::from_secs(2),
            auth_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            outbound_queue: 256,
            outbound_queue_bytes: 4 << 20,
            max_inflight_per_conn: 32,
            max_connections_per_user: 32,
            max_inflight_bytes: 256 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// QUIC transport sizing for chat: small windows, one stream, no bulk-transfer buffers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// Per-stream receive window in bytes (default 128 KiB: two max frames in flight).
    pub stream_receive_window: u32,
    /// Per-connection receive window in bytes (default 256 KiB).
    pub receive_window: u32,
    /// Per-connection send window in bytes (default 256 KiB).
    pub send_window: u64,
    /// Kernel UDP receive buffer requested for the endpoint socket (default 8 MiB; capped by
    /// `net.core.rmem_max`). Handshake bursts drop packets with the 208 KB default.
    pub udp_recv_buffer: usize,
    /// Kernel UDP send buffer (default 8 MiB; capped by `net.core.wmem_max`).
    pub udp_send_buffer: usize,
    /// Path MTU discovery (default off: costs memory per connection, chat frames are small).
    pub mtu_discovery: bool,
    /// Bytes of TLS session tickets kept for 0-RTT resumption (default 16 MiB, about 47,000
    /// tickets; 0 turns resumption and 0-RTT off). Each ticket is used once; past the budget
    /// the oldest go, and their clients make a full handshake.
    pub ticket_store_bytes: usize,
    /// What serves the client port: `loop` (default: meshchat's endpoint loop on
    /// quinn-proto, `meshchat-edge`, every connection of a loop in one task; half the memory
    /// per connection) or `quinn` (quinn's async endpoint, a task per connection).
    /// Not reloadable.
    pub endpoint: EndpointKind,
    /// With `endpoint = "loop"`: how many loops (tasks, each on a core when the runtime has
    /// them) share the client port, connections spread among them by connection id; 0
    /// (default) is one per worker thread of the runtime the node runs on, so one per core
    /// unless `runtime.worker_threads` says otherwise ([`TransportSettings::loop_count`]). At
    /// most 64. Not reloadable.
    pub loops: usize,
    /// Let go of rustls once a connection's handshake (and its session tickets) is done,
    /// keeping only the secrets of the next key update: ~3.8 KB less per idle connection
    /// (docs/PERFORMANCE.md, docs/SECURITY.md). Default true. Not reloadable.
    pub lean_tls: bool,
}

/// What serves the client port (`transport.endpoint`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// quinn's async endpoint: a task per connection beside quinn's driver task.
    Quinn,
    /// meshchat's endpoint loop (`meshchat-edge`): one task for every connection of a loop.
    #[default]
    Loop,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            stream_receive_window: 128 * 1024,
            receive_window: 256 * 1024,
            send_window: 256 * 1024,
            udp_recv_buffer: 8 * 1024 * 1024,
            udp_send_buffer: 8 * 1024 * 1024,
            mtu_discovery: false,
            ticket_store_bytes: 16 * 1024 * 1024,
            endpoint: EndpointKind::Loop,
            loops: 0,
            lean_tls: true,
        }
    }
}

impl TransportSettings {
    /// How many endpoint loops serve the client port on a runtime of `workers` worker threads:
    /// `loops`, or for 0 one per worker thread, at most 64.
    pub fn loop_count(&self, workers: usize) -> usize {
        match self.loops {
            0 => workers.clamp(1, 64),
            n => n,
        }
    }
}

/// Most bytes a frame may hold (`limits.max_frame_bytes`): frames are buffered whole, per
/// connection, and chat frames are small.
pub const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
/// Bytes of a frame kept for all but the message body (ids, names, protobuf tags): the
/// smallest `max_frame_bytes`, and what `max_body_bytes` leaves of it.
pub const FRAME_OVERHEAD: u32 = 1024;
/// Most entries a history page may ask for (`limits.max_page_size`).
const MAX_PAGE_SIZE: u32 = 10_000;
/// Most chats in a chat-list answer (`limits.max_chat_list`).
const MAX_CHAT_LIST: u32 = 100_000;
/// Most live connections one node may be configured for (`limits.max_connections`).
const MAX_CONNECTIONS: usize = 10_000_000;
/// Most handshakes in progress (`limits.max_concurrent_handshakes`); far below the most
/// permits a tokio semaphore takes (`usize::MAX >> 3`, past which it panics).
const MAX_HANDSHAKES: usize = 1 << 20;
/// Most pushes queued per connection (`limits.outbound_queue`), each up to a frame.
const MAX_QUEUE: usize = 1 << 16;
/// Most bytes of pushes queued per connection (`limits.outbound_queue_bytes`): 1 GiB.
const MAX_QUEUE_BYTES: usize = 1 << 30;
/// Most requests in progress per connection (`limits.max_inflight_per_conn`).
const MAX_INFLIGHT: usize = 1 << 10;
/// Most bytes of requests handled at once (`limits.max_inflight_bytes`): 64 GiB.
const MAX_INFLIGHT_BYTES: usize = 64 << 30;
/// Most envelopes queued per peer (`cluster.peer_queue`).
const MAX_PEER_QUEUE: usize = 1 << 24;
/// Most argon2id hashes at once (`auth.max_concurrent_hashes`): ~19 MiB each.
const MAX_CONCURRENT_HASHES: usize = 256;
/// Longest timeout, wait or grace period: a day. Longer is a unit mistake, and some
/// `Instant + Duration` sums panic on overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `auth.token_ttl`: a year (a live connection's timer runs to its token's expiry,
/// and tokio's timers reach about two years).
const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest `auth.max_login_lifetime`: ten years.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Longest `cluster.heartbeat`.
const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// Longest `cluster.member_ttl`: a dead node stays on the ring this long.
const MAX_MEMBER_TTL: Duration = Duration::from_secs(3600);
/// Largest QUIC flow-control window: a client can make the node buffer this much.
const MAX_WINDOW: u64 = 64 * 1024 * 1024;
/// Largest `transport.ticket_store_bytes`: 1 GiB.
const MAX_TICKET_STORE: usize = 1 << 30;
/// Largest kernel UDP buffer asked for (the kernel takes an `int`; it caps it far lower).
const MAX_UDP_BUFFER: usize = 1 << 30;

/// `url` with the password of its user info (`user:password@`) replaced by `****`.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}:****{}", &url[..start], &rest[..colon], &rest[at..]),
        None => url.to_owned(),
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message.into()))
}

/// `value` in `min..=max`, or an error naming `key`.
fn within<T: PartialOrd + std::fmt::Debug + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return invalid(format!("{key} must be {min:?}..={max:?} (got {value:?})"));
    }
    Ok(())
}

/// `0.0.0.0`, `[::]` or `[::ffff:0.0.0.0]`: "every address here", which no peer can dial.
fn is_unspecified(a: SocketAddr) -> bool {
    a.ip().to_canonical().is_unspecified()
}

/// An address others dial: a specified IP and a port other than 0.
fn check_dial_socket(key: &str, a: SocketAddr) -> Result<(), ConfigError> {
    if is_unspecified(a) || a.port() == 0 {
        return invalid(format!(
            "{key} {a} cannot be dialled: it needs a specific address and a port other than 0"
        ));
    }
    Ok(())
}

/// A `host:port` others dial: an IP socket address (`[v6]:port`), or a DNS name and a port.
fn check_dial_address(key: &str, a: &str) -> Result<(), ConfigError> {
    if let Ok(socket) = a.parse::<SocketAddr>() {
        return check_dial_socket(key, socket);
    }
    let port = a
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains([':', '[', ']']))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|p| *p != 0);
    if port.is_none() {
        return invalid(format!(
            "{key} {a:?} must be host:port (an IPv6 address in brackets), port 1..=65535"
        ));
    }
    Ok(())
}

impl NodeConfig {
    /// Defaults, then `file` (if any), then `MESHCHAT_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // Maps merge in figment: a file's `replication = { dc1 = 3 }` would keep the default's
        // `datacenter1 = 1` beside it. The default applies only when nothing was given.
        let mut defaults = NodeConfig::default();
        defaults.storage.cassandra.replication.clear();
        let mut fig = Figment::from(Serialized::defaults(defaults));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig = fig.merge(Env::prefixed("MESHCHAT_").split("__").ignore(&[
            "home",
            "password",
            "cql_nodes",
        ]));
        let mut config: NodeConfig = fig.extract().map_err(Box::new)?;
        if config.storage.cassandra.replication.is_empty() {
            config.storage.cassandra.replication = CassandraSettings::default().replication;
        }
        config.validate()?;
        Ok(config)
    }

    /// What `meshchat-node check-config` checks beyond [`NodeConfig::validate`]: the files
    /// the config names exist and are readable (certificates, keys, token secrets), the
    /// Cassandra settings build a driver config, and the data dir, if it exists, is a
    /// directory. Not checked: key file modes, certificate contents, whether Redis or
    /// Cassandra answer (the node checks those at start). Returns warnings (things that start but deserve a look); an error names the
    /// key and the problem.
    pub fn check_files(&self) -> Result<Vec<String>, ConfigError> {
        let files = [
            ("tls.cert", self.tls.cert.as_ref()),
            ("tls.key", self.tls.key.as_ref()),
            ("auth.secret_file", self.auth.secret_file.as_ref()),
            ("cluster.ca", self.cluster.ca.as_ref()),
            ("cluster.cert", self.cluster.cert.as_ref()),
            ("cluster.key", self.cluster.key.as_ref()),
        ];
        let previous = self
            .auth
            .previous_secret_files
            .iter()
            .map(|p| ("auth.previous_secret_files", Some(p)));
        for (key, path) in files.into_iter().chain(previous) {
            let Some(path) = path else { continue };
            if let Err(e) = std::fs::File::open(path) {
                return invalid(format!("{key}: {}: {e}", path.display()));
            }
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            return invalid(format!(
                "data_dir: {} exists and is not a directory",
                self.data_dir.display()
            ));
        }
        if self.storage.backend == Backend::Cassandra {
            self.storage
                .cassandra
                .to_config()
                .map_err(|e| ConfigError::Invalid(format!("storage.cassandra: {e}")))?;
        }
        let mut warnings = Vec::new();
        if self.tls.cert.is_none() {
            warnings.push(format!(
                "tls: no cert/key: a development CA is generated in {} (never in production)",
                self.data_dir.display()
            ));
        }
        let clustered = !self.cluster.members.is_empty() || self.cluster.redis.is_some();
        if clustered && self.cluster.ca.is_none() {
            warnings.push(
                "cluster: no ca/cert/key: a development mesh CA is generated in data_dir \
                 (never in production)"
                    .into(),
            );
        }
        if self.auth.secret_file.is_none() && clustered {
            warnings.push(
                "auth.secret_file unset: each node makes its own token key in its data_dir; \
                 nodes on separate hosts then reject each other's tokens"
                    .into(),
            );
        }
        match self.admin.listen {
            None => warnings
                .push("admin.listen unset: no /healthz, /readyz or /metrics for this node".into()),
            Some(a) if !a.ip().is_loopback() => warnings.push(format!(
                "admin.listen {a} is not loopback: the admin listener has no authentication; \
                 keep it on a management network"
            )),
            Some(_) => {}
        }
        Ok(warnings)
    }

    /// Checks ranges that serde cannot. Every refusal names its key; no check can overflow,
    /// whatever the values (the arithmetic is in u64 or checked).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_id() > meshchat_idgen::MAX_WORKER {
            return invalid("worker_id must be 0..=1023");
        }
        self.validate_addresses()?;
        self.validate_limits()?;
        self.validate_auth()?;
        self.validate_transport()?;
        within(
            "runtime.worker_threads",
            self.runtime.worker_threads,
            0,
            1024,
        )?;
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls.cert and tls.key go together");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(format!("log.level {:?}: {e}", self.log.level));
        }
        // A typo ("inof", "warning") parses as a target name and would log nothing at all.
        if !self
            .log
            .level
            .split(',')
            .map(str::trim)
            // "" parses as `off`: an empty level would silence the node by accident.
            .any(|d| !d.is_empty() && d.parse::<tracing::level_filters::LevelFilter>().is_ok())
        {
            return invalid(format!(
                "log.level {:?} sets no default level: start it with one of error, warn, \
                 info, debug, trace, off (for example \"info,meshchat_backplane=debug\")",
                self.log.level
            ));
        }
        if !(0.0..=1.0).contains(&self.log.otlp_sample_ratio) {
            return invalid(format!(
                "log.otlp_sample_ratio must be 0.0..=1.0 (got {})",
                self.log.otlp_sample_ratio
            ));
        }
        if let Some(url) = &self.log.otlp_endpoint
            && !url.starts_with("http://")
        {
            return invalid(format!(
                "log.otlp_endpoint {url:?}: must be an http:// URL (OTLP/HTTP, for example \
                 http://127.0.0.1:4318/v1/traces; no TLS: export to a collector on the host)"
            ));
        }
        if let Some(url) = &self.cluster.redis {
            if url.starts_with("rediss://") {
                return invalid(
                    "cluster.redis: rediss:// (TLS) is not built into this node; reach Redis \
                     over a private network or a TLS tunnel with redis://",
                );
            }
            if !["redis://", "unix://", "redis+unix://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return invalid(format!(
                    "cluster.redis {:?} must start with redis://, unix:// or redis+unix://",
                    redact_url(url)
                ));
            }
        }
        within(
            "cluster.drain_timeout",
            self.cluster.drain_timeout,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
        )?;
        within(
            "shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            MAX_TIMEOUT,
        )?;
        self.validate_cluster()?;
        if self.storage.backend == Backend::Cassandra {
            self.storage.cassandra.to_config()?;
        }
        Ok(())
    }

    /// The client address: what clients are told to dial must be dialable.
    fn validate_addresses(&self) -> Result<(), ConfigError> {
        match &self.advertise {
            Some(a) => check_dial_address("advertise", a),
            None if is_unspecified(self.listen) => invalid(format!(
                "advertise is required when listen is {} (an unspecified address): clients \
                 would be told to dial it; set advertise to the host:port they reach this node at",
                self.listen
            )),
            None => Ok(()),
        }
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        within(
            "limits.max_frame_bytes",
            l.max_frame_bytes,
            FRAME_OVERHEAD,
            MAX_FRAME_BYTES,
        )?;
        // Cannot underflow: max_frame_bytes >= FRAME_OVERHEAD was just checked.
        let body_max = l.max_frame_bytes.saturating_sub(FRAME_OVERHEAD);
        if l.max_body_bytes == 0 || l.max_body_bytes > body_max {
            return invalid(format!(
                "limits.max_body_bytes must be 1..={body_max} (limits.max_frame_bytes less \
                 {FRAME_OVERHEAD} bytes for the rest of a frame; got {})",
                l.max_body_bytes
            ));
        }
        within("limits.max_page_size", l.max_page_size, 1, MAX_PAGE_SIZE)?;
        within(
            "limits.default_page_size",
            l.default_page_size,
            1,
            l.max_page_size,
        )?;
        within("limits.max_chat_list", l.max_chat_list, 1, MAX_CHAT_LIST)?;
        within("limits.send_rate_per_sec", l.send_rate_per_sec, 1, u32::MAX)?;
        within("limits.send_burst", l.send_burst, 1, u32::MAX)?;
        within(
            "limits.max_connections",
            l.max_connections,
            1,
            MAX_CONNECTIONS,
        )?;
        within(
            "limits.max_concurrent_handshakes",
            l.max_concurrent_handshakes,
            1,
            MAX_HANDSHAKES,
        )?;
        within(
            "limits.retry_above_handshakes",
            l.retry_above_handshakes,
            0,
            l.max_concurrent_handshakes,
        )?;
        within(
            "limits.max_handshakes_per_source",
            l.max_handshakes_per_source,
            1,
            u32::MAX,
        )?;
        within("limits.outbound_queue", l.outbound_queue, 1, MAX_QUEUE)?;
        // An empty queue takes one push of any size, so this need not cover a frame.
        within(
            "limits.outbound_queue_bytes",
            l.outbound_queue_bytes,
            64 * 1024,
            MAX_QUEUE_BYTES,
        )?;
        within(
            "limits.max_connections_per_user",
            l.max_connections_per_user,
            1,
            MAX_CONNECTIONS,
        )?;
        // One whole frame must fit; a tokio semaphore takes at most `usize::MAX >> 3`.
        within(
            "limits.max_inflight_bytes",
            l.max_inflight_bytes,
            l.max_frame_bytes as usize,
            MAX_INFLIGHT_BYTES,
        )?;
        within(
            "limits.max_inflight_per_conn",
            l.max_inflight_per_conn,
            1,
            MAX_INFLIGHT,
        )?;
        let ms = Duration::from_millis(1);
        within(
            "limits.handshake_timeout",
            l.handshake_timeout,
            ms,
            MAX_TIMEOUT,
        )?;
        within(
            "limits.handshake_queue_wait",
            l.handshake_queue_wait,
            Duration::ZERO,
            MAX_TIMEOUT,
        )?;
        within("limits.auth_timeout", l.auth_timeout, ms, MAX_TIMEOUT)?;
        // QUIC reads an idle timeout of 0 as "none"; clients keep alive every third of it.
        within(
            "limits.idle_timeout",
            l.idle_timeout,
            Duration::from_secs(1),
            MAX_TIMEOUT,
        )?;
        within("limits.write_timeout", l.write_timeout, ms, MAX_TIMEOUT)?;
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        let s = Duration::from_secs(1);
        within("auth.token_ttl", a.token_ttl, s, MAX_TOKEN_TTL)?;
        within(
            "auth.max_login_lifetime",
            a.max_login_lifetime,
            s,
            MAX_TOKEN_LIFETIME,
        )?;
        within(
            "auth.max_concurrent_hashes",
            a.max_concurrent_hashes,
            1,
            MAX_CONCURRENT_HASHES,
        )?;
        for (key, value) in [
            (
                "auth.attempts_per_source_per_min",
                a.attempts_per_source_per_min,
            ),
            (
                "auth.attempts_per_source_burst",
                a.attempts_per_source_burst,
            ),
            (
                "auth.logins_per_account_per_min",
                a.logins_per_account_per_min,
            ),
            ("auth.logins_per_account_burst", a.logins_per_account_burst),
            ("auth.max_auth_failures", a.max_auth_failures),
        ] {
            within(key, value, 1, u32::MAX)?;
        }
        Ok(())
    }

    fn validate_transport(&self) -> Result<(), ConfigError> {
        let t = &self.transport;
        // A frame is its 4-byte length and up to max_frame_bytes: in u64, so no sum overflows.
        let frame = u64::from(self.limits.max_frame_bytes) + 4;
        let stream = u64::from(t.stream_receive_window);
        let conn = u64::from(t.receive_window);
        if stream < frame || stream > MAX_WINDOW {
            return invalid(format!(
                "transport.stream_receive_window must be {frame}..={MAX_WINDOW} (one whole \
                 max frame and its length; got {stream})"
            ));
        }
        if conn < frame || conn > MAX_WINDOW {
            return invalid(format!(
                "transport.receive_window must be {frame}..={MAX_WINDOW} (one whole max frame \
                 and its length; got {conn})"
            ));
        }
        within("transport.send_window", t.send_window, 1, MAX_WINDOW)?;
        within(
            "transport.udp_recv_buffer",
            t.udp_recv_buffer,
            0,
            MAX_UDP_BUFFER,
        )?;
        within(
            "transport.udp_send_buffer",
            t.udp_send_buffer,
            0,
            MAX_UDP_BUFFER,
        )?;
        within(
            "transport.ticket_store_bytes",
            t.ticket_store_bytes,
            0,
            MAX_TICKET_STORE,
        )?;
        within("transport.loops", t.loops, 0, 64)?;
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if [c.ca.is_some(), c.cert.is_some(), c.key.is_some()]
            .iter()
            .any(|set| *set != c.ca.is_some())
        {
            return invalid("cluster.ca, cluster.cert and cluster.key go together");
        }
        within("cluster.peer_queue", c.peer_queue, 1, MAX_PEER_QUEUE)?;
        // One largest envelope must fit (256 KiB).
        within(
            "cluster.peer_queue_bytes",
            c.peer_queue_bytes,
            256 * 1024,
            MAX_INFLIGHT_BYTES,
        )?;
        if let Some(a) = c.mesh_advertise {
            if c.mesh_listen.is_none() {
                return invalid("cluster.mesh_advertise needs cluster.mesh_listen");
            }
            check_dial_socket("cluster.mesh_advertise", a)?;
        }
        if !c.members.is_empty() {
            self.validate_static_members()?;
        }
        if c.redis.is_some() {
            if !c.members.is_empty() {
                return invalid("cluster.redis and cluster.members exclude each other");
            }
            let Some(listen) = c.mesh_listen else {
                return invalid("cluster.redis needs cluster.mesh_listen");
            };
            // Peers dial what this node registers: never an address that only means "here".
            if c.mesh_advertise.is_none() && (is_unspecified(listen) || listen.port() == 0) {
                return invalid(format!(
                    "cluster.mesh_advertise is required with cluster.redis when \
                     cluster.mesh_listen is {listen} (unspecified address or port 0): peers \
                     would be told to dial it; set cluster.mesh_advertise to the address they \
                     reach this node's mesh at"
                ));
            }
            within(
                "cluster.heartbeat",
                c.heartbeat,
                Duration::from_millis(1),
                MAX_HEARTBEAT,
            )?;
            // checked_mul: Duration's `*` panics on overflow.
            let min_ttl = c.heartbeat.checked_mul(2).unwrap_or(Duration::MAX);
            if c.member_ttl < min_ttl || c.member_ttl > MAX_MEMBER_TTL {
                return invalid(format!(
                    "cluster.member_ttl must be at least twice cluster.heartbeat and at most \
                     {MAX_MEMBER_TTL:?} (got {:?})",
                    c.member_ttl
                ));
            }
            within("cluster.weight", c.weight, 1, u32::MAX)?;
        }
        Ok(())
    }

    fn validate_static_members(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.mesh_listen.is_none() {
            return invalid("cluster.members needs cluster.mesh_listen");
        }
        let Some(me) = c.members.iter().find(|m| m.id == self.node_id) else {
            return invalid("cluster.members must include this node's node_id");
        };
        let mut ids: Vec<u32> = c.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != c.members.len() {
            return invalid("cluster.members has a node id twice");
        }
        if c.members.iter().any(|m| m.weight == 0) {
            return invalid("cluster.members weights must be > 0");
        }
        for m in &c.members {
            check_dial_socket("cluster.members.mesh_addr", m.mesh_addr)?;
            check_dial_address("cluster.members.client_addr", &m.client_addr)?;
        }
        let mut workers: Vec<u16> = c.members.iter().map(StaticMember::worker).collect();
        workers.sort_unstable();
        workers.dedup();
        if workers.len() != c.members.len() {
            return invalid(
                "cluster.members: two members share a Snowflake worker id (id % 1024, or \
                 worker_id): they would issue duplicate ids",
            );
        }
        if me.worker() != self.worker_id() {
            return invalid("worker_id differs from this node's entry in cluster.members");
        }
        if c.mesh_advertise.is_some_and(|a| a != me.mesh_addr) {
            return invalid(
                "cluster.mesh_advertise differs from this node's mesh_addr in cluster.members \
                 (peers of a static cluster dial the members' mesh_addr)",
            );
        }
        Ok(())
    }

    /// The Snowflake worker id this node uses.
    pub fn worker_id(&self) -> u16 {
        self.worker_id.unwrap_or((self.node_id % 1024) as u16)
    }

    /// The address clients should dial.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The token secret file.
    pub fn secret_file(&self) -> PathBuf {
        self.auth
            .secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("token.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().expect("defaults validate");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn file_then_env_override() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "node_id = 3\n[limits]\nmax_body_bytes = 2048\nauth_timeout = \"3s\"\n",
        )
        .expect("write");
        figment::Jail::expect_with(|jail| {
            jail.set_env("MESHCHAT_LIMITS__MAX_PAGE_SIZE", "77");
            let c = NodeConfig::load(Some(&file)).expect("load");
            assert_eq!(c.node_id, 3);
            assert_eq!(c.limits.max_body_bytes, 2048);
            assert_eq!(c.limits.auth_timeout, Duration::from_secs(3));
            assert_eq!(c.limits.max_page_size, 77);
            assert_eq!(c.worker_id(), 3);
            Ok(())
        });
    }

    #[test]
    fn a_replication_map_in_the_file_replaces_the_default() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "[storage.cassandra]\nnodes = [\"10.0.0.11:9042\"]\nlocal_dc = \"dc1\"\nreplication = { dc1 = 3 }\n",
        )
        .expect("write");
        let c = NodeConfig::load(Some(&file)).expect("load");
        assert_eq!(
            c.storage.cassandra.replication,
            [("dc1".to_string(), 3)].into_iter().collect()
        );
        // Without one, the default stays.
        std::fs::write(&file, "node_id = 2\n").expect("write");
        let c = NodeConfig::load(Some(&file)).expect("load");
        assert_eq!(
            c.storage.cassandra.replication,
            CassandraSettings::default().replication
        );
    }

    #[test]
    fn a_redis_url_this_build_cannot_use_is_refused_and_passwords_are_redacted() {
        let mut c = NodeConfig::default();
        c.cluster.redis = Some("rediss://meshchat:secret@10.0.0.9:6380/".into());
        let e = c.validate().expect_err("rediss refused").to_string();
        assert!(e.contains("cluster.redis") && e.contains("TLS"), "{e}");
        c.cluster.redis = Some("http://meshchat:secret@10.0.0.9/".into());
        let e = c.validate().expect_err("http refused").to_string();
        assert!(e.contains("redis://") && !e.contains("secret"), "{e}");
        assert_eq!(
            redact_url("redis://meshchat:secret@10.0.0.9:6379/"),
            "redis://meshchat:****@10.0.0.9:6379/"
        );
        assert_eq!(redact_url("redis://10.0.0.9/"), "redis://10.0.0.9/");
    }

    #[test]
    fn a_log_level_without_a_default_level_is_refused() {
        let mut c = NodeConfig::default();
        for bad in ["inof", "warning", "", "meshchat_backplane=debug"] {
            c.log.level = bad.into();
            let e = c.validate().expect_err(bad).to_string();
            assert!(e.contains("log.level"), "{bad:?}: {e}");
        }
        for good in ["info", "warn,meshchat_backplane=debug", "off"] {
            c.log.level = good.into();
            c.validate().expect(good);
        }
    }

    #[test]
    fn every_node_config_of_the_deploy_kit_loads() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut loaded = 0;
        for dir in ["cluster", "single-host"] {
            for n in 1..=3 {
                let path = deploy.join(dir).join(format!("node{n}.toml"));
                let c = NodeConfig::load(Some(&path))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(c.node_id, n, "{}", path.display());
                assert!(c.admin.listen.is_some(), "{}", path.display());
                loaded += 1;
            }
        }
        assert_eq!(loaded, 6);
    }

    #[test]
    fn the_example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let c = NodeConfig::load(Some(&path)).expect("deploy/node.example.toml loads");
        assert_eq!(
            c.limits,
            LimitsConfig::default(),
            "it documents the defaults"
        );
        assert_eq!(c.transport, TransportSettings::default());
        assert_eq!(c.auth.token_ttl, AuthConfig::default().token_ttl);
    }

    #[test]
    fn the_example_config_in_deploy_names_every_key() {
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    match v {
                        // A map of values (the replication map) is one key.
                        toml::Value::Table(_) if k == "replication" => {
                            out.push((prefix.to_owned(), k.clone()));
                        }
                        toml::Value::Table(_) => {
                            let section = if prefix.is_empty() {
                                k.clone()
                            } else {
                                format!("{prefix}.{k}")
                            };
                            keys(&section, v, out);
                        }
                        _ => out.push((prefix.to_owned(), k.clone())),
                    }
                }
            }
        }
        let mut expected = Vec::new();
        let default = toml::Value::try_from(NodeConfig::default()).expect("serializes");
        keys("", &default, &mut expected);
        // Keys that are unset by default are not serialized: these are named by hand.
        for (section, key) in [
            ("", "worker_id"),
            ("", "advertise"),
            ("tls", "cert"),
            ("tls", "key"),
            ("log", "otlp_endpoint"),
        ] {
            expected.push((section.into(), key.into()));
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/node.example.toml");
        // (section, key) of every `key = ...` line, commented out or not.
        let mut section = String::new();
        let mut named = std::collections::BTreeSet::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            let header = line.split('#').next().unwrap_or_default().trim();
            if let Some(s) = header.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.trim_matches(['[', ']']).to_owned();
                // `[[cluster.members]]`: an array of tables names the key `members`.
                if let Some((parent, last)) = section.rsplit_once('.') {
                    named.insert((parent.to_owned(), last.to_owned()));
                }
            } else if let Some((k, _)) = line.split_once('=') {
                let k = k.trim();
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    named.insert((section.clone(), k.to_owned()));
                }
            }
        }
        let missing: Vec<String> = expected
            .iter()
            .filter(|k| !named.contains(*k))
            .map(|(s, k)| {
                if s.is_empty() {
                    k.clone()
                } else {
                    format!("{s}.{k}")
                }
            })
            .collect();
        assert!(
            missing.is_empty(),
            "deploy/node.example.toml does not document {missing:?}"
        );
    }

    /// The refusal of `c`, which must name `key`.
    #[track_caller]
    fn refused(c: &NodeConfig, key: &str) -> String {
        match c.validate() {
            Err(ConfigError::Invalid(m)) => {
                assert!(m.contains(key), "{key:?} not named in {m:?}");
                m
            }
            other => panic!("{key}: expected a refusal, got {other:?}"),
        }
    }

    /// A config with Redis membership and a mesh on `mesh_listen`.
    fn redis_node(mesh_listen: &str) -> NodeConfig {
        let mut c = NodeConfig::default();
        c.cluster.redis = Some("redis://127.0.0.1:6379/".into());
        c.cluster.mesh_listen = Some(mesh_listen.parse().expect("addr"));
        c
    }

    #[test]
    fn absurd_values_are_refused_not_overflowed() {
        type Tweak = fn(&mut NodeConfig);
        let cases: &[(&str, Tweak)] = &[
            // Each of these overflowed (a panic in debug builds) or wrapped before.
            ("limits.max_frame_bytes", |c| {
                c.limits.max_frame_bytes = u32::MAX
            }),
            ("limits.max_body_bytes", |c| {
                c.limits.max_body_bytes = u32::MAX
            }),
            ("limits.max_frame_bytes", |c| {
                c.limits.max_frame_bytes = u32::MAX - 2;
                c.transport.stream_receive_window = u32::MAX;
            }),
            ("cluster.member_ttl", |c| {
                *c = redis_node("10.0.0.1:7500");
                c.cluster.heartbeat = Duration::from_secs(30);
                c.cluster.member_ttl = Duration::MAX;
            }),
            ("cluster.heartbeat", |c| {
                *c = redis_node("10.0.0.1:7500");
                c.cluster.heartbeat = Duration::MAX;
            }),
            // Absurd: would panic at start (semaphores), hold unbounded memory, or never end.
            ("limits.max_frame_bytes", |c| {
                c.limits.max_frame_bytes = 16 * 1024 * 1024 + 1
            }),
            ("limits.max_body_bytes", |c| {
                c.limits.max_body_bytes = c.limits.max_frame_bytes - 1023
            }),
            ("limits.max_page_size", |c| {
                c.limits.max_page_size = u32::MAX
            }),
            ("limits.default_page_size", |c| {
                c.limits.default_page_size = u32::MAX
            }),
            ("limits.max_chat_list", |c| {
                c.limits.max_chat_list = u32::MAX
            }),
            ("limits.max_chat_list", |c| c.limits.max_chat_list = 0),
            ("limits.max_connections", |c| {
                c.limits.max_connections = usize::MAX
            }),
            ("limits.max_concurrent_handshakes", |c| {
                c.limits.max_concurrent_handshakes = usize::MAX
            }),
            ("limits.retry_above_handshakes", |c| {
                c.limits.retry_above_handshakes = usize::MAX
            }),
            ("limits.outbound_queue", |c| {
                c.limits.outbound_queue = usize::MAX
            }),
            ("limits.outbound_queue_bytes", |c| {
                c.limits.outbound_queue_bytes = usize::MAX
            }),
            ("limits.max_inflight_per_conn", |c| {
                c.limits.max_inflight_per_conn = usize::MAX
            }),
            ("auth.max_concurrent_hashes", |c| {
                c.auth.max_concurrent_hashes = usize::MAX
            }),
            ("cluster.peer_queue", |c| c.cluster.peer_queue = usize::MAX),
            ("transport.stream_receive_window", |c| {
                c.transport.stream_receive_window = u32::MAX
            }),
            ("transport.receive_window", |c| {
                c.transport.receive_window = u32::MAX
            }),
            ("transport.receive_window", |c| {
                c.transport.receive_window = 1024
            }),
            ("transport.send_window", |c| {
                c.transport.send_window = u64::MAX
            }),
            ("transport.udp_recv_buffer", |c| {
                c.transport.udp_recv_buffer = usize::MAX
            }),
            ("transport.udp_send_buffer", |c| {
                c.transport.udp_send_buffer = usize::MAX
            }),
            ("shutdown_grace", |c| c.shutdown_grace = Duration::MAX),
            ("auth.token_ttl", |c| c.auth.token_ttl = Duration::MAX),
            ("auth.max_login_lifetime", |c| {
                c.auth.max_login_lifetime = Duration::MAX
            }),
            ("limits.idle_timeout", |c| {
                c.limits.idle_timeout = Duration::MAX
            }),
            // Zero durations and sizes.
            ("limits.handshake_timeout", |c| {
                c.limits.handshake_timeout = Duration::ZERO
            }),
            ("limits.auth_timeout", |c| {
                c.limits.auth_timeout = Duration::ZERO
            }),
            ("limits.idle_timeout", |c| {
                c.limits.idle_timeout = Duration::ZERO
            }),
            ("limits.idle_timeout", |c| {
                c.limits.idle_timeout = Duration::from_micros(500)
            }),
            ("limits.write_timeout", |c| {
                c.limits.write_timeout = Duration::ZERO
            }),
            ("auth.token_ttl", |c| c.auth.token_ttl = Duration::ZERO),
            ("auth.max_concurrent_hashes", |c| {
                c.auth.max_concurrent_hashes = 0
            }),
            ("limits.send_burst", |c| c.limits.send_burst = 0),
            ("cluster.heartbeat", |c| {
                *c = redis_node("10.0.0.1:7500");
                c.cluster.heartbeat = Duration::ZERO;
            }),
        ];
        for (key, tweak) in cases {
            let mut c = NodeConfig::default();
            tweak(&mut c);
            let outcome = std::panic::catch_unwind(|| c.validate());
            let Ok(outcome) = outcome else {
                panic!("{key}: validate panicked");
            };
            match outcome {
                Err(ConfigError::Invalid(m)) => assert!(m.contains(key), "{key:?} not in {m:?}"),
                other => panic!("{key}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_largest_sane_values_are_accepted() {
        let mut c = NodeConfig::default();
        c.limits.max_frame_bytes = MAX_FRAME_BYTES;
        c.limits.max_body_bytes = MAX_FRAME_BYTES - FRAME_OVERHEAD;
        c.limits.outbound_queue_bytes = MAX_QUEUE_BYTES;
        c.transport.stream_receive_window = MAX_FRAME_BYTES + 4;
        c.transport.receive_window = MAX_FRAME_BYTES + 4;
        c.limits.max_page_size = MAX_PAGE_SIZE;
        c.limits.default_page_size = MAX_PAGE_SIZE;
        c.limits.idle_timeout = MAX_TIMEOUT;
        c.limits.handshake_queue_wait = Duration::ZERO;
        c.shutdown_grace = Duration::ZERO;
        c.validate().expect("valid");
        let mut c = redis_node("10.0.0.1:7500");
        c.cluster.heartbeat = MAX_HEARTBEAT;
        c.cluster.member_ttl = MAX_MEMBER_TTL;
        c.validate().expect("valid");
    }

    #[test]
    fn an_unspecified_listen_address_needs_advertise() {
        for listen in [
            "0.0.0.0:7400",
            "[::]:7400",
            "0.0.0.0:0",
            "[::ffff:0.0.0.0]:7400",
        ] {
            let mut c = NodeConfig {
                listen: listen.parse().expect("addr"),
                ..NodeConfig::default()
            };
            refused(&c, "advertise");
            c.advertise = Some("chat1.example.net:7400".into());
            c.validate().expect("with advertise");
            c.advertise = Some("[2001:db8::1]:7400".into());
            c.validate().expect("an IPv6 advertise");
        }
        // A specific address needs none; port 0 advertises the port bound (tests).
        for listen in ["127.0.0.1:0", "[::1]:7400", "10.0.0.1:7400"] {
            let c = NodeConfig {
                listen: listen.parse().expect("addr"),
                ..NodeConfig::default()
            };
            c.validate().expect(listen);
        }
    }

    #[test]
    fn advertise_must_be_dialable() {
        for bad in [
            "0.0.0.0:7400",
            "[::]:7400",
            "10.0.0.1:0",
            "chat.example.net",
            "chat.example.net:0",
            "chat.example.net:99999",
            ":7400",
            "::1:7400",
        ] {
            let c = NodeConfig {
                advertise: Some(bad.into()),
                ..NodeConfig::default()
            };
            refused(&c, "advertise");
        }
    }

    #[test]
    fn an_unspecified_mesh_listen_needs_mesh_advertise_with_redis() {
        for listen in ["0.0.0.0:7500", "[::]:7500", "10.0.0.1:0"] {
            let mut c = redis_node(listen);
            refused(&c, "cluster.mesh_advertise");
            c.cluster.mesh_advertise = Some("10.0.0.1:7500".parse().expect("addr"));
            c.validate().expect("with mesh_advertise");
            assert_eq!(
                c.cluster.mesh_advertised(),
                Some("10.0.0.1:7500".parse().expect("addr"))
            );
        }
        let c = redis_node("10.0.0.1:7500");
        c.validate().expect("a specific mesh_listen");
        assert_eq!(c.cluster.mesh_advertised(), c.cluster.mesh_listen);
        let mut c = redis_node("0.0.0.0:7500");
        c.cluster.mesh_advertise = Some("0.0.0.0:7500".parse().expect("addr"));
        refused(&c, "cluster.mesh_advertise");
        let mut c = NodeConfig::default();
        c.cluster.mesh_advertise = Some("10.0.0.1:7500".parse().expect("addr"));
        refused(&c, "cluster.mesh_listen");
    }

    #[test]
    fn static_members_are_dialable_and_agree_with_mesh_advertise() {
        let mut c = NodeConfig::default();
        c.cluster.mesh_listen = Some("0.0.0.0:7500".parse().expect("addr"));
        c.cluster.members = vec![StaticMember {
            id: 1,
            mesh_addr: "10.0.0.1:7500".parse().expect("addr"),
            client_addr: "chat1.example.net:7400".into(),
            weight: 1,
            worker_id: None,
        }];
        c.validate()
            .expect("static members name their own mesh address");
        c.cluster.mesh_advertise = Some("10.0.0.2:7500".parse().expect("addr"));
        refused(&c, "cluster.mesh_advertise");
        c.cluster.mesh_advertise = Some("10.0.0.1:7500".parse().expect("addr"));
        c.validate().expect("the same address");
        c.cluster.members[0].mesh_addr = "0.0.0.0:7500".parse().expect("addr");
        c.cluster.mesh_advertise = None;
        refused(&c, "cluster.members.mesh_addr");
        c.cluster.members[0].mesh_addr = "10.0.0.1:7500".parse().expect("addr");
        c.cluster.members[0].client_addr = "0.0.0.0:7400".into();
        refused(&c, "cluster.members.client_addr");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut c = NodeConfig::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
        let c = NodeConfig {
            worker_id: Some(5000),
            ..NodeConfig::default()
        };
        assert!(c.validate().is_err());
        let mut c = NodeConfig::default();
        c.runtime.worker_threads = 1025;
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid(m)) if m.contains("runtime.worker_threads"))
        );
        assert_eq!(c.transport.loop_count(3), 3, "a loop per worker thread");
        assert_eq!(c.transport.loop_count(100), 64);
        c.transport.loops = 1;
        assert_eq!(c.transport.loop_count(3), 1, "loops set stays as set");
    }
}
