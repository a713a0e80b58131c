//! Gangs: naming, labels and the pods of one replica of a service.
//!
//! A replica of a service is a gang of `multinode.nodeCount` pods, rank 0 the leader. Pods have
//! stable names (`<graph>-<service>-<gang>-<rank>`), so a restarted operator finds what it made
//! and creating twice is harmless. Every pod starts with the scheduling gate [`GANG_GATE`]; the
//! placement step pins it and lifts the gates of a whole gang together.
//! The template hash label says which pod template a pod was built from (for rolling updates).
//! Frontend pods find workers through the Kubernetes API (their own ServiceAccount, the worker
//! discovery Services' EndpointSlices); every pod gets the [`lifecycle`](crate::lifecycle)
//! defaults.

use std::collections::BTreeMap;

use dynamo_crds::{ComponentType, DynamoGraphDeployment, DynamoGraphDeploymentSpec, ServiceSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, Pod,
    PodSchedulingGate, PodSpec, ResourceRequirements, SecretEnvSource, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::lifecycle;

/// The scheduling gate every gang pod is created with.
pub const GANG_GATE: &str = "nvidia.com/gang";
/// GPU resource name.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

pub const LABEL_GRAPH: &str = "nvidia.com/dynamo-graph";
pub const LABEL_SERVICE: &str = "nvidia.com/dynamo-service";
pub const LABEL_COMPONENT: &str = "nvidia.com/dynamo-component-type";
pub const LABEL_GANG: &str = "nvidia.com/dynamo-gang";
pub const LABEL_RANK: &str = "nvidia.com/dynamo-rank";
pub const LABEL_TEMPLATE_HASH: &str = "nvidia.com/dynamo-template-hash";
/// On worker discovery Services (and so on their EndpointSlices): `worker`. The frontend watches
/// slices labelled with it and its graph.
pub const LABEL_DISCOVERY: &str = "nvidia.com/dynamo-discovery";
/// Set on a pod when placement pins it: the node it is pinned to.
pub const ANNOTATION_NODE: &str = "nvidia.com/dynamo-placement-node";
/// Set on a pod when its gate is lifted: RFC 3339 time (for the partial-binding deadline).
pub const ANNOTATION_UNGATED_AT: &str = "nvidia.com/dynamo-ungated-at";

/// Port of the frontend's OpenAI API (and its `/health`, `/live`), named `http`.
pub const FRONTEND_PORT: i32 = 8000;
/// Port of a worker's sidecar (gRPC and HTTP `/health`, `/live` on one port), named `grpc`.
pub const WORKER_PORT: i32 = 9000;

/// The lowercase form of a service name used in object names.
pub fn service_slug(service: &str) -> String {
    service.to_ascii_lowercase()
}

/// `<graph>-<service>-<gang>-<rank>`.
pub fn pod_name(graph: &str, service: &str, gang: u32, rank: u32) -> String {
    format!("{graph}-{}-{gang}-{rank}", service_slug(service))
}

/// The headless Service that gives gang pods DNS names (`<pod>.<this>.<ns>.svc`).
pub fn headless_service_name(graph: &str, service: &str) -> String {
    format!("{graph}-{}-pods", service_slug(service))
}

/// The Service of a frontend (ClusterIP) or of a worker service (headless, for discovery), and
/// the name of every service's scaling adapter and PodDisruptionBudget.
pub fn service_name(graph: &str, service: &str) -> String {
    format!("{graph}-{}", service_slug(service))
}

/// The frontend's ServiceAccount, and the Role and RoleBinding that let it read EndpointSlices.
pub fn frontend_identity_name(graph: &str) -> String {
    format!("{graph}-frontend")
}

/// Labels selecting every pod of a service.
pub fn selector_labels(graph: &str, service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_GRAPH.to_string(), graph.to_string()),
        (LABEL_SERVICE.to_string(), service.to_string()),
    ])
}

/// Labels selecting the leaders (rank 0) of a service's gangs: they serve requests.
pub fn leader_selector_labels(graph: &str, service: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(graph, service);
    labels.insert(LABEL_RANK.into(), "0".into());
    labels
}

/// The same selector as a string (`k=v,k=v`), for the scale subresource.
pub fn selector_string(graph: &str, service: &str) -> String {
    selector_labels(graph, service)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Names that must be valid DNS labels (Services) must fit in 63 characters.
pub fn check_names(graph: &str, service: &str) -> Result<(), String> {
    let longest = headless_service_name(graph, service);
    if longest.len() > 63 {
        return Err(format!(
            "the Service name {longest:?} would be {} characters (at most 63): shorten the graph name or service {service:?}",
            longest.len()
        ));
    }
    if !graph.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "graph name {graph:?} must start with a lowercase letter: it prefixes Service names"
        ));
    }
    Ok(())
}

