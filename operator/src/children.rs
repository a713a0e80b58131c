//! The graph's objects besides pods and scaling adapters: what should exist, and whether an
//! existing one has drifted from it. Pure; the controller creates, patches and deletes.
//!
//! For graph `G` and each service `S` (slug `s`):
//! - the headless Service `G-s-pods` (pod DNS for gangs, not-ready addresses published);
//! - a frontend's ClusterIP Service `G-s` on `http` 8000;
//! - a worker kind's (worker, prefill, decode) discovery Service `G-s`: headless, endpoints only
//!   for Ready pods, only gang leaders (rank 0), port `grpc` 9000, labelled
//!   `nvidia.com/dynamo-discovery=worker` (the EndpointSlice controller copies the labels onto its
//!   slices, which is what the frontend watches);
//! - a PodDisruptionBudget `G-s` with `minAvailable = (replicas - 1) × nodeCount`: a drain may
//!   take one gang at a time. An integer `minAvailable` is the only form the disruption controller
//!   can evaluate for pods whose controller (the graph) has no scale subresource; `maxUnavailable`
//!   or a percentage would leave the budget failed and every eviction refused;
//! - when the graph has a frontend: ServiceAccount, Role (EndpointSlices get/list/watch) and
//!   RoleBinding, all `G-frontend`.
//!
//! Everything carries the graph label and the graph as controller owner.

use std::collections::BTreeMap;

use dynamo_crds::{ComponentType, DynamoGraphDeployment};
use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::gang::{self, LABEL_DISCOVERY, LABEL_GRAPH};

/// Everything [`wanted`] says a graph should have, by kind.
#[derive(Debug, Default)]
pub struct Wanted {
    pub services: Vec<Service>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub service_accounts: Vec<ServiceAccount>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
}

/// What the controller does about an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    /// It is as wanted.
    None,
    /// A field we set differs: apply the wanted object.
    Patch,
    /// An immutable field differs (a Service's headlessness, a RoleBinding's roleRef): delete it;
    /// the next reconcile creates it anew.
    Recreate,
}

/// An object kind the graph owns, compared on the fields the operator sets (the API server
/// defaults others, which must not count as drift).
pub trait Child {
    fn drift(&self, existing: &Self) -> Drift;
}

/// The objects graph `dgd` should have; `replicas` holds each service's gang count (from its
/// scaling adapter).
pub fn wanted(dgd: &DynamoGraphDeployment, replicas: &BTreeMap<String, u32>) -> Wanted {
    let graph = dgd.metadata.name.clone().unwrap_or_default();
    let ns = dgd.metadata.namespace.clone().unwrap_or_default();
    let meta = |name: String, labels: BTreeMap<String, String>| ObjectMeta {
        name: Some(name),
        namespace: Some(ns.clone()),
        labels: Some(labels),
        owner_references: Some(vec![gang::owner_reference(dgd)]),
        ..Default::default()
    };
    let mut out = Wanted::default();
    for (name, svc) in &dgd.spec.services {
        let selector = gang::selector_labels(&graph, name);
        out.services.push(Service {
            metadata: meta(gang::headless_service_name(&graph, name), selector.clone()),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                selector: Some(selector.clone()),
                publish_not_ready_addresses: Some(true),
                ..Default::default()
            }),
            status: None,
        });
        if svc.component_type == ComponentType::Frontend {
            out.services.push(Service {
                metadata: meta(gang::service_name(&graph, name), selector.clone()),
                spec: Some(ServiceSpec {
                    type_: Some("ClusterIP".into()),
                    selector: Some(selector.clone()),
                    ports: Some(vec![port("http", gang::FRONTEND_PORT)]),
                    ..Default::default()
                }),
                status: None,
            });
        } else if svc.component_type.is_worker() {
            let mut labels = selector.clone();
            labels.insert(LABEL_DISCOVERY.into(), "worker".into());
            out.services.push(Service {
                metadata: meta(gang::service_name(&graph, name), labels),
                spec: Some(ServiceSpec {
                    cluster_ip: Some("None".into()),
                    selector: Some(gang::leader_selector_labels(&graph, name)),
                    publish_not_ready_addresses: Some(false),
                    ports: Some(vec![port("grpc", gang::WORKER_PORT)]),
                    ..Default::default()
                }),
                status: None,
            });
        }
        let gangs = replicas.get(name).copied().unwrap_or(0);
        let floor = gangs.saturating_sub(1) as i32 * svc.node_count();
        out.pdbs.push(PodDisruptionBudget {
            metadata: meta(gang::service_name(&graph, name), selector.clone()),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(floor)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector),
                    match_expressions: None,
                }),
                // A pod that is not ready anyway (a gang still waiting for room, or crashing)
                // never blocks a node drain.
                unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
                max_unavailable: None,
            }),
            status: None,
        });
    }
    if dgd
        .spec
        .services
        .values()
        .any(|s| s.component_type == ComponentType::Frontend)
    {
        let name = gang::frontend_identity_name(&graph);
        let labels = BTreeMap::from([(LABEL_GRAPH.to_string(), graph.clone())]);
        out.service_accounts.push(ServiceAccount {
            metadata: meta(name.clone(), labels.clone()),
            ..Default::default()
        });
        out.roles.push(Role {
            metadata: meta(name.clone(), labels.clone()),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["discovery.k8s.io".into()]),
                resources: Some(vec!["endpointslices".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            }]),
        });
        out.role_bindings.push(RoleBinding {
            metadata: meta(name.clone(), labels),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name,
                namespace: Some(ns.clone()),
                api_group: None,
            }]),
        });
    }
    out
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Every label we set is there with our value (others may add labels).
fn labels_differ(wanted: &ObjectMeta, existing: &ObjectMeta) -> bool {
    let have = existing.labels.clone().unwrap_or_default();
    wanted
        .labels
        .iter()
        .flatten()
        .any(|(k, v)| have.get(k) != Some(v))
}

