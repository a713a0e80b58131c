//! Running one process kind from its parsed flags: build the config, start, print readiness,
//! wait for a shutdown signal, drain. `main` only picks the runtime and calls these.

use std::time::Duration;

use anyhow::Context as _;
use anyhow::bail;
use dynamo_frontend::{
    DisaggConfig, Frontend, FrontendConfig,
    discovery::{self, DiscoveryMode},
};
use dynamo_kv::policy::KvRouterConfig;
use dynamo_protocol::net::shutdown_signal;
use dynamo_sidecar::{
    Sidecar, SidecarConfig,
    disagg::{self, KvStoreConfig, Role},
    engine::EngineKind,
    vllm::{VllmConfig, ZmqSource},
};
use tokio_util::sync::CancellationToken;

use crate::cli::{FrontendArgs, ProcessArgs, SidecarArgs};
use dynamo_transfer::SharedSecret;

fn announce_ready(enabled: bool, addr: std::net::SocketAddr) {
    if enabled {
        println!(
            "{}",
            serde_json::json!({"ready": {"addr": addr.to_string()}})
        );
    }
}

/// How long readiness reports 503 before the process stops accepting: none when the parent
/// (`dynamo serve`) stops it, which has already stopped sending.
fn settle(process: &ProcessArgs, why: &str) -> Duration {
    if why == "stdin closed" {
        Duration::ZERO
    } else {
        process.shutdown_settle
    }
}

pub async fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    match args.discovery {
        DiscoveryMode::Static if args.workers.is_empty() => bail!(
            "no workers to route to: give --worker http://HOST:PORT (repeatable, or DYN_WORKERS), \
             or discover them with --discovery kubernetes (in a cluster) or --discovery serve (under `dynamo serve`)"
        ),
        DiscoveryMode::Kubernetes if args.graph.is_none() => bail!(
            "--discovery kubernetes needs the graph's name: set --graph NAME (or DYN_GRAPH; the operator sets it)"
        ),
        _ => {}
    }
    let config = FrontendConfig {
        listen: args.listen,
        workers: match args.discovery {
            DiscoveryMode::Static => args.workers.clone(),
            _ => Vec::new(),
        },
        router_mode: args.router_mode,
        kv: KvRouterConfig {
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
        migration_limit: args.migration_limit,
        worker_wait: args.worker_wait,
        disagg: DisaggConfig {
            policy: args.disagg_policy,
            max_local_prefill_tokens: args.max_local_prefill_tokens,
            max_local_prefill_ratio: args.max_local_prefill_ratio,
            prefill_busy_tokens: args.prefill_busy_tokens,
            decode_busy_tokens: args.decode_busy_tokens,
            max_prefill_queue_tokens: args.max_prefill_queue_tokens,
        },
        sla: match (args.sla_ttft_ms, args.sla_itl_ms) {
            (Some(t), Some(i)) => Some(dynamo_frontend::SlaTargets {
                ttft: Duration::from_secs_f64(t / 1000.0),
                itl: Duration::from_secs_f64(i / 1000.0),
            }),
            _ => None,
        },
    };
    let fe = Frontend::start(config, model.clone()).await?;
    // The discovery source runs beside the server; `serve` discovery ending (stdin closed) stops
    // the frontend, as `--exit-on-stdin-eof` does for the other modes.
    let source_ended = CancellationToken::new();
    {
        let (tasks, stop) = fe.tasks();
        let pool = fe.pool().clone();
        let ended = source_ended.clone();
        match args.discovery {
            DiscoveryMode::Static => {}
            DiscoveryMode::Serve => {
                tasks.spawn(async move {
                    if let Err(error) = discovery::run(discovery::Serve::stdin(), pool, stop).await
                    {
                        tracing::error!(error = %anyhow::Error::from(error), "worker discovery failed");
                    }
                    ended.cancel();
                });
            }
            DiscoveryMode::Kubernetes => {
                let graph = args.graph.clone().unwrap_or_default();
                let source = discovery::kube::Kubernetes::connect(&args.namespace, &graph).await?;
                tracing::info!(namespace = %args.namespace, selector = %discovery::kube::selector(&graph), "watching worker EndpointSlices");
                tasks.spawn(async move {
                    if let Err(error) = discovery::run(source, pool, stop).await {
                        tracing::error!(error = %anyhow::Error::from(error), "worker discovery failed");
                    }
                    ended.cancel();
                });
            }
        }
    }
    tracing::info!(addr = %fe.addr, model = %model.card().name, discovery = ?args.discovery, workers = fe.pool().live_count(), router = args.router_mode.as_str(), "frontend listening");
    announce_ready(args.process.ready_stdout, fe.addr);
    let watch_stdin = args.process.exit_on_stdin_eof && args.discovery != DiscoveryMode::Serve;
    let why = tokio::select! {
        why = shutdown_signal(watch_stdin) => why,
        () = source_ended.cancelled() => "stdin closed",
    };
    tracing::info!(why, "frontend draining");
    fe.shutdown(settle(&args.process, why)).await;
    Ok(())
}

