//! Per-token and per-request hot paths of the frontend.
//!
//! Run: `cargo bench -p dynamo-dataplane --bench hot_paths -- --warm-up-time 1 --measurement-time 3`
//!
//! - `sse/chat_delta`: one streamed chat chunk (`data: {...}\n\n`) for a short token text
//! - `sse/response_16_tokens`: a whole 16-token streamed response (role, deltas, finish, usage, DONE)
//! - `router/<mode>_64_workers`: one routing decision over 64 live workers
//! - `router/kv_13k_tokens_<W>_workers`: one kv decision for a 13.7k-token prompt (hashing its 214
//!   blocks, matching them against an index of ~1M (worker, block) entries, scoring W workers)
//! - after criterion: `kv decision latency at 1,000 req/s`: decisions paced at 1,000/s for 5 s while
//!   another thread applies KV events at 100k blocks/s; prints p50 / p99 / max

use bytes::BytesMut;
use criterion::{Criterion, criterion_group};
use dynamo_frontend::{
    openai::Usage,
    sse::{ChunkWriter, Kind},
};
use dynamo_kv::policy::{KvRouter, KvRouterConfig, RouterMode, select};
use dynamo_kv::{KvEvent, block_hashes};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

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

const BLOCK: usize = 64;
const PROMPT_TOKENS: usize = 13_700;

/// A conversation-shaped prompt: a shared 2-block system prefix, then `conv`'s own tokens.
fn prompt(conv: u32, tokens: usize) -> Vec<u32> {
    (0..tokens as u32)
        .map(|i| {
            if i < 128 {
                i
            } else {
                1000 + conv * 100_003 + i
            }
        })
        .collect()
}

/// A router over `workers` workers whose index holds ~`per_worker` blocks of each worker.
fn filled_router(workers: usize, per_worker: usize) -> Arc<KvRouter> {
    let router = Arc::new(KvRouter::new(KvRouterConfig::default()));
    for w in 0..workers {
        router.add_worker(w as u64);
    }
    let per_prompt = PROMPT_TOKENS / BLOCK;
    let mut conv = 0;
    for w in 0..workers {
        for _ in 0..per_worker.div_ceil(per_prompt) {
            conv += 1;
            let hashes = block_hashes(&prompt(conv, PROMPT_TOKENS), BLOCK);
            let _ = router.apply(
                w as u64,
                KvEvent::stored(None, hashes.iter().map(|b| (b.local, b.sequence))),
            );
        }
    }
    router
}

fn kv_router(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(1);
    for workers in [4usize, 64] {
        let router = filled_router(workers, (1 << 20) / workers);
        let candidates: Vec<u64> = (0..workers as u64).collect();
        // A follow-up turn of conversation 7: its prefix is cached on one worker.
        let tokens = prompt(7, PROMPT_TOKENS);
        let mut tick = 0usize;
        c.bench_function(&format!("router/kv_13k_tokens_{workers}_workers"), |b| {
            b.iter(|| {
                tick += 1;
                black_box(router.choose(black_box(&tokens), &candidates, tick, &mut rng))
            })
        });
    }
}

/// Decision latency percentiles at a steady 1,000 decisions/s with events applied concurrently.
fn kv_decision_latency_at_1000_rps() {
    let workers = 64;
    let router = filled_router(workers, (1 << 20) / workers);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (router, stop) = (router.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut conv = 1_000_000;
            let mut applied = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                conv += 1;
                let hashes = block_hashes(&prompt(conv, PROMPT_TOKENS), BLOCK);
                let w = u64::from(conv) % workers as u64;
                let _ = router.apply(
                    w,
                    KvEvent::stored(None, hashes.iter().map(|b| (b.local, b.sequence))),
                );
                let removed = hashes.iter().map(|b| b.sequence).collect();
                let _ = router.apply(
                    w,
                    KvEvent::Removed {
                        block_hashes: removed,
                    },
                );
                applied += 2 * hashes.len() as u64;
                // 100k block events per second.
                let due = Duration::from_secs_f64(applied as f64 / 100_000.0);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let candidates: Vec<u64> = (0..workers as u64).collect();
    let mut rng = SmallRng::seed_from_u64(2);
    let mut latencies = Vec::with_capacity(5000);
    let started = Instant::now();
    for i in 0..5000u32 {
        let due = started + Duration::from_millis(u64::from(i));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let tokens = prompt(rng.random_range(1..2000), PROMPT_TOKENS);
        let t = Instant::now();
        black_box(router.choose(&tokens, &candidates, i as usize, &mut rng));
        latencies.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "kv decision latency at 1,000 req/s (64 workers, ~1M indexed blocks, 13.7k-token prompts, 100k events/s): p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
}

criterion_group!(benches, sse, router, kv_router);

fn main() {
    benches();
    kv_decision_latency_at_1000_rps();
    Criterion::default().configure_from_args().final_summary();
}
