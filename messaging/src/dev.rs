//! `meshchat-node dev`: a local cluster on loopback with the embedded store, for newcomers and
//! tests. Node i (0-based) gets node id i+1 and listens on 127.0.0.1:(base_port + i); all
//! share the data dir (one store, one dev CA at `<data_dir>/ca.pem`, one token secret).

use std::path::{Path, PathBuf};

use crate::config::NodeConfig;
use crate::server::{RunningNode, StartError, start};

/// Settings of a dev cluster.
#[derive(Debug, Clone)]
pub struct DevCluster {
    /// How many nodes.
    pub nodes: u32,
    /// Shared data dir.
    pub data_dir: PathBuf,
    /// Port of node 0; node i listens on base_port + i.
    pub base_port: u16,
}

impl DevCluster {
    /// The config of node `i` (0-based).
    pub fn node_config(&self, i: u32) -> NodeConfig {
        let port = self.base_port + i as u16;
        NodeConfig {
            node_id: i + 1,
            listen: ([127, 0, 0, 1], port).into(),
            data_dir: self.data_dir.clone(),
            ..NodeConfig::default()
        }
    }

    /// Starts the cluster's nodes in this process.
    pub async fn start(&self) -> Result<Vec<RunningNode>, StartError> {
        if self.nodes == 0 {
            return Err(StartError::Other("--nodes must be at least 1".into()));
        }
        if self.nodes > 1 {
            return Err(StartError::Other(
                "more than one node needs the mesh backplane, which is not built yet; use --nodes 1"
                    .into(),
            ));
        }
        if u32::from(self.base_port) + self.nodes > u32::from(u16::MAX) {
            return Err(StartError::Other(
                "--base-port too high for that many nodes".into(),
            ));
        }
        let mut running = Vec::new();
        for i in 0..self.nodes {
            running.push(start(self.node_config(i)).await?);
        }
        Ok(running)
    }

    /// What to print once the cluster is up: addresses and the exact client commands.
    pub fn banner(&self, running: &[RunningNode], client_bin: &str) -> String {
        let ca = self.data_dir.join(crate::tls::DEV_CA_CERT);
        let first = running
            .first()
            .map(|r| r.addr.to_string())
            .unwrap_or_default();
        let mut s = format!(
            "meshchat dev cluster: {} node(s), data in {}\n",
            running.len(),
            display(&self.data_dir)
        );
        for r in running {
            s.push_str(&format!(
                "  node {}: {} (QUIC, ALPN meshchat/1)\n",
                r.node.config().node_id,
                r.addr
            ));
        }
        let base = format!("{client_bin} --server {first} --ca {} --home", display(&ca));
        s.push_str(&format!(
            "\nConnect (each user in its own shell; --home keeps that user's login):\n\
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

fn display(p: &Path) -> String {
    p.display().to_string()
}
