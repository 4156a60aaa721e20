//! The run's report: `report.json` (stable field names, documented in docs/PERFORMANCE.md)
//! and `report.html` (the same figures with plots drawn by `plotters`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::chaos::FaultEvent;
use crate::sampler::Sample;
use crate::tracker::{Latency, Outstanding};

/// Version of the JSON layout; bumped when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 2;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU cores online.
    pub cores: usize,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    /// Reads this machine's figures.
    pub fn this() -> Self {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| crate::sampler::kb_field(&m, "MemTotal:"))
            .unwrap_or(0);
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// Clients of killed nodes (chaos), and how long each took to serve again elsewhere.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Rehome {
    /// Connections the killed nodes held when they were killed.
    pub victims: u64,
    /// Of those, connections authenticated on another node before the run ended.
    pub rehomed: u64,
    /// Kill -> authenticated on another node (gap fill then runs in the background).
    pub latency: Latency,
}

/// Connection figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Connections {
    /// Asked for.
    pub requested: usize,
    /// Opened and authenticated.
    pub established: u64,
    /// Failed to open or authenticate.
    pub failed: u64,
    /// Seconds from the first to the last connection settled.
    pub ramp_secs: f64,
    /// Established per second of ramp.
    pub connects_per_sec: f64,
    /// Open when the traffic phase ended.
    pub open_at_end: usize,
    /// Most open at once (sampled).
    pub max_open: usize,
    /// Seconds the connections were held after the ramp.
    pub held_secs: f64,
    /// Dropped without being asked to.
    pub unplanned_disconnects: u64,
    /// Redirect pushes followed.
    pub redirects_followed: u64,
    /// Times a connection went silent (`Event::Silent`: the node may have died).
    pub silences: u64,
    /// Of those, sessions an early re-home moved (the rest: the node spoke again, or the
    /// attempt failed and the liveness timeout decided).
    pub early_rehomes: u64,
    /// Connect + authenticate time.
    pub handshake: Latency,
    /// Open connections per node address at the end of the ramp.
    pub per_node: BTreeMap<String, usize>,
}

/// A flood at ten times the send rate limit (chaos `flood:K`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Flood {
    /// Sends tried, once each.
    pub sent: u64,
    /// Accepted (tracked as any message: they must be delivered).
    pub acked: u64,
    /// Refused with `RATE_LIMITED`.
    pub rate_limited: u64,
    /// Failed otherwise.
    pub failed: u64,
    /// Not tried: 4,096 flood sends were in flight.
    pub skipped: u64,
}

/// Planned reconnects (`reconnect` scenario).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Reconnects {
    /// Succeeded.
    pub ok: u64,
    /// Failed.
    pub failed: u64,
    /// Close + connect + authenticate time.
    pub latency: Latency,
}

/// Message figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Messages {
    /// Sends started.
    pub sent: u64,
    /// Acked by a node.
    pub acked: u64,
    /// Failed after the client's retries.
    pub send_failed: u64,
    /// Pushes received (one per recipient device).
    pub delivered: u64,
    /// Acked messages some recipient never received (verified by message id). Must be 0.
    pub acked_undelivered: u64,
    /// Up to 20 of their ids.
    pub acked_undelivered_ids: Vec<u64>,
    /// Sends neither acked nor failed at the end.
    pub unresolved_sends: u64,
    /// A recipient received the same message twice.
    pub duplicates: u64,
    /// A sender's own message pushed to its new connection after a retry (correct).
    pub own_echoes: u64,
    /// A push's message id differed from the ack's.
    pub id_mismatches: u64,
    /// Pushes no ledger entry expected.
    pub unexpected: u64,
    /// Sends not started because `max_inflight` were in flight.
    pub generator_skipped: u64,
    /// Push sequence gaps reported by clients.
    pub gaps: u64,
    /// Acks per second over the traffic phase.
    pub acked_per_sec: f64,
    /// Send -> processed ack.
    pub ack_latency: Latency,
    /// Send -> every recipient received it.
    pub e2e_latency: Latency,
    /// Send -> one recipient received it.
    pub delivery_latency: Latency,
}

