//! The cluster under test: one the operator runs (`--server`, `--ca`, `--token-secret`), or
//! a local one the harness starts itself (`--spawn-nodes N`: N `meshchat-node` processes on
//! loopback sharing one store, stopped when the run ends: an embedded store in a fresh data
//! dir, or with `--storage cassandra` a keyspace on a Cassandra server the operator runs,
//! migrated before the nodes start; with `--redis-membership` also a `redis-server` of its own
//! for membership).
//!
//! A spawned cluster can be hurt on purpose (the chaos faults): a node killed with SIGKILL
//! and started again, Redis stopped and started again (empty, as after a restart without
//! persistence), a node partitioned from the others and Redis and healed (the nodes then run
//! in network namespaces: [`crate::netns`]), the embedded store's write lock held by the
//! harness (every node's writes fail; reads go on).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use meshchat_messaging::dev::{DevCluster, DevStorage, stop_children};
use parking_lot::Mutex;

use crate::netns::Netns;
use crate::provision::Store;
use crate::sampler::Watched;

/// Why the cluster could not be reached or started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The nodes did not start.
    #[error("starting nodes: {0}")]
    Start(String),
    /// `redis-server` did not start.
    #[error("starting redis-server: {0}")]
    Redis(String),
    /// A fault names something the cluster does not have.
    #[error("fault: {0}")]
    Fault(String),
    /// The network namespaces could not be made or changed.
    #[error("network namespaces: {0}")]
    Netns(#[from] crate::netns::NetnsError),
    /// The store's write lock could not be taken.
    #[error("storage fault: {0}")]
    Storage(String),
    /// No free port range for the spawned nodes.
    #[error("no free port range on 127.0.0.1 for {0} nodes")]
    NoPorts(u32),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the harness needs to know about the cluster.
#[derive(Debug)]
pub struct Target {
    /// Client addresses of the nodes.
    pub servers: Vec<String>,
    /// The cluster CA (PEM).
    pub ca: PathBuf,
    /// The token signing secret.
    pub secret: Vec<u8>,
    /// Node processes on this machine, to sample.
    pub nodes: Vec<Watched>,
    /// The cluster's store, when the harness can provision users there.
    pub store: Option<Store>,
    /// Where the harness's clients send from (empty: loopback); set when the nodes run in
    /// network namespaces.
    pub client_ips: Vec<IpAddr>,
    spawned: Option<Spawned>,
    /// The embedded store's write lock, while a `storage-down` fault holds it.
    write_lock: Option<rusqlite::Connection>,
}

type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

struct Spawned {
    children: Vec<Child>,
    dev: DevCluster,
    bin: PathBuf,
    log: LogFn,
    redis: Option<RedisServer>,
    /// Dropped after the children are stopped (field order): a namespace is gone only
    /// once no process runs in it.
    netns: Option<Netns>,
    _tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned")
            .field("nodes", &self.children.len())
            .field("redis", &self.redis)
            .finish()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        stop_children(&mut self.children, Duration::from_secs(10));
    }
}

/// A `redis-server` of the harness's own on a free port, without persistence.
#[derive(Debug)]
pub struct RedisServer {
    ip: Ipv4Addr,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port of `ip`; returns once it accepts connections.
    pub fn start(ip: Ipv4Addr) -> Result<Self, ClusterError> {
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| ClusterError::Redis(e.to_string()))?
            .port();
        let mut r = Self {
            ip,
            port,
            child: None,
        };
        r.up()?;
        Ok(r)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.ip, self.port)
    }

    /// Starts it (again, empty) on its port and waits until it accepts connections.
    pub fn up(&mut self) -> Result<(), ClusterError> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                &self.ip.to_string(),
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                // Off the loopback only on the run's private bridge (crate::netns), which
                // exists only inside this machine; any local process can reach it there (a
                // test setup: no password, no data worth protecting).
                "--protected-mode",
                if self.ip.is_loopback() { "yes" } else { "no" },
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| ClusterError::Redis(format!("redis-server (is it installed?): {e}")))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.ip, self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(ClusterError::Redis(
                    "not accepting connections after 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills it (SIGKILL: everything in it is lost).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.down();
    }
}

impl Target {
    /// A cluster someone else runs.
    pub fn external(
        servers: Vec<String>,
        ca: PathBuf,
        secret_file: &Path,
        node_pids: &[u32],
        store: Option<Store>,
    ) -> Result<Self, ClusterError> {
        let secret = std::fs::read(secret_file).map_err(io(secret_file))?;
        Ok(Self {
            servers,
            ca,
            secret: secret.trim_ascii().to_vec(),
            nodes: node_pids
                .iter()
                .enumerate()
                .map(|(i, &pid)| Watched {
                    name: format!("node-{}", i + 1),
                    pid,
                })
                .collect(),
            store,
            client_ips: Vec::new(),
            spawned: None,
            write_lock: None,
        })
    }

