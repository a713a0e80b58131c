//! The SLA planner under `dynamo serve`: the same decisions as in the operator
//! ([`dynamo_planner::Planner`]), fed by the local frontend's `/metrics` and carried out by
//! adding and removing worker processes through the supervisor (what the control API does).
//!
//! Time runs at the mocker's speedup: the planner thinks in trace time (the manifest's targets,
//! interval and profile), so observed latencies are multiplied by the speedup ratio, rates divided
//! by it, and the interval divided by it. A compressed replay thus sees as many decisions as the
//! real one.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use dynamo_crds::DynamoGraphDeploymentSpec;
use dynamo_mocker::TimingModel;
use dynamo_planner::{
    Algorithm, Config, Decision, DecodePoint, Observation, Path, Planner, PrefillPoint, Profile,
};
use tokio::{sync::oneshot, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Msg, WorkerView};
use crate::manifest::LocalService;

/// How often the fast (reactive) check runs, in trace time.
const TICK: Duration = Duration::from_secs(5);
/// The window the fast check looks back over, in trace time.
const SHORT_WINDOW: Duration = Duration::from_secs(15);

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
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("could not read the planner profile {}", path.display()))?;
            serde_json::from_str::<Profile>(&text)
                .with_context(|| format!("{} is not a `dynamo profile` file", path.display()))?
        }
        None => mocker_profile(&svc.args)?,
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
    let dir = args.manifest.parent().unwrap_or_else(|| std::path::Path::new("."));
    let lp = setup(&manifest.spec, dir, &graph.workers, 1.0)?;
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

/// The built-in engine's own profile, from the timing model and cache its flags give it (at
/// speedup 1): idle TTFT per prompt length (chunked at `--max-num-batched-tokens`), and ITL per
/// concurrency and context from the KV fill they make.
pub fn mocker_profile(args: &[String]) -> anyhow::Result<Profile> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        sidecar: crate::cli::SidecarArgs,
    }
    let w = Wrapper::try_parse_from(std::iter::once("sidecar".to_owned()).chain(args.iter().cloned()))
        .context("could not read the worker's flags to describe its engine")?;
    let m = &w.sidecar.mocker;
    let timing = TimingModel::default().scaled(m.timing_scale);
    let chunk = m.max_num_batched_tokens.max(1) as f64;
    let blocks = m.num_gpu_blocks.max(1) as f64;
    let bs = m.block_size.max(1) as f64;
    let prefill = (6..=14)
        .map(|k| {
            let isl = f64::from(1u32 << k);
            let (mut left, mut ms) = (isl, 0.0);
            while left > 0.0 {
                let c = left.min(chunk);
                ms += timing.prefill_ms(c as usize);
                left -= c;
            }
            let fill = (isl / bs).ceil() / blocks;
            PrefillPoint {
                isl,
                ttft_ms: ms + timing.decode_ms(fill),
            }
        })
        .collect();
    let max = m.max_num_seqs.max(1) as f64;
    let mut decode = Vec::new();
    for context in [256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0] {
        for concurrency in [1.0, 8.0, 32.0, 64.0, 128.0, 256.0, 512.0] {
            if concurrency > max {
                continue;
            }
            let fill = concurrency * (context / bs).ceil() / blocks;
            decode.push(DecodePoint {
                concurrency,
                context,
                itl_ms: timing.decode_ms(fill),
            });
        }
    }
    Ok(Profile {
        source: format!(
            "built-in engine timing model (timing scale {}, {} blocks of {} tokens, chunk {})",
            m.timing_scale, m.num_gpu_blocks, m.block_size, m.max_num_batched_tokens
        ),
        gpus: w.sidecar.gpus.max(1),
        max_concurrency: Some(max),
        prefill,
        decode,
    })
}

