//! The SLA planner under `dynamo serve`: the same decisions as in the operator
//! ([`dynamo_planner::Planner`]), fed by the local frontend's `/metrics` and carried out by
//! adding and removing worker processes through the supervisor (what the control API does).
//!
//! Time runs at the mocker's speedup: the planner thinks in trace time (the manifest's targets,
//! interval and profile), so observed latencies are multiplied by the speedup ratio, rates divided
//! by it, and the interval divided by it. A compressed replay thus sees as many decisions as the
//! real one.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use dynamo_crds::DynamoGraphDeploymentSpec;
use dynamo_planner::{
    Algorithm, Config, Decision, Path, Planner, Profile,
    frontend::{Cadence, Counters},
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Msg, WorkerView};
use crate::manifest::LocalService;

/// What the planner of one `serve` run needs.
pub struct LocalPlanner {
    pub planner: Planner,
    pub service: String,
    pub interval: Duration,
    pub speedup: f64,
    pub advisory: bool,
    pub status: Arc<Mutex<serde_json::Value>>,
}

/// Builds the planner for `spec`, or says why it cannot run. `workers` are the graph's worker
/// services; the planner sizes the one aggregated worker service.
pub fn setup(
    spec: &DynamoGraphDeploymentSpec,
    manifest_dir: &std::path::Path,
    workers: &[LocalService],
    speedup: f64,
) -> anyhow::Result<LocalPlanner> {
    let sla = spec.sla.as_ref().context(
        "--planner on needs spec.sla (ttftMs and itlMs) in the manifest; see manifests/planner.yaml",
    )?;
    let (Some(ttft_ms), Some(itl_ms)) = (sla.ttft_ms, sla.itl_ms) else {
        anyhow::bail!("spec.sla needs both ttftMs and itlMs for the planner");
    };
    let planned: Vec<&LocalService> = workers.iter().collect();
    let [svc] = planned.as_slice() else {
        anyhow::bail!(
            "the local planner sizes one aggregated worker service; this graph has {} ({}); run it with --planner off",
            planned.len(),
            planned
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if svc.args.iter().any(|a| a == "--role") {
        anyhow::bail!(
            "the local planner does not size prefill and decode pools yet; run {} with --planner off",
            svc.name
        );
    }
    let p = spec.planner.clone().unwrap_or_default();
    let interval = match &p.interval {
        Some(s) => humantime::parse_duration(s)
            .with_context(|| format!("spec.planner.interval {s:?} is not a duration"))?,
        None => Duration::from_secs(60),
    };
    let algorithm: Algorithm = p
        .algorithm
        .as_deref()
        .unwrap_or("sla")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("spec.planner.algorithm: {e}"))?;
    let advisory = match p.mode.as_deref() {
        None | Some("active") => false,
        Some("advisory") => true,
        Some(other) => anyhow::bail!(
            "spec.planner.mode is {other:?}; use \"active\" (scale) or \"advisory\" (decide and report only)"
        ),
    };
    let profile = match &p.profile {
        Some(path) => {
            let path = manifest_dir.join(path);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("could not read the planner profile {}", path.display())
            })?;
            serde_json::from_str::<Profile>(&text)
                .with_context(|| format!("{} is not a `dynamo profile` file", path.display()))?
        }
        None => mocker_profile(&svc.args, &svc.env)?,
    }
    .validated()?;
    let to_u32 = |v: Option<i32>, default: u32| v.map_or(default, |v| v.max(0) as u32);
    let config = Config {
        algorithm,
        ttft_ms,
        itl_ms,
        min_replicas: to_u32(p.min_replicas, 1),
        max_replicas: to_u32(p.max_replicas, svc.replicas.max(1) * 4),
        gpu_budget: p.gpu_budget.map(|b| b.max(0) as u32),
        ..Config::default()
    };
    Ok(LocalPlanner {
        planner: Planner::new(config, profile),
        service: svc.name.clone(),
        interval,
        speedup,
        advisory,
        status: Arc::new(Mutex::new(serde_json::json!({"decisions": 0}))),
    })
}

