//! `meshchat-node run` logs as `[log]` says: JSON lines (each one parses, with the message
//! and the node's span fields), and a SIGHUP re-reads `[log] level` from the config file and
//! applies it without a restart. A real node process; every wait is for a line, with a
//! deadline.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The next stderr line of the node that satisfies `want`, within 20 s.
fn line_where(lines: &mpsc::Receiver<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if want(&l) => return l,
            Ok(_) => {}
            Err(e) => panic!("no such log line within 20 s: {e}"),
        }
    }
}

#[test]
fn json_logs_and_a_log_level_reloaded_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    let config = |level: &str| {
        format!(
            "node_id = 4\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"{level}\"\n",
            dir.path().join("data").display().to_string()
        )
    };
    std::fs::write(&file, config("info")).expect("config written");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat-node"))
        .args(["run", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshchat-node starts");
    let stderr = child.stderr.take().expect("stderr");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // A failed assertion must not leave the node running.
    struct KillOnDrop(nix::unistd::Pid);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let guard = KillOnDrop(pid);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });

    let listening = line_where(&lines, |l| l.contains("listening"));
    let v: serde_json::Value = serde_json::from_str(&listening).expect("a JSON log line");
    assert_eq!(v["fields"]["message"], "listening", "{listening}");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["node"], 4, "{listening}");

    // A bad level is refused and the running one stays; a good one is applied.
    std::fs::write(&file, config("info,[")).expect("config written");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let refused = line_where(&lines, |l| l.contains("SIGHUP"));
    assert!(refused.contains("not reloaded"), "{refused}");
    std::fs::write(&file, config("debug")).expect("config written");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let applied = line_where(&lines, |l| l.contains("SIGHUP"));
    let v: serde_json::Value = serde_json::from_str(&applied).expect("a JSON log line");
    assert_eq!(
        v["fields"]["message"], "SIGHUP: configuration reloaded",
        "{applied}"
    );
    assert_eq!(v["fields"]["applied"], r#"["log.level"]"#, "{applied}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("node exits");
    // Reaped: its pid may be reused, never signal it again.
    std::mem::forget(guard);
    assert!(status.success(), "{status:?}");
}
