//! The SLA planner under `dynamo serve`: the same decisions as in the operator
//! ([`dynamo_planner::Planner`]), fed by the local frontend's `/metrics` and carried out by
//! adding and removing worker processes through the supervisor (what the control API does).
//!
//! Time runs at the mocker's speedup: the planner thinks in trace time (the manifest's targets,
//! interval and profile), so observed latencies are multiplied by the speedup ratio, rates divided
//! by it, and the interval divided by it. A compressed replay thus sees as many decisions as the
//! real one.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use dynamo_crds::DynamoGraphDeploymentSpec;
use dynamo_planner::{
    Algorithm, Bounds, Config, Decision, Demand, Path, Planner, Pool, Profile, Replicas,
    frontend::{Cadence, Counters},
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Msg, WorkerView};
use crate::manifest::LocalService;

/// What the planner of one `serve` run needs.
pub struct LocalPlanner {
    pub planner: Planner,
    /// The service of each planned pool.
    pub services: BTreeMap<Pool, String>,
    pub interval: Duration,
    pub speedup: f64,
    pub advisory: bool,
    /// The manifest names no profile: the workers' own descriptions (`Info.profile`, through
    /// the frontend's `/profiles`) replace the ones derived from their flags once they answer.
    pub ask_workers: bool,
    pub status: Arc<Mutex<serde_json::Value>>,
}

/// The pool a worker service serves: the last `--role` in its arguments.
pub fn pool_of(svc: &LocalService) -> Pool {
    let role = svc
        .args
        .iter()
        .rposition(|a| a == "--role")
        .and_then(|i| svc.args.get(i + 1));
    match role.map(String::as_str) {
        Some("prefill") => Pool::Prefill,
        Some("decode") => Pool::Decode,
        _ => Pool::Aggregated,
    }
}

