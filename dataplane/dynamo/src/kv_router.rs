//! The `kv` routing policy: send a request where it is cheapest to serve, counting the prompt blocks
//! a worker would still have to prefill (those not already in its prefix cache), the prefill already
//! queued there and the decode load it carries:
//!
//! `cost = overlap_weight × new_prefill_blocks + queue_weight × queued_prefill_blocks + decode_blocks`,
//! where `new_prefill_blocks` are this prompt's uncached tokens / block_size,
//! `queued_prefill_blocks` the prefill tokens already routed to the worker and not yet done / block_size,
//! and `decode_blocks = KV blocks of the worker's active requests + this request's blocks`, plus
//! optionally `churn_weight × uncached blocks recently routed to the worker` (30 s half-life), which
//! spreads new prompts so that every worker's cached prefixes survive about as long (off by default:
//! on the Mooncake trace its effect was within run-to-run noise, see docs/kv-routing.md).
//!
//! What each worker caches comes from its KV events ([`KvRouter::follow`] subscribes to every
//! sidecar's numbered event stream and applies it to a [`KvIndexer`]); what each worker is busy with
//! comes from the router's own accounting ([`KvClaim`]), updated when a request is routed, when its
//! first token arrives (prefill done) and when it ends, so load is known between events.
//! The lowest cost wins (ties rotate); with a temperature > 0, workers are drawn with probability
//! ∝ exp(−(cost − min cost) / temperature), which spreads load among near-equal workers.
//!
//! A worker whose booked KV blocks exceed `busy_threshold` of its capacity is passed over while a
//! less busy one exists. For engines that publish no KV events, the approximate mode
//! (`events = false`) indexes each routed prompt's blocks on the chosen worker itself and forgets
//! them after a TTL, or sooner when the worker's capacity is exceeded (oldest first).

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use dynamo_kv::{IndexEvent, KvIndexer, block_hashes};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

use crate::proto::{self, kv_event::Kind, worker_client::WorkerClient};

/// Block size assumed until a worker reports its own.
const DEFAULT_BLOCK_SIZE: u32 = 64;

/// Defaults of the `kv` policy, shared by [`KvRouterConfig::default`] and the CLI
/// (docs/kv-routing.md has the measurements behind the weights).
pub const DEFAULT_OVERLAP_WEIGHT: f64 = 16.0;
pub const DEFAULT_QUEUE_WEIGHT: f64 = 4.0;
pub const DEFAULT_BUSY_THRESHOLD: f64 = 0.95;

/// Tuning of the `kv` policy.
#[derive(Debug, Clone, Copy)]
pub struct KvRouterConfig {
    /// Weight of prefill work against decode load (higher: chase cache hits harder).
    pub overlap_weight: f64,
    /// 0: always the cheapest worker; > 0: softmax sampling over costs (in blocks).
    pub temperature: f64,
    /// A worker whose booked KV blocks exceed this fraction of its capacity is skipped while a
    /// less busy worker exists (≥ 1 disables).
    pub busy_threshold: f64,
    /// Follow the workers' KV events (true) or learn from the router's own decisions (false).
    pub events: bool,
    /// Approximate mode: how long a routed prompt's blocks count as cached on its worker.
    pub approx_ttl: Duration,
    /// Weight of each worker's recent cache churn (uncached blocks routed to it, decaying with a
    /// 30 s half-life): spreading new prompts evenly keeps every worker's cached prefixes alive
    /// about as long. 0 disables.
    pub churn_weight: f64,
    /// Weight of prefill work already queued on a worker, per block (see [`kv_cost`]).
    pub queue_weight: f64,
}

impl Default for KvRouterConfig {
    fn default() -> Self {
        KvRouterConfig {
            overlap_weight: DEFAULT_OVERLAP_WEIGHT,
            temperature: 0.0,
            busy_threshold: DEFAULT_BUSY_THRESHOLD,
            events: true,
            approx_ttl: Duration::from_secs(120),
            churn_weight: 0.0,
            queue_weight: DEFAULT_QUEUE_WEIGHT,
        }
    }
}

