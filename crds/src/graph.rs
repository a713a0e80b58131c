//! `DynamoGraphDeployment` (`dgd`): a graph of services (frontend, workers, prefill, decode,
//! planner), each a number of replicas, each replica a gang of `multinode.nodeCount` pods.
//!
//! The shape follows NVIDIA Dynamo's CRD so its example manifests apply unchanged where they use
//! the supported subset. Fields we do not act on (probes, PVCs, ingress, ...) are accepted and kept
//! (`x-kubernetes-preserve-unknown-fields` on each service) and listed in [`ServiceSpec::ignored`].
//! This module owns the types and their server-side validation rules; what the operator does with
//! them lives in `dynamo-operator`.

// kube's `printcolumn(...)` entries repeat `type_ = ...`; clippy mistakes that for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The desired graph.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "nvidia.com",
    version = "v1alpha1",
    kind = "DynamoGraphDeployment",
    namespaced,
    shortname = "dgd",
    status = "DynamoGraphDeploymentStatus",
    derive = "Default",
    derive = "PartialEq",
    doc = "A graph of Dynamo services (frontend, workers, prefill, decode) deployed as topology-packed pod gangs.",
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "pending, ready or failed"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyServices",
        description = "services with all their gangs ready / services"
    ),
    printcolumn(
        name = "Planner",
        type_ = "string",
        json_path = ".status.planner.summary",
        description = "the SLA planner's last decision"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.services) || self.services.filter(k, self.services[k].componentType == 'frontend').size() <= 1",
        "message": "at most one service may have componentType: frontend (a graph has one OpenAI entry point); set the others to worker, prefill or decode"
    },
    {
        "rule": "!has(self.services) || self.services.all(k, k.matches('^[A-Za-z]([-A-Za-z0-9]{0,38}[A-Za-z0-9])?$'))",
        "message": "service names must start with a letter, contain only letters, digits and '-', and be at most 40 characters: they become part of pod and Service names"
    }
]))]
pub struct DynamoGraphDeploymentSpec {
    /// Services by name. The name (lowercased) becomes part of pod and Service names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub services: BTreeMap<String, ServiceSpec>,
    /// Environment variables for every service; a service's own `envs` override them by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<EnvVar>,
    /// The engine the workers run (informational for the operator; `dynamo serve` uses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_framework: Option<BackendFramework>,
    /// Default topology constraint for every service's gangs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_constraint: Option<TopologyConstraint>,
    /// Latency targets for the SLA planner (dynamo-rs extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    /// SLA planner settings (dynamo-rs extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planner: Option<PlannerSpec>,
}

