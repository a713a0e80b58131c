//! The OpenAI-compatible HTTP frontend: parses and validates requests, renders the chat template,
//! tokenizes, asks the router for a worker, streams the worker's tokens back as text (SSE or one
//! JSON body), and keeps Dynamo-named metrics. It owns no engine state: workers are reached only
//! through their gRPC request plane.

pub mod error;
pub mod metrics;
pub mod openai;
pub mod sse;

use std::{
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
use bytes::{Bytes, BytesMut};
use dynamo_model::{Model, StopMatcher};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Code, Streaming};

use self::{
    error::{ApiError, from_json_error},
    metrics::FrontendMetrics,
    openai::{ChatCompletionRequest, CompletionRequest, GenParams, Prompt, Usage},
    sse::{ChunkWriter, Kind},
};
use crate::{
    kv_router::KvRouterConfig,
    proto::{self, GenerateResponse},
    router::{Lease, RouterMode, WorkerPool},
};

/// Prompts longer than this (bytes of text) are tokenized on the blocking pool, so one long prompt
/// does not stall the streams of other requests on the same runtime thread.
const BLOCKING_TOKENIZE_BYTES: usize = 32 * 1024;
/// How many different workers one request may try before its first token.
const MAX_ATTEMPTS: usize = 3;

/// Settings of one frontend.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    pub listen: SocketAddr,
    pub workers: Vec<String>,
    pub router_mode: RouterMode,
    pub kv: KvRouterConfig,
    pub max_body_bytes: usize,
    pub health_interval: Duration,
    pub drain: Duration,
}

/// Shared per-process state of the frontend.
pub struct AppState {
    model: Arc<Model>,
    pool: Arc<WorkerPool>,
    metrics: FrontendMetrics,
    max_body_bytes: usize,
    draining: CancellationToken,
    next_id: AtomicU64,
    id_salt: u64,
}

/// A running frontend.
pub struct Frontend {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop_accepting: CancellationToken,
    health_stop: CancellationToken,
    /// The KV event followers (kv mode), stopped by `health_stop`.
    kv_tasks: TaskTracker,
    server: tokio::task::JoinHandle<()>,
}

impl Frontend {
    /// Binds the port, starts worker health probing, and serves. Returns once the port is bound and
    /// a first probe round has run (so a worker that is up is already routable).
    pub async fn start(config: FrontendConfig, model: Arc<Model>) -> anyhow::Result<Frontend> {
        let pool = Arc::new(WorkerPool::new(
            &config.workers,
            config.router_mode,
            config.kv,
        )?);
        let probe_timeout = Duration::from_secs(1);
        pool.probe_all(probe_timeout).await;
        let health_stop = CancellationToken::new();
        let kv_tasks = TaskTracker::new();
        pool.follow_kv_events(&kv_tasks, &health_stop);
        kv_tasks.close();
        tokio::spawn(pool.clone().run_health(
            config.health_interval,
            probe_timeout,
            health_stop.clone(),
        ));
        let state = Arc::new(AppState {
            metrics: FrontendMetrics::new(&model.card().name),
            model,
            pool,
            max_body_bytes: config.max_body_bytes,
            draining: CancellationToken::new(),
            next_id: AtomicU64::new(0),
            id_salt: rand::random(),
        });
        let (listener, addr) = crate::net::bind(config.listen).await?;
        let stop_accepting = CancellationToken::new();
        let server = tokio::spawn(crate::net::serve(
            listener,
            router(state.clone()),
            stop_accepting.clone(),
            config.drain,
        ));
        Ok(Frontend {
            addr,
            state,
            stop_accepting,
            health_stop,
            kv_tasks,
            server,
        })
    }

    /// Turns readiness to 503, waits `settle` (so load balancers notice), stops accepting and drains
    /// in-flight streams (bounded by the configured drain deadline).
    pub async fn shutdown(self, settle: Duration) {
        self.state.draining.cancel();
        tokio::time::sleep(settle).await;
        self.stop_accepting.cancel();
        if let Err(error) = self.server.await {
            tracing::warn!(%error, "frontend server task failed");
        }
        self.health_stop.cancel();
        // Each follower returns as soon as it sees the cancellation.
        self.kv_tasks.wait().await;
    }
}

