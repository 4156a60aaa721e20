//! What a node tells others to dial, end to end: a node bound to every interface must be told
//! the address it is reached at, and then hands out that address.

mod common;

use common::{config_in, free_udp_port};
use meshchat_client::Client;
use meshchat_messaging::StartError;

/// The start-up refusal of `c`, which must name `key`.
async fn refused_at_start(c: meshchat_messaging::NodeConfig, key: &str) {
    match meshchat_messaging::start(c).await {
        Err(StartError::Config(e)) => {
            let m = e.to_string();
            assert!(m.contains(key), "{key:?} not named in {m:?}");
        }
        Err(e) => panic!("{key}: refused for another reason: {e}"),
        Ok(_) => panic!("{key}: the node started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_every_interface_without_advertise_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let mut c = config_in(dir.path());
        c.listen = listen.parse().expect("addr");
        refused_at_start(c, "advertise").await;
    }
    // Redis membership publishes the mesh address: never 0.0.0.0 (nothing dials Redis before
    // the refusal).
    let mut c = config_in(dir.path());
    c.cluster.redis = Some("redis://127.0.0.1:1/".into());
    c.cluster.mesh_listen = Some("0.0.0.0:0".parse().expect("addr"));
    refused_at_start(c, "cluster.mesh_advertise").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_every_interface_hands_out_its_advertised_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_udp_port();
    let advertised = format!("127.0.0.1:{port}");
    let mut c = config_in(dir.path());
    c.listen = format!("0.0.0.0:{port}").parse().expect("addr");
    c.advertise = Some(advertised.clone());
    let running = meshchat_messaging::start(c).await.expect("node starts");
    let ca = meshchat_client::load_ca(&dir.path().join("ca.pem")).expect("dev CA");
    let (client, _events) = Client::connect(&advertised, meshchat_client::ConnectOptions::new(ca))
        .await
        .expect("connect at the advertised address");
    client
        .register("alice", "password-123")
        .await
        .expect("register");
    let home = client.where_is("alice").await.expect("where is");
    assert_eq!(home.address, advertised, "not the bound 0.0.0.0");
    drop(client);
    running.shutdown().await;
}
