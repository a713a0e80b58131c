//! The dynamo-rs data plane: the OpenAI-compatible [`frontend`] with its [`router`], the worker
//! [`sidecar`] that fronts an engine over gRPC ([`proto`]), and [`serve`], which runs a
//! DynamoGraphDeployment [`manifest`] as local processes. The `dynamo` binary wires these up.

pub mod bench;
pub mod cli;
pub mod events;
pub mod frontend;
pub mod kv_router;
pub mod manifest;
pub mod net;
pub mod proto;
pub mod router;
pub mod run;
pub mod serve;
pub mod sidecar;
