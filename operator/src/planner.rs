//! The SLA planner in the operator: one loop per DynamoGraphDeployment with `spec.sla`. Each loop
//! reads the graph's frontend pods' `/metrics`, decides with [`dynamo_planner::Planner`] (the same
//! code as under `dynamo serve`), writes the worker service's replica count through its scaling
//! adapter's scale subresource, and records the decision in the graph's `status.planner`, in an
//! Event and in `dynamo_planner_*` metrics.
//!
//! - It steps back (decides, acts on nothing, says so in status) while a HorizontalPodAutoscaler
//!   (KEDA creates one too) targets the same adapter, and in `mode: advisory`.
//! - A manual `kubectl scale dgdsa` stands until the planner's next decision, which starts from
//!   the adapter's current count.
//! - It keeps no state that matters across restarts: after a restart or failover it starts from
//!   the adapter's count and the frontend's counters, never from the floor.
//! - Aggregated graphs only for now: a graph with prefill and decode pools gets a status that
//!   says so, and its pools are left alone.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use dynamo_crds::{
    DynamoGraphDeployment, DynamoGraphDeploymentScalingAdapter, PlannerDecision, PlannerLearned,
    PlannerLoad,
};
use dynamo_planner::{
    Algorithm, Bounds, Config, Decision, Learned, Path, Planner, Pool, Profile, Replicas,
    builtin::EngineShape,
    frontend::{Cadence, Counters, TICK},
};
use futures::StreamExt;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::gang::{self, FRONTEND_PORT, LABEL_COMPONENT, LABEL_GRAPH};
use crate::telemetry::Metrics;

/// Field manager of the planner's writes (its own, so the controller's status apply and the
/// planner's `status.planner` never fight).
pub const MANAGER: &str = "dynamo-planner";
/// How often a loop asks the graph's frontends for the profiles its workers describe, until
/// every pool has one.
const PROFILE_ASK_EVERY: Duration = Duration::from_secs(30);
/// Key of a profile in its ConfigMap.
pub const PROFILE_KEY: &str = "profile.json";