/// The HTTP routes, exposed for in-process tests (`router(state).oneshot(req)`).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
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
    let workers: Vec<_> = s
        .pool
        .workers()
        .iter()
        .map(|w| {
            serde_json::json!({
                "url": w.url,
                "live": w.is_live(),
                "inflight": w.inflight(),
                "worker_id": w.info().map(|i| i.worker_id),
            })
        })
        .collect();
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
            "workers": workers,
        })),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            let mut body = s.metrics.encode();
            if let Some(kv) = s.pool.kv() {
                // Router lines go before OpenMetrics' closing `# EOF`.
                let eof = body.ends_with("# EOF\n");
                if eof {
                    body.truncate(body.len() - "# EOF\n".len());
                }
                kv.encode_metrics(&mut body, &s.model.card().name);
                if eof {
                    body.push_str("# EOF\n");
                }
            }
            body
        },
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("frontend/openapi.json"),
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

    /// Checks the context window, routes (retrying other workers until the first response), then
    /// answers as a stream or a single body.
    async fn generate(
        self: &Arc<Self>,
        kind: Kind,
        tokens: Vec<u32>,
        params: GenParams,
        started: Instant,
    ) -> Result<Response, ApiError> {
        let card = self.model.card();
        let prompt_len = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if tokens.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", "prompt"));
        }
        let max_tokens = match params.max_tokens {
            Some(m) if u64::from(prompt_len) + u64::from(m) > u64::from(card.context_length) => {
                return Err(ApiError::context_too_long(
                    card.context_length,
                    prompt_len,
                    Some(m),
                ));
            }
            Some(m) => m,
            None if prompt_len >= card.context_length => {
                return Err(ApiError::context_too_long(
                    card.context_length,
                    prompt_len,
                    None,
                ));
            }
            None => card.context_length - prompt_len,
        };
        let id = self.request_id(kind);
        let request = proto::GenerateRequest {
            request_id: id.clone(),
            token_ids: tokens,
            max_tokens,
            ignore_eos: params.ignore_eos,
            stop_token_ids: Vec::new(),
            seed: params.seed,
            temperature: params.temperature,
            top_p: params.top_p,
        };
        let (lease, first, upstream) = self.dispatch(request).await?;
        let inflight = InflightGuard::new(self);
        let run = TokenRun {
            state: self.clone(),
            kind,
            id,
            created: unix_now(),
            prompt_tokens: prompt_len,
            cached_tokens: first.cached_tokens.unwrap_or(0),
            completion_tokens: 0,
            started,
            last_token: None,
            params,
            recorded: false,
            _lease: lease,
            _inflight: inflight,
        };
        if run.params.stream {
            Ok(run.stream(first, upstream))
        } else {
            run.unary(first, upstream).await
        }
    }

    /// Sends the request to a worker and waits for its first message. A worker that cannot be
    /// reached is marked dead and the next one is tried; the client sees an error only when no
    /// worker is left or the worker refused the request itself.
    async fn dispatch(
        &self,
        request: proto::GenerateRequest,
    ) -> Result<(Lease, GenerateResponse, Streaming<GenerateResponse>), ApiError> {
        let mut tried = Vec::with_capacity(MAX_ATTEMPTS);
        loop {
            let Some(mut lease) = self.pool.pick(&request.token_ids, &tried) else {
                return Err(ApiError::no_worker(&self.model.card().name));
            };
            tried.push(lease.index);
            let mut client = lease.worker.client.clone();
            let attempt = async {
                let mut stream = client.generate(request.clone()).await?.into_inner();
                match stream.message().await? {
                    Some(first) => Ok((first, stream)),
                    None => Err(tonic::Status::unavailable(
                        "worker closed the stream before answering",
                    )),
                }
            };
            match attempt.await {
                Ok((first, stream)) => {
                    lease.first_token();
                    return Ok((lease, first, stream));
                }
                Err(status) => match status.code() {
                    Code::InvalidArgument => {
                        return Err(ApiError::invalid(status.message().to_owned(), "prompt"));
                    }
                    Code::ResourceExhausted => {
                        return Err(ApiError::invalid(
                            format!(
                                "The request does not fit the worker's KV cache: {}",
                                status.message()
                            ),
                            "max_tokens",
                        ));
                    }
                    _ => {
                        lease.worker.mark_dead(status.message());
                        if tried.len() >= MAX_ATTEMPTS {
                            return Err(ApiError::upstream(format!(
                                "{} workers failed this request; the last said: {}",
                                tried.len(),
                                status.message()
                            )));
                        }
                    }
                },
            }
        }
    }
}