pub async fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let mocker = args.mocker.to_config(&model)?;
    let mocker_block_size = mocker.block_size;
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), args.listen.port()));
    let config = SidecarConfig {
        listen: args.listen,
        worker_id: worker_id.clone(),
        model_name: model.card().name.clone(),
        context_length: model.card().context_length,
        engine: args.engine,
        mocker,
        drain: args.process.drain_timeout,
        vllm_events: args.vllm_kv_events.clone().map(|endpoint| ZmqSource {
            endpoint,
            replay: args.vllm_kv_events_replay.clone(),
            topic: args.vllm_kv_events_topic.clone(),
        }),
        vllm: (args.engine == EngineKind::Vllm).then(|| VllmConfig {
            url: args.vllm_url.clone(),
            model: args.model.model_name.clone(),
            poll: args.vllm_poll,
        }),
        role: args.role,
        kv_store: kv_store_config(&args, mocker_block_size)?,
        gpus: args.gpus,
    };
    let sc = Sidecar::start(config).await?;
    tracing::info!(addr = %sc.addr, worker_id, instance = %format!("{:016x}", sc.instance_id), engine = args.engine.as_str(), "sidecar listening");
    announce_ready(args.process.ready_stdout, sc.addr);
    let why = shutdown_signal(args.process.exit_on_stdin_eof).await;
    tracing::info!(why, "sidecar draining");
    sc.shutdown(settle(&args.process, why)).await;
    Ok(())
}

/// Prefill and decode workers on the built-in engine keep their KV blocks as bytes and serve them
/// to the graph's other workers, authenticated with the graph's secret.
fn kv_store_config(args: &SidecarArgs, block_size: usize) -> anyhow::Result<Option<KvStoreConfig>> {
    if args.role == Role::Aggregated || args.engine != EngineKind::Mocker {
        return Ok(None);
    }
    let secret = std::env::var("DYN_KV_TRANSFER_SECRET").map_err(|_| {
        anyhow::anyhow!(
            "--role {} needs the graph's KV transfer secret in DYN_KV_TRANSFER_SECRET (at least {} bytes; `dynamo serve` and the operator set it)",
            args.role.as_str(),
            SharedSecret::MIN_LEN
        )
    })?;
    let secret =
        SharedSecret::new(secret.into_bytes()).context("DYN_KV_TRANSFER_SECRET is too short")?;
    let block_tokens = u32::try_from(block_size).context("--block-size is too large")?;
    let geometry = disagg::parse_geometry(&args.kv_geometry, block_tokens)?;
    let listen_ip = args.listen.ip();
    let advertise = args
        .advertise_host
        .or_else(|| std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok()))
        .unwrap_or(if listen_ip.is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            listen_ip
        });
    Ok(Some(KvStoreConfig {
        geometry,
        memory: args.kv_memory,
        bind: listen_ip,
        port: args.kv_transfer_port,
        advertise,
        shm: args.kv_transfer_shm,
        secret,
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "worker".into())
}