/// One service of the graph.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.subComponentType) || self.componentType != 'frontend'",
        "message": "subComponentType (prefill or decode) applies to worker services, not to a frontend"
    }
]))]
pub struct ServiceSpec {
    /// What the service is: frontend, worker, prefill, decode or planner.
    pub component_type: ComponentType,
    /// For `componentType: worker` in a disaggregated graph: prefill or decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_component_type: Option<SubComponentType>,
    /// Number of gangs (replicas). Seeds the service's DynamoGraphDeploymentScalingAdapter, whose
    /// `spec.replicas` is the source of truth once it exists. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Per-pod resources. `gpu` becomes `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Pods per replica (a gang): rank 0 is the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multinode: Option<Multinode>,
    /// Environment variables for this service's containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<EnvVar>,
    /// Name of a Secret whose keys become environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from_secret: Option<String>,
    /// Dynamo namespace of the service (passed to pods as `DYN_NAMESPACE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamo_namespace: Option<String>,
    /// Labels added to the service's pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the service's pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Overrides the graph's topology constraint for this service's gangs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_constraint: Option<TopologyConstraint>,
    /// Pod spec fields merged into the generated pod; `mainContainer` into its container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_pod_spec: Option<ExtraPodSpec>,
    /// Fields of Dynamo's service spec that dynamo-rs accepts but does not act on.
    #[serde(flatten)]
    #[schemars(skip)]
    pub ignored: BTreeMap<String, Value>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComponentType {
    Frontend,
    #[default]
    Worker,
    Prefill,
    Decode,
    Planner,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubComponentType {
    Prefill,
    Decode,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendFramework {
    Sglang,
    Vllm,
    Trtllm,
    Mocker,
}

/// Requests and limits. Kubernetes needs GPU requests equal to limits; give either.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.gpu) || !has(self.limits.gpu) || self.requests.gpu == self.limits.gpu",
        "message": "resources.requests.gpu and resources.limits.gpu differ: GPUs cannot be overcommitted, so set them equal (or set only one)"
    }
]))]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceItem>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceItem {
    /// CPU quantity, e.g. "500m" or "4".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "isQuantity(self)", "message": "cpu must be a Kubernetes quantity such as \"500m\" or \"4\""}
    ]))]
    pub cpu: Option<String>,
    /// Memory quantity, e.g. "8Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), extend("x-kubernetes-validations" = [
        {"rule": "isQuantity(self)", "message": "memory must be a Kubernetes quantity such as \"512Mi\" or \"8Gi\""}
    ]))]
    pub memory: Option<String>,
    /// Whole GPUs per pod, e.g. "1" or "8" (becomes `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[0-9]+$')", "message": "gpu must be a whole number of GPUs such as \"1\" or \"8\" (fractions and units are not supported)"}
    ]))]
    pub gpu: Option<String>,
    /// Same as `gpu`, in the spelling some Dynamo examples use.
    #[serde(
        rename = "nvidia.com/gpu",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 4), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^[0-9]+$')", "message": "nvidia.com/gpu must be a whole number of GPUs such as \"1\" or \"8\""}
    ]))]
    pub nvidia_gpu: Option<String>,
    /// Dynamo's GPU type hint (accepted, not used for placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// Further extended resources by name, e.g. `rdma/ib: "1"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Multinode {
    /// Pods per gang; each pod runs on its own node. Default 1.
    #[schemars(range(min = 1, max = 64))]
    pub node_count: i32,
}

/// Where a gang must be packed: the name of a topology level the operator knows
/// (by default `zone`, `rack` or `host`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyConstraint {
    #[schemars(length(min = 1, max = 63))]
    pub pack_domain: String,
}

/// A container environment variable: `value`, or `valueFrom` as in a Pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A Kubernetes `EnvVarSource` (secretKeyRef, configMapKeyRef, fieldRef, ...), passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub value_from: Option<Value>,
}

/// Pod spec fields for the service's pods. `mainContainer` is merged into the generated container;
/// any other field (volumes, tolerations, nodeSelector, ...) is copied into the pod spec.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ExtraPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_container: Option<MainContainer>,
    /// Any further PodSpec field, passed through.
    #[serde(flatten)]
    #[schemars(skip)]
    pub pod_spec: BTreeMap<String, Value>,
}

/// The main container: `image`, `command`, `args`, plus any further Container field, passed through.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct MainContainer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Any further Container field (ports, volumeMounts, probes, ...), passed through.
    #[serde(flatten)]
    #[schemars(skip)]
    pub container: BTreeMap<String, Value>,
}

/// Latency targets the SLA planner holds the graph to.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sla {
    /// Time to first token target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self > 0.0", "message": "sla.ttftMs must be a positive number of milliseconds"}
    ]))]
    pub ttft_ms: Option<f64>,
    /// Inter-token latency target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self > 0.0", "message": "sla.itlMs must be a positive number of milliseconds"}
    ]))]
    pub itl_ms: Option<f64>,
}

