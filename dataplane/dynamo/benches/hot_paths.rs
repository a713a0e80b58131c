//! Per-token and per-request hot paths of the frontend.
//!
//! Run: `cargo bench -p dynamo-dataplane --bench hot_paths -- --warm-up-time 1 --measurement-time 3`
//!
//! - `sse/chat_delta`: one streamed chat chunk (`data: {...}\n\n`) for a short token text
//! - `sse/response_16_tokens`: a whole 16-token streamed response (role, deltas, finish, usage, DONE)
//! - `router/<mode>_64_workers`: one routing decision over 64 live workers

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use dynamo_dataplane::{
    frontend::{
        openai::Usage,
        sse::{ChunkWriter, Kind},
    },
    router::{RouterMode, select},
};
use rand::{SeedableRng, rngs::SmallRng};
use std::hint::black_box;

fn sse(c: &mut Criterion) {
    let w = ChunkWriter::new(
        Kind::Chat,
        "chatcmpl-0123456789abcdef00000001",
        1_795_000_000,
        "tiny",
        true,
    );
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("sse/chat_delta", |b| {
        b.iter(|| {
            out.clear();
            w.delta(&mut out, black_box(" hello"));
            black_box(out.len())
        })
    });
    c.bench_function("sse/response_16_tokens", |b| {
        b.iter(|| {
            out.clear();
            w.start(&mut out);
            for _ in 0..16 {
                w.delta(&mut out, black_box(" word"));
            }
            w.finish(&mut out, "length");
            w.usage(&mut out, &Usage::new(128, 16, 64));
            ChunkWriter::done(&mut out);
            black_box(out.len())
        })
    });
}

fn router(c: &mut Criterion) {
    let loads: Vec<u32> = (0..64).map(|i| (i * 7919) % 13).collect();
    let mut rng = SmallRng::seed_from_u64(1);
    for mode in [
        RouterMode::RoundRobin,
        RouterMode::Random,
        RouterMode::LeastLoaded,
        RouterMode::PowerOfTwo,
    ] {
        let mut tick = 0usize;
        c.bench_function(&format!("router/{}_64_workers", mode.as_str()), |b| {
            b.iter(|| {
                tick += 1;
                black_box(select(mode, black_box(&loads), tick, &mut rng))
            })
        });
    }
}

criterion_group!(benches, sse, router);
criterion_main!(benches);