/// Counts a request as in flight for as long as it lives.
struct InflightGuard {
    state: Arc<AppState>,
}

impl InflightGuard {
    fn new(state: &Arc<AppState>) -> InflightGuard {
        state.metrics.inflight.inc();
        InflightGuard {
            state: state.clone(),
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.state.metrics.inflight.dec();
    }
}

// === impl TokenRun ===

/// One request's response in progress: turns worker messages into text and metrics.
struct TokenRun {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: u32,
    cached_tokens: u32,
    completion_tokens: u32,
    started: Instant,
    last_token: Option<Instant>,
    params: GenParams,
    /// Whether the outcome is already in the metrics.
    recorded: bool,
    _lease: Lease,
    _inflight: InflightGuard,
}

/// What a worker message amounted to.
enum Step {
    More,
    Finished(&'static str),
}

impl TokenRun {
    fn endpoint(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat_completions",
            Kind::Completion => "completions",
        }
    }

    /// Records token timing for one message that brought `n` tokens.
    fn observe_tokens(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let m = &self.state.metrics;
        match self.last_token {
            None => {
                m.ttft
                    .observe(now.duration_since(self.started).as_secs_f64());
                // Tokens that arrive together share the time since the previous message.
                for _ in 1..n {
                    m.itl.observe(0.0);
                }
            }
            Some(prev) => {
                let per = now.duration_since(prev).as_secs_f64() / f64::from(n);
                for _ in 0..n {
                    m.itl.observe(per);
                }
            }
        }
        self.last_token = Some(now);
        self.completion_tokens += n;
    }

    /// Decodes the message's tokens, applies stop strings, and appends the visible text to `text`.
    fn absorb(
        &mut self,
        msg: &GenerateResponse,
        decoder: &mut dynamo_model::Decoder<'_>,
        stops: &mut StopMatcher,
        text: &mut String,
    ) -> Step {
        self.observe_tokens(u32::try_from(msg.token_ids.len()).unwrap_or(u32::MAX));
        for &id in &msg.token_ids {
            let piece = match decoder.push(id) {
                Ok(p) if !p.is_empty() => p,
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(%error, id, "token could not be decoded; skipped");
                    continue;
                }
            };
            if self.params.stop.is_empty() {
                text.push_str(piece);
                continue;
            }
            let (emit, stopped) = stops.push(piece);
            text.push_str(&emit);
            if stopped {
                return Step::Finished("stop");
            }
        }
        match proto::FinishReason::try_from(msg.finish_reason) {
            Ok(proto::FinishReason::Length) => Step::Finished("length"),
            Ok(proto::FinishReason::Stop) => Step::Finished("stop"),
            _ => Step::More,
        }
    }

