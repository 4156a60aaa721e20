//! A small load test for CI: two spawned node processes, a few thousand real QUIC
//! connections, every scenario at once (`mixed`), and the harness's own checks: zero
//! acked-but-undelivered messages (by message id), no wrong ids, no duplicates, every
//! connection established. It runs the real `meshchat-loadtest` binary against real
//! `meshchat-node` processes and reads its JSON report.

use std::path::PathBuf;
use std::process::Command;

fn node_bin() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_meshchat-loadtest"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let bin = dir.join("meshchat-node");
    if !bin.exists() {
        // `cargo test -p meshchat-loadtest` alone does not build other packages' binaries.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "meshchat-messaging",
                "--bin",
                "meshchat-node",
            ])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building meshchat-node");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

#[test]
fn mixed_load_on_two_nodes_loses_nothing() {
    let out = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_meshchat-loadtest"))
        .args([
            "--spawn-nodes",
            "2",
            "--connections",
            "2000",
            "--ramp-rate",
            "1500",
            "--scenario",
            "mixed",
            "--duration",
            "10",
            "--rate",
            "300",
            "--channel-rate",
            "20",
            "--channels",
            "5",
            "--channel-size",
            "40",
            "--reconnect-share",
            "0.02",
            "--reconnect-every",
            "2",
            "--no-progress",
        ])
        .arg("--node-bin")
        .arg(node_bin())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("running meshchat-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "load test failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    let m = &report["messages"];
    let c = &report["connections"];
    assert_eq!(report["passed"], true, "{stdout}");
    assert_eq!(c["established"], 2000, "{c}");
    assert_eq!(m["acked_undelivered"], 0, "{m}");
    assert_eq!(m["id_mismatches"], 0, "{m}");
    assert_eq!(m["duplicates"], 0, "{m}");
    assert_eq!(m["send_failed"], 0, "{m}");
    // Traffic really flowed, on every path the scenarios cover.
    assert!(m["acked"].as_u64().expect("acked") > 1_000, "{m}");
    assert!(
        m["delivered"].as_u64().expect("delivered") > m["acked"].as_u64().expect("acked"),
        "channel fan-out delivers more pushes than messages: {m}"
    );
    assert!(report["reconnects"]["ok"].as_u64().expect("reconnects") > 0);
    assert_eq!(report["nodes"].as_array().expect("nodes").len(), 2);
    assert!(m["e2e_latency"]["p99_us"].as_u64().expect("p99") > 0);
    // Both nodes got users, and the HTML report has its plots.
    let per_node = c["per_node"].as_object().expect("per_node");
    assert_eq!(per_node.len(), 2, "{c}");
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html");
    assert!(
        html.matches("<svg").count() >= 5,
        "plots in the HTML report"
    );
}
