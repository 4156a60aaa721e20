//! # meshchat-loadtest
//!
//! Owns `meshchat-loadtest`: opens many real QUIC connections to a running node, drives
//! scenarios, and reports what the node paid for them.
//!
//! Built so far: the `idle` scenario (open N authenticated connections over several client
//! endpoints, hold them, sample the node's RSS from `/proc/PID/status`) used to measure the
//! node's memory per idle connection. The traffic scenarios, HDR latency histograms, progress
//! bars and HTML reports come with the load-test issue.
//!
//! - [`idle`]: the idle-connections scenario.
//! - [`proc_rss`]: reading a process's resident memory.

pub mod idle;

/// Resident set size of process `pid` in bytes, from `/proc/PID/status` (`VmRSS`).
pub fn proc_rss(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("no VmRSS line"))
}