/// One node's memory and CPU.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeFigures {
    /// `node-<id>`.
    pub name: String,
    /// Pid.
    pub pid: u32,
    /// RSS before any connection, bytes.
    pub rss_before: u64,
    /// RSS with every connection open, after settling, before traffic, bytes.
    pub rss_held: u64,
    /// Highest RSS sampled, bytes.
    pub rss_max: u64,
    /// Connections homed on this node at the end of the ramp.
    pub connections: usize,
    /// (rss_held - rss_before) / connections, bytes.
    pub rss_per_connection: Option<f64>,
    /// Mean CPU over the traffic phase, percent of one core.
    pub cpu_traffic_pct: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// meshchat version.
    pub version: String,
    /// Unix ms when the run started.
    pub started_unix_ms: u64,
    /// The command line.
    pub command: Vec<String>,
    /// The machine.
    pub machine: Machine,
    /// Scenarios run.
    pub scenarios: Vec<String>,
    /// Settings (flags) of the run.
    pub settings: serde_json::Value,
    /// Whether the harness started the nodes.
    pub spawned_nodes: bool,
    /// Connections.
    pub connections: Connections,
    /// Planned reconnects.
    pub reconnects: Reconnects,
    /// Messages.
    pub messages: Messages,
    /// Chaos faults carried out, in order.
    pub faults: Vec<FaultEvent>,
    /// Re-home times of killed nodes' clients.
    pub rehome: Rehome,
    /// The flood, if the plan had one.
    pub flood: Flood,
    /// Nodes on this machine.
    pub nodes: Vec<NodeFigures>,
    /// Other processes sampled (`--watch-pid`, say the Cassandra server): CPU and RSS only.
    pub others: Vec<NodeFigures>,
    /// Errors by text, with counts.
    pub errors: BTreeMap<String, u64>,
    /// Whether the run passed its checks (zero acked-undelivered, no id mismatch, no
    /// duplicate, every connection established).
    pub passed: bool,
    /// Why not, when it did not.
    pub failures: Vec<String>,
    /// One sample per second.
    pub timeline: Vec<Sample>,
}

impl Report {
    /// Fills `passed` and `failures` from the figures.
    pub fn judge(&mut self, outstanding: &Outstanding) {
        let m = &self.messages;
        let mut f = Vec::new();
        if outstanding.acked_undelivered > 0 {
            f.push(format!(
                "{} acked messages were not delivered to every recipient",
                outstanding.acked_undelivered
            ));
        }
        if m.id_mismatches > 0 {
            f.push(format!(
                "{} pushes carried the wrong message id",
                m.id_mismatches
            ));
        }
        if m.duplicates > 0 {
            f.push(format!("{} duplicate deliveries", m.duplicates));
        }
        if self.rehome.rehomed < self.rehome.victims {
            f.push(format!(
                "{} of {} clients of killed nodes never served again elsewhere",
                self.rehome.victims - self.rehome.rehomed,
                self.rehome.victims
            ));
        }
        if self.flood.sent > 0 && self.flood.rate_limited == 0 {
            f.push(format!(
                "a flood of {} sends at ten times the rate limit was never refused",
                self.flood.sent
            ));
        }
        if let Some(bad) = self.faults.iter().find(|e| !e.ok) {
            f.push(format!("fault {:?} failed: {}", bad.fault, bad.detail));
        }
        if self.connections.established < self.connections.requested as u64 {
            f.push(format!(
                "{} of {} connections failed",
                self.connections.requested as u64 - self.connections.established,
                self.connections.requested
            ));
        }
        self.passed = f.is_empty();
        self.failures = f;
    }

