//! The `dynamo` binary's library: the command line ([`cli`]), running one process kind from it
//! ([`run`]), and [`serve`], which runs a DynamoGraphDeployment [`manifest`] as local processes.
//! The processes themselves live in their crates: `dynamo-frontend`, `dynamo-sidecar`,
//! `dynamo-bench`.

pub mod cli;
pub mod manifest;
pub mod run;
pub mod serve;