/// FNV-1a 64: a hash that stays the same across Rust versions and operator restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hash of everything that shapes a service's pods (not its replica count).
pub fn template_hash(graph: &DynamoGraphDeploymentSpec, service: &ServiceSpec) -> String {
    let mut svc = service.clone();
    svc.replicas = None;
    let shape = serde_json::json!({
        "envs": graph.envs,
        "backend": graph.backend_framework,
        "service": svc,
        "packDomain": service.pack_domain(graph),
    });
    format!("{:016x}", fnv1a(shape.to_string().as_bytes()))[..10].to_string()
}

/// What [`build_pod`] needs besides the graph.
#[derive(Debug, Clone)]
pub struct PodContext<'a> {
    pub graph: &'a DynamoGraphDeployment,
    pub service: &'a str,
    pub gang: u32,
    pub rank: u32,
    pub hash: &'a str,
    /// Image for services whose `extraPodSpec.mainContainer.image` is empty.
    pub default_image: &'a str,
}

/// Builds one gang pod (gated, not pinned).
pub fn build_pod(ctx: &PodContext<'_>) -> Result<Pod, String> {
    let graph_name = ctx.graph.metadata.name.clone().unwrap_or_default();
    let ns = ctx.graph.metadata.namespace.clone().unwrap_or_default();
    let spec = &ctx.graph.spec;
    let svc = spec
        .services
        .get(ctx.service)
        .ok_or_else(|| format!("service {} is not in the graph", ctx.service))?;
    let world = svc.node_count();
    let name = pod_name(&graph_name, ctx.service, ctx.gang, ctx.rank);
    let subdomain = headless_service_name(&graph_name, ctx.service);
    let leader = pod_name(&graph_name, ctx.service, ctx.gang, 0);

    let mut labels = svc.labels.clone();
    labels.extend(selector_labels(&graph_name, ctx.service));
    labels.insert(
        LABEL_COMPONENT.into(),
        svc.component_type.as_str().to_string(),
    );
    labels.insert(LABEL_GANG.into(), ctx.gang.to_string());
    labels.insert(LABEL_RANK.into(), ctx.rank.to_string());
    labels.insert(LABEL_TEMPLATE_HASH.into(), ctx.hash.to_string());

    // Pass-through fields first; ours override.
    let extra = svc.extra_pod_spec.clone().unwrap_or_default();
    let main = extra.main_container.clone().unwrap_or_default();
    let mut pod_spec: PodSpec =
        serde_json::from_value(Value::Object(extra.pod_spec.clone().into_iter().collect()))
            .map_err(|e| format!("spec.services.{}.extraPodSpec: {e}", ctx.service))?;
    let mut container: Container =
        serde_json::from_value(Value::Object(main.container.clone().into_iter().collect()))
            .map_err(|e| {
                format!(
                    "spec.services.{}.extraPodSpec.mainContainer: {e}",
                    ctx.service
                )
            })?;

    container.name = "main".into();
    container.image = Some(
        main.image
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| ctx.default_image.to_string()),
    );
    if !main.command.is_empty() {
        container.command = Some(main.command.clone());
    }
    if !main.args.is_empty() {
        container.args = Some(main.args.clone());
    }

    // Env: graph, then service, then the container's own, then ours; later wins by name.
    let mut env: Vec<EnvVar> = Vec::new();
    let mut put = |e: EnvVar| {
        env.retain(|x| x.name != e.name);
        env.push(e);
    };
    for e in spec.envs.iter().chain(&svc.envs) {
        put(convert_env(e)?);
    }
    for e in container.env.take().unwrap_or_default() {
        put(e);
    }
    let dyn_ns = svc
        .dynamo_namespace
        .clone()
        .unwrap_or_else(|| format!("{ns}-{graph_name}"));
    for (k, v) in [
        ("DYN_NAMESPACE", dyn_ns),
        ("DYN_GRAPH", graph_name.clone()),
        ("DYN_SERVICE", ctx.service.to_string()),
        ("DYN_COMPONENT_TYPE", svc.role().to_string()),
        ("DYN_GANG", ctx.gang.to_string()),
        ("DYN_RANK", ctx.rank.to_string()),
        ("DYN_WORLD_SIZE", world.to_string()),
        ("DYN_LEADER_ADDR", format!("{leader}.{subdomain}.{ns}.svc")),
    ] {
        put(EnvVar {
            name: k.into(),
            value: Some(v),
            value_from: None,
        });
    }
    let role = svc.role();
    let gpus = svc.gpus_per_pod() * u32::try_from(svc.node_count()).unwrap_or(1);
    if matches!(role, "worker" | "prefill" | "decode") && gpus > 0 {
        // What the worker reports to the frontend (its GPU gauge, which the planner reads): the
        // gang's GPUs, since one sidecar serves the gang.
        put(EnvVar {
            name: "DYN_GPUS".into(),
            value: Some(gpus.to_string()),
            value_from: None,
        });
    }
    if role == "frontend"
        && let Some(sla) = &spec.sla
        && let (Some(ttft), Some(itl)) = (sla.ttft_ms, sla.itl_ms)
    {
        // The frontend counts requests that meet spec.sla (the planner reads the counts). It
        // judges wall-clock latencies, so targets are divided by the workers' mocker speedup.
        let speedup = spec
            .services
            .values()
            .find(|s| s.component_type.is_worker())
            .map_or(1.0, |w| {
                let args = w
                    .extra_pod_spec
                    .as_ref()
                    .and_then(|e| e.main_container.as_ref())
                    .map(|c| c.args.clone())
                    .unwrap_or_default();
                dynamo_planner::builtin::EngineShape::from_flags(&args, &[])
                    .map_or(1.0, |s| s.speedup)
            });
        for (k, v) in [("DYN_SLA_TTFT_MS", ttft), ("DYN_SLA_ITL_MS", itl)] {
            put(EnvVar {
                name: k.into(),
                value: Some((v / speedup).to_string()),
                value_from: None,
            });
        }
    }
    if matches!(role, "prefill" | "decode") {
        // Disaggregation: the sidecar's role (its own --role wins), the graph's KV transfer
        // secret, the address peers pull blocks from, and a fixed transfer port.
        let own: Vec<String> = spec
            .envs
            .iter()
            .chain(&svc.envs)
            .map(|e| e.name.clone())
            .collect();
        // Pods under the restricted profile share no IPC namespace: KV moves over TCP unless the
        // graph opts into shared memory (DYN_KV_TRANSFER_SHM=true in its env, with pods that can).
        for (k, v) in [
            ("DYN_ROLE", role),
            ("DYN_KV_TRANSFER_PORT", "9100"),
            ("DYN_KV_TRANSFER_SHM", "false"),
        ] {
            if !own.iter().any(|n| n == k) {
                put(EnvVar {
                    name: k.into(),
                    value: Some(v.into()),
                    value_from: None,
                });
            }
        }
        put(EnvVar {
            name: "DYN_KV_TRANSFER_SECRET".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: kv_transfer_secret_name(&graph_name),
                    key: KV_TRANSFER_SECRET_KEY.into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        });
        put(EnvVar {
            name: "POD_IP".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        });
    }
    container.env = Some(env);
    if let Some(secret) = &svc.env_from_secret {
        container
            .env_from
            .get_or_insert_with(Vec::new)
            .push(EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: None,
                }),
                ..Default::default()
            });
    }
    container.resources = Some(resources(svc, container.resources.take()));
    let serving = if svc.component_type == ComponentType::Frontend {
        frontend_discovery(&mut pod_spec, &mut container, &graph_name);
        Some(ensure_port(&mut container, "http", FRONTEND_PORT))
    } else if svc.component_type.is_worker() {
        Some(ensure_port(&mut container, "grpc", WORKER_PORT))
    } else {
        None
    };
    if matches!(role, "prefill" | "decode") {
        ensure_port(&mut container, "kv-transfer", KV_TRANSFER_PORT);
    }
    lifecycle::apply(&mut pod_spec, &mut container, serving);
    if svc.component_type.is_worker() {
        // Take the engine container out while the pod's volumes are borrowed for it.
        let mut others = std::mem::take(&mut pod_spec.containers);
        for c in others
            .iter_mut()
            .filter(|c| c.name == lifecycle::ENGINE_CONTAINER)
        {
            lifecycle::apply_engine(&mut pod_spec, c);
        }
        pod_spec.containers = others;
    }

    let mut containers = vec![container];
    containers.extend(pod_spec.containers.drain(..).filter(|c| c.name != "main"));
    pod_spec.containers = containers;
    pod_spec.hostname = Some(name.clone());
    pod_spec.subdomain = Some(subdomain);
    let mut gates = pod_spec.scheduling_gates.take().unwrap_or_default();
    if !gates.iter().any(|g| g.name == GANG_GATE) {
        gates.push(PodSchedulingGate {
            name: GANG_GATE.into(),
        });
    }
    pod_spec.scheduling_gates = Some(gates);

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns),
            labels: Some(labels),
            annotations: (!svc.annotations.is_empty()).then(|| svc.annotations.clone()),
            owner_references: Some(vec![owner_reference(ctx.graph)]),
            ..Default::default()
        },
        spec: Some(pod_spec),
        status: None,
    })
}