/// Cost of serving a request of `request_tokens` on a worker that already holds `overlap_blocks`
/// of its leading blocks, has `pending_prefill_tokens` queued and `active_blocks` in use.
///
/// The prompt's own uncached blocks weigh `overlap_weight` each; prefill already queued on the
/// worker weighs `queue_weight` per block. Both delay this request's first token alike, but only the
/// new prefill is extra work for the fleet (and a second copy of a prefix it already caches), so the
/// queue is weighed lighter: a worker holding the prefix is not given up for a short queue.
pub fn kv_cost(
    overlap_weight: f64,
    queue_weight: f64,
    block_size: u32,
    request_tokens: u64,
    overlap_blocks: u32,
    pending_prefill_tokens: u64,
    active_blocks: u64,
) -> f64 {
    let bs = u64::from(block_size.max(1));
    let request_blocks = request_tokens.div_ceil(bs);
    let new_tokens = request_tokens.saturating_sub(u64::from(overlap_blocks) * bs);
    (overlap_weight * new_tokens as f64 + queue_weight * pending_prefill_tokens as f64) / bs as f64
        + (active_blocks + request_blocks) as f64
}

/// Picks among `costs` (index into it): the minimum (ties rotate with `tick`), or a softmax draw.
pub fn pick_by_cost<R: Rng + ?Sized>(
    costs: &[f64],
    temperature: f64,
    tick: usize,
    rng: &mut R,
) -> Option<usize> {
    let n = costs.len();
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    if n == 0 || !min.is_finite() {
        return None;
    }
    if temperature > 0.0 {
        let weights: Vec<f64> = costs
            .iter()
            .map(|c| (-(c - min) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut x = rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return Some(i);
            }
            x -= w;
        }
        return Some(n - 1);
    }
    let start = tick % n;
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| costs[i] <= min + 1e-9)
}

/// The router's view of one worker's work in flight.
#[derive(Default)]
struct WorkerLoad {
    prefill_tokens: AtomicU64,
    active_blocks: AtomicU64,
    /// KV blocks the worker has (from its `Info`); 0 until known.
    capacity: AtomicU64,
}

/// Counters behind the router's `/metrics` lines.
#[derive(Default)]
struct RouterStats {
    decisions: AtomicU64,
    request_blocks: AtomicU64,
    overlap_blocks: AtomicU64,
    best_overlap_blocks: AtomicU64,
    busy_skips: AtomicU64,
}

/// Approximate mode's memory of what it routed where: per worker, each block's last use, and the
/// blocks in the order they were booked (stale entries are skipped when popped).
#[derive(Default)]
struct Learned {
    last_used:
        HashMap<(u64, u64), Instant, std::hash::BuildHasherDefault<dynamo_kv::indexer::U64Hasher>>,
    order: VecDeque<(Instant, u64, u64)>,
    per_worker: HashMap<u64, u64>,
}

/// KV-aware routing state shared by all requests of a frontend.
pub struct KvRouter {
    indexer: KvIndexer,
    config: KvRouterConfig,
    block_size: AtomicU32,
    load: Vec<WorkerLoad>,
    stats: RouterStats,
    learned: Mutex<Learned>,
    /// Per worker: decayed uncached blocks routed to it, and when that was last decayed.
    churn: Mutex<Vec<(f64, Instant)>>,
}

const CHURN_HALF_LIFE_S: f64 = 30.0;

/// The outcome of a routing decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvChoice {
    /// Index into the candidates given to [`KvRouter::choose`].
    pub candidate: usize,
    /// Leading blocks of the prompt the chosen worker already holds.
    pub overlap_blocks: u32,
    /// The prompt's blocks (full and partial).
    pub request_blocks: u32,
}

impl KvRouter {
    pub fn new(workers: usize, config: KvRouterConfig) -> KvRouter {
        KvRouter {
            indexer: KvIndexer::new(),
            config,
            block_size: AtomicU32::new(DEFAULT_BLOCK_SIZE),
            load: (0..workers).map(|_| WorkerLoad::default()).collect(),
            stats: RouterStats::default(),
            learned: Mutex::new(Learned::default()),
            churn: Mutex::new(vec![(0.0, Instant::now()); workers]),
        }
    }

    pub fn config(&self) -> &KvRouterConfig {
        &self.config
    }

