//! The worker sidecar: one per engine. It serves the request plane (`Generate`, a server stream of
//! token ids), the event plane (`SubscribeKvEvents`, numbered KV events with replay from a ring
//! buffer), `Info`/`Load` for the router, and Prometheus `/metrics` — all on one port.
//!
//! It owns the engine adapter ([`engine`]; today the built-in mocker), the event log
//! ([`event_log`]) and the vLLM event ingest ([`vllm`]); it does not route or tokenize. Every task it
//! starts runs on its [`TaskTracker`] and ends on [`Sidecar::shutdown`].

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use dynamo_mocker::MockerConfig;
use dynamo_protocol::proto::{self, worker_server::WorkerServer};
use futures::Stream;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status};

use crate::{
    disagg::{KvStore, KvStoreConfig, Role},
    engine::{Engine, EngineKind, FinishReason, Output, SubmitError},
    event_log::EventLog,
    vllm::{IngestStats, VllmConfig, ZmqSource},
};

pub mod disagg;
pub mod engine;
pub mod event_log;
pub mod vllm;

/// How many numbered KV events the sidecar keeps for subscribers that reconnect after a gap.
const EVENT_RING: usize = 8192;

/// Settings of one sidecar process.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub worker_id: String,
    pub model_name: String,
    pub context_length: u32,
    pub engine: EngineKind,
    pub mocker: MockerConfig,
    /// Longest time in-flight streams may take to finish on shutdown; streams still open then are
    /// cut, and the frontend migrates them to another worker.
    pub drain: Duration,
    /// Publish this vLLM ZMQ event stream instead of the built-in engine's events.
    pub vllm_events: Option<ZmqSource>,
    /// The vLLM server, for `engine: Vllm`.
    pub vllm: Option<VllmConfig>,
    /// What this worker does in a disaggregated graph.
    pub role: Role,
    /// The built-in engine's KV blocks as bytes, served to and pulled from peers (disaggregation).
    pub kv_store: Option<KvStoreConfig>,
    /// GPUs this worker occupies, as reported in `Info` (what a planner counts).
    pub gpus: u32,
}

/// A running sidecar: its address and the handles to stop it.
pub struct Sidecar {
    pub addr: SocketAddr,
    /// Random per process: the worker's identity for routers (`WorkerInfo.instance_id`).
    pub instance_id: u64,
    stop_accepting: CancellationToken,
    engine_stop: CancellationToken,
    draining: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    tasks: TaskTracker,
}

