//! Picks the worker for each request and tracks which workers are alive.
//!
//! The pool holds one gRPC channel per worker (HTTP/2, multiplexed), the router's own count of
//! in-flight requests per worker (updated on route and on finish, so load is known between
//! polls), and liveness from periodic `Info` probes plus failed calls. Policies are pure functions
//! over a snapshot of loads ([`select`]). The `kv` policy (prefix-overlap aware) lives in [`crate::kv_router`].

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::Rng;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Channel, Endpoint};

use crate::{
    kv_router::{KvClaim, KvRouter, KvRouterConfig},
    proto::{self, worker_client::WorkerClient},
};

/// How the frontend spreads requests over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Each live worker in turn.
    RoundRobin,
    /// A uniformly random live worker.
    Random,
    /// The live worker with the fewest requests in flight (ties: rotate).
    LeastLoaded,
    /// Two random live workers; the one with fewer requests in flight.
    PowerOfTwo,
    /// The worker where the request is cheapest: prefix-cache overlap from KV events against load
    /// (see [`crate::kv_router`]).
    Kv,
}

impl RouterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
            RouterMode::PowerOfTwo => "power-of-two",
            RouterMode::Kv => "kv",
        }
    }
}

/// Chooses among `loads` (in-flight requests of each candidate). `tick` is a counter the caller
/// advances per decision (round-robin position, tie-breaking). Returns an index into `loads`.
pub fn select<R: Rng + ?Sized>(
    mode: RouterMode,
    loads: &[u32],
    tick: usize,
    rng: &mut R,
) -> Option<usize> {
    let n = loads.len();
    if n == 0 {
        return None;
    }
    Some(match mode {
        RouterMode::RoundRobin => tick % n,
        RouterMode::Random => rng.random_range(0..n),
        // Without prompt tokens (see `WorkerPool::pick`) the kv policy degrades to least-loaded.
        RouterMode::LeastLoaded | RouterMode::Kv => {
            // Start the scan at a rotating offset so ties do not always favour worker 0.
            let start = tick % n;
            (0..n)
                .map(|k| (start + k) % n)
                .min_by_key(|&i| loads[i])
                .unwrap_or(start)
        }
        RouterMode::PowerOfTwo => {
            if n == 1 {
                0
            } else {
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                if loads[b] < loads[a] { b } else { a }
            }
        }
    })
}

/// One worker as the router sees it.
pub struct WorkerEntry {
    pub url: String,
    pub client: WorkerClient<Channel>,
    inflight: AtomicU32,
    live: AtomicBool,
    info: RwLock<Option<proto::WorkerInfo>>,
}

impl WorkerEntry {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }
    pub fn info(&self) -> Option<proto::WorkerInfo> {
        self.info.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Marks the worker dead after a failed call; the health loop revives it when it answers again.
    pub fn mark_dead(&self, why: &str) {
        if self.live.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.url, why, "worker marked dead");
        }
    }
}

/// An in-flight request's claim on a worker: released (load decremented) on drop.
pub struct Lease {
    /// Position of the worker in the pool (to exclude it on a retry).
    pub index: usize,
    pub worker: Arc<WorkerEntry>,
    /// The kv policy's booking of this request's prefill and decode load.
    pub kv: Option<KvClaim>,
}

impl Lease {
    /// The first token arrived (the prompt is prefilled).
    pub fn first_token(&mut self) {
        if let Some(kv) = &mut self.kv {
            kv.prefill_done();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The workers of one model and the policy that picks among them.
pub struct WorkerPool {
    workers: Vec<Arc<WorkerEntry>>,
    mode: RouterMode,
    tick: AtomicUsize,
    kv: Option<Arc<KvRouter>>,
}

impl WorkerPool {
    /// Creates lazily connecting channels to `urls` (e.g. `http://127.0.0.1:4501`). Workers count as
    /// dead until their first successful probe.
    pub fn new(
        urls: &[String],
        mode: RouterMode,
        kv_config: KvRouterConfig,
    ) -> anyhow::Result<WorkerPool> {
        let mut workers = Vec::with_capacity(urls.len());
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("invalid worker URL {url:?}: {e}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .initial_stream_window_size(Some(1 << 20))
                .initial_connection_window_size(Some(8 << 20));
            let client = WorkerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            workers.push(Arc::new(WorkerEntry {
                url: url.clone(),
                client,
                inflight: AtomicU32::new(0),
                live: AtomicBool::new(false),
                info: RwLock::new(None),
            }));
        }
        let kv =
            (mode == RouterMode::Kv).then(|| Arc::new(KvRouter::new(workers.len(), kv_config)));
        Ok(WorkerPool {
            workers,
            mode,
            tick: AtomicUsize::new(0),
            kv,
        })
    }

    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    pub fn workers(&self) -> &[Arc<WorkerEntry>] {
        &self.workers
    }

    pub fn live_count(&self) -> usize {
        self.workers.iter().filter(|w| w.is_live()).count()
    }

    /// The kv policy's state, when the pool routes by KV overlap.
    pub fn kv(&self) -> Option<&Arc<KvRouter>> {
        self.kv.as_ref()
    }

    /// Picks a live worker whose index is not in `exclude` for a prompt of `tokens`, and leases
    /// it. `None`: no live worker left.
    pub fn pick(&self, tokens: &[u32], exclude: &[usize]) -> Option<Lease> {
        let (index, loads): (Vec<usize>, Vec<u32>) = self
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| w.is_live() && !exclude.contains(i))
            .map(|(i, w)| (i, w.inflight()))
            .unzip();
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let (chosen, kv) = match &self.kv {
            Some(kv) => {
                let choice = kv.choose(tokens, &index, tick, &mut rand::rng())?;
                let chosen = index[choice.candidate];
                (chosen, Some(kv.claim(chosen, tokens.len() as u64, &choice)))
            }
            None => (
                index[select(self.mode, &loads, tick, &mut rand::rng())?],
                None,
            ),
        };
        let worker = self.workers[chosen].clone();
        worker.inflight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            index: chosen,
            worker,
            kv,
        })
    }

