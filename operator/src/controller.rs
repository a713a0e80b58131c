//! The kube-runtime controller: for each `DynamoGraphDeployment` it makes sure the scaling
//! adapters and the graph's other [`children`](crate::children) (Services, disruption budgets,
//! the frontend's ServiceAccount, Role and RoleBinding) exist as wanted, turns the
//! [`plan`](crate::plan) into API calls (create pods, pin and un-gate gangs, delete gangs), and
//! writes the graph's and the adapters' status.
//!
//! It keeps reflector caches of all pods (node GPU accounting needs every pod, not only ours),
//! nodes, adapters, and the graph-labelled children. Names are deterministic and creates
//! tolerate "already exists", so a restarted operator converges without duplicates. Two things
//! the caches can lag behind are guarded in memory: placements this process made but has not yet
//! seen come back (so a node is not given twice), and one placement lock (so two graphs never
//! place from the same snapshot).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_crds::{
    Condition, DynamoGraphDeployment, DynamoGraphDeploymentScalingAdapter,
    DynamoGraphDeploymentStatus, GraphServiceRef, ScalingAdapterSpec, ScalingAdapterStatus,
    ServiceStatus,
};
use futures::{Stream, StreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::children::{self, Child, Drift};
use crate::config::Config;
use crate::gang::{self, ANNOTATION_NODE, ANNOTATION_UNGATED_AT, GANG_GATE};
use crate::placement::{
    ClusterView, GangRequest, NodeConstraints, NodeInfo, NodeTerm, PackDomain, Requirement, Taint,
    Toleration,
};
use crate::plan::{self, Action as Step, DeleteReason, PodObs, ServiceDesired};
use crate::telemetry::{ErrorLabels, Metrics};

/// Field manager for server-side apply.
pub const MANAGER: &str = "dynamo-operator";

/// How often a graph with gangs waiting for room is looked at again (node and pod events also
/// wake it).
const UNPLACED_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not {verb} {kind} {name}")]
    Kube {
        verb: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the pod and node caches did not fill within 30s")]
    CachesNotReady,
    #[error("could not build pod {name}: {message}")]
    BuildPod { name: String, message: String },
}

impl Error {
    /// Label for `dynamo_operator_reconcile_failures_total{error=...}`.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube {
                verb, kind, source, ..
            } => {
                let code = match source {
                    kube::Error::Api(s) => s.code.to_string(),
                    _ => "transport".into(),
                };
                format!("{verb}_{}_{code}", kind.to_ascii_lowercase())
            }
            Error::CachesNotReady => "caches_not_ready".into(),
            Error::BuildPod { .. } => "build_pod".into(),
        }
    }
}

fn kube_err(
    verb: &'static str,
    kind: &'static str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Kube {
        verb,
        kind,
        name,
        source,
    }
}

/// Treats "already exists" (create) and "not found" (delete) as done.
fn idempotent<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Shared state of the reconciler.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    pods: Store<Pod>,
    nodes: Store<Node>,
    adapters: Store<DynamoGraphDeploymentScalingAdapter>,
    children: Caches,
    recorder: Recorder,
    placement_lock: tokio::sync::Mutex<()>,
    /// Pod uid → (node, GPUs) for pins not yet seen in the pod cache.
    pinned: Mutex<HashMap<String, (String, u32)>>,
    /// Graphs with gangs that fit nowhere right now, and how many.
    waiting: Arc<Mutex<HashMap<ObjectRef<DynamoGraphDeployment>, u32>>>,
}

/// Caches of the graph-labelled objects graphs own besides pods and adapters.
struct Caches {
    services: Store<Service>,
    pdbs: Store<PodDisruptionBudget>,
    service_accounts: Store<ServiceAccount>,
    roles: Store<Role>,
    role_bindings: Store<RoleBinding>,
}

impl Caches {
    async fn wait_until_ready(&self) {
        self.services.wait_until_ready().await.ok();
        self.pdbs.wait_until_ready().await.ok();
        self.service_accounts.wait_until_ready().await.ok();
        self.roles.wait_until_ready().await.ok();
        self.role_bindings.wait_until_ready().await.ok();
    }
}

/// An API for `K` in the watched namespace, or in all.
fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A cache of the graph-labelled `K` objects and the stream of their changes (for `owns_stream`).
fn labelled<K>(
    client: &Client,
    ns: Option<&str>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + use<K>,
)
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(
        scoped::<K>(client, ns),
        watcher::Config::default().labels(gang::LABEL_GRAPH),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects();
    (store, events)
}

