//! The echo application: what arrives on a stream is written back. Enough to hold a
//! connection with a live stream (as a chat client's) and to check the loop end to end.

use std::net::SocketAddr;

use crate::{Admit, App, AppEvent, Cx};

/// Echoes every stream; counts what it saw.
#[derive(Debug, Default)]
pub struct Echo {
    /// Bytes echoed since start.
    pub echoed: u64,
    /// Connections closed since start.
    pub closed: u64,
}

impl Echo {
    /// What the echo does with one event: data is written back on its stream, and the stream
    /// finished after it when the peer finished its own.
    fn answer(
        &mut self,
        conn: &mut u64,
        event: &AppEvent<'_, ()>,
        out: &mut dyn FnMut(Echoed<'_>),
    ) {
        if let AppEvent::Data { stream, data, fin } = *event {
            self.echoed += data.len() as u64;
            *conn += data.len() as u64;
            out(Echoed { stream, data, fin });
        }
    }
}

/// Bytes to write back.
struct Echoed<'a> {
    stream: quinn_proto::StreamId,
    data: &'a [u8],
    fin: bool,
}

impl App for Echo {
    /// Bytes echoed on this connection.
    type Conn = u64;
    type Admission = ();
    type Work = ();

    fn admit(&mut self, _remote: SocketAddr, _validated: bool, _held: usize) -> Admit<()> {
        Admit::Accept(())
    }

    fn accept(&mut self, _cx: &mut Cx<'_>, _admission: ()) -> Self::Conn {
        0
    }

    fn on_event(&mut self, cx: &mut Cx<'_>, conn: &mut Self::Conn, event: AppEvent<'_, ()>) {
        self.answer(conn, &event, &mut |e| {
            cx.write(e.stream, e.data);
            if e.fin {
                cx.finish(e.stream);
            }
        });
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
        let mut conn = 0;
        let stream = quinn_proto::StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 0);
        let mut out = Vec::new();
        let mut fins = 0;
        let event = AppEvent::Data {
            stream,
            data: b"hello",
            fin: true,
        };
        echo.answer(&mut conn, &event, &mut |e| {
            out.extend_from_slice(e.data);
            fins += usize::from(e.fin);
        });
        // Events that are not data write nothing.
        echo.answer(&mut conn, &AppEvent::Timer, &mut |_| {
            panic!("nothing to echo")
        });
        assert_eq!((out.as_slice(), fins), (&b"hello"[..], 1));
        assert_eq!((echo.echoed, conn), (5, 5));
        echo.on_closed(conn);
        assert_eq!(echo.closed, 1);
    }
}
