//! The dynamo-rs operator: reconciles each `DynamoGraphDeployment` into gangs of pods placed as a
//! whole inside one topology domain, Services, and one scaling adapter per service.
//!
//! Pure logic, unit-tested on plain structs: [`placement`] (which nodes a gang goes to),
//! [`gang`] (pod names, labels, the pod a gang rank runs), [`plan`] (desired against observed:
//! create, place, un-gate, delete, roll). Talking to the API server: [`controller`] (the
//! kube-runtime controller), [`leader`] (Lease-based leader election). Process plumbing: [`config`], [`telemetry`] (`/metrics`, `/healthz`).
//! The SLA planner is not here yet.

pub mod config;
pub mod controller;
pub mod gang;
pub mod leader;
pub mod placement;
pub mod plan;
pub mod telemetry;