/// Runs the controller until `cancel` fires.
pub async fn run(client: Client, config: Config, metrics: Metrics, cancel: CancellationToken) {
    let ns = config.watch_namespace.as_deref();
    let graphs: Api<DynamoGraphDeployment> = scoped(&client, ns);
    let adapters_api: Api<DynamoGraphDeploymentScalingAdapter> = scoped(&client, ns);
    let wc = watcher::Config::default;

    let (pods, pods_w) = reflector::store();
    let pod_events = watcher(Api::<Pod>::all(client.clone()), wc())
        .default_backoff()
        .reflect(pods_w)
        .touched_objects();
    let (nodes, nodes_w) = reflector::store();
    let node_events = watcher(Api::<Node>::all(client.clone()), wc())
        .default_backoff()
        .reflect(nodes_w)
        .touched_objects();
    let (adapters, adapters_w) = reflector::store();
    let adapter_events = watcher(adapters_api, wc())
        .default_backoff()
        .reflect(adapters_w)
        .touched_objects();
    let (services, service_events) = labelled::<Service>(&client, ns);
    let (pdbs, pdb_events) = labelled::<PodDisruptionBudget>(&client, ns);
    let (service_accounts, sa_events) = labelled::<ServiceAccount>(&client, ns);
    let (roles, role_events) = labelled::<Role>(&client, ns);
    let (role_bindings, binding_events) = labelled::<RoleBinding>(&client, ns);

    let waiting: Arc<Mutex<HashMap<ObjectRef<DynamoGraphDeployment>, u32>>> = Arc::default();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(config.identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client,
        metrics,
        pods,
        nodes,
        adapters,
        children: Caches {
            services,
            pdbs,
            service_accounts,
            roles,
            role_bindings,
        },
        recorder,
        placement_lock: tokio::sync::Mutex::new(()),
        pinned: Mutex::default(),
        waiting: waiting.clone(),
        config: config.clone(),
    });

    // A node change may make room for gangs that fit nowhere: wake the graphs that wait.
    let wake_waiting = move |_: Node| {
        waiting
            .lock()
            .map(|w| w.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let shutdown = cancel.clone();
    Controller::new(graphs, wc())
        .with_config(kube::runtime::Config::default().concurrency(config.concurrency))
        .owns_stream(pod_events)
        .owns_stream(adapter_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(binding_events)
        .watches_stream(node_events, wake_waiting)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

fn error_policy(dgd: Arc<DynamoGraphDeployment>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabels {
            error: err.metric_label(),
        })
        .inc();
    tracing::warn!(graph = %dgd.name_any(), error = %err, source = ?std::error::Error::source(err), "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(dgd: Arc<DynamoGraphDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = tokio::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let r = reconcile_graph(&dgd, &ctx).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    r
}

// === reconcile ===

struct Graph<'a> {
    dgd: &'a DynamoGraphDeployment,
    name: String,
    ns: String,
    uid: String,
}

async fn reconcile_graph(dgd: &DynamoGraphDeployment, ctx: &Context) -> Result<Action, Error> {
    if dgd.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove everything.
        return Ok(Action::await_change());
    }
    let g = Graph {
        dgd,
        name: dgd.name_any(),
        ns: dgd.namespace().unwrap_or_default(),
        uid: dgd.uid().unwrap_or_default(),
    };
    let ready = async {
        ctx.pods.wait_until_ready().await.ok();
        ctx.nodes.wait_until_ready().await.ok();
        ctx.adapters.wait_until_ready().await.ok();
        ctx.children.wait_until_ready().await;
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .map_err(|_| Error::CachesNotReady)?;

    let problems = validate(&g, ctx);
    if !problems.is_empty() {
        let message = problems.join("; ");
        let status = DynamoGraphDeploymentStatus {
            state: Some("failed".into()),
            ready_services: Some(format!("0/{}", dgd.spec.services.len())),
            observed_generation: dgd.metadata.generation,
            conditions: vec![condition(dgd, "Ready", false, "InvalidSpec", &message)],
            ..Default::default()
        };
        if write_status(&g, ctx, status).await? {
            publish(ctx, dgd, EventType::Warning, "InvalidSpec", &message).await;
        }
        return Ok(Action::requeue(Duration::from_secs(300)));
    }

    ensure_kv_transfer_secret(&g, ctx).await?;
    let replicas = ensure_adapters(&g, ctx).await?;
    ensure_children(&g, ctx, &replicas).await?;

    // Desired against observed.
    let desired: Vec<ServiceDesired> = dgd
        .spec
        .services
        .iter()
        .map(|(name, svc)| ServiceDesired {
            name: name.clone(),
            replicas: replicas.get(name).copied().unwrap_or(0),
            node_count: svc.node_count().max(1) as u32,
            hash: gang::template_hash(&dgd.spec, svc),
            min_ready_secs: ctx.config.min_ready.as_secs() as i64,
        })
        .collect();
    let ours = our_pods(&g, ctx);
    let observed: Vec<PodObs> = {
        let pinned = ctx.pinned.lock().map(|p| p.clone()).unwrap_or_default();
        ours.iter().filter_map(|p| observe(p, &pinned)).collect()
    };
    let now = Timestamp::now().as_second();
    let deadline = ctx.config.gang_deadline.as_secs() as i64;
    let the_plan = plan::plan(&desired, &observed, now, deadline);

    let mut unplaced: Vec<String> = Vec::new();
    let mut places = Vec::new();
    for step in &the_plan.actions {
        match step {
            Step::Create {
                service,
                gang: idx,
                ranks,
            } => create_gang(&g, ctx, service, *idx, ranks, &desired).await?,
            Step::DeleteGang {
                service,
                gang: idx,
                reason,
            } => delete_gang(&g, ctx, &ours, service, *idx, *reason).await?,
            Step::Place { service, gang: idx } => places.push((service.clone(), *idx)),
            Step::Ungate { service, gang: idx } => {
                ungate_gang(ctx, &ours, service, *idx).await?;
            }
        }
    }
    if !places.is_empty() {
        unplaced = place_gangs(&g, ctx, &ours, &places).await?;
    }

    // Status.
    let key = ObjectRef::from_obj(dgd);
    if let Ok(mut w) = ctx.waiting.lock() {
        if unplaced.is_empty() {
            w.remove(&key);
        } else {
            w.insert(key, unplaced.len() as u32);
        }
        ctx.metrics
            .gangs_unplaceable
            .set(w.values().map(|v| i64::from(*v)).sum());
    }
    let status = graph_status(&g, &the_plan, &unplaced);
    let all_ready = status.state.as_deref() == Some("ready");
    let was_unplaced = dgd
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "GangsPlaced"))
        .map(|c| (c.status.clone(), c.message.clone()));
    let placed_cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "GangsPlaced")
        .map(|c| (c.status.clone(), c.message.clone()));
    write_status(&g, ctx, status).await?;
    if placed_cond != was_unplaced
        && let Some((s, msg)) = &placed_cond
        && s == "False"
    {
        publish(ctx, dgd, EventType::Warning, "GangUnschedulable", msg).await;
    }
    write_adapter_status(&g, ctx, &the_plan).await?;

    Ok(if !unplaced.is_empty() {
        Action::requeue(UNPLACED_RECHECK)
    } else if let Some(s) = the_plan.recheck_in {
        Action::requeue(Duration::from_secs(s.max(1) as u64))
    } else if !all_ready {
        Action::requeue(Duration::from_secs(30))
    } else {
        Action::requeue(Duration::from_secs(300))
    })
}

