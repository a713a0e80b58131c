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
    DynamoGraphDeployment, DynamoGraphDeploymentScalingAdapter, PlannerDecision, PlannerLoad,
};
use dynamo_planner::{
    Algorithm, Config, Decision, Path, Planner, Profile,
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
    service: String,
    adapter: String,
    interval: Duration,
    speedup: f64,
    advisory: bool,
    /// The spec it was built from.
    from: serde_json::Value,
}

/// Why a graph's planner cannot run (said in its status).
fn setup(dgd: &DynamoGraphDeployment, profile: Option<Profile>) -> Result<Setup, String> {
    let sla = dgd.spec.sla.clone().unwrap_or_default();
    let (Some(ttft_ms), Some(itl_ms)) = (sla.ttft_ms, sla.itl_ms) else {
        return Err("spec.sla needs both ttftMs and itlMs".into());
    };
    let workers: Vec<(&String, &dynamo_crds::ServiceSpec)> = dgd
        .spec
        .services
        .iter()
        .filter(|(_, s)| matches!(s.role(), "worker" | "prefill" | "decode"))
        .collect();
    let [(name, svc)] = workers.as_slice() else {
        return Err(format!(
            "the planner sizes one aggregated worker service; this graph has {} worker services (prefill and decode pools are not planned yet)",
            workers.len()
        ));
    };
    if svc.role() != "worker" {
        return Err("the planner does not size prefill and decode pools yet".into());
    }
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
    let mut profile = match profile {
        Some(p) => p,
        None => shape.profile(),
    };
    let gpus = svc.gpus_per_pod() * u32::try_from(svc.node_count()).unwrap_or(1);
    if gpus > 0 {
        profile.gpus = gpus;
    }
    let profile = profile.validated().map_err(|e| e.to_string())?;
    let p = dgd.spec.planner.clone().unwrap_or_default();
    let interval = match &p.interval {
        Some(s) => {
            humantime::parse_duration(s).map_err(|e| format!("spec.planner.interval {s:?}: {e}"))?
        }
        None => Duration::from_secs(60),
    };
    let algorithm: Algorithm = p.algorithm.as_deref().unwrap_or("sla").parse()?;
    let to_u32 = |v: Option<i32>, d: u32| v.map_or(d, |v| v.max(0) as u32);
    let config = Config {
        algorithm,
        ttft_ms,
        itl_ms,
        min_replicas: to_u32(p.min_replicas, 1),
        max_replicas: to_u32(
            p.max_replicas,
            u32::try_from(svc.replicas()).unwrap_or(1).max(1) * 4,
        ),
        gpu_budget: p.gpu_budget.map(|b| b.max(0) as u32),
        ..Config::default()
    };
    Ok(Setup {
        planner: Planner::new(config, profile),
        service: (*name).clone(),
        adapter: gang::service_name(&dgd.name_any(), name),
        interval,
        speedup: shape.speedup,
        advisory: p.mode.as_deref() == Some("advisory"),
        from: json!({"sla": dgd.spec.sla, "planner": dgd.spec.planner, "service": svc}),
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
    loop {
        let tick = setup_state.as_ref().map_or(TICK, |_| cadence.tick());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Ok(dgd) = graphs.get(&name).await else {
            continue;
        };
        let spec_now = dgd
            .spec
            .services
            .values()
            .filter(|s| s.role() == "worker")
            .map(|s| json!(s))
            .collect::<Vec<_>>();
        let rebuild = setup_state.as_ref().is_none_or(|s| {
            s.from["sla"] != json!(dgd.spec.sla)
                || s.from["planner"] != json!(dgd.spec.planner)
                || spec_now.first() != Some(&s.from["service"])
        });
        if rebuild {
            let built = match read_profile(&client, &ns, &dgd).await {
                Ok(profile) => setup(&dgd, profile),
                Err(e) => Err(e),
            };
            match built {
                Ok(s) => {
                    cadence.reconfigure(s.interval, s.speedup);
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
        let snap = scrape(&pods, &http, &name).await;
        let Ok(adapter) = adapters.get(&s.adapter).await else {
            continue;
        };
        let current = adapter.spec.replicas.max(0) as u32;

        // An autoscaler that targets the same adapter owns it: step back and say so.
        let owner = hpas
            .list(&ListParams::default())
            .await
            .ok()
            .and_then(|l| {
                l.items.into_iter().find(|h| {
                    h.spec.as_ref().is_some_and(|sp| {
                        sp.scale_target_ref.kind == "DynamoGraphDeploymentScalingAdapter"
                            && sp.scale_target_ref.name == s.adapter
                    })
                })
            })
            .map(|h| h.name_any());

        let decision = cadence.decide(&mut s.planner, now, snap, current);
        let Some(d) = decision else { continue };

        let mode = match (&owner, s.advisory) {
            (Some(_), _) => "stepped-back",
            (None, true) => "advisory",
            (None, false) => "active",
        };
        let act = mode == "active" && d.changed();
        if act {
            let patch = Patch::Merge(json!({"spec": {"replicas": d.replicas}}));
            if let Err(e) = adapters
                .patch_scale(&s.adapter, &PatchParams::default(), &patch)
                .await
            {
                tracing::warn!(graph = %name, adapter = %s.adapter, error = %e, "planner could not scale");
                continue;
            }
        }
        metrics.planner_decision(&name, &s.service, &d, act);
        let mut reason = d.reason.clone();
        if let Some(h) = &owner {
            reason = format!(
                "HorizontalPodAutoscaler {h} scales {}; the planner steps back and only reports: {reason}",
                s.adapter
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
        tracing::info!(graph = %name, service = %s.service, previous = d.previous, replicas = d.replicas, mode, path = ?d.path, reason = %d.reason, "planner decision");
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
    let path = match d.path {
        Path::Predictive => "predictive",
        Path::Reactive => "reactive",
        Path::Hold => "hold",
    };
    PlannerDecision {
        time: Some(Timestamp::now().to_string()),
        summary: format!(
            "{} {}->{} ({path}{})",
            s.service,
            d.previous,
            d.replicas,
            if mode == "active" {
                String::new()
            } else {
                format!(", {mode}")
            }
        ),
        algorithm: s.planner.config().algorithm.as_str().into(),
        mode: mode.into(),
        path: path.into(),
        previous: BTreeMap::from([(s.service.clone(), d.previous as i32)]),
        replicas: BTreeMap::from([(s.service.clone(), d.replicas as i32)]),
        observed: d.observed.as_ref().map(load),
        predicted: d.predicted.as_ref().map(load),
        reason,
    }
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

/// The summed counters of the graph's running frontend pods; `None` when none answered.
async fn scrape(pods: &Api<Pod>, http: &reqwest::Client, graph: &str) -> Option<Counters> {
    let selector = format!("{LABEL_GRAPH}={graph},{LABEL_COMPONENT}=frontend");
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .ok()?;
    let mut total: Option<Counters> = None;
    for p in list.items {
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
            continue;
        }
        let url = format!("http://{ip}:{FRONTEND_PORT}/metrics");
        let Ok(r) = http.get(&url).send().await else {
            continue;
        };
        let Some(c) = r.text().await.ok().as_deref().and_then(Counters::parse) else {
            continue;
        };
        total = Some(total.map_or(c, |t| t.add(&c)));
    }
    total
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
        assert_eq!(s.service, "Worker");
        assert_eq!(s.adapter, "planner-worker");
        assert_eq!(s.interval, Duration::from_secs(60));
        assert!(s.planner.profile().source.contains("timing scale 8"));
        let (lo, hi) = s.planner.bounds();
        assert_eq!((lo, hi), (1, 8));
        assert!(!s.advisory);
    }

    #[test]
    fn disaggregated_graphs_are_refused_with_a_reason() {
        let path = format!(
            "{}/../manifests/disagg.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let mut g = graph(&std::fs::read_to_string(path).expect("manifest"));
        g.spec.sla = Some(dynamo_crds::Sla {
            ttft_ms: Some(500.0),
            itl_ms: Some(50.0),
        });
        let e = setup(&g, None).err().expect("refused");
        assert!(e.contains("prefill and decode"), "{e}");
    }
}