/// Declares `port` on the container as `name` unless it is declared already, and returns how a
/// probe should refer to it (the existing entry's name, else its number).
fn ensure_port(container: &mut Container, name: &str, port: i32) -> IntOrString {
    let ports = container.ports.get_or_insert_with(Vec::new);
    match ports.iter().find(|p| p.container_port == port) {
        Some(p) => match p.name.as_deref() {
            Some(n) if !n.is_empty() => IntOrString::String(n.into()),
            _ => IntOrString::Int(port),
        },
        None => {
            ports.push(ContainerPort {
                name: Some(name.into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..Default::default()
            });
            IntOrString::String(name.into())
        }
    }
}

/// The frontend discovers workers from the EndpointSlices of the graph's worker Services in its
/// own namespace, as the graph's frontend ServiceAccount (unless the manifest picks discovery or
/// a ServiceAccount itself).
fn frontend_discovery(pod: &mut PodSpec, container: &mut Container, graph: &str) {
    let env = container.env.get_or_insert_with(Vec::new);
    lifecycle::set_default_env(env, "DYN_DISCOVERY", "kubernetes");
    env.retain(|e| e.name != "DYN_K8S_NAMESPACE");
    env.push(EnvVar {
        name: "DYN_K8S_NAMESPACE".into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: "metadata.namespace".into(),
            }),
            ..Default::default()
        }),
    });
    if pod
        .service_account_name
        .as_deref()
        .is_none_or(str::is_empty)
    {
        pod.service_account_name = Some(frontend_identity_name(graph));
    }
}