/// SLA planner settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        "message": "planner.minReplicas is larger than planner.maxReplicas"
    }
]))]
pub struct PlannerSpec {
    /// How often the planner decides, as a duration such as "60s" or "2m". Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^([0-9]+(ms|s|m|h))+$')", "message": "planner.interval must be a duration such as \"30s\", \"2m\" or \"1m30s\""}
    ]))]
    pub interval: Option<String>,
    /// Most GPUs the planner may use for prefill and decode together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpu_budget: Option<i32>,
    /// Fewest replicas per planned service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// Most replicas per planned service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_replicas: Option<i32>,
    /// Sizing algorithm: `sla` (dynamo-rs's, the default) or `dynamo` (NVIDIA Dynamo's
    /// throughput-based planner, as a baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["sla", "dynamo"]))]
    pub algorithm: Option<String>,
    /// `active` (default) acts on its decisions; `advisory` decides and reports without scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["active", "advisory"]))]
    pub mode: Option<String>,
    /// The engine's performance profile, a `dynamo profile` JSON file (a path relative to the
    /// manifest under `dynamo serve`). Without one, a worker on the built-in engine is described
    /// by its own timing model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Bounds of a disaggregated graph's prefill pool (default: minReplicas and maxReplicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PoolBounds>,
    /// Bounds of a disaggregated graph's decode pool (default: minReplicas and maxReplicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<PoolBounds>,
    /// Read the frontend's metrics from Prometheus instead of scraping the frontend pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
}

/// Where the planner reads a graph's frontend metrics when Prometheus scrapes them.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('http://') || self.startsWith('https://')", "message": "planner.prometheus.url must be an http:// or https:// URL"}
    ]))]
    pub url: String,
    /// PromQL label matchers that pick this graph's frontend series, e.g.
    /// `namespace="prod",service="llama-frontend"`. Default: the graph's namespace and its
    /// frontend Service's name (the labels a ServiceMonitor on that Service gives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// The replica bounds a [`PlannerSpec`] sets, with its defaults filled in and negative values
/// read as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaBounds {
    /// `minReplicas` (default 1) and `maxReplicas` (default: what the caller says).
    pub min: u32,
    pub max: u32,
    /// `(min, max)` of a disaggregated graph's pools, the ends they leave out taken from above.
    pub prefill: Option<(u32, u32)>,
    pub decode: Option<(u32, u32)>,
    pub gpu_budget: Option<u32>,
}

impl PlannerSpec {
    /// The bounds this spec sets; `default_max` when it has no `maxReplicas`.
    pub fn replica_bounds(&self, default_max: u32) -> ReplicaBounds {
        let n = |v: Option<i32>, default: u32| v.map_or(default, |v| v.max(0) as u32);
        let (min, max) = (n(self.min_replicas, 1), n(self.max_replicas, default_max));
        let pool = |b: &Option<PoolBounds>| {
            b.as_ref()
                .map(|b| (n(b.min_replicas, min), n(b.max_replicas, max)))
        };
        ReplicaBounds {
            min,
            max,
            prefill: pool(&self.prefill),
            decode: pool(&self.decode),
            gpu_budget: self.gpu_budget.map(|b| b.max(0) as u32),
        }
    }
}

/// Fewest and most replicas of one planned pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        "message": "minReplicas is larger than maxReplicas"
    }
]))]
pub struct PoolBounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_replicas: Option<i32>,
}

// === status ===

/// What the operator observed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DynamoGraphDeploymentStatus {
    /// `pending` (gangs being created or placed), `ready` (every service has all its gangs ready),
    /// or `failed` (the spec cannot be realised; see the conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Services with all gangs ready, over services, e.g. "2/3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_services: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `GangsPlaced`, ... (standard Kubernetes condition shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per-service gang counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceStatus>,
    /// The SLA planner's last decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planner: Option<PlannerDecision>,
}

/// Gang counts of one service (a gang counts as ready when all its pods are).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Gangs wanted.
    pub replicas: i32,
    /// Gangs with every pod running and ready.
    pub ready_replicas: i32,
    /// Gangs whose pods run the current pod template.
    pub updated_replicas: i32,
}

