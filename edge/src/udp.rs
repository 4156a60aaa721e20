//! The loops' UDP socket through `quinn-udp`: datagrams read in batches (one `recvmmsg` for up
//! to [`quinn_udp::BATCH_SIZE`] of them, and GRO where the kernel coalesces one flow's
//! datagrams into one buffer), several datagrams of one connection sent in one system call
//! (GSO, when the connection has them), and the ECN codepoints of both directions given to
//! quinn-proto.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::Interest;
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
    socket: Arc<UdpSocket>,
    state: UdpSocketState,
}

impl Udp {
    /// Sets `socket` up for batched, segmented I/O with ECN (quinn-udp's socket options).
    pub fn new(socket: Arc<UdpSocket>) -> io::Result<Self> {
        let state = UdpSocketState::new((&*socket).into())?;
        Ok(Self { socket, state })
    }

    /// Datagrams one send may carry (1 where the kernel has no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents`, the datagram(s) of `t`, now; `WouldBlock` when the socket's buffer
    /// is full.
    pub fn try_send(&self, t: &quinn_proto::Transmit, contents: &[u8]) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t.ecn.map(udp_ecn),
            contents,
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        self.socket.try_io(Interest::WRITABLE, || {
            self.state.try_send((&*self.socket).into(), &transmit)
        })
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
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            buf: vec![0; SLOT * BATCH_SIZE],
            meta: [RecvMeta::default(); BATCH_SIZE],
            len: 0,
            failures: 0,
            errors: 0,
            quiet_until: None,
        }
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("len", &self.len).finish()
    }
}

impl RecvBatch {
    /// Waits until `udp` has datagrams and reads a batch of them. A read error is returned;
    /// unless it reports an ICMP error (a client's port gone: one report each), the next read
    /// waits first, 1 ms doubling to ~1 s while errors repeat, so a socket that fails at once
    /// every time cannot spin a core. Cancel-safe.
    pub async fn recv(&mut self, udp: &Udp) -> io::Result<()> {
        if let Some(at) = self.quiet_until {
            tokio::time::sleep_until(at).await;
            self.quiet_until = None;
        }
        loop {
            udp.socket.readable().await?;
            match self.try_recv(udp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(()) => {
                    self.failures = 0;
                    return Ok(());
                }
                Err(e) => {
                    self.errors += 1;
                    if !is_icmp_report(&e) {
                        self.failures = (self.failures + 1).min(11);
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
        let n = udp.socket.try_io(Interest::READABLE, || {
            udp.state.recv((&*udp.socket).into(), &mut iovs, meta)
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
        let a = Udp::new(Arc::new(UdpSocket::bind("127.0.0.1:0").await?))?;
        let b = Udp::new(Arc::new(UdpSocket::bind("127.0.0.1:0").await?))?;
        let to = b.socket.local_addr()?;
        let from = a.socket.local_addr()?;
        let transmit = |size, segment_size| quinn_proto::Transmit {
            destination: to,
            ecn: None,
            size,
            segment_size,
            src_ip: None,
        };
        // A fresh socket is writable once the reactor has seen it so.
        a.socket.writable().await?;
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
}
