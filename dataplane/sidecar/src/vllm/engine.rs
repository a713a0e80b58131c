//! `--engine vllm`: a vLLM OpenAI server beside the sidecar (the pod's `engine` container, or a
//! process `dynamo serve` starts) as the sidecar's [`Engine`].
//!
//! - `Generate` is a streamed `POST /v1/completions` with the token-id prompt and
//!   `return_token_ids`, the stop / `max_tokens` / `ignore_eos` / sampling fields passed through.
//!   Dropping the request's receiver drops the HTTP response, which aborts it in vLLM.
//! - A monitor polls `/health` and `/metrics`: the engine is ready once `/health` answers and its
//!   KV geometry (`vllm:cache_config_info`) and model (`/v1/models`) are read; load (running,
//!   waiting, KV usage, prompt and prefix-cache counters) comes from `/metrics`.
//! - An engine that stops answering is not ready (the sidecar's `/health` and `Info` say so, and
//!   routers drop it); when it answers again it is a new incarnation: the event log gets a new
//!   instance number ([`EventLog::restart`]) and the event ingest reconnects and replays from 0.
//!
//! What vLLM reports only at the end (the prompt's prefix-cache hit, in the final usage chunk) is
//! sent just before the finish.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use dynamo_mocker::{FinishReason, LoadSnapshot, Output, Request, SubmitError};
use dynamo_protocol::log_limit::LogLimit;
use futures::StreamExt;
use serde::Deserialize;
use tokio::{
    sync::{
        mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
        watch,
    },
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::metrics::Scrape;
use crate::{
    engine::{Engine, EngineKind},
    event_log::EventLog,
};

static REQUEST_FAILED: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static BAD_CHUNK: LogLimit = LogLimit::new(10, Duration::from_secs(10));

/// Where the vLLM server is and how to watch it.
#[derive(Debug, Clone)]
pub struct VllmConfig {
    /// Base URL of its OpenAI server, e.g. `http://127.0.0.1:8001`.
    pub url: String,
    /// Served model name to ask for; default: the first model `/v1/models` lists.
    pub model: Option<String>,
    /// How often `/health` and `/metrics` are read.
    pub poll: Duration,
}

/// What the monitor learns, read by request handlers.
struct Shared {
    ready: AtomicBool,
    model: Mutex<String>,
    block_size: AtomicU32,
    blocks_total: AtomicU64,
    max_model_len: AtomicU32,
    load: Mutex<LoadSnapshot>,
    /// Incremented each time the engine becomes ready (1: first start); the event ingest
    /// reconnects and replays on each change.
    epoch: watch::Sender<u64>,
}

/// A vLLM server as the sidecar's engine.
pub struct VllmEngine {
    client: reqwest::Client,
    completions: String,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl VllmEngine {
    /// Starts watching the server at `config.url` (on `tasks`, until `stop`); the engine is ready
    /// once the server answers. `log` gets the block size and a new instance after a restart.
    pub fn start(
        config: VllmConfig,
        log: EventLog,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> anyhow::Result<VllmEngine> {
        let url = config.url.trim_end_matches('/').to_owned();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()?;
        let shared = Arc::new(Shared {
            ready: AtomicBool::new(false),
            model: Mutex::new(config.model.clone().unwrap_or_default()),
            block_size: AtomicU32::new(0),
            blocks_total: AtomicU64::new(0),
            max_model_len: AtomicU32::new(0),
            load: Mutex::new(LoadSnapshot::default()),
            epoch: watch::Sender::new(0),
        });
        tasks.spawn(monitor(
            client.clone(),
            url.clone(),
            config,
            shared.clone(),
            log,
            stop.clone(),
        ));
        Ok(VllmEngine {
            client,
            completions: format!("{url}/v1/completions"),
            shared,
            tasks: tasks.clone(),
            stop,
        })
    }

    /// Changes each time the engine (re)starts; see [`Shared::epoch`].
    pub fn epochs(&self) -> watch::Receiver<u64> {
        self.shared.epoch.subscribe()
    }
}

impl Engine for VllmEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Vllm
    }

    fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    fn context_length(&self) -> Option<u32> {
        match self.shared.max_model_len.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn submit(&self, request: Request) -> Result<UnboundedReceiver<Output>, SubmitError> {
        if !self.ready() || self.stop.is_cancelled() {
            return Err(SubmitError::Stopped);
        }
        if request.token_ids.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if request.max_tokens == 0 {
            return Err(SubmitError::ZeroMaxTokens);
        }
        let max_len = self.shared.max_model_len.load(Ordering::Relaxed) as usize;
        let needed = request.token_ids.len() + request.max_tokens as usize;
        if max_len > 0 && needed > max_len {
            return Err(SubmitError::ContextTooLong {
                needed,
                max_model_len: max_len,
            });
        }
        let model = self
            .shared
            .model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let body = completion_body(&model, &request);
        let (tx, rx) = unbounded_channel();
        let post = self.client.post(&self.completions).json(&body);
        if request.prefill_only {
            self.tasks.spawn(prefill_completion(post, tx));
        } else {
            self.tasks.spawn(stream_completion(post, tx));
        }
        Ok(rx)
    }

    fn load(&self) -> LoadSnapshot {
        *self.shared.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn block_size(&self) -> u32 {
        self.shared.block_size.load(Ordering::Relaxed)
    }

    fn kv_blocks_total(&self) -> u64 {
        self.shared.blocks_total.load(Ordering::Relaxed)
    }
}

/// The `/v1/completions` body for one request.
fn completion_body(model: &str, r: &Request) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": model,
        "prompt": r.token_ids,
        "max_tokens": r.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "return_token_ids": true,
        "ignore_eos": r.ignore_eos,
        // Ids are what the sidecar sends on; the frontend detokenizes.
        "skip_special_tokens": false,
    });
    let fields = [
        (
            "stop_token_ids",
            (!r.stop_token_ids.is_empty()).then(|| serde_json::json!(r.stop_token_ids)),
        ),
        ("seed", r.seed.map(|s| serde_json::json!(s))),
        ("temperature", r.temperature.map(|t| serde_json::json!(t))),
        ("top_p", r.top_p.map(|p| serde_json::json!(p))),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            body[name] = v;
        }
    }
    // Disaggregation through vLLM's KV connector: the prefill leg asks it to keep the prompt's
    // blocks for a remote decode (one token, not streamed: the parameters come in the response
    // body); the decode leg passes the prefill's parameters on, which makes it pull the blocks.
    if r.prefill_only {
        body["max_tokens"] = serde_json::json!(1);
        body["stream"] = serde_json::json!(false);
        body.as_object_mut().map(|o| o.remove("stream_options"));
        body["kv_transfer_params"] = serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        });
    } else if let Some(params) = r
        .kv_transfer_params
        .as_deref()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
    {
        body["kv_transfer_params"] = params;
    }
    body
}

