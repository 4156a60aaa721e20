//! Network namespaces for the partition fault: every spawned node runs in a namespace of its
//! own, wired by a veth pair to a bridge in the harness's namespace. The harness (the load
//! generator's clients) and Redis stay in the harness's namespace, on addresses of the
//! bridge. Everything lives on one private /24 that exists only inside this machine
//! (`10.<a>.<b>.0/24`, a /24 with no route yet and names no link or namespace has yet, picked
//! at random per run, so two runs at once do not meet).
//!
//! ```text
//!  harness namespace:  bridge mc<tag>b   10.a.b.1 (clients), 10.a.b.2 (Redis), 10.a.b.3.. (more client sources)
//!      |-- veth mc<tag>h0 <-> mc<tag>p0 in namespace mc<tag>n0: node 1 on 10.a.b.10
//!      |-- veth mc<tag>h1 <-> mc<tag>p1 in namespace mc<tag>n1: node 2 on 10.a.b.11
//!      ...
//! ```
//!
//! A partition of node i is made in the kernel, silently, as a cut cable would be: in node
//! i's namespace the other nodes' and Redis's addresses get a permanent neighbour entry with
//! a MAC address nobody has, and in every other node's namespace node i's address does; the
//! bridge floods those frames and every port drops them. Nothing is refused or reset: the
//! node's Redis round and mesh links time out, as they would across a real partition. The
//! node's clients (in the harness's namespace) still reach it, so a partitioned node that
//! kept serving would be a split brain: it must fence itself. Healing deletes the entries.
//!
//! Needs root (`ip netns`, `ip link`). Made with `ip` from iproute2; torn down on drop.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use tracing::warn;

/// Why the namespaces could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {detail} (network namespaces need root and iproute2)")]
    Ip {
        /// Its arguments.
        args: String,
        /// Its stderr, or why it did not run.
        detail: String,
    },
    /// A node number out of range.
    #[error("no node {0} in the namespaces")]
    NoNode(usize),
}

/// A MAC address no interface has: frames to it are flooded by the bridge and dropped by
/// every port.
const NOWHERE_MAC: &str = "02:00:00:00:00:01";

