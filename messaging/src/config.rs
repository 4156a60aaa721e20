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
    /// UDP address the client endpoint binds (default `127.0.0.1:7400`).
    pub listen: SocketAddr,
    /// Address clients are told to use for this node (redirects, `dev` output). Default: the
    /// listen address.
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
    /// Every member, this node included.
    pub members: Vec<StaticMember>,
    /// Ring epoch of this static member list (raise it when the list changes).
    pub epoch: u64,
    /// Envelopes queued per peer before new ones are dropped (counted and logged;
    /// default 65,536).
    pub peer_queue: usize,
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
            members: Vec::new(),
            epoch: 1,
            peer_queue: 65_536,
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
        }
    }
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
    /// Earlier token secrets, still accepted for verification while their tokens live (key
    /// rotation: make the new secret `secret_file`, list the old one here, drop it after
    /// `token_ttl`). Each must be owner-only, like the current one.
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
    /// Failed authentications (bad credentials or token) one connection may make; the next
    /// closes it (default 5).
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
    /// Live client connections per node (`UNAVAILABLE` beyond; default 200,000).
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
            max_inflight_per_conn: 32,
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
        }
    }
}

impl NodeConfig {
    /// Defaults, then `file` (if any), then `MESHCHAT_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig = fig.merge(Env::prefixed("MESHCHAT_").split("__").ignore(&[
            "home",
            "password",
            "cql_nodes",
        ]));
        let config: NodeConfig = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.worker_id() > meshchat_idgen::MAX_WORKER {
            return bad("worker_id must be 0..=1023");
        }
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024");
        }
        if l.max_body_bytes == 0 || l.max_body_bytes + 1024 > l.max_frame_bytes {
            return bad("limits.max_body_bytes must be > 0 and leave 1 KiB of a frame for headers");
        }
        if l.max_page_size == 0 || l.default_page_size == 0 || l.default_page_size > l.max_page_size
        {
            return bad("limits.default_page_size must be 1..=max_page_size");
        }
        if l.send_rate_per_sec == 0 || l.send_burst == 0 {
            return bad("limits.send_rate_per_sec and send_burst must be > 0");
        }
        if l.outbound_queue == 0 || l.max_inflight_per_conn == 0 || l.max_connections == 0 {
            return bad(
                "limits.outbound_queue, max_inflight_per_conn, max_connections must be > 0",
            );
        }
        if l.max_concurrent_handshakes == 0 || l.max_handshakes_per_source == 0 {
            return bad(
                "limits.max_concurrent_handshakes and max_handshakes_per_source must be > 0",
            );
        }
        if self.auth.token_ttl.as_secs() == 0 || self.auth.max_login_lifetime.as_secs() == 0 {
            return bad("auth.token_ttl and auth.max_login_lifetime must be at least 1 s");
        }
        if l.handshake_timeout.is_zero() {
            return bad("limits.handshake_timeout must be > 0");
        }
        if self.transport.stream_receive_window < l.max_frame_bytes + 4 {
            return bad("transport.stream_receive_window must hold one whole max frame");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key go together");
        }
        let c = &self.cluster;
        if [c.ca.is_some(), c.cert.is_some(), c.key.is_some()]
            .iter()
            .any(|set| *set != c.ca.is_some())
        {
            return bad("cluster.ca, cluster.cert and cluster.key go together");
        }
        let c = &self.cluster;
        if !c.members.is_empty() {
            if c.mesh_listen.is_none() {
                return bad("cluster.members needs cluster.mesh_listen");
            }
            if !c.members.iter().any(|m| m.id == self.node_id) {
                return bad("cluster.members must include this node's node_id");
            }
            let mut ids: Vec<u32> = c.members.iter().map(|m| m.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != c.members.len() {
                return bad("cluster.members has a node id twice");
            }
            if c.members.iter().any(|m| m.weight == 0) {
                return bad("cluster.members weights must be > 0");
            }
            let mut workers: Vec<u16> = c.members.iter().map(StaticMember::worker).collect();
            workers.sort_unstable();
            workers.dedup();
            if workers.len() != c.members.len() {
                return bad(
                    "cluster.members: two members share a Snowflake worker id (id % 1024, or \
                     worker_id): they would issue duplicate ids",
                );
            }
            if c.members
                .iter()
                .any(|m| m.id == self.node_id && m.worker() != self.worker_id())
            {
                return bad("worker_id differs from this node's entry in cluster.members");
            }
        }
        if c.peer_queue == 0 {
            return bad("cluster.peer_queue must be > 0");
        }
        if c.redis.is_some() {
            if !c.members.is_empty() {
                return bad("cluster.redis and cluster.members exclude each other");
            }
            if c.mesh_listen.is_none() {
                return bad("cluster.redis needs cluster.mesh_listen");
            }
            if c.heartbeat.is_zero() || c.member_ttl < c.heartbeat * 2 {
                return bad("cluster.member_ttl must be at least twice cluster.heartbeat");
            }
            if c.weight == 0 {
                return bad("cluster.weight must be > 0");
            }
        }
        if self.storage.backend == Backend::Cassandra {
            self.storage.cassandra.to_config()?;
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
    fn out_of_range_values_are_refused() {
        let mut c = NodeConfig::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
        let c = NodeConfig {
            worker_id: Some(5000),
            ..NodeConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
