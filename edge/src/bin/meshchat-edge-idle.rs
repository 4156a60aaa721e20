//! Measures what an idle QUIC connection costs a server process: the endpoint loop
//! (`meshchat-edge`) against quinn's async layer, same TLS, same transport settings, back to
//! back in one run.
//!
//! ```sh
//! cargo run --release -p meshchat-edge --bin meshchat-edge-idle -- 10000
//! ```
//!
//! For each server kind (quinn's async layer; the loop; the loop with sessions that let go of
//! rustls after the handshake, `meshchat_edge::lean`) it starts this program again as the
//! server (`serve quinn|edge|edge-lean CERT KEY`, its own process, so the client side's memory is not counted), reads the server's
//! `VmRSS` from `/proc`, opens the connections (each opens its one bidirectional stream,
//! sends 5 bytes and reads them back, and keeps the stream open, as a chat client keeps its
//! session stream), waits until the server's RSS has not moved for a second, and prints the
//! RSS per connection. The quinn server does what the node does per connection: a task that
//! accepts the stream and echoes it, beside quinn's own driver task.
//!
//! Then a CPU phase: 1,000 of the connections each echo 100 bytes 200 times, one at a time, all
//! at once; the server's CPU time (user + system, `/proc/<pid>/stat`) over the echoes gives its
//! CPU per echoed message.

// The report is this tool's output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshchat_edge::tls::{
    client_config, lean_server_config, node_transport, self_signed, server_config,
};
use meshchat_edge::{Edge, echo::Echo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Connections opened per client endpoint (socket).
const PER_CLIENT_ENDPOINT: usize = 2_000;
/// Connections being set up at once.
const CONCURRENT: usize = 200;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("serve") => {
            let [_, kind, cert, key] = &args[..] else {
                bail!("usage: serve quinn|edge|edge-lean CERT KEY");
            };
            rt.block_on(serve(kind, Path::new(cert), Path::new(key)))
        }
        _ => {
            let n: usize = match args.first() {
                Some(n) => n.parse().context("connections: a number")?,
                None => 10_000,
            };
            rt.block_on(measure(n))
        }
    }
}

/// Runs a server until its standard input closes; prints `listening ADDR` once bound.
async fn serve(kind: &str, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let cert = CertificateDer::from(std::fs::read(cert)?);
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(std::fs::read(key)?));
    let config = server_config(cert.clone(), key.clone_key())?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // The parent closes our stdin to stop us.
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
        let _ = stop_tx.send(true);
    });
    let mut out = std::io::stdout();
    match kind {
        "edge" | "edge-lean" => {
            let config = if kind == "edge-lean" {
                lean_server_config(cert, key)?.0
            } else {
                config
            };
            socket.set_nonblocking(true)?;
            let socket = tokio::net::UdpSocket::from_std(socket)?;
            let task = tokio::spawn(Edge::new(config, Echo::default()).run(socket, stop));
            announce(&mut out, addr)?;
            task.await??;
        }
        "quinn" => {
            // The node's quinn endpoint keeps GSO off (a buffer of that many datagrams per
            // connection otherwise).
            let mut config = (*config).clone();
            config.transport_config(Arc::new(node_transport()));
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            announce(&mut out, addr)?;
            let mut stop = stop;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        tokio::spawn(async move {
                            let Ok(conn) = incoming.await else { return };
                            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                                return;
                            };
                            let mut buf = [0u8; 256];
                            while let Ok(Some(n)) = recv.read(&mut buf).await {
                                if send.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                }
            }
        }
        other => bail!("unknown server kind {other}: quinn, edge or edge-lean"),
    }
    Ok(())
}

fn announce(out: &mut impl std::io::Write, addr: SocketAddr) -> anyhow::Result<()> {
    writeln!(out, "listening {addr}")?;
    out.flush()?;
    Ok(())
}

/// `VmRSS` of process `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS in /proc status")?
        .parse()?;
    Ok(kb * 1024)
}

/// Waits until the RSS of `pid` has not changed for a second (at most 10 s, then says so);
/// returns it.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut last = rss(pid)?;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(1) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss(pid)?;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    if since.elapsed() < Duration::from_secs(1) {
        eprintln!("note: server RSS still moving after 10 s; taken as is");
    }
    Ok(last)
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin stops it; a kill makes sure.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(kind: &str, cert: &Path, key: &Path) -> anyhow::Result<Server> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", kind])
        .arg(cert)
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .context("server announces its address")?
        .parse()?;
    Ok(Server { child, addr })
}