/// The namespaces, the veth pairs and the bridge of one run.
#[derive(Debug)]
pub struct Netns {
    tag: String,
    net: [u8; 2],
    nodes: usize,
    client_sources: u8,
    partitioned: BTreeSet<usize>,
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip").args(args).output();
    let fail = |detail: String| NetnsError::Ip {
        args: args.join(" "),
        detail,
    };
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(fail(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Whether `ip <args>` prints anything (a route, a link, a namespace that exists).
fn ip_shows(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
}

impl Netns {
    /// Makes the bridge and one namespace per node (`nodes`), with `client_sources`
    /// addresses for the harness's clients (at least 1).
    pub fn create(nodes: usize, client_sources: u8) -> Result<Self, NetnsError> {
        let mut last = None;
        for _ in 0..20 {
            let r: u32 = rand::random();
            let n = Self {
                tag: format!("{:04x}", r & 0xffff),
                // 10.<200..=249>.<x>.0/24.
                net: [200 + ((r >> 16) % 50) as u8, (r >> 24) as u8],
                nodes,
                client_sources: client_sources.clamp(1, 6),
                partitioned: BTreeSet::new(),
            };
            // Taken by another run (or left by one that was killed): pick again, never
            // remove what may be another run's.
            let subnet = format!("10.{}.{}.0/24", n.net[0], n.net[1]);
            let namespaces = Command::new("ip")
                .args(["netns", "list"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if ip_shows(&["-4", "route", "show", &subnet])
                || ip_shows(&["link", "show", &n.bridge()])
                || namespaces.contains(&format!("mc{}n", n.tag))
            {
                continue;
            }
            match n.build() {
                Ok(()) => return Ok(n),
                Err(e) => {
                    n.teardown();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| NetnsError::Ip {
            args: "(choosing a subnet)".into(),
            detail: "no free 10.x.y.0/24 and names after 20 tries".into(),
        }))
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], host)
    }

    fn bridge(&self) -> String {
        format!("mc{}b", self.tag)
    }

    /// Node `i`'s (0-based) namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("mc{}n{i}", self.tag)
    }

    fn inner_dev(&self, i: usize) -> String {
        format!("mc{}p{i}", self.tag)
    }

    /// Node `i`'s (0-based) address.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.addr(10 + i as u8)
    }

    /// Where Redis listens.
    pub fn redis_ip(&self) -> Ipv4Addr {
        self.addr(2)
    }

    /// The harness's client source addresses.
    pub fn client_ips(&self) -> Vec<Ipv4Addr> {
        std::iter::once(self.addr(1))
            .chain((0..self.client_sources - 1).map(|k| self.addr(3 + k)))
            .collect()
    }

    fn build(&self) -> Result<(), NetnsError> {
        let br = self.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        // The first address is the source of the harness's packets on the bridge.
        for a in self
            .client_ips()
            .into_iter()
            .take(1)
            .chain([self.redis_ip()])
        {
            ip(&["addr", "add", &format!("{a}/24"), "dev", &br])?;
        }
        for a in self.client_ips().into_iter().skip(1) {
            ip(&["addr", "add", &format!("{a}/24"), "dev", &br])?;
        }
        ip(&["link", "set", &br, "up"])?;
        for i in 0..self.nodes {
            let (ns, inner) = (self.namespace(i), self.inner_dev(i));
            let outer = format!("mc{}h{i}", self.tag);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &br, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.node_ip(i)),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Removes everything (best effort: a veth pair goes with either end, and an end that
    /// never reached its namespace is deleted here).
    fn teardown(&self) {
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.namespace(i)]);
            let _ = ip(&["link", "del", &format!("mc{}h{i}", self.tag)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }

    /// The (namespace, device, address) triples that cut node `i` off: the others' and
    /// Redis's addresses as seen from `i`, and `i`'s as seen from each other node.
    fn cut(&self, i: usize) -> Vec<(String, String, Ipv4Addr)> {
        let mut v = vec![(self.namespace(i), self.inner_dev(i), self.redis_ip())];
        for j in (0..self.nodes).filter(|&j| j != i) {
            v.push((self.namespace(i), self.inner_dev(i), self.node_ip(j)));
            v.push((self.namespace(j), self.inner_dev(j), self.node_ip(i)));
        }
        v
    }

    /// Cuts node `i` (0-based) off from the other nodes and Redis; its clients still reach it.
    pub fn partition(&mut self, i: usize) -> Result<(), NetnsError> {
        if i >= self.nodes {
            return Err(NetnsError::NoNode(i + 1));
        }
        for (ns, dev, a) in self.cut(i) {
            let r = ip(&[
                "-n",
                &ns,
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                NOWHERE_MAC,
                "dev",
                &dev,
                "nud",
                "permanent",
            ]);
            if let Err(e) = r {
                // All or nothing: no half partition left behind.
                self.partitioned.insert(i);
                let _ = self.heal(i);
                return Err(e);
            }
        }
        self.partitioned.insert(i);
        Ok(())
    }

    /// Heals node `i`'s partition (neighbours are learnt again by ARP).
    pub fn heal(&mut self, i: usize) -> Result<(), NetnsError> {
        if i >= self.nodes {
            return Err(NetnsError::NoNode(i + 1));
        }
        let mut first = None;
        for (ns, dev, a) in self.cut(i) {
            // Another partition still cutting this pair keeps its entry.
            let other = if ns == self.namespace(i) {
                (0..self.nodes).find(|&j| self.node_ip(j) == a)
            } else {
                (0..self.nodes).find(|&j| self.namespace(j) == ns)
            };
            if other.is_some_and(|j| j != i && self.partitioned.contains(&j)) {
                continue;
            }
            // Every entry, even past one that fails (or was never made): the first error is
            // reported.
            if let Err(e) = ip(&["-n", &ns, "neigh", "del", &a.to_string(), "dev", &dev]) {
                first.get_or_insert(e);
            }
        }
        self.partitioned.remove(&i);
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown();
        if Command::new("ip")
            .args(["link", "show", &self.bridge()])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            warn!(bridge = %self.bridge(), "network namespaces of the run not fully removed");
        }
    }
}