/// A field we set (`Some`) differs from the existing one.
fn set_and_differs<T: PartialEq>(wanted: &Option<T>, existing: &Option<T>) -> bool {
    wanted.is_some() && wanted != existing
}

fn patch_if(differs: bool) -> Drift {
    if differs { Drift::Patch } else { Drift::None }
}

// === impl Child ===

impl Child for Service {
    fn drift(&self, existing: &Self) -> Drift {
        let (want, have) = (
            self.spec.clone().unwrap_or_default(),
            existing.spec.clone().unwrap_or_default(),
        );
        let headless = |s: &ServiceSpec| s.cluster_ip.as_deref() == Some("None");
        if headless(&want) != headless(&have) {
            return Drift::Recreate;
        }
        let ports = |s: &ServiceSpec| {
            s.ports
                .iter()
                .flatten()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.port,
                        p.target_port.clone(),
                        p.protocol.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        patch_if(
            labels_differ(&self.metadata, &existing.metadata)
                || want.selector != have.selector
                || ports(&want) != ports(&have)
                || want.publish_not_ready_addresses.unwrap_or(false)
                    != have.publish_not_ready_addresses.unwrap_or(false)
                || set_and_differs(&want.type_, &have.type_),
        )
    }
}

impl Child for PodDisruptionBudget {
    fn drift(&self, existing: &Self) -> Drift {
        let (want, have) = (
            self.spec.clone().unwrap_or_default(),
            existing.spec.clone().unwrap_or_default(),
        );
        patch_if(
            labels_differ(&self.metadata, &existing.metadata)
                || want.min_available != have.min_available
                || want.max_unavailable != have.max_unavailable
                || want.selector != have.selector
                || set_and_differs(
                    &want.unhealthy_pod_eviction_policy,
                    &have.unhealthy_pod_eviction_policy,
                ),
        )
    }
}

impl Child for ServiceAccount {
    fn drift(&self, existing: &Self) -> Drift {
        patch_if(labels_differ(&self.metadata, &existing.metadata))
    }
}

impl Child for Role {
    fn drift(&self, existing: &Self) -> Drift {
        patch_if(labels_differ(&self.metadata, &existing.metadata) || self.rules != existing.rules)
    }
}

impl Child for RoleBinding {
    fn drift(&self, existing: &Self) -> Drift {
        if self.role_ref != existing.role_ref {
            return Drift::Recreate;
        }
        patch_if(
            labels_differ(&self.metadata, &existing.metadata) || self.subjects != existing.subjects,
        )
    }
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
  services:
    Frontend: {componentType: frontend}
    Decode:
      componentType: worker
      subComponentType: decode
      replicas: 3
      multinode: {nodeCount: 2}
    Planner: {componentType: planner}
"#,
        )
        .expect("parses");
        g.metadata.uid = Some("uid-1".into());
        g
    }

    fn replicas() -> BTreeMap<String, u32> {
        BTreeMap::from([
            ("Frontend".into(), 1),
            ("Decode".into(), 3),
            ("Planner".into(), 1),
        ])
    }

    fn named<'a, T: k8s_openapi::Metadata<Ty = ObjectMeta>>(v: &'a [T], name: &str) -> &'a T {
        v.iter()
            .find(|o| o.metadata().name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn worker_discovery_service_selects_ready_leaders_on_the_grpc_port() {
        let w = wanted(&graph(), &replicas());
        let svc = named(&w.services, "llm-decode");
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels[LABEL_DISCOVERY], "worker");
        assert_eq!(labels[LABEL_GRAPH], "llm");
        let spec = svc.spec.clone().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(false));
        let selector = spec.selector.unwrap_or_default();
        assert_eq!(selector[gang::LABEL_RANK], "0");
        assert_eq!(selector[gang::LABEL_SERVICE], "Decode");
        let p = &spec.ports.unwrap_or_default()[0];
        assert_eq!(
            (p.name.as_deref(), p.port, p.target_port.clone()),
            (Some("grpc"), 9000, Some(IntOrString::Int(9000)))
        );
        // Gang DNS stays on its own Service; the frontend keeps its ClusterIP one; the planner
        // is not a worker.
        let pods = named(&w.services, "llm-decode-pods").spec.clone();
        assert_eq!(pods.and_then(|s| s.publish_not_ready_addresses), Some(true));
        let fe = named(&w.services, "llm-frontend").spec.clone();
        assert_eq!(fe.and_then(|s| s.type_).as_deref(), Some("ClusterIP"));
        assert!(
            !w.services
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some("llm-planner"))
        );
    }

    #[test]
    fn disruption_budgets_keep_all_gangs_but_one() {
        let w = wanted(&graph(), &replicas());
        let min = |name: &str| {
            named(&w.pdbs, name)
                .spec
                .clone()
                .and_then(|s| s.min_available)
        };
        // 3 gangs of 2 pods: 2 gangs must stay.
        assert_eq!(min("llm-decode"), Some(IntOrString::Int(4)));
        assert_eq!(min("llm-frontend"), Some(IntOrString::Int(0)));
        let spec = named(&w.pdbs, "llm-decode").spec.clone().expect("spec");
        assert_eq!(spec.max_unavailable, None);
        let sel = spec
            .selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        assert_eq!(sel, gang::selector_labels("llm", "Decode"));
        let none = wanted(&graph(), &BTreeMap::new());
        assert_eq!(
            named(&none.pdbs, "llm-decode")
                .spec
                .clone()
                .and_then(|s| s.min_available),
            Some(IntOrString::Int(0))
        );
    }

    #[test]
    fn the_frontend_gets_a_service_account_that_may_only_read_endpoint_slices() {
        let w = wanted(&graph(), &replicas());
        assert_eq!(w.service_accounts.len(), 1);
        let role = named(&w.roles, "llm-frontend");
        let rules = role.rules.clone().unwrap_or_default();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].api_groups.clone().unwrap_or_default(),
            ["discovery.k8s.io"]
        );
        assert_eq!(
            rules[0].resources.clone().unwrap_or_default(),
            ["endpointslices"]
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        let rb = named(&w.role_bindings, "llm-frontend");
        assert_eq!(
            (rb.role_ref.kind.as_str(), rb.role_ref.name.as_str()),
            ("Role", "llm-frontend")
        );
        let subject = &rb.subjects.clone().unwrap_or_default()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("llm-frontend", Some("team"))
        );
        for owner in [
            &role.metadata,
            &rb.metadata,
            &w.service_accounts[0].metadata,
        ] {
            assert_eq!(
                owner.owner_references.clone().unwrap_or_default()[0].uid,
                "uid-1"
            );
        }
        let mut no_frontend = graph();
        no_frontend.spec.services.remove("Frontend");
        let w = wanted(&no_frontend, &replicas());
        assert!(w.service_accounts.is_empty() && w.roles.is_empty() && w.role_bindings.is_empty());
    }

    #[test]
    fn server_defaults_are_not_drift_but_our_fields_are() {
        let w = wanted(&graph(), &replicas());
        let want = named(&w.services, "llm-decode").clone();
        let mut have = want.clone();
        if let Some(s) = have.spec.as_mut() {
            s.type_ = Some("ClusterIP".into());
            s.session_affinity = Some("None".into());
            s.ip_families = Some(vec!["IPv4".into()]);
        }
        if let Some(l) = have.metadata.labels.as_mut() {
            l.insert(
                "endpointslice.kubernetes.io/skip-mirror".into(),
                "true".into(),
            );
        }
        assert_eq!(want.drift(&have), Drift::None);
        if let Some(s) = have.spec.as_mut() {
            s.selector = Some(gang::selector_labels("llm", "Decode"));
        }
        assert_eq!(want.drift(&have), Drift::Patch, "leaders only");
        if let Some(s) = have.spec.as_mut() {
            s.cluster_ip = Some("10.96.0.7".into());
        }
        assert_eq!(
            want.drift(&have),
            Drift::Recreate,
            "headless cannot change in place"
        );

        let pdb = named(&w.pdbs, "llm-decode").clone();
        let scaled = named(
            &wanted(&graph(), &BTreeMap::from([("Decode".into(), 5)])).pdbs,
            "llm-decode",
        )
        .clone();
        assert_eq!(pdb.drift(&pdb.clone()), Drift::None);
        assert_eq!(scaled.drift(&pdb), Drift::Patch);

        let rb = named(&w.role_bindings, "llm-frontend").clone();
        let mut other = rb.clone();
        other.role_ref.name = "elsewhere".into();
        assert_eq!(rb.drift(&other), Drift::Recreate);
    }
}
