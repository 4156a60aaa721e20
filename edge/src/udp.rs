//! The loops' UDP socket through `quinn-udp`: datagrams read in batches (one `recvmmsg` for up
//! to [`quinn_udp::BATCH_SIZE`] of them, and GRO where the kernel coalesces one flow's
//! datagrams into one buffer), several datagrams of one connection sent in one system call
//! (GSO, when the connection has them), and the ECN codepoints of both directions given to
//! quinn-proto; how a reader's reads go ([`RecvHealth`]), for the node's readiness.
//!
//! The socket is registered with the runtime for reads only. A send is made when a loop has
//! something to send and dropped if the socket's buffer is full (QUIC takes it for a loss), so
//! nothing ever waits for the socket to turn writable. Registered for writes too (as
//! `tokio::net::UdpSocket` always is), every datagram sent would make the kernel signal
//! "writable" again once its buffer was freed, waking a worker parked in `epoll_wait` for an
//! event nobody waits for.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

/// A datagram as a loop takes it.
#[derive(Debug)]
pub struct Datagram {
    /// Who sent it.
    pub from: SocketAddr,
    /// Its ECN codepoint, when the socket reports one.
    pub ecn: Option<quinn_proto::EcnCodepoint>,
    /// The address it was sent to (a socket bound to a wildcard address answers from it).
    pub local_ip: Option<IpAddr>,
    /// Its bytes.
    pub data: BytesMut,
}

/// Bytes of one receive slot: the largest datagram, or a GRO run of datagrams (the kernel
/// never coalesces more than 64 KiB).
const SLOT: usize = 64 * 1024;

/// A UDP socket with quinn-udp's state for it (what the kernel supports: GSO segments, GRO).
#[derive(Debug)]
pub struct Udp {
    socket: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
}

impl Udp {
    /// Sets `socket` up for batched, segmented I/O with ECN (quinn-udp's socket options), and
    /// registers it with the runtime for reads only (see the module docs). Must be called in
    /// the runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let socket = socket.into_std()?;
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        // SAFETY: `socket` owns its descriptor and the `AsyncFd` owns `socket` until it is
        // dropped, so the descriptor stays open and names this socket while registered.
        #[allow(unsafe_code)]
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { socket, state })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    /// Datagrams one send may carry (1 where the kernel has no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents`, the datagram(s) of `t`, now; `WouldBlock` when the socket's buffer
    /// is full. Every call asks the kernel (no readiness is kept for writes).
    pub fn try_send(&self, t: &quinn_proto::Transmit, contents: &[u8]) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t.ecn.map(udp_ecn),
            contents,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        self.state.try_send(self.socket.get_ref().into(), &transmit)
    }
}

/// Doublings of the 1 ms wait between reads while they fail ([`RecvBatch::recv`]).
const PAUSE_DOUBLINGS: u32 = 10;

/// The longest wait between two reads while they fail ([`RecvBatch::recv`]): 1,024 ms.
pub const MAX_RECV_PAUSE: Duration = Duration::from_millis(1 << PAUSE_DOUBLINGS);

/// How a socket's reads are going, for whoever watches the reader (the node's `/readyz` and
/// metrics): reads that failed since start, and the run of failures going on now. Reports of
/// ICMP errors for earlier sends are not failures of the socket and count in neither; a read
/// that finds nothing to read (`WouldBlock`) works. A read that works costs one atomic load
/// here. One reader per `RecvHealth`: a second reader's working read would end the first's
/// run.
#[derive(Debug, Default)]
pub struct RecvHealth {
    errors: AtomicU64,
    /// Failures in a row now: 0 once a read works.
    in_row: AtomicU64,
    run: parking_lot::Mutex<Option<FailingReads>>,
}

/// A run of failed reads, not yet ended by one that worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingReads {
    /// The run's first failure.
    pub since: Instant,
    /// Its latest.
    pub last: Instant,
    /// Failed reads in the run.
    pub in_row: u64,
    /// The latest failure's error.
    pub error: String,
}

impl RecvHealth {
    /// Reads that failed since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The run of failed reads going on now (`None` once a read worked, or before any
    /// failed).
    pub fn failing(&self) -> Option<FailingReads> {
        self.run.lock().clone()
    }

