//! One request's generation: dispatch to a worker, migration to another when that worker fails
//! before or during the stream, and the conversion of worker messages into OpenAI responses
//! (one JSON body, or SSE chunks) with their metrics.
//!
//! Migration: the frontend keeps every token a request has produced. When its worker fails (the
//! call errors, or the stream ends without a finish reason), the request is sent to another worker
//! with the prompt plus those tokens, `max_tokens` reduced by them, and `resumed_tokens` saying how
//! many of the ids are earlier output; the client's stream goes on from where it was, with one
//! usage count. A request moves at most `--migration-limit` times (including attempts before its
//! first token); each move is counted in `dynamo_frontend_model_migration_total{migration_type}`.

use std::sync::Arc;

use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use dynamo_kv::WorkerId;
use dynamo_model::StopMatcher;
use dynamo_protocol::proto::{self, GenerateResponse};
use tokio::time::Instant;
use tonic::{Code, Streaming};

use crate::{
    AppState,
    error::ApiError,
    openai::{self, GenParams, Usage},
    pool::Lease,
    sse::{ChunkWriter, Kind},
    unix_now,
};

/// Why a request moved to another worker (the `migration_type` label, Dynamo's values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationType {
    /// Before its first token: the worker could not take it.
    NewRequest,
    /// Mid-stream: the worker failed after producing tokens.
    OngoingRequest,
}

impl MigrationType {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationType::NewRequest => "new_request",
            MigrationType::OngoingRequest => "ongoing_request",
        }
    }
}

impl AppState {
    /// Checks the context window, routes (retrying other workers until the first response), then
    /// answers as a stream or a single body.
    pub(crate) async fn generate(
        self: &Arc<Self>,
        kind: Kind,
        tokens: Vec<u32>,
        params: GenParams,
        started: Instant,
    ) -> Result<Response, ApiError> {
        // The workers' KV cache may hold less than the model's context.
        let context_length = self
            .pool()
            .context_length()
            .map_or(self.model.card().context_length, |w| {
                w.min(self.model.card().context_length)
            });
        let prompt_len = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if tokens.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", "prompt"));
        }
        let max_tokens = match params.max_tokens {
            Some(m) if u64::from(prompt_len) + u64::from(m) > u64::from(context_length) => {
                return Err(ApiError::context_too_long(
                    context_length,
                    prompt_len,
                    Some(m),
                ));
            }
            Some(m) => m,
            None if prompt_len >= context_length => {
                return Err(ApiError::context_too_long(context_length, prompt_len, None));
            }
            None => context_length - prompt_len,
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
            resumed_tokens: 0,
            prefill_only: false,
            kv_transfer_params: Vec::new(),
        };
        let (upstream, first) = Upstream::start(self.clone(), request).await?;
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
            first_token: None,
            params,
            recorded: false,
            _inflight: inflight,
        };
        if run.params.stream {
            Ok(run.stream(first, upstream))
        } else {
            run.unary(first, upstream).await
        }
    }
}

// === impl Upstream ===

/// A request's connection to whichever worker is serving it now, and what it needs to move.
pub(crate) struct Upstream {
    state: Arc<AppState>,
    /// The request as the client asked it (prompt and `max_tokens` of the first attempt).
    request: proto::GenerateRequest,
    /// Output tokens so far, over every attempt.
    generated: Vec<u32>,
    lease: Lease,
    stream: Streaming<GenerateResponse>,
    /// Workers that failed this request (not tried again).
    failed: Vec<WorkerId>,
    /// Moves made so far (before and after the first token).
    moves: u32,
    /// The request's `cached_tokens` is known (its prompt was prefilled elsewhere, or the
    /// stream now is not the first attempt's): later reports are not the request's.
    cached_known: bool,
}

