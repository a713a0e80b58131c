//! The `dynamo` binary's library: the command line ([`cli`]), running one process kind from it
//! ([`run`]), [`serve`], which runs a DynamoGraphDeployment [`manifest`] as local processes, and
//! [`transfer_bench`] (`dynamo bench-transfer`).
//! The processes themselves live in their crates: `dynamo-frontend`, `dynamo-sidecar`,
//! `dynamo-bench`.

pub mod cli;
pub mod manifest;
pub mod run;
pub mod serve;
pub mod transfer_bench;
