//! `meshchat-node dev`: a local cluster on loopback, for newcomers and tests. Node i (0-based)
//! gets node id i+1, serves clients on 127.0.0.1:(base_port + i) and the mesh on
//! 127.0.0.1:(base_port + 100 + i) (the load test's partition fault gives each node an
//! address and a network namespace of its own instead: [`DevCluster::hosts`],
//! [`DevCluster::netns`]); all share the data dir (one dev CA at `<data_dir>/ca.pem`,
//! one token secret) and one store: the embedded store in the data dir (default), or a
//! Cassandra/ScyllaDB keyspace ([`DevStorage::Cassandra`], migrated once before the nodes
//! start), the way production nodes share Cassandra.
//!
//! Membership is a static list, or Redis with `--redis URL` (nodes register, heartbeat and
//! can be added later with `meshchat-node run`).
//!
//! One node runs in this process. Several run as separate child processes
//! (`meshchat-node run --config <data_dir>/node-<id>.toml`), so a test can SIGKILL one; stopping
//! `dev` stops them all (SIGTERM, then SIGKILL after the grace period).

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{Backend, CassandraSettings, NodeConfig, StaticMember};
use crate::server::{RunningNode, StartError, start};

/// Where a dev cluster keeps state and history.
#[derive(Debug, Clone, Default)]
pub enum DevStorage {
    /// The embedded store in the data dir (default).
    #[default]
    Embedded,
    /// A Cassandra/ScyllaDB keyspace shared by every node; [`DevCluster::start`] (or
    /// [`DevCluster::prepare_storage`]) migrates its schema once before the nodes start.
    Cassandra(CassandraSettings),
}

/// Creates or upgrades the schema of the keyspace in `settings` (idempotent: a migrated
/// keyspace is left as it is). Returns the statements that ran.
pub async fn migrate_cassandra(settings: &CassandraSettings) -> Result<Vec<String>, StartError> {
    let cfg = settings.to_config()?;
    let session = meshchat_storage::cassandra::connect_session(&cfg).await?;
    Ok(meshchat_storage::cassandra::migrate(&session, &cfg, false).await?)
}

/// `auth.attempts_per_source_per_min` of a dev cluster's nodes (all its clients share one
/// loopback address; default 30).
pub const DEV_ATTEMPTS_PER_SOURCE_PER_MIN: u32 = 6_000;

/// `auth.attempts_per_source_burst` of a dev cluster's nodes (default 10).
pub const DEV_ATTEMPTS_PER_SOURCE_BURST: u32 = 1_000;

/// Settings of a dev cluster.
#[derive(Debug, Clone)]
pub struct DevCluster {
    /// How many nodes.
    pub nodes: u32,
    /// Shared data dir.
    pub data_dir: PathBuf,
    /// Client port of node 0; node i listens on base_port + i, its mesh on base_port + 100 + i.
    pub base_port: u16,
    /// Redis URL for dynamic membership; `None` = a static member list.
    pub redis: Option<String>,
    /// The store every node uses.
    pub storage: DevStorage,
    /// Node i's address (client and mesh); empty, or past its end: 127.0.0.1.
    pub hosts: Vec<Ipv4Addr>,
    /// Node i runs in network namespace `netns[i]` (`ip netns exec`; needs root); empty, or
    /// past its end: in this one. The load test's partition fault uses it.
    pub netns: Vec<String>,
    /// Admin HTTP listener of node 0 (TCP); node i's is `admin_base + i`, on its host. `None`
    /// (the default): no admin listeners. `meshchat-node dev` uses `base_port + 200`.
    pub admin_base: Option<u16>,
}

/// A running dev cluster.
#[derive(Debug)]
pub enum Running {
    /// One node in this process.
    InProcess(RunningNode),
    /// Child processes, one per node.
    Children(Vec<Child>),
}