/// The prefill leg on vLLM: one non-streamed completion whose `kv_transfer_params` the decode
/// worker's vLLM needs.
async fn prefill_completion(post: reqwest::RequestBuilder, tx: UnboundedSender<Output>) {
    #[derive(Deserialize)]
    struct Prefilled {
        #[serde(default)]
        kv_transfer_params: Option<serde_json::Value>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    let response = tokio::select! {
        () = tx.closed() => return,
        r = post.send() => r,
    };
    let body = match response {
        Ok(r) if r.status().is_success() => r.json::<Prefilled>().await,
        Ok(r) => {
            if let Some(suppressed) = REQUEST_FAILED.allow() {
                tracing::warn!(status = %r.status(), suppressed, "vLLM refused a prefill");
            }
            return;
        }
        Err(error) => Err(error),
    };
    let prefilled = match body {
        Ok(p) => p,
        Err(error) => {
            if let Some(suppressed) = REQUEST_FAILED.allow() {
                tracing::warn!(%error, suppressed, "vLLM prefill failed");
            }
            return;
        }
    };
    let Some(params) = prefilled.kv_transfer_params.filter(|p| !p.is_null()) else {
        if let Some(suppressed) = REQUEST_FAILED.allow() {
            tracing::warn!(
                suppressed,
                "vLLM answered a prefill without kv_transfer_params: is it started with --kv-transfer-config (NixlConnector)?"
            );
        }
        return;
    };
    let cached = prefilled
        .usage
        .and_then(|u| u.prompt_tokens_details)
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0);
    let _ = tx.send(Output::Scheduled {
        cached_tokens: cached,
    });
    let _ = tx.send(Output::KvTransferParams(params.to_string().into_bytes()));
    let _ = tx.send(Output::Finished(FinishReason::Length));
}

