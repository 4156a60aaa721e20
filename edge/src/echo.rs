//! The echo application: what arrives on a stream is written back. Enough to hold a
//! connection with a live stream (as a chat client's) and to check the loop end to end.

use std::net::SocketAddr;

use quinn_proto::StreamId;

use crate::App;

/// Echoes every stream; counts what it saw.
#[derive(Debug, Default)]
pub struct Echo {
    /// Bytes echoed since start.
    pub echoed: u64,
    /// Connections closed since start.
    pub closed: u64,
}

impl App for Echo {
    /// Bytes echoed on this connection.
    type Conn = u64;

    fn accept(&mut self, _remote: SocketAddr) -> Self::Conn {
        0
    }

    fn on_stream(
        &mut self,
        conn: &mut Self::Conn,
        _stream: StreamId,
        data: &[u8],
        _fin: bool,
        out: &mut Vec<u8>,
    ) {
        self.echoed += data.len() as u64;
        *conn += data.len() as u64;
        out.extend_from_slice(data);
    }

    fn on_closed(&mut self, _conn: Self::Conn) {
        self.closed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_writes_back_what_arrives_and_counts_it() {
        let mut echo = Echo::default();
        let mut conn = echo.accept("127.0.0.1:1".parse().expect("addr"));
        let mut out = Vec::new();
        let stream = StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 0);
        echo.on_stream(&mut conn, stream, b"hello", false, &mut out);
        assert_eq!(out, b"hello");
        assert_eq!((echo.echoed, conn), (5, 5));
        echo.on_closed(conn);
        assert_eq!(echo.closed, 1);
    }
}
