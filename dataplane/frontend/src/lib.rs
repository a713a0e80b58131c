//! The OpenAI-compatible HTTP frontend: parses and validates requests, renders the chat template,
//! tokenizes, asks the router for a worker, streams the worker's tokens back as text (SSE or one
//! JSON body), and keeps Dynamo-named metrics. It owns no engine state: workers are reached only
//! through their gRPC request plane.

pub mod disagg;
pub mod discovery;
pub mod error;
pub mod generate;
pub mod kv_follow;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod sse;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::BytesMut;
use dynamo_kv::policy::{KvRouterConfig, RouterMode};

pub use crate::disagg::{DisaggConfig, DisaggPolicy};
use dynamo_model::Model;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::{
    error::{ApiError, from_json_error},
    generate::MigrationType,
    metrics::FrontendMetrics,
    openai::{ChatCompletionRequest, CompletionRequest, Prompt},
    pool::{PoolConfig, WorkerPool},
    sse::Kind,
};

/// Prompts longer than this (bytes of text) are tokenized on the blocking pool, so one long prompt
/// does not stall the streams of other requests on the same runtime thread.
const BLOCKING_TOKENIZE_BYTES: usize = 32 * 1024;
/// How long a worker probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Settings of one frontend.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub listen: SocketAddr,
    /// Workers to start with (the static list; other discovery sources feed [`Frontend::pool`]).
    pub workers: Vec<String>,
    pub router_mode: RouterMode,
    pub kv: KvRouterConfig,
    pub max_body_bytes: usize,
    /// How often each worker is probed.
    pub health_interval: Duration,
    pub drain: Duration,
    /// How many times a request may move to another worker when its worker fails (0: never).
    pub migration_limit: u32,
    /// How long a request waits for a worker to join when none is left to pick (0: refuse at once).
    pub worker_wait: Duration,
    /// When prompts go to the prefill pool (disaggregated graphs).
    pub disagg: DisaggConfig,
    /// Per-request latency targets: each finished request is counted as meeting them or not
    /// (`dynamo_frontend_sla_requests_total{met}`), which the SLA planner reads.
    pub sla: Option<SlaTargets>,
}

/// Per-request TTFT and mean-ITL targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlaTargets {
    pub ttft: Duration,
    pub itl: Duration,
}

/// Shared per-process state of the frontend.
pub struct AppState {
    model: Arc<Model>,
    pool: Arc<WorkerPool>,
    metrics: FrontendMetrics,
    max_body_bytes: usize,
    migration_limit: u32,
    worker_wait: Duration,
    disagg: DisaggConfig,
    sla: Option<SlaTargets>,
    draining: CancellationToken,
    next_id: AtomicU64,
    id_salt: u64,
}

/// A running frontend. Every task it starts (server, worker probes, KV event followers, discovery)
/// runs on its tracker under its root token, and ends in [`Frontend::shutdown`].
pub struct Frontend {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    root: CancellationToken,
    stop_accepting: CancellationToken,
    tasks: TaskTracker,
    server: tokio::task::JoinHandle<()>,
}

impl Frontend {
    /// Binds the port, admits the initial workers that answer a first probe, and serves. Returns
    /// once the port is bound (so a worker that is up is already routable).
    pub async fn start(config: FrontendConfig, model: Arc<Model>) -> anyhow::Result<Frontend> {
        let root = CancellationToken::new();
        let tasks = TaskTracker::new();
        let pool = WorkerPool::new(
            PoolConfig {
                mode: config.router_mode,
                kv: config.kv,
                probe_interval: config.health_interval,
                probe_timeout: PROBE_TIMEOUT,
            },
            tasks.clone(),
            root.child_token(),
        );
        let initial: BTreeSet<String> = config.workers.iter().cloned().collect();
        if !initial.is_empty() {
            pool.set_candidates(&initial).await;
        }
        let state = Arc::new(AppState {
            metrics: FrontendMetrics::new(&model.card().name, pool.kv().map(|kv| &**kv)),
            model,
            pool,
            max_body_bytes: config.max_body_bytes,
            migration_limit: config.migration_limit,
            worker_wait: config.worker_wait,
            disagg: config.disagg,
            sla: config.sla,
            draining: CancellationToken::new(),
            next_id: AtomicU64::new(0),
            id_salt: rand::random(),
        });
        let (listener, addr) = dynamo_protocol::net::bind(config.listen).await?;
        let stop_accepting = CancellationToken::new();
        let server = tasks.spawn(dynamo_protocol::net::serve(
            listener,
            router(state.clone()),
            stop_accepting.clone(),
            config.drain,
        ));
        Ok(Frontend {
            addr,
            state,
            root,
            stop_accepting,
            tasks,
            server,
        })
    }

    /// The worker pool, for discovery sources to feed.
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.state.pool
    }

    /// The frontend's task tracker and a token cancelled at shutdown, for tasks that serve it
    /// (discovery).
    pub fn tasks(&self) -> (&TaskTracker, CancellationToken) {
        (&self.tasks, self.root.child_token())
    }

    /// Turns readiness to 503, waits `settle` (so load balancers notice), stops accepting and drains
    /// in-flight streams (bounded by the configured drain deadline), then stops every task.
    pub async fn shutdown(self, settle: Duration) {
        self.state.draining.cancel();
        tokio::time::sleep(settle).await;
        self.stop_accepting.cancel();
        if let Err(error) = self.server.await {
            tracing::warn!(%error, "frontend server task failed");
        }
        self.root.cancel();
        self.tasks.close();
        // Probes and followers return as soon as they see the cancellation.
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("frontend tasks did not stop within 5s");
        }
    }
}

