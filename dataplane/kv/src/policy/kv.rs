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
//! What each worker caches comes from its KV events (the frontend subscribes to every worker's
//! numbered event stream and hands them to [`KvRouter::apply`]); what each worker is busy with
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
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use rand::Rng;
use tokio::time::Instant;

use crate::{ApplyError, KvEvent, KvIndexer, WorkerId, block_hashes, indexer::U64Hasher};

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<U64Hasher>>;

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
struct WorkerLoad {
    prefill_tokens: AtomicU64,
    active_blocks: AtomicU64,
    /// KV blocks the worker has (from its `Info`); 0 until known.
    capacity: AtomicU64,
    /// Decayed uncached blocks routed to the worker, and when that was last decayed.
    churn: Mutex<(f64, Instant)>,
    /// Its event stream said its cache is unknown ([`KvEvent::Unknown`]): routed prompts are
    /// learned for it, as in approximate mode, until a [`KvEvent::Cleared`].
    cache_unknown: std::sync::atomic::AtomicBool,
}

impl WorkerLoad {
    fn new() -> WorkerLoad {
        WorkerLoad {
            prefill_tokens: AtomicU64::new(0),
            active_blocks: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            churn: Mutex::new((0.0, Instant::now())),
            cache_unknown: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// Counters behind the router's metrics (`dynamo_router_*`, see [`KvRouter::register_metrics`]).
#[derive(Default)]
struct RouterStats {
    decisions: Counter,
    request_blocks: Counter,
    overlap_blocks: Counter,
    best_overlap_blocks: Counter,
    busy_skips: Counter,
    indexed_blocks: Gauge,
    indexed_worker_blocks: Gauge,
    cache_unknown_workers: Gauge,
}

/// Approximate mode's memory of what it routed where: per worker, each block's last use, and the
/// blocks in the order they were booked (stale entries are skipped when popped).
#[derive(Default)]
struct Learned {
    last_used: HashMap<(u64, u64), Instant, std::hash::BuildHasherDefault<U64Hasher>>,
    order: VecDeque<(Instant, u64, u64)>,
    per_worker: HashMap<u64, u64>,
}

/// KV-aware routing state shared by all requests of a frontend: the index of what every worker
/// caches and the router's own accounting of what each is busy with, for the workers that are
/// members now ([`KvRouter::add_worker`], [`KvRouter::remove_worker`]).
pub struct KvRouter {
    indexer: KvIndexer,
    config: KvRouterConfig,
    block_size: AtomicU32,
    load: RwLock<FastMap<WorkerId, Arc<WorkerLoad>>>,
    stats: RouterStats,
    learned: Mutex<Learned>,
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
    pub fn new(config: KvRouterConfig) -> KvRouter {
        KvRouter {
            indexer: KvIndexer::new(),
            config,
            block_size: AtomicU32::new(DEFAULT_BLOCK_SIZE),
            load: RwLock::new(FastMap::default()),
            stats: RouterStats::default(),
            learned: Mutex::new(Learned::default()),
        }
    }

    pub fn config(&self) -> &KvRouterConfig {
        &self.config
    }

    /// Makes `worker` a member: it can be chosen, and its load is tracked from zero.
    pub fn add_worker(&self, worker: WorkerId) {
        self.load
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(worker)
            .or_insert_with(|| Arc::new(WorkerLoad::new()));
    }

    /// Forgets `worker`: its blocks leave the index and its load accounting is dropped (claims
    /// still held by its requests release into the void).
    pub fn remove_worker(&self, worker: WorkerId) {
        // The index is cleared under the membership lock, so an event batch being applied now
        // (under the read lock, see `apply`) lands before the clear, and none after it.
        let mut load = self.load.write().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = load.remove(&worker)
            && gone.cache_unknown.load(Ordering::Relaxed)
        {
            self.stats.cache_unknown_workers.dec();
        }
        self.indexer.remove_worker(worker);
        drop(load);
        self.forget_learned(worker);
    }

    /// The members, in no particular order.
    pub fn workers(&self) -> Vec<WorkerId> {
        let load = self.load.read().unwrap_or_else(|p| p.into_inner());
        load.keys().copied().collect()
    }

    /// Applies one of `worker`'s KV events to the index (from its event stream). Events of a
    /// worker that is not a member (it left while its follower was mid-batch) are dropped, so a
    /// departed worker leaves nothing behind in the index.
    pub fn apply(&self, worker: WorkerId, event: KvEvent) -> Result<(), ApplyError> {
        let load = self.load.read().unwrap_or_else(|p| p.into_inner());
        let Some(member) = load.get(&worker) else {
            return Err(ApplyError::NotMember { worker });
        };
        let unknown = match event {
            KvEvent::Unknown => Some(true),
            KvEvent::Cleared => Some(false),
            _ => None,
        };
        let flipped = unknown.filter(|&u| member.cache_unknown.swap(u, Ordering::Relaxed) != u);
        match flipped {
            Some(true) => self.stats.cache_unknown_workers.inc(),
            Some(false) => self.stats.cache_unknown_workers.dec(),
            None => 0,
        };
        let applied = self.indexer.apply(worker, event);
        // Known again: what was learned for it goes (the lock order is learned, then members).
        drop(load);
        if flipped == Some(false) {
            self.forget_learned(worker);
        }
        applied
    }

    /// Drops approximate mode's bookkeeping for `worker` (its index entries go separately).
    fn forget_learned(&self, worker: WorkerId) {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        learned.last_used.retain(|&(w, _), _| w != worker);
        learned.order.retain(|&(_, w, _)| w != worker);
        learned.per_worker.remove(&worker);
    }

    /// Sets the block size the index hashes prompts with (from the workers' event streams).
    pub fn set_block_size(&self, block_size: u32) {
        if block_size > 0 {
            self.block_size.store(block_size, Ordering::Relaxed);
        }
    }

    /// Records `worker`'s KV capacity and block size (from its `Info`).
    pub fn set_worker_info(&self, worker: WorkerId, kv_blocks_total: u64, block_size: u32) {
        if let Some(load) = self.load_of(worker) {
            load.capacity.store(kv_blocks_total, Ordering::Relaxed);
        }
        if !self.config.events && block_size > 0 {
            self.block_size.store(block_size, Ordering::Relaxed);
        }
    }

    fn load_of(&self, worker: WorkerId) -> Option<Arc<WorkerLoad>> {
        let load = self.load.read().unwrap_or_else(|p| p.into_inner());
        load.get(&worker).cloned()
    }

    fn busy(&self, load: &WorkerLoad) -> bool {
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

    /// Scores the `candidates` (member workers; others are passed over) for a prompt of `tokens`.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        tokens: &[u32],
        candidates: &[WorkerId],
        tick: usize,
        rng: &mut R,
    ) -> Option<KvChoice> {
        let bs = self.block_size();
        let blocks = block_hashes(tokens, bs as usize);
        let locals: Vec<u64> = blocks.iter().map(|b| b.local).collect();
        let matches = self.indexer.find_matches(&locals);
        let overlaps: Vec<u32> = candidates
            .iter()
            .map(|&w| matches.matched_blocks(w))
            .collect();
        let request_tokens = tokens.len() as u64;
        // Read under the membership lock (no per-decision `Arc` clones); released before
        // `learn`, which takes it again.
        let members = self.load.read().unwrap_or_else(|p| p.into_inner());
        let loads: Vec<Option<&WorkerLoad>> = candidates
            .iter()
            .map(|w| members.get(w).map(|l| &**l))
            .collect();
        let busy: Vec<bool> = loads
            .iter()
            .map(|l| l.is_none_or(|l| self.busy(l)))
            .collect();
        let any_free = busy.contains(&false);
        let churn: Vec<f64> = if self.config.churn_weight > 0.0 {
            let now = Instant::now();
            loads
                .iter()
                .map(|l| {
                    let Some(l) = l else { return 0.0 };
                    let mut churn = l.churn.lock().unwrap_or_else(|p| p.into_inner());
                    let (v, at) = &mut *churn;
                    *v *= 0.5f64.powf(now.duration_since(*at).as_secs_f64() / CHURN_HALF_LIFE_S);
                    *at = now;
                    *v * self.config.churn_weight
                })
                .collect()
        } else {
            vec![0.0; candidates.len()]
        };
        let costs: Vec<f64> = loads
            .iter()
            .zip(&overlaps)
            .zip(&churn)
            .zip(&busy)
            .map(|(((load, &overlap), &churn), &busy)| {
                let Some(load) = load else {
                    return f64::INFINITY;
                };
                if any_free && busy {
                    self.stats.busy_skips.inc();
                    return f64::INFINITY;
                }
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
        self.stats.decisions.inc();
        self.stats
            .request_blocks
            .inc_by(u64::from(choice.request_blocks));
        self.stats
            .overlap_blocks
            .inc_by(u64::from(choice.overlap_blocks));
        let best = overlaps.iter().copied().max().unwrap_or(0);
        self.stats.best_overlap_blocks.inc_by(u64::from(best));
        // Approximate mode, or a worker whose cache is unknown: learn from this decision.
        let learn = !self.config.events
            || loads[candidate].is_some_and(|l| l.cache_unknown.load(Ordering::Relaxed));
        drop(members);
        if learn {
            let full: Vec<(u64, u64)> = blocks.iter().map(|b| (b.local, b.sequence)).collect();
            self.learn(candidates[candidate], &full);
        }
        Some(choice)
    }

    /// Approximate mode: the prompt's full blocks now count as cached on `worker`.
    fn learn(&self, worker: WorkerId, blocks: &[(u64, u64)]) {
        if blocks.is_empty() {
            return;
        }
        let w = worker;
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
        // A learned chain starts at the root: applying it cannot fail.
        let _ = self
            .indexer
            .apply(w, KvEvent::stored(None, blocks.iter().copied()));
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
                .load_of(w)
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
                    KvEvent::Removed {
                        block_hashes: vec![seq],
                    },
                );
            }
        }
    }

    /// Registers the router's metrics (`dynamo_router_*`) in `registry`; call
    /// [`KvRouter::refresh_metrics`] before each scrape for the index gauges.
    pub fn register_metrics(&self, registry: &mut Registry, model: &str) {
        let r = registry
            .sub_registry_with_prefix("dynamo_router")
            .sub_registry_with_label(("model".into(), model.to_owned().into()));
        let s = &self.stats;
        let counters: [(&str, &str, &Counter); 5] = [
            ("decisions", "kv routing decisions", &s.decisions),
            (
                "request_blocks",
                "prompt blocks of routed requests",
                &s.request_blocks,
            ),
            (
                "overlap_blocks",
                "prompt blocks the chosen worker held, as the index predicted",
                &s.overlap_blocks,
            ),
            (
                "best_overlap_blocks",
                "prompt blocks the best-matching candidate held (the chosen one may hold fewer when it is loaded)",
                &s.best_overlap_blocks,
            ),
            ("busy_skips", "workers passed over as busy", &s.busy_skips),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        let gauges: [(&str, &str, &Gauge); 3] = [
            (
                "workers_cache_unknown",
                "member workers whose KV cache is unknown (events lost beyond replay); routed by learning from decisions until cleared",
                &s.cache_unknown_workers,
            ),
            (
                "indexed_blocks",
                "distinct KV blocks in the router's index",
                &s.indexed_blocks,
            ),
            (
                "indexed_worker_blocks",
                "(worker, block) pairs in the router's index",
                &s.indexed_worker_blocks,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
    }

    /// Updates the index gauges (walks the index: call it per scrape, not per request).
    pub fn refresh_metrics(&self) {
        let stats = self.indexer.stats();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.stats.indexed_blocks.set(gauge(stats.blocks));
        self.stats
            .indexed_worker_blocks
            .set(gauge(stats.worker_block_refs));
    }

    /// KV blocks the requests this router sent to `worker` hold (booked until they finish).
    pub fn active_blocks(&self, worker: WorkerId) -> Option<u64> {
        self.load_of(worker)
            .map(|l| l.active_blocks.load(Ordering::Relaxed))
    }

    /// Prompt tokens routed to `worker` and not yet prefilled, as this router booked them.
    pub fn pending_prefill_tokens(&self, worker: WorkerId) -> Option<u64> {
        self.load_of(worker)
            .map(|l| l.prefill_tokens.load(Ordering::Relaxed))
    }

    /// Books a request routed to `worker` by `choice` on its load, until the claim drops. `None`
    /// when `worker` is not a member.
    pub fn claim(
        &self,
        worker: WorkerId,
        request_tokens: u64,
        choice: &KvChoice,
    ) -> Option<KvClaim> {
        let bs = u64::from(self.block_size().max(1));
        let prefill_tokens = request_tokens.saturating_sub(u64::from(choice.overlap_blocks) * bs);
        let blocks = u64::from(choice.request_blocks);
        let load = self.load_of(worker)?;
        load.prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        if self.config.churn_weight > 0.0 {
            let mut churn = load.churn.lock().unwrap_or_else(|p| p.into_inner());
            churn.0 += prefill_tokens as f64 / bs as f64;
        }
        load.active_blocks.fetch_add(blocks, Ordering::Relaxed);
        Some(KvClaim {
            load,
            prefill_tokens,
            blocks,
            prefilled: false,
        })
    }
}

/// A routed request's booking on its worker's load: prefill until its first token, KV blocks until
/// it ends.
pub struct KvClaim {
    load: Arc<WorkerLoad>,
    prefill_tokens: u64,
    blocks: u64,
    prefilled: bool,
}

impl KvClaim {
    /// The first token arrived: the prompt is prefilled.
    pub fn prefill_done(&mut self) {
        if !self.prefilled {
            self.prefilled = true;
            self.load
                .prefill_tokens
                .fetch_sub(self.prefill_tokens, Ordering::Relaxed);
        }
    }
}

impl Drop for KvClaim {
    fn drop(&mut self) {
        self.prefill_done();
        self.load
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
        let router = members(config, 2);
        let tokens: Vec<u32> = (0..640).collect();
        let hashes = block_hashes(&tokens, 64);
        router
            .apply(
                1,
                KvEvent::stored(None, hashes.iter().map(|h| (h.local, h.sequence))),
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
        assert!(claims.iter().all(Option::is_some));
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
        let load = router.load_of(1).expect("a member");
        assert_eq!(load.active_blocks.load(Ordering::Relaxed), 0);
        assert_eq!(load.prefill_tokens.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_removed_worker_leaves_the_index_and_is_never_chosen() {
        let router = members(KvRouterConfig::default(), 2);
        let tokens: Vec<u32> = (0..640).collect();
        let hashes = block_hashes(&tokens, 64);
        router
            .apply(
                1,
                KvEvent::stored(None, hashes.iter().map(|h| (h.local, h.sequence))),
            )
            .expect("applies");
        let mut rng = SmallRng::seed_from_u64(1);
        let choice = router
            .choose(&tokens, &[0, 1], 0, &mut rng)
            .expect("a choice");
        assert_eq!(choice.candidate, 1);
        let claim = router.claim(1, 640, &choice).expect("a member");
        router.remove_worker(1);
        assert_eq!(router.indexer().stats().worker_block_refs, 0);
        assert_eq!(router.workers(), vec![0]);
        // A stale candidate list still never yields the removed worker.
        for tick in 0..4 {
            let c = router
                .choose(&tokens, &[0, 1], tick, &mut rng)
                .expect("a choice");
            assert_eq!(c.candidate, 0);
        }
        assert!(router.claim(1, 640, &choice).is_none());
        // Its outstanding claim releases without touching anyone's load.
        drop(claim);
        // A late event of the removed worker is refused, not indexed.
        assert!(matches!(
            router.apply(1, KvEvent::stored(None, [(1, 2)])),
            Err(ApplyError::NotMember { worker: 1 })
        ));
        assert_eq!(router.indexer().stats().worker_block_refs, 0);
        // Joining again starts from an empty cache and no load.
        router.add_worker(1);
        let c = router.choose(&tokens, &[1], 0, &mut rng).expect("a choice");
        assert_eq!(c.overlap_blocks, 0);
    }
}

/// A router with members `0..n`.
#[cfg(test)]
fn members(config: KvRouterConfig, n: u64) -> Arc<KvRouter> {
    let router = Arc::new(KvRouter::new(config));
    for w in 0..n {
        router.add_worker(w);
    }
    router
}

#[cfg(test)]
mod approx_tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    fn approx(ttl: Duration) -> Arc<KvRouter> {
        members(
            KvRouterConfig {
                events: false,
                approx_ttl: ttl,
                ..KvRouterConfig::default()
            },
            2,
        )
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
    fn a_worker_with_an_unknown_cache_is_learned_from_decisions_until_cleared() {
        let router = members(KvRouterConfig::default(), 2);
        let tokens: Vec<u32> = (0..640).collect();
        let hashes = block_hashes(&tokens, 64);
        let stored = KvEvent::stored(None, hashes.iter().map(|h| (h.local, h.sequence)));
        router.apply(0, stored.clone()).expect("applies");
        // Events were lost: what the index had for worker 0 is no longer vouched for.
        router.apply(0, KvEvent::Unknown).expect("applies");
        let metric = |r: &KvRouter| r.stats.cache_unknown_workers.get();
        assert_eq!(metric(&router), 1);
        assert_eq!(router.indexer().stats().worker_block_refs, 0);
        let mut rng = SmallRng::seed_from_u64(1);
        let first = router.choose(&tokens, &[0], 0, &mut rng).expect("choice");
        assert_eq!(first.overlap_blocks, 0, "no overlap assumed");
        // The decision itself is learned, as in approximate mode.
        let again = router
            .choose(&tokens, &[0, 1], 1, &mut rng)
            .expect("choice");
        assert_eq!((again.candidate, again.overlap_blocks), (0, 10));
        // A worker with a known cache (1) learns nothing from being chosen.
        let other: Vec<u32> = (0..640).map(|t| t + 50_000).collect();
        router.choose(&other, &[1], 0, &mut rng);
        assert_eq!(
            router
                .choose(&other, &[1], 0, &mut rng)
                .map(|c| c.overlap_blocks),
            Some(0)
        );
        // Cleared: known again (empty), the learned blocks are gone.
        router.apply(0, KvEvent::Cleared).expect("applies");
        assert_eq!(metric(&router), 0);
        assert_eq!(router.indexer().stats().worker_block_refs, 0);
        router.apply(0, stored).expect("applies");
        router.apply(0, KvEvent::Unknown).expect("applies");
        router.remove_worker(0);
        assert_eq!(metric(&router), 0, "a departed worker is not counted");
    }

    #[test]
    fn a_worker_past_the_busy_threshold_is_skipped_while_another_has_room() {
        let router = members(KvRouterConfig::default(), 2);
        router.set_worker_info(0, 100, 64);
        router.set_worker_info(1, 100, 64);
        let tokens: Vec<u32> = (0..640).collect();
        let hashes = block_hashes(&tokens, 64);
        router
            .apply(
                0,
                KvEvent::stored(None, hashes.iter().map(|h| (h.local, h.sequence))),
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
        let router = members(config, 2);
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
