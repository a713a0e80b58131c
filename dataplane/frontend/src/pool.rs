//! The frontend's workers: which ones exist right now (membership), how to reach them, and which
//! one gets each request.
//!
//! Discovery ([`crate::discovery`]) supplies *candidates*: gRPC URLs where a worker may answer. Each
//! candidate is watched by its own task, which probes the worker's `Info`. A candidate that answers
//! becomes a *member*, identified by its [`WorkerId`]: the instance id its sidecar drew at start, so
//! a restarted worker at the same address is a new member and the old one's cache and load are
//! forgotten. A member leaves when its candidate is withdrawn, when a call to it fails, or when it
//! misses [`PROBE_MISSES`] probes in a row; it rejoins when it answers again.
//!
//! Members live in a copy-on-write list, so picking a worker takes no lock held across work. Each
//! member carries the router's own count of its in-flight requests. The `kv` policy follows the
//! membership: a joining worker is added to the policy and its KV events are followed (starting from
//! a snapshot); a leaving one is removed, with its blocks and booked load.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dynamo_kv::{
    WorkerId,
    policy::{KvClaim, KvRouter, KvRouterConfig, RouterMode, select},
};
use dynamo_protocol::proto::{self, worker_client::WorkerClient};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Channel, Endpoint};

use crate::kv_follow;

/// Probes a member may miss in a row before it leaves (a failed call removes it at once).
pub const PROBE_MISSES: u32 = 2;

/// A worker that answered its probe: routable.
pub struct Worker {
    pub id: WorkerId,
    pub url: String,
    pub info: proto::WorkerInfo,
    pub client: WorkerClient<Channel>,
    /// Prefill workers form the prefill pool; the others (aggregated and decode) serve requests.
    pub role: proto::WorkerRole,
    inflight: AtomicU32,
    /// Stops this membership's KV event follower.
    stop: CancellationToken,
}