/// `dynamo ideal`: prints, per interval of the trace, its load and the fewest replicas the
/// manifest's profile says meet its SLA, then the total GPU-seconds against a fleet fixed at the
/// planner's ceiling.
pub fn ideal(args: &crate::cli::IdealArgs) -> anyhow::Result<()> {
    let path = args.manifest.display().to_string();
    let manifest = crate::manifest::Manifest::load(&args.manifest)?;
    let graph = manifest.local_graph(&path)?;
    let dir = args
        .manifest
        .parent()
        .unwrap_or_else(|| std::path::Path::new("."));
    let mut lp = setup(&manifest.spec, dir, &graph.workers, 1.0)?;
    if args.headroom_ttft.is_some() || args.headroom_itl.is_some() {
        let mut config = *lp.planner.config();
        config.headroom_ttft = args.headroom_ttft.unwrap_or(config.headroom_ttft);
        config.headroom_itl = args.headroom_itl.unwrap_or(config.headroom_itl);
        lp.planner = Planner::new(config, lp.planner.profile().clone());
    }
    let interval = args.interval.unwrap_or(lp.interval).as_secs_f64().max(1e-3);
    let lines = dynamo_bench::workload::read_trace(&args.trace, None, 64)?;
    let end = lines.iter().map(|l| l.timestamp).max().unwrap_or(0) as f64 / 1000.0;
    let windows = (end / interval).floor() as usize + 1;
    let mut sums = vec![(0.0f64, 0.0f64, 0.0f64); windows];
    for l in &lines {
        let w = ((l.timestamp as f64 / 1000.0 / interval) as usize).min(windows - 1);
        sums[w].0 += 1.0;
        sums[w].1 += f64::from(l.input_length);
        sums[w].2 += f64::from(l.output_length);
    }
    let gpus = f64::from(lp.planner.profile().gpus);
    let (_, ceiling) = lp.planner.bounds();
    println!("# window_start_s req_per_s isl osl ideal_replicas");
    let (mut total, mut peak) = (0.0, 0);
    for (w, (n, isl, osl)) in sums.iter().enumerate() {
        let load = dynamo_planner::Load {
            rate: n / interval,
            isl: if *n > 0.0 { isl / n } else { 0.0 },
            osl: if *n > 0.0 { osl / n } else { 0.0 },
            hit_rate: 0.0,
        };
        let r = lp.planner.ideal(&load);
        peak = peak.max(r);
        // The last window lasts only until the trace ends.
        let span = (end - w as f64 * interval).clamp(0.0, interval);
        total += f64::from(r) * gpus * span;
        println!(
            "{:.0} {:.3} {:.0} {:.0} {r}",
            w as f64 * interval,
            load.rate,
            load.isl,
            load.osl
        );
    }
    let fixed = f64::from(ceiling) * gpus * end;
    println!("ideal_gpu_seconds {total:.0}");
    println!("ideal_peak_replicas {peak}");
    println!("fixed_at_max_gpu_seconds {fixed:.0}");
    println!("ideal_over_fixed_at_max {:.3}", total / fixed.max(1e-9));
    Ok(())
}

/// The built-in engine's own profile, from the flags and environment its sidecar gets.
pub fn mocker_profile(args: &[String], env: &[(String, String)]) -> anyhow::Result<Profile> {
    dynamo_planner::builtin::EngineShape::from_flags(args, env)
        .map(|s| s.profile())
        .map_err(|e| anyhow::anyhow!("could not describe the worker's engine: {e}"))
}

/// The speedup ratio a worker service's own flags and environment give its engine.
pub fn worker_speedup(svc: &LocalService) -> f64 {
    dynamo_planner::builtin::EngineShape::from_flags(&svc.args, &svc.env).map_or(1.0, |s| s.speedup)
}