/// Runs one planner loop per graph with `spec.sla` until `cancel`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Metrics,
    identity: String,
    cancel: CancellationToken,
) {
    let api: Api<DynamoGraphDeployment> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(identity),
        },
    );
    let mut loops: HashMap<ObjectRef<DynamoGraphDeployment>, (String, CancellationToken)> =
        HashMap::new();
    let mut events = std::pin::pin!(events);
    let mut sweep = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            item = events.next() => {
                if item.is_none() {
                    // The watch ended (it retries with backoff, so only at shutdown): sweep on.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            _ = sweep.tick() => {}
        }
        let wanted: HashMap<ObjectRef<DynamoGraphDeployment>, String> = store
            .state()
            .iter()
            .filter(|g| g.spec.sla.is_some() && g.metadata.deletion_timestamp.is_none())
            .map(|g| (ObjectRef::from_obj(g.as_ref()), g.uid().unwrap_or_default()))
            .collect();
        loops.retain(|key, (uid, stop)| {
            let keep = wanted.get(key) == Some(uid);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (key, uid) in wanted {
            if loops.contains_key(&key) {
                continue;
            }
            let stop = cancel.child_token();
            let (Some(ns), name) = (key.namespace.clone(), key.name.clone()) else {
                continue;
            };
            tracing::info!(graph = %name, namespace = %ns, "planner loop starts");
            tokio::spawn(graph_loop(
                client.clone(),
                ns,
                name,
                metrics.clone(),
                recorder.clone(),
                stop.clone(),
            ));
            loops.insert(key, (uid, stop));
        }
    }
    for (_, (_, stop)) in loops {
        stop.cancel();
    }
}

/// What one loop plans with, rebuilt when the graph's planner settings change.
struct Setup {
    planner: Planner,
    /// The service of each planned pool, and its scaling adapter.
    services: BTreeMap<Pool, String>,
    adapters: BTreeMap<Pool, String>,
    interval: Duration,
    speedup: f64,
    advisory: bool,
    /// No profile named: the workers' own descriptions (`Info.profile`, through a frontend's
    /// `/profiles`) replace the ones derived from their flags once they answer.
    ask_workers: bool,
    /// The spec it was built from.
    from: serde_json::Value,
}

/// The pool a worker service serves, from its role.
fn pool_of(svc: &dynamo_crds::ServiceSpec) -> Option<Pool> {
    match svc.role() {
        "worker" => Some(Pool::Aggregated),
        "prefill" => Some(Pool::Prefill),
        "decode" => Some(Pool::Decode),
        _ => None,
    }
}

/// What a change to requires a new planner: the SLA, the planner settings and the planned
/// services' specs.
fn planned_spec(dgd: &DynamoGraphDeployment) -> serde_json::Value {
    let services: BTreeMap<&String, &dynamo_crds::ServiceSpec> = dgd
        .spec
        .services
        .iter()
        .filter(|(_, s)| pool_of(s).is_some())
        .collect();
    json!({"sla": dgd.spec.sla, "planner": dgd.spec.planner, "services": services})
}

/// Why a graph's planner cannot run (said in its status).
fn setup(dgd: &DynamoGraphDeployment, profile: Option<Profile>) -> Result<Setup, String> {
    let sla = dgd.spec.sla.clone().unwrap_or_default();
    let (Some(ttft_ms), Some(itl_ms)) = (sla.ttft_ms, sla.itl_ms) else {
        return Err("spec.sla needs both ttftMs and itlMs".into());
    };
    let mut pools: BTreeMap<Pool, (&String, &dynamo_crds::ServiceSpec)> = BTreeMap::new();
    for (name, svc) in &dgd.spec.services {
        let Some(pool) = pool_of(svc) else { continue };
        if let Some((other, _)) = pools.insert(pool, (name, svc)) {
            return Err(format!(
                "the planner sizes one service per pool; {other} and {name} are both {} services",
                pool.as_str()
            ));
        }
    }
    let shape: Vec<Pool> = pools.keys().copied().collect();
    if !matches!(
        shape.as_slice(),
        [Pool::Aggregated] | [Pool::Prefill, Pool::Decode]
    ) {
        return Err(format!(
            "the planner sizes one aggregated worker service, or one prefill and one decode service; this graph has {}",
            pools
                .iter()
                .map(|(p, (n, _))| format!("{n} ({})", p.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let described = |svc: &dynamo_crds::ServiceSpec| -> Result<(Profile, f64), String> {
        let args = svc
            .extra_pod_spec
            .as_ref()
            .and_then(|e| e.main_container.as_ref())
            .map(|c| c.args.clone())
            .unwrap_or_default();
        let env: Vec<(String, String)> = dgd
            .spec
            .envs
            .iter()
            .chain(&svc.envs)
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        let shape = EngineShape::from_flags(&args, &env)?;
        let mut profile = profile.clone().unwrap_or_else(|| shape.profile());
        let gpus = svc.gpus_per_pod() * u32::try_from(svc.node_count()).unwrap_or(1);
        if gpus > 0 {
            profile.gpus = gpus;
        }
        Ok((
            profile.validated().map_err(|e| e.to_string())?,
            shape.speedup,
        ))
    };
    let p = dgd.spec.planner.clone().unwrap_or_default();
    let interval = match &p.interval {
        Some(s) => {
            humantime::parse_duration(s).map_err(|e| format!("spec.planner.interval {s:?}: {e}"))?
        }
        None => Duration::from_secs(60),
    };
    let algorithm: Algorithm = p.algorithm.as_deref().unwrap_or("sla").parse()?;
    let most = pools
        .values()
        .map(|(_, s)| u32::try_from(s.replicas()).unwrap_or(1))
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
    let (planner, speedup) = match (
        pools.get(&Pool::Aggregated),
        pools.get(&Pool::Prefill),
        pools.get(&Pool::Decode),
    ) {
        (Some((_, svc)), _, _) => {
            let (profile, speedup) = described(svc)?;
            (Planner::new(config, profile), speedup)
        }
        (None, Some((_, pf)), Some((_, dc))) => {
            let (prefill, _) = described(pf)?;
            let (decode, speedup) = described(dc)?;
            (Planner::disaggregated(config, prefill, decode), speedup)
        }
        _ => return Err("no worker service to plan".into()),
    };
    Ok(Setup {
        planner,
        services: pools.iter().map(|(p, (n, _))| (*p, (*n).clone())).collect(),
        adapters: pools
            .iter()
            .map(|(p, (n, _))| (*p, gang::service_name(&dgd.name_any(), n)))
            .collect(),
        interval,
        speedup,
        advisory: p.mode.as_deref() == Some("advisory"),
        ask_workers: profile.is_none(),
        from: planned_spec(dgd),
    })
}

/// The profile named by `spec.planner.profile`: a ConfigMap with a `profile.json` key.
async fn read_profile(
    client: &Client,
    ns: &str,
    dgd: &DynamoGraphDeployment,
) -> Result<Option<Profile>, String> {
    let Some(name) = dgd.spec.planner.as_ref().and_then(|p| p.profile.clone()) else {
        return Ok(None);
    };
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&name)
        .await
        .map_err(|e| format!("spec.planner.profile: ConfigMap {name}: {e}"))?;
    let text = cm
        .data
        .and_then(|d| d.get(PROFILE_KEY).cloned())
        .ok_or_else(|| {
            format!(
                "ConfigMap {name} has no {PROFILE_KEY} key (write `dynamo profile` output there)"
            )
        })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("ConfigMap {name} {PROFILE_KEY}: {e}"))
}

async fn graph_loop(
    client: Client,
    ns: String,
    name: String,
    metrics: Metrics,
    recorder: Recorder,
    stop: CancellationToken,
) {
    let graphs: Api<DynamoGraphDeployment> = Api::namespaced(client.clone(), &ns);
    let adapters: Api<DynamoGraphDeploymentScalingAdapter> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let mut setup_state: Option<Setup> = None;
    let mut last_error = String::new();
    let mut cadence = Cadence::new(Duration::from_secs(60), 1.0, std::time::Instant::now());
    let mut stepped_back = String::new();
    let mut first_setup = true;
    let mut deferred: Option<Replicas> = None;
    let mut last_ask: Option<std::time::Instant> = None;
    loop {
        let tick = setup_state.as_ref().map_or(TICK, |_| cadence.tick());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Ok(dgd) = graphs.get(&name).await else {
            continue;
        };
        let rebuild = setup_state
            .as_ref()
            .is_none_or(|s| s.from != planned_spec(&dgd));
        if rebuild {
            let built = match read_profile(&client, &ns, &dgd).await {
                Ok(profile) => setup(&dgd, profile),
                Err(e) => Err(e),
            };
            match built {
                Ok(mut s) => {
                    cadence.reconfigure(s.interval, s.speedup);
                    // A restarted operator (or a new leader) goes on from what its predecessor
                    // learned about this graph, kept in the status.
                    if first_setup
                        && let Some(prev) = dgd.status.as_ref().and_then(|st| st.planner.as_ref())
                        && prev.algorithm == s.planner.config().algorithm.as_str()
                        && let Some(l) = &prev.learned
                    {
                        s.planner.restore(&from_status(l));
                        tracing::info!(graph = %name, headroom_ttft = l.headroom_ttft, headroom_itl = l.headroom_itl, "planner goes on from its status");
                    }
                    first_setup = false;
                    setup_state = Some(s);
                    last_error.clear();
                }
                Err(e) => {
                    if e != last_error {
                        tracing::warn!(graph = %name, error = %e, "planner cannot run");
                        let decision = PlannerDecision {
                            time: Some(Timestamp::now().to_string()),
                            summary: "not planning".into(),
                            mode: "stopped".into(),
                            reason: e.clone(),
                            ..PlannerDecision::default()
                        };
                        let _ = write_decision(&graphs, &name, &decision).await;
                        last_error = e;
                    }
                    setup_state = None;
                    continue;
                }
            }
        }
        let Some(s) = setup_state.as_mut() else {
            continue;
        };
        let now = std::time::Instant::now();
        let (snap, answered) = match dgd
            .spec
            .planner
            .as_ref()
            .and_then(|p| p.prometheus.as_ref())
        {
            Some(source) => (from_prometheus(&http, source, &dgd).await, None),
            None => scrape(&pods, &http, &name).await,
        };
        if s.ask_workers {
            // A frontend that just answered is asked at once; otherwise (metrics from
            // Prometheus) at most every PROFILE_ASK_EVERY, as an unreachable one costs a timeout.
            let described = match &answered {
                Some(base) => get_json(&http, &format!("{base}/profiles")).await,
                None if last_ask.is_none_or(|t| t.elapsed() >= PROFILE_ASK_EVERY) => {
                    last_ask = Some(std::time::Instant::now());
                    frontend_get(&pods, &http, &name, "profiles").await
                }
                None => None,
            };
            if let Some(described) = described {
                for pool in s.planner.adopt_described(&described) {
                    tracing::info!(graph = %name, service = %s.services[&pool], profile = %s.planner.profile(pool).source, "planner sizes the pool with the profile its workers describe");
                }
                s.ask_workers = s
                    .planner
                    .pools()
                    .any(|p| described.get(p.as_str()).is_none());
            }
        }
        let mut current = Replicas::default();
        for (pool, adapter) in &s.adapters {
            match adapters.get(adapter).await {
                Ok(a) => current.set(*pool, a.spec.replicas.max(0) as u32),
                Err(_) => break,
            }
        }
        if current.iter().count() != s.adapters.len() {
            continue;
        }

        // An autoscaler that targets one of the adapters owns it: step back and say so.
        let owner = hpas.list(&ListParams::default()).await.ok().and_then(|l| {
            l.items.into_iter().find_map(|h| {
                let target = &h.spec.as_ref()?.scale_target_ref;
                (target.kind == "DynamoGraphDeploymentScalingAdapter"
                    && s.adapters.values().any(|a| *a == target.name))
                .then(|| (h.name_any(), target.name.clone()))
            })
        });

        let decision = cadence.decide(&mut s.planner, now, snap, &current);
        let Some(d) = decision else {
            // Growth a rebalance deferred (the budget's room was still held by leaving pods)
            // follows as soon as there is room.
            if let Some(t) = deferred.clone()
                && owner.is_none()
                && !s.advisory
            {
                match carry_out(s, &t, &current, &adapters, &pods, &name, false).await {
                    Ok(true) => deferred = None,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(graph = %name, error = %e, "planner could not scale")
                    }
                }
            }
            continue;
        };

        let mode = match (&owner, s.advisory) {
            (Some(_), _) => "stepped-back",
            (None, true) => "advisory",
            (None, false) => "active",
        };
        let act = mode == "active" && d.changed();
        deferred = None;
        if act {
            match carry_out(s, &d.replicas, &current, &adapters, &pods, &name, true).await {
                Ok(done) => deferred = (!done).then(|| d.replicas.clone()),
                Err(e) => {
                    tracing::warn!(graph = %name, error = %e, "planner could not scale");
                    continue;
                }
            }
        }
        metrics.planner_decision(&name, &s.services, &d, act);
        let mut reason = d.reason.clone();
        if let Some((h, adapter)) = &owner {
            reason = format!(
                "HorizontalPodAutoscaler {h} scales {adapter}; the planner steps back and only reports: {reason}"
            );
        }
        let decision = to_status(s, &d, mode, reason);
        // Status on every interval decision and on every change; ticks that change nothing stay quiet.
        if (d.path != Path::Reactive || d.changed())
            && let Err(e) = write_decision(&graphs, &name, &decision).await
        {
            tracing::warn!(graph = %name, error = %e, "planner could not write status");
        }
        if d.changed() || (owner.is_some() && stepped_back != mode) {
            stepped_back = mode.to_owned();
            let event = Event {
                type_: EventType::Normal,
                reason: match mode {
                    "active" => "PlannerScaled",
                    "advisory" => "PlannerAdvised",
                    _ => "PlannerSteppedBack",
                }
                .into(),
                note: Some(truncate(
                    &format!("{}: {}", decision.summary, decision.reason),
                    1000,
                )),
                action: "Scale".into(),
                secondary: None,
            };
            let reference = dgd.object_ref(&());
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(graph = %name, error = %e, "planner event not recorded");
            }
        }
        tracing::info!(graph = %name, previous = %d.previous, replicas = %d.replicas, mode, path = ?d.path, reason = %d.reason, "planner decision");
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn to_status(s: &Setup, d: &Decision, mode: &str, reason: String) -> PlannerDecision {
    let load = |l: &dynamo_planner::Load| PlannerLoad {
        requests_per_second: l.rate,
        isl: l.isl,
        osl: l.osl,
        ..PlannerLoad::default()
    };
    let per_service = |r: &Replicas| -> BTreeMap<String, i32> {
        s.services
            .iter()
            .map(|(p, name)| (name.clone(), r.get(*p) as i32))
            .collect()
    };
    let change: Vec<String> = s
        .services
        .iter()
        .map(|(p, name)| format!("{name} {}->{}", d.previous.get(*p), d.replicas.get(*p)))
        .collect();
    let learned = s.planner.learned();
    PlannerDecision {
        time: Some(Timestamp::now().to_string()),
        summary: format!(
            "{} ({}{})",
            change.join(", "),
            d.path.as_str(),
            if mode == "active" {
                String::new()
            } else {
                format!(", {mode}")
            }
        ),
        algorithm: s.planner.config().algorithm.as_str().into(),
        mode: mode.into(),
        path: d.path.as_str().into(),
        previous: per_service(&d.previous),
        replicas: per_service(&d.replicas),
        observed: d.observed.as_ref().map(load),
        predicted: d.predicted.as_ref().map(load),
        reason,
        learned: Some(PlannerLearned {
            headroom_ttft: learned.headroom_ttft,
            headroom_itl: learned.headroom_itl,
            correction_ttft: learned.correction_ttft,
            correction_itl: learned.correction_itl,
            remote_share: learned.remote_share,
            remote_isl: learned.remote_isl,
            remote_hit_rate: learned.remote_hit_rate,
            forecast: learned.forecast.as_ref().map(load),
        }),
    }
}

/// What a status records back into the planner.
fn from_status(l: &PlannerLearned) -> Learned {
    Learned {
        headroom_ttft: l.headroom_ttft,
        headroom_itl: l.headroom_itl,
        correction_ttft: l.correction_ttft,
        correction_itl: l.correction_itl,
        remote_share: l.remote_share,
        remote_isl: l.remote_isl,
        remote_hit_rate: l.remote_hit_rate,
        forecast: l.forecast.as_ref().map(|f| dynamo_planner::Load {
            rate: f.requests_per_second,
            isl: f.isl,
            osl: f.osl,
            hit_rate: 0.0,
        }),
    }
}

/// Writes a decision's replicas to the adapters: shrinking pools first, then growing ones, each
/// only into the room the GPU budget leaves beside the graph's planned pods that still exist
/// (terminating ones included), so a rebalance never runs more GPUs than the budget. What does
/// not fit yet is added by a later check, once the pods leaving are gone.
///
/// Returns whether every pool got what `target` asks for.
async fn carry_out(
    s: &Setup,
    target: &Replicas,
    current: &Replicas,
    adapters: &Api<DynamoGraphDeploymentScalingAdapter>,
    pods: &Api<Pod>,
    graph: &str,
    announce: bool,
) -> Result<bool, kube::Error> {
    let scale = |adapter: &str, n: u32| {
        let patch = Patch::Merge(json!({"spec": {"replicas": n}}));
        let adapter = adapter.to_owned();
        async move {
            adapters
                .patch_scale(&adapter, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
        }
    };
    for (pool, adapter) in &s.adapters {
        if target.get(*pool) < current.get(*pool) {
            scale(adapter, target.get(*pool)).await?;
        }
    }
    let mut complete = true;
    // Replicas each pool is being taken to so far.
    let mut taking: BTreeMap<Pool, u32> = s
        .adapters
        .keys()
        .map(|p| (*p, current.get(*p).min(target.get(*p))))
        .collect();
    for (pool, adapter) in &s.adapters {
        let (have, want) = (current.get(*pool), target.get(*pool));
        if want <= have {
            continue;
        }
        let mut n = want;
        if let Some(budget) = s.planner.config().gpu_budget {
            // Gangs that still exist per pool (a shrinking pool's leave when their pods are gone).
            let selector = format!("{LABEL_GRAPH}={graph}");
            let existing = pods.list(&ListParams::default().labels(&selector)).await?;
            let mut gangs: BTreeMap<Pool, std::collections::BTreeSet<String>> = BTreeMap::new();
            for p in &existing.items {
                let labels = p.labels();
                let service = labels.get(gang::LABEL_SERVICE);
                if let Some((pl, _)) = s.services.iter().find(|(_, n)| Some(*n) == service) {
                    let g = labels
                        .get(gang::LABEL_GANG)
                        .cloned()
                        .unwrap_or_else(|| p.name_any());
                    gangs.entry(*pl).or_default().insert(g);
                }
            }
            let used: u32 = taking
                .iter()
                .map(|(pl, t)| {
                    let alive = gangs.get(pl).map_or(0, |g| g.len() as u32);
                    alive.max(*t) * s.planner.profile(*pl).gpus.max(1)
                })
                .sum();
            let per = s.planner.profile(*pool).gpus.max(1);
            n = want.min(have + budget.saturating_sub(used) / per);
            if n < want {
                complete = false;
            }
            if n < want && announce {
                tracing::info!(graph, adapter = %adapter, want, now = n, budget, "planner grows the pool into the budget's room; the rest once pods leaving are gone");
            }
        }
        if n > have {
            scale(adapter, n).await?;
            taking.insert(*pool, n);
        }
    }
    Ok(complete)
}

async fn write_decision(
    graphs: &Api<DynamoGraphDeployment>,
    name: &str,
    d: &PlannerDecision,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoGraphDeployment",
        "status": {"planner": d},
    });
    graphs
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map(|_| ())
}

/// The base URLs of the graph's running frontend pods.
async fn frontends(pods: &Api<Pod>, graph: &str) -> Vec<String> {
    let selector = format!("{LABEL_GRAPH}={graph},{LABEL_COMPONENT}=frontend");
    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let ip = p.status?.pod_ip?;
            Some(format!("http://{ip}:{FRONTEND_PORT}"))
        })
        .collect()
}

/// `GET /PATH` of the first of the graph's frontends that answers with JSON.
async fn frontend_get(
    pods: &Api<Pod>,
    http: &reqwest::Client,
    graph: &str,
    path: &str,
) -> Option<serde_json::Value> {
    for base in frontends(pods, graph).await {
        if let Some(v) = get_json(http, &format!("{base}/{path}")).await {
            return Some(v);
        }
    }
    None
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// The label matchers of a graph's frontend series in Prometheus: the source's own, or the
/// graph's namespace and its frontend Service (what a ServiceMonitor on that Service labels).
fn prometheus_selector(
    source: &dynamo_crds::PrometheusSource,
    dgd: &DynamoGraphDeployment,
) -> String {
    source.selector.clone().unwrap_or_else(|| {
        let frontend = dgd
            .spec
            .services
            .iter()
            .find(|(_, s)| s.role() == "frontend")
            .map_or("Frontend", |(n, _)| n.as_str());
        format!(
            "namespace=\"{}\",service=\"{}\"",
            dgd.namespace().unwrap_or_default(),
            gang::service_name(&dgd.name_any(), frontend)
        )
    })
}

/// The PromQL query of a graph's frontend counters: every `dynamo_frontend_*` series summed per
/// frontend (`instance`) and per label the planner reads.
fn prometheus_query(selector: &str) -> String {
    format!(
        "sum by (__name__, instance, met, target, role, decision) ({{__name__=~\"dynamo_frontend_.+\",{selector}}})"
    )
}

/// An instant-query answer turned back into one exposition text per frontend (`instance`).
fn prometheus_texts(body: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    if body["status"] != "success" {
        return None;
    }
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for series in body["data"]["result"].as_array()? {
        let metric = series["metric"].as_object()?;
        let name = metric.get("__name__")?.as_str()?;
        let value = series["value"].get(1)?.as_str()?;
        let labels: Vec<String> = metric
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "instance"))
            .filter_map(|(k, v)| Some(format!("{k}=\"{}\"", v.as_str()?)))
            .collect();
        let instance = metric
            .get("instance")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let text = texts.entry(instance.to_owned()).or_default();
        text.push_str(&format!("{name}{{{}}} {value}\n", labels.join(",")));
    }
    Some(texts)
}