/// Builds the planner for `spec`, or says why it cannot run. `workers` are the graph's worker
/// services: one aggregated service, or one prefill and one decode service.
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
    let mut services: BTreeMap<Pool, &LocalService> = BTreeMap::new();
    for svc in workers {
        if let Some(other) = services.insert(pool_of(svc), svc) {
            anyhow::bail!(
                "the planner sizes one service per pool; {} and {} are both {} workers: run the graph with --planner off",
                other.name,
                svc.name,
                pool_of(svc).as_str()
            );
        }
    }
    let pools: Vec<Pool> = services.keys().copied().collect();
    if !matches!(
        pools.as_slice(),
        [Pool::Aggregated] | [Pool::Prefill, Pool::Decode]
    ) {
        anyhow::bail!(
            "the planner sizes one aggregated worker service, or one prefill and one decode service; this graph has {}: run it with --planner off",
            services
                .values()
                .map(|s| format!("{} ({})", s.name, pool_of(s).as_str()))
                .collect::<Vec<_>>()
                .join(", ")
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
    let file_profile =
        match &p.profile {
            Some(path) => {
                let path = manifest_dir.join(path);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!("could not read the planner profile {}", path.display())
                })?;
                Some(serde_json::from_str::<Profile>(&text).with_context(|| {
                    format!("{} is not a `dynamo profile` file", path.display())
                })?)
            }
            None => None,
        };
    let profile = |svc: &LocalService| -> anyhow::Result<Profile> {
        let p = match &file_profile {
            Some(p) => p.clone(),
            None => mocker_profile(&svc.args, &svc.env)?,
        };
        Ok(p.validated()?)
    };
    let most = services
        .values()
        .map(|s| s.replicas)
        .max()
        .unwrap_or(1)
        .max(1)
        * 4;
    let b = p.replica_bounds(most);
    let pool = |b: Option<(u32, u32)>| b.map(|(min, max)| Bounds { min, max });
    let config = Config {
        algorithm,
        ttft_ms,
        itl_ms,
        min_replicas: b.min,
        max_replicas: b.max,
        prefill: pool(b.prefill),
        decode: pool(b.decode),
        gpu_budget: b.gpu_budget,
        ..Config::default()
    };
    let planner = match (
        services.get(&Pool::Aggregated),
        services.get(&Pool::Prefill),
        services.get(&Pool::Decode),
    ) {
        (Some(svc), _, _) => Planner::new(config, profile(svc)?),
        (None, Some(pf), Some(dc)) => Planner::disaggregated(config, profile(pf)?, profile(dc)?),
        _ => unreachable!("checked above"),
    };
    Ok(LocalPlanner {
        planner,
        services: services
            .into_iter()
            .map(|(p, s)| (p, s.name.clone()))
            .collect(),
        interval,
        speedup,
        advisory,
        ask_workers: file_profile.is_none(),
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
        lp.planner = lp.planner.reconfigured(config);
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
    let ceiling: Replicas = lp
        .planner
        .pools()
        .map(|p| (p, lp.planner.bounds(p).1))
        .collect();
    println!("# window_start_s req_per_s isl osl ideal_replicas");
    let (mut total, mut peak) = (0.0, 0);
    for (w, (n, isl, osl)) in sums.iter().enumerate() {
        let load = dynamo_planner::Load {
            rate: n / interval,
            isl: if *n > 0.0 { isl / n } else { 0.0 },
            osl: if *n > 0.0 { osl / n } else { 0.0 },
            hit_rate: 0.0,
        };
        // A disaggregated graph's ideal: every prompt prefilled by the prefill pool.
        let demand = if lp.planner.pools().any(|p| p == Pool::Aggregated) {
            Demand::aggregated(load)
        } else {
            Demand::split(load, dynamo_planner::Split::all_remote(load.isl))
        };
        let r = lp.planner.ideal(&demand);
        let gpus = lp.planner.gpus(&r);
        peak = peak.max(gpus);
        // The last window lasts only until the trace ends.
        let span = (end - w as f64 * interval).clamp(0.0, interval);
        total += f64::from(gpus) * span;
        println!(
            "{:.0} {:.3} {:.0} {:.0} {r}",
            w as f64 * interval,
            load.rate,
            load.isl,
            load.osl
        );
    }
    let fixed = f64::from(lp.planner.gpus(&ceiling)) * end;
    println!("ideal_gpu_seconds {total:.0}");
    println!("ideal_peak_gpus {peak}");
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
/// workers of its services through the supervisor.
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
    let sizes: Vec<String> = lp
        .services
        .iter()
        .map(|(pool, svc)| {
            let (lo, hi) = lp.planner.bounds(*pool);
            format!("{svc} within {lo}..={hi}")
        })
        .collect();
    eprintln!(
        "dynamo serve: planner ({}, {}) sizes {} replica(s) every {:?} ({:?} wall) against TTFT {} ms and ITL {} ms; profile: {}",
        lp.planner.config().algorithm.as_str(),
        if lp.advisory { "advisory" } else { "active" },
        sizes.join(", "),
        lp.interval,
        interval,
        lp.planner.config().ttft_ms,
        lp.planner.config().itl_ms,
        lp.planner.profile(Pool::Decode).source,
    );
    let mut decisions = 0u64;
    let mut deferred: Option<Replicas> = None;
    let mut timer = tokio::time::interval(cadence.tick());
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now = std::time::Instant::now();
        if lp.ask_workers
            && let Ok(r) = client.get(format!("{base}/profiles")).send().await
            && let Ok(described) = r.json::<serde_json::Value>().await
        {
            for pool in lp.planner.adopt_described(&described) {
                eprintln!(
                    "dynamo serve: planner sizes {} with the profile its workers describe: {}",
                    lp.services[&pool],
                    lp.planner.profile(pool).source
                );
            }
            lp.ask_workers = lp
                .planner
                .pools()
                .any(|p| described.get(p.as_str()).is_none());
        }
        let snap = match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.ok().as_deref().and_then(Counters::parse),
            Err(_) => None,
        };
        let Some(views) = list(&tx).await else {
            return;
        };
        let current = replicas(&lp, &views, |v| v.state != "removing");
        let Some(d) = cadence.decide(&mut lp.planner, now, snap, &current) else {
            // Growth a rebalance deferred follows as soon as the leaving workers are gone.
            if let Some(t) = deferred.clone()
                && !lp.advisory
            {
                match act(&lp, &tx, &client, &base, &current, &t, false).await {
                    None => return,
                    Some(true) => deferred = None,
                    Some(false) => {}
                }
            }
            continue;
        };
        decisions += 1;
        record(&lp, &d, decisions);
        if d.changed() || d.path == Path::Hold {
            eprintln!(
                "dynamo serve: planner: {} -> {} replica(s) ({}{}): {}",
                d.previous,
                d.replicas,
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
        deferred = None;
        if lp.advisory || !d.changed() {
            continue;
        }
        match act(&lp, &tx, &client, &base, &current, &d.replicas, true).await {
            None => return,
            Some(done) => deferred = (!done).then(|| d.replicas.clone()),
        }
    }
}

/// Takes the pools from `current` to `target`: shrinking pools first, so a rebalance never runs
/// more GPUs than the budget; a pool grows only into the room that workers still draining leave.
/// `None` when serve is shutting down; otherwise whether every pool got what it asked for.
async fn act(
    lp: &LocalPlanner,
    tx: &tokio::sync::mpsc::UnboundedSender<Msg>,
    client: &reqwest::Client,
    base: &str,
    current: &Replicas,
    target: &Replicas,
    announce: bool,
) -> Option<bool> {
    for (pool, service) in &lp.services {
        let (have, want) = (current.get(*pool), target.get(*pool));
        if want < have {
            remove(tx, client, base, service, have - want).await;
        }
    }
    let mut complete = true;
    for (pool, service) in &lp.services {
        let (have, want) = (current.get(*pool), target.get(*pool));
        if want <= have {
            continue;
        }
        let mut add = want - have;
        if let Some(budget) = lp.planner.config().gpu_budget {
            let views = list(tx).await?;
            let running = lp.planner.gpus(&replicas(lp, &views, |_| true));
            let per = lp.planner.profile(*pool).gpus.max(1);
            add = add.min(budget.saturating_sub(running) / per);
            if add < want - have {
                complete = false;
            }
            if add < want - have && announce {
                eprintln!(
                    "dynamo serve: planner: {service} grows by {add} of {} now; the rest once the workers leaving have stopped (GPU budget {budget})",
                    want - have
                );
            }
        }
        if !spawn(tx, service, add).await {
            return None;
        }
    }
    Some(complete)
}

/// Workers per planned pool among `views` that pass `keep`.
fn replicas(
    lp: &LocalPlanner,
    views: &[WorkerView],
    keep: impl Fn(&WorkerView) -> bool,
) -> Replicas {
    lp.services
        .iter()
        .map(|(pool, service)| {
            let n = views
                .iter()
                .filter(|v| &v.service == service && keep(v))
                .count() as u32;
            (*pool, n)
        })
        .collect()
}

fn record(lp: &LocalPlanner, d: &Decision, decisions: u64) {
    let mut status = lp.status.lock().unwrap_or_else(|p| p.into_inner());
    let bounds: serde_json::Map<String, serde_json::Value> = lp
        .services
        .iter()
        .map(|(pool, service)| {
            let (lo, hi) = lp.planner.bounds(*pool);
            (service.clone(), serde_json::json!({"min": lo, "max": hi}))
        })
        .collect();
    *status = serde_json::json!({
        "services": lp.services,
        "algorithm": lp.planner.config().algorithm.as_str(),
        "mode": if lp.advisory { "advisory" } else { "active" },
        "sla": {"ttftMs": lp.planner.config().ttft_ms, "itlMs": lp.planner.config().itl_ms},
        "bounds": bounds,
        "gpuBudget": lp.planner.config().gpu_budget,
        "decisions": decisions,
        "learned": lp.planner.learned(),
        "profiles": lp.services.iter().map(|(p, svc)| (svc.clone(), lp.planner.profile(*p).source.clone())).collect::<BTreeMap<_, _>>(),
        "last": d,
    });
}

async fn list(tx: &tokio::sync::mpsc::UnboundedSender<Msg>) -> Option<Vec<WorkerView>> {
    let (reply, rx) = oneshot::channel();
    tx.send(Msg::List { reply }).ok()?;
    rx.await.ok()
}

/// Adds `n` workers of `service`; false when serve is shutting down.
async fn spawn(tx: &tokio::sync::mpsc::UnboundedSender<Msg>, service: &str, n: u32) -> bool {
    for _ in 0..n {
        let (reply, rx) = oneshot::channel();
        if tx
            .send(Msg::Add {
                service: Some(service.to_owned()),
                reply,
            })
            .is_err()
        {
            return false;
        }
        if let Ok(Err(e)) = rx.await {
            eprintln!("dynamo serve: planner could not add a worker: {e}");
            return true;
        }
    }
    true
}

/// Removes the `n` workers of `service` with the fewest requests in flight (they drain first).
async fn remove(
    tx: &tokio::sync::mpsc::UnboundedSender<Msg>,
    client: &reqwest::Client,
    base: &str,
    service: &str,
    n: u32,
) {
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
    for v in running.into_iter().take(n as usize) {
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
