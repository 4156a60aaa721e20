//! The cluster under test: one the operator runs (`--server`, `--ca`, `--token-secret`), or
//! a local one the harness starts itself (`--spawn-nodes N`: N `meshchat-node` processes on
//! loopback sharing an embedded store in a fresh data dir, stopped when the run ends).

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use meshchat_messaging::dev::{DevCluster, stop_children};
use parking_lot::Mutex;

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
    /// Embedded store directory, when the harness can provision users there.
    pub store_dir: Option<PathBuf>,
    spawned: Option<Spawned>,
}

#[derive(Debug)]
struct Spawned {
    children: Vec<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        stop_children(&mut self.children, Duration::from_secs(10));
    }
}

impl Target {
    /// A cluster someone else runs.
    pub fn external(
        servers: Vec<String>,
        ca: PathBuf,
        secret_file: &Path,
        node_pids: &[u32],
        store_dir: Option<PathBuf>,
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
            store_dir,
            spawned: None,
        })
    }

    /// Starts `n` node processes of `node_bin` in `data_dir` (a temp dir if `None`); their
    /// log lines go to `log_file`.
    pub fn spawn(
        n: u32,
        node_bin: &Path,
        data_dir: Option<PathBuf>,
        log_file: &Path,
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
        let base_port = free_base_port(n)?;
        let dev = DevCluster {
            nodes: n,
            data_dir: data_dir.clone(),
            base_port,
            redis: None,
        };
        let log = Arc::new(Mutex::new(
            std::fs::File::create(log_file).map_err(io(log_file))?,
        ));
        let children = dev
            .start_processes(node_bin, move |line| {
                let _ = writeln!(log.lock(), "{line}");
            })
            .map_err(|e| ClusterError::Start(e.to_string()))?;
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
            store_dir: Some(data_dir),
            spawned: Some(Spawned {
                children,
                _tmp: tmp,
            }),
        })
    }

    /// Whether the harness started these nodes.
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    /// Stops spawned nodes (SIGTERM, then SIGKILL after the grace period).
    pub fn stop(&mut self) {
        self.spawned = None;
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
            .is_ok();
        if free {
            return Ok(base);
        }
    }
    Err(ClusterError::NoPorts(n))
}
