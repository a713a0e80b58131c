//! The whole local graph in one process, on ephemeral ports: real sidecars (gRPC, mocker engine)
//! behind a real frontend, driven over real HTTP. Each test states the behaviour it checks.

mod common;

use std::{sync::Arc, time::Duration};

use dynamo_frontend::Frontend;
use dynamo_kv::policy::{KvRouterConfig, RouterMode};
use dynamo_model::Model;
use dynamo_protocol::proto::{LoadRequest, worker_client::WorkerClient};
use dynamo_sidecar::Sidecar;
use serde_json::{Value, json};

struct Graph {
    base: String,
    frontend: Option<Frontend>,
    workers: Vec<Option<Sidecar>>,
    worker_urls: Vec<String>,
    model: Arc<Model>,
}

impl Graph {
    async fn start(n: usize, speedup: f64) -> Graph {
        Graph::start_with(n, speedup, 1 << 20, RouterMode::RoundRobin).await
    }

    async fn start_with(n: usize, speedup: f64, max_body_bytes: usize, mode: RouterMode) -> Graph {
        Graph::start_full(n, speedup, max_body_bytes, mode, KvRouterConfig::default()).await
    }

    async fn start_full(
        n: usize,
        speedup: f64,
        max_body_bytes: usize,
        mode: RouterMode,
        kv: KvRouterConfig,
    ) -> Graph {
        let model = Arc::new(Model::builtin());
        let mut workers = Vec::new();
        let mut worker_urls = Vec::new();
        for i in 0..n {
            let sc = common::start_sidecar(&model, i, speedup).await;
            worker_urls.push(format!("http://{}", sc.addr));
            workers.push(Some(sc));
        }
        // With no worker, a URL nothing listens on: the frontend starts and answers 503.
        let urls = if worker_urls.is_empty() {
            vec!["http://127.0.0.1:1".into()]
        } else {
            worker_urls.clone()
        };
        let frontend = Frontend::start(
            common::frontend_config(urls, mode, kv, max_body_bytes),
            model.clone(),
        )
        .await
        .expect("frontend starts");
        Graph {
            base: format!("http://{}", frontend.addr),
            frontend: Some(frontend),
            workers,
            worker_urls,
            model,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get_text(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(self.url(path)).await.expect("request sent");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("json error body"))
    }

    async fn stop(mut self) {
        if let Some(f) = self.frontend.take() {
            f.shutdown(Duration::ZERO).await;
        }
        for w in self.workers.iter_mut().filter_map(Option::take) {
            w.shutdown(Duration::ZERO).await;
        }
    }
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": true})
}

/// Parses an SSE body into its `data:` payloads.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body ends with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .expect("every event is a data line")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn chat_completion_returns_exactly_max_tokens_with_usage() {
    let g = Graph::start(2, 1000.0).await;
    let (status, body) = g
        .post("/v1/chat/completions", chat("Hello there", 12))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 12);
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let expected = g
        .model
        .encode(
            "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .expect("encodes")
        .len() as u64;
    assert_eq!(
        prompt, expected,
        "prompt tokens are the rendered ChatML template's"
    );
    assert_eq!(body["usage"]["total_tokens"], prompt + 12);
    assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    g.stop().await;
}

#[tokio::test]
async fn streamed_chat_is_framed_like_openai_with_usage_and_done() {
    let g = Graph::start(1, 1000.0).await;
    let mut req = chat("Stream please", 9);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = reqwest::Client::new()
        .post(g.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_events(&r.text().await.expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: std::collections::HashSet<_> = chunks.iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 9);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
    g.stop().await;
}

#[tokio::test]
async fn completions_stream_and_unary_agree_for_the_same_seed() {
    let g = Graph::start(1, 1000.0).await;
    let req = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": true, "seed": 42});
    let (status, unary) = g.post("/v1/completions", req.clone()).await;
    assert_eq!(status, 200, "{unary}");
    assert_eq!(unary["object"], "text_completion");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let body = reqwest::Client::new()
        .post(g.url("/v1/completions"))
        .json(&sreq)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let events = sse_events(&body);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("json"))
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, unary["choices"][0]["text"].as_str().unwrap_or(""));
    g.stop().await;
}

