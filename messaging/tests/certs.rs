//! `meshchat-node certs` makes a PKI a real cluster runs on: two nodes of a static cluster
//! start with the generated client-facing and mesh certificates (mutual TLS in the mesh), a
//! client trusting only the generated `ca.pem` registers on both and a message crosses the
//! mesh. Running it again writes nothing; `--renew` issues new leaves under the same CAs.

mod common;

use std::time::Duration;

use common::{config_in, next_message, text};
use meshchat_client::{Client, ConnectOptions};
use meshchat_idgen::ChatId;
use meshchat_messaging::certs::{self, NodeCerts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_cluster_runs_on_generated_certificates_and_renewal_keeps_the_cas() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    let nodes: Vec<NodeCerts> = ["1=localhost,127.0.0.1", "2=localhost,127.0.0.1"]
        .iter()
        .map(|s| s.parse().expect("node spec"))
        .collect();
    let written = certs::make(&pki, &nodes, 30, false).expect("certificates made");
    assert_eq!(written.len(), 4 + 4 * nodes.len(), "{written:?}");
    // Keys are owner-only (the node refuses a readable mesh key).
    for f in &written {
        if f.extension().is_some_and(|e| e == "key") {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(f).expect("key").permissions(),
            );
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
        }
    }

    let members = common::static_members(2);
    let mut running = Vec::new();
    for i in 0..2usize {
        let id = i as u32 + 1;
        // One data dir: the nodes share the embedded store and the token key, as the
        // processes of one host do.
        let mut c = config_in(&dir.path().join("data"));
        c.node_id = id;
        c.listen = members[i].client_addr.parse().expect("addr");
        c.tls.cert = Some(pki.join(format!("node-{id}.pem")));
        c.tls.key = Some(pki.join(format!("node-{id}.key")));
        c.cluster.mesh_listen = Some(members[i].mesh_addr);
        c.cluster.members = members.clone();
        c.cluster.ca = Some(pki.join("mesh-ca.pem"));
        c.cluster.cert = Some(pki.join(format!("mesh-node-{id}.pem")));
        c.cluster.key = Some(pki.join(format!("mesh-node-{id}.key")));
        running.push(meshchat_messaging::start(c).await.expect("node starts"));
    }
    common::wait_for("the mesh link", Duration::from_secs(10), || {
        running.iter().all(|n| {
            let mesh = n.mesh.as_ref().expect("mesh");
            let other = meshchat_idgen::NodeId(3 - mesh.me().0);
            mesh.peer_up(other)
        })
    })
    .await;

    // A client that trusts only the generated CA; users land on both nodes.
    let ca = meshchat_client::load_ca(&pki.join("ca.pem")).expect("generated CA");
    let ring = running[0].mesh.as_ref().expect("mesh").ring();
    let mut users = Vec::new();
    for i in 0..32 {
        let (c, e) = Client::connect(
            &running[0].addr.to_string(),
            ConnectOptions::new(ca.clone()),
        )
        .await
        .expect("TLS with the generated certificates");
        let s = c
            .register(&format!("c{i}"), "password-123")
            .await
            .expect("register");
        users.push((c, e, s));
        let homes: std::collections::BTreeSet<_> =
            users.iter().map(|u| ring.owner(u.2.user)).collect();
        if homes.len() == 2 {
            break;
        }
    }
    let (first, rest) = users.split_first_mut().expect("users");
    let other = rest
        .iter_mut()
        .find(|u| ring.owner(u.2.user) != ring.owner(first.2.user))
        .expect("a user homed on the other node");
    first
        .0
        .send(
            ChatId::direct(first.2.user, other.2.user),
            "across the mesh",
            None,
        )
        .await
        .expect("send");
    assert_eq!(text(&next_message(&mut other.1).await), "across the mesh");
    for n in running {
        n.shutdown().await;
    }

    // Again: nothing to write. Renewed: new leaves, the same CAs.
    assert!(
        certs::make(&pki, &nodes, 30, false)
            .expect("rerun")
            .is_empty()
    );
    let ca_before = std::fs::read(pki.join("ca.pem")).expect("ca");
    let leaf_before = std::fs::read(pki.join("node-1.pem")).expect("leaf");
    let renewed = certs::make(&pki, &nodes, 30, true).expect("renew");
    assert_eq!(renewed.len(), 4 * nodes.len());
    assert_eq!(std::fs::read(pki.join("ca.pem")).expect("ca"), ca_before);
    assert_ne!(
        std::fs::read(pki.join("node-1.pem")).expect("leaf"),
        leaf_before
    );
    // Bad specs are refused with the reason.
    for bad in ["1", "x=a", "3=", "4=chat4.example.net:7400", "5=[::1]"] {
        let e = bad.parse::<NodeCerts>().expect_err(bad);
        assert!(e.contains(bad), "{e}");
    }
}
