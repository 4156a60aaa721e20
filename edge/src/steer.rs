//! Several loops on one port, each with a socket of its own, and the kernel steering every
//! datagram to the socket of the loop its destination connection id names.
//!
//! The sockets form one `SO_REUSEPORT` group with a classic BPF program attached
//! (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+). The kernel runs the program on each datagram's
//! UDP payload, the QUIC packet, and delivers the datagram to the group's socket whose index
//! the program returns:
//! - a short header: the destination connection id's first byte, which names the issuing
//!   loop ([`crate::spread::LoopCids`]);
//! - a long header whose destination id is [`CID_LEN`] bytes long: that id's first byte, the
//!   same (a client's Initial with a random 8-byte id of its own goes wherever its first byte
//!   says, the same for every packet that carries it);
//! - anything else, and any index past the group's end: the kernel's own choice, a hash of
//!   the addresses, the same for every datagram of a client that has not moved (a client's
//!   first Initials and 0-RTT packets, which carry an id the client chose).
//!
//! So a loop reads its own socket and gets its own connections' datagrams, with no receiver
//! task between (the [`crate::spread`] scheme), and a client that migrates still reaches its
//! loop: steering is by connection id, not by address. Sockets are bound in order, so socket
//! `k` is index `k` of the group.
//!
//! One group per port: the program is attached to the first socket before it binds, which
//! makes the kernel treat the port as taken by anyone else (another process asking for the
//! same port with `SO_REUSEPORT` gets `EADDRINUSE`, as without it); the other sockets join
//! the group by binding the port the first one got.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::spread::CID_LEN;

/// `SO_ATTACH_REUSEPORT_CBPF` (`asm-generic/socket.h`; the same on x86-64 and arm64).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The steering program, classic BPF over the UDP payload (a datagram too short for a load
/// ends the program with 0: socket 0, whose loop answers what it can of it).
fn program() -> [libc::sock_filter; 9] {
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS: A = packet[k]
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K: A & k ? jt : jf
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K: A == k ? jt : jf
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LD_B_ABS, 0, 0, 0),           // 0: the first byte
        op(JSET_K, 2, 0, 0x80),          // 1: long header? to 4
        op(LD_B_ABS, 0, 0, 1),           // 2: short: the id's first byte
        op(RET_A, 0, 0, 0),              // 3
        op(LD_B_ABS, 0, 0, 5),           // 4: long: the id's length
        op(JEQ_K, 0, 2, CID_LEN as u32), // 5: one of ours? else to 8
        op(LD_B_ABS, 0, 0, 6),           // 6: the id's first byte
        op(RET_A, 0, 0, 0),              // 7
        op(RET_K, 0, 0, u32::MAX),       // 8: past the group's end: by hash
    ]
}

#[allow(unsafe_code)]
fn attach(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut filter = program();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, both live across the call; the kernel copies the
    // program and reads `optlen` bytes of `prog`, which is what is passed.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds `count` (>= 1) UDP sockets to `addr` as one steered group: socket `k` gets the
/// datagrams of the connections loop `k` issued ids for. `configure` runs on each socket
/// before it binds (buffer sizes, say). Port 0 in `addr` binds any free port, the same for
/// every socket. Fails, with nothing left bound, when the kernel refuses the program (no
/// `SO_ATTACH_REUSEPORT_CBPF`: the caller falls back to one socket and a receiver) or the
/// port is taken.
pub fn bind(
    addr: SocketAddr,
    count: usize,
    configure: &dyn Fn(&Socket) -> io::Result<()>,
) -> io::Result<Vec<UdpSocket>> {
    let open = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            // As the node's lone socket: an IPv6 wildcard takes IPv4 clients too.
            socket.set_only_v6(false).ok();
        }
        configure(&socket)?;
        socket.set_reuse_port(true)?;
        Ok(socket)
    };
    let first = open()?;
    attach(&first)?;
    first.bind(&addr.into())?;
    let bound = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a UDP socket without an IP address"))?;
    let mut sockets = vec![UdpSocket::from(first)];
    for _ in 1..count.max(1) {
        let socket = open()?;
        socket.bind(&bound.into())?;
        sockets.push(socket.into());
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn group(count: usize) -> Vec<UdpSocket> {
        let sockets = bind("127.0.0.1:0".parse().expect("addr"), count, &|_| Ok(())).expect("bind");
        for s in &sockets {
            s.set_nonblocking(true).expect("socket");
        }
        sockets
    }

    /// Which socket of `group` the one datagram just sent reached (waits for it, 5 s at most).
    fn landed(group: &[UdpSocket]) -> usize {
        let mut buf = [0u8; 64];
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            for (k, s) in group.iter().enumerate() {
                if s.recv_from(&mut buf).is_ok() {
                    return k;
                }
            }
            std::thread::yield_now();
        }
        panic!("the datagram reached no socket of the group");
    }

    fn short(first: u8) -> Vec<u8> {
        let mut d = vec![0x40, first];
        d.extend_from_slice(&[7u8; 30]);
        d
    }

    fn long(cid: &[u8]) -> Vec<u8> {
        let mut d = vec![0xc0, 0, 0, 0, 1, cid.len() as u8];
        d.extend_from_slice(cid);
        d.extend_from_slice(&[0u8; 30]);
        d
    }

    #[test]
    fn the_id_a_loop_issued_reaches_its_socket_from_any_address() {
        let sockets = group(3);
        let to = sockets[0].local_addr().expect("socket");
        for port in 0..4 {
            let client = UdpSocket::bind("127.0.0.1:0").expect("socket");
            for k in 0..3u8 {
                let cid = [k, 9, 9, 9, 9, 9, 9, 9];
                client.send_to(&short(k), to).expect("socket");
                assert_eq!(landed(&sockets), k as usize, "short header, client {port}");
                client.send_to(&long(&cid), to).expect("socket");
                assert_eq!(landed(&sockets), k as usize, "long header, client {port}");
            }
        }
    }

    #[test]
    fn a_client_chosen_id_goes_by_address_the_same_way_every_time() {
        let sockets = group(2);
        let to = sockets[0].local_addr().expect("socket");
        let mut seen = [0usize; 2];
        for i in 0..64u8 {
            let client = UdpSocket::bind("127.0.0.1:0").expect("socket");
            // 20 bytes (quinn's clients), and 8 bytes whose first byte names no loop.
            let (wide, narrow) = ([i; 20], [200, i, 1, 2, 3, 4, 5, 6]);
            client.send_to(&long(&wide), to).expect("socket");
            let first = landed(&sockets);
            seen[first] += 1;
            for d in [long(&wide), long(&narrow), short(200), vec![0x40]] {
                client.send_to(&d, to).expect("socket");
                let k = landed(&sockets);
                if d.len() > 2 {
                    assert_eq!(k, first, "one address, one socket");
                } else {
                    // Too short to read the id: the program ends with index 0.
                    assert_eq!(k, 0);
                }
            }
        }
        assert!(seen.iter().all(|n| *n > 0), "addresses spread: {seen:?}");
    }

    #[test]
    fn a_second_group_on_the_port_is_refused() {
        let sockets = group(2);
        let port = sockets[0].local_addr().expect("socket");
        let err = bind(port, 2, &|_| Ok(())).expect_err("the port is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // So is a plain bind.
        assert!(UdpSocket::bind(port).is_err());
    }
}