    /// Whether reads are failing now: a run of failures that has lasted at least `at_least`
    /// (one transient error is not a fault) and whose latest failure is at most `recent` old.
    /// A socket that stopped being read (nothing arrived since) proves nothing either way: the
    /// run no longer counts once its latest failure is older than `recent`, which must
    /// exceed the reader's longest wait between attempts ([`MAX_RECV_PAUSE`]).
    pub fn failing_now(
        &self,
        now: Instant,
        at_least: Duration,
        recent: Duration,
    ) -> Option<FailingReads> {
        if self.in_row.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.failing().filter(|r| {
            r.last.duration_since(r.since) >= at_least && now.duration_since(r.last) <= recent
        })
    }

    fn failed(&self, e: &io::Error) {
        let now = Instant::now();
        self.errors.fetch_add(1, Ordering::Relaxed);
        let in_row = self.in_row.fetch_add(1, Ordering::Relaxed) + 1;
        let mut run = self.run.lock();
        let since = match run.as_ref() {
            Some(r) if in_row > 1 => r.since,
            _ => now,
        };
        *run = Some(FailingReads {
            since,
            last: now,
            in_row,
            error: e.to_string(),
        });
    }

    fn worked(&self) {
        if self.in_row.load(Ordering::Relaxed) != 0 {
            self.in_row.store(0, Ordering::Relaxed);
            *self.run.lock() = None;
        }
    }
}

/// Buffers for one batch of received datagrams (2 MiB: made once per socket reader).
pub struct RecvBatch {
    buf: Vec<u8>,
    meta: [RecvMeta; BATCH_SIZE],
    len: usize,
    /// Reads that failed in a row (other than reports of ICMP errors), and until when the
    /// next read waits because of them.
    failures: u32,
    /// Reads that failed since the batch was made (for logs: every one at debug, at warn
    /// when the count is a power of two).
    errors: u64,
    quiet_until: Option<tokio::time::Instant>,
    health: Arc<RecvHealth>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("len", &self.len).finish()
    }
}

impl RecvBatch {
    /// Buffers that report how their reads go to `health`.
    pub fn new(health: Arc<RecvHealth>) -> Self {
        Self {
            buf: vec![0; SLOT * BATCH_SIZE],
            meta: [RecvMeta::default(); BATCH_SIZE],
            len: 0,
            failures: 0,
            errors: 0,
            quiet_until: None,
            health,
        }
    }

    /// Waits until `udp` has datagrams and reads a batch of them. A read error is returned;
    /// unless it reports an ICMP error (a client's port gone: one report each), it counts in
    /// the batch's [`RecvHealth`] and the next read waits first, 1 ms doubling to ~1 s while
    /// errors repeat, so a socket that fails at once every time cannot spin a core.
    /// Cancel-safe.
    pub async fn recv(&mut self, udp: &Udp) -> io::Result<()> {
        if let Some(at) = self.quiet_until {
            tokio::time::sleep_until(at).await;
            self.quiet_until = None;
        }
        loop {
            let read = match udp.socket.readable().await {
                Ok(_ready) => self.try_recv(udp),
                Err(e) => Err(e),
            };
            match read {
                // The socket answered (nothing to read after all): it works.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.failures = 0;
                    self.health.worked();
                    continue;
                }
                Ok(()) => {
                    self.failures = 0;
                    self.health.worked();
                    return Ok(());
                }
                Err(e) => {
                    self.errors += 1;
                    if !is_icmp_report(&e) {
                        self.health.failed(&e);
                        self.failures = (self.failures + 1).min(PAUSE_DOUBLINGS + 1);
                        let pause = Duration::from_millis(1 << (self.failures - 1));
                        self.quiet_until = Some(tokio::time::Instant::now() + pause);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Reads the datagrams `udp` has now (`WouldBlock` when none).
    pub fn try_recv(&mut self, udp: &Udp) -> io::Result<()> {
        self.len = 0;
        let mut slots = self.buf.chunks_mut(SLOT).map(IoSliceMut::new);
        let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] =
            std::array::from_fn(|_| slots.next().expect("BATCH_SIZE slots"));
        let meta = &mut self.meta;
        let n = udp.socket.try_io(Interest::READABLE, |socket| {
            udp.state.recv(socket.into(), &mut iovs, meta)
        })?;
        self.len = n;
        Ok(())
    }

    /// The datagrams of the last batch read, a GRO run split at its stride.
    /// Datagrams sent to a multicast or broadcast address are left out: no answer may come
    /// from such an address (the kernel refuses it as a source, and quinn-udp would turn GSO
    /// off for the socket on that refusal). A subnet's broadcast address cannot be told
    /// from the address alone; an answer to one fails and is counted as a failed send.
    pub fn datagrams(&self) -> impl Iterator<Item = (&RecvMeta, &[u8])> {
        self.meta[..self.len]
            .iter()
            .zip(self.buf.chunks(SLOT))
            .filter(|(m, _)| m.dst_ip.is_none_or(answerable))
            .flat_map(|(m, slot)| {
                let stride = if m.stride == 0 {
                    m.len.max(1)
                } else {
                    m.stride
                };
                slot[..m.len.min(SLOT)].chunks(stride).map(move |d| (m, d))
            })
    }

    /// Reads that failed since the batch was made.
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

impl Datagram {
    /// A datagram of a batch, copied out of it.
    pub fn new(meta: &RecvMeta, data: &[u8]) -> Self {
        Self {
            from: meta.addr,
            ecn: meta.ecn.map(proto_ecn),
            local_ip: meta.dst_ip,
            data: BytesMut::from(data),
        }
    }
}

/// Whether an answer may come from `ip`: not multicast, not the IPv4 broadcast address, not
/// unspecified (an IPv4-mapped IPv6 address judged as IPv4).
fn answerable(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unspecified()),
    }
}

/// Whether a read error only reports an ICMP error for an earlier send.
pub fn is_icmp_report(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}

fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> quinn_proto::EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => quinn_proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => quinn_proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => quinn_proto::EcnCodepoint::Ce,
    }
}