    /// Where the reports are, for the summary line.
    pub fn out_note(&self, dir: &Path) -> String {
        format!("{0}/report.json, {0}/report.html", dir.display())
    }

    /// Writes `report.json` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("report.html"), self.html())?;
        Ok(())
    }

    /// The HTML report.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>meshchat load test</title>\
             <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}\
             table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\
             th{{text-align:left}}.bad{{color:#b00}}.ok{{color:#070}}</style></head><body>\
             <h1>meshchat load test</h1><p><code>{}</code></p>\
             <p>{} cores, {:.1} GiB, kernel {}; scenarios: {}; meshchat {}</p>",
            esc(&self.command.join(" ")),
            self.machine.cores,
            self.machine.memory_bytes as f64 / (1u64 << 30) as f64,
            esc(&self.machine.kernel),
            esc(&self.scenarios.join(", ")),
            esc(&self.version),
        );
        if self.passed {
            h.push_str("<p class=\"ok\"><b>PASSED</b>: zero acked-undelivered, no wrong ids, no duplicates, every connection established.</p>");
        } else {
            let _ = write!(
                h,
                "<p class=\"bad\"><b>FAILED</b>: {}</p>",
                esc(&self.failures.join("; "))
            );
        }
        let c = &self.connections;
        let m = &self.messages;
        h.push_str("<h2>Summary</h2><table>");
        let rows: Vec<(&str, String)> = vec![
            (
                "connections established / requested",
                format!("{} / {}", c.established, c.requested),
            ),
            ("connections failed", c.failed.to_string()),
            (
                "ramp",
                format!(
                    "{:.1} s ({:.0} connections/s)",
                    c.ramp_secs, c.connects_per_sec
                ),
            ),
            (
                "held after ramp",
                format!(
                    "{:.0} s, {} open at the end, max {}",
                    c.held_secs, c.open_at_end, c.max_open
                ),
            ),
            ("unplanned disconnects", c.unplanned_disconnects.to_string()),
            (
                "silent connections / moved early",
                format!("{} / {}", c.silences, c.early_rehomes),
            ),
            (
                "planned reconnects ok / failed",
                format!("{} / {}", self.reconnects.ok, self.reconnects.failed),
            ),
            (
                "messages sent / acked / failed",
                format!("{} / {} / {}", m.sent, m.acked, m.send_failed),
            ),
            (
                "acked per second (traffic phase)",
                format!("{:.0}", m.acked_per_sec),
            ),
            ("pushes delivered", m.delivered.to_string()),
            (
                "<b>acked but undelivered</b>",
                format!("<b>{}</b>", m.acked_undelivered),
            ),
            (
                "wrong ids / duplicates / unresolved",
                format!(
                    "{} / {} / {}",
                    m.id_mismatches, m.duplicates, m.unresolved_sends
                ),
            ),
            (
                "generator skipped (too many in flight)",
                m.generator_skipped.to_string(),
            ),
        ];
        for (k, v) in rows {
            let _ = write!(h, "<tr><th>{k}</th><td>{v}</td></tr>");
        }
        h.push_str("</table><h2>Latency (µs)</h2><table><tr><th></th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
        for (k, l) in [
            ("handshake (connect + auth)", &c.handshake),
            ("planned reconnect", &self.reconnects.latency),
            ("ack (send → processed)", &m.ack_latency),
            ("end-to-end (send → every recipient)", &m.e2e_latency),
            ("delivery (send → each recipient)", &m.delivery_latency),
        ] {
            let _ = write!(
                h,
                "<tr><th>{k}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            );
        }
        h.push_str("</table><h2>Nodes</h2><table><tr><th>node</th><th>connections</th><th>RSS before</th><th>RSS held</th><th>RSS max</th><th>RSS / connection</th><th>CPU in traffic</th></tr>");
        for n in &self.nodes {
            let _ = write!(
                h,
                "<tr><th>{}</th><td>{}</td><td>{:.1} MiB</td><td>{:.1} MiB</td><td>{:.1} MiB</td><td>{}</td><td>{:.0}%</td></tr>",
                esc(&n.name),
                n.connections,
                mib(n.rss_before),
                mib(n.rss_held),
                mib(n.rss_max),
                n.rss_per_connection
                    .map_or("-".into(), |b| format!("{b:.0} B")),
                n.cpu_traffic_pct
            );
        }
        h.push_str("</table>");
        if !self.errors.is_empty() {
            h.push_str("<h2>Errors</h2><table>");
            for (k, v) in &self.errors {
                let _ = write!(h, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
            }
            h.push_str("</table>");
        }
        h.push_str("<h2>Over time</h2>");
        let t: Vec<f64> = self.timeline.iter().map(|s| s.t_secs).collect();
        let series =
            |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { self.timeline.iter().map(f).collect() };
        h.push_str(&plot(
            "Connections open",
            "connections",
            &t,
            &[("open", series(&|s| s.connections_open as f64))],
        ));
        h.push_str(&plot(
            "Messages per second",
            "msg/s",
            &t,
            &[
                ("sent", series(&|s| s.sent_per_sec)),
                ("acked", series(&|s| s.acked_per_sec)),
                (
                    "delivered (per recipient)",
                    series(&|s| s.delivered_per_sec),
                ),
            ],
        ));
        h.push_str(&plot(
            "End-to-end latency per second (ms)",
            "ms",
            &t,
            &[
                ("p50", series(&|s| ms_or_gap(s.e2e_count, s.e2e_p50_us))),
                ("p99", series(&|s| ms_or_gap(s.e2e_count, s.e2e_p99_us))),
                ("ack p99", series(&|s| ms_or_gap(s.e2e_count, s.ack_p99_us))),
            ],
        ));
        let names: Vec<String> = self
            .timeline
            .iter()
            .flat_map(|s| s.procs.iter().map(|p| p.name.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let per_proc = |f: &dyn Fn(&crate::sampler::ProcSample) -> f64| -> Vec<(&str, Vec<f64>)> {
            names
                .iter()
                .map(|n| {
                    let v = self
                        .timeline
                        .iter()
                        .map(|s| s.procs.iter().find(|p| &p.name == n).map_or(f64::NAN, f))
                        .collect();
                    (n.as_str(), v)
                })
                .collect()
        };
        h.push_str(&plot(
            "RSS (MiB)",
            "MiB",
            &t,
            &per_proc(&|p| mib(p.rss_bytes)),
        ));
        h.push_str(&plot(
            "CPU (% of one core)",
            "%",
            &t,
            &per_proc(&|p| p.cpu_pct),
        ));
        h.push_str("</body></html>\n");
        h
    }
}

/// Microseconds as milliseconds; a gap in the line when the interval had no samples.
fn ms_or_gap(count: u64, us: u64) -> f64 {
    if count == 0 {
        f64::NAN
    } else {
        us as f64 / 1000.0
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line chart as inline SVG.
fn plot<S: AsRef<str>>(title: &str, unit: &str, t: &[f64], series: &[(S, Vec<f64>)]) -> String {
    let mut svg = String::new();
    let drawn = draw(&mut svg, title, unit, t, series);
    match drawn {
        Ok(()) => format!("<div>{svg}</div>"),
        Err(e) => format!("<p>{}: could not plot ({})</p>", esc(title), esc(&e)),
    }
}

fn draw<S: AsRef<str>>(
    out: &mut String,
    title: &str,
    unit: &str,
    t: &[f64],
    series: &[(S, Vec<f64>)],
) -> Result<(), String> {
    let x_max = t.iter().copied().fold(1.0_f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-3)
        * 1.1;
    let root = SVGBackend::with_string(out, (960, 300)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, v)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = t
            .iter()
            .zip(v)
            .filter(|(_, y)| y.is_finite())
            .map(|(&x, &y)| (x, y))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.as_ref())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
