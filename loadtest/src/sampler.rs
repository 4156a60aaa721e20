//! Once a second: connections open, message rates, interval latency percentiles, and each
//! node's RSS and CPU (from `/proc/PID`), kept as the run's timeline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::fleet::Fleet;
use crate::tracker::{Counters, Tracker};

/// RSS and cumulative CPU time of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Resident set size, bytes.
    pub rss: u64,
    /// User + system CPU time, clock ticks.
    pub cpu_ticks: u64,
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v > 0)
        .unwrap_or(100)
}

/// Reads `/proc/PID/stat` (CPU) and `/proc/PID/status` (`VmRSS`).
pub fn proc_stat(pid: u32) -> std::io::Result<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| std::io::Error::other("bad /proc stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), so utime (14) and stime (15) sit at 11, 12.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcStat {
        rss: proc_rss(pid)?,
        cpu_ticks: tick(11) + tick(12),
    })
}

/// Resident set size of process `pid` in bytes, from `/proc/PID/status` (`VmRSS`).
pub fn proc_rss(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    kb_field(&status, "VmRSS:").ok_or_else(|| std::io::Error::other("no VmRSS line"))
}

/// The value of a `Key:   123 kB` line of a `/proc` file (`status`, `meminfo`), in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// One process's figures in a sample.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcSample {
    /// Label: `node-<id>` or `loadgen`.
    pub name: String,
    /// RSS, bytes.
    pub rss_bytes: u64,
    /// CPU over the last interval, percent of one core.
    pub cpu_pct: f64,
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_secs: f64,
    /// Phase: `ramp`, `traffic` or `drain`.
    pub phase: String,
    /// Connections open now.
    pub connections_open: usize,
    /// Messages sent per second over the interval.
    pub sent_per_sec: f64,
    /// Acks per second.
    pub acked_per_sec: f64,
    /// Pushes received per second (one per recipient).
    pub delivered_per_sec: f64,
    /// Messages in the ledger (not yet acked and delivered everywhere).
    pub in_flight: usize,
    /// Messages completed (acked and delivered everywhere) in the interval.
    pub e2e_count: u64,
    /// End-to-end latency of messages completed in the interval: median, µs.
    pub e2e_p50_us: u64,
    /// 99th percentile, µs.
    pub e2e_p99_us: u64,
    /// Maximum, µs.
    pub e2e_max_us: u64,
    /// Ack latency 99th percentile in the interval, µs.
    pub ack_p99_us: u64,
    /// The nodes and the load generator.
    pub procs: Vec<ProcSample>,
}

/// A process the sampler watches.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Label.
    pub name: String,
    /// Pid.
    pub pid: u32,
}

/// The sampler's shared state.
#[derive(Debug)]
pub struct Sampler {
    started: Instant,
    phase: Mutex<String>,
    /// The timeline so far.
    pub samples: Mutex<Vec<Sample>>,
    /// Live summary line for the progress bar.
    pub line: Mutex<String>,
}

impl Sampler {
    /// A sampler whose clock starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            phase: Mutex::new("ramp".into()),
            samples: Mutex::new(Vec::new()),
            line: Mutex::new(String::new()),
        })
    }

    /// Sets the phase label of the following samples.
    pub fn set_phase(&self, phase: &str) {
        *self.phase.lock() = phase.into();
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Samples every second until the task is aborted; `tick` runs after each sample.
    pub async fn run(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        tracker: Arc<Tracker>,
        watched: Vec<Watched>,
        tick: impl Fn(&Sample) + Send + 'static,
    ) {
        let hz = clock_ticks() as f64;
        let mut last_cpu: Vec<Option<u64>> = vec![None; watched.len()];
        let mut last = Instant::now();
        let c = &tracker.counters;
        let (mut sent0, mut acked0, mut deliv0) = (0, 0, 0);
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let now = Instant::now();
            let dt = (now - last).as_secs_f64().max(1e-3);
            last = now;
            let (sent, acked, deliv) = (
                Counters::get(&c.sent),
                Counters::get(&c.acked),
                Counters::get(&c.delivered),
            );
            let (e2e, ack) = tracker.take_interval();
            let mut procs = Vec::new();
            for (w, prev) in watched.iter().zip(last_cpu.iter_mut()) {
                if let Ok(s) = proc_stat(w.pid) {
                    let cpu = prev.map_or(0.0, |p| {
                        (s.cpu_ticks.saturating_sub(p)) as f64 / hz / dt * 100.0
                    });
                    *prev = Some(s.cpu_ticks);
                    procs.push(ProcSample {
                        name: w.name.clone(),
                        rss_bytes: s.rss,
                        cpu_pct: cpu,
                    });
                }
            }
            let sample = Sample {
                t_secs: self.elapsed(),
                phase: self.phase.lock().clone(),
                connections_open: fleet.open_now(),
                sent_per_sec: (sent - sent0) as f64 / dt,
                acked_per_sec: (acked - acked0) as f64 / dt,
                delivered_per_sec: (deliv - deliv0) as f64 / dt,
                in_flight: tracker.in_flight(),
                e2e_count: e2e.count,
                e2e_p50_us: e2e.p50_us,
                e2e_p99_us: e2e.p99_us,
                e2e_max_us: e2e.max_us,
                ack_p99_us: ack.p99_us,
                procs,
            };
            (sent0, acked0, deliv0) = (sent, acked, deliv);
            tick(&sample);
            self.samples.lock().push(sample);
        }
    }
}
