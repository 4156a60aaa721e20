//! Frame codec encode and decode by message body size.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use meshchat_proto::client::{ChatId, ClientFrame, SendMessage, chat_id, client_frame::Body};
use meshchat_proto::{DEFAULT_MAX_FRAME, FrameCodec};
use tokio_util::codec::{Decoder, Encoder};

fn frame(body_len: usize) -> ClientFrame {
    ClientFrame {
        request_id: 42,
        body: Some(Body::Send(SendMessage {
            client_msg_id: "0192f1c2-7a3b-7c2e-9f00-3a1b2c3d4e5f".into(),
            chat: Some(ChatId {
                kind: Some(chat_id::Kind::ChannelId(1_234_567_890_123)),
            }),
            body: vec![b'x'; body_len].into(),
            reply_to: 0,
        })),
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [16usize, 256, 4096, 60_000] {
        let f = frame(size);
        let mut enc: FrameCodec<ClientFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut encoded = BytesMut::new();
        enc.encode(&f, &mut encoded).expect("encode");
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &f, |b, f| {
            let mut buf = BytesMut::with_capacity(encoded.len() * 2);
            b.iter(|| {
                buf.clear();
                enc.encode(f, &mut buf).expect("encode");
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            let mut dec: FrameCodec<ClientFrame> = FrameCodec::new(DEFAULT_MAX_FRAME);
            b.iter(|| {
                let mut buf = encoded.clone();
                dec.decode(&mut buf).expect("decode").expect("frame")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