/// Runs the planner until `stop`: reads the frontend every tick, decides, and adds or removes
/// workers of its service through the supervisor.
pub(super) async fn run(
    mut lp: LocalPlanner,
    frontend: std::net::SocketAddr,
    tx: tokio::sync::mpsc::UnboundedSender<Msg>,
    stop: CancellationToken,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let base = format!("http://127.0.0.1:{}", frontend.port());
    let mut cadence = Cadence::new(lp.interval, lp.speedup, std::time::Instant::now());
    let interval = lp.interval.div_f64(lp.speedup.max(1e-9));
    let (lo, hi) = lp.planner.bounds();
    eprintln!(
        "dynamo serve: planner ({}, {}) sizes {} within {lo}..={hi} replica(s) every {:?} ({:?} wall) against TTFT {} ms and ITL {} ms; profile: {}",
        lp.planner.config().algorithm.as_str(),
        if lp.advisory { "advisory" } else { "active" },
        lp.service,
        lp.interval,
        interval,
        lp.planner.config().ttft_ms,
        lp.planner.config().itl_ms,
        lp.planner.profile().source,
    );
    let mut decisions = 0u64;
    let mut timer = tokio::time::interval(cadence.tick());
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now = std::time::Instant::now();
        let snap = match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.ok().as_deref().and_then(Counters::parse),
            Err(_) => None,
        };
        let Some(current) = current_replicas(&tx, &lp.service).await else {
            return;
        };
        let Some(d) = cadence.decide(&mut lp.planner, now, snap, current) else {
            continue;
        };
        decisions += 1;
        record(&lp, &d, decisions);
        if d.changed() || d.path == Path::Hold {
            eprintln!(
                "dynamo serve: planner: {} -> {} replica(s) of {} ({}{}): {}",
                d.previous,
                d.replicas,
                lp.service,
                match d.path {
                    Path::Predictive => "interval",
                    Path::Reactive => "reactive",
                    Path::Hold => "hold",
                },
                if lp.advisory {
                    ", advisory: not acting"
                } else {
                    ""
                },
                d.reason
            );
        }
        if !lp.advisory && d.changed() {
            scale(&tx, &client, &base, &lp.service, current, d.replicas).await;
        }
    }
}

fn record(lp: &LocalPlanner, d: &Decision, decisions: u64) {
    let mut status = lp.status.lock().unwrap_or_else(|p| p.into_inner());
    let (lo, hi) = lp.planner.bounds();
    *status = serde_json::json!({
        "service": lp.service,
        "algorithm": lp.planner.config().algorithm.as_str(),
        "mode": if lp.advisory { "advisory" } else { "active" },
        "sla": {"ttftMs": lp.planner.config().ttft_ms, "itlMs": lp.planner.config().itl_ms},
        "bounds": {"min": lo, "max": hi},
        "decisions": decisions,
        "last": d,
    });
}

async fn list(tx: &tokio::sync::mpsc::UnboundedSender<Msg>) -> Option<Vec<WorkerView>> {
    let (reply, rx) = oneshot::channel();
    tx.send(Msg::List { reply }).ok()?;
    rx.await.ok()
}

/// Workers of `service` that are running or restarting (not those being removed).
async fn current_replicas(
    tx: &tokio::sync::mpsc::UnboundedSender<Msg>,
    service: &str,
) -> Option<u32> {
    let views = list(tx).await?;
    Some(
        views
            .iter()
            .filter(|v| v.service == service && v.state != "removing")
            .count() as u32,
    )
}

/// Adds workers, or removes those with the fewest requests in flight (they drain first).
async fn scale(
    tx: &tokio::sync::mpsc::UnboundedSender<Msg>,
    client: &reqwest::Client,
    base: &str,
    service: &str,
    current: u32,
    want: u32,
) {
    if want > current {
        for _ in current..want {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(Msg::Add {
                    service: Some(service.to_owned()),
                    reply,
                })
                .is_err()
            {
                return;
            }
            if let Ok(Err(e)) = rx.await {
                eprintln!("dynamo serve: planner could not add a worker: {e}");
                return;
            }
        }
        return;
    }
    let Some(views) = list(tx).await else { return };
    let inflight: std::collections::HashMap<String, u64> = async {
        let health: serde_json::Value = client
            .get(format!("{base}/health"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(
            health["workers"]
                .as_array()?
                .iter()
                .filter_map(|w| Some((w["url"].as_str()?.to_owned(), w["inflight"].as_u64()?)))
                .collect(),
        )
    }
    .await
    .unwrap_or_default();
    let mut running: Vec<&WorkerView> = views
        .iter()
        .filter(|v| v.service == service && v.state != "removing")
        .collect();
    running.sort_by_key(|v| {
        v.url
            .as_ref()
            .and_then(|u| inflight.get(u))
            .copied()
            .unwrap_or(0)
    });
    for v in running.into_iter().take((current - want) as usize) {
        let (reply, rx) = oneshot::channel();
        if tx
            .send(Msg::Remove {
                name: v.name.clone(),
                reply,
            })
            .is_err()
        {
            return;
        }
        let _ = rx.await;
    }
}