/// The speedup ratio a worker service's own flags give its engine (1 when they give none).
pub fn worker_speedup(args: &[String]) -> f64 {
    args.iter()
        .position(|a| a == "--speedup-ratio" || a == "--speedup")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .or_else(|| {
            args.iter().find_map(|a| {
                a.strip_prefix("--speedup-ratio=")
                    .or_else(|| a.strip_prefix("--speedup="))?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(1.0)
}

/// Cumulative frontend counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    requests: f64,
    isl_sum: f64,
    isl_count: f64,
    osl_sum: f64,
    cached_sum: f64,
    ttft_sum: f64,
    ttft_count: f64,
    itl_sum: f64,
    itl_count: f64,
    met: f64,
    missed: f64,
    ttft_missed: f64,
    itl_missed: f64,
    inflight: f64,
    live: f64,
}

fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn labelled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once('}')?.1.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

fn parse(text: &str) -> Option<Snapshot> {
    let f = "dynamo_frontend_";
    let m = |n: &str| metric(text, &format!("{f}{n}"));
    Some(Snapshot {
        requests: m("requests_total").unwrap_or(0.0),
        isl_sum: m("input_sequence_tokens_sum")?,
        isl_count: m("input_sequence_tokens_count")?,
        osl_sum: m("output_sequence_tokens_sum")?,
        cached_sum: m("cached_tokens_sum")?,
        ttft_sum: m("time_to_first_token_seconds_sum")?,
        ttft_count: m("time_to_first_token_seconds_count")?,
        itl_sum: m("inter_token_latency_seconds_sum")?,
        itl_count: m("inter_token_latency_seconds_count")?,
        met: labelled(text, &format!("{f}sla_requests_total"), "met=\"true\""),
        missed: labelled(text, &format!("{f}sla_requests_total"), "met=\"false\""),
        ttft_missed: labelled(text, &format!("{f}sla_misses_total"), "target=\"ttft\""),
        itl_missed: labelled(text, &format!("{f}sla_misses_total"), "target=\"itl\""),
        inflight: m("inflight_requests").unwrap_or(0.0),
        live: m("live_workers").unwrap_or(0.0),
    })
}

/// What happened between two snapshots `wall` apart, in trace time.
fn observe(a: &Snapshot, b: &Snapshot, wall: Duration, speedup: f64) -> Observation {
    let d = |x: f64, y: f64| (y - x).max(0.0);
    let n = d(a.isl_count, b.isl_count);
    let per = |sum: f64| if n > 0.0 { sum / n } else { 0.0 };
    let isl = per(d(a.isl_sum, b.isl_sum));
    let mean_ms = |s: f64, c: f64| (c > 0.0).then(|| s / c * 1000.0 * speedup);
    let judged = d(a.met, b.met) + d(a.missed, b.missed);
    let share = |missed: f64| (judged > 0.0).then(|| 1.0 - (missed / judged).min(1.0));
    // Arrivals: requests that finished plus the change in those in flight.
    let arrived = (b.requests - a.requests + b.inflight - a.inflight).max(0.0);
    Observation {
        duration_s: wall.as_secs_f64() * speedup,
        requests: arrived,
        isl,
        osl: per(d(a.osl_sum, b.osl_sum)),
        hit_rate: if isl > 0.0 {
            per(d(a.cached_sum, b.cached_sum)) / isl
        } else {
            0.0
        },
        ttft_ms: mean_ms(d(a.ttft_sum, b.ttft_sum), d(a.ttft_count, b.ttft_count)),
        itl_ms: mean_ms(d(a.itl_sum, b.itl_sum), d(a.itl_count, b.itl_count)),
        attainment: (judged > 0.0).then(|| d(a.met, b.met) / judged),
        ttft_attainment: share(d(a.ttft_missed, b.ttft_missed)),
        itl_attainment: share(d(a.itl_missed, b.itl_missed)),
        workers: b.live as u32,
    }
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
    let s = lp.speedup.max(1e-9);
    let wall = |d: Duration| d.div_f64(s);
    let (tick, interval, short) = (wall(TICK), wall(lp.interval), wall(SHORT_WINDOW));
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
    let mut history: VecDeque<(Instant, Snapshot)> = VecDeque::new();
    let mut last_interval: Option<(Instant, Snapshot)> = None;
    let mut interval_start = Instant::now();
    let mut decisions = 0u64;
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let now = Instant::now();
        let snap = match client.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.ok().as_deref().and_then(parse),
            Err(_) => None,
        };
        if let Some(snap) = snap {
            history.push_back((now, snap));
            while history.len() > 2 && now - history[1].0 >= short {
                history.pop_front();
            }
        }
        let Some(current) = current_replicas(&tx, &lp.service).await else {
            return;
        };
        let decision = if now - interval_start >= interval {
            interval_start = now;
            let obs = match (last_interval, snap) {
                (Some((t, a)), Some(b)) => Some(observe(&a, &b, now - t, s)),
                _ => None,
            };
            last_interval = snap.map(|b| (now, b));
            if obs.is_none() && snap.is_some() {
                // The first interval only sets the baseline.
                continue;
            }
            Some(lp.planner.on_interval(obs.as_ref(), current))
        } else {
            if last_interval.is_none() {
                last_interval = snap.map(|b| (now, b));
            }
            let obs = match (history.front(), snap) {
                (Some((t, a)), Some(b)) if now - *t >= tick => Some(observe(a, &b, now - *t, s)),
                _ => None,
            };
            lp.planner.on_tick(obs.as_ref(), current)
        };
        let Some(d) = decision else { continue };
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
                if lp.advisory { ", advisory: not acting" } else { "" },
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
async fn current_replicas(tx: &tokio::sync::mpsc::UnboundedSender<Msg>, service: &str) -> Option<u32> {
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
        let health: serde_json::Value = client.get(format!("{base}/health")).send().await.ok()?.json().await.ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_engine_describes_itself() {
        let p = mocker_profile(&["--timing-scale".into(), "2".into()])
            .expect("profile")
            .validated()
            .expect("valid");
        let t = TimingModel::default().scaled(2.0);
        // 1,024 tokens fit one chunk: one prefill step plus the decode pass that emits the token.
        let want = t.prefill_ms(1024) + t.decode_ms(16.0 / 16384.0);
        assert!((p.ttft_ms(1024.0) - want).abs() < 1e-9);
        assert!((p.itl_ms(1.0, 1024.0) - t.decode_ms(16.0 / 16384.0)).abs() < 1e-9);
        assert_eq!(p.max_concurrency, Some(256.0));
        assert!(p.source.contains("timing scale 2"));
        let e = mocker_profile(&["--max-num-seqs".into(), "x".into()]).expect_err("bad flag");
        assert!(format!("{e:#}").contains("invalid value"), "{e:#}");
    }

    #[test]
    fn frontend_counters_become_a_trace_time_observation() {
        let text = |n: f64, met: f64| {
            format!(
                "dynamo_frontend_requests_total{{model=\"m\",endpoint=\"completions\",request_type=\"stream\",status=\"success\"}} {n}\n\
                 dynamo_frontend_input_sequence_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_input_sequence_tokens_count{{model=\"m\"}} {n}\n\
                 dynamo_frontend_output_sequence_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_cached_tokens_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_time_to_first_token_seconds_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_time_to_first_token_seconds_count{{model=\"m\"}} {n}\n\
                 dynamo_frontend_inter_token_latency_seconds_sum{{model=\"m\"}} {}\n\
                 dynamo_frontend_inter_token_latency_seconds_count{{model=\"m\"}} {}\n\
                 dynamo_frontend_sla_requests_total{{met=\"true\"}} {met}\n\
                 dynamo_frontend_sla_requests_total{{met=\"false\"}} {}\n\
                 dynamo_frontend_sla_misses_total{{target=\"itl\"}} {}\n\
                 dynamo_frontend_inflight_requests{{model=\"m\"}} {}\n\
                 dynamo_frontend_live_workers{{role=\"aggregated\"}} 3\n",
                n * 1000.0,
                n * 100.0,
                n * 250.0,
                n * 0.01,
                n * 99.0 * 0.002,
                n * 99.0,
                n - met,
                n - met,
                n / 10.0,
            )
        };
        let a = parse(&text(10.0, 10.0)).expect("parses");
        let b = parse(&text(110.0, 100.0)).expect("parses");
        // 100 requests over 2 s of wall time at speedup 5: 10 trace seconds.
        let o = observe(&a, &b, Duration::from_secs(2), 5.0);
        assert_eq!(o.duration_s, 10.0);
        // 100 finished, and 10 more in flight than before.
        assert_eq!(o.requests, 110.0);
        assert_eq!((o.isl, o.osl, o.hit_rate), (1000.0, 100.0, 0.25));
        assert!((o.ttft_ms.expect("ttft") - 50.0).abs() < 1e-9, "10 ms wall x 5");
        assert!((o.itl_ms.expect("itl") - 10.0).abs() < 1e-9);
        assert!((o.attainment.expect("judged") - 0.9).abs() < 1e-12);
        assert_eq!(o.ttft_attainment, Some(1.0));
        assert!((o.itl_attainment.expect("judged") - 0.9).abs() < 1e-12);
        assert_eq!(o.workers, 3);
        assert!(parse("vllm:requests 1\n").is_none(), "not our frontend");
    }
}