/// The owner reference (controller) that ties an object to its graph, for garbage collection.
/// Port of a prefill or decode worker's KV transfer server.
pub const KV_TRANSFER_PORT: i32 = 9100;
/// Key of the graph's KV transfer secret in its Secret.
pub const KV_TRANSFER_SECRET_KEY: &str = "secret";

/// The Secret holding a graph's KV transfer secret: prefill and decode workers only serve KV
/// blocks (prompt content) to peers that know it.
pub fn kv_transfer_secret_name(graph: &str) -> String {
    format!("{graph}-kv-transfer")
}

pub fn owner_reference(graph: &DynamoGraphDeployment) -> OwnerReference {
    OwnerReference {
        api_version: "nvidia.com/v1alpha1".into(),
        kind: "DynamoGraphDeployment".into(),
        name: graph.metadata.name.clone().unwrap_or_default(),
        uid: graph.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn convert_env(e: &dynamo_crds::EnvVar) -> Result<EnvVar, String> {
    let value_from = match &e.value_from {
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|err| format!("env {}: valueFrom: {err}", e.name))?,
        ),
        None => None,
    };
    Ok(EnvVar {
        name: e.name.clone(),
        value: e.value.clone(),
        value_from,
    })
}

fn resources(svc: &ServiceSpec, base: Option<ResourceRequirements>) -> ResourceRequirements {
    let mut out = base.unwrap_or_default();
    let r = svc.resources.clone().unwrap_or_default();
    let fill = |item: Option<&dynamo_crds::ResourceItem>,
                into: &mut Option<BTreeMap<String, Quantity>>| {
        let Some(item) = item else { return };
        let map = into.get_or_insert_with(BTreeMap::new);
        for (k, v) in [("cpu", &item.cpu), ("memory", &item.memory)] {
            if let Some(v) = v {
                map.insert(k.into(), Quantity(v.clone()));
            }
        }
        for (k, v) in &item.custom {
            map.insert(k.clone(), Quantity(v.clone()));
        }
    };
    fill(r.requests.as_ref(), &mut out.requests);
    fill(r.limits.as_ref(), &mut out.limits);
    // Extended resources must have requests == limits.
    let gpus = svc.gpus_per_pod();
    if gpus > 0 {
        for m in [&mut out.requests, &mut out.limits] {
            m.get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
        }
    }
    out
}