async fn measure(n: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meshchat-edge-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = self_signed()?;
    let (cert_file, key_file) = (dir.join("cert.der"), dir.join("key.der"));
    std::fs::write(&cert_file, cert.as_ref())?;
    std::fs::write(&key_file, key.secret_der())?;
    let client = client_config(cert)?;
    let mut cpu = Vec::new();
    println!("| server | connections held | RSS before | RSS held | bytes per connection |");
    println!("|---|---|---|---|---|");
    for kind in ["quinn", "edge", "edge-lean"] {
        let server = spawn_server(kind, &cert_file, &key_file)?;
        let pid = server.child.id();
        let before = settled_rss(pid).await?;
        let mut conns = open(n, server.addr, &client).await?;
        let held = settled_rss(pid).await?;
        let per = (held.saturating_sub(before)) / conns.len().max(1) as u64;
        println!(
            "| {kind} | {} / {n} | {:.1} MB | {:.1} MB | **{per}** |",
            conns.len(),
            before as f64 / 1e6,
            held as f64 / 1e6,
        );
        cpu.push((kind, echo_cpu(pid, &mut conns).await?));
        for held in &conns {
            held.conn.close(0u32.into(), b"done");
        }
        drop(conns);
        drop(server);
    }
    println!();
    println!("| server | echoes | wall time | server CPU | server CPU per echo |");
    println!("|---|---|---|---|---|");
    for (kind, (echoes, wall, server)) in cpu {
        println!(
            "| {kind} | {echoes} | {:.2} s | {:.2} s | **{:.1} us** |",
            wall.as_secs_f64(),
            server.as_secs_f64(),
            server.as_secs_f64() * 1e6 / echoes.max(1) as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Connections that echo at once in the CPU phase, and round trips each.
const ECHO_CONNECTIONS: usize = 1_000;
const ECHO_ROUNDS: usize = 200;
/// Bytes of one echoed message (a short chat message in a frame).
const ECHO_BYTES: usize = 100;
/// Linux's `USER_HZ`: the unit of `utime` and `stime` in `/proc/<pid>/stat`.
const USER_HZ: u64 = 100;

/// CPU time (user + system) the process `pid` has used.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: 11 and 12 after the command name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// The CPU phase: the first [`ECHO_CONNECTIONS`] connections each echo [`ECHO_BYTES`] bytes
/// [`ECHO_ROUNDS`] times, one at a time, all connections at once. Returns the echoes done,
/// the wall time and the server's CPU time over it.
async fn echo_cpu(pid: u32, conns: &mut [Held]) -> anyhow::Result<(usize, Duration, Duration)> {
    let before = cpu_time(pid)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for held in conns.iter_mut().take(ECHO_CONNECTIONS) {
        // Moved into the task and back: the streams stay with their connection.
        let Some((mut send, mut recv)) = held.streams.take() else {
            continue;
        };
        tasks.push(tokio::spawn(async move {
            let msg = [7u8; ECHO_BYTES];
            let mut back = [0u8; ECHO_BYTES];
            let mut done = 0;
            for _ in 0..ECHO_ROUNDS {
                if send.write_all(&msg).await.is_err() || recv.read_exact(&mut back).await.is_err()
                {
                    break;
                }
                done += 1;
            }
            (done, send, recv)
        }));
    }
    let mut echoes = 0;
    for (held, task) in conns.iter_mut().zip(tasks) {
        let (done, send, recv) = task.await?;
        echoes += done;
        held.streams = Some((send, recv));
    }
    let wall = started.elapsed();
    Ok((echoes, wall, cpu_time(pid)?.saturating_sub(before)))
}

/// A client connection and its stream, kept open (as a chat client keeps its session).
struct Held {
    conn: quinn::Connection,
    streams: Option<(quinn::SendStream, quinn::RecvStream)>,
}

/// Opens `n` connections to `addr`, each with its stream echoed once; returns those that
/// made it, their stream kept open.
async fn open(
    n: usize,
    addr: SocketAddr,
    client: &quinn::ClientConfig,
) -> anyhow::Result<Vec<Held>> {
    let mut endpoints = Vec::new();
    for _ in 0..n.div_ceil(PER_CLIENT_ENDPOINT) {
        let mut e = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        e.set_default_client_config(client.clone());
        endpoints.push(e);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = endpoints[i / PER_CLIENT_ENDPOINT].clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = sem.acquire_owned().await.ok()?;
            let conn = endpoint.connect(addr, "localhost").ok()?.await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            send.write_all(b"hello").await.ok()?;
            let mut buf = [0u8; 5];
            recv.read_exact(&mut buf).await.ok()?;
            Some(Held {
                conn,
                streams: Some((send, recv)),
            })
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(c)) = t.await {
            conns.push(c);
        }
    }
    Ok(conns)
}
