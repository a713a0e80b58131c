//! Disaggregated prefill/decode in one process, on ephemeral ports: real prefill and decode
//! sidecars (the built-in engine with real KV bytes, served over shared memory and TCP) behind a
//! real frontend, compared with an aggregated worker of the same engine.

mod common;

use std::{sync::Arc, time::Duration};

use dynamo_frontend::{DisaggConfig, DisaggPolicy, Frontend};
use dynamo_kv::policy::{KvRouterConfig, RouterMode};
use dynamo_mocker::MockerConfig;
use dynamo_model::Model;
use dynamo_sidecar::{
    Sidecar, SidecarConfig,
    disagg::{KvStoreConfig, Role, parse_geometry},
    engine::EngineKind,
};
use dynamo_transfer::SharedSecret;
use serde_json::{Value, json};

const SECRET: &[u8] = b"a graph secret for the tests";

const GEOMETRY: &str = "layers=4,kv_heads=2,head_dim=64";

/// A sidecar of `role` whose blocks are 4-layer, 2-head, head_dim-64 bf16 (128 KiB per 64 tokens).
async fn start_worker(model: &Model, name: &str, role: Role, shm: bool) -> Sidecar {
    start_shaped(model, name, role, shm, GEOMETRY).await
}

async fn start_shaped(model: &Model, name: &str, role: Role, shm: bool, geometry: &str) -> Sidecar {
    let card = model.card();
    let kv_store = (role != Role::Aggregated).then(|| KvStoreConfig {
        geometry: parse_geometry(geometry, 64).expect("geometry"),
        memory: 64 << 20,
        bind: "127.0.0.1".parse().expect("ip"),
        port: 0,
        advertise: "127.0.0.1".parse().expect("ip"),
        shm,
        secret: SharedSecret::new(SECRET).expect("secret"),
    });
    Sidecar::start(SidecarConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        worker_id: name.into(),
        model_name: card.name.clone(),
        context_length: card.context_length,
        engine: EngineKind::Mocker,
        mocker: MockerConfig {
            vocab_size: card.vocab_size,
            eos_token_ids: card.eos_token_ids.clone(),
            special_token_ids: card.special_token_ids.clone(),
            speedup: 50.0,
            num_gpu_blocks: 4096,
            ..MockerConfig::default()
        },
        drain: Duration::from_secs(2),
        vllm_events: None,
        vllm: None,
        role,
        kv_store,
        gpus: 1,
    })
    .await
    .expect("sidecar starts")
}

async fn frontend(model: &Arc<Model>, workers: &[&Sidecar], policy: DisaggPolicy) -> Frontend {
    let urls = workers
        .iter()
        .map(|w| format!("http://{}", w.addr))
        .collect();
    let mut config =
        common::frontend_config(urls, RouterMode::Kv, KvRouterConfig::default(), 1 << 20);
    config.disagg = DisaggConfig {
        policy,
        ..DisaggConfig::default()
    };
    Frontend::start(config, model.clone())
        .await
        .expect("frontend starts")
}