    /// Records worker `index`'s KV capacity and block size (from its `Info`).
    pub fn set_worker_info(&self, index: usize, kv_blocks_total: u64, block_size: u32) {
        if let Some(load) = self.load.get(index) {
            load.capacity.store(kv_blocks_total, Ordering::Relaxed);
        }
        if !self.config.events && block_size > 0 {
            self.block_size.store(block_size, Ordering::Relaxed);
        }
    }

    fn busy(&self, w: usize) -> bool {
        let load = &self.load[w];
        let capacity = load.capacity.load(Ordering::Relaxed);
        capacity > 0
            && self.config.busy_threshold < 1.0
            && load.active_blocks.load(Ordering::Relaxed) as f64
                > self.config.busy_threshold * capacity as f64
    }

    pub fn block_size(&self) -> u32 {
        self.block_size.load(Ordering::Relaxed)
    }

    pub fn indexer(&self) -> &KvIndexer {
        &self.indexer
    }

    /// Scores the `candidates` (worker indexes) for a prompt of `tokens`.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        tokens: &[u32],
        candidates: &[usize],
        tick: usize,
        rng: &mut R,
    ) -> Option<KvChoice> {
        let bs = self.block_size();
        let blocks = block_hashes(tokens, bs as usize);
        let locals: Vec<u64> = blocks.iter().map(|b| b.local).collect();
        let matches = self.indexer.find_matches(&locals);
        let overlaps: Vec<u32> = candidates
            .iter()
            .map(|&w| matches.matched_blocks(w as u64))
            .collect();
        let request_tokens = tokens.len() as u64;
        let busy: Vec<bool> = candidates.iter().map(|&w| self.busy(w)).collect();
        let any_free = busy.contains(&false);
        let churn: Vec<f64> = if self.config.churn_weight > 0.0 {
            let now = Instant::now();
            let mut churn = self.churn.lock().unwrap_or_else(|p| p.into_inner());
            candidates
                .iter()
                .map(|&w| {
                    let (v, at) = &mut churn[w];
                    *v *= 0.5f64.powf(now.duration_since(*at).as_secs_f64() / CHURN_HALF_LIFE_S);
                    *at = now;
                    *v * self.config.churn_weight
                })
                .collect()
        } else {
            vec![0.0; candidates.len()]
        };
        let costs: Vec<f64> = candidates
            .iter()
            .zip(&overlaps)
            .zip(&churn)
            .zip(&busy)
            .map(|(((&w, &overlap), &churn), &busy)| {
                if any_free && busy {
                    self.stats.busy_skips.fetch_add(1, Ordering::Relaxed);
                    return f64::INFINITY;
                }
                let load = &self.load[w];
                kv_cost(
                    self.config.overlap_weight,
                    self.config.queue_weight,
                    bs,
                    request_tokens,
                    overlap,
                    load.prefill_tokens.load(Ordering::Relaxed),
                    load.active_blocks.load(Ordering::Relaxed),
                ) + churn
            })
            .collect();
        let candidate = pick_by_cost(&costs, self.config.temperature, tick, rng)?;
        let choice = KvChoice {
            candidate,
            overlap_blocks: overlaps[candidate],
            request_blocks: u32::try_from(request_tokens.div_ceil(u64::from(bs.max(1))))
                .unwrap_or(u32::MAX),
        };
        self.stats.decisions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .request_blocks
            .fetch_add(u64::from(choice.request_blocks), Ordering::Relaxed);
        self.stats
            .overlap_blocks
            .fetch_add(u64::from(choice.overlap_blocks), Ordering::Relaxed);
        let best = overlaps.iter().copied().max().unwrap_or(0);
        self.stats
            .best_overlap_blocks
            .fetch_add(u64::from(best), Ordering::Relaxed);
        if !self.config.events {
            let full: Vec<(u64, u64)> = blocks.iter().map(|b| (b.local, b.sequence)).collect();
            self.learn(candidates[candidate], &full);
        }
        Some(choice)
    }

    /// Approximate mode: the prompt's full blocks now count as cached on `worker`.
    fn learn(&self, worker: usize, blocks: &[(u64, u64)]) {
        if blocks.is_empty() {
            return;
        }
        let w = worker as u64;
        let now = Instant::now();
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let mut added = 0;
        for &(_, seq) in blocks {
            if learned.last_used.insert((w, seq), now).is_none() {
                added += 1;
            }
            learned.order.push_back((now, w, seq));
        }
        *learned.per_worker.entry(w).or_default() += added;
        if let Err(error) = self.indexer.apply(
            w,
            IndexEvent::Stored {
                parent: None,
                blocks: blocks.to_vec(),
            },
        ) {
            tracing::debug!(worker, %error, "learned blocks not indexed");
        }
        self.expire_locked(&mut learned, now);
    }

    /// Approximate mode: forgets blocks unused for the TTL, and the oldest blocks of a worker that
    /// holds more than its capacity.
    pub fn expire(&self) {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        self.expire_locked(&mut learned, Instant::now());
    }

    fn expire_locked(&self, learned: &mut Learned, now: Instant) {
        let ttl = self.config.approx_ttl;
        while let Some(&(at, w, seq)) = learned.order.front() {
            let capacity = self
                .load
                .get(w as usize)
                .map_or(0, |l| l.capacity.load(Ordering::Relaxed));
            let over = capacity > 0 && learned.per_worker.get(&w).copied().unwrap_or(0) > capacity;
            if now.duration_since(at) < ttl && !over {
                break;
            }
            learned.order.pop_front();
            // Only the newest booking of a block decides when it goes.
            if learned.last_used.get(&(w, seq)) == Some(&at) {
                learned.last_used.remove(&(w, seq));
                if let Some(n) = learned.per_worker.get_mut(&w) {
                    *n = n.saturating_sub(1);
                }
                let _ = self.indexer.apply(
                    w,
                    IndexEvent::Removed {
                        sequence_hashes: vec![seq],
                    },
                );
            }
        }
    }

    /// Prometheus text lines about the router (appended to the frontend's `/metrics`).
    pub fn encode_metrics(&self, out: &mut String, model: &str) {
        let stats = self.indexer.stats();
        let s = &self.stats;
        let lines: [(&str, &str, &str, f64); 7] = [
            (
                "dynamo_router_decisions_total",
                "counter",
                "kv routing decisions",
                s.decisions.load(Ordering::Relaxed) as f64,
            ),
            (
                "dynamo_router_request_blocks_total",
                "counter",
                "prompt blocks of routed requests",
                s.request_blocks.load(Ordering::Relaxed) as f64,
            ),
            (
                "dynamo_router_overlap_blocks_total",
                "counter",
                "prompt blocks the chosen worker held, as the index predicted",
                s.overlap_blocks.load(Ordering::Relaxed) as f64,
            ),
            (
                "dynamo_router_best_overlap_blocks_total",
                "counter",
                "prompt blocks the best-matching candidate held (the chosen one may hold fewer when it is loaded)",
                s.best_overlap_blocks.load(Ordering::Relaxed) as f64,
            ),
            (
                "dynamo_router_busy_skips_total",
                "counter",
                "workers passed over as busy",
                s.busy_skips.load(Ordering::Relaxed) as f64,
            ),
            (
                "dynamo_router_indexed_blocks",
                "gauge",
                "distinct KV blocks in the router's index",
                stats.blocks as f64,
            ),
            (
                "dynamo_router_indexed_worker_blocks",
                "gauge",
                "(worker, block) pairs in the router's index",
                stats.worker_block_refs as f64,
            ),
        ];
        for (name, kind, help, value) in lines {
            let base = name.strip_suffix("_total").unwrap_or(name);
            let _ = writeln!(
                out,
                "# HELP {base} {help}\n# TYPE {base} {kind}\n{name}{{model=\"{model}\"}} {value}"
            );
        }
    }

    /// Books a routed request against worker `index` until the returned claim is dropped.
    pub fn claim(
        self: &Arc<Self>,
        index: usize,
        request_tokens: u64,
        choice: &KvChoice,
    ) -> KvClaim {
        let bs = u64::from(self.block_size().max(1));
        let prefill_tokens = request_tokens.saturating_sub(u64::from(choice.overlap_blocks) * bs);
        let blocks = u64::from(choice.request_blocks);
        let load = &self.load[index];
        load.prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        if self.config.churn_weight > 0.0 {
            let mut churn = self.churn.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((v, _)) = churn.get_mut(index) {
                *v += prefill_tokens as f64 / bs as f64;
            }
        }
        load.active_blocks.fetch_add(blocks, Ordering::Relaxed);
        KvClaim {
            router: self.clone(),
            index,
            prefill_tokens,
            blocks,
            prefilled: false,
        }
    }

    /// Follows worker `index`'s KV events until `shutdown`. It subscribes asking for a snapshot
    /// when its view cannot be resumed: the first time, after a gap older than the sidecar's ring,
    /// and after the worker restarted; otherwise a broken stream resumes with the last sequence
    /// number seen and the sidecar replays what was missed. While the worker is unreachable its
    /// blocks are dropped from the index (a restarted worker starts cold).
    pub async fn follow(
        self: Arc<Self>,
        index: usize,
        client: WorkerClient<Channel>,
        shutdown: CancellationToken,
    ) {
        let worker = index as u64;
        let mut after = 0u64;
        let mut instance: Option<u64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut c = client.clone();
            let request = proto::SubscribeKvEventsRequest {
                after_seq: after,
                snapshot: true,
            };
            let subscribed = tokio::select! {
                () = shutdown.cancelled() => return,
                r = c.subscribe_kv_events(request) => r,
            };
            match subscribed {
                Ok(response) => {
                    backoff = Duration::from_millis(100);
                    let mut stream = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            () = shutdown.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match next {
                            Ok(Some(batch)) => {
                                self.apply_batch(index, &mut instance, &mut after, batch)
                            }
                            // Ended, or fell behind the live stream: resume from the ring.
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(worker = index, %status, "KV event stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    if status.code() == Code::Unavailable && instance.is_some() {
                        tracing::info!(
                            worker = index,
                            "worker unreachable; dropping its blocks from the index"
                        );
                        self.indexer.remove_worker(worker);
                        instance = None;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Applies one batch of worker `index`'s events to the index.
    fn apply_batch(
        &self,
        index: usize,
        instance: &mut Option<u64>,
        after: &mut u64,
        batch: proto::KvEventBatch,
    ) {
        let worker = index as u64;
        if batch.snapshot || instance.is_some_and(|i| i != batch.instance) {
            // A snapshot replaces the view; a new instance means the worker restarted cold.
            self.indexer.remove_worker(worker);
        }
        *instance = Some(batch.instance);
        if batch.block_size > 0 {
            self.block_size.store(batch.block_size, Ordering::Relaxed);
        }
        if batch.snapshot {
            *after = batch.snapshot_seq;
        }
        for event in batch.events {
            *after = (*after).max(event.seq);
            if let Some(e) = to_index_event(event)
                && let Err(error) = self.indexer.apply(worker, e)
            {
                tracing::debug!(worker = index, %error, "KV event not applied");
            }
        }
    }
}

fn to_index_event(event: proto::KvEvent) -> Option<IndexEvent> {
    Some(match event.kind? {
        Kind::Stored(s) => IndexEvent::Stored {
            parent: s.parent_hash,
            blocks: s
                .blocks
                .into_iter()
                .map(|b| (b.tokens_hash, b.block_hash))
                .collect(),
        },
        Kind::Removed(r) => IndexEvent::Removed {
            sequence_hashes: r.block_hashes,
        },
        Kind::Cleared(_) => IndexEvent::Cleared,
    })
}

/// A routed request's share of a worker's load, released on drop.
pub struct KvClaim {
    router: Arc<KvRouter>,
    index: usize,
    prefill_tokens: u64,
    blocks: u64,
    prefilled: bool,
}

impl KvClaim {
    /// The first token arrived: the prompt is prefilled.
    pub fn prefill_done(&mut self) {
        if !self.prefilled {
            self.prefilled = true;
            self.router.load[self.index]
                .prefill_tokens
                .fetch_sub(self.prefill_tokens, Ordering::Relaxed);
        }
    }
}

impl Drop for KvClaim {
    fn drop(&mut self) {
        self.prefill_done();
        self.router.load[self.index]
            .active_blocks
            .fetch_sub(self.blocks, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn cached_prefix_lowers_the_cost_by_the_blocks_saved() {
        let cold = kv_cost(1.0, 1.0, 64, 640, 0, 0, 0);
        let warm = kv_cost(1.0, 1.0, 64, 640, 8, 0, 0);
        assert_eq!(cold - warm, 8.0);
    }

    #[test]
    fn busy_worker_loses_to_an_idle_one_with_less_cache() {
        // Worker A holds 4 of 10 blocks but has 40 active blocks; B holds nothing and is idle.
        let a = kv_cost(1.0, 1.0, 64, 640, 4, 0, 40);
        let b = kv_cost(1.0, 1.0, 64, 640, 0, 0, 0);
        assert!(b < a, "a={a} b={b}");
    }

    #[test]
    fn queued_prefill_counts_against_a_worker() {
        assert!(kv_cost(1.0, 1.0, 64, 640, 0, 6400, 0) > kv_cost(1.0, 1.0, 64, 640, 0, 0, 0));
    }

    #[test]
    fn a_short_queue_does_not_outweigh_a_cached_prefix() {
        // A holds 8 of the prompt's 10 blocks and is prefilling another 10-block prompt; B is idle
        // and cold. Counting A's queue as heavily as new work sends the prompt to B (and
        // recomputes 8 cached blocks there); the default queue weight keeps it on A.
        let w = DEFAULT_OVERLAP_WEIGHT;
        let a = |queue_weight| kv_cost(w, queue_weight, 64, 640, 8, 640, 10);
        let b = kv_cost(w, DEFAULT_QUEUE_WEIGHT, 64, 640, 0, 0, 0);
        assert!(a(w) > b, "a={} b={b}", a(w));
        assert!(
            a(DEFAULT_QUEUE_WEIGHT) < b,
            "a={} b={b}",
            a(DEFAULT_QUEUE_WEIGHT)
        );
        // A long enough queue still sends it elsewhere.
        assert!(kv_cost(w, DEFAULT_QUEUE_WEIGHT, 64, 640, 8, 64 * 64, 10) > b);
    }

    #[test]
    fn ties_rotate_and_temperature_samples_near_equal_workers() {
        let mut rng = SmallRng::seed_from_u64(1);
        let picks: Vec<_> = (0..3)
            .map(|t| pick_by_cost(&[2.0, 2.0, 2.0], 0.0, t, &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2].map(Some));
        assert_eq!(pick_by_cost(&[5.0, 1.0, 3.0], 0.0, 0, &mut rng), Some(1));
        let mut seen = [0u32; 2];
        for t in 0..2000 {
            seen[pick_by_cost(&[1.0, 1.5], 1.0, t, &mut rng).unwrap_or(0)] += 1;
        }
        assert!(seen[0] > seen[1] && seen[1] > 400, "{seen:?}");
        assert_eq!(pick_by_cost(&[], 0.0, 0, &mut rng), None);
    }

    #[test]
    fn router_prefers_the_worker_holding_the_prefix_and_releases_load_on_drop() {
        let config = KvRouterConfig {
            overlap_weight: 1.0,
            ..KvRouterConfig::default()
        };
        let router = Arc::new(KvRouter::new(2, config));
        let tokens: Vec<u32> = (0..640).collect();
        let hashes = block_hashes(&tokens, 64);
        let mut parent = None;
        let blocks: Vec<(u64, u64)> = hashes.iter().map(|h| (h.local, h.sequence)).collect();
        router
            .indexer()
            .apply(
                1,
                IndexEvent::Stored {
                    parent: parent.take(),
                    blocks,
                },
            )
            .expect("applies");
        let mut rng = SmallRng::seed_from_u64(1);
        let choice = router
            .choose(&tokens, &[0, 1], 0, &mut rng)
            .expect("a choice");
        assert_eq!(
            (
                choice.candidate,
                choice.overlap_blocks,
                choice.request_blocks
            ),
            (1, 10, 10)
        );
        // Load it heavily: now worker 0 wins despite the cache.
        let claims: Vec<_> = (0..5).map(|_| router.claim(1, 640, &choice)).collect();
        assert_eq!(
            router
                .choose(&tokens, &[0, 1], 0, &mut rng)
                .map(|c| c.candidate),
            Some(0)
        );
        drop(claims);
        assert_eq!(
            router
                .choose(&tokens, &[0, 1], 0, &mut rng)
                .map(|c| c.candidate),
            Some(1)
        );
        assert_eq!(router.load[1].active_blocks.load(Ordering::Relaxed), 0);
        assert_eq!(router.load[1].prefill_tokens.load(Ordering::Relaxed), 0);
    }
}

#[cfg(test)]
mod approx_tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    fn approx(ttl: Duration) -> Arc<KvRouter> {
        Arc::new(KvRouter::new(
            2,
            KvRouterConfig {
                events: false,
                approx_ttl: ttl,
                ..KvRouterConfig::default()
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn approximate_mode_remembers_a_routed_prefix_until_its_ttl() {
        let router = approx(Duration::from_secs(10));
        let tokens: Vec<u32> = (0..640).collect();
        let mut rng = SmallRng::seed_from_u64(1);
        let first = router
            .choose(&tokens, &[0, 1], 0, &mut rng)
            .expect("choice");
        assert_eq!(first.overlap_blocks, 0);
        let again = router
            .choose(&tokens, &[0, 1], 1, &mut rng)
            .expect("choice");
        assert_eq!(
            (again.candidate, again.overlap_blocks),
            (first.candidate, 10)
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        router.expire();
        assert_eq!(router.indexer().stats().worker_block_refs, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn approximate_mode_forgets_the_oldest_blocks_beyond_capacity() {
        let router = approx(Duration::from_secs(3600));
        router.set_worker_info(0, 10, 64);
        router.set_worker_info(1, 10, 64);
        let mut rng = SmallRng::seed_from_u64(1);
        for p in 0..4u32 {
            let tokens: Vec<u32> = (0..640).map(|t| t + p * 10_000).collect();
            router.choose(&tokens, &[0], 0, &mut rng);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 4 prompts x 10 blocks on a 10-block worker: only the newest prompt is remembered.
        assert_eq!(router.indexer().stats().worker_block_refs, 10);
        let newest: Vec<u32> = (0..640).map(|t| t + 3 * 10_000).collect();
        let c = router.choose(&newest, &[0], 0, &mut rng).expect("choice");
        assert_eq!(c.overlap_blocks, 10);
    }

    #[test]
    fn a_worker_past_the_busy_threshold_is_skipped_while_another_has_room() {
        let router = Arc::new(KvRouter::new(2, KvRouterConfig::default()));
        router.set_worker_info(0, 100, 64);
        router.set_worker_info(1, 100, 64);
        let tokens: Vec<u32> = (0..640).collect();
        let blocks = block_hashes(&tokens, 64)
            .iter()
            .map(|h| (h.local, h.sequence))
            .collect();
        router
            .indexer()
            .apply(
                0,
                IndexEvent::Stored {
                    parent: None,
                    blocks,
                },
            )
            .expect("applies");
        let mut rng = SmallRng::seed_from_u64(1);
        let choice = router
            .choose(&tokens, &[0, 1], 0, &mut rng)
            .expect("choice");
        assert_eq!(
            choice.candidate, 0,
            "the cache wins while worker 0 has room"
        );
        // Book 96 of worker 0's 100 blocks: past 0.95, so worker 1 gets the request despite the cache.
        let big = KvChoice {
            candidate: 0,
            overlap_blocks: 0,
            request_blocks: 96,
        };
        let _claim = router.claim(0, 96 * 64, &big);
        let choice = router
            .choose(&tokens, &[0, 1], 0, &mut rng)
            .expect("choice");
        assert_eq!(choice.candidate, 1);
        // With every worker busy, the cheapest still gets it.
        let _other = router.claim(1, 96 * 64, &big);
        assert!(router.choose(&tokens, &[0, 1], 0, &mut rng).is_some());
    }

    #[test]
    fn new_prompts_go_to_the_worker_with_the_least_recent_churn() {
        let config = KvRouterConfig {
            churn_weight: 0.5,
            ..KvRouterConfig::default()
        };
        let router = Arc::new(KvRouter::new(2, config));
        let mut rng = SmallRng::seed_from_u64(1);
        // Worker 0 just took (and finished) a large cold prompt: its cached prefixes are being churned.
        let cold: Vec<u32> = (0..64 * 100).collect();
        let choice = KvChoice {
            candidate: 0,
            overlap_blocks: 0,
            request_blocks: 100,
        };
        drop(router.claim(0, cold.len() as u64, &choice));
        let fresh: Vec<u32> = (10_000..10_640).collect();
        for tick in 0..4 {
            let c = router
                .choose(&fresh, &[0, 1], tick, &mut rng)
                .expect("choice");
            assert_eq!(c.candidate, 1, "tick {tick}");
        }
    }
}