/// Spec problems the API server's schema cannot see (they depend on the operator's settings).
fn validate(g: &Graph<'_>, ctx: &Context) -> Vec<String> {
    let mut out = Vec::new();
    let mut slugs: BTreeMap<String, &str> = BTreeMap::new();
    for (name, svc) in &g.dgd.spec.services {
        if let Err(e) = gang::check_names(&g.name, name) {
            out.push(e);
        }
        if let Some(other) = slugs.insert(gang::service_slug(name), name) {
            out.push(format!(
                "services {other} and {name} differ only in case; their pods would have the same names"
            ));
        }
        if let Some(pd) = svc.pack_domain(&g.dgd.spec)
            && ctx.config.levels.index_of(pd).is_none()
        {
            out.push(format!(
                "spec.services.{name}: packDomain {pd:?} is not a topology level of this cluster; use one of: {}",
                ctx.config.levels.names().join(", ")
            ));
        }
    }
    out
}

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.uid == uid))
}

fn our_pods(g: &Graph<'_>, ctx: &Context) -> Vec<Arc<Pod>> {
    ctx.pods.state_filter(|p| {
        p.metadata.namespace.as_deref() == Some(&g.ns)
            && p.labels().get(gang::LABEL_GRAPH) == Some(&g.name)
            && owned_by(&p.metadata, &g.uid)
    })
}

fn observe(p: &Pod, pinned: &HashMap<String, (String, u32)>) -> Option<PodObs> {
    let labels = p.labels();
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let annotations = p.annotations();
    let phase = status.and_then(|s| s.phase.as_deref());
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"));
    Some(PodObs {
        service: labels.get(gang::LABEL_SERVICE)?.clone(),
        gang: labels.get(gang::LABEL_GANG)?.parse().ok()?,
        rank: labels.get(gang::LABEL_RANK)?.parse().ok()?,
        hash: labels
            .get(gang::LABEL_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        gated: spec
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| g.iter().any(|g| g.name == GANG_GATE)),
        pinned: annotations.contains_key(ANNOTATION_NODE)
            || p.uid().is_some_and(|u| pinned.contains_key(&u)),
        bound: spec.and_then(|s| s.node_name.as_ref()).is_some(),
        ready: ready_condition.is_some(),
        ready_since: ready_condition
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_second()),
        failed: matches!(phase, Some("Failed" | "Succeeded")),
        terminating: p.metadata.deletion_timestamp.is_some(),
        ungated_at: annotations
            .get(ANNOTATION_UNGATED_AT)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|t| t.as_second()),
    })
}