    /// Starts `n` node processes of `node_bin` in `data_dir` (a temp dir if `None`) on
    /// `storage` (a Cassandra keyspace is migrated first), with Redis membership on a
    /// `redis-server` of their own if `redis`; their log lines go to `log_file`. With
    /// `netns`, each node runs in a network namespace of its own ([`crate::netns`]; needs
    /// root) and the harness's clients send from `client_sources` addresses of the bridge.
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn(
        n: u32,
        node_bin: &Path,
        data_dir: Option<PathBuf>,
        log_file: &Path,
        redis: bool,
        storage: DevStorage,
        netns: bool,
        client_sources: u8,
    ) -> Result<Self, ClusterError> {
        let (tmp, data_dir) = match data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("meshchat-loadtest-")
                    .tempdir()
                    .map_err(io(Path::new("temp dir")))?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let netns = if netns {
            Some(Netns::create(n as usize, client_sources)?)
        } else {
            None
        };
        // In namespaces every node has its own ports; on loopback they share them.
        let base_port = free_base_port(n)?;
        let redis = if redis {
            Some(RedisServer::start(
                netns.as_ref().map_or(Ipv4Addr::LOCALHOST, Netns::redis_ip),
            )?)
        } else {
            None
        };
        let mut dev = DevCluster::new(
            n,
            data_dir.clone(),
            base_port,
            redis.as_ref().map(RedisServer::url),
            storage,
        );
        // Admin listeners on TCP base + 200 + i: the drain fault calls them.
        dev.admin_base = Some(base_port + 200);
        if let Some(ns) = &netns {
            dev.hosts = (0..n as usize).map(|i| ns.node_ip(i)).collect();
            dev.netns = (0..n as usize).map(|i| ns.namespace(i)).collect();
        }
        dev.prepare_storage()
            .await
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        let file = Arc::new(Mutex::new(
            std::fs::File::create(log_file).map_err(io(log_file))?,
        ));
        let log: LogFn = Arc::new(move |line: &str| {
            let _ = writeln!(file.lock(), "{line}");
        });
        // With Redis, a node serves once its worker-id lease is held ("lease held: serving");
        // on a new Redis that is a lease TTL after it took the worker id, not at "listening".
        let serving = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut children = {
            let log = log.clone();
            let serving = serving.clone();
            dev.start_processes(node_bin, move |line| {
                if line.contains("lease held: serving") {
                    serving.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                log(line)
            })
            .map_err(|e| ClusterError::Start(e.to_string()))?
        };
        if redis.is_some() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while serving.load(std::sync::atomic::Ordering::Relaxed) < n {
                if tokio::time::Instant::now() > deadline {
                    // Not left running (in namespaces about to be removed, too).
                    stop_children(&mut children, Duration::from_secs(1));
                    return Err(ClusterError::Start(
                        "the nodes did not take their worker-id leases within 60 s".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let nodes = children
            .iter()
            .enumerate()
            .map(|(i, c)| Watched {
                name: format!("node-{}", i + 1),
                pid: c.id(),
            })
            .collect();
        let secret_file = dev.node_config(0).secret_file();
        let secret = std::fs::read(&secret_file).map_err(io(&secret_file))?;
        Ok(Self {
            servers: dev.addresses().into_iter().map(|(_, a)| a).collect(),
            ca: data_dir.join(meshchat_messaging::tls::DEV_CA_CERT),
            secret: secret.trim_ascii().to_vec(),
            nodes,
            store: Some(match &dev.storage {
                DevStorage::Embedded => Store::Embedded(data_dir),
                DevStorage::Cassandra(settings) => Store::Cassandra(settings.clone()),
            }),
            client_ips: netns.as_ref().map_or_else(Vec::new, |ns| {
                ns.client_ips().into_iter().map(IpAddr::V4).collect()
            }),
            spawned: Some(Spawned {
                children,
                dev,
                bin: node_bin.to_owned(),
                log,
                redis,
                netns,
                _tmp: tmp,
            }),
            write_lock: None,
        })
    }

    /// Whether the harness started these nodes.
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// Stops spawned nodes (SIGTERM, then SIGKILL after the grace period).
    pub fn stop(&mut self) {
        self.write_lock = None;
        self.spawned = None;
    }

    fn spawned(&mut self) -> Result<&mut Spawned, ClusterError> {
        self.spawned
            .as_mut()
            .ok_or_else(|| ClusterError::Fault("faults need --spawn-nodes".into()))
    }

    /// Kills node `i` (0-based) with SIGKILL and reaps it.
    pub fn kill_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let s = self.spawned()?;
        let child = s
            .children
            .get_mut(i)
            .ok_or_else(|| ClusterError::Fault(format!("no node {}", i + 1)))?;
        child
            .kill()
            .map_err(|e| ClusterError::Fault(format!("killing node {}: {e}", i + 1)))?;
        let _ = child.wait();
        Ok(())
    }

    /// Starts node `i` (0-based) again with its config; returns once it listens.
    pub fn restart_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let s = self.spawned()?;
        if i >= s.children.len() {
            return Err(ClusterError::Fault(format!("no node {}", i + 1)));
        }
        let log = s.log.clone();
        let child = s
            .dev
            .spawn_node(&s.bin, i as u32, move |line| log(line))
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        let pid = child.id();
        let old = std::mem::replace(&mut s.children[i], child);
        drop(old);
        if let Some(w) = self.nodes.get_mut(i) {
            w.pid = pid;
        }
        Ok(())
    }

    /// Drains node `i` (0-based): `POST /drain` on its admin listener (the node leaves the
    /// ring, its users are redirected), then waits up to `within` for the process to exit by
    /// itself, as a drained node does.
    pub async fn drain_node(&mut self, i: usize, within: Duration) -> Result<(), ClusterError> {
        let s = self.spawned()?;
        let admin = s
            .dev
            .admin_addr(i as u32)
            .ok_or_else(|| ClusterError::Fault("no admin listeners".into()))?;
        let (status, body) = meshchat_messaging::admin::call(admin, "POST", "/drain")
            .await
            .map_err(|e| ClusterError::Fault(format!("drain node {}: {e}", i + 1)))?;
        if status != 202 {
            return Err(ClusterError::Fault(format!(
                "drain node {}: refused ({status}): {}",
                i + 1,
                body.trim()
            )));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let child = self
                .spawned()?
                .children
                .get_mut(i)
                .ok_or_else(|| ClusterError::Fault(format!("no node {}", i + 1)))?;
            if child
                .try_wait()
                .map_err(|e| ClusterError::Fault(format!("node {}: {e}", i + 1)))?
                .is_some()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClusterError::Fault(format!(
                    "node {} did not stop within {within:?} of its drain",
                    i + 1
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the harness's Redis (its data is lost).
    pub fn redis_down(&mut self) -> Result<(), ClusterError> {
        self.redis()?.down();
        Ok(())
    }

    /// Starts the harness's Redis again, empty.
    pub fn redis_up(&mut self) -> Result<(), ClusterError> {
        self.redis()?.up()
    }

    /// Cuts node `i` (0-based) off from the other nodes and Redis ([`Netns::partition`]).
    pub fn partition(&mut self, i: usize) -> Result<(), ClusterError> {
        Ok(self.netns()?.partition(i)?)
    }

    /// Heals node `i`'s partition.
    pub fn heal(&mut self, i: usize) -> Result<(), ClusterError> {
        Ok(self.netns()?.heal(i)?)
    }

    fn netns(&mut self) -> Result<&mut Netns, ClusterError> {
        self.spawned()?.netns.as_mut().ok_or_else(|| {
            ClusterError::Fault("partitions need the nodes in network namespaces".into())
        })
    }

    /// Takes the embedded store's write lock from this process (`BEGIN EXCLUSIVE` on its
    /// database) and holds it until [`Self::storage_up`]: every node's writes wait, up to
    /// their busy timeout (10 s), then fail; reads go on (WAL). The way a stuck maintenance job or a
    /// hung disk looks to the nodes.
    pub fn storage_down(&mut self) -> Result<(), ClusterError> {
        let Some(Store::Embedded(dir)) = &self.store else {
            return Err(ClusterError::Fault(
                "storage faults need the embedded store".into(),
            ));
        };
        let path = dir.join(meshchat_storage::embedded::DB_FILE);
        let err = |e: rusqlite::Error| ClusterError::Storage(format!("{}: {e}", path.display()));
        let conn = rusqlite::Connection::open(&path).map_err(err)?;
        // The nodes' writer commits a batch every few milliseconds: the lock is free often.
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch("BEGIN EXCLUSIVE").map_err(err)?;
        self.write_lock = Some(conn);
        Ok(())
    }

    /// Releases the write lock of [`Self::storage_down`].
    pub fn storage_up(&mut self) -> Result<(), ClusterError> {
        match self.write_lock.take() {
            Some(conn) => conn
                .execute_batch("ROLLBACK")
                .map_err(|e| ClusterError::Storage(e.to_string())),
            None => Err(ClusterError::Fault(
                "storage-up without storage-down".into(),
            )),
        }
    }

    fn redis(&mut self) -> Result<&mut RedisServer, ClusterError> {
        self.spawned()?
            .redis
            .as_mut()
            .ok_or_else(|| ClusterError::Fault("Redis faults need --redis-membership".into()))
    }
}

/// A base port such that base..base+n and base+100..base+100+n are free UDP ports.
fn free_base_port(n: u32) -> Result<u16, ClusterError> {
    for _ in 0..50 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let ports = (0..n as u16).flat_map(|i| [base + i, base + 100 + i]);
        let free = ports
            .map(|p| UdpSocket::bind(("127.0.0.1", p)))
            .collect::<Result<Vec<_>, _>>()
            .is_ok()
            // The admin listeners (TCP).
            && (0..n as u16)
                .map(|i| std::net::TcpListener::bind(("127.0.0.1", base + 200 + i)))
                .collect::<Result<Vec<_>, _>>()
                .is_ok();
        if free {
            return Ok(base);
        }
    }
    Err(ClusterError::NoPorts(n))
}