/// The summed counters of the graph's frontends as Prometheus last scraped them; `None` when
/// Prometheus did not answer or holds none.
async fn from_prometheus(
    http: &reqwest::Client,
    source: &dynamo_crds::PrometheusSource,
    dgd: &DynamoGraphDeployment,
) -> Option<Counters> {
    let query = prometheus_query(&prometheus_selector(source, dgd));
    let url = format!("{}/api/v1/query", source.url.trim_end_matches('/'));
    let body: serde_json::Value = match http.get(&url).query(&[("query", &query)]).send().await {
        Ok(r) => r.json().await.ok()?,
        Err(e) => {
            tracing::debug!(graph = %dgd.name_any(), error = %e, "Prometheus did not answer");
            return None;
        }
    };
    prometheus_texts(&body)?
        .values()
        .filter_map(|t| Counters::parse(t))
        .reduce(|a, b| a.add(&b))
}

/// The summed counters of the graph's running frontend pods (`None` when none answered), and
/// the base URL of one that did.
async fn scrape(
    pods: &Api<Pod>,
    http: &reqwest::Client,
    graph: &str,
) -> (Option<Counters>, Option<String>) {
    let mut total: Option<Counters> = None;
    let mut answered = None;
    for base in frontends(pods, graph).await {
        let url = format!("{base}/metrics");
        let Ok(r) = http.get(&url).send().await else {
            continue;
        };
        let Some(c) = r.text().await.ok().as_deref().and_then(Counters::parse) else {
            continue;
        };
        total = Some(total.map_or(c, |t| t.add(&c)));
        answered.get_or_insert(base);
    }
    (total, answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(yaml: &str) -> DynamoGraphDeployment {
        serde_saphyr::from_str(yaml).expect("parses")
    }

    #[test]
    fn the_planner_manifest_sets_up_with_the_engines_own_profile() {
        let path = format!(
            "{}/../manifests/planner.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let g = graph(&std::fs::read_to_string(path).expect("manifest"));
        let s = setup(&g, None).expect("sets up");
        assert_eq!(s.services[&Pool::Aggregated], "Worker");
        assert_eq!(s.adapters[&Pool::Aggregated], "planner-worker");
        assert_eq!(s.interval, Duration::from_secs(60));
        assert!(
            s.planner
                .profile(Pool::Aggregated)
                .source
                .contains("timing scale 8")
        );
        let (lo, hi) = s.planner.bounds(Pool::Aggregated);
        assert_eq!((lo, hi), (1, 8));
        assert!(!s.advisory);
    }

    #[test]
    fn a_disaggregated_graph_plans_its_prefill_and_decode_pools_within_their_bounds() {
        let path = format!(
            "{}/../manifests/disagg-planner.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let g = graph(&std::fs::read_to_string(path).expect("manifest"));
        let s = setup(&g, None).expect("sets up");
        assert_eq!(
            s.adapters.iter().collect::<Vec<_>>(),
            [
                (&Pool::Prefill, &"disagg-planner-prefill".to_owned()),
                (&Pool::Decode, &"disagg-planner-decode".to_owned())
            ]
        );
        let bounds = (
            s.planner.bounds(Pool::Prefill),
            s.planner.bounds(Pool::Decode),
        );
        assert_eq!(bounds, ((1, 4), (1, 4)));
        // Two services of one pool cannot be planned apart.
        let mut two = g.clone();
        let decode = two.spec.services["Decode"].clone();
        two.spec.services.insert("Decode2".into(), decode);
        let e = setup(&two, None).err().expect("refused");
        assert!(e.contains("Decode and Decode2"), "{e}");
    }

    #[test]
    fn prometheus_answers_become_the_frontends_counters() {
        let mut g = graph(
            &std::fs::read_to_string(format!(
                "{}/../manifests/planner.yaml",
                std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
            ))
            .expect("manifest"),
        );
        g.metadata.namespace = Some("prod".into());
        let source = dynamo_crds::PrometheusSource {
            url: "http://prometheus:9090".into(),
            selector: None,
        };
        let selector = prometheus_selector(&source, &g);
        assert_eq!(selector, r#"namespace="prod",service="planner-frontend""#);
        assert!(
            prometheus_query(&selector)
                .contains(r#"__name__=~"dynamo_frontend_.+",namespace="prod""#)
        );
        let series = |name: &str, labels: serde_json::Value, v: &str| {
            let mut m = labels;
            m["__name__"] = name.into();
            m["instance"] = "10.0.0.1:8000".into();
            json!({"metric": m, "value": [1.0, v]})
        };
        let body = json!({"status": "success", "data": {"resultType": "vector", "result": [
            series("dynamo_frontend_requests_total", json!({}), "100"),
            series("dynamo_frontend_input_sequence_tokens_sum", json!({}), "100000"),
            series("dynamo_frontend_input_sequence_tokens_count", json!({}), "100"),
            series("dynamo_frontend_output_sequence_tokens_sum", json!({}), "5000"),
            series("dynamo_frontend_cached_tokens_sum", json!({}), "0"),
            series("dynamo_frontend_time_to_first_token_seconds_sum", json!({}), "10"),
            series("dynamo_frontend_time_to_first_token_seconds_count", json!({}), "100"),
            series("dynamo_frontend_inter_token_latency_seconds_sum", json!({}), "49"),
            series("dynamo_frontend_inter_token_latency_seconds_count", json!({}), "4900"),
            series("dynamo_frontend_sla_requests_total", json!({"met": "true"}), "90"),
            series("dynamo_frontend_sla_requests_total", json!({"met": "false"}), "10"),
            series("dynamo_frontend_live_workers", json!({"role": "aggregated"}), "2"),
        ]}});
        let texts = prometheus_texts(&body).expect("a vector");
        assert_eq!(texts.len(), 1);
        let a = Counters::parse(&texts["10.0.0.1:8000"]).expect("counters");
        let later = body
            .to_string()
            .replace("\"100\"]", "\"200\"]")
            .replace("\"100000\"", "\"200000\"");
        let later: serde_json::Value = serde_json::from_str(&later).expect("json");
        let b = Counters::parse(&prometheus_texts(&later).expect("vector")["10.0.0.1:8000"])
            .expect("counters");
        let o = a.observe(&b, Duration::from_secs(10), 1.0);
        assert_eq!((o.requests, o.isl, o.workers), (100.0, 1000.0, 2));
        assert!(prometheus_texts(&json!({"status": "error"})).is_none());
    }
}