/// GPUs a pod asks for (`nvidia.com/gpu` limits, else requests, summed over containers).
pub fn pod_gpus(pod: &Pod) -> u32 {
    let Some(spec) = &pod.spec else { return 0 };
    spec.containers
        .iter()
        .map(|c| {
            let r = c.resources.as_ref();
            let get = |m: Option<&BTreeMap<String, Quantity>>| {
                m.and_then(|m| m.get(GPU_RESOURCE))
                    .and_then(|q| q.0.parse::<u32>().ok())
            };
            get(r.and_then(|r| r.limits.as_ref()))
                .or_else(|| get(r.and_then(|r| r.requests.as_ref())))
                .unwrap_or(0)
        })
        .sum()
}

/// The affinity that pins a pod to `node`, narrowing any node affinity it already has: a gated
/// pod's required node affinity may only gain requirements, so each term keeps its own (a
/// `metadata.name` field of the manifest's included) and gets `metadata.name In [node]` added.
/// Placement only picks a node that satisfies one of the terms, so the pod can still go there.
pub fn pinned_affinity(current: Option<&Affinity>, node: &str) -> Affinity {
    let req = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "In".into(),
        values: Some(vec![node.to_string()]),
    };
    let mut affinity = current.cloned().unwrap_or_default();
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = na
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        let fields = term.match_fields.get_or_insert_with(Vec::new);
        if !fields.contains(&req) {
            fields.push(req.clone());
        }
    }
    affinity
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> DynamoGraphDeployment {
        let mut g: DynamoGraphDeployment = serde_saphyr::from_str(
            r#"
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: llm, namespace: team}
spec:
  envs: [{name: A, value: graph}, {name: B, value: graph}]
  services:
    Frontend:
      componentType: frontend
      extraPodSpec: {mainContainer: {image: fe:1, args: [frontend]}}
    Decode:
      componentType: worker
      subComponentType: decode
      replicas: 2
      multinode: {nodeCount: 2}
      envs: [{name: B, value: service}]
      resources: {limits: {gpu: "8", cpu: "4"}}
      extraPodSpec:
        tolerations: [{key: gpu, operator: Exists}]
        mainContainer: {image: w:1, workingDir: /w}
"#,
        )
        .expect("parses");
        g.metadata.uid = Some("uid-1".into());
        g
    }

    fn pod(g: &DynamoGraphDeployment, service: &str, gang: u32, rank: u32) -> Pod {
        build_pod(&PodContext {
            graph: g,
            service,
            gang,
            rank,
            hash: "abc",
            default_image: "dynamo-rs:latest",
        })
        .expect("builds")
    }

    fn env(p: &Pod, name: &str) -> Option<String> {
        p.spec.as_ref()?.containers[0]
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)?
            .value
            .clone()
    }

    #[test]
    fn disaggregated_workers_get_their_role_the_graph_secret_and_their_pod_ip() {
        let path = format!(
            "{}/../manifests/disagg.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("manifest");
        let mut g: DynamoGraphDeployment = serde_saphyr::from_str(&text).expect("parses");
        g.metadata.namespace = Some("team".into());
        for (service, role) in [("Prefill", "prefill"), ("Decode", "decode")] {
            let p = pod(&g, service, 0, 0);
            assert_eq!(env(&p, "DYN_ROLE").as_deref(), Some(role));
            assert_eq!(env(&p, "DYN_KV_TRANSFER_SHM").as_deref(), Some("false"));
            let c = &p.spec.as_ref().expect("spec").containers[0];
            let vars = c.env.as_ref().expect("env");
            let from = |name: &str| {
                vars.iter()
                    .find(|e| e.name == name)
                    .and_then(|e| e.value_from.clone())
                    .unwrap_or_else(|| panic!("{name} comes from a source"))
            };
            let secret = from("DYN_KV_TRANSFER_SECRET")
                .secret_key_ref
                .expect("secret");
            assert_eq!(
                (secret.name.as_str(), secret.key.as_str()),
                ("disagg-kv-transfer", "secret")
            );
            assert_eq!(
                from("POD_IP").field_ref.expect("field").field_path,
                "status.podIP"
            );
            let ports = c.ports.as_ref().expect("ports");
            assert!(
                ports
                    .iter()
                    .any(|p| p.name.as_deref() == Some("kv-transfer")
                        && p.container_port == KV_TRANSFER_PORT)
            );
        }
        let fe = pod(&g, "Frontend", 0, 0);
        assert_eq!(env(&fe, "DYN_ROLE"), None);
        assert_eq!(env(&fe, "DYN_GPUS"), None);
        assert_eq!(env(&fe, "DYN_KV_TRANSFER_SECRET"), None);
    }

    #[test]
    fn a_graph_with_an_sla_has_its_frontend_judge_requests_in_the_engines_time() {
        let path = format!(
            "{}/../manifests/planner.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("manifest");
        let mut g: DynamoGraphDeployment = serde_saphyr::from_str(&text).expect("parses");
        g.metadata.namespace = Some("team".into());
        let fe = pod(&g, "Frontend", 0, 0);
        assert_eq!(env(&fe, "DYN_SLA_TTFT_MS").as_deref(), Some("1000"));
        assert_eq!(env(&fe, "DYN_SLA_ITL_MS").as_deref(), Some("100"));
        assert_eq!(env(&pod(&g, "Worker", 0, 0), "DYN_SLA_TTFT_MS"), None);
        // A mocker 10x faster than real time: the frontend's wall-clock targets are 10x tighter.
        let fast = text.replace("\"--speedup-ratio\", \"1\"", "\"--speedup-ratio\", \"10\"");
        let mut g: DynamoGraphDeployment = serde_saphyr::from_str(&fast).expect("parses");
        g.metadata.namespace = Some("team".into());
        assert_eq!(
            env(&pod(&g, "Frontend", 0, 0), "DYN_SLA_TTFT_MS").as_deref(),
            Some("100")
        );
    }

    #[test]
    fn a_vllm_worker_pod_runs_the_sidecar_and_the_engine_each_restricted_with_writable_volumes() {
        let path = format!(
            "{}/../manifests/vllm-agg.yaml",
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("manifest");
        let mut g: DynamoGraphDeployment = serde_saphyr::from_str(&text).expect("parses");
        g.metadata.namespace = Some("team".into());
        let p = pod(&g, "VllmWorker", 0, 0);
        let spec = p.spec.expect("spec");
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["main", "engine"]);
        let (sidecar, engine) = (&spec.containers[0], &spec.containers[1]);
        assert_eq!(
            sidecar.args.as_ref().map(|a| a[..3].to_vec()),
            Some(vec![
                "sidecar".to_string(),
                "--engine".into(),
                "vllm".into()
            ])
        );
        assert!(
            engine
                .command
                .iter()
                .flatten()
                .any(|w| w == "vllm.entrypoints.openai.api_server")
        );
        for c in [sidecar, engine] {
            let sc = c.security_context.clone().expect("securityContext");
            assert_eq!(
                (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
                (Some(true), Some(false)),
                "{}",
                c.name
            );
            assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        }
        let psc = spec.security_context.clone().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        let mounts: Vec<(&str, &str)> = engine
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("models", "/models"),
                ("engine-tmp", "/tmp"),
                ("engine-cache", "/home/nonroot/.cache"),
                ("engine-shm", "/dev/shm")
            ]
        );
        let volume = |name: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("volume {name}"))
        };
        assert_eq!(
            volume("engine-shm")
                .empty_dir
                .and_then(|e| e.medium)
                .as_deref(),
            Some("Memory")
        );
        assert!(volume("engine-tmp").empty_dir.is_some());
        assert!(volume("models").host_path.is_some());
        let startup = engine
            .startup_probe
            .clone()
            .and_then(|p| p.http_get)
            .expect("startup probe");
        assert_eq!(
            (startup.path.as_deref(), startup.port),
            (Some("/health"), IntOrString::Int(8001))
        );
        assert!(engine.liveness_probe.is_some());
        let home = engine.env.iter().flatten().find(|e| e.name == "HOME");
        assert_eq!(home.and_then(|e| e.value.as_deref()), Some("/home/nonroot"));
        // The sidecar is the one the worker Service and the frontend reach.
        assert!(
            sidecar
                .ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("grpc"))
        );
    }

    #[test]
    fn gang_pods_have_stable_names_labels_and_rank_env() {
        let g = graph();
        let p = pod(&g, "Decode", 1, 1);
        assert_eq!(p.metadata.name.as_deref(), Some("llm-decode-1-1"));
        let labels = p.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels[LABEL_GANG], "1");
        assert_eq!(labels[LABEL_RANK], "1");
        assert_eq!(labels[LABEL_SERVICE], "Decode");
        assert_eq!(labels[LABEL_COMPONENT], "worker");
        assert_eq!(env(&p, "DYN_RANK").as_deref(), Some("1"));
        assert_eq!(env(&p, "DYN_WORLD_SIZE").as_deref(), Some("2"));
        // The gang's GPUs (8 per pod, 2 pods), reported by its sidecar to the frontend.
        assert_eq!(env(&p, "DYN_GPUS").as_deref(), Some("16"));
        assert_eq!(
            env(&p, "DYN_LEADER_ADDR").as_deref(),
            Some("llm-decode-1-0.llm-decode-pods.team.svc")
        );
        assert_eq!(env(&p, "A").as_deref(), Some("graph"));
        assert_eq!(
            env(&p, "B").as_deref(),
            Some("service"),
            "service env overrides graph env"
        );
        let owner = &p.metadata.owner_references.clone().unwrap_or_default()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("uid-1", Some(true))
        );
    }

    #[test]
    fn gang_pods_start_gated_with_gpu_resources_and_passthrough_fields() {
        let g = graph();
        let p = pod(&g, "Decode", 0, 0);
        let spec = p.spec.clone().expect("spec");
        assert_eq!(
            spec.scheduling_gates.clone().unwrap_or_default()[0].name,
            GANG_GATE
        );
        assert_eq!(pod_gpus(&p), 8);
        let c = &spec.containers[0];
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        let limits = c
            .resources
            .clone()
            .and_then(|r| r.limits)
            .unwrap_or_default();
        assert_eq!(limits["cpu"].0, "4");
        assert!(
            spec.tolerations
                .is_some_and(|t| t[0].key.as_deref() == Some("gpu"))
        );
        let fe = pod(&g, "Frontend", 0, 0);
        let fc = &fe.spec.expect("spec").containers[0];
        assert_eq!(fc.image.as_deref(), Some("fe:1"));
        assert_eq!(
            fc.ports.clone().unwrap_or_default()[0].container_port,
            FRONTEND_PORT
        );
        assert_eq!(pod_gpus(&pod(&g, "Frontend", 0, 0)), 0);
    }

    fn probe_port(p: &Pod) -> Option<(IntOrString, IntOrString)> {
        let c = &p.spec.as_ref()?.containers[0];
        let port = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
            probe?.http_get.as_ref().map(|h| h.port.clone())
        };
        Some((
            port(c.readiness_probe.as_ref())?,
            port(c.liveness_probe.as_ref())?,
        ))
    }

    #[test]
    fn workers_declare_the_grpc_port_and_are_probed_on_it() {
        let g = graph();
        let p = pod(&g, "Decode", 0, 1);
        let c = &p.spec.as_ref().expect("spec").containers[0];
        let port = &c.ports.clone().unwrap_or_default()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("grpc"), WORKER_PORT)
        );
        let grpc = IntOrString::String("grpc".into());
        assert_eq!(probe_port(&p), Some((grpc.clone(), grpc)));
        assert_eq!(env(&p, "DYN_DRAIN_TIMEOUT").as_deref(), Some("25s"));
        let spec = p.spec.clone().expect("spec");
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(
            spec.security_context.and_then(|s| s.run_as_non_root),
            Some(true)
        );
        assert_eq!(
            c.security_context
                .clone()
                .and_then(|s| s.read_only_root_filesystem),
            Some(true)
        );
        assert_eq!(spec.service_account_name, None, "workers keep the default");
        assert_eq!(env(&p, "DYN_DISCOVERY"), None);
    }

    #[test]
    fn frontends_discover_workers_through_the_api_as_their_own_service_account() {
        let g = graph();
        let p = pod(&g, "Frontend", 0, 0);
        let spec = p.spec.clone().expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("llm-frontend"));
        assert_eq!(env(&p, "DYN_DISCOVERY").as_deref(), Some("kubernetes"));
        assert_eq!(env(&p, "DYN_GRAPH").as_deref(), Some("llm"));
        let ns = spec.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "DYN_K8S_NAMESPACE")
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path);
        assert_eq!(ns.as_deref(), Some("metadata.namespace"));
        let http = IntOrString::String("http".into());
        assert_eq!(probe_port(&p), Some((http.clone(), http)));

        // What the manifest says wins.
        let mut g = graph();
        let fe = g.spec.services.get_mut("Frontend").expect("frontend");
        fe.envs.push(dynamo_crds::EnvVar {
            name: "DYN_DISCOVERY".into(),
            value: Some("static".into()),
            value_from: None,
        });
        let extra = fe.extra_pod_spec.get_or_insert_with(Default::default);
        extra
            .pod_spec
            .insert("serviceAccountName".into(), "mine".into());
        let p = pod(&g, "Frontend", 0, 0);
        assert_eq!(env(&p, "DYN_DISCOVERY").as_deref(), Some("static"));
        assert_eq!(
            p.spec.and_then(|s| s.service_account_name).as_deref(),
            Some("mine")
        );
    }

    #[test]
    fn every_container_pulls_if_not_present_unless_the_manifest_says_otherwise() {
        let mut g = graph();
        let extra = g
            .spec
            .services
            .get_mut("Decode")
            .and_then(|s| s.extra_pod_spec.as_mut())
            .expect("extraPodSpec");
        extra.pod_spec.insert(
            "containers".into(),
            serde_json::json!([
                {"name": "sidecar", "image": "s:1"},
                {"name": "pinned", "image": "s:2", "imagePullPolicy": "Always"},
            ]),
        );
        let p = pod(&g, "Decode", 0, 0);
        let policies: Vec<_> = p
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| (c.name.as_str(), c.image_pull_policy.as_deref()))
            .collect();
        assert_eq!(
            policies,
            [
                ("main", Some("IfNotPresent")),
                ("sidecar", Some("IfNotPresent")),
                ("pinned", Some("Always")),
            ]
        );
    }

    #[test]
    fn an_existing_port_is_probed_under_its_own_name() {
        let mut c = Container {
            ports: Some(vec![ContainerPort {
                name: Some("sidecar".into()),
                container_port: WORKER_PORT,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            ensure_port(&mut c, "grpc", WORKER_PORT),
            IntOrString::String("sidecar".into())
        );
        assert_eq!(c.ports.map(|p| p.len()), Some(1));
    }

    #[test]
    fn template_hash_ignores_replicas_but_sees_the_template() {
        let g = graph();
        let svc = g.spec.services["Decode"].clone();
        let h = template_hash(&g.spec, &svc);
        let mut scaled = svc.clone();
        scaled.replicas = Some(7);
        assert_eq!(h, template_hash(&g.spec, &scaled));
        let mut changed = svc;
        changed.envs.push(dynamo_crds::EnvVar {
            name: "NEW".into(),
            value: Some("1".into()),
            value_from: None,
        });
        assert_ne!(h, template_hash(&g.spec, &changed));
    }

    #[test]
    fn pinning_narrows_existing_node_affinity() {
        let a = pinned_affinity(None, "n1");
        let terms = a
            .node_affinity
            .and_then(|n| n.required_during_scheduling_ignored_during_execution)
            .expect("required")
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        assert_eq!(
            terms[0].match_fields.clone().unwrap_or_default()[0].values,
            Some(vec!["n1".to_string()])
        );
    }

    #[test]
    fn pinning_keeps_the_manifests_own_requirements() {
        let field = |op: &str, values: &[&str]| NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let gpu = NodeSelectorRequirement {
            key: "gpu".into(),
            operator: "In".into(),
            values: Some(vec!["h100".into()]),
        };
        let current = Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![
                        NodeSelectorTerm {
                            match_expressions: Some(vec![gpu.clone()]),
                            match_fields: None,
                        },
                        NodeSelectorTerm {
                            match_expressions: None,
                            match_fields: Some(vec![field("In", &["n1", "n2"])]),
                        },
                    ],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let terms_of = |a: &Affinity| {
            a.node_affinity
                .as_ref()
                .and_then(|n| {
                    n.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|r| r.node_selector_terms.clone())
                .unwrap_or_default()
        };
        let pinned = pinned_affinity(Some(&current), "n1");
        let terms = terms_of(&pinned);
        assert_eq!(terms.len(), 2, "no term added or removed");
        assert_eq!(terms[0].match_expressions, Some(vec![gpu]));
        assert_eq!(terms[0].match_fields, Some(vec![field("In", &["n1"])]));
        assert_eq!(
            terms[1].match_fields,
            Some(vec![field("In", &["n1", "n2"]), field("In", &["n1"])]),
            "only added to"
        );
        // Pinning again to the same node changes nothing.
        assert_eq!(terms_of(&pinned_affinity(Some(&pinned), "n1")), terms);
    }

    #[test]
    fn over_long_names_are_refused_with_the_name() {
        assert!(check_names("llm", "Decode").is_ok());
        let err =
            check_names(&"g".repeat(40), "averyveryverylongservicename").expect_err("too long");
        assert!(err.contains("63"), "{err}");
    }
}