// === adapters and Services ===

/// Creates missing adapters, deletes those of removed services, and returns each service's
/// replica count (the adapter's `spec.replicas`, or the graph's for a new adapter).
async fn ensure_adapters(g: &Graph<'_>, ctx: &Context) -> Result<BTreeMap<String, u32>, Error> {
    let api: Api<DynamoGraphDeploymentScalingAdapter> = Api::namespaced(ctx.client.clone(), &g.ns);
    let existing: BTreeMap<String, Arc<DynamoGraphDeploymentScalingAdapter>> = ctx
        .adapters
        .state_filter(|a| {
            a.metadata.namespace.as_deref() == Some(&g.ns) && owned_by(&a.metadata, &g.uid)
        })
        .into_iter()
        .map(|a| (a.spec.dgd_ref.service.clone(), a))
        .collect();
    let mut replicas = BTreeMap::new();
    for (name, svc) in &g.dgd.spec.services {
        if let Some(a) = existing.get(name) {
            replicas.insert(name.clone(), a.spec.replicas.max(0) as u32);
            continue;
        }
        let adapter_name = gang::service_name(&g.name, name);
        let adapter = DynamoGraphDeploymentScalingAdapter {
            metadata: ObjectMeta {
                name: Some(adapter_name.clone()),
                namespace: Some(g.ns.clone()),
                labels: Some(gang::selector_labels(&g.name, name)),
                owner_references: Some(vec![gang::owner_reference(g.dgd)]),
                ..Default::default()
            },
            spec: ScalingAdapterSpec {
                replicas: svc.replicas(),
                dgd_ref: GraphServiceRef {
                    name: g.name.clone(),
                    service: name.clone(),
                },
            },
            status: None,
        };
        let n = match api.create(&PostParams::default(), &adapter).await {
            Ok(a) => a.spec.replicas,
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                // The cache is behind (e.g. just restarted): the adapter's value wins.
                api.get(&adapter_name)
                    .await
                    .map_err(kube_err(
                        "get",
                        "DynamoGraphDeploymentScalingAdapter",
                        &adapter_name,
                    ))?
                    .spec
                    .replicas
            }
            Err(e) => {
                return Err(kube_err(
                    "create",
                    "DynamoGraphDeploymentScalingAdapter",
                    &adapter_name,
                )(e));
            }
        };
        replicas.insert(name.clone(), n.max(0) as u32);
    }
    for (service, a) in &existing {
        if !g.dgd.spec.services.contains_key(service) {
            let n = a.name_any();
            idempotent(api.delete(&n, &DeleteParams::default()).await).map_err(kube_err(
                "delete",
                "DynamoGraphDeploymentScalingAdapter",
                &n,
            ))?;
        }
    }
    Ok(replicas)
}

/// Makes the graph's Services, disruption budgets and frontend identity what
/// [`children::wanted`] says, kinds side by side. The ServiceAccount comes before the pods that
/// name it (admission refuses a pod whose ServiceAccount does not exist), the Role before its
/// RoleBinding (the API server checks a binding against the rules of the Role it names).
async fn ensure_children(
    g: &Graph<'_>,
    ctx: &Context,
    replicas: &BTreeMap<String, u32>,
) -> Result<(), Error> {
    let w = children::wanted(g.dgd, replicas);
    let c = &ctx.children;
    tokio::try_join!(
        converge(g, ctx, &c.service_accounts, w.service_accounts),
        converge(g, ctx, &c.roles, w.roles),
        converge(g, ctx, &c.services, w.services),
        converge(g, ctx, &c.pdbs, w.pdbs),
    )?;
    converge(g, ctx, &c.role_bindings, w.role_bindings).await
}

/// What [`converge`] does to one object.
enum Fix<K> {
    Create(K),
    Apply(K),
    Delete(String),
}