    /// kv mode: follows every worker's KV events until `shutdown` or, in approximate mode, expires
    /// what the router learned from its own decisions.
    pub fn follow_kv_events(&self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        let Some(kv) = &self.kv else { return };
        if kv.config().events {
            for (i, w) in self.workers.iter().enumerate() {
                tasks.spawn(kv.clone().follow(i, w.client.clone(), shutdown.clone()));
            }
        } else {
            let (kv, shutdown) = (kv.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => kv.expire(),
                    }
                }
            });
        }
    }

    /// Probes every worker with `Info` each `interval` until `shutdown`; a worker is live while it
    /// answers within `timeout`. The first round runs immediately.
    pub async fn run_health(
        self: Arc<Self>,
        interval: Duration,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            self.probe_all(timeout).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One probe round over all workers, concurrently.
    pub async fn probe_all(&self, timeout: Duration) {
        let probes = self.workers.iter().enumerate().map(|(i, w)| async move {
            let mut client = w.client.clone();
            let answer = tokio::time::timeout(timeout, client.info(proto::InfoRequest {})).await;
            match answer {
                Ok(Ok(info)) => {
                    let info = info.into_inner();
                    if let Some(kv) = &self.kv {
                        kv.set_worker_info(i, info.kv_blocks_total, info.block_size);
                    }
                    *w.info.write().unwrap_or_else(|p| p.into_inner()) = Some(info);
                    if !w.live.swap(true, Ordering::Relaxed) {
                        tracing::info!(worker = %w.url, "worker is live");
                    }
                }
                Ok(Err(status)) => w.mark_dead(status.message()),
                Err(_) => w.mark_dead("probe timed out"),
            }
        });
        futures::future::join_all(probes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::SmallRng};

    #[test]
    fn round_robin_cycles_through_every_worker() {
        let mut rng = SmallRng::seed_from_u64(1);
        let picks: Vec<_> = (0..6)
            .map(|t| select(RouterMode::RoundRobin, &[0, 0, 0], t, &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
    }

    #[test]
    fn least_loaded_picks_the_minimum_and_rotates_ties() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            select(RouterMode::LeastLoaded, &[5, 2, 9], 0, &mut rng),
            Some(1)
        );
        let ties: Vec<_> = (0..3)
            .map(|t| select(RouterMode::LeastLoaded, &[1, 1, 1], t, &mut rng))
            .collect();
        assert_eq!(ties, [0, 1, 2].map(Some));
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_two() {
        let mut rng = SmallRng::seed_from_u64(7);
        for t in 0..1000 {
            let pick = select(RouterMode::PowerOfTwo, &[0, 100], t, &mut rng);
            assert_eq!(pick, Some(0));
        }
    }

    #[test]
    fn random_spreads_over_all_workers() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut seen = [0u32; 4];
        for t in 0..4000 {
            seen[select(RouterMode::Random, &[0; 4], t, &mut rng).unwrap_or(9)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }

    #[test]
    fn no_candidates_means_no_pick() {
        let mut rng = SmallRng::seed_from_u64(3);
        for mode in [
            RouterMode::RoundRobin,
            RouterMode::Random,
            RouterMode::LeastLoaded,
            RouterMode::PowerOfTwo,
        ] {
            assert_eq!(select(mode, &[], 0, &mut rng), None);
        }
    }
}
