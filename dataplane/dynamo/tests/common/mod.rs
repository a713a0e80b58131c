#![allow(dead_code)] // Each test binary uses its own subset.
//! Pieces of a local graph shared by the integration tests: real sidecars with the mocker engine on
//! ephemeral ports, and the frontend settings that point at them.

use std::time::Duration;

use dynamo_frontend::FrontendConfig;
use dynamo_kv::policy::{KvRouterConfig, RouterMode};
use dynamo_mocker::MockerConfig;
use dynamo_model::Model;
use dynamo_sidecar::{Sidecar, SidecarConfig, engine::EngineKind};

/// Starts sidecar `w{index}` on 127.0.0.1 with a mocker of 4,096 blocks running `speedup` times
/// faster than real time.
pub async fn start_sidecar(model: &Model, index: usize, speedup: f64) -> Sidecar {
    start_sidecar_with(model, index, speedup, Duration::from_secs(5)).await
}

/// [`start_sidecar`] with a drain deadline of `drain` (zero: shutdown cuts in-flight streams).
pub async fn start_sidecar_with(
    model: &Model,
    index: usize,
    speedup: f64,
    drain: Duration,
) -> Sidecar {
    let card = model.card();
    Sidecar::start(SidecarConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        worker_id: format!("w{index}"),
        model_name: card.name.clone(),
        context_length: card.context_length,
        mocker: MockerConfig {
            vocab_size: card.vocab_size,
            eos_token_ids: card.eos_token_ids.clone(),
            special_token_ids: card.special_token_ids.clone(),
            speedup,
            num_gpu_blocks: 4096,
            ..MockerConfig::default()
        },
        drain,
        engine: EngineKind::Mocker,
        vllm_events: None,
        vllm: None,
        role: dynamo_sidecar::disagg::Role::Aggregated,
        kv_store: None,
        gpus: 1,
    })
    .await
    .expect("sidecar starts")
}

/// A frontend on an ephemeral port in front of `workers` (gRPC URLs), probing them every 200 ms.
pub fn frontend_config(
    workers: Vec<String>,
    router_mode: RouterMode,
    kv: KvRouterConfig,
    max_body_bytes: usize,
) -> FrontendConfig {
    FrontendConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        workers,
        router_mode,
        kv,
        max_body_bytes,
        health_interval: Duration::from_millis(200),
        drain: Duration::from_secs(5),
        migration_limit: 3,
        worker_wait: Duration::ZERO,
        disagg: Default::default(),
        sla: None,
    }
}