#[tokio::test]
async fn stop_string_truncates_output_and_reports_stop() {
    let g = Graph::start(1, 1000.0).await;
    let req =
        json!({"model": "tiny", "prompt": "abc", "max_tokens": 40, "ignore_eos": true, "seed": 7});
    let (_, full) = g.post("/v1/completions", req.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap_or("").to_owned();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "need some output to cut: {text:?}");
    let stop: String = chars[8..11].iter().collect();
    let expected = &text[..text.find(&stop).unwrap_or(0)];
    let mut sreq = req;
    sreq["stop"] = json!([stop]);
    let (status, cut) = g.post("/v1/completions", sreq).await;
    assert_eq!(status, 200);
    assert_eq!(cut["choices"][0]["text"], expected);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    g.stop().await;
}

#[tokio::test]
async fn repeated_prompt_reports_cached_tokens_from_the_prefix_cache() {
    let g = Graph::start(1, 1000.0).await;
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let (_, first) = g.post("/v1/chat/completions", chat(&long, 2)).await;
    let (_, second) = g.post("/v1/chat/completions", chat(&long, 2)).await;
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(prompt > 256, "long prompt: {prompt}");
    assert_eq!(
        cached,
        (prompt - 1) / 64 * 64,
        "all full blocks but the last token are reused"
    );
    g.stop().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let g = Graph::start_with(1, 1000.0, 4096, RouterMode::RoundRobin).await;
    let (s, b) = g.post_raw("/v1/chat/completions", "{not json").await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{b}"
    );
    assert_eq!(b["error"]["type"], "invalid_request_error");

    let (s, b) = g
        .post_raw(
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":"lots"}"#,
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_tokens"),
        "{b}"
    );

    let (s, b) = g
        .post_raw("/v1/chat/completions", r#"{"model":"tiny"}"#)
        .await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("messages"),
        "{b}"
    );

    let mut req = chat("x", 4);
    req["n"] = json!(3);
    let (s, b) = g.post("/v1/chat/completions", req).await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("n")), "{b}");

    let mut req = chat("x", 4);
    req["model"] = json!("gpt-4");
    let (s, b) = g.post("/v1/chat/completions", req).await;
    assert_eq!(s, 404);
    assert_eq!(b["error"]["code"], "model_not_found");

    let (s, b) = g
        .post(
            "/v1/completions",
            json!({"model":"tiny","prompt":"hi","max_tokens":200000}),
        )
        .await;
    assert_eq!(s, 400);
    let msg = b["error"]["message"].as_str().unwrap_or("");
    let ctx = g.model.card().context_length.to_string();
    assert!(
        msg.contains(&ctx) && msg.contains("200000"),
        "both numbers named: {msg}"
    );
    assert_eq!(b["error"]["code"], "context_length_exceeded");

    let big = "y".repeat(10_000);
    let (s, b) = g.post("/v1/chat/completions", chat(&big, 4)).await;
    assert_eq!(s, 413, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("4096")
    );

    let r = reqwest::get(g.url("/v1/nothing")).await.expect("sent");
    assert_eq!(r.status(), 404);
    g.stop().await;
}

#[tokio::test]
async fn no_live_worker_answers_503() {
    let g = Graph::start(0, 1000.0).await;
    let (s, b) = g.post("/v1/chat/completions", chat("x", 4)).await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["error"]["code"], "no_live_worker");
    let r = reqwest::get(g.url("/health")).await.expect("sent");
    assert_eq!(r.status(), 503);
    g.stop().await;
}

