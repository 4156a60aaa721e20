//! [`CassandraConfig`]: where the cluster is, which keyspace, how it is replicated, which
//! consistency requests use, and its validation.

use std::collections::BTreeMap;
use std::time::Duration;

use scylla::statement::{Consistency, SerialConsistency};

use super::error::ConfigError;

/// Default history bucket width: one day of Snowflake milliseconds.
pub const DEFAULT_BUCKET_WIDTH_MS: u64 = 86_400_000;
/// Smallest accepted bucket width (one minute). Anything from 1,024 ms up keeps every
/// bucket number of a 41-bit Snowflake timestamp inside a CQL `int`; narrower than a
/// minute only multiplies partitions.
pub const MIN_BUCKET_WIDTH_MS: u64 = 60_000;
/// Longest keyspace name Cassandra accepts.
const MAX_KEYSPACE_LEN: usize = 48;

/// How to reach and use the Cassandra/ScyllaDB cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CassandraConfig {
    /// Contact points, `host:port` (the driver discovers the rest of the cluster).
    pub nodes: Vec<String>,
    /// Keyspace holding every meshchat table (lowercase letters, digits, `_`).
    pub keyspace: String,
    /// The local datacenter: requests prefer its replicas (and `LOCAL_*` consistencies count
    /// it). `None` lets the driver use every datacenter.
    pub local_dc: Option<String>,
    /// Consistency of every read and write. Default `LOCAL_QUORUM`: an acked write is on a
    /// majority of the local replicas, and a `LOCAL_QUORUM` read sees it.
    pub consistency: Consistency,
    /// Consistency of the Paxos phase of lightweight transactions (name claims,
    /// idempotency keys, joins). Default `LOCAL_SERIAL`.
    pub serial_consistency: SerialConsistency,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
    /// Replication factor per datacenter, for `NetworkTopologyStrategy`. Only used when the
    /// migrator creates the keyspace.
    pub replication: BTreeMap<String, u32>,
    /// Width of one history partition in milliseconds (default one day). Fixed when the
    /// keyspace is created: a store refuses a config that disagrees with its keyspace.
    pub bucket_width_ms: u64,
    /// How long an idempotency key is remembered (default 7 days). A retry of an append
    /// later than this stores the message again.
    pub idempotency_ttl: Duration,
    /// Accept a replication factor below 3 or a consistency below quorum on a cluster that is
    /// not on this machine (default `false`: refused, because an acked write could then be
    /// lost with one node). A cluster whose every contact point is a loopback address counts
    /// as a development server and is always accepted.
    pub allow_weak_durability: bool,
}

/// Replicas per datacenter below which a non-local cluster is refused.
pub const MIN_PRODUCTION_RF: u32 = 3;

impl Default for CassandraConfig {
    /// A single local node (`127.0.0.1:9042`, datacenter `datacenter1`, replication 1):
    /// right for a dev container, not for production (use 3 replicas per datacenter).
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".to_owned()],
            keyspace: "meshchat".to_owned(),
            local_dc: None,
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            request_timeout: Duration::from_secs(5),
            replication: BTreeMap::from([("datacenter1".to_owned(), 1)]),
            bucket_width_ms: DEFAULT_BUCKET_WIDTH_MS,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            allow_weak_durability: false,
        }
    }
}