impl Worker {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// An in-flight request's claim on a worker: released (load decremented) on drop.
pub struct Lease {
    pub worker: Arc<Worker>,
    /// The kv policy's booking of this request's prefill and decode load.
    pub kv: Option<KvClaim>,
    /// Leading blocks of the prompt the worker holds, as the kv policy sees it (0 without one).
    pub overlap_blocks: u32,
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

/// A candidate address under watch.
struct Candidate {
    stop: CancellationToken,
    probe: Arc<ProbeState>,
}

/// What the probes of one candidate found.
#[derive(Default)]
struct ProbeState {
    /// The latest word on it, for `/health`.
    status: Mutex<&'static str>,
    /// Probes timed out in a row.
    misses: AtomicU32,
}

impl ProbeState {
    fn set(&self, status: &'static str) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }
}

/// What a candidate looks like in `/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CandidateView {
    pub url: String,
    pub live: bool,
    pub status: &'static str,
    pub inflight: u32,
    pub worker_id: Option<String>,
    pub instance_id: Option<String>,
}

/// Settings of the pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub mode: RouterMode,
    pub kv: KvRouterConfig,
    /// How often each candidate is probed.
    pub probe_interval: Duration,
    /// How long a probe may take.
    pub probe_timeout: Duration,
}

/// The workers of one model and the policy that picks among them.
pub struct WorkerPool {
    config: PoolConfig,
    members: RwLock<Arc<Vec<Arc<Worker>>>>,
    /// Woken whenever a member joins: requests waiting for a worker ([`WorkerPool::pick_or_wait`]).
    joined: tokio::sync::Notify,
    candidates: Mutex<HashMap<String, Candidate>>,
    tick: AtomicUsize,
    kv: Option<Arc<KvRouter>>,
    /// The prefill pool's own index and load (disaggregated graphs).
    prefill_kv: Option<Arc<KvRouter>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl WorkerPool {
    /// An empty pool; its watch and follower tasks run on `tasks` until `shutdown`.
    pub fn new(config: PoolConfig, tasks: TaskTracker, shutdown: CancellationToken) -> Arc<Self> {
        let kv = (config.mode == RouterMode::Kv).then(|| Arc::new(KvRouter::new(config.kv)));
        let prefill_kv =
            (config.mode == RouterMode::Kv).then(|| Arc::new(KvRouter::new(config.kv)));
        let pool = Arc::new(WorkerPool {
            config,
            members: RwLock::new(Arc::new(Vec::new())),
            joined: tokio::sync::Notify::new(),
            candidates: Mutex::new(HashMap::new()),
            tick: AtomicUsize::new(0),
            kv,
            prefill_kv,
            tasks,
            shutdown,
        });
        for kv in [pool.kv.clone(), pool.prefill_kv.clone()]
            .into_iter()
            .flatten()
            .filter(|kv| !kv.config().events)
        {
            let stop = pool.shutdown.clone();
            pool.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => kv.expire(),
                    }
                }
            });
        }
        pool
    }

    pub fn mode(&self) -> RouterMode {
        self.config.mode
    }

    /// The kv policy's state, when the pool routes by KV overlap.
    pub fn kv(&self) -> Option<&Arc<KvRouter>> {
        self.kv.as_ref()
    }

    /// The members now (a snapshot).
    pub fn members(&self) -> Arc<Vec<Arc<Worker>>> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn live_count(&self) -> usize {
        self.members().len()
    }

    /// The shortest context a serving member (aggregated or decode) takes, when one says.
    pub fn context_length(&self) -> Option<u32> {
        self.members()
            .iter()
            .filter(|m| m.role != proto::WorkerRole::Prefill && m.info.context_length > 0)
            .map(|m| m.info.context_length)
            .min()
    }

    /// The kv policy's router of `role`'s pool.
    fn router(&self, role: proto::WorkerRole) -> Option<&Arc<KvRouter>> {
        if role == proto::WorkerRole::Prefill {
            self.prefill_kv.as_ref()
        } else {
            self.kv.as_ref()
        }
    }

    /// Whether any prefill worker is a member (the graph is disaggregated now).
    pub fn has_prefill(&self) -> bool {
        self.members()
            .iter()
            .any(|m| m.role == proto::WorkerRole::Prefill)
    }

    /// Prompt tokens booked on `worker` and not yet prefilled (kv policy), or its in-flight
    /// requests otherwise.
    pub fn pending_prefill(&self, worker: &Worker) -> u64 {
        self.router(worker.role)
            .and_then(|kv| kv.pending_prefill_tokens(worker.id))
            .unwrap_or_else(|| u64::from(worker.inflight()))
    }

    /// Pending prefill of the least and of all prefill workers (`None` without prefill workers).
    pub fn prefill_pool_load(&self) -> Option<(u64, u64)> {
        let members = self.members();
        let loads: Vec<u64> = members
            .iter()
            .filter(|m| m.role == proto::WorkerRole::Prefill)
            .map(|m| self.pending_prefill(m))
            .collect();
        let min = loads.iter().copied().min()?;
        Some((min, loads.iter().sum()))
    }

    /// The live fleet per role, for the fleet gauges: every role always listed, so a role whose
    /// last worker left reads 0 rather than its last value.
    pub fn fleet(&self) -> [(&'static str, crate::metrics::FleetView); 3] {
        use proto::WorkerRole as R;
        let mut out = [
            ("aggregated", Default::default()),
            ("prefill", Default::default()),
            ("decode", Default::default()),
        ];
        for m in self.members().iter() {
            let v: &mut crate::metrics::FleetView = match m.role {
                R::Prefill => &mut out[1].1,
                R::Decode => &mut out[2].1,
                _ => &mut out[0].1,
            };
            v.workers += 1;
            v.gpus += i64::from(m.info.gpus.max(1));
            v.inflight += i64::from(m.inflight());
            v.pending_prefill_tokens += i64::try_from(self.pending_prefill(m)).unwrap_or(i64::MAX);
            let active = self
                .router(m.role)
                .and_then(|kv| kv.active_blocks(m.id))
                .unwrap_or(0);
            v.kv_blocks_active += i64::try_from(active).unwrap_or(i64::MAX);
            v.kv_blocks_total += i64::try_from(m.info.kv_blocks_total).unwrap_or(i64::MAX);
        }
        out
    }

    /// The engine profile each role's live workers describe themselves with (`Info.profile`;
    /// the one most of them report), by role name; roles whose workers say nothing are left out.
    pub fn profiles(&self) -> serde_json::Map<String, serde_json::Value> {
        use proto::WorkerRole as R;
        let mut seen: std::collections::BTreeMap<
            &'static str,
            std::collections::BTreeMap<String, usize>,
        > = Default::default();
        let members = self.members();
        for m in members.iter().filter(|m| !m.info.profile.is_empty()) {
            let role = match m.role {
                R::Prefill => "prefill",
                R::Decode => "decode",
                _ => "aggregated",
            };
            *seen
                .entry(role)
                .or_default()
                .entry(m.info.profile.clone())
                .or_default() += 1;
        }
        seen.into_iter()
            .filter_map(|(role, counts)| {
                let (text, _) = counts.into_iter().max_by_key(|(_, n)| *n)?;
                Some((role.to_owned(), serde_json::from_str(&text).ok()?))
            })
            .collect()
    }

    /// Every candidate with its status, sorted by URL.
    pub fn candidates(&self) -> Vec<CandidateView> {
        let members = self.members();
        let candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<CandidateView> = candidates
            .iter()
            .map(|(url, c)| {
                let member = members.iter().find(|m| &m.url == url);
                CandidateView {
                    url: url.clone(),
                    live: member.is_some(),
                    status: *c.probe.status.lock().unwrap_or_else(|p| p.into_inner()),
                    inflight: member.map_or(0, |m| m.inflight()),
                    worker_id: member.map(|m| m.info.worker_id.clone()),
                    instance_id: member.map(|m| format!("{:016x}", m.id)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.url.cmp(&b.url));
        out
    }

    /// Makes `urls` the candidate set: new ones are probed once (concurrently) before this returns,
    /// then watched; withdrawn ones stop being watched and their members leave.
    pub async fn set_candidates(self: &Arc<Self>, urls: &BTreeSet<String>) {
        let mut added = Vec::new();
        {
            let mut candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
            let withdrawn: Vec<String> = candidates
                .keys()
                .filter(|u| !urls.contains(*u))
                .cloned()
                .collect();
            for url in withdrawn {
                if let Some(c) = candidates.remove(&url) {
                    c.stop.cancel();
                }
                tracing::info!(worker = %url, "worker withdrawn by discovery");
                if let Some(m) = self.member_at(&url) {
                    self.leave(m.id, "withdrawn by discovery");
                }
            }
            for url in urls {
                if candidates.contains_key(url) {
                    continue;
                }
                let client = match connect(url) {
                    Ok(client) => client,
                    Err(error) => {
                        tracing::warn!(worker = %url, %error, "ignoring a candidate with an invalid URL");
                        continue;
                    }
                };
                let stop = self.shutdown.child_token();
                let probe = Arc::new(ProbeState::default());
                probe.set("probing");
                candidates.insert(
                    url.clone(),
                    Candidate {
                        stop: stop.clone(),
                        probe: probe.clone(),
                    },
                );
                added.push((url.clone(), client, stop, probe));
            }
        }
        let first = added
            .iter()
            .map(|(url, client, stop, status)| self.probe(url, client, stop, status));
        futures::future::join_all(first).await;
        for (url, client, stop, status) in added {
            self.tasks
                .spawn(self.clone().watch(url, client, stop, status));
        }
    }

    /// Probes `url` every interval until `stop`.
    async fn watch(
        self: Arc<Self>,
        url: String,
        client: WorkerClient<Channel>,
        stop: CancellationToken,
        status: Arc<ProbeState>,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.config.probe_interval) => {}
            }
            self.probe(&url, &client, &stop, &status).await;
        }
        if let Some(id) = self.member_at(&url).map(|m| m.id) {
            self.leave(id, "withdrawn by discovery");
        }
    }

    /// One probe of `url`: joins, rejoins as a new instance, or (after enough misses) leaves.
    async fn probe(
        self: &Arc<Self>,
        url: &str,
        client: &WorkerClient<Channel>,
        stop: &CancellationToken,
        status: &ProbeState,
    ) {
        let mut c = client.clone();
        let answer =
            tokio::time::timeout(self.config.probe_timeout, c.info(proto::InfoRequest {})).await;
        let set = |s| status.set(s);
        let current = self.member_at(url);
        match answer {
            Ok(Ok(info)) => {
                let info = info.into_inner();
                set("live");
                match current {
                    Some(m) if m.id == info.instance_id => {}
                    Some(m) => {
                        self.leave(m.id, "restarted as a new instance");
                        self.join(url, client, info, stop);
                    }
                    None => self.join(url, client, info, stop),
                }
                status.misses.store(0, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                status.misses.store(0, Ordering::Relaxed);
                set(
                    if error.code() == tonic::Code::Unavailable
                        && error.message().contains("draining")
                    {
                        "draining"
                    } else {
                        "unreachable"
                    },
                );
                if let Some(m) = current {
                    self.leave(m.id, error.message());
                }
            }
            Err(_) => {
                set("probe timed out");
                if let Some(m) = current
                    && status.misses.fetch_add(1, Ordering::Relaxed) + 1 >= PROBE_MISSES
                {
                    self.leave(m.id, "probes timed out");
                }
            }
        }
    }

    fn member_at(&self, url: &str) -> Option<Arc<Worker>> {
        self.members().iter().find(|m| m.url == url).cloned()
    }

    fn join(
        self: &Arc<Self>,
        url: &str,
        client: &WorkerClient<Channel>,
        info: proto::WorkerInfo,
        candidate: &CancellationToken,
    ) {
        if candidate.is_cancelled() {
            return;
        }
        let worker = Arc::new(Worker {
            id: info.instance_id,
            url: url.to_owned(),
            client: client.clone(),
            role: info.role(),
            inflight: AtomicU32::new(0),
            stop: candidate.child_token(),
            info,
        });
        if let Some(kv) = self.router(worker.role) {
            kv.add_worker(worker.id);
            kv.set_worker_info(
                worker.id,
                worker.info.kv_blocks_total,
                worker.info.block_size,
            );
            if kv.config().events {
                self.tasks.spawn(kv_follow::follow(
                    kv.clone(),
                    worker.id,
                    worker.client.clone(),
                    worker.stop.clone(),
                ));
            }
        }
        {
            let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
            let mut next: Vec<Arc<Worker>> = members.iter().cloned().collect();
            next.push(worker.clone());
            *members = Arc::new(next);
        }
        self.joined.notify_waiters();
        tracing::info!(worker = %url, worker_id = %worker.info.worker_id, instance = %format!("{:016x}", worker.id), "worker joined");
    }

    /// Removes member `id` (no-op when it is not one).
    pub fn leave(&self, id: WorkerId, why: &str) {
        let removed = {
            let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
            let Some(pos) = members.iter().position(|m| m.id == id) else {
                return;
            };
            let mut next: Vec<Arc<Worker>> = members.iter().cloned().collect();
            let removed = next.remove(pos);
            *members = Arc::new(next);
            removed
        };
        removed.stop.cancel();
        if let Some(kv) = self.router(removed.role) {
            kv.remove_worker(id);
        }
        tracing::warn!(worker = %removed.url, why, "worker left");
    }

    /// Picks a member not in `exclude` that serves requests (aggregated or decode) for a prompt of
    /// `tokens`, and leases it. `None`: no member left to pick.
    pub fn pick(&self, tokens: &[u32], exclude: &[WorkerId]) -> Option<Lease> {
        self.pick_in(false, tokens, exclude)
    }

    /// Picks a prefill worker not in `exclude` for a prompt of `tokens`, and leases it.
    pub fn pick_prefill(&self, tokens: &[u32], exclude: &[WorkerId]) -> Option<Lease> {
        self.pick_in(true, tokens, exclude)
    }

    fn pick_in(&self, prefill: bool, tokens: &[u32], exclude: &[WorkerId]) -> Option<Lease> {
        let members = self.members();
        let candidates: Vec<&Arc<Worker>> = members
            .iter()
            .filter(|w| (w.role == proto::WorkerRole::Prefill) == prefill)
            .filter(|w| !exclude.contains(&w.id))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let router = if prefill { &self.prefill_kv } else { &self.kv };
        let (worker, kv, overlap_blocks) = match router {
            Some(kv) => {
                let ids: Vec<WorkerId> = candidates.iter().map(|w| w.id).collect();
                let choice = kv.choose(tokens, &ids, tick, &mut rand::rng())?;
                let worker = candidates[choice.candidate];
                let claim = kv.claim(worker.id, tokens.len() as u64, &choice);
                (worker, claim, choice.overlap_blocks)
            }
            None => {
                let loads: Vec<u32> = candidates.iter().map(|w| w.inflight()).collect();
                let i = select(self.config.mode, &loads, tick, &mut rand::rng())?;
                (candidates[i], None, 0)
            }
        };
        worker.inflight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            worker: worker.clone(),
            kv,
            overlap_blocks,
        })
    }
}

impl WorkerPool {
    /// [`WorkerPool::pick`], or, while no member is left to pick, waits up to `wait` for one to
    /// join: a rolling update or a restarted pod leaves the pool empty for a moment, and a request
    /// that arrives then should be served by the next worker, not refused. `None` when none joined
    /// in time or the pool shuts down.
    pub async fn pick_or_wait(
        &self,
        tokens: &[u32],
        exclude: &[WorkerId],
        wait: Duration,
    ) -> Option<Lease> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a join between the look and the wait is not missed.
            let joined = self.joined.notified();
            tokio::pin!(joined);
            joined.as_mut().enable();
            if let Some(lease) = self.pick(tokens, exclude) {
                return Some(lease);
            }
            tokio::select! {
                () = joined => {}
                () = tokio::time::sleep_until(deadline) => return None,
                () = self.shutdown.cancelled() => return None,
            }
        }
    }
}

/// A lazily connecting channel to `url` (e.g. `http://127.0.0.1:4501`).
fn connect(url: &str) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(8 << 20));
    Ok(WorkerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}
