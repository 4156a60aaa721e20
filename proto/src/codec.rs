//! The frame codec: `[u32 big-endian length][protobuf body]`.
//!
//! The framing is written here rather than wrapped around `tokio_util`'s
//! `LengthDelimitedCodec`: that codec is stateful (it consumes the prefix, then waits for the
//! body), which makes it impossible to report the declared length in a typed error or to check
//! it without reading it twice. Ours is stateless, a dozen lines, and fuzzed. `tokio_util`'s
//! `Decoder`/`Encoder` traits are still implemented so `FramedRead`/`FramedWrite` work.
//!
//! - the length is checked against the configured maximum **before** any of the body is
//!   buffered, and an oversized frame is a [`CodecError::FrameTooLarge`] naming both sizes;
//! - a buffer holding less than a whole frame decodes to `Ok(None)` ("need more bytes"),
//!   never an error;
//! - a whole frame that is not valid protobuf for the expected type is
//!   [`CodecError::Malformed`];
//! - nothing here panics on any input (fuzzed by `proto/fuzz`).
//!
//! After `FrameTooLarge` the stream cannot be resynchronised (the body was never read); the
//! caller answers with an error and closes the stream.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;
/// Default maximum frame body size: 64 KiB. Chat messages are small; a larger frame is more
/// likely an attack or a bug than a message.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Errors from encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame's declared (or, when encoding, actual) length is over the maximum.
    #[error("frame of {len} bytes is over the maximum of {max} bytes")]
    FrameTooLarge {
        /// Declared length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A codec for frames carrying protobuf messages: decodes `In`, encodes `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out = In> {
    max: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec that rejects frames over `max_frame` bytes of body.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max: max_frame,
            _types: PhantomData,
        }
    }

    /// The configured maximum body size.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Splits the next whole frame's body off `src` without parsing it: `Ok(None)` when
    /// `src` holds less than a whole frame.
    pub fn decode_raw(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        decode_raw(src, self.max)
    }
}

impl<In, Out> Clone for FrameCodec<In, Out> {
    fn clone(&self) -> Self {
        Self::new(self.max)
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.decode_raw(src)? {
            Some(body) => Ok(Some(In::decode(body.freeze())?)),
            None => Ok(None),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&item, self.max, dst)
    }
}

impl<In, Out: Message> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(item, self.max, dst)
    }
}

/// Splits the next whole frame's body off `src`: `Ok(None)` when `src` holds less than a
/// whole frame (and reserves room for the rest), `FrameTooLarge` as soon as the prefix says
/// the body is over `max`, before any of it is buffered.
pub fn decode_raw(src: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, CodecError> {
    if src.len() < LENGTH_PREFIX {
        return Ok(None);
    }
    let len = (&src[..LENGTH_PREFIX]).get_u32() as usize;
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    let whole = LENGTH_PREFIX + len;
    if src.len() < whole {
        src.reserve(whole - src.len());
        return Ok(None);
    }
    src.advance(LENGTH_PREFIX);
    Ok(Some(src.split_to(len)))
}

/// Appends one frame holding `msg` to `dst`. Refuses a body over `max` bytes.
pub fn encode_into<M: Message>(msg: &M, max: usize, dst: &mut BytesMut) -> Result<(), CodecError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    dst.reserve(LENGTH_PREFIX + len);
    // `len <= max`, and `max` is a usize the caller configured; refuse anything over u32.
    let prefix = u32::try_from(len).map_err(|_| CodecError::FrameTooLarge { len, max })?;
    dst.put_u32(prefix);
    msg.encode(dst)
        .map_err(|e| CodecError::Io(std::io::Error::other(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{self, ClientFrame, ServerFrame, client_frame::Body};

    fn send_frame(text: &str) -> ClientFrame {
        ClientFrame {
            request_id: 7,
            body: Some(Body::Send(client::SendMessage {
                client_msg_id: "c-1".into(),
                chat: Some(client::ChatId {
                    kind: Some(client::chat_id::Kind::ChannelId(9)),
                }),
                body: text.as_bytes().to_vec().into(),
                reply_to: 0,
            })),
        }
    }

    fn codec(max: usize) -> FrameCodec<ClientFrame, ClientFrame> {
        FrameCodec::new(max)
    }

    #[test]
    fn round_trip_many_frames_in_one_buffer() {
        let mut c = codec(1024);
        let mut buf = BytesMut::new();
        for i in 0..10 {
            c.encode(send_frame(&format!("hello {i}")), &mut buf)
                .expect("encode");
        }
        for i in 0..10 {
            let f = c.decode(&mut buf).expect("decode").expect("whole frame");
            assert_eq!(f, send_frame(&format!("hello {i}")));
        }
        assert!(c.decode(&mut buf).expect("empty is fine").is_none());
    }

    #[test]
    fn short_buffer_is_need_more_at_every_split_point() {
        let mut c = codec(1024);
        let mut whole = BytesMut::new();
        c.encode(send_frame("split me"), &mut whole)
            .expect("encode");
        for cut in 0..whole.len() {
            let mut c = codec(1024);
            let mut part = BytesMut::from(&whole[..cut]);
            assert!(
                c.decode(&mut part)
                    .expect("partial is not an error")
                    .is_none(),
                "cut at {cut}"
            );
            part.extend_from_slice(&whole[cut..]);
            assert_eq!(
                c.decode(&mut part).expect("decode").expect("frame"),
                send_frame("split me")
            );
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body_arrives() {
        let mut c = codec(100);
        // Only the prefix is here: the body was never sent, and must not be waited for.
        let mut buf = BytesMut::new();
        buf.put_u32(101);
        match c.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len: 101, max: 100 }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert!(matches!(
            c.decode(&mut huge),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let mut c = codec(16);
        let mut buf = BytesMut::new();
        assert!(matches!(
            c.encode(
                send_frame("this body is longer than sixteen bytes"),
                &mut buf
            ),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert!(buf.is_empty(), "nothing half-written");
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        let mut c = codec(1024);
        let mut buf = BytesMut::new();
        let garbage = [0xff_u8, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02];
        buf.put_u32(garbage.len() as u32);
        buf.extend_from_slice(&garbage);
        assert!(matches!(c.decode(&mut buf), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn empty_body_is_a_frame_with_no_request() {
        // A zero-length frame decodes to the default message; the node answers UNKNOWN_REQUEST.
        let mut c = codec(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        let f = c.decode(&mut buf).expect("decode").expect("frame");
        assert!(f.body.is_none());
    }

    #[test]
    fn truncated_stream_leaves_need_more() {
        let mut c: FrameCodec<ServerFrame, ServerFrame> = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(50);
        buf.extend_from_slice(&[0u8; 10]);
        assert!(c.decode(&mut buf).expect("need more").is_none());
        // At end of stream `decode_eof` reports the leftover bytes as an error.
        assert!(c.decode_eof(&mut buf).is_err());
    }

    #[test]
    fn garbage_streams_never_panic() {
        // A cheap in-tree sweep; the real fuzzing is proto/fuzz.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            let mut bytes = Vec::new();
            for _ in 0..(seed % 300) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut c = codec(256);
            while let Ok(Some(_)) = c.decode(&mut buf) {}
        }
    }
}
