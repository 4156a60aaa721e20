//! Security checks a node makes before it serves anyone: secrets only its user can read,
//! created whole, and a mesh certificate that names the node.

mod common;

use std::os::unix::fs::PermissionsExt;

use meshchat_messaging::StartError;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

/// A node's first start writes its token key and the development CA keys owner-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_created_owner_only() {
    let node = common::TestNode::start().await;
    let dir = node.dir.path();
    for name in ["token.key", "ca.key"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    // The mesh CA is created with the first mesh identity.
    meshchat_messaging::tls::dev_mesh_identity(dir, 1).expect("mesh identity");
    assert_eq!(mode(&dir.join("mesh-ca.key")), 0o600);
    // Public halves stay readable.
    assert_eq!(mode(&dir.join("ca.pem")) & 0o044, 0o044);
}

/// Whoever can read the token key can mint a token for any account, and whoever can read a CA
/// key can sign a node: a node refuses to start on either when group or others can read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_a_secret_others_can_read() {
    for secret in ["token.key", "ca.key"] {
        let dir = tempfile::tempdir().expect("dir");
        // Created by a first start, then exposed.
        let first = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect("first start");
        first.shutdown().await;
        let path = dir.path().join(secret);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("readable by group or others") && text.contains(secret),
            "{secret}: {text}"
        );
        // Owner-only again: it starts.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let again = meshchat_messaging::start(common::config_in(dir.path()))
            .await
            .expect("starts once private");
        again.shutdown().await;
    }
}

/// An operator's mesh certificate must name the node (`node-<id>`), and its key must be
/// private: a node refuses to start otherwise, naming the file and the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_certificate_that_does_not_name_the_node_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = tempfile::tempdir().expect("pki");
    // Node 3's certificate, from the mesh CA of `pki`.
    let three = meshchat_messaging::tls::dev_mesh_identity(pki.path(), 3).expect("cert");
    let cert = pki.path().join("node.pem");
    let key = pki.path().join("node.key");
    let pem = |der: &[u8], label: &str| pem::encode(&pem::Pem::new(label, der));
    std::fs::write(&cert, pem(three.chain[0].as_ref(), "CERTIFICATE")).expect("cert");
    std::fs::write(&key, pem(three.key.secret_der(), "PRIVATE KEY")).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let config = |id: u32| {
        let mut c = common::config_in(dir.path());
        c.node_id = id;
        c.cluster.mesh_listen = Some(
            format!("127.0.0.1:{}", common::free_udp_port())
                .parse()
                .expect("addr"),
        );
        c.cluster.redis = None;
        c.cluster.members = vec![meshchat_messaging::config::StaticMember {
            id,
            mesh_addr: c.cluster.mesh_listen.expect("mesh"),
            client_addr: "127.0.0.1:1".into(),
            weight: 1,
            worker_id: None,
        }];
        c.cluster.ca = Some(pki.path().join(meshchat_messaging::tls::DEV_MESH_CA_CERT));
        c.cluster.cert = Some(cert.clone());
        c.cluster.key = Some(key.clone());
        c
    };
    let err = meshchat_messaging::start(config(1))
        .await
        .expect_err("node 1 with node 3's certificate");
    assert!(
        matches!(err, StartError::Tls(_)) && err.to_string().contains("does not name node-1"),
        "{err}"
    );
    // The same files as node 3: it starts.
    let three = meshchat_messaging::start(config(3))
        .await
        .expect("node 3 starts with its own certificate");
    three.shutdown().await;

    // A mesh key others can read is refused too.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let err = meshchat_messaging::start(config(3))
        .await
        .expect_err("exposed key");
    assert!(
        err.to_string().contains("readable by group or others"),
        "{err}"
    );
}
