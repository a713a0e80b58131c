//! Disaggregated prefill/decode for the built-in engine: the worker's KV blocks as real bytes, and
//! their move from a prefill worker to a decode worker.
//!
//! A sidecar with a [`KvStore`] keeps a [`BlockPool`] (one memfd-backed mapping) with one slot per
//! engine block, sized by a model's [`KvGeometry`] (an 8B-class Llama by default: 8 MiB per 64-token
//! block) within `--kv-memory`; the engine gets as many blocks as fit. The pool is served to peers
//! of the same graph over TCP (authenticated with the graph's shared secret) and, on the same host
//! and IPC namespace, over shared memory.
//!
//! - **Prefill leg** ([`KvStore::prefill`]): the engine computes the prompt and holds its full blocks
//!   under a lease. Their content is written then, derived from each block's sequence hash and
//!   layer (what a forward pass would have left there), and the request answers with transfer
//!   parameters ([`Params`]: the lease, the blocks' slots and hashes, where to read them).
//! - **Decode leg** ([`KvStore::pull`]): the decode worker reserves room for the prompt's full
//!   blocks, keeping the leading ones it already caches, reads only the others, checks every byte
//!   against its own hashes of the prompt, registers them in its prefix cache, and generates; the
//!   few tokens past the last full block are computed in its decode pass. It then releases the
//!   lease (`ReleaseKv`); leases the decode worker never releases expire.
//! - A pull that fails (the prefill worker died, a byte differs, no room) costs the request
//!   nothing: the decode worker prefills what it lacks itself, and says why in the report.
//!
//! vLLM engines move their KV with their own connector; for them the sidecar only passes the
//! parameters through (see [`crate::vllm`]).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use dynamo_mocker::{Output, Request, SubmitError};
use dynamo_protocol::proto::{self, worker_client::WorkerClient};
use dynamo_transfer::{
    BlockPool, BlockSetDescriptor, KvGeometry, PoolId, SharedSecret, ShmServer, ShmServerConfig,
    ShmTransport, ShmTransportConfig, TcpServer, TcpServerConfig, TcpTransport, TcpTransportConfig,
    TransportKind,
    testing::{fill_block, first_mismatch},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What a worker does in a disaggregated graph (`dynamo sidecar --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Prefills and decodes its own requests.
    Aggregated,
    /// Computes prompts' KV and holds it for decode workers to pull.
    Prefill,
    /// Generates; pulls prompts' KV from prefill workers (or prefills locally).
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    pub fn to_proto(self) -> proto::WorkerRole {
        match self {
            Role::Aggregated => proto::WorkerRole::Aggregated,
            Role::Prefill => proto::WorkerRole::Prefill,
            Role::Decode => proto::WorkerRole::Decode,
        }
    }
}

/// Settings of a worker's KV block store.
#[derive(Debug, Clone)]
pub struct KvStoreConfig {
    pub geometry: KvGeometry,
    /// Bytes of block memory; the engine gets `memory / block_bytes` blocks at most.
    pub memory: u64,
    /// Interface the TCP transfer server binds.
    pub bind: IpAddr,
    /// TCP port of the transfer server (0: any free port).
    pub port: u16,
    /// Address peers reach this worker at (its pod IP on Kubernetes).
    pub advertise: IpAddr,
    /// Offer the pool over shared memory to peers on this host and IPC namespace.
    pub shm: bool,
    /// The graph's secret; only its peers may read blocks.
    pub secret: SharedSecret,
}

/// The transfer parameters a prefill worker answers with; the frontend carries them to the decode
/// worker unread (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    /// The prefill engine's hold on the blocks.
    pub lease: u64,
    /// gRPC URL of the prefill worker (for `ReleaseKv`).
    pub worker: String,
    pub block_size: u32,
    /// Sequence hashes of the prompt's full blocks, in order.
    pub hashes: Vec<u64>,
    /// The same blocks over TCP.
    pub tcp: BlockSetDescriptor,
    /// The same blocks over shared memory, for a decode worker in the same `host` (boot and IPC
    /// namespace).
    pub shm: Option<ShmParams>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShmParams {
    pub host: String,
    pub blocks: BlockSetDescriptor,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

/// Transfer metrics of one worker (`dynamo_component_kv_transfer_*`).
struct TransferMetrics {
    blocks: Family<TransportLabel, Counter>,
    bytes: Family<TransportLabel, Counter>,
    failures: Family<TransportLabel, Counter>,
    seconds: Family<TransportLabel, Histogram, fn() -> Histogram>,
    prefills_held: Counter,
}

impl Default for TransferMetrics {
    fn default() -> Self {
        Self {
            blocks: Family::default(),
            bytes: Family::default(),
            failures: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
            }),
            prefills_held: Counter::default(),
        }
    }
}

/// A worker's KV block memory and its transfer endpoints.
pub struct KvStore {
    engine: dynamo_mocker::Engine,
    geometry: KvGeometry,
    pool: Arc<BlockPool>,
    tcp_pool: PoolId,
    tcp_addr: SocketAddr,
    shm: Option<(PoolId, PathBuf)>,
    host: String,
    tcp: TcpTransport,
    shm_transport: ShmTransport,
    /// gRPC URL of this worker.
    url: String,
    /// The sequence hash whose content each slot holds (0: none written).
    content: Arc<Mutex<Vec<u64>>>,
    releasers: Mutex<HashMap<String, WorkerClient<tonic::transport::Channel>>>,
    metrics: TransferMetrics,
    tasks: TaskTracker,
}

/// A decode-leg request after its pull: its outputs, those already taken from them, and how the
/// KV arrived.
pub struct Pulled {
    pub outputs: UnboundedReceiver<Output>,
    pub taken: Vec<Output>,
    pub report: proto::KvTransferReport,
}

/// The number of engine blocks a store of `config` holds.
pub fn blocks_that_fit(config: &KvStoreConfig) -> usize {
    (config.memory / config.geometry.block_bytes().max(1) as u64) as usize
}

impl KvStore {
    /// Maps the pool (one slot per engine block) and starts its transfer servers on `tasks`.
    pub async fn start(
        config: &KvStoreConfig,
        engine: dynamo_mocker::Engine,
        url: String,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<KvStore>> {
        let blocks = engine.config().num_gpu_blocks;
        let block_bytes = config.geometry.block_bytes();
        let pool =
            Arc::new(BlockPool::new_shared(block_bytes, blocks).with_context(|| {
                format!("could not map {blocks} KV blocks of {block_bytes} bytes")
            })?);
        let server = TcpServer::bind(
            SocketAddr::new(config.bind, config.port),
            config.secret.clone(),
            TcpServerConfig::default(),
        )
        .await
        .context("could not start the KV transfer server")?;
        let tcp_pool = server.pools().register(pool.clone())?;
        let tcp_addr = SocketAddr::new(config.advertise, server.local_addr().port());
        let server_stop = stop.clone();
        tasks.spawn(async move {
            if let Err(error) = server.serve(server_stop).await {
                tracing::warn!(%error, "KV transfer server (tcp) failed");
            }
        });
        let shm = if config.shm {
            let path = std::env::temp_dir().join(format!(
                "dynamo-kv-{}-{:08x}.sock",
                std::process::id(),
                rand::random::<u32>()
            ));
            let server = ShmServer::bind(&path, config.secret.clone(), ShmServerConfig::default())
                .context("could not start the KV transfer server (shared memory)")?;
            let id = server.pools().register(pool.clone())?;
            tasks.spawn(async move {
                if let Err(error) = server.serve(stop).await {
                    tracing::warn!(%error, "KV transfer server (shm) failed");
                }
            });
            Some((id, path))
        } else {
            None
        };
        tracing::info!(
            tcp = %tcp_addr,
            shm = ?shm.as_ref().map(|(_, p)| p),
            blocks,
            block_bytes,
            "KV block store ready"
        );
        Ok(Arc::new(KvStore {
            engine,
            geometry: config.geometry,
            pool,
            tcp_pool,
            tcp_addr,
            shm,
            host: host_identity(),
            tcp: TcpTransport::new(config.secret.clone(), TcpTransportConfig::default()),
            shm_transport: ShmTransport::new(config.secret.clone(), ShmTransportConfig::default()),
            url,
            content: Arc::new(Mutex::new(vec![0; blocks])),
            releasers: Mutex::default(),
            metrics: TransferMetrics::default(),
            tasks: tasks.clone(),
        }))
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "kv_transfer_blocks",
            "KV blocks this worker pulled from prefill workers",
            m.blocks.clone(),
        );
        registry.register(
            "kv_transfer_bytes",
            "KV bytes this worker pulled from prefill workers",
            m.bytes.clone(),
        );
        registry.register(
            "kv_transfer_failures",
            "Pulls that failed (the request was prefilled locally)",
            m.failures.clone(),
        );
        registry.register(
            "kv_transfer_seconds",
            "Wall time of one pull",
            m.seconds.clone(),
        );
        registry.register(
            "kv_prefills_held",
            "Prefill-only requests whose blocks were held for a decode worker",
            m.prefills_held.clone(),
        );
    }

    /// The prefill leg: runs `request` prefill-only and, once its KV is computed, answers with the
    /// transfer parameters ([`Output::KvTransferParams`]) before the finish.
    pub fn prefill(
        self: &Arc<Self>,
        request: Request,
    ) -> Result<UnboundedReceiver<Output>, SubmitError> {
        let mut rx = self.engine.submit(Request {
            prefill_only: true,
            max_tokens: 1,
            ..request
        })?;
        let (tx, out) = unbounded_channel();
        let store = self.clone();
        self.tasks.spawn(async move {
            let mut offered = None;
            while let Some(output) = rx.recv().await {
                let output = match output {
                    Output::Prefilled {
                        lease,
                        blocks,
                        hashes,
                    } => match store.offer(lease, blocks, hashes).await {
                        Ok(params) => {
                            offered = Some(lease);
                            Output::KvTransferParams(params)
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not offer a prefill's blocks");
                            store.engine.release(lease).await;
                            // Without parameters the frontend prefills elsewhere.
                            return;
                        }
                    },
                    other => other,
                };
                if tx.send(output).is_err() {
                    // The requester went away: nobody will pull the blocks.
                    if let Some(lease) = offered {
                        store.engine.release(lease).await;
                    }
                    return;
                }
            }
        });
        Ok(out)
    }

    /// Writes the held blocks' content and describes them.
    async fn offer(
        &self,
        lease: u64,
        blocks: Vec<u32>,
        hashes: Vec<u64>,
    ) -> anyhow::Result<Vec<u8>> {
        let (pool, content, layers) = (
            self.pool.clone(),
            self.content.clone(),
            self.geometry.layers,
        );
        let (b, h) = (blocks.clone(), hashes.clone());
        tokio::task::spawn_blocking(move || write_content(&pool, &content, layers, &b, &h))
            .await??;
        self.metrics.prefills_held.inc();
        let block_bytes = self.pool.block_bytes() as u64;
        let describe = |endpoint| BlockSetDescriptor {
            endpoint,
            pool: self.tcp_pool,
            block_bytes,
            blocks: blocks.clone(),
        };
        let tcp = describe(dynamo_transfer::Endpoint::Tcp {
            addr: self.tcp_addr,
        });
        let shm = self.shm.as_ref().map(|(pool, socket)| ShmParams {
            host: self.host.clone(),
            blocks: BlockSetDescriptor {
                pool: *pool,
                ..describe(dynamo_transfer::Endpoint::Shm {
                    socket: socket.clone(),
                })
            },
        });
        let params = Params {
            lease,
            worker: self.url.clone(),
            block_size: self.geometry.block_tokens,
            hashes,
            tcp,
            shm,
        };
        Ok(serde_json::to_vec(&params)?)
    }

    /// `ReleaseKv` from a decode worker.
    pub async fn release(&self, lease: u64) -> bool {
        self.engine.release(lease).await
    }

    /// The decode leg: submits `request` with the prompt's full blocks to be pulled per `params`;
    /// once the engine admits it and allocates them (keeping the leading blocks it already holds),
    /// reads only the others, checks every byte, and lets the engine go on. Returns the request's
    /// outputs, those already taken from it (`Scheduled`), and a report of the pull. Parameters it
    /// cannot use, or a pull that fails, leave the request to prefill locally.
    pub async fn pull(&self, mut request: Request, params: &[u8]) -> Result<Pulled, SubmitError> {
        let started = Instant::now();
        let mut report = proto::KvTransferReport {
            transport: "none".into(),
            ..proto::KvTransferReport::default()
        };
        let params = match serde_json::from_slice::<Params>(params)
            .map_err(|e| anyhow::anyhow!("kv_transfer_params are not this engine's: {e}"))
            .and_then(|p| self.check(&request.token_ids, p))
        {
            Ok(p) => Some(p),
            Err(error) => {
                report.error = format!("{error:#}");
                None
            }
        };
        request.remote_blocks = params.as_ref().map_or(0, |p| {
            let checked = p.hashes.len().min(p.tcp.blocks.len());
            u32::try_from(checked).unwrap_or(u32::MAX)
        });
        let mut rx = self.engine.submit(request)?;
        let mut taken = Vec::new();
        // Admission comes first (Scheduled), then the blocks to fill when there are any.
        while let Some(output) = rx.recv().await {
            match output {
                Output::PullKv { id, first, slots } => {
                    let ok = match &params {
                        Some(p) => self.fill(p, first as usize, &slots, &mut report).await,
                        None => false,
                    };
                    self.engine.transfer_done(id, ok);
                    break;
                }
                scheduled @ Output::Scheduled { .. } => taken.push(scheduled),
                other => {
                    taken.push(other);
                    break;
                }
            }
        }
        report.micros = started.elapsed().as_micros() as u64;
        self.count(&report);
        if let Some(p) = params {
            self.release_remote(p.worker, p.lease);
        }
        Ok(Pulled {
            outputs: rx,
            taken,
            report,
        })
    }

    /// The parameters' blocks are this prompt's, in this worker's shape.
    fn check(&self, tokens: &[u32], params: Params) -> anyhow::Result<Params> {
        anyhow::ensure!(
            params.block_size == self.geometry.block_tokens,
            "the prefill worker's blocks hold {} tokens, this worker's {}",
            params.block_size,
            self.geometry.block_tokens
        );
        anyhow::ensure!(
            params.tcp.block_bytes == self.pool.block_bytes() as u64,
            "the prefill worker's blocks are {} bytes, this worker's {} (different KV geometry)",
            params.tcp.block_bytes,
            self.pool.block_bytes()
        );
        let n = params.hashes.len().min(params.tcp.blocks.len());
        let bs = params.block_size as usize;
        let mine = dynamo_kv::block_hashes(&tokens[..(n * bs).min(tokens.len())], bs);
        anyhow::ensure!(
            mine.len() == n
                && mine
                    .iter()
                    .zip(&params.hashes)
                    .all(|(a, &b)| a.sequence == b),
            "the prefill worker's blocks are not this prompt's"
        );
        Ok(params)
    }

    /// Reads blocks `first..first + slots.len()` of the prompt into `slots` and checks them.
    async fn fill(
        &self,
        params: &Params,
        first: usize,
        slots: &[u32],
        report: &mut proto::KvTransferReport,
    ) -> bool {
        let range = first..first + slots.len();
        if range.end > params.tcp.blocks.len() {
            report.error = "the engine asked for blocks the prefill worker does not hold".into();
            return false;
        }
        report.reused_blocks = first as u64;
        let pick = |d: &BlockSetDescriptor| BlockSetDescriptor {
            blocks: d.blocks[range.clone()].to_vec(),
            ..d.clone()
        };
        let mut last_error = None;
        let mut done = None;
        if let (Some(shm), Some(_)) = (&params.shm, &self.shm)
            && shm.host == self.host
        {
            report.transport = TransportKind::Shm.to_string();
            match self
                .shm_transport
                .read(&pick(&shm.blocks), &self.pool, slots)
                .await
            {
                Ok(c) => done = Some(c),
                Err(error) => last_error = Some(error),
            }
        }
        if done.is_none() {
            report.transport = TransportKind::Tcp.to_string();
            match self.tcp.read(&pick(&params.tcp), &self.pool, slots).await {
                Ok(c) => done = Some(c),
                Err(error) => last_error = Some(error),
            }
        }
        let Some(completion) = done else {
            let error = last_error.map_or_else(|| "no transport".to_owned(), |e| e.to_string());
            report.error = format!("reading the blocks failed: {error}");
            return false;
        };
        // `check` found these equal to this prompt's own hashes.
        let hashes = params.hashes[range].to_vec();
        let (pool, content, layers) = (
            self.pool.clone(),
            self.content.clone(),
            self.geometry.layers,
        );
        let slots = slots.to_vec();
        let verified = tokio::task::spawn_blocking(move || {
            verify_content(&pool, &content, layers, &slots, &hashes)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        if let Err(error) = verified {
            report.error = format!("{error:#}");
            return false;
        }
        report.blocks = completion.blocks as u64;
        report.bytes = completion.bytes;
        true
    }

    fn count(&self, report: &proto::KvTransferReport) {
        let label = TransportLabel {
            transport: report.transport.clone(),
        };
        if !report.error.is_empty() {
            self.metrics.failures.get_or_create(&label).inc();
            tracing::warn!(error = %report.error, "KV pull failed; prefilling locally");
        } else if report.blocks > 0 {
            self.metrics
                .blocks
                .get_or_create(&label)
                .inc_by(report.blocks);
            self.metrics
                .bytes
                .get_or_create(&label)
                .inc_by(report.bytes);
            self.metrics
                .seconds
                .get_or_create(&label)
                .observe(report.micros as f64 / 1e6);
        }
    }

    /// Tells the prefill worker it may free the lease (in the background).
    fn release_remote(&self, worker: String, lease: u64) {
        let client = {
            let mut clients = self
                .releasers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match clients.get(&worker) {
                Some(c) => c.clone(),
                None => {
                    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(worker.clone())
                    else {
                        return;
                    };
                    let c = WorkerClient::new(
                        endpoint
                            .connect_timeout(Duration::from_secs(2))
                            .timeout(Duration::from_secs(5))
                            .connect_lazy(),
                    );
                    clients.insert(worker.clone(), c.clone());
                    c
                }
            }
        };
        self.tasks.spawn(async move {
            let mut client = client;
            if let Err(status) = client.release_kv(proto::ReleaseKvRequest { lease }).await {
                tracing::debug!(%worker, lease, %status, "could not release a prefill's blocks; its lease expires instead");
            }
        });
    }
}

/// Content of one layer of the block with sequence hash `hash`: what a forward pass would leave
/// there, reproducible by the receiver.
fn layer_seed(hash: u64) -> u64 {
    hash ^ 0x6b76_5f62_6c6f_636b
}

fn write_content(
    pool: &BlockPool,
    content: &Mutex<Vec<u64>>,
    layers: u32,
    blocks: &[u32],
    hashes: &[u64],
) -> anyhow::Result<()> {
    for (&slot, &hash) in blocks.iter().zip(hashes) {
        if content.lock().unwrap_or_else(PoisonError::into_inner)[slot as usize] == hash {
            continue;
        }
        let mut block = pool.write(slot)?;
        let per_layer = block.len() / layers.max(1) as usize;
        for (layer, chunk) in block.chunks_mut(per_layer.max(1)).enumerate() {
            fill_block(chunk, layer_seed(hash), layer as u32);
        }
        content.lock().unwrap_or_else(PoisonError::into_inner)[slot as usize] = hash;
    }
    Ok(())
}

fn verify_content(
    pool: &BlockPool,
    content: &Mutex<Vec<u64>>,
    layers: u32,
    slots: &[u32],
    hashes: &[u64],
) -> anyhow::Result<()> {
    for (i, (&slot, &hash)) in slots.iter().zip(hashes).enumerate() {
        let block = pool.read(slot)?;
        let per_layer = block.len() / layers.max(1) as usize;
        for (layer, chunk) in block.chunks(per_layer.max(1)).enumerate() {
            if let Some(offset) = first_mismatch(chunk, layer_seed(hash), layer as u32) {
                anyhow::bail!(
                    "pulled block {i} (sequence hash {hash:016x}) differs from the prompt's KV at layer {layer}, byte {offset}"
                );
            }
        }
        content.lock().unwrap_or_else(PoisonError::into_inner)[slot as usize] = hash;
    }
    Ok(())
}

/// Who may share memory with whom: the boot and the IPC namespace (pods under the restricted
/// profile each have their own, so they never pick shared memory by accident).
fn host_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ipc = std::fs::read_link("/proc/self/ns/ipc")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}/{ipc}", boot.trim())
}

/// Parses `--kv-geometry`: a preset (`llama-8b`, `llama-70b`, `llama-1b`, `qwen-0.5b`, `tiny`) or
/// `layers=L,kv_heads=H,head_dim=D[,dtype_bytes=B]`.
pub fn parse_geometry(s: &str, block_tokens: u32) -> anyhow::Result<KvGeometry> {
    let g = |layers, kv_heads, head_dim| KvGeometry {
        layers,
        kv_heads,
        head_dim,
        dtype_bytes: 2,
        block_tokens,
    };
    Ok(match s {
        "llama-8b" => g(32, 8, 128),
        "llama-70b" => g(80, 8, 128),
        "llama-1b" => g(16, 8, 64),
        "qwen-0.5b" => g(24, 2, 64),
        "tiny" => g(2, 2, 32),
        custom => {
            let mut geometry = g(0, 0, 0);
            for part in custom.split(',') {
                let (key, value) = part.split_once('=').with_context(|| {
                    format!("--kv-geometry {custom:?}: expected a preset (llama-8b, llama-70b, llama-1b, qwen-0.5b, tiny) or layers=L,kv_heads=H,head_dim=D[,dtype_bytes=B]")
                })?;
                let value: u32 = value
                    .trim()
                    .parse()
                    .with_context(|| format!("--kv-geometry: {key} must be a number"))?;
                match key.trim() {
                    "layers" => geometry.layers = value,
                    "kv_heads" => geometry.kv_heads = value,
                    "head_dim" => geometry.head_dim = value,
                    "dtype_bytes" => geometry.dtype_bytes = value,
                    other => anyhow::bail!(
                        "--kv-geometry: unknown key {other:?} (layers, kv_heads, head_dim, dtype_bytes)"
                    ),
                }
            }
            anyhow::ensure!(
                geometry.block_bytes() > 0,
                "--kv-geometry {custom:?}: layers, kv_heads, head_dim and dtype_bytes must all be set and > 0"
            );
            geometry
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_presets_and_custom_shapes() {
        let g = parse_geometry("llama-8b", 64).expect("preset");
        assert_eq!(g.block_bytes(), 8 << 20);
        let g =
            parse_geometry("layers=2,kv_heads=2,head_dim=32,dtype_bytes=4", 32).expect("custom");
        assert_eq!(g.block_bytes(), 2 * 2 * 2 * 32 * 4 * 32);
        let e = parse_geometry("layers=2", 32)
            .expect_err("incomplete")
            .to_string();
        assert!(e.contains("must all be set"), "{e}");
        let e = parse_geometry("huge", 32).expect_err("unknown").to_string();
        assert!(e.contains("expected a preset"), "{e}");
    }

    #[test]
    fn content_written_for_a_hash_verifies_and_a_flipped_byte_is_named() {
        let pool = BlockPool::new(4096, 4).expect("pool");
        let content = Mutex::new(vec![0; 4]);
        write_content(&pool, &content, 4, &[1, 3], &[11, 33]).expect("write");
        verify_content(&pool, &content, 4, &[1, 3], &[11, 33]).expect("verifies");
        let e = verify_content(&pool, &content, 4, &[3], &[11]).expect_err("wrong hash");
        assert!(e.to_string().contains("layer 0, byte 0"), "{e}");
        pool.write(1).expect("write")[2048 + 5] ^= 1;
        let e = verify_content(&pool, &content, 4, &[1], &[11]).expect_err("flipped");
        assert!(e.to_string().contains("layer 2, byte 5"), "{e}");
    }
}