// === streaming ===

/// One SSE chunk of vLLM's streamed completion (the fields the sidecar reads).
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// What one chunk means for the request's outputs.
#[derive(Debug, PartialEq)]
enum Event {
    Tokens(Vec<u32>),
    Finish(FinishReason),
    Cached(u32),
    /// vLLM ended the request some other way (`abort`, an error): the stream is cut so the
    /// frontend moves the request.
    Failed(String),
}

/// Parses one `data:` payload into events; `None` for `[DONE]`.
fn parse_data(data: &str) -> Option<Result<Vec<Event>, serde_json::Error>> {
    if data == "[DONE]" {
        return None;
    }
    Some(serde_json::from_str::<Chunk>(data).map(|chunk| {
        let mut out = Vec::new();
        for choice in chunk.choices {
            if let Some(ids) = choice.token_ids.filter(|ids| !ids.is_empty()) {
                out.push(Event::Tokens(ids));
            }
            match choice.finish_reason.as_deref() {
                None => {}
                Some("length") => out.push(Event::Finish(FinishReason::Length)),
                Some("stop") => out.push(Event::Finish(FinishReason::Stop)),
                Some(other) => out.push(Event::Failed(format!("finish_reason {other:?}"))),
            }
        }
        if let Some(c) = chunk
            .usage
            .and_then(|u| u.prompt_tokens_details)
            .and_then(|d| d.cached_tokens)
        {
            out.push(Event::Cached(c));
        }
        out
    }))
}

/// Splits an SSE byte stream into `data:` payloads.
#[derive(Default)]
struct SseLines {
    buf: Vec<u8>,
}

impl SseLines {
    /// Appends `bytes`; returns the complete `data:` payloads they finish.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_owned());
            }
        }
        out
    }
}