impl DevCluster {
    /// A cluster of `nodes` on loopback from `base_port`, sharing `data_dir` and `storage`,
    /// with Redis membership on `redis` if given.
    pub fn new(
        nodes: u32,
        data_dir: PathBuf,
        base_port: u16,
        redis: Option<String>,
        storage: DevStorage,
    ) -> Self {
        Self {
            nodes,
            data_dir,
            base_port,
            redis,
            storage,
            hosts: Vec::new(),
            netns: Vec::new(),
            admin_base: None,
        }
    }

    /// Node `i`'s (0-based) address.
    fn host(&self, i: u32) -> Ipv4Addr {
        self.hosts
            .get(i as usize)
            .copied()
            .unwrap_or(Ipv4Addr::LOCALHOST)
    }

    fn members(&self) -> Vec<StaticMember> {
        (0..self.nodes)
            .map(|i| StaticMember {
                id: i + 1,
                mesh_addr: (self.host(i), self.base_port + 100 + i as u16).into(),
                client_addr: format!("{}:{}", self.host(i), self.base_port + i as u16),
                weight: 1,
                worker_id: None,
            })
            .collect()
    }

    fn check(&self) -> Result<(), StartError> {
        if self.nodes == 0 {
            return Err(StartError::Other("--nodes must be at least 1".into()));
        }
        if u32::from(self.base_port) + 100 + self.nodes > u32::from(u16::MAX)
            || self
                .admin_base
                .is_some_and(|a| u32::from(a) + self.nodes > u32::from(u16::MAX))
        {
            return Err(StartError::Other(
                "--base-port too high for that many nodes".into(),
            ));
        }
        Ok(())
    }

    /// The config of node `i` (0-based).
    pub fn node_config(&self, i: u32) -> NodeConfig {
        let mut c = NodeConfig {
            node_id: i + 1,
            listen: (self.host(i), self.base_port + i as u16).into(),
            data_dir: self.data_dir.clone(),
            ..NodeConfig::default()
        };
        // Every client of a dev cluster (the CLI, the load test) comes from this machine, from
        // one or a few loopback addresses: a per-source share of the handshake slots would cap
        // the whole cluster. The other admission rules stay.
        c.limits.max_handshakes_per_source =
            u32::try_from(c.limits.max_concurrent_handshakes).unwrap_or(u32::MAX);
        // Likewise the password attempts per source: every `Register` and `Login` of the
        // cluster's users comes from that address, so 10 at once and 30 a minute would refuse
        // a script that signs up a handful of users. The per-account login limits stay.
        c.auth.attempts_per_source_per_min = DEV_ATTEMPTS_PER_SOURCE_PER_MIN;
        c.auth.attempts_per_source_burst = DEV_ATTEMPTS_PER_SOURCE_BURST;
        c.admin.listen = self.admin_addr(i);
        if let DevStorage::Cassandra(settings) = &self.storage {
            c.storage.backend = Backend::Cassandra;
            c.storage.cassandra = settings.clone();
        }
        if self.nodes > 1 || self.redis.is_some() {
            c.cluster.mesh_listen = Some((self.host(i), self.base_port + 100 + i as u16).into());
            match &self.redis {
                Some(url) => c.cluster.redis = Some(url.clone()),
                None => c.cluster.members = self.members(),
            }
        }
        c
    }

    /// Node `i`'s (0-based) admin listener, if the cluster has them.
    pub fn admin_addr(&self, i: u32) -> Option<std::net::SocketAddr> {
        self.admin_base.map(|a| (self.host(i), a + i as u16).into())
    }

    /// The client addresses, by node id.
    pub fn addresses(&self) -> Vec<(u32, String)> {
        (0..self.nodes)
            .map(|i| {
                (
                    i + 1,
                    format!("{}:{}", self.host(i), self.base_port + i as u16),
                )
            })
            .collect()
    }