fn udp_ecn(ecn: quinn_proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match ecn {
        quinn_proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        quinn_proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        quinn_proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_never_come_from_multicast_broadcast_or_unspecified_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(answerable(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "255.255.255.255",
            "224.0.0.1",
            "0.0.0.0",
            "ff02::1",
            "::",
            "::ffff:255.255.255.255",
            "::ffff:239.1.2.3",
        ] {
            assert!(!answerable(ip.parse().expect("ip")), "{ip}");
        }
    }

    /// Two sockets on loopback: a batch sent by several sends arrives whole, in one or more
    /// batches, every datagram with its sender; a GSO send of three segments arrives as three
    /// datagrams of the segment size (or fewer sends where the kernel has no GSO).
    #[tokio::test]
    async fn batches_and_segments_arrive_as_the_datagrams_sent() -> io::Result<()> {
        let a = Udp::new(UdpSocket::bind("127.0.0.1:0").await?)?;
        let b = Udp::new(UdpSocket::bind("127.0.0.1:0").await?)?;
        let to = b.local_addr()?;
        let from = a.local_addr()?;
        let transmit = |size, segment_size| quinn_proto::Transmit {
            destination: to,
            ecn: None,
            size,
            segment_size,
            src_ip: None,
        };
        for i in 0..5u8 {
            a.try_send(&transmit(10, None), &[i; 10])?;
        }
        let segments = a.max_gso_segments().min(3);
        let mut gso = Vec::new();
        for i in 0..segments as u8 {
            gso.extend_from_slice(&[100 + i; 200]);
        }
        let segment_size = (segments > 1).then_some(200);
        a.try_send(&transmit(gso.len(), segment_size), &gso)?;

        let mut batch = RecvBatch::default();
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        while got.len() < 5 + segments {
            batch.recv(&b).await?;
            got.extend(batch.datagrams().map(|(m, d)| (m.addr, d.to_vec())));
        }
        assert_eq!(got.len(), 5 + segments, "no extra datagrams");
        for (i, (f, d)) in got.iter().enumerate() {
            assert_eq!(*f, from);
            if i < 5 {
                assert_eq!(d, &vec![i as u8; 10]);
            } else {
                assert_eq!(d, &vec![100 + (i - 5) as u8; 200]);
            }
        }
        assert!(
            matches!(batch.try_recv(&b), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing left"
        );
        Ok(())
    }

    /// A real fault: the socket's descriptor made to name something that is not a socket
    /// (`/dev/null` duplicated over it) while a datagram waits. Every read fails
    /// (`ENOTSOCK`), each counts, and the run shows in the health; with the socket put back,
    /// the next read works and the run is over, as it is when a read finds nothing to read.
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn reads_that_keep_failing_make_a_run_that_a_working_read_ends() -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let b = Udp::new(UdpSocket::bind("127.0.0.1:0").await?)?;
        let to = b.local_addr()?;
        let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let health = Arc::new(RecvHealth::default());
        let mut batch = RecvBatch::new(health.clone());
        assert_eq!(health.failing(), None);

        let fd = b.socket.as_raw_fd();
        let null = std::fs::File::open("/dev/null")?;
        // SAFETY: `saved` is a new descriptor this test owns and closes once, at the end; `fd`
        // stays open throughout (it names /dev/null, then the socket again), owned by `b`.
        // Both stay close-on-exec, as the socket was. While `fd` names /dev/null it breaks the
        // runtime registration's rule that it name the registered socket: `saved` keeps the
        // socket open, so its epoll entry stays, and the socket is back before `b` is dropped
        // (were an assert to fail in between, dropping `b` could not remove the entry and the
        // runtime would leak the registration: a leak in a failing test).
        let saved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        assert!(saved >= 0, "{}", io::Error::last_os_error());
        let point_at = |target: i32| {
            // SAFETY: as above.
            let r = unsafe { libc::dup3(target, fd, libc::O_CLOEXEC) };
            assert!(r >= 0, "{}", io::Error::last_os_error());
        };
        point_at(null.as_raw_fd());
        sender.send_to(b"x", to)?;
        let started = Instant::now();
        for n in 1..=4u64 {
            let e = batch
                .recv(&b)
                .await
                .expect_err("a read of /dev/null as a socket");
            assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK), "{e}");
            let run = health.failing().expect("a run of failures");
            assert_eq!((run.in_row, health.errors()), (n, n));
            assert!(run.since >= started && run.last >= run.since);
            assert!(
                run.error.contains(&format!("os error {}", libc::ENOTSOCK)),
                "{}",
                run.error
            );
        }
        let run = health.failing().expect("run");
        // Now: failing, once the run is long enough; a run whose latest failure is old proves
        // nothing (nothing was read since).
        let recent = Duration::from_secs(3);
        assert!(
            health
                .failing_now(run.last, Duration::ZERO, recent)
                .is_some()
        );
        let long = Duration::from_secs(3600);
        assert!(health.failing_now(run.last, long, recent).is_none());
        let later = run.last + Duration::from_secs(4);
        assert!(health.failing_now(later, Duration::ZERO, recent).is_none());

        point_at(saved);
        batch.recv(&b).await?;
        let got: Vec<Vec<u8>> = batch.datagrams().map(|(_, d)| d.to_vec()).collect();
        assert_eq!(got, vec![b"x".to_vec()]);
        assert_eq!(health.failing(), None);
        assert!(
            health
                .failing_now(Instant::now(), Duration::ZERO, recent)
                .is_none()
        );
        assert_eq!(health.errors(), 4, "the total stays");

        // A read that finds nothing to read ends a run too: one failure, the datagram taken
        // by another reader of the socket meanwhile, then a read that would block (nothing
        // arrives: the read waits out the bound).
        point_at(null.as_raw_fd());
        sender.send_to(b"y", to)?;
        batch.recv(&b).await.expect_err("/dev/null again");
        assert_eq!(health.failing().map(|r| r.in_row), Some(1));
        let mut byte = [0u8; 8];
        // SAFETY: `saved` names the socket; `byte` is a live buffer of that length.
        let n = unsafe { libc::recv(saved, byte.as_mut_ptr().cast(), byte.len(), 0) };
        assert_eq!(n, 1, "{}", io::Error::last_os_error());
        point_at(saved);
        let waited = tokio::time::timeout(Duration::from_millis(50), batch.recv(&b)).await;
        assert!(waited.is_err(), "nothing to read");
        assert_eq!(health.failing(), None, "the socket answered");
        // SAFETY: `saved` is closed once, here.
        assert_eq!(unsafe { libc::close(saved) }, 0);
        Ok(())
    }
}
