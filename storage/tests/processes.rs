//! Multi-process tests of the embedded store: two node-like processes writing one store at
//! once, and a writer process killed with SIGKILL in the middle of group commits. They run the
//! real `meshchat-store` binary as child processes.

// The crash test reports the pause it measured.
#![allow(clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshchat-store");

fn write_load(dir: &std::path::Path, worker: u16, writers: u32, per_writer: u32) -> Child {
    write_load_with(dir, worker, writers, per_writer, &[])
}

fn write_load_with(
    dir: &std::path::Path,
    worker: u16,
    writers: u32,
    per_writer: u32,
    extra: &[&str],
) -> Child {
    Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(["write-load", "--worker", &worker.to_string()])
        .args(extra)
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
    sigkill(&mut child);
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

fn sigkill(child: &mut Child) {
    // `unsafe_code` is denied workspace-wide, so send the signal with kill(1), not libc::kill.
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        exit.signal(),
        Some(libc::SIGKILL),
        "the writer died by SIGKILL"
    );
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64
}

/// Three processes write one store; one is SIGKILLed in the middle of its batches (it may
/// hold the writer lock, or be half way through a commit). The other two must go on: the
/// longest pause in their acks around the kill is measured and bounded, and every write any
/// of the three acked is stored.
#[test]
fn a_writer_killed_mid_batch_stalls_the_others_only_briefly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for worker in 0..3u16 {
        let mut child = write_load_with(dir.path(), 10 + worker, 32, 100_000, &["--stamp"]);
        let stdout = child.stdout.take().expect("stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((usize::from(worker), line)).is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut acked: [Vec<(String, u64)>; 3] = Default::default();
    let record = |who: usize, line: String, acked: &mut [Vec<(String, u64)>; 3]| {
        let stamp = line
            .split_whitespace()
            .nth(3)
            .and_then(|v| v.parse().ok())
            .expect("stamped line");
        acked[who].push((line, stamp));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Every process is committing before the kill.
    while acked.iter().any(|a| a.len() < 500) && Instant::now() < deadline {
        let Ok((who, line)) = rx.recv_timeout(Duration::from_secs(5)) else {
            break;
        };
        record(who, line, &mut acked);
    }
    assert!(
        acked.iter().all(|a| a.len() >= 500),
        "every writer acked before the kill: {:?}",
        acked.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let killed_at = now_micros();
    sigkill(&mut children[0]);
    // The phase after the kill has its own deadline, however long the start took.
    let deadline = Instant::now() + Duration::from_secs(60);
    // The survivors go on: wait for 2,000 more acks from each.
    let after: [usize; 3] = [0, acked[1].len() + 2_000, acked[2].len() + 2_000];
    while (acked[1].len() < after[1] || acked[2].len() < after[2]) && Instant::now() < deadline {
        let Ok((who, line)) = rx.recv_timeout(Duration::from_secs(5)) else {
            break;
        };
        record(who, line, &mut acked);
    }
    for child in &mut children[1..] {
        sigkill(child);
    }
    // Whatever was printed before the kills was acked too.
    while let Ok((who, line)) = rx.recv_timeout(Duration::from_secs(5)) {
        record(who, line, &mut acked);
    }
    for survivor in 1..3 {
        assert!(
            acked[survivor].len() >= after[survivor],
            "survivor {survivor} stopped after the kill: {} acks",
            acked[survivor].len()
        );
        // The longest pause between two acks that spans or follows the kill.
        let stamps: Vec<u64> = acked[survivor].iter().map(|(_, t)| *t).collect();
        let stall = stamps
            .windows(2)
            .filter(|w| w[1] >= killed_at)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or(0);
        eprintln!("survivor {survivor}: longest pause in acks after the kill {stall} us");
        assert!(
            stall < 2_000_000,
            "survivor {survivor} stalled {stall} us after another writer was killed"
        );
    }
    let lines: Vec<String> = acked.into_iter().flatten().map(|(l, _)| l).collect();
    let summary = check(dir.path(), &lines);
    assert_eq!(
        summary.trim(),
        format!("checked {}, missing 0", lines.len())
    );
}