impl Upstream {
    /// Sends `request` to a worker and waits for its first message, moving to another worker when
    /// one cannot take it.
    async fn start(
        state: Arc<AppState>,
        request: proto::GenerateRequest,
    ) -> Result<(Upstream, GenerateResponse), ApiError> {
        let mut failed = Vec::new();
        let mut moves = 0;
        let Attempt {
            lease,
            first,
            stream,
            cached_known,
        } = dispatch(
            &state,
            &request,
            &mut failed,
            &mut moves,
            MigrationType::NewRequest,
        )
        .await?;
        let mut up = Upstream {
            state,
            request,
            generated: Vec::new(),
            lease,
            stream,
            failed,
            moves,
            cached_known,
        };
        up.generated.extend_from_slice(&first.token_ids);
        Ok((up, first))
    }

    /// The next message of the request's stream. A failed worker is left behind and the request
    /// continues on another one; the caller sees the same stream go on.
    async fn next(&mut self) -> Result<GenerateResponse, ApiError> {
        loop {
            let why = match self.stream.message().await {
                Ok(Some(mut msg)) => {
                    self.generated.extend_from_slice(&msg.token_ids);
                    if self.cached_known {
                        msg.cached_tokens = None;
                    }
                    return Ok(msg);
                }
                Ok(None) => "the worker ended the stream without finishing the request".to_owned(),
                Err(status) => format!("the worker failed mid-request: {}", status.message()),
            };
            self.state.pool().leave(self.lease.worker.id, &why);
            self.failed.push(self.lease.worker.id);
            let generated = u32::try_from(self.generated.len()).unwrap_or(u32::MAX);
            let remaining = self.request.max_tokens.saturating_sub(generated);
            if remaining == 0 {
                // Every token arrived; only the finish was lost.
                return Ok(GenerateResponse {
                    finish_reason: proto::FinishReason::Length as i32,
                    ..GenerateResponse::default()
                });
            }
            let limit = self.state.migration_limit;
            if self.moves >= limit {
                return Err(ApiError::upstream(format!(
                    "{why}; the request was not moved to another worker because it already moved {} time(s) (--migration-limit {limit})",
                    self.moves
                )));
            }
            let mut token_ids =
                Vec::with_capacity(self.request.token_ids.len() + self.generated.len());
            token_ids.extend_from_slice(&self.request.token_ids);
            token_ids.extend_from_slice(&self.generated);
            let resumed = proto::GenerateRequest {
                token_ids,
                max_tokens: remaining,
                resumed_tokens: generated,
                ..self.request.clone()
            };
            let Attempt {
                lease,
                first,
                stream,
                ..
            } = dispatch(
                &self.state,
                &resumed,
                &mut self.failed,
                &mut self.moves,
                MigrationType::OngoingRequest,
            )
            .await
            .map_err(|e| {
                ApiError::upstream(format!(
                    "{why}; it could not be continued elsewhere: {}",
                    e.message
                ))
            })?;
            tracing::info!(request = %self.request.request_id, from = %why, to = %lease.worker.url, generated, "request migrated");
            self.lease = lease;
            self.stream = stream;
            self.cached_known = true;
            self.generated.extend_from_slice(&first.token_ids);
            if !first.token_ids.is_empty() || first.finish_reason != 0 {
                return Ok(GenerateResponse {
                    cached_tokens: None,
                    ..first
                });
            }
        }
    }
}

/// A worker that took a request, with its first message.
struct Attempt {
    lease: Lease,
    first: GenerateResponse,
    stream: Streaming<GenerateResponse>,
    /// `first` says the request's cached tokens for good (see [`Upstream::cached_known`]).
    cached_known: bool,
}