/// The HTTP routes, exposed for in-process tests (`router(state).oneshot(req)`).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/profiles", get(profiles))
        .route("/live", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

// === handlers ===

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat_inner(&s, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            s.metrics.count_request("chat_completions", false, false);
            e.into_response()
        }
    }
}

async fn chat_inner(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = read_json(headers, body, s.max_body_bytes).await?;
    s.check_model(&req.model)?;
    let params = req.validate()?;
    let messages = req.template_messages()?;
    let extra = req.template_extra();
    let started = Instant::now();
    let model = s.model.clone();
    let render_and_encode = move || -> Result<Vec<u32>, ApiError> {
        let text = model
            .render_chat(&messages, true, extra.as_ref())
            .map_err(|e| {
                ApiError::invalid(
                    format!("Could not apply the chat template: {e}"),
                    "messages",
                )
            })?;
        model.encode(&text, false).map_err(|e| {
            ApiError::invalid(format!("Could not tokenize the prompt: {e}"), "messages")
        })
    };
    let size: usize = req
        .messages
        .iter()
        .map(|m| match &m.content {
            Some(openai::MessageContent::Text(t)) => t.len(),
            _ => 64,
        })
        .sum();
    let tokens = tokenize(size > BLOCKING_TOKENIZE_BYTES, render_and_encode).await?;
    s.metrics.tokenize.observe(started.elapsed().as_secs_f64());
    s.generate(Kind::Chat, tokens, params, started).await
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(&s, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            s.metrics.count_request("completions", false, false);
            e.into_response()
        }
    }
}

async fn completions_inner(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = read_json(headers, body, s.max_body_bytes).await?;
    s.check_model(&req.model)?;
    let params = req.validate()?;
    let started = Instant::now();
    let text = match req.prompt {
        Prompt::Tokens(ids) => Err(ids),
        Prompt::TokenBatch(mut b) if b.len() == 1 => Err(b.remove(0)),
        Prompt::Text(t) => Ok(t),
        Prompt::TextBatch(mut b) if b.len() == 1 => Ok(b.remove(0)),
        Prompt::TextBatch(b) => return Err(batch_error(b.len())),
        Prompt::TokenBatch(b) => return Err(batch_error(b.len())),
    };
    let tokens = match text {
        Err(ids) => {
            let vocab = s.model.card().vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::invalid(
                    format!("prompt token id {bad} is outside the vocabulary (size {vocab})"),
                    "prompt",
                ));
            }
            ids
        }
        Ok(text) => {
            let big = text.len() > BLOCKING_TOKENIZE_BYTES;
            let model = s.model.clone();
            let encode = move || {
                model.encode(&text, true).map_err(|e| {
                    ApiError::invalid(format!("Could not tokenize the prompt: {e}"), "prompt")
                })
            };
            tokenize(big, encode).await?
        }
    };
    s.metrics.tokenize.observe(started.elapsed().as_secs_f64());
    s.generate(Kind::Completion, tokens, params, started).await
}

/// Runs template rendering + tokenization inline for short prompts and on the blocking pool for
/// long ones (`big`), so a long prompt does not hold up other requests' streams.
async fn tokenize<T, F>(big: bool, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    if big {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| ApiError::upstream("tokenizer task failed"))?
    } else {
        work()
    }
}

fn batch_error(n: usize) -> ApiError {
    ApiError::invalid(
        format!("a batch of {n} prompts is not supported; send one prompt per request"),
        "prompt",
    )
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let card = s.model.card();
    axum::Json(openai::ModelList {
        object: "list",
        data: vec![openai::ModelObject {
            id: &card.name,
            object: "model",
            created: unix_now(),
            owned_by: "dynamo-rs",
            max_model_len: card.context_length,
        }],
    })
    .into_response()
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let live = s.pool.live_count();
    let (status, word) = if s.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if live == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "no live worker")
    } else {
        (StatusCode::OK, "healthy")
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": word,
            "model": s.model.card().name,
            "router_mode": s.pool.mode().as_str(),
            "live_workers": live,
            "workers": s.pool.candidates(),
        })),
    )
        .into_response()
}

/// The engine profiles the live workers describe themselves with, by role (what the SLA planner
/// sizes pools with when the graph names no profile of its own).
async fn profiles(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(s.pool.profiles()).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    if let Some(kv) = s.pool.kv() {
        kv.refresh_metrics();
    }
    s.metrics.set_fleet(&s.pool.fleet());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// Reads the whole body (refusing more than `limit` bytes with 413) and decodes JSON, naming the
/// offending field on a type error.
async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::too_large(limit));
    }
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::malformed(format!("Could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    if buf.is_empty() {
        return Err(ApiError::malformed(
            "Request body is empty; send a JSON object (Content-Type: application/json).",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&buf);
    let value = serde_path_to_error::deserialize(de).map_err(|e| from_json_error(&e))?;
    Ok(value)
}

// === impl AppState ===

impl AppState {
    /// The worker pool (and, in kv mode, its index).
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.pool
    }

    /// The served model's name.
    pub fn model_name(&self) -> &str {
        &self.model.card().name
    }

    fn count_migration(&self, kind: MigrationType) {
        self.metrics.count_migration(kind.as_str());
    }

    fn check_model(&self, requested: &str) -> Result<(), ApiError> {
        if self.draining.is_cancelled() {
            return Err(ApiError::draining());
        }
        let served = &self.model.card().name;
        if requested != served {
            return Err(ApiError::model_not_found(requested, served));
        }
        Ok(())
    }

    fn request_id(&self, kind: Kind) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        format!("{prefix}-{:016x}{n:08x}", self.id_salt)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