    /// Makes the store ready before any node starts: with [`DevStorage::Cassandra`], migrates
    /// the keyspace (once, so the nodes do not race to create it); nothing for the embedded
    /// store (each node opens it).
    pub async fn prepare_storage(&self) -> Result<(), StartError> {
        if let DevStorage::Cassandra(settings) = &self.storage {
            let ran = migrate_cassandra(settings).await?;
            tracing::info!(
                keyspace = %settings.keyspace,
                statements = ran.len(),
                "Cassandra schema migrated"
            );
        }
        Ok(())
    }

    /// Starts the cluster: prepares the store ([`Self::prepare_storage`]), then one node
    /// in-process, or one child process per node (`exe` is the `meshchat-node` binary; each
    /// child's log lines go to `log`). Returns once every node listens.
    pub async fn start(
        &self,
        exe: &Path,
        log: impl Fn(&str) + Send + Clone + 'static,
    ) -> Result<Running, StartError> {
        self.check()?;
        self.prepare_storage().await?;
        if self.nodes == 1 && self.redis.is_none() {
            return Ok(Running::InProcess(start(self.node_config(0)).await?));
        }
        self.start_processes(exe, log).map(Running::Children)
    }

    /// Starts every node as a child process (`exe run --config <data_dir>/node-<id>.toml`),
    /// even a single one (the load tester measures each node's own memory and CPU). Returns
    /// once every node listens; each child's log lines go to `log`. A Cassandra keyspace must
    /// be migrated first ([`Self::prepare_storage`]).
    pub fn start_processes(
        &self,
        exe: &Path,
        log: impl Fn(&str) + Send + Clone + 'static,
    ) -> Result<Vec<Child>, StartError> {
        self.check()?;
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| StartError::Other(format!("data dir: {e}")))?;
        // Generate the CAs and token secret once, before the nodes race to do it (they would
        // agree on one anyway; this keeps the logs quiet).
        crate::tls::dev_identity(&self.data_dir, &[])?;
        crate::tls::dev_mesh_identity(&self.data_dir, 0)?;
        crate::auth::Auth::load_or_create_secret(&self.node_config(0).secret_file())?;
        let mut children = Vec::new();
        for i in 0..self.nodes {
            match self.spawn_child(exe, i) {
                Ok(c) => children.push(c),
                Err(e) => {
                    stop_children(&mut children, Duration::from_secs(1));
                    return Err(e);
                }
            }
        }
        // Each child logs "listening" once its client endpoint is up; pass its log through.
        for child in &mut children {
            if let Err(e) = wait_listening(child, log.clone()) {
                stop_children(&mut children, Duration::from_secs(1));
                return Err(e);
            }
        }
        Ok(children)
    }

    /// Starts node `i` (0-based) alone as a child process, say again after it was killed;
    /// returns once it listens. The cluster's data dir, CA and secret must exist (a first
    /// [`Self::start_processes`] made them).
    pub fn spawn_node(
        &self,
        exe: &Path,
        i: u32,
        log: impl Fn(&str) + Send + Clone + 'static,
    ) -> Result<Child, StartError> {
        let mut child = self.spawn_child(exe, i)?;
        if let Err(e) = wait_listening(&mut child, log) {
            stop_children(std::slice::from_mut(&mut child), Duration::from_secs(1));
            return Err(e);
        }
        Ok(child)
    }

    /// Writes node `i`'s config and spawns `exe run --config <data_dir>/node-<id>.toml`.
    fn spawn_child(&self, exe: &Path, i: u32) -> Result<Child, StartError> {
        let path = self.data_dir.join(format!("node-{}.toml", i + 1));
        let toml = toml::to_string(&self.node_config(i))
            .map_err(|e| StartError::Other(format!("writing config: {e}")))?;
        std::fs::write(&path, toml)
            .map_err(|e| StartError::Other(format!("{}: {e}", path.display())))?;
        let mut cmd = match self.netns.get(i as usize) {
            Some(ns) => {
                let mut c = Command::new("ip");
                // `ip netns exec` execs the node: the child's pid is the node's.
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        if let Ok(filter) = std::env::var("RUST_LOG") {
            // A filter meant for the caller (say `warn,meshchat_client=debug`) must not hide
            // the lines callers wait for: "listening" here, "lease held: serving" in the load
            // test.
            cmd.env(
                "RUST_LOG",
                format!(
                    "{filter},meshchat_messaging::server=info,meshchat_backplane::membership_redis=info"
                ),
            );
        }
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| StartError::Other(format!("spawning node {}: {e}", i + 1)))
    }

    /// What to print once the cluster is up: addresses and the exact client commands.
    pub fn banner(&self, client_bin: &str) -> String {
        let ca = self.data_dir.join(crate::tls::DEV_CA_CERT);
        let addrs = self.addresses();
        let first = addrs.first().map(|a| a.1.clone()).unwrap_or_default();
        let mut s = format!(
            "meshchat dev cluster: {} node(s), data in {}\n",
            addrs.len(),
            self.data_dir.display()
        );
        if let DevStorage::Cassandra(c) = &self.storage {
            s.push_str(&format!(
                "  store: Cassandra {}, keyspace {}\n",
                c.nodes.join(","),
                c.keyspace
            ));
        }
        for (i, (id, addr)) in addrs.iter().enumerate() {
            s.push_str(&format!("  node {id}: {addr} (QUIC, ALPN meshchat/1)"));
            if let Some(admin) = self.admin_base {
                let host = self.host(i as u32);
                s.push_str(&format!(
                    ", admin http://{host}:{}/metrics",
                    admin + i as u16
                ));
            }
            s.push('\n');
        }
        let base = format!("{client_bin} --server {first} --ca {} --home", ca.display());
        s.push_str(&format!(
            "\nConnect (each user in its own shell; --home keeps that user's login; any node\n\
             redirects a user to its home node):\n\
             \x20 {base} /tmp/mc-alice register alice --password alicepass1\n\
             \x20 {base} /tmp/mc-bob register bob --password bobpass12\n\
             \x20 {base} /tmp/mc-bob listen\n\
             \x20 {base} /tmp/mc-alice send bob 'hello bob'\n\
             \x20 {base} /tmp/mc-bob chats\n\
             \nStop with Ctrl-C.\n"
        ));
        s
    }
}