    /// Flushes held-back text at the end of a stream.
    fn flush(decoder: &mut dynamo_model::Decoder<'_>, stops: &mut StopMatcher, text: &mut String) {
        let tail = decoder.flush();
        if !tail.is_empty() {
            let (emit, _) = stops.push(&tail);
            text.push_str(&emit);
        }
        text.push_str(&stops.finish());
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        )
    }

    fn finish_metrics(&mut self, ok: bool) {
        self.recorded = true;
        let m = &self.state.metrics;
        m.count_request(self.endpoint(), self.params.stream, ok);
        m.duration.observe(self.started.elapsed().as_secs_f64());
        m.isl.observe(f64::from(self.prompt_tokens));
        m.osl.observe(f64::from(self.completion_tokens));
        m.cached.observe(f64::from(self.cached_tokens));
    }

    async fn unary(
        mut self,
        first: GenerateResponse,
        mut upstream: Streaming<GenerateResponse>,
    ) -> Result<Response, ApiError> {
        let model = self.state.model.clone();
        let mut decoder = model.decoder(true);
        let mut stops = StopMatcher::new(self.params.stop.clone());
        let mut text = String::new();
        let mut msg = first;
        let reason = loop {
            if let Step::Finished(r) = self.absorb(&msg, &mut decoder, &mut stops, &mut text) {
                break r;
            }
            msg = match upstream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.finish_metrics(false);
                    return Err(ApiError::upstream(
                        "the worker ended the stream without finishing the request",
                    ));
                }
                Err(status) => {
                    self.finish_metrics(false);
                    self._lease.worker.mark_dead(status.message());
                    return Err(ApiError::upstream(format!(
                        "the worker failed mid-request: {}",
                        status.message()
                    )));
                }
            };
        };
        drop(upstream);
        Self::flush(&mut decoder, &mut stops, &mut text);
        self.finish_metrics(true);
        let usage = self.usage();
        let model_name = &model.card().name;
        let body = match self.kind {
            Kind::Chat => serde_json::to_vec(&openai::ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: model_name,
                choices: [openai::ChatChoice {
                    index: 0,
                    message: openai::AssistantMessage {
                        role: "assistant",
                        content: &text,
                    },
                    logprobs: None,
                    finish_reason: reason,
                }],
                usage,
            }),
            Kind::Completion => serde_json::to_vec(&openai::Completion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: model_name,
                choices: [openai::CompletionChoice {
                    index: 0,
                    text: &text,
                    logprobs: None,
                    finish_reason: reason,
                }],
                usage,
            }),
        }
        .map_err(|e| ApiError::upstream(format!("could not encode the response: {e}")))?;
        Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
    }

    /// Streams SSE. The body is a generator polled by hyper that owns the upstream gRPC stream:
    /// no task or channel sits between a worker's token and the client's socket. When the client
    /// goes away hyper drops the body, which drops the upstream stream and so cancels the request
    /// on the worker (freeing its engine slot); the `Drop` of [`TokenRun`] records the failure.
    fn stream(
        mut self,
        first: GenerateResponse,
        mut upstream: Streaming<GenerateResponse>,
    ) -> Response {
        let body = async_stream::stream! {
            let model = self.state.model.clone();
            let writer = ChunkWriter::new(self.kind, &self.id, self.created, &model.card().name, self.params.include_usage);
            let mut decoder = model.decoder(true);
            let mut stops = StopMatcher::new(self.params.stop.clone());
            let mut out = BytesMut::with_capacity(1024);
            let mut text = String::new();
            writer.start(&mut out);
            let mut msg = first;
            let outcome: Result<&'static str, ApiError> = loop {
                if let Step::Finished(reason) = self.absorb(&msg, &mut decoder, &mut stops, &mut text) {
                    break Ok(reason);
                }
                if !text.is_empty() {
                    writer.delta(&mut out, &text);
                    text.clear();
                }
                if !out.is_empty() {
                    yield Ok::<Bytes, std::convert::Infallible>(out.split().freeze());
                }
                msg = match upstream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(ApiError::upstream("the worker ended the stream without finishing the request")),
                    Err(status) => {
                        self._lease.worker.mark_dead(status.message());
                        break Err(ApiError::upstream(format!("the worker failed mid-request: {}", status.message())));
                    }
                };
            };
            drop(upstream);
            match outcome {
                Ok(reason) => {
                    Self::flush(&mut decoder, &mut stops, &mut text);
                    if !text.is_empty() {
                        writer.delta(&mut out, &text);
                    }
                    writer.finish(&mut out, reason);
                    writer.usage(&mut out, &self.usage());
                    ChunkWriter::done(&mut out);
                    self.finish_metrics(true);
                }
                Err(e) => {
                    ChunkWriter::error(&mut out, &e.to_json());
                    self.finish_metrics(false);
                }
            }
            yield Ok(out.freeze());
        };
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| ApiError::upstream("could not build the response").into_response())
    }
}

impl Drop for TokenRun {
    /// A run dropped before it recorded its outcome (client disconnected, handler cancelled) counts
    /// as a failed request.
    fn drop(&mut self) {
        if !self.recorded {
            self.finish_metrics(false);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