/// A condition in the standard Kubernetes shape.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The planner's last decision: replicas per service and why.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannerDecision {
    /// RFC 3339 time of the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// One line for `kubectl get dgd`, e.g. "Worker 2->3 (reactive)".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// `sla` or `dynamo`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub algorithm: String,
    /// `active`, `advisory` (decides without acting) or `stepped-back` (an autoscaler owns the
    /// service).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// `predictive` (the interval's forecast), `reactive` (a burst between intervals) or `hold`
    /// (no metrics).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Replicas per service before the decision.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub previous: BTreeMap<String, i32>,
    /// Replicas chosen per service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, i32>,
    /// Load the frontend saw over the window (requests/s, mean ISL and OSL, latencies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<PlannerLoad>,
    /// The load forecast for the next interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PlannerLoad>,
    /// Observed load and latency that led to it, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What the planner learned (tuned headroom, latency corrections, where prompts are
    /// prefilled, its last forecast): a restarted operator goes on from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<PlannerLearned>,
}

/// What the planner learned about a graph, kept across operator restarts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannerLearned {
    /// Fractions of the TTFT and ITL targets the model's mean latencies are held to.
    pub headroom_ttft: f64,
    pub headroom_itl: f64,
    /// Observed over modelled mean TTFT and ITL.
    pub correction_ttft: f64,
    pub correction_itl: f64,
    /// Share of requests the prefill pool prefills, and their mean prompt (disaggregated graphs).
    #[serde(default)]
    pub remote_share: f64,
    #[serde(default)]
    pub remote_isl: f64,
    /// Share of those prompts' tokens the prefill workers found in their caches.
    #[serde(default)]
    pub remote_hit_rate: f64,
    /// The last forecast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<PlannerLoad>,
}

/// A load as the planner saw or forecast it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannerLoad {
    /// Requests per second (in the engines' time: divided by a mocker's speedup ratio).
    pub requests_per_second: f64,
    /// Mean prompt tokens.
    pub isl: f64,
    /// Mean output tokens.
    pub osl: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<f64>,
    /// Share of requests that met both targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_attainment: Option<f64>,
}

fn preserved_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

// === impl ServiceSpec ===

impl ServiceSpec {
    /// Gangs asked for by the DGD (the scaling adapter may override it).
    pub fn replicas(&self) -> i32 {
        self.replicas.unwrap_or(1).max(0)
    }

    /// Pods per gang.
    pub fn node_count(&self) -> i32 {
        self.multinode.as_ref().map_or(1, |m| m.node_count.max(1))
    }

    /// Whole GPUs each pod asks for (limits win over requests, as Kubernetes requires them equal).
    pub fn gpus_per_pod(&self) -> u32 {
        fn pick(i: Option<&ResourceItem>) -> Option<&str> {
            i.and_then(|i| i.gpu.as_deref().or(i.nvidia_gpu.as_deref()))
        }
        let r = self.resources.as_ref();
        pick(r.and_then(|r| r.limits.as_ref()))
            .or_else(|| pick(r.and_then(|r| r.requests.as_ref())))
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The topology level this service's gangs are packed into, if any was asked for.
    pub fn pack_domain<'a>(&'a self, graph: &'a DynamoGraphDeploymentSpec) -> Option<&'a str> {
        self.topology_constraint
            .as_ref()
            .or(graph.topology_constraint.as_ref())
            .map(|t| t.pack_domain.as_str())
    }

    /// Sub-role for worker services: `prefill`/`decode` component types count as such too.
    pub fn role(&self) -> &'static str {
        match (self.component_type, self.sub_component_type) {
            (ComponentType::Frontend, _) => "frontend",
            (ComponentType::Planner, _) => "planner",
            (ComponentType::Prefill, _) | (_, Some(SubComponentType::Prefill)) => "prefill",
            (ComponentType::Decode, _) | (_, Some(SubComponentType::Decode)) => "decode",
            (ComponentType::Worker, None) => "worker",
        }
    }
}

