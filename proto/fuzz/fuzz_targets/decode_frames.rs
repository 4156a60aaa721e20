//! Feeds arbitrary bytes to the frame decoder for every message type a node or client
//! decodes, in arbitrary chunkings. Nothing may panic; every outcome is a frame, "need more",
//! or an error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshchat_proto::client::{ClientFrame, ServerFrame};
use meshchat_proto::mesh::{PeerBatch, PeerHello};
use meshchat_proto::FrameCodec;
use tokio_util::codec::Decoder;

fn drain<M: prost::Message + Default>(data: &[u8], max: usize, chunk: usize) {
    let mut codec: FrameCodec<M> = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size and a small max frame, so both "too large" and
    // "split across reads" paths are reached.
    let (knob, rest) = match data.split_first() {
        Some((k, r)) => (*k as usize, r),
        None => return,
    };
    let chunk = 1 + knob % 17;
    let max = 16 + (knob * 37) % 4096;
    drain::<ClientFrame>(rest, max, chunk);
    drain::<ServerFrame>(rest, max, chunk);
    drain::<PeerBatch>(rest, max, chunk);
    drain::<PeerHello>(rest, max, chunk);
});
