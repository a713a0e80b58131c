//! The dynamo-rs operator: reconciles each `DynamoGraphDeployment` into gangs of pods placed as a
//! whole inside one topology domain, Services, disruption budgets, the frontend's discovery
//! identity, and one scaling adapter per service.
//!
//! Pure logic, unit-tested on plain structs: [`placement`] (which nodes a gang goes to),
//! [`gang`] (pod names, labels, the pod a gang rank runs), [`lifecycle`] (probes, grace period,
//! drain deadline, security context every pod gets), [`children`] (the graph's Services,
//! PodDisruptionBudgets, frontend ServiceAccount/Role/RoleBinding, and when an existing one has
//! drifted), [`plan`] (desired against observed: create, place, un-gate, delete, roll). Talking
//! to the API server: [`controller`] (the kube-runtime controller), [`leader`] (Lease-based leader
//! election). Process plumbing: [`config`], [`telemetry`] (`/metrics`, `/healthz`).
//! [`planner`] runs the SLA planner, one loop per graph with `spec.sla`.

pub mod children;
pub mod config;
pub mod controller;
pub mod gang;
pub mod leader;
pub mod lifecycle;
pub mod placement;
pub mod plan;
pub mod planner;
pub mod telemetry;
