//! Running one process kind from its parsed flags: build the config, start, print readiness,
//! wait for a shutdown signal, drain. `main` only picks the runtime and calls these.

use std::time::Duration;

use crate::{
    cli::{FrontendArgs, SidecarArgs},
    frontend::{Frontend, FrontendConfig},
    net::shutdown_signal,
    sidecar::{Sidecar, SidecarConfig},
};

/// How long readiness reports 503 before the frontend stops accepting (lets load balancers notice).
const SETTLE: Duration = Duration::from_millis(500);

fn announce_ready(enabled: bool, addr: std::net::SocketAddr) {
    if enabled {
        println!(
            "{}",
            serde_json::json!({"ready": {"addr": addr.to_string()}})
        );
    }
}

pub async fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let config = FrontendConfig {
        listen: args.listen,
        workers: args.workers.clone(),
        router_mode: args.router_mode,
        kv: crate::kv_router::KvRouterConfig {
            overlap_weight: args.kv_overlap_weight,
            temperature: args.kv_temperature,
            busy_threshold: args.kv_busy_threshold,
            churn_weight: args.kv_churn_weight,
            queue_weight: args.kv_queue_weight,
            events: !args.no_kv_events,
            approx_ttl: args.kv_approx_ttl,
        },
        max_body_bytes: args.max_body_bytes,
        health_interval: args.health_interval,
        drain: args.process.drain_timeout,
    };
    let fe = Frontend::start(config, model.clone()).await?;
    tracing::info!(addr = %fe.addr, model = %model.card().name, workers = args.workers.len(), router = args.router_mode.as_str(), "frontend listening");
    announce_ready(args.process.ready_stdout, fe.addr);
    let why = shutdown_signal(args.process.exit_on_stdin_eof).await;
    tracing::info!(why, "frontend draining");
    let settle = if args.process.exit_on_stdin_eof {
        Duration::ZERO
    } else {
        SETTLE
    };
    fe.shutdown(settle).await;
    Ok(())
}

pub async fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let mocker = args.mocker.to_config(&model)?;
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), args.listen.port()));
    let config = SidecarConfig {
        listen: args.listen,
        worker_id: worker_id.clone(),
        model_name: model.card().name.clone(),
        context_length: model.card().context_length,
        mocker,
        drain: args.process.drain_timeout,
        vllm_events: args
            .vllm_kv_events
            .clone()
            .map(|endpoint| crate::events::vllm::ZmqSource {
                endpoint,
                replay: args.vllm_kv_events_replay.clone(),
                topic: args.vllm_kv_events_topic.clone(),
            }),
    };
    let sc = Sidecar::start(config).await?;
    tracing::info!(addr = %sc.addr, worker_id, "sidecar listening");
    announce_ready(args.process.ready_stdout, sc.addr);
    let why = shutdown_signal(args.process.exit_on_stdin_eof).await;
    tracing::info!(why, "sidecar draining");
    sc.shutdown().await;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}
