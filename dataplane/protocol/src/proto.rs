//! Generated gRPC types and stubs for `dynamo.worker.v1` (see `proto/dynamo/worker/v1/worker.proto`).
#![allow(clippy::all, missing_docs, unreachable_pub)]

tonic::include_proto!("dynamo.worker.v1");