impl ComponentType {
    /// Whether pods of this type serve requests as workers (a sidecar on the gRPC port):
    /// `worker`, `prefill` and `decode`.
    pub fn is_worker(&self) -> bool {
        matches!(
            self,
            ComponentType::Worker | ComponentType::Prefill | ComponentType::Decode
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ComponentType::Frontend => "frontend",
            ComponentType::Worker => "worker",
            ComponentType::Prefill => "prefill",
            ComponentType::Decode => "decode",
            ComponentType::Planner => "planner",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DYNAMO_EXAMPLE: &str = r#"
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata:
  name: vllm-disagg
spec:
  backendFramework: vllm
  topologyConstraint:
    packDomain: zone
  services:
    Frontend:
      dynamoNamespace: vllm-disagg
      componentType: frontend
      replicas: 1
      extraPodSpec:
        mainContainer:
          image: nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.6.0
          workingDir: /workspace
    VllmPrefillWorker:
      dynamoNamespace: vllm-disagg
      envFromSecret: hf-token-secret
      componentType: worker
      subComponentType: prefill
      replicas: 2
      multinode:
        nodeCount: 2
      topologyConstraint:
        packDomain: rack
      sharedMemory:
        size: 80Gi
      resources:
        limits:
          nvidia.com/gpu: "8"
      extraPodSpec:
        tolerations: [{key: gpu, operator: Exists}]
        mainContainer:
          image: nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.6.0
          command: ["/bin/sh", "-c"]
          args: ["python3 -m dynamo.vllm --model Qwen/Qwen3-0.6B --is-prefill-worker"]
"#;

    fn parse(text: &str) -> DynamoGraphDeployment {
        serde_saphyr::from_str(text).expect("manifest parses")
    }

    #[test]
    fn dynamo_example_keeps_unsupported_fields_instead_of_failing() {
        let dgd = parse(DYNAMO_EXAMPLE);
        let prefill = &dgd.spec.services["VllmPrefillWorker"];
        assert_eq!(prefill.role(), "prefill");
        assert_eq!(prefill.node_count(), 2);
        assert_eq!(prefill.gpus_per_pod(), 8);
        assert_eq!(prefill.pack_domain(&dgd.spec), Some("rack"));
        assert!(prefill.ignored.contains_key("sharedMemory"));
        let extra = prefill.extra_pod_spec.as_ref().expect("extraPodSpec");
        assert!(extra.pod_spec.contains_key("tolerations"));
        let fe = &dgd.spec.services["Frontend"];
        assert_eq!(fe.pack_domain(&dgd.spec), Some("zone"));
        let main = fe
            .extra_pod_spec
            .as_ref()
            .and_then(|e| e.main_container.as_ref())
            .expect("mainContainer");
        assert_eq!(main.container["workingDir"], "/workspace");
    }

    #[test]
    fn repo_manifests_parse_as_graphs() {
        let dir = std::path::Path::new(
            &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
        )
        .join("../manifests");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("manifests dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("readable");
                let dgd: DynamoGraphDeployment = serde_saphyr::from_str(&text)
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
                assert!(!dgd.spec.services.is_empty(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn service_defaults_are_one_replica_one_pod_no_gpu() {
        let svc = ServiceSpec::default();
        assert_eq!(
            (svc.replicas(), svc.node_count(), svc.gpus_per_pod()),
            (1, 1, 0)
        );
        assert_eq!(svc.role(), "worker");
    }

    #[test]
    fn workers_prefill_and_decode_are_worker_kinds() {
        let workers: Vec<_> = [
            ComponentType::Frontend,
            ComponentType::Worker,
            ComponentType::Prefill,
            ComponentType::Decode,
            ComponentType::Planner,
        ]
        .into_iter()
        .filter(ComponentType::is_worker)
        .map(|c| c.as_str())
        .collect();
        assert_eq!(workers, ["worker", "prefill", "decode"]);
    }
}
