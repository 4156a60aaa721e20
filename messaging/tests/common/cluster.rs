//! A static cluster of in-process nodes over a real QUIC mesh (mutual TLS with the dev CA),
//! one shared embedded store in a temp dir, and real clients following redirects.

use std::sync::Arc;
use std::time::Duration;

use meshchat_client::{Client, ConnectOptions, Events, Session};
use meshchat_idgen::{ChatId, NodeId};
use meshchat_messaging::{NodeConfig, RunningNode};

/// A user's client, its events and its session.
pub type User = (Arc<Client>, Events, Session);

pub struct Cluster {
    pub nodes: Vec<RunningNode>,
    pub dir: tempfile::TempDir,
}

pub async fn cluster(n: u32) -> Cluster {
    cluster_with(n, |_| {}).await
}

/// `n` nodes, each config passed through `tweak` before the node starts.
pub async fn cluster_with(n: u32, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("dir");
    let nodes = start_members(n, dir.path(), &tweak).await;
    // Wait for every link (lower ids dial higher ones).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for node in &nodes {
        let mesh = node.mesh.as_ref().expect("mesh");
        for peer in 1..=n {
            if peer == mesh.me().0 {
                continue;
            }
            while !mesh.peer_up(NodeId(peer)) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "mesh link {} -> {peer} never came up",
                    mesh.me().0
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Cluster { nodes, dir }
}

/// Starts `n` nodes on free ports. A port found free can be taken by another test's socket
/// before the node binds it: then every node of this try is stopped and the cluster starts
/// again on new ports (a few times).
async fn start_members(
    n: u32,
    dir: &std::path::Path,
    tweak: &impl Fn(&mut NodeConfig),
) -> Vec<RunningNode> {
    for _ in 0..5 {
        let members = super::static_members(n);
        let mut nodes = Vec::new();
        let mut clash = None;
        for m in &members {
            let mut c = super::config_in(dir);
            c.node_id = m.id;
            c.listen = m.client_addr.parse().expect("addr");
            c.cluster.mesh_listen = Some(m.mesh_addr);
            c.cluster.members = members.clone();
            tweak(&mut c);
            match meshchat_messaging::start(c).await {
                Ok(node) => nodes.push(node),
                Err(e) if address_in_use(&e) => {
                    clash = Some(e.to_string());
                    break;
                }
                Err(e) => panic!("node {} starts: {e}", m.id),
            }
        }
        let Some(clash) = clash else { return nodes };
        tracing::warn!(%clash, "a port was taken before the node bound it: starting again");
        for node in nodes {
            node.shutdown().await;
        }
    }
    panic!("5 tries to start {n} nodes each met a port taken before it was bound");
}

/// Whether `e` (or what caused it) is an address already in use.
pub fn address_in_use(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

impl Cluster {
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new(
            meshchat_client::load_ca(&self.dir.path().join("ca.pem")).expect("dev CA"),
        )
    }

    /// Registers `name` through node 1; the client follows the redirect to its home.
    pub async fn user(&self, name: &str) -> (Client, Events, Session) {
        let (c, e) = Client::connect(&self.nodes[0].addr.to_string(), self.options())
            .await
            .expect("connect");
        let s = c.register(name, "password-123").await.expect("register");
        (c, e, s)
    }

    pub fn home_of(&self, client: &Client) -> NodeId {
        let addr = client.server();
        let i = self
            .nodes
            .iter()
            .position(|n| n.addr.to_string() == addr)
            .expect("connected to a member");
        NodeId(i as u32 + 1)
    }

    /// One user homed on node 1 and one on node 2, and their direct chat.
    pub async fn pair(&self) -> (User, User, ChatId) {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.addr.to_string()).collect();
        let mut users = super::one_user_homed_at_each(&addrs[0], &self.options(), &addrs)
            .await
            .into_iter();
        let a = users.next().expect("a user on node 1");
        let b = users.next().expect("a user on node 2");
        let chat = ChatId::direct(a.2.user, b.2.user);
        (a, b, chat)
    }

    pub fn mesh(&self, node: NodeId) -> &Arc<meshchat_backplane::mesh::Mesh> {
        self.nodes[node.0 as usize - 1].mesh.as_ref().expect("mesh")
    }
}