impl Sidecar {
    /// Binds, starts the engine and the server. Returns once the port accepts connections.
    pub async fn start(config: SidecarConfig) -> anyhow::Result<Sidecar> {
        let tasks = TaskTracker::new();
        let engine_stop = CancellationToken::new();
        let (listener, addr) = dynamo_protocol::net::bind(config.listen).await?;
        let mut mocker = config.mocker.clone();
        if let (Some(kv), EngineKind::Mocker) = (&config.kv_store, config.engine) {
            let fit = disagg::blocks_that_fit(kv);
            anyhow::ensure!(
                fit > 0,
                "--kv-memory {} bytes holds no KV block of {} bytes (--kv-geometry)",
                kv.memory,
                kv.geometry.block_bytes()
            );
            if fit < mocker.num_gpu_blocks {
                tracing::info!(
                    blocks = fit,
                    block_bytes = kv.geometry.block_bytes(),
                    "the engine gets the KV blocks that fit --kv-memory"
                );
                mocker.num_gpu_blocks = fit;
            }
        }
        let block_size = match config.engine {
            EngineKind::Mocker => u32::try_from(config.mocker.block_size).unwrap_or(u32::MAX),
            // Known once the server answers (and from its events).
            EngineKind::Vllm => 0,
        };
        let events = EventLog::new(EVENT_RING, block_size);
        let started = engine::start(
            config.engine,
            &mocker,
            config.vllm.as_ref(),
            &events,
            &tasks,
            engine_stop.clone(),
        )?;
        let engine = started.engine;
        let kv_store = match (&config.kv_store, &started.mocker) {
            (Some(kv), Some(mocker)) => {
                let url = format!("http://{}", SocketAddr::new(kv.advertise, addr.port()));
                Some(KvStore::start(kv, mocker.clone(), url, &tasks, engine_stop.clone()).await?)
            }
            _ => None,
        };
        let ingest = IngestStats::default();
        match (config.vllm_events.clone(), started.events) {
            (Some(source), own) => {
                if let Some(mut rx) = own {
                    // The built-in engine's own events are not published: drain them.
                    tasks.spawn(async move { while rx.recv().await.is_some() {} });
                }
                tasks.spawn(vllm::run(
                    source,
                    events.clone(),
                    ingest.clone(),
                    started.epochs,
                    engine_stop.clone(),
                ));
            }
            (None, Some(rx)) => {
                tasks.spawn(events.clone().pump(rx));
            }
            (None, None) => tracing::warn!(
                "no KV event source for this engine (--vllm-kv-events): routers see no cached blocks on this worker"
            ),
        }

        let draining = CancellationToken::new();
        let instance_id = events.instance();
        let requests = Counter::default();
        let service = WorkerService {
            requests: requests.clone(),
            engine: engine.clone(),
            events: events.clone(),
            worker_id: config.worker_id.clone(),
            model: config.model_name.clone(),
            context_length: config.context_length,
            draining: draining.clone(),
            role: config.role,
            kv: kv_store.clone(),
            gpus: config.gpus,
            profile: match config.engine {
                EngineKind::Mocker => serde_json::to_string(
                    &dynamo_planner::builtin::self_described(&mocker, config.gpus.max(1)),
                )
                .unwrap_or_default(),
                EngineKind::Vllm => String::new(),
            },
        };
        let metrics = Arc::new(WorkerMetrics::new(
            &config.worker_id,
            &config.model_name,
            events,
            &ingest,
            requests,
            kv_store.as_deref(),
        ));
        let grpc = tonic::service::Routes::new(
            WorkerServer::new(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .into_axum_router();
        let http = axum::Router::new()
            .route("/metrics", get(worker_metrics))
            .route("/health", get(health))
            .route("/live", get(|| async { "ok" }))
            .with_state(HttpState {
                engine,
                metrics,
                draining: draining.clone(),
            });
        let app = grpc.merge(http);

        let stop_accepting = CancellationToken::new();
        let server = tasks.spawn(dynamo_protocol::net::serve(
            listener,
            app,
            stop_accepting.clone(),
            config.drain,
        ));
        Ok(Sidecar {
            addr,
            instance_id,
            stop_accepting,
            engine_stop,
            draining,
            server,
            tasks,
        })
    }

    /// Drains: turns unready (`/health` 503, `Info` and new requests UNAVAILABLE, so routers drop
    /// this worker), waits `settle` for them to notice, stops accepting connections, lets in-flight
    /// streams finish (bounded by the drain deadline; streams cut then are migrated by the
    /// frontend), then stops the engine.
    pub async fn shutdown(self, settle: Duration) {
        self.draining.cancel();
        tokio::time::sleep(settle).await;
        self.stop_accepting.cancel();
        // The server returns once its connections drained, or the drain deadline passed.
        if let Err(error) = self.server.await {
            tracing::warn!(%error, "sidecar server task failed");
        }
        // The engine, event and ingest tasks end once the engine stops.
        self.engine_stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

// === impl WorkerService ===

struct WorkerService {
    engine: Arc<dyn Engine>,
    events: EventLog,
    worker_id: String,
    model: String,
    context_length: u32,
    draining: CancellationToken,
    /// `Generate` requests the engine accepted (`dynamo_component_requests_total`).
    requests: Counter,
    role: Role,
    kv: Option<Arc<KvStore>>,
    gpus: u32,
    /// The engine's profile as JSON, when it knows it (`Info.profile`).
    profile: String,
}

fn submit_status(error: SubmitError) -> Status {
    match error {
        SubmitError::Stopped => Status::unavailable(error.to_string()),
        SubmitError::TooLarge { .. } => Status::resource_exhausted(error.to_string()),
        SubmitError::ContextTooLong { .. }
        | SubmitError::EmptyPrompt
        | SubmitError::ZeroMaxTokens
        | SubmitError::ResumedPastPrompt { .. } => Status::invalid_argument(error.to_string()),
    }
}

#[tonic::async_trait]
impl proto::worker_server::Worker for WorkerService {
    type GenerateStream = GenerateStream;

    async fn release_kv(
        &self,
        request: Request<proto::ReleaseKvRequest>,
    ) -> Result<Response<proto::ReleaseKvResponse>, Status> {
        let Some(kv) = &self.kv else {
            return Ok(Response::new(proto::ReleaseKvResponse { released: false }));
        };
        let released = kv.release(request.into_inner().lease).await;
        Ok(Response::new(proto::ReleaseKvResponse { released }))
    }
    type SubscribeKvEventsStream =
        Pin<Box<dyn Stream<Item = Result<proto::KvEventBatch, Status>> + Send + 'static>>;

    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        if self.draining.is_cancelled() {
            return Err(Status::unavailable("worker is draining"));
        }
        let req = request.into_inner();
        let params = (!req.kv_transfer_params.is_empty()).then_some(req.kv_transfer_params);
        let mut request = engine::Request {
            token_ids: req.token_ids,
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            stop_token_ids: req.stop_token_ids,
            seed: req.seed,
            resumed_tokens: req.resumed_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            ..engine::Request::default()
        };
        let mut report = None;
        let mut taken = Vec::new();
        let rx = match (&self.kv, req.prefill_only, params) {
            (Some(kv), true, _) => kv.prefill(request),
            (Some(kv), false, Some(params)) => kv.pull(request, &params).await.map(|pulled| {
                report = Some(pulled.report);
                taken = pulled.taken;
                pulled.outputs
            }),
            (None, true, _) if self.engine.kind() == EngineKind::Mocker => {
                return Err(Status::failed_precondition(
                    "this worker keeps no KV blocks to hand over (start it with --role prefill, or --kv-memory)",
                ));
            }
            (_, prefill_only, params) => {
                request.prefill_only = prefill_only;
                request.kv_transfer_params = params;
                self.engine.submit(request)
            }
        }
        .map_err(submit_status)?;
        self.requests.inc();
        Ok(Response::new(GenerateStream {
            rx,
            done: false,
            report,
            taken: taken.into(),
        }))
    }

    async fn info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::WorkerInfo>, Status> {
        if self.draining.is_cancelled() {
            return Err(Status::unavailable("worker is draining"));
        }
        let engine = &self.engine;
        if !engine.ready() {
            return Err(Status::unavailable(
                "the worker's engine is not serving yet",
            ));
        }
        Ok(Response::new(proto::WorkerInfo {
            worker_id: self.worker_id.clone(),
            model: self.model.clone(),
            engine: engine.kind().as_str().into(),
            block_size: engine.block_size(),
            kv_blocks_total: engine.kv_blocks_total(),
            context_length: engine
                .context_length()
                .map_or(self.context_length, |c| c.min(self.context_length)),
            instance_id: self.events.instance(),
            role: self.role.to_proto() as i32,
            gpus: self.gpus,
            profile: self.profile.clone(),
        }))
    }

    async fn load(
        &self,
        _request: Request<proto::LoadRequest>,
    ) -> Result<Response<proto::WorkerLoad>, Status> {
        let l = self.engine.load();
        Ok(Response::new(proto::WorkerLoad {
            kv_blocks_used: l.kv_blocks_used as u64,
            kv_blocks_total: l.kv_blocks_total as u64,
            running: u32::try_from(l.running).unwrap_or(u32::MAX),
            waiting: u32::try_from(l.waiting).unwrap_or(u32::MAX),
            prompt_tokens_total: l.prompt_tokens_total,
            cached_tokens_total: l.cached_tokens_total,
        }))
    }

    async fn subscribe_kv_events(
        &self,
        request: Request<proto::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        let request = request.into_inner();
        let log = self.events.clone();
        let instance = log.instance();
        let sub = log.subscribe(request.after_seq, request.snapshot)?;
        let head = futures::stream::iter(sub.head.map(Ok));
        let tail = futures::stream::unfold((sub.live, sub.last), move |(mut live, mut last)| {
            let log = log.clone();
            async move {
                loop {
                    let received = live.recv().await;
                    if log.instance() != instance {
                        // The engine restarted: this subscriber's view ends with it.
                        return None;
                    }
                    match received {
                        Ok(events) => {
                            // Skip what the head already delivered.
                            let events: Vec<_> =
                                events.iter().filter(|e| e.seq > last).cloned().collect();
                            let Some(newest) = events.last() else {
                                continue;
                            };
                            last = newest.seq;
                            let batch = proto::KvEventBatch {
                                block_size: log.block_size(),
                                events,
                                instance,
                                snapshot: false,
                                snapshot_seq: 0,
                            };
                            return Some((Ok(batch), (live, last)));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let status = Status::data_loss(format!(
                                "subscriber fell {n} event batches behind after seq {last}; resubscribe with after_seq = {last}"
                            ));
                            return Some((Err(status), (live, last)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            head, tail,
        ))))
    }
}

/// The engine's output for one request as gRPC messages: everything already produced is packed into
/// one message, so a fast engine costs one frame per poll rather than one per token.
pub struct GenerateStream {
    rx: mpsc::UnboundedReceiver<Output>,
    done: bool,
    /// How a pulled prompt's KV arrived, for the first message.
    report: Option<proto::KvTransferReport>,
    /// Outputs read before the stream started (a pull waits for the request's admission).
    taken: std::collections::VecDeque<Output>,
}

impl Stream for GenerateStream {
    type Item = Result<proto::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let first = match self.taken.pop_front() {
            Some(output) => Poll::Ready(Some(output)),
            None => self.rx.poll_recv(cx),
        };
        let first = match first {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(Some(Err(Status::aborted(
                    "engine stopped before the request finished",
                ))));
            }
            Poll::Ready(Some(output)) => output,
        };
        let mut msg = proto::GenerateResponse {
            kv_transfer: self.report.take(),
            ..proto::GenerateResponse::default()
        };
        let mut next = Some(first);
        while let Some(output) = next.take() {
            match output {
                Output::Scheduled { cached_tokens } => msg.cached_tokens = Some(cached_tokens),
                Output::Token(id) => msg.token_ids.push(id),
                Output::KvTransferParams(params) => msg.kv_transfer_params = params,
                // Handled by the KV store before they get here.
                Output::Prefilled { .. } | Output::PullKv { .. } => {}
                Output::Finished(reason) => {
                    msg.finish_reason = match reason {
                        FinishReason::Length => proto::FinishReason::Length,
                        FinishReason::Stop => proto::FinishReason::Stop,
                    } as i32;
                    self.done = true;
                    break;
                }
            }
            next = self.taken.pop_front().or_else(|| self.rx.try_recv().ok());
        }
        Poll::Ready(Some(Ok(msg)))
    }
}

// === worker metrics ===

struct WorkerMetrics {
    registry: Registry,
    blocks_used: Gauge,
    blocks_total: Gauge,
    running: Gauge,
    waiting: Gauge,
    usage: Gauge<f64, std::sync::atomic::AtomicU64>,
    hit_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    cached_blocks: Gauge,
    events: EventLog,
}

impl WorkerMetrics {
    fn new(
        worker_id: &str,
        model: &str,
        events: EventLog,
        ingest: &IngestStats,
        requests: Counter,
        kv: Option<&KvStore>,
    ) -> WorkerMetrics {
        let mut registry = Registry::with_prefix_and_labels(
            "dynamo_component",
            [
                ("worker_id".into(), worker_id.to_owned().into()),
                ("model".into(), model.to_owned().into()),
            ]
            .into_iter(),
        );
        let m = WorkerMetrics {
            blocks_used: Gauge::default(),
            blocks_total: Gauge::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            usage: Gauge::default(),
            hit_rate: Gauge::default(),
            cached_blocks: Gauge::default(),
            events,
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Generate requests the engine accepted",
            requests,
        );
        registry.register(
            "kv_event_blocks",
            "KV blocks the worker holds, as its published events describe them",
            m.cached_blocks.clone(),
        );
        let ingest_counters = [
            (
                "vllm_kv_event_batches",
                "vLLM KV event batches ingested",
                &ingest.batches,
            ),
            (
                "vllm_kv_events",
                "vLLM KV events published to subscribers",
                &ingest.events,
            ),
            (
                "vllm_kv_events_skipped",
                "vLLM KV events skipped (another medium than GPU, or a LoRA adapter)",
                &ingest.skipped,
            ),
            (
                "vllm_kv_event_malformed_frames",
                "vLLM KV event messages that could not be decoded and were skipped",
                &ingest.malformed,
            ),
            (
                "vllm_kv_event_gaps",
                "Gaps in vLLM KV event sequence numbers",
                &ingest.gaps,
            ),
            (
                "vllm_kv_cache_unknown",
                "Times the engine's KV cache became unknown (events lost beyond replay)",
                &ingest.unknown,
            ),
        ];
        for (name, help, counter) in ingest_counters {
            registry.register(name, help, counter.clone());
        }
        let counts: [(&str, &str, &Gauge); 4] = [
            (
                "kvstats_active_blocks",
                "KV blocks held by running requests",
                &m.blocks_used,
            ),
            (
                "kvstats_total_blocks",
                "KV blocks in the engine",
                &m.blocks_total,
            ),
            (
                "requests_running",
                "Requests in the running batch",
                &m.running,
            ),
            (
                "requests_waiting",
                "Requests queued for admission",
                &m.waiting,
            ),
        ];
        for (name, help, gauge) in counts {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "kvstats_gpu_cache_usage_percent",
            "Fraction of KV blocks in use (0-1)",
            m.usage.clone(),
        );
        registry.register(
            "kvstats_gpu_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens, since start",
            m.hit_rate.clone(),
        );
        if let Some(kv) = kv {
            kv.register_metrics(&mut registry);
        }
        WorkerMetrics { registry, ..m }
    }
}

/// What the sidecar's plain HTTP routes read.
#[derive(Clone)]
struct HttpState {
    engine: Arc<dyn Engine>,
    metrics: Arc<WorkerMetrics>,
    draining: CancellationToken,
}

/// Readiness: 200 while the worker takes requests, 503 while it drains.
async fn health(State(s): State<HttpState>) -> impl IntoResponse {
    if s.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !s.engine.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "engine not serving")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn worker_metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let (engine, m) = (&s.engine, &s.metrics);
    let l = engine.load();
    m.blocks_used.set(l.kv_blocks_used as i64);
    m.blocks_total.set(l.kv_blocks_total as i64);
    m.running.set(l.running as i64);
    m.waiting.set(l.waiting as i64);
    m.cached_blocks.set(m.events.mirrored_blocks() as i64);
    m.usage
        .set(l.kv_blocks_used as f64 / l.kv_blocks_total.max(1) as f64);
    m.hit_rate.set(if l.prompt_tokens_total == 0 {
        0.0
    } else {
        l.cached_tokens_total as f64 / l.prompt_tokens_total as f64
    });
    let mut body = String::new();
    if let Err(error) = encode(&mut body, &m.registry) {
        tracing::warn!(%error, "could not encode worker metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