/// Runs one request's HTTP stream into `tx`. A request the engine could not finish ends without
/// a finish output (the sidecar's stream then fails and the frontend moves the request).
async fn stream_completion(post: reqwest::RequestBuilder, tx: UnboundedSender<Output>) {
    let response = tokio::select! {
        () = tx.closed() => return,
        r = post.send() => r,
    };
    let response = match response {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            if let Some(suppressed) = REQUEST_FAILED.allow() {
                let body: String = body.chars().take(300).collect();
                tracing::warn!(%status, %body, suppressed, "vLLM refused a request");
            }
            return;
        }
        Err(error) => {
            if let Some(suppressed) = REQUEST_FAILED.allow() {
                tracing::warn!(%error, suppressed, "vLLM request failed");
            }
            return;
        }
    };
    let mut body = response.bytes_stream();
    let mut sse = SseLines::default();
    let mut finish = None;
    loop {
        let bytes = tokio::select! {
            () = tx.closed() => return, // the client went away: dropping the response aborts it
            b = body.next() => b,
        };
        let bytes = match bytes {
            Some(Ok(b)) => b,
            Some(Err(error)) => {
                if let Some(suppressed) = REQUEST_FAILED.allow() {
                    tracing::warn!(%error, suppressed, "vLLM response stream broke");
                }
                return;
            }
            None => break,
        };
        for data in sse.push(&bytes) {
            let events = match parse_data(&data) {
                None => continue,
                Some(Ok(events)) => events,
                Some(Err(error)) => {
                    if let Some(suppressed) = BAD_CHUNK.allow() {
                        tracing::warn!(%error, suppressed, "vLLM sent a chunk that is not a completion chunk; ending the request");
                    }
                    return;
                }
            };
            for event in events {
                let output = match event {
                    Event::Tokens(ids) => {
                        for id in ids {
                            if tx.send(Output::Token(id)).is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Event::Finish(reason) => {
                        finish = Some(reason);
                        continue;
                    }
                    Event::Cached(c) => Output::Scheduled { cached_tokens: c },
                    Event::Failed(why) => {
                        if let Some(suppressed) = REQUEST_FAILED.allow() {
                            tracing::warn!(why, suppressed, "vLLM did not finish a request");
                        }
                        return;
                    }
                };
                if tx.send(output).is_err() {
                    return;
                }
            }
        }
    }
    if let Some(reason) = finish {
        let _ = tx.send(Output::Finished(reason));
    }
}

// === monitor ===

/// `/v1/models`' entries (name and context length).
#[derive(Deserialize)]
struct Models {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    max_model_len: Option<u32>,
}

async fn monitor(
    client: reqwest::Client,
    url: String,
    config: VllmConfig,
    shared: Arc<Shared>,
    log: EventLog,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut waiting_logged = Instant::now();
    let get = |path: &str| {
        client
            .get(format!("{url}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
    };
    loop {
        let healthy = matches!(get("/health").await, Ok(r) if r.status().is_success());
        let was_ready = shared.ready.load(Ordering::Acquire);
        match (healthy, was_ready) {
            (true, false) => match learn_engine(&client, &url, &config).await {
                Ok(engine) => {
                    let epoch = *shared.epoch.borrow();
                    if epoch > 0 {
                        // The server came back: its cache (and event sequence) started over.
                        log.restart();
                    }
                    log.set_block_size(engine.block_size);
                    shared
                        .block_size
                        .store(engine.block_size, Ordering::Relaxed);
                    shared.blocks_total.store(engine.blocks, Ordering::Relaxed);
                    shared
                        .max_model_len
                        .store(engine.max_model_len, Ordering::Relaxed);
                    *shared.model.lock().unwrap_or_else(|p| p.into_inner()) = engine.model.clone();
                    shared.ready.store(true, Ordering::Release);
                    shared.epoch.send_replace(epoch + 1);
                    tracing::info!(
                        url,
                        model = engine.model,
                        block_size = engine.block_size,
                        kv_blocks = engine.blocks,
                        max_model_len = engine.max_model_len,
                        after_s = started.elapsed().as_secs(),
                        restart = epoch > 0,
                        "vLLM engine ready"
                    );
                }
                Err(why) => tracing::warn!(url, why, "vLLM answers /health but not yet the rest"),
            },
            (false, true) => {
                shared.ready.store(false, Ordering::Release);
                tracing::warn!(
                    url,
                    "vLLM engine stopped answering /health: this worker is unready; its requests move to other workers"
                );
            }
            (false, false) if waiting_logged.elapsed() >= Duration::from_secs(10) => {
                waiting_logged = Instant::now();
                tracing::info!(
                    url,
                    waited_s = started.elapsed().as_secs(),
                    "waiting for the vLLM engine to answer /health"
                );
            }
            _ => {}
        }
        if healthy
            && let Ok(r) = get("/metrics").await
            && let Ok(text) = r.text().await
        {
            let scrape = Scrape::parse(&text);
            let total = shared.blocks_total.load(Ordering::Relaxed);
            *shared.load.lock().unwrap_or_else(|p| p.into_inner()) = scrape.load(total);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.poll) => {}
        }
    }
}

/// What the sidecar needs to know about a running vLLM server.
struct EngineFacts {
    model: String,
    block_size: u32,
    blocks: u64,
    max_model_len: u32,
}

async fn learn_engine(
    client: &reqwest::Client,
    url: &str,
    config: &VllmConfig,
) -> Result<EngineFacts, String> {
    let get = |path: &str| {
        client
            .get(format!("{url}{path}"))
            .timeout(Duration::from_secs(5))
            .send()
    };
    let models: Models = get("/v1/models")
        .await
        .map_err(|e| format!("GET /v1/models: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET /v1/models: {e}"))?;
    let entry = match &config.model {
        Some(name) => models.data.iter().find(|m| &m.id == name).ok_or_else(|| {
            let served: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
            format!("the server does not serve model {name:?} (it serves {served:?}); set --model-name to one of them or vLLM's --served-model-name to {name:?}")
        })?,
        None => models.data.first().ok_or("the server lists no model")?,
    };
    let text = get("/metrics")
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    let scrape = Scrape::parse(&text);
    let (block_size, blocks) = scrape.geometry.ok_or(
        "its /metrics has no vllm:cache_config_info with block_size and num_gpu_blocks (vLLM older than 0.8?)",
    )?;
    Ok(EngineFacts {
        model: entry.id.clone(),
        block_size,
        blocks,
        max_model_len: entry.max_model_len.unwrap_or(0),
    })
}

/// A one-line summary of a request body, for logs and tests.
#[cfg(test)]
fn describe(body: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mut keys: Vec<&String> = body
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    keys.sort();
    for k in keys {
        let _ = write!(s, "{k} ");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disaggregated_legs_carry_vllm_kv_transfer_params() {
        let prefill = completion_body(
            "tiny",
            &Request {
                prefill_only: true,
                ..Request::new(vec![1, 2], 50)
            },
        );
        assert_eq!(prefill["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(
            (prefill["max_tokens"].clone(), prefill["stream"].clone()),
            (1.into(), false.into())
        );
        assert!(prefill.get("stream_options").is_none());
        let params =
            br#"{"do_remote_prefill":true,"remote_block_ids":[3,4],"remote_engine_id":"e"}"#;
        let decode = completion_body(
            "tiny",
            &Request {
                kv_transfer_params: Some(params.to_vec()),
                ..Request::new(vec![1, 2], 50)
            },
        );
        assert_eq!(
            decode["kv_transfer_params"]["remote_block_ids"],
            serde_json::json!([3, 4])
        );
        assert_eq!(decode["stream"], true);
    }

    #[test]
    fn the_request_passes_stop_length_eos_and_sampling_fields_through() {
        let r = Request {
            token_ids: vec![1, 2, 3],
            max_tokens: 7,
            ignore_eos: true,
            stop_token_ids: vec![9],
            seed: Some(5),
            resumed_tokens: 0,
            temperature: Some(0.0),
            top_p: Some(0.9),
            ..Request::default()
        };
        let body = completion_body("tiny", &r);
        assert_eq!(body["prompt"], serde_json::json!([1, 2, 3]));
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["stop_token_ids"], serde_json::json!([9]));
        assert_eq!(
            (body["seed"].clone(), body["temperature"].clone()),
            (serde_json::json!(5), serde_json::json!(0.0))
        );
        assert!((body["top_p"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-6);
        let plain = completion_body(
            "tiny",
            &Request {
                stop_token_ids: vec![],
                seed: None,
                temperature: None,
                top_p: None,
                ..r
            },
        );
        assert_eq!(
            describe(&plain),
            "ignore_eos max_tokens model prompt return_token_ids skip_special_tokens stream stream_options "
        );
    }

    #[test]
    fn chunks_become_tokens_then_the_cached_count_then_the_finish() {
        let mut sse = SseLines::default();
        let mut data = sse.push(b"data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"token_ids\":[11]}]}\n\ndata: {\"choices\":[{\"token_ids\":[12],\"fin");
        data.extend(sse.push(b"ish_reason\":\"length\"}]}\r\n\r\n: keepalive\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\ndata: [DONE]\n\n"));
        let events: Vec<Event> = data
            .iter()
            .filter_map(|d| parse_data(d))
            .flat_map(|r| r.expect("valid"))
            .collect();
        assert_eq!(
            events,
            [
                Event::Tokens(vec![11]),
                Event::Tokens(vec![12]),
                Event::Finish(FinishReason::Length),
                Event::Cached(32),
            ]
        );
    }

    #[test]
    fn an_aborted_request_is_a_failure_and_garbage_is_an_error() {
        let events = parse_data(r#"{"choices":[{"token_ids":[],"finish_reason":"abort"}]}"#)
            .expect("not done")
            .expect("valid");
        assert!(matches!(&events[..], [Event::Failed(_)]));
        assert!(parse_data("{not json").expect("not done").is_err());
        assert!(parse_data("[DONE]").is_none());
    }
}