/// Makes this graph's objects of one kind match `wanted`: creates the missing ones, applies
/// (server-side, forced) the wanted form of those that drifted, deletes those whose immutable
/// fields drifted (recreated on the next reconcile, which their deletion triggers), and deletes
/// the graph's objects no longer wanted. Objects of the same name that this graph does not own
/// are left alone. With nothing to change it makes no API calls.
async fn converge<K>(
    g: &Graph<'_>,
    ctx: &Context,
    cache: &Store<K>,
    wanted: Vec<K>,
) -> Result<(), Error>
where
    K: Child
        + k8s_openapi::Resource<Scope = NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + 'static,
{
    let names: Vec<String> = wanted.iter().map(ResourceExt::name_any).collect();
    let mut fixes = Vec::new();
    for want in wanted {
        let Some(have) = cache.get(&ObjectRef::new(&want.name_any()).within(&g.ns)) else {
            fixes.push(Fix::Create(want));
            continue;
        };
        if !owned_by(have.meta(), &g.uid) || have.meta().deletion_timestamp.is_some() {
            continue;
        }
        match want.drift(&have) {
            Drift::None => {}
            Drift::Patch => fixes.push(Fix::Apply(want)),
            Drift::Recreate => fixes.push(Fix::Delete(have.name_any())),
        }
    }
    for have in cache.state_filter(|o| {
        o.meta().namespace.as_deref() == Some(&g.ns) && owned_by(o.meta(), &g.uid)
    }) {
        let n = have.name_any();
        if !names.contains(&n) && have.meta().deletion_timestamp.is_none() {
            fixes.push(Fix::Delete(n));
        }
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &g.ns);
    let results: Vec<Result<(), Error>> = stream::iter(fixes)
        .map(|fix| {
            let api = api.clone();
            async move {
                match fix {
                    Fix::Create(want) => {
                        let n = want.name_any();
                        idempotent(api.create(&PostParams::default(), &want).await)
                            .map_err(kube_err("create", K::KIND, &n))
                    }
                    Fix::Apply(want) => {
                        let n = want.name_any();
                        let params = PatchParams::apply(MANAGER).force();
                        api.patch(&n, &params, &Patch::Apply(&want))
                            .await
                            .map(drop)
                            .map_err(kube_err("apply", K::KIND, &n))
                    }
                    Fix::Delete(n) => idempotent(api.delete(&n, &DeleteParams::default()).await)
                        .map_err(kube_err("delete", K::KIND, &n)),
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Creates a disaggregated graph's KV transfer secret once (random, owned by the graph; never
/// rotated under running pods).
async fn ensure_kv_transfer_secret(g: &Graph<'_>, ctx: &Context) -> Result<(), Error> {
    let disaggregated = g
        .dgd
        .spec
        .services
        .values()
        .any(|s| matches!(s.role(), "prefill" | "decode"));
    if !disaggregated {
        return Ok(());
    }
    let name = gang::kv_transfer_secret_name(&g.name);
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(g.ns.clone()),
            owner_references: Some(vec![gang::owner_reference(g.dgd)]),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            gang::KV_TRANSFER_SECRET_KEY.to_owned(),
            format!("{:032x}", rand::random::<u128>()),
        )])),
        ..Default::default()
    };
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), &g.ns);
    idempotent(api.create(&PostParams::default(), &secret).await)
        .map_err(kube_err("create", "Secret", &name))
}

// === gangs ===

