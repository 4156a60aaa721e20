//! # meshchat-loadtest
//!
//! Owns `meshchat-loadtest`: opens many real QUIC connections to a meshchat cluster (one it
//! is pointed at, or one it starts), drives chat traffic, proves delivery message by message,
//! and reports what happened as JSON and HTML.
//!
//! - [`cluster`]: the cluster under test (external, or spawned node processes).
//! - [`chaos`]: faults on a plan (node kill and restart, partition and heal, Redis down and
//!   up, storage writes failing, a flood at ten times the rate limit) and re-home times.
//! - [`delay`]: a UDP relay adding a fixed delay each way (`meshchat-resume`: time to the
//!   first reply, 0-RTT against a full handshake).
//! - [`netns`]: network namespaces, a bridge and veth pairs for the partition fault.
//! - [`provision`]: synthetic users (store rows and minted tokens, no per-user hashing).
//! - [`fleet`]: the connections: endpoints, source addresses, paced ramp, event draining.
//! - [`scenario`]: `idle`, `direct`, `channel`, `reconnect`, `mixed` traffic generators.
//! - [`tracker`]: HDR histograms, counters and the delivery ledger (acked-undelivered).
//! - [`sampler`]: the once-a-second timeline, with node RSS and CPU from `/proc`.
//! - [`report`]: `report.json` and `report.html` (plots by `plotters`).
//! - [`run`]: one whole experiment.

pub mod chaos;
pub mod cluster;
pub mod delay;
pub mod fleet;
pub mod netns;
pub mod provision;
pub mod report;
pub mod run;
pub mod sampler;
pub mod scenario;
pub mod tracker;

/// Raises this process's open-file limit to its hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    Ok(hard)
}