/// Passes `child`'s log lines to `log` (from a thread) and waits up to 30 s for its
/// "listening" line.
fn wait_listening(
    child: &mut Child,
    log: impl Fn(&str) + Send + 'static,
) -> Result<(), StartError> {
    let Some(stderr) = child.stderr.take() else {
        return Ok(());
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening")
                && line.contains("meshchat_messaging::server")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
            log(&line);
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| StartError::Other("a node did not start within 30 s".into()))
}

/// SIGTERM every child, wait up to `grace`, then SIGKILL what is left.
pub fn stop_children(children: &mut [Child], grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for c in children.iter() {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dev cluster's nodes take password attempts from one source by the thousand (all its
    /// clients are on this machine) and keep the per-account login limits of any node.
    #[test]
    fn dev_nodes_allow_many_attempts_per_source_but_keep_per_account_limits() {
        let dev = DevCluster::new(
            3,
            PathBuf::from("/tmp/unused"),
            7600,
            None,
            DevStorage::Embedded,
        );
        let defaults = NodeConfig::default().auth;
        for i in 0..3 {
            let c = dev.node_config(i);
            assert_eq!(
                c.auth.attempts_per_source_burst,
                DEV_ATTEMPTS_PER_SOURCE_BURST
            );
            assert_eq!(
                c.auth.attempts_per_source_per_min,
                DEV_ATTEMPTS_PER_SOURCE_PER_MIN
            );
            assert_eq!(
                (
                    c.auth.logins_per_account_per_min,
                    c.auth.logins_per_account_burst
                ),
                (
                    defaults.logins_per_account_per_min,
                    defaults.logins_per_account_burst
                )
            );
            c.validate().expect("a dev node's config is valid");
        }
    }
}