async fn create_gang(
    g: &Graph<'_>,
    ctx: &Context,
    service: &str,
    idx: u32,
    ranks: &[u32],
    desired: &[ServiceDesired],
) -> Result<(), Error> {
    let hash = desired
        .iter()
        .find(|d| d.name == service)
        .map(|d| d.hash.as_str())
        .unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &g.ns);
    let mut pods = Vec::new();
    for rank in ranks {
        let pod = gang::build_pod(&gang::PodContext {
            graph: g.dgd,
            service,
            gang: idx,
            rank: *rank,
            hash,
            default_image: &ctx.config.default_image,
        })
        .map_err(|message| Error::BuildPod {
            name: gang::pod_name(&g.name, service, idx, *rank),
            message,
        })?;
        pods.push(pod);
    }
    let results: Vec<Result<(), Error>> = stream::iter(pods)
        .map(|pod| {
            let api = api.clone();
            async move {
                let n = pod.name_any();
                idempotent(api.create(&PostParams::default(), &pod).await)
                    .map_err(kube_err("create", "Pod", &n))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

fn gang_pods<'a>(ours: &'a [Arc<Pod>], service: &str, idx: u32) -> Vec<&'a Arc<Pod>> {
    let idx = idx.to_string();
    let mut v: Vec<&Arc<Pod>> = ours
        .iter()
        .filter(|p| {
            p.labels().get(gang::LABEL_SERVICE).map(String::as_str) == Some(service)
                && p.labels().get(gang::LABEL_GANG) == Some(&idx)
        })
        .collect();
    v.sort_by_key(|p| {
        p.labels()
            .get(gang::LABEL_RANK)
            .and_then(|r| r.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    v
}

async fn delete_gang(
    g: &Graph<'_>,
    ctx: &Context,
    ours: &[Arc<Pod>],
    service: &str,
    idx: u32,
    reason: DeleteReason,
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &g.ns);
    let pods = gang_pods(ours, service, idx);
    if let Ok(mut pinned) = ctx.pinned.lock() {
        for p in &pods {
            if let Some(uid) = p.uid() {
                pinned.remove(&uid);
            }
        }
    }
    for p in &pods {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let n = p.name_any();
        idempotent(api.delete(&n, &DeleteParams::default()).await)
            .map_err(kube_err("delete", "Pod", &n))?;
    }
    let (kind, note) = match reason {
        DeleteReason::ScaledDown | DeleteReason::ServiceRemoved => (EventType::Normal, None),
        DeleteReason::Rollout => (
            EventType::Normal,
            Some(format!(
                "replacing gang {service}/{idx} with the new pod template"
            )),
        ),
        DeleteReason::PartialBindTimeout => (
            EventType::Warning,
            Some(format!(
                "gang {service}/{idx} was only partly bound after {}; deleting it to place it again",
                humantime::format_duration(ctx.config.gang_deadline)
            )),
        ),
        DeleteReason::Broken => (
            EventType::Warning,
            Some(format!(
                "gang {service}/{idx} lost or failed a pod; recreating the whole gang"
            )),
        ),
        DeleteReason::HalfPinned => (
            EventType::Warning,
            Some(format!(
                "gang {service}/{idx} was half pinned; recreating it"
            )),
        ),
    };
    if let Some(note) = note {
        publish(ctx, g.dgd, kind, reason.as_str(), &note).await;
    }
    Ok(())
}

/// Builds the node view: allocatable GPUs of ready, schedulable nodes minus what bound or pinned
/// pods ask for.
fn cluster_view(ctx: &Context) -> ClusterView {
    let nodes = ctx.nodes.state().into_iter().filter_map(|n| {
        let spec = n.spec.as_ref();
        if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
            return None;
        }
        let status = n.status.as_ref()?;
        let ready = status
            .conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            return None;
        }
        let alloc = |k: &str| {
            status
                .allocatable
                .as_ref()
                .and_then(|a| a.get(k))
                .and_then(|q| q.0.parse::<u32>().ok())
                .unwrap_or(0)
        };
        Some(NodeInfo {
            name: n.name_any(),
            labels: n.labels().clone(),
            free_gpus: alloc(gang::GPU_RESOURCE),
            free_pods: alloc("pods"),
            taints: spec
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .map(|t| Taint {
                    key: t.key,
                    value: t.value.unwrap_or_default(),
                    effect: t.effect,
                })
                .collect(),
        })
    });
    let mut view = ClusterView::new(nodes);
    let mut pinned = ctx.pinned.lock().map(|p| p.clone()).unwrap_or_default();
    let mut keep = HashMap::new();
    for p in ctx.pods.state() {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let uid = p.uid().unwrap_or_default();
        let cached = pinned.remove(&uid);
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .or_else(|| p.annotations().get(ANNOTATION_NODE).cloned());
        match (node, cached) {
            (Some(node), _) => view.reserve(&node, gang::pod_gpus(&p)),
            (None, Some((node, gpus))) => {
                view.reserve(&node, gpus);
                keep.insert(uid, (node, gpus));
            }
            (None, None) => {}
        }
    }
    // Pins whose pod is gone or shows its pin now need no memory any more.
    if let Ok(mut p) = ctx.pinned.lock() {
        *p = keep;
    }
    view
}

fn tolerations(pod: &Pod) -> Vec<Toleration> {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| Toleration {
            key: t.key.unwrap_or_default(),
            operator: t.operator.unwrap_or_else(|| "Equal".into()),
            value: t.value.unwrap_or_default(),
            effect: t.effect.unwrap_or_default(),
        })
        .collect()
}

/// The pod's `nodeSelector` and required node affinity, for placement.
fn node_constraints(pod: &Pod) -> NodeConstraints {
    let Some(spec) = pod.spec.as_ref() else {
        return NodeConstraints::default();
    };
    let requirements = |rs: &Option<Vec<NodeSelectorRequirement>>| -> Vec<Requirement> {
        rs.iter()
            .flatten()
            .map(|r| Requirement {
                key: r.key.clone(),
                operator: r.operator.clone(),
                values: r.values.clone().unwrap_or_default(),
            })
            .collect()
    };
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    NodeConstraints {
        node_selector: spec.node_selector.clone().unwrap_or_default(),
        required_terms: required.map(|r| {
            r.node_selector_terms
                .iter()
                .map(|t| NodeTerm {
                    match_expressions: requirements(&t.match_expressions),
                    match_fields: requirements(&t.match_fields),
                })
                .collect()
        }),
    }
}