/// Default for [`CassandraConfig::idempotency_ttl`]: seven days.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Whether a contact point is on this machine (`127.0.0.0/8`, `::1`, `localhost`).
fn is_loopback(node: &str) -> bool {
    let host = node.rsplit_once(':').map_or(node, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl CassandraConfig {
    /// Checks every field; the first problem found is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nodes.is_empty() {
            return Err(bad("nodes: at least one contact point is needed"));
        }
        for node in &self.nodes {
            let Some((host, port)) = node.rsplit_once(':') else {
                return Err(bad(format!("nodes: {node:?} is not host:port")));
            };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(format!("nodes: {node:?} is not host:port")));
            }
        }
        let ks = &self.keyspace;
        let first_ok = ks
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if !first_ok
            || ks.len() > MAX_KEYSPACE_LEN
            || !ks
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(bad(format!(
                "keyspace: {ks:?} must be 1 to 48 of [a-z0-9_], not starting with a digit"
            )));
        }
        if let Some(dc) = &self.local_dc
            && dc.trim().is_empty()
        {
            return Err(bad("local_dc: empty name"));
        }
        if matches!(
            self.consistency,
            Consistency::Any | Consistency::Serial | Consistency::LocalSerial
        ) {
            return Err(bad(format!(
                "consistency: {} cannot serve both reads and writes",
                self.consistency
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(bad("request_timeout: must be above zero"));
        }
        if self.replication.is_empty() {
            return Err(bad("replication: at least one datacenter is needed"));
        }
        for (dc, rf) in &self.replication {
            if dc.is_empty() || dc.contains(['\'', '"', '\\']) {
                return Err(bad(format!("replication: bad datacenter name {dc:?}")));
            }
            if *rf == 0 {
                return Err(bad(format!("replication: {dc} needs at least 1 replica")));
            }
        }
        if let Some(dc) = &self.local_dc
            && !self.replication.contains_key(dc)
        {
            return Err(bad(format!(
                "local_dc: {dc} has no replicas in `replication`"
            )));
        }
        if self.bucket_width_ms < MIN_BUCKET_WIDTH_MS {
            return Err(bad(format!(
                "bucket_width_ms: at least {MIN_BUCKET_WIDTH_MS} (one minute)"
            )));
        }
        let ttl = self.idempotency_ttl.as_secs();
        if ttl == 0 || ttl > i32::MAX as u64 {
            return Err(bad(
                "idempotency_ttl: from 1 s to 68 years (a CQL TTL in seconds)",
            ));
        }
        if !self.is_dev() && !self.allow_weak_durability {
            if !matches!(
                self.consistency,
                Consistency::Quorum
                    | Consistency::LocalQuorum
                    | Consistency::EachQuorum
                    | Consistency::All
            ) {
                return Err(bad(format!(
                    "consistency: {} is below quorum: an acked write could be lost with one \
                     node (set allow_weak_durability to accept that)",
                    self.consistency
                )));
            }
            if let Some((dc, rf)) = self
                .replication
                .iter()
                .find(|(_, rf)| **rf < MIN_PRODUCTION_RF)
            {
                return Err(bad(format!(
                    "replication: {dc} has {rf} replicas; at least {MIN_PRODUCTION_RF} are needed \
                     for a quorum that survives one node (set allow_weak_durability to accept fewer)"
                )));
            }
        }
        Ok(())
    }

    /// A development server: every contact point is on this machine. Development servers
    /// may run with one replica and any consistency.
    pub fn is_dev(&self) -> bool {
        self.nodes.iter().all(|n| is_loopback(n))
    }

    /// The idempotency TTL in seconds, as CQL binds it.
    pub(crate) fn idempotency_ttl_secs(&self) -> i32 {
        i32::try_from(self.idempotency_ttl.as_secs()).unwrap_or(i32::MAX)
    }

    /// The keyspace's replication map in CQL:
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub fn replication_cql(&self) -> String {
        let mut out = String::from("{'class': 'NetworkTopologyStrategy'");
        for (dc, rf) in &self.replication {
            out.push_str(&format!(", '{dc}': {rf}"));
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        CassandraConfig::default()
            .validate()
            .expect("default valid");
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = CassandraConfig::default();
        type Edit = Box<dyn Fn(&mut CassandraConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("no nodes", Box::new(|c| c.nodes.clear())),
            ("no port", Box::new(|c| c.nodes = vec!["localhost".into()])),
            ("bad port", Box::new(|c| c.nodes = vec!["h:99999".into()])),
            ("port 0", Box::new(|c| c.nodes = vec!["h:0".into()])),
            ("empty host", Box::new(|c| c.nodes = vec![":9042".into()])),
            ("empty keyspace", Box::new(|c| c.keyspace.clear())),
            ("uppercase", Box::new(|c| c.keyspace = "Meshchat".into())),
            ("digit first", Box::new(|c| c.keyspace = "1ks".into())),
            ("injection", Box::new(|c| c.keyspace = "ks; DROP".into())),
            ("too long", Box::new(|c| c.keyspace = "k".repeat(49))),
            (
                "consistency any",
                Box::new(|c| c.consistency = Consistency::Any),
            ),
            ("serial", Box::new(|c| c.consistency = Consistency::Serial)),
            (
                "zero timeout",
                Box::new(|c| c.request_timeout = Duration::ZERO),
            ),
            ("no replication", Box::new(|c| c.replication.clear())),
            (
                "rf 0",
                Box::new(|c| {
                    c.replication.insert("dc1".into(), 0);
                }),
            ),
            (
                "quote in dc",
                Box::new(|c| {
                    c.replication.insert("dc'1".into(), 3);
                }),
            ),
            (
                "local dc unknown",
                Box::new(|c| c.local_dc = Some("dc9".into())),
            ),
            (
                "empty local dc",
                Box::new(|c| c.local_dc = Some(" ".into())),
            ),
            ("tiny bucket", Box::new(|c| c.bucket_width_ms = 1_000)),
            ("zero ttl", Box::new(|c| c.idempotency_ttl = Duration::ZERO)),
            (
                "remote rf 1",
                Box::new(|c| c.nodes = vec!["10.0.0.1:9042".into()]),
            ),
            (
                "remote consistency one",
                Box::new(|c| {
                    c.nodes = vec!["10.0.0.1:9042".into()];
                    c.replication = BTreeMap::from([("datacenter1".into(), 3)]);
                    c.consistency = Consistency::One;
                }),
            ),
            (
                "remote local_one",
                Box::new(|c| {
                    c.nodes = vec!["127.0.0.1:9042".into(), "db1:9042".into()];
                    c.replication = BTreeMap::from([("datacenter1".into(), 3)]);
                    c.consistency = Consistency::LocalOne;
                }),
            ),
            (
                "one remote dc with rf 2",
                Box::new(|c| {
                    c.nodes = vec!["db1:9042".into()];
                    c.replication = BTreeMap::from([("eu".into(), 3), ("us".into(), 2)]);
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut c = ok.clone();
            edit(&mut c);
            assert!(c.validate().is_err(), "{what} accepted");
        }
    }

    #[test]
    fn good_variants_are_accepted() {
        let mut c = CassandraConfig {
            nodes: vec![
                "10.0.0.1:9042".into(),
                "[::1]:9042".into(),
                "scylla:19042".into(),
            ],
            keyspace: "meshchat_test_1".into(),
            local_dc: Some("eu".into()),
            ..CassandraConfig::default()
        };
        c.replication = BTreeMap::from([("eu".into(), 3), ("us".into(), 2)]);
        assert!(
            c.validate().is_err(),
            "us has 2 replicas on a remote cluster"
        );
        c.allow_weak_durability = true;
        c.validate()
            .expect("valid when weak durability is accepted");
        assert_eq!(
            c.replication_cql(),
            "{'class': 'NetworkTopologyStrategy', 'eu': 3, 'us': 2}"
        );
        c.allow_weak_durability = false;
        c.replication.insert("us".into(), 3);
        c.validate().expect("valid with 3 replicas everywhere");
    }

    #[test]
    fn loopback_clusters_are_development_servers() {
        for nodes in [
            vec!["127.0.0.1:9042"],
            vec!["127.0.0.2:19042", "localhost:9042"],
            vec!["[::1]:9042"],
        ] {
            let c = CassandraConfig {
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                consistency: Consistency::One,
                ..CassandraConfig::default()
            };
            assert!(c.is_dev(), "{nodes:?}");
            c.validate().expect("a dev server may use RF 1 and ONE");
        }
        for nodes in [vec!["10.0.0.1:9042"], vec!["127.0.0.1:9042", "db:9042"]] {
            let c = CassandraConfig {
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                ..CassandraConfig::default()
            };
            assert!(!c.is_dev(), "{nodes:?}");
        }
    }
}
