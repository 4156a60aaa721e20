//! Multi-process tests of the embedded store: two node-like processes writing one store at
//! once, and a writer process killed with SIGKILL in the middle of group commits. They run the
//! real `meshchat-store` binary as child processes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshchat-store");

fn write_load(dir: &std::path::Path, worker: u16, writers: u32, per_writer: u32) -> Child {
    Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(["write-load", "--worker", &worker.to_string()])
        .args(["--writers", &writers.to_string()])
        .args(["--per-writer", &per_writer.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn meshchat-store")
}

/// Runs `check` over `acked` lines in a fresh process; returns its summary line.
fn check(dir: &std::path::Path, acked: &[String]) -> String {
    let mut child = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .arg("check")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn check");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for line in acked {
            writeln!(stdin, "{line}").expect("write");
        }
    }
    let out = child.wait_with_output().expect("check output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "check failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn two_processes_write_one_store_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = write_load(dir.path(), 1, 8, 40);
    let b = write_load(dir.path(), 2, 8, 40);
    let mut acked = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "writer process failed");
        acked.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("acked "))
                .map(str::to_owned),
        );
    }
    assert_eq!(acked.len(), 2 * 8 * 40, "every write was acked");
    // A third process reads everything both wrote.
    assert_eq!(check(dir.path(), &acked).trim(), "checked 640, missing 0");
}

#[test]
fn sigkill_mid_batch_loses_no_acked_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Far more work than we let it finish: it is killed while batches are in flight.
    let mut child = write_load(dir.path(), 3, 64, 10_000);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 2_000 && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("acked ") => acked.push(line),
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    assert!(
        acked.len() >= 500,
        "the writer acked too little before the kill: {}",
        acked.len()
    );
    let pid = child.id() as libc::pid_t;
    // `unsafe_code` is denied workspace-wide, so send the signal with kill(1), not libc::kill.
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        exit.signal(),
        Some(libc::SIGKILL),
        "the writer really died by SIGKILL"
    );
    // Anything it printed after our last read was also acked; collect it too.
    for line in lines.map_while(Result::ok) {
        if line.starts_with("acked ") {
            acked.push(line);
        }
    }
    let summary = check(dir.path(), &acked);
    assert_eq!(
        summary.trim(),
        format!("checked {}, missing 0", acked.len())
    );
}