/// A placed gang: service, gang index, and each pod with its node.
type GangPins = (String, u32, Vec<(Arc<Pod>, String)>);

/// Places gangs (under the placement lock), pins their pods, and lifts their gates.
/// Returns a message for each gang that fits nowhere.
async fn place_gangs(
    g: &Graph<'_>,
    ctx: &Context,
    ours: &[Arc<Pod>],
    gangs: &[(String, u32)],
) -> Result<Vec<String>, Error> {
    let mut pins: Vec<GangPins> = Vec::new();
    let mut unplaced = Vec::new();
    {
        let _lock = ctx.placement_lock.lock().await;
        let mut view = cluster_view(ctx);
        for (service, idx) in gangs {
            let pods = gang_pods(ours, service, *idx);
            let Some(first) = pods.first() else { continue };
            let svc = g.dgd.spec.services.get(service);
            let pack_domain = svc
                .and_then(|s| s.pack_domain(&g.dgd.spec))
                .and_then(|pd| ctx.config.levels.index_of(pd))
                .map_or(PackDomain::Tightest, PackDomain::Level);
            let request = GangRequest {
                pods: pods.len() as u32,
                gpus_per_pod: gang::pod_gpus(first),
                pack_domain,
                tolerations: tolerations(first),
                node_constraints: node_constraints(first),
            };
            match view.place(&ctx.config.levels, &request) {
                Ok(placement) => {
                    if let Ok(mut pinned) = ctx.pinned.lock() {
                        for (p, node) in pods.iter().zip(&placement.nodes) {
                            if let Some(uid) = p.uid() {
                                pinned.insert(uid, (node.clone(), request.gpus_per_pod));
                            }
                        }
                    }
                    let assigned = pods
                        .iter()
                        .map(|p| Arc::clone(p))
                        .zip(placement.nodes.iter().cloned())
                        .collect();
                    pins.push((service.clone(), *idx, assigned));
                }
                Err(no_fit) => unplaced.push(format!("gang {service}/{idx} {no_fit}")),
            }
        }
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &g.ns);
    for (service, idx, assigned) in &pins {
        for (pod, node) in assigned {
            let n = pod.name_any();
            let affinity =
                gang::pinned_affinity(pod.spec.as_ref().and_then(|s| s.affinity.as_ref()), node);
            let patch = json!({
                "metadata": {"annotations": {ANNOTATION_NODE: node}},
                "spec": {"affinity": affinity},
            });
            api.patch(&n, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(kube_err("pin", "Pod", &n))?;
        }
        ungate(&api, assigned.iter().map(|(p, _)| p)).await?;
        ctx.metrics.gangs_placed.inc();
        tracing::info!(graph = %g.name, gang = %format!("{service}/{idx}"),
            nodes = ?assigned.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), "gang placed");
    }
    Ok(unplaced)
}

async fn ungate_gang(
    ctx: &Context,
    ours: &[Arc<Pod>],
    service: &str,
    idx: u32,
) -> Result<(), Error> {
    let pods = gang_pods(ours, service, idx);
    let Some(ns) = pods.first().and_then(|p| p.namespace()) else {
        return Ok(());
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    ungate(&api, pods.into_iter()).await
}

async fn ungate<'a>(api: &Api<Pod>, pods: impl Iterator<Item = &'a Arc<Pod>>) -> Result<(), Error> {
    let now = Timestamp::now().to_string();
    for pod in pods {
        let gated = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| g.iter().any(|g| g.name == GANG_GATE));
        if !gated {
            continue;
        }
        let n = pod.name_any();
        let patch = json!({
            "metadata": {"annotations": {ANNOTATION_UNGATED_AT: now}},
            "spec": {"schedulingGates": [{"$patch": "delete", "name": GANG_GATE}]},
        });
        idempotent(
            api.patch(&n, &PatchParams::default(), &Patch::Strategic(patch))
                .await,
        )
        .map_err(kube_err("ungate", "Pod", &n))?;
    }
    Ok(())
}

// === status ===

fn condition(
    dgd: &DynamoGraphDeployment,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    // Keep the transition time while the status stays the same.
    let since = dgd
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Timestamp::now().to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Some(since),
        observed_generation: dgd.metadata.generation,
    }
}