async fn complete(fe: &Frontend, prompt: &str, seed: u64) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", fe.addr))
        .json(&json!({"model": "tiny", "prompt": prompt, "max_tokens": 24, "seed": seed, "ignore_eos": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

/// `name{labels}` summed over the frontend's /metrics lines that start with it.
async fn metric(fe: &Frontend, prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", fe.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn prompt(i: usize, words: usize) -> String {
    (0..words)
        .map(|w| format!("p{i}w{w} alpha beta"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_output_equals_aggregated_token_for_token() {
    let model = Arc::new(Model::builtin());
    let agg = start_worker(&model, "agg", Role::Aggregated, false).await;
    let prefill = start_worker(&model, "prefill", Role::Prefill, true).await;
    let decode = start_worker(&model, "decode", Role::Decode, true).await;
    let fe_agg = frontend(&model, &[&agg], DisaggPolicy::Always).await;
    let fe = frontend(&model, &[&prefill, &decode], DisaggPolicy::Always).await;
    for i in 0..4 {
        let p = prompt(i, 300 + 200 * i);
        let a = complete(&fe_agg, &p, 7 + i as u64).await;
        let d = complete(&fe, &p, 7 + i as u64).await;
        assert_eq!(
            a["choices"][0]["text"], d["choices"][0]["text"],
            "prompt {i}"
        );
        assert_eq!(a["usage"]["prompt_tokens"], d["usage"]["prompt_tokens"]);
    }
    let bytes = metric(&fe, "dynamo_kv_transfer_bytes_total{transport=\"shm\"}").await;
    let blocks = metric(&fe, "dynamo_kv_transfer_blocks_total{transport=\"shm\"}").await;
    assert!(blocks >= 4.0, "blocks pulled over shared memory: {blocks}");
    assert_eq!(
        bytes,
        blocks * f64::from(128u32 << 10),
        "every pulled block is 128 KiB"
    );
    assert_eq!(
        metric(
            &fe,
            "dynamo_frontend_disagg_decisions_total{decision=\"remote\""
        )
        .await,
        4.0
    );
    assert_eq!(
        metric(&fe, "dynamo_frontend_prefill_fallbacks_total").await,
        0.0
    );
    for s in [fe_agg, fe] {
        s.shutdown(Duration::ZERO).await;
    }
    for w in [agg, prefill, decode] {
        w.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_decode_worker_pulls_only_the_blocks_it_lacks() {
    let model = Arc::new(Model::builtin());
    let prefill = start_worker(&model, "prefill", Role::Prefill, false).await;
    let decode = start_worker(&model, "decode", Role::Decode, false).await;
    let fe = frontend(&model, &[&prefill, &decode], DisaggPolicy::Always).await;
    let shared = prompt(0, 600);
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    let a = complete(&fe, &shared, 1).await;
    assert_eq!(cached(&a), Some(0), "a fresh prompt: {}", a["usage"]);
    let first = metric(&fe, "dynamo_kv_transfer_blocks_total{transport=\"tcp\"}").await;
    assert!(first > 10.0, "first pull: {first} blocks");
    // The same long prefix and a short new tail: only the tail's blocks move.
    let b = complete(&fe, &format!("{shared} and then some more words here"), 2).await;
    let second = metric(&fe, "dynamo_kv_transfer_blocks_total{transport=\"tcp\"}").await - first;
    assert!(second <= 1.0, "second pull moved {second} blocks");
    // Its cached tokens are the prefill worker's hit (the prefix's full blocks), which the
    // planner reads as the prefill pool's.
    let hit = cached(&b).expect("cached_tokens");
    let prompt_tokens = a["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(
        hit > 0 && hit <= prompt_tokens && prompt_tokens - hit < 64,
        "cached {hit} of the shared {prompt_tokens}"
    );
    assert_eq!(
        metric(&fe, "dynamo_frontend_disagg_prefill_cached_tokens_total").await,
        hit as f64
    );
    fe.shutdown(Duration::ZERO).await;
    for w in [prefill, decode] {
        w.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isl_bounding_keeps_follow_up_turns_local_and_a_dead_prefill_worker_costs_nothing() {
    let model = Arc::new(Model::builtin());
    let prefill = start_worker(&model, "prefill", Role::Prefill, true).await;
    let decode = start_worker(&model, "decode", Role::Decode, true).await;
    let fe = frontend(&model, &[&prefill, &decode], DisaggPolicy::IslBounding).await;
    let decisions = |decision: &'static str, reason: &'static str| {
        let fe = &fe;
        async move {
            metric(
                fe,
                &format!(
                    "dynamo_frontend_disagg_decisions_total{{decision=\"{decision}\",reason=\"{reason}\"}}"
                ),
            )
            .await
        }
    };
    // Fresh prompts, long or short, are all new to the decode worker: the prefill pool computes
    // them (Dynamo's isl_bounding keeps a prompt local only when what is new is short *and* a
    // small share of it).
    let first = prompt(1, 900);
    complete(&fe, &first, 3).await;
    complete(&fe, "a short prompt", 3).await;
    assert_eq!(decisions("remote", "new_prompt").await, 2.0);
    assert_eq!(decisions("local", "isl_bounding").await, 0.0);
    // A follow-up turn: the decode worker holds the history and computes the short tail itself.
    complete(&fe, &format!("{first} and a short follow-up question"), 3).await;
    assert_eq!(decisions("local", "isl_bounding").await, 1.0);
    assert_eq!(decisions("remote", "new_prompt").await, 2.0);
    // The prefill worker goes away: the next long prompt is prefilled by the decode worker.
    prefill.shutdown(Duration::ZERO).await;
    let out = complete(&fe, &prompt(2, 900), 4).await;
    assert_eq!(out["usage"]["completion_tokens"], 24);
    fe.shutdown(Duration::ZERO).await;
    decode.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_fails_is_prefilled_locally_with_the_same_output() {
    let model = Arc::new(Model::builtin());
    // The decode worker's blocks are shaped differently: every pull is refused.
    let prefill = start_worker(&model, "prefill", Role::Prefill, true).await;
    let decode = start_shaped(
        &model,
        "decode",
        Role::Decode,
        true,
        "layers=2,kv_heads=2,head_dim=64",
    )
    .await;
    let agg = start_worker(&model, "agg", Role::Aggregated, false).await;
    let fe = frontend(&model, &[&prefill, &decode], DisaggPolicy::Always).await;
    let fe_agg = frontend(&model, &[&agg], DisaggPolicy::Always).await;
    let p = prompt(3, 700);
    let d = complete(&fe, &p, 9).await;
    let a = complete(&fe_agg, &p, 9).await;
    assert_eq!(d["choices"][0]["text"], a["choices"][0]["text"]);
    assert_eq!(
        metric(
            &fe,
            "dynamo_frontend_prefill_fallbacks_total{reason=\"transfer_failed\"}"
        )
        .await,
        1.0
    );
    assert_eq!(metric(&fe, "dynamo_kv_transfer_blocks_total").await, 0.0);
    for f in [fe, fe_agg] {
        f.shutdown(Duration::ZERO).await;
    }
    for w in [prefill, decode, agg] {
        w.shutdown(Duration::ZERO).await;
    }
}
