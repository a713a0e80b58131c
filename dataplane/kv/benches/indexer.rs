//! Benchmarks of the KV radix indexer: event apply rate and `find_matches` latency on a large tree.
//!
//! Run: `cargo bench -p dynamo-kv --bench indexer -- --warm-up-time 1 --measurement-time 3`
//!
//! Besides criterion's means, the `find_matches` group prints p50/p99/p99.9 from 10,000 individually timed
//! calls (`std::time::Instant`), and the time and rate of building the 1M-block tree, and its memory.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dynamo_kv::{KvEvent, KvIndexer, WorkerId, sequence_hash};

/// Blocks per `Stored` event, as an engine batching a prefill would emit.
const EVENT_BLOCKS: usize = 16;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Local hashes of a sequence: a prefix shared by its group, then blocks of its own.
fn sequence_locals(group: u64, shared: usize, id: u64, total: usize) -> Vec<u64> {
    (0..total as u64)
        .map(|b| {
            if (b as usize) < shared {
                splitmix(group << 32 | b)
            } else {
                splitmix(1 << 62 | id << 20 | b)
            }
        })
        .collect()
}

/// `Stored` events of `EVENT_BLOCKS` blocks each, chained by parent, covering `locals`.
fn store_events(locals: &[u64]) -> Vec<KvEvent> {
    let mut parent = None;
    locals
        .chunks(EVENT_BLOCKS)
        .map(|chunk| {
            let mut prev = parent;
            let blocks: Vec<(u64, u64)> = chunk
                .iter()
                .map(|&l| {
                    let s = sequence_hash(prev, l);
                    prev = Some(s);
                    (l, s)
                })
                .collect();
            let event = KvEvent::stored(parent, blocks);
            parent = prev;
            event
        })
        .collect()
}

fn apply_rate(c: &mut Criterion) {
    // 64 sequences of 256 blocks in 8 groups sharing a 32-block prefix, one of 16 workers each.
    let events: Vec<(WorkerId, KvEvent)> = (0..64u64)
        .flat_map(|i| {
            store_events(&sequence_locals(i % 8, 32, i, 256))
                .into_iter()
                .map(move |e| (i % 16, e))
        })
        .collect();
    let blocks: usize = events
        .iter()
        .map(|(_, e)| match e {
            KvEvent::Stored { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    let mut g = c.benchmark_group("indexer_apply");
    g.throughput(Throughput::Elements(blocks as u64));
    g.bench_function("stored_16_block_events_into_empty_index", |b| {
        b.iter_batched(
            || events.clone(),
            |events| {
                let ix = KvIndexer::new();
                for (w, e) in events {
                    let _ = ix.apply(w, e);
                }
                ix
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

const WORKERS: u64 = 256;
const REQUEST_BLOCKS: usize = 256;

/// ~1M blocks: 4,400 sequences of 256 blocks in 16 groups sharing a 32-block prefix, each held by 2 of 256
/// workers, plus one "hot" 256-block sequence held by every worker (the worst case for `find_matches`:
/// 256 workers survive all 256 depths).
fn big_index() -> (KvIndexer, Vec<u64>, Vec<u64>) {
    let ix = KvIndexer::new();
    let started = Instant::now();
    let mut stored = 0usize;
    let mut apply = |w: WorkerId, locals: &[u64]| {
        for e in store_events(locals) {
            if let KvEvent::Stored { blocks, .. } = &e {
                stored += blocks.len();
            }
            ix.apply(w, e).expect("parents are stored first");
        }
    };
    let mut typical = Vec::new();
    for i in 0..4_400u64 {
        let locals = sequence_locals(i % 16, 32, i, REQUEST_BLOCKS);
        apply(i % WORKERS, &locals);
        apply((i * 7 + 3) % WORKERS, &locals);
        if i == 1_234 {
            typical = locals;
        }
    }
    let hot = sequence_locals(1_000, REQUEST_BLOCKS, 0, REQUEST_BLOCKS);
    for w in 0..WORKERS {
        apply(w, &hot);
    }
    let took = started.elapsed();
    let st = ix.stats();
    println!(
        "built index: {} blocks, {} worker-block refs, {} workers in {:.2?} ({:.2} M stored blocks/s incl. event \
         construction); approx {:.1} MiB = {:.1} B/ref, {:.1} B/block",
        st.blocks,
        st.worker_block_refs,
        st.workers,
        took,
        stored as f64 / took.as_secs_f64() / 1e6,
        st.approx_bytes as f64 / (1 << 20) as f64,
        st.approx_bytes as f64 / st.worker_block_refs as f64,
        st.approx_bytes as f64 / st.blocks as f64,
    );
    (ix, hot, typical)
}

fn percentiles(name: &str, ix: &KvIndexer, request: &[u64]) {
    let mut ns: Vec<u128> = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            black_box(ix.find_matches(black_box(request)));
            t.elapsed().as_nanos()
        })
        .collect();
    ns.sort_unstable();
    let p = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    println!(
        "find_matches {name}: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.2} µs (10k calls)",
        p(0.5),
        p(0.99),
        p(0.999),
        p(1.0)
    );
}

fn find_matches(c: &mut Criterion) {
    let (ix, hot, typical) = big_index();
    let m = ix.find_matches(&hot);
    assert_eq!(m.scores.len(), WORKERS as usize);
    assert!(
        m.scores
            .iter()
            .all(|s| s.matched_blocks == REQUEST_BLOCKS as u32)
    );
    let m = ix.find_matches(&typical);
    assert!(
        m.scores
            .iter()
            .any(|s| s.matched_blocks == REQUEST_BLOCKS as u32)
    );
    percentiles("hot (256 workers x 256 blocks)", &ix, &hot);
    percentiles("typical (shared 32-block prefix)", &ix, &typical);

    let mut g = c.benchmark_group("indexer_find_matches_1m_blocks_256_workers");
    g.bench_function("hot_256_blocks_all_workers_match", |b| {
        b.iter(|| ix.find_matches(black_box(&hot)));
    });
    g.bench_function("typical_256_blocks", |b| {
        b.iter(|| ix.find_matches(black_box(&typical)));
    });
    g.finish();
}

criterion_group!(benches, apply_rate, find_matches);
criterion_main!(benches);