fn graph_status(g: &Graph<'_>, p: &plan::Plan, unplaced: &[String]) -> DynamoGraphDeploymentStatus {
    let dgd = g.dgd;
    let mut services = BTreeMap::new();
    let mut ready_services = 0;
    let mut not_ready = Vec::new();
    for name in dgd.spec.services.keys() {
        let c = p.counts.get(name).copied().unwrap_or_default();
        let done = c.ready == c.replicas && c.updated == c.replicas && c.existing == c.replicas;
        if done {
            ready_services += 1;
        } else {
            not_ready.push(format!("{name} {}/{} gangs ready", c.ready, c.replicas));
        }
        services.insert(
            name.clone(),
            ServiceStatus {
                replicas: c.replicas as i32,
                ready_replicas: c.ready as i32,
                updated_replicas: c.updated as i32,
            },
        );
    }
    let total = dgd.spec.services.len();
    let ready = ready_services == total;
    let placed = if unplaced.is_empty() {
        condition(
            dgd,
            "GangsPlaced",
            true,
            "AllGangsPlaced",
            "every gang is placed",
        )
    } else {
        let mut msg = unplaced
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if unplaced.len() > 3 {
            msg.push_str(&format!("; and {} more", unplaced.len() - 3));
        }
        condition(dgd, "GangsPlaced", false, "Unschedulable", &msg)
    };
    let ready_cond = if ready {
        condition(
            dgd,
            "Ready",
            true,
            "AllGangsReady",
            "every service has all its gangs ready",
        )
    } else {
        condition(dgd, "Ready", false, "GangsNotReady", &not_ready.join(", "))
    };
    DynamoGraphDeploymentStatus {
        state: Some(if ready { "ready" } else { "pending" }.into()),
        ready_services: Some(format!("{ready_services}/{total}")),
        observed_generation: dgd.metadata.generation,
        conditions: vec![ready_cond, placed],
        services,
        // The planner writes its own field (its own field manager): leaving it out here keeps
        // the controller's apply from overwriting a newer decision with a cached one.
        planner: None,
    }
}

/// Writes the status when it changed; returns whether it did.
async fn write_status(
    g: &Graph<'_>,
    ctx: &Context,
    status: DynamoGraphDeploymentStatus,
) -> Result<bool, Error> {
    if g.dgd.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<DynamoGraphDeployment> = Api::namespaced(ctx.client.clone(), &g.ns);
    let patch = json!({
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoGraphDeployment",
        "status": status,
    });
    api.patch_status(
        &g.name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(kube_err("patch_status", "DynamoGraphDeployment", &g.name))?;
    Ok(true)
}

async fn write_adapter_status(g: &Graph<'_>, ctx: &Context, p: &plan::Plan) -> Result<(), Error> {
    let api: Api<DynamoGraphDeploymentScalingAdapter> = Api::namespaced(ctx.client.clone(), &g.ns);
    for name in g.dgd.spec.services.keys() {
        let adapter_name = gang::service_name(&g.name, name);
        let Some(current) = ctx
            .adapters
            .get(&ObjectRef::new(&adapter_name).within(&g.ns))
        else {
            continue; // just created; the next reconcile fills it in
        };
        let c = p.counts.get(name).copied().unwrap_or_default();
        let old = current.status.clone().unwrap_or_default();
        let mut status = ScalingAdapterStatus {
            replicas: c.existing as i32,
            ready_replicas: c.ready as i32,
            selector: gang::selector_string(&g.name, name),
            last_scale_time: old.last_scale_time.clone(),
        };
        if old.replicas != status.replicas || old.last_scale_time.is_none() {
            status.last_scale_time = Some(Timestamp::now().to_string());
        }
        if old == status {
            continue;
        }
        let patch = json!({
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoGraphDeploymentScalingAdapter",
            "status": status,
        });
        api.patch_status(
            &adapter_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(kube_err(
            "patch_status",
            "DynamoGraphDeploymentScalingAdapter",
            &adapter_name,
        ))?;
    }
    Ok(())
}

async fn publish(
    ctx: &Context,
    dgd: &DynamoGraphDeployment,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &dgd.object_ref(&())).await {
        tracing::warn!(graph = %dgd.name_any(), error = %e, "could not record an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_constraints_come_from_the_pods_selector_and_required_affinity() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [{"name": "main"}],
                "nodeSelector": {"gpu": "h100"},
                "affinity": {"nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "Exists"}]},
                        {"matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": ["n1"]}
                        ]},
                    ]},
                    "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {
                        "matchExpressions": [{"key": "fast", "operator": "Exists"}]
                    }}],
                }},
            },
        }))
        .expect("pod");
        let c = node_constraints(&pod);
        assert_eq!(c.node_selector.get("gpu").map(String::as_str), Some("h100"));
        let terms = c.required_terms.expect("required terms");
        assert_eq!(terms.len(), 2, "preferred terms are not constraints");
        assert_eq!(terms[0].match_expressions[0].operator, "Exists");
        assert!(terms[0].match_expressions[0].values.is_empty());
        assert_eq!(terms[1].match_fields[0].values, ["n1"]);

        let bare: Pod = serde_json::from_value(json!({"spec": {"containers": []}})).expect("pod");
        assert_eq!(node_constraints(&bare), NodeConstraints::default());
    }
}