/// Sends `request` to a worker not in `failed` and waits for its first message. A worker that
/// cannot take it is left behind (and recorded in `failed`) and the next is tried, each try counted
/// in `moves` up to the migration limit; the client sees an error only when no worker is left, the
/// limit is reached, or a worker refused the request itself.
async fn dispatch(
    state: &AppState,
    request: &proto::GenerateRequest,
    failed: &mut Vec<WorkerId>,
    moves: &mut u32,
    kind: MigrationType,
) -> Result<Attempt, ApiError> {
    let mut counted = kind == MigrationType::NewRequest;
    // A new request in a disaggregated graph: its prompt may be prefilled by the prefill pool, once
    // (a decode worker that fails before answering gets the same parameters; what it cannot pull
    // it computes).
    let mut disagg = kind == MigrationType::NewRequest && state.pool().has_prefill();
    let mut request = std::borrow::Cow::Borrowed(request);
    // Cached tokens of a prompt the prefill pool prefilled: the prefill worker's.
    let mut prefill_cached = None;
    loop {
        let Some(mut lease) = state
            .pool()
            .pick_or_wait(&request.token_ids, failed, state.worker_wait)
            .await
        else {
            return Err(ApiError::no_worker(state.model_name()));
        };
        if !counted {
            // This attempt continues a request whose worker failed mid-stream.
            state.count_migration(kind);
            *moves += 1;
            counted = true;
        }
        if std::mem::take(&mut disagg)
            && let Some(done) = state.prefill_leg(&request, &mut lease).await
        {
            request.to_mut().kv_transfer_params = done.params;
            prefill_cached = Some(done.cached_tokens);
        }
        let mut client = lease.worker.client.clone();
        let attempt = async {
            let mut stream = client
                .generate(request.as_ref().clone())
                .await?
                .into_inner();
            match stream.message().await? {
                Some(first) => Ok((first, stream)),
                None => Err(tonic::Status::unavailable(
                    "worker closed the stream before answering",
                )),
            }
        };
        match attempt.await {
            Ok((mut first, stream)) => {
                lease.first_token();
                if let Some(report) = &first.kv_transfer {
                    state.record_transfer(report);
                }
                if prefill_cached.is_some() {
                    first.cached_tokens = prefill_cached;
                }
                return Ok(Attempt {
                    lease,
                    first,
                    stream,
                    cached_known: prefill_cached.is_some(),
                });
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
                // A worker that refused the request before starting it (draining, or its
                // connection closing as it leaves) cost it nothing: try another without
                // counting a move. Each worker is tried once, so this ends.
                code @ (Code::Unavailable | Code::Cancelled) => {
                    tracing::debug!(worker = %lease.worker.url, ?code, message = status.message(), "worker refused the request; trying another");
                    state.pool().leave(lease.worker.id, status.message());
                    failed.push(lease.worker.id);
                }
                _ => {
                    state.pool().leave(lease.worker.id, status.message());
                    failed.push(lease.worker.id);
                    if *moves >= state.migration_limit {
                        return Err(ApiError::upstream(format!(
                            "{} worker(s) failed this request and --migration-limit is {}; the last said: {}",
                            failed.len(),
                            state.migration_limit,
                            status.message()
                        )));
                    }
                    state.count_migration(kind);
                    *moves += 1;
                }
            },
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
    first_token: Option<Instant>,
    params: GenParams,
    /// Whether the outcome is already in the metrics.
    recorded: bool,
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
                self.first_token = Some(now);
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
        // Engines that learn the prefix-cache hit late (vLLM reports it with the usage, after the
        // last token) send it on a later message than the first.
        if let Some(cached) = msg.cached_tokens {
            self.cached_tokens = cached;
        }
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
        if let Some(sla) = self.state.sla {
            let ttft_ok = self
                .first_token
                .is_some_and(|t| t.duration_since(self.started) <= sla.ttft);
            // Mean gap between tokens; a request with fewer than two is judged on TTFT alone.
            let itl_ok = match (self.first_token, self.last_token) {
                (Some(first), Some(last)) if self.completion_tokens >= 2 => {
                    last.duration_since(first) / (self.completion_tokens - 1) <= sla.itl
                }
                _ => true,
            };
            m.count_sla(ok && ttft_ok, ok && itl_ok);
        }
    }

    async fn unary(
        mut self,
        first: GenerateResponse,
        mut upstream: Upstream,
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
            msg = match upstream.next().await {
                Ok(m) => m,
                Err(e) => {
                    self.finish_metrics(false);
                    return Err(e);
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
    /// goes away hyper drops the body, which drops the upstream (whichever worker it has migrated
    /// to) and so cancels the request there (freeing its engine slot); the `Drop` of [`TokenRun`]
    /// records the failure.
    fn stream(mut self, first: GenerateResponse, mut upstream: Upstream) -> Response {
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
                msg = match upstream.next().await {
                    Ok(m) => m,
                    Err(e) => break Err(e),
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