#[tokio::test]
async fn a_dead_worker_is_routed_around() {
    let mut g = Graph::start(2, 1000.0).await;
    let dead = g.workers[0].take().expect("worker 0");
    dead.shutdown(Duration::ZERO).await;
    for _ in 0..6 {
        let (s, b) = g
            .post("/v1/chat/completions", chat("still there?", 3))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    g.stop().await;
}

#[tokio::test]
async fn round_robin_spreads_requests_over_every_worker() {
    let g = Graph::start(2, 1000.0).await;
    for _ in 0..4 {
        let (s, _) = g.post("/v1/chat/completions", chat("spread", 2)).await;
        assert_eq!(s, 200);
    }
    for url in &g.worker_urls {
        let mut c = WorkerClient::connect(url.clone()).await.expect("connect");
        let load = c.load(LoadRequest {}).await.expect("load").into_inner();
        assert!(load.prompt_tokens_total > 0, "worker {url} got no request");
    }
    g.stop().await;
}

#[tokio::test]
async fn dropping_a_stream_frees_the_engine_slot() {
    // speedup 1: a 2,000-token answer takes seconds, so it is surely still running when dropped.
    let g = Graph::start(1, 1.0).await;
    let mut req = chat("a long answer please", 2000);
    req["stream"] = json!(true);
    let mut r = reqwest::Client::new()
        .post(g.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.expect("read").expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    let mut c = WorkerClient::connect(g.worker_urls[0].clone())
        .await
        .expect("connect");
    assert_eq!(
        c.load(LoadRequest {})
            .await
            .expect("load")
            .into_inner()
            .running,
        1
    );
    drop(r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let load = c.load(LoadRequest {}).await.expect("load").into_inner();
        if load.running == 0 && load.kv_blocks_used == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot still held: {load:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.stop().await;
}

#[tokio::test]
async fn models_health_metrics_and_openapi_are_served() {
    let g = Graph::start(1, 1000.0).await;
    let models: Value = reqwest::get(g.url("/v1/models"))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "tiny");
    let health = reqwest::get(g.url("/health")).await.expect("sent");
    assert_eq!(health.status(), 200);
    let h: Value = health.json().await.expect("json");
    assert_eq!(h["live_workers"], 1);
    assert_eq!(
        reqwest::get(g.url("/live")).await.expect("sent").status(),
        200
    );
    let (s, _) = g.post("/v1/chat/completions", chat("count me", 5)).await;
    assert_eq!(s, 200);
    let metrics = reqwest::get(g.url("/metrics"))
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    for line in [
        "dynamo_frontend_requests_total{model=\"tiny\",endpoint=\"chat_completions\",request_type=\"unary\",status=\"success\"} 1",
        "dynamo_frontend_output_sequence_tokens_sum{model=\"tiny\"} 5",
        "dynamo_frontend_time_to_first_token_seconds_count{model=\"tiny\"} 1",
        "dynamo_frontend_inflight_requests{model=\"tiny\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let spec: Value = reqwest::get(g.url("/openapi.json"))
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} documented");
    }
    let worker_metrics = reqwest::get(format!("{}/metrics", g.worker_urls[0]))
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(
        worker_metrics.contains("dynamo_component_kvstats_total_blocks"),
        "{worker_metrics}"
    );
    g.stop().await;
}

#[tokio::test]
async fn kv_mode_sends_a_repeated_prefix_back_to_the_worker_that_cached_it() {
    let g = Graph::start_with(4, 1000.0, 1 << 20, RouterMode::Kv).await;
    let shared =
        "A long shared system prompt that every turn of this conversation repeats. ".repeat(40);
    let (s, first) = g.post("/v1/chat/completions", chat(&shared, 2)).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Wait until the worker's Stored events reach the router's index.
    let kv = g
        .frontend
        .as_ref()
        .and_then(|f| f.state.pool().kv().cloned())
        .expect("kv router");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while kv.indexer().stats().blocks == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no KV events reached the router"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Round-robin would spread these over 4 workers (3 of 4 cold); kv sends each to the cache.
    turns_hit_the_cache(&g, &shared, 0..4).await;
    // An idle fleet never pulls a request away from its cache: the chosen worker held as much of
    // each prompt as the best-matching one.
    let (_, metrics) = g.get_text("/metrics").await;
    let value = |name: &str| -> f64 {
        let prefix = format!("{name}{{model=\"tiny\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let chosen = value("dynamo_router_overlap_blocks_total");
    assert!(chosen > 0.0, "{metrics}");
    assert_eq!(chosen, value("dynamo_router_best_overlap_blocks_total"));
    g.stop().await;
}

/// Sends `shared` plus a per-turn suffix for each turn; each must be served mostly from the cache.
async fn turns_hit_the_cache(g: &Graph, shared: &str, turns: std::ops::Range<u32>) {
    for turn in turns {
        let (s, r) = g
            .post(
                "/v1/chat/completions",
                chat(&format!("{shared} turn {turn}"), 2),
            )
            .await;
        assert_eq!(s, 200, "{r}");
        let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(cached >= 256, "turn {turn} missed the cache: {r}");
    }
}

#[tokio::test]
async fn kv_mode_without_events_learns_from_its_own_decisions() {
    let kv = KvRouterConfig {
        events: false,
        ..KvRouterConfig::default()
    };
    let g = Graph::start_full(4, 1000.0, 1 << 20, RouterMode::Kv, kv).await;
    let shared = "An approximate router only knows where it sent things before. ".repeat(40);
    // No waiting for events: the router booked the first turn's blocks on its worker.
    let (s, r) = g.post("/v1/chat/completions", chat(&shared, 2)).await;
    assert_eq!(s, 200, "{r}");
    turns_hit_the_cache(&g, &shared, 1..4).await;
    let (_, metrics) = g.get_text("/metrics").await;
    assert!(
        metrics.contains("dynamo_router_decisions_total{model=\"tiny\"} 4"),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    g.stop().await;
}

#[tokio::test]
async fn a_router_that_starts_late_gets_a_snapshot_of_every_worker_cache() {
    let g = Graph::start_with(2, 1000.0, 1 << 20, RouterMode::Kv).await;
    let prompt = "Blocks cached before this router existed. ".repeat(40);
    let (s, r) = g.post("/v1/chat/completions", chat(&prompt, 2)).await;
    assert_eq!(s, 200, "{r}");
    let first = g
        .frontend
        .as_ref()
        .and_then(|f| f.state.pool().kv().cloned())
        .expect("kv router");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while first.indexer().stats().blocks == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no KV events");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected = first.indexer().stats().worker_block_refs;
    // A second frontend on the same workers: no request goes through it, yet it learns the blocks.
    let late = Frontend::start(
        common::frontend_config(
            g.worker_urls.clone(),
            RouterMode::Kv,
            KvRouterConfig::default(),
            1 << 20,
        ),
        g.model.clone(),
    )
    .await
    .expect("frontend starts");
    let kv = late.state.pool().kv().cloned().expect("kv router");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while kv.indexer().stats().worker_block_refs < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "snapshot never arrived: {:?}",
            kv.indexer().stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kv.indexer().stats().worker_block_refs, expected);
    late.shutdown(Duration::ZERO).await;
    g.stop().await;
}

#[tokio::test]
async fn the_pool_follows_its_candidates_while_requests_route() {
    let g = Graph::start(2, 1000.0).await;
    let fe = g.frontend.as_ref().expect("frontend");
    let pool = fe.pool().clone();
    let load = |url: String| async move {
        let mut c = WorkerClient::connect(url).await.expect("connect");
        c.load(LoadRequest {})
            .await
            .expect("load")
            .into_inner()
            .prompt_tokens_total
    };
    let traffic = async {
        let mut ok = 0;
        for i in 0..60 {
            let (s, b) = g
                .post("/v1/chat/completions", chat(&format!("turn {i}"), 2))
                .await;
            assert_eq!(s, 200, "{b}");
            ok += 1;
        }
        ok
    };
    let churn = async {
        for _ in 0..3 {
            pool.set_candidates(&[g.worker_urls[0].clone()].into_iter().collect())
                .await;
            assert_eq!(pool.live_count(), 1);
            let before = load(g.worker_urls[1].clone()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                load(g.worker_urls[1].clone()).await,
                before,
                "a withdrawn worker gets no requests"
            );
            pool.set_candidates(&g.worker_urls.iter().cloned().collect())
                .await;
            assert_eq!(pool.live_count(), 2);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (ok, ()) = tokio::join!(traffic, churn);
    assert_eq!(ok, 60);
    g.stop().await;
}

#[tokio::test]
async fn a_stream_cut_by_its_worker_continues_on_another_with_the_same_tokens() {
    let model = Arc::new(Model::builtin());
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(Some(
            common::start_sidecar_with(&model, i, 2.0, Duration::ZERO).await,
        ));
    }
    let urls: Vec<String> = workers
        .iter()
        .flatten()
        .map(|w| format!("http://{}", w.addr))
        .collect();
    let frontend = Frontend::start(
        common::frontend_config(
            urls.clone(),
            RouterMode::RoundRobin,
            KvRouterConfig::default(),
            1 << 20,
        ),
        model.clone(),
    )
    .await
    .expect("frontend starts");
    let g = Graph {
        base: format!("http://{}", frontend.addr),
        frontend: Some(frontend),
        workers,
        worker_urls: urls,
        model,
    };
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 200, "ignore_eos": true, "seed": 11, "stream": true,
        "stream_options": {"include_usage": true}});
    let collect = |text: String| {
        let mut out = String::new();
        let mut usage = Value::Null;
        for e in sse_events(&text) {
            if e == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(&e).expect("json chunk");
            assert!(v.get("error").is_none(), "{v}");
            out.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        (out, usage)
    };
    let send = || {
        reqwest::Client::new()
            .post(g.url("/v1/chat/completions"))
            .json(&body)
            .send()
    };
    let (undisturbed, usage) = collect(send().await.expect("sent").text().await.expect("body"));
    assert_eq!(usage["completion_tokens"], 200);
    // Again, and cut the worker serving it once it is under way.
    let response = send().await.expect("sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut busy = None;
    for (i, url) in g.worker_urls.iter().enumerate() {
        let mut c = WorkerClient::connect(url.clone()).await.expect("connect");
        if c.load(LoadRequest {})
            .await
            .expect("load")
            .into_inner()
            .running
            > 0
        {
            busy = Some(i);
        }
    }
    let busy = busy.expect("one worker is generating");
    let mut g = g;
    let cut = g.workers[busy].take().expect("worker");
    cut.shutdown(Duration::ZERO).await;
    let (migrated, usage) = collect(response.text().await.expect("body"));
    assert_eq!(
        migrated, undisturbed,
        "the migrated stream is the undisturbed one"
    );
    assert_eq!(usage["completion_tokens"], 200);
    let (_, metrics) = g.get_text("/metrics").await;
    assert!(
        metrics.contains("migration_type=\"ongoing_request\"} 1"),
        "{metrics}"
    );
    g.stop().await;
}

#[tokio::test]
async fn two_frontends_over_the_same_workers_each_route_with_their_own_load() {
    let g = Graph::start_with(2, 1000.0, 1 << 20, RouterMode::LeastLoaded).await;
    let second = Frontend::start(
        common::frontend_config(
            g.worker_urls.clone(),
            RouterMode::LeastLoaded,
            KvRouterConfig::default(),
            1 << 20,
        ),
        g.model.clone(),
    )
    .await
    .expect("second frontend starts");
    let second_base = format!("http://{}", second.addr);
    let client = reqwest::Client::new();
    let requests = (0..16).map(|i| {
        let url = if i % 2 == 0 {
            g.url("/v1/chat/completions")
        } else {
            format!("{second_base}/v1/chat/completions")
        };
        let client = client.clone();
        async move {
            let r = client
                .post(url)
                .json(&chat(&format!("hello {i}"), 8))
                .send()
                .await
                .expect("sent");
            r.status().as_u16()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    for base in [g.base.clone(), second_base] {
        let h: Value = reqwest::get(format!("{base}/health"))
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
        assert_eq!(h["live_workers"], 2, "{h}");
        // Every request has finished: each frontend's own in-flight count is back to zero.
        for w in h["workers"].as_array().expect("workers") {
            assert_eq!(w["inflight"], 0, "{h}");
        }
    }
    second.shutdown(Duration::ZERO).await;
    g.stop().await;
}

/// A frontend with no worker yet, whose requests wait `worker_wait` for one to join.
async fn frontend_without_workers(model: &Arc<Model>, worker_wait: Duration) -> Frontend {
    let mut config = common::frontend_config(
        Vec::new(),
        RouterMode::RoundRobin,
        KvRouterConfig::default(),
        1 << 20,
    );
    config.worker_wait = worker_wait;
    Frontend::start(config, model.clone())
        .await
        .expect("frontend starts")
}

#[tokio::test]
async fn a_request_waits_for_a_worker_to_join_when_none_is_left() {
    let model = Arc::new(Model::builtin());
    let fe = frontend_without_workers(&model, Duration::from_secs(10)).await;
    let base = format!("http://{}", fe.addr);
    let pool = fe.pool().clone();
    let request = async {
        let t0 = std::time::Instant::now();
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat("waiting for a worker", 4))
            .send()
            .await
            .expect("sent");
        (r.status().as_u16(), t0.elapsed())
    };
    let join_later = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sc = common::start_sidecar(&model, 0, 1000.0).await;
        pool.set_candidates(&[format!("http://{}", sc.addr)].into_iter().collect())
            .await;
        sc
    };
    let ((status, waited), sc) = tokio::join!(request, join_later);
    assert_eq!(
        status, 200,
        "the request is served by the worker that joined"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    sc.shutdown(Duration::ZERO).await;
    fe.shutdown(Duration::ZERO).await;

    // No worker joins within the wait: 503 once it is over, not before.
    let fe = frontend_without_workers(&model, Duration::from_millis(400)).await;
    let t0 = std::time::Instant::now();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", fe.addr))
        .json(&chat("nobody home", 4))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 503);
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    fe.shutdown(Duration::ZERO).await;
}
